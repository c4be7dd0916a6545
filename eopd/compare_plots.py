"""The plots of `eopd.compare`: training curves per variant with interval bands over seeds, and Pass@k
against k for the final students."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from eopd.comparison import Comparison, Interval, RunRecord, mean_interval
from eopd.metrics import PASS_AT_K

# The diagnostics the paper argues with (PAPER.md section 5), plotted over training for every variant.
CURVES = (
    ("entropy/student", "student_entropy.png", "Student token entropy", "entropy (nats)"),
    (
        "div/fkl_high_entropy",
        "fkl_high_entropy.png",
        "Forward KL(teacher || student) on high-entropy tokens",
        "forward KL (nats)",
    ),
    ("gate/fraction", "gate_fraction.png", "Fraction of tokens the gate opens", "gated fraction"),
    (
        "entropy/student_high_frac",
        "student_high_entropy_fraction.png",
        "Fraction of the student's tokens with entropy >= tau",
        "high-entropy fraction",
    ),
    (
        "entropy/high_frac_gap",
        "high_entropy_gap.png",
        "Student's high-entropy fraction minus the teacher's on the student's rollouts",
        "student - teacher (below 0: surer than the teacher)",
    ),
    (
        "val/entropy/high_frac_gap",
        "val_high_entropy_gap.png",
        "Validation: student's high-entropy fraction minus the teacher's on the same samples",
        "student - teacher",
    ),
    (
        "val/paths/distinct",
        "val_distinct_paths.png",
        "Validation: distinct correct solution paths per problem",
        "distinct correct paths",
    ),
)
PASS_AT_K_PNG = "pass_at_k.png"
VAL_AVG_PNG = "val_avg_at_k.png"


def curve_band(
    records: Sequence[RunRecord], metric: str, confidence: float = 0.95, *, bin_steps: float = 0
) -> list[tuple[float, Interval]]:
    """Mean over runs (seeds) of a logged metric at each rollout step, with its interval.

    With `bin_steps` > 0 each run's values are first averaged within bins of that many rollout steps
    (x = the bin's end), so a metric logged every step reads as a curve rather than noise; the interval
    is still across runs.
    """
    at: dict[float, list[float]] = defaultdict(list)
    for record in records:
        if bin_steps > 0:
            bins: dict[float, list[float]] = defaultdict(list)
            for x, value in record.curves.get(metric, []):
                bins[math.ceil(x / bin_steps) * bin_steps].append(value)
            points = [(x, sum(v) / len(v)) for x, v in bins.items()]
        else:
            points = record.curves.get(metric, [])
        for x, value in points:
            at[x].append(value)
    return [(x, mean_interval(at[x], confidence)) for x in sorted(at)]


MAX_CURVE_POINTS = 60  # denser per-step curves are averaged in bins down to about this many points


def curve_bin_steps(records: Iterable[RunRecord], metric: str) -> float:
    """The bin width (rollout steps) that brings a metric's curve down to about MAX_CURVE_POINTS points."""
    xs = {x for record in records for x, _ in record.curves.get(metric, [])}
    if len(xs) <= MAX_CURVE_POINTS:
        return 0
    return float(math.ceil((max(xs) - min(xs)) / MAX_CURVE_POINTS))


# ---- output ----------------------------------------------------------------------------------------------


def _colours(variants: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(variants) <= 10 else "tab20"]
    return {v: cmap(i % cmap.N) for i, v in enumerate(variants)}


def plot_curves(
    grouped: Mapping[str, Sequence[RunRecord]],
    metric: str,
    path: Path,
    *,
    title: str,
    ylabel: str,
    confidence: float = 0.95,
) -> bool:
    """One line per variant (mean over seeds) with a shaded interval band; False when nobody logged it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = _colours(list(grouped))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn = False
    bin_steps = curve_bin_steps((r for records in grouped.values() for r in records), metric)
    for variant, records in grouped.items():
        band = curve_band(records, metric, confidence, bin_steps=bin_steps)
        if not band:
            continue
        xs = [x for x, _ in band]
        means = [i.mean for _, i in band]
        ax.plot(
            xs,
            means,
            marker="o" if len(xs) <= 30 else None,
            markersize=3,
            color=colours[variant],
            label=f"{variant} (n={len(records)})",
        )
        lows = [i.low if i.low is not None else i.mean for _, i in band]
        highs = [i.high if i.high is not None else i.mean for _, i in band]
        ax.fill_between(xs, lows, highs, color=colours[variant], alpha=0.2, linewidth=0)
        drawn = True
    if drawn:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("rollout step")
        ax.set_ylabel(ylabel)
        binned = f"each run averaged over {bin_steps:g}-step bins, " if bin_steps else ""
        ax.set_title(f"{title}\n{binned}mean over seeds, {confidence:.0%} CI band", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def pass_at_k_metrics(records: Sequence[RunRecord]) -> list[tuple[int, str]]:
    """(k, metric) for the Pass@k metrics of the final table (unprefixed eval.json keys preferred)."""
    found: dict[str, dict[int, str]] = defaultdict(dict)
    for record in records:
        for key in record.final:
            match = PASS_AT_K.match(key)
            if match:
                found[match.group(1)][int(match.group(2))] = key
    for prefix in ("", "test/", "val/"):
        if found.get(prefix):
            return sorted(found[prefix].items())
    return []


def plot_pass_at_k(comparison: Comparison, records: Sequence[RunRecord], path: Path) -> bool:
    """Final Pass@k against k, one line per variant with interval error bars; False without Pass@k."""
    ks = pass_at_k_metrics(records)
    if not ks:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = _colours(comparison.variants)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for variant in comparison.variants:
        intervals = [
            (k, mean_interval((r.value(m) for r in records if r.variant == variant), comparison.confidence))
            for k, m in ks
        ]
        intervals = [(k, i) for k, i in intervals if i.n]
        if not intervals:
            continue
        errors = [i.half_width or 0.0 for _, i in intervals]
        n = len(comparison.seeds[variant])
        ax.errorbar(
            [k for k, _ in intervals],
            [i.mean for _, i in intervals],
            yerr=errors,
            marker="o",
            markersize=3,
            capsize=3,
            color=colours[variant],
            label=f"{variant} (n={n})",
        )
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("Pass@k")
    ax.set_xticks([k for k, _ in ks])
    sources = ", ".join(sorted({r.final_source for r in records}))
    ax.set_title(
        f"Pass@k of the final student ({sources})\nmean over seeds, {comparison.confidence:.0%} CI",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def val_avg_metric(records: Sequence[RunRecord]) -> str | None:
    """The validation Avg@k column logged during training (`val/avg@k`), if any."""
    keys = sorted({k for r in records for k in r.curves if re.match(r"^val/avg@\d+$", k)})
    return keys[-1] if keys else None
