"""Typed errors of model loading (the serving layer maps them to clear client-facing messages)."""

from __future__ import annotations

from .config import UnknownModelError


class ModelFileError(ValueError):
    """A model path that does not exist or is not a file/directory jtrail can read."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file that exists but cannot be parsed (bad magic, truncated, inconsistent)."""


__all__ = ["CorruptCheckpointError", "ModelFileError", "UnknownModelError"]
