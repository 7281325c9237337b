"""ConvAI2 (PersonaChat, self persona) data: one loader for every layout, shared by ``recipes/convai2.py`` (training)
and ``eval/convai2.py`` (evaluation), so the same dialogue gives the same turns, and through
``hira.prompts.build_example("convai2", turn)`` byte-identical prompts, on both sides.

:func:`load_turns` reads one split of

* a ParlAI text file (``train_self_original.txt``, ``valid_self_original.txt``): ``<n> your persona: ...`` lines, then
  ``<n> <partner>\\t<response>[\\t\\t<candidates>]``; the numbering restarts with each dialogue;
* a PersonaChat JSON file (``.json`` list or ``.jsonl``) of dialogues with ``personality`` (list) and ``utterances``
  (list of ``{"history", "candidates"}``, the gold reply is the last candidate), the layout of the Hub dataset
  ``AlekseyKorshuk/persona-chat``; HF's ``personachat_self_original.json`` wraps the dialogues in
  ``{"train": [...], "valid": [...]}`` and the split is picked by name;
* a JSON file of turns with ``persona`` (list), ``history`` (list, ends with the partner's utterance) and ``response``;
* a JSON file of prebuilt ``instruction`` + ``output`` records (the HiRA/SPT builder's ``data_file/convai2`` files);
* a folder holding ``<split>.json``, ``<split>.jsonl``, ``<split>.txt`` or ``<split>_self_original.txt``
  (``valid`` for ``validation``), or any folder ``datasets`` reads, or a Hub dataset id (``datasets.load_dataset``).

A turn is ``{"persona", "history", "response"}`` (one per self reply: the history is every earlier utterance plus the
partner's current one) or, from the prebuilt layout, ``{"instruction", "output"}``. When R speaks first, the partner's
turn is the silence token :data:`SILENCE` (ParlAI's spelling); PersonaChat JSON's ``__ SILENCE __`` becomes it
everywhere, prebuilt instructions included, so first-turn prompts are the same from every layout.
"""

from __future__ import annotations

import json
import os

from hira.sources import load_hf_dataset, load_raw_dataset, looks_local, missing_path_error


SILENCE = "__SILENCE__"  # ParlAI's placeholder for the partner's turn when R speaks first
_SILENCE_VARIANTS = ("__ SILENCE __",)
SPLIT_NAMES = {"validation": ("validation", "valid"), "valid": ("valid", "validation")}
LAYOUTS = (
    "ParlAI text (.txt)",
    "PersonaChat dialogues (personality + utterances)",
    "turns (persona + history + response)",
    "prebuilt (instruction + output)",
)


def _silence(text: str) -> str:
    for variant in _SILENCE_VARIANTS:
        text = text.replace(variant, SILENCE)
    return text


def parse_parlai(path: str) -> list[dict]:
    """One ``{"persona", "history", "response"}`` per self turn of a ParlAI ConvAI2 self-persona text file."""
    turns: list[dict] = []
    persona: list[str] = []
    history: list[str] = []
    prev_n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            num, _, text = line.partition(" ")
            if not num.isdigit():
                raise ValueError(
                    f"{path}:{lineno} does not start with a turn number; expected the ParlAI ConvAI2 text format "
                    "('<n> your persona: ...' / '<n> <partner>\\t<response>') or a JSON file."
                )
            n = int(num)
            if n <= prev_n:  # the numbering restarts: a new dialogue
                persona, history = [], []
            prev_n = n
            if text.startswith("your persona:"):
                persona.append(text[len("your persona:"):].strip())
                continue
            if text.startswith("partner's persona:"):
                continue  # self-persona setting: the partner's persona is not given to the model
            fields = text.split("\t")
            if len(fields) < 2:
                raise ValueError(
                    f"{path}:{lineno}: expected '<partner utterance>\\t<response>' (tab-separated), got {text[:60]!r}."
                )
            history = history + [_silence(fields[0].strip())]
            turns.append({"persona": list(persona), "history": list(history), "response": fields[1].strip()})
            history = history + [fields[1].strip()]
    if not turns:
        raise ValueError(f"{path} holds no dialogue turns (ParlAI ConvAI2 format expected).")
    return turns


def _dialogue_turns(dialogue: dict) -> list[dict]:
    """PersonaChat JSON: one dialogue (``personality``, ``utterances``) -> one turn per self reply."""
    turns = []
    for utt in dialogue["utterances"]:
        history = [_silence(h.strip()) for h in utt["history"]]
        if len(history) % 2 == 0:  # R spoke first and the file has no silence marker
            history = [SILENCE] + history
        turns.append({"persona": [p.strip() for p in dialogue["personality"]], "history": history,
                      "response": utt["candidates"][-1].strip()})
    return turns


def records_to_turns(records, source: str) -> list[dict]:
    """Turns from records of one JSON layout, detected from the first record's keys."""
    records = list(records)
    if not records:
        raise ValueError(f"{source} holds no records.")
    first = records[0]
    if not isinstance(first, dict):
        raise ValueError(f"{source}: expected records (JSON objects), got a {type(first).__name__}.")
    keys = set(first)
    if {"personality", "utterances"} <= keys:
        layout, need = "dialogues", ("personality", "utterances")
    elif {"persona", "history", "response"} <= keys:
        layout, need = "turns", ("persona", "history", "response")
    elif {"instruction", "output"} <= keys:
        layout, need = "prebuilt", ("instruction", "output")
    else:
        raise ValueError(f"{source}: records with keys {sorted(keys)} match no ConvAI2 layout; expected one of "
                         f"{', '.join(LAYOUTS)}.")
    turns = []
    for i, rec in enumerate(records):
        missing = [k for k in need if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise ValueError(f"{source}, record {i}: missing {missing} (the first record has the {layout} layout).")
        if layout == "dialogues":
            turns.extend(_dialogue_turns(rec))
        elif layout == "turns":
            history = [_silence(h.strip()) for h in rec["history"]]
            turns.append({"persona": list(rec["persona"]), "history": history, "response": rec["response"].strip()})
        else:
            turns.append({"instruction": _silence(rec["instruction"]), "output": rec["output"].strip()})
    return turns


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as whole:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    first = whole if n == 1 else err
                    raise ValueError(f"{path} is neither JSON nor JSON lines (line {n}: {first}).") from None
        return records


def _pick_split(data: dict, split: str, path: str):
    for name in SPLIT_NAMES.get(split, (split,)):
        if name in data and isinstance(data[name], list):
            return data[name]
    raise ValueError(
        f"{path} is a JSON object with keys {sorted(data)[:8]}, not a list of records, and has no {split!r} split. "
        "Pass --dataset_train_split / --split with one of its split keys, or a JSON list of records."
    )


def load_turns(source: str, split: str = "train", config: str | None = None) -> list[dict]:
    """Every turn of ``split`` in ``source`` (see the module docstring for the layouts and sources)."""
    if not source:
        raise ValueError("No ConvAI2 data given: pass a ParlAI .txt, a JSON file, a folder or a Hub dataset id.")
    if os.path.isfile(source):
        ext = os.path.splitext(source)[1].lower()
        if ext == ".txt":
            return parse_parlai(source)
        if ext not in (".json", ".jsonl"):
            raise ValueError(f"Cannot read {source}: expected a ParlAI .txt or a .json/.jsonl file.")
        data = _read_json(source)
        if isinstance(data, dict):
            data = _pick_split(data, split, source)
        return records_to_turns(data, source)
    if os.path.isdir(source):
        names = SPLIT_NAMES.get(split, (split,))
        for name in names:
            for suffix in (".json", ".jsonl", ".txt", "_self_original.txt"):
                candidate = os.path.join(source, name + suffix)
                if os.path.isfile(candidate):
                    return load_turns(candidate, split)
    if "://" in source:  # a remote .json/.jsonl/.csv/.parquet file (URL or hf://datasets/<id>/<file>)
        return records_to_turns(load_raw_dataset(source, config, split), source)
    if not os.path.exists(source) and (looks_local(source) or source.endswith(".txt")):
        raise missing_path_error("ConvAI2 data", source, "a ParlAI .txt, a JSON file, a folder or a Hub dataset id")
    return records_to_turns(load_hf_dataset("ConvAI2 data", source, source, name=config, split=split), source)


def load_dataset_for_recipe(source: str, config: str | None = None, split: str = "train"):
    """:func:`load_turns` as a ``datasets.Dataset`` (the ``load_data`` hook of :func:`hira.recipe.run_recipe`)."""
    from datasets import Dataset

    return Dataset.from_list(load_turns(source, split, config))
