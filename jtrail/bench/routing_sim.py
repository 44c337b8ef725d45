"""Routing over simulated replicas (`benchmarks/routing_sim_replay.py`, `benchmarks/routing_resim.py`):
one seed's replay-workload trace through every router (mean / p99 E2E and TTFT, ratios to
token-aware, the zero-wait ceiling), the `*_sim8` bars written into routing.json beside the
real-replica runs, and routers over a recorded GPU run's trace (`resim_rows`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from jtrail.bench.routing_report import carry_over
from jtrail.bench.sim_workloads import capacity_rps, poisson
from jtrail.serving.brain.predictor import (
    OraclePredictor,
    ProbeLikePredictor,
    RecordedPredictor,
    TrailPredictor,
)
from jtrail.serving.brain.router import make_router
from jtrail.serving.simulation.predictor_mae import predictor_mae
from jtrail.serving.simulation.simulator import Resources, Trace, simulate
from jtrail.serving.simulation.step_model import StepModel


def replay_lengths(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    from jtrail.replay import ReplaySet

    rs = ReplaySet.load(path).subset(split)
    return rs.prompt_lengths(), rs.answer_lengths()


def run_seed(seed: int, prm0: np.ndarray, out0: np.ndarray, a: argparse.Namespace, sm: StepModel,
             res: Resources, routers: list[str], router_kw: dict, edges: tuple[float, ...]) -> dict:
    """Every router on one seed's trace (lengths drawn from prm0/out0, Poisson at a.load x capacity),
    replicas' estimates from a `ProbeLikePredictor` over the probe's bin `edges`."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(out0), a.requests)
    prm, out = prm0[idx], out0[idx]
    cap = capacity_rps(sm, res, prm, out)  # per replica, fcfs, saturated
    rate = a.load * a.replicas * cap
    max_tokens = int(out0.max())  # the client's cap, not each request's true length
    tr = Trace(poisson(a.requests, rate, rng), prm, out, max_tokens=np.full(a.requests, max_tokens))
    pred_kw = {"sigma0": a.sigma0, "sigma": a.sigma, "refine_every": 16, "seed": seed,
               "max_tokens": max_tokens, "edges": edges}
    rows = {}
    for name in routers:
        kw = dict(router_kw.get(name, {}))
        if name == "power-of-two":
            kw.setdefault("seed", seed)
        t0 = time.perf_counter()
        r = simulate(tr, a.policy, sm, res, router=make_router(name, **kw), router_poll_s=a.poll_s,
                     num_replicas=a.replicas, predictor=ProbeLikePredictor(**pred_kw),
                     router_sees_estimate=a.router_sees_estimate)
        s = r.summary()
        rows[name] = {k: s[k] for k in ("mean_e2e", "p50_e2e", "p99_e2e", "mean_ttft", "p99_ttft",
                                        "preemptions_per_request")}
        q = a.requests // 4  # > 1: later arrivals wait longer (past capacity)
        rows[name]["late_over_early_mean_e2e"] = float(r.e2e[3 * q:].mean() / r.e2e[q:2 * q].mean())
        rows[name]["finished"] = int(np.isfinite(r.e2e).sum())
        # the part of E2E no router shortens much: a request's own decode (and prefill) time once it runs
        rows[name]["mean_e2e_minus_ttft"] = float(np.nanmean(r.e2e - r.ttft))
        print(f"  seed {seed} {name:15s} mean E2E {s['mean_e2e']:.3f} s  p99 {s['p99_e2e']:.3f} s  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    ta = rows["token-aware"]
    ratios = {}
    for name, key in (("round-robin", "rr"), ("least-requests", "least_requests"),
                      ("power-of-two", "power_of_two")):
        if name in rows:
            ratios[f"{key}_over_token_aware_mean_e2e"] = rows[name]["mean_e2e"] / ta["mean_e2e"]
            ratios[f"{key}_over_token_aware_p99_e2e"] = rows[name]["p99_e2e"] / ta["p99_e2e"]
    # Ceiling of any router's gain over X: X's mean E2E / the least mean (E2E - TTFT) seen, i.e. what
    # token-aware would reach if it removed every wait for a slot and kept the best decode time.
    floor = min(row["mean_e2e_minus_ttft"] for row in rows.values())
    ceilings = {f"{key}_over_zero_wait_bound": rows[name]["mean_e2e"] / floor
                for name, key in (("round-robin", "rr"), ("least-requests", "least_requests"))
                if name in rows}
    return {"seed": seed, "rate_req_s": rate, "ceilings": ceilings, "capacity_req_s_per_replica": cap,
            "mean_prompt": float(prm.mean()), "mean_output": float(out.mean()),
            "predictor_mae": predictor_mae(ProbeLikePredictor(**pred_kw), out, 300,
                                           np.random.default_rng(seed)),
            "table": rows, "ratios": ratios}


def record_bars(path: Path, doc: dict, run: dict) -> None:
    """The `*_sim8` bars (held-out seed) into routing.json, the file keeping the rest: a real-replica run
    at its top level moves to `history` (benchmarks/routing.py puts the next one there in turn)."""
    r, c = run["ratios"], run["ceilings"]
    bars = {"rr_over_token_aware_mean_e2e_sim8": r["rr_over_token_aware_mean_e2e"],
            "rr_over_token_aware_p99_e2e_sim8": r["rr_over_token_aware_p99_e2e"],
            "least_requests_over_token_aware_mean_e2e_sim8": r["least_requests_over_token_aware_mean_e2e"],
            "least_requests_over_token_aware_p99_e2e_sim8": r["least_requests_over_token_aware_p99_e2e"],
            "power_of_two_over_token_aware_mean_e2e_sim8": r["power_of_two_over_token_aware_mean_e2e"],
            "rr_sim8_met": r["rr_over_token_aware_mean_e2e"] >= 1.2,
            "least_requests_sim8_met": r["least_requests_over_token_aware_mean_e2e"] >= 1.05,
            "rr_over_zero_wait_bound_sim8": c["rr_over_zero_wait_bound"],
            "least_requests_over_zero_wait_bound_sim8": c["least_requests_over_zero_wait_bound"]}
    sim = {"source": "benchmarks/results/routing_sim8_replay.json", "seed": run["seed"],
           "table": run["table"], "ratios": r, "ceilings": c,
           **{k: doc[k] for k in ("command", "date", "git_commit", "config", "lengths", "probe")}}
    earlier = json.loads(path.read_text()) if path.exists() else {}
    top = {k: doc[k] for k in ("command", "device", "date", "git_commit")}
    top["bars"] = bars
    out = carry_over(earlier, top)
    out["bars"] = {**out["bars"], **bars}
    out["sim8_replay"] = sim
    path.write_text(json.dumps(out, indent=2))


RESIM_ROUTERS = ("round-robin", "least-requests", "token-aware")


def resim_rows(raw: dict, refiner: TrailPredictor, sm: StepModel, capacity: float,
               a: argparse.Namespace) -> list[dict]:
    """Routers over fcfs replicas on a recorded run's trace (`serving_sweep.load_raw`): requests drawn
    from it per seed, Poisson at each of a.loads x capacity, the recorded probe outputs (or exact
    lengths) as the replicas' estimates, with and without the prompt estimate at arrival."""
    wl = raw["workload"]
    ids0, out0 = list(wl.request_ids), np.asarray(wl.output_len)
    plen0 = np.array([len(x) for x in wl.prompts])
    rows = []
    for load in (float(x) for x in a.loads.split(",")):
        for at_arrival in (False, True):
            for seed in range(a.seeds):
                rng = np.random.default_rng(seed)
                pick = rng.integers(0, len(ids0), a.requests)
                ids = [f"{ids0[i]}#{j}" for j, i in enumerate(pick)]
                recs = {rid: raw["records"][ids0[i]] for rid, i in zip(ids, pick, strict=True)}
                arrival = np.cumsum(rng.exponential(1 / (load * capacity), a.requests))
                tr = Trace(arrival, plen0[pick], out0[pick], request_ids=ids,
                           max_tokens=np.full(a.requests, int(out0.max())))
                e2e = {}
                for name in RESIM_ROUTERS:
                    kw = {"page_size": a.page_size} if name == "token-aware" else {}
                    # token-aware sees each replica's slot forecast, as from a real server
                    res = simulate(tr, "fcfs", sm, Resources(a.slots, a.pages, a.page_size),
                                   router=make_router(name, **kw), router_poll_s=a.poll_s,
                                   num_replicas=a.replicas,
                                   predictor=RecordedPredictor(refiner, recs)
                                   if a.predictor == "recorded" else OraclePredictor(),
                                   predict_at_arrival=at_arrival)
                    e2e[name] = float(res.e2e.mean())
                rows.append({"load": load, "predict_at_arrival": at_arrival, "seed": seed, "mean_e2e": e2e,
                             "rr_over_token_aware": e2e["round-robin"] / e2e["token-aware"],
                             "least_requests_over_token_aware": e2e["least-requests"] / e2e["token-aware"]})
                r = rows[-1]
                print(f"load {load:.2f} predict_at_arrival={at_arrival!s:5} seed {seed}: rr/ta "
                      f"{r['rr_over_token_aware']:.3f} lr/ta {r['least_requests_over_token_aware']:.3f}")
    return rows


def print_tables(runs: list[dict], a: argparse.Namespace) -> None:
    """Each seed's routers in Markdown, with ratios to token-aware."""
    for r in runs:
        print(f"\n| router (seed {r['seed']}, {a.replicas} x {a.policy}, {a.load:.0%} load) | mean E2E "
              "| p99 E2E | mean TTFT | p99 TTFT | mean E2E / token-aware | p99 / token-aware |")
        print("|---|---|---|---|---|---|---|")
        ta = r["table"]["token-aware"]
        for name, row in r["table"].items():
            print(f"| {name} | {row['mean_e2e']:.3f} | {row['p99_e2e']:.3f} | {row['mean_ttft']:.3f} | "
                  f"{row['p99_ttft']:.3f} | {row['mean_e2e'] / ta['mean_e2e']:.3f} | "
                  f"{row['p99_e2e'] / ta['p99_e2e']:.3f} |")
