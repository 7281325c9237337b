"""Save/load round-trips in fresh processes, and interoperability with stock PEFT's built-in HiRA.

Three child processes, in order: (1) ``import hira``: train-ish a plain HiRA adapter and save it; (2) stock PEFT
only (``hira`` never imported): load our adapter, save a stock adapter, and try to load a family checkpoint (must
fail loudly); (3) ``import hira``: load both adapters in a fresh process. Outputs are compared across processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch


MODEL_SRC = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    torch.set_num_threads(1)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0 = nn.Linear(10, 20)
            self.relu = nn.ReLU()
            self.lin1 = nn.Linear(20, 6)

        def forward(self, x):
            return self.lin1(self.relu(self.lin0(x)))

    def base_model():
        torch.manual_seed(0)
        return MLP()

    def randomise(model, seed):
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            for n, p in model.named_parameters():
                if "hira_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    X = torch.randn(5, 10, generator=torch.Generator().manual_seed(3))
    """
)


def _run(tmp_path, name: str, body: str) -> dict:
    script = tmp_path / f"{name}.py"
    script.write_text(MODEL_SRC + textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{name} failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exchange(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interop")
    ours, stock, family = tmp / "ours", tmp / "stock", tmp / "family"
    saved = _run(
        tmp,
        "save_ours",
        f"""
        import hira
        from peft import get_peft_model
        model = get_peft_model(base_model(), hira.HiraConfig(r=4, target_modules=["lin0", "lin1"]))
        randomise(model, 1)
        model.save_pretrained({str(ours)!r})
        # A family checkpoint with the same tensor names and shapes as plain HiRA (random modulator), from a config
        # edited after construction: the saved type must still be HIRA_FAMILY.
        cfg = hira.HiraConfig(r=4, target_modules=["lin0", "lin1"])
        cfg.modulator = "random"
        fam = get_peft_model(base_model(), cfg)
        randomise(fam, 1)
        fam.save_pretrained({str(family)!r})
        print(json.dumps({{"y": model(X).tolist(), "y_family": fam(X).tolist()}}))
        """,
    )
    in_stock = _run(
        tmp,
        "stock_side",
        f"""
        import warnings
        warnings.simplefilter("error")  # stock PEFT must not even warn about unknown config keys
        from peft import HiraConfig, PeftModel, get_peft_model
        model = PeftModel.from_pretrained(base_model(), {str(ours)!r})
        layer_module = type(model.base_model.model.lin0).__module__
        y_ours_in_stock = model(X).tolist()
        stock = get_peft_model(base_model(), HiraConfig(r=4, target_modules=["lin0", "lin1"]))
        randomise(stock, 2)
        stock.save_pretrained({str(stock)!r})
        y_stock = stock(X).tolist()
        try:
            PeftModel.from_pretrained(base_model(), {str(family)!r})
            family_error = None
        except Exception as exc:  # noqa: BLE001 - we record what stock PEFT raised
            family_error = f"{{type(exc).__name__}}: {{exc}}"
        print(json.dumps({{"hira_imported": "hira" in sys.modules, "layer_module": layer_module,
                          "y_ours_in_stock": y_ours_in_stock, "y_stock": y_stock, "family_error": family_error}}))
        """,
    )
    reloaded = _run(
        tmp,
        "reload_ours",
        f"""
        import hira
        from peft import PeftModel
        a = PeftModel.from_pretrained(base_model(), {str(ours)!r})
        b = PeftModel.from_pretrained(base_model(), {str(stock)!r})
        c = PeftModel.from_pretrained(base_model(), {str(family)!r})
        print(json.dumps({{"modules": [type(m.base_model.model.lin0).__module__ for m in (a, b, c)],
                          "config_is_ours": isinstance(b.peft_config["default"], hira.HiraConfig),
                          "y_ours": a(X).tolist(), "y_stock": b(X).tolist(), "y_family": c(X).tolist()}}))
        """,
    )
    return {"dirs": (ours, stock, family), "saved": saved, "stock": in_stock, "reloaded": reloaded}


def test_save_load_round_trip_fresh_process(exchange):
    assert exchange["reloaded"]["modules"] == ["hira.layer"] * 3
    y_saved = torch.tensor(exchange["saved"]["y"])
    torch.testing.assert_close(torch.tensor(exchange["reloaded"]["y_ours"]), y_saved, rtol=0, atol=0)
    y_family = torch.tensor(exchange["saved"]["y_family"])
    assert (y_family - y_saved).abs().max() > 1e-3  # the random modulator is different math
    torch.testing.assert_close(torch.tensor(exchange["reloaded"]["y_family"]), y_family, rtol=0, atol=0)


def test_our_plain_hira_loads_in_stock_peft(exchange):
    ours = exchange["dirs"][0]
    cfg = json.loads((ours / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "HIRA"
    assert not {"variant", "modulator", "fused", "half_precision_forward"} & set(cfg), "stock schema only"
    st = exchange["stock"]
    assert st["hira_imported"] is False and st["layer_module"] == "peft.tuners.hira.layer"
    torch.testing.assert_close(
        torch.tensor(st["y_ours_in_stock"]), torch.tensor(exchange["saved"]["y"]), rtol=1e-5, atol=1e-6
    )


def test_stock_peft_hira_checkpoint_loads_here(exchange):
    assert exchange["reloaded"]["config_is_ours"]
    torch.testing.assert_close(
        torch.tensor(exchange["reloaded"]["y_stock"]), torch.tensor(exchange["stock"]["y_stock"]), rtol=1e-5, atol=1e-6
    )


def test_family_checkpoint_is_refused_by_stock_peft(exchange):
    err = exchange["stock"]["family_error"]
    assert err is not None, "stock PEFT silently loaded a HiRA-family checkpoint"
    assert "HIRA_FAMILY" in err
    cfg = json.loads((exchange["dirs"][2] / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "HIRA_FAMILY" and cfg["modulator"] == "random"


def test_adapter_file_layout_matches_stock(exchange):
    from safetensors.torch import load_file

    ours, stock, _ = exchange["dirs"]
    k1 = {k: v.shape for k, v in load_file(ours / "adapter_model.safetensors").items()}
    k2 = {k: v.shape for k, v in load_file(stock / "adapter_model.safetensors").items()}
    assert k1 == k2 and k1


def test_tiny_llama_adapter_round_trip(tmp_path):
    """A real transformers model (tiny Llama, Llama-2 tokenizer) with HiRA on attention and MLP projections."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    import hira
    from hira.models import resolve_model

    path = resolve_model("tiny-llama")
    ids = torch.tensor([[1, 450, 7483, 310, 3444, 338]])
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path),
        hira.HiraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], init_weights=False),
    )
    with torch.no_grad():
        y = model(ids).logits
        with model.disable_adapter():
            assert (model(ids).logits - y).abs().max() > 1e-4
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, y, rtol=0, atol=0)
