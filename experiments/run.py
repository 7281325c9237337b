"""Run an experiment grid: every cell through the real recipe and evaluator command lines, resumably.

    python experiments/run.py experiments/table1_commonsense.yaml                 # cpu scale (the default)
    python experiments/run.py experiments/table1_commonsense.yaml --scale paper   # the paper's models and data (GPUs)
    python experiments/run.py experiments/table1_commonsense.yaml --dry_run       # plan + budgets, no training
    python experiments/run.py experiments/table1_commonsense.yaml experiments/table3_math.yaml   # one after another

Order per grid: checks (grid keys, data files, every cell's recipe flags parsed by the recipe's own parser, the
parameter budget of every method counted on the meta device) -> the untuned model on the test items (this also
checks the evaluator flags before any training) -> the learning-rate sweep (validation loss only; sweep cells are
never evaluated on a test set) -> the final cells at each method's chosen learning rate, every seed -> the rank
analysis (`python -m hira.analysis`) of the trained adapters.

Resumable: a cell's result ``results/<grid>/<cell>.json`` is written last, atomically; a cell with a result is never
run again (and a result made from a different configuration is an error, never silently reused). A killed cell
continues from its last Trainer checkpoint and the evaluator from its predictions file. With several GPUs
(``--num_processes N``, default: the visible CUDA devices) the recipe and evaluator run under ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `import hira` without installing
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grid as G  # noqa: E402


ROOT = G.ROOT


class RunError(RuntimeError):
    """A cell that failed or produced a result the harness cannot accept; the grid stops."""


def say(msg: str = "") -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def _looks_local(path: str) -> bool:
    if path.startswith(("http://", "https://", "hf://")):
        return False
    return path.startswith((".", "/", "~")) or os.path.splitext(path)[1] in (".json", ".jsonl", ".csv", ".parquet")


def _abs(path: str) -> str:
    return os.path.normpath(os.path.join(ROOT, os.path.expanduser(path)))


_CALC = re.compile(r"<<[^>]*>>")


def gsm8k_to_metamath(rec: dict) -> dict:
    """A GSM8K training record in MetaMathQA's columns and answer format: calculator annotations ``<<...>>`` removed,
    the final ``#### N`` line replaced by ``The answer is: N`` (the line the MetaMath answer rule reads)."""
    body, _, final = rec["answer"].rpartition("####")
    if not _:
        raise RunError(f"GSM8K record without '#### <answer>': {rec['answer'][-80:]!r}")
    return {"query": rec["question"], "response": f"{_CALC.sub('', body).rstrip()}\nThe answer is: {final.strip()}"}


def prepare_data(scale: G.Scale, data_dir: str, write: bool = True) -> tuple[str, str]:
    """``(flag value recorded in the cell config, path passed to the recipe)``. Files listed in ``data.train_files``
    are concatenated (and transformed) once into ``data_dir``; the config records their content hash, not a path."""
    from hira.sources import check_json_records

    if scale.data is None:
        name = scale.train["dataset_name"]
        if _looks_local(name) and not os.path.exists(_abs(name)):
            raise G.GridError(f"training data {name} does not exist (relative paths are from the repository root)")
        return name, name
    rows = []
    for f in scale.data["train_files"]:
        if not os.path.isfile(_abs(f)):
            hint = " (../shared/data is the project's data folder; see its README)" if "shared/data" in f else ""
            raise G.GridError(f"training file {f} does not exist{hint}")
        try:
            rows.extend(check_json_records(_abs(f)))  # a JSON list or JSON lines; anything else is one clear line
        except ValueError as err:
            raise G.GridError(str(err)) from None
    if scale.data.get("transform") == "gsm8k_to_metamath":
        rows = [gsm8k_to_metamath(r) for r in rows]
    blob = json.dumps(rows, ensure_ascii=False).encode()
    digest = hashlib.sha256(blob).hexdigest()[:12]
    path = os.path.join(data_dir, f"train-{digest}.json")
    if write and not os.path.isfile(path):
        os.makedirs(data_dir, exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            f.write(blob)
        os.replace(path + ".tmp", path)
    return f"prepared:train-{digest}.json ({len(rows)} records from {', '.join(scale.data['train_files'])})", path


def check_eval_data(scale: G.Scale) -> None:
    for key in ("data_dir", "data_file"):
        v = scale.eval.get(key)
        if isinstance(v, str) and _looks_local(v) and not os.path.exists(_abs(v)):
            raise G.GridError(f"evaluation data {key}={v} does not exist (relative paths are from the repository root)")


# ----------------------------------------------------------------------------------------------------------------------
# Flags and commands
# ----------------------------------------------------------------------------------------------------------------------


def to_flags(flags: dict) -> list[str]:
    """``{"hira_r": 32, "bf16": False, "hira_kwargs": {...}, "hira_target_modules": [...]}`` -> argv."""
    argv = []
    for k, v in flags.items():
        if isinstance(v, bool):
            argv += [f"--{k}", "true" if v else "false"]
        elif isinstance(v, list):
            argv += [f"--{k}", *[str(x) for x in v]]
        elif isinstance(v, dict):
            argv += [f"--{k}", json.dumps(v, sort_keys=True)]
        else:
            argv += [f"--{k}", str(v)]
    return argv


def eval_argv_flags(flags: dict) -> list[str]:
    """Evaluator flags (argparse): ``true`` switches become bare flags, ``false`` ones are left out."""
    argv = []
    for k, v in flags.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is False:
            continue
        else:
            argv += to_flags({k: v})
    return argv


def launcher(script: str, num_processes: int, config_file: str | None) -> list[str]:
    if num_processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
        if config_file:
            cmd += ["--config_file", _abs(config_file)]
        return cmd + [script]
    return [sys.executable, script]


def _load_recipe(name: str):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location(f"recipe_{name}", os.path.join(ROOT, "recipes", f"{name}.py"))
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_recipe_flags(recipe, argv: list[str], where: str):
    """The recipe's own parser on the cell's flags: an unknown or malformed key is a one-line error now, not hours
    later when the cell starts."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return recipe.parse_args(recipe.__file__, argv)
    except SystemExit:
        lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
        msg = lines[-1] if lines else "argument error"
        raise G.GridError(f"{where}: the recipe rejects its flags: {msg}") from None
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise G.GridError(f"{where}: the recipe rejects its flags: {str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Parameter budgets (meta device, before any training)
# ----------------------------------------------------------------------------------------------------------------------


def count_budget(parsed, rule: str, rank: int) -> dict:
    """Trainable parameters of the method on the meta device, and what its budget rule expects from the shapes."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from hira.recipe import build_peft_config, count_parameters, matches_target, method_targets
    from hira.sources import load_model_config

    _, training_args, model_args, hira_args = parsed
    _, config = load_model_config("model_name_or_path", model_args.model_name_or_path,
                                  training_args.trust_remote_code)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, trust_remote_code=training_args.trust_remote_code)
    _, total = count_parameters(base)
    targets = method_targets(hira_args) or hira_args.hira_target_modules
    if isinstance(targets, str):
        raise ValueError(f"budget rules need a list of target modules, got the pattern {targets!r}")
    shapes = [(m.in_features, m.out_features) for n, m in base.named_modules()
              if isinstance(m, torch.nn.Linear) and matches_target(n, targets)]
    lora = sum(rank * (i + o) for i, o in shapes)  # LoRA's count at rank r: the matched budget
    expected = {
        "matched": lora,
        "matched+magnitude": lora + sum(o for _, o in shapes),
        "r_squared": rank * rank * len(shapes),
        "full": total,
        "free": None,
    }[rule]
    peft_config = build_peft_config(hira_args, model_args, hidden_size=getattr(config, "hidden_size", None))
    with torch.device("meta"):
        model = base if peft_config is None else get_peft_model(base, peft_config)
    trainable, _ = count_parameters(model)
    return {"rule": rule, "rule_text": G.BUDGETS[rule], "expected": expected, "meta_trainable": trainable,
            "total_params": total, "adapted_layers": len(shapes) if peft_config is not None else None,
            "lora_equivalent": lora}


# ----------------------------------------------------------------------------------------------------------------------
# Subprocesses: logged, with readable progress, killed with the runner
# ----------------------------------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_CHILD: subprocess.Popen | None = None
_BAR = re.compile(r"^(?:(.*?): *)?\d+%\|[^|]*\| *(\d+)/(\d+) \[([0-9:]+)<([0-9:?]+)")


def _die_with_parent():
    # Linux: the child gets SIGKILL when the runner dies, even by SIGKILL, so a killed grid leaves no orphan training
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def _on_signal(signum, frame):
    if _CHILD is not None and _CHILD.poll() is None:
        try:
            os.killpg(_CHILD.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)


class _Progress:
    """Turns the Trainer's and evaluator's output into a few readable lines (the full output goes to the log)."""

    def __init__(self, stage: str, total_steps: int | None, bar_desc: str | None):
        self.stage, self.total, self.desc = stage, total_steps, bar_desc
        self.last_print = 0.0
        self.last_shown = None
        self.last_loss = None

    def feed(self, segment: str) -> None:
        segment = segment.strip()
        if segment.startswith("{'") and segment.endswith("}"):
            try:
                logs = ast.literal_eval(segment)
            except (ValueError, SyntaxError):
                return
            if "eval_loss" in logs:
                say(f"      validation loss {float(logs['eval_loss']):.4f} (epoch {float(logs.get('epoch', 0)):.3g})")
            elif "loss" in logs:
                self.last_loss = float(logs["loss"])
            return
        m = _BAR.match(segment)
        if not m or (m.group(1) or "") != (self.desc or ""):
            return  # data preparation, weight loading, ...
        done, total, elapsed, eta = int(m.group(2)), int(m.group(3)), m.group(4), m.group(5)
        if self.total is not None and total != self.total:
            return  # the validation bar inside training
        now = time.monotonic()
        if done and (done, total) != self.last_shown and (now - self.last_print >= 30 or done == total):
            loss = f"  loss {self.last_loss:.4f}" if self.last_loss is not None else ""
            say(f"      {self.stage} {done}/{total}{loss}  elapsed {elapsed}  eta {eta}")
            self.last_print, self.last_shown = now, (done, total)


def run_logged(cmd: list[str], log_path: str, env: dict, progress: _Progress) -> tuple[int, int, float]:
    """Run ``cmd`` with output appended to ``log_path``; returns ``(exit code, peak RSS bytes, wall seconds)``."""
    global _CHILD
    start = time.perf_counter()
    with open(log_path, "ab") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        _CHILD = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  start_new_session=True, preexec_fn=_die_with_parent)

        def pump():
            pending = b""
            for chunk in iter(lambda: _CHILD.stdout.read1(65536), b""):
                log.write(chunk)
                log.flush()
                pending += chunk
                *parts, pending = re.split(rb"[\r\n]", pending)
                for p in parts:
                    progress.feed(p.decode(errors="replace"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        _, status, usage = os.wait4(_CHILD.pid, 0)
        reader.join()
        _CHILD.returncode = os.waitstatus_to_exitcode(status)
    _CHILD = None
    return os.waitstatus_to_exitcode(status), int(usage.ru_maxrss) * 1024, time.perf_counter() - start


def last_error_line(log_path: str) -> str:
    with open(log_path, errors="replace") as f:
        lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b|^error:|: error:", ln):
            return ln
    return lines[-1] if lines else "(no output)"


# ----------------------------------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------------------------------


def environment(threads: int, num_processes: int) -> dict:
    import torch

    from hira.inference import git_revision, package_versions

    code_changes = subprocess.run(
        ["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--", "hira", "recipes", "eval",
         "experiments"], capture_output=True, text=True).stdout.split("\n")
    return {
        "git_revision": git_revision(),
        "uncommitted_code_changes": sorted(ln[3:] for ln in code_changes if ln.strip()),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "num_processes": num_processes,
        "accelerators": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def _write_json_atomic(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------
# One cell
# ----------------------------------------------------------------------------------------------------------------------


class Context:
    def __init__(self, grid: G.Grid, scale: G.Scale, args, dataset_flag: str, dataset_path: str):
        self.grid, self.scale, self.args = grid, scale, args
        self.dataset_flag, self.dataset_path = dataset_flag, dataset_path
        self.runs = os.path.join(args.runs_dir, grid.name)
        self.budgets: dict = {}
        self.load_best = False
        self.num_processes = args.num_processes
        self.env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                        TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])


def _held_out(summary: dict, load_best: bool) -> dict:
    """The validation loss curve and the held-out loss of the model the run kept: the best checkpoint's where the
    recipe loads it at the end (``load_best_model_at_end``), else the last evaluation's (normally the last step)."""
    curve = [[h["step"], h["eval_loss"]] for h in summary["log_history"] if "eval_loss" in h]
    if load_best and summary.get("best_metric") is not None and summary.get("best_model_checkpoint"):
        step = int(summary["best_model_checkpoint"].rstrip("/").rsplit("-", 1)[1])
        return {"eval_loss_curve": curve, "final_eval_loss": summary["best_metric"], "final_eval_step": step,
                "kept": "best"}
    if not curve:
        return {"eval_loss_curve": curve, "final_eval_loss": None, "final_eval_step": None, "kept": "last"}
    return {"eval_loss_curve": curve, "final_eval_loss": curve[-1][1], "final_eval_step": curve[-1][0], "kept": "last"}


def _train_speed(summary: dict) -> dict:
    first = summary["global_step"] - summary["steps"]  # this attempt's first step (resumed runs start later)
    evals = sum(h.get("eval_runtime", 0.0) for h in summary["log_history"] if "eval_runtime" in h and h["step"] > first)
    steps = summary["steps"]
    return {"s_per_step": (summary["train_wall_time_s"] - evals) / steps if steps else None,
            "steps_timed": steps, "validation_s_in_attempt": evals}


def _eval_summary(out_dir: str) -> dict:
    from hira.inference import METRICS_FILE, read_predictions  # skips a line a crash cut short (resumed evaluation)

    with open(os.path.join(out_dir, METRICS_FILE)) as f:
        metrics = json.load(f)
    preds = list(read_predictions(out_dir).values())
    labels: dict = {}
    for p in preds:
        if "task" in p and "extracted" in p:
            t = labels.setdefault(p["task"], {"gold": {}, "predicted": {}})
            t["gold"][p["gold"]] = t["gold"].get(p["gold"], 0) + 1
            t["predicted"][p["extracted"]] = t["predicted"].get(p["extracted"], 0) + 1
    return {"metrics": metrics["metrics"], "decoding": metrics.get("decoding"), "label_counts": labels,
            "predictions": sorted(preds, key=lambda p: p["id"])}


def run_cell(ctx: Context, cell: G.Cell, index: str) -> dict:
    res_path = G.result_path(ctx.args.results_dir, cell)
    if os.path.isfile(res_path):
        with open(res_path) as f:
            prev = json.load(f)
        if prev["fingerprint"] != cell.fingerprint():
            old, new = prev["config"], cell.config()
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            sub = [f"{k}.{kk}" for k in changed if isinstance(new.get(k), dict)
                   for kk in sorted(set(old.get(k) or {}) | set(new[k]))
                   if (old.get(k) or {}).get(kk) != new[k].get(kk)]
            raise RunError(f"{res_path} was made with another configuration (changed: {sub or changed}); restore the "
                           "grid, or move the old result away to run the cell again")
        say(f"{index} {cell.name}: finished earlier, skipped")
        return prev
    reused = _identical_result_elsewhere(ctx, cell)
    if reused is not None:
        _write_json_atomic(res_path, reused)
        say(f"{index} {cell.name}: the same cell finished in grid {reused['reused_from'].split('/')[0]}; reused")
        return reused

    cell_dir = os.path.join(ctx.runs, cell.name)
    state_path = os.path.join(cell_dir, "cell.json")
    if os.path.isfile(state_path):
        with open(state_path) as f:
            if json.load(f)["fingerprint"] != cell.fingerprint():
                say(f"{index} {cell.name}: the half-done run in {cell_dir} had another configuration; starting over")
                shutil.rmtree(cell_dir)
    os.makedirs(cell_dir, exist_ok=True)
    if not os.path.isfile(state_path):
        _write_json_atomic(state_path, {"fingerprint": cell.fingerprint(), "config": cell.config()})
    say(f"{index} {cell.name}")
    env_info = environment(ctx.args.threads, ctx.num_processes)
    result = {"grid": cell.grid, "scale": cell.scale, "cell": cell.name, "stage": cell.stage, "method": cell.method,
              "label": ctx.grid.label(cell.method) if cell.method else "untuned model", "rank": cell.rank,
              "targets": cell.targets, "learning_rate": cell.lr, "seed": cell.seed, "config": cell.config(),
              "fingerprint": cell.fingerprint(), "environment": env_info}

    if cell.stage != "base":
        result.update(_train_stage(ctx, cell, cell_dir))
    if cell.stage != "sweep" and ctx.grid.evaluator is not None:
        result.update(_eval_stage(ctx, cell, cell_dir))
    result["wall_time_s"] = {k: result[k]["wall_s"] for k in ("train", "eval") if k in result}
    result["wall_time_s"]["total"] = sum(result["wall_time_s"].values())
    result["peak_memory_bytes"] = {
        **{f"{k}_process_peak_rss": result[k]["peak_rss_bytes"] for k in ("train", "eval") if k in result},
        **(result["train"]["summary"]["peak_memory_bytes"] if "train" in result else {}),
    }
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_json_atomic(res_path, result)
    bits = [f"{result['wall_time_s']['total']:.0f} s"]
    if "held_out" in result and result["held_out"]["final_eval_loss"] is not None:
        bits.append(f"validation loss {result['held_out']['final_eval_loss']:.4f}")
    if "eval" in result:
        m = result["eval"]["metrics"]
        bits.append(f"test accuracy {m.get('average', m.get('accuracy')):.2f}")
    shown = os.path.relpath(res_path, ROOT) if res_path.startswith(ROOT) else res_path
    say(f"      done: {', '.join(bits)} -> {shown}")
    return result


def _identical_result_elsewhere(ctx: Context, cell: G.Cell) -> dict | None:
    """A finished cell of another grid with exactly this configuration (same data, flags, seed, evaluation)."""
    root = ctx.args.results_dir
    for other in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, other, f"{cell.name}.json")
        if other == cell.grid or not os.path.isfile(path):
            continue
        with open(path) as f:
            res = json.load(f)
        if res["fingerprint"] == cell.fingerprint() and "reused_from" not in res:
            return {**res, "grid": cell.grid, "reused_from": f"{other}/{cell.name}.json"}
    return None


def _stage_marker(cell_dir: str, stage: str) -> str:
    return os.path.join(cell_dir, f"{stage}.done.json")


def _attempts(cell_dir: str, stage: str, add: dict | None = None) -> list[dict]:
    path = os.path.join(cell_dir, f"{stage}.attempts.json")
    attempts = []
    if os.path.isfile(path):
        with open(path) as f:
            attempts = json.load(f)
    if add is not None:
        attempts.append(add)
        _write_json_atomic(path, attempts)
    return attempts


def _attempts_record(cell_dir: str, stage: str) -> dict:
    """What a stage's result records of its attempts: all of them, the last command, total time, peak memory."""
    attempts = _attempts(cell_dir, stage)
    return {"attempts": attempts, "command": attempts[-1]["command"], "wall_s": sum(a["wall_s"] for a in attempts),
            "peak_rss_bytes": max(a["peak_rss_bytes"] for a in attempts)}


def _train_stage(ctx: Context, cell: G.Cell, cell_dir: str) -> dict:
    out = os.path.join(cell_dir, "train")
    marker = _stage_marker(cell_dir, "train")
    if not os.path.isfile(marker):
        flags = dict(cell.train_flags, dataset_name=ctx.dataset_path, output_dir=out)
        ckpts = [d for d in os.listdir(out) if d.startswith("checkpoint-")] if os.path.isdir(out) else []
        if ckpts:
            flags["resume_from_checkpoint"] = "last"
            say(f"      resuming training from {max(ckpts, key=lambda d: int(d.split('-')[1]))}")
        elif os.path.isdir(out):
            shutil.rmtree(out)  # killed before its first checkpoint: nothing worth keeping
        budget = ctx.budgets[(cell.method, cell.rank, cell.targets)]
        say(f"      train: {ctx.grid.label(cell.method)}, lr {cell.lr:g}, seed {cell.seed}, "
            f"{budget['meta_trainable']:,} trainable parameters ({budget['rule']}); log {cell_dir}/train.log")
        cmd = launcher(os.path.join(ROOT, "recipes", f"{ctx.grid.recipe}.py"), ctx.num_processes,
                       ctx.scale.launch.get("config_file")) + to_flags(flags)
        rc, rss, wall = run_logged(cmd, os.path.join(cell_dir, "train.log"), ctx.env,
                                   _Progress("train", flags.get("max_steps"), None))
        _attempts(cell_dir, "train", {"command": cmd, "exit_code": rc, "wall_s": wall, "peak_rss_bytes": rss,
                                      "resumed": bool(ckpts)})
        if rc != 0:
            raise RunError(f"{cell.name}: training failed (exit {rc}): "
                           f"{last_error_line(os.path.join(cell_dir, 'train.log'))}")
        with open(os.path.join(out, "run_summary.json")) as f:
            summary = json.load(f)
        if summary["trainable_params"] != budget["meta_trainable"]:
            raise RunError(
                f"{cell.name}: the run trained {summary['trainable_params']:,} parameters, but the method's budget is "
                f"{budget['meta_trainable']:,} ({budget['rule']}: {budget['rule_text']}); the result is not recorded"
            )
        for d in os.listdir(out):  # resume points only; the final adapter/model stays for evaluation and analysis
            if d.startswith("checkpoint-"):
                shutil.rmtree(os.path.join(out, d))
        _write_json_atomic(marker, {"done": True})
    with open(os.path.join(out, "run_summary.json")) as f:
        summary = json.load(f)
    budget = dict(ctx.budgets[(cell.method, cell.rank, cell.targets)], trainable_params=summary["trainable_params"])
    return {"train": {"summary": summary, "speed": _train_speed(summary), **_attempts_record(cell_dir, "train"),
                      "output_dir": out},
            "budget": budget, "held_out": _held_out(summary, ctx.load_best),
            "log_history": summary["log_history"]}


def _eval_stage(ctx: Context, cell: G.Cell, cell_dir: str) -> dict:
    out = os.path.join(cell_dir, "eval")
    marker = _stage_marker(cell_dir, "eval")
    if not os.path.isfile(marker):
        ckpt = cell.eval_flags["ckpt"] if cell.stage == "base" else os.path.join(cell_dir, "train")
        flags = {k: v for k, v in cell.eval_flags.items() if k != "ckpt"}
        say(f"      evaluate on the test items; log {cell_dir}/eval.log")
        cmd = launcher(os.path.join(ROOT, "eval", f"{ctx.grid.evaluator}.py"), ctx.num_processes, None) + \
            eval_argv_flags({"ckpt": ckpt, **flags, "out": out})
        rc, rss, wall = run_logged(cmd, os.path.join(cell_dir, "eval.log"), ctx.env,
                                   _Progress("evaluate", None, ctx.grid.evaluator))
        _attempts(cell_dir, "eval", {"command": cmd, "exit_code": rc, "wall_s": wall, "peak_rss_bytes": rss})
        if rc != 0:
            raise RunError(f"{cell.name}: evaluation failed (exit {rc}): "
                           f"{last_error_line(os.path.join(cell_dir, 'eval.log'))}")
        _write_json_atomic(marker, {"done": True})
    return {"eval": {**_eval_summary(out), **_attempts_record(cell_dir, "eval")}}


# ----------------------------------------------------------------------------------------------------------------------
# A grid
# ----------------------------------------------------------------------------------------------------------------------


def preflight(ctx: Context, cells: list[G.Cell]) -> None:
    """Every cell's recipe flags through the recipe's parser, and every method's budget on the meta device."""
    import torch

    recipe = _load_recipe(ctx.grid.recipe)
    parsed_by_key = {}
    # On a machine without a GPU a GPU grid's flags are checked as if for the CPU (its bf16 check needs a GPU).
    cpu_check = {} if torch.cuda.is_available() or "use_cpu" in ctx.scale.train else {"use_cpu": True}
    if cpu_check:
        say("no GPU here: the recipe flags are checked with use_cpu=true added (the check only)")
    for cell in cells:
        argv = to_flags(dict(cell.train_flags, dataset_name=ctx.dataset_path, output_dir=os.path.join(ctx.runs, "x"),
                             **cpu_check))
        parsed = parse_recipe_flags(recipe, argv, f"{ctx.grid.path} cell {cell.name}")
        parsed_by_key.setdefault((cell.method, cell.rank, cell.targets), parsed)
        ctx.load_best = parsed[1].load_best_model_at_end  # a shared setting: the same for every cell
    say("parameter budgets (counted on the meta device from the model's shapes):")
    for (method, rank, targets), parsed in parsed_by_key.items():
        rule = ctx.grid.method_specs[method].get("budget", "free")
        try:
            b = count_budget(parsed, rule, rank)
        except (OSError, ValueError) as err:
            if ctx.args.dry_run:
                say(f"  {method:>10s} r={rank}: not counted here ({str(err).splitlines()[0][:120]})")
                continue
            raise G.GridError(f"{ctx.grid.path}: cannot count the budget of {method} at r={rank}: "
                              f"{str(err).splitlines()[0]}") from None
        ok = b["expected"] is None or b["meta_trainable"] == b["expected"]
        place = "" if targets == "default" else f" {targets}"
        say(f"  {ctx.grid.label(method):>10s} r={rank}{place}: {b['meta_trainable']:>12,} trainable "
            f"({100 * b['meta_trainable'] / b['total_params']:.3f}% of {b['total_params']:,}); rule {rule}"
            + ("" if b["expected"] is None else (" = " if ok else " != ") + f"{b['expected']:,}"))
        if not ok:
            raise G.GridError(f"{ctx.grid.path}: method {method} at r={rank} has {b['meta_trainable']:,} trainable "
                              f"parameters but its budget rule {rule!r} ({G.BUDGETS[rule]}) expects "
                              f"{b['expected']:,}; fix experiments/methods.yaml")
        ctx.budgets[(method, rank, targets)] = b


def print_fairness(ctx: Context) -> None:
    shared = {k: v for k, v in ctx.scale.train.items() if k != "dataset_name"}
    say(f"identical for every cell: data {ctx.dataset_flag}; " + ", ".join(f"{k}={v}" for k, v in shared.items()))
    if ctx.scale.eval:
        say("evaluation for every evaluated cell: " + ", ".join(f"{k}={v}" for k, v in ctx.scale.eval.items()))
    for m in ctx.scale.methods:
        spec = ctx.grid.method_specs[m]["train"]
        say(f"  {ctx.grid.label(m):>10s}: " + ", ".join(f"{k}={v}" for k, v in spec.items()))


def run_grid(path: str, args) -> None:
    grid = G.load_grid(path)
    scale = grid.scale(args.scale)
    try:
        check_eval_data(scale)
    except G.GridError as err:
        if not args.dry_run:
            raise
        say(f"(not ready yet: {err})")
    runs = os.path.join(args.runs_dir, grid.name)
    if not args.dry_run:  # a dry run writes nothing and can run beside a real one
        os.makedirs(runs, exist_ok=True)
        lock = open(os.path.join(runs, f"{scale.name}.lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"another runner is already running {grid.name} at scale {scale.name} "
                           f"(lock {lock.name})") from None
        lock.write(str(os.getpid()))
        lock.flush()
    dataset_flag, dataset_path = prepare_data(scale, os.path.join(runs, "data"), write=not args.dry_run)
    ctx = Context(grid, scale, args, dataset_flag, dataset_path)
    if ctx.num_processes is None:
        ctx.num_processes = scale.launch.get("num_processes") or _visible_gpus()
    if "effective_batch_size" in scale.launch:
        # keep the paper's effective batch on any number of GPUs: accumulation = batch / (per device x processes)
        per_device = scale.train.get("per_device_train_batch_size")
        ebs = scale.launch["effective_batch_size"]
        if not per_device or ebs % (per_device * ctx.num_processes):
            raise G.GridError(f"{path}: launch.effective_batch_size {ebs} is not a multiple of "
                              f"per_device_train_batch_size ({per_device}) x {ctx.num_processes} processes")
        scale.train["gradient_accumulation_steps"] = ebs // (per_device * ctx.num_processes)
    say(f"=== {grid.name} (scale {scale.name}): {grid.description.splitlines()[0] if grid.description else ''}")
    if scale.about:
        say(scale.about)

    base = G.base_cell(grid, scale)
    sweep = G.sweep_cells(grid, scale, dataset_flag)
    placeholder = {(m, r, t): scale.lr[m].get("candidates", [1e-3])[0] for m in scale.methods
                   for r in scale.ranks for t in scale.targets}
    preflight(ctx, sweep + G.final_cells(grid, scale, dataset_flag, placeholder))
    try:
        borrowed = G.borrowed_lrs(grid, scale, args.results_dir)  # fails now, not after the sweep, if not ready
    except G.GridError as err:
        if not args.dry_run:
            raise
        borrowed = {}
        say(f"(not ready yet: {err})")
    print_fairness(ctx)
    n_final = len(scale.methods) * len(scale.ranks) * len(scale.targets) * len(scale.seeds)
    say(f"cells: {1 if base else 0} untuned, {len(sweep)} learning-rate sweep, {n_final} final "
        f"({len(scale.methods)} methods x {len(scale.ranks)} ranks x {len(scale.targets)} placements x "
        f"{len(scale.seeds)} seeds)")
    if args.dry_run:
        for c in ([base] if base else []) + sweep:
            say(f"  {c.name}")
        say(f"  + {n_final} final cells at the learning rates the sweep picks")
        return

    total = (1 if base else 0) + len(sweep) + n_final
    done = 0
    if base:
        done += 1
        run_cell(ctx, base, f"[{done}/{total}]")
    sweep_results = []
    for cell in sweep:
        done += 1
        sweep_results.append(run_cell(ctx, cell, f"[{done}/{total}]"))
    chosen = {**G.fixed_lrs(grid, scale), **borrowed}
    for m in scale.methods:
        if "from" in scale.lr[m]:
            lr = borrowed[(m, scale.ranks[0], next(iter(scale.targets)))]
            say(f"  {grid.label(m)}: learning rate {lr:g}, chosen by {scale.lr[m]['from']}'s sweep "
                f"({scale.lr[m]['method']})")
    if sweep_results:
        picked, table = G.select_lr(sweep_results)
        missing = sorted(set(table) - set(picked))
        if missing:
            raise RunError(f"every learning rate of {missing} diverged (no finite validation loss); widen the sweep")
        chosen.update(picked)
        say("learning rates chosen on the validation loss:")
        for key, rows in sorted(table.items()):
            say(f"  {ctx.grid.label(key[0]):>10s} r={key[1]}: " + "  ".join(
                f"{'*' if lr == picked[key] else ' '}{lr:g}: {loss:.4f}" for lr, loss in rows))
    for cell in G.final_cells(grid, scale, dataset_flag, chosen):
        done += 1
        run_cell(ctx, cell, f"[{done}/{total}]")
    if grid.analysis and not args.no_analysis:
        run_analysis(ctx, chosen)
    say(f"=== {grid.name} ({scale.name}) finished; report: python experiments/report.py")


def _visible_gpus() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def run_analysis(ctx: Context, chosen: dict) -> None:
    """``python -m hira.analysis`` on the first seed's adapters of ``analysis.methods`` (and full FT's ΔW)."""
    seed = ctx.scale.seeds[0]

    def cell_dir(method, rank, targets):  # where the cell trained (another grid's folder for a reused cell)
        c = G.Cell(ctx.grid.name, ctx.scale.name, "final", method, rank, targets, chosen[(method, rank, targets)], seed)
        with open(G.result_path(ctx.args.results_dir, c)) as f:
            return json.load(f)["train"]["output_dir"]

    for rank in ctx.scale.ranks:
        for targets in ctx.scale.targets:
            suffix = f"r{rank}" + ("" if targets == "default" else f"-{targets}")
            out = os.path.join(G.results_dir(ctx.args.results_dir, ctx.grid.name),
                               f"{ctx.scale.name}-analysis-{suffix}")
            if os.path.isfile(os.path.join(out, "analysis.json")):
                say(f"rank analysis {suffix}: finished earlier, skipped")
                continue
            cmd = [sys.executable, "-m", "hira.analysis", "--no_progress"]  # SVDs on the GPU when there is one
            for m in ctx.grid.analysis.get("methods", []):
                cmd += ["--ckpt", cell_dir(m, rank, targets), "--label", ctx.grid.label(m)]
            if ctx.grid.analysis.get("full_ft"):
                cmd += ["--full_ft", cell_dir(ctx.grid.analysis["full_ft"], rank, targets)]
            say(f"rank analysis {suffix}: python -m hira.analysis on seed {seed} -> {out}")
            tmp = out + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            log = os.path.join(ctx.runs, f"{ctx.scale.name}-analysis-{suffix}.log")
            rc, _, wall = run_logged(cmd + ["--out", tmp], log, ctx.env, _Progress("analysis", None, "SVD"))
            if rc != 0:
                raise RunError(f"rank analysis failed (exit {rc}): {last_error_line(log)}")
            os.replace(tmp, out)
            say(f"      done in {wall:.0f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grids", nargs="+", help="grid files (experiments/<name>.yaml), run one after another")
    parser.add_argument("--scale", default="cpu", help="a scale the grids define (cpu, paper)")
    parser.add_argument("--dry_run", action="store_true", help="check the grid, print the cells and budgets, stop")
    parser.add_argument("--results_dir", default=os.path.join(ROOT, "results"), help="where cell results go")
    parser.add_argument("--runs_dir", default=os.path.join(ROOT, "runs", "experiments"),
                        help="checkpoints, logs and predictions of the cells (not committed)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)),
                        help="CPU threads per cell (OMP_NUM_THREADS of the recipe and evaluator)")
    parser.add_argument("--num_processes", type=int, default=None,
                        help="processes per cell under accelerate launch (default: the visible GPUs, else 1)")
    parser.add_argument("--no_analysis", action="store_true", help="skip the rank analysis of the trained cells")
    args = parser.parse_args(argv)
    args.results_dir, args.runs_dir = os.path.abspath(args.results_dir), os.path.abspath(args.runs_dir)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        for path in args.grids:
            run_grid(path, args)
    except (G.GridError, RunError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
