"""What training changed, for runs whose final table kept only the trained student.

A sweep's runs share one pair, so they evaluate only "student after" (`eval.final.models=[after]`); the
student before training is the same model in every run, evaluated on the same problems with the same
sampling seed. This prints, per run, the line the final table prints under itself (`make real`): the
Avg@n difference against that one "student before" row, paired by problem, with its standard error, and
each KL's ratio; then the student's high-entropy fraction against the teacher's on the same samples.

    python scripts/real_gains.py docs/real/default-kernels.eval.json outputs/sweeps/real/latest/*eopd*/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eopd.evaluation import EvalResult
from eopd.metrics import ProblemResults
from eopd.reports import training_change


def load_row(path: Path, row: str) -> EvalResult:
    """One row of an eval.json (e.g. "student before") with its per-problem results."""
    saved = json.loads(path.read_text())
    if row not in saved:
        raise SystemExit(
            f"{path} has no {row!r} row (rows: {', '.join(k for k in saved if k != 'problems')})"
        )
    return EvalResult(saved[row], ProblemResults.from_json(saved["problems"][row]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("before", type=Path, help="an eval.json holding the 'student before' row")
    parser.add_argument("runs", type=Path, nargs="+", help="run folders (or their eval.json files)")
    args = parser.parse_args()
    before = load_row(args.before, "student before")
    for run in args.runs:
        path = run / "eval.json" if run.is_dir() else run
        if not path.is_file():
            print(f"{run}: no eval.json (not finished)")
            continue
        after = load_row(path, "student after")
        line = training_change({"student before": before, "student after": after})
        if line is None:
            raise SystemExit(f"{path}: evaluated on other problems than {args.before}")
        metrics = after.metrics
        n = after.problems.n
        print(
            f"{path.parent.name}: avg@{n} {metrics[f'avg@{n}']:.3f}, pass@{n} {metrics[f'pass@{n}']:.3f}; "
            f"{line.split(': ', 1)[1]}; high-entropy fraction {metrics['entropy/student_high_frac']:.3f} "
            f"(teacher on the same samples {metrics.get('entropy/teacher_high_frac', float('nan')):.3f})"
        )


if __name__ == "__main__":
    main()
