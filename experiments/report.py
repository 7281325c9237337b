"""Rebuild docs/results.md and its plots from the committed cell results (no training, no typed-in numbers).

    python experiments/report.py                          # every grid with results -> docs/results.md, docs/results/
    python experiments/report.py --check                  # exit 1 if docs/results.md is not what the results give
    python experiments/report.py experiments/smoke.yaml --results_dir /tmp/r --out /tmp/smoke.md

Per grid and scale: the settings every cell shared (checked across the raw results, not copied from the grid file),
the learning-rate sweep, per-task and average test accuracy and held-out (validation answer) loss as mean ± std over
seeds, trainable parameters, training time per step and peak memory, the untuned model and the majority-class
baseline on the same test items, a plain verdict per comparison (beyond seed noise or not), the paper's numbers
beside ours, and the rank analysis of the trained adapters. The first line of the file is the command that rebuilt
it; the output depends only on the result files, so rerunning it gives the same bytes.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
import statistics
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grid as G  # noqa: E402


ROOT = G.ROOT
DEFAULT_OUT = os.path.join(ROOT, "docs", "results.md")
DEFAULT_RESULTS = os.path.join(ROOT, "results")
NOISE_RULE = (
    "A difference between two methods counts as **beyond seed noise** only when it is larger than twice its standard "
    "error (SE = √(s₁²/n₁ + s₂²/n₂), s the standard deviation over seeds) *and* every seed of one method is on the "
    "same side of every seed of the other. For test accuracy it must also exceed twice the binomial standard error "
    "of the difference on the evaluated items (the items are a sample of the test sets). Anything else is reported "
    "as **within noise**: no difference is claimed. With 2 seeds this test is weak; it can miss real differences, "
    "and it cannot see a difference smaller than the spread between seeds."
)


# ----------------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------------


def mean_std(xs: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def compare(a: list[float], b: list[float], lower_is_better: bool, items: int | None = None) -> dict:
    """Verdict for a (one method's seeds) against b (the reference's seeds); ``items``: test items behind each
    accuracy (percent), for the binomial test-sample noise."""
    d = statistics.fmean(a) - statistics.fmean(b)
    out = {"delta": d, "n": (len(a), len(b))}
    if len(a) < 2 or len(b) < 2:
        out.update(verdict="one seed: noise unknown", separated=False)
        return out
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    apart = min(a) > max(b) or max(a) < min(b)
    out["se"] = se
    separated = apart and abs(d) > 2 * se
    if separated and items:
        pa, pb = statistics.fmean(a) / 100, statistics.fmean(b) / 100
        se_items = 100 * math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / items)
        out["se_items"] = se_items
        if abs(d) <= 2 * se_items:
            out.update(verdict="within test-sample noise", separated=False)
            return out
    better = (d < 0) == lower_is_better
    out.update(separated=separated, verdict=("better" if better else "worse") if separated else "within seed noise")
    return out


def fmt(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def fmt_ms(xs: list[float], digits: int) -> str:
    m, s = mean_std(xs)
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "") + ("" if len(xs) > 1 else " (1 seed)")


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


# ----------------------------------------------------------------------------------------------------------------------
# Reading results
# ----------------------------------------------------------------------------------------------------------------------


def task_scores(result: dict) -> dict[str, float]:
    m = result["eval"]["metrics"]
    if "per_task" in m:
        return {t: v["accuracy"] for t, v in m["per_task"].items()}
    return {"accuracy": m["accuracy"]}


def average_score(result: dict) -> float:
    m = result["eval"]["metrics"]
    return m["average"] if "average" in m else m["accuracy"]


def n_items(result: dict) -> int:
    m = result["eval"]["metrics"]
    return sum(v["n"] for v in m["per_task"].values()) if "per_task" in m else m["n"]


def majority_baseline(result: dict) -> dict[str, float] | None:
    counts = result["eval"].get("label_counts") or {}
    if not counts:
        return None
    return {t: 100.0 * max(c["gold"].values()) / sum(c["gold"].values()) for t, c in counts.items()}


def row_key(r: dict) -> tuple:
    return (r["method"], r["rank"], r["targets"])


class Section:
    """One grid at one scale."""

    def __init__(self, grid: G.Grid, scale: G.Scale, results: list[dict], results_root: str):
        self.grid, self.scale, self.results_root = grid, scale, results_root
        self.base = next((r for r in results if r["stage"] == "base"), None)
        self.sweep = [r for r in results if r["stage"] == "sweep"]
        self.final = [r for r in results if r["stage"] == "final"]
        self.rows: dict[tuple, list[dict]] = {}
        for r in self.final:
            self.rows.setdefault(row_key(r), []).append(r)
        order = {(m, rk, t): (i, j, k) for i, rk in enumerate(scale.ranks) for j, t in enumerate(scale.targets)
                 for k, m in enumerate(scale.methods)}
        self._order = order
        self.keys = sorted(self.rows, key=self.order)
        n_sweep = sum(len(scale.lr[m].get("candidates", [])) for m in scale.methods
                      if len(scale.lr[m].get("candidates", [])) > 1) * len(scale.ranks) * len(scale.targets)
        self.planned = (1 if grid.evaluator else 0) + n_sweep + \
            len(scale.methods) * len(scale.ranks) * len(scale.targets) * len(scale.seeds)
        self.finished = len(results)

    def order(self, key: tuple) -> tuple:
        return self._order.get(key, (99, 99, 99))

    def label(self, key: tuple) -> str:
        method, rank, targets = key
        bits = [self.grid.label(method)]
        if len(self.scale.ranks) > 1:
            bits.append(f"r={rank}")
        if len(self.scale.targets) > 1:
            bits.append(targets)
        return " ".join(bits)

    def reference_key(self, key: tuple) -> tuple | None:
        """The row a row is compared with: the reference method at the same rank and placement; the reference
        method's own rows are compared with its first rank and placement."""
        method, rank, targets = key
        ref = self.grid.reference
        cand = (ref, rank, targets) if method != ref else (ref, self.scale.ranks[0], next(iter(self.scale.targets)))
        return cand if cand != key and cand in self.rows else None

    @functools.cached_property
    def analyses(self) -> list[tuple[str, dict]]:
        """``(path, content)`` of every committed rank analysis of this grid and scale."""
        pattern = os.path.join(self.results_root, self.grid.name, f"{self.scale.name}-analysis-*", "analysis.json")
        out = []
        for path in sorted(glob.glob(pattern)):
            with open(path) as f:
                out.append((path, json.load(f)))
        return out

    def values(self, key: tuple, fn) -> list[float]:
        return [v for v in (fn(r) for r in self.rows[key]) if v is not None]

    @functools.cached_property
    def comparisons(self) -> list[tuple]:
        """``(row, reference row, held-out loss verdict, accuracy verdict)`` for every row with a reference."""
        items = n_items(self.rows[self.keys[0]][0])
        out = []
        for key in self.keys:
            ref = self.reference_key(key)
            if ref is None:
                continue
            loss = compare(self.values(key, held_out), self.values(ref, held_out), lower_is_better=True)
            acc = compare(self.values(key, average_score), self.values(ref, average_score), lower_is_better=False,
                          items=items)
            out.append((key, ref, loss, acc))
        return out

    @functools.cached_property
    def majority(self) -> tuple[float, float] | None:
        """Mean majority-class accuracy of the test items and its binomial standard error."""
        maj = majority_baseline(self.rows[self.keys[0]][0])
        if not maj:
            return None
        m = statistics.fmean(maj.values())
        return m, 100 * math.sqrt((m / 100) * (1 - m / 100) / n_items(self.rows[self.keys[0]][0]))


def held_out(r: dict) -> float | None:
    return r["held_out"]["final_eval_loss"]


# ----------------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def shared_settings(sec: Section) -> tuple[list[str], list[str]]:
    """Flags with one value in every final cell, and flags that differ between cells of a stage (final, sweep) where
    only the method's own flags, its learning rate, the seed, the rank and the placement may."""
    allowed = {"learning_rate", "seed", "hira_r", "hira_target_modules"}
    for m in sec.scale.methods:
        allowed |= set(sec.grid.method_specs[m]["train"])

    def scan(cells):
        values: dict[str, set] = {}
        for r in cells:
            for k, v in r["config"]["train_flags"].items():
                values.setdefault(k, set()).add(repr(v))
        same = [f"`{k}={next(iter(v))}`" for k, v in sorted(values.items()) if len(v) == 1 and k not in allowed]
        return same, [f"`{k}`: {sorted(v)}" for k, v in sorted(values.items()) if len(v) > 1 and k not in allowed]

    same, bad = scan(sec.final)
    sweep_same, sweep_bad = scan(sec.sweep)
    return same or sweep_same, bad + [f"(sweep cells) {b}" for b in sweep_bad]


def section_md(sec: Section, plots: dict[str, str], out_dir: str) -> list[str]:
    g, s = sec.grid, sec.scale
    title = g.title or g.name
    cmd = f"python experiments/run.py experiments/{g.name}.yaml" + ("" if s.name == "cpu" else f" --scale {s.name}")
    lines = [f"## {title} — `{s.name}` scale", ""]
    lines += [g.description, "", f"**Scale.** {s.about}", ""]
    status = "all cells finished" if sec.finished >= sec.planned else \
        f"**incomplete: {sec.finished} of {sec.planned} cells finished** (the grid is still running or was stopped)"
    lines += [f"Command: `{cmd}` — {status}. Raw results: `results/{g.name}/{s.name}-*.json`.", ""]

    same, bad = shared_settings(sec)
    lines += summary_md(sec)
    if sec.final or sec.sweep:
        lines += ["**Same for every method** (read from the raw results of the "
                  f"{len(sec.final) or len(sec.sweep)} {'final' if sec.final else 'sweep'} cells): "
                  + ", ".join(same) + "."]
    if bad:
        lines += ["", "**NOT IDENTICAL across cells (the comparison is not fair):** " + "; ".join(bad)]
    budgets = {}
    for r in sec.final + sec.sweep:
        b = r["budget"]
        budgets.setdefault(row_key(r), set()).add((b["trainable_params"], b["rule"], b["expected"]))
    broken = [k for k, v in budgets.items() if any(e is not None and t != e for t, _, e in v) or len(v) > 1]
    ev = sec.final or ([sec.base] if sec.base else [])
    if ev and ev[0]["config"]["eval_flags"]:
        flags = {k: v for k, v in ev[0]["config"]["eval_flags"].items() if k != "ckpt"}
        lines += ["", f"**Evaluation** (`eval/{g.evaluator}.py`, the same for every evaluated cell): " +
                  ", ".join(f"`{k}={v}`" for k, v in sorted(flags.items())) + "."]
    if budgets:
        lines += ["", "**Parameter budget** (rank r; checked on the meta device before training and in every run): " +
                  "; ".join(f"{sec.label(k)} {fmt_params(next(iter(v))[0])} ({next(iter(v))[1]})"
                            for k, v in sorted(budgets.items(), key=lambda kv: sec.order(kv[0])))
                  + (". Every run trained exactly its budget." if not broken else
                     f". **Budget mismatch in {sorted(broken)}.**"), ""]
    else:
        lines += [""]

    lines += sweep_md(sec)
    if sec.rows:
        lines += results_md(sec)
        lines += verdicts_md(sec)
        lines += paper_md(sec)
        for name, caption in (("val_loss", "held-out and training loss over steps (mean over seeds; band: min–max)"),
                              ("acc_params", "test accuracy and held-out loss against trainable parameters"),
                              ("cost", "accuracy beside training time per step and peak memory")):
            if name in plots:
                lines += [f"![{caption}]({os.path.relpath(plots[name], out_dir)})", ""]
    lines += analysis_md(sec, out_dir)
    return lines


def summary_md(sec: Section) -> list[str]:
    """"In short": what this section's results say, in sentences generated from them (nothing typed in)."""
    g = sec.grid
    out = []
    budgets = {}
    for r in sec.final + sec.sweep:
        budgets.setdefault(r["budget"]["trainable_params"], set()).add(g.label(r["method"]))
    if budgets and len(sec.scale.ranks) == 1 and len(sec.scale.targets) == 1:
        out.append("Trainable parameters: " + "; ".join(
            f"{', '.join(sorted(ms))}: {n:,}" for n, ms in sorted(budgets.items(), key=lambda kv: -len(kv[1]))) + ".")
    if not sec.rows:
        out.append(f"No final cell has finished yet ({len(sec.sweep)} sweep cells have); the comparisons appear when "
                   "they do.")
        return ["**In short** (generated from the results below):", ""] + [f"- {b}" for b in out] + [""]
    comps = sec.comparisons
    ref = g.label(g.reference)
    for what, idx, unit in (("held-out loss", 2, "lower"), ("test accuracy", 3, "higher")):
        better = [sec.label(c[0]) for c in comps if c[idx]["verdict"] == "better"]
        worse = [sec.label(c[0]) for c in comps if c[idx]["verdict"] == "worse"]
        rest = len(comps) - len(better) - len(worse)
        text = f"{what.capitalize()} against {ref}: "
        bits = []
        if better:
            bits.append(f"{'lower' if unit == 'lower' else 'higher'} (better) beyond noise for {', '.join(better)}")
        if worse:
            bits.append(f"{'higher' if unit == 'lower' else 'lower'} (worse) beyond noise for {', '.join(worse)}")
        bits.append(f"{rest} of {len(comps)} comparisons within noise" if rest else "none within noise")
        out.append(text + "; ".join(bits) + ".")
    if sec.majority:
        maj, se = sec.majority
        above = [sec.label(k) for k in sec.keys if statistics.fmean(sec.values(k, average_score)) > maj + 2 * se]
        out.append(f"Majority-class baseline {maj:.2f} %: " + (
            f"{len(above)} of {len(sec.keys)} rows above it by more than 2 SE ({', '.join(above)})." if above else
            "no row is above it by more than 2 SE, so test accuracy cannot rank the methods at this scale."))
    avg = g.paper.get("average") or {}
    for key, rk, loss, acc in comps:
        if key[0] in avg and rk[0] == g.reference and g.reference in avg and key[0] != g.reference:
            d = avg[key[0]] - avg[g.reference]
            says = "better" if d > 0 else "worse"
            here = [f"{name}: {c['verdict']}" + (" (same direction)" if c["verdict"] == says else
                                                  " (opposite direction)" if c.get("separated") else "")
                    for name, c in (("accuracy", acc), ("held-out loss", loss))]
            out.append(f"Paper: {sec.label(key)} {d:+.2f} points against {ref}; here {'; '.join(here)}.")
    claims = analysis_claims(sec)
    out += claims
    if sec.scale.name != "paper" and "paper" in g.scales:
        out.append("What this scale cannot settle: every comparison marked within noise (and any accuracy claim while "
                   "no method clears the majority baseline). The paper's setting: "
                   f"`python experiments/run.py experiments/{g.name}.yaml --scale paper`.")
    return ["**In short** (sentences generated from the results below):", ""] + [f"- {b}" for b in out] + [""]


def analysis_claims(sec: Section) -> list[str]:
    """The rank of ΔW per method from the committed rank analysis (the paper's Fig. 4 claim: HiRA's update has a
    high rank at LoRA's budget, LoRA's has rank r)."""
    out = []
    for _, data in sec.analyses:
        rows = [r for r in data["rows"] if r["kind"] == "delta"]
        by: dict = {}
        for r in rows:
            by.setdefault(r["ckpt"], []).append(r)
        parts = [f"{ck} {statistics.fmean(x['num_rank'] for x in rs):.0f} (r={rs[0]['r']}, "
                 f"min(d, n) {statistics.fmean(min(x['shape']) for x in rs):.0f})" for ck, rs in sorted(by.items())]
        out.append("Mean numerical rank of the trained ΔW (rank analysis): " + "; ".join(parts) + ".")
        mean_rank = {ck: statistics.fmean(x["num_rank"] for x in rs) for ck, rs in by.items()}
        r = {ck: rs[0]["r"] for ck, rs in by.items()}
        hira, lora = sec.grid.label(sec.grid.reference), sec.grid.label("lora")
        if hira in mean_rank and lora in mean_rank:
            holds = mean_rank[hira] > r[hira] and mean_rank[lora] <= r[lora]
            out.append("The paper's rank claim (HiRA's update has a rank above r at LoRA's parameter budget; "
                       f"LoRA's is at most r): {'reproduced' if holds else '**not reproduced**'} at this scale "
                       f"({hira} {mean_rank[hira]:.0f}, {lora} {mean_rank[lora]:.0f}, r={r[hira]}).")
    return out


def sweep_md(sec: Section) -> list[str]:
    g, s = sec.grid, sec.scale
    lines = []
    if sec.sweep:
        chosen, tab = G.select_lr(sec.sweep)
        for m in s.methods:  # every planned candidate gets a column, run or not yet
            if len(s.lr[m].get("candidates", [])) > 1:
                for rk in s.ranks:
                    for t in s.targets:
                        tab.setdefault((m, rk, t), [])
        lrs = sorted({lr for m in s.methods for lr in s.lr[m].get("candidates", [])
                      if len(s.lr[m].get("candidates", [])) > 1})
        sw = s.sweep.get("train") or {}
        lines += [f"**Learning-rate sweep** (validation loss at the end of training, seed {s.sweep.get('seed')}, "
                  + (f"sweep-only settings {', '.join(f'`{k}={v}`' for k, v in sw.items())}; " if sw else "")
                  + "no test set is used). Bold: chosen, used by the final cells.", ""]
        rows = []
        for key in sorted(tab, key=lambda k: (s.methods.index(k[0]), k[1], k[2])):
            got = dict(tab[key])
            cand = s.lr[key[0]].get("candidates", [])
            cells = []
            for lr in lrs:
                if lr not in got:
                    cells.append("not run yet" if lr in cand else "")
                    continue
                v = "diverged" if got[lr] is None or not math.isfinite(got[lr]) else f"{got[lr]:.4f}"
                cells.append(f"**{v}**" if chosen.get(key) == lr else v)
            note = ""
            if len(got) < len(cand):
                note = f"{len(got)} of {len(cand)} done"
            elif key in chosen and chosen[key] in (min(cand), max(cand)):
                note = "at the edge of the swept range"
            name = g.label(key[0]) + (f" r={key[1]}" if len(s.ranks) > 1 else "") + \
                (f" {key[2]}" if len(s.targets) > 1 else "")
            rows.append([name] + cells + [note])
        lines += table(["method"] + [f"lr {G.format_lr(lr)}" for lr in lrs] + ["note"], rows) + [""]
    borrowed = [m for m in s.methods if "from" in s.lr[m]]
    fixed = [m for m in s.methods if len(s.lr[m].get("candidates", [])) == 1]
    if borrowed:
        lines += ["Learning rates taken from another grid's sweep (tuned there, at its rank and placement): " +
                  ", ".join(f"{g.label(m)} from `{s.lr[m]['from']}` ({s.lr[m]['method']})" for m in borrowed) + ".",
                  ""]
    if fixed:
        lines += ["Learning rates fixed by the grid (no sweep): " +
                  ", ".join(f"{g.label(m)} {G.format_lr(s.lr[m]['candidates'][0])}" for m in fixed) + ".", ""]
    return lines


def results_md(sec: Section) -> list[str]:
    first = sec.rows[sec.keys[0]][0]
    tasks = list(task_scores(first))
    items = n_items(first)
    majority = majority_baseline(first)
    lines = [f"**Results** (final cells; mean ± std over seeds {', '.join(map(str, sec.scale.seeds))}; "
             f"{items} test items{' in ' + str(len(tasks)) + ' tasks' if len(tasks) > 1 else ''}). "
             "Held-out loss: response-only loss on the validation records (lower is better) of the model the run kept"
             + (" (the best checkpoint by this same validation loss, as the recipe keeps it: optimistic, equally for "
                "every method)" if any(r["held_out"].get("kept") == "best" for r in sec.final) else
                " (the last step)") + ".", ""]
    header = ["method", "lr", "trainable", "held-out loss", "test accuracy", "s/step", "peak memory"]
    rows = []
    for key in sec.keys:
        rs = sec.rows[key]
        acc = sec.values(key, average_score)
        speed = sec.values(key, lambda r: r["train"]["speed"]["s_per_step"])
        mem = sec.values(key, peak_memory_gb)
        lrs = sorted({r["learning_rate"] for r in rs})
        rows.append([sec.label(key), ", ".join(G.format_lr(x) for x in lrs),
                     fmt_params(rs[0]["budget"]["trainable_params"]), fmt_ms(sec.values(key, held_out), 4),
                     fmt_ms(acc, 2), fmt(statistics.fmean(speed), 2) if speed else "–",
                     f"{statistics.fmean(mem):.2f} GB" if mem else "–"])
    if sec.base is not None:
        rows.append(["untuned model", "", "0", "", f"{average_score(sec.base):.2f}", "", ""])
    if majority:
        rows.append(["majority class of the items", "", "", "", f"{statistics.fmean(majority.values()):.2f}", "", ""])
    lines += table(header, rows) + [""]
    mem_kind = "accelerator peak allocated" if "accelerator_peak_allocated" in \
        first["peak_memory_bytes"] else "peak resident memory of the training process"
    lines += [f"s/step: training time per optimizer step, validation excluded; peak memory: {mem_kind}. Times are "
              "wall-clock on the machine that ran the grid, which other work may have shared: a speed comparison "
              "is the job of `bench/` (docs/performance.md), not of this column.", ""]
    if len(tasks) > 1:
        header = ["method"] + tasks + ["average"]
        rows = []
        for key in sec.keys:
            per = {t: [task_scores(r)[t] for r in sec.rows[key]] for t in tasks}
            rows.append([sec.label(key)] + [fmt_ms(per[t], 1) for t in tasks] +
                        [fmt_ms(sec.values(key, average_score), 2)])
        if sec.base is not None:
            ts = task_scores(sec.base)
            rows.append(["untuned model"] + [f"{ts[t]:.1f}" for t in tasks] + [f"{average_score(sec.base):.2f}"])
        if majority:
            rows.append(["majority class"] + [f"{majority[t]:.1f}" for t in tasks] +
                        [f"{statistics.fmean(majority.values()):.2f}"])
        lines += ["Test accuracy per task (%):", ""] + table(header, rows) + [""]
    collapsed = []
    for key in sec.keys:
        for r in sec.rows[key]:
            for t, c in (r["eval"].get("label_counts") or {}).items():
                top, n = max(c["predicted"].items(), key=lambda kv: (kv[1], kv[0])), sum(c["predicted"].values())
                if top[1] == n:
                    collapsed.append((sec.label(key), r["seed"], t, top[0] or "no keyword"))
    if collapsed:
        by = {}
        for lab, seed, t, p in collapsed:
            by.setdefault((lab, seed), []).append(f"{t} ({p!r})")
        lines += ["Runs that gave the same answer to every item of a task (label prior, not the question): " +
                  "; ".join(f"{lab} seed {seed}: {', '.join(ts)}" for (lab, seed), ts in sorted(by.items())) + ".", ""]
    return lines


def peak_memory_gb(r: dict) -> float | None:
    p = r["peak_memory_bytes"]
    v = p.get("accelerator_peak_allocated", p.get("host_peak_rss", p.get("train_process_peak_rss")))
    return v / 2**30 if v else None


def verdicts_md(sec: Section) -> list[str]:
    lines = ["**Cell by cell**: each row against " + sec.grid.label(sec.grid.reference) +
             " (the noise rule is at the top of this file; a verdict in bold is a difference beyond noise).", ""]
    rows = [[f"{sec.label(key)} vs {sec.label(ref)}", f"{loss['delta']:+.4f}", _verdict(loss, 4),
             f"{acc['delta']:+.2f}", _verdict(acc, 2)] for key, ref, loss, acc in sec.comparisons]
    if rows:
        lines += table(["comparison", "Δ held-out loss", "verdict (loss)", "Δ accuracy", "verdict (accuracy)"], rows)
        lines += [""]
    if sec.majority:
        maj, se = sec.majority
        above = [sec.label(k) for k in sec.keys if statistics.fmean(sec.values(k, average_score)) > maj + 2 * se]
        lines += [f"Against the majority-class baseline ({maj:.2f} %, test-sample SE {se:.2f}): "
                  + (f"above it by more than 2 SE: {', '.join(above)}." if above else
                     "**no method is above it by more than 2 SE**: at this scale test accuracy does not separate the "
                     "methods, and the held-out loss is the figure to read."), ""]
    return lines


def _verdict(c: dict, digits: int) -> str:
    extra = f" (2·SE {2 * c['se']:.{digits}f})" if "se" in c else ""
    v = c["verdict"]
    return (f"**{v}**" if c.get("separated") else v) + extra


def paper_md(sec: Section) -> list[str]:
    paper = sec.grid.paper
    avg = paper.get("average") or {}
    ref = sec.grid.reference
    if not avg or ref not in avg:
        return []
    lines = [f"**Against the paper** ({paper.get('source', '')}; {paper.get('metric', 'average accuracy')}):", ""]
    rows = []
    for key, rk, loss, acc in sec.comparisons:  # every cell is evaluated on the same items (one fingerprint)
        method = key[0]
        if method not in avg or method == ref:
            continue
        paper_delta = avg[method] - avg[ref]
        paper_says = "worse" if paper_delta < 0 else "better"
        rows.append([f"{sec.label(key)} vs {sec.label(rk)}",
                     f"{avg[method]:.2f} vs {avg[ref]:.2f} ({paper_delta:+.2f})",
                     f"{acc['delta']:+.2f}: {_outcome(acc, paper_says)}",
                     f"{loss['delta']:+.4f}: {_outcome(loss, paper_says)}"])
    if rows:
        lines += table(["comparison", "paper (accuracy)", "here: accuracy", "here: held-out loss"], rows) + [""]
    return lines


def _outcome(c: dict, paper_says: str) -> str:
    if not c.get("separated"):
        return "not resolved here (within noise)"
    return "same direction as the paper" if c["verdict"] == paper_says else "**opposite to the paper**"


def analysis_md(sec: Section, out_dir: str) -> list[str]:
    lines = []
    for path, data in sec.analyses:
        groups: dict = {}
        for row in data["rows"]:
            groups.setdefault((row["ckpt"], row["kind"]), []).append(row)
        name = os.path.basename(os.path.dirname(path))
        lines += [f"**Rank analysis** (`python -m hira.analysis` on the first seed's trained cells, "
                  f"`results/{sec.grid.name}/{name}/`): singular values of ΔW per adapted layer.", ""]
        rows = []
        for (ckpt, kind), rs in sorted(groups.items(), key=lambda kv: (kv[0][1] != "delta", kv[0][0])):
            what = {"delta": ckpt, "full_ft_delta": "Full FT ΔW", "full_ft_delta_over_w0": "Full FT ΔW ⊘ W0"}[kind]
            shapes = [min(r["shape"]) for r in rs]
            rows.append([what, str(len(rs)), str(rs[0]["r"] if rs[0]["r"] is not None else "–"),
                         f"{statistics.fmean(r['num_rank'] for r in rs):.1f}",
                         f"{max(r['num_rank'] for r in rs)}", f"{statistics.fmean(shapes):.0f}",
                         f"{statistics.fmean(r['eff_rank'] for r in rs):.1f}"])
        lines += table(["ΔW of", "layers", "r", "mean numerical rank", "max numerical rank", "mean min(d, n)",
                        "mean effective rank"], rows) + [""]
        png = os.path.join(os.path.dirname(path), "num_rank.png")
        if os.path.isfile(png):
            lines += [f"![numerical rank of ΔW per layer]({os.path.relpath(png, out_dir)})", ""]
    return lines


# ----------------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------------


def make_plots(sec: Section, plot_dir: str, draw: bool = True) -> dict[str, str]:
    """The three plots of a section (``draw=False``: only their paths, for ``--check``)."""
    if not sec.rows:
        return {}
    stem = f"{sec.grid.name}-{sec.scale.name}"
    paths = {name: os.path.join(plot_dir, f"{stem}-{name}.png") for name in ("val_loss", "acc_params", "cost")}
    if not draw:
        return paths
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    os.makedirs(plot_dir, exist_ok=True)
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(sec.keys)}
    save = {"metadata": {"Software": None}, "dpi": 90}  # no version string: the same results give the same bytes

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, kind in ((axes[0], "eval_loss"), (axes[1], "loss")):
        for key in sec.keys:
            by_step: dict = {}
            for r in sec.rows[key]:
                for h in r["log_history"]:
                    if kind in h and "step" in h:
                        by_step.setdefault(h["step"], []).append(h[kind])
            steps = sorted(by_step)
            ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], marker="o", ms=3, label=sec.label(key),
                    color=colors[key])
            ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps], alpha=0.15,
                            color=colors[key])
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("held-out loss (validation answers)")
    axes[1].set_ylabel("training loss (logged)")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{sec.grid.name} ({sec.scale.name})", fontsize=9)
    fig.tight_layout()
    fig.savefig(paths["val_loss"], **save)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for key in sec.keys:
        n = sec.rows[key][0]["budget"]["trainable_params"]
        for ax, fn in ((axes[0], average_score), (axes[1], held_out)):
            vals = sec.values(key, fn)
            m, s = mean_std(vals)
            ax.errorbar([n], [m], yerr=[s or 0], fmt="o", color=colors[key], capsize=3, label=sec.label(key))
    first = sec.rows[sec.keys[0]][0]
    majority = majority_baseline(first)
    if majority:
        axes[0].axhline(statistics.fmean(majority.values()), ls="--", color="gray", lw=1, label="majority class")
    if sec.base is not None:
        axes[0].axhline(average_score(sec.base), ls=":", color="black", lw=1, label="untuned")
    for ax, yl in ((axes[0], "test accuracy (%)"), (axes[1], "held-out loss")):
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(yl)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(paths["acc_params"], **save)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    labels = [sec.label(k) for k in sec.keys]
    for ax, fn, yl in ((axes[0], average_score, "test accuracy (%)"),
                       (axes[1], lambda r: r["train"]["speed"]["s_per_step"], "training s / step"),
                       (axes[2], peak_memory_gb, "peak memory (GB)")):
        vals = [sec.values(k, fn) for k in sec.keys]
        ax.bar(range(len(labels)), [statistics.fmean(v) if v else 0 for v in vals],
               yerr=[(mean_std(v)[1] or 0) if v else 0 for v in vals], color=[colors[k] for k in sec.keys],
               capsize=2)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(yl)
    fig.tight_layout()
    fig.savefig(paths["cost"], **save)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# The document
# ----------------------------------------------------------------------------------------------------------------------


def default_grids() -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(G.EXPERIMENTS, "*.yaml"))
                  if os.path.basename(p) not in ("methods.yaml", "smoke.yaml"))


def regenerate_command(args, explicit_grids: bool) -> str:
    cmd = ["python experiments/report.py"]
    if explicit_grids:
        cmd += [os.path.relpath(os.path.abspath(p), ROOT) for p in args.grids]
    if os.path.abspath(args.results_dir) != DEFAULT_RESULTS:
        cmd += ["--results_dir", args.results_dir]
    if os.path.abspath(args.out) != DEFAULT_OUT:
        cmd += ["--out", args.out]
    return " ".join(cmd)


def build(args, explicit_grids: bool, plot_dir: str, draw: bool = True) -> str:
    out_dir = os.path.dirname(os.path.abspath(args.out))
    lines = [f"Regenerate: `{regenerate_command(args, explicit_grids)}`", "", "# Results of the experiment grids", ""]
    lines += [
        "Every number below is computed by `experiments/report.py` from the raw cell results in `results/` "
        "(one JSON per cell: configuration, metrics, log history with the validation loss over steps, trainable "
        "parameters, wall time, peak memory, package versions, git revision), which `experiments/run.py` wrote "
        "while running the recipes and evaluators through their command lines. Nothing is typed in; the paper's "
        "numbers come from the grid files. Each section states the scale its numbers come from: the `cpu` scale "
        "is a small model trained for minutes on a CPU, **not** the paper's setting, and cannot confirm or refute "
        "the paper's accuracy claims; the `paper` scale is the paper's setting for GPU users.",
        "",
        "Why the grids are built this way: two public findings say the paper's ranking depends on the protocol. "
        "On the HiRA authors' tracker (hqsiswiliam/hira#7) the commonsense gain over LoRA shrinks once LoRA gets "
        "the same response-only loss masking as HiRA; \"Learning Rate Matters\" (arXiv 2602.04998) finds LoRA "
        "variants within 1-2 points of each other once each has its own tuned learning rate. So every method here "
        "trains through the same recipe with the same data, prompts, response-only masking, steps and seeds, at a "
        "printed parameter budget, each at the learning rate its own sweep picked on a validation split (never a "
        "test set).",
        "",
        "How to read the comparisons: " + NOISE_RULE,
        "",
    ]
    sections = []
    for path in args.grids:
        grid = G.load_grid(path)
        for scale_name, scale in grid.scales.items():
            results = G.read_results(args.results_dir, grid.name, scale_name)
            if results:
                sections.append(Section(grid, scale, results, args.results_dir))
    if not sections:
        lines += ["No results yet: run a grid with `python experiments/run.py experiments/<name>.yaml`.", ""]
    for sec in sections:
        plots = make_plots(sec, plot_dir, draw)
        lines += section_md(sec, plots, out_dir)
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grids", nargs="*", help="grid files (default: every experiments/*.yaml but smoke)")
    parser.add_argument("--results_dir", default=DEFAULT_RESULTS)
    parser.add_argument("--out", default=DEFAULT_OUT, help="the markdown file; plots go to <out without .md>/")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if --out differs from the rebuild")
    args = parser.parse_args(argv)
    explicit = bool(args.grids)
    args.grids = args.grids or default_grids()
    plot_dir = os.path.splitext(os.path.abspath(args.out))[0]
    try:
        if args.check:
            text = build(args, explicit, plot_dir, draw=False)
            current = None
            if os.path.isfile(args.out):
                with open(args.out) as f:
                    current = f.read()
            if current != text:
                print(f"{args.out} is not what the results give; run: {regenerate_command(args, explicit)}",
                      file=sys.stderr)
                return 1
            print(f"{args.out} is up to date")
            return 0
        text = build(args, explicit, plot_dir)
    except G.GridError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}" + (f" and plots in {plot_dir}" if os.path.isdir(plot_dir) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
