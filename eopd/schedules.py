"""Schedules of a scalar over training steps: for objective weights, thresholds and the like.

Every schedule is a frozen dataclass called with the optimizer step and returning a float, so a plain
number can stand wherever a schedule is accepted (`as_schedule` wraps it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Constant:
    """The same value at every step."""

    value: float

    def __call__(self, step: int) -> float:
        return float(self.value)


@dataclass(frozen=True)
class Linear:
    """From `start` at step `begin` to `end` at step `begin + steps`, constant outside."""

    start: float
    end: float
    steps: int
    begin: int = 0

    def __post_init__(self) -> None:
        _check_steps(self.steps, self.begin)

    def __call__(self, step: int) -> float:
        progress = min(max((step - self.begin) / self.steps, 0.0), 1.0)
        return self.start + (self.end - self.start) * progress


@dataclass(frozen=True)
class Cosine:
    """Half a cosine from `start` at step `begin` to `end` at step `begin + steps`, constant outside."""

    start: float
    end: float
    steps: int
    begin: int = 0

    def __post_init__(self) -> None:
        _check_steps(self.steps, self.begin)

    def __call__(self, step: int) -> float:
        progress = min(max((step - self.begin) / self.steps, 0.0), 1.0)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Step:
    """Piecewise constant: `values[i]` from step `boundaries[i - 1]` on (values[0] before the first)."""

    values: Sequence[float]
    boundaries: Sequence[int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        object.__setattr__(self, "boundaries", tuple(int(b) for b in self.boundaries))
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError(
                f"Step schedule: values has {len(self.values)} entries and boundaries {len(self.boundaries)}; "
                "values needs exactly one more entry than boundaries"
            )
        if list(self.boundaries) != sorted(set(self.boundaries)):
            raise ValueError(f"Step schedule: boundaries={list(self.boundaries)} must be strictly increasing")

    def __call__(self, step: int) -> float:
        index = sum(step >= b for b in self.boundaries)
        return self.values[index]


Schedule = Constant | Linear | Cosine | Step


def as_schedule(value: float | Schedule) -> Schedule:
    """Wrap a plain number in `Constant`; pass schedules through."""
    if isinstance(value, Constant | Linear | Cosine | Step):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number or a schedule (Constant, Linear, Cosine, Step), got {value!r}")
    return Constant(float(value))


def schedule_range(schedule: Schedule) -> tuple[float, float]:
    """The smallest and largest value a schedule ever takes (for validating e.g. a non-negative weight)."""
    if isinstance(schedule, Constant):
        return (schedule.value, schedule.value)
    if isinstance(schedule, Step):
        return (min(schedule.values), max(schedule.values))
    return (min(schedule.start, schedule.end), max(schedule.start, schedule.end))


def _check_steps(steps: int, begin: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(
            f"steps={steps!r} must be a positive integer (the length of the ramp in optimizer steps)"
        )
    if begin < 0:
        raise ValueError(f"begin={begin!r} must be >= 0")
