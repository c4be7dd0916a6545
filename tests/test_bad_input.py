"""Every bad input ends with one message naming the key or file and the fix, before models load, and
leaves earlier outputs as they were; long prompts are truncated or dropped and counted, never a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import conftest
import pytest
from hydra.errors import ConfigCompositionException

import eopd.models
import eopd.train
from eopd import checkpointing
from eopd.data import PromptDataset, PromptFormat
from eopd.rollout_engines import vllm_available
from eopd.tasks.tokenizer import build_tokenizer
from eopd.train import ConfigError

CONF_DIR = Path(eopd.train.CONF_DIR)
REPO = CONF_DIR.parent
TINY = ["logger=csv", "data.batch_size=4", "update.mini_batch_size=2", "rollout.max_new_tokens=8"]


compose_train = partial(conftest.compose_train, base=TINY)


@dataclass
class Case:
    overrides: list[str]
    error: type[Exception]
    names: list[str]  # the key or file, and the fix, as the message must say them
    loads_tokenizers: bool = False  # the check needs the tokenizers (never the models)
    into_earlier_run: bool = False  # aimed at the directory of the earlier run
    files: dict[str, str] = field(default_factory=dict)  # name -> content, written under tmp_path


JSONL = ["data=jsonl"]  # math prompts from a local file: `data.path`
CASES = {
    "unknown-objective": Case(
        ["objective=eopdd"], ConfigCompositionException, ["objective", "Available options"]
    ),
    "unknown-pair": Case(["pair=tiny_randomm"], ConfigCompositionException, ["pair", "Available options"]),
    "typo-in-a-key": Case(
        ["objective.tua=1.0"], ConfigCompositionException, ["objective.tua", "+objective.tua"]
    ),
    "typo-in-a-top-level-key": Case(
        ["rollout_step=3"], ConfigCompositionException, ["rollout_step", "append"]
    ),
    "negative-tau": Case(["objective.tau=-1"], ConfigError, ["objective", "tau=-1"]),
    "missing-model-directory": Case(
        ["pair.student.path={tmp}/no_such_model"],
        ConfigError,
        ["pair.student.path", "no_such_model", "config.json", "Fix the path"],
    ),
    "model-path-is-a-file": Case(
        ["pair.student.path={tmp}/model.safetensors"],
        ConfigError,
        ["pair.student.path", "is a file, not a model directory", "save_pretrained"],
        files={"model.safetensors": "not a directory"},
    ),
    "model-directory-without-weights": Case(
        ["pair.student.path={tmp}"],
        ConfigError,
        ["pair.student.path", "no weight files", "save or copy the model again"],
        files={"config.json": "{}", "tokenizer.json": "{}"},
    ),
    "model-directory-without-a-tokenizer": Case(
        ["pair.student.path={tmp}", "++pair.student.tokenizer=null"],
        ConfigError,
        ["pair.student.path", "has no tokenizer", "pair.student.tokenizer"],
        files={"config.json": "{}", "model.safetensors": "weights"},
    ),
    "teacher-student-vocabulary-mismatch": Case(
        ["+pair.teacher.tokenizer={tmp}/other_tokenizer"],
        ConfigError,
        ["config 'pair'", "tokenizer sizes differ", "pair.teacher.tokenizer"],
        loads_tokenizers=True,
    ),
    "malformed-dataset-file": Case(
        [*JSONL, "data.path={tmp}/bad.jsonl"],
        ConfigError,
        ["bad.jsonl:2", "not valid JSON", "one JSON object"],
        files={"bad.jsonl": '{"problem": "1+2=", "answer": "3"}\n{"problem": "3+4=",\n'},
    ),
    "empty-dataset-file": Case(
        [*JSONL, "data.path={tmp}/empty.jsonl"],
        ConfigError,
        ["empty.jsonl", "no rows", "config 'data'"],
        files={"empty.jsonl": "\n"},
    ),
    "row-without-the-prompt-field": Case(
        [*JSONL, "data.path={tmp}/rows.jsonl"],
        ConfigError,
        ["rows.jsonl:2", "missing field 'problem'", "has: question, answer", "data.prompt_field"],
        files={"rows.jsonl": '{"problem": "1+2=", "answer": "3"}\n{"question": "3+4=", "answer": "7"}\n'},
    ),
    "missing-dataset-file": Case(
        [*JSONL, "data.path={tmp}/no_such.jsonl"],
        ConfigError,
        ["'data.path'", "no_such.jsonl", "no such file"],
    ),
    "jsonl-without-a-path": Case(JSONL, ConfigError, ["'data.path'", "data.path=<value>"]),
    "mini-batch-does-not-divide-the-batch": Case(
        ["data.batch_size=6", "update.mini_batch_size=4"],
        ConfigError,
        [
            "update.mini_batch_size=4",
            "data.batch_size",
            "make data.batch_size x rollout.n_samples a multiple",
        ],
    ),
    "micro-batch-does-not-divide-mini-batch": Case(
        ["update.mini_batch_size=8", "update.micro_batch_size=3", "data.batch_size=8"],
        ConfigError,
        ["update.micro_batch_size=3", "update.mini_batch_size=8"],
    ),
    "eps_low-zero": Case(["objective.eps_low=0"], ConfigError, ["objective", "eps_low=0"]),
    "top_p": Case(["rollout.top_p=1.5"], ConfigError, ["rollout.top_p=1.5", "(0, 1]"]),
    "source": Case(["rollout.source=bogus"], ConfigError, ["rollout.source", "student, teacher, mix"]),
    "zero-rollout-steps": Case(["rollout_steps=0"], ConfigError, ["rollout_steps"]),
    "keep-freed-memory-not-a-bool": Case(
        ["keep_freed_memory=sometimes"], ConfigError, ["'keep_freed_memory'='sometimes'", "true or false"]
    ),
    "reuse-on-policy-forward-not-a-bool": Case(
        ["update.reuse_on_policy_forward=2"], ConfigError, ["update.reuse_on_policy_forward", "2"]
    ),
    "pack-sequences-not-a-bool": Case(
        ["update.pack_sequences=sometimes"], ConfigError, ["update.pack_sequences", "sometimes"]
    ),
    "uncached-hub-id-offline": Case(
        ["pair.teacher.path=eopd-tests/not-a-cached-model"],
        ConfigError,
        ["pair.teacher.path", "HF_HUB_OFFLINE"],
    ),
    "lr-schedule": Case(
        ["optimizer.schedule=linearr"], ConfigError, ["optimizer.schedule", "cosine, constant"]
    ),
    "deepspeed": Case(
        ["+trainer.strategy=deepspeed"], ConfigError, ["trainer.strategy", "deepspeed", "trainer=fsdp"]
    ),
    "lightning-fsdp1": Case(
        ["+trainer.strategy=fsdp_cpu_offload"],
        ConfigError,
        ["trainer.strategy", "fsdp_cpu_offload", "trainer=fsdp"],
    ),
    "fsdp-devices": Case(
        ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=auto"],
        ConfigError,
        ["trainer.devices", "'auto'"],
    ),
    "rollout-engine": Case(["rollout.engine=sglang"], ConfigError, ["rollout.engine", "hf, vllm"]),
    "seed-of-the-wrong-type": Case(["seed=abc"], ConfigError, ["config 'seed'='abc'", "integer"]),
    "number-of-the-wrong-type": Case(
        ["rollout.temperature=warm"], ConfigError, ["config 'rollout.temperature'='warm'", "a number"]
    ),
    "objective-knob-of-the-wrong-type": Case(
        ["objective.alpha=one"], ConfigError, ["config 'objective.alpha'='one'", "a number"]
    ),
    "resume-from-an-unreadable-checkpoint": Case(
        ["resume={tmp}/broken.ckpt"],
        ConfigError,
        ["broken.ckpt", "unreadable", "resume=auto"],
        files={"broken.ckpt": "half a checkpoint"},
    ),
    "batch-larger-than-the-dataset": Case(
        ["data.n_train=8", "data.batch_size=16", "update.mini_batch_size=4"],
        ConfigError,
        ["'data.batch_size'=16", "8 training prompts", "lower data.batch_size"],
    ),
    "unwritable-output-directory": Case(
        ["output_root={tmp}/a_file/outputs"],
        ConfigError,
        ["a_file is a file", "output_root"],
        files={"a_file": "not a directory"},
    ),
    "directory-of-an-earlier-run": Case(
        [],
        ConfigError,
        ["already holds a finished run", "resume=auto", "another directory"],
        into_earlier_run=True,
    ),
    "resume-from-a-missing-checkpoint": Case(
        ["resume={tmp}/missing.ckpt"], ConfigError, ["'resume'", "missing.ckpt", "resume=auto"]
    ),
    "unknown-long-prompt-policy": Case(
        ["data.long_prompts=cut"], ConfigError, ["data.long_prompts", "drop, truncate"]
    ),
    "zero-prompt-length-limit": Case(["data.max_prompt_tokens=0"], ConfigError, ["data.max_prompt_tokens"]),
    "unknown-grader": Case(["eval.grader=exact"], ConfigError, ["eval.grader", "allowed: embedded, math"]),
    "unknown-final-table-row": Case(
        ["eval.final.models=[after,during]"], ConfigError, ["eval.final.models", "before, after, teacher"]
    ),
    "reward-objective-with-one-sample-per-prompt": Case(
        ["objective=grpo", "rollout.n_samples=1"], ConfigError, ["rollout.n_samples", "rollout.n_samples=4"]
    ),
    "retained-fraction-out-of-range": Case(
        ["objective=tip", "objective.rho=1.5"], ConfigError, ["objective.rho=1.5"]
    ),
    "mini-batch-not-dividing-the-sampled-rows": Case(
        ["rollout.n_samples=3", "update.mini_batch_size=8"],
        ConfigError,
        ["update.mini_batch_size=8", "n_samples"],
    ),
    "gpu-trainer-without-a-gpu": Case(["trainer=gpu"], ConfigError, ["trainer.accelerator", "trainer=cpu"]),
    "sharded-teacher-without-fsdp": Case(
        ["+pair.teacher.shard=true"], ConfigError, ["pair.teacher.shard", "needs trainer=fsdp", "=false"]
    ),
    "sharding-asked-of-the-student": Case(
        ["+pair.student.shard=true"], ConfigError, ["pair.student.shard", "sharded by trainer=fsdp"]
    ),
    "non-finite-limit-negative": Case(
        ["update.max_nonfinite_in_a_row=-1"], ConfigError, ["update.max_nonfinite_in_a_row=-1", ">= 0"]
    ),
    # The vLLM engine's refusals come before its install check: they hold on any machine.
    "vllm-with-a-lora-student": Case(
        ["rollout=vllm", "+pair.student.lora={r: 4}"],
        ConfigError,
        ["'pair.student.lora'", "rollout.engine=vllm", "pair.student.lora=null", "rollout.engine=hf"],
    ),
    "vllm-with-several-processes": Case(
        ["rollout=vllm", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
        ConfigError,
        ["'trainer.devices'=2", "2 training processes", "cuda:0", "trainer=gpu"],
    ),
    "vllm-option-out-of-range": Case(
        ["rollout=vllm", "rollout.engine_options.sleep_level=3"],
        ConfigError,
        ["rollout.engine_options.sleep_level=3", "must be 1", "or 2"],
    ),
    "vllm-argument-the-engine-sets": Case(
        ["rollout=vllm", "+rollout.engine_options.llm_kwargs.enable_sleep_mode=false"],
        ConfigError,
        ["llm_kwargs sets enable_sleep_mode", "use the fields of rollout.engine_options"],
    ),
    "a-kept-fraction-of-zero": Case(
        ["objective=tip", "objective.rho=0"],
        ConfigError,
        ["objective.rho=0", "no token to train on", "(0, 1]"],
    ),
    "unknown-trainer-option": Case(
        ["+trainer.bogus=1"],
        ConfigError,
        ["'trainer.bogus'=1", "not an option of Lightning's Trainer", "remove it"],
    ),
    "trainer-value-lightning-rejects": Case(
        ["trainer.precision=bogus"], ConfigError, ["'trainer'", "precision='bogus'", "Fix the value"]
    ),
}
if not vllm_available():
    CASES["vllm-without-the-extra"] = Case(
        ["rollout=vllm"],
        ConfigError,
        ["'rollout.engine'='vllm'", "pip install -e '.[vllm]'", "rollout.engine=hf"],
    )


@pytest.fixture
def earlier_run(tmp_path) -> Path:
    """A finished run's directory in the output root every case writes under."""
    run_dir = tmp_path / "outputs" / "runs" / "earlier"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 0\n")
    (run_dir / "metrics.csv").write_text("step,train/loss\n1,0.5\n")
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    checkpointing.mark_finished(run_dir, {"train/loss": 0.5})
    return run_dir


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def write_other_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["[UNK]", "the", "answer", "is"])}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")))
    tokenizer.save_pretrained(directory)


@pytest.mark.parametrize("case", [pytest.param(c, id=name) for name, c in CASES.items()])
def test_bad_input_is_named_with_its_fix_before_models_load_and_keeps_earlier_outputs(
    case, tmp_path, monkeypatch, earlier_run
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, content in case.files.items():
        (tmp_path / name).write_text(content)
    if "{tmp}/other_tokenizer" in " ".join(case.overrides):
        write_other_tokenizer(tmp_path / "other_tokenizer")

    def forbidden(*args, **kwargs):
        pytest.fail("a model was loaded before the error was reported")

    monkeypatch.setattr(eopd.models, "load_model", forbidden)
    if not case.loads_tokenizers:
        monkeypatch.setattr(eopd.models, "load_tokenizer", forbidden)
    before = snapshot(earlier_run)
    overrides = [
        f"output_root={tmp_path}/outputs",
        *(o.replace("{tmp}", str(tmp_path)) for o in case.overrides),
    ]

    with pytest.raises(case.error) as info:
        cfg = compose_train(overrides)
        run_dir = earlier_run if case.into_earlier_run else Path(cfg.output_root) / "runs" / "new"
        eopd.train.run(cfg, run_dir)

    message = str(info.value)
    for name in case.names:
        assert name in message, f"{name!r} not in: {message}"
    after = snapshot(earlier_run)
    after.pop("run.lock", None)  # the lock taken to look at the directory; no output
    assert after == before
    new = tmp_path / "outputs" / "runs" / "new"
    if case.loads_tokenizers:  # the run had claimed its directory: it holds no output, and can be rerun
        assert sorted(p.name for p in new.iterdir()) == ["code.json", "config.yaml", "run.lock"]
        assert checkpointing.resume_checkpoint(None, new) is None
    else:
        assert not new.exists()


def run_train_command(*overrides: str) -> tuple[subprocess.CompletedProcess, str]:
    """`python -m eopd.train pair=tiny_random <overrides>` offline; the result and its stdout + stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "eopd.train", "pair=tiny_random", *overrides],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result, result.stdout + result.stderr


def test_bad_dataset_file_on_the_command_line_exits_2_naming_file_and_line(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"problem": "1+2=", "answer": "3"}\n\n{"text": "3+4="}\n')

    result, output = run_train_command(*JSONL, f"data.path={data}", f"output_root={tmp_path}/outputs")
    assert result.returncode == 2, output
    assert f"{data}:3" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "override, message",
    [
        # data.batch_size feeds total_optimizer_steps through a resolver: the error arises while resolving.
        (
            "data.batch_size=abc",
            "config 'data.batch_size'='abc' must be a whole number, e.g. data.batch_size=8",
        ),
        # Hydra makes the run directory before the run starts.
        (
            "output_root={tmp}/a_file/outputs",
            "config 'output_root': cannot create {tmp}/a_file/outputs/runs/",
        ),
    ],
)
def test_errors_raised_before_the_run_starts_exit_2_naming_the_key(override, message, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    override, message = (x.replace("{tmp}", str(tmp_path)) for x in (override, message))
    result, output = run_train_command(f"output_root={tmp_path}/outputs", override)
    assert result.returncode == 2, output
    assert message in output
    assert "Traceback" not in output and "Error:" not in output.replace("ERROR", "")


# ---- prompts over the length limit ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize(
    ("policy", "kept", "dropped", "truncated"), [("drop", 2, 1, 0), ("truncate", 3, 0, 1)]
)
def test_long_prompts_are_dropped_or_truncated_and_counted(tokenizer, policy, kept, dropped, truncated):
    records = [{"prompt": "1+2="}, {"prompt": "1+2+3+4+5+6+7+8+9="}, {"prompt": "3+4="}]
    limit = len(PromptFormat().encode(tokenizer, "1+2+3="))

    dataset = PromptDataset(
        records,
        student_tokenizer=tokenizer,
        student_format=PromptFormat(),
        max_prompt_tokens=limit,
        long_prompts=policy,
    )

    assert (len(dataset), dataset.dropped, dataset.truncated) == (kept, dropped, truncated)
    assert all(len(item["prompt_ids"]) <= limit for item in dataset)
    if policy == "truncate":  # the end of the prompt is kept: the model answers after it
        long_ids = PromptFormat().encode(tokenizer, records[1]["prompt"])
        assert dataset[1]["prompt_ids"] == long_ids[-limit:]


def test_training_with_prompts_over_the_limit_truncates_them_and_runs(tmp_path, caplog):
    cfg = compose_train(
        ["rollout_steps=1", "data.n_train=16", "data.max_prompt_tokens=12", "data.long_prompts=truncate"]
    )

    metrics = eopd.train.run(cfg, tmp_path / "run")

    assert "train/loss" in metrics
    assert (
        "16 training prompts were longer than data.max_prompt_tokens=12: 0 dropped, 16 truncated"
        in caplog.text
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert rows, "no training step logged"
