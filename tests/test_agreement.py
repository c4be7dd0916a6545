"""scripts/agreement.py: the verdict of each paired difference and whether two comparisons agree."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "agreement.py"
spec = importlib.util.spec_from_file_location("agreement", SCRIPT)
agreement = importlib.util.module_from_spec(spec)
spec.loader.exec_module(agreement)

FIELDS = ["variant", "metric", "diff_mean", "diff_ci_low", "diff_ci_high"]
BOOT = ["boot_diff_mean", "boot_diff_ci_low", "boot_diff_ci_high"]


def write(folder: Path, rows: list[list]) -> Path:
    folder.mkdir()
    with open(folder / "comparison.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS + BOOT)
        writer.writerows(rows)
    return folder


def test_the_bootstrap_interval_is_read_first_and_verdicts_compare_signs(tmp_path, capsys):
    a = write(tmp_path / "a", [
        ["tip", "paths/distinct", 0.7, 0.5, 0.9, 0.68, 0.59, 0.78],   # + (bootstrap read)
        ["eopd", "paths/distinct", 0.05, -0.1, 0.2, "", "", ""],      # 0 (t interval)
        ["grpo", "avg@8", 0.1, 0.05, 0.15, "", "", ""],               # +
        ["opd", "avg@8", "", "", "", "", "", ""],                      # the baseline: no difference
    ])  # fmt: skip
    b = write(tmp_path / "b", [
        ["tip", "paths/distinct", 0.6, 0.4, 0.8, "", "", ""],          # +
        ["eopd", "paths/distinct", 0.3, 0.1, 0.5, "", "", ""],         # +: differs from a
        ["grpo", "avg@8", 0.1, 0.02, 0.2, "", "", ""],                # +
    ])  # fmt: skip

    assert agreement.read_differences(a, None)[("tip", "paths/distinct")] == (0.68, 0.59, 0.78)
    assert agreement.main([str(a), str(b), "--labels", "x", "y", "--metrics", "paths/distinct", "avg@8"]) == 0

    out = capsys.readouterr().out
    assert "| eopd | `paths/distinct` | +0.050 [-0.100, +0.200] | +0.300 [+0.100, +0.500] | 0 + | no |" in out
    assert "| tip | `paths/distinct` | +0.680 [+0.590, +0.780] | +0.600 [+0.400, +0.800] | + + | yes |" in out
    assert "2 of 3 differences reach the same verdict in every comparison." in out
