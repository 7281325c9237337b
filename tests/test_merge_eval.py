"""The evaluators' merge is exact, shown with an adapter whose outputs depend on the prompt and on every part of ΔW.

(An adapter that always emits the same text cannot show it: a merge that adds 0.5·ΔW, or nothing at all, would give
the same text.) A random HiRA adapter on the tiny Llama (ΔW ≈ 2·W0 on every projection) makes the greedy
continuations differ between prompts and from the base model's; merged and unmerged evaluation must produce
the same predictions, and the merged model's logits must equal the unmerged ones far more closely than a model
with half the update does.
"""

import json
import os

import pytest
import torch

import hira
from hira import inference
from hira.models import resolve_model
from hira_reference import rel
from repo_scripts import load_script


cs = load_script("eval", "commonsense")

QUESTIONS = ["is the sky blue", "can a penguin fly", "is paris in france", "do fish swim", "is ice hot",
             "does the moon orbit the earth", "is gold a metal", "do cats bark"]


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    path = resolve_model("tiny-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, hira.HiraConfig(r=4, target_modules=targets, init_weights=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, hira.layer.Linear)):
            A, B = layer.hira_A["default"], layer.hira_B["default"]
            A.copy_(torch.randn(A.shape, generator=g))
            B.copy_(torch.randn(B.shape, generator=g))
            rms = (B @ A).pow(2).mean().sqrt()
            A.mul_((2.0 / rms).sqrt())
            B.mul_((2.0 / rms).sqrt())
    out = tmp_path_factory.mktemp("adapter") / "random"
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cs")
    (d / "boolq").mkdir()
    rows = [{"instruction": f"Please answer the following question with true or false, question: {q}?\n\nAnswer "
             "format: true/false", "input": "", "output": "the correct answer is true", "answer": "true"}
            for q in QUESTIONS]
    (d / "boolq" / "test.json").write_text(json.dumps(rows))
    return str(d)


def _predictions(data_dir, ckpt, out, extra=()):
    cs.main(["--ckpt", ckpt, "--data_dir", data_dir, "--tasks", "boolq", "--num_beams", "1", "--max_new_tokens", "8",
             "--out", str(out), *extra])
    with open(os.path.join(out, "predictions.jsonl")) as f:
        return {r["id"]: r["prediction"] for r in map(json.loads, f)}


def test_merged_and_unmerged_evaluation_agree(tmp_path, data_dir, random_adapter):
    merged = _predictions(data_dir, random_adapter, tmp_path / "merged")
    unmerged = _predictions(data_dir, random_adapter, tmp_path / "unmerged", ["--no_merge"])
    base = _predictions(data_dir, "tiny-llama", tmp_path / "base")
    assert len(set(merged.values())) >= 3, "the adapter's continuations must depend on the prompt"
    assert sum(merged[k] != base[k] for k in merged) >= 6, "the adapter must change the continuations"
    assert merged == unmerged


def test_merged_logits_equal_unmerged_far_below_a_half_update(data_dir, random_adapter):
    prompts = [cs.commonsense_prompt(f"question: {q}?") for q in QUESTIONS[:4]]
    logits = {}
    for merge in (True, False):
        loaded = inference.load_for_inference(random_adapter, merge=merge, dtype="float32", device="cpu")
        enc = loaded.tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits[merge] = loaded.model(**enc).logits
        if not merge:  # the same adapter with half its update (each factor scaled by √0.5)
            with torch.no_grad():
                for layer in (m for m in loaded.model.modules() if isinstance(m, hira.layer.Linear)):
                    layer.hira_B["default"].mul_(0.5)
                logits["half"] = loaded.model(**enc).logits
    err = rel(logits[True], logits[False])
    assert err < 1e-5 and rel(logits["half"], logits[False]) > 1000 * err, (err, rel(logits["half"], logits[False]))
