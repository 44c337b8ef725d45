"""Discrete-event simulator of one or more engine replicas, driving the real policy objects.

`simulate(trace, policy, step_model, resources, predictor=..., num_replicas=..., router=...)`:
the trace gives arrival times, prompt and (forced) output lengths; the step model prices each
engine step; the predictor sets the length estimates (oracle, noisy, or recorded probe outputs
refined by TRAIL's rule). Results follow vLLM's metric definitions: TTFT, E2E, TPOT =
(E2E - TTFT) / (output_tokens - 1), preemptions per request.

The initial length estimate is made when a request arrives (`predict_at_arrival`, as if the prefill
probe ran at once); the engine makes it at prefill. `max_jump_steps` bounds how many steps run
between two calls to `schedule` when nothing else happens (None: only at events; set it for aging
policies whose ranks improve while nothing happens, to check preemption at that granularity).
"""

from __future__ import annotations

import dataclasses
import heapq
import time as _time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..brain.capacity import StepRecord
from ..brain.forecast import FORECAST_PRIOR_TOKENS, count_routed, replica_forecast
from ..brain.predictor import OraclePredictor, SimPredictor
from ..brain.scheduler.base import Policy, PolicyStats
from ..brain.scheduler.registry import make_policy
from ..engine.config import DEFAULT_PREEMPTION_MODE, PREEMPTION_MODES
from ..engine_api import EngineStats
from ..latency_summary import summarize_requests
from ..sequence import InvalidRequestError, SamplingParams
from .sim_replica import SimReplica, SimSequence
from .step_model import StepModel, TimedStepModel

if TYPE_CHECKING:
    from ..engine.llm_engine import EngineConfig


@dataclass
class Trace:
    arrival: np.ndarray  # seconds, non-decreasing
    prompt_len: np.ndarray  # tokens
    output_len: np.ndarray  # tokens each request generates (forced lengths), >= 1
    priority: np.ndarray | None = None
    request_ids: Seq[str] | None = None  # default "r{i}"; keys of recorded probe outputs
    # The max_tokens each request was sent with (a nominal cap >= its length). None: its own length,
    # which hands length-aware policies an exact upper bound through max_remaining.
    max_tokens: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.arrival = np.asarray(self.arrival, dtype=np.float64)
        self.prompt_len = np.asarray(self.prompt_len, dtype=np.int64)
        self.output_len = np.asarray(self.output_len, dtype=np.int64)
        n = len(self.arrival)
        if self.prompt_len.shape != (n,) or self.output_len.shape != (n,):
            raise InvalidRequestError("trace", "arrival, prompt_len and output_len need the same length")
        if n and (not np.all(np.isfinite(self.arrival)) or np.any(np.diff(self.arrival) < 0)):
            raise InvalidRequestError("arrival", "must be finite and non-decreasing")
        if np.any(self.prompt_len < 1) or np.any(self.output_len < 1):
            raise InvalidRequestError("trace", "prompt and output lengths must be >= 1")
        if self.request_ids is not None and len(self.request_ids) != n:
            raise InvalidRequestError("request_ids", "need one id per request")
        if self.max_tokens is not None:
            self.max_tokens = np.broadcast_to(np.asarray(self.max_tokens, dtype=np.int64), (n,))
            if np.any(self.max_tokens < self.output_len):
                raise InvalidRequestError("max_tokens", "must be >= each request's output length")

    def __len__(self) -> int:
        return len(self.arrival)


@dataclass(frozen=True)
class Resources:
    num_slots: int
    num_pages: int
    page_size: int = 16
    preemption: str = DEFAULT_PREEMPTION_MODE  # recompute, swap or keep (EngineConfig.preemption_mode)
    prefill_chunk: int = 512  # tokens per prefill call (the engine's largest prefill bucket)

    def __post_init__(self) -> None:
        if min(self.num_slots, self.num_pages, self.page_size, self.prefill_chunk) < 1:
            raise InvalidRequestError("resources", f"slots, pages and page size must be >= 1: {self}")
        if self.preemption not in PREEMPTION_MODES:
            raise InvalidRequestError("preemption", f"one of {PREEMPTION_MODES}, got {self.preemption!r}")

    @classmethod
    def from_engine_config(cls, cfg: EngineConfig) -> Resources:
        """The resources of the engine `cfg` describes: its slots, its usable KV pages (the allocator
        keeps page 0 as the null page), page size, preemption mode and prefill budget per step."""
        return cls(num_slots=cfg.num_slots, num_pages=cfg.num_pages - 1, page_size=cfg.page_size,
                   preemption=cfg.preemption_mode, prefill_chunk=cfg.max_prefill_tokens_per_step)


@dataclass
class SimResult:
    arrival: np.ndarray  # the trace's arrival times (s); ttft and e2e are from these
    ttft: np.ndarray
    e2e: np.ndarray
    output_len: np.ndarray
    preemptions: np.ndarray
    replica: np.ndarray
    wall_seconds: float
    makespan: float
    policy_stats: list[PolicyStats | None] = field(default_factory=list)
    # per replica, with record_steps=True: a StepRecord (brain/capacity.py) of the runs of steps it made
    steps: list[Any] = field(default_factory=list)

    @property
    def tpot(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.output_len > 1, (self.e2e - self.ttft) / (self.output_len - 1), np.nan)

    def summary(self) -> dict[str, float]:
        """The run's latency summary, the same keys and definitions as a measured run's
        (`serving.latency_summary`)."""
        return summarize_requests(self.arrival, self.arrival + self.ttft, self.arrival + self.e2e,
                                  self.output_len, self.preemptions)


PolicySpec = str | Callable[[], Policy]


def _factory(policy: PolicySpec, kwargs: dict[str, Any] | None) -> Callable[[], Policy]:
    if isinstance(policy, str):
        return lambda: make_policy(policy, **(kwargs or {}))
    if isinstance(policy, Policy):
        raise InvalidRequestError("policy", "pass a name or a factory: each replica needs its own object")
    return policy


_BAR_EVERY = 4096  # requests between progress-bar updates
_BAR_AUTO_MIN = 100_000  # progress=None shows a bar from this many requests on


def _progress_bar(n: int, progress: bool | None) -> Any:
    if not (progress or (progress is None and n >= _BAR_AUTO_MIN)):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=n, desc="simulate", unit="req", disable=None, mininterval=0.5)  # None: tty only


def simulate(trace: Trace, policy: PolicySpec, step_model: StepModel | TimedStepModel,
             resources: Resources, *, predictor: SimPredictor | None = None, num_replicas: int = 1,
             router: Any = None,
             policy_kwargs: dict[str, Any] | None = None, predict_at_arrival: bool = True,
             max_jump_steps: int | None = None, record_steps: bool = False, router_poll_s: float = 0.0,
             router_sees_estimate: bool = True, progress: bool | None = None,
             arrival_predictor: SimPredictor | None = None, finish_lag_steps: int = 0) -> SimResult:
    """Run the trace to completion; returns per-request metrics (seconds).

    `progress`: a bar of requests arrived on stderr (tqdm; shown only on a terminal); None: for traces
    of at least 100,000 requests (a million take ~20 s).

    Routing (num_replicas > 1): the router gets each replica's `EngineStats` at every arrival, with
    the slot forecast (`slot_free_tokens`) filled as the engine fills it when the router uses one.
    `router_poll_s` > 0: the router sees the replicas as `jtrail route` does, through snapshots
    refreshed every `router_poll_s` seconds of simulated time, each advanced by its own sends in between
    (`forecast.count_routed`). `router_sees_estimate` False: the router is not given the new request's
    length estimate (as `jtrail route`, which runs no probe), though the replica that gets it is.
    `arrival_predictor`: another first estimate, made at arrival at no cost (trail's host-side prompt
    estimate); `predictor`'s prefill estimate replaces it when the request's prefill is scheduled, as
    the engine's real prefill does (overrides `predict_at_arrival`). `finish_lag_steps`: steps a finished
    request keeps its slot and pages (the engine's `steps_in_flight` under async scheduling: its outputs
    are processed that many steps late); its E2E ends then too, as the engine reports it."""
    if num_replicas < 1:
        raise InvalidRequestError("num_replicas", f"must be >= 1, got {num_replicas}")
    if num_replicas > 1 and router is None:
        raise InvalidRequestError("router", "several replicas need a router")
    if not (isinstance(finish_lag_steps, int) and finish_lag_steps >= 0):
        raise InvalidRequestError("finish_lag_steps", f"must be an int >= 0, got {finish_lag_steps!r}")
    if not router_poll_s >= 0:
        raise InvalidRequestError("router_poll_s", f"must be >= 0 seconds, got {router_poll_s!r}")
    cap = resources.num_pages * resources.page_size
    if len(trace) and int((trace.prompt_len + trace.output_len).max()) + 1 > cap:
        raise InvalidRequestError("trace", f"a request needs more than the KV cache's {cap} tokens")
    predictor = predictor if predictor is not None else OraclePredictor()
    make = _factory(policy, policy_kwargs)
    n = len(trace)
    ttft, e2e = np.full(n, np.nan), np.full(n, np.nan)
    npre, where = np.zeros(n, np.int32), np.zeros(n, np.int32)

    def done(s: SimSequence) -> None:
        i = s._idx
        ttft[i] = s.first_token_time - s.arrival_time
        e2e[i] = s.finish_time - s.arrival_time
        npre[i] = s.num_preemptions

    reps = [SimReplica(make(), step_model, resources.num_slots, resources.num_pages, resources.page_size,
                       resources.preemption, predictor, done, max_jump_steps,
                       resources.prefill_chunk, finish_lag_steps)
            for _ in range(num_replicas)]
    stats = [EngineStats(pages_total=resources.num_pages) for _ in reps]
    if record_steps:
        for r in reps:
            r.step_log = []
    needs_tokens = getattr(router, "uses_tokens", True)
    needs_forecast = bool(getattr(router, "uses_forecast", False))
    view, next_poll = stats, -float("inf")  # what the router sees, and when it is refreshed next
    params: dict[int, SamplingParams] = {}
    arr, plen, olen = trace.arrival, trace.prompt_len.tolist(), trace.output_len.tolist()
    mtok = trace.max_tokens.tolist() if trace.max_tokens is not None else olen
    prio = trace.priority.tolist() if trace.priority is not None else None
    ids = trace.request_ids
    events: list[tuple[float, int, int]] = []
    bar = _progress_bar(n, progress)
    wall0 = _time.perf_counter()
    i, last = 0, 0.0
    while True:
        while events and events[0][2] != reps[events[0][1]].version:
            heapq.heappop(events)
        t_rep = events[0][0] if events else float("inf")
        if i < n and arr[i] <= t_rep:
            ta, o, mt = float(arr[i]), olen[i], mtok[i]
            sp = params.get(mt) or params.setdefault(mt, SamplingParams(max_tokens=mt, ignore_eos=True))
            s = SimSequence(ids[i] if ids is not None else f"r{i}", [], sp, ta,
                            priority=prio[i] if prio is not None else 0, oracle_remaining_at_start=o)
            s._plen, s._idx = plen[i], i
            if arrival_predictor is not None:
                arrival_predictor.sim_prefill(s)
                s._arrival_estimate = True
            elif predict_at_arrival:
                predictor.sim_prefill(s)
            k = 0
            if num_replicas > 1:
                for r, st in zip(reps, stats, strict=True):
                    st.waiting, st.running = len(r.waiting), len(r.running)
                    st.pages_used, st.preemptions = r.used_at(r.steps), r.preemptions
                    if needs_tokens:
                        st.outstanding_tokens = r.outstanding_tokens()
                if ta >= next_poll:
                    if needs_forecast:
                        for r, st in zip(reps, stats, strict=True):
                            prior = (r.finished_tokens / r.finished_count if r.finished_count
                                     else FORECAST_PRIOR_TOKENS)
                            st.slot_free_tokens = replica_forecast(r.running, r.waiting, r.num_slots, prior,
                                                                   r.policy.counts_down)
                    view = [dataclasses.replace(st) for st in stats] if router_poll_s > 0 else stats
                    next_poll = ta + router_poll_s
                est = s.predicted_remaining if router_sees_estimate else None
                k = router.choose(view, s.num_prompt_tokens, est)
                if router_poll_s > 0:  # the snapshot counts its own sends until the next poll
                    view[k] = count_routed(view[k], s.num_prompt_tokens, FORECAST_PRIOR_TOKENS)
            where[i] = k
            rep = reps[k]
            rep.arrive(s, ta)
            if rep.planned is None:
                rep.planned = ("wake",)
                rep.version += 1
                heapq.heappush(events, (ta, k, rep.version))
            elif (end := rep.truncate(ta)) is not None:
                rep.version += 1
                heapq.heappush(events, (end, k, rep.version))
            i += 1
            if bar is not None and not i % _BAR_EVERY:  # cheap: the loop runs ~50k times a second
                bar.update(_BAR_EVERY)
            continue
        if not events:
            break
        t, k, _ = heapq.heappop(events)
        rep = reps[k]
        rep.end_jump(t)
        rep.boundary(t)
        if arrival_predictor is not None:
            for s, _tok in rep._prefill:
                if s._arrival_estimate:
                    s._arrival_estimate = False
                    predictor.sim_prefill(s)
        elif not predict_at_arrival:
            for s, _tok in rep._prefill:
                if s._pv is None:
                    predictor.sim_prefill(s)
        last = t
        end = rep.plan()
        rep.version += 1
        if end is not None:
            heapq.heappush(events, (end, k, rep.version))
    if bar is not None:
        bar.update(n - bar.n)
        bar.close()
    stuck = [r for r in reps if r.waiting or r.running]
    if stuck:
        raise RuntimeError(f"simulation ended with unfinished requests ({len(stuck[0].waiting)} waiting)")
    steps = [StepRecord.from_rows(r.step_log) for r in reps] if record_steps else []
    return SimResult(arr.copy(), ttft, e2e, trace.output_len.copy(), npre, where,
                     _time.perf_counter() - wall0, last - (float(arr[0]) if n else 0.0),
                     [r.policy.stats for r in reps], steps)
