"""Replay regimes of the serving benchmark (`benchmarks/serving.py --workload replay`).

Every request carries its recorded answer (trace replay: the engine emits exactly those tokens, so KV,
hidden states and the probe see a real answer of real length). Requests come from one split of the
replay set (`jtrail.replay`, held out from probe training; its name goes into the JSON). Per regime:
1. capacity, measured: a saturated fcfs run; sustained output tokens/s over the full-batch steps
   divided by the mean answer length (`jtrail.serving.brain.capacity`);
2. one seeded trace of the regime's arrival shape (`jtrail.serving.simulation.regimes`), and every
   policy on it, each on a fresh warmed engine; each run's summary is saved as soon as it ends
   ($OUT/serving_partial.json);
3. the simulator on the same trace with the run's recorded probe outputs and the step model fitted on
   the engine's steps: sim vs engine mean E2E per policy.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from jtrail.bench.engine_setup import Setup, make_engine
from jtrail.bench.loadgen import Workload, drive_engine, step_record
from jtrail.bench.metrics import cdf_points, ratio, summarize
from jtrail.bench.repeats import concat_results, mean_repeats, mirrored_order
from jtrail.bench.serving_report import clean_json, device_label
from jtrail.provenance import git_commit
from jtrail.serving.brain.capacity import capacity_req_s, full_batch_throughput, pauses
from jtrail.serving.brain.predictor import RecordingPredictor
from jtrail.serving.engine.config import DEFAULT_PREEMPTION_MODE
from jtrail.serving.engine.step_programs import BACKEND_COMPILES, TRACE_COUNTS
from jtrail.serving.simulation.regimes import REGIMES, Regime, regime_arrivals, regime_resources
from jtrail.serving.simulation.sim_vs_engine import sim_errors, simulate_policies
from jtrail.serving.simulation.step_model import fit_speed_profile, fit_step_model, speed_against

BAR_KEYS = (
    "fcfs_over_trail_mean_e2e",
    "fcfs_over_trail_mean_ttft",
    "trail_over_fcfs_p99_e2e",
    "trail_over_oracle_mean_e2e",
    "trail_preemptions_per_request",
)


class Pool:
    """The benchmark split's requests that fit the engine (prompt + answer within max_model_len)."""

    def __init__(self, path: str, split: str, max_model_len: int, seed: int, max_answer_tokens: int = 0):
        from jtrail.replay import ReplaySet

        rs = ReplaySet.load(path).subset(split)
        keep = [i for i in range(len(rs)) if len(rs.prompts[i]) + len(rs.answers[i]) < max_model_len]
        order = np.random.default_rng(seed).permutation(keep)
        self.prompts = [rs.prompts[i].astype(np.int32).tolist() for i in order]
        cut = max_answer_tokens or None
        self.answers = [rs.answers[i][:cut].astype(np.int32) for i in order]
        self.conv_ids = [rs.conv_ids[i] for i in order]
        self.split, self.path = split, path
        self.lengths = np.array([len(a) for a in self.answers], np.int64)

    def workload(self, arrival: np.ndarray, offset: int, max_tokens: int, tag: str) -> Workload:
        """Requests offset, offset+1, ... (wrapping) at the given arrival times."""
        idx = [(offset + k) % len(self.prompts) for k in range(len(arrival))]
        return Workload(
            [self.prompts[i] for i in idx],
            arrival,
            np.zeros(len(idx)),
            max_tokens=max_tokens,
            answers=[self.answers[i] for i in idx],
            request_ids=[f"{tag}{k}" for k in range(len(idx))],
        )

    def resources(self, name: str, page_size: int, slots: int = 0) -> dict[str, int]:
        """The regime's slots and pages for this pool; `slots` > 0 overrides the slot count (smoke runs)."""
        r = regime_resources(
            name, float(np.mean([len(p) for p in self.prompts])), float(self.lengths.mean()), page_size
        )
        return {**r, "num_slots": slots} if slots else r

    def describe(self) -> dict[str, Any]:
        x = self.lengths
        return {
            "replay_set": str(self.path),
            "split": self.split,
            "requests": int(len(x)),
            "answer_len_mean": float(x.mean()),
            "answer_len_p50": float(np.median(x)),
            "answer_len_p90": float(np.percentile(x, 90)),
            "answer_len_max": int(x.max()),
            "prompt_len_mean": float(np.mean([len(p) for p in self.prompts])),
        }


def measure_capacity(
    make, pool: Pool, regime: Regime, slots: int, n: int, max_tokens: int, timeout_s: float
) -> dict:
    """Everything at t=0 on fcfs: capacity from the steps where the batch was full (or, memory-bound,
    where requests waited), not from requests / makespan (the drain would dominate)."""
    wl = pool.workload(np.zeros(n), 0, max_tokens, "cap")
    eng = make("fcfs", dict(regime.fcfs_kwargs), regime)
    res = drive_engine(eng, wl, timeout_s=timeout_s)
    rec = step_record(res.steps)
    backlog = regime.backlog_capacity
    tp = full_batch_throughput(rec, slots, backlog=backlog)
    cap = capacity_req_s(rec, slots, float(pool.lengths.mean()), backlog=backlog)
    return {
        "capacity_req_s": cap,
        **tp,
        "mean_answer_tokens": float(pool.lengths.mean()),
        "requests": n,
        "completed": int(res.completed.sum()),
        "wall_s": res.wall_s,
        **_full_step_times(res.steps, slots),
        "steps": res.steps,
    }


def _full_step_times(steps: np.ndarray, slots: int) -> dict[str, float]:
    """Mean step ms with the batch full, with and without a prefill call in the step, and the median
    decode-only one: what the capacity figure is made of (loadgen columns: 2 seconds, 3 prefill
    calls, 7 running)."""
    full = steps[:, 7] >= slots
    pre = steps[:, 3] > 0
    ms = lambda m: float(steps[m, 2].mean() * 1e3) if m.any() else float("nan")
    # the median as well: a run-to-run drift in step time shows in it, whatever the occasional stall
    median = float(np.median(steps[full & ~pre, 2]) * 1e3) if (full & ~pre).any() else float("nan")
    return {"full_step_ms": ms(full), "full_step_ms_decode_only": ms(full & ~pre),
            "full_step_ms_with_prefill": ms(full & pre), "partial_step_ms": ms(~full),
            "median_decode_step_ms": median}


PER_REPEAT = ("mean_e2e", "p99_e2e", "mean_ttft", "median_decode_step_ms")


def _measured_run(eng: Any, wl: Workload, timeout_s: float) -> tuple[dict[str, float], Any]:
    """One measured run of the trace: the latency summary and what the engine did meanwhile
    (compiles, stalls, step times: what to check before reading a difference as the policy's)."""
    compiled = sum(TRACE_COUNTS.values())
    backend0 = dict(BACKEND_COMPILES)
    t = time.perf_counter()
    res = drive_engine(eng, wl, timeout_s=timeout_s)
    s = summarize(res)
    secs, rows = res.steps[:, 2], res.steps[:, 7]
    stall = pauses(secs)  # a compile or a pause, not the steady state
    # "full" here: the run's largest batch (a run may never fill every slot)
    steps = _full_step_times(res.steps, int(rows.max()) if len(rows) else 1)
    s.update(
        compiles_during_run=float(sum(TRACE_COUNTS.values()) - compiled),
        backend_compiles_during_run=float(BACKEND_COMPILES["n"] - backend0["n"]),
        backend_compile_s=float(BACKEND_COMPILES["s"] - backend0["s"]),
        wall_s=time.perf_counter() - t,
        probe_calls=float(getattr(eng, "probe_calls", 0)),
        stalls=float(stall.sum()),
        stall_s=float(secs[stall].sum()),
        busy_s=float(secs.sum()),  # engine steps; wall_s - busy_s: the driver's own time and idling
        mean_step_ms_full_batch=steps["full_step_ms"],
        median_decode_step_ms=steps["median_decode_step_ms"],
        tokens_per_step=float(res.steps[:, 5].mean()) if len(secs) else float("nan"),
    )
    return s, res


def run_regime(
    make,
    pool: Pool,
    name: str,
    specs: dict[str, tuple[str, dict]],
    cap: dict,
    args: Any,
    refiner: Any,
    partial: list[dict],
) -> dict[str, Any]:
    regime = REGIMES[name]
    seed = args.seed + 17 * (1 + list(REGIMES).index(name))
    arrival = regime_arrivals(
        name, cap["capacity_req_s"], seed=seed, n_max=_int(per_regime(args.regime_requests, name))
    )
    # each regime starts elsewhere in the shuffled pool (fresh requests), every policy the same ones
    wl = pool.workload(arrival, offset=len(partial) * 37, max_tokens=args.max_output, tag=f"{name}-")
    recorder = None
    repeats = max(1, int(getattr(args, "repeats", 1)))
    # the second regime of a call starts last-first (--alternate-order); with --repeats each policy runs
    # again in mirrored order, so a drift in step time over the call falls on every policy alike
    reverse = bool(getattr(args, "alternate_order", False) and list(REGIMES).index(name) % 2)
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label in specs}
    results: dict[str, list[Any]] = {label: [] for label in specs}
    # fcfs is the regime's baseline (R3: vLLM's free-page watermark)
    kwargs = {label: {**kw, **regime.fcfs_kwargs} if label == "fcfs" else kw
              for label, (_, kw) in specs.items()}
    trail_label = getattr(args, "trail_label", "trail")
    for label, rep in mirrored_order(list(specs), repeats, reverse):
        pname, kw = specs[label][0], kwargs[label]
        if rep == 0:
            warm_run(make(pname, kw, regime, None), wl, getattr(args, "warm_requests", 0), args.run_timeout)
        rec = RecordingPredictor(refiner) if label == trail_label and rep == 0 else None
        eng = make(pname, kw, regime, rec)
        lag = int(getattr(eng, "steps_in_flight", 0))  # the simulator frees a finished slot as late
        s, res = _measured_run(eng, wl, args.run_timeout)
        rows[label].append(s)
        results[label].append(res)
        if rec is not None:
            recorder = rec
        partial.append({"regime": name, "policy": label, "repeat": rep, **s})
        _save_partial(partial)
        print(
            f"  {name} {label:>12} [{rep + 1}/{repeats}]: "
            f"mean e2e {s['mean_e2e']:.3f}s p99 {s['p99_e2e']:.3f}s "
            f"ttft {s['mean_ttft']:.3f}s p99 {s['p99_ttft']:.3f}s "
            f"preempt/req {s['preemptions_per_request']:.2f} decode step {s['median_decode_step_ms']:.2f} ms "
            f"done {int(s['completed'])}/{len(wl)} in {s['wall_s']:.0f}s",
            flush=True,
        )
        del eng
    runs = {
        label: {"policy": label, "name": pname, "options": _jsonable(kwargs[label]),
                **mean_repeats(rows[label], PER_REPEAT), "repeats": repeats,
                "_res": concat_results(results[label])}
        for label, (pname, _) in specs.items()
    }
    res_ = pool.resources(name, args.page_size, args.regime_slots)
    out = {
        "regime": name,
        "slots": res_["num_slots"],
        "pages": res_["num_pages"],
        "load": regime.description,
        "requests": len(wl),
        "arrival_span_s": float(arrival[-1]),
        "steps_in_flight": lag,
        "preemption_mode": getattr(args, "preemption_mode", DEFAULT_PREEMPTION_MODE),
        "_wl": wl,
        "_runs": runs,
        "_recorder": recorder,
        # the probe outputs per request and token count, built once for the simulator and the saved trace
        "_records": (None if recorder is None
                     else recorder.records(list(wl.request_ids), len(refiner.midpoints))),
    }
    return out


def warm_run(eng: Any, wl: Workload, n: int, timeout_s: float) -> None:
    """The trace's first `n` requests through a throwaway engine of the policy, unmeasured. The first
    measured run of a call paid XLA compiles of shapes the engine's warm-up does not cover and ran
    slower steps (H200, 6d77d4e: 8 compiles, a 2.8 s stall, 4.09 ms full-batch steps against the
    second policy's 3.46 ms), which the run order then charged to one policy."""
    if n <= 0:
        return
    k = min(n, len(wl))
    head = Workload(wl.prompts[:k], wl.arrival[:k], wl.output_len[:k], wl.forced,
                    [f"warm-{r}" for r in wl.request_ids[:k]], wl.max_tokens,
                    wl.answers[:k] if wl.answers is not None else None)
    drive_engine(eng, head, timeout_s=timeout_s)
    del eng


# issue 15's per-regime bar keys (lower-case regime prefix: r1_, r2_, r3_): (key, numerator, denominator)
RATIO_BARS = (("fcfs_over_trail_mean_e2e", ("fcfs", "mean_e2e"), ("trail", "mean_e2e")),
              ("fcfs_over_trail_mean_ttft", ("fcfs", "mean_ttft"), ("trail", "mean_ttft")),
              ("trail_over_fcfs_p99_e2e", ("trail", "p99_e2e"), ("fcfs", "p99_e2e")),
              ("trail_over_oracle_mean_e2e", ("trail", "mean_e2e"), ("srpt-oracle", "mean_e2e")))


# The engine's step time is mostly host time, and the host's speed drifts within a device call: on the
# H200 (2026-12-04) the same decode-only full-batch step took 2.58 ms in the first run of a call and 2.17
# in the last, and 3.18 -> 3.76 ms in another call. In overload a 5% slower step grows the backlog by
# about a sixth, so a ratio between runs whose steps differ by more than this is the host's, not the
# policy's (results/serving.json other_runs['e0b8fcd-drift']).
STEP_DRIFT_LIMIT = 1.05


def step_time_spread(runs: dict[str, dict]) -> float:
    """Slowest over fastest median decode-only full-batch step among a regime's runs (the mean over
    repeats where a policy ran more than once). NaN, i.e. not checked, unless at least two runs had
    such steps (a memory-bound regime may never fill its slots)."""
    ms = [r.get("median_decode_step_ms", float("nan")) for r in runs.values()]
    ms = [m for m in ms if np.isfinite(m) and m > 0]
    return max(ms) / min(ms) if len(ms) >= 2 else float("nan")


def bars_of(name: str, runs: dict[str, dict], trail_label: str = "trail",
            drift_limit: float = STEP_DRIFT_LIMIT) -> dict[str, float]:
    """The regime's bars; a ratio only when every run finished every request and the runs' step times
    agree within `drift_limit` (NaN otherwise; `<regime>_step_time_spread` says by how much; a limit
    of 0 turns the check off). `trail_label`: the policy label whose run stands for trail
    (`--trail-label`)."""
    def g(pk: tuple[str, str]) -> float:
        label = trail_label if pk[0] == "trail" else pk[0]
        return runs[label][pk[1]] if label in runs else float("nan")

    complete = all(r["completed"] == r["requests"] for r in runs.values())
    spread = step_time_spread(runs)
    valid = complete and not (drift_limit > 0 and spread > drift_limit)
    prefix = name.lower()
    bars = {f"{prefix}_{key}": ratio(g(num), g(den)) if valid else float("nan")
            for key, num, den in RATIO_BARS}
    bars[f"{prefix}_step_time_spread"] = spread
    bars[f"{prefix}_trail_preemptions_per_request"] = g(("trail", "preemptions_per_request"))
    return bars


def simulate_regime(
    out: dict[str, Any], specs: dict, steps: np.ndarray, refiner: Any, pool: Pool, page_size: int,
    prompt_estimator: Any = None, common_steps: np.ndarray | None = None,
) -> dict[str, Any]:
    """The simulator on the regime's trace: same policies, the recorded probe outputs (replay makes
    them the same under every policy: the tokens are given), and per policy the step model fitted on
    its own run's steps with that run's host speed over time (`fit_speed_profile`: the engine's step
    drifted +-15% within a run on the H200, which one model for all steps left to the simulator's
    error: -39% on fcfs's mean E2E in R2 against -5% with the run's speed and the engine's finish lag;
    `step_model`: the one model fitted on every step of the regime, reported).
    `common_steps` (the capacity run's steps; `--sim-common-step`): every policy once more under the
    step model fitted on them alone, so the ratios between policies carry no step-time drift between
    their engine runs (`drift_free`: fcfs/x mean E2E and x/fcfs p99 E2E)."""
    from jtrail.serving.simulation.simulator import Resources

    records = out["_records"]
    if records is None:
        return {}
    sm, fit = fit_step_model(steps)
    lag = out.get("steps_in_flight", 0)  # a finished request's slot is freed this many steps late
    wl = out["_wl"]
    res = Resources(num_slots=out["slots"], num_pages=out["pages"], page_size=page_size,
                    preemption=out["preemption_mode"])
    keep = {k: v for k, v in specs.items() if k in out["_runs"]}
    sim = {}
    for label, spec in keep.items():
        own = out["_runs"][label]["_res"].steps
        timed = fit_speed_profile(own, fit_step_model(own)[0]) if len(own) else sm
        sim.update(simulate_policies(wl, {label: spec}, timed, res, refiner, records, prompt_estimator,
                                     lag))
    eng = {k: r for k, r in out["_runs"].items()}
    doc = {"step_model": fit, "sim": sim, "errors": sim_errors(sim, eng)}
    if common_steps is not None and "fcfs" in keep:
        common, common_fit = fit_step_model(common_steps)
        same = simulate_policies(wl, keep, common, res, refiner, records, prompt_estimator, lag)
        f = same["fcfs"]
        doc["drift_free"] = {"step_model": common_fit, **{
            k: {"mean_e2e": v["mean_e2e"], "p99_e2e": v["p99_e2e"],
                "fcfs_over_mean_e2e": ratio(f["mean_e2e"], v["mean_e2e"]),
                "p99_e2e_over_fcfs": ratio(v["p99_e2e"], f["p99_e2e"])} for k, v in same.items()}}
    return doc


def prediction_trajectories(rec: Any, wl: Workload, sample: int = 12) -> dict[str, Any]:
    """Predicted vs true remaining length along the answers, as the engine's TRAIL predictor had them
    after each probe output (prefill and every refinement): MAE overall and by answer position, and a
    few trajectories for the plot."""
    length = dict(zip(wl.request_ids, wl.output_len.tolist(), strict=True))
    rows = [
        (gen, pred, length[rid] - gen)
        for rid, pts in rec.predictions.items()
        if rid in length
        for gen, pred in pts
        if pred is not None
    ]
    if not rows:
        return {}
    a = np.array(rows, float)
    err = np.abs(a[:, 1] - a[:, 2])
    edges = [0, 1, 64, 128, 256, 512, 1025]
    by_pos = {
        f"{lo}-{hi - 1}": float(err[(a[:, 0] >= lo) & (a[:, 0] < hi)].mean())
        for lo, hi in zip(edges[:-1], edges[1:], strict=True)
        if np.any((a[:, 0] >= lo) & (a[:, 0] < hi))
    }
    first = np.array(
        [
            (pts[0][1], length[rid])
            for rid, pts in rec.predictions.items()
            if rid in length and pts and pts[0][0] == 0 and pts[0][1] is not None
        ],
        float,
    )
    traj = {
        rid: [(g, p, length[rid] - g) for g, p in pts[:: max(1, len(pts) // 60)]]
        for rid, pts in list(rec.predictions.items())[:sample]
        if rid in length
    }
    return {
        "mae_all_positions": float(err.mean()),
        "mae_by_position": by_pos,
        "points": int(len(a)),
        "prompt_estimate_mae": float(np.abs(first[:, 0] - first[:, 1]).mean()) if len(first) else None,
        "trajectories": traj,
    }


def _int(x: float | None) -> int | None:
    return None if x is None else int(x)


def _jsonable(kw: dict) -> dict:
    return {k: (v if isinstance(v, int | float | str | bool | type(None)) else str(v)) for k, v in kw.items()}


def _save_partial(rows: list[dict[str, Any]]) -> None:
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "serving_partial.json").write_text(json.dumps(rows, indent=1, default=float))


def _save_steps(name: str, cap_steps: np.ndarray, runs: dict[str, dict]) -> None:
    """Every engine step of the regime (capacity run and each policy's run; loadgen's step columns)
    into $OUT, for the step-time analysis behind the capacity figure."""
    if os.environ.get("OUT"):
        arrays = {"capacity": cap_steps, **{k: r["_res"].steps for k, r in runs.items()}}
        np.savez_compressed(Path(os.environ["OUT"], f"steps_{name}.npz"), **arrays)


def _save_trace(name: str, out: dict[str, Any], page_size: int, split: str) -> None:
    """The regime's trace with the probe outputs recorded along every answer into $OUT
    (`trace_<regime>.npz`, read by `jtrail.bench.recorded_trace`): the simulator can then replay it
    offline under any policy settings (`benchmarks/tune_recorded.py`)."""
    if os.environ.get("OUT") and out["_records"] is not None:
        from jtrail.bench.recorded_trace import save_recorded_trace

        save_recorded_trace(Path(os.environ["OUT"], f"trace_{name}.npz"), out["_wl"],
                            out["_records"],
                            slots=out["slots"], pages=out["pages"], page_size=page_size,
                            preemption_mode=out["preemption_mode"], steps_in_flight=out["steps_in_flight"],
                            split=split)


def cdfs(runs: dict[str, dict]) -> dict[str, Any]:
    out = {}
    for label, r in runs.items():
        res = r["_res"]
        out[label] = {
            "e2e": [c.tolist() for c in cdf_points(res.finish - res.arrival, 100)],
            "ttft": [c.tolist() for c in cdf_points(res.first_token - res.arrival, 100)],
        }
    return out


def plots(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """E2E and TTFT CDFs per regime (from the document's CDF points, so a merged document re-plots)
    and predicted vs true remaining length along answers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["cdfs"])
    fig, ax = plt.subplots(len(names), 2, figsize=(10, 3.2 * len(names)), dpi=80, squeeze=False)
    for row, name in enumerate(names):
        for label, c in doc["cdfs"][name].items():
            for a, key in zip(ax[row], ("e2e", "ttft"), strict=True):
                a.plot(c[key][0], c[key][1], label=label, lw=1.2)
        ax[row][0].set(xlabel="E2E latency (s)", ylabel="fraction of requests", title=f"{name}: E2E CDF")
        ax[row][1].set(xlabel="TTFT (s)", title=f"{name}: TTFT CDF", xscale="log")
        ax[row][0].legend(fontsize=7)
    fig.tight_layout()
    p1 = out_dir / "serving_latency.png"
    fig.savefig(p1)
    plt.close(fig)
    files = [p1]
    traj = doc.get("predictions") or {}
    if traj.get("trajectories"):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
        for k, (_, pts) in enumerate(traj["trajectories"].items()):
            a = np.array(pts, float)
            (line,) = ax.plot(a[:, 0], a[:, 1], lw=1.0)
            ax.plot(a[:, 0], a[:, 2], ls=":", c=line.get_color(), lw=1.0, label="true" if k == 0 else None)
        ax.set(
            xlabel="tokens generated",
            ylabel="remaining tokens",
            title=f"predicted (solid) vs true (dotted); MAE {traj['mae_all_positions']:.0f} tokens",
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        p2 = out_dir / "serving_predictions.png"
        fig.savefig(p2)
        plt.close(fig)
        files.append(p2)
    return files


def merge_docs(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One serving.json from runs of different regimes on the same replay split (device calls are
    limited to 10 minutes, so the regimes may run in separate calls): later regimes are added, bars
    recomputed from the per-regime bars, the sim error the worst over all regimes."""
    out = dict(docs[0])
    for key in ("capacity", "regimes", "simulator", "cdfs"):
        out[key] = {k: v for d in docs for k, v in (d.get(key) or {}).items()}
    out["table"] = [row for d in docs for row in d["table"]]
    out["runs"] = [{k: d.get(k) for k in ("command", "date", "git_commit", "device")} for d in docs]
    out["predictions"] = next((d["predictions"] for d in docs if d.get("predictions")), {})
    bars = {k: v for d in docs for k, v in d["bars"].items() if k != "sim_vs_engine_mean_e2e_error"}
    errs = [abs(e) for s in out["simulator"].values() for e in (s.get("errors") or {}).values()]
    bars["sim_vs_engine_mean_e2e_error"] = max(errs) if errs else None
    out["bars"] = bars
    return out


def write_doc(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    files = plots(doc, out_dir)
    path = out_dir / "serving.json"
    path.write_text(json.dumps(clean_json(doc), indent=1))
    files.append(path)
    if os.environ.get("OUT") and Path(os.environ["OUT"]).resolve() != out_dir.resolve():
        for p in files:
            shutil.copy(p, Path(os.environ["OUT"]) / p.name)
    print(markdown(doc["table"]))
    print("bars:", json.dumps(clean_json(doc["bars"]), indent=1))
    return files


def per_regime(spec: str, name: str) -> float | None:
    """A per-regime option (`--regime-requests`, `--capacity`): one value for every regime ("400") or
    one per regime ("R1=400,R3=300"); None where it gives none for `name`."""
    if not spec or spec == "0":
        return None
    if "=" not in spec:
        return float(spec)
    counts = dict(item.split("=") for item in spec.split(","))
    return float(counts[name]) if name in counts else None


def run_replay(
    make,
    pool: Pool,
    args: Any,
    refiner: Any,
    specs: dict[str, tuple[str, dict]],
    history: dict | None,
    meta: dict[str, Any],
    prompt_estimator: Any = None,
) -> dict[str, Any]:
    """All requested regimes; returns the serving.json document (also written, with plots).
    `prompt_estimator`: the arrival estimates the simulator gives "host" specs (as their engine did)."""
    import datetime

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"pool: {pool.describe()}", flush=True)
    partial: list[dict] = []
    regimes, caps, bars, sims, table = {}, {}, {}, {}, []
    traj: dict[str, Any] = {}
    for name in args.regimes.split(","):
        regime = REGIMES[name]
        slots = pool.resources(name, args.page_size, args.regime_slots)["num_slots"]
        n_cap = args.capacity_requests or 8 * slots
        given = per_regime(args.capacity, name) if args.capacity else None
        if given:  # measured by an earlier run on the same resources (recorded in the JSON)
            cap = {
                "capacity_req_s": float(given),
                "tokens_per_s": float(given) * float(pool.lengths.mean()),
                "full_seconds": float("nan"),
                "source": f"--capacity {args.capacity}",
                "steps": np.zeros((0, 9)),
            }
        else:
            cap = measure_capacity(make, pool, regime, slots, n_cap, args.max_output, args.run_timeout)
        caps[name] = {k: v for k, v in cap.items() if k != "steps"}
        print(
            f"{name}: capacity {cap['capacity_req_s']:.2f} req/s ({cap['tokens_per_s']:.0f} tok/s over "
            f"{cap['full_seconds']:.1f} s of full batch; step ms full {cap.get('full_step_ms', 0):.2f}, "
            f"decode-only {cap.get('full_step_ms_decode_only', 0):.2f}, "
            f"with prefill {cap.get('full_step_ms_with_prefill', 0):.2f}, "
            f"partial {cap.get('partial_step_ms', 0):.2f})",
            flush=True,
        )
        out = run_regime(make, pool, name, specs, cap, args, refiner, partial)
        if len(cap["steps"]):  # each run's step time against the capacity run's, batch for batch
            ref = fit_step_model(cap["steps"])[0]
            for r in out["_runs"].values():
                r["step_speed_vs_capacity_run"] = speed_against(r["_res"].steps, ref)
        _save_steps(name, cap["steps"], out["_runs"])
        _save_trace(name, out, args.page_size, pool.split)
        regimes[name] = out
        bars.update(bars_of(name, out["_runs"], getattr(args, "trail_label", "trail"),
                            getattr(args, "step_drift_limit", STEP_DRIFT_LIMIT)))
        steps = np.concatenate([cap["steps"], *(r["_res"].steps for r in out["_runs"].values())])
        if name in args.sim_regimes.split(","):
            common = cap["steps"] if getattr(args, "sim_common_step", False) and len(cap["steps"]) else None
            sims[name] = simulate_regime(out, specs, steps, refiner, pool, args.page_size, prompt_estimator,
                                         common)
            print(f"{name}: sim vs engine mean E2E {sims[name].get('errors')}", flush=True)
        if out["_recorder"] is not None and not traj:
            traj = prediction_trajectories(out["_recorder"], out["_wl"])
        f = out["_runs"].get("fcfs")
        o = out["_runs"].get("srpt-oracle")
        for r in out["_runs"].values():
            row = {"regime": name, **{k: v for k, v in r.items() if not k.startswith("_")}}
            if f is not None:
                row["fcfs_over_mean_e2e"] = ratio(f["mean_e2e"], r["mean_e2e"])
                row["fcfs_over_mean_ttft"] = ratio(f["mean_ttft"], r["mean_ttft"])
                row["p99_e2e_over_fcfs"] = ratio(r["p99_e2e"], f["p99_e2e"])
            if o is not None:
                row["over_oracle_mean_e2e"] = ratio(r["mean_e2e"], o["mean_e2e"])
            table.append(row)
    errs = [abs(e) for s in sims.values() for e in (s.get("errors") or {}).values()]
    bars["sim_vs_engine_mean_e2e_error"] = max(errs) if errs else None
    doc = {
        "command": args.command,
        "device": device_label(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "config": {k: v for k, v in vars(args).items() if k != "command"},
        **meta,
        "workload": {"mode": "replay (teacher-forced recorded answers)", **pool.describe()},
        "capacity": caps,
        "table": table,
        "regimes": {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in regimes.items()},
        "simulator": sims,
        "predictions": traj,
        "cdfs": {n: cdfs(r["_runs"]) for n, r in regimes.items()},
        "bars": bars,
        "history": history,
    }
    write_doc(doc, out_dir)
    return doc


def markdown(table: list[dict]) -> str:
    cols = [
        ("mean_e2e", "mean E2E s"),
        ("p99_e2e", "p99 E2E s"),
        ("mean_ttft", "mean TTFT s"),
        ("p99_ttft", "p99 TTFT s"),
        ("preemptions_per_request", "preempt/req"),
        ("fcfs_over_mean_e2e", "fcfs/x E2E"),
        ("fcfs_over_mean_ttft", "fcfs/x TTFT"),
        ("p99_e2e_over_fcfs", "p99/fcfs"),
        ("over_oracle_mean_e2e", "x/oracle E2E"),
        ("step_speed_vs_capacity_run", "step time / capacity run's"),
    ]
    lines = ["| regime | policy | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for r in table:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            cells.append("n/a" if v is None or not np.isfinite(v) else f"{v:.3g}")
        lines.append(f"| {r['regime']} | {r['policy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replay_policy_specs(edges: list[float], mids: list[float]) -> dict[str, tuple[str, dict[str, Any]]]:
    """The replay workload's policies (`--policies` names -> policy, options); `edges`, `mids`: the
    probe's bins (gittins ranks by its posterior)."""
    # trail's defaults (c = 0.5 under "keep", at most one preemption, the recompute-cost rule, aging 200
    # tok/s: results/tune_recorded.json), "trail-twin" the same policy under another label (with
    # --trail-label trail-twin the probe recorder rides on its run, not on trail's: the recorder's host cost),
    # and trail without aging beside it; gittins and the oracle at c = 0 without aging, so the oracle is
    # pure SRPT on true lengths (the mean's lower reference). trail-exp-aging: multiplicative aging at
    # 0.15 / s, results/tune_order.json's choice on the simulator (not confirmed on the engine in R2)
    return {"fcfs": ("fcfs", {}), "trail": ("trail", {}),
            "trail-twin": ("trail", {}),
            "trail-keep-defaults-before": ("trail", {"max_preemptions": 2, "aging": 100.0,
                                                     "preempt_cost": None}),
            "trail-no-aging": ("trail", {"aging": 0.0}),
            # the default before 2026-12-04 (no preemption; the engine then dropped a preempted request's KV)
            "trail-c0": ("trail", {"c": 0.0, "max_preemptions": None}),
            "trail-probe-at-once": ("trail", {"probe_hold_s": 0.0}),
            "trail-exp-aging": ("trail", {"aging": 0.15, "aging_form": "exp"}),
            # trail ranking arrivals by the host-side prompt estimator (no probe-only prefills)
            "trail-host": ("trail", {"arrival_estimate": "host"}),
            # and with tune_order.json's order: that search gave every estimate at arrival for free,
            # which is what the host estimate does (the probe-only prefills it was tried with are not)
            "trail-host-exp-aging": ("trail", {"arrival_estimate": "host", "aging": 0.15,
                                               "aging_form": "exp"}),
            # the simulator's candidates with the newest step model (results/tune_realistic.json):
            # TRAIL's limited preemption, cost-aware, at most two per request, with the probe's or
            # the host's first estimate
            "trail-preempt": ("trail", {"c": 0.5, "preempt_cost": True, "max_preemptions": 2}),
            "trail-host-preempt": ("trail", {"arrival_estimate": "host", "c": 0.5, "preempt_cost": True,
                                             "max_preemptions": 2}),
            "trail-host-preempt-aging200": ("trail", {"arrival_estimate": "host", "c": 0.5,
                                                      "preempt_cost": True, "max_preemptions": 2,
                                                      "aging": 200.0}),
            "gittins": ("gittins", {"bin_edges": edges, "midpoints": mids, "c": 0.0}),
            "srpt-oracle": ("srpt-oracle", {"c": 0.0})}


# the names serving.py checks before it loads the model
REPLAY_POLICIES = tuple(replay_policy_specs([], []))


def run_replay_workload(su: Setup, args: argparse.Namespace) -> int:
    """`benchmarks/serving.py --workload replay`: the pool from the replay split, every policy in each
    requested regime on fresh engines of the regime's size (`run_replay`)."""
    if not args.replay:
        raise SystemExit("--workload replay needs --replay PATH (from: python -m jtrail.replay --out PATH)")
    pool = Pool(args.replay, args.split, args.max_model_len, args.seed, args.max_answer_tokens)
    su.warm_prompts = pool.prompts[:32]
    edges, mids = list(su.refiner.bin_edges), [float(m) for m in su.refiner.midpoints]
    specs = replay_policy_specs(edges, mids)
    specs = {k: v for k, v in specs.items() if k in args.policies.split(",")}
    host = [k for k, (_, kw) in specs.items() if kw.get("arrival_estimate") == "host"]
    if host and su.prompt_estimator is None:
        raise SystemExit(f"{', '.join(host)} need a prompt estimator beside the probe ({args.probe_used}/"
                         "prompt_estimator.npz, from jtrail train-prompt-estimator)")
    old = Path(args.out) / "serving.json"
    history = None
    if old.is_file():  # the previous headline (natural lengths) stays in the file as history
        prev = json.loads(old.read_text())
        history = prev.get("history") or {k: prev.get(k) for k in ("command", "device", "date", "git_commit",
                                                                    "workload", "table", "bars")}

    def make(pname: str, kw: dict, regime: Any, predictor: Any = None) -> Any:
        r = pool.resources(regime.name, args.page_size, args.regime_slots)
        return make_engine(su, pname, kw, predictor, slots=r["num_slots"], pages=r["num_pages"])

    meta = {"probe": args.probe_used, "dtype": args.dtype_used}
    run_replay(make, pool, args, su.refiner, specs, history, meta, su.prompt_estimator)
    return 0
