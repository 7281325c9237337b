"""The recipes end to end on the tiny Llama (random weights, real Llama-2 tokenizer), offline, on the CPU.

* every recipe x every method runs 2 optimizer steps, trains only what the method should train, and writes the
  adapter (not the base model) plus run_summary.json; LoRA and HiRA have the same parameter budget;
* response-only masking checked token by token on real-format data from ../shared/data;
* a run killed after its step-2 checkpoint resumes to the same final adapter as an uninterrupted run;
* a 2-process DeepSpeed ZeRO-3 run under `accelerate launch` (gloo) logs the same losses as one process.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from repo_scripts import ROOT, assert_one_clear_line, load_script


METHODS = ("hira", "lora", "dora", "prompt_tuning", "p_tuning", "full")
# Method for the ZeRO-3 test. HiRA under ZeRO-3 with partitioned small weights still fails in the tuner
# ("Cannot free a ZeRO-3 parameter while it is still active"); switch to "hira" once it supports it.
ZERO3_METHOD = "hira"

COMMONSENSE_ROWS = [
    {"instruction": f"Please answer the following question with true or false, question: is {q}?\n\nAnswer format: "
     "true/false", "input": "", "output": f"the correct answer is {a}", "answer": a}
    for q, a in [("the sky blue", "true"), ("fire cold", "false"), ("water wet", "true"), ("ice hot", "false"),
                 ("a cat an animal", "true"), ("paris in spain", "false"), ("two more than one", "true"),
                 ("the sun a planet", "false")]
]
METAMATH_ROWS = [
    {"type": "GSM_Rephrased", "original_question": f"What is {a} plus {b}?", "query": f"What is {a} plus {b}?",
     "response": f"We add {a} and {b} to get {a + b}.\nThe answer is: {a + b}"}
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (4, 9)]
] + [{"type": "MATH_SV", "original_question": "x", "query": "Compute 2 times 3.\nShow your work.",
      "response": "2 times 3 is 6.\nThe answer is: 6"}] * 2
CONVAI2_ROWS = [
    {"personality": ["i like to ski .", "i have a dog ."],
     "utterances": [
         {"history": ["hi , how are you ?"], "candidates": ["i am bored .", "i am fine , just back from skiing ."]},
         {"history": ["hi , how are you ?", "i am fine , just back from skiing .", "nice , do you have pets ?"],
          "candidates": ["no .", "yes , a dog named max ."]}]},
    {"personality": ["i am a teacher .", "i love pizza ."],
     "utterances": [
         {"history": ["__ SILENCE __"], "candidates": ["hello", "hello ! i just finished grading papers ."]},
         {"history": ["__ SILENCE __", "hello ! i just finished grading papers .", "what do you teach ?"],
          "candidates": ["cats", "math , and then i eat pizza ."]}]},
] * 2
# A few training rows per recipe: test_two_steps runs every method on each (a forked recipe adds its own entry).
ROWS = {
    "commonsense": COMMONSENSE_ROWS,
    "metamath": METAMATH_ROWS,
    "convai2": CONVAI2_ROWS,
}


def write_json(path, rows):
    with open(path, "w") as f:
        json.dump(rows, f)
    return str(path)


def tiny_args(data, out, method="hira", **overrides):
    args = {
        "model_name_or_path": "tiny-llama", "dtype": "float32", "dataset_name": data, "method": method,
        "hira_r": 4, "num_virtual_tokens": 4, "max_steps": 2, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1, "learning_rate": 1e-2, "warmup_steps": 0, "use_cpu": "true",
        "bf16": "false", "eval_strategy": "no", "load_best_model_at_end": "false", "save_strategy": "no",
        "val_size": 0, "logging_steps": 1, "output_dir": str(out), "report_to": "none", "log_level": "warning",
        "dataloader_num_workers": 0,
    }
    args.update(overrides)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def run(recipe_name, argv, callbacks=None):
    return load_script("recipes", recipe_name).main(argv, callbacks=callbacks)


class Snapshot(TrainerCallback):
    """Trainable tensors at the start and the end of training."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def expected_trainable(method, model):
    """Parameter budgets on tiny-llama (hidden 16, ffn 64, 2 layers) at r=4, q/k/v/up/down."""
    low_rank = 2 * 4 * ((16 + 16) * 3 + (16 + 64) * 2)  # r*(in+out) per adapted linear: 2048
    return {
        "hira": low_rank,
        "lora": low_rank,  # the paper's matched budget
        "dora": low_rank + 2 * (16 * 3 + 64 + 16),  # plus one magnitude per output feature
        "prompt_tuning": 4 * 16,
        "full": sum(p.numel() for p in model.parameters()),
    }.get(method)


@pytest.mark.parametrize("recipe_name", list(ROWS))
@pytest.mark.parametrize("method", METHODS)
def test_two_steps(recipe_name, method, tmp_path):
    data = write_json(tmp_path / "train.json", ROWS[recipe_name])
    snap = Snapshot()
    trainer = run(recipe_name, tiny_args(data, tmp_path / "out", method), callbacks=[snap])
    assert trainer.state.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert snap.before and any(not torch.equal(snap.before[n], snap.after[n]) for n in snap.before), "nothing trained"
    if method in ("hira", "lora", "dora"):  # adapters only: the base weights never train
        assert all(("hira_" in n or "lora_" in n) for n in snap.before)
    summary = json.load(open(tmp_path / "out" / "run_summary.json"))
    assert summary["task"] == recipe_name and summary["method"] == method  # a fork names its own task
    assert summary["steps"] == 2 and summary["train_tokens"] > 0
    expected = expected_trainable(method, trainer.model)
    if expected is not None:
        assert summary["trainable_params"] == expected
    files = os.listdir(tmp_path / "out")
    if method == "full":
        assert "model.safetensors" in files
    else:  # the adapter only, never a copy of the base model
        assert "adapter_config.json" in files and "model.safetensors" not in files


def test_paper_flow_eval_and_best_checkpoint(tmp_path):
    """Validation split + eval/save every step + best checkpoint by eval loss, as in the YAMLs (80 -> 1 here)."""
    data = write_json(tmp_path / "train.json", COMMONSENSE_ROWS * 2)
    argv = tiny_args(data, tmp_path / "out", val_size=4, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                     save_steps=1, load_best_model_at_end="true", metric_for_best_model="eval_loss")
    trainer = run("commonsense", argv)
    assert [h for h in trainer.state.log_history if "eval_loss" in h]
    summary = json.load(open(tmp_path / "out" / "run_summary.json"))
    assert summary["validation_examples"] == 4 and summary["train_examples"] == 12
    assert summary["best_model_checkpoint"] is not None
    ckpt = summary["best_model_checkpoint"]
    assert "adapter_model.safetensors" in os.listdir(ckpt) and "model.safetensors" not in os.listdir(ckpt)


def test_validation_split_is_the_hira_authors_split():
    """random.seed(58); random.shuffle(list); last 120 = validation (hira/data_file/.../do_train_val_test_split.py)."""
    import random

    from datasets import Dataset

    from hira.recipe import split_validation

    ds = Dataset.from_dict({"i": list(range(1000))})
    train, val = split_validation(ds, 120, 58)
    records = list(range(1000))
    random.seed(58)
    random.shuffle(records)
    assert val["i"] == records[-120:] and train["i"] == records[:-120]
    again, val2 = split_validation(ds, 120, 58)
    assert val2["i"] == val["i"]


def test_missing_column_is_a_clear_error(tmp_path):
    data = write_json(tmp_path / "train.json", [{"question": "q", "output": "the correct answer is true"}] * 4)
    with pytest.raises(ValueError, match="instruction"):
        run("commonsense", tiny_args(data, tmp_path / "out"))


def test_missing_target_module_is_a_clear_error(tmp_path):
    data = write_json(tmp_path / "train.json", COMMONSENSE_ROWS)
    argv = tiny_args(data, tmp_path / "out") + ["--hira_target_modules", "q_proj", "c_attn"]
    with pytest.raises(ValueError, match="c_attn"):
        run("commonsense", argv)


@pytest.mark.parametrize("policy", ["error", "drop"])
def test_overlength_is_an_error_or_a_counted_drop(policy, tmp_path):
    rows = COMMONSENSE_ROWS + [dict(COMMONSENSE_ROWS[0], instruction="word " * 200)] * 2
    data = write_json(tmp_path / "train.json", rows)
    argv = tiny_args(data, tmp_path / "out", max_length=128, overlength=policy)
    if policy == "error":
        with pytest.raises(ValueError, match="2 of 10 examples"):
            run("commonsense", argv)
    else:
        run("commonsense", argv)
        summary = json.load(open(tmp_path / "out" / "run_summary.json"))
        assert summary["dropped_overlength"]["train"] == 2 and summary["train_examples"] == 8


def _real_rows(shared_data, recipe_name, n=6):
    if recipe_name == "commonsense":
        path = os.path.join(shared_data, "commonsense", "boolq", "test.json")
        rows = json.load(open(path))[:n] if os.path.isfile(path) else None
    else:  # GSM8K train rows in MetaMathQA's column names (query, response)
        path = os.path.join(shared_data, "gsm8k", "train.jsonl")
        rows = None
        if os.path.isfile(path):
            with open(path) as f:
                rows = [json.loads(next(f)) for _ in range(n)]
            rows = [{"query": r["question"], "response": r["answer"]} for r in rows]
    if rows is None:
        pytest.skip(f"{path} is absent")
    return rows


@pytest.mark.parametrize("recipe_name", ["commonsense", "metamath"])
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_masking_token_by_token_on_real_data(recipe_name, train_on_inputs, shared_data, tmp_path):
    from hira import prompts

    rows = _real_rows(shared_data, recipe_name)
    data = write_json(tmp_path / "train.json", rows)
    argv = tiny_args(data, tmp_path / "out", max_steps=1, max_length=1024, train_on_inputs=str(train_on_inputs).lower())
    trainer = run(recipe_name, argv)
    tok = trainer.processing_class
    expected = {}
    for r in rows:
        ex = prompts.build_example(recipe_name, r)
        expected[ex["prompt"]] = ex
    ds = trainer.train_dataset
    assert len(ds) == len(rows)
    for i in range(len(ds)):
        row = ds[i]
        batch = trainer.data_collator([{k: row[k] for k in row if k not in ("prompt", "completion")}])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        ex = expected[row["prompt"]]
        # the sequence is exactly prompt + completion + EOS as one tokenisation
        assert ids == tok(ex["prompt"] + ex["completion"] + tok.eos_token)["input_ids"]
        n_prompt = len(tok(ex["prompt"])["input_ids"])
        assert ids[:n_prompt] == tok(ex["prompt"])["input_ids"], "prompt is not a token prefix"
        if train_on_inputs:
            assert labels == ids
        else:
            assert labels[:n_prompt] == [-100] * n_prompt
            assert labels[n_prompt:] == ids[n_prompt:]
            assert tok.decode(labels[n_prompt:]) == tok.decode(tok(ex["completion"] + tok.eos_token,
                                                                   add_special_tokens=False)["input_ids"])
            assert labels[-1] == tok.eos_token_id


class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt("simulated kill after the step-2 checkpoint")


def test_resume_equals_uninterrupted(tmp_path):
    data = write_json(tmp_path / "train.json", COMMONSENSE_ROWS * 2)
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2, hira_dropout=0.1)
    run("commonsense", tiny_args(data, tmp_path / "full", **common))
    with pytest.raises(KeyboardInterrupt):
        run("commonsense", tiny_args(data, tmp_path / "killed", **common), callbacks=[Kill()])
    left = os.listdir(tmp_path / "killed")
    assert "checkpoint-2" in left and "checkpoint-4" not in left and "adapter_model.safetensors" not in left
    ckpt_files = os.listdir(tmp_path / "killed" / "checkpoint-2")
    assert "adapter_model.safetensors" in ckpt_files and "optimizer.pt" in ckpt_files
    assert "model.safetensors" not in ckpt_files  # only the adapter (+ optimizer state), never the base model
    trainer = run("commonsense", tiny_args(data, tmp_path / "killed", resume_from_checkpoint="last", **common))
    assert trainer.state.global_step == 4
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in a.items() if "hira_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [None, "sb"], ids=["hira", "hira-sb"])
def test_zero3_two_processes_matches_one_process(variant, tmp_path):
    """The recipe under ZeRO-3 on 2 processes logs the losses of 1 process. With HiRA-SB the gradient-matched
    initialisation runs on the partitioned model before step 0, outside DeepSpeed's own passes: the tuner gathers W0
    and writes the factors itself, which run_summary.json shows."""
    pytest.importorskip("deepspeed")
    data = write_json(tmp_path / "train.json", COMMONSENSE_ROWS * 4)
    # The repo's zero3.yaml, with a DeepSpeed JSON that partitions even the tiny weights (persistence threshold 0).
    with open(os.path.join(ROOT, "accelerate_configs", "zero3.yaml")) as f:
        acc = yaml.safe_load(f)
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}))
    acc["deepspeed_config"] = {"deepspeed_config_file": str(ds_json), "zero3_init_flag": True}
    acc.update(num_processes=2)
    acc.pop("mixed_precision")  # set in the DeepSpeed JSON's place (fp32 here); accelerate refuses both
    acc_path = tmp_path / "zero3_cpu.yaml"
    acc_path.write_text(yaml.safe_dump(acc))
    # SGD keeps the update linear in the gradient, so a wrong reduction shows up in the losses (Adam would hide it).
    common = dict(method=ZERO3_METHOD, max_steps=3, optim="sgd", learning_rate=2.0, lora_alpha=8)
    if variant:
        common["hira_variant"] = variant
    argv = tiny_args(data, tmp_path / "z3", per_device_train_batch_size=2, ddp_backend="gloo", **common)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc_path),
         os.path.join(ROOT, "recipes", "commonsense.py"), *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    z3 = json.load(open(tmp_path / "z3" / "run_summary.json"))
    assert z3["world_size"] == 2 and z3["steps"] == 3
    if variant == "sb":
        gathered = z3["zero3_gathered_by_hira"]
        assert gathered.get("read", 0) > 0 and gathered.get("write", 0) > 0, gathered
    run("commonsense", tiny_args(data, tmp_path / "one", per_device_train_batch_size=4, **common))
    one = json.load(open(tmp_path / "one" / "run_summary.json"))
    z3_losses = [h["loss"] for h in z3["log_history"] if "loss" in h]
    one_losses = [h["loss"] for h in one["log_history"] if "loss" in h]
    assert len(z3_losses) == len(one_losses) == 3
    assert abs(z3_losses[0] - one_losses[0]) < 1e-5  # same initial weights, same 4 examples in step 1
    # later steps: same data and updates; the tolerance is far below the step-to-step loss change (~1e-2) and the
    # gap of a run that sees only half the batch (~1e-2).
    for a, b in zip(z3_losses, one_losses):
        assert abs(a - b) < 2e-3, (z3_losses, one_losses)
    assert z3_losses[-1] < z3_losses[0] - 5e-3  # it did train


@pytest.mark.parametrize(
    "variant,extra,trainable",
    [
        ("hilora", {"hira_kwargs": '{"hilora_r2": 2}'}, 2048),  # r1 + r2 = r: LoRA's budget
        ("bhra", {"hira_kwargs": '{"bhra_blocks": 2}'}, 2048),  # 2x2 grid, rank r/2 per block: LoRA's budget
        ("sb", {}, 10 * 4 * 4),  # r x r per adapted linear (10 of them)
        (None, {"hira_kwargs": '{"modulator": "random"}'}, 2048),
    ],
    ids=["hilora", "bhra", "sb", "random-modulator"],
)
def test_family_variants_through_the_recipe(variant, extra, trainable, tmp_path):
    """Every HiRA-family variant is one config key away in every recipe (here commonsense); SB gets its
    gradient-matched initialisation from the training data before step 0."""
    data = write_json(tmp_path / "train.json", COMMONSENSE_ROWS)
    args = dict(extra)
    if variant:
        args["hira_variant"] = variant
    snap = Snapshot()
    trainer = run("commonsense", tiny_args(data, tmp_path / "out", **args), callbacks=[snap])
    assert trainer.state.global_step == 2
    summary = json.load(open(tmp_path / "out" / "run_summary.json"))
    assert summary["trainable_params"] == trainable
    assert any(not torch.equal(snap.before[n], snap.after[n]) for n in snap.before), "nothing trained"
    cfg = json.load(open(tmp_path / "out" / "adapter_config.json"))
    assert cfg["peft_type"] == "HIRA_FAMILY"
    if variant == "sb":
        # Only the r×r cores train, and they start at 0 (a no-op start between the gradient-matched B and A).
        assert snap.before and all("hira_R" in n for n in snap.before)
        assert all(torch.count_nonzero(v) == 0 for v in snap.before.values())


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma2"])
def test_recipe_is_model_agnostic(arch, tmp_path):
    """Any causal LM with the target projections works: tiny random Qwen2 / Mistral / Gemma-2 saved locally (with the
    tiny Llama's tokenizer), fine-tuned with HiRA on q,k,v,up,down through the commonsense recipe."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hira.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-llama"))
    cfg = AutoConfig.for_model(
        arch, vocab_size=len(tok), hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=4, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model_dir = tmp_path / arch
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = write_json(tmp_path / "train.json", COMMONSENSE_ROWS)
    snap = Snapshot()
    trainer = run("commonsense", tiny_args(data, tmp_path / "out", model_name_or_path=str(model_dir)), callbacks=[snap])
    assert trainer.state.global_step == 2
    assert type(trainer.model.base_model.model).__name__.lower().startswith(arch)
    # r·(in+out) for q,k,v,up,down: (16+16) + (16+8)·2 + (16+64)·2 per layer, r=4, 2 layers
    assert json.load(open(tmp_path / "out" / "run_summary.json"))["trainable_params"] == 2 * 4 * (32 + 48 + 160)
    assert any(not torch.equal(snap.before[n], snap.after[n]) for n in snap.before)


def test_qhira_through_the_recipe(tmp_path):
    """`--load_in_4bit true`: the base model is loaded in 4 bit (bitsandbytes, runs on the CPU) and HiRA adapts it."""
    pytest.importorskip("bitsandbytes")
    data = write_json(tmp_path / "train.json", COMMONSENSE_ROWS)
    snap = Snapshot()
    trainer = run("commonsense", tiny_args(data, tmp_path / "out", load_in_4bit="true"), callbacks=[snap])
    assert trainer.state.global_step == 2
    layers = [m for m in trainer.model.modules() if type(m).__module__ == "hira.bnb"]
    assert len(layers) == 10, "q,k,v,up,down of both layers must be 4-bit HiRA layers"
    assert any(not torch.equal(snap.before[n], snap.after[n]) for n in snap.before)
    assert "adapter_config.json" in os.listdir(tmp_path / "out")


@pytest.mark.parametrize(
    "peft_config,trainable",
    [
        # LoHa at rank r/2 has LoRA's r·(in+out) per adapted layer: 2·(r/2)·(in+out) (the harness's matched budget)
        ({"peft_type": "LOHA", "r": 2, "alpha": 4}, 2048),
        # any other PEFT method by its config alone: IA3 learns one vector per adapted layer (feedforward: input side)
        ({"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
         2 * (16 + 16 + 64)),
    ],
    ids=["loha", "ia3"],
)
def test_any_peft_method_by_its_config(peft_config, trainable, tmp_path):
    data = write_json(tmp_path / "train.json", COMMONSENSE_ROWS)
    snap = Snapshot()
    argv = tiny_args(data, tmp_path / "out", method="peft", peft_config=json.dumps(peft_config))
    trainer = run("commonsense", argv, callbacks=[snap])
    assert trainer.state.global_step == 2
    assert json.load(open(tmp_path / "out" / "run_summary.json"))["trainable_params"] == trainable
    assert any(not torch.equal(snap.before[n], snap.after[n]) for n in snap.before), "nothing trained"
    cfg = json.load(open(tmp_path / "out" / "adapter_config.json"))
    assert cfg["peft_type"] == peft_config["peft_type"]
    if "target_modules" not in peft_config:  # defaults to the recipe's targets (q,k,v,up,down)
        assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])


@pytest.mark.parametrize(
    "peft_config,match",
    [('{"peft_type": "LOHA", "r": 2, "rank": 3}', r"LoHaConfig has no field\(s\) \['rank'\]"),
     ('{"peft_type": "NOPE"}', "Unknown peft_type 'NOPE'"),
     ('{"r": 2}', "with a `peft_type`"),
     (None, "peft_config is needed by method=peft")],
    ids=["unknown-field", "unknown-type", "no-type", "missing"],
)
def test_peft_method_config_errors(peft_config, match, tmp_path):
    data = write_json(tmp_path / "train.json", COMMONSENSE_ROWS)
    extra = {"peft_config": peft_config} if peft_config else {}
    with pytest.raises(ValueError, match=match):
        run("commonsense", tiny_args(data, tmp_path / "out", method="peft", **extra))


# --------------------------------------------------------------------------------------------------------------------
# Failure modes: one clear line, before the model loads
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    """Reaching the trainer (which loads the weights) fails loudly: the error under test must come first."""
    import trl

    monkeypatch.setattr(trl, "SFTTrainer", None)


def test_every_row_over_max_length_is_a_clear_error(tmp_path, no_model_loading):
    data = write_json(tmp_path / "train.json", COMMONSENSE_ROWS)
    with pytest.raises(ValueError, match=r"all 8 examples are longer than max_length=16 .*Raise --max_length") as err:
        run("commonsense", tiny_args(data, tmp_path / "out", max_length=16))
    assert_one_clear_line(err.value)


@pytest.mark.parametrize("value,message", [
    ("last", r"holds no checkpoint-\* folder"),
    ("runs/nope/checkpoint-7", "is not a folder"),
    ("EMPTY_DIR", "holds no trainer_state.json"),
])
def test_resume_problems_are_found_before_the_model_loads(value, message, tmp_path, no_model_loading):
    (tmp_path / "empty").mkdir()
    value = str(tmp_path / "empty") if value == "EMPTY_DIR" else value
    data = write_json(tmp_path / "train.json", COMMONSENSE_ROWS)
    with pytest.raises(FileNotFoundError, match=message) as err:
        run("commonsense", tiny_args(data, tmp_path / "out", resume_from_checkpoint=value))
    assert_one_clear_line(err.value)


def test_a_logging_integration_that_is_not_installed_is_found_before_the_model_loads(tmp_path, no_model_loading):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    data = write_json(tmp_path / "train.json", COMMONSENSE_ROWS)
    with pytest.raises(ModuleNotFoundError, match=r"report_to=wandb needs the wandb package.*pip install") as err:
        run("commonsense", tiny_args(data, tmp_path / "out", report_to="wandb"))
    assert_one_clear_line(err.value)


def test_commonsense_input_field_reaches_the_prompt(tmp_path):
    """LLM-Adapters' `input` field is used when non-empty (Alpaca "paired with an input" form), as the reference
    template does; an empty one keeps HiRA template 4. The evaluator builds the same prompt."""
    from hira.prompts import ALPACA_HEADER_INPUT

    rows = [dict(COMMONSENSE_ROWS[0], input="Context: the sky on a clear day.")] + COMMONSENSE_ROWS[1:]
    data = write_json(tmp_path / "train.json", rows)
    trainer = run("commonsense", tiny_args(data, tmp_path / "out", max_steps=1))
    prompts = {r["prompt"] for r in trainer.train_dataset}
    with_input = (f"{ALPACA_HEADER_INPUT} \n\n### Instruction:\n{rows[0]['instruction']}\n\n### Input:\n"
                  "Context: the sky on a clear day.\n\n### Response:\n")
    assert with_input in prompts
    assert sum("### Input:" in p for p in prompts) == 1  # the empty inputs keep template 4
    boolq = tmp_path / "eval" / "boolq"
    boolq.mkdir(parents=True)
    write_json(boolq / "test.json", rows)
    items = load_script("eval", "commonsense").load_task(str(tmp_path / "eval"), "boolq")
    assert items[0]["prompt"] == with_input and items[1]["prompt"] in prompts
