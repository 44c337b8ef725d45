"""Tune trail on the simulator with the probe's real outputs, recorded on the tuning split.

    python benchmarks/tune_recorded.py TRACE.npz STEPS.npz [--seeds 1,2] [--out results/tune_recorded.json]

TRACE.npz: `trace_R1.npz` from `benchmarks/serving.py --split tune` (the probe's outputs after every
token of 600 tuning-split answers, as the engine's in-graph probe gave them); STEPS.npz: that call's
`steps_R1.npz` (the step model is fitted on its capacity run). The synthetic probe of
`tune_preemption.py` put trail's old defaults at 0.44 preemptions per request in R2; fed the recorded
outputs, the simulator gives 0.74, and 1.12x fcfs against srpt-oracle's 2.48x: the real probe's errors
matter, so the defaults are chosen here.

Traces: the recorded requests (cycled, shuffled per seed) at each regime's arrivals against the
simulator's own capacity (a saturated fcfs run), R1 also at 0.97 of it (a capacity measured a few
percent high on the engine makes "0.9" run at about that: the benchmark's fcfs TTFT of 0.8 s), and R3
on its own resources (64 slots, KV for ~16 average requests; fcfs with vLLM's free-page watermark),
reported beside the rule. Every policy runs the same trace per seed; the benchmark split is never read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import sys
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "tune_recorded.json"
SETTINGS = {"R1": ("R1", 0.9 / 0.9), "R1-0.97": ("R1", 0.97 / 0.9), "R2": ("R2", 1.0), "R3": ("R3", 1.0)}
RULE_SETTINGS = ("R1", "R1-0.97", "R2")  # R3 (memory-bound, its own resources) is reported beside
# trail's options spelled out in full (the defaults move with this search): the setting before it, then
# one change at a time, then the cost rule with aging and the cap
_BEFORE: dict[str, Any] = {"c": 0.5, "max_preemptions": 2, "aging": 100.0, "preempt_cost": None}


def _trail(**change: Any) -> tuple[str, dict[str, Any], bool]:
    return ("trail", {**_BEFORE, **change}, False)


SPECS: dict[str, tuple[str, dict[str, Any], bool]] = {  # label -> (policy, options, free first estimate)
    "fcfs": ("fcfs", {}, False),
    "srpt-oracle": ("srpt-oracle", {"c": 0.0}, True),
    "trail c=0.5 cap 2 aging 100 (before)": _trail(),
    "trail c=0": _trail(c=0.0, max_preemptions=None),
    "trail c=0.8": _trail(c=0.8),
    "trail cap 1": _trail(max_preemptions=1),
    "trail aging 200": _trail(aging=200.0),
    "trail aging 400": _trail(aging=400.0),
    "trail cap 1 aging 200": _trail(max_preemptions=1, aging=200.0),
    "trail cost": _trail(preempt_cost=True),
    "trail cost aging 150": _trail(preempt_cost=True, aging=150.0),
    "trail cost aging 200": _trail(preempt_cost=True, aging=200.0),
    "trail cost aging 300": _trail(preempt_cost=True, aging=300.0),
    "trail cost cap 1 aging 200": _trail(preempt_cost=True, max_preemptions=1, aging=200.0),
    "trail free first estimate": ("trail", _BEFORE, True),
    "gittins": ("gittins", {"c": 0.5, "max_preemptions": 2, "aging": 100.0}, False),
    "gittins c=0": ("gittins", {"c": 0.0, "aging": 100.0}, False),
}
KEYS = ("mean_e2e", "p99_e2e", "mean_ttft", "p99_ttft", "preemptions_per_request")
_STATE: dict[str, Any] = {}


def _sha256(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _setup(trace_path: str, steps_path: str) -> None:
    from jtrail.models.probe_io import load_probe
    from jtrail.serving.brain.predictor import TrailPredictor
    from jtrail.serving.simulation.step_model import fit_step_model

    from jtrail.bench.recorded_trace import load_recorded_trace
    from jtrail.shipped import resolve_probe_path

    _, pcfg, _ = load_probe(resolve_probe_path("replay"))
    sm, fit = fit_step_model(np.load(steps_path)["capacity"])
    _STATE.update(rt=load_recorded_trace(trace_path), sm=sm, fit=fit, pcfg=pcfg,
                  refiner=lambda: TrailPredictor(pcfg.bin_edges, pcfg.midpoints))


def _resources(regime: str) -> Any:
    """The recorded run's slots and pages (R1, R2), or R3's for this workload (64 slots, KV pages for
    about 16 average requests), under the recorded preemption mode."""
    import dataclasses

    from jtrail.serving.simulation.regimes import regime_resources

    rt = _STATE["rt"]
    if regime != "R3":
        return rt.resources
    r = regime_resources(regime, float(rt.prompt_len.mean()), float(rt.output_len.mean()),
                         rt.resources.page_size)
    return dataclasses.replace(rt.resources, **r)


def _capacity(regime: str) -> float:
    """The regime's capacity on the simulator: 1,200 recorded requests (cycled) at t=0."""
    from jtrail.bench.preemption_tuning import saturated_capacity

    rt, k = _STATE["rt"], 1200
    idx = np.arange(k) % len(rt.request_ids)
    return saturated_capacity(regime, rt.prompt_len[idx], rt.output_len[idx], _STATE["sm"],
                              _resources(regime), float(rt.output_len.mean()))


def _trace(setting: str, seed: int, cap: float) -> tuple[Any, dict[str, np.ndarray]]:
    from jtrail.serving.simulation.regimes import regime_arrivals
    from jtrail.serving.simulation.simulator import Trace

    rt = _STATE["rt"]
    regime, scale = SETTINGS[setting]
    arr = regime_arrivals(regime, cap * scale, seed, None if regime == "R2" else len(rt.request_ids))
    idx = np.random.default_rng(seed).permutation(np.arange(len(arr)) % len(rt.request_ids))
    ids = [f"{setting}-{seed}-{i}" for i in range(len(arr))]
    records = {n: rt.records[rt.request_ids[j]] for n, j in zip(ids, idx, strict=True)}
    caps = np.full(len(arr), rt.max_tokens or 1024)
    return Trace(arr, rt.prompt_len[idx], rt.output_len[idx], request_ids=ids, max_tokens=caps), records


def _one(job: tuple[str, int, float, str]) -> tuple[str, int, str, dict[str, float]]:
    from jtrail.serving.brain.predictor import OraclePredictor, RecordedPredictor
    from jtrail.serving.simulation.regimes import REGIMES
    from jtrail.serving.simulation.simulator import simulate

    setting, seed, cap, label = job
    name, kw, free = SPECS[label]
    regime = SETTINGS[setting][0]
    tr, records = _trace(setting, seed, cap)
    pred = OraclePredictor() if name == "srpt-oracle" else RecordedPredictor(_STATE["refiner"](), records)
    kw = dict(kw)
    if name == "gittins":
        kw.update(bin_edges=_STATE["pcfg"].bin_edges, midpoints=_STATE["pcfg"].midpoints)
    if name == "fcfs" or name == "srpt-oracle":
        kw.pop("aging", None)
    if name == "fcfs":  # the regime's baseline (R3: vLLM's free-page watermark)
        kw.update(REGIMES[regime].fcfs_kwargs)
    r = simulate(tr, name, _STATE["sm"], _resources(regime), predictor=pred, policy_kwargs=kw,
                 predict_at_arrival=free, max_jump_steps=8 if name in ("trail", "gittins") else None,
                 finish_lag_steps=_STATE["rt"].steps_in_flight)
    s = r.summary()
    return setting, seed, label, {k: float(s[k]) for k in KEYS}


RULE = ("over R1, R1-0.97 and R2 (R3 reported beside): issue 15's R1 bars met at R1's load (fcfs/x mean "
        "E2E >= 1.05, mean TTFT >= 3, p99 <= 1.25, x/oracle <= 1.3), R2's p99 <= 1.3, preemptions per "
        "request <= 0.5 in every setting, mean TTFT >= 3x fcfs at R1-0.97 too; then the smallest "
        "worst-case p99/fcfs over the settings")


def choose(table: dict[str, dict[str, dict[str, float]]]) -> tuple[str | None, float | None]:
    """The trail setting `RULE` picks from a table with every setting of RULE_SETTINGS (others are left
    out of the rule), with its worst-case p99/fcfs."""
    if not all(k in table for k in RULE_SETTINGS):
        return None, None
    table = {k: table[k] for k in RULE_SETTINGS}
    ok = []
    for lab in table["R1"]:
        if SPECS[lab][0] != "trail" or SPECS[lab][2]:  # trail as the engine runs it
            continue
        r1, r97, r2 = table["R1"][lab], table["R1-0.97"][lab], table["R2"][lab]
        if (r1["fcfs_over_x_mean_e2e"] >= 1.05 and r1["fcfs_over_x_mean_ttft"] >= 3
                and r1["x_over_fcfs_p99_e2e"] <= 1.25 and r1.get("x_over_oracle_mean_e2e", 0) <= 1.3
                and r2["x_over_fcfs_p99_e2e"] <= 1.3 and r97["fcfs_over_x_mean_ttft"] >= 3
                and max(t[lab]["preemptions_per_request"] for t in table.values()) <= 0.5):
            ok.append((max(t[lab]["x_over_fcfs_p99_e2e"] for t in table.values()), lab))
    if not ok:
        return None, None
    worst, lab = min(ok)
    return lab, worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace")
    p.add_argument("steps")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--specs", default=",".join(SPECS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    _setup(a.trace, a.steps)
    if _STATE["rt"].split == "bench":
        raise SystemExit(f"{a.trace}: recorded on the benchmark split; tune on another (--split tune)")
    caps = {r: _capacity(r) for r in {SETTINGS[st][0] for st in a.settings.split(",")}}
    seeds = [int(s) for s in a.seeds.split(",")]
    jobs = [(st, sd, caps[SETTINGS[st][0]], lab)
            for st in a.settings.split(",") for sd in seeds for lab in a.specs.split(",")]
    ctx = multiprocessing.get_context("spawn")  # jax's tensorstore refuses fork()
    with ctx.Pool(a.workers, initializer=_setup, initargs=(a.trace, a.steps)) as pool:
        got = pool.map(_one, jobs)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for setting in a.settings.split(","):
        rows = {lab: {k: float(np.mean([g[3][k] for g in got if g[0] == setting and g[2] == lab]))
                      for k in KEYS} for lab in a.specs.split(",")}
        f, o = rows["fcfs"], rows.get("srpt-oracle")
        for lab, m in rows.items():
            m["fcfs_over_x_mean_e2e"] = f["mean_e2e"] / m["mean_e2e"]
            m["fcfs_over_x_mean_ttft"] = f["mean_ttft"] / m["mean_ttft"]
            m["x_over_fcfs_p99_e2e"] = m["p99_e2e"] / f["p99_e2e"]
            if o is not None:
                m["x_over_oracle_mean_e2e"] = m["mean_e2e"] / o["mean_e2e"]
            print(f"{setting:8s} {lab:28s} fcfs/x E2E {m['fcfs_over_x_mean_e2e']:.3f} TTFT "
                  f"{m['fcfs_over_x_mean_ttft']:6.2f} p99/fcfs {m['x_over_fcfs_p99_e2e']:.3f} x/oracle "
                  f"{m.get('x_over_oracle_mean_e2e', float('nan')):.3f} preempt/req "
                  f"{m['preemptions_per_request']:.2f}", flush=True)
        table[setting] = rows
    choice, why = choose(table)
    print("choice:", choice, why)
    from jtrail.provenance import git_commit

    args = sys.argv[1:] if argv is None else argv
    doc = {"command": "python benchmarks/tune_recorded.py " + " ".join(args),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "git_commit": git_commit(),
           "split": _STATE["rt"].split, "requests_recorded": len(_STATE["rt"].request_ids), "seeds": seeds,
           "inputs_sha256": {Path(f).name: _sha256(f) for f in (a.trace, a.steps)},
           "step_model": _STATE["fit"], "sim_capacity_req_s": caps,
           "settings": {k: {"regime": r, "load_scale": s} for k, (r, s) in SETTINGS.items()},
           "specs": {k: {"policy": n, "options": kw, "free_first_estimate": fr}
                     for k, (n, kw, fr) in SPECS.items()},
           "rule": RULE, "choice": choice, "choice_options": SPECS[choice][1] if choice else None,
           "choice_worst_p99_over_fcfs": why, "table": table}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
