"""The training entry point: compose a config with Hydra, check it, load the pair, distil, save.

    python -m eopd.train                                   # the default config
    python -m eopd.train objective=opd seed=1              # another objective, another seed
    python -m eopd.train objective=eopd objective.tau=1.0 logger=wandb
    python -m eopd.train -m objective=opd,eopd seed=0,1,2  # a grid (Hydra multirun)
    python -m eopd.train resume=auto                       # continue the newest unfinished run of this name

Every config error (unknown option, bad value, missing model path, impossible batch sizes) is reported
before any model loads. `main()` returns the metric a sweeper optimises. Exit codes: 0 finished or
preempted (SIGTERM/SIGUSR1: checkpoint saved, `resume=auto` continues), 2 a config or data error,
3 stopped after too many non-finite updates in a row.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("eopd.train")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
SHARDED = "fsdp"  # trainer.strategy for FSDP2 through Lightning's ModelParallelStrategy (trainer=fsdp)


def _optimizer_steps(rollout_steps: int, ppo_epochs: int, batch_size: int, mini_batch_size: int) -> int:
    return int(rollout_steps) * int(ppo_epochs) * max(int(batch_size) // int(mini_batch_size), 1)


OmegaConf.register_new_resolver("eopd.optimizer_steps", _optimizer_steps, replace=True)
OmegaConf.register_new_resolver(
    "eopd.fraction_of", lambda total, f: max(int(int(total) * float(f)), 1), replace=True
)


def _run_dir_for(base: str, stamp: str, resume: str | None) -> str:
    from eopd.checkpointing import run_dir_for

    return run_dir_for(base, stamp, resume)


OmegaConf.register_new_resolver("eopd.run_dir", _run_dir_for, replace=True)  # hydra.run.dir, for resume=auto


@dataclass
class Plan:
    """Everything checked and built from the config before a model loads."""

    objective: Any
    rollout: Any
    update: Any
    optim: Any
    logging: Any
    student_source: Any
    teacher_source: Any
    student_format: Any
    teacher_format: Any
    records: dict[str, list[dict[str, Any]]]
    run_dir: Path
    max_steps: int
    recipe: Any = None
    eval_spec: Any = None
    final_spec: Any = None
    engine_options: Any = None
    benchmarks: dict[str, list[dict[str, Any]]] | None = None
    benchmark_protocol: Any = None
    resume_from: Path | None = None  # set when the run claims its directory: the checkpoint it continues from


def plan(cfg: DictConfig, run_dir: Path | str) -> Plan:
    """Check the whole config and build the cheap objects; raise ValueError naming the key otherwise."""
    from hydra.utils import instantiate

    from eopd.benchmarks import PAPER_STUDENTS, BenchmarkProtocol, load_benchmarks
    from eopd.data import LONG_PROMPTS, PromptFormat, load_records
    from eopd.evaluate import GRADERS
    from eopd.models import ModelSource
    from eopd.module import LogSpec, OptimSpec, RolloutSpec, UpdateSpec
    from eopd.pretrain import PairRecipe

    run_dir = Path(run_dir)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"config {', '.join(repr(key) for key in missing)}: required and not set (??? in its config "
            f"file); give it on the command line, e.g. {missing[0]}=<value>"
        )
    _check_positive(cfg, "rollout_steps")
    objective = _build("objective", lambda: instantiate(cfg.objective))
    rollout_fields = _plain(cfg.rollout)
    engine_options = rollout_fields.pop("engine_options", None) or {}
    rollout = _build("rollout", lambda: RolloutSpec(**rollout_fields))
    update = _build("update", lambda: UpdateSpec(**_plain(cfg["update"])))
    optim = _build("optimizer", lambda: OptimSpec(**_plain(cfg.optimizer)))
    log_spec = _build("log", lambda: LogSpec(**_plain(cfg.log)))
    if rollout.temperature != objective.temperature:
        raise ConfigError(
            f"config 'rollout.temperature'={rollout.temperature} differs from 'objective.temperature'="
            f"{objective.temperature}: sample and score at the same temperature (leave objective.temperature "
            "at its default ${rollout.temperature})"
        )
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda") and not _cuda_available():
        raise ConfigError(
            f"config 'trainer.accelerator'={accelerator!r} but no CUDA device is visible; use trainer=cpu"
        )
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if strategy != SHARDED and ("fsdp" in strategy or "deepspeed" in strategy):
        raise ConfigError(
            f"config 'trainer.strategy'={strategy!r} is not supported: the student is sharded with FSDP2 "
            f"only (trainer=fsdp, strategy '{SHARDED}'); use trainer=fsdp or trainer=ddp"
        )
    if strategy == SHARDED:
        _check_sharded(cfg.trainer, rollout.engine)
    _check_positive(cfg, "data.batch_size")
    _check_positive(cfg, "data.max_prompt_tokens")
    if cfg.data.get("long_prompts", "drop") not in LONG_PROMPTS:
        raise ConfigError(
            f"config 'data.long_prompts'={cfg.data.long_prompts!r} is unknown; allowed: {', '.join(LONG_PROMPTS)}"
        )
    steps_per_rollout = _build("update", lambda: update.steps_per_rollout(cfg.data.batch_size))
    pair = cfg.pair
    student_format = _build("pair.student_format", lambda: PromptFormat(**_plain(pair.student_format)))
    teacher_format = _build("pair.teacher_format", lambda: PromptFormat(**_plain(pair.teacher_format)))
    recipe = None
    if pair.get("build") is not None:
        recipe = _build(
            "pair.build",
            lambda: PairRecipe.from_dict(
                _plain(pair.build), student_format=student_format, teacher_format=teacher_format
            ),
        )
    sources = {}
    for side in ("student", "teacher"):
        fields = _plain(pair[side])
        fields.setdefault("tokenizer", pair.get("tokenizer"))
        source = _build(f"pair.{side}", lambda fields=fields: ModelSource(**fields))
        if recipe is None:  # a pair with a recipe is built before it loads
            _build(f"pair.{side}", lambda source=source, side=side: source.check(f"pair.{side}"))
        sources[side] = source
    for option in ("lora", "gradient_checkpointing"):
        if getattr(sources["teacher"], option):
            raise ConfigError(
                f"config 'pair.teacher.{option}' is set, but the teacher is frozen: it applies to the student only"
            )
    if sources["student"].shard:
        raise ConfigError(
            "config 'pair.student.shard' is for the teacher; the student is sharded by trainer=fsdp"
        )
    if sources["teacher"].shard and strategy != SHARDED:
        raise ConfigError(
            f"config 'pair.teacher.shard'=true needs trainer=fsdp (trainer.strategy={strategy!r}): the teacher "
            "is sharded over the same ranks as the student; set pair.teacher.shard=false to replicate it"
        )
    if sources["teacher"].shard and sources["teacher"].device_map is not None:
        raise ConfigError(
            "config 'pair.teacher.shard'=true and pair.teacher.device_map both place the teacher; keep one"
        )
    engine_options = _check_engine(rollout.engine, engine_options, cfg.trainer, sources["student"])
    eval_spec = _build("eval", lambda: _eval_spec(cfg.eval, cfg.eval))
    final_spec = _build("eval.final", lambda: _eval_spec(cfg.eval, cfg.eval.final))
    for key in ("grader",):
        if cfg.eval[key] not in GRADERS:
            raise ConfigError(
                f"config 'eval.{key}'={cfg.eval[key]!r} is unknown; allowed: {', '.join(GRADERS)}"
            )
    if cfg.data.source == "math" and cfg.eval.grader != "math":
        raise ConfigError(
            f"config 'eval.grader'={cfg.eval.grader!r} cannot grade math data (data.source=math); use eval.grader=math"
        )
    records = _build("data", lambda: load_records(_plain(cfg.data)))
    if len(records["train"]) < cfg.data.batch_size:
        raise ConfigError(
            f"config 'data.batch_size'={cfg.data.batch_size} exceeds the {len(records['train'])} training prompts; "
            "lower data.batch_size or add prompts"
        )
    for key, node in (("eval.split", cfg.eval), ("eval.final.split", cfg.eval.final)):
        if node is cfg.eval.final and not node.enabled:
            continue
        if node.split not in records:
            raise ConfigError(
                f"config '{key}'={node.split!r} is not a data split; allowed: {', '.join(records)}"
            )
    protocol = _build(
        "eval.benchmark_protocol", lambda: BenchmarkProtocol(**_plain(cfg.eval.benchmark_protocol))
    )
    # Benchmarks load here (hub or local files), so a missing file or a bad row stops the run before a model.
    benchmarks = _build(
        "eval.benchmarks", lambda: load_benchmarks(_plain(cfg.eval.benchmarks), suffix=protocol.suffix)
    )
    paper_student = cfg.eval.get("paper_student")
    if paper_student is not None and paper_student not in PAPER_STUDENTS:
        raise ConfigError(
            f"config 'eval.paper_student'={paper_student!r} is unknown; allowed: {', '.join(PAPER_STUDENTS)}"
        )
    _check_writable(run_dir)
    resume = cfg.get("resume")
    if resume not in (None, "auto") and not Path(str(resume)).expanduser().is_file():
        raise ConfigError(
            f"config 'resume'={resume!r}: no checkpoint file there; use resume=auto (the newest checkpoint "
            "in the run directory) or the path of a .ckpt file"
        )
    return Plan(
        objective=objective,
        rollout=rollout,
        update=update,
        optim=optim,
        logging=log_spec,
        student_source=sources["student"],
        teacher_source=sources["teacher"],
        student_format=student_format,
        teacher_format=teacher_format,
        records=records,
        run_dir=run_dir,
        max_steps=cfg.rollout_steps * steps_per_rollout,
        recipe=recipe,
        eval_spec=eval_spec,
        final_spec=final_spec,
        engine_options=engine_options,
        benchmarks=benchmarks,
        benchmark_protocol=protocol,
    )


def run(cfg: DictConfig, run_dir: Path | str) -> dict[str, float]:
    """Train with a composed config, writing into `run_dir`; returns the final logged metrics."""
    import lightning as L

    from eopd import checkpointing
    from eopd.data import PromptDataset, prompt_loader
    from eopd.evaluate import GRADERS, ModelSide, PeriodicEvaluation, evaluate
    from eopd.models import load_model, load_tokenizer, prepare_student
    from eopd.module import DistillModule, NonFiniteTraining, PairSpec

    p = plan(cfg, run_dir)  # every check that needs no model
    if cfg.get("resume") == "auto" and checkpointing.is_finished(p.run_dir):
        log.info("the run in %s has finished; nothing to resume (its outputs are kept)", p.run_dir)
        return checkpointing.finished_metrics(p.run_dir)
    primary = checkpointing.launched_rank() == 0
    if primary:
        claim = lambda: checkpointing.claim_run_dir(p.run_dir, cfg.get("resume"))  # noqa: E731
    else:  # a process the launcher started for another rank: rank 0 holds the directory and checked it
        claim = lambda: checkpointing.follow_run_dir(p.run_dir, cfg.get("resume"))  # noqa: E731
    lock, p.resume_from = _build("resume", claim)
    if p.resume_from is not None and primary:
        log.info("resuming from %s", p.resume_from)
        if (p.run_dir / "config.yaml").is_file():
            changed = checkpointing.config_changes(p.run_dir / "config.yaml", _plain(cfg))
            if changed:
                log.warning("resuming with a config that differs from the run's in: %s", ", ".join(changed))
    if primary:
        OmegaConf.save(cfg, p.run_dir / "config.yaml", resolve=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    pair = cfg.pair
    if p.recipe is not None:
        from eopd.pretrain import ensure_pair

        ensure_pair(p.recipe, Path(pair.build_dir))
    student_tokenizer = load_tokenizer(p.student_source, eos_token=pair.student_eos)
    teacher_tokenizer = load_tokenizer(p.teacher_source, eos_token=pair.teacher_eos)
    vocab_size = _build("pair", lambda: _shared_vocabulary(pair.name, student_tokenizer, teacher_tokenizer))
    student_eos = _token_id(student_tokenizer, pair.student_eos, "pair.student_eos")
    teacher_eos = _token_id(teacher_tokenizer, pair.teacher_eos, "pair.teacher_eos")
    pad = student_tokenizer.pad_token_id if student_tokenizer.pad_token_id is not None else student_eos
    remap = (student_eos, teacher_eos) if pair.remap_end_token and student_eos != teacher_eos else None
    pair_spec = PairSpec(
        vocab_size=vocab_size,
        pad_token_id=pad,
        student_eos_ids=(student_eos,),
        teacher_eos_ids=(teacher_eos,),
        remap_end_token=remap,
    )
    _log_prompt_example(p, student_tokenizer, teacher_tokenizer, pair_spec)
    special = {"eos_token_id": student_eos, "pad_token_id": pad}
    student = load_model(p.student_source, vocab_size=vocab_size, dtype=pair.dtype, special_ids=special)
    teacher = load_model(p.teacher_source, vocab_size=vocab_size, dtype=pair.dtype, special_ids=special)
    student = prepare_student(student, p.student_source)  # gradient checkpointing, LoRA adapters
    log.info(
        "pair %s: student %.2fM params, teacher %.2fM params, shared vocabulary %d",
        pair.name,
        _millions(student),
        _millions(teacher),
        vocab_size,
    )

    train_set = _build(
        "data.max_prompt_tokens",
        lambda: PromptDataset(
            p.records["train"],
            student_tokenizer=student_tokenizer,
            student_format=p.student_format,
            teacher_tokenizer=teacher_tokenizer,
            teacher_format=p.teacher_format,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
            long_prompts=cfg.data.get("long_prompts", "drop"),
        ),
    )
    if train_set.dropped or train_set.truncated:
        log.warning(
            "%d training prompts were longer than data.max_prompt_tokens=%d: %d dropped, %d truncated",
            train_set.dropped + train_set.truncated,
            cfg.data.max_prompt_tokens,
            train_set.dropped,
            train_set.truncated,
        )
    loader = prompt_loader(train_set, batch_size=cfg.data.batch_size, seed=cfg.seed)

    engine = None
    if p.rollout.engine != "hf":  # vLLM loads its copy of the student from disk, then gets pushed weights
        from dataclasses import replace

        from eopd.rollout_engines import make_engine, save_engine_copy

        options = p.engine_options
        if options.max_model_len is None:  # room for the longest prompt and response, no more
            options = replace(options, max_model_len=cfg.data.max_prompt_tokens + p.rollout.max_new_tokens)
        engine_dir = save_engine_copy(student, p.run_dir / "engine_student", vocab_size)
        engine = make_engine(
            p.rollout.engine,
            model_path=str(engine_dir),
            vocab_size=vocab_size,
            options=options,
            seed=cfg.seed,
        )
    module = DistillModule(
        student,
        teacher,
        p.objective,
        pair=pair_spec,
        tokenizer=student_tokenizer,
        rollout=p.rollout,
        update=p.update,
        optim=p.optim,
        logging=p.logging,
        seed=cfg.seed,
        engine=engine,
        shard_teacher=p.teacher_source.shard,
    )
    student_side = ModelSide(student, student_tokenizer, p.student_format, (student_eos,))
    teacher_side = ModelSide(teacher, teacher_tokenizer, p.teacher_format, (teacher_eos,))
    grader = GRADERS[cfg.eval.grader]()

    def evaluation(
        spec, split: str, n_problems: int, side: ModelSide, with_teacher: bool = True, teacher_model=None
    ):
        records = p.records[split][:n_problems]
        teacher_with = teacher_side
        if teacher_model is not None:  # the teacher as `on_teacher` hands it over (gathered when sharded)
            teacher_with = ModelSide(teacher_model, teacher_tokenizer, p.teacher_format, (teacher_eos,))
        return evaluate(
            side,
            records,
            grader,
            spec,
            vocab_size=vocab_size,
            teacher=teacher_with if with_teacher else None,
            remap_end_token_ids=remap,
        )

    final = cfg.eval.final
    table: dict[str, dict[str, float]] = {}
    if final.enabled:
        table["student before"] = evaluation(p.final_spec, final.split, final.n_problems, student_side)
    bench_runs: dict[str, dict[str, dict[str, float]]] = {}
    if p.benchmarks and "before" in p.benchmark_protocol.models:
        bench_runs["student before"] = _evaluate_benchmarks(p, student_side, vocab_size)
    steps_per_rollout = p.max_steps // cfg.rollout_steps
    callbacks = [checkpointing.ResumeState(), *_callbacks(cfg, p.run_dir, steps_per_rollout)]
    periodic = PeriodicEvaluation(  # on every rank under FSDP: student and teacher gathered whole
        lambda model: module.on_teacher(
            lambda teacher_model: evaluation(
                p.eval_spec,
                cfg.eval.split,
                cfg.eval.n_problems,
                ModelSide(model, student_tokenizer, p.student_format, (student_eos,)),
                teacher_model=teacher_model,
            ),
            gathered=True,
        ),
        every_n_rollout_steps=cfg.eval.every_n_rollout_steps,
        at_end=True,
    )
    callbacks.append(periodic)
    preemption = checkpointing.Preemption()  # last: an evaluation due at the stopping step still runs
    callbacks.append(preemption)
    loggers = _loggers(cfg, p.run_dir)
    if p.resume_from is not None and primary:
        checkpointing.keep_logs_until(p.run_dir, loggers, *checkpointing.checkpoint_steps(p.resume_from))
    trainer = L.Trainer(
        max_steps=p.max_steps,
        default_root_dir=str(p.run_dir),
        logger=loggers,
        callbacks=callbacks,
        plugins=[checkpointing.AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the prompt loader splits each batch over the ranks itself
        **_trainer_arguments(cfg.trainer),
    )
    try:
        trainer.fit(module, train_dataloaders=loader, ckpt_path=p.resume_from)
    except NonFiniteTraining as error:
        lock.release()
        last = checkpointing.latest_checkpoint(p.run_dir)
        raise NonFiniteTraining(f"{error}. Last checkpoint: {last or 'none written yet'}") from None
    if preemption.signal_received is not None:
        lock.release()
        raise checkpointing.Preempted(
            f"{preemption.signal_received}: stopped after rollout step {module.rollout_step} and saved "
            f"{checkpointing.latest_checkpoint(p.run_dir)}; continue with resume=auto"
        )
    trained = module.student
    if module.sharded:  # every rank gathers its shards; rank 0 evaluates and saves a plain copy
        state = module.student_state_dict()
        if trainer.is_global_zero:
            trained = load_model(
                p.student_source, vocab_size=vocab_size, dtype=pair.dtype, special_ids=special
            )
            trained = prepare_student(trained, p.student_source)  # LoRA: the same parameter names
            trained.load_state_dict(state)
            trained.to(module.device)
        del state
    if module.teacher_sharded and trainer.is_global_zero:  # rank 0 evaluates alone: a whole teacher
        teacher = load_model(p.teacher_source, vocab_size=vocab_size, dtype=pair.dtype, special_ids=special)
        teacher.requires_grad_(False).eval().to(module.device)  # frozen: the weights it was loaded with
        teacher_side = ModelSide(teacher, teacher_tokenizer, p.teacher_format, (teacher_eos,))
    if trainer.is_global_zero:  # under DDP every rank holds the same weights: one writer
        student_side.model = _save_student(
            trained, student_tokenizer, p.run_dir / "student", p.student_source
        )
        log.info("student saved to %s", p.run_dir / "student")
    metrics = dict(module.last_logs)
    if periodic.history:
        metrics.update({f"val/{k}": v for k, v in periodic.history[-1][1].items()})
    if final.enabled and trainer.is_global_zero:  # under DDP the other ranks would repeat it
        table["student after"] = evaluation(p.final_spec, final.split, final.n_problems, student_side)
        teacher_alone = ModelSide(teacher, teacher_tokenizer, p.teacher_format, (teacher_eos,))
        table["teacher"] = evaluation(
            p.final_spec, final.split, final.n_problems, teacher_alone, with_teacher=False
        )
        _report_table(table, p.final_spec, final, p.run_dir)
        metrics.update({f"test/{k}": v for k, v in table["student after"].items()})
    if p.benchmarks and trainer.is_global_zero:  # under DDP the other ranks would repeat it
        if "after" in p.benchmark_protocol.models:
            bench_runs["student after"] = _evaluate_benchmarks(p, student_side, vocab_size)
        if "teacher" in p.benchmark_protocol.models:
            teacher_only = ModelSide(teacher, teacher_tokenizer, p.teacher_format, (teacher_eos,))
            bench_runs["teacher"] = _evaluate_benchmarks(p, teacher_only, vocab_size)
        logged = _report_benchmarks(bench_runs, p.benchmark_protocol, cfg, p.run_dir)
        for logger in trainer.loggers:  # after fit: loggers have been finalised, so save again
            logger.log_metrics(logged, step=trainer.global_step)
            logger.save()
        metrics.update(logged)
    if trainer.is_global_zero:
        checkpointing.mark_finished(p.run_dir, metrics)
    lock.release()
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the metric a sweeper maximises: the final validation Pass@k (k = n)."""
    from hydra.core.hydra_config import HydraConfig

    from eopd.checkpointing import Preempted
    from eopd.module import NonFiniteTraining

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        metrics = run(cfg, run_dir)
    except ConfigError as error:
        log.error("%s", error)
        sys.exit(2)
    except Preempted as stop:
        log.warning("%s", stop)
        sys.exit(0)
    except NonFiniteTraining as error:
        log.error("%s", error)
        sys.exit(3)
    return metrics.get(f"val/pass@{cfg.eval.n_samples}", float("nan"))


# ---- helpers of this entry point ---------------------------------------------------------------------


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and the fix."""


def _build(key: str, make):
    from eopd.tasks.math_data import DataError

    try:
        return make()
    except ConfigError:
        raise
    except DataError as error:  # its message already names the file, row and config key
        raise ConfigError(str(error)) from error
    except Exception as error:  # noqa: BLE001 - re-raised with the config key that caused it
        cause = error.__cause__ if error.__cause__ is not None else error
        raise ConfigError(f"config '{key}': {cause}") from error


def _eval_spec(base, node):
    from eopd.evaluate import EvalSpec

    keys = ("n_samples", "temperature", "top_p", "max_new_tokens", "batch_size", "seed", "tau")
    return EvalSpec(**{k: node.get(k, base.get(k)) for k in keys})


def _report_table(table, spec, final, run_dir: Path) -> None:
    import json

    from eopd.evaluate import format_table

    n = spec.n_samples
    keys = [
        f"avg@{n}",
        "pass@1",
        f"pass@{n}",
        f"maj@{n}",
        "paths/distinct",
        "entropy/student",
        "entropy/student_high_frac",
        "div/fkl_high_entropy",
    ]
    text = format_table(table, keys)
    header = (
        f"final evaluation on {final.n_problems} {final.split} problems, {n} samples each, "
        f"temperature {spec.temperature}, top-p {spec.top_p}"
    )
    print(f"\n{header}\n{text}\n", flush=True)
    (run_dir / "eval.json").write_text(json.dumps(table, indent=2))


def _check_engine(engine: str, options: dict[str, Any], trainer: DictConfig, student) -> Any:
    """What the rollout engine needs, checked before any model loads; returns the vLLM options (or None).

    The vLLM engine runs in the training process on the first GPU and takes the student's full weights by
    their checkpoint names (`eopd.rollout_engines.VLLMEngine`), so it refuses what it cannot serve: a LoRA
    student and more than one training process. Those refusals come before the install check, so the
    message names the real obstacle.
    """
    from eopd.rollout_engines import VLLMOptions, vllm_available

    if engine == "hf":
        if options:
            raise ConfigError(
                f"config 'rollout.engine_options'={options} is for rollout.engine=vllm; drop it"
            )
        return None
    vllm_options = _build("rollout.engine_options", lambda: VLLMOptions(**options))
    if student.lora is not None:
        raise ConfigError(
            f"config 'pair.student.lora'={_plain_lora(student.lora)} cannot train with rollout.engine=vllm: "
            "the engine pushes the student's full weights by their checkpoint names after every update, and "
            "a LoRA student's are the adapter's (its saved directory holds the adapter alone); set "
            "pair.student.lora=null or use rollout.engine=hf"
        )
    processes, described = _training_processes(trainer)
    if processes > 1:
        raise ConfigError(
            f"config {described} starts {processes} training processes, but rollout.engine=vllm runs one engine "
            "inside the training process on the first GPU (every rank's engine would land on cuda:0); use "
            "trainer=gpu (one GPU) with rollout.engine=vllm, or rollout.engine=hf with several GPUs"
        )
    if not vllm_available():
        raise ConfigError(
            "config 'rollout.engine'='vllm' needs the optional extra: pip install -e '.[vllm]' "
            "(GPU only; docs/vllm.md); or use rollout.engine=hf"
        )
    if not _cuda_available():
        raise ConfigError("config 'rollout.engine'='vllm' needs a CUDA device; use rollout.engine=hf")
    return vllm_options


def _plain_lora(lora) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: v for k, v in asdict(lora).items() if k in ("r", "alpha")}


def _training_processes(trainer: DictConfig) -> tuple[int, str]:
    """How many processes the trainer config starts (devices x num_nodes), and the keys that say so."""
    devices = trainer.get("devices", 1)
    nodes = trainer.get("num_nodes", 1) or 1
    if devices in (-1, "-1", "auto"):
        per_node = max(_cuda_device_count(), 1) if str(trainer.get("accelerator", "cpu")) != "cpu" else 1
    elif isinstance(devices, int):
        per_node = devices
    elif isinstance(devices, str):
        per_node = len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    else:  # a list of device indices
        per_node = len(devices)
    described = f"'trainer.devices'={devices!r}"
    if nodes != 1:
        described += f" x 'trainer.num_nodes'={nodes!r}"
    return per_node * int(nodes), described


def _evaluate_benchmarks(p: Plan, side, vocab_size: int) -> dict[str, dict[str, float]]:
    from eopd.benchmarks import evaluate_benchmarks

    return evaluate_benchmarks(side, p.benchmarks, p.benchmark_protocol, vocab_size=vocab_size)


def _report_benchmarks(runs, protocol, cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Print the benchmark table (and the paper's rows), add it to eval.json; returns the logged metrics."""
    import json

    from eopd.benchmarks import benchmark_table, format_benchmark_table, paper_comparison

    n = protocol.n_samples
    table = benchmark_table(runs, n)
    header = (
        f"benchmarks: {n} samples per problem, temperature {protocol.temperature}, top-p {protocol.top_p}, "
        f"up to {protocol.max_new_tokens} new tokens; Avg@{n} and Pass@{n} as fractions"
    )
    print(f"\n{header}\n{format_benchmark_table(runs, n)}\n", flush=True)
    after = runs.get("student after")
    if cfg.eval.get("paper_student") and after is not None:
        print(paper_comparison(cfg.eval.paper_student, cfg.objective.name, after, n) + "\n", flush=True)
    path = run_dir / "eval.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved["benchmarks"] = {
        model: {
            **results,
            "mean": {k.split("/", 1)[1]: v for k, v in table[model].items() if k.startswith("mean/")},
        }
        for model, results in runs.items()
    }
    path.write_text(json.dumps(saved, indent=2))
    row = table.get("student after") or {}
    return {f"bench/{key}": value for key, value in row.items()}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def _check_positive(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"config '{key}'={value!r} must be a positive integer")


def _check_writable(run_dir: Path) -> None:
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"output directory {run_dir} cannot be created: {probe} is a file; set output_root=... to a directory"
        )
    if not os.access(probe, os.W_OK):
        raise ConfigError(
            f"output directory {run_dir} is not writable ({probe} denies writing); set output_root=..."
        )


def _plain(node) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def _token_id(tokenizer, token: str, key: str) -> int:
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ConfigError(f"config '{key}'={token!r} is not a token of the tokenizer")
    return int(ids[0])


def _shared_vocabulary(name: str, student_tokenizer, teacher_tokenizer) -> int:
    from eopd.models import VocabularyMismatchError, check_shared_vocabulary

    try:
        return check_shared_vocabulary(student_tokenizer, teacher_tokenizer)
    except VocabularyMismatchError as error:
        raise ConfigError(
            f"config 'pair' ({name}): the student's and teacher's tokenizers differ: {error}. Pick a pair "
            "whose models share one tokenizer, or point pair.student.tokenizer / pair.teacher.tokenizer at one"
        ) from None


def _millions(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _log_prompt_example(p: Plan, student_tokenizer, teacher_tokenizer, pair_spec) -> None:
    """The start-up self-test: one prompt through both formats, and what the teacher scores."""
    import torch

    from eopd.models import remap_end_token

    text = p.records["train"][0]["prompt"]
    log.info("student prompt format: %r", p.student_format.render(student_tokenizer, text))
    log.info("teacher prompt format: %r", p.teacher_format.render(teacher_tokenizer, text))
    teacher_end = pair_spec.teacher_eos_ids[0]
    if p.teacher_format.template == "chat":
        # The teacher's end token must be the one that closes an assistant turn in its own template.
        turn = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]
        rendered = teacher_tokenizer.apply_chat_template(turn, tokenize=False)
        end_text = teacher_tokenizer.convert_ids_to_tokens(teacher_end)
        if end_text not in rendered[rendered.rindex("2") :]:
            raise ConfigError(
                f"config 'pair.teacher_eos'={end_text!r} does not close an assistant turn in the teacher's chat "
                f"template (it renders {rendered!r}); set pair.teacher_eos to the token that does"
            )
    # A response ending with the student's end token, as the teacher reads it: its own prompt, the same
    # response ids, the end token remapped (PAPER.md section 3).
    prompt = p.teacher_format.encode(teacher_tokenizer, text)
    response = student_tokenizer.encode(" The answer is \\boxed{2}.", add_special_tokens=False)
    response.append(pair_spec.student_eos_ids[0])
    ids = torch.tensor([prompt + response])
    if pair_spec.remap_end_token is not None:
        from_id, to_id = pair_spec.remap_end_token
        ids = remap_end_token(
            ids, torch.ones(1, len(response), dtype=torch.bool), from_id=from_id, to_id=to_id
        )
    log.info("teacher scores a response as: %r", teacher_tokenizer.decode(ids[0].tolist()))


def _loggers(cfg: DictConfig, run_dir: Path) -> list:
    import warnings

    from lightning.pytorch.loggers import CSVLogger

    # The run directory already holds config.yaml, so Lightning warns that it is not empty and would
    # delete an old metrics.csv; a fresh run has none, and a resumed one gets its rows back
    # (checkpointing.keep_logs_until).
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    loggers: list = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    wandb_cfg = cfg.logger.get("wandb")
    if wandb_cfg is not None and wandb_cfg.get("mode", "auto") != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        mode = wandb_cfg.get("mode", "auto")
        if mode == "auto":
            mode = "online" if _wandb_api_key_present() else "offline"
        if mode == "offline":
            log.info(
                "wandb: offline (no API key); sync later with `wandb sync %s/wandb/offline-run-*`", run_dir
            )
        loggers.append(
            WandbLogger(
                project=wandb_cfg.project,
                entity=wandb_cfg.get("entity"),
                name=cfg.run_name,
                group=cfg.group,
                tags=list(cfg.tags),
                save_dir=str(run_dir),
                offline=mode == "offline",
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
    return loggers


def _wandb_api_key_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _callbacks(cfg: DictConfig, run_dir: Path, steps_per_rollout: int) -> list:
    import warnings

    from lightning.pytorch.callbacks import ModelCheckpoint

    # Lightning warns that a checkpoint taken under manual optimization holds the weights after the
    # optimizer step. Here that is the point: a checkpoint closes a rollout step, updates and all, and a
    # resumed run starts the next one (tests/test_checkpointing.py checks the metrics match exactly).
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    every = cfg.callbacks.checkpoint_every_n_steps
    if every and every > 0 and every % steps_per_rollout:
        # Lightning checks the step count between rollout steps only, so any other number would take
        # checkpoints at the least common multiple, far apart; round up to the next rollout step instead.
        rounded = -(-every // steps_per_rollout) * steps_per_rollout
        log.warning(
            "callbacks.checkpoint_every_n_steps=%d is not a multiple of the %d optimizer steps per rollout "
            "step; checkpointing every %d steps",
            every,
            steps_per_rollout,
            rounded,
        )
        every = rounded
    return [
        ModelCheckpoint(
            dirpath=str(run_dir / "checkpoints"),
            every_n_train_steps=every if every and every > 0 else None,
            save_last=True,
            save_top_k=-1 if every else 0,
            save_on_train_epoch_end=False,
        )
    ]


def _save_student(student, tokenizer, directory: Path, source=None):
    """Save the student (a LoRA student: adapter and merged model); return the model to evaluate."""
    from eopd.models import save_student

    lora = getattr(source, "lora", None)
    merge = lora.merge_on_save if lora is not None else True
    return save_student(student, directory, tokenizer, merge_lora=merge)


def _check_sharded(trainer: DictConfig, engine: str) -> None:
    """What FSDP training of the student needs, checked before any model loads."""
    devices = trainer.get("devices", 1)
    if not (isinstance(devices, int) and (devices > 0 or devices == -1)):
        raise ConfigError(
            f"config 'trainer.devices'={devices!r} must be a positive number of processes per node (or -1: "
            f"every visible GPU) with trainer.strategy={SHARDED!r}"
        )
    if engine != "hf":
        raise ConfigError(
            f"config 'rollout.engine'={engine!r} cannot sample a sharded student yet (its weights would have "
            f"to be gathered into the engine every step); use rollout.engine=hf with trainer.strategy={SHARDED!r}"
        )


def _trainer_arguments(trainer: DictConfig) -> dict[str, Any]:
    """Lightning Trainer arguments; strategy 'fsdp' becomes FSDP2 over all ranks (ModelParallelStrategy).

    DistillModule.configure_model shards the student over the mesh's data-parallel dimension, which spans
    every process (devices x num_nodes); tensor parallelism stays 1.
    """
    kwargs = _plain(trainer)
    if kwargs.get("strategy") != SHARDED:
        return kwargs
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    devices = kwargs.get("devices", 1)
    if devices == -1:
        devices = torch.cuda.device_count()
    # Checkpoints gathered whole on rank 0 and written as one file through the run's CheckpointIO: the
    # same atomic files, resume=auto and finished-run rules as every other strategy.
    kwargs["strategy"] = ModelParallelStrategy(
        data_parallel_size=devices * kwargs.get("num_nodes", 1),
        tensor_parallel_size=1,
        save_distributed_checkpoint=False,
    )
    return kwargs


if __name__ == "__main__":
    main()
