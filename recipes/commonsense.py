"""Fine-tune a causal LM on commonsense_170k (LLM-Adapters format) with HiRA or a baseline, on TRL's SFTTrainer.

    accelerate launch recipes/commonsense.py                                    # the paper setting in commonsense.yaml
    accelerate launch --config_file accelerate_configs/zero2.yaml recipes/commonsense.py \\
        --model_name_or_path meta-llama/Llama-2-7b-hf --hira_r 32
    python recipes/commonsense.py --method lora --learning_rate 3e-4           # a baseline: same data, same masking
    python recipes/commonsense.py --model_name_or_path smollm2-135m --dataset_name ../shared/data/commonsense/boolq \\
        --max_steps 20 --bf16 false --use_cpu true                              # a CPU smoke run

Any YAML key can be overridden by a flag; an unknown key is an error. Evaluate with
`python eval/commonsense.py --ckpt <output_dir>`.
"""

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `import hira` without installing

from hira import prompts  # noqa: E402
from hira.recipe import parse_args, run_recipe  # noqa: E402


TASK = os.path.splitext(os.path.basename(__file__))[0]  # a copy of this file names its own task


def to_prompt_completion(example: dict) -> dict:
    # HiRA template 4 around `instruction` (and `input` when non-empty); the completion is `output`.
    return prompts.build_example("commonsense", example)


def main(argv=None, callbacks=None):
    """Parse ``argv`` (default: the command line) over the YAML beside this script and train."""
    return run_recipe(TASK, to_prompt_completion, *parse_args(__file__, argv), callbacks=callbacks)


if __name__ == "__main__":
    main()
