"""Evaluator throughput: batched + merged + length-sorted generation vs a naive loop, same model and questions.

python bench/bench_eval.py                                   # smollm2-135m + HiRA r=32 adapter, 32 BoolQ questions
python bench/bench_eval.py --n 64 --batch_size 16 --num_beams 4

Both sides answer the same commonsense questions with the same prompts and decoding and are scored with the same
keyword rule:

* naive: the PEFT model with the adapter NOT merged (stock-PEFT HiRA rebuilds W0 * (B A) in every forward), one
  question at a time, in file order;
* evaluator: ``hira.inference`` as the eval scripts run it: adapter merged into the base weights, prompts sorted by
  length, batches of ``--batch_size`` with left padding.

The adapter has random nonzero B (``init_weights=False``) so that it changes the model; its quality is irrelevant here.
The two sides' predictions are compared and the agreement printed (batched fp32 generation can differ in rare ties).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from hira import inference  # noqa: E402
from hira.models import resolve_model  # noqa: E402
from hira.prompts import commonsense_prompt  # noqa: E402


def questions(n: int, data_dir: str) -> tuple[list[str], str]:
    path = os.path.join(data_dir, "boolq", "test.json")
    if os.path.isfile(path):
        with open(path) as f:
            return [commonsense_prompt(r["instruction"]) for r in json.load(f)[:n]], path
    # no data folder: real-shaped BoolQ instructions of varied length built from a fixed word list
    words = "the river city water light summer state law north film game team book war music school".split()
    prompts = []
    for i in range(n):
        q = " ".join(words[(i * 7 + j) % len(words)] for j in range(6 + (i * 5) % 25))
        prompts.append(commonsense_prompt(f"Please answer the following question with true or false, question: "
                                          f"is {q}?\n\nAnswer format: true/false"))
    return prompts, "synthetic"


def make_adapter(base: str, out: str, r: int) -> None:
    import hira
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = hira.HiraConfig(r=r, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
                          init_weights=False)
    model = get_peft_model(model, cfg)
    with torch.no_grad():  # small nonzero B: the adapter changes the weights by a few percent
        for name, p in model.named_parameters():
            if "hira_B" in name:
                p.mul_(0.05 / max(p.abs().max().item(), 1e-8))
    model.save_pretrained(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=32, help="questions")
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--num_beams", type=int, default=1)
    ap.add_argument("--max_new_tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data_dir", default=os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                        "..", "..", "shared", "data", "commonsense")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = resolve_model(args.model)
    prompts, source = questions(args.n, args.data_dir)
    decoding = inference.DecodingConfig(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                        batch_size=args.batch_size, stop_strings=("### Instruction",))
    with tempfile.TemporaryDirectory() as tmp:
        adapter = os.path.join(tmp, "adapter")
        make_adapter(base, adapter, args.r)

        # naive loop: unmerged adapter, one question at a time
        naive = inference.load_for_inference(adapter, merge=False, dtype="float32")
        t0 = time.perf_counter()
        naive_out = [inference.generate_batch(naive.model, naive.tokenizer, [p], decoding)[0] for p in prompts]
        t_naive = time.perf_counter() - t0
        del naive

        # evaluator: merged, sorted by length, batched
        fast = inference.load_for_inference(adapter, merge=True, dtype="float32")
        t0 = time.perf_counter()
        order = inference.sort_by_length(prompts, fast.tokenizer)
        fast_out = [None] * len(prompts)
        for s in range(0, len(order), args.batch_size):
            idx = order[s:s + args.batch_size]
            for i, text in zip(idx, inference.generate_batch(fast.model, fast.tokenizer, [prompts[i] for i in idx],
                                                             decoding)):
                fast_out[i] = text
        t_fast = time.perf_counter() - t0

    agree = sum(a == b for a, b in zip(naive_out, fast_out))
    qps_naive, qps_fast = len(prompts) / t_naive, len(prompts) / t_fast
    print(f"model {args.model} + HiRA r={args.r} (q,k,v,up,down), {len(prompts)} questions from {source}, "
          f"num_beams={args.num_beams}, max_new_tokens={args.max_new_tokens}, threads={args.threads}")
    print(f"{'':34s}{'seconds':>9s}{'questions/s':>13s}")
    print(f"{'naive (unmerged, 1 at a time)':34s}{t_naive:9.2f}{qps_naive:13.2f}")
    print(f"{'evaluator (merged, sorted, bs=' + str(args.batch_size) + ')':34s}{t_fast:9.2f}{qps_fast:13.2f}")
    print(f"speed-up: {qps_fast / qps_naive:.1f}x; identical predictions: {agree}/{len(prompts)}")


if __name__ == "__main__":
    main()
