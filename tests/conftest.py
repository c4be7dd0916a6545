"""Test-wide settings: offline, deterministic, single-threaded enough for a 2-core machine."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The tests' models are tiny: one thread is as fast as two and never fights another process for the cores.
import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture
def no_model_loads(monkeypatch):
    """Make loading any tokenizer or model fail the test: for errors that must come before either loads."""
    import eopd.models

    def forbidden(*args, **kwargs):
        pytest.fail("a model or tokenizer was loaded before the error was reported")

    monkeypatch.setattr(eopd.models, "load_model", forbidden)
    monkeypatch.setattr(eopd.models, "load_tokenizer", forbidden)
