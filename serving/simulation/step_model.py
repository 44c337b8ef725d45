"""Step-time model of an engine step: t = a + b * batch_tokens + c * kv_tokens + d * prefill_calls (s).

batch_tokens: tokens computed in the step (1 per decoding sequence + prefill tokens); kv_tokens: tokens
of context attended (sum of the running sequences' lengths); prefill_calls: prefill device calls in the
step. The engine packs every prefill chunk of a step (probe-only prefills included) into one call, so
this is 1 for a step that prefills anything and 0 otherwise: on the H200 such a step costs ~2 ms more
than a decode-only one, while a further chunk in the same call costs almost nothing (least squares on
the engine's steps, 2026-12-03: +1.9-2.3 ms per step with any prefill, < 0.2 ms per further chunk).
Fitted by least squares from measured engine steps.
`decode_run_time` is the closed-form time of n decode steps of a fixed batch, which is what lets
the simulator jump over steps where nothing changes. `fit_step_model` fits it on a run's recorded
steps (the load generator's step rows, which count chunks), leaving out pauses.

`TimedStepModel` adds the host's speed over the run: the engine's step is mostly host time, and on the
H200 its speed ranged 0.67-1.24x of a run's mean over 5 s windows (2026-12-04, R2;
benchmarks/results/serving_drift_resim.json), which one linear model averages away; in overload that
drift decides mean E2E. `fit_speed_profile` measures it per window of the run (recorded seconds over
modelled seconds), so the simulator can replay a run as it went; policies are compared under a constant
model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..brain.capacity import pauses
from ..sequence import InvalidRequestError


@dataclass(frozen=True)
class StepModel:
    a: float  # fixed cost per step (launch, host work)
    b: float = 0.0  # per computed token
    c: float = 0.0  # per token of KV context read
    d: float = 0.0  # per prefill call (chunk)

    def __post_init__(self) -> None:
        for k in ("a", "b", "c", "d"):
            v = getattr(self, k)
            if not (np.isfinite(v) and v >= 0):
                raise InvalidRequestError(k, f"step-model coefficient must be finite and >= 0, got {v!r}")
        if self.a == 0 and self.b == 0:
            raise InvalidRequestError("a", "a step must take time: a or b must be > 0")

    def step_time(self, batch_tokens: float, kv_tokens: float, prefill_calls: float = 0.0) -> float:
        return self.a + self.b * batch_tokens + self.c * kv_tokens + self.d * prefill_calls

    def decode_run_time(self, n_seqs: int, kv0: float, steps: int) -> float:
        """Time of `steps` decode steps of a fixed batch of n_seqs starting at kv0 context tokens:
        Σ_{i<steps} a + b n + c (kv0 + i n)."""
        return steps * (self.a + self.b * n_seqs + self.c * kv0) + self.c * n_seqs * steps * (steps - 1) / 2

    def steps_until(self, n_seqs: int, kv0: float, dt: float) -> int:
        """Smallest m >= 1 with decode_run_time(m) >= dt (the step during which time dt is reached)."""
        if dt <= 0:
            return 1
        base = self.a + self.b * n_seqs + self.c * kv0
        q = self.c * n_seqs / 2
        if q == 0:
            m = int(np.ceil(dt / base))
        else:  # q m^2 + (base - q) m - dt = 0
            lin = base - q
            m = int(np.ceil((-lin + np.sqrt(lin * lin + 4 * q * dt)) / (2 * q)))
        m = max(m, 1)
        while m > 1 and self.decode_run_time(n_seqs, kv0, m - 1) >= dt:  # float guard
            m -= 1
        while self.decode_run_time(n_seqs, kv0, m) < dt:
            m += 1
        return m

    @classmethod
    def fit(cls, batch_tokens: np.ndarray, kv_tokens: np.ndarray, seconds: np.ndarray,
            prefill_calls: np.ndarray | None = None) -> StepModel:
        """Least squares on measured steps. A coefficient that comes out negative (noise) is dropped
        and the rest refitted without it, so the kept terms stay unbiased."""
        bt, kv = np.asarray(batch_tokens, float), np.asarray(kv_tokens, float)
        pc = np.zeros_like(bt) if prefill_calls is None else np.asarray(prefill_calls, float)
        cols = {"a": np.ones(len(bt)), "b": bt, "c": kv, "d": pc}
        y = np.asarray(seconds, dtype=np.float64)
        x_all = np.column_stack(list(cols.values()))
        if len(y) < 4 or not np.all(np.isfinite(x_all)) or not np.all(np.isfinite(y)):
            raise InvalidRequestError("steps", "need >= 4 finite measured steps to fit a step model")
        keep = [k for k in cols if k == "a" or np.ptp(cols[k]) > 0]  # a constant column says nothing
        while True:
            coef, *_ = np.linalg.lstsq(np.column_stack([cols[k] for k in keep]), y, rcond=None)
            got = dict(zip(keep, (float(v) for v in coef), strict=True))
            neg = [k for k in keep if k != "a" and got[k] < 0]
            if not neg:
                break
            keep.remove(min(neg, key=lambda k: got[k] * np.std(cols[k])))
        if got["a"] <= 0 and got.get("b", 0.0) <= 0:  # a decode step must cost something
            return cls(a=float(np.mean(y)))
        return cls(a=max(got["a"], 0.0), b=got.get("b", 0.0), c=got.get("c", 0.0), d=got.get("d", 0.0))


def _steady_steps(steps: np.ndarray) -> tuple[np.ndarray, int]:
    """The step rows that computed something, without pauses (a compile: seconds, not milliseconds, is
    not part of the steady-state cost; least squares would smear it over every step of its kind); and
    how many pauses were left out."""
    s = steps[steps[:, 0] > 0]
    stall = pauses(s[:, 2])
    return s[~stall], int(stall.sum())


def fit_step_model(steps: np.ndarray) -> tuple[StepModel, dict[str, float]]:
    """Least squares over measured steps, rows of (batch tokens, kv tokens, seconds, prefill chunks, ...)
    as `jtrail.bench.loadgen` records them (a step with any chunk makes one prefill call); returns the
    model and its fit quality (relative error of the summed time, R^2). Steps that computed nothing
    are left out, and so are pauses."""
    s, stalls = _steady_steps(steps)
    calls = (s[:, 3] > 0).astype(float)
    sm = StepModel.fit(s[:, 0], s[:, 1], s[:, 2], calls)
    pred = sm.step_time(s[:, 0], s[:, 1], calls)
    ss_res = float(np.sum((s[:, 2] - pred) ** 2))
    ss_tot = float(np.sum((s[:, 2] - s[:, 2].mean()) ** 2)) or 1.0
    info = {"a": sm.a, "b": sm.b, "c": sm.c, "d": sm.d, "steps": float(len(s)),
            "stalls_excluded": float(stalls), "r2": 1.0 - ss_res / ss_tot,
            "total_time_rel_error": float(pred.sum() / s[:, 2].sum() - 1.0)}
    return sm, info


@dataclass(frozen=True)
class TimedStepModel:
    """`base` with its every coefficient scaled by `scale[i]` during window i (`window_s` seconds of
    run time each; past the last window the last scale holds): the step model of one run as it went.
    A run of decode steps the simulator plans at once takes the speed of its first step's window (an
    arrival or a finish ends such a run: tens of milliseconds under load)."""
    base: StepModel
    window_s: float
    scale: tuple[float, ...]

    def __post_init__(self) -> None:
        if not (np.isfinite(self.window_s) and self.window_s > 0):
            raise InvalidRequestError("window_s", f"must be a finite number > 0, got {self.window_s!r}")
        if not self.scale or not all(np.isfinite(x) and x > 0 for x in self.scale):
            raise InvalidRequestError("scale", "needs at least one finite scale > 0")
        object.__setattr__(self, "_models", tuple(
            replace(self.base, a=self.base.a * x, b=self.base.b * x, c=self.base.c * x, d=self.base.d * x)
            for x in self.scale))

    def at(self, t: float) -> StepModel:
        """The step model in force at run time t (s)."""
        i = min(max(int(t // self.window_s), 0), len(self.scale) - 1)
        return self._models[i]


def speed_against(steps: np.ndarray, sm: StepModel) -> float:
    """A run's decode-only step seconds over what `sm` gives the same steps (median; pauses left out):
    1.0 is the reference's speed, 1.1 a run whose steps took 10% longer for the same batch and context.
    Fitted on another run (a regime's capacity run), it tells a policy's own cost per step apart from
    what its batches hold. NaN without decode-only steps."""
    s, _ = _steady_steps(steps)
    s = s[s[:, 3] == 0]
    if not len(s):
        return float("nan")
    return float(np.median(s[:, 2] / sm.step_time(s[:, 0], s[:, 1], np.zeros(len(s)))))


def fit_speed_profile(steps: np.ndarray, sm: StepModel, window_s: float = 5.0) -> TimedStepModel:
    """The run's speed per window: recorded step seconds over `sm`'s for the same steps, by the step's
    start time (loadgen's column 6; pauses left out as in `fit_step_model`). A window without steps
    takes the one before's scale (1.0 at the start)."""
    s, _ = _steady_steps(steps)
    model = sm.step_time(s[:, 0], s[:, 1], (s[:, 3] > 0).astype(float))
    n = max(int(s[:, 6].max() // window_s) + 1, 1) if len(s) else 1
    win = np.minimum((s[:, 6] // window_s).astype(int), n - 1) if len(s) else np.zeros(0, int)
    actual, modelled = np.bincount(win, s[:, 2], n), np.bincount(win, model, n)
    scale, last = [], 1.0
    for a, m in zip(actual, modelled, strict=True):
        last = float(a / m) if m > 0 else last
        scale.append(last)
    return TimedStepModel(sm, window_s, tuple(scale))
