"""Policies chosen by name: `make_policy("trail", c=0.8, margin=32, aging=5.0, memory=True)`.

Preemption knobs of the rank-ordered policies (ranked.py): `c` (TRAIL's cutoff), `margin`,
`max_preemptions` (cap per request; None: none) and `preempt_cost` (cost-aware preemption,
preemption_cost.py: True for the H200 step model, a dict of `RecomputeCost` fields, or a StepModel).

`memory` may be True (default MemoryGuard), a MemoryGuard, or a dict of its fields; `watermark`,
`reserve` and `memory_mode` (its `mode`) keywords also turn it on. `fcfs` lives in fcfs.py (the
engine's baseline) and takes only `watermark` (vLLM's free-page admission watermark).
"""

from __future__ import annotations

from typing import Any

from ...sequence import InvalidRequestError
from .base import Policy
from .memory import MemoryGuard

POLICY_NAMES = ("fcfs", "priority", "srpt-oracle", "trail", "gittins")


def _memory(kw: dict[str, Any]) -> None:
    """Resolve the memory keywords into `memory`: a MemoryGuard, or None for `memory=False` (off); left
    out when none is given, so the policy keeps its own default."""
    fields = {k: kw.pop(k) for k in ("watermark", "reserve", "memory_mode") if k in kw}
    renamed = "memory_mode" in fields
    if renamed:
        fields["mode"] = fields.pop("memory_mode")
    if "memory" not in kw and not fields:
        return
    mem = kw.pop("memory", None)
    try:
        if mem is True or (mem is None and fields):
            mem = MemoryGuard(**fields)
        elif isinstance(mem, dict):
            mem = MemoryGuard(**{**mem, **fields})
    except InvalidRequestError as e:
        if renamed and e.field == "mode":  # named as the caller spelled it, not MemoryGuard's "mode"
            raise InvalidRequestError("memory_mode", e.message) from None
        raise
    if mem is False:
        mem = None
    kw["memory"] = mem


def make_policy(name: str, **kw: Any) -> Policy:
    """A fresh policy object (policies keep per-engine state: build one per engine / replica)."""
    if name == "fcfs":
        from .fcfs import FCFSPolicy

        bad = sorted(set(kw) - {"watermark"})
        if bad:
            raise InvalidRequestError("policy", f"fcfs takes only `watermark`, got {bad}")
        return FCFSPolicy(**kw)
    _memory(kw)
    try:
        if name == "priority":
            from .priority import PriorityPolicy as cls
        elif name == "srpt-oracle":
            from .srpt import SRPTOraclePolicy as cls
        elif name == "trail":
            from .trail import TrailPolicy as cls
        elif name == "gittins":
            from .gittins import GittinsPolicy as cls
        else:
            raise InvalidRequestError("policy", f"unknown policy {name!r}; choose from {POLICY_NAMES}")
        return cls(**kw)
    except TypeError as e:  # unknown keyword
        raise InvalidRequestError("policy", f"bad options for {name!r}: {e}") from None
