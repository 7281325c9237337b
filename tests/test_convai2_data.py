"""ConvAI2: the recipe and the evaluator read the same data with one loader and build byte-identical prompts.

The same two dialogues (one where the partner speaks first, one where R does, so the partner's turn is the silence
token) are written in every layout the loader accepts; the recipe (through its `main`, one training step) and the
evaluator (its item loader) must produce the same prompts and targets from each, and the first-turn prompt after a
silence is pinned literally (one spelling, `__SILENCE__`, whatever the source wrote)."""

import json

import pytest
from repo_scripts import load_script
from test_recipes import tiny_args

from hira.prompts import convai2_instruction


PERSONA_1 = ["i like to ski .", "i have a dog ."]
PERSONA_2 = ["i am a teacher ."]
# (partner, self) turns; None = the partner is silent (R speaks first)
TURNS_1 = [("hi , how are you ?", "i am fine , just back from skiing ."),
           ("nice , do you have pets ?", "yes , a dog named max .")]
TURNS_2 = [(None, "hello ! i just finished grading papers ."), ("what do you teach ?", "math .")]
DIALOGUES = [(PERSONA_1, TURNS_1), (PERSONA_2, TURNS_2)]

SILENCE_PROMPT = (  # the first self turn of dialogue 2, exactly
    "CONTEXT: Given the dialog history between Q and R is:\nQ: __SILENCE__\n\nGiven the personality of the R as: \n"
    "i am a teacher .\n\nPlease response to Q according to both the dialog history and the R's personality.\n"
    "Now, the R would say: TARGET:"
)


def parlai_text():
    lines = []
    for persona, turns in DIALOGUES:
        n = 0
        for p in persona:
            n += 1
            lines.append(f"{n} your persona: {p}")
        n += 1
        lines.append(f"{n} partner's persona: i cook .")
        for partner, response in turns:
            n += 1
            lines.append(f"{n} {partner or '__SILENCE__'}\t{response}\t\tdistractor|{response}")
    return "\n".join(lines) + "\n"


def turn_records(silence="__ SILENCE __"):
    """One record per self turn: persona, history (earlier turns + the partner's), response."""
    out = []
    for persona, turns in DIALOGUES:
        history = []
        for partner, response in turns:
            history = history + [partner or silence]
            out.append({"persona": persona, "history": list(history), "response": response})
            history = history + [response]
    return out


def personachat_dialogues():
    """PersonaChat JSON (HF's personachat_self_original.json, the Hub's AlekseyKorshuk/persona-chat)."""
    out, turns = [], turn_records()
    for persona, dialogue_turns in DIALOGUES:
        mine, turns = turns[:len(dialogue_turns)], turns[len(dialogue_turns):]
        out.append({"personality": persona,
                    "utterances": [{"history": t["history"], "candidates": ["distractor", t["response"]]}
                                   for t in mine]})
    return out


def prebuilt_records():
    """The HiRA/SPT builder's instruction/output JSON (from the HF JSON, so the silence is spelt with spaces)."""
    return [{"instruction": convai2_instruction(t["persona"], t["history"]), "output": t["response"] + " "}
            for t in turn_records()]


def write_layout(layout, tmp_path):
    """The dialogues in ``layout``; returns the path the recipe and the evaluator are given."""
    if layout == "parlai_txt":
        path = tmp_path / "self_original.txt"
        path.write_text(parlai_text())
    elif layout == "personachat_json":
        path = tmp_path / "personachat.json"
        path.write_text(json.dumps(personachat_dialogues()))
    elif layout == "personachat_json_split_keys":  # {"train": [...], "valid": [...]}
        path = tmp_path / "personachat_self_original.json"
        path.write_text(json.dumps({"train": personachat_dialogues(), "valid": personachat_dialogues()}))
    elif layout == "hub_layout_folder":  # what datasets.load_dataset(<Hub id>) reads: data/<split>-*.parquet
        from datasets import Dataset

        path = tmp_path / "persona-chat"
        (path / "data").mkdir(parents=True)
        for split in ("train", "validation"):
            shard = path / "data" / f"{split}-00000-of-00001.parquet"
            Dataset.from_list(personachat_dialogues()).to_parquet(str(shard))
    elif layout == "turns_jsonl":
        path = tmp_path / "turns.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in turn_records()))
    else:  # instruction_output_json
        path = tmp_path / "train.json"
        path.write_text(json.dumps(prebuilt_records()))
    return str(path)


LAYOUTS = ["parlai_txt", "personachat_json", "personachat_json_split_keys", "hub_layout_folder", "turns_jsonl",
           "instruction_output_json"]


@pytest.fixture(scope="module")
def expected():
    """Prompts and targets of the plain turns layout with ParlAI's silence spelling, built by the shared builder."""
    from hira.prompts import build_example

    return [build_example("convai2", t) for t in turn_records(silence="__SILENCE__")]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_recipe_and_evaluator_build_byte_identical_prompts(layout, expected, tmp_path):
    source = write_layout(layout, tmp_path)
    trainer = load_script("recipes", "convai2").main(tiny_args(source, tmp_path / "out", max_steps=1))
    eos = trainer.processing_class.eos_token  # TRL appends it to the completion text
    train = [{"prompt": r["prompt"], "completion": r["completion"].removesuffix(eos)} for r in trainer.train_dataset]
    items = load_script("eval", "convai2").load_convai2(source, "validation")
    assert [ex["prompt"].encode() for ex in train] == [ex["prompt"].encode() for ex in expected]
    assert [ex["completion"] for ex in train] == [ex["completion"] for ex in expected]
    assert [it["prompt"].encode() for it in items] == [ex["prompt"].encode() for ex in expected]
    assert [it["refs"] for it in items] == [[ex["completion"].strip()] for ex in expected]
    assert train[2]["prompt"] == SILENCE_PROMPT and items[2]["prompt"] == SILENCE_PROMPT
    assert not any("__ SILENCE __" in ex["prompt"] for ex in train)


def test_a_split_keyed_json_without_the_split_is_a_clear_error(tmp_path):
    from hira.convai2 import load_turns

    path = tmp_path / "personachat.json"
    path.write_text(json.dumps({"train": personachat_dialogues()}))
    with pytest.raises(ValueError, match=r"has no 'validation' split"):
        load_turns(str(path), "validation")
