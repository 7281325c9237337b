"""Commonsense reasoning accuracy on the eight LLM-Adapters test sets (HiRA paper, Table 1).

python eval/commonsense.py --ckpt out/commonsense/checkpoint-best --data_dir ../LLM-Adapters/dataset
python eval/commonsense.py --ckpt tiny-llama --data_dir ../shared/data/commonsense --tasks boolq,piqa --max_examples 8
accelerate launch eval/commonsense.py --ckpt out/commonsense/checkpoint-best --data_dir dataset   # sharded over GPUs

Data: ``<data_dir>/<name>/test.json`` for each task, a JSON list of ``{"instruction", "input", "output", "answer"}``
(LLM-Adapters layout). ``--data_dir`` may also be a Hub dataset repo with that layout (downloaded when online).

Scoring (shared/research/protocols.md §B): the new tokens are decoded (special tokens skipped), cut at a new
``### Instruction`` header, stripped; the prediction is the FIRST match of the task's keyword alternation,
case-sensitive, substrings included, '' (wrong) when nothing matches. Accuracy per task and the unweighted average.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout without install

from hira import inference  # noqa: E402
from hira.prompts import commonsense_prompt  # noqa: E402
from hira.sources import looks_local, missing_path_error, one_line  # noqa: E402


# (LLM-Adapters folder name, Table 1 column, short name, keyword alternation); the order is Table 1's
TASKS = [
    ("boolq", "BoolQ", "boolq", "true|false"),
    ("piqa", "PIQA", "piqa", "solution1|solution2"),
    ("social_i_qa", "SIQA", "siqa", "answer1|answer2|answer3|answer4|answer5"),
    ("hellaswag", "HellaSwag", "hellaswag", "ending1|ending2|ending3|ending4"),
    ("winogrande", "WinoGrande", "winogrande", "option1|option2"),
    ("ARC-Easy", "ARC-e", "arc_e", "answer1|answer2|answer3|answer4|answer5"),
    ("ARC-Challenge", "ARC-c", "arc_c", "answer1|answer2|answer3|answer4|answer5"),
    ("openbookqa", "OBQA", "obqa", "answer1|answer2|answer3|answer4|answer5"),
]
_FOLDER = {}
for _folder, _col, _short, _ in TASKS:
    for _name in (_folder, _col, _short):
        _FOLDER[_name.lower()] = _folder
        _FOLDER[_name.lower().replace("-", "_")] = _folder
PATTERNS = {folder: re.compile(pat) for folder, _, _, pat in TASKS}
COLUMNS = {folder: col for folder, col, _, _ in TASKS}
STOP_STRINGS = ("### Instruction",)


def task_folder(task: str) -> str:
    """LLM-Adapters folder name for a folder, short or Table 1 name (``siqa``, ``arc_e``, ``ARC-Easy``, ``OBQA``...)."""
    folder = _FOLDER.get(task.strip().lower()) or _FOLDER.get(task.strip().lower().replace("-", "_"))
    if folder is None:
        names = ", ".join(f"{f} ({s})" for f, _, s, _ in TASKS)
        raise ValueError(f"Unknown commonsense task {task!r}. Known tasks (folder name or short name): {names}.")
    return folder


def extract_answer(task: str, text: str) -> str:
    """The first keyword of ``task`` in ``text`` (case-sensitive, substrings count), '' when there is none."""
    m = PATTERNS[task_folder(task)].search(text.strip())
    return m.group(0) if m else ""


def load_task(data_dir: str, task: str, max_examples: int | None = None) -> list[dict]:
    """Read ``<data_dir>/<folder>/test.json`` and check its format; returns ``{"id", "task", "prompt", "gold"}``."""
    folder = task_folder(task)
    path = os.path.join(data_dir, folder, "test.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No test file for {folder}: {path} does not exist. --data_dir must hold <task>/test.json in the "
            "LLM-Adapters layout (e.g. LLM-Adapters/dataset)."
        )
    try:
        with open(path) as f:
            records = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not a JSON file ({err}); expected a JSON list of LLM-Adapters records.") from err
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path} must be a JSON list of objects with 'instruction' and 'answer' (LLM-Adapters format).")
    items = []
    for i, rec in enumerate(records[:max_examples] if max_examples else records):
        if "instruction" not in rec or not ("answer" in rec or "output" in rec):
            raise ValueError(
                f"{path}, record {i}: expected keys 'instruction' and 'answer' (LLM-Adapters format), got {sorted(rec)}."
            )
        # the gold label: the `answer` field, or the keyword in `output` ("the correct answer is X") as HiRA does
        gold = str(rec["answer"]).strip() if "answer" in rec else extract_answer(folder, rec["output"])
        if not PATTERNS[folder].fullmatch(gold):
            raise ValueError(
                f"{path}, record {i}: gold answer {gold!r} is not a {folder} label ({PATTERNS[folder].pattern}). "
                "Is this the test file of another task?"
            )
        prompt = commonsense_prompt(rec["instruction"], rec.get("input") or "")
        items.append({"id": f"{folder}/{i}", "task": folder, "prompt": prompt, "gold": gold})
    return items


def resolve_data_dir(data_dir: str, folders: list[str]) -> str:
    """A local folder, or a Hub dataset repo with the LLM-Adapters layout (only the needed test files are fetched)."""
    if os.path.isdir(data_dir):
        return data_dir
    if looks_local(data_dir) or data_dir.count("/") != 1:
        raise missing_path_error("--data_dir", data_dir, "a folder holding <task>/test.json (LLM-Adapters/dataset) or "
                                 "a Hub dataset id of the form owner/name")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(data_dir, repo_type="dataset", allow_patterns=[f"{f}/test.json" for f in folders])
    except Exception as err:  # offline, unknown repo, ...
        raise FileNotFoundError(
            f"--data_dir {data_dir} is neither a local folder nor a dataset the Hub serves ({one_line(err)}). Offline, "
            "pass a local folder holding <task>/test.json."
        ) from None


def score(records: list[dict], folders: list[str]) -> dict:
    """Per-task accuracy (x100) and the unweighted mean over the tasks evaluated."""
    per_task = {}
    for folder in folders:
        rs = [r for r in records if r["task"] == folder]
        per_task[folder] = {"accuracy": 100.0 * sum(r["correct"] for r in rs) / len(rs), "n": len(rs)}
    avg = sum(v["accuracy"] for v in per_task.values()) / len(per_task)
    return {"per_task": per_task, "average": avg, "all_eight": len(per_task) == len(TASKS)}


def format_table(metrics: dict) -> str:
    """One row shaped like Table 1: a column per task and the average."""
    cols = [f for f, _, _, _ in TASKS if f in metrics["per_task"]]
    head = [COLUMNS[f] for f in cols] + ["Avg." if metrics["all_eight"] else f"Avg. ({len(cols)}/8)"]
    vals = [f"{metrics['per_task'][f]['accuracy']:.2f}" for f in cols] + [f"{metrics['average']:.2f}"]
    widths = [max(len(h), len(v)) for h, v in zip(head, vals)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", line(vals)])


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--data_dir", default="dataset", help="folder (or Hub dataset repo) with <task>/test.json")
    parser.add_argument("--tasks", default=",".join(f for f, _, _, _ in TASKS), help="comma-separated task names")
    inference.add_common_args(parser, num_beams=4, max_new_tokens=32, batch_size=8)
    args = parser.parse_args(argv)

    folders = [task_folder(t) for t in args.tasks.split(",") if t.strip()]
    data_dir = resolve_data_dir(args.data_dir, folders)
    items = [it for f in folders for it in load_task(data_dir, f, args.max_examples)]
    out_dir = args.out or inference.default_out_dir("commonsense", args.ckpt)
    decoding = inference.DecodingConfig(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                        batch_size=args.batch_size, stop_strings=STOP_STRINGS)
    task_config = {"prompt": "hira.prompts.commonsense_prompt", "data_dir": os.path.abspath(data_dir)}
    loaded, generate_fn = inference.setup_from_args(args, decoding, out_dir, items, task_config)

    def postprocess(item: dict, text: str) -> dict:
        pred = extract_answer(item["task"], text)
        return {"task": item["task"], "gold": item["gold"], "extracted": pred, "correct": pred == item["gold"]}

    records = inference.run_generation(items, loaded, decoding, out_dir, postprocess, generate_fn, "commonsense")
    if not records:  # not the main process
        return None
    metrics = score(records, folders)
    summary = inference.write_metrics(
        out_dir, metrics, loaded.info, decoding,
        {"task": "commonsense", "tasks": folders, "data_dir": os.path.abspath(data_dir),
         "max_examples": args.max_examples, "prompt_template": commonsense_prompt("{instruction}"),
         "rule": "protocols.md §B: first case-sensitive keyword match in the new text, '' = wrong"},
    )
    print(format_table(metrics))
    print(f"predictions: {os.path.join(out_dir, inference.PREDICTIONS_FILE)}  metrics: "
          f"{os.path.join(out_dir, inference.METRICS_FILE)}")
    return summary


if __name__ == "__main__":
    main()
