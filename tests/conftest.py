"""Test-wide settings: offline, deterministic, single-threaded enough for a 2-core machine."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The tests' models are tiny: one thread is as fast as two and never fights another process for the cores.
import torch  # noqa: E402

torch.set_num_threads(1)
