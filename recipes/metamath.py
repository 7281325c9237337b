"""Fine-tune a causal LM on MetaMathQA with HiRA or a baseline (TRL SFTTrainer); evaluated on GSM8K.

    accelerate launch recipes/metamath.py                                       # the paper setting in metamath.yaml
    accelerate launch --config_file accelerate_configs/zero3.yaml recipes/metamath.py --hira_r 16
    python recipes/metamath.py --method dora --learning_rate 1e-4

Any YAML key can be overridden by a flag; an unknown key is an error. Evaluate with
`python eval/gsm8k.py --ckpt <output_dir>`.
"""

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `import hira` without installing

from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser  # noqa: E402

from hira import prompts  # noqa: E402
from hira.recipe import HiraArguments, run_recipe, with_default_config  # noqa: E402


def to_prompt_completion(example: dict) -> dict:
    # MetaMath's Alpaca prompt around `query` (split at its first newline), completion " " + `response`.
    return prompts.build_example("metamath", example)


def main(script_args, training_args, model_args, hira_args, callbacks=None):
    return run_recipe("metamath", to_prompt_completion, script_args, training_args, model_args, hira_args, callbacks)


def make_parser():
    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, HiraArguments))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config(with_default_config(__file__)))
