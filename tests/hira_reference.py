"""Reference implementations for the tests, written from the documented math (no tuner code is called)."""

from __future__ import annotations

import math

import torch


_M32 = 0xFFFFFFFF


def ref_hash_uniform(shape, seed):
    """The random modulator's spec (hira/variants.py docstring: a counter-based ``lowbias32`` hash of (seed, index),
    24 bits per value), element by element in Python integers."""
    s = ((seed * 0x9E3779B1) ^ 0x85EBCA6B) & _M32
    out = []
    for i in range(math.prod(shape)):
        x = (i * 0x9E3779B1 + s) & _M32
        for mult in (0x7FEB352D, 0x846CA68B):
            x ^= x >> 16
            x = (x * mult) & _M32
        x ^= x >> 16
        out.append((x >> 8) / (1 << 24))
    return torch.tensor(out, dtype=torch.float64).reshape(shape)


def truncated_svd(W, v):
    """The best rank-v approximation of W (fp64)."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return (U[:, :v] * S[:v]) @ Vh[:v]


def rel(a, b):
    """Relative L2 error of a against b, in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ------------------------------------------------------------------------------------------------ bitsandbytes


def bnb_dequantized(layer):
    """W0 of a bitsandbytes layer (fp64), dequantised with bitsandbytes' public functions (not the tuner's)."""
    import bitsandbytes as bnb

    w = layer.weight
    if isinstance(w, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).double()
    scb = layer.state.SCB if layer.state.SCB is not None else w.SCB
    return w.data.double() * scb.double().view(-1, 1) / 127.0


def bnb_quantised_like(layer, W):
    """W (out, in) quantised by a fresh bitsandbytes layer of ``layer``'s kind, dequantised again (fp64)."""
    import bitsandbytes as bnb

    out_f, in_f = W.shape
    if isinstance(layer, bnb.nn.Linear8bitLt):
        fresh = bnb.nn.Linear8bitLt(in_f, out_f, has_fp16_weights=False)
        fresh.weight = bnb.nn.Int8Params(W.float().clone(), requires_grad=False, has_fp16_weights=False)
        fresh = fresh.to("cpu")
        with torch.no_grad():
            fresh(torch.zeros(1, in_f))  # 8-bit quantises on its first forward
    else:
        qt = layer.weight.quant_type
        fresh = bnb.nn.Linear4bit(in_f, out_f, quant_type=qt)
        fresh.weight = bnb.nn.Params4bit(W.float().clone(), requires_grad=False, quant_type=qt)
        fresh = fresh.to("cpu")
    return bnb_dequantized(fresh)
