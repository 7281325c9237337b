"""Mutation check: deliberate bugs, one at a time, in a copy of the repository; the test suite must fail for each.

    python tests/mutation_check.py                  # every mutant; writes docs/mutations.md and its raw JSON
    python tests/mutation_check.py --only bhra_dense_block_order --keep   # one mutant, keep its log

Each mutant is an exact snippet of the package replaced by a wrong one (a stale snippet that no longer occurs is an
error, so the list cannot silently rot). The tests a mutant runs are the ones that guard its area; a mutant that
survives them is a hole in the suite. Results: ``docs/mutations/results.json`` (raw) and ``docs/mutations.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_JSON = os.path.join(ROOT, "docs", "mutations", "results.json")
OUT_MD = os.path.join(ROOT, "docs", "mutations.md")

CORE = ["tests/test_matrix.py", "tests/test_regressions.py", "tests/test_tuner.py", "tests/test_variants.py",
        "tests/test_bnb.py", "tests/test_precision.py", "tests/test_interop.py"]
SUITES = {
    "core": CORE,
    "zero3": ["tests/test_zero3.py"] + CORE,
    "eval": ["tests/test_merge_eval.py"] + CORE,
    "sb_recipe": ["tests/test_sb_recipe.py"],
}

# (name, area, file, snippet, replacement, occurrence (None: must be unique), suite)
MUTANTS = [
    # ---- the fused Function (hira/functional.py)
    ("weff_drops_modulation", "fused Function", "hira/functional.py",
     "return torch.addcmul(Wm, Wm, M, out=M).to(spec.gemm_dtype)", "return Wm.add(M).to(spec.gemm_dtype)", None, "core"),
    ("grad_M_without_W0", "fused Function", "hira/functional.py",
     "gM = G.mul_(W.to(wdt))", "gM = G", None, "core"),
    ("grad_A_half", "fused Function", "hira/functional.py",
     "gA = B.t() @ grad_M if A.requires_grad else None", "gA = 0.5 * (B.t() @ grad_M) if A.requires_grad else None",
     None, "core"),
    ("grad_x_on_W0_not_Weff", "fused Function", "hira/functional.py",
     "                    W_eff = _w_eff(spec, W, ctx.fold, terms_p)\n",
     "                    W_eff = W.to(spec.gemm_dtype)\n", None, "core"),
    ("split_term_without_W0", "fused Function", "hira/functional.py",
     "M.mul_(_like_weight(W.to(wdt), spec)).to(gdt)", "M.to(gdt)", None, "core"),
    ("separate_term_grad_without_R", "fused Function", "hira/functional.py",
     "gM = G.mul_(R.to(wdt))", "gM = G", None, "core"),
    ("dropout_input_grad_dropped", "fused Function", "hira/functional.py",
     "grads_flat[base] = gx_t.to(xin.dtype)", "grads_flat[base] = None", None, "core"),
    ("work_dtype_is_input_dtype", "fused Function", "hira/functional.py",
     "            work = torch.promote_types(work, p.dtype)", "            work = work", None, "core"),
    ("conv_factor_reshape_transposed", "fused Function", "hira/functional.py",
     "return (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)).reshape(B.shape[0], *A.shape[1:])",
     "return (B.reshape(B.shape[0], -1) @ A.transpose(1, -1).reshape(A.shape[0], -1)).reshape(B.shape[0], "
     "*A.shape[1:])", None, "core"),
    ("embedding_grad_B_half", "fused Function", "hira/functional.py",
     "gB = (gr2.t() @ a_rows).to(B.dtype)", "gB = (0.5 * gr2.t() @ a_rows).to(B.dtype)", None, "core"),
    # ---- merge paths (hira/layer.py, hira/bnb.py)
    ("merge_forgets_merged_adapters", "merge", "hira/layer.py",
     "every = list(self.merged_adapters) + adapter_names", "every = adapter_names", None, "core"),
    ("merge_half_delta", "merge", "hira/layer.py",
     "merged = (W0_oi.to(total.dtype) + total).to(weight.dtype)",
     "merged = (W0_oi.to(total.dtype) + 0.5 * total).to(weight.dtype)", None, "eval"),
    ("safe_merge_checks_before_cast", "merge", "hira/layer.py",
     "            if safe_merge and not torch.isfinite(merged).all():",
     "            if safe_merge and not torch.isfinite(W0_oi.to(total.dtype) + total).all():", None, "core"),
    ("unmerge_keeps_merged_weight", "merge", "hira/layer.py",
     "            weight.data.copy_(self._hira_w0.to(device=weight.device, dtype=weight.dtype))",
     "            pass", None, "core"),
    ("bnb_second_merge_from_merged_weight", "merge", "hira/bnb.py",
     "        W0 = self._original_weight_oi()\n        merged = W0.clone()\n        for a in list(self.merged_adapters) + adapter_names:",
     "        W0 = self._dequant_oi()\n        merged = W0.clone()\n        for a in adapter_names:", None, "core"),
    ("bnb_merge_drops_delta", "merge", "hira/bnb.py",
     "merged += self._additive_delta(a, W0).to(merged.dtype)", "merged += 0 * self._additive_delta(a, W0).to(merged.dtype)",
     None, "core"),
    ("embedding_embed_scale_ignored", "merge", "hira/layer.py",
     "            delta = delta * scale.to(delta.dtype)", "            delta = delta", None, "core"),
    # ---- ZeRO-3 gathers (hira/layer.py, hira/_zero3.py)
    ("zero3_merge_without_factors", "ZeRO-3", "hira/layer.py",
     '_zero3.gather(factors, site="merge"):', 'contextlib.nullcontext():', None, "zero3"),
    ("zero3_linear_forward_gather_removed", "ZeRO-3", "hira/layer.py",
     '            with _zero3.gather(params, site="forward"):\n                terms = [self._adapter_term(a, x_ins[a]) for a in fused]\n                y = hira_linear(x, base.weight, base.bias, terms, fan_in_fan_out',
     '            with contextlib.nullcontext():\n                terms = [self._adapter_term(a, x_ins[a]) for a in fused]\n                y = hira_linear(x, base.weight, base.bias, terms, fan_in_fan_out',
     None, "zero3"),
    ("zero3_backward_gather_removed", "ZeRO-3", "hira/layer.py",
     'gather = (lambda: _zero3.gather(params, site="backward")) if zero3 else None', "gather = None", 1, "zero3"),
    ("zero3_embedding_forward_gather_removed", "ZeRO-3", "hira/layer.py",
     '        with _zero3.gather(params, site="forward"):\n            delta = hira_embedding_delta',
     '        with contextlib.nullcontext():\n            delta = hira_embedding_delta', None, "zero3"),
    ("zero3_gather_never_gathers", "ZeRO-3", "hira/_zero3.py",
     "    if not missing:\n        return contextlib.nullcontext()",
     "    if True:\n        return contextlib.nullcontext()", None, "zero3"),
    # ---- the variants' factorizations and modulators (hira/variants.py, hira/model.py, hira/_peft_compat.py)
    ("bhra_dense_block_order", "variants", "hira/variants.py",
     'torch.einsum("ijdr,ijrn->idjn", B, A).reshape(k * db, k * nb)',
     'torch.einsum("ijdr,jirn->idjn", B, A).reshape(k * db, k * nb)', None, "core"),
    ("bhra_grad_A_half", "variants", "hira/variants.py",
     'gA = torch.einsum("ijdr,idjn->ijrn", B, g4) if A.requires_grad else None',
     'gA = 0.5 * torch.einsum("ijdr,idjn->ijrn", B, g4) if A.requires_grad else None', None, "core"),
    ("sb_grad_S_half", "variants", "hira/variants.py",
     "gS = (B.t() @ grad_M) @ A.t() if S.requires_grad else None",
     "gS = 0.5 * (B.t() @ grad_M) @ A.t() if S.requires_grad else None", None, "core"),
    ("hilora_scale_over_r", "variants", "hira/variants.py",
     "spec.scaling = (config.hilora_alpha / r2) if", "spec.scaling = (config.hilora_alpha / r) if", None, "core"),
    ("hilora_grad_without_scale", "variants", "hira/variants.py",
     "gh = (g2 @ B.to(cdt)) * s  # (N, r2)", "gh = g2 @ B.to(cdt)  # (N, r2)", None, "core"),
    ("random_modulator_hash_constant", "variants", "hira/variants.py",
     "for mult in (0x7FEB352D, 0x846CA68B):", "for mult in (0x7FEB352C, 0x846CA68B):", None, "core"),
    ("randomized_svd_no_power_iterations", "variants", "hira/variants.py",
     "    for _ in range(n_iter):", "    for _ in range(0):", None, "core"),
    ("smooth_uses_expert_index", "variants", "hira/_names.py",
     "pos = next((i for i in range(1, len(parts)) if parts[i].isdigit() and parts[i - 1] in patterns), None)",
     "pos = next((i for i in reversed(range(1, len(parts))) if parts[i].isdigit()), None)", None, "core"),
    ("lowrank_modulator_rounded_to_weight_dtype", "variants", "hira/variants.py",
     "layer.hira_mod_U[adapter], layer.hira_mod_V[adapter] = (t.to(dev) for t in modulator_factors)",
     "layer.hira_mod_U[adapter], layer.hira_mod_V[adapter] = (t.to(dev, base.weight.dtype) for t in modulator_factors)",
     None, "core"),
    ("sb_factors_unfrozen_by_cast", "variants", "hira/_peft_compat.py",
     "                    getattr(layer, name)[adapter_name].requires_grad_(flags[key])", "                    pass",
     None, "core"),
    ("config_type_fixed_at_construction", "variants", "hira/config.py",
     "    def to_dict(self):\n        self.refresh()", "    def to_dict(self):\n        pass", None, "core"),
    # ---- the recipe's HiRA-SB initialisation
    ("recipe_skips_sb_init", "recipes", "hira/recipe.py",
     "stats = hira.sb_init(", "stats = (lambda *args, **kwargs: {})(", None, "sb_recipe"),
]


def copy_repo(dst: str) -> None:
    files = subprocess.run(["git", "-C", ROOT, "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))


def apply(work: str, file: str, find: str, repl: str, occurrence) -> str:
    path = os.path.join(work, file)
    with open(path) as f:
        text = f.read()
    n = text.count(find)
    if occurrence is None and n != 1:
        raise SystemExit(f"stale mutant: {find!r} occurs {n} times in {file} (expected once)")
    if occurrence is not None and n < occurrence:
        raise SystemExit(f"stale mutant: {find!r} occurs {n} times in {file} (need occurrence {occurrence})")
    pos = -1
    for _ in range(occurrence or 1):
        pos = text.index(find, pos + 1)
    mutated = text[:pos] + repl + text[pos + len(find):]
    if "contextlib.nullcontext()" in repl and "import contextlib" not in mutated:
        mutated = "import contextlib\n" + mutated if not mutated.startswith("\"\"\"") else mutated.replace(
            "\nfrom __future__ import annotations\n", "\nfrom __future__ import annotations\n\nimport contextlib\n", 1)
    with open(path, "w") as f:
        f.write(mutated)
    return text


def run_mutant(work: str, mutant, keep: bool) -> dict:
    name, area, file, find, repl, occurrence, suite = mutant
    original = apply(work, file, find, repl, occurrence)
    env = dict(os.environ, PYTHONPATH=work, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *SUITES[suite]],
                          cwd=work, env=env, capture_output=True, text=True, timeout=3600)
    with open(os.path.join(work, file), "w") as f:
        f.write(original)
    tail = proc.stdout.strip().splitlines()
    failed = [line.split(" - ")[0].replace("FAILED ", "") for line in tail if line.startswith(("FAILED", "ERROR"))]
    result = {"name": name, "area": area, "file": file, "suite": suite, "killed": proc.returncode != 0,
              "first_failure": failed[0] if failed else (tail[-1] if tail else ""), "seconds": round(time.time() - t0)}
    if keep:
        result["log"] = proc.stdout[-8000:] + proc.stderr[-4000:]
    return result


def write_report(results: list[dict]) -> None:
    os.makedirs(os.path.dirname(OUT_JSON), exist_ok=True)
    with open(OUT_JSON, "w") as f:
        json.dump(results, f, indent=1)
    killed = sum(r["killed"] for r in results)
    lines = [
        "# Mutation check",
        "",
        "Regenerate: `python tests/mutation_check.py` (about 30 minutes on 2 CPU cores; raw results in "
        "[mutations/results.json](mutations/results.json)).",
        "",
        "Each mutant is one deliberate bug in the package (the exact snippets are in `tests/mutation_check.py`); the "
        "tests guarding its area run with `-x` and must fail.",
        "",
        f"**{killed} of {len(results)} mutants killed**"
        + ("." if killed == len(results) else f"; surviving: {', '.join(r['name'] for r in results if not r['killed'])}."),
        "",
        "| mutant | area | file | killed by (first failing test) |",
        "|---|---|---|---|",
    ]
    for r in results:
        verdict = f"`{r['first_failure']}`" if r["killed"] else "**survived**"
        lines.append(f"| `{r['name']}` | {r['area']} | `{r['file']}` | {verdict} |")
    with open(OUT_MD, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="run only these mutants (no report written)")
    ap.add_argument("--keep", action="store_true", help="keep the pytest log of each mutant in the output")
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m[0] in args.only]
    unknown = set(args.only or ()) - {m[0] for m in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutant(s) {sorted(unknown)}; known: {[m[0] for m in MUTANTS]}")
    results = []
    with tempfile.TemporaryDirectory(prefix="hira-mutants-") as work:
        copy_repo(work)
        for i, m in enumerate(mutants, 1):
            r = run_mutant(work, m, args.keep)
            results.append(r)
            print(f"[{i}/{len(mutants)}] {r['name']}: {'killed' if r['killed'] else 'SURVIVED'} ({r['seconds']} s)"
                  f" {r['first_failure']}", flush=True)
            if args.keep and not r["killed"]:
                print(r["log"])
    if not args.only:
        write_report(results)
    return 0 if all(r["killed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
