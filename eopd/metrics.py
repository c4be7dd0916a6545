"""Sampling metrics over graded responses: Avg@k, unbiased Pass@k, majority vote, distinct correct paths,
the per-problem results an evaluation keeps so that intervals can be taken over problems, and the one
ordered list of the final table's metrics (`FINAL_TABLE`) that the table, `eopd.compare` and its plots
read."""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FINAL_TABLE = (
    "avg@n",
    "pass@1",
    "pass@n",
    "maj@n",
    "paths/distinct",
    "paths/even_spread",
    "forks/kl",
    "entropy/student",
    "entropy/student_high_frac",
    "div/fkl_high_entropy",
    "div/fkl",
    "div/rkl",
)
"""The final table's columns in order; `n` is the samples per problem. Add a metric here and the table,
`eopd.compare`'s default tables and their order follow."""

MEASURED_BY_SOME_TASKS = frozenset({"paths/even_spread", "forks/kl"})
"""Columns shown only when some row has them (tasks whose grader knows its paths)."""

PASS_AT_K = re.compile(r"^((?:val/|test/)?)pass@(\d+)$")
"""A Pass@k key, with the prefix of where it was logged (none: eval.json; val/ or test/)."""


def final_table_keys(n: int, measured: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The final table's metric names for n samples per problem; the task-specific ones only if measured."""
    keys = [key.replace("@n", f"@{n}") for key in FINAL_TABLE]
    return [k for k in keys if k not in MEASURED_BY_SOME_TASKS or k in measured]


def table_rank(name: str) -> tuple[int, int]:
    """Where `name` (maybe `val/`- or `test/`-prefixed, any k) sits in `FINAL_TABLE`: (position, k);
    names outside the table rank after it."""
    bare = re.sub(r"^(?:val/|test/)", "", name)
    k = int(bare.split("@")[1]) if re.fullmatch(r"[a-z]+@\d+", bare) else 0
    family = re.sub(r"@\d+$", "@n", bare)
    if family == "pass@n":
        return FINAL_TABLE.index("pass@1"), k
    return (FINAL_TABLE.index(family) if family in FINAL_TABLE else len(FINAL_TABLE)), k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of the chance that at least one of k samples is correct, from n samples with c correct.

    pass@k = 1 - C(n - c, k) / C(n, k) (Chen et al., 2021), computed as the product
    1 - prod_{i = n-c+1}^{n} (1 - k / i), which neither overflows nor loses precision for large n.

    Args:
        n: samples drawn for the problem.
        c: how many of them are correct, 0 <= c <= n.
        k: samples the metric imagines drawing, 1 <= k <= n.

    Returns:
        A probability in [0, 1]; exactly 0.0 when c = 0 and 1.0 when fewer than k samples are wrong.

    Raises:
        ValueError: if k > n (the estimator needs at least k samples) or any argument is out of range.
    """
    for name, value in [("n", n), ("c", c), ("k", k)]:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must lie in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, n={n}]: pass@{k} cannot be estimated from {n} samples")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def avg_at_k(correct: Sequence[bool]) -> float:
    """Avg@k: the mean correctness of the k samples of one problem (k = len(correct)).

    Raises:
        ValueError: if `correct` is empty.
    """
    if len(correct) == 0:
        raise ValueError("avg_at_k needs at least one sample")
    return float(np.mean(np.asarray(correct, dtype=bool)))


def pass_at_k_curve(correct_matrix: Sequence[Sequence[bool]]) -> dict[int, float]:
    """Pass@k for every k from 1 to n, each the mean over problems of the unbiased estimate.

    Args:
        correct_matrix: (num_problems, n) correctness flags, n samples for every problem.

    Returns:
        {k: mean pass@k} for k = 1..n; pass@1 equals the mean Avg@n.

    Raises:
        ValueError: if there are no problems or samples, or the problems have different sample counts.
    """
    lengths = {len(row) for row in correct_matrix}
    if len(correct_matrix) == 0 or lengths == {0}:
        raise ValueError("pass_at_k_curve needs at least one problem with at least one sample")
    if len(lengths) != 1:
        raise ValueError(f"every problem needs the same number of samples, got counts {sorted(lengths)}")
    n = lengths.pop()
    num_correct = [int(np.sum(np.asarray(row, dtype=bool))) for row in correct_matrix]
    return {k: float(np.mean([pass_at_k(n, c, k) for c in num_correct])) for k in range(1, n + 1)}


def maj_at_k(answers: Sequence[Hashable | None], correct_flags: Sequence[bool], k: int) -> bool:
    """Maj@k for one problem: whether the most frequent answer among the first k samples is correct.

    Samples without an answer (None) take no part in the vote. Ties go to the tied answer that appeared
    first, so the result does not depend on hashing or dictionary order.

    Args:
        answers: the extracted answer of each sample (normalised so equal answers compare equal), or None.
        correct_flags: whether each sample is correct; samples with the same answer must agree.
        k: how many leading samples vote, 1 <= k <= len(answers).

    Returns:
        True if the winning answer is correct; False if it is wrong or no sample among the first k has an
        answer.

    Raises:
        ValueError: on mismatched lengths, k out of range, or one answer flagged both correct and wrong.
    """
    if len(answers) != len(correct_flags):
        raise ValueError(f"{len(answers)} answers but {len(correct_flags)} correctness flags")
    if not 1 <= k <= len(answers):
        raise ValueError(f"k must lie in [1, {len(answers)}], got {k}")
    votes: dict[Hashable, int] = {}
    answer_is_correct: dict[Hashable, bool] = {}
    for answer, correct in zip(answers[:k], correct_flags[:k], strict=True):
        if answer is None:
            continue
        if answer_is_correct.setdefault(answer, bool(correct)) != bool(correct):
            raise ValueError(f"answer {answer!r} is flagged both correct and wrong")
        votes[answer] = votes.get(answer, 0) + 1
    if not votes:
        return False
    # dicts keep insertion order and max() returns the first maximum: the earliest of the tied answers.
    winner = max(votes, key=votes.__getitem__)
    return answer_is_correct[winner]


def distinct_correct_paths(paths: Sequence[Hashable | None]) -> int:
    """How many different solution paths the correct samples of one problem took.

    Args:
        paths: one entry per sample, the identifier of its path (e.g. from
            `eopd.tasks.multipath.solution_path`), or None for an incorrect sample.

    Returns:
        The number of distinct non-None identifiers.
    """
    return len({path for path in paths if path is not None})


@dataclass(frozen=True)
class ProblemResults:
    """Per-problem results of one evaluation: what Avg@n, Pass@k and distinct paths are averages of.

    Avg@n, every Pass@k (k <= n) and paths/distinct of an evaluation are the means over its problems of
    `per_problem(metric)`, so these few integers let `eopd.compare` resample problems.

    Attributes:
        ids: one id per problem (the record's "id", else its index in the evaluated records).
        n: samples per problem.
        correct: per problem, how many of its n samples were correct.
        paths: per problem, how many distinct solution paths its correct samples took (0 without paths).
    """

    ids: tuple[Hashable, ...]
    n: int
    correct: tuple[int, ...]
    paths: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n!r}")
        if not len(self.ids) == len(self.correct) == len(self.paths):
            raise ValueError(
                f"{len(self.ids)} ids, {len(self.correct)} correct counts and {len(self.paths)} path counts: "
                "one of each per problem"
            )
        for c, p in zip(self.correct, self.paths, strict=True):
            if not 0 <= c <= self.n or not 0 <= p <= c:
                raise ValueError(f"a problem with {c} of {self.n} correct and {p} distinct correct paths")

    def per_problem(self, metric: str) -> np.ndarray | None:
        """The per-problem values whose mean is `metric` (avg@n, pass@k with k <= n, paths/distinct).

        Returns:
            (num_problems,) float64, or None for a metric these counts do not determine (maj@n, the
            entropies, avg@m or pass@k with m, k > n).
        """
        correct = np.asarray(self.correct, dtype=np.float64)
        if metric == f"avg@{self.n}":
            return correct / self.n
        if metric == "paths/distinct":
            return np.asarray(self.paths, dtype=np.float64)
        match = re.fullmatch(r"pass@(\d+)", metric)
        if match and 1 <= int(match.group(1)) <= self.n:
            k = int(match.group(1))
            return np.array([pass_at_k(self.n, c, k) for c in self.correct], dtype=np.float64)
        return None

    def to_json(self) -> dict[str, Any]:
        """Compact lists for eval.json: {"n", "ids", "correct", "paths"}."""
        ids = [i if isinstance(i, str | int) and not isinstance(i, bool) else str(i) for i in self.ids]
        return {"n": self.n, "ids": ids, "correct": list(self.correct), "paths": list(self.paths)}

    @classmethod
    def from_json(cls, saved: Mapping[str, Any]) -> ProblemResults:
        """The inverse of `to_json`."""
        return cls(
            ids=tuple(saved["ids"]),
            n=int(saved["n"]),
            correct=tuple(int(c) for c in saved["correct"]),
            paths=tuple(int(p) for p in saved["paths"]),
        )
