"""Test-wide settings: offline, deterministic, single-threaded enough for a 2-core machine."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The tests' models are tiny: one thread is as fast as two and never fights another process for the cores.
import torch  # noqa: E402

torch.set_num_threads(1)


# ---- the training config, composed as the command line would ------------------------------------------------

from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


# A whole training run in seconds: the random tiny pair, 12 embedded prompts in batches of 4 (an epoch is 3
# rollout steps), 8-token responses, a small validation, no final table.
TINY_RUN = (
    "pair=tiny_random",
    "logger=csv",
    "data.batch_size=4",
    "update.mini_batch_size=2",
    "rollout.max_new_tokens=8",
    "data.n_train=12",
    "eval.n_problems=4",
    "eval.n_samples=2",
    "eval.final.enabled=false",
)


def compose_train(
    overrides: Sequence[str] = (),
    *,
    base: Sequence[str] = (),
    default_pair: str | None = "tiny_random",
    hydra_node: bool = False,
):
    """The training config as `python -m eopd.train <base> <overrides>` composes it, without running it.

    Args:
        overrides: the test's own overrides.
        base: a test module's common overrides (its tiny-run settings), placed before `overrides`.
        default_pair: chosen when no override names a pair (`tiny_random` loads nothing; the embedded
            default would build its pair); None leaves the config's own choice (an experiment's).
        hydra_node: keep the `hydra` node (launcher, sweeper, run directory).
    """
    from hydra import compose, initialize_config_dir

    import eopd.train  # noqa: F401 - registers the resolvers the config uses (eopd.optimizer_steps, ...)

    overrides = [*base, *overrides]
    if default_pair is not None and not any(o.startswith("pair=") for o in overrides):
        overrides.insert(0, f"pair={default_pair}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_node)


# ---- local math data: the training prompts and the six benchmarks, written in their hub field layouts ------

import json  # noqa: E402

import pytest  # noqa: E402


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _sums(count: int, start: int = 0) -> list[tuple[str, int]]:
    return [(f"What is {a} + {a + 3}?", 2 * a + 3) for a in range(start, start + count)]


@pytest.fixture
def math_files(tmp_path) -> dict:
    """A JSONL of 400 training prompts and one small file per benchmark, in that benchmark's own field names.

    Returns {"train": path, "benchmarks": {name: path}}; minerva is Parquet (when pyarrow is installed).
    """
    from eopd.benchmarks import BENCHMARKS

    train = write_jsonl(tmp_path / "train.jsonl", [{"problem": q, "answer": str(a)} for q, a in _sums(400)])
    benchmarks = {}
    for offset, (name, benchmark) in enumerate(BENCHMARKS.items()):
        rows = []
        for q, a in _sums(3, start=100 + 10 * offset):
            answer = [f"${a}$"] if name == "olympiadbench" else (float(a) if name == "amc23" else str(a))
            rows.append({benchmark.prompt_field: q, benchmark.answer_field: answer})
        path = tmp_path / f"{name}.jsonl"
        if name == "minerva":
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq

                path = tmp_path / f"{name}.parquet"
                pq.write_table(pa.Table.from_pylist(rows), path)
            except ImportError:
                write_jsonl(path, rows)
        else:
            write_jsonl(path, rows)
        benchmarks[name] = path
    return {"train": train, "benchmarks": benchmarks}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Make loading any tokenizer or model fail the test: for errors that must come before either loads."""
    import eopd.models

    def forbidden(*args, **kwargs):
        pytest.fail("a model or tokenizer was loaded before the error was reported")

    monkeypatch.setattr(eopd.models, "load_model", forbidden)
    monkeypatch.setattr(eopd.models, "load_tokenizer", forbidden)
