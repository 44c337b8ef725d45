"""The natural-length sweep of the serving benchmark (`benchmarks/serving.py --workload natural`):
profile each prompt's natural-EOS length, measure capacity, run every policy at each rate on the same
trace, then the simulator on the top-rate trace."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from jtrail.bench.engine_setup import Setup, make_engine
from jtrail.bench.loadgen import Workload, arrival_times, drive_engine
from jtrail.bench.metrics import summarize
from jtrail.serving.brain.capacity import pauses
from jtrail.serving.brain.predictor import RecordingPredictor
from jtrail.serving.engine.step_programs import TRACE_COUNTS
from jtrail.serving.simulation.sim_vs_engine import sim_errors, simulate_policies
from jtrail.serving.simulation.step_model import fit_step_model


def log(msg: str, t0: float = time.perf_counter()) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)



def profile_lengths(su: Setup, prompts: list[list[int]]) -> np.ndarray:
    """Natural-EOS greedy output lengths (eos counted; capped at --max-output)."""
    from jtrail.probe.data import generate_greedy

    # batch 128: few distinct shapes to compile, a one-while-loop decode per batch (fast)
    answers, _ = generate_greedy(su.model, prompts, su.args.max_output, su.eos, batch_size=128,
                                 progress=False)
    return np.array([max(len(a), 1) for a in answers], np.int64)


def measure_capacity(su: Setup, prompts: list[list[int]], lengths: np.ndarray) -> dict[str, float]:
    """Saturated throughput: everything arrives at t=0; rate = requests done before the tail drains."""
    n = min(len(prompts), su.args.capacity_requests)
    wl = Workload(prompts[:n], np.zeros(n), lengths[:n], max_tokens=su.args.max_output)
    res = drive_engine(make_engine(su, "fcfs", {}), wl, timeout_s=su.args.run_timeout)
    fin = np.sort(res.finish[res.completed])
    k = max(len(fin) - su.args.slots, 1)  # exclude the tail where the batch is no longer full
    full = res.steps[res.steps[:, 0] >= su.args.slots]
    step_s = float(np.median(full[:, 2])) if len(full) else float(np.median(res.steps[:, 2]))
    return {"requests": float(n), "capacity_req_s": float(k / fin[k - 1]),
            "tokens_per_s": float(res.output_tokens[:k].sum() / fin[k - 1]),
            "full_batch_step_s": step_s, "per_request_tok_s": 1.0 / step_s,
            "preemptions_per_request": float(res.preemptions.mean()), "steps": res.steps}


def policy_specs(su: Setup, aging_rates: list[float]) -> tuple[dict, dict]:
    edges, mids = list(su.refiner.bin_edges), [float(m) for m in su.refiner.midpoints]
    main = {"fcfs": ("fcfs", {}), "trail": ("trail", {}), "srpt-oracle": ("srpt-oracle", {}),
            "gittins": ("gittins", {"bin_edges": edges, "midpoints": mids})}
    main = {k: v for k, v in main.items() if k in su.args.policies.split(",")}
    aged = {f"trail-aging-{r:.4g}": ("trail", {"aging": r, "aging_form": "linear"}) for r in aging_rates}
    return main, aged


def sweep(su: Setup, prompts, lengths, cap: dict, budget_s: float) -> dict[str, Any]:
    """Top rate first (the bars live there), then lower rates while the time budget lasts."""
    a = su.args
    fracs = sorted((float(x) for x in a.rates.split(",")), reverse=True)
    aging_rates = [float(f) * cap["per_request_tok_s"] for f in a.aging.split(",") if f]
    main, aged = policy_specs(su, aging_rates)
    top_w = 1.5  # the top rate gets longer traces: queueing there needs time to build up
    per_run = budget_s / (top_w * (len(main) + len(aged)) + (len(fracs) - 1) * len(main))
    runs: list[dict[str, Any]] = []
    steps, top = [], None
    t_end = time.perf_counter() + budget_s
    for ri, frac in enumerate(fracs):
        rate = frac * cap["capacity_req_s"]
        is_top = ri == 0
        n = int(np.clip(rate * per_run * (top_w if is_top else 1.0) * 0.7, a.min_requests, a.max_requests))
        if not is_top and a.low_requests:
            n = a.low_requests
        specs = {**main, **(aged if is_top else {})}
        if not is_top and time.perf_counter() + len(specs) * n / rate > t_end:
            log(f"rate {frac:.2f}: skipped, out of time budget")
            continue
        pick = np.random.default_rng(a.seed + 1000 + ri).choice(len(prompts), n, replace=n > len(prompts))
        wl = Workload([prompts[i] for i in pick], arrival_times(n, rate, a.seed + ri, a.cv), lengths[pick],
                      max_tokens=a.max_output)
        for label, (name, kw) in specs.items():
            rec = RecordingPredictor(su.refiner) if (is_top and label == "trail") else None
            eng = make_engine(su, name, kw, rec)
            compiled = sum(TRACE_COUNTS.values())
            res = drive_engine(eng, wl, timeout_s=max(a.run_timeout, 4 * n / rate))
            s = summarize(res)
            stall = pauses(res.steps[:, 2])  # a compile or a pause, not the steady state: report them
            s.update(compiles_during_run=float(sum(TRACE_COUNTS.values()) - compiled),
                     stalls=float(stall.sum()), stall_s=float(res.steps[stall, 2].sum()))
            del eng
            steps.append(res.steps)
            runs.append({"rate_frac": frac, "rate_req_s": rate, "policy": label, "name": name,
                         "options": kw if name != "gittins" else {}, "aging": kw.get("aging", 0.0), **s,
                         "_e2e": res.finish - res.arrival, "_ttft": res.first_token - res.arrival,
                         "_npre": res.preemptions, "_steps": res.steps})
            log(f"rate {frac:.2f} ({rate:.2f} req/s, n={n}) {label:>22}: mean e2e {s['mean_e2e']:.3f}s "
                f"p99 {s['p99_e2e']:.3f}s ttft {s['mean_ttft']:.3f}s preempt/req "
                f"{s['preemptions_per_request']:.2f} done {int(s['completed'])}/{n} in {res.wall_s:.1f}s "
                f"(stalls {int(s['stalls'])}: {s['stall_s']:.2f}s, compiles {int(s['compiles_during_run'])})")
            if rec is not None:
                top = (wl, rec, specs)
            _save_partial(runs)
    return {"runs": runs, "steps": np.concatenate([cap["steps"], *steps]), "top": top,
            "aging_rates": aging_rates}


def _save_partial(runs: list[dict[str, Any]]) -> None:
    """Each run's summary as it finishes ($OUT/serving_partial.json): a run cut off by its time limit
    keeps what it measured."""
    if os.environ.get("OUT"):
        rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]
        Path(os.environ["OUT"], "serving_partial.json").write_text(json.dumps(rows, indent=1, default=float))


def save_raw(su: Setup, lengths: np.ndarray, cap: dict, sw: dict[str, Any]) -> None:
    """Everything needed to re-run the simulator offline on this trace (serving_raw.npz, written to
    --raw-dir and $OUT, never into the source tree by default): the top-rate trace, per-run per-request
    outcomes and step records, the probe records."""
    raw: dict[str, np.ndarray] = {"pool_output_len": lengths, "capacity_steps": cap["steps"]}
    for k, r in enumerate(sw["runs"]):
        raw[f"run{k}_meta"] = np.array([r["policy"], r["name"], str(r["rate_frac"]), str(r["aging"])])
        for f in ("_e2e", "_ttft", "_npre", "_steps"):
            raw[f"run{k}{f}"] = np.asarray(r[f])
    if sw["top"] is not None:
        wl, rec, _ = sw["top"]
        ids = list(wl.request_ids)
        records = rec.records(ids, len(su.refiner.midpoints))
        raw.update(top_arrival=wl.arrival, top_prompt_len=np.array([len(p) for p in wl.prompts]),
                   top_output_len=wl.output_len, top_ids=np.array(ids),
                   top_max_tokens=np.array(wl.max_tokens if wl.max_tokens else -1),
                   records=np.concatenate([records[i] for i in ids]),
                   records_len=np.array([len(records[i]) for i in ids]))
    for d in dict.fromkeys(str(Path(x).resolve()) for x in (su.args.raw_dir, os.environ.get("OUT")) if x):
        if d:
            Path(d).mkdir(parents=True, exist_ok=True)
            np.savez_compressed(Path(d) / "serving_raw.npz", **raw)


def load_raw(path: str) -> dict:
    """What `save_raw` wrote: the top-rate runs, the probe records per request, the top-rate trace (as
    a workload of placeholder prompts of the recorded lengths) and the capacity run's steps."""
    z = np.load(path)
    runs_all = []
    k = 0
    while f"run{k}_meta" in z:
        label, name, frac, aging = (str(x) for x in z[f"run{k}_meta"])
        runs_all.append({"label": label, "name": name, "rate_frac": float(frac), "aging": float(aging),
                       "e2e": z[f"run{k}_e2e"], "ttft": z[f"run{k}_ttft"], "steps": z[f"run{k}_steps"]})
        k += 1
    top = max(r["rate_frac"] for r in runs_all)
    runs = {r["label"]: r for r in runs_all if r["rate_frac"] == top}  # the saved trace is the top rate's
    ids = [str(i) for i in z["top_ids"]]
    ends = np.cumsum(z["records_len"])
    rec = {rid: z["records"][e - n:e] for rid, n, e in zip(ids, z["records_len"], ends, strict=True)}
    cap = int(z["top_max_tokens"]) if "top_max_tokens" in z else -1  # -1: sent as the forced length
    wl = SimpleNamespace(arrival=z["top_arrival"], prompts=[[0] * int(n) for n in z["top_prompt_len"]],
                         output_len=z["top_output_len"], request_ids=ids, max_tokens=cap if cap > 0 else None)
    return {"runs": runs, "records": rec, "workload": wl, "capacity_steps": z["capacity_steps"]}


def run_sim(su: Setup, sw: dict[str, Any]) -> dict[str, Any]:
    from jtrail.serving.simulation.simulator import Resources

    sm, fit = fit_step_model(sw["steps"])
    if sw["top"] is None:
        return {"step_model": fit}
    wl, rec, specs = sw["top"]
    keep = {k: v for k, v in specs.items() if k in ("fcfs", "trail", "srpt-oracle")}
    records = rec.records(list(wl.request_ids), len(su.refiner.midpoints))
    res = Resources(num_slots=su.args.slots, num_pages=su.args.pages, page_size=su.args.page_size)
    sim = simulate_policies(wl, keep, sm, res, su.refiner, records)
    top = max(r["rate_frac"] for r in sw["runs"])
    eng = {r["policy"]: r for r in sw["runs"] if r["rate_frac"] == top}
    return {"step_model": fit, "sim": sim, "errors": sim_errors(sim, eng)}

