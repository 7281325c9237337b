"""Helpers the tests share. The repository's scripts (``eval/*.py``, ``recipes/*.py``) are CLIs, not a package: tests
load them by path."""

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


def assert_one_clear_line(err: BaseException) -> None:
    """A user-facing error: one line, and no chained traceback ("During handling of the above exception...")."""
    assert "\n" not in str(err), str(err)
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), "chained traceback"
