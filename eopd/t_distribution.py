"""Student's t distribution for integer degrees of freedom, in closed form (no scipy): the quantile that
every t interval of `eopd.compare` uses, and the two-sided p-value of a t statistic."""

from __future__ import annotations

import math


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t distribution with an integer number of degrees of freedom.

    Inverts the closed-form CDF for integer df (Abramowitz & Stegun 26.7.3-4) by bisection; no scipy.
    """
    if not 0.5 < p < 1:
        raise ValueError(f"p={p} must lie in (0.5, 1)")
    if int(df) != df or df < 1:
        raise ValueError(f"df={df} must be a positive integer")
    target = 2 * p - 1  # P(-t < T < t)
    low, high = 0.0, 1.0
    while _t_central_mass(high, int(df)) < target:
        low, high = high, 2 * high
    for _ in range(200):
        mid = (low + high) / 2
        if _t_central_mass(mid, int(df)) < target:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * high:
            break
    return (low + high) / 2


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for T ~ Student t with integer df: the two-sided p-value of a t statistic."""
    return max(0.0, 1.0 - _t_central_mass(abs(t), int(df)))


def _t_central_mass(t: float, df: int) -> float:
    """P(-t < T < t) for T ~ Student t with integer df."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        total, term = 0.0, 1.0
        if df > 1:
            total = 1.0
            for j in range(1, (df - 3) // 2 + 1):  # term_j = prod (2i)/(2i+1) * cos^(2j)
                term *= (2 * j) / (2 * j + 1) * c2
                total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)
    total, term = 1.0, 1.0
    for j in range(1, (df - 2) // 2 + 1):  # term_j = prod (2i-1)/(2i) * cos^(2j)
        term *= (2 * j - 1) / (2 * j) * c2
        total += term
    return s * total


class SymmetricBounds:
    """`low` and `high` of an interval held as `mean` and `half_width` (None: no interval)."""

    mean: float
    half_width: float | None

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width
