"""Serving benchmark: every scheduling policy on the same trace, real engine, real prompts.

    python benchmarks/serving.py --workload replay --replay REPLAY.npz --split bench --probe replay
    python benchmarks/serving.py [--model GGUF] [--probe DIR] [--prompts sharegpt|mtbench|FILE.jsonl]

Replay (the headline): requests from a held-out split of recorded ShareGPT conversations, each carrying
its recorded answer (the engine emits exactly it), in three regimes (R1 stable, R2 overload, R3
memory-bound; benchmarks/regimes.py), every policy on the same trace; see serving_regimes.py.
Natural (the older sweep):

1. Profile: greedy natural-EOS answers (capped at --max-output) give each prompt its output length.
2. Capacity: all requests at t=0 (forced lengths, fcfs) -> max request rate with --slots / --pages.
3. Sweep: for each rate (fractions of capacity) one seeded Poisson trace; every policy runs it on a
   fresh engine (forced lengths: identical work); aging variants of `trail` at the top rate.
4. Simulator: step-time model fitted from the engine's measured steps, same trace, recorded probe
   outputs -> sim vs engine mean E2E error.
Writes benchmarks/results/serving.json (+ 2 PNGs), copies them to $OUT when set, prints Markdown.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jtrail.serving.brain.capacity import pauses  # noqa: E402
from jtrail.serving.brain.predictor import RecordingPredictor  # noqa: E402
from jtrail.serving.engine.model_runner import TRACE_COUNTS  # noqa: E402
from loadgen import Workload, arrival_times, drive_engine, load_prompt_ids  # noqa: E402
from metrics_summary import summarize  # noqa: E402
from serving_report import analyse, write_outputs  # noqa: E402
from serving_sim import fit_step_model, sim_errors, simulate_policies  # noqa: E402


@dataclass
class Setup:
    model: Any
    tokenizer: Any
    probe: Any
    refiner: Any  # TrailPredictor
    eos: tuple[int, ...]
    args: argparse.Namespace
    warm_prompts: list[list[int]] = field(default_factory=list)  # token source for engine warm-ups


def log(msg: str, t0: float = time.perf_counter()) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


def load(args: argparse.Namespace) -> Setup:
    import jax
    import jax.numpy as jnp
    from jtrail.models.loader import load_model
    from jtrail.models.probe_io import load_probe, resolve_probe_path
    from jtrail.serving.brain.predictor import TrailPredictor

    auto = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    dtype = args.dtype if args.dtype != "auto" else auto
    loaded = load_model(args.model, dtype=jnp.dtype(dtype), progress=False)
    probe_dir = resolve_probe_path(args.probe)
    head, pcfg, _ = load_probe(probe_dir)
    if pcfg.d_model != loaded.cfg.d_model:
        raise SystemExit(f"probe d_model {pcfg.d_model} != model d_model {loaded.cfg.d_model}")
    eos = tuple(dict.fromkeys([*loaded.cfg.eos_ids, *getattr(loaded.tokenizer, "eos_ids", ())]))
    args.dtype_used, args.probe_used = dtype, str(probe_dir)
    refiner = TrailPredictor(pcfg.bin_edges, pcfg.midpoints)
    return Setup(loaded.model, loaded.tokenizer, head, refiner, eos, args)


def make_engine(su: Setup, policy: str, kw: dict, predictor: Any = None, slots: int | None = None,
                pages: int | None = None) -> Any:
    """A fresh engine, warmed up: every prefill shape and the decode step have run on it before
    anything is timed (`jtrail.warmup.warm_up`, as `jtrail serve` does). Without
    this a run met multi-second stalls in its first steps and a compile of the largest bucket
    mid-trace (measured: 5 s in one run), and at 95% load a stall's backlog takes the rest of the
    trace to drain."""
    from jtrail.serving.brain.scheduler.registry import make_policy
    from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine

    from jtrail.warmup import warm_up

    a = su.args
    cfg = EngineConfig(num_slots=slots or a.slots, page_size=a.page_size, num_pages=pages or a.pages,
                       max_model_len=a.max_model_len,
                       decode_steps_per_call=a.decode_steps, policy=make_policy(policy, **kw), seed=a.seed)
    eng = LLMEngine(su.model, su.tokenizer, cfg, probe=su.probe, predictor=predictor or su.refiner)
    # the server's own warm-up: every packed prefill shape the slots can reach and the decode step
    # (a warm-up of one prompt per bucket missed packed shapes: compiles mid-run, seconds each)
    warm_up(eng, report=lambda _msg: None)
    if isinstance(predictor, RecordingPredictor):
        predictor.rows.clear()
        predictor.predictions.clear()
    return eng


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
    aged = {f"trail-aging-{r:.4g}": ("trail", {"aging": r}) for r in aging_rates}
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
    import json
    import os

    if os.environ.get("OUT"):
        rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]
        Path(os.environ["OUT"], "serving_partial.json").write_text(json.dumps(rows, indent=1, default=float))


def save_raw(su: Setup, lengths: np.ndarray, cap: dict, sw: dict[str, Any]) -> None:
    """Everything needed to re-run the simulator offline on this trace (serving_raw.npz, written to
    --raw-dir and $OUT, never into the source tree by default): the top-rate trace, per-run per-request
    outcomes and step records, the probe records."""
    import os

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


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=("replay", "natural"), default="natural",
                   help="replay: recorded answers (teacher-forced), regimes R1-R3; natural: profiled lengths")
    p.add_argument("--replay", default=None, help="replay set (.npz from `python -m jtrail.replay`)")
    p.add_argument("--split", default="bench", help="replay split the trace comes from (never the probe's)")
    p.add_argument("--regimes", default="R1,R2,R3")
    p.add_argument("--sim-regimes", default="R1,R2", help="regimes re-run in the simulator")
    p.add_argument("--max-answer-tokens", type=int, default=0,
                   help="cut replayed answers to this many tokens (0: as recorded; for CPU smoke runs)")
    p.add_argument("--regime-slots", type=int, default=0,
                   help="override every regime's slot count (0: as defined; for CPU smoke runs)")
    p.add_argument("--regime-requests", default="0",
                   help="requests per regime trace: N, or per regime R1=N,R3=M (0: the regime's default)")
    p.add_argument("--alternate-order", action="store_true",
                   help="replay: run the policies in reverse order in every other regime")
    p.add_argument("--capacity", default="",
                   help="per regime R2=REQ_S: reuse a capacity measured by an earlier run (default: measure)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge serving.json files of runs of different regimes into --out, and exit")
    p.add_argument("--model", default=None, help="GGUF / HF dir / named shape; default: embedded SmolLM2")
    p.add_argument("--probe", default=None, help="probe directory or shipped name (default, replay)")
    p.add_argument("--prompts", default="sharegpt", help="sharegpt, mtbench or a JSONL file")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--pages", type=int, default=384, help="KV pages (limited so memory matters)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=1)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--max-output", type=int, default=512, help="cap of the profiled (forced) lengths")
    p.add_argument("--pool", type=int, default=384, help="prompts profiled")
    p.add_argument("--capacity-requests", type=int, default=128)
    p.add_argument("--rates", default="0.5,0.8,0.95", help="fractions of measured capacity")
    p.add_argument("--policies", default="fcfs,trail,srpt-oracle,gittins")
    p.add_argument("--aging", default="0.03,0.1,0.3,1", help="trail aging rates, x per-request tok/s")
    p.add_argument("--deadline-s", type=float, default=420.0,
                   help="wall budget of the whole run: the sweep sizes its traces to fit")
    p.add_argument("--min-requests", type=int, default=60)
    p.add_argument("--max-requests", type=int, default=600)
    p.add_argument("--low-requests", type=int, default=0,
                   help="requests per trace below the top rate (0: sized like the top rate's)")
    p.add_argument("--run-timeout", type=float, default=120.0)
    p.add_argument("--cv", type=float, default=1.0, help="arrival-gap CV (1 = Poisson)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--raw-dir", default=str(Path.home() / ".cache" / "jtrail" / "benchmarks"),
                   help="where serving_raw.npz (per-request and per-step raw measurements, MBs) goes; "
                        "outside the source tree by default")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = parse(argv)
    args.command = "python benchmarks/serving.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.max_model_len = args.max_prompt_tokens + args.max_output + args.page_size
    if args.merge:
        import json

        from serving_regimes import merge_docs, write_doc

        write_doc(merge_docs([json.loads(Path(p).read_text()) for p in args.merge]), Path(args.out))
        return 0
    su = load(args)
    log(f"model loaded ({args.dtype_used}); probe {args.probe_used}")
    if args.workload == "replay":
        return run_replay_workload(su, args)
    prompts = load_prompt_ids(args.prompts, su.tokenizer, args.pool, args.max_prompt_tokens, args.seed)
    log(f"{len(prompts)} prompts loaded; profiling natural-EOS lengths")
    t = time.perf_counter()
    lengths = profile_lengths(su, prompts)
    log(f"profiled {len(prompts)} prompts in {time.perf_counter() - t:.1f}s: output mean "
        f"{lengths.mean():.0f}, p50 {np.median(lengths):.0f}, max {lengths.max()} tokens")
    su.warm_prompts = prompts[:32]
    cap = measure_capacity(su, prompts, lengths)
    log(f"capacity {cap['capacity_req_s']:.2f} req/s ({cap['tokens_per_s']:.0f} tok/s, full-batch step "
        f"{cap['full_batch_step_s'] * 1e3:.2f} ms)")
    budget = args.deadline_s - (time.perf_counter() - t_start) - 20.0  # 20 s: simulator, plots
    log(f"sweep budget {budget:.0f}s")
    sw = sweep(su, prompts, lengths, cap, max(budget, 30.0))
    save_raw(su, lengths, cap, sw)
    sim = run_sim(su, sw)
    log(f"step model {sim['step_model']}; sim errors {sim.get('errors')}")
    result = analyse(args, lengths, cap, sw, sim)
    write_outputs(args, result)
    return 0


def run_replay_workload(su: Setup, args: argparse.Namespace) -> int:
    import json

    from serving_regimes import Pool, run_replay

    if not args.replay:
        raise SystemExit("--workload replay needs --replay PATH (from: python -m jtrail.replay --out PATH)")
    pool = Pool(args.replay, args.split, args.max_model_len, args.seed, args.max_answer_tokens)
    su.warm_prompts = pool.prompts[:32]
    edges, mids = list(su.refiner.bin_edges), [float(m) for m in su.refiner.midpoints]
    # trail's defaults (c = 0, aging 100 tok/s, chosen on the simulator: results/tune_preemption.json),
    # and trail without aging beside it; gittins and the oracle at c = 0 without aging, so the oracle is
    # pure SRPT on true lengths (the mean's lower reference)
    specs = {"fcfs": ("fcfs", {}), "trail": ("trail", {}), "trail-no-aging": ("trail", {"aging": 0.0}),
             "gittins": ("gittins", {"bin_edges": edges, "midpoints": mids, "c": 0.0}),
             "srpt-oracle": ("srpt-oracle", {"c": 0.0})}
    specs = {k: v for k, v in specs.items() if k in args.policies.split(",")}
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
    run_replay(make, pool, args, su.refiner, specs, history, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
