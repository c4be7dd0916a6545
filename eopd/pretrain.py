"""Builds the embedded default pair: a teacher that has learnt every fork, a student collapsed onto one path.

    python -m eopd.pretrain                                  # build (or reuse) outputs/pairs/embedded
    python -m eopd.pretrain pair.build.teacher.max_steps=2500 # a different recipe: a new fingerprint, a rebuild

Both models are trained supervised on the fork variant of the embedded task (`eopd.tasks.multipath`,
`before`): adding digits in an order that puts one named term before another. The teacher sees
reference solutions drawn uniformly over the valid paths, so a well-trained teacher is uncertain exactly
at the forks and avoids their dead ends. The student sees mostly one canonical path per problem, the
order the prompt shows, and that path ignores the precedence: it starts collapsed at the forks and fails,
on every sample, the problems whose prompt order is a dead end, as a base model that learnt one way of
solving a problem does. The student does not start from scratch: it continues the teacher's first
validated snapshot past `PairRecipe.base_min_avg` (the arithmetic learnt, a shared pre-training), so it
needs a few hundred steps rather than its own plateau. At the tokens that choose a term the teacher
trains on the exact next-term distribution (`ModelRecipe.fork_targets`). The teacher is a chat model
(chat template, `<|im_end|>`); the student a "base" model (plain prompt, `<|endoftext|>`).

Each model trains until its validation metrics enter a target band (`Target`), checked every
`eval_every` steps, not for a fixed number of steps: tiny models on a CPU learn the task's arithmetic
after a plateau whose length depends on the seed and on the floating-point kernels, so a fixed step count
gives different models on different machines, while a band gives the same kind of model on all. If
`max_steps` comes first, the snapshot closest to the band is kept and the build says what it reached.
Both are saved in Hugging Face format with their tokenizers; pair.json records the recipe, its
fingerprint and what each model reached. `eopd.train` calls `ensure_pair` itself, so
`python -m eopd.train pair=embedded` builds the pair on first use.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from eopd.data import PromptFormat
from eopd.models import build_causal_lm
from eopd.objectives.gates import PAPER_TAU
from eopd.supervised import Target, train_supervised
from eopd.tasks.multipath import (
    ideal_high_entropy_fraction,
    make_splits,
    one_branch_fraction,
)
from eopd.tasks.tokenizer import END_OF_TEXT, IM_END, build_tokenizer

log = logging.getLogger("eopd.pretrain")

# Bump when the training code changes in a way that changes the models a recipe produces.
RECIPE_VERSION = 3


@dataclass(frozen=True)
class ModelRecipe:
    """Architecture and supervised training of one model of the pair.

    Attributes:
        hidden_size, num_layers, num_heads: the Qwen3-style architecture.
        max_steps: the cap on optimizer steps; the cosine learning-rate schedule spans it.
        batch_size, lr, warmup_steps: AdamW (weight decay 0.01, betas 0.9/0.98), linear warm-up.
        seed: weight initialisation and the order of training problems.
        canonical_fraction: fraction of training solutions that take the canonical path (the prompt's
            order, the precedence ignored); the rest are reference solutions, uniform over valid paths.
        eval_every: validate every this many steps.
        target: the band the build stops in.
        fork_targets: at the tokens that choose the next term, train on the reference sampler's exact
            next-term distribution instead of the one term the sampled solution took (the same expected
            gradient without its sampling noise; the other tokens are determined either way).
        start: "scratch" (fresh weights from `seed`) or "base": the teacher's first validated snapshot
            with Avg@n >= `PairRecipe.base_min_avg` (a shared pre-training; the same architecture).
    """

    hidden_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    max_steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    seed: int = 0
    canonical_fraction: float = 0.0
    eval_every: int = 250
    target: Target = field(default_factory=Target)
    fork_targets: bool = False
    start: str = "scratch"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "max_steps", "batch_size", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"build.{name}={value!r} must be a positive integer")
        if not 0 <= self.canonical_fraction <= 1:
            raise ValueError(f"build.canonical_fraction={self.canonical_fraction} must lie in [0, 1]")
        if self.start not in ("scratch", "base"):
            raise ValueError(f"build.start={self.start!r} must be 'scratch' or 'base'")

    def architecture(self) -> tuple[int, int, int]:
        return self.hidden_size, self.num_layers, self.num_heads


@dataclass(frozen=True)
class PairRecipe:
    """Everything that determines the embedded pair; its fingerprint names the build.

    The task split parameters (`task_seed`, `n_train`, `n_val`, `n_test`, `before`, `sizes`) are those of
    conf/data/embedded.yaml, so the build validates on the data's validation split and never sees a
    test problem. `base_min_avg`: the teacher's first validated snapshot at or above this Avg@n is the
    shared base a student with `start: base` continues from.
    """

    task_seed: int = 0
    n_train: int = 2000
    n_val: int = 64
    n_test: int = 128
    before: bool = True
    sizes: tuple[int, ...] = (4, 5, 6)
    teacher: ModelRecipe = field(default_factory=ModelRecipe)
    student: ModelRecipe = field(default_factory=lambda: ModelRecipe(canonical_fraction=0.9))
    teacher_format: PromptFormat = field(default_factory=lambda: PromptFormat(template="chat"))
    student_format: PromptFormat = field(default_factory=lambda: PromptFormat(prefix="Q: ", suffix="\nA: "))
    eval_samples: int = 4
    tau: float = PAPER_TAU
    threads: int = 2
    base_min_avg: float = 0.5

    def __post_init__(self) -> None:
        if self.teacher.start != "scratch":
            raise ValueError(f"build.teacher.start={self.teacher.start!r}: the teacher starts from scratch")
        if self.student.start == "base" and self.student.architecture() != self.teacher.architecture():
            raise ValueError(
                f"build.student.start='base' continues the teacher's weights, so the student needs the "
                f"teacher's architecture (hidden_size, num_layers, num_heads) {self.teacher.architecture()}, "
                f"got {self.student.architecture()}; set them equal or use start: scratch"
            )
        if not 0 <= self.base_min_avg <= 1:
            raise ValueError(f"build.base_min_avg={self.base_min_avg} must lie in [0, 1]")

    @classmethod
    def from_dict(
        cls, fields: dict, *, student_format: PromptFormat, teacher_format: PromptFormat
    ) -> PairRecipe:
        """A recipe from plain config values (the `build` node of conf/pair/embedded.yaml)."""
        fields = dict(fields)

        def model(values: dict) -> ModelRecipe:
            values = dict(values)
            target = Target(**values.pop("target", {}))
            return ModelRecipe(**values, target=target)

        return cls(
            **{k: v for k, v in fields.items() if k not in ("teacher", "student")},
            teacher=model(fields.get("teacher", {})),
            student=model(fields.get("student", {})),
            teacher_format=teacher_format,
            student_format=student_format,
        )

    def fingerprint(self) -> str:
        payload = json.dumps({"version": RECIPE_VERSION, **asdict(self)}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def splits(self) -> dict:
        return make_splits(
            self.task_seed, self.n_train, self.n_val, self.n_test, sizes=tuple(self.sizes), before=self.before
        )


def ensure_pair(recipe: PairRecipe, directory: Path | str) -> Path:
    """Build the pair into `directory` unless a build with the same fingerprint is already there.

    Returns:
        `directory`, holding teacher/ and student/ (HF format) and pair.json (fingerprint and report).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Jobs of one sweep may start together on a fresh machine: one builds, the others wait and reuse.
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = directory / "pair.json"
        fingerprint = recipe.fingerprint()
        if manifest.is_file():
            found = json.loads(manifest.read_text())
            if found.get("fingerprint") == fingerprint and (directory / "teacher").is_dir():
                log.info("reusing the embedded pair in %s (fingerprint %s)", directory, fingerprint)
                return directory
            log.info(
                "the pair in %s has another recipe (fingerprint %s); rebuilding",
                directory,
                found.get("fingerprint"),
            )
        log.info("building the embedded pair in %s (a few minutes on 2 CPU cores, once)", directory)
        build_pair(recipe, directory)
    return directory


def build_pair(recipe: PairRecipe, directory: Path | str) -> dict:
    """Train and save the teacher and the student; write pair.json last, so a half-built pair is never reused."""
    directory = Path(directory)
    torch.set_num_threads(recipe.threads)
    start = time.perf_counter()
    splits = recipe.splits()
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    report: dict = {
        "fingerprint": recipe.fingerprint(),
        "recipe": json.loads(json.dumps(asdict(recipe), default=str)),
        "ideal_high_entropy_frac": ideal_high_entropy_fraction(splits["val"], recipe.tau),
        "one_branch_solved": one_branch_fraction(splits["val"]),
        "machine": {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()},
    }
    teacher_state = None
    base: dict = {}  # the teacher's first snapshot at base_min_avg, for a student with start: base

    def keep_base(model, reached: dict) -> None:
        if not base and reached["avg"] >= recipe.base_min_avg:
            base.update(state=copy.deepcopy(model.state_dict()), step=reached["step"], avg=reached["avg"])

    for role, model_recipe, prompt_format, eos in (
        ("teacher", recipe.teacher, recipe.teacher_format, IM_END),
        ("student", recipe.student, recipe.student_format, END_OF_TEXT),
    ):
        tokenizer = build_tokenizer(eos_token=eos)
        model = build_causal_lm(
            vocab_size=len(tokenizer),
            hidden_size=model_recipe.hidden_size,
            num_layers=model_recipe.num_layers,
            num_heads=model_recipe.num_heads,
            seed=model_recipe.seed,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        if model_recipe.start == "base":
            if not base:  # the teacher never reached base_min_avg: its kept snapshot is the closest there is
                log.warning(
                    "the teacher never reached Avg %.2f; the student starts from the teacher",
                    recipe.base_min_avg,
                )
                base.update(
                    state=copy.deepcopy(teacher_state),
                    step=report["teacher"]["step"],
                    avg=report["teacher"]["avg"],
                )
            model.load_state_dict(base["state"])
            report["base"] = {"step": base["step"], "avg": base["avg"]}
            log.info(
                "student: starts from the teacher's snapshot at step %d (val avg %.3f)",
                base["step"],
                base["avg"],
            )
        validator = _Validator(
            recipe, splits["val"], tokenizer, prompt_format, report["ideal_high_entropy_frac"]
        )
        t0 = time.perf_counter()
        reached = train_supervised(
            model,
            tokenizer,
            splits["train"],
            prompt_format,
            model_recipe,
            validator,
            on_validated=keep_base if role == "teacher" else None,
        )
        reached["train_seconds"] = round(time.perf_counter() - t0, 1)
        log.info(
            "%s: %.2fM params; %s",
            role,
            sum(p.numel() for p in model.parameters()) / 1e6,
            describe_reached(role, reached, model_recipe),
        )
        if role == "teacher":
            teacher_state = model.state_dict()
        model.save_pretrained(staging / role)
        tokenizer.save_pretrained(staging / role)
        report[role] = reached
    report["build_seconds"] = round(time.perf_counter() - start, 1)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    (directory / "pair.json").write_text(json.dumps(report, indent=2))
    return report


def describe_reached(role: str, reached: dict, recipe: ModelRecipe) -> str:
    """One line on where a model's build stopped and whether it met its target band."""
    n = reached["eval_samples"]
    metrics = (
        f"avg@{n} {reached['avg']:.3f}, pass@{n} {reached['pass']:.3f}, "
        f"high-entropy tokens {reached['high_frac']:.1%} (ideal {reached['ideal_high_frac']:.1%})"
    )
    if reached["target_met"]:
        return f"target met at step {reached['step']} of at most {recipe.max_steps}: {metrics}"
    return (
        f"WARNING: the {role} did not reach its target {asdict(recipe.target)} within {recipe.max_steps} "
        f"steps; kept the closest snapshot, step {reached['step']}: {metrics}"
    )


class _Validator:
    """Samples a model on the validation split and measures what its `Target` checks."""

    def __init__(self, recipe: PairRecipe, problems, tokenizer, prompt_format: PromptFormat, ideal: float):
        from eopd.evaluation import EmbeddedGrader, EvalSpec, ModelSide

        self.records = [{"id": p.id, "prompt": p.prompt, "answer": p.answer, "problem": p} for p in problems]
        self.spec = EvalSpec(n_samples=recipe.eval_samples, max_new_tokens=48, tau=recipe.tau, batch_size=64)
        self.grader = EmbeddedGrader()
        self.side = lambda model: ModelSide(model, tokenizer, prompt_format, (tokenizer.eos_token_id,))
        self.vocab_size = len(tokenizer)
        self.ideal = ideal

    def __call__(self, model) -> dict:
        from eopd.evaluation import evaluate

        n = self.spec.n_samples
        metrics = evaluate(
            self.side(model), self.records, self.grader, self.spec, vocab_size=self.vocab_size
        ).metrics
        return {
            "avg": metrics[f"avg@{n}"],
            "pass": metrics[f"pass@{n}"],
            "high_frac": metrics["entropy/student_high_frac"],
            "ideal_high_frac": self.ideal,
            "paths_distinct": metrics["paths/distinct"],
            "eval_samples": n,
        }


def describe_pair(directory: Path | str) -> str:
    """What the build in `directory` reached (from its pair.json), a few lines for a terminal."""
    directory = Path(directory)
    manifest = json.loads((directory / "pair.json").read_text())
    recipe = manifest["recipe"]
    lines = [
        f"embedded pair in {directory} (fingerprint {manifest['fingerprint']}, built in {manifest['build_seconds']:.0f} s)"
    ]
    for role in ("teacher", "student"):
        r = manifest[role]
        n = r["eval_samples"]
        met = "target met" if r["target_met"] else "TARGET NOT MET (closest snapshot kept)"
        lines.append(
            f"  {role:<8} step {r['step']:>5}  val avg@{n} {r['avg']:.3f}  pass@{n} {r['pass']:.3f}  "
            f"tokens with entropy >= {recipe['tau']}: {r['high_frac']:.1%}  {met}"
        )
    lines.append(
        f"  task's ideal high-entropy fraction {manifest['ideal_high_entropy_frac']:.1%}; "
        f"prompt order valid on {manifest['one_branch_solved']:.1%} of validation problems"
    )
    return "\n".join(lines)


def main() -> None:
    """`python -m eopd.pretrain [pair=...] [pair.build.teacher.max_steps=...]`: build, convert or reuse the pair."""
    import hydra
    from omegaconf import OmegaConf

    conf_dir = str(Path(__file__).resolve().parent.parent / "conf")

    @hydra.main(version_base="1.3", config_path=conf_dir, config_name="pretrain")
    def _main(cfg) -> None:
        if cfg.pair.get("build") is None:  # a pair of existing models: convert what comes from GGUF files
            _convert_pair(OmegaConf.to_container(cfg.pair, resolve=True))
            return
        build = OmegaConf.to_container(cfg.pair.build, resolve=True)
        recipe = PairRecipe.from_dict(
            build,
            student_format=PromptFormat(**OmegaConf.to_container(cfg.pair.student_format, resolve=True)),
            teacher_format=PromptFormat(**OmegaConf.to_container(cfg.pair.teacher_format, resolve=True)),
        )
        directory = ensure_pair(recipe, Path(cfg.pair.build_dir))
        print(f"\n{describe_pair(directory)}\n")

    _main()


def _convert_pair(pair: dict) -> None:
    """Convert each side of `pair` that comes from a GGUF file (once), and say where it is."""
    from eopd.conversion import ensure_converted
    from eopd.models import ModelSource

    for side in ("teacher", "student"):
        source = ModelSource(**pair[side])
        if source.gguf is None:
            print(f"{side}: {source.path}" + (f" ({source.init})" if source.init is not None else ""))
            continue
        directory = ensure_converted(source.gguf, source.path)
        report = json.loads((directory / "convert.json").read_text())
        print(
            f"{side}: {directory} ({report['parameters'] / 1e6:.1f}M params, from {report['source']['resolved']})"
        )


if __name__ == "__main__":
    main()
