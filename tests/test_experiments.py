"""The experiment harness (experiments/): grid checks, budgets, learning-rate selection, noise verdicts, and the smoke
grid end to end through the real command lines — run, killed twice (really: SIGKILL of the runner, whose training or
evaluation child must die with it), resumed without re-running finished work, reported, and reused by a copy of
the grid."""

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from repo_scripts import ROOT, load_script


run = load_script("experiments", "run")
report = load_script("experiments", "report")
G = run.G
SMOKE = os.path.join(ROOT, "experiments", "smoke.yaml")
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def runner(*args, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600, **kw)


def write_grid(tmp_path, mutate, name="g"):
    with open(SMOKE) as f:
        data = yaml.safe_load(f)
    mutate(data)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _set(path, value):
    def f(d):
        *head, last = path
        for k in head:
            d = d[k]
        d[last] = value
    return f


# ----------------------------------------------------------------------------------------------------------------------
# Grid checks: one-line errors, before any training
# ----------------------------------------------------------------------------------------------------------------------

def _add_method(name, spec):
    def f(d):
        d["method_definitions"] = {name: spec}
        d["methods"] = d["methods"] + [name]
        d["scales"]["cpu"]["lr"][name] = 1e-2
    return f


# case -> (change to the smoke grid, the error it must give; found when the file is loaded)
BAD_GRIDS = {
    "unknown-top-key": (_set(["methodz"], ["hira"]), r"unknown key\(s\) \['methodz'\]"),
    "unknown-method": (_set(["methods"], ["hira", "qlora"]), r"unknown method\(s\) \['qlora'\]"),
    "method-sets-shared-key": (_add_method("hira_long", {"train": {"method": "hira", "max_steps": 5}}),
                               r"fixes \['max_steps'\] for all methods, but method 'hira_long' sets them too"),
    "method-sets-lr": (_add_method("x", {"train": {"method": "hira", "learning_rate": 1e-3}}),
                       "which the harness sets per cell"),
    "missing-lr": (lambda d: d["scales"]["cpu"]["lr"].pop("lora"), r"no learning rate for method\(s\) \['lora'\]"),
    "sweep-seed-is-final-seed": (lambda d: d["scales"]["cpu"].update(lr={"hira": [1e-2, 3e-2], "lora": 1e-2},
                                                                    sweep={"seed": 1}), "is also a final seed"),
    "sweep-without-seed": (_set(["scales", "cpu", "lr", "hira"], [1e-2, 3e-2]), "sweep.seed is not set"),
    "bad-lr": (_set(["scales", "cpu", "lr", "hira"], "fast"), "'fast' is not a number"),
    "unknown-scale-key": (_set(["scales", "cpu", "stepz"], 3), r"unknown key\(s\) \['stepz'\]"),
    "harness-key-in-train": (_set(["scales", "cpu", "train", "seed"], 3), "which the harness sets per cell"),
    "bad-budget-rule": (_add_method("x", {"budget": "about", "train": {"method": "lora"}}), "budget must be one of"),
    "scale-method-not-in-grid": (_set(["scales", "cpu", "methods"], ["hira", "dora"]),
                                 r"scales.cpu.methods must be distinct methods of the grid \['hira', 'lora'\]"),
    "scale-without-reference": (lambda d: d["scales"]["cpu"].update(methods=["lora"], lr={"lora": 1e-2}),
                                "scales.cpu.methods leaves out the reference method 'hira'"),
}
# found by the runner's checks (cell expansion, data preparation), still before any training
BAD_RUNS = {
    "bad-rank-expression": (_add_method("x", {"train": {"method": "lora", "lora_alpha": "{r**2}"}}),
                            r"\{r\*\*2\} is not an integer expression in r"),
    "missing-data": (_set(["scales", "cpu", "data", "train_files"], ["experiments/smoke_data/nope.json"]),
                     "training file experiments/smoke_data/nope.json does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_GRIDS))
def test_bad_grid_is_a_clear_error(case, tmp_path):
    mutate, match = BAD_GRIDS[case]
    with pytest.raises(G.GridError, match=match) as err:
        G.load_grid(write_grid(tmp_path, mutate))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_bad_grid_stops_the_runner_with_one_line(case, tmp_path):
    mutate, match = BAD_RUNS[case]
    proc = runner(write_grid(tmp_path, mutate), "--dry_run", "--results_dir", str(tmp_path / "res"),
                  "--runs_dir", str(tmp_path / "runs"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and re.search(match, errors[0]), proc.stderr


def test_unknown_recipe_flag_fails_before_any_training(tmp_path):
    """A typo in the shared recipe flags is caught by the recipe's own parser in the pre-flight: exit 2, one line,
    nothing trained or evaluated."""
    path = write_grid(tmp_path, _set(["scales", "cpu", "train", "max_stepz"], 2))
    proc = runner(path, "--results_dir", str(tmp_path / "res"), "--runs_dir", str(tmp_path / "runs"))
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "max_stepz" in errors[0] and "the recipe rejects its flags" in errors[0], proc.stderr
    assert not os.path.exists(tmp_path / "res")  # no cell ran, not even the untuned evaluation
    assert "[1/" not in proc.stdout


def test_shipped_grids_load():
    """Every grid in experiments/ is valid at every scale it declares (the paper scales included)."""
    paths = report.default_grids()
    assert {os.path.basename(p) for p in paths} >= {"table1_commonsense.yaml", "table3_math.yaml",
                                                    "table5_placement.yaml", "table4_modulators.yaml", "fig6_rank.yaml"}
    for p in paths + [SMOKE]:
        g = G.load_grid(p)
        assert "cpu" in g.scales and (p == SMOKE or "paper" in g.scales), p
    t4 = G.load_grid(os.path.join(ROOT, "experiments", "table4_modulators.yaml"))
    assert t4.scale("cpu").methods == ["hira", "hira_random"] and len(t4.scale("paper").methods) == 4
    assert [c.method for c in G.sweep_cells(t4, t4.scale("cpu"), "d")] == ["hira_random"] * 3
    t1 = G.load_grid(os.path.join(ROOT, "experiments", "table1_commonsense.yaml"))
    assert t1.methods == ["lora", "dora", "hira", "hilora", "bhra", "hira_sb", "full", "loha"]
    for scale in t1.scales.values():
        assert all(len(scale.lr[m]["candidates"]) >= 3 for m in t1.methods)  # every method gets its own sweep
        assert len(scale.seeds) >= 2 and scale.sweep["seed"] not in scale.seeds


def test_table1_budgets_are_matched(shared_data):
    """The dry run counts every method's parameters on the meta device: LoRA = HiRA = HiLoRA = BHRA = LoHa (r/2) at
    r·(in+out); DoRA adds one magnitude per output feature; HiRA-SB has r² per adapted layer; full FT everything."""
    proc = runner(os.path.join(ROOT, "experiments", "table1_commonsense.yaml"), "--dry_run", "--results_dir",
                  "/nonexistent-results")
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = {}
    for ln in proc.stdout.splitlines():
        if " trainable (" in ln and " r=32" in ln:
            label = ln.split(" r=32")[0].strip()
            counts[label] = int(ln.split(":")[1].split("trainable")[0].replace(",", ""))
            assert " = " in ln  # the rule's expected count, and they agree
    matched = 32 * 30 * ((576 + 576) + 2 * (576 + 192) + 2 * (576 + 1536))  # SmolLM2: q, k, v, up, down x 30 layers
    assert counts["LoRA"] == counts["HiRA"] == counts["HiLoRA"] == counts["BHRA"] == counts["LoHa"] == matched
    assert counts["DoRA"] == matched + 30 * (576 + 192 + 192 + 1536 + 576)
    assert counts["HiRA-SB"] == 32 * 32 * 150
    assert counts["Full FT"] == 134_515_008


# ----------------------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------------------


def _sweep_result(method, lr, loss):
    return {"method": method, "rank": 32, "targets": "qkvud", "learning_rate": lr,
            "held_out": {"final_eval_loss": loss}}


def test_select_lr_takes_the_lowest_finite_validation_loss():
    rows = [_sweep_result("hira", 1e-3, 0.40), _sweep_result("hira", 3e-3, 0.31),
            _sweep_result("hira", 1e-2, float("nan")), _sweep_result("lora", 1e-3, 0.35),
            _sweep_result("lora", 3e-4, None), _sweep_result("full", 1e-5, float("inf"))]
    chosen, table = G.select_lr(rows)
    assert chosen == {("hira", 32, "qkvud"): 3e-3, ("lora", 32, "qkvud"): 1e-3}  # full: every run diverged
    assert [lr for lr, _ in table[("hira", 32, "qkvud")]] == [1e-3, 3e-3, 1e-2]


def test_noise_verdicts():
    # overlapping seeds: no claim, however large the mean difference looks
    assert report.compare([0.30, 0.50], [0.40, 0.45], lower_is_better=True)["verdict"] == "within seed noise"
    # separated seeds, gap >> 2 SE
    c = report.compare([0.30, 0.31], [0.40, 0.41], lower_is_better=True)
    assert c["verdict"] == "better" and c["separated"] and c["delta"] == pytest.approx(-0.10)
    assert report.compare([0.40, 0.41], [0.30, 0.31], lower_is_better=True)["verdict"] == "worse"
    # separated seeds but a gap inside the test-sample noise of 100 items
    c = report.compare([52.0, 52.5], [50.0, 50.5], lower_is_better=False, items=100)
    assert c["verdict"] == "within test-sample noise" and not c["separated"]
    assert report.compare([60.0, 60.5], [50.0, 50.5], lower_is_better=False, items=2000)["verdict"] == "better"
    assert report.compare([0.3], [0.4], lower_is_better=True)["verdict"] == "one seed: noise unknown"


def test_gsm8k_records_become_metamath_records():
    rec = {"question": "Natalia sold 48 clips. How many?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"}
    out = run.gsm8k_to_metamath(rec)
    assert out == {"query": "Natalia sold 48 clips. How many?",
                   "response": "Natalia sold 48/2 = 24 clips in May.\nIn all 48+24 = 72.\nThe answer is: 72"}
    gsm8k = load_script("eval", "gsm8k")
    assert gsm8k.extract_answer(out["response"]) == 72.0  # the evaluator's rule reads what the training data teaches


def test_rank_expressions():
    assert G.substitute_rank({"a": "{2*r}", "b": ["{r//2}", 3], "c": "x"}, 32, "w") == {"a": 64, "b": [16, 3], "c": "x"}
    with pytest.raises(G.GridError, match="gives 0"):
        G.substitute_rank("{r-32}", 32, "w")


def test_flags_round_trip_through_the_recipe_parser():
    recipe = run._load_recipe("commonsense")
    argv = run.to_flags({"method": "peft", "peft_config": {"peft_type": "LOHA", "r": 2}, "hira_target_modules":
                         ["q_proj", "v_proj"], "bf16": False, "learning_rate": 3e-4, "use_cpu": True})
    _, training_args, _, hira_args = run.parse_recipe_flags(recipe, argv, "t")
    assert hira_args.peft_config == {"peft_type": "LOHA", "r": 2}
    assert hira_args.hira_target_modules == ["q_proj", "v_proj"]
    assert training_args.bf16 is False and training_args.learning_rate == 3e-4


# ----------------------------------------------------------------------------------------------------------------------
# End to end: run, kill, resume, report, reuse
# ----------------------------------------------------------------------------------------------------------------------


def _children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        kids.append((int(entry), f.read().replace(b"\0", b" ").decode()))
            except (OSError, IndexError):
                pass
    return kids


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _run_until_killed(args, trigger, child_script, timeout=300):
    """Start the runner, wait until ``trigger()`` holds and its child runs ``child_script``, SIGKILL the runner only,
    and check that the child died with it (no orphaned training keeps writing into the cell)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "experiments", "run.py"), *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + timeout
    child = None
    while time.time() < deadline and proc.poll() is None:
        if trigger():
            kids = [pid for pid, cmd in _children(proc.pid) if child_script in cmd]
            if kids:
                child = kids[0]
                break
        time.sleep(0.02)
    assert child is not None, f"never reached the kill point: {proc.communicate()[0][-3000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    for _ in range(200):
        if not _alive(child):
            break
        time.sleep(0.05)
    assert not _alive(child), "the training/evaluation child outlived the killed runner"
    return out


def test_smoke_grid_run_kill_resume_report(tmp_path):
    res, runs = tmp_path / "results", tmp_path / "runs"
    args = [SMOKE, "--results_dir", str(res), "--runs_dir", str(runs), "--threads", "1"]
    cell = {m: f"cpu-{m}-r4-lr1e-2-s1" for m in ("hira", "lora")}
    out_dir = {m: runs / "smoke" / cell[m] for m in cell}

    # 1. killed while the second method trains: the first method's cell is finished, the second one is not
    out1 = _run_until_killed(args, lambda: (out_dir["lora"] / "cell.json").exists(), "recipes/commonsense.py")
    hira_result = (res / "smoke" / f"{cell['hira']}.json").read_bytes()
    assert (res / "smoke" / "cpu-base.json").exists() and not (res / "smoke" / f"{cell['lora']}.json").exists()
    assert "[3/3] cpu-lora" in out1

    # 2. killed again while the second method is being evaluated (its training has finished)
    out2 = _run_until_killed(args, lambda: (out_dir["lora"] / "train.done.json").exists(), "eval/commonsense.py")
    assert f"{cell['hira']}: finished earlier, skipped" in out2 and "cpu-base: finished earlier, skipped" in out2
    assert not (res / "smoke" / f"{cell['lora']}.json").exists()

    # 3. resumed to the end: nothing finished is run again
    proc = runner(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{cell['hira']}: finished earlier, skipped" in proc.stdout
    lora_part = proc.stdout.split("[3/3]")[1]
    assert "train:" not in lora_part and "evaluate on the test items" in lora_part  # training was not repeated
    assert (res / "smoke" / f"{cell['hira']}.json").read_bytes() == hira_result
    for m in cell:
        assert len(json.load(open(out_dir[m] / "train.attempts.json"))) == 1
        assert not [d for d in os.listdir(out_dir[m] / "train") if d.startswith("checkpoint-")]  # pruned when done
    results = {m: json.load(open(res / "smoke" / f"{cell[m]}.json")) for m in cell}
    assert results["lora"]["eval"]["attempts"][-1]["exit_code"] == 0
    for r in results.values():
        assert r["budget"]["trainable_params"] == r["budget"]["expected"] == 2048  # the same budget for both
        assert [s for s, _ in r["held_out"]["eval_loss_curve"]] == [1, 2]
        assert r["environment"]["git_revision"] and r["environment"]["packages"]["torch"]
        assert r["eval"]["metrics"]["per_task"]["boolq"]["n"] == 8 and len(r["eval"]["predictions"]) == 8
        assert r["train"]["command"][1].endswith("recipes/commonsense.py")  # the real recipe command line
    assert results["hira"]["config"]["train_flags"]["method"] == "hira"
    assert {k: v for k, v in results["hira"]["config"]["train_flags"].items() if k not in ("method", "lora_alpha")} == \
        {k: v for k, v in results["lora"]["config"]["train_flags"].items() if k not in ("method", "lora_alpha")}

    # 4. a second run has nothing to do
    again = runner(*args)
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 4  # 3 cells + the analysis
    analysis = json.load(open(res / "smoke" / "cpu-analysis-r4" / "analysis.json"))
    ranks = {}
    for row in analysis["rows"]:
        ranks.setdefault(row["ckpt"], []).append(row["num_rank"])
    assert max(ranks["LoRA"]) <= 4 < min(ranks["HiRA"])  # LoRA's ΔW has rank <= r, HiRA's more (after 2 steps)

    # 5. the report, twice: the same bytes
    md = tmp_path / "doc" / "results.md"
    rep = [os.path.join(ROOT, "experiments", "report.py"), SMOKE, "--results_dir", str(res), "--out", str(md)]
    subprocess.run([sys.executable, *rep], check=True, env=ENV, capture_output=True)
    first = md.read_bytes()
    pngs = {p: (tmp_path / "doc" / "results" / p).read_bytes() for p in os.listdir(tmp_path / "doc" / "results")}
    assert len(pngs) == 3
    subprocess.run([sys.executable, *rep], check=True, env=ENV, capture_output=True)
    assert md.read_bytes() == first
    assert all((tmp_path / "doc" / "results" / p).read_bytes() == b for p, b in pngs.items())
    text = first.decode()
    assert text.startswith("Regenerate: `python experiments/report.py experiments/smoke.yaml")
    assert "| HiRA | 1e-2 | 2.0k |" in text and "| LoRA | 1e-2 | 2.0k |" in text
    assert "LoRA vs HiRA" in text and "one seed: noise unknown" in text and "**Rank analysis**" in text
    assert "The paper's rank claim" in text and "reproduced at this scale (HiRA " in text
    check = subprocess.run([sys.executable, *rep, "--check"], env=ENV, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    md.write_text(text.replace("| HiRA | 1e-2", "| HiRA | 2e-2"))  # a typed-in number is caught
    assert subprocess.run([sys.executable, *rep, "--check"], env=ENV, capture_output=True).returncode == 1

    # 6. an identical grid under another name reuses the finished cells instead of training them again
    copy_path = tmp_path / "smoke_copy.yaml"
    copy_path.write_text(open(SMOKE).read())
    reuse = runner(str(copy_path), "--results_dir", str(res), "--runs_dir", str(runs))
    assert reuse.returncode == 0, reuse.stderr[-2000:]
    assert reuse.stdout.count("reused") == 3 and "train:" not in reuse.stdout
    assert os.path.isfile(res / "smoke_copy" / "cpu-analysis-r4" / "analysis.json")  # on the reused cells' adapters
    copied = json.load(open(res / "smoke_copy" / f"{cell['hira']}.json"))
    assert copied["reused_from"] == f"smoke/{cell['hira']}.json" and copied["grid"] == "smoke_copy"


def test_changed_grid_never_mixes_results(tmp_path):
    """A finished cell whose grid entry changed is an error (never silently reused or overwritten)."""
    res = tmp_path / "results" / "g"
    res.mkdir(parents=True)
    path = write_grid(tmp_path, lambda d: None)
    grid = G.load_grid(path)
    scale = grid.scale("cpu")
    base = G.base_cell(grid, scale)
    old_config = dict(base.config(), eval_flags={**base.eval_flags, "max_new_tokens": 99})
    stale = {"fingerprint": "0" * 16, "config": old_config}
    (res / f"{base.name}.json").write_text(json.dumps(stale))
    proc = runner(path, "--results_dir", str(tmp_path / "results"), "--runs_dir", str(tmp_path / "runs"))
    assert proc.returncode == 2
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "another configuration" in err[0] and "eval_flags.max_new_tokens" in err[0]
    assert json.loads((res / f"{base.name}.json").read_text()) == stale


def test_committed_results_md_is_what_the_results_give():
    """docs/results.md is rebuilt byte for byte from the committed raw results by its Regenerate command."""
    md = os.path.join(ROOT, "docs", "results.md")
    if not os.path.isfile(md):
        pytest.skip("docs/results.md not written yet")
    with open(md) as f:
        first = f.readline()
    assert first.startswith("Regenerate: `python experiments/report.py")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "report.py"), "--check"], cwd=ROOT,
                          env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_report_flags_settings_that_differ_between_methods(tmp_path):
    """If raw results disagree on a shared setting (e.g. one method trained longer), the report says the comparison
    is not fair instead of printing a table as if it were."""
    grid = G.load_grid(SMOKE)
    scale = grid.scale("cpu")
    base = {"stage": "final", "rank": 4, "targets": "default", "learning_rate": 1e-2, "seed": 1,
            "budget": {"trainable_params": 2048, "rule": "matched", "expected": 2048}}
    rows = [dict(copy.deepcopy(base), method="hira", config={"train_flags": {"method": "hira", "max_steps": 2}}),
            dict(copy.deepcopy(base), method="lora", config={"train_flags": {"method": "lora", "max_steps": 4}})]
    sec = report.Section(grid, scale, rows, str(tmp_path))
    same, bad = report.shared_settings(sec)
    assert bad == ["`max_steps`: ['2', '4']"] and same == []


def test_a_run_that_trains_more_than_its_budget_stops_the_grid(tmp_path):
    """After training, the runner compares the run's trainable parameters with the budget counted before training
    (the guard against e.g. frozen HiRA-SB factors coming back to life): a mismatch stops the grid and no result is
    recorded. Simulated by giving the runner a wrong pre-flight count for a real 2-step tiny-llama run."""
    import argparse

    grid = G.load_grid(SMOKE)
    scale = grid.scale("cpu")
    args = argparse.Namespace(results_dir=str(tmp_path / "results"), runs_dir=str(tmp_path / "runs"), threads=1,
                              num_processes=1, dry_run=False)
    flag, path = run.prepare_data(scale, str(tmp_path / "data"))
    ctx = run.Context(grid, scale, args, flag, path)
    (cell,) = [c for c in G.final_cells(grid, scale, flag, G.fixed_lrs(grid, scale)) if c.method == "hira"]
    ctx.budgets[("hira", 4, "default")] = {"meta_trainable": 1024, "rule": "r_squared", "rule_text": "r² per layer"}
    with pytest.raises(run.RunError, match="the run trained 2,048 parameters, but the method's budget is 1,024"):
        run.run_cell(ctx, cell, "[1/1]")
    assert not os.path.exists(G.result_path(args.results_dir, cell))


def test_held_out_loss_is_the_kept_models():
    """The held-out loss is the one of the model the run keeps: the best checkpoint's when the recipe loads it at the
    end (the paper setting), the last evaluation's otherwise (the cpu grids)."""
    summary = {"log_history": [{"step": 80, "eval_loss": 0.5}, {"step": 160, "eval_loss": 0.4},
                               {"step": 200, "loss": 0.3}, {"step": 240, "eval_loss": 0.45}],
               "best_metric": 0.4, "best_model_checkpoint": "runs/x/train/checkpoint-160"}
    best = run._held_out(summary, load_best=True)
    assert (best["final_eval_loss"], best["final_eval_step"], best["kept"]) == (0.4, 160, "best")
    last = run._held_out(summary, load_best=False)
    assert (last["final_eval_loss"], last["final_eval_step"], last["kept"]) == (0.45, 240, "last")
    assert last["eval_loss_curve"] == [[80, 0.5], [160, 0.4], [240, 0.45]]


def test_eval_summary_reads_a_resumed_evaluation(tmp_path):
    """An evaluation killed mid-write and resumed leaves a cut-off line in predictions.jsonl (the evaluator skips it
    and generates that item again): the cell's summary must read the file the same way, not crash on it."""
    (tmp_path / "metrics.json").write_text(json.dumps({"metrics": {"accuracy": 50.0, "n": 2}}))
    rec = [{"id": "b", "task": "boolq", "gold": "true", "extracted": "false"},
           {"id": "a", "task": "boolq", "gold": "true", "extracted": "true"}]
    (tmp_path / "predictions.jsonl").write_text(json.dumps(rec[0]) + "\n" + json.dumps(rec[1])[:20] + "\n"
                                                + json.dumps(rec[1]) + "\n")
    out = run._eval_summary(str(tmp_path))
    assert [p["id"] for p in out["predictions"]] == ["a", "b"]
    assert out["label_counts"] == {"boolq": {"gold": {"true": 2}, "predicted": {"false": 1, "true": 1}}}
