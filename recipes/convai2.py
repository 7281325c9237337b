"""Fine-tune a causal LM on ConvAI2 (PersonaChat, self persona) with HiRA or a baseline (TRL SFTTrainer).

    accelerate launch recipes/convai2.py                                        # the paper setting in convai2.yaml
    python recipes/convai2.py --dataset_name data/convai2/train_self_original.txt   # ParlAI text
    python recipes/convai2.py --dataset_name data/convai2/train.json            # the authors' instruction/output JSON

Data: every layout `hira.convai2.load_turns` reads (the evaluator reads the same ones with the same code): ParlAI
text, PersonaChat dialogues (`personality` + `utterances`, e.g. the Hub dataset AlekseyKorshuk/persona-chat), turns
(`persona` + `history` + `response`) or prebuilt `instruction` + `output` records; one example per self turn.
Any YAML key can be overridden by a flag; an unknown key is an error. Evaluate with `python eval/convai2.py`.
"""

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `import hira` without installing

from hira import prompts  # noqa: E402
from hira.convai2 import load_dataset_for_recipe  # noqa: E402
from hira.recipe import parse_args, run_recipe  # noqa: E402


TASK = os.path.splitext(os.path.basename(__file__))[0]  # a copy of this file names its own task


def to_prompt_completion(example: dict) -> dict:
    # HiRA/SPT persona instruction in `CONTEXT: ... TARGET:`, completion " " + the reply.
    return prompts.build_example("convai2", example)


def main(argv=None, callbacks=None):
    """Parse ``argv`` (default: the command line) over the YAML beside this script and train."""
    return run_recipe(TASK, to_prompt_completion, *parse_args(__file__, argv), callbacks=callbacks,
                      load_data=load_dataset_for_recipe)


if __name__ == "__main__":
    main()
