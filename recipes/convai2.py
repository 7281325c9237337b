"""Fine-tune a causal LM on ConvAI2 (PersonaChat, self persona) with HiRA or a baseline (TRL SFTTrainer).

    accelerate launch recipes/convai2.py                                        # the paper setting in convai2.yaml
    python recipes/convai2.py --dataset_name data/convai2/train.json            # the authors' instruction/output JSON

Accepted data layouts (one is detected per dataset):
  * dialogues: `personality` (list) + `utterances` (list of {history, candidates}; the gold reply is the last
    candidate), as in the PersonaChat self_original JSON; exploded to one example per turn;
  * turns: `persona` (list) + `history` (list, ends with the partner's utterance) + `response`;
  * prebuilt: `instruction` + `output` (the HiRA authors' data_file/convai2 JSON).
Any YAML key can be overridden by a flag; an unknown key is an error. Evaluate with `python eval/convai2.py`.
"""

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `import hira` without installing

from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser  # noqa: E402

from hira import prompts  # noqa: E402
from hira.recipe import HiraArguments, run_recipe, with_default_config  # noqa: E402


SILENCE = "__SILENCE__"  # ParlAI's placeholder when R speaks first, so the history always starts with Q


def dialogues_to_turns(dataset):
    """One PersonaChat dialogue -> one row per self turn (context = all earlier turns + the partner's utterance)."""
    if "utterances" not in dataset.column_names:
        return dataset

    def explode(batch):
        out = {"persona": [], "history": [], "response": []}
        for persona, utterances in zip(batch["personality"], batch["utterances"]):
            for turn in utterances:
                history = list(turn["history"])
                if len(history) % 2 == 0:
                    history = [SILENCE] + history
                out["persona"].append(list(persona))
                out["history"].append(history)
                out["response"].append(turn["candidates"][-1])
        return out

    return dataset.map(explode, batched=True, remove_columns=dataset.column_names, desc="One row per turn")


def to_prompt_completion(example: dict) -> dict:
    # HiRA/SPT persona instruction in `CONTEXT: ... TARGET:`, completion " " + the reply.
    return prompts.build_example("convai2", example)


def main(script_args, training_args, model_args, hira_args, callbacks=None):
    return run_recipe(
        "convai2", to_prompt_completion, script_args, training_args, model_args, hira_args, callbacks, dialogues_to_turns
    )


def make_parser():
    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, HiraArguments))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config(with_default_config(__file__)))
