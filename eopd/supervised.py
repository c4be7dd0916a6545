"""Supervised training of the embedded pair's models: batches of solutions, the loss, training to a band.

`eopd.pretrain` builds the pair with these; `Target` is the validation band a build stops in.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eopd.data import PromptFormat
from eopd.tasks.multipath import next_term_distribution, reference_order, solution_text, term_positions

log = logging.getLogger("eopd.pretrain")


@dataclass(frozen=True)
class Target:
    """The validation band a model's build stops in (metrics of `eopd.evaluate` on the validation split).

    Attributes:
        min_avg, max_avg: Avg@n (n = `PairRecipe.eval_samples`) must lie in [min_avg, max_avg].
        max_pass: Pass@n must be at most this (a student with headroom left for distillation).
        max_high_frac_gap: |high-entropy token fraction on the model's own samples - the task's ideal|
            must be at most this (a teacher uncertain at the forks, as the task is); None: not checked.
        max_high_frac: the high-entropy token fraction must be at most this (a student collapsed at the
            forks); None: not checked.
    """

    min_avg: float = 0.0
    max_avg: float = 1.0
    max_pass: float = 1.0
    max_high_frac_gap: float | None = None
    max_high_frac: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_avg <= self.max_avg <= 1:
            raise ValueError(f"target needs 0 <= min_avg <= max_avg <= 1, got {self.min_avg}, {self.max_avg}")
        if not 0 < self.max_pass <= 1:
            raise ValueError(f"target.max_pass={self.max_pass} must lie in (0, 1]")

    def distance(self, reached: dict) -> float:
        """How far validation metrics (avg, pass, high_frac, ideal_high_frac) are from the band: 0 inside
        it, else the sum of the shortfalls."""
        avg, high = reached["avg"], reached["high_frac"]
        shortfalls = [self.min_avg - avg, avg - self.max_avg, reached["pass"] - self.max_pass]
        if self.max_high_frac_gap is not None:
            shortfalls.append(abs(high - reached["ideal_high_frac"]) - self.max_high_frac_gap)
        if self.max_high_frac is not None:
            shortfalls.append(high - self.max_high_frac)
        return sum(max(0.0, shortfall) for shortfall in shortfalls)


def train_supervised(
    model, tokenizer, problems, prompt_format: PromptFormat, recipe, validate, on_validated=None
) -> dict:
    """AdamW on the response tokens of training solutions until validation enters `recipe.target`.

    `recipe` is an `eopd.pretrain.ModelRecipe`: batch size, learning rate, schedule, evaluation interval
    and the target band.

    Prompt tokens carry no loss. Every `recipe.eval_every` steps (and at `max_steps`) `validate(model)`
    measures the model and `on_validated(model, reached)` sees it; the first snapshot inside the band ends
    training, and if none is, the snapshot closest to it is loaded back.

    Returns:
        What the kept snapshot reached: its step, loss, validation metrics and `target_met`.
    """
    rng = random.Random(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))
    best: dict | None = None
    best_state = None
    losses: list[float] = []
    for step in range(1, recipe.max_steps + 1):
        model.train()
        warmup = min(1.0, step / max(recipe.warmup_steps, 1))
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * warmup * 0.5 * (1 + math.cos(math.pi * (step - 1) / recipe.max_steps))
        batch = supervised_batch(
            tokenizer,
            [rng.choice(problems) for _ in range(recipe.batch_size)],
            prompt_format,
            rng,
            canonical_fraction=recipe.canonical_fraction,
            fork_targets=recipe.fork_targets,
        )
        loss = batch.loss(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % recipe.eval_every and step != recipe.max_steps:
            continue
        model.eval()
        reached = validate(model)
        distance = recipe.target.distance(reached)
        reached.update(step=step, loss=sum(losses[-50:]) / len(losses[-50:]), target_met=distance == 0)
        log.info(
            "  step %d/%d  loss %.3f  val avg %.3f pass %.3f high-entropy %.1f%%%s",
            step,
            recipe.max_steps,
            reached["loss"],
            reached["avg"],
            reached["pass"],
            100 * reached["high_frac"],
            "  (in the target band)" if distance == 0 else "",
        )
        if on_validated is not None:
            on_validated(model, reached)
        if best is None or distance < best["distance"]:
            best = {**reached, "distance": distance}
            best_state = copy.deepcopy(model.state_dict())
        if distance == 0:
            break
    assert best is not None and best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return best


@dataclass
class SupervisedBatch:
    """Right-padded prompt + solution + end token, with what each response token is trained towards.

    Attributes:
        input_ids, attention_mask: (B, L).
        labels: (B, L) the token that follows in the solution; -100 on prompt and padding.
        forks: (B, L, V) the next-term distribution at the tokens that choose a term (zero rows
            elsewhere), or None: every token is trained towards its label.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    forks: torch.Tensor | None = None

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over response tokens; against the next-term distribution at forks."""
        logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t + 1
        labels = self.labels[:, 1:]
        trained = labels != -100
        per_token = -logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        if self.forks is not None:
            forks = self.forks[:, 1:]
            at_fork = forks.sum(-1) > 0
            per_token = torch.where(at_fork, -(forks * logprobs).sum(-1), per_token)
        return per_token[trained].mean()


def supervised_batch(
    tokenizer,
    problems,
    prompt_format: PromptFormat,
    rng: random.Random,
    *,
    canonical_fraction: float = 0.0,
    fork_targets: bool = False,
) -> SupervisedBatch:
    """A batch of training solutions: the canonical one (prompt order) with probability
    `canonical_fraction`, else a reference solution (uniform over the valid paths).

    With `fork_targets`, each token that writes a term is trained towards `next_term_distribution` on
    the path so far (the reference sampler's choice) rather than the term this solution took.
    """
    rows, labels, forks = [], [], []
    for problem in problems:
        prompt = prompt_format.encode(tokenizer, problem.prompt)
        canonical = canonical_fraction > 0 and rng.random() < canonical_fraction
        order = problem.terms if canonical else reference_order(problem, rng)
        response = tokenizer.encode(solution_text(problem, order), add_special_tokens=False)
        response.append(tokenizer.eos_token_id)
        rows.append(prompt + response)
        labels.append([-100] * len(prompt) + response)
        positions = term_positions(len(order))
        forks.append(
            [(len(prompt) + at, next_term_distribution(problem, order[:k])) for k, at in enumerate(positions)]
        )
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    batch = SupervisedBatch(
        torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    )
    if fork_targets:
        digit_ids = {d: tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}
        batch.forks = torch.zeros(len(rows), width, len(tokenizer))
        for row, row_forks in enumerate(forks):
            for position, distribution in row_forks:
                for term, probability in distribution.items():
                    batch.forks[row, position, digit_ids[term]] = probability
    return batch
