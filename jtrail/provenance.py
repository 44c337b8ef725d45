"""Where a result came from: the commit that produced it (benchmarks and probe training record it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """`GIT_COMMIT` if set (a copy of the tree without .git, e.g. on a lent GPU), else `git rev-parse
    HEAD` of the checkout this package lives in; None when neither is available."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
