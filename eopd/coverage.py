"""Coverage apart from accuracy: how a model spreads over a task's valid paths, measured where the task
knows its exact branching.

Distinct correct paths grow with accuracy alone (more correct samples, more chances to differ), so they
cannot say whether a model covers the branches. Two measures that can, for tasks whose grader knows its
paths (the embedded multi-path task):

    paths/even_spread  per problem, the distinct paths expected if the problem's correct samples had
                       been drawn uniformly over its valid paths: P (1 - (1 - 1/P)^c) for P valid paths
                       and c correct samples; averaged over problems like paths/distinct. paths/distinct
                       below it: the correct samples bunch on fewer paths than an even spread would.
    forks/kl           at every fork of the model's own samples (a term choice with at least two valid
                       terms, followed along the sample's own choices while it stays valid), the KL from
                       the task's exact next-term distribution to the model's distribution over those
                       terms' tokens, at the evaluation's temperature: sum_t q(t) log(q(t) / p(t)), nats,
                       averaged over forks. 0 when the model's branching is the task's; it grows when the
                       model puts its mass on fewer branches (or off the valid ones).
    forks/count        forks scored per sample.

A grader opts in with two optional methods: `num_paths(record) -> int | None` and
`forks(record, tokens) -> [(token index, {token text: probability}), ...]` (`tokens` are the response's
token strings). Graders without them (math) get neither metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def expected_distinct_paths(num_paths: int, correct: int) -> float:
    """Distinct paths among `correct` draws made uniformly, with replacement, from `num_paths` paths."""
    if num_paths < 1 or correct < 0:
        raise ValueError(f"num_paths={num_paths} must be >= 1 and correct={correct} >= 0")
    return num_paths * (1.0 - (1.0 - 1.0 / num_paths) ** correct)


def even_spread(
    grader: Any, records: Sequence[dict[str, Any]], correct_counts: Sequence[int]
) -> float | None:
    """Mean over `records` of `expected_distinct_paths` at each one's correct count; None when the grader
    does not know its paths."""
    num_paths = getattr(grader, "num_paths", None)
    if num_paths is None:
        return None
    counts = [num_paths(record) for record in records]
    if any(count is None for count in counts):
        return None
    expected = [expected_distinct_paths(p, c) for p, c in zip(counts, correct_counts, strict=True)]
    return sum(expected) / len(expected)


@dataclass
class ForkKL:
    """Sums of the fork KL over evaluation batches (see the module docstring)."""

    kl: float = 0.0
    forks: int = 0
    samples: int = 0

    def add(
        self,
        grader: Any,
        rows: Sequence[dict[str, Any]],
        responses: Sequence[Sequence[int]],
        logits_at: Any,
        tokenizer: Any,
        temperature: float,
    ) -> None:
        """Score the forks of one batch of samples.

        Args:
            rows: the record of every sample; responses: each sample's response token ids.
            logits_at: (sample index, token index) pairs -> (n, vocab) logits at those positions.
        """
        forks_of = getattr(grader, "forks", None)
        if forks_of is None:
            return
        self.samples += len(rows)
        where, targets = [], []
        for i, (record, ids) in enumerate(zip(rows, responses, strict=True)):
            for position, distribution in forks_of(record, tokenizer.convert_ids_to_tokens(list(ids))):
                where.append((i, position))
                targets.append(distribution)
        if not where:
            return
        logp = torch.log_softmax(logits_at(where).double() / temperature, dim=-1)
        for row, distribution in zip(logp, targets, strict=True):
            self.kl += fork_kl(row, distribution, tokenizer)
        self.forks += len(where)

    def metrics(self) -> dict[str, float]:
        if not self.samples:
            return {}
        found = {"forks/count": self.forks / self.samples}
        if self.forks:
            found["forks/kl"] = self.kl / self.forks
        return found


def fork_kl(logp: Tensor, distribution: dict[str, float], tokenizer: Any) -> float:
    """KL(q || p) over q's support: q the task's next-term distribution by token text, p the model's
    distribution (`logp`, log-probabilities over the vocabulary) at those tokens' ids."""
    ids = tokenizer.convert_tokens_to_ids(list(distribution))
    return sum(
        q * (math.log(q) - float(logp[i])) for q, i in zip(distribution.values(), ids, strict=True) if q > 0
    )
