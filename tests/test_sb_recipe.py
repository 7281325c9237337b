"""HiRA-SB through the real recipe command: the gradient-matched initialisation must have run before step 0.

Before ``hira.sb_init`` a HiRA-SB layer holds a fixed random orthonormal subspace (its frozen B and A); after it,
B = c·U_r and A = c·V_rᵀ are the top singular vectors of the full-fine-tuning gradient target, with c² =
√(d·n)/(r·rms(W0)). The saved adapter must hold the latter, and its frozen factors must not have moved in training.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from repo_scripts import ROOT
from test_recipes import COMMONSENSE_ROWS as ROWS


def _random_subspace(d, n, r):
    """The factors a HiRA-SB layer starts with before sb_init (hira/variants.py: seeded QR of Gaussians)."""
    gen = torch.Generator(device="cpu").manual_seed(0x5B + r)
    Bq, _ = torch.linalg.qr(torch.randn(d, r, generator=gen))
    Aq, _ = torch.linalg.qr(torch.randn(n, r, generator=gen))
    return Aq.t(), Bq


@pytest.mark.slow
def test_sb_recipe_initialises_from_the_gradient(tmp_path):
    data = tmp_path / "train.json"
    data.write_text(json.dumps(ROWS))
    out = tmp_path / "out"
    args = {"model_name_or_path": "tiny-llama", "dtype": "float32", "dataset_name": str(data), "method": "hira",
            "hira_variant": "sb", "hira_r": 4, "max_steps": 1, "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1, "learning_rate": 1e-2, "warmup_steps": 0, "use_cpu": "true",
            "bf16": "false", "eval_strategy": "no", "load_best_model_at_end": "false", "save_strategy": "no",
            "val_size": 0, "logging_steps": 1, "output_dir": str(out), "report_to": "none", "log_level": "warning"}
    argv = [x for k, v in args.items() for x in (f"--{k}", str(v))]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "recipes", "commonsense.py"), *argv],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    from transformers import AutoModelForCausalLM

    from hira.models import resolve_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"), dtype=torch.float32)
    weights = {n: p for n, p in base.named_parameters()}
    saved = load_file(out / "adapter_model.safetensors")
    layers = sorted({k.rsplit(".hira_", 1)[0] for k in saved})
    assert len(layers) == 10  # q, k, v, up, down in each of the 2 decoder layers
    for key in layers:
        A, B = saved[f"{key}.hira_A"], saved[f"{key}.hira_B"]
        d, r = B.shape
        n = A.shape[1]
        A0, B0 = _random_subspace(d, n, r)
        assert not torch.allclose(A, A0) and not torch.allclose(B, B0), f"{key}: sb_init did not run"
        W0 = weights[key.replace("base_model.model.", "") + ".weight"].detach()
        c2 = math.sqrt(d * n) / (r * W0.pow(2).mean().sqrt().item())
        torch.testing.assert_close(B.t() @ B, c2 * torch.eye(r), rtol=1e-4, atol=1e-4 * c2)  # B = c·U_r
        torch.testing.assert_close(A @ A.t(), c2 * torch.eye(r), rtol=1e-4, atol=1e-4 * c2)  # A = c·V_rᵀ
