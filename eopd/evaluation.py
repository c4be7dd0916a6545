"""Sampling evaluation: Avg@k, unbiased Pass@k, maj@k, distinct correct paths, entropies, forward KL.

The library behind the evaluation CLI (`eopd.evaluate`), the periodic validation and the final table of a
training run, and the benchmarks (`eopd.benchmarks`). For every problem, n responses are sampled at the evaluation's temperature and top-p; each is graded.
Metrics (keys as logged during training under `val/`):
    avg@n             mean correctness over all samples (Avg@k with k = n)
    pass@k            unbiased Pass@k for every k <= n, averaged over problems
    maj@n             majority vote over the n answers is correct
    paths/distinct    distinct correct solution paths per problem (tasks that define paths)
    paths/even_spread, forks/kl, forks/count: coverage apart from accuracy (`eopd.coverage`; tasks whose
                      grader knows its paths)
    entropy/student   the student's token entropy on its own samples; entropy/student_high_frac: >= tau
    entropy/teacher_high_frac, div/fkl_high_entropy: the teacher on the same samples (when given)
    div/fkl, div/rkl  KL(teacher || model) and KL(model || teacher) over the full vocabulary, per token of
                      the model's own samples (when a teacher is given)
`evaluate` returns them as `EvalResult.metrics`, with `EvalResult.problems` (`eopd.metrics.ProblemResults`):
per problem its id, how many of the n samples were correct and how many distinct correct paths they took,
from which avg@n, every pass@k and paths/distinct are per-problem means (intervals over problems in
`eopd.compare`).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from eopd.coverage import ForkKL, even_spread
from eopd.data import PromptFormat
from eopd.metrics import ProblemResults, distinct_correct_paths, maj_at_k, pass_at_k_curve
from eopd.objectives import (
    PAPER_TAU,
    LinearLogits,
    forward_kl,
    per_token_fused,
    reverse_kl,
    teacher_token_stats,
)
from eopd.rollout import sample
from eopd.scoring import (
    output_weight,
    response_hidden_states_shared_prompts,
    teacher_hidden_states,
    teacher_output_weight,
)

log = logging.getLogger("eopd.evaluation")


class Grader(Protocol):
    """Grades one response to one record."""

    def grade(self, record: dict[str, Any], response: str) -> bool: ...

    def answer(self, record: dict[str, Any], response: str) -> Hashable | None: ...

    def answer_is_correct(self, record: dict[str, Any], answer: Hashable | None) -> bool: ...

    def path(self, record: dict[str, Any], response: str) -> Hashable | None: ...

    def example_response(self, record: dict[str, Any]) -> str:
        """A correct response to `record` in the task's own format (for the start-up log)."""
        ...


class EmbeddedGrader:
    """The embedded multi-path task: exact grading of every step; the path is the order of the terms."""

    def grade(self, record: dict[str, Any], response: str) -> bool:
        from eopd.tasks.multipath import grade

        return grade(record["problem"], response)

    def answer(self, record: dict[str, Any], response: str) -> Hashable | None:
        text = response.split("<|", 1)[0].strip()
        return text.rsplit("#", 1)[1].strip() if "#" in text else None

    def answer_is_correct(self, record: dict[str, Any], answer: Hashable | None) -> bool:
        return answer is not None and answer == record["problem"].answer

    def path(self, record: dict[str, Any], response: str) -> Hashable | None:
        from eopd.tasks.multipath import solution_path

        return solution_path(record["problem"], response)

    def example_response(self, record: dict[str, Any]) -> str:
        from eopd.tasks.multipath import solution_text

        return solution_text(record["problem"], record["problem"].terms)

    def num_paths(self, record: dict[str, Any]) -> int:
        return record["problem"].num_paths

    def forks(self, record: dict[str, Any], tokens: Sequence[str]) -> list[tuple[int, dict[str, float]]]:
        from eopd.tasks.multipath import forks_along

        return [
            (position, {str(term): p for term, p in distribution.items()})
            for position, distribution in forks_along(record["problem"], tokens)
        ]


class MathGrader:
    """`\\boxed{}` answers graded with math-verify; no notion of a path."""

    def grade(self, record: dict[str, Any], response: str) -> bool:
        from eopd.tasks.math_grader import grade_math

        return grade_math(response, str(record["answer"]))

    def answer(self, record: dict[str, Any], response: str) -> Hashable | None:
        from eopd.tasks.math_grader import extract_boxed

        return extract_boxed(response)

    def answer_is_correct(self, record: dict[str, Any], answer: Hashable | None) -> bool:
        from eopd.tasks.math_grader import grade_math

        return answer is not None and grade_math(f"\\boxed{{{answer}}}", str(record["answer"]))

    def path(self, record: dict[str, Any], response: str) -> Hashable | None:
        return None

    def example_response(self, record: dict[str, Any]) -> str:
        return f" The answer is $\\boxed{{{record['answer']}}}$."


class FreeTextMathGrader(MathGrader):
    """Math answers in free text: the `\\boxed{}` answer if there is one, else math-verify's own reading of
    the response (its last stated number or expression), so a chat model's own words are graded."""

    def grade(self, record: dict[str, Any], response: str) -> bool:
        from eopd.tasks.math_grader import grade_math

        return grade_math(response, str(record["answer"]), require_boxed=False)

    def answer(self, record: dict[str, Any], response: str) -> Hashable | None:
        from eopd.tasks.math_grader import stated_answer

        return stated_answer(response)

    def example_response(self, record: dict[str, Any]) -> str:
        return f"The answer is {record['answer']}."


GRADERS = {"embedded": EmbeddedGrader, "math": MathGrader, "math_text": FreeTextMathGrader}


@dataclass(frozen=True)
class EvalSpec:
    """How to sample for evaluation. The defaults sample the full distribution (top-p 1.0), as training
    does; the paper's benchmark protocol (8 samples, temperature 1.0, top-p 0.8) is
    `eopd.benchmarks.BenchmarkProtocol`.

    Attributes:
        n_samples: responses per problem (n of Pass@k, k <= n).
        temperature, top_p, max_new_tokens: sampling.
        batch_size: prompts per sampling batch (each repeated n_samples times).
        seed: sampling seed; the same seed gives the same samples for the same model.
        tau: the entropy threshold (nats) of the high-entropy fractions and of `div/fkl_high_entropy`; the
            training config links it to `objective.diagnostic_tau`, so that `entropy/student_high_frac`
            means the same in training and evaluation.
    """

    n_samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 16
    seed: int = 0
    tau: float = PAPER_TAU

    def __post_init__(self) -> None:
        for name in ("n_samples", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"eval.{name}={value!r} must be a positive integer")
        if not self.temperature > 0:
            raise ValueError(f"eval.temperature={self.temperature!r} must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"eval.top_p={self.top_p!r} must lie in (0, 1]")


@dataclass
class ModelSide:
    """A model with what sampling and scoring need: its tokenizer, prompt format and end tokens."""

    model: Any
    tokenizer: Any
    prompt_format: PromptFormat
    eos_ids: tuple[int, ...]


@dataclass(frozen=True)
class EvalResult:
    """What `evaluate` measured: the metrics (see the module docstring) and the per-problem results."""

    metrics: dict[str, float]
    problems: ProblemResults


@torch.no_grad()
def evaluate(
    student: ModelSide,
    records: Sequence[dict[str, Any]],
    grader: Grader,
    spec: EvalSpec,
    *,
    vocab_size: int,
    teacher: ModelSide | None = None,
    remap_end_token_ids: tuple[int, int] | None = None,
) -> EvalResult:
    """Sample `spec.n_samples` responses per record from `student`, grade them, and measure entropies.

    Args:
        student: the model evaluated.
        records: prompt records ({"prompt", "answer", ...}); the grader reads what it needs.
        grader: how to grade a response.
        spec: sampling settings.
        vocab_size: the vocabulary shared with the teacher (padded output rows excluded).
        teacher: when given, scores the same samples: its entropy and the forward KL to it.
        remap_end_token_ids: (student end id, teacher end id) for the teacher's copy.

    Returns:
        `.metrics`: metric name -> value (see the module docstring); `.problems`: per record, in order, its
        id (record["id"], else its index), its number of correct samples and of distinct correct paths.
    """
    if not records:
        raise ValueError("evaluate needs at least one record")
    model = student.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = student.tokenizer.pad_token_id if student.tokenizer.pad_token_id is not None else student.eos_ids[0]
    generator = torch.Generator(device=device).manual_seed(spec.seed)
    correct: list[list[bool]] = []
    answers: list[list[Hashable | None]] = []
    answer_flags: list[list[bool]] = []
    paths: list[list[Hashable | None]] = []
    entropy_sum = entropy_high = tokens = truncated = 0.0
    teacher_sums = dict.fromkeys(("high", "fkl_high", "fkl", "rkl"), 0.0)  # sums over tokens
    fork_kl = ForkKL()
    try:
        for start in range(0, len(records), spec.batch_size):
            chunk = list(records[start : start + spec.batch_size])
            rows = [r for r in chunk for _ in range(spec.n_samples)]
            prompts = [student.prompt_format.encode(student.tokenizer, r["prompt"]) for r in rows]
            batch = sample(
                model,
                prompts,
                max_new_tokens=spec.max_new_tokens,
                eos_token_ids=student.eos_ids,
                pad_token_id=pad,
                temperature=spec.temperature,
                top_p=spec.top_p,
                generator=generator,
                vocab_size=vocab_size,
            )
            mask = batch.response_mask
            texts = [
                student.tokenizer.decode(batch.responses[i][mask[i]].tolist(), skip_special_tokens=True)
                for i in range(batch.batch_size)
            ]
            for found, more in zip(
                (correct, answers, answer_flags, paths),
                _grade(grader, chunk, texts, spec.n_samples),
                strict=True,
            ):
                found.extend(more)
            truncated += float(batch.truncated.float().sum())
            # The n samples of a prompt are adjacent rows: each prompt is read once per model.
            hidden = response_hidden_states_shared_prompts(model, batch, pack=True)[mask]
            s_source = LinearLogits(hidden, output_weight(model), vocab_size)
            s_stats = teacher_token_stats(s_source, batch.responses[mask], k=1, temperature=spec.temperature)
            fork_kl.add(
                grader,
                rows,
                [batch.responses[i][mask[i]].tolist() for i in range(batch.batch_size)],
                _logits_at(s_source, mask),
                student.tokenizer,
                spec.temperature,
            )
            entropy_sum += float(s_stats.entropy.sum())
            entropy_high += float((s_stats.entropy >= spec.tau).sum())
            tokens += float(mask.sum())
            if teacher is not None:
                scored = _teacher_sums(
                    teacher, batch, rows, s_source, pad, remap_end_token_ids, spec, vocab_size
                )
                for key, value in scored.items():
                    teacher_sums[key] += value
    finally:
        model.train(was_training)

    n = spec.n_samples
    results = _accuracy_metrics(correct, answers, answer_flags, paths, n)
    spread = even_spread(grader, records, [sum(bool(c) for c in row) for row in correct])
    if spread is not None:
        results["paths/even_spread"] = spread
    results.update(fork_kl.metrics())
    results["entropy/student"] = entropy_sum / max(tokens, 1)
    results["entropy/student_high_frac"] = entropy_high / max(tokens, 1)
    results["len_mean"] = tokens / (len(correct) * n)
    results["truncated_frac"] = truncated / (len(correct) * n)
    if teacher is not None:
        results["entropy/teacher_high_frac"] = teacher_sums["high"] / max(tokens, 1)
        if teacher_sums["high"]:
            results["div/fkl_high_entropy"] = teacher_sums["fkl_high"] / teacher_sums["high"]
        results["div/fkl"] = teacher_sums["fkl"] / max(tokens, 1)
        results["div/rkl"] = teacher_sums["rkl"] / max(tokens, 1)
    problems = ProblemResults(
        ids=tuple(record.get("id", index) for index, record in enumerate(records)),
        n=n,
        correct=tuple(sum(bool(c) for c in row) for row in correct),
        paths=tuple(distinct_correct_paths(p) for p in paths),
    )
    return EvalResult(results, problems)


def _grade(grader: Grader, chunk: Sequence[dict[str, Any]], texts: Sequence[str], n: int) -> tuple[list, ...]:
    """Per record of `chunk` (its n samples are adjacent in `texts`): the samples' correctness, answers,
    answers' correctness and, for the correct ones, paths."""
    correct, answers, answer_flags, paths = [], [], [], []
    for index, record in enumerate(chunk):
        block = range(index * n, (index + 1) * n)
        correct.append([grader.grade(record, texts[i]) for i in block])
        answers.append([grader.answer(record, texts[i]) for i in block])
        # maj@k votes over final answers, so an answer's correctness is the answer's alone (a right
        # answer after wrong steps counts for the vote, unlike for Avg@k).
        answer_flags.append([grader.answer_is_correct(record, a) for a in answers[-1]])
        paths.append([grader.path(record, texts[i]) if correct[-1][j] else None for j, i in enumerate(block)])
    return correct, answers, answer_flags, paths


def _accuracy_metrics(correct, answers, answer_flags, paths, n: int) -> dict[str, float]:
    """avg@n, every pass@k, maj@n and paths/distinct over the graded samples (n per problem)."""
    results: dict[str, float] = {f"avg@{n}": sum(map(sum, correct)) / (len(correct) * n)}
    results.update({f"pass@{k}": v for k, v in pass_at_k_curve(correct).items()})
    votes = sum(maj_at_k(a, c, n) for a, c in zip(answers, answer_flags, strict=True))
    results[f"maj@{n}"] = votes / len(correct)
    results["paths/distinct"] = sum(distinct_correct_paths(p) for p in paths) / len(paths)
    return results


def _logits_at(source: LinearLogits, mask: torch.Tensor):
    """(sample, token index) pairs -> the logits there, for `source` over the valid tokens of `mask`."""
    offsets = torch.cumsum(mask.sum(-1), 0) - mask.sum(-1)

    def at(where: list[tuple[int, int]]) -> torch.Tensor:
        index = torch.tensor([int(offsets[i]) + j for i, j in where], device=mask.device)
        return source.rows(index).logits()

    return at


def _teacher_sums(
    teacher: ModelSide, batch, rows, s_source, pad: int, remap, spec: EvalSpec, vocab_size: int
):
    """The teacher on a batch of the model's samples, summed over its response tokens: how many have teacher
    entropy >= tau ("high"), the forward KL over those ("fkl_high"), and both KLs over all ("fkl", "rkl")."""
    mask = batch.response_mask
    t_prompts = [teacher.prompt_format.encode(teacher.tokenizer, r["prompt"]) for r in rows]
    t_hidden = teacher_hidden_states(
        teacher.model, batch, t_prompts, pad_token_id=pad, remap_end_token_ids=remap, pack=True,
        share_prompts=True,
    )[mask]  # fmt: skip
    t_source = LinearLogits(t_hidden, teacher_output_weight(teacher.model, remap), vocab_size)
    t_stats = teacher_token_stats(t_source, batch.responses[mask], k=1, temperature=spec.temperature)
    high = t_stats.entropy >= spec.tau
    fkl = per_token_fused(forward_kl, s_source, t_source, temperature=spec.temperature)
    rkl = per_token_fused(reverse_kl, s_source, t_source, temperature=spec.temperature)
    return {
        "high": float(high.sum()),
        "fkl_high": float(fkl[high].sum()),
        "fkl": float(fkl.sum()),
        "rkl": float(rkl.sum()),
    }


def format_table(rows: dict[str, dict[str, float]], keys: Sequence[str]) -> str:
    """A plain-text table: one row per model, one column per metric key."""
    width = max(len(name) for name in rows) + 2
    widths = [max(len(k), 7) + 2 for k in keys]
    lines = [" " * width + "".join(f"{k:>{w}}" for k, w in zip(keys, widths, strict=True))]
    for name, metrics in rows.items():
        cells = "".join(
            f"{metrics[k]:>{w}.3f}" if k in metrics else f"{'-':>{w}}"
            for k, w in zip(keys, widths, strict=True)
        )
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)
