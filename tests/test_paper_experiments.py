"""The paper's runs as experiment overlays: they compose with its hyperparameters, check their data before any
model loads, and a tiny run through them writes the benchmark table and prints the paper's rows."""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path

import conftest
import pytest

import eopd.models
import eopd.train
from eopd.train import ConfigError, plan
from tests.conftest import write_jsonl

CONF_DIR = Path(eopd.train.CONF_DIR)
compose_train = partial(conftest.compose_train, default_pair=None)  # these tests choose their pairs
STUDENTS = {"0.6b": "math_train", "1.7b": "math_train", "4b": "dapo_math_14k"}


def local(math_files, *, data_fields: bool = True) -> list[str]:
    """A tiny pair on the CPU, and local files for the training prompts and the six benchmarks."""
    overrides = ["pair=tiny_random", "trainer=cpu", f"data.path={math_files['train']}"]
    if data_fields:
        overrides += ["data.prompt_field=problem", "data.answer_field=answer", "data.answer_from_boxed=false"]
    return overrides + [
        f"eval.benchmarks.{name}.path={path}" for name, path in math_files["benchmarks"].items()
    ]


@pytest.mark.parametrize("size", STUDENTS)
def test_paper_experiment_selects_its_pair(size):
    pair = f"qwen3_8b_to_qwen3_{size}_base"
    cfg = compose_train([f"experiment=paper_qwen3_{size}"])

    assert cfg.pair.name == pair


@pytest.mark.parametrize("size", STUDENTS)
@pytest.mark.parametrize("objective", ["opd", "eopd"])
def test_paper_experiment_has_the_paper_s_hyperparameters(size, objective, math_files, tmp_path):
    cfg = compose_train([f"experiment=paper_qwen3_{size}", f"objective={objective}", *local(math_files)])

    p = plan(cfg, tmp_path / "run")

    assert (
        cfg.data.hub_id
        == {
            "math_train": "DigitalLearningGmbH/MATH-lighteval",
            "dapo_math_14k": "open-r1/DAPO-Math-17k-Processed",
        }[STUDENTS[size]]
    )
    assert p.objective.name == objective
    assert (cfg.objective.tau, cfg.objective.alpha, cfg.objective.top_k, cfg.objective.eps_low) == (
        0.8,
        1.0,
        16,
        0.2,
    )
    assert cfg.data.batch_size == 128 and p.update.mini_batch_size == 32 and p.update.ppo_epochs == 1
    assert p.max_steps == 4 * cfg.rollout_steps  # 128 / 32 optimizer steps per rollout batch
    assert (p.optim.lr, p.optim.schedule, p.optim.warmup_steps, p.optim.weight_decay) == (
        3e-6,
        "cosine",
        0,
        0.01,
    )
    assert (p.rollout.temperature, p.rollout.top_p, p.rollout.max_new_tokens) == (1.0, 1.0, 4096)
    assert cfg.data.max_prompt_tokens == 1024
    # The evaluation protocol, separate from the training sampling.
    spec = p.benchmark_protocol.spec()
    assert (spec.n_samples, spec.temperature, spec.top_p, spec.max_new_tokens) == (8, 1.0, 0.8, 8192)
    assert list(p.benchmarks) == ["math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench"]
    assert cfg.eval.paper_student == f"qwen3_{size}_base"
    assert cfg.run_name == f"paper-qwen3-{size}-{objective}-s0"


def test_appendix_llama_experiment_samples_at_top_p_0_8_with_the_shared_recipe(math_files, tmp_path):
    assert compose_train(["experiment=paper_llama3.2_3b"]).pair.name == (
        "llama3.1_8b_instruct_to_llama3.2_3b_instruct"
    )
    cfg = compose_train(["experiment=paper_llama3.2_3b", "objective=opd", *local(math_files)])

    p = plan(cfg, tmp_path / "run")

    assert (p.rollout.temperature, p.rollout.top_p, p.rollout.max_new_tokens) == (1.0, 0.8, 4096)
    assert (p.optim.lr, cfg.data.batch_size, p.update.mini_batch_size) == (3e-6, 128, 32)
    assert p.objective.name == "opd" and cfg.run_name == "paper-llama3.2-3b-opd-s0"
    assert cfg.eval.paper_student == "llama3.2_3b_instruct"


def test_missing_benchmark_file_is_reported_before_any_model_loads(math_files, tmp_path, no_model_loads):
    missing = tmp_path / "aime25_local.jsonl"
    cfg = compose_train(
        ["experiment=paper_qwen3_1.7b", *local(math_files), f"eval.benchmarks.aime25.path={missing}"]
    )

    with pytest.raises(
        ConfigError, match=r"config 'eval.benchmarks.aime25.path'=.*aime25_local.jsonl: no such file"
    ):
        eopd.train.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bad_training_row_is_reported_with_file_line_and_field(math_files, tmp_path, no_model_loads):
    rows = [{"problem": f"What is {i}?", "answer": str(i)} for i in range(300)]
    rows[41] = {"problem": "What is 41?", "solution": "41"}
    bad = write_jsonl(tmp_path / "train_bad.jsonl", rows)
    cfg = compose_train(["experiment=paper_qwen3_0.6b", *local(math_files), f"data.path={bad}"])

    with pytest.raises(ConfigError) as info:
        eopd.train.run(cfg, tmp_path / "run")

    assert f"{bad}:42: missing field 'answer'" in str(info.value)


def test_math_data_refuses_the_embedded_grader(math_files, tmp_path):
    cfg = compose_train(
        ["data=jsonl", f"data.path={math_files['train']}", "eval.grader=embedded", "pair=tiny_random"]
    )

    with pytest.raises(ConfigError, match="eval.grader"):
        plan(cfg, tmp_path / "run")


def test_a_tiny_paper_run_writes_the_benchmark_table_and_prints_the_paper_s_rows(
    math_files, tmp_path, capsys
):
    tiny = [
        "rollout_steps=1",
        "data.batch_size=4",
        "data.n_val=2",
        "update.mini_batch_size=2",
        "update.micro_batch_size=null",
        "rollout.max_new_tokens=6",
        "eval.every_n_rollout_steps=0",
        "eval.n_problems=2",
        "eval.n_samples=1",
        "eval.benchmark_protocol.n_samples=2",
        "eval.benchmark_protocol.max_new_tokens=6",
        "eval.benchmark_protocol.models=[before,after]",
        "logger=csv",
    ]
    cfg = compose_train(["experiment=paper_qwen3_1.7b", "objective=opd", *local(math_files), *tiny])

    metrics = eopd.train.run(cfg, tmp_path / "run")

    saved = json.loads((tmp_path / "run" / "eval.json").read_text())["benchmarks"]
    assert set(saved) == {"student before", "student after"}
    after = saved["student after"]
    assert set(after) == {"math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench", "mean"}
    mean = sum(after[name]["pass@2"] for name in after if name != "mean") / 6
    assert after["mean"]["pass@2"] == pytest.approx(mean)
    assert metrics["bench/mean/pass@2"] == pytest.approx(mean)
    assert "bench/olympiadbench/avg@2" in metrics
    with open(tmp_path / "run" / "metrics.csv") as f:  # logged through the run's loggers
        logged = [row["bench/mean/pass@2"] for row in csv.DictReader(f) if row.get("bench/mean/pass@2")]
    assert [float(v) for v in logged] == [pytest.approx(mean)]
    printed = capsys.readouterr().out
    assert "paper OPD" in printed and "67.76/84.80" in printed and "this run (opd)" in printed
    assert "note: this run drew 2 samples per problem, the paper 8" in printed
    table = printed.split("benchmarks: 2 samples per problem", 1)[1]
    assert "student before avg@2" in table and "student after pass@2" in table
    assert next(line for line in table.splitlines() if line.startswith("olympiadbench"))
