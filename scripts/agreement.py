"""Do two comparisons of the same study agree? Paired differences side by side, and whether each holds.

    python scripts/agreement.py docs/study docs/study/default_kernel --labels native default \
        --metrics paths/distinct avg@8 --out docs/study/kernels.md

Each folder is an `eopd.compare` output (its `comparison.csv`, or `comparison_vs_<b>.csv` with
`--against b`). For every variant and metric it prints the difference against the baseline in each
comparison, mean and 95% interval, from the paired bootstrap over problems within seeds where the
comparison has one, else the t interval over seeds; then the verdict of each interval (`+` above 0, `-`
below, `0` containing it) and whether the verdicts agree. A result "holds" under both when the verdicts
are the same: the same sign with both intervals clear of 0, or both unresolved.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read_differences(folder: Path, against: str | None) -> dict[tuple[str, str], tuple[float, float, float]]:
    """(variant, metric) -> (mean, low, high) of the difference against the comparison's baseline."""
    name = "comparison.csv" if against is None else f"comparison_vs_{against}.csv"
    rows = {}
    with open(folder / name) as f:
        for row in csv.DictReader(f):
            for prefix in ("boot_diff_", "diff_"):  # the bootstrap over problems first, then over seeds
                values = [row.get(prefix + k, "") for k in ("mean", "ci_low", "ci_high")]
                if all(values):
                    rows[(row["variant"], row["metric"])] = tuple(float(v) for v in values)
                    break
    return rows


def verdict(low: float, high: float) -> str:
    """`+` when the interval lies above 0, `-` below, `0` when it contains 0."""
    if low > 0:
        return "+"
    if high < 0:
        return "-"
    return "0"


def agreement_table(
    comparisons: list[dict[tuple[str, str], tuple[float, float, float]]],
    labels: list[str],
    metrics: list[str],
) -> tuple[str, int, int]:
    """The markdown table and (pairs that agree, pairs compared) over variants and metrics all have."""
    keys = sorted(set.intersection(*(set(c) for c in comparisons)))
    keys = [k for k in keys if k[1] in metrics]
    header = ["variant", "metric", *labels, "verdicts", "agree"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    agree = 0
    for variant, metric in sorted(keys, key=lambda k: (metrics.index(k[1]), k[0])):
        cells, verdicts = [], []
        for comparison in comparisons:
            mean, low, high = comparison[(variant, metric)]
            cells.append(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]")
            verdicts.append(verdict(low, high))
        same = len(set(verdicts)) == 1
        agree += same
        lines.append(
            f"| {variant} | `{metric}` | "
            + " | ".join(cells)
            + f" | {' '.join(verdicts)} | {'yes' if same else 'no'} |"
        )
    return "\n".join(lines), agree, len(keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="eopd.compare output folders")
    parser.add_argument("--labels", nargs="+", help="one label per folder (default: the folder names)")
    parser.add_argument("--metrics", nargs="+", default=["paths/distinct", "avg@8", "pass@8"])
    parser.add_argument("--against", help="read comparison_vs_<against>.csv instead of comparison.csv")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    labels = args.labels or [f.name for f in args.folders]
    if len(labels) != len(args.folders):
        parser.error(f"{len(labels)} labels for {len(args.folders)} folders")
    comparisons = [read_differences(f, args.against) for f in args.folders]
    table, agree, total = agreement_table(comparisons, labels, args.metrics)
    if total == 0:
        print("no variant and metric is in every comparison", file=sys.stderr)
        return 1
    summary = f"{agree} of {total} differences reach the same verdict in every comparison."
    print(table, summary, sep="\n\n")
    if args.out is not None:
        args.out.write_text(table + "\n\n" + summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
