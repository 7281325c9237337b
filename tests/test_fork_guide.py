"""The fork guide of docs/recipes.md, followed literally in a copy of the repository.

Its code blocks are read from the guide itself, so a change to the guide is what gets tested: the shell commands run
as written (in the copy, on a toy `{"question", "answer"}` dataset), the Python and YAML blocks are put where the guide
says. Checked: the project's YAML tests pass with the fork in place, the guide's pytest step selects and passes the
fork's tests, the fork's run_summary.json names its own task, and the generic evaluator scores the fork's adapter.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import yaml
from repo_scripts import ROOT


def guide_blocks(path):
    """(language, code) of every fenced block in the "Fork a recipe" section, in order."""
    with open(path) as f:
        text = f.read()
    section = text.split("## Fork a recipe for a new dataset", 1)[1].split("\n## ", 1)[0]
    return [(lang, textwrap.dedent(code).strip("\n"))
            for lang, code in re.findall(r"^ *```(\w+)\n(.*?)^ *```", section, flags=re.M | re.S)]


def copy_repo(dest):
    files = subprocess.run(["git", "-C", ROOT, "ls-files", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if os.path.isfile(os.path.join(ROOT, rel)):  # a deleted, not yet committed file is listed too
            os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
            with open(os.path.join(ROOT, rel), "rb") as src, open(os.path.join(dest, rel), "wb") as out:
                out.write(src.read())


@pytest.mark.slow
def test_fork_guide_works_as_written(tmp_path):
    repo = tmp_path / "repo"
    copy_repo(repo)
    blocks = guide_blocks(repo / "docs" / "recipes.md")
    assert [lang for lang, _ in blocks] == ["bash", "python", "yaml", "bash", "python", "bash", "bash", "bash"]
    (cp, formatter, settings, check_yaml, rows_entry, pytest_fork, smoke, evaluate) = [code for _, code in blocks]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")

    def sh(command):
        proc = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    (repo / "data" / "mytask").mkdir(parents=True)
    qa = [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(4) for b in range(4)]
    (repo / "data" / "mytask" / "train.json").write_text(json.dumps(qa))
    (repo / "data" / "mytask" / "test.json").write_text(json.dumps(qa[:4]))

    # 1. copy the recipe
    sh(cp)
    # 2. the new formatter replaces the copied one
    recipe = repo / "recipes" / "mytask.py"
    source, n = re.subn(r"^def to_prompt_completion\(.*?(?=\n\n\n)", lambda m: formatter, recipe.read_text(),
                        flags=re.M | re.S)
    assert n == 1
    recipe.write_text(source)
    # 3. the YAML keys the guide names, set in the copied YAML (its comments kept), then the YAML tests
    config = repo / "recipes" / "mytask.yaml"
    text = config.read_text()
    for key, value in yaml.safe_load(settings).items():
        text, n = re.subn(rf"^{key}:.*$", f"{key}: {value}", text, flags=re.M)
        assert n == 1, key
    config.write_text(text)
    out = sh(check_yaml)
    assert re.search(r"\d+ passed", out) and "failed" not in out
    collected = sh(f"{sys.executable} -m pytest -q --collect-only tests/test_configs.py")
    assert "mytask.yaml" in collected  # the fork's YAML was among the checked ones
    # 4. the fork's rows in tests/test_recipes.py; the guide's pytest step selects every method on them
    tests = repo / "tests" / "test_recipes.py"
    tests.write_text(tests.read_text().replace("ROWS = {\n", "ROWS = {\n" + rows_entry + "\n", 1))
    out = sh(pytest_fork)
    assert re.search(r"\b6 passed\b", out), out[-2000:]
    sh(smoke)
    summary = json.load(open(repo / "runs" / "mytask-smoke" / "run_summary.json"))
    assert summary["task"] == "mytask" and summary["steps"] == 2 and summary["dataset"] == "data/mytask/train.json"
    # 5. the generic evaluator on the fork's adapter, prompts built by the fork's formatter
    out = sh(evaluate)
    metrics_path = re.search(r"metrics: (\S+)", out).group(1)
    metrics = json.load(open(repo / metrics_path))
    assert metrics["metrics"]["n"] == 4 and metrics["metrics"]["metric"] == "exact_match"
    assert metrics["model"]["adapter"] and metrics["data"]["recipe"].endswith("recipes/mytask.py")
    preds = [json.loads(line) for line in open(repo / os.path.dirname(metrics_path) / "predictions.jsonl")]
    assert sorted(p["refs"][0] for p in preds) == sorted(r["answer"] for r in qa[:4])
