"""scripts/keep_run_files.py: a study's small files copied for committing, checkpoints left behind."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "keep_run_files.py"
spec = importlib.util.spec_from_file_location("keep_run_files", SCRIPT)
keep_run_files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(keep_run_files)


def test_finished_runs_keep_their_small_files_and_times_unfinished_ones_are_named(tmp_path):
    sweep = tmp_path / "sweep"
    for name, finished in (("0_opd-s0", True), ("1_eopd-s0", False)):
        run = sweep / name
        (run / ".hydra").mkdir(parents=True)
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        (run / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
        (run / "config.yaml").write_text("seed: 0\n")
        (run / "metrics.csv").write_text("step\n1\n")
        if finished:
            (run / "eval.json").write_text("{}")
            os.utime(run / "eval.json", (1_000_000, 1_000_000))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    out = tmp_path / "kept"

    assert keep_run_files.keep(sweep, out) == ["1_eopd-s0"]

    kept = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert kept == [
        "0_opd-s0/.hydra/overrides.yaml",
        "0_opd-s0/config.yaml",
        "0_opd-s0/eval.json",
        "0_opd-s0/metrics.csv",
        "multirun.yaml",
    ]
    assert (out / "0_opd-s0" / "eval.json").stat().st_mtime == 1_000_000  # the report's wall time reads it
