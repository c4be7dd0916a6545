"""The training config, checked: every key that can be checked before a model loads, and the cheap objects.

`plan(cfg, run_dir)` turns a composed config (`conf/train.yaml`) into a `Plan` or raises `ConfigError`
naming the key, the value and the fix; `eopd.train.run` then loads the models. Only `eopd.train` calls it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

SHARDED = "fsdp"  # trainer.strategy for FSDP2 through Lightning's ModelParallelStrategy (trainer=fsdp)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and the fix."""


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
    steps_per_rollout: int  # optimizer steps per rollout batch (`UpdateSpec.steps_per_rollout`)
    max_steps: int
    recipe: Any = None
    eval_spec: Any = None
    final_spec: Any = None
    engine_options: Any = None
    benchmarks: dict[str, list[dict[str, Any]]] | None = None
    benchmark_protocol: Any = None
    curriculum: Any = None  # eopd.curriculum.CurriculumSpec
    resume_from: Path | None = None  # set when the run claims its directory: the checkpoint it continues from


def plan(cfg: DictConfig, run_dir: Path | str) -> Plan:
    """Check the whole config and build the cheap objects; raise ValueError naming the key otherwise."""
    from hydra.utils import instantiate

    from eopd.benchmarks import MODELS, PAPER_STUDENTS, BenchmarkProtocol, load_benchmarks
    from eopd.data import LONG_PROMPTS, PromptFormat, load_records
    from eopd.evaluation import GRADERS
    from eopd.models import ModelSource
    from eopd.pretrain import PairRecipe
    from eopd.specs import LogSpec, OptimSpec, RolloutSpec, UpdateSpec, check_sampling_matches_scoring

    run_dir = Path(run_dir)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"config {', '.join(repr(key) for key in missing)}: required and not set (??? in its config "
            f"file); give it on the command line, e.g. {missing[0]}=<value>"
        )
    _check_types(cfg)
    _check_positive(cfg, "rollout_steps")
    if not isinstance(cfg.get("keep_freed_memory", False), bool):
        raise ConfigError(
            f"config 'keep_freed_memory'={cfg.keep_freed_memory!r} must be true or false (false leaves the "
            "C library's allocator as it is)"
        )
    objective = build("objective", lambda: instantiate(cfg.objective))
    rollout_fields = plain(cfg.rollout)
    engine_options = rollout_fields.pop("engine_options", None) or {}
    rollout = build("rollout", lambda: RolloutSpec(**rollout_fields))
    update = build("update", lambda: UpdateSpec(**plain(cfg["update"])))
    optim = build("optimizer", lambda: OptimSpec(**plain(cfg.optimizer)))
    log_spec = build("log", lambda: LogSpec(**plain(cfg.log)))
    try:
        check_sampling_matches_scoring(rollout, objective.temperature)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda") and not cuda_available():
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
    steps_per_rollout = build(
        "update", lambda: update.steps_per_rollout(cfg.data.batch_size * rollout.n_samples)
    )
    if objective.needs_advantages and rollout.n_samples < 2:
        raise ConfigError(
            f"config 'rollout.n_samples'={rollout.n_samples}: objective {objective.name!r} normalises each "
            "task reward within the group of one prompt's samples, which needs at least 2; set "
            "rollout.n_samples=4 (or more)"
        )
    pair = cfg.pair
    student_format = build("pair.student_format", lambda: PromptFormat(**plain(pair.student_format)))
    teacher_format = build("pair.teacher_format", lambda: PromptFormat(**plain(pair.teacher_format)))
    recipe = None
    if pair.get("build") is not None:
        recipe = build(
            "pair.build",
            lambda: PairRecipe.from_dict(
                plain(pair.build), student_format=student_format, teacher_format=teacher_format
            ),
        )
    sources = {}
    for side in ("student", "teacher"):
        fields = plain(pair[side])
        fields.setdefault("tokenizer", pair.get("tokenizer"))
        sources[side] = build(f"pair.{side}", lambda fields=fields: ModelSource(**fields))
    converted = {source.path for source in sources.values() if source.gguf is not None}
    for side, source in sources.items():
        if recipe is None:  # a pair with a recipe is built before it loads
            build(f"pair.{side}", lambda s=source, k=side: s.check(f"pair.{k}", converted=converted))
    if sources["teacher"].init is not None:
        raise ConfigError(
            "config 'pair.teacher.init' is set, but only a student is made from another model's layers; "
            "move it to pair.student.init"
        )
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
    eval_spec = build("eval", lambda: _eval_spec(cfg.eval, cfg.eval))
    final_spec = build("eval.final", lambda: _eval_spec(cfg.eval, cfg.eval.final))
    for key in ("grader",):
        if cfg.eval[key] not in GRADERS:
            raise ConfigError(
                f"config 'eval.{key}'={cfg.eval[key]!r} is unknown; allowed: {', '.join(GRADERS)}"
            )
    if cfg.data.source == "math" and cfg.eval.grader != "math":
        raise ConfigError(
            f"config 'eval.grader'={cfg.eval.grader!r} cannot grade math data (data.source=math); use eval.grader=math"
        )
    records = build("data", lambda: load_records(plain(cfg.data)))
    if len(records["train"]) < cfg.data.batch_size:
        raise ConfigError(
            f"config 'data.batch_size'={cfg.data.batch_size} exceeds the {len(records['train'])} training prompts; "
            "lower data.batch_size or add prompts"
        )
    final_models = list(cfg.eval.final.get("models", MODELS))
    if cfg.eval.final.enabled and (not final_models or set(final_models) - set(MODELS)):
        raise ConfigError(
            f"config 'eval.final.models'={final_models} must name some of {', '.join(MODELS)} "
            "(the rows of the final table)"
        )
    for key, node in (("eval.split", cfg.eval), ("eval.final.split", cfg.eval.final)):
        if node is cfg.eval.final and not node.enabled:
            continue
        if node.split not in records:
            raise ConfigError(
                f"config '{key}'={node.split!r} is not a data split; allowed: {', '.join(records)}"
            )
    curriculum = _check_curriculum(cfg, records["train"])
    protocol = build(
        "eval.benchmark_protocol", lambda: BenchmarkProtocol(**plain(cfg.eval.benchmark_protocol))
    )
    # Benchmarks load here (hub or local files), so a missing file or a bad row stops the run before a model.
    benchmarks = build(
        "eval.benchmarks", lambda: load_benchmarks(plain(cfg.eval.benchmarks), suffix=protocol.suffix)
    )
    paper_student = cfg.eval.get("paper_student")
    if paper_student is not None and paper_student not in PAPER_STUDENTS:
        raise ConfigError(
            f"config 'eval.paper_student'={paper_student!r} is unknown; allowed: {', '.join(PAPER_STUDENTS)}"
        )
    _check_writable(run_dir)
    resume = cfg.get("resume")
    if resume not in (None, "auto"):
        from eopd.checkpointing import resume_file

        try:
            resume_file(resume)  # present and readable, before a model loads or the run claims a directory
        except ValueError as error:
            raise ConfigError(str(error)) from None
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
        steps_per_rollout=steps_per_rollout,
        max_steps=cfg.rollout_steps * steps_per_rollout,
        recipe=recipe,
        eval_spec=eval_spec,
        final_spec=final_spec,
        engine_options=engine_options,
        benchmarks=benchmarks,
        benchmark_protocol=protocol,
        curriculum=curriculum,
    )


def _check_curriculum(cfg: DictConfig, train: list[dict[str, Any]]):
    """The curriculum's spec, checked before a model loads (difficulty="field": every record's field too)."""
    from eopd.curriculum import CurriculumSpec, field_difficulties

    spec = build("curriculum", lambda: CurriculumSpec(**plain(cfg.get("curriculum"))))
    if not spec.enabled:
        return spec
    smallest = len(train) // spec.stages
    if smallest < cfg.data.batch_size:
        raise ConfigError(
            f"config 'curriculum.stages'={spec.stages}: the easiest stage holds {smallest} of the "
            f"{len(train)} training prompts, fewer than data.batch_size={cfg.data.batch_size}; lower "
            "curriculum.stages or data.batch_size"
        )
    if cfg.rollout.source != "student":
        raise ConfigError(
            f"config 'curriculum.enabled'=true with rollout.source={cfg.rollout.source!r}: the curriculum "
            "follows the student's competence on its own samples; use rollout.source=student or curriculum=none"
        )
    if spec.difficulty == "field":
        build("curriculum.field", lambda: field_difficulties(train, spec.field))
    return spec


def build(key: str, make):
    """`make()`, with any error it raises turned into a `ConfigError` that names `key`."""
    from eopd.pairs import PairError
    from eopd.tasks.math_data import DataError

    try:
        return make()
    except ConfigError:
        raise
    except PairError as error:  # its message already names the config key
        raise ConfigError(str(error)) from None
    except DataError as error:  # its message already names the file, row and config key
        raise ConfigError(str(error)) from error
    except Exception as error:  # noqa: BLE001 - re-raised with the config key that caused it
        cause = error.__cause__ if error.__cause__ is not None else error
        raise ConfigError(f"config '{key}': {cause}") from error


def plain(node) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def _eval_spec(base, node):
    from eopd.evaluation import EvalSpec

    keys = ("n_samples", "temperature", "top_p", "max_new_tokens", "batch_size", "seed", "tau")
    return EvalSpec(**{k: node.get(k, base.get(k)) for k in keys})


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
    vllm_options = build("rollout.engine_options", lambda: VLLMOptions(**options))
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
    if not cuda_available():
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


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Integer keys that no dataclass owns (those that one does are checked against its fields).
_INTEGER_KEYS = (
    "seed", "data.seed", "data.n_train", "data.n_val", "data.n_test", "data.limit",
    "eval.every_n_rollout_steps", "eval.n_problems", "eval.final.n_problems",
    "callbacks.checkpoint_every_n_steps",
)  # fmt: skip


def _check_types(cfg: DictConfig) -> None:
    """A value of the wrong type for a numeric key (`seed=abc`) is a `ConfigError` naming the key.

    Keys that build an object are checked against its fields' types (the dataclass, or the function
    `_target_` names); the others are listed in `_INTEGER_KEYS`.
    """
    import typing

    from hydra.utils import get_object

    from eopd.benchmarks import BenchmarkProtocol
    from eopd.curriculum import CurriculumSpec
    from eopd.evaluation import EvalSpec
    from eopd.models import ModelSource
    from eopd.specs import LogSpec, OptimSpec, RolloutSpec, UpdateSpec

    for key in _INTEGER_KEYS:
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"config '{key}'={value!r} must be an integer")
    owners: dict[str, Any] = {
        "rollout": RolloutSpec,
        "update": UpdateSpec,
        "optimizer": OptimSpec,
        "log": LogSpec,
        "curriculum": CurriculumSpec,
        "eval": EvalSpec,
        "eval.final": EvalSpec,
        "eval.benchmark_protocol": BenchmarkProtocol,
        "pair.student": ModelSource,
        "pair.teacher": ModelSource,
    }
    target = OmegaConf.select(cfg, "objective._target_", default=None)
    if target is not None:
        owners["objective"] = build("objective._target_", lambda: get_object(target))
    for key, owner in owners.items():
        node = OmegaConf.select(cfg, key, default=None)
        if node is None:
            continue
        hints = typing.get_type_hints(owner)
        for name, value in plain(node).items():
            allowed = typing.get_args(hints.get(name)) or (hints.get(name),)
            numeric = any(t in (int, float) for t in allowed) and str not in allowed
            if numeric and isinstance(value, str):
                kind = "an integer" if float not in allowed else "a number"
                raise ConfigError(f"config '{key}.{name}'={value!r} must be {kind}")


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
