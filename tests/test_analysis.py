"""Rank analysis (hira.analysis) and the paper's Theorem 1 / expressiveness claims, on small problems."""

from __future__ import annotations

import json

import pytest
import torch

from hira.analysis import main, make_demo_checkpoints, spectrum_metrics


def test_spectrum_metrics_on_known_matrices():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(30, 30))
    V, _ = torch.linalg.qr(torch.randn(20, 20))
    s = torch.tensor([3.0, 2.0, 1.0, 0.004])
    M = U[:, :4] @ torch.diag(s) @ V[:, :4].t()
    m = spectrum_metrics(M)
    assert m["num_rank"] == 4 and m["n_above"] == 3  # 0.004 < 0.005
    assert m["fro2"] == pytest.approx((s**2).sum().item(), rel=1e-5)
    p = s / s.sum()
    assert m["eff_rank"] == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-4)
    assert spectrum_metrics(torch.eye(12))["eff_rank"] == pytest.approx(12, rel=1e-5)
    assert spectrum_metrics(torch.zeros(5, 7)) == {"num_rank": 0, "n_above": 0, "fro2": 0.0, "eff_rank": 0.0, "sv_max": 0.0}


# ------------------------------------------------------------------------------------------- Theorem 1 and expressiveness


def _fit(E, W0, r, hadamard, steps=1500, lr=3e-2, seed=0):
    """Gradient-descent fit of E by W0 ⊙ (B·A) (HiRA) or B·A (LoRA); returns the spectral-norm error."""
    g = torch.Generator().manual_seed(seed)
    d, n = E.shape
    B = (torch.randn(d, r, generator=g) * 0.1).requires_grad_(True)
    A = (torch.randn(r, n, generator=g) * 0.1).requires_grad_(True)
    opt = torch.optim.Adam([A, B], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        P = B @ A
        loss = ((W0 * P if hadamard else P) - E).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        P = B @ A
        return torch.linalg.matrix_norm((W0 * P if hadamard else P) - E, ord=2).item()


def test_theorem1_toy_example():
    """W0 ⊙ (u vᵀ) is full rank but rank 1 in HiRA's space: HiRA r=1 fits it exactly, LoRA r=1 cannot."""
    torch.manual_seed(0)
    d = 16
    W0 = torch.randn(d, d)
    u, v = torch.randn(d, 1), torch.randn(1, d)
    E = W0 * (u @ v)
    assert torch.linalg.matrix_rank(E).item() == d
    # the theorem's bound: min_{rank M ≤ r} ‖E − W0⊙M‖₂ ≤ σ_{r+1}(E ⊘ W0)·‖W0‖₂ = 0 here
    M1 = u @ v
    assert torch.linalg.matrix_norm(E - W0 * M1, ord=2) < 1e-4
    lora_best = torch.linalg.svdvals(E)[1].item()  # Eckart–Young: best rank-1 error
    assert lora_best > 1.0
    assert _fit(E, W0, 1, hadamard=True) < 1e-2 * lora_best
    assert _fit(E, W0, 1, hadamard=False) == pytest.approx(lora_best, rel=2e-2)


def test_expressiveness_hira_reaches_bound_lora_cannot():
    """E = W0 ⊙ (low-rank K + small noise): the trained HiRA fit meets σ_{r+1}(E⊘W0)·‖W0‖₂; LoRA's optimum is far
    above it (its best error σ_{r+1}(E) is a hard floor)."""
    torch.manual_seed(1)
    d, n, r = 24, 20, 3
    W0 = torch.randn(d, n).sign() * (0.5 + torch.rand(d, n))  # |W0| ≥ 0.5: E ⊘ W0 well defined
    K = torch.randn(d, r) @ torch.randn(r, n) + 0.05 * torch.randn(d, n)
    E = W0 * K
    bound = torch.linalg.svdvals(E / W0)[r].item() * torch.linalg.matrix_norm(W0, ord=2).item()
    # the constructive proof: M = (E⊘W0)_r meets the bound
    U, S, Vh = torch.linalg.svd(E / W0, full_matrices=False)
    Mr = U[:, :r] * S[:r] @ Vh[:r]
    assert torch.linalg.matrix_norm(E - W0 * Mr, ord=2).item() <= bound * (1 + 1e-5)
    hira_err = _fit(E, W0, r, hadamard=True, steps=2500)
    lora_floor = torch.linalg.svdvals(E)[r].item()
    lora_err = _fit(E, W0, r, hadamard=False)
    print(f"bound {bound:.3f}  HiRA {hira_err:.3f}  LoRA {lora_err:.3f} (floor {lora_floor:.3f})")
    assert hira_err <= bound * 1.05
    assert lora_err >= lora_floor * (1 - 1e-3)
    assert lora_floor > 3 * bound and lora_err > 10 * hira_err  # LoRA cannot even reach the bound


# ------------------------------------------------------------------------------------------- the analysis command


def test_analysis_command_on_trained_lora_and_hira(tmp_path):
    r = 2
    runs = make_demo_checkpoints(str(tmp_path / "runs"), steps=15, r=r)
    out = tmp_path / "analysis"
    rows = main(["--ckpt", runs["lora"], "--ckpt", runs["hira"], "--full_ft", runs["full_ft"], "--out", str(out),
                 "--device", "cpu", "--no_progress"])
    for f in ("analysis.json", "analysis.csv", "num_rank.png", "n_above.png", "fro2.png", "eff_rank.png"):
        assert (out / f).stat().st_size > 0
    data = json.loads((out / "analysis.json").read_text())
    assert data["settings"]["sv_threshold"] == 0.005 and len(data["rows"]) == len(rows)
    by = {}
    for row in rows:
        by.setdefault((row.ckpt, row.kind), []).append(row)
    lora, hira_rows = by[("lora", "delta")], by[("hira", "delta")]
    assert len(lora) == len(hira_rows) == 16  # 4 layers × q, v, up, down
    assert all(x.num_rank == r and x.r == r for x in lora)
    assert all(x.num_rank >= 10 * r for x in hira_rows)  # the paper's high-rank claim, at the same parameter count
    assert min(x.num_rank for x in hira_rows) >= 0.9 * min(min(x.shape) for x in hira_rows)
    assert len(by[("full_ft", "full_ft_delta")]) == len(by[("full_ft", "full_ft_delta_over_w0")]) == 16
    assert all(x.layer in range(4) for x in rows)
    assert {x.module_type for x in rows} == {"q_proj", "v_proj", "up_proj", "down_proj"}
    lines = (out / "analysis.csv").read_text().splitlines()
    assert len(lines) == len(rows) + 1 and lines[0].startswith("ckpt,kind,module")


def test_analysis_command_errors(tmp_path):
    with pytest.raises(SystemExit):
        main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "o")])
