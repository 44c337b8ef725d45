"""The root of jtrail's typed errors, and the typed errors of model loading.

`JtrailError` lives here, in the lowest layer that raises typed errors, so that every layer above
(models, serving, the `jtrail` facade) can derive from it and a caller can catch everything jtrail
raises on purpose with one class (`jtrail.JtrailError`). Kernels raise none of their own. The serving
layer maps these to clear client-facing messages.
"""

from __future__ import annotations


class JtrailError(Exception):
    """Base class of every typed error jtrail raises."""


class ModelFileError(JtrailError, ValueError):
    """A model path that does not exist or is not a file/directory jtrail can read."""


class CorruptCheckpointError(JtrailError, ValueError):
    """A checkpoint file that exists but cannot be parsed (bad magic, truncated, inconsistent)."""


class UnknownModelError(JtrailError, ValueError):
    """A model name, architecture or file that jtrail cannot load."""


__all__ = ["CorruptCheckpointError", "JtrailError", "ModelFileError", "UnknownModelError"]
