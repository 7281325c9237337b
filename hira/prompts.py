"""Prompt templates shared by the training recipes (``recipes/``) and the evaluators (``eval/``).

One module builds every prompt so that the text a model is trained on and the text it is evaluated on cannot drift
apart. Each task has a ``*_prompt`` function (the text the model conditions on) and a ``*_completion`` function (the
text it learns to produce). The recipes train on ``prompt + completion`` with the loss on the completion only (TRL's
prompt/completion format); the evaluators generate from ``prompt``.

Templates follow ``shared/research/protocols.md`` (section A.5, RECOMMENDED):

* commonsense: the HiRA authors' template 4 (Alpaca "no input", no indentation, two trailing spaces after the first
  sentence), completion ``the correct answer is <label>``.
* metamath / gsm8k: the MetaMath Alpaca template (a query with a newline is split into instruction + input), the
  completion is the MetaMathQA response preceded by one space (a clean token boundary after ``### Response:``).
* convai2: the HiRA/SPT persona instruction wrapped in ``CONTEXT: ... TARGET:``, completion `` <response>``.
"""

from __future__ import annotations

from collections.abc import Sequence


ALPACA_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

# --------------------------------------------------------------------------------------------------------------------
# Commonsense (commonsense_170k and the eight LLM-Adapters test sets)
# --------------------------------------------------------------------------------------------------------------------


def commonsense_prompt(instruction: str, input: str = "") -> str:
    """HiRA template 4: the prompt ends with ``### Response:\\n`` so the answer starts on its own line.

    A non-empty ``input`` (the LLM-Adapters record field; empty in commonsense_170k and the eight test sets) takes the
    Alpaca "paired with an input" form of LLM-Adapters' training template, unindented like template 4: the header
    (one trailing space), ``### Instruction:``, ``### Input:``, ``### Response:``.
    """
    if input:
        return f"{ALPACA_HEADER_INPUT} \n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"{ALPACA_HEADER}  \n\n### Instruction:\n{instruction}\n\n### Response:\n"


def commonsense_completion(label: str) -> str:
    """The target text of commonsense_170k (``output`` field): ``the correct answer is <label>``."""
    return f"the correct answer is {label}"


# --------------------------------------------------------------------------------------------------------------------
# MetaMathQA (training) and GSM8K (evaluation)
# --------------------------------------------------------------------------------------------------------------------

GSM8K_COT_TRIGGER = " Let's think step by step."


def metamath_prompt(query: str, cot_trigger: bool = False) -> str:
    """MetaMath's Alpaca prompt. A query containing a newline is split: first line = instruction, rest = input.

    ``cot_trigger=True`` appends MetaMath's `` Let's think step by step.`` after ``### Response:`` (their GSM8K eval
    prompt); the default is the training prompt, so train and test prompts are identical.
    """
    query = query.strip()
    if "\n" in query:
        instruction, extra = query.split("\n", 1)
        text = f"{ALPACA_HEADER_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{extra}\n\n### Response:"
    else:
        text = f"{ALPACA_HEADER}\n\n### Instruction:\n{query}\n\n### Response:"
    return text + (GSM8K_COT_TRIGGER if cot_trigger else "")


def metamath_completion(response: str) -> str:
    """MetaMathQA ``response`` (ends with ``The answer is: N``), preceded by one space."""
    return " " + response.strip()


# --------------------------------------------------------------------------------------------------------------------
# ConvAI2 (self persona)
# --------------------------------------------------------------------------------------------------------------------


def convai2_instruction(persona: Sequence[str], history: Sequence[str]) -> str:
    """The SPT/HiRA ConvAI2 instruction. ``history`` alternates partner (Q) and self (R) turns and ends with the
    partner's current utterance (so it has an odd length)."""
    if len(history) % 2 != 1:
        raise ValueError(
            f"ConvAI2 history must alternate Q/R turns and end with the partner's utterance (odd length); got {len(history)} turns"
        )
    lines = [f"{'Q' if i % 2 == 0 else 'R'}: {turn.strip()}" for i, turn in enumerate(history)]
    persona_text = "\n".join(p.strip() for p in persona)
    return (
        "Given the dialog history between Q and R is:\n"
        + "\n".join(lines)
        + "\n\nGiven the personality of the R as: \n"
        + persona_text
        + "\n\nPlease response to Q according to both the dialog history and the R's personality.\nNow, the R would say:"
    )


def convai2_prompt(instruction: str) -> str:
    """HiRA template 0 around the instruction: ``CONTEXT: <instruction> TARGET:``."""
    return f"CONTEXT: {instruction} TARGET:"


def convai2_completion(response: str) -> str:
    return " " + response.strip()


# --------------------------------------------------------------------------------------------------------------------
# Generic access
# --------------------------------------------------------------------------------------------------------------------

TASKS = ("commonsense", "metamath", "convai2")


def build_example(task: str, example: dict) -> dict:
    """Turn one raw record into ``{"prompt": str, "completion": str}`` for ``task``.

    Expected columns: commonsense ``instruction`` + ``output`` (LLM-Adapters format); metamath ``query`` +
    ``response`` (MetaMathQA); convai2 ``persona`` (list) + ``history`` (list) + ``response``, or a prebuilt
    ``instruction`` + ``output``.
    """
    required = {
        "commonsense": ("instruction", "output"),
        "metamath": ("query", "response"),
    }
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}")
    if task == "convai2":
        if "instruction" in example and "output" in example:
            return {"prompt": convai2_prompt(example["instruction"]), "completion": convai2_completion(example["output"])}
        missing = [c for c in ("persona", "history", "response") if c not in example]
        if missing:
            raise KeyError(
                f"convai2 example is missing column(s) {missing}: provide persona/history/response or instruction/output"
            )
        instr = convai2_instruction(example["persona"], example["history"])
        return {"prompt": convai2_prompt(instr), "completion": convai2_completion(example["response"])}
    missing = [c for c in required[task] if c not in example]
    if missing:
        raise KeyError(f"{task} example is missing column(s) {missing}; found {sorted(example)}")
    if task == "commonsense":
        prompt = commonsense_prompt(example["instruction"], example.get("input") or "")
        return {"prompt": prompt, "completion": example["output"].strip()}
    return {"prompt": metamath_prompt(example["query"]), "completion": metamath_completion(example["response"])}
