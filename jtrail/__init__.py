"""jtrail: JAX LLM serving with length-aware (TRAIL) scheduling.

Public names are imported lazily (PEP 562) so `import jtrail` and `jtrail --help` stay fast: JAX loads
only when a model is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "jtrail.llm",
    "Completion": "jtrail.llm",
    "SamplingParams": "jtrail.serving.sequence",
    "FinishReason": "jtrail.serving.sequence",
    "InvalidRequestError": "jtrail.serving.sequence",
    "QueueFullError": "jtrail.serving.sequence",
    "JtrailError": "jtrail.models.errors",
    "load_model": "jtrail.models.loader",
    "LoadedModel": "jtrail.models.loader",
    "ModelConfig": "jtrail.models.config",
    "UnknownModelError": "jtrail.models.errors",
    "ModelFileError": "jtrail.models.errors",
    "CorruptCheckpointError": "jtrail.models.errors",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs only
    from jtrail.llm import LLM, Completion  # noqa: F401
    from jtrail.models.config import ModelConfig  # noqa: F401
    from jtrail.models.errors import CorruptCheckpointError, JtrailError, ModelFileError, UnknownModelError  # noqa: F401
    from jtrail.models.loader import LoadedModel, load_model  # noqa: F401
    from jtrail.serving.sequence import (  # noqa: F401
        FinishReason,
        InvalidRequestError,
        QueueFullError,
        SamplingParams,
    )


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jtrail' has no attribute {name!r}")
