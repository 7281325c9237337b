"""The tiny one-layer models of the tuner tests (no ``hira`` import: stock-PEFT subprocesses use them too).

``LAYERS`` and ``DTYPES`` are the layer-type and dtype tables of tests/test_matrix.py.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


# name: (constructor, input shape or ("ids", vocab, shape)); the adapted module is always `layer`
LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), (6, 12)),
    "linear_nobias": (lambda: nn.Linear(12, 10, bias=False), (2, 3, 12)),
    "conv1d_tf": (lambda: Conv1D(10, 12), (6, 12)),  # transformers Conv1D: weight (in, out)
    "embedding": (lambda: nn.Embedding(20, 8), ("ids", 20, (3, 5))),
    "embedding_padding_idx": (lambda: nn.Embedding(20, 8, padding_idx=0), ("ids", 20, (3, 5))),
    "embedding_sparse": (lambda: nn.Embedding(20, 8, sparse=True), ("ids", 20, (3, 5))),
    "embedding_scale_grad_by_freq": (lambda: nn.Embedding(20, 8, scale_grad_by_freq=True), ("ids", 20, (3, 5))),
    "embedding_embed_scale": (lambda: ScaledEmbedding(20, 8, scale=2.5), ("ids", 20, (3, 5))),
    "conv1d_k1": (lambda: nn.Conv1d(3, 5, 1), (2, 3, 7)),
    "conv1d_k3_stride2": (lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1), (2, 3, 9)),
    "conv2d_1x1": (lambda: nn.Conv2d(3, 5, 1), (2, 3, 4, 4)),
    "conv2d_1x3": (lambda: nn.Conv2d(3, 5, (1, 3), padding=(0, 1)), (2, 3, 4, 5)),
    "conv2d_3x3_dilation2": (lambda: nn.Conv2d(3, 5, 3, padding=2, dilation=2), (2, 3, 6, 6)),
    "conv3d_1x1x1": (lambda: nn.Conv3d(3, 5, 1), (2, 3, 3, 3, 3)),
    "conv3d_1x1x3": (lambda: nn.Conv3d(3, 5, (1, 1, 3)), (2, 3, 3, 3, 5)),
    "conv3d_3x1x1_nobias": (lambda: nn.Conv3d(3, 5, (3, 1, 1), padding=(1, 0, 0), bias=False), (2, 3, 3, 2, 2)),
    "conv3d_3x3x3": (lambda: nn.Conv3d(3, 5, 3, padding=1), (2, 3, 3, 3, 3)),
    "bnb_8bit": (lambda: _bnb_layer("8bit"), (6, 64)),
    "bnb_4bit": (lambda: _bnb_layer("4bit"), (6, 64)),
}

# name: (weight dtype, autocast_adapter_dtype (True: bf16/fp16 adapters are upcast to fp32), autocast dtype or None)
DTYPES = {
    "fp32": (torch.float32, True, None),
    "fp32_autocast_bf16": (torch.float32, True, torch.bfloat16),
    "fp32_autocast_fp16": (torch.float32, True, torch.float16),
    "bf16_adapters_fp32": (torch.bfloat16, True, None),
    "bf16_adapters_bf16": (torch.bfloat16, False, None),
    "bf16_adapters_fp32_autocast": (torch.bfloat16, True, torch.bfloat16),
    "fp16_adapters_fp32": (torch.float16, True, None),
    "fp16_adapters_fp16": (torch.float16, False, None),
    "fp16_adapters_fp32_autocast": (torch.float16, True, torch.float16),
    "fp64": (torch.float64, True, None),
}

# ================================================================================================ builders


class ScaledEmbedding(nn.Embedding):
    """Gemma-style embedding: the lookup times a scalar ``embed_scale``."""

    def __init__(self, num, dim, scale):
        super().__init__(num, dim)
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


def _bnb():
    import bitsandbytes

    return bitsandbytes


def _bnb_layer(kind):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    if kind == "8bit":
        q = _bnb().nn.Linear8bitLt(64, 32, has_fp16_weights=False)
        q.weight = _bnb().nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        q = _bnb().nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = _bnb().nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q


class Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def build(layer_name, dt_name, seed=0):
    torch.manual_seed(seed)
    wdt, _, _ = DTYPES[dt_name]
    net = Net(LAYERS[layer_name][0]())
    if layer_name.startswith("bnb"):
        net = net.to("cpu")  # bitsandbytes quantises on .to(device)
        if layer_name == "bnb_8bit":
            with torch.no_grad():
                net(torch.zeros(1, 64))  # 8-bit quantises on its first forward
        if wdt != torch.float32:  # a half-precision model: activations and bias in that dtype
            if layer_name == "bnb_4bit":
                net.layer.compute_dtype = wdt
            net.layer.bias.data = net.layer.bias.data.to(wdt)
    else:
        net = net.to(wdt)
    return net


def make_input(layer_name, dt_name, seed=1):
    spec = LAYERS[layer_name][1]
    g = torch.Generator().manual_seed(seed)
    if spec[0] == "ids":
        return torch.randint(0, spec[1], spec[2], generator=g)
    wdt, _, ac = DTYPES[dt_name]
    return torch.randn(*spec, generator=g).to(wdt)


def autocast(dt_name):
    ac = DTYPES[dt_name][2]
    return torch.autocast("cpu", dtype=ac) if ac is not None else torch.autocast("cpu", enabled=False)
