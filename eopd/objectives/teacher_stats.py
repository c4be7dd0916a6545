"""The teacher's per-token statistics, reduced from its logits chunk by chunk.

`opd` and `eopd` never need the teacher's full distribution during an update: only log pi_te(y_t) of the
sampled token, the entropy H_t (for the gate) and the top-k log-probs and indices (for the forward-KL
term). `teacher_token_stats` computes them once per rollout batch, one tile of positions at a time, so a
training step never holds full teacher logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from eopd.objectives.divergences import _check_temperature, check_top_k
from eopd.objectives.fused import (
    LogitSource,
    TileBuffers,
    scaled_tile,
    source_len,
    source_rows,
    topk_groups,
    topk_rows,
)
from eopd.objectives.tile_softmax import softmaxed


@dataclass
class TeacherStats:
    """Per-token teacher statistics over positions of shape (...), all at one temperature.

    Attributes:
        token_logprobs: (...) log pi_te(y_t) of the sampled token.
        entropy: (...) H_t = -sum_v pi_te(v) log pi_te(v), full vocabulary, nats.
        topk_logprobs: (..., k) full-vocabulary log-probs of the teacher's k most likely tokens.
        topk_indices: (..., k) their token ids.
        temperature: the temperature the teacher's logits were divided by.
    """

    token_logprobs: Tensor
    entropy: Tensor
    topk_logprobs: Tensor
    topk_indices: Tensor
    temperature: float = 1.0

    @property
    def k(self) -> int:
        return self.topk_logprobs.shape[-1]

    @property
    def topk_mass(self) -> Tensor:
        """(...) teacher probability mass covered by its top-k tokens."""
        return self.topk_logprobs.float().exp().sum(-1)

    def rows(self, index) -> TeacherStats:
        """Index every field over the leading dims (a boolean mask, slice or index tensor)."""
        return TeacherStats(
            **{f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "temperature"},
            temperature=self.temperature,
        )

    def reshaped(self, lead: torch.Size) -> TeacherStats:
        """The same statistics over leading shape `lead` (as many positions)."""
        return TeacherStats(
            token_logprobs=self.token_logprobs.reshape(lead),
            entropy=self.entropy.reshape(lead),
            topk_logprobs=self.topk_logprobs.reshape(*lead, self.k),
            topk_indices=self.topk_indices.reshape(*lead, self.k),
            temperature=self.temperature,
        )

    def to(self, device) -> TeacherStats:
        return TeacherStats(
            **{f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "temperature"},
            temperature=self.temperature,
        )


@torch.no_grad()
def teacher_token_stats(
    teacher: LogitSource,
    tokens: Tensor,
    *,
    k: int = 16,
    temperature: float = 1.0,
    chunk_size: int = 256,
    mask: Tensor | None = None,
) -> TeacherStats:
    """Reduce teacher logits to `TeacherStats`, one tile of positions at a time.

    Args:
        teacher: logits (..., V), or `LinearLogits` with hidden (..., H) and the output weight.
        tokens: (...) the sampled token at each position.
        k: how many of the teacher's top tokens to keep (the paper: 16).
        temperature: divide logits by this before the softmax (must equal the sampling temperature).
        chunk_size: positions per tile; peak memory is about chunk_size x V floats.
        mask: (...) bool, the positions to compute (the valid response tokens); the tiles then cover those
            only, which at a large vocabulary skips the padding's share of the work. The others get
            placeholders that nothing reads (gates and metrics are masked): entropy and the token's
            log-prob 0, a uniform top-k over ids 0..k-1. None computes every position.

    Returns:
        TeacherStats with leading shape equal to `tokens.shape`.
    """
    _check_temperature(temperature)
    lead = tokens.shape
    if isinstance(teacher, Tensor):
        vocab = teacher.shape[-1]
        if teacher.shape[:-1] != lead:
            raise ValueError(
                f"teacher logits shape {tuple(teacher.shape)} does not match tokens shape {tuple(lead)}"
            )
        flat = teacher.reshape(-1, vocab)
    else:
        vocab = teacher.vocab_size
        if teacher.hidden.shape[:-1] != lead:
            raise ValueError(
                f"teacher hidden shape {tuple(teacher.hidden.shape)} does not match tokens shape {tuple(lead)}"
            )
        flat = type(teacher)(teacher.hidden.reshape(-1, teacher.hidden.shape[-1]), teacher.weight, vocab)
    check_top_k(k, vocab)
    flat_tokens = tokens.reshape(-1)
    if mask is not None:
        if mask.shape != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match tokens shape {tuple(lead)}")
        index = mask.reshape(-1).bool()
        valid = teacher_token_stats(
            source_rows(flat, index), flat_tokens[index], k=k, temperature=temperature, chunk_size=chunk_size
        )
        stats = TeacherStats(
            token_logprobs=torch.zeros(flat_tokens.shape, device=flat_tokens.device),
            entropy=torch.zeros(flat_tokens.shape, device=flat_tokens.device),
            topk_logprobs=torch.full((*flat_tokens.shape, k), -math.log(k), device=flat_tokens.device),
            topk_indices=torch.arange(k, device=flat_tokens.device).expand(*flat_tokens.shape, k).clone(),
            temperature=temperature,
        )
        for field in fields(stats):
            if field.name != "temperature":
                getattr(stats, field.name)[index] = getattr(valid, field.name)
        return stats.reshaped(lead)
    n = source_len(flat)
    device = flat_tokens.device
    token_logprobs = torch.empty(n, device=device)
    entropy = torch.empty(n, device=device)
    topk_logprobs = torch.empty(n, k, device=device)
    topk_indices = torch.empty(n, k, dtype=torch.long, device=device)
    buffers = TileBuffers()  # each tile's logits and exp reuse the first tile's memory
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        logits = scaled_tile(flat, start, end, temperature, buffers)  # (n, V)
        groups = topk_groups(logits, k)  # the top-k's candidate groups, read with the rows' maxima
        # z - max, e = exp(z - max) (floored) and its row sums s: log p is formed only at the ids gathered,
        # the entropy from e (`Softmaxed`).
        e = buffers.take("exp", *logits.shape, logits.device)
        teacher = softmaxed(logits, e, maxes=None if groups is None else groups[1])
        token_logprobs[start:end] = teacher.log_probs_at(flat_tokens[start:end, None]).squeeze(-1)
        entropy[start:end] = teacher.entropy()
        values, topk_indices[start:end] = topk_rows(teacher.shifted, k, groups)
        topk_logprobs[start:end] = values - teacher.log_sums[:, None]
    flat_stats = TeacherStats(token_logprobs, entropy, topk_logprobs, topk_indices, temperature=temperature)
    return flat_stats.reshaped(lead)
