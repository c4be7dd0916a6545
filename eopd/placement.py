"""Where the student and the teacher live: FSDP2 sharding, calls with usable weights, cross-rank reductions.

`Placement` is a mixin of `DistillModule` (`eopd.module`): it owns everything that depends on how the two
models are placed over devices and processes, so that the training step reads the same on one CPU, under
DDP and under FSDP.

Sharded training (FSDP2 through Lightning's `ModelParallelStrategy`, `conf/trainer/fsdp.yaml`): every
use of the student runs inside one forward call of `_ModelCall`, the root FSDP unit, so the student's
embeddings, final norm and output layer are whole there while each decoder layer gathers itself in its
own forward and gradients are reduce-scattered by FSDP's backward hooks. The fused loss keeps reading the
output layer's weight directly, tile by tile. Sampling gathers the whole student for the rollout. With
`shard_teacher=True` the frozen teacher is sharded the same way behind its own root unit (`on_teacher`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from eopd.objectives import Metrics, Signals
from eopd.scoring import decoder_layers, output_weight, teacher_output_weight


class Placement:
    """Sharding, placement and cross-rank reductions of a module with `student`, `teacher` and `pair`."""

    def _init_placement(
        self, student: torch.nn.Module, teacher: torch.nn.Module, shard_teacher: bool
    ) -> None:
        object.__setattr__(self, "_student_call", _ModelCall(student))  # the root unit under FSDP
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see eopd.module's docstring
        object.__setattr__(self, "_teacher_call", _ModelCall(teacher))  # its root unit when sharded
        self.shard_teacher = shard_teacher

    def configure_model(self) -> None:
        """Shard the student with FSDP2 when the strategy gives a device mesh (ModelParallelStrategy).

        Each decoder layer is one unit, gathered for its own forward and backward; the rest (embeddings,
        final norm, output layer) belongs to the root unit `_ModelCall`. Data parallelism only: the
        tensor-parallel dimension of the mesh must be 1.
        """
        mesh = self.device_mesh
        if mesh is None or self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        if mesh["tensor_parallel"].size() != 1:
            raise ValueError(
                f"the student is sharded over data-parallel ranks only; tensor_parallel_size="
                f"{mesh['tensor_parallel'].size()} must be 1"
            )
        ranks = mesh["data_parallel"]
        for layer in decoder_layers(self.student):
            fully_shard(layer, mesh=ranks)
        fully_shard(self._student_call, mesh=ranks)
        if self.shard_teacher:  # the same units; frozen first, so FSDP keeps no gradient state for it
            freeze(self.teacher)
            for layer in decoder_layers(self.teacher):
                fully_shard(layer, mesh=ranks)
            fully_shard(self._teacher_call, mesh=ranks)

    @property
    def sharded(self) -> bool:
        """Whether the student is sharded with FSDP (by `configure_model`)."""
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self._student_call, FSDPModule)

    @property
    def teacher_sharded(self) -> bool:
        """Whether the teacher is sharded with FSDP (`shard_teacher=True` under a device mesh)."""
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self._teacher_call, FSDPModule)

    def on_teacher(self, fn, *, gathered: bool = False):
        """`fn(teacher)` without gradients, with the teacher's weights usable inside it however it is placed.

        Replicated, this is `fn(self.teacher)`. Sharded, it runs inside the teacher's root unit, as
        `on_student` does for the student: decoder layers gathered one forward at a time, or all of them
        for the whole call with `gathered=True` (sampling, evaluation). Every rank must make the same calls.
        """
        if not self.teacher_sharded:
            with torch.no_grad():
                return fn(self.teacher)
        return _call_without_grad(self._teacher_call, fn, gathered)

    def student_state_dict(self) -> dict[str, Tensor]:
        """The student's full weights; under FSDP gathered from every rank's shards (call it on every rank)."""
        return {
            name: value.full_tensor() if hasattr(value, "full_tensor") else value
            for name, value in self.student.state_dict().items()
        }

    def on_student(self, fn, *, gathered: bool = False):
        """`fn(student)`, with the student's weights usable inside it however the student is sharded.

        Unsharded, this is `fn(self.student)`. Under FSDP it runs inside the root unit's forward, where each
        decoder layer gathers its weights for its own forward only; with `gathered=True` (no gradients)
        every layer is gathered once for the whole call instead, so `fn` may run any number of forwards
        without collectives (sampling, whose step count differs between ranks; evaluation). Every rank
        must make the same calls. Gradients reach FSDP's hooks only when `fn` runs with gradients enabled,
        not gathered, and returns the tensors to differentiate (a tuple, not a dataclass: FSDP hooks the
        tensors it can see).
        """
        if not self.sharded:
            return fn(self.student)
        call = self._student_call
        if not gathered and torch.is_grad_enabled():
            return call(fn)  # the backward reshards the root unit
        return _call_without_grad(call, fn, gathered)

    def _teacher_weight(self) -> Tensor:
        """The teacher's output layer in the student's token ids (end-token rows swapped when remapped)."""
        # The teacher is frozen: build the (V, H) permuted copy once per device, not once per call.
        cached = getattr(self, "_teacher_weight_cache", None)
        if self.teacher_sharded:  # gathered whole once (every rank at the same call) and kept
            if cached is None:
                remap = self.pair.remap_end_token
                whole = self.on_teacher(lambda teacher: teacher_output_weight(teacher, remap).clone())
                object.__setattr__(self, "_teacher_weight_cache", (None, whole.to(self.device)))
            return self._teacher_weight_cache[1]
        source = output_weight(self.teacher)
        if cached is None or cached[0] != (source.data_ptr(), source.device):
            cached = (
                (source.data_ptr(), source.device),
                teacher_output_weight(self.teacher, self.pair.remap_end_token).to(self.device),
            )
            object.__setattr__(self, "_teacher_weight_cache", cached)
        return cached[1]

    def _whole_batch(self, signals: Signals, mask: Tensor) -> tuple[Signals, Tensor, slice]:
        """The (B, R) signals and mask of the rollout batch of ALL ranks, and this rank's rows in it.

        Under data parallelism the ranks' tensors are gathered and stacked in rank order as one batch
        (responses right-padded to the longest; the mask once, each measured signal once); a single
        process gets its own batch and every row.
        """
        if not self._distributed:
            return signals, mask, slice(None)
        masks, widths = _gather_padded(mask.to(torch.uint8))  # gloo gathers no bool tensors
        width = max(widths)

        def whole(parts: list[Tensor]) -> Tensor:
            return torch.cat([torch.nn.functional.pad(part, (0, width - part.shape[1])) for part in parts])

        full_mask = whole([m.bool() for m in masks])
        full = signals.map(lambda values: whole(_gather_padded(values.float())[0]))
        start = sum(m.shape[0] for m in masks[: self.global_rank])
        return full, full_mask, slice(start, start + mask.shape[0])

    def _all_ranks(self, metrics: Metrics) -> Metrics:
        """The metrics merged over all ranks (exact: sums and weights add up); unchanged on one process."""
        if not self._distributed:
            return metrics
        local = {name: (float(metrics.sums[name]), float(metrics.weights[name])) for name in metrics.sums}
        gathered: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, local)
        merged = Metrics()
        for shard in gathered:
            for name, (total, weight) in shard.items():
                merged.add_sums(name, total, weight)
        return merged

    def _any_rank(self, flag: bool) -> bool:
        return self._reduce(float(flag), "sum") > 0

    @property
    def _distributed(self) -> bool:
        trainer = getattr(self, "_trainer", None)
        return trainer is not None and trainer.world_size > 1

    def _reduce(self, value: float, op: str) -> float:
        """`value` reduced over the ranks with "sum" or "max"; itself on one process."""
        if not self._distributed:
            return value
        tensor = torch.tensor(value, dtype=torch.float64, device=self.device)
        return float(self.trainer.strategy.reduce(tensor, reduce_op=op))


class _ModelCall(torch.nn.Module):
    """Calls `fn(model)` in its forward: under FSDP, the root unit whose forward makes the model whole."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn(self.model)


def _call_without_grad(call: _ModelCall, fn, gathered: bool):
    """`fn` inside the sharded root unit `call` without gradients (every layer gathered once if `gathered`)."""
    with torch.no_grad():
        out = call(_gather_layers_for(fn) if gathered else fn)
    call.reshard()  # the root keeps its weights gathered after a forward, expecting a backward
    return out


def _gather_layers_for(fn):
    """`fn` wrapped to run with every FSDP unit below the root gathered once, instead of per forward."""
    from torch.distributed.fsdp import FSDPModule

    def gathered(student):
        units = [m for m in student.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            return fn(student)
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(True, recurse=False)

    return gathered


def _gather_padded(values: Tensor) -> tuple[list[Tensor], list[int]]:
    """Every rank's (B_r, R_r) tensor, in rank order, although B_r and R_r differ between ranks."""
    world = torch.distributed.get_world_size()
    shape = torch.tensor(values.shape, device=values.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    torch.distributed.all_gather(shapes, shape)
    rows = max(int(s[0]) for s in shapes)
    width = max(int(s[1]) for s in shapes)
    padded = values.new_zeros((rows, width))
    padded[: values.shape[0], : values.shape[1]] = values
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    out = [p[: int(s[0]), : int(s[1])] for p, s in zip(parts, shapes, strict=True)]
    return out, [int(s[1]) for s in shapes]


def freeze(model: torch.nn.Module) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
