"""Cost-aware preemption: preempt a running request only when the expected gain beats the recompute.

A preemption by recompute frees the victim's slot and pages now and makes the engine prefill the
victim's prompt + generated tokens again when it resumes. The rule (`RecomputeCost.worth_it`):

    preempt victim V for waiting W  iff  (R_V - R_W) * tau  >  delta_V * M

- R_V, R_W: the predicted remaining lengths (the policy's ranks, in tokens).
- tau = a + b N + c KV: the time of one decode step of the current batch (N running sequences, KV
  tokens of context), i.e. the time one slot takes to produce one token.
- delta_V = b L_V + d ceil(L_V / chunk): the extra step time of re-prefilling V's L_V = prompt +
  generated tokens (per-token cost b; d per step that makes a prefill call, and the engine prefills at
  most `prefill_chunk` tokens a step: EngineConfig.max_prefill_tokens_per_step, 512 by default).
- M = running + waiting: the requests in the system, each of which that longer step delays.

Derivation (SRPT exchange argument in the slot model: each slot makes one token per step). Within
one slot, serving V to the end then W gives completion times R_V and R_V + R_W (steps); serving W
first gives R_W and R_W + R_V. Swapping the order saves (2 R_V + R_W) - (2 R_W + R_V) = R_V - R_W
steps of total response time, i.e. (R_V - R_W) * tau seconds; every other request's completion
stays where it was. Recompute does not give V's tokens back for free: when V resumes, its step
takes delta_V longer, which postpones every request then in the system (running ones wait for their
next token, waiting ones for their slot): about delta_V * M seconds in total, with M the number in
the system now as the estimate of the number then. Preempting pays when the saving exceeds that.

The exchange saving is an upper bound when the queue is short: if V would get the very next free
slot back, W and V merely trade waits and the swap gains nothing; it is realized in full when
shorter requests keep V waiting (the overloaded case, where SRPT's gain lives). `weight` scales
the cost side (1: the formula as derived) for tuning.

`a, b, c, d` are a fitted `StepModel`'s coefficients (serving/simulation/step_model.py; plain floats
here so the policy stays plain Python). Only the ratio delta / tau matters, so a step model from another
machine still ranks preemptions sensibly if the prefill-call-to-step ratio is similar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...sequence import InvalidRequestError, Sequence

# SmolLM2-135M bf16 on one H200, the newest engine fit (serving.json, R2 fcfs run at 4fb5136, 2026-12-03;
# d per step that makes a prefill call, which is how the engine runs a step's chunks: one packed call):
# the default when cost-aware preemption is switched on without a step model of its own, and the
# simulator searches' step model (jtrail.bench.preemption_tuning.STEP_MODEL). Earlier fits charged d
# per chunk: {"a": 3.09e-3, "b": 4.74e-7, "c": 8.54e-8, "d": 2.88e-4} (2026-12-02, packed calls, which
# spread a prefill step's ~2 ms over a + d) and {"a": 5.24e-3, "b": 1.0e-6, "c": 3.6e-7, "d": 5.47e-3}
# (one call per chunk).
H200_SMOLLM2 = {"a": 1.88e-3, "b": 5.42e-7, "c": 6.63e-8, "d": 2.07e-3}


@dataclass(frozen=True)
class RecomputeCost:
    a: float = H200_SMOLLM2["a"]  # seconds per step (fixed)
    b: float = H200_SMOLLM2["b"]  # seconds per computed token
    c: float = H200_SMOLLM2["c"]  # seconds per token of KV context read
    d: float = H200_SMOLLM2["d"]  # seconds per step that makes a prefill call
    prefill_chunk: int = 512  # prefill tokens per step (the engine's max_prefill_tokens_per_step)
    weight: float = 1.0  # multiplies the cost side

    def __post_init__(self) -> None:
        for k in ("a", "b", "c", "d", "weight"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and v >= 0 and v != float("inf")):
                raise InvalidRequestError(f"preempt_cost.{k}", f"must be a finite number >= 0, got {v!r}")
        if self.a == 0 and self.b == 0:
            raise InvalidRequestError("preempt_cost.a", "a step must take time: a or b must be > 0")
        if not (isinstance(self.prefill_chunk, int) and self.prefill_chunk >= 1):
            raise InvalidRequestError("preempt_cost.prefill_chunk",
                                      f"must be an int >= 1, got {self.prefill_chunk!r}")

    @classmethod
    def coerce(cls, spec: Any) -> RecomputeCost | None:
        """None/False: off; True: the H200 default; a dict of fields; a RecomputeCost; or any object
        with a, b, c, d attributes (a StepModel)."""
        if spec is None or spec is False:
            return None
        if spec is True:
            return cls()
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, dict):
            try:
                return cls(**spec)
            except TypeError as e:
                raise InvalidRequestError("preempt_cost", f"bad fields: {e}") from None
        if all(hasattr(spec, k) for k in "abcd"):
            return cls(a=spec.a, b=spec.b, c=spec.c, d=spec.d)
        raise InvalidRequestError("preempt_cost", f"need None, True, a dict or a step model, got {spec!r}")

    def step_time(self, running: list[Sequence]) -> float:
        """tau: one decode step of the current batch (seconds)."""
        return self.a + self.b * len(running) + self.c * sum(s.num_tokens for s in running)

    def recompute_time(self, victim: Sequence) -> float:
        """delta: the extra step time of re-prefilling the victim's prompt + generated tokens."""
        n = victim.num_tokens
        return self.b * n + self.d * -(-n // self.prefill_chunk)

    def net_gain(self, r_victim: float, r_waiting: float, victim: Sequence, tau: float,
                 in_system: int) -> float:
        """Seconds of total response time saved by the preemption (> 0: worth it)."""
        return (r_victim - r_waiting) * tau - self.weight * self.recompute_time(victim) * in_system
