"""Beam search with the prompt prefilled once per question (cache repeated for the beams) gives exactly the same
text as ``generate`` running the prompt once per beam."""

import pytest
import torch

import hira.inference as inference
from hira.models import resolve_model


@pytest.mark.parametrize("num_beams", [2, 4])
def test_shared_prefill_matches_plain_beam_search(num_beams, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("tiny-llama")
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    tok.pad_token = tok.unk_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = ["The capital of France is", "Please answer the following question with true or false, question: is it?",
               "a b c", "Below is an instruction that describes a task."]
    dec = inference.DecodingConfig(num_beams=num_beams, max_new_tokens=8, batch_size=4)
    calls = []
    real = inference._shared_prefill
    monkeypatch.setattr(inference, "_shared_prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared = inference.generate_batch(model, tok, prompts, dec)
    assert calls, "the shared prefill was not used"
    monkeypatch.setattr(inference, "_shared_prefill", lambda *a, **k: None)
    plain = inference.generate_batch(model, tok, prompts, dec)
    assert shared == plain
