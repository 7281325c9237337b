"""Evaluate any task, a forked recipe's included: generate for a JSON of prompts and references, score with a rule.

python eval/generic.py --ckpt runs/mytask --data_file data/mytask/test.json --recipe recipes/mytask.py \
    --metric exact_match
python eval/generic.py --ckpt runs/mytask --data_file prompts.jsonl --metric keyword --keyword_pattern 'yes|no'
python eval/generic.py --ckpt runs/mytask --data_file prompts.json --metric bleu_rouge --num_beams 4

Data (``--data_file``, a JSON list or JSON lines):

* without ``--recipe``: records with ``prompt`` (the text the model continues, exactly as in training) and
  ``reference`` (a string, or a list of strings when several answers count);
* with ``--recipe recipes/<task>.py``: the raw records the recipe trains on; each goes through that recipe's
  ``to_prompt_completion``, so the prompt is byte-identical to the training prompt and the reference is the completion.

Metrics (``--metric``; the prediction is the new text cut at ``--stop_strings`` and stripped, references stripped):

* ``exact_match``: the prediction equals a reference;
* ``contains``: a reference occurs in the prediction;
* ``keyword``: the first match of ``--keyword_pattern`` in the prediction equals the first match in the reference (the
  commonsense rule, generalised; no match in the prediction is wrong, a reference without a match is an error);
* ``bleu_rouge``: corpus BLEU (sacrebleu 13a, no smoothing) and mean ROUGE-L F, as ``eval/convai2.py`` computes them.

``--ignore_case`` lower-cases both sides for the first three. Accuracies are x100. Generation, resuming, the run record
and metrics.json are the other evaluators' (``hira/inference.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout without install

from hira import inference  # noqa: E402
from hira.metrics import corpus_bleu, rouge_l  # noqa: E402
from hira.sources import check_json_records  # noqa: E402


METRICS = ("exact_match", "contains", "keyword", "bleu_rouge")


def read_records(path: str) -> list[dict]:
    """The records of a JSON list or JSON lines file (one clear error for anything else)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data_file {path}: no such file. Pass a JSON list or JSON lines of records.")
    records = check_json_records(path)
    if not records or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path} must hold a non-empty list of JSON records.")
    return records


def recipe_formatter(path: str):
    """``to_prompt_completion`` of the recipe script at ``path`` (loaded by path; its ``main`` does not run)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--recipe {path}: no such file. Pass a recipe script, e.g. recipes/mytask.py.")
    spec = importlib.util.spec_from_file_location("recipe_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "to_prompt_completion"):
        raise ValueError(f"--recipe {path} defines no to_prompt_completion(example) function.")
    return module.to_prompt_completion


def load_items(path: str, recipe: str | None = None, max_examples: int | None = None) -> list[dict]:
    """Items ``{"id", "prompt", "refs"}`` from ``path`` (see the module docstring)."""
    records = read_records(path)
    records = records[:max_examples] if max_examples else records
    fmt = recipe_formatter(recipe) if recipe else None
    items = []
    for i, rec in enumerate(records):
        if fmt is not None:
            try:
                ex = fmt(rec)
            except KeyError as err:
                raise ValueError(f"{path}, record {i} does not fit the recipe's to_prompt_completion "
                                 f"({err.args[0] if err.args else err}); the record has {sorted(rec)}.") from None
            prompt, refs = ex["prompt"], [ex["completion"]]
        else:
            if "prompt" not in rec or "reference" not in rec:
                raise ValueError(f"{path}, record {i}: expected 'prompt' and 'reference' (or pass --recipe to format "
                                 f"raw records), got {sorted(rec)}.")
            prompt, refs = rec["prompt"], rec["reference"]
            refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(prompt, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"{path}, record {i}: the prompt must be a string and the reference a string or a "
                             "non-empty list of strings.")
        items.append({"id": f"generic/{i}", "prompt": prompt, "refs": [r.strip() for r in refs]})
    return items


def first_match(pattern: re.Pattern, text: str) -> str:
    m = pattern.search(text)
    return m.group(0) if m else ""


def make_rule(metric: str, keyword_pattern: str | None, ignore_case: bool):
    """``rule(prediction, refs) -> bool`` for the accuracy metrics."""
    norm = (lambda s: s.lower()) if ignore_case else (lambda s: s)
    if metric == "exact_match":
        return lambda pred, refs: any(norm(pred) == norm(r) for r in refs)
    if metric == "contains":
        return lambda pred, refs: any(norm(r) in norm(pred) for r in refs)
    pattern = re.compile(keyword_pattern, re.IGNORECASE if ignore_case else 0)

    def keyword(pred: str, refs: list[str]) -> bool:
        got = norm(first_match(pattern, pred))
        return got != "" and any(got == norm(first_match(pattern, r)) for r in refs)

    return keyword


def check_keyword_references(items: list[dict], keyword_pattern: str | None, ignore_case: bool) -> None:
    if not keyword_pattern:
        raise ValueError("--metric keyword needs --keyword_pattern, e.g. 'yes|no' or 'answer[1-5]'.")
    try:
        pattern = re.compile(keyword_pattern, re.IGNORECASE if ignore_case else 0)
    except re.error as err:
        raise ValueError(f"--keyword_pattern {keyword_pattern!r} is not a regular expression: {err}") from None
    for it in items:
        if not any(pattern.search(r) for r in it["refs"]):
            raise ValueError(f"{it['id']}: no reference matches --keyword_pattern {keyword_pattern!r} "
                             f"({it['refs'][0][:60]!r}), so it could never be scored correct.")


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--data_file", required=True, help="JSON list / JSON lines of {prompt, reference} records, or "
                        "raw records with --recipe")
    parser.add_argument("--recipe", default=None, help="recipe script whose to_prompt_completion formats the records")
    parser.add_argument("--metric", choices=METRICS, default="exact_match")
    parser.add_argument("--keyword_pattern", default=None, help="regular expression for --metric keyword")
    parser.add_argument("--ignore_case", action="store_true", help="lower-case both sides (not for bleu_rouge)")
    parser.add_argument("--stop_strings", nargs="*", default=[], help="cut the generation at the first of these")
    inference.add_common_args(parser, num_beams=1, max_new_tokens=32, batch_size=8)
    args = parser.parse_args(argv)

    items = load_items(args.data_file, args.recipe, args.max_examples)
    if args.metric == "keyword":
        check_keyword_references(items, args.keyword_pattern, args.ignore_case)
    out_dir = args.out or inference.default_out_dir("generic", args.ckpt)
    decoding = inference.DecodingConfig(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                        batch_size=args.batch_size, stop_strings=tuple(args.stop_strings))
    data = {"data_file": os.path.abspath(args.data_file),
            "recipe": os.path.abspath(args.recipe) if args.recipe else None}
    task_config = {"data": data}
    loaded, generate_fn = inference.setup_from_args(args, decoding, out_dir, items, task_config)

    def postprocess(item: dict, text: str) -> dict:
        return {"clean": text.strip(), "refs": item["refs"]}

    records = inference.run_generation(items, loaded, decoding, out_dir, postprocess, generate_fn, "generic")
    if not records:  # not the main process
        return None
    preds, refs = [r["clean"] for r in records], [r["refs"] for r in records]
    if args.metric == "bleu_rouge":
        metrics = {"bleu": corpus_bleu(preds, refs), "rougeL": rouge_l(preds, refs)}
    else:
        rule = make_rule(args.metric, args.keyword_pattern, args.ignore_case)
        correct = sum(rule(p, r) for p, r in zip(preds, refs))
        metrics = {"accuracy": 100.0 * correct / len(records), "correct": correct}
    metrics.update(n=len(records), metric=args.metric, keyword_pattern=args.keyword_pattern,
                   ignore_case=args.ignore_case)
    summary = inference.write_metrics(out_dir, metrics, loaded.info, decoding, {"task": "generic", "data": data,
                                                                                "max_examples": args.max_examples})
    shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items() if v is not None}
    print(f"{args.metric}: {shown}")
    print(f"predictions: {os.path.join(out_dir, inference.PREDICTIONS_FILE)}  metrics: "
          f"{os.path.join(out_dir, inference.METRICS_FILE)}")
    return summary


if __name__ == "__main__":
    main()
