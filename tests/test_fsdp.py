"""HiRA under FSDP2 with the repository's accelerate configs, for real on 2 CPU processes (gloo).

`accelerate launch --config_file accelerate_configs/fsdp[_offload].yaml --num_processes 2` runs the commonsense
recipe through `tests/scripts/fsdp_on_cpu.py`, which only lets accelerate take its FSDP path on a CPU-only machine
(accelerate itself would fall back to DDP there: see that script and `test_fsdp_config_on_cpu_is_refused_not_ddp`).
Checked: the model really is sharded (run_summary records FSDP, version 2), the logged losses equal a 1-process run of
the same global batch (SGD, so a wrong gradient reduction would show), the saved adapter is a full, plain PEFT
checkpoint equal to the 1-process one, it merges exactly, and a run resumed from an FSDP checkpoint (sharded model and
AdamW state) ends with the adapter of the uninterrupted run.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from repo_scripts import ROOT
from safetensors.torch import load_file
from test_recipes import COMMONSENSE_ROWS, run, tiny_args, write_json


SHIM = os.path.join(ROOT, "tests", "scripts", "fsdp_on_cpu.py")
RECIPE = os.path.join(ROOT, "recipes", "commonsense.py")


def launch(config, argv, shim=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "accelerate_configs", config), "--num_processes", "2", *([SHIM] if shim else []),
           RECIPE, *argv, "--ddp_backend", "gloo"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def losses(out):
    summary = json.load(open(os.path.join(out, "run_summary.json")))
    return summary, [h["loss"] for h in summary["log_history"] if "loss" in h]


def adapter(out):
    return load_file(os.path.join(out, "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["fsdp.yaml", "fsdp_offload.yaml"])
def test_fsdp2_two_processes_match_one_process(config, tmp_path):
    data = write_json(tmp_path / "train.json", COMMONSENSE_ROWS * 4)
    common = dict(max_steps=3, optim="sgd", learning_rate=2.0)
    proc = launch(config, tiny_args(data, tmp_path / "fsdp", per_device_train_batch_size=2, **common))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    two, two_losses = losses(tmp_path / "fsdp")
    assert (two["distributed_type"], two["fsdp_version"], two["world_size"], two["steps"]) == ("FSDP", 2, 2, 3)
    run("commonsense", tiny_args(data, tmp_path / "one", per_device_train_batch_size=4, **common))
    one, one_losses = losses(tmp_path / "one")
    assert len(two_losses) == len(one_losses) == 3
    # the same 4 examples per step: equal far below the per-step loss change (~5e-3, and what a wrong reduction
    # such as a sum over processes or half the batch would move)
    for a, b in zip(two_losses, one_losses):
        assert abs(a - b) < 1e-4, (two_losses, one_losses)
    assert two_losses[-1] < two_losses[0] - 5e-3  # it did train
    # the adapter was gathered whole on save: a plain PEFT checkpoint, equal to the 1-process one
    a, b = adapter(tmp_path / "fsdp"), adapter(tmp_path / "one")
    assert a.keys() == b.keys() and any("hira_B" in k and v.abs().sum() > 0 for k, v in a.items())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    # and it merges exactly after training
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hira.models import resolve_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "fsdp")).eval()
    ids = torch.tensor([[1, 450, 7483, 310, 3444, 338]])
    with torch.no_grad():
        unmerged = model(ids).logits
        merged = model.merge_and_unload()(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fsdp2_resume_equals_uninterrupted(tmp_path):
    """AdamW (its state must come back from the sharded checkpoint), constant learning rate: 4 steps straight vs the
    same run resumed from its step-2 FSDP checkpoint."""
    data = write_json(tmp_path / "train.json", COMMONSENSE_ROWS * 2)
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2,
                  lr_scheduler_type="constant", hira_dropout=0.1)
    proc = launch("fsdp.yaml", tiny_args(data, tmp_path / "full", **common))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert "adapter_model.safetensors" in os.listdir(ckpt) and "model.safetensors" not in os.listdir(ckpt)
    fsdp_weights = torch.load(ckpt / "pytorch_model_fsdp.bin", map_location="cpu", weights_only=True)
    assert fsdp_weights and all("hira_" in k for k in fsdp_weights)  # the adapter only, never the base model
    (tmp_path / "resumed").mkdir()
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoint-2")  # what a run killed after step 2 leaves
    proc = launch("fsdp.yaml", tiny_args(data, tmp_path / "resumed", resume_from_checkpoint="last", **common))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary, _ = losses(tmp_path / "resumed")
    assert summary["global_step"] == 4 and summary["steps"] == 2 and summary["distributed_type"] == "FSDP"
    a, b = adapter(tmp_path / "full"), adapter(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_fsdp_config_on_cpu_is_refused_not_ddp(tmp_path):
    """Without the shim accelerate trains an FSDP config with DDP on a CPU-only machine; the recipe refuses that."""
    data = write_json(tmp_path / "train.json", COMMONSENSE_ROWS)
    proc = launch("fsdp.yaml", tiny_args(data, tmp_path / "out"), shim=False)
    assert proc.returncode != 0
    assert "RuntimeError: The accelerate config asks for FSDP, but accelerate did not enable it" in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "run_summary.json")
