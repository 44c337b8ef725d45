"""Issue 18 item 8: every typed error the README names is importable from `jtrail`."""

from __future__ import annotations

import re
from pathlib import Path

import jtrail


def test_readme_errors_are_exported() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    names = set(re.findall(r"`(\w+Error)`", readme))
    assert {"QueueFullError", "InvalidRequestError"} <= names
    for name in names:
        assert isinstance(getattr(jtrail, name), type) and issubclass(getattr(jtrail, name), Exception), name
