"""Experiment grids: load and check ``experiments/<name>.yaml``, expand it into cells, name and locate their results.

Shared by ``experiments/run.py`` (which trains and evaluates the cells) and ``experiments/report.py`` (which reads
their results). A grid declares, per scale (``cpu``, ``paper``), the recipe flags every cell shares, the evaluator
flags, the ranks, target placements and seeds, and per method the learning rates: one value is used as given,
several are a sweep whose winner (lowest validation loss) the final cells use. Methods come from
``experiments/methods.yaml``; a grid may add its own under ``method_definitions``. The format is documented in
``experiments/README.md``.

Fairness is enforced here, not left to the grid author: a method may only set its own keys (never a key the scale
fixes for all cells, nor one the harness sets per cell), so data, prompts, masking, steps and schedule are the same
for every method of a grid.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import os
from dataclasses import dataclass, field


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
METHODS_FILE = os.path.join(EXPERIMENTS, "methods.yaml")

GRID_KEYS = {"title", "description", "recipe", "evaluator", "reference", "methods", "method_definitions", "paper",
             "scales", "analysis"}
SCALE_KEYS = {"about", "methods", "ranks", "targets", "seeds", "train", "eval", "data", "lr", "sweep", "launch"}
SWEEP_KEYS = {"seed", "train"}
# What a sweep cell may do differently from a final cell: its own validation split and evaluation schedule, and (for
# scales where a full-length sweep is unaffordable, stated in the report) a shorter run.
SWEEP_TRAIN_KEYS = {"val_split_seed", "eval_steps", "eval_on_start", "max_steps", "num_train_epochs", "save_steps"}
METHOD_KEYS = {"label", "budget", "train", "about"}
DATA_KEYS = {"train_files", "transform"}
ANALYSIS_KEYS = {"methods", "full_ft"}
LAUNCH_KEYS = {"num_processes", "config_file", "effective_batch_size"}
# Budget rules the runner checks against the model's shapes before training and against the run after it.
BUDGETS = {
    "matched": "r·(in+out) per adapted layer (LoRA's count at rank r)",
    "matched+magnitude": "r·(in+out) + out per adapted layer (LoRA's count plus DoRA's magnitude vector)",
    "r_squared": "r² per adapted layer (HiRA-SB's own budget)",
    "full": "every weight of the model",
    "free": "whatever the method's config gives (printed, not matched)",
}
# Recipe flags the harness sets per cell: a grid may not set them in a scale's `train` or a method's `train`.
HARNESS_TRAIN_KEYS = {"learning_rate", "seed", "output_dir", "hira_r", "hira_target_modules", "resume_from_checkpoint",
                      "dataset_name"}
HARNESS_EVAL_KEYS = {"ckpt", "out", "overwrite"}
TRANSFORMS = ("gsm8k_to_metamath",)


class GridError(ValueError):
    """A grid file that cannot be run as written (one line, names the file and the key)."""


# ----------------------------------------------------------------------------------------------------------------------
# Rank expressions: "{r}", "{2*r}", "{r//2}" in method specs
# ----------------------------------------------------------------------------------------------------------------------

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.FloorDiv: lambda a, b: a // b}


def _eval_rank_expr(expr: str, r: int, where: str) -> int:
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Name) and node.id == "r":
            return r
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise GridError(f"{where}: {{{expr}}} is not an integer expression in r (+, -, *, // and integers only)")

    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise GridError(f"{where}: {{{expr}}} is not an integer expression in r") from None
    value = ev(tree)
    if value <= 0:
        raise GridError(f"{where}: {{{expr}}} gives {value} at r={r}; it must be positive")
    return value


def substitute_rank(value, r: int, where: str):
    """Replace every string ``"{expr}"`` in ``value`` (nested dicts/lists) by the integer ``expr`` gives at rank r."""
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return _eval_rank_expr(value[1:-1], r, where)
    if isinstance(value, dict):
        return {k: substitute_rank(v, r, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_rank(v, r, where) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------------------------
# Loading and checking
# ----------------------------------------------------------------------------------------------------------------------


def _read_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise GridError(f"{path}: no such grid file")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise GridError(f"{path}: a grid file is a mapping at the top level")
    return data


def _check_keys(d, allowed: set, where: str):
    if not isinstance(d, dict):
        raise GridError(f"{where} must be a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise GridError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _positive_float(x, where) -> float:
    try:
        v = float(x)  # YAML reads 1e-3 (no dot) as a string
    except (TypeError, ValueError):
        raise GridError(f"{where}: {x!r} is not a number") from None
    if not v > 0:
        raise GridError(f"{where}: a learning rate must be positive, got {x!r}")
    return v


def _lr_spec(v, where: str, method: str) -> dict:
    """``3e-4`` (fixed), ``[1e-4, 3e-4, 1e-3]`` (a sweep), or ``{from: <grid>, method: <name>}``: the learning rate
    another grid's sweep chose for that method (default: the same method)."""
    if isinstance(v, dict):
        _check_keys(v, {"from", "method"}, where)
        if "from" not in v or not isinstance(v["from"], str):
            raise GridError(f"{where}: a borrowed learning rate needs `from: <grid name>`")
        return {"from": v["from"], "method": v.get("method", method)}
    values = [_positive_float(x, where) for x in (v if isinstance(v, list) else [v])]
    if not values or len(set(values)) != len(values):
        raise GridError(f"{where}: give one learning rate or a list of distinct ones, got {v!r}")
    return {"candidates": values}


def _int_list(x, where, positive=True) -> list[int]:
    if not isinstance(x, list) or not x or not all(isinstance(v, int) and not isinstance(v, bool) for v in x):
        raise GridError(f"{where} must be a non-empty list of integers, got {x!r}")
    if positive and any(v <= 0 for v in x):
        raise GridError(f"{where} must be positive, got {x!r}")
    if len(set(x)) != len(x):
        raise GridError(f"{where} has duplicates: {x!r}")
    return x


def load_methods(extra: dict | None, where: str) -> dict:
    """The method library (experiments/methods.yaml) plus a grid's own ``method_definitions``."""
    library = _read_yaml(METHODS_FILE)
    if extra:
        _check_keys(extra, set(extra), where)
        clash = sorted(set(extra) & set(library))
        if clash:
            raise GridError(f"{where}: {clash} already defined in experiments/methods.yaml; pick another name")
        library = {**library, **extra}
    for name, spec in library.items():
        w = f"method {name!r}"
        _check_keys(spec, METHOD_KEYS, w)
        if "train" not in spec or "method" not in (spec["train"] or {}):
            raise GridError(f"{w}: needs train.method (hira, lora, dora, full, peft, ...)")
        if spec.get("budget", "free") not in BUDGETS:
            raise GridError(f"{w}: budget must be one of {sorted(BUDGETS)}, got {spec.get('budget')!r}")
        harness = sorted(set(spec["train"]) & HARNESS_TRAIN_KEYS)
        if harness:
            raise GridError(f"{w}: train sets {harness}, which the harness sets per cell (learning rates go in the "
                            "scale's `lr`)")
    return library


@dataclass
class Scale:
    name: str
    about: str
    methods: list[str]  # the grid's methods, or the subset this scale runs
    ranks: list[int]
    targets: dict[str, list[str]]
    seeds: list[int]
    train: dict
    eval: dict
    data: dict | None
    lr: dict[str, dict]  # method -> {"candidates": [...]} or {"from": grid, "method": name}
    sweep: dict
    launch: dict


@dataclass
class Grid:
    name: str
    path: str
    title: str
    description: str
    recipe: str
    evaluator: str | None
    reference: str
    methods: list[str]
    method_specs: dict
    paper: dict
    scales: dict[str, Scale]
    analysis: dict | None

    def scale(self, name: str) -> Scale:
        if name not in self.scales:
            raise GridError(f"{self.path}: no scale {name!r}; it has {sorted(self.scales)}")
        return self.scales[name]

    def label(self, method: str) -> str:
        return self.method_specs[method].get("label", method)


def load_grid(path: str) -> Grid:
    """Read and check a grid file; every problem is a one-line :class:`GridError` naming the file and the key."""
    raw = _read_yaml(path)
    name = os.path.splitext(os.path.basename(path))[0]
    _check_keys(raw, GRID_KEYS, path)
    for key in ("recipe", "methods", "scales"):
        if key not in raw:
            raise GridError(f"{path}: missing key {key!r}")
    recipe = raw["recipe"]
    if not os.path.isfile(os.path.join(ROOT, "recipes", f"{recipe}.py")):
        raise GridError(f"{path}: recipe {recipe!r} is not a script in recipes/")
    evaluator = raw.get("evaluator")
    if evaluator is not None and not os.path.isfile(os.path.join(ROOT, "eval", f"{evaluator}.py")):
        raise GridError(f"{path}: evaluator {evaluator!r} is not a script in eval/")
    specs = load_methods(raw.get("method_definitions"), f"{path}: method_definitions")
    methods = raw["methods"]
    if not isinstance(methods, list) or not methods or len(set(methods)) != len(methods):
        raise GridError(f"{path}: methods must be a non-empty list of distinct names")
    unknown = [m for m in methods if m not in specs]
    if unknown:
        raise GridError(f"{path}: unknown method(s) {unknown}; known: {sorted(specs)}")
    reference = raw.get("reference", methods[0])
    if reference not in methods:
        raise GridError(f"{path}: reference {reference!r} is not one of the grid's methods {methods}")
    if not isinstance(raw["scales"], dict) or not raw["scales"]:
        raise GridError(f"{path}: scales must map a scale name (cpu, paper) to its settings")
    scales = {s: _load_scale(path, s, v, methods, specs, evaluator) for s, v in raw["scales"].items()}
    for sc in scales.values():
        if reference not in sc.methods:
            raise GridError(f"{path}: scales.{sc.name}.methods leaves out the reference method {reference!r}")
    analysis = raw.get("analysis")
    if analysis is not None:
        _check_keys(analysis, ANALYSIS_KEYS, f"{path}: analysis")
        for sc in scales.values():
            bad = [m for m in analysis.get("methods", []) + [analysis.get("full_ft")] if m and m not in sc.methods]
            if bad:
                raise GridError(f"{path}: analysis names method(s) {bad} that scale {sc.name} does not run")
    return Grid(name=name, path=path, title=str(raw.get("title", name)),
                description=str(raw.get("description", "")).strip(), recipe=recipe,
                evaluator=evaluator, reference=reference, methods=methods, method_specs=specs,
                paper=raw.get("paper") or {}, scales=scales, analysis=analysis)


def _load_scale(path, name, s, grid_methods, specs, evaluator) -> Scale:
    where = f"{path}: scales.{name}"
    _check_keys(s, SCALE_KEYS, where)
    methods = s.get("methods", grid_methods)
    if not isinstance(methods, list) or not methods or len(set(methods)) != len(methods) or \
            any(m not in grid_methods for m in methods):
        raise GridError(f"{where}.methods must be distinct methods of the grid {grid_methods}, got {methods!r}")
    methods = [m for m in grid_methods if m in methods]  # the grid's order
    for key in ("ranks", "seeds", "train", "lr"):
        if key not in s:
            raise GridError(f"{where}: missing key {key!r}")
    ranks = _int_list(s["ranks"], f"{where}.ranks")
    seeds = _int_list(s["seeds"], f"{where}.seeds", positive=False)
    targets = s.get("targets") or {}
    _check_keys(targets, set(targets), f"{where}.targets")
    for t, mods in targets.items():
        if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
            raise GridError(f"{where}.targets.{t} must be a non-empty list of module names")
    if not targets:
        targets = {"default": None}
    train = s["train"] or {}
    _check_keys(train, set(train), f"{where}.train")
    harness = sorted(set(train) & HARNESS_TRAIN_KEYS)
    if harness and not (harness == ["dataset_name"] and not s.get("data")):
        raise GridError(f"{where}.train sets {harness}, which the harness sets per cell")
    if "dataset_name" in train and s.get("data"):
        raise GridError(f"{where}: give the training data either as train.dataset_name or as data.train_files")
    if "dataset_name" not in train and not s.get("data"):
        raise GridError(f"{where}: no training data (train.dataset_name or data.train_files)")
    for key, v in train.items():
        if v is None:
            raise GridError(f"{where}.train.{key} is empty; remove it to keep the recipe's default")
    for m in methods:
        overlap = sorted(set(specs[m]["train"]) & set(train))
        if overlap:
            raise GridError(f"{where}.train fixes {overlap} for all methods, but method {m!r} sets them too: a method "
                            "may not change a setting the grid shares")
    data = s.get("data")
    if data is not None:
        _check_keys(data, DATA_KEYS, f"{where}.data")
        files = data.get("train_files")
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise GridError(f"{where}.data.train_files must be a non-empty list of files")
        if data.get("transform") is not None and data["transform"] not in TRANSFORMS:
            raise GridError(f"{where}.data.transform must be one of {TRANSFORMS}, got {data['transform']!r}")
    ev = s.get("eval") or {}
    _check_keys(ev, set(ev), f"{where}.eval")
    if evaluator is None and ev:
        raise GridError(f"{where}.eval is set but the grid names no evaluator")
    bad = sorted(set(ev) & HARNESS_EVAL_KEYS)
    if bad:
        raise GridError(f"{where}.eval sets {bad}, which the harness sets per cell")
    sweep = s.get("sweep") or {}
    _check_keys(sweep, SWEEP_KEYS, f"{where}.sweep")
    lr = s["lr"]
    _check_keys(lr, set(methods), f"{where}.lr")
    missing = [m for m in methods if m not in lr]
    if missing:
        raise GridError(f"{where}.lr: no learning rate for method(s) {missing}")
    lr = {m: _lr_spec(v, f"{where}.lr.{m}", m) for m, v in lr.items()}
    if any(len(v.get("candidates", [])) > 1 for v in lr.values()) and "seed" not in sweep:
        raise GridError(f"{where}: some methods have several learning rates (a sweep) but sweep.seed is not set")
    if "seed" in sweep and sweep["seed"] in seeds:
        raise GridError(f"{where}: sweep.seed {sweep['seed']} is also a final seed; the sweep's winner would be "
                        "reported on the run it was selected on")
    _check_keys(sweep.get("train") or {}, SWEEP_TRAIN_KEYS, f"{where}.sweep.train")
    launch = s.get("launch") or {}
    _check_keys(launch, LAUNCH_KEYS, f"{where}.launch")
    if "effective_batch_size" in launch and "gradient_accumulation_steps" in train:
        raise GridError(f"{where}: launch.effective_batch_size sets gradient_accumulation_steps; do not set both")
    return Scale(name=name, about=str(s.get("about", "")).strip(), methods=methods, ranks=ranks, targets=targets, seeds=seeds,
                 train=train, eval=ev, data=data, lr=lr, sweep=sweep, launch=launch)


# ----------------------------------------------------------------------------------------------------------------------
# Cells
# ----------------------------------------------------------------------------------------------------------------------


def format_lr(lr: float) -> str:
    """2e-3 -> '2e-3', 1.5e-4 -> '1.5e-4' (short, exact and file-name safe)."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


@dataclass
class Cell:
    grid: str
    scale: str
    stage: str  # base | sweep | final
    method: str | None = None
    rank: int | None = None
    targets: str | None = None
    lr: float | None = None
    seed: int | None = None
    train_flags: dict = field(default_factory=dict)  # recipe flags (before the per-run output_dir)
    eval_flags: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.stage == "base":
            return f"{self.scale}-base"
        parts = [self.scale] + (["sweep"] if self.stage == "sweep" else [])
        parts += [self.method, f"r{self.rank}"]
        if self.targets != "default":
            parts.append(self.targets)
        parts += [f"lr{format_lr(self.lr)}", f"s{self.seed}"]
        return "-".join(parts)

    def config(self) -> dict:
        """What defines the cell's result; a finished result made from another config is never mixed in. The grid's
        name is not part of it: an identical cell of another grid is the same experiment (and is reused)."""
        return {"scale": self.scale, "stage": self.stage, "method": self.method, "rank": self.rank,
                "targets": self.targets, "learning_rate": self.lr, "seed": self.seed,
                "train_flags": self.train_flags, "eval_flags": self.eval_flags}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode()).hexdigest()[:16]


def method_train_flags(grid: Grid, method: str, rank: int) -> dict:
    spec = grid.method_specs[method]
    return substitute_rank(copy.deepcopy(spec["train"]), rank, f"method {method!r} at r={rank}")


def train_flags(grid: Grid, scale: Scale, method: str, rank: int, targets: str, lr: float, seed: int,
                stage: str, dataset: str) -> dict:
    flags = dict(scale.train)
    flags.update(method_train_flags(grid, method, rank))
    if stage == "sweep":
        flags.update(scale.sweep.get("train") or {})
    flags["dataset_name"] = dataset
    flags["hira_r"] = rank
    if scale.targets[targets] is not None:
        flags["hira_target_modules"] = list(scale.targets[targets])
    flags["learning_rate"] = lr
    flags["seed"] = seed
    return flags


def base_cell(grid: Grid, scale: Scale) -> Cell | None:
    """The untuned model on the same test items: the floor every method must clear (eval only, no training)."""
    if grid.evaluator is None:
        return None
    model = scale.train.get("model_name_or_path")
    if model is None:
        raise GridError(f"{grid.path}: scales.{scale.name}.train must name model_name_or_path")
    flags = {**scale.eval, "ckpt": model}
    return Cell(grid.name, scale.name, "base", eval_flags=flags)


def sweep_cells(grid: Grid, scale: Scale, dataset: str) -> list[Cell]:
    """One cell per (method, rank, placement, candidate lr) for methods with several candidates; no evaluation."""
    cells = []
    for method in scale.methods:
        lrs = scale.lr[method].get("candidates", [])
        if len(lrs) < 2:
            continue
        for rank in scale.ranks:
            for targets in scale.targets:
                for lr in lrs:
                    seed = scale.sweep["seed"]
                    cells.append(Cell(grid.name, scale.name, "sweep", method, rank, targets, lr, seed,
                                      train_flags(grid, scale, method, rank, targets, lr, seed, "sweep", dataset)))
    return cells


def final_cells(grid: Grid, scale: Scale, dataset: str, chosen_lr: dict) -> list[Cell]:
    """Seed-major order (every method's first seed before any second seed), so a partial grid stays balanced.
    ``chosen_lr[(method, rank, targets)]`` is the learning rate to use."""
    cells = []
    for seed in scale.seeds:
        for rank in scale.ranks:
            for targets in scale.targets:
                for method in scale.methods:
                    lr = chosen_lr[(method, rank, targets)]
                    cells.append(Cell(grid.name, scale.name, "final", method, rank, targets, lr, seed,
                                      train_flags(grid, scale, method, rank, targets, lr, seed, "final", dataset),
                                      dict(scale.eval)))
    return cells


def fixed_lrs(grid: Grid, scale: Scale) -> dict:
    """Learning rates that need no sweep (one candidate)."""
    return {(m, r, t): scale.lr[m]["candidates"][0] for m in scale.methods
            if len(scale.lr[m].get("candidates", [])) == 1 for r in scale.ranks for t in scale.targets}


# ----------------------------------------------------------------------------------------------------------------------
# Where things live
# ----------------------------------------------------------------------------------------------------------------------


def results_dir(results_root: str, grid: str) -> str:
    return os.path.join(results_root, grid)


def result_path(results_root: str, cell: Cell) -> str:
    return os.path.join(results_dir(results_root, cell.grid), f"{cell.name}.json")


def read_results(results_root: str, grid: str, scale: str) -> list[dict]:
    """Every finished cell result of ``grid`` at ``scale`` (sorted by cell name)."""
    d = results_dir(results_root, grid)
    if not os.path.isdir(d):
        return []
    out = []
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".json") and fn.startswith(scale + "-"):
            with open(os.path.join(d, fn)) as f:
                out.append(json.load(f))
    return out


def select_lr(sweep_results: list[dict]) -> tuple[dict, dict]:
    """The learning rate with the lowest final validation loss per (method, rank, targets), and the table behind it.

    A run whose loss is not finite (diverged) cannot win. Returns ``(chosen, table)`` with
    ``table[(method, rank, targets)] = [(lr, loss), ...]`` sorted by lr.
    """
    import math

    table: dict = {}
    for r in sweep_results:
        key = (r["method"], r["rank"], r["targets"])
        table.setdefault(key, []).append((r["learning_rate"], r["held_out"]["final_eval_loss"]))
    chosen = {}
    for key, rows in table.items():
        rows.sort()
        finite = [(loss, lr) for lr, loss in rows if loss is not None and math.isfinite(loss)]
        if finite:
            chosen[key] = min(finite)[1]
    return chosen, table


def borrowed_lrs(grid: Grid, scale: Scale, results_root: str) -> dict:
    """Learning rates a grid takes from another grid's sweep (``lr: {method: {from: <grid>}}``), keyed like
    :func:`fixed_lrs`. The other grid's sweep must be finished; its chosen value is used for every rank and placement
    of this grid (the report says so)."""
    out = {}
    for m in scale.methods:
        spec = scale.lr[m]
        if "from" not in spec:
            continue
        where = f"{grid.path}: scales.{scale.name}.lr.{m}"
        src = load_grid(os.path.join(os.path.dirname(os.path.abspath(grid.path)), spec["from"] + ".yaml"))
        src_scale = src.scale(scale.name)
        sm = spec["method"]
        if sm not in src_scale.methods:
            raise GridError(f"{where}: grid {src.name} has no method {sm!r}")
        sspec = src_scale.lr[sm]
        if "from" in sspec:
            raise GridError(f"{where}: {src.name} borrows {sm}'s learning rate itself; borrow from {sspec['from']}")
        if len(src_scale.ranks) * len(src_scale.targets) != 1:
            raise GridError(f"{where}: {src.name} sweeps several ranks or placements; its choice is ambiguous")
        if len(sspec["candidates"]) == 1:
            lr = sspec["candidates"][0]
        else:
            done = [r for r in read_results(results_root, src.name, scale.name)
                    if r["stage"] == "sweep" and r["method"] == sm]
            if len(done) < len(sspec["candidates"]):
                raise GridError(f"{where}: {src.name}'s learning-rate sweep for {sm} is not finished ({len(done)} of "
                                f"{len(sspec['candidates'])} cells); run experiments/{src.name}.yaml first")
            chosen, _ = select_lr(done)
            if not chosen:
                raise GridError(f"{where}: every learning rate of {src.name}'s sweep for {sm} diverged")
            (lr,) = chosen.values()
        out.update({(m, r, t): lr for r in scale.ranks for t in scale.targets})
    return out
