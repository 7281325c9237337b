"""Shared machinery of the training recipes in ``recipes/``.

A recipe is a short script: one formatting function (raw record -> ``{"prompt", "completion"}`` built with
:mod:`hira.prompts`) and a YAML holding the paper's setting; its task is its file name, so a copy names its own.
Everything the recipes have in common lives here:

* :class:`HiraArguments`: the method (``hira`` by default, the HiRA family variants, the paper's baselines ``lora``,
  ``dora``, ``prompt_tuning``, ``p_tuning``, ``full``, and ``peft``: any PEFT method given by its config) and the data
  options;
* :func:`parse_args`: ``TrlParser`` over TRL's ``ScriptArguments``, ``SFTConfig``, ``ModelConfig`` and
  :class:`HiraArguments` with the YAML beside the script as default, strict (no abbreviations, TRL's own LoRA flags
  refused with the right one, ``lora_alpha`` = 2r unless set);
* :func:`build_peft_config`: the PEFT config for the method, at HiRA's parameter budget where the paper matches it;
* :func:`hira.sources.load_raw_dataset` / :func:`format_dataset` / :func:`split_validation` / :func:`enforce_max_length`: data from a
  Hub id, a URL or a local file/folder (:mod:`hira.sources`), a clear error for missing columns, the seeded
  120-example validation split of the HiRA authors, and an explicit, counted decision for examples that would not fit
  ``max_length``;
* :class:`RunSummaryCallback`: trainable parameters, tokens/s, peak memory and wall time written next to the checkpoint;
* :func:`run_recipe`: the body every recipe's ``main`` calls.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from transformers import TrainerCallback

from hira import _zero3

from hira.sources import load_model_config, load_raw_dataset


logger = logging.getLogger("hira.recipe")

METHODS = ("hira", "lora", "dora", "prompt_tuning", "p_tuning", "full", "peft")
# The paper adapts q, k, v, up and down projections (no o_proj, no gate_proj): protocols.md §A.3.
PAPER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
# Learning rates the references use per method (logged as a hint when the YAML's lr is kept for another method).
SUGGESTED_LR = {"hira": 1e-3, "lora": 3e-4, "dora": 1e-4, "prompt_tuning": 3e-2, "p_tuning": 1e-3, "full": 2e-5}


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class HiraArguments:
    """Method and data options shared by every recipe (the ``hira_`` prefix keeps them apart from TRL's fields).

    ``hira_r`` and ``hira_target_modules`` are the rank and targets of *every* low-rank method (hira, lora, dora), so a
    method switch keeps the parameter budget: LoRA at rank r has exactly HiRA's r·(in+out) per adapted layer; DoRA adds
    one magnitude vector per layer. ``ModelConfig``'s ``lora_alpha``, ``lora_dropout`` and ``use_rslora`` configure the
    LoRA/DoRA baselines; its ``use_peft``, ``lora_r``, ``lora_target_modules`` and ``use_dora`` are not used.
    """

    method: str = field(
        default="hira",
        metadata={"help": f"Fine-tuning method, one of {METHODS}. HiRA family variants: `hira` + `hira_variant`."},
    )
    hira_r: int = field(default=32, metadata={"help": "Rank of the HiRA (and LoRA/DoRA baseline) factors."})
    hira_target_modules: list[str] = field(
        default_factory=lambda: list(PAPER_TARGET_MODULES),
        metadata={"help": "Module names to adapt (suffix match), e.g. q_proj k_proj v_proj up_proj down_proj."},
    )
    hira_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input (HiRA and LoRA/DoRA)."})
    hira_variant: str | None = field(
        default=None,
        metadata={"help": "HiRA family variant (e.g. hilora, bhra, sb), passed to `hira.HiraConfig(variant=...)`."},
    )
    hira_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "Extra `HiraConfig` fields as a JSON object (YAML: a mapping), e.g. '{\"modulator\": \"random\"}'. "
            "Passed through unchanged, so a new variant option needs no recipe change."
        },
    )
    peft_config: str | None = field(
        default=None,
        metadata={
            "help": "method=peft: any PEFT config as a JSON object (YAML: a mapping) with `peft_type` and its fields, "
            "e.g. '{\"peft_type\": \"LOHA\", \"r\": 16, \"alpha\": 32}'. `target_modules` defaults to "
            "hira_target_modules where the config has that field."
        },
    )
    num_virtual_tokens: int = field(
        default=20, metadata={"help": "Virtual tokens for prompt_tuning / p_tuning (not budget-matched; see docs)."}
    )
    encoder_hidden_size: int | None = field(
        default=None, metadata={"help": "Hidden size of p_tuning's prompt encoder MLP (default: the model's)."}
    )
    train_on_inputs: bool = field(
        default=False,
        metadata={"help": "Also compute the loss on the prompt (LLM-Adapters default). False = response-only loss."},
    )
    val_size: int = field(
        default=120, metadata={"help": "Validation examples carved from the training data (0 = no validation)."}
    )
    val_split_seed: int = field(
        default=58,
        metadata={"help": "Seed of the validation split (58 reproduces the HiRA authors' commonsense_170k split)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training examples after the split (smoke runs)."}
    )
    overlength: str = field(
        default="drop",
        metadata={
            "help": "What to do with examples longer than `max_length` (never truncated silently): "
            "`drop` (counted and logged) or `error`."
        },
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; expected one of {METHODS}")
        if self.overlength not in ("drop", "error"):
            raise ValueError(f"overlength must be 'drop' or 'error', got {self.overlength!r}")
        if self.hira_r <= 0:
            raise ValueError(f"hira_r must be positive, got {self.hira_r}")
        if self.val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {self.val_size}")
        if isinstance(self.hira_kwargs, str):
            try:
                parsed = json.loads(self.hira_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(f"hira_kwargs must be a JSON object, got {self.hira_kwargs!r}: {err}") from None
            self.hira_kwargs = parsed
        if self.hira_kwargs is not None and not isinstance(self.hira_kwargs, dict):
            raise ValueError(f"hira_kwargs must be a mapping, got {type(self.hira_kwargs).__name__}")
        if self.hira_variant is not None and self.method != "hira":
            raise ValueError(f"hira_variant={self.hira_variant!r} needs method=hira (got method={self.method!r})")
        if isinstance(self.peft_config, str):
            try:
                self.peft_config = json.loads(self.peft_config)
            except json.JSONDecodeError as err:
                raise ValueError(f"peft_config must be a JSON object, got {self.peft_config!r}: {err}") from None
        if (self.method == "peft") != (self.peft_config is not None):
            raise ValueError("peft_config is needed by method=peft and only by it")
        if self.peft_config is not None and not (isinstance(self.peft_config, dict) and "peft_type" in self.peft_config):
            raise ValueError(f"peft_config must be a mapping with a `peft_type`, got {self.peft_config!r}")


# TRL's own LoRA flags (ModelConfig) that the recipes do not read: refused with the flag that does the job.
REFUSED_TRL_FLAGS = {
    "lora_r": "--hira_r (the rank of hira, lora and dora alike)",
    "lora_target_modules": "--hira_target_modules (the targets of hira, lora and dora alike)",
    "use_dora": "--method dora",
    "use_peft": "--method (hira, lora, dora, prompt_tuning, p_tuning, or peft with --peft_config; --method full trains without PEFT)",
}


def make_parser():
    """``TrlParser`` over TRL's dataclasses and :class:`HiraArguments`, with argparse's prefix matching off (so a
    misspelt ``--learning_rat`` is an error, not ``--learning_rate``)."""
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, HiraArguments), allow_abbrev=False)


def parse_args(script_path: str, argv: list[str] | None = None):
    """``(script_args, training_args, model_args, hira_args)`` for the recipe at ``script_path``.

    * ``--config PATH`` or ``--config=PATH``; without one, the YAML beside the script (``recipes/<task>.yaml``), so
      ``accelerate launch recipes/commonsense.py`` runs the paper setting. CLI flags override YAML keys; a key or flag
      no dataclass knows is an error, and so is an abbreviated flag.
    * TRL's ``lora_r``, ``lora_target_modules``, ``use_dora`` and ``use_peft`` (YAML or CLI) are refused with the flag
      to use instead: the recipes' rank, targets and method are ``hira_r``, ``hira_target_modules`` and ``method``.
    * ``lora_alpha`` (LoRA/DoRA baselines) is 2 x ``hira_r`` (LLM-Adapters' rule) unless the YAML or CLI sets it.
    """
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [x for a in argv for x in (a.split("=", 1) if a.startswith("--config=") else [a])]
    if argv.count("--config") > 1:
        raise ValueError("--config is given more than once: pass one YAML (other keys can be flags).")
    if "--config" not in argv:
        argv = ["--config", os.path.splitext(os.path.abspath(script_path))[0] + ".yaml"] + argv
    i = argv.index("--config")
    if i + 1 >= len(argv) or not os.path.isfile(argv[i + 1]):
        path = argv[i + 1] if i + 1 < len(argv) else ""
        raise FileNotFoundError(f"--config {path!r}: no such YAML file. Pass the path of a recipe YAML.")
    with open(argv[i + 1]) as f:
        config = yaml.safe_load(f) or {}
    yaml_keys = set(config) if isinstance(config, dict) else set()
    cli_keys = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    given = yaml_keys | cli_keys
    refused = [k for k in REFUSED_TRL_FLAGS if k in given]
    if refused:
        raise ValueError(
            "; ".join(f"{k} is TRL's LoRA option, which this recipe does not read: use {REFUSED_TRL_FLAGS[k]}"
                      for k in refused)
        )
    # `env:` is TRL's own YAML block (environment variables it sets and removes before building the dataclasses)
    _check_known_keys(yaml_keys - {"env"}, cli_keys - {"config"}, argv[i + 1])
    script_args, training_args, model_args, hira_args = make_parser().parse_args_and_config(argv)
    if "lora_alpha" not in given:
        model_args.lora_alpha = 2 * hira_args.hira_r
    return script_args, training_args, model_args, hira_args


def _check_known_keys(yaml_keys: set[str], cli_keys: set[str], yaml_path: str) -> None:
    """Every YAML key and flag must be a field of the recipe's dataclasses (an exact name: no abbreviations), checked
    before any dataclass is built so that the typo, not a side effect of it, is what the user reads."""
    import difflib

    from trl import ModelConfig, ScriptArguments, SFTConfig

    known = set()
    for dc in (ScriptArguments, SFTConfig, ModelConfig, HiraArguments):
        for f in fields(dc):
            known.add(f.name)
            if f.default is True:
                known.add("no_" + f.name)  # HfArgumentParser's negated flag of a boolean that defaults to True
    problems = []
    for where, keys in ((f"key in {yaml_path}", yaml_keys), ("flag", cli_keys)):
        for k in sorted(keys - known):
            close = difflib.get_close_matches(k, known, n=1)
            hint = f" (did you mean {'--' if where == 'flag' else ''}{close[0]}?)" if close else ""
            problems.append(f"unknown {where} {'--' if where == 'flag' else ''}{k}{hint}")
    if problems:
        raise ValueError("; ".join(problems) + ". Names must be exact (no abbreviations); `--help` lists them.")


def resolve_resume(value: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint to resume from, checked before anything loads.

    ``TrainingArguments.resume_from_checkpoint`` is typed ``str``, so ``--resume_from_checkpoint true`` arrives as the
    path "true": ``last``/``true`` mean the newest ``checkpoint-*`` in ``output_dir``; anything else must be a
    checkpoint folder the Trainer wrote (``trainer_state.json`` inside).
    """
    from transformers.trainer_utils import get_last_checkpoint

    if value is None or value is False or str(value).lower() in ("false", "none", "0", "no", ""):
        return None
    if value is True or str(value).lower() in ("true", "last", "latest", "1", "yes"):
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint={value}: {output_dir} holds no checkpoint-* folder. Point --output_dir at "
                "the run to resume, or drop --resume_from_checkpoint to start a new run."
            )
        return last
    if not os.path.isfile(os.path.join(value, "trainer_state.json")):
        what = "is not a folder" if not os.path.isdir(value) else "holds no trainer_state.json"
        raise FileNotFoundError(
            f"resume_from_checkpoint={value!r} {what}: pass a checkpoint-* folder the Trainer wrote, or `last` for "
            "the newest one in --output_dir."
        )
    return value


def check_report_to(report_to: list[str] | str | None) -> None:
    """A logging integration that is not installed fails in the Trainer, after the model has loaded: check first."""
    import importlib.util

    packages = {"wandb", "trackio", "tensorboard", "mlflow", "comet_ml", "clearml", "swanlab"}  # = report_to names
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in packages and importlib.util.find_spec(name) is None:
            extra = f" (or `pip install -e \".[{name}]\"`)" if name in ("wandb", "trackio") else ""
            raise ModuleNotFoundError(
                f"report_to={name} needs the {name} package, which is not installed: `pip install {name}`{extra}, or "
                "pass --report_to none."
            )


# ----------------------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------------------


def _peft_config_class(peft_type: str):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(str(peft_type).upper())
    if cls is None:
        raise ValueError(f"Unknown peft_type {peft_type!r}; PEFT knows {sorted(PEFT_TYPE_TO_CONFIG_MAPPING)}")
    return cls


def method_targets(hira_args: HiraArguments) -> list[str] | str | None:
    """The modules the method adapts, or ``None`` for a method that targets no modules (prompts, full FT)."""
    if hira_args.method in ("hira", "lora", "dora"):
        return hira_args.hira_target_modules
    if hira_args.method == "peft":
        cls = _peft_config_class(hira_args.peft_config["peft_type"])
        if "target_modules" in {f.name for f in fields(cls)}:
            return hira_args.peft_config.get("target_modules", hira_args.hira_target_modules)
    return None


def build_peft_config(hira_args: HiraArguments, model_args: Any = None, hidden_size: int | None = None):
    """The PEFT config for ``hira_args.method`` (``None`` for full fine-tuning)."""
    method = hira_args.method
    targets = method_targets(hira_args)
    if method == "peft":
        cls = _peft_config_class(hira_args.peft_config["peft_type"])
        kwargs = {k: v for k, v in hira_args.peft_config.items() if k != "peft_type"}
        kwargs.setdefault("task_type", "CAUSAL_LM")
        if targets is not None:
            kwargs["target_modules"] = targets
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"{cls.__name__} has no field(s) {unknown} (from peft_config). Known fields: {sorted(known)}"
            )
        return cls(**kwargs)
    if method == "hira":
        import hira

        cls = hira.HiraConfig
        kwargs = dict(r=hira_args.hira_r, target_modules=targets, hira_dropout=hira_args.hira_dropout)
        if hira_args.hira_variant is not None:
            kwargs["variant"] = hira_args.hira_variant
        kwargs.update(hira_args.hira_kwargs or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"{cls.__module__}.{cls.__name__} has no field(s) {unknown} (from hira_variant/hira_kwargs). "
                f"Known fields: {sorted(known)}"
            )
        return cls(task_type="CAUSAL_LM", **kwargs)
    if method in ("lora", "dora"):
        from peft import LoraConfig

        return LoraConfig(
            task_type="CAUSAL_LM",
            r=hira_args.hira_r,
            target_modules=targets,
            lora_alpha=getattr(model_args, "lora_alpha", 2 * hira_args.hira_r),
            lora_dropout=getattr(model_args, "lora_dropout", hira_args.hira_dropout),
            use_rslora=getattr(model_args, "use_rslora", False),
            use_dora=method == "dora",
        )
    if method == "prompt_tuning":
        from peft import PromptTuningConfig

        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=hira_args.num_virtual_tokens)
    if method == "p_tuning":
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=hira_args.num_virtual_tokens,
            encoder_hidden_size=hira_args.encoder_hidden_size or hidden_size,
        )
    return None  # full fine-tuning


def model_module_names(config, trust_remote_code: bool = False) -> dict[str, str]:
    """Module name -> class name of the model described by ``config``, built on the meta device (no weights read)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {name: type(mod).__name__ for name, mod in model.named_modules()}


def matches_target(name: str, targets: list[str]) -> bool:
    """PEFT's rule for a list of target modules: the exact name or a ``.<target>`` suffix."""
    return any(name == t or name.endswith("." + t) for t in targets)


def missing_targets(targets: list[str], module_names) -> list[str]:
    """Targets no module name matches under :func:`matches_target`."""
    names = list(module_names)
    return [t for t in targets if not any(matches_target(n, [t]) for n in names)]


def check_target_modules(targets: list[str] | str, modules: dict[str, str], model_name: str) -> None:
    """Raise a clear error when a requested target module does not exist in the model (PEFT only errors when *none*
    matches, so a typo next to valid names would silently adapt fewer layers)."""
    if isinstance(targets, str):  # a regex or "all-linear": PEFT validates it
        return
    missing = missing_targets(targets, modules)
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, c in modules.items() if c in ("Linear", "Conv1D", "Embedding")})
        raise ValueError(
            f"Target module(s) {missing} not found in {model_name}. Its linear/embedding module names are: {leaves}. "
            "Set --hira_target_modules to names the model has."
        )


def check_parallelism_enabled(trainer) -> None:
    """An accelerate config asking for FSDP or DeepSpeed must get it: accelerate turns FSDP off on a CPU-only machine
    (MULTI_CPU) and trains with DDP instead, every process holding the whole model, without a word."""
    for var, name, enabled in (("ACCELERATE_USE_FSDP", "FSDP", trainer.is_fsdp_enabled),
                               ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", trainer.is_deepspeed_enabled)):
        if os.environ.get(var, "false").lower() == "true" and not enabled:
            raise RuntimeError(
                f"The accelerate config asks for {name}, but accelerate did not enable it (it does not on a CPU-only "
                f"machine, where it would train with plain DDP). Launch on GPUs, or drop the {name} config "
                "(accelerate_configs/multi_gpu.yaml is DDP)."
            )


def check_adapted_modules(model, targets: list[str] | str, model_name: str) -> None:
    """After PEFT wrapped the model: every requested target must have at least one adapted module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(targets, str):
        return
    adapted = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    missing = missing_targets(targets, adapted)
    if missing:
        raise ValueError(f"Target module(s) {missing} not found in {model_name}: nothing was adapted for them.")


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------

def format_dataset(dataset, to_prompt_completion: Callable[[dict], dict], num_proc: int | None = None):
    """Map raw records to ``{"prompt", "completion"}``; a missing column is a clear error naming what the data has."""
    if len(dataset) == 0:
        raise ValueError("The training dataset is empty")
    try:
        first = to_prompt_completion(dataset[0])
    except KeyError as err:
        raise ValueError(
            f"The dataset cannot be formatted for this recipe: {err}. Columns found: {dataset.column_names}. "
            "Rename the columns, or fork the recipe and change `to_prompt_completion`."
        ) from None
    if set(first) != {"prompt", "completion"} or not all(isinstance(v, str) for v in first.values()):
        raise ValueError(f"to_prompt_completion must return string prompt and completion, got {first!r}")
    return dataset.map(to_prompt_completion, remove_columns=dataset.column_names, num_proc=num_proc, desc="Formatting")


def split_validation(dataset, val_size: int, seed: int):
    """Shuffle with Python's ``random`` seeded by ``seed`` and keep the last ``val_size`` rows for validation.

    This is the HiRA authors' split (``random.seed(58); random.shuffle(data)``; last 120 = validation): a shuffle
    depends only on the list length and the seed, so for commonsense_170k it selects the same records.
    """
    if val_size == 0:
        return dataset, None
    if val_size >= len(dataset):
        raise ValueError(f"val_size={val_size} leaves no training data ({len(dataset)} examples)")
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    return dataset.select(order[:-val_size]), dataset.select(order[-val_size:])


def sequence_lengths(dataset, tokenizer) -> list[int]:
    """Token count of prompt + completion + EOS as TRL builds it (special tokens of the tokenizer included)."""
    eos = tokenizer.eos_token or ""
    lengths = []
    for start in range(0, len(dataset), 1000):
        batch = dataset[start : start + 1000]
        texts = [p + c + eos for p, c in zip(batch["prompt"], batch["completion"])]
        lengths.extend(len(ids) for ids in tokenizer(texts)["input_ids"])
    return lengths


def enforce_max_length(dataset, tokenizer, max_length: int | None, policy: str, name: str = "train"):
    """Apply ``policy`` to examples longer than ``max_length`` so TRL never truncates one (its right truncation would
    cut the answer). Returns ``(dataset, n_dropped)``."""
    if max_length is None or dataset is None:
        return dataset, 0
    lengths = sequence_lengths(dataset, tokenizer)
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if not too_long:
        logger.info("%s: all %d examples fit max_length=%d (longest %d tokens)", name, len(lengths), max_length, max(lengths))
        return dataset, 0
    msg = (
        f"{name}: {len(too_long)} of {len(lengths)} examples ({100 * len(too_long) / len(lengths):.2f}%) are longer "
        f"than max_length={max_length} tokens (longest {max(lengths)}; first at index {too_long[0]})"
    )
    if policy == "error":
        raise ValueError(msg + ". Raise --max_length, or pass --overlength drop to leave them out.")
    if len(too_long) == len(lengths):
        raise ValueError(
            f"{name}: all {len(lengths)} examples are longer than max_length={max_length} tokens (shortest "
            f"{min(lengths)}), so none is left to train on. Raise --max_length to at least {min(lengths)}."
        )
    logger.warning("%s: dropping them (overlength=drop), never truncating.", msg)
    keep = sorted(set(range(len(lengths))) - set(too_long))
    return dataset.select(keep), len(too_long)


# ----------------------------------------------------------------------------------------------------------------------
# Run summary
# ----------------------------------------------------------------------------------------------------------------------


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting ZeRO-3 partitioned parameters by their full size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def peak_memory_bytes() -> dict[str, int]:
    out = {}
    if torch.cuda.is_available():
        out["accelerator_peak_allocated"] = int(torch.cuda.max_memory_allocated())
        out["accelerator_peak_reserved"] = int(torch.cuda.max_memory_reserved())
    # ru_maxrss is in KiB on Linux: the peak resident memory of this process.
    out["host_peak_rss"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return out


class RunSummaryCallback(TrainerCallback):
    """Write ``run_summary.json`` (trainable parameters, tokens/s, peak memory, wall time) into ``output_dir``.

    Tokens are counted by the Trainer (``include_num_input_tokens_seen``, padding excluded), summed over processes.
    """

    def __init__(self, extra: dict | None = None):
        self.extra = dict(extra or {})
        self.start = None
        self.start_tokens = 0
        self.start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.start_tokens = state.num_input_tokens_seen or 0
        self.start_step = state.global_step
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        wall = time.perf_counter() - self.start
        trainable, total = count_parameters(model)
        tokens = (state.num_input_tokens_seen or 0) - self.start_tokens
        summary = {
            **self.extra,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100.0 * trainable / total if total else 0.0,
            "train_wall_time_s": wall,
            "steps": state.global_step - self.start_step,
            "global_step": state.global_step,
            "train_tokens": int(tokens),
            "tokens_per_s": tokens / wall if wall > 0 else None,
            "world_size": args.world_size,
            "best_model_checkpoint": state.best_model_checkpoint,
            "best_metric": state.best_metric,
            "peak_memory_bytes": peak_memory_bytes(),  # of the main process
            # ZeRO-3: parameters the tuner gathered itself, by site (DeepSpeed fetches inside its own passes)
            "zero3_gathered_by_hira": dict(_zero3.gathered),
            "log_history": state.log_history,
        }
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "run_summary.json"), "w") as f:
                json.dump(summary, f, indent=2, default=str)
            logger.info(
                "Run summary: %d trainable params (%.4f%%), %.1f tokens/s, %.1f s -> %s",
                trainable,
                summary["trainable_percent"],
                summary["tokens_per_s"] or 0.0,
                wall,
                os.path.join(args.output_dir, "run_summary.json"),
            )


def sb_initialise(trainer, model) -> None:
    """HiRA-SB's gradient-matched factors from 8 batches of the training data (:func:`hira.sb_init`)."""
    import hira

    stats = hira.sb_init(model, trainer.get_train_dataloader(), num_batches=8,
                         progress=trainer.accelerator.is_main_process)
    logger.info("HiRA-SB initialised %d layers from the full fine-tuning gradient (8 batches)", len(stats))


class SBInitAtTrainBegin(TrainerCallback):
    """:func:`sb_initialise` once the DeepSpeed ZeRO-3 engine is built (its hooks gather the partitioned weights in
    the gradient pass), before the first step of a fresh run."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            sb_initialise(self.trainer, model)


# ----------------------------------------------------------------------------------------------------------------------
# The recipe body
# ----------------------------------------------------------------------------------------------------------------------


def setup_logging(training_args) -> None:
    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(level if training_args.should_log else logging.WARNING)


def run_recipe(
    task: str,
    to_prompt_completion: Callable[[dict], dict],
    script_args,
    training_args,
    model_args,
    hira_args: HiraArguments,
    callbacks: list | None = None,
    load_data: Callable = load_raw_dataset,
):
    """Load data, build the method, train with TRL's ``SFTTrainer``, save the adapter and a run summary.

    ``load_data(dataset_name, dataset_config, split)`` returns the raw records as a ``datasets.Dataset``
    (default :func:`load_raw_dataset`; ConvAI2 passes its own loader, one row per dialogue turn). Every check that
    needs no weights runs before the model loads. Returns the trainer (after ``train``), so tests and notebooks can
    inspect it.
    """
    from transformers import AutoTokenizer
    from transformers.integrations import is_deepspeed_zero3_enabled
    from trl import SFTTrainer, get_quantization_config

    setup_logging(training_args)
    logger.info("Arguments: %s", {"script": asdict(script_args), "model": asdict(model_args), "method": asdict(hira_args)})

    # Settings that contradict each other, the checkpoint to resume from, the logging integrations: checked first.
    if hira_args.val_size == 0 and training_args.eval_strategy != "no":
        raise ValueError("eval_strategy needs a validation split: set val_size > 0 or --eval_strategy no")
    if hira_args.val_size == 0 and training_args.load_best_model_at_end:
        raise ValueError("load_best_model_at_end needs a validation split (val_size > 0)")
    if training_args.completion_only_loss is not None and (
        training_args.completion_only_loss == hira_args.train_on_inputs
    ):
        raise ValueError("completion_only_loss contradicts train_on_inputs: set only train_on_inputs")
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    check_report_to(training_args.report_to)

    # Model: packaged aliases (smollm2-135m, tiny-llama) resolve to local checkpoints; Hub ids and paths pass through.
    model_name, config = load_model_config("model_name_or_path", model_args.model_name_or_path,
                                           training_args.trust_remote_code)
    targets = method_targets(hira_args)
    if targets is not None and not is_deepspeed_zero3_enabled():
        # Fail before the weights load (minutes for an 8B model); under ZeRO-3 the check runs after loading instead.
        modules = model_module_names(config, training_args.trust_remote_code)
        check_target_modules(targets, modules, model_args.model_name_or_path)
    model_init_kwargs = {"dtype": model_args.dtype, "revision": model_args.model_revision}
    if model_args.attn_implementation is not None:
        model_init_kwargs["attn_implementation"] = model_args.attn_implementation
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    quantization_config = get_quantization_config(model_args)  # load_in_4bit: true -> QHiRA
    tokenizer = AutoTokenizer.from_pretrained(model_name, revision=model_args.model_revision)

    # Response-only loss is TRL's default for prompt/completion rows; train_on_inputs turns it off for every method.
    training_args.completion_only_loss = not hira_args.train_on_inputs
    if training_args.include_num_input_tokens_seen in ("no", False):
        training_args.include_num_input_tokens_seen = "non_padding"
    if hira_args.method in SUGGESTED_LR and training_args.learning_rate != SUGGESTED_LR[hira_args.method]:
        logger.info(
            "method=%s with learning_rate=%g (the references use about %g for this method)",
            hira_args.method,
            training_args.learning_rate,
            SUGGESTED_LR[hira_args.method],
        )

    # Data: raw records -> prompt/completion via hira.prompts, seeded validation split, explicit over-length policy.
    raw = load_data(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    data = format_dataset(raw, to_prompt_completion, training_args.dataset_num_proc)
    train_ds, val_ds = split_validation(data, hira_args.val_size, hira_args.val_split_seed)
    if hira_args.max_train_samples is not None:
        train_ds = train_ds.select(range(min(hira_args.max_train_samples, len(train_ds))))
    max_len = training_args.max_length
    if hira_args.method in ("prompt_tuning", "p_tuning") and max_len is not None:
        max_len -= hira_args.num_virtual_tokens  # virtual tokens take room in the context
    train_ds, dropped_train = enforce_max_length(train_ds, tokenizer, max_len, hira_args.overlength, "train")
    val_ds, dropped_val = enforce_max_length(val_ds, tokenizer, max_len, hira_args.overlength, "validation")

    peft_config = build_peft_config(hira_args, model_args, hidden_size=getattr(config, "hidden_size", None))
    summary = RunSummaryCallback(
        extra={
            "task": task,
            "method": hira_args.method,
            "hira_variant": hira_args.hira_variant,
            "model": model_args.model_name_or_path,
            "dataset": script_args.dataset_name,
            "train_examples": len(train_ds),
            "validation_examples": len(val_ds) if val_ds is not None else 0,
            "dropped_overlength": {"train": dropped_train, "validation": dropped_val},
            "response_only_loss": not hira_args.train_on_inputs,
        }
    )
    trainer = SFTTrainer(
        model=model_name,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=val_ds if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=quantization_config,
        callbacks=[summary, *(callbacks or [])],
    )
    check_parallelism_enabled(trainer)
    summary.extra.update(distributed_type=str(trainer.accelerator.distributed_type.value),
                         fsdp_version=getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", None)
                         if trainer.is_fsdp_enabled else None)
    if targets is not None:
        check_adapted_modules(trainer.model, targets, model_args.model_name_or_path)
    if hasattr(trainer.model, "print_trainable_parameters") and trainer.accelerator.is_main_process:
        trainer.model.print_trainable_parameters()

    if hira_args.method == "hira" and hira_args.hira_variant == "sb" and not resume:
        # HiRA-SB trains only R between frozen B, A: they must come from the full-fine-tuning gradient of the
        # training data before step 0 (a resumed run loads them from its checkpoint instead). Under ZeRO-3 the
        # weights may be partitioned from loading on, and a forward needs the DeepSpeed engine's hooks, which exist
        # once training starts: there the initialisation runs at the start of training.
        if is_deepspeed_zero3_enabled():
            trainer.add_callback(SBInitAtTrainBegin(trainer))
        else:
            trainer.model.to(trainer.args.device)
            sb_initialise(trainer, trainer.model)
    trainer.train(resume_from_checkpoint=resume)
    # With a PEFT method this writes only the adapter (+ tokenizer); checkpoints hold adapter + optimizer state.
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        logger.info("Saved to %s", training_args.output_dir)
    trainer.end()  # finish trackers, destroy the process group (transformers >= 5.18)
    return trainer
