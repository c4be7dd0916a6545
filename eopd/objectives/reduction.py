"""Reductions of per-token values, and a mergeable accumulator for detached diagnostics."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over positions where `mask` is True; 0 (not NaN) when nothing is valid. (...) -> ()."""
    if values.shape != mask.shape:
        raise ValueError(f"values shape {tuple(values.shape)} != mask shape {tuple(mask.shape)}")
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def token_mean(values: Tensor, mask: Tensor, *, num_valid_tokens: int | Tensor | None = None) -> Tensor:
    """Token mean over the valid tokens of the WHOLE batch (PAPER.md section 2, step 5).

    sum over this call's valid tokens of `values`, divided by `num_valid_tokens`: the count over the
    whole rollout batch (all micro-batches, all data-parallel ranks). Summing the results of the shards,
    each divided by the global count, then equals the loss of the unsplit batch, in value and gradient.
    Left at None it is this call's own count (correct only when the call sees the whole batch).
    """
    if values.shape != mask.shape:
        raise ValueError(f"values shape {tuple(values.shape)} != mask shape {tuple(mask.shape)}")
    count = mask.sum() if num_valid_tokens is None else num_valid_tokens
    count = torch.as_tensor(count, dtype=torch.float32, device=values.device).clamp_min(1)
    return (values * mask.to(values.dtype)).sum() / count


class Metrics:
    """Weighted sums and weights per metric name, so that shards and micro-batches merge exactly.

    `add("div/fkl", values, weights)` adds sum(values * weights) and sum(weights); `means()` divides.
    Everything is detached and kept as float64 scalars.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.weights: dict[str, Tensor] = {}

    def add(self, name: str, values: Tensor, weights: Tensor | None = None) -> None:
        values = values.detach().double()
        weights = torch.ones_like(values) if weights is None else weights.detach().double()
        self.add_sums(name, (values * weights).sum(), weights.sum())

    def add_sums(self, name: str, total: Tensor | float, weight: Tensor | float) -> None:
        total = torch.as_tensor(total, dtype=torch.float64).detach()
        weight = torch.as_tensor(weight, dtype=torch.float64).detach()
        if name in self.sums:
            self.sums[name] = self.sums[name] + total
            self.weights[name] = self.weights[name] + weight
        else:
            self.sums[name], self.weights[name] = total, weight

    def merge(self, others: Iterable[Metrics]) -> Metrics:
        for other in others:
            for name in other.sums:
                self.add_sums(name, other.sums[name], other.weights[name])
        return self

    def means(self) -> dict[str, float]:
        """name -> weighted mean; metrics with zero total weight (e.g. no gated token) are left out."""
        return {
            name: float(self.sums[name] / self.weights[name])
            for name in self.sums
            if float(self.weights[name]) > 0
        }

    def __contains__(self, name: str) -> bool:
        return name in self.sums
