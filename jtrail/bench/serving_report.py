"""Tables, bars, plots and the JSON file of the serving benchmark's natural-length sweep
(benchmarks/serving.py)."""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from jtrail.bench.metrics import cdf_points, ratio
from jtrail.provenance import git_commit

MAX_P99_RATIO, MIN_MEAN_GAIN = 2.0, 1.4  # the aging default must keep both (issue 7)


def device_label() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '?')} (jax {jax.__version__})"


def aging_tradeoff(top: dict[str, dict]) -> tuple[list[dict], str | None]:
    """(points, default label): mean gain over fcfs vs p99 ratio to fcfs for trail at each aging rate;
    the default is the best mean gain among points with p99 <= 2x fcfs and mean gain >= 1.4x."""
    f = top.get("fcfs")
    if f is None:
        return [], None
    pts = []
    for label, r in top.items():
        if r["name"] == "trail":
            pts.append({"policy": label, "aging": r["aging"],
                        "mean_gain": ratio(f["mean_e2e"], r["mean_e2e"]),
                        "p99_ratio": ratio(r["p99_e2e"], f["p99_e2e"])})
    pts.sort(key=lambda p: p["aging"])
    ok = [p for p in pts if p["p99_ratio"] <= MAX_P99_RATIO and p["mean_gain"] >= MIN_MEAN_GAIN]
    return pts, (max(ok, key=lambda p: p["mean_gain"])["policy"] if ok else None)


def _simulate_json(out_dir: Path) -> dict[str, Any]:
    p = out_dir / "simulate.json"
    try:
        return json.loads(p.read_text()).get("bars", {}) if p.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def analyse(args: Any, lengths: np.ndarray, cap: dict, sw: dict, sim: dict) -> dict[str, Any]:
    runs = sw["runs"]
    top_frac = max(r["rate_frac"] for r in runs)
    top = {r["policy"]: r for r in runs if r["rate_frac"] == top_frac}
    g = lambda p, k: top[p][k] if p in top else float("nan")
    pts, default = aging_tradeoff(top)
    errs = sim.get("errors") or {}
    simj = _simulate_json(Path(args.out))
    bars = {
        "fcfs_over_trail_mean_e2e": ratio(g("fcfs", "mean_e2e"), g("trail", "mean_e2e")),
        "fcfs_over_trail_mean_ttft": ratio(g("fcfs", "mean_ttft"), g("trail", "mean_ttft")),
        "trail_over_oracle_mean_e2e": ratio(g("trail", "mean_e2e"), g("srpt-oracle", "mean_e2e")),
        "trail_over_fcfs_p99_e2e": ratio(g("trail", "p99_e2e"), g("fcfs", "p99_e2e")),
        "sim_seconds_1m_requests": simj.get("sim_seconds_1m_requests"),
        "sim_vs_engine_mean_e2e_error": max((abs(e) for e in errs.values()), default=None),
        "sim_vs_theory_error": simj.get("sim_vs_theory_error"),
        "aging_default": default,
        "fcfs_over_trail_aged_mean_e2e": ratio(g("fcfs", "mean_e2e"), g(default, "mean_e2e")),
        "trail_aged_over_fcfs_p99_e2e": ratio(g(default, "p99_e2e"), g("fcfs", "p99_e2e")),
        "rate_frac_of_capacity": top_frac,
    }
    table = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]
    for row in table:  # ratios to fcfs at the same rate
        f = next((x for x in table if x["rate_frac"] == row["rate_frac"] and x["policy"] == "fcfs"), None)
        if f is not None:
            row["fcfs_over_mean_e2e"] = ratio(f["mean_e2e"], row["mean_e2e"])
            row["fcfs_over_mean_ttft"] = ratio(f["mean_ttft"], row["mean_ttft"])
            row["p99_e2e_over_fcfs"] = ratio(row["p99_e2e"], f["p99_e2e"])
    cdfs = {p: {"e2e": [c.tolist() for c in cdf_points(r["_e2e"], 100)],
                "ttft": [c.tolist() for c in cdf_points(r["_ttft"], 100)]} for p, r in top.items()}
    config = {k: v for k, v in vars(args).items() if k not in ("command",)}
    return {
        "command": args.command, "device": device_label(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "config": config,
        "workload": {"prompts": args.prompts, "mode": "forced lengths (profiled natural EOS, capped)",
                     "output_len_mean": float(lengths.mean()), "output_len_p50": float(np.median(lengths)),
                     "output_len_p99": float(np.percentile(lengths, 99)), "pool": int(len(lengths))},
        "capacity": {k: v for k, v in cap.items() if k != "steps"},
        "table": table, "aging_tradeoff": pts, "simulator": {k: v for k, v in sim.items()},
        "cdfs_top_rate": cdfs, "bars": bars, "_top": top,
        "bars_pass": {"fcfs_over_trail_mean_e2e>=1.6": bars["fcfs_over_trail_mean_e2e"] >= 1.6,
                      "fcfs_over_trail_mean_ttft>=3": bars["fcfs_over_trail_mean_ttft"] >= 3.0,
                      "trail_over_oracle_mean_e2e<=1.15": bars["trail_over_oracle_mean_e2e"] <= 1.15,
                      "aging_default_found": default is not None},
    }


def clean_json(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): clean_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean_json(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top, table = result["_top"], result["table"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
    for label, r in top.items():
        for a, key in zip(ax, ("_e2e", "_ttft"), strict=True):
            x, y = cdf_points(r[key], 300)
            a.plot(x, y, label=label, lw=1.2)
    ax[0].set(xlabel="E2E latency (s)", ylabel="fraction of requests", title="E2E latency CDF")
    ax[1].set(xlabel="TTFT (s)", title="TTFT CDF", xscale="log")
    ax[0].legend(fontsize=7)
    fig.suptitle(f"{result['bars']['rate_frac_of_capacity']:.0%} of capacity, same trace", fontsize=9)
    fig.tight_layout()
    p1 = out_dir / "serving_latency.png"
    fig.savefig(p1)
    plt.close(fig)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6), dpi=80)
    labels = sorted({r["policy"] for r in table if "aging" not in r["policy"]})
    for label in labels:
        rs = sorted((r for r in table if r["policy"] == label), key=lambda r: r["rate_frac"])
        xs = [r["rate_req_s"] for r in rs]
        ax[0].plot(xs, [r["mean_e2e"] for r in rs], "o-", label=label)
        ax[1].plot(xs, [r["preemptions_per_request"] for r in rs], "o-", label=label)
    ax[0].set(xlabel="request rate (req/s)", ylabel="mean E2E (s)", title="mean latency vs rate")
    ax[1].set(xlabel="request rate (req/s)", ylabel="preemptions / request", title="preemptions")
    ax[0].legend(fontsize=7)
    pts = result["aging_tradeoff"]
    if pts:
        ax[2].plot([p["p99_ratio"] for p in pts], [p["mean_gain"] for p in pts], "o-")
        for p in pts:
            ax[2].annotate(f"{p['aging']:.3g}", (p["p99_ratio"], p["mean_gain"]), fontsize=7)
    ax[2].axvline(MAX_P99_RATIO, ls="--", c="gray")
    ax[2].axhline(MIN_MEAN_GAIN, ls="--", c="gray")
    ax[2].set(xlabel="p99 E2E / fcfs", ylabel="fcfs mean E2E / trail", title="trail aging trade-off (tok/s)")
    fig.tight_layout()
    p2 = out_dir / "serving_sweep.png"
    fig.savefig(p2)
    plt.close(fig)
    return [p1, p2]


def markdown(result: dict[str, Any]) -> str:
    cols = [("mean_e2e", "mean E2E s"), ("p50_e2e", "p50 E2E s"), ("p99_e2e", "p99 E2E s"),
            ("mean_ttft", "mean TTFT s"), ("mean_tpot", "TPOT ms"), ("throughput_tok_s", "tok/s"),
            ("preemptions_per_request", "preempt/req"), ("fcfs_over_mean_e2e", "fcfs/x mean E2E")]
    frac = result["bars"]["rate_frac_of_capacity"]
    rows = [r for r in result["table"] if r["rate_frac"] == frac]
    lines = ["| policy | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            v = v * 1e3 if k == "mean_tpot" and v is not None else v
            cells.append("n/a" if v is None or not math.isfinite(v) else f"{v:.3g}")
        lines.append(f"| {r['policy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(args: Any, result: dict[str, Any]) -> None:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = plots(result, out_dir)
    doc = clean_json({k: v for k, v in result.items() if not k.startswith("_")})
    path = out_dir / "serving.json"
    path.write_text(json.dumps(doc, indent=1))
    files.append(path)
    if os.environ.get("OUT") and Path(os.environ["OUT"]).resolve() != out_dir.resolve():
        for f in files:
            shutil.copy(f, Path(os.environ["OUT"]) / f.name)
    print("\n" + markdown(result) + "\n")
    print("bars:", json.dumps(doc["bars"], indent=1))
    print("bars_pass:", json.dumps(doc["bars_pass"]))
