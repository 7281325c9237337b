"""Plain-HiRA checkpoints of every layer type both ways between this tuner and stock PEFT (its HiRA, no ``import
hira``), in a fresh stock-PEFT process: same outputs within the dtype's tolerance.

Not covered, because stock PEFT 0.21 itself fails there: Conv3d kernels whose 2nd and 3rd sizes are 1 (stock's
``B·A`` takes a 1×1 shortcut on those dimensions and raises), embeddings with an ``embed_scale`` (stock adds its
update unscaled), bitsandbytes layers (stock's QHiRA merges are not exact). The tuner computes those correctly
(tests/test_matrix.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model

import hira
from hira_reference import rel
from tiny_layers import autocast, build, make_input


STOCK_LAYERS = ("linear", "linear_nobias", "conv1d_tf", "embedding", "embedding_padding_idx", "conv1d_k1",
                "conv1d_k3_stride2", "conv2d_1x1", "conv2d_1x3", "conv2d_3x3_dilation2", "conv3d_3x3x3")
STOCK_DTYPES = ("fp32", "bf16_adapters_fp32")
CELLS = [(lyr, dt) for lyr in STOCK_LAYERS for dt in STOCK_DTYPES]
# stock PEFT adds its update in the adapters' fp32 and rounds once; this tuner's default bf16 forward rounds the
# merged weight (docs/tuner.md): the two agree to bf16 resolution
TOL = {"fp32": 1e-5, "bf16_adapters_fp32": 2e-2}

STOCK_SIDE = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    warnings.simplefilter("ignore")
    from peft import HiraConfig, PeftModel, get_peft_model
    from tiny_layers import DTYPES, autocast, build, make_input
    torch.set_num_threads(1)
    manifest = json.load(open(sys.argv[1]))
    out = {}
    for cell in manifest["cells"]:
        name, dt = cell["layer"], cell["dtype"]
        x = make_input(name, dt)
        ours = PeftModel.from_pretrained(build(name, dt), cell["ours"])
        assert type(ours.base_model.model.layer).__module__ == "peft.tuners.hira.layer"
        torch.manual_seed(3)
        stock = get_peft_model(build(name, dt), HiraConfig(r=4, target_modules=["layer"], init_weights=False))
        stock.save_pretrained(cell["stock"])
        with torch.no_grad(), autocast(dt):
            out[name + "/" + dt] = {"ours_in_stock": ours(x).float().tolist(), "stock": stock(x).float().tolist()}
    assert "hira" not in sys.modules
    json.dump(out, open(sys.argv[2], "w"))
    """
)


def _randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "hira_" in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.3).to(p.dtype))


@pytest.fixture(scope="module")
def exchange(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interop_matrix")
    cells, ours_out = [], {}
    for name, dt in CELLS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(build(name, dt), hira.HiraConfig(r=4, target_modules=["layer"]))
        _randomise(model)
        d = tmp / f"ours_{name}_{dt}"
        model.save_pretrained(d)
        with torch.no_grad(), autocast(dt):
            ours_out[name + "/" + dt] = model(make_input(name, dt)).float()
        cells.append({"layer": name, "dtype": dt, "ours": str(d), "stock": str(tmp / f"stock_{name}_{dt}")})
    (tmp / "manifest.json").write_text(json.dumps({"cells": cells}))
    script = tmp / "stock_side.py"
    script.write_text(STOCK_SIDE)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__))  # tests/ only: stock PEFT, never this package
    proc = subprocess.run([sys.executable, str(script), str(tmp / "manifest.json"), str(tmp / "out.json")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cells, ours_out, json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize("name,dt", CELLS, ids=[f"{n}-{d}" for n, d in CELLS])
def test_plain_hira_checkpoints_both_ways(exchange, name, dt):
    cells, ours_out, stock_out = exchange
    key = name + "/" + dt
    # ours -> stock PEFT
    assert rel(torch.tensor(stock_out[key]["ours_in_stock"]), ours_out[key]) <= TOL[dt]
    # stock PEFT -> ours (fused layers after `import hira`)
    cell = next(c for c in cells if c["layer"] == name and c["dtype"] == dt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(build(name, dt), cell["stock"])
    assert type(loaded.base_model.model.layer).__module__ == "hira.layer"
    with torch.no_grad(), autocast(dt):
        y = loaded(make_input(name, dt)).float()
    assert rel(y, torch.tensor(stock_out[key]["stock"])) <= TOL[dt]
    with torch.no_grad(), loaded.disable_adapter(), autocast(dt):
        assert rel(loaded(make_input(name, dt)).float(), y) > 10 * TOL[dt]  # the adapters matter
