"""Shared test setup: offline, deterministic, CPU threads pinned (2-core CI machine)."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(1)

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture
def shared_data():
    """Path of ../shared/data (real-format LLM-Adapters / GSM8K copies); skip cleanly when absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"real-format data folder {SHARED_DATA} is absent")
    return SHARED_DATA
