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

from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser  # noqa: E402

from hira import prompts  # noqa: E402
from hira.recipe import HiraArguments, run_recipe, with_default_config  # noqa: E402


def to_prompt_completion(example: dict) -> dict:
    # HiRA template 4 around `instruction`; the completion is `output` ("the correct answer is <label>").
    return prompts.build_example("commonsense", example)


def main(script_args, training_args, model_args, hira_args, callbacks=None):
    return run_recipe("commonsense", to_prompt_completion, script_args, training_args, model_args, hira_args, callbacks)


def make_parser():
    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, HiraArguments))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config(with_default_config(__file__)))
