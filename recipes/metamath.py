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

from hira import prompts  # noqa: E402
from hira.recipe import parse_args, run_recipe  # noqa: E402


TASK = os.path.splitext(os.path.basename(__file__))[0]  # a copy of this file names its own task


def to_prompt_completion(example: dict) -> dict:
    # MetaMath's Alpaca prompt around `query` (split at its first newline), completion " " + `response`.
    return prompts.build_example("metamath", example)


def main(argv=None, callbacks=None):
    """Parse ``argv`` (default: the command line) over the YAML beside this script and train."""
    return run_recipe(TASK, to_prompt_completion, *parse_args(__file__, argv), callbacks=callbacks)


if __name__ == "__main__":
    main()
