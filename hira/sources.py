"""Where data and models come from: a local path, a URL or a Hub id, and one clear error when a source cannot be read.

A name that can only be a local path (absolute, ``./``, ``~``, more than one ``/``, or a data-file extension) and does
not exist is reported as a missing path at once, never sent to the Hub. A Hub id or URL that fails to load is one line
naming the source and the first line of the underlying error, with no chained traceback. Local JSON files are checked
for the two mistakes ``datasets`` lets through or reports without a position: a single JSON object (read as one row)
and malformed JSON. :func:`load_raw_dataset` is the one resolver of a training source (the recipes', and ConvAI2's
for remote files).
"""

from __future__ import annotations

import json
import os


DATA_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def one_line(err: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def looks_local(name: str) -> bool:
    """True for a name that can only be a local path (a Hub id is ``name`` or ``owner/name``)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or os.path.splitext(name)[1].lower() in DATA_BUILDERS)


def check_json_records(path: str) -> list:
    """A local JSON file must hold a list of records or JSON lines: ``datasets`` reads a single JSON object as one
    row (a wrapped ``{"data": [...]}`` or a columnar object would train on one example) and reports malformed JSON
    without saying where. Both are one clear error here, naming the line. Returns what the file holds (the list, or
    the records of its lines)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if not stripped:
        raise ValueError(f"{path} is empty: expected a JSON list of records or JSON lines.")
    if stripped[0] == "[":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}. Fix the file (a JSON list of records).") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        obj, end = json.JSONDecoder().raw_decode(stripped)
    except json.JSONDecodeError:
        obj, end = None, 0
    if isinstance(obj, dict) and not stripped[end:].strip() and (len(lines) > 1 or path.endswith(".json")):
        raise ValueError(
            f"{path} holds one JSON object (keys {sorted(obj)[:6]}), not a list of records, so it would train on a "
            "single example. Write the records as a JSON list [...] or as JSON lines (one record per line)."
        )
    records = []
    for n, line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {n} is not a JSON record ({err}). Expected a JSON list of records or JSON lines."
            ) from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}, line {n} is a JSON {type(rec).__name__}, not a record: expected JSON lines.")
        records.append(rec)
    return records


def missing_path_error(flag: str, name: str, accepts: str) -> FileNotFoundError:
    return FileNotFoundError(f"{flag} {name}: no such file or folder ({os.path.abspath(os.path.expanduser(name))}). "
                             f"Pass {accepts}.")


def load_hf_dataset(flag: str, source: str, *args, **kwargs):
    """``datasets.load_dataset(*args, **kwargs)``; a failure is one line naming ``source`` (no chained traceback)."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetsError

    try:
        return load_dataset(*args, **kwargs)
    except (OSError, DatasetsError, ValueError) as err:
        raise FileNotFoundError(f"{flag} {source} {_why(source, 'dataset')}: {one_line(err)}") from None


def _why(source: str, kind: str) -> str:
    if os.path.exists(source):
        return "could not be read"
    if "://" in source:
        return "could not be fetched (check the URL and that this machine can reach it)"
    from huggingface_hub import constants

    offline = f" (HF_HUB_OFFLINE=1: only cached Hub {kind}s load)" if constants.HF_HUB_OFFLINE else ""
    return f"is neither a local file or folder nor a {kind} the Hub serves{offline}"


def load_model_config(flag: str, name: str, trust_remote_code: bool = False):
    """``(path, config)`` of a model given as a packaged alias, a local folder or a Hub id; else one clear error."""
    from transformers import AutoConfig

    from hira.models import resolve_model

    path = resolve_model(name)
    if looks_local(path) and not os.path.exists(os.path.expanduser(path)):
        raise missing_path_error(flag, name, "a model folder, a Hub model id, or an alias (smollm2-135m, tiny-llama)")
    try:
        return path, AutoConfig.from_pretrained(os.path.expanduser(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{flag} {name} {_why(path, 'model')}: {one_line(err)}") from None


def load_raw_dataset(name_or_path: str, config: str | None = None, split: str = "train"):
    """One split from a local file (``.json``, ``.jsonl``, ``.csv``, ``.parquet``), a local folder (``<split>.<ext>``
    inside it, or any folder ``datasets`` reads), a remote file (``https://...``, ``hf://datasets/<id>/<file>``) or a
    Hub dataset id; a source that cannot be read is one clear error naming it."""
    flag = "dataset_name"
    if not name_or_path:
        raise ValueError("No dataset given: set `dataset_name` to a Hub id, a URL or a local file/folder")
    ext = os.path.splitext(name_or_path)[1].lower()
    if "://" in name_or_path:  # a remote file: URL or hf://datasets/<id>/<file>
        if ext not in DATA_BUILDERS:
            raise ValueError(f"{flag} {name_or_path}: cannot tell its format; a remote file must end in one of "
                             f"{sorted(DATA_BUILDERS)}")
        return load_hf_dataset(flag, name_or_path, DATA_BUILDERS[ext], data_files=name_or_path, split="train")
    if os.path.isfile(name_or_path):
        if ext not in DATA_BUILDERS:
            raise ValueError(f"Cannot read {name_or_path}: expected one of {sorted(DATA_BUILDERS)}")
        if DATA_BUILDERS[ext] == "json":
            check_json_records(name_or_path)
        return load_hf_dataset(flag, name_or_path, DATA_BUILDERS[ext], data_files=name_or_path, split="train")
    if os.path.isdir(name_or_path):
        for ext in (".json", ".jsonl", ".parquet", ".csv"):
            candidate = os.path.join(name_or_path, split + ext)
            if os.path.isfile(candidate):
                return load_raw_dataset(candidate)
    elif looks_local(name_or_path):
        raise missing_path_error(flag, name_or_path, "an existing file (.json, .jsonl, .csv, .parquet) or folder, a "
                                 "URL, or a Hub dataset id")
    return load_hf_dataset(flag, name_or_path, name_or_path, name=config, split=split)
