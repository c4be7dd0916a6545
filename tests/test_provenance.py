"""Which code a run ran: code.json, and the sentence a report makes of several runs' versions."""

from __future__ import annotations

import subprocess

from eopd.provenance import REPO, code_version, describe_commits, read_code_version, write_code_version


def test_a_run_records_the_commit_of_the_checkout_it_imports_eopd_from(tmp_path):
    write_code_version(tmp_path)
    saved = read_code_version(tmp_path)
    assert saved == code_version()
    inside_git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if inside_git.returncode == 0:
        assert saved["commit"] == inside_git.stdout.strip() and isinstance(saved["dirty"], bool)
    assert read_code_version(tmp_path / "elsewhere") is None


def test_the_report_names_one_commit_several_or_none():
    a = {"commit": "a" * 40, "dirty": False}
    b = {"commit": "b" * 40, "dirty": True}
    assert (
        describe_commits([a, a])
        == f"Code: commit {'a' * 12} (2 of 2 runs recorded it, all from a clean checkout)."
    )
    assert describe_commits([a, b, None]).startswith(f"Code: 2 commits ({'a' * 12}, {'b' * 12}) (2 of 3 runs")
    assert "1 with uncommitted changes" in describe_commits([a, b])
    assert describe_commits([None]).startswith("Code: the runs recorded no commit")
