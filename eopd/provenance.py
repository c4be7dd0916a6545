"""Which code a run ran: the git commit of the checkout `eopd` is imported from, and whether the checkout
had changes, written to each run's `code.json` so that a comparison can name the commit its runs ran at."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CODE_FILE = "code.json"


def code_version() -> dict[str, Any]:
    """{"commit": full hash or None, "dirty": True when tracked files differ from it, or None unknown}.

    None for both when eopd is not imported from a git checkout (an installed wheel) or git is missing.
    """
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


def write_code_version(run_dir: Path) -> None:
    """The run's `code.json`."""
    (Path(run_dir) / CODE_FILE).write_text(json.dumps(code_version()) + "\n")


def read_code_version(run_dir: Path) -> dict[str, Any] | None:
    """A run's `code.json`, or None for a run written before it existed."""
    path = Path(run_dir) / CODE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def describe_commits(versions: list[dict[str, Any] | None]) -> str:
    """One sentence on the commits a set of runs ran at, for a report."""
    known = [v for v in versions if v and v.get("commit")]
    if not known:
        return "Code: the runs recorded no commit (run before code.json existed, or not from a git checkout)."
    commits = sorted({v["commit"][:12] for v in known})
    dirty = sum(1 for v in known if v.get("dirty"))
    text = (
        f"Code: commit {commits[0]}"
        if len(commits) == 1
        else f"Code: {len(commits)} commits ({', '.join(commits)})"
    )
    text += f" ({len(known)} of {len(versions)} runs recorded it"
    text += (
        f"; {dirty} with uncommitted changes to tracked files)." if dirty else ", all from a clean checkout)."
    )
    return text
