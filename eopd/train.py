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
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from eopd.plan import ConfigError, Plan, build, plain, plan
from eopd.provenance import write_code_version
from eopd.trainer_options import check_trainer_options, trainer_arguments

log = logging.getLogger("eopd.train")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _optimizer_steps(
    rollout_steps: int, ppo_epochs: int, batch_size: int, mini_batch_size: int, n_samples: int = 1
) -> int:
    from eopd.specs import optimizer_steps_per_rollout

    keys = (
        "rollout_steps",
        "update.ppo_epochs",
        "data.batch_size",
        "update.mini_batch_size",
        "rollout.n_samples",
    )
    values = (rollout_steps, ppo_epochs, batch_size, mini_batch_size, n_samples)
    for key, value in zip(keys, values, strict=True):
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)):
            # Raised inside OmegaConf's resolution: `main` reports it as a config error (exit code 2).
            raise ValueError(f"config '{key}'={value!r} must be a whole number, e.g. {key}=8")
    rows = int(batch_size) * int(n_samples)
    return int(rollout_steps) * optimizer_steps_per_rollout(ppo_epochs, rows, mini_batch_size)


OmegaConf.register_new_resolver("eopd.optimizer_steps", _optimizer_steps, replace=True)
OmegaConf.register_new_resolver(
    "eopd.fraction_of", lambda total, f: max(int(int(total) * float(f)), 1), replace=True
)


def _run_dir_for(base: str, stamp: str, resume: str | None) -> str:
    from eopd.checkpointing import run_dir_for

    _check_creatable(Path(base))
    return run_dir_for(base, stamp, resume)


def _check_creatable(directory: Path) -> None:
    """Exit with code 2, naming output_root, when `directory` cannot be created: Hydra makes the run
    directory before `main` runs, so this check lives in the resolver that names it (and makes the
    directory above the run's, as Hydra would next)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(
            f"config 'output_root': cannot create {directory}: {error.strerror or error}. "
            "Give a writable folder: output_root=<path>",
            file=sys.stderr,
        )
        sys.exit(2)


OmegaConf.register_new_resolver("eopd.run_dir", _run_dir_for, replace=True)  # hydra.run.dir, for resume=auto


def run(cfg: DictConfig, run_dir: Path | str) -> dict[str, float]:
    """Train with a composed config, writing into `run_dir`; returns the final logged metrics."""
    p = plan(cfg, run_dir)  # every check that needs no model, before Lightning is imported
    check_trainer_options(cfg.trainer)  # builds a Trainer from the options alone: before any model loads

    import lightning as L

    from eopd import checkpointing
    from eopd.benchmarks import MODELS
    from eopd.callbacks import AtomicCheckpointIO, PeriodicEvaluation, Preemption, ResumeState
    from eopd.checkpointing import NonFiniteTraining
    from eopd.data import PromptDataset, prompt_loader
    from eopd.evaluation import GRADERS, EvalResult, ModelSide, evaluate
    from eopd.models import load_model, load_tokenizer, prepare_student
    from eopd.module import DistillModule
    from eopd.pairs import assemble_pair, show_pair
    from eopd.reports import loggers as make_loggers
    from eopd.reports import progress_bar, report_benchmarks, report_table

    if cfg.get("resume") == "auto" and checkpointing.is_finished(p.run_dir):
        log.info("the run in %s has finished; nothing to resume (its outputs are kept)", p.run_dir)
        return checkpointing.finished_metrics(p.run_dir)
    primary = checkpointing.launched_rank() == 0
    if primary:
        claim = lambda: checkpointing.claim_run_dir(p.run_dir, cfg.get("resume"))  # noqa: E731
    else:  # a process the launcher started for another rank: rank 0 holds the directory and checked it
        claim = lambda: checkpointing.follow_run_dir(p.run_dir, cfg.get("resume"))  # noqa: E731
    lock, p.resume_from = build("resume", claim)
    if p.resume_from is not None and primary:
        log.info("resuming from %s", p.resume_from)
        if (p.run_dir / "config.yaml").is_file():
            changed = checkpointing.config_changes(p.run_dir / "config.yaml", plain(cfg))
            if changed:
                log.warning("resuming with a config that differs from the run's in: %s", ", ".join(changed))
    if primary:
        _record_run(cfg, p.run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.get("keep_freed_memory", False):
        from eopd.allocator import keep_freed_memory

        keep_freed_memory()  # large CPU tensors reuse freed pages instead of faulting in new ones

    pair = cfg.pair
    if p.recipe is not None:
        from eopd.pretrain import describe_pair, ensure_pair

        ensure_pair(p.recipe, Path(pair.build_dir))
        if primary:
            print(f"\n{describe_pair(pair.build_dir)}\n", flush=True)
    for source in (p.teacher_source, p.student_source):  # a model from a GGUF file: converted once
        if source.gguf is not None:
            from eopd.conversion import ensure_converted

            ensure_converted(source.gguf, source.path)
    student_tokenizer = load_tokenizer(p.student_source, eos_token=pair.student_eos)
    teacher_tokenizer = load_tokenizer(p.teacher_source, eos_token=pair.teacher_eos)
    pair_spec = build(
        "pair",
        lambda: assemble_pair(
            student_tokenizer,
            teacher_tokenizer,
            student_eos=pair.student_eos,
            teacher_eos=pair.teacher_eos,
            remap_end_token=pair.remap_end_token,
            name=pair.name,
        ),
    )
    vocab_size, remap, pad = pair_spec.vocab_size, pair_spec.remap_end_token, pair_spec.pad_token_id
    student_eos, teacher_eos = pair_spec.student_eos_ids[0], pair_spec.teacher_eos_ids[0]
    grader = GRADERS[cfg.eval.grader]()
    build(
        "pair",
        lambda: show_pair(
            p.records["train"][0],
            grader,
            (student_tokenizer, p.student_format),
            (teacher_tokenizer, p.teacher_format),
            pair_spec,
        ),
    )
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

    train_set = build(
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
    batches = None
    if p.curriculum.enabled:  # batches from a pool of prompts that grows easy to hard
        from eopd.curriculum import CurriculumBatches

        batches = CurriculumBatches(
            len(train_set), batch_size=cfg.data.batch_size, spec=p.curriculum, seed=cfg.seed
        )
    loader = prompt_loader(train_set, batch_size=cfg.data.batch_size, seed=cfg.seed, batches=batches)

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
        reward=lambda records, texts: [
            float(grader.grade(r, t)) for r, t in zip(records, texts, strict=True)
        ],
    )
    student_side = ModelSide(student, student_tokenizer, p.student_format, (student_eos,))
    teacher_side = ModelSide(teacher, teacher_tokenizer, p.teacher_format, (teacher_eos,))

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
    table: dict[str, EvalResult] = {}  # the final table's rows, with their per-problem results
    rows = set(final.get("models", MODELS)) if final.enabled else set()
    if "before" in rows:
        table["student before"] = evaluation(p.final_spec, final.split, final.n_problems, student_side)
    bench_runs: dict[str, dict[str, dict[str, float]]] = {}
    if p.benchmarks and "before" in p.benchmark_protocol.models:
        bench_runs["student before"] = _evaluate_benchmarks(p, student_side, vocab_size)
    callbacks = [ResumeState(), *_callbacks(cfg, p.run_dir, p.steps_per_rollout)]
    if batches is not None:
        callbacks.append(_curriculum(p, cfg.seed, batches, train_set.items, grader, student_side, vocab_size))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(progress_bar(cfg.rollout_steps))
    periodic = PeriodicEvaluation(  # on every rank under FSDP: student and teacher gathered whole
        lambda model: module.on_teacher(
            lambda teacher_model: (
                evaluation(
                    p.eval_spec,
                    cfg.eval.split,
                    cfg.eval.n_problems,
                    ModelSide(model, student_tokenizer, p.student_format, (student_eos,)),
                    teacher_model=teacher_model,
                ).metrics
            ),
            gathered=True,
        ),
        every_n_rollout_steps=cfg.eval.every_n_rollout_steps,
        at_end=True,
    )
    callbacks.append(periodic)
    preemption = Preemption()  # last: an evaluation due at the stopping step still runs
    callbacks.append(preemption)
    loggers = make_loggers(cfg, p.run_dir)
    if p.resume_from is not None and primary:
        checkpointing.keep_logs_until(p.run_dir, loggers, *checkpointing.checkpoint_steps(p.resume_from))
    trainer = L.Trainer(
        max_steps=p.max_steps,
        default_root_dir=str(p.run_dir),
        logger=loggers,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the prompt loader splits each batch over the ranks itself
        **trainer_arguments(cfg.trainer),
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
        if "after" in rows:
            table["student after"] = evaluation(p.final_spec, final.split, final.n_problems, student_side)
        if "teacher" in rows:
            teacher_alone = ModelSide(teacher, teacher_tokenizer, p.teacher_format, (teacher_eos,))
            table["teacher"] = evaluation(
                p.final_spec, final.split, final.n_problems, teacher_alone, with_teacher=False
            )
        report_table(table, p.final_spec, final, p.run_dir, trainer.loggers)
        if "student after" in table:
            metrics.update({f"test/{k}": v for k, v in table["student after"].metrics.items()})
    if p.benchmarks and trainer.is_global_zero:  # under DDP the other ranks would repeat it
        if "after" in p.benchmark_protocol.models:
            bench_runs["student after"] = _evaluate_benchmarks(p, student_side, vocab_size)
        if "teacher" in p.benchmark_protocol.models:
            teacher_only = ModelSide(teacher, teacher_tokenizer, p.teacher_format, (teacher_eos,))
            bench_runs["teacher"] = _evaluate_benchmarks(p, teacher_only, vocab_size)
        logged = report_benchmarks(bench_runs, p.benchmark_protocol, cfg, p.run_dir)
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
    from omegaconf.errors import OmegaConfBaseException

    from eopd.checkpointing import NonFiniteTraining, Preempted

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        metrics = run(cfg, run_dir)
    except ConfigError as error:
        log.error("%s", error)
        sys.exit(2)
    except OmegaConfBaseException as error:  # a value an interpolation or a resolver could not use
        text = str(error).splitlines()[0]
        named = text[text.index("config '") :] if "config '" in text else None  # a resolver's own message
        log.error("%s", named or f"config {getattr(error, 'full_key', None)!r}: {text}")
        sys.exit(2)
    except Preempted as stop:
        log.warning("%s", stop)
        sys.exit(0)
    except NonFiniteTraining as error:
        log.error("%s", error)
        sys.exit(3)
    return metrics.get(f"val/pass@{cfg.eval.n_samples}", float("nan"))


# ---- helpers of this entry point ---------------------------------------------------------------------


def _evaluate_benchmarks(p: Plan, side, vocab_size: int) -> dict[str, dict[str, float]]:
    from eopd.benchmarks import evaluate_benchmarks

    return evaluate_benchmarks(side, p.benchmarks, p.benchmark_protocol, vocab_size=vocab_size)


def _curriculum(p: Plan, seed: int, sampler, items, grader, student_side, vocab_size: int):
    """The curriculum's callback: difficulties from a record field, or probed from the initial student."""
    from dataclasses import replace

    from eopd.callbacks import Curriculum
    from eopd.curriculum import field_difficulties
    from eopd.evaluation import EvalSpec, evaluate

    spec = p.curriculum
    if spec.difficulty == "field":
        return Curriculum(sampler, field_values=field_difficulties(items, spec.field))
    probe = EvalSpec(  # the training sampling settings, so that the pass rate is the rollouts' own
        n_samples=spec.probe_samples,
        temperature=p.rollout.temperature,
        top_p=p.rollout.top_p,
        max_new_tokens=p.rollout.max_new_tokens,
        batch_size=p.eval_spec.batch_size,
        seed=seed,
    )

    def measure(model, indices: list[int]) -> list[int]:
        if not indices:  # more ranks than prompts: this rank probes none
            return []
        side = replace(student_side, model=model)
        result = evaluate(side, [items[i] for i in indices], grader, probe, vocab_size=vocab_size)
        return list(result.problems.correct)

    return Curriculum(sampler, measure=measure)


def _millions(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _record_run(cfg: DictConfig, run_dir: Path) -> None:
    """The run's config.yaml (resolved) and code.json (the commit, so that a comparison can name it)."""
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    write_code_version(run_dir)


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
            save_top_k=(-1 if cfg.callbacks.get("keep_checkpoints", True) else 0) if every else 0,
            save_on_train_epoch_end=False,
        )
    ]


def _save_student(student, tokenizer, directory: Path, source=None):
    """Save the student (a LoRA student: adapter and merged model); return the model to evaluate."""
    from eopd.models import save_student

    lora = getattr(source, "lora", None)
    merge = lora.merge_on_save if lora is not None else True
    return save_student(student, directory, tokenizer, merge_lora=merge)


if __name__ == "__main__":
    main()
