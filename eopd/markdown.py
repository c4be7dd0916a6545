"""The markdown of `eopd.compare`'s reports: one number format and one table layout, shared by the
t-interval tables (`eopd.compare`) and the bootstrap's (`eopd.bootstrap`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def fmt_number(x: float | None, signed: bool = False) -> str:
    """Three decimals, or two significant exponents outside [1e-3, 1e4); `-` for a missing or non-finite value."""
    if x is None or not math.isfinite(x):
        return "-"
    sign = "+" if signed else ""
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:{sign}.3f}"
    return f"{x:{sign}.2e}"


def markdown_table(
    second_column: str, metrics: Sequence[str], rows: Iterable[tuple[str, str, Sequence[str]]]
) -> list[str]:
    """A table with one row per variant: `| variant | <second_column> | <one cell per metric> |`.

    Args:
        rows: (variant, second column's cell, the metrics' cells) per row.
    """
    header = f"| variant | {second_column} | " + " | ".join(f"`{m}`" for m in metrics) + " |"
    rule = "|" + "---|" * (len(metrics) + 2)
    return [header, rule, *(f"| {v} | {second} | " + " | ".join(cells) + " |" for v, second, cells in rows)]
