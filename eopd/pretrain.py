"""Builds the embedded default pair: a teacher trained to high accuracy, a student trained only briefly.

    python -m eopd.pretrain                        # build (or reuse) outputs/pairs/embedded
    python -m eopd.pretrain build.teacher.steps=600 # a different recipe: a new fingerprint, a rebuild

Both models are trained supervised on reference solutions of the embedded multi-path task, sampled
uniformly over the valid solution paths, so a well-trained teacher is uncertain exactly at the branch
points. The teacher is a chat model: it sees the chat template and ends with <|im_end|>. The student is a
"base" model: it sees a plain prompt and ends with <|endoftext|>, and is trained for a few steps only, so
that it starts partly competent, as a base model does. Both are saved in Hugging Face format with their
tokenizers; a fingerprint of the recipe decides when they must be rebuilt. `eopd.train` calls
`ensure_pair` itself, so `python -m eopd.train pair=embedded` builds the pair on first use.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from eopd.data import PromptFormat
from eopd.models import build_causal_lm
from eopd.tasks.multipath import make_splits, reference_solution
from eopd.tasks.tokenizer import END_OF_TEXT, IM_END, build_tokenizer

log = logging.getLogger("eopd.pretrain")

# Bump when the training code changes in a way that changes the models a recipe produces.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class ModelRecipe:
    """Architecture and supervised training of one model of the pair."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 20
    seed: int = 0


@dataclass(frozen=True)
class PairRecipe:
    """Everything that determines the embedded pair; its fingerprint names the build."""

    task_seed: int = 0
    n_train: int = 2000
    teacher: ModelRecipe = field(default_factory=ModelRecipe)
    student: ModelRecipe = field(default_factory=lambda: ModelRecipe(hidden_size=64, num_layers=2, steps=60))
    teacher_format: PromptFormat = field(default_factory=lambda: PromptFormat(template="chat"))
    student_format: PromptFormat = field(default_factory=lambda: PromptFormat(prefix="Q: ", suffix="\nA: "))
    threads: int = 2

    @classmethod
    def from_dict(
        cls, fields: dict, *, student_format: PromptFormat, teacher_format: PromptFormat
    ) -> PairRecipe:
        """A recipe from plain config values (the `build` node of conf/pair/embedded.yaml)."""
        fields = dict(fields)
        return cls(
            **{k: v for k, v in fields.items() if k not in ("teacher", "student")},
            teacher=ModelRecipe(**fields.get("teacher", {})),
            student=ModelRecipe(**fields.get("student", {})),
            teacher_format=teacher_format,
            student_format=student_format,
        )

    def fingerprint(self) -> str:
        payload = json.dumps({"version": RECIPE_VERSION, **asdict(self)}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


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
    problems = make_splits(recipe.task_seed, recipe.n_train, 0, 0)["train"]
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    report: dict = {
        "fingerprint": recipe.fingerprint(),
        "recipe": json.loads(json.dumps(asdict(recipe), default=str)),
    }
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
        t0 = time.perf_counter()
        final_loss = train_supervised(model, tokenizer, problems, prompt_format, model_recipe)
        seconds = time.perf_counter() - t0
        log.info(
            "%s: %.2fM params, %d steps in %.0fs, final loss %.3f",
            role,
            sum(p.numel() for p in model.parameters()) / 1e6,
            model_recipe.steps,
            seconds,
            final_loss,
        )
        model.save_pretrained(staging / role)
        tokenizer.save_pretrained(staging / role)
        report[role] = {"train_seconds": round(seconds, 1), "final_loss": final_loss}
    report["build_seconds"] = round(time.perf_counter() - start, 1)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    (directory / "pair.json").write_text(json.dumps(report, indent=2))
    return report


def train_supervised(model, tokenizer, problems, prompt_format: PromptFormat, recipe: ModelRecipe) -> float:
    """AdamW on the response tokens of reference solutions (prompt tokens carry no loss); returns the last loss."""
    rng = random.Random(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    loss_value = float("nan")
    for step in range(recipe.steps):
        warmup = min(1.0, (step + 1) / max(recipe.warmup_steps, 1))
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * warmup * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        batch = [rng.choice(problems) for _ in range(recipe.batch_size)]
        input_ids, attention_mask, labels = supervised_batch(tokenizer, batch, prompt_format, rng)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, L-1, V)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value = float(loss.detach())
        if (step + 1) % 250 == 0 or step + 1 == recipe.steps:
            log.info("  step %d/%d  loss %.3f", step + 1, recipe.steps, loss_value)
    model.eval()
    return loss_value


def supervised_batch(tokenizer, problems, prompt_format: PromptFormat, rng: random.Random):
    """Right-padded (prompt + reference solution + end token) ids, mask, and labels (-100 on prompt and pad)."""
    rows, labels = [], []
    for problem in problems:
        prompt = prompt_format.encode(tokenizer, problem.prompt)
        response = tokenizer.encode(reference_solution(problem, rng), add_special_tokens=False)
        response.append(tokenizer.eos_token_id)
        rows.append(prompt + response)
        labels.append([-100] * len(prompt) + response)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    return input_ids, attention_mask, label_ids


def report_pair(
    directory: Path | str,
    recipe: PairRecipe,
    *,
    n_problems: int = 128,
    n_samples: int = 4,
    max_new_tokens: int = 48,
    tau: float = 0.8,
    seed: int = 0,
) -> dict:
    """Accuracy of both models on validation problems, and the teacher's high-entropy token fraction.

    The fraction is measured on the teacher's own samples at temperature 1 (the paper's teacher had
    18.5% of tokens at or above 0.8 nats); the task's ideal value is printed next to it.
    """
    from eopd.evaluation import EmbeddedGrader, EvalSpec, ModelSide, evaluate
    from eopd.models import ModelSource, load_model
    from eopd.tasks.multipath import ideal_high_entropy_fraction

    directory = Path(directory)
    problems = make_splits(recipe.task_seed, recipe.n_train, n_problems, 0)["val"]
    records = [{"id": p.id, "prompt": p.prompt, "answer": p.answer, "problem": p} for p in problems]
    spec = EvalSpec(n_samples=n_samples, max_new_tokens=max_new_tokens, tau=tau, seed=seed)
    results = {}
    for role, prompt_format, eos in (
        ("teacher", recipe.teacher_format, IM_END),
        ("student", recipe.student_format, END_OF_TEXT),
    ):
        tokenizer = build_tokenizer(eos_token=eos)
        model = load_model(ModelSource(path=str(directory / role)), vocab_size=len(tokenizer))
        side = ModelSide(model, tokenizer, prompt_format, (tokenizer.eos_token_id,))
        results[role] = evaluate(side, records, EmbeddedGrader(), spec, vocab_size=len(tokenizer))
    results["ideal_high_entropy_frac"] = ideal_high_entropy_fraction(problems, tau)
    manifest = directory / "pair.json"
    data = json.loads(manifest.read_text())
    data["report"] = results
    manifest.write_text(json.dumps(data, indent=2))
    return results


def main() -> None:
    """`python -m eopd.pretrain [pair.build.teacher.steps=...]`: build or reuse the pair, then report it."""
    import hydra
    from omegaconf import OmegaConf

    conf_dir = str(Path(__file__).resolve().parent.parent / "conf")

    @hydra.main(version_base="1.3", config_path=conf_dir, config_name="pretrain")
    def _main(cfg) -> None:
        build = OmegaConf.to_container(cfg.pair.build, resolve=True)
        recipe = PairRecipe.from_dict(
            build,
            student_format=PromptFormat(**OmegaConf.to_container(cfg.pair.student_format, resolve=True)),
            teacher_format=PromptFormat(**OmegaConf.to_container(cfg.pair.teacher_format, resolve=True)),
        )
        directory = ensure_pair(recipe, Path(cfg.pair.build_dir))
        r = report_pair(directory, recipe, **OmegaConf.to_container(cfg.report, resolve=True))
        n = cfg.report.n_samples
        print(f"\nembedded pair in {directory} (fingerprint {recipe.fingerprint()})")
        for role in ("teacher", "student"):
            print(
                f"  {role:<8} avg@{n} {r[role][f'avg@{n}']:.3f}  pass@{n} {r[role][f'pass@{n}']:.3f}  "
                f"tokens with entropy >= {cfg.report.tau}: {r[role]['entropy/student_high_frac']:.1%}"
            )
        print(f"  task's ideal high-entropy fraction: {r['ideal_high_entropy_frac']:.1%}\n")

    _main()


if __name__ == "__main__":
    main()
