"""Copy the small files of a sweep's finished runs into a folder meant to be committed.

A study's numbers must trace to committed files, but its run folders hold checkpoints and saved models
(hundreds of MB each). This copies what `eopd.compare` reads and what a reader checks, per finished run:
config.yaml, code.json, eval.json (with the per-problem results), finished.json, metrics.csv, train.log
and Hydra's .hydra/ folder, plus the sweep's multirun.yaml, keeping file times (the report's wall time
reads them). Unfinished runs (no eval.json) are skipped and named.

    python scripts/keep_run_files.py outputs/sweeps/real/latest docs/real-study/runs
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

KEPT = ("config.yaml", "code.json", "eval.json", "finished.json", "metrics.csv", "train.log")


def keep(sweep: Path, out: Path) -> list[str]:
    """Copy the kept files of every finished run under `sweep` into `out`; returns the skipped runs."""
    out.mkdir(parents=True, exist_ok=True)
    if (sweep / "multirun.yaml").is_file():
        shutil.copy2(sweep / "multirun.yaml", out / "multirun.yaml")
    skipped = []
    for run in sorted(p for p in sweep.iterdir() if (p / "config.yaml").is_file()):
        if not (run / "eval.json").is_file():
            skipped.append(run.name)
            continue
        target = out / run.name
        target.mkdir(exist_ok=True)
        for name in KEPT:
            if (run / name).is_file():
                shutil.copy2(run / name, target / name)
        if (run / ".hydra").is_dir():
            shutil.copytree(run / ".hydra", target / ".hydra", dirs_exist_ok=True, copy_function=shutil.copy2)
    return skipped


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep", type=Path, help="a sweep folder (its runs are its subfolders)")
    parser.add_argument("out", type=Path, help="where the copies go")
    args = parser.parse_args()
    skipped = keep(args.sweep, args.out)
    for name in skipped:
        print(f"skipped {name}: unfinished (no eval.json)")


if __name__ == "__main__":
    main()
