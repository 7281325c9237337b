"""Shared machinery of the evaluators in ``eval/``: load a checkpoint, generate in batches, resume, record.

``resolve_checkpoint(ckpt)`` checks what ``--ckpt`` points at from configs alone, and ``load_for_inference(ckpt)``
loads it; ``setup_from_args`` runs every check that needs no weights (the run record in ``--out``, the checkpoint, the
prompts against the model's context) before the weights load, and writes the run record once they have. ``--ckpt`` is

* an adapter directory (``adapter_config.json``): the base model comes from the adapter config (``--base_model``
  overrides it), the adapter is merged into the base weights before generating (HiRA merges exactly, so the merged
  model runs at base-model speed) unless ``merge=False``;
* a merged / full model directory or Hub id;
* a packaged alias (``smollm2-135m``, ``tiny-llama``; see ``hira.models``) for the untuned baseline.

``run_generation(...)`` generates completions for a list of items, longest prompts first (sorted batches waste little
on padding), appends every finished batch to ``predictions.jsonl`` and skips items already there, so an interrupted
run resumes where it stopped and ends with the same predictions (and metrics) as an uninterrupted one. Under
``accelerate launch`` the pending items are split over processes and the new predictions gathered on the main one.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hira.models import PACKAGED_MODELS, resolve_model
from hira.sources import looks_local, one_line


logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
RUN_CONFIG_FILE = "run_config.json"


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def _import_hira_tuner() -> None:
    """Register the HiRA tuner with PEFT before any adapter is loaded (stock-PEFT HiRA adapters load either way)."""
    import hira  # noqa: F401


def _config_dict(path: str) -> dict | None:
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            return json.load(f)
    return None


# architecture fields that must agree between the base model an adapter was trained on and the one it is loaded into
_ARCH_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")


def _check_same_base(adapter_dir: str, recorded: str, given: str) -> None:
    """Raise when the adapter's recorded base model and the given one are different architectures (when both configs
    can be read locally; otherwise the shape check at load time catches a mismatch)."""
    rec_cfg, giv_cfg = _config_dict(resolve_model(recorded)), _config_dict(given)
    if rec_cfg is None or giv_cfg is None:
        return
    diff = {k: (rec_cfg.get(k), giv_cfg.get(k)) for k in _ARCH_KEYS if rec_cfg.get(k) != giv_cfg.get(k)}
    if diff:
        details = ", ".join(f"{k}: adapter base {a!r} vs given {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"The adapter in {adapter_dir} was trained on {recorded!r}, a different model from the base model "
            f"{given!r} ({details}). Pass the base model the adapter was made for with --base_model."
        )


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: dict = field(default_factory=dict)  # what was loaded: recorded in metrics.json


@dataclass
class Checkpoint:
    """What ``--ckpt`` points at, resolved and checked without reading any weights."""

    ckpt: str
    model_path: str  # the weights that load first: the model itself, or an adapter's base model
    tokenizer_path: str
    config: Any = None  # the model config of model_path
    adapter: str | None = None
    adapter_config: dict = field(default_factory=dict)
    base_model: str | None = None  # as named (adapter config or --base_model)


def load_tokenizer(path: str):
    """Tokenizer for batched generation: left padding and a real pad token (never a newly added one)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        # HiRA pads Llama-2 with UNK and Llama-3 with BOS; UNK when the vocabulary has one, else EOS
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if tok.pad_token is None:
        raise ValueError(f"The tokenizer of {path} has no pad, unk or eos token to pad batches with.")
    return tok


def resolve_checkpoint(ckpt: str, base_model: str | None = None) -> Checkpoint:
    """Check that ``ckpt`` (and an adapter's base model) exist and fit, reading configs only (see module docstring)."""
    resolved = os.path.expanduser(resolve_model(ckpt))
    # a Hub id is "name" or "owner/name"; anything else that does not exist locally is a missing folder
    if looks_local(ckpt) and not os.path.exists(resolved):
        raise FileNotFoundError(
            f"Checkpoint {ckpt!r} does not exist. Pass --ckpt an adapter directory (with adapter_config.json), a merged "
            "model directory, a Hub model id, or a packaged alias (smollm2-135m, tiny-llama)."
        )
    if os.path.isdir(resolved) and not (
        os.path.isfile(os.path.join(resolved, "adapter_config.json"))
        or os.path.isfile(os.path.join(resolved, "config.json"))
    ):
        raise FileNotFoundError(
            f"{resolved} holds neither adapter_config.json (a PEFT adapter) nor config.json (a model). Point --ckpt at "
            "the checkpoint folder itself, e.g. out/commonsense/checkpoint-best."
        )
    adapter_cfg_path = os.path.join(resolved, "adapter_config.json")
    if not os.path.isfile(adapter_cfg_path):
        config = _model_config(resolved, ckpt, "--ckpt")  # a Hub id that is not there: one clear error, no weights
        return Checkpoint(ckpt=ckpt, model_path=resolved, tokenizer_path=resolved, config=config, base_model=ckpt)
    with open(adapter_cfg_path) as f:
        adapter_cfg = json.load(f)
    recorded = adapter_cfg.get("base_model_name_or_path")
    base = base_model or recorded
    if not base:
        raise ValueError(f"{adapter_cfg_path} names no base model; pass it with --base_model.")
    base_path = resolve_model(base)
    if not base_model and not os.path.exists(base_path) and os.path.basename(base_path) in PACKAGED_MODELS:
        # trained on a packaged model converted into another machine's cache: use this machine's copy
        base_path = resolve_model(os.path.basename(base_path))
    if base_model and recorded:
        _check_same_base(resolved, recorded, base_path)
    if looks_local(base_path) and not os.path.exists(base_path):
        raise FileNotFoundError(f"The base model {base!r} named in {adapter_cfg_path} does not exist here; pass "
                                "--base_model to name another copy of it.")
    config = _model_config(base_path, base, "the base model of " + resolved)
    tok_path = resolved if os.path.isfile(os.path.join(resolved, "tokenizer_config.json")) else base_path
    return Checkpoint(ckpt=ckpt, model_path=base_path, tokenizer_path=tok_path, config=config, adapter=resolved,
                      adapter_config=adapter_cfg, base_model=base)


def _model_config(path: str, name: str, what: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"Could not load model {name!r} ({what}): it is not a local folder and could not be loaded from the Hub "
            f"({one_line(err)}). Pass an existing checkpoint folder, a reachable Hub id, or a packaged alias "
            "(smollm2-135m, tiny-llama)."
        ) from None


def check_prompt_lengths(items: Sequence[dict], tokenizer, context: int | None, max_new_tokens: int) -> None:
    """Every prompt plus ``max_new_tokens`` must fit the model's context (``max_position_embeddings``): prompts are
    never truncated, and a model run past its context produces text the scores would silently count."""
    if not context or not items:
        return
    lengths = [len(ids) for ids in tokenizer([it["prompt"] for it in items])["input_ids"]]
    over = [i for i, n in enumerate(lengths) if n + max_new_tokens > context]
    if over:
        worst = max(over, key=lambda i: lengths[i])
        raise ValueError(
            f"{len(over)} of {len(items)} prompts do not fit the model's context of {context} tokens with "
            f"max_new_tokens={max_new_tokens} (longest: {items[worst]['id']}, {lengths[worst]} prompt tokens). "
            "Lower --max_new_tokens, shorten those prompts, or use a model with a longer context."
        )


def load_for_inference(
    ckpt: str | Checkpoint,
    base_model: str | None = None,
    merge: bool = True,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    tokenizer=None,
) -> LoadedModel:
    """Load an adapter directory, a merged model or a base model for generation (see module docstring)."""
    from transformers import AutoModelForCausalLM

    target = ckpt if isinstance(ckpt, Checkpoint) else resolve_checkpoint(ckpt, base_model)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if device is None:
        from accelerate import PartialState

        device = PartialState().device

    info: dict = {"ckpt": target.ckpt}
    model = _load_model(AutoModelForCausalLM, target.model_path, dtype)
    if target.adapter is not None:
        _import_hira_tuner()
        from peft import PeftModel

        recorded = target.adapter_config.get("base_model_name_or_path")
        try:
            model = PeftModel.from_pretrained(model, target.adapter)
            _check_all_adapter_weights_used(model, target.adapter)
        except (RuntimeError, ValueError, KeyError) as err:
            raise ValueError(
                f"The adapter in {target.adapter} does not fit the base model {target.base_model!r}: it was made for "
                f"another base model (adapter config says {recorded!r}). Pass the right one with --base_model. "
                f"Original error: {one_line(err)}"
            ) from None
        info.update(adapter=target.adapter, base_model=target.base_model,
                    peft_type=str(target.adapter_config.get("peft_type")), adapter_r=target.adapter_config.get("r"),
                    merged=merge)
        if merge:
            model = model.merge_and_unload()
    else:
        info.update(adapter=None, base_model=target.ckpt, merged=None)
    model.to(device).eval()
    info["dtype"] = str(next(model.parameters()).dtype)
    return LoadedModel(model=model, tokenizer=tokenizer or load_tokenizer(target.tokenizer_path), info=info)


def _check_all_adapter_weights_used(model, adapter_dir: str) -> None:
    """PEFT only warns when saved adapter tensors find no module (e.g. an adapter for a deeper model of the same
    width); an evaluation with part of the adapter silently missing would be wrong, so it is an error here."""
    from peft.utils import get_peft_model_state_dict

    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            saved = set(f.keys())
    elif os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin")):
        saved = set(torch.load(os.path.join(adapter_dir, "adapter_model.bin"), map_location="cpu", weights_only=True))
    else:
        raise ValueError(f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors / .bin weights")
    unused = sorted(saved - set(get_peft_model_state_dict(model)))
    if unused:
        raise ValueError(f"{len(unused)} adapter tensors match no module of the base model, e.g. {unused[:3]}")


def _load_model(auto_cls, path: str, dtype):
    try:
        return auto_cls.from_pretrained(path, dtype=dtype)
    except OSError as err:
        raise FileNotFoundError(
            f"Could not load model {path!r}: {one_line(err)}. Pass an existing checkpoint folder, a reachable Hub id, "
            "or a packaged alias (smollm2-135m, tiny-llama)."
        ) from None


# --------------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DecodingConfig:
    num_beams: int = 4  # paper: 4 beams, do_sample off; 1 = greedy
    max_new_tokens: int = 32
    batch_size: int = 8
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop_strings: tuple[str, ...] = ()  # the completion is cut at the first of these (and generation stops there)

    def generate_kwargs(self, tokenizer) -> dict:
        kw = dict(
            do_sample=False,
            num_beams=self.num_beams,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            # neutralise sampling knobs a checkpoint's generation_config may carry (they would only warn)
            temperature=None, top_p=None, top_k=None,
        )
        if self.num_beams > 1:
            kw["length_penalty"] = self.length_penalty
        if self.no_repeat_ngram_size:
            kw["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        if self.stop_strings:
            kw["stopping_criteria"] = _stop_criteria(tokenizer, tuple(self.stop_strings))
        return kw


_STOP_CACHE: dict = {}


def _stop_criteria(tokenizer, stop_strings: tuple[str, ...]):
    """Stop-string criteria built once per tokenizer: building one scans the whole vocabulary (about 0.8 s for a
    49k vocabulary), which ``generate(stop_strings=...)`` would repeat on every batch."""
    from transformers import StoppingCriteriaList, StopStringCriteria

    key = (id(tokenizer), stop_strings)
    if key not in _STOP_CACHE:
        _STOP_CACHE[key] = (tokenizer, StoppingCriteriaList([StopStringCriteria(tokenizer, list(stop_strings))]))
    return _STOP_CACHE[key][1]


def decoding_fingerprint(decoding: DecodingConfig) -> dict:
    """The decoding settings that define the predictions (the batch size does not: a resumed run may change it)."""
    d = asdict(decoding)
    d.pop("batch_size")
    d["stop_strings"] = list(d["stop_strings"])
    return d


def cut_at(text: str, markers: Sequence[str]) -> str:
    """Cut ``text`` at the first occurrence of any marker."""
    for m in markers:
        i = text.find(m)
        if i >= 0:
            text = text[:i]
    return text


def _shared_prefill(model, enc, num_beams: int):
    """Beam search: run the prompt (all but its last token) once per question and hand ``generate`` a cache already
    repeated for the beams. ``generate`` would otherwise run the whole prompt once per beam (``num_beams``× the
    prompt compute), which dominates beam search on a CPU. Returns ``None`` when the model's cache cannot be reused
    this way (``generate`` then does its own prefill)."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if ids.shape[1] < 2 or getattr(model.config, "is_encoder_decoder", False):
        return None
    # The positions generate() gives left-padded rows: cumulative count of real tokens.
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], use_cache=True)
    cache = out.past_key_values
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(num_beams)
    return cache


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[str], decoding: DecodingConfig) -> list[str]:
    """Generate for one batch of prompts; returns only the new text (special tokens skipped), cut at stop strings."""
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(model.device)
    extra = {}
    if decoding.num_beams > 1:
        cache = _shared_prefill(model, enc, decoding.num_beams)
        if cache is not None:
            extra["past_key_values"] = cache
    out = model.generate(**enc, **extra, **decoding.generate_kwargs(tokenizer))
    new = out[:, enc["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [cut_at(t, decoding.stop_strings) for t in texts]


def sort_by_length(prompts: Sequence[str], tokenizer) -> list[int]:
    """Indices ordered longest prompt first, so each batch holds prompts of similar length (little padding) and an
    out-of-memory error shows up on the first batch rather than the last."""
    lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    return sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))


# --------------------------------------------------------------------------------------------------------------------
# Resumable prediction files
# --------------------------------------------------------------------------------------------------------------------


def read_predictions(out_dir: str) -> dict[str, dict]:
    """Finished predictions by id, from ``predictions.jsonl`` and any per-process files a multi-process run left.
    A line cut short by a crash is ignored (that item is generated again)."""
    done: dict[str, dict] = {}
    if not os.path.isdir(out_dir):
        return done
    names = [PREDICTIONS_FILE] + sorted(n for n in os.listdir(out_dir) if n.startswith("predictions.rank"))
    for name in names:
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done[rec["id"]] = rec
    return done


def _append(path: str, records: Sequence[dict]) -> None:
    # a line cut short by a crash must not swallow the first new record: start on a fresh line
    torn = False
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a") as f:
        if torn:
            f.write("\n")
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_run_config(out_dir: str, run_config: dict, overwrite: bool = False) -> None:
    """Refuse to resume into a folder whose predictions came from another model, data or decoding setup. Reads only:
    the record is written by :func:`record_run_config` once the run has started, so a run that fails before that
    (a wrong ``--ckpt``) leaves nothing that would block its own retry."""
    path = os.path.join(out_dir, RUN_CONFIG_FILE)
    if overwrite or not os.path.isfile(path):
        return
    with open(path) as f:
        previous = json.load(f)
    if previous != json.loads(json.dumps(run_config)):
        changed = sorted(k for k in set(previous) | set(run_config) if previous.get(k) != run_config.get(k))
        raise ValueError(
            f"{out_dir} already holds predictions from a different run (changed: {changed}). Use another --out "
            "folder, or --overwrite to discard the old predictions."
        )


def record_run_config(out_dir: str, run_config: dict, overwrite: bool = False) -> None:
    """Write ``run_config.json`` (after ``--overwrite`` discarded the old predictions): called when the model has
    loaded and generation is about to start."""
    os.makedirs(out_dir, exist_ok=True)
    if overwrite:
        for name in os.listdir(out_dir):
            if name.startswith("predictions") or name in (METRICS_FILE, RUN_CONFIG_FILE):
                os.remove(os.path.join(out_dir, name))
    with open(os.path.join(out_dir, RUN_CONFIG_FILE), "w") as f:
        json.dump(run_config, f, indent=2)


def run_generation(
    items: Sequence[dict],
    loaded: LoadedModel,
    decoding: DecodingConfig,
    out_dir: str,
    postprocess: Callable[[dict, str], dict] | None = None,
    generate_fn: Callable[[Sequence[str]], list[str]] | None = None,
    progress_desc: str = "generating",
) -> list[dict]:
    """Generate a completion for every item (``{"id", "prompt", ...}``) not yet in ``out_dir/predictions.jsonl``.

    Each finished batch is appended at once (``{"id", "prediction", ...postprocess(item, text)}``). Returns all records
    in the order of ``items`` (on the main process; other processes return ``[]``).
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    state = PartialState()
    os.makedirs(out_dir, exist_ok=True)
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("item ids must be unique")
    done = read_predictions(out_dir)
    pending = [it for it in items if it["id"] not in done]
    if done and state.is_main_process:
        logger.info("resuming: %d of %d predictions already in %s", len(items) - len(pending), len(items), out_dir)
    generate_fn = generate_fn or (lambda p: generate_batch(loaded.model, loaded.tokenizer, p, decoding))

    # the longest prompts first; processes take interleaved slices so each gets a similar length mix
    order = sort_by_length([it["prompt"] for it in pending], loaded.tokenizer) if pending else []
    ordered = [pending[i] for i in order]
    n = state.num_processes
    shards = [ordered[r::n] for r in range(n)]
    path = os.path.join(out_dir, PREDICTIONS_FILE if n == 1 else f"predictions.rank{state.process_index}.jsonl")
    with state.split_between_processes(shards) as mine:
        mine = mine[0] if mine else []
        new: list[dict] = []
        bar = tqdm(total=len(mine), desc=progress_desc, disable=not state.is_local_main_process or not mine)
        for start in range(0, len(mine), decoding.batch_size):
            batch = mine[start:start + decoding.batch_size]
            texts = generate_fn([it["prompt"] for it in batch])
            records = []
            for it, text in zip(batch, texts):
                rec = {"id": it["id"], "prediction": text}
                if postprocess is not None:
                    rec.update(postprocess(it, text))
                records.append(rec)
            _append(path, records)
            new.extend(records)
            bar.update(len(batch))
        bar.close()
    if n > 1:
        gathered = gather_object(new)
        state.wait_for_everyone()
        if state.is_main_process:
            # fold the per-process files into the single predictions file
            _append(os.path.join(out_dir, PREDICTIONS_FILE), gathered)
            for r in range(n):
                rank_file = os.path.join(out_dir, f"predictions.rank{r}.jsonl")
                if os.path.exists(rank_file):
                    os.remove(rank_file)
        state.wait_for_everyone()
        if not state.is_main_process:
            return []
    done = read_predictions(out_dir)
    return [done[i] for i in ids]


# --------------------------------------------------------------------------------------------------------------------
# Optional vLLM backend (GPU only; merged models)
# --------------------------------------------------------------------------------------------------------------------


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def vllm_generate_fn(model_dir: str, decoding: DecodingConfig) -> Callable[[Sequence[str]], list[str]]:
    """Greedy generation with vLLM from a merged model folder; same prompts and the same cut at stop strings.
    vLLM's beam search is a different API with different semantics, so only ``num_beams=1`` is offered."""
    if not vllm_available():
        raise RuntimeError("--backend vllm needs the `vllm` package and a CUDA GPU; use --backend hf.")
    if decoding.num_beams != 1:
        raise ValueError("--backend vllm supports greedy decoding only: pass --num_beams 1 (or use --backend hf).")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=decoding.max_new_tokens, stop=list(decoding.stop_strings) or None)

    def fn(prompts: Sequence[str]) -> list[str]:
        outs = llm.generate(list(prompts), params, use_tqdm=False)
        return [cut_at(o.outputs[0].text, decoding.stop_strings) for o in outs]

    return fn


def merged_dir_for_vllm(loaded: LoadedModel, out_dir: str) -> str:
    """vLLM loads from disk: save the merged model (adapter already merged by ``load_for_inference``) once."""
    if loaded.info.get("adapter") is None:
        return resolve_model(loaded.info["ckpt"])
    if loaded.info.get("merged") is False:
        raise ValueError("--backend vllm needs the adapter merged; drop --no_merge.")
    path = os.path.join(out_dir, "merged_model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        loaded.model.save_pretrained(path)
        loaded.tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "transformers", "peft", "accelerate", "trl", "datasets", "sacrebleu", "bert-score", "rouge-score",
             "nltk", "vllm", "hira"]
    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


def git_revision() -> str | None:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def write_metrics(out_dir: str, metrics: dict, loaded_info: dict, decoding: DecodingConfig, extra: dict) -> dict:
    """Write ``metrics.json``: the scores plus everything needed to reproduce them."""
    summary = {
        "metrics": metrics,
        "model": loaded_info,
        "decoding": asdict(decoding),
        **extra,
        "versions": package_versions(),
        "git_revision": git_revision(),
    }
    summary = json.loads(json.dumps(summary))  # exactly what the file holds (tuples become lists)
    with open(os.path.join(out_dir, METRICS_FILE), "w") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    return summary


# --------------------------------------------------------------------------------------------------------------------
# Command-line options shared by the evaluators
# --------------------------------------------------------------------------------------------------------------------


def add_common_args(parser, num_beams: int, max_new_tokens: int, batch_size: int = 8) -> None:
    """Options every ``eval/*.py`` script takes (model, decoding, output); task defaults are passed in."""
    g = parser.add_argument_group("model")
    g.add_argument("--ckpt", required=True,
                   help="adapter dir (adapter_config.json), merged model dir, Hub id, or alias smollm2-135m / tiny-llama")
    g.add_argument("--base_model", default=None, help="override the base model named in adapter_config.json")
    g.add_argument("--no_merge", action="store_true", help="keep the adapter unmerged (slower; for debugging)")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    g.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="vllm: optional, GPU only, greedy only")
    g = parser.add_argument_group("decoding")
    g.add_argument("--num_beams", type=int, default=num_beams, help="beam count (1 = greedy); do_sample is always off")
    g.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    g.add_argument("--batch_size", type=int, default=batch_size)
    g = parser.add_argument_group("output")
    g.add_argument("--max_examples", type=int, default=None, help="first N examples (per task where there are several)")
    g.add_argument("--out", default=None, help="output folder (predictions.jsonl, metrics.json); resumed if it exists")
    g.add_argument("--overwrite", action="store_true", help="discard predictions already in --out")


def setup_from_args(args, decoding: DecodingConfig, out_dir: str, items: Sequence[dict],
                    task_config: dict) -> tuple[LoadedModel, Callable | None]:
    """Everything before generation, cheapest first: the run record in ``--out`` is compared, the checkpoint resolved
    (configs only), the prompts checked against the model's context, then the weights load and the run record is
    written. The run record is the evaluators' common flags and the decoding, then the evaluator's ``task_config``
    (its prompt and data). Returns the model and the generate function of the chosen backend."""
    from accelerate import PartialState

    run_config = {"ckpt": args.ckpt, "base_model": args.base_model, "merge": not args.no_merge, "dtype": args.dtype,
                  "backend": args.backend, "decoding": decoding_fingerprint(decoding), **task_config}
    check_run_config(out_dir, run_config, overwrite=args.overwrite)
    target = resolve_checkpoint(args.ckpt, args.base_model)
    tokenizer = load_tokenizer(target.tokenizer_path)
    check_prompt_lengths(items, tokenizer, getattr(target.config, "max_position_embeddings", None),
                         decoding.max_new_tokens)
    loaded = load_for_inference(target, merge=not args.no_merge, dtype=args.dtype, tokenizer=tokenizer)
    state = PartialState()
    if state.is_main_process:
        record_run_config(out_dir, run_config, overwrite=args.overwrite)
    state.wait_for_everyone()
    if args.backend == "vllm":
        return loaded, vllm_generate_fn(merged_dir_for_vllm(loaded, out_dir), decoding)
    return loaded, None


def default_out_dir(task: str, ckpt: str) -> str:
    name = os.path.basename(os.path.normpath(ckpt)) or "model"
    return os.path.join("out", "eval", task, name)
