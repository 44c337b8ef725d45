"""Simulator benchmark: speed, agreement with queueing theory, routing and policy comparisons.

    .venv/bin/python benchmarks/simulate.py            # full run (~ a few minutes on one core)
    .venv/bin/python benchmarks/simulate.py --quick    # smaller sizes, for a smoke test

Writes benchmarks/results/simulate.json. Lengths: real ShareGPT answer lengths when `jtrail.datasets`
provides them, else a documented lognormal stand-in (median 180 tokens, sigma 1.0, clipped to
[1, 2048]; mean ~ 290: heavy-tailed like ShareGPT answers). The step model is a documented default
(`--step-model a,b,c`, seconds) until one fitted on the GPU engine replaces it.

Routing (`--sections routing`, ~2-3 min): 8 replicas like the serving benchmark's (8 slots, 256 pages
of 16 tokens), the GPU-fitted step model (`--routing-step-model`), ShareGPT lengths, a synthetic TRAIL
probe with the measured errors (`ProbeLikePredictor`), 90% of the measured capacity; every router on
the same trace, replicas running fcfs and trail. Token-aware reads each replica's slot forecast
(`forecast.replica_forecast`), which the simulator fills as the engine does. The rule was
designed on seeds 1-4; the default `--routing-seed 11` was not looked at while designing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
from jtrail.serving.brain.predictor import (
    NoisyOraclePredictor,
    ProbeLikePredictor,
    SyntheticProbe,
    TrailPredictor,
)
from jtrail.serving.brain.router import make_router
from jtrail.serving.simulation.queueing import mg1_fcfs_mean_response, mg1_srpt_mean_response
from jtrail.serving.simulation.simulator import Resources, Trace, simulate
from jtrail.serving.simulation.step_model import StepModel

from jtrail.provenance import git_commit

OUT = Path(__file__).resolve().parent / "results" / "simulate.json"
EDGES = tuple(float(x) for x in [0, 16, 32, 64, 128, 256, 512, 1024, 2048])  # log-spaced probe bins


def lengths(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    try:  # real ShareGPT answer lengths, when the datasets module exists
        from jtrail import datasets  # type: ignore[attr-defined]

        out = np.asarray(datasets.sharegpt_output_lengths(), dtype=np.int64)  # type: ignore[attr-defined]
        prm = np.asarray(datasets.sharegpt_prompt_lengths(), dtype=np.int64)  # type: ignore[attr-defined]
        idx = rng.integers(0, len(out), n)
        return np.clip(prm[idx], 1, 2048), np.clip(out[idx], 1, 2048), "sharegpt"
    except (ImportError, AttributeError):
        out = np.clip(np.round(rng.lognormal(np.log(180), 1.0, n)), 1, 2048).astype(np.int64)
        prm = np.clip(np.round(rng.lognormal(np.log(120), 0.8, n)), 4, 2048).astype(np.int64)
        return prm, out, "lognormal(median 180, sigma 1.0)"


def poisson(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    return np.cumsum(rng.exponential(1.0 / rate, n))


def capacity_rps(sm: StepModel, res: Resources, prm: np.ndarray, out: np.ndarray, n: int = 5_000) -> float:
    """Measured capacity (requests/s): FCFS on a saturated replica (everything queued at t=0).
    Measured rather than computed: page shortages, preemptions and length-biased contexts cut it."""
    k = min(n, len(out))
    tr = Trace(np.zeros(k), prm[:k], out[:k])
    r = simulate(tr, "fcfs", sm, res)
    # Steady state only: the ramp-up (first 10% of completions) and the drain, where the batch is
    # no longer full, overstate the rate (at "90%" of a makespan-based figure the queue grew unboundedly).
    fin = np.sort(r.e2e)  # arrivals are all at t = 0
    lo, hi = k // 10, k - max(k // 10, res.num_slots)
    return (hi - lo) / (fin[hi] - fin[lo]) if hi > lo and fin[hi] > fin[lo] else k / r.makespan


def bench_speed(n: int, sm: StepModel, rng, speed_load: float = 0.5) -> dict:
    prm, out, src = lengths(n, rng)
    res = Resources(num_slots=64, num_pages=64 * 160, page_size=16)
    # Half of saturated-FCFS capacity: a stable queue. At 0.7 of it, over 1M ShareGPT-length requests,
    # trail's recompute preemptions added enough work to pass capacity: the queue grew without bound
    # (mean E2E 3,292 s) and the run took 702 s, dominated by scans of the ever longer queue.
    load = speed_load
    rate = load * capacity_rps(sm, res, prm, out)
    tr = Trace(poisson(n, rate, rng), prm, out)
    r = simulate(tr, "trail", sm, res)
    return {"requests": n, "policy": "trail (oracle)", "slots": 64, "load": load, "wall_s": r.wall_seconds,
            "us_per_request": 1e6 * r.wall_seconds / n, "mean_e2e_s": float(r.e2e.mean()), "lengths": src}


def bench_theory(n: int, rng) -> dict:
    tick = 1e-3
    out = np.maximum(1, np.round(rng.lognormal(np.log(800), 0.6, n))).astype(np.int64)
    lam = 0.75 / (out.mean() * tick)
    tr = Trace(poisson(n, lam, rng), np.ones(n, np.int64), out)
    res, sm = Resources(num_slots=1, num_pages=200_000), StepModel(a=tick)
    rows = {}
    for pol, f in (("fcfs", mg1_fcfs_mean_response), ("srpt-oracle", mg1_srpt_mean_response)):
        sim = float(simulate(tr, pol, sm, res).e2e.mean())
        th = f(lam, out * tick)
        rows[pol] = {"sim_mean_s": sim, "theory_mean_s": th, "rel_error": abs(sim / th - 1)}
    return {"requests": n, "load": 0.75, "sizes": "lognormal(median 800 tokens, sigma 0.6), 1 ms/token",
            **rows}


# --- routing -------------------------------------------------------------------------------------------
# Replicas as in the serving benchmark: 8 slots, 256 KV pages of 16 tokens (memory matters), the step
# model fitted on the GPU engine (benchmarks/results/serving.json), ShareGPT lengths (prompts of at most
# 1024 tokens, answers capped at 512 like the probe's training), a TRAIL-like length predictor.
ROUTING_STEP_MODEL = "0.004975,0.00017,0"  # a, b, c (s): GPU fit of serving.json's run
ROUTERS = ("round-robin", "least-requests", "power-of-two", "token-aware (sum of tokens)", "token-aware")


def predictor_mae(pred: ProbeLikePredictor, out: np.ndarray, n: int, rng) -> dict[str, float]:
    """The probe benchmark's metrics on this predictor: MAE of the remaining-length estimate over every
    generated token (refined; prompt-only = the prefill estimate counted down; mean = the mean length
    counted down), and at prefill only."""
    from jtrail.serving.sequence import SamplingParams, Sequence

    lens, mu, k = rng.choice(out, n), float(out.mean()), pred.refine_every
    err = {"refined": [], "prompt_only": [], "mean": [], "prefill": [], "mean_prefill": []}
    for i, n_out in enumerate(lens):
        s = Sequence(f"mae{i}", [0], SamplingParams(max_tokens=int(n_out), ignore_eos=True), 0.0)
        s.oracle_remaining_at_start = int(n_out)
        pred.sim_prefill(s)
        p0, est = float(s.predicted_remaining), []
        for g in range(n_out):
            if g and g % k == 0:
                pred.sim_refine(s, k)
            est.append(s.predicted_remaining if g % k == 0 else max(est[-1] - 1.0, 0.0))
            s.output_ids.append(0)
        j = np.arange(n_out)
        true = n_out - j
        err["refined"].append(np.abs(np.array(est) - true))
        err["prompt_only"].append(np.abs(np.clip(p0 - j, 0, None) - true))
        err["mean"].append(np.abs(np.clip(mu - j, 0, None) - true))
        err["prefill"].append([abs(p0 - n_out)])
        err["mean_prefill"].append([abs(mu - n_out)])
    return {f"{k}_mae": float(np.concatenate(v).mean()) for k, v in err.items()}


def routing_lengths(n: int, rng, max_prompt: int = 1024,
                    max_output: int = 512) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        from jtrail import datasets

        prm = np.asarray(datasets.sharegpt_prompt_lengths(), dtype=np.int64)
        out = np.asarray(datasets.sharegpt_output_lengths(), dtype=np.int64)
        src = f"sharegpt (prompts <= {max_prompt} tokens, answers capped at {max_output})"
    except (ImportError, AttributeError, OSError):
        out = np.round(rng.lognormal(np.log(180), 1.0, 50_000)).astype(np.int64)
        prm = np.round(rng.lognormal(np.log(60), 1.2, 50_000)).astype(np.int64)
        src = "lognormal stand-in (datasets unavailable)"
    keep = (prm >= 1) & (prm <= max_prompt)
    prm, out = prm[keep], np.clip(out[keep], 1, max_output)
    idx = rng.integers(0, len(out), n)
    return prm[idx], out[idx], src


def _router(name: str, slots: int):
    if name == "token-aware (sum of tokens)":  # the earlier rule: a free slot, then least outstanding tokens
        return make_router("token-aware", page_size=16, num_slots=slots, forecast=False)
    return make_router(name, **({"seed": 0} if name == "power-of-two" else {}))


def bench_routing(n: int, sm: StepModel, seed: int, replicas: int = 8, load: float = 0.9,
                  policies: tuple[str, ...] = ("fcfs", "trail"), trail_requests: int | None = None) -> dict:
    rng = np.random.default_rng(seed)
    slots = 8
    res = Resources(num_slots=slots, num_pages=256, page_size=16)
    prm, out, src = routing_lengths(n, rng)
    cap = capacity_rps(sm, res, prm, out)  # per replica, fcfs, saturated
    rate = load * replicas * cap
    tr = Trace(poisson(n, rate, rng), prm, out)
    pred_kw = {"sigma0": 1.7, "sigma": 0.55, "refine_every": 16, "seed": seed}
    policy_kw = {"fcfs": None, "trail": {"aging": 0.0}}  # trail as `jtrail serve` runs it (aging default 0)
    doc: dict = {
        "replicas": replicas, "slots": slots, "pages": 256, "page_size": 16, "load": load,
        "capacity_req_s_per_replica": cap, "rate_req_s": rate, "requests": n, "lengths": src,
        "mean_prompt": float(prm.mean()), "mean_output": float(out.mean()),
        "step_model": {"a": sm.a, "b": sm.b, "c": sm.c},
        "predictor": {"kind": "ProbeLikePredictor (synthetic TRAIL probe)", **pred_kw,
                      **predictor_mae(ProbeLikePredictor(**pred_kw), out, 300, np.random.default_rng(seed))},
        "seed": seed,
        "seed_note": "the rule was designed on seeds 1-4 (exploratory runs, same replicas, lengths and "
                     "predictor; then this function on seeds 1-2); seed 11 (the default) was held out",
        "policies": {}}
    for pol in policies:
        k = n if pol == "fcfs" or trail_requests is None else min(n, trail_requests)
        sub = Trace(tr.arrival[:k], tr.prompt_len[:k], tr.output_len[:k])
        rows = {}
        for name in ROUTERS:
            r = simulate(sub, pol, sm, res, router=_router(name, slots), num_replicas=replicas,
                                predictor=ProbeLikePredictor(**pred_kw), policy_kwargs=policy_kw.get(pol))
            s = r.summary()
            rows[name] = {key: s[key] for key in ("mean_e2e", "p50_e2e", "p99_e2e", "mean_ttft",
                                                  "preemptions_per_request")}
            q = k // 4  # > 1: later arrivals wait longer (the queue grows: past capacity)
            rows[name]["late_over_early_mean_e2e"] = float(r.e2e[3 * q:].mean() / r.e2e[q:2 * q].mean())
            rows[name]["wall_s"] = r.wall_seconds
            print(f"  routing {pol:5s} {name:28s} mean E2E {s['mean_e2e']:.4f} s  ({r.wall_seconds:.1f} s)",
                  flush=True)
        ta = rows["token-aware"]["mean_e2e"]
        doc["policies"][pol] = {
            "requests": k, "table": rows,
            "rr_over_token_aware_mean_e2e": rows["round-robin"]["mean_e2e"] / ta,
            "least_requests_over_token_aware_mean_e2e": rows["least-requests"]["mean_e2e"] / ta,
            "power_of_two_over_token_aware_mean_e2e": rows["power-of-two"]["mean_e2e"] / ta,
            "token_sum_over_token_aware_mean_e2e": rows["token-aware (sum of tokens)"]["mean_e2e"] / ta}
    main = doc["policies"][policies[0]]
    doc["policy"] = policies[0]
    doc["rr_over_token_aware_mean_e2e"] = main["rr_over_token_aware_mean_e2e"]
    doc["least_requests_over_token_aware_mean_e2e"] = main["least_requests_over_token_aware_mean_e2e"]
    return doc


def slot_trace(n: int, slots: int, load: float, rng) -> tuple[Trace, StepModel]:
    """The slot model: every step takes 1 time unit and yields one token per busy slot."""
    prm, out, _ = lengths(n, rng)
    return Trace(poisson(n, load * slots / out.mean(), rng), prm, out), StepModel(a=1.0)


def bench_policies(n: int, rng, slots: int = 8) -> dict:
    tr, sm = slot_trace(n, slots, 0.95, rng)
    res = Resources(num_slots=slots, num_pages=10**7, page_size=16)
    probe = SyntheticProbe(TrailPredictor(EDGES, refine_every=16), sigma=0.6, seed=1)
    noisy = NoisyOraclePredictor(sigma=0.6, refine_every=16, seed=1)
    runs = {
        "fcfs": ("fcfs", None, None),
        "trail (oracle)": ("trail", None, None),
        "trail (noisy x exp(0.6 z))": ("trail", None, noisy),
        "trail (synthetic probe)": ("trail", None, probe),
        "srpt-oracle": ("srpt-oracle", None, None),
        "gittins (synthetic probe)": ("gittins", {"bin_edges": EDGES}, probe),
    }
    rows = {}
    for label, (pol, kw, pred) in runs.items():
        r = simulate(tr, pol, sm, res, predictor=pred, policy_kwargs=kw)
        s = r.summary()
        keys = ("mean_e2e", "p50_e2e", "p99_e2e", "mean_ttft", "preemptions_per_request")
        rows[label] = {k: s[k] for k in keys}
    base = rows["fcfs"]
    for row in rows.values():
        row["fcfs_over_mean_e2e"] = base["mean_e2e"] / row["mean_e2e"]
        row["p99_over_fcfs_p99"] = row["p99_e2e"] / base["p99_e2e"]
    return {"slots": slots, "load": 0.95, "requests": n, "time_unit": "one step", "table": rows}


def bench_aging(n: int, rng, slots: int = 8, rates=(0.0, 0.01, 0.03, 0.1, 0.3, 1.0)) -> dict:
    tr, sm = slot_trace(n, slots, 0.95, rng)
    res = Resources(num_slots=slots, num_pages=10**7, page_size=16)
    fc = simulate(tr, "fcfs", sm, res).summary()
    rows = []
    for a in rates:
        s = simulate(tr, "trail", sm, res, policy_kwargs={"aging": a}, max_jump_steps=16).summary()
        rows.append({"aging_tokens_per_step": a, "mean_gain_vs_fcfs": fc["mean_e2e"] / s["mean_e2e"],
                     "p99_over_fcfs_p99": s["p99_e2e"] / fc["p99_e2e"]})
    ok = [r for r in rows if r["p99_over_fcfs_p99"] <= 2.0 and r["mean_gain_vs_fcfs"] >= 1.4]
    pick = min(ok, key=lambda r: r["aging_tokens_per_step"]) if ok else None
    return {"slots": slots, "load": 0.95, "requests": n, "sweep": rows,
            "default": pick and pick["aging_tokens_per_step"]}


def print_routing(r: dict) -> None:
    for pol, p in r.get("policies", {}).items():
        print(f"routing ({r['replicas']} replicas x {r['slots']} slots, {r['load']:.0%} load, {pol}, seed "
              f"{r['seed']}): mean E2E rr/token-aware {p['rr_over_token_aware_mean_e2e']:.3f}, "
              f"least-requests/token-aware {p['least_requests_over_token_aware_mean_e2e']:.3f}, "
              f"power-of-two/token-aware {p['power_of_two_over_token_aware_mean_e2e']:.3f}, "
              f"token-sum/token-aware {p['token_sum_over_token_aware_mean_e2e']:.3f}")


def _bars(res: dict, quick: bool) -> dict:
    theory_keys = ("fcfs", "srpt-oracle")

    def get(section: str, fn):
        return fn(res[section]) if section in res else None

    return {"sim_seconds_1m_requests": None if quick else get("speed", lambda r: r["wall_s"]),
            "sim_vs_theory_error": get("theory", lambda r: max(r[p]["rel_error"] for p in theory_keys)),
            "rr_over_token_aware_mean_e2e_sim8": get("routing", lambda r: r["rr_over_token_aware_mean_e2e"]),
            "least_requests_over_token_aware_mean_e2e_sim8":
                get("routing", lambda r: r["least_requests_over_token_aware_mean_e2e"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--step-model", default="0.008,2e-5,5e-9",
                    help="a,b,c in seconds (default: a documented guess, until a GPU fit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sections", default="", help="comma list of speed,theory,routing,policies,aging")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--speed-load", type=float, default=0.5, help="load of the 1M-request speed run")
    ap.add_argument("--routing-requests", type=int, default=20_000, help="fcfs routing trace")
    ap.add_argument("--routing-trail-requests", type=int, default=10_000,
                    help="the trail runs use the first N requests of the same trace")
    ap.add_argument("--routing-policies", default="fcfs,trail", help="engine policies of the replicas")
    ap.add_argument("--routing-seed", type=int, default=11,
                    help="routing trace seed (the rule was designed on seeds 1-4; 11 is held out)")
    ap.add_argument("--routing-step-model", default=ROUTING_STEP_MODEL,
                    help="a,b,c of the routing section (default: the GPU fit of serving.json)")
    ap.add_argument("--policy-requests", type=int, default=100_000)
    ap.add_argument("--aging-requests", type=int, default=50_000)
    args = ap.parse_args()
    sm = StepModel(*(float(x) for x in args.step_model.split(",")))
    q = args.quick
    rng = np.random.default_rng(args.seed)
    sections = {"speed": lambda: bench_speed(50_000 if q else 1_000_000, sm, rng, args.speed_load),
                "theory": lambda: bench_theory(20_000 if q else 200_000, rng),
                "routing": lambda: bench_routing(
                    4_000 if q else args.routing_requests,
                    StepModel(*(float(x) for x in args.routing_step_model.split(","))), args.routing_seed,
                    policies=tuple(args.routing_policies.split(",")),
                    trail_requests=2_000 if q else args.routing_trail_requests),
                "policies": lambda: bench_policies(10_000 if q else args.policy_requests, rng),
                "aging": lambda: bench_aging(5_000 if q else args.aging_requests, rng)}
    wanted = args.sections.split(",") if args.sections else list(sections)
    out_path = Path(args.out)
    # Sections not run now keep their earlier results (sections can run in separate processes).
    earlier = json.loads(out_path.read_text()) if out_path.exists() else {}
    res = {k: v for k, v in earlier.items() if k in sections and k not in wanted}
    for name in wanted:  # one at a time, with progress: the full run takes minutes
        t0 = time.perf_counter()
        res[name] = sections[name]()
        # the top-level command is the latest run's: each section keeps the one that produced it
        res[name]["command"] = " ".join([Path(sys.executable).name, *sys.argv])
        res[name]["section_wall_s"] = time.perf_counter() - t0
        print(f"[{name}] done in {time.perf_counter() - t0:.1f} s", flush=True)
        if name == "routing":
            print_routing(res[name])
    missing = [k for k in sections if k not in res]  # written anyway; run them later with --sections
    commit = git_commit()
    doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": "cpu (1 core, simulator)",
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "git_commit": commit,
           "step_model": {"a": sm.a, "b": sm.b, "c": sm.c}, **res,
           "missing_sections": missing, "bars": _bars(res, q)}
    # keys added to the file by hand (notes, earlier commands, kept runs) stay
    doc.update({k: v for k, v in earlier.items() if k not in doc and k not in sections})
    if wanted != list(sections) and isinstance(earlier.get("commands"), dict):
        doc["commands"] = {**earlier["commands"], ", ".join(wanted): doc["command"]}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2))
    if missing:
        print(f"not run yet: {missing}; wrote {out_path}")
        return
    print(f"1M-request sim: {res['speed']['wall_s']:.1f} s ({res['speed']['us_per_request']:.0f} us/request)")
    for p in ("fcfs", "srpt-oracle"):
        t = res["theory"][p]
        print(f"theory {p:12s} sim {t['sim_mean_s']:.4f} s  theory {t['theory_mean_s']:.4f} s  "
              f"error {100 * t['rel_error']:.2f}%")
    print_routing(res["routing"])
    hdr = ("mean", "p99", "ttft")
    print(f"{'policy (slot model, 95%)':30s} " + " ".join(f"{h:>9s}" for h in hdr) + "   gain p99/fcfs")
    for k, r in res["policies"]["table"].items():
        print(f"{k:30s} {r['mean_e2e']:9.1f} {r['p99_e2e']:9.1f} {r['mean_ttft']:9.1f} "
              f"{r['fcfs_over_mean_e2e']:6.2f} {r['p99_over_fcfs_p99']:8.2f}")
    for r in res["aging"]["sweep"]:
        print(f"aging {r['aging_tokens_per_step']:<6g} mean gain {r['mean_gain_vs_fcfs']:.2f}  "
              f"p99/fcfs {r['p99_over_fcfs_p99']:.2f}")
    print(f"default aging: {res['aging']['default']}  -> {out_path}")


if __name__ == "__main__":
    main()
