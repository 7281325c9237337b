"""The recipes' data sources as a user meets them: the default source of every recipe (a URL, an hf:// file, a Hub id)
through the loader that reads it, on a local file of the same layout, and a URL fetched for real from a local HTTP
server on 127.0.0.1 (no internet needed); plus the one-line errors for sources that cannot be read."""

import functools
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
import yaml
from repo_scripts import ROOT, assert_one_clear_line, load_script
from test_recipes import COMMONSENSE_ROWS, CONVAI2_ROWS, METAMATH_ROWS, tiny_args, write_json


def default_source(recipe):
    with open(os.path.join(ROOT, "recipes", f"{recipe}.yaml")) as f:
        return yaml.safe_load(f)["dataset_name"]


@pytest.fixture
def http_server(tmp_path):
    """A static file server on 127.0.0.1 over ``tmp_path / "www"``; yields (base URL, folder, request log)."""
    root = tmp_path / "www"
    root.mkdir()
    log = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            log.append(self.requestline)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, log
    server.shutdown()
    thread.join()


def recipe_cli(recipe, argv, tmp_path, timeout=300):
    """`python recipes/<recipe>.py ...` as a user runs it; datasets may fetch URLs, models stay offline."""
    env = dict(os.environ, HF_DATASETS_OFFLINE="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"), OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "recipes", f"{recipe}.py"), *argv], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_commonsense_default_url_is_fetched_for_real(http_server, tmp_path):
    """The default commonsense_170k source is an https URL of a JSON list: the same code fetches the same layout from
    a local server (this needs fsspec's HTTP backend, aiohttp, which the pinned stack lacked)."""
    default = default_source("commonsense")
    assert default.startswith("https://") and default.endswith("/commonsense_170k.json")
    base, root, log = http_server
    write_json(root / "commonsense_170k.json", COMMONSENSE_ROWS)
    proc = recipe_cli("commonsense", tiny_args(f"{base}/commonsense_170k.json", tmp_path / "out"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any("GET /commonsense_170k.json" in line for line in log)
    summary = json.load(open(tmp_path / "out" / "run_summary.json"))
    assert summary["train_examples"] == len(COMMONSENSE_ROWS) and summary["steps"] == 2
    assert summary["dataset"] == f"{base}/commonsense_170k.json"


def test_convai2_url_source_is_fetched_for_real(http_server, tmp_path, monkeypatch):
    """`dataset_name` may be a URL for every recipe (docs/recipes.md), ConvAI2 included: a persona-chat JSON list
    served from 127.0.0.1 gives the same turns as the same file on disk, in the recipe and the evaluator."""
    import datasets

    from hira.convai2 import load_turns

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # what HF_DATASETS_OFFLINE=0 sets at import
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    base, root, log = http_server
    write_json(root / "personachat.json", CONVAI2_ROWS)
    write_json(tmp_path / "personachat.json", CONVAI2_ROWS)
    turns = load_turns(f"{base}/personachat.json")
    assert any("GET /personachat.json" in line for line in log)
    assert turns == load_turns(str(tmp_path / "personachat.json")) and len(turns) == 2 * len(CONVAI2_ROWS)
    assert load_script("eval", "convai2").load_convai2(f"{base}/personachat.json", "train") == \
        load_script("eval", "convai2").load_convai2(str(tmp_path / "personachat.json"), "train")


def test_unreachable_url_is_one_clear_line(http_server, tmp_path, monkeypatch):
    import datasets
    import trl

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # what HF_DATASETS_OFFLINE=0 sets at import
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(trl, "SFTTrainer", None)  # the error must come before the model loads
    base, _, log = http_server
    with pytest.raises(FileNotFoundError, match=r"dataset_name http://127\.0\.0\.1:\d+/missing\.json could not be "
                                                r"fetched") as err:
        load_script("recipes", "commonsense").main(tiny_args(f"{base}/missing.json", tmp_path / "out"))
    assert_one_clear_line(err.value)
    assert any("/missing.json" in line for line in log)  # it did ask the server


def test_metamath_default_hf_file_layout_on_a_local_file(tmp_path):
    """The default `hf://datasets/meta-math/MetaMathQA/MetaMathQA-395K.json` is one JSON list read by the `json`
    builder, the same path as a local file of that layout."""
    default = default_source("metamath")
    assert default.startswith("hf://datasets/") and default.endswith(".json")
    data = write_json(tmp_path / "MetaMathQA-395K.json", METAMATH_ROWS)
    trainer = load_script("recipes", "metamath").main(tiny_args(data, tmp_path / "out", max_steps=1))
    assert len(trainer.train_dataset) == len(METAMATH_ROWS)
    assert trainer.train_dataset[0]["prompt"].endswith("### Response:")


def test_convai2_default_hub_layout_on_a_local_folder(tmp_path):
    """The default `AlekseyKorshuk/persona-chat` goes to `datasets.load_dataset(<id>, split=...)`; a local folder in
    the Hub repository's layout (data/<split>-*.parquet of personality + utterances) takes the same call."""
    from datasets import Dataset

    default = default_source("convai2")
    assert "/" in default and not os.path.exists(default) and "://" not in default
    repo = tmp_path / "persona-chat"
    (repo / "data").mkdir(parents=True)
    Dataset.from_list(CONVAI2_ROWS).to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    Dataset.from_list(CONVAI2_ROWS[:2]).to_parquet(str(repo / "data" / "validation-00000-of-00001.parquet"))
    trainer = load_script("recipes", "convai2").main(tiny_args(str(repo), tmp_path / "out", max_steps=1))
    assert len(trainer.train_dataset) == 2 * len(CONVAI2_ROWS)  # two self turns per dialogue
    items = load_script("eval", "convai2").load_convai2(str(repo), "validation")
    assert len(items) == 4


@pytest.mark.parametrize(
    "content,message",
    [
        (json.dumps(COMMONSENSE_ROWS[0], indent=1), "holds one JSON object"),
        (json.dumps({"data": COMMONSENSE_ROWS}), "holds one JSON object"),
        ('[{"instruction": "q", "output": "a"},\n {"instruction": "q" "output": "a"}]', "is not valid JSON.*line 2"),
        ('{"instruction": "q", "output": "a"}\n{"instruction": "q" "output": "a"}\n', "line 2 is not a JSON record"),
    ],
    ids=["object", "wrapped", "malformed-list", "malformed-lines"],
)
def test_bad_json_is_one_clear_error_before_the_model_loads(content, message, tmp_path, monkeypatch):
    import trl

    path = tmp_path / "train.json"
    path.write_text(content)
    monkeypatch.setattr(trl, "SFTTrainer", None)  # reaching the trainer (and the model weights) would fail loudly
    with pytest.raises(ValueError, match=message) as err:
        load_script("recipes", "commonsense").main(tiny_args(str(path), tmp_path / "out"))
    assert_one_clear_line(err.value)


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("dataset_name", "runs/nope", "dataset_name runs/nope is neither a local file or folder nor a dataset"),
        ("dataset_name", "data/nope.json", "dataset_name data/nope.json: no such file or folder"),
        ("model_name_or_path", "runs/nope", "model_name_or_path runs/nope is neither a local file or folder nor a "
                                            "model"),
        ("model_name_or_path", "./runs/nope", "model_name_or_path ./runs/nope: no such file or folder"),
    ],
)
def test_missing_source_is_one_clear_error_before_the_model_loads(flag, value, message, tmp_path, monkeypatch):
    """A path that does not exist, even one shaped like a Hub id, is one line naming it (offline here), not a chain
    of tracebacks."""
    import trl

    data = write_json(tmp_path / "train.json", COMMONSENSE_ROWS)
    monkeypatch.setattr(trl, "SFTTrainer", None)
    with pytest.raises(FileNotFoundError, match=message) as err:
        load_script("recipes", "commonsense").main(tiny_args(data, tmp_path / "out", **{flag: value}))
    assert_one_clear_line(err.value)
