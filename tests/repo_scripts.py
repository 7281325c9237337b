"""The repository's scripts (``eval/*.py``, ``recipes/*.py``) are CLIs, not a package: tests load them by path."""

import functools
import importlib.util
import os


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODULE_PREFIX = {"eval": "hira_eval", "recipes": "recipe", "experiments": "experiments"}  # `eval` is a builtin


@functools.cache
def load_script(folder: str, name: str):
    """``load_script("eval", "gsm8k")`` -> the module of ``eval/gsm8k.py`` (loaded once per test session)."""
    path = os.path.join(ROOT, folder, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{_MODULE_PREFIX[folder]}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
