"""HTTP vs gRPC on one `jtrail serve` process, and an outside load tool (guidellm) vs jtrail's loadgen.

    # on a CPU machine with the data packages: the prompts the GPU run carries (ShareGPT, ~100 KB)
    python benchmarks/http_bench.py --write-jsonl benchmarks/results/http_prompts.jsonl --pool 256
    # on the GPU
    python benchmarks/http_bench.py --prompts benchmarks/results/http_prompts.jsonl \
        --tokenizer-dir /root/smollm2_tok [--outside guidellm]
    python benchmarks/http_bench.py --mock --prompts mtbench --requests 40 --outside none   # CPU smoke test

For each policy (fcfs, trail) one server process serves both doors from one engine:
1. Warm-up (every pool prompt, 2 tokens) and, once, a natural-EOS profile (greedy, capped at
   --max-output) through gRPC: each prompt's output length and the capacity, as benchmarks/routing.py.
2. One seeded Poisson trace at --load x capacity, forced lengths (ignore_eos, max_tokens = the profiled
   length: identical work whatever the door or tool). The same trace runs through gRPC (loadgen's
   `drive_grpc`), through HTTP (`drive_http` below: /v1/chat/completions, SSE, the `openai` client) and
   through the outside tool, fed the same prompts, lengths and arrival times (guidellm's `replay`
   profile, `schedule_turn=timestamp`); the server drains between runs; the doors' order alternates.
3. bars: `http_over_grpc_mean_e2e` (HTTP mean E2E / gRPC mean E2E, the worse policy) and
   `outside_vs_loadgen_mean_e2e_error` (|guidellm mean E2E / loadgen-over-HTTP mean E2E - 1|, the worse
   policy); TTFT the same way in `ratios`. Writes benchmarks/results/http.json (+ guidellm's own
   report files beside it), copied to $OUT when set.

Offline GPU box: carry the wheels the box lacks (fastapi, starlette, uvicorn, httptools, openai and its
httpx2 stack, guidellm and its closure minus torch / transformers / tokenizers / numpy, which the box
has), the exported tokenizer directory and the prompts JSONL; then
`pip install --no-index --find-links WHEELS fastapi uvicorn httptools openai guidellm`. guidellm runs
with HF_HUB_OFFLINE=1 (set here), so it never reaches a hub.

The driver never imports JAX: the server owns the accelerator.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from loadgen import RunResult, StreamTimes, Workload, arrival_times, drive_grpc  # noqa: E402
from routing import Proc, device_name, drain, jtrail_cmd, load_pool, summarize, wait_serving  # noqa: E402

from jtrail.provenance import git_commit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# --- the HTTP driver (loadgen's drive_grpc, through the OpenAI API) ----------------------------------
async def http_run(base_url: str, model: str, wl: Workload, timeout_s: float) -> RunResult:
    """Open loop over /v1/chat/completions (chat prompts) or /v1/completions (text / token ids), SSE
    streaming with per-chunk usage (vLLM's `continuous_usage_stats`), so a chunk holding several tokens
    (--decode-steps > 1) is counted exactly. Times as loadgen's: perf_counter seconds from the start."""
    import openai

    times = StreamTimes(wl)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout_s)

    async def one(k: int) -> None:
        await times.wait_arrival(k)
        p = wl.params(k)
        kw: dict[str, Any] = dict(model=model, max_tokens=p.max_tokens, temperature=0.0, stream=True,
                                  stream_options={"include_usage": True, "continuous_usage_stats": True},
                                  extra_body={"ignore_eos": p.ignore_eos})
        prompt = wl.prompts[k]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            stream = await client.chat.completions.create(messages=prompt, **kw)
        else:
            stream = await client.completions.create(prompt=prompt, **kw)
        async with stream:
            async for chunk in stream:
                t = times.now()
                if chunk.usage is None or not chunk.choices:
                    continue
                times.tokens(k, chunk.usage.completion_tokens - int(times.nout[k]), t)
                if times.end(k, chunk.choices[0].finish_reason is not None, t):
                    break

    tasks = [asyncio.create_task(one(k)) for k in range(len(wl))]
    await asyncio.wait(tasks, timeout=timeout_s)
    for t in tasks:
        t.cancel()
    failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    if failed:
        log(f"  {len(failed)} HTTP requests failed, first: {failed[0].exception()!r}")
    await client.close()
    return times.result()


def drive_http(base_url: str, model: str, wl: Workload, timeout_s: float = 600.0) -> RunResult:
    return asyncio.run(http_run(base_url, model, wl, timeout_s))


# --- the outside tool --------------------------------------------------------------------------------
def guidellm_dataset(path: Path, wl: Workload) -> None:
    """The trace as guidellm rows: prompt text, forced output length, arrival time (replay profile)."""
    with path.open("w") as f:
        for k in range(len(wl)):
            p = wl.prompts[k]
            text = p[-1]["content"] if isinstance(p, list) and p and isinstance(p[0], dict) else p
            f.write(json.dumps({"prompt": text, "output_tokens_count": int(wl.output_len[k]),
                                "relative_timestamp": float(wl.arrival[k])}) + "\n")


def guidellm_cmd(a: argparse.Namespace, http: str, model: str, data: Path, out_dir: Path,
                 n: int) -> list[str]:
    """guidellm 0.8's CLI (kind=...,key=value options), checked against a live `jtrail serve --mock`."""
    exe = a.guidellm or shutil.which("guidellm") or str(Path(sys.executable).parent / "guidellm")
    return [exe, "run",
            "--backend", f"kind=openai_http,target=http://{http},model={model},"
                         "request_format=/v1/chat/completions",
            "--profile", "kind=replay,schedule_turn=timestamp",
            "--data", f"kind=json_file,path={data}",
            "--tokenizer", f"kind=huggingface_auto,model={a.tokenizer_dir}",
            "--constraint", f"kind=max_requests,count={n}",
            "--output", f"kind=json,path={out_dir / 'guidellm.json'}",
            "--disable-console-interactive"]


def run_guidellm(a: argparse.Namespace, http: str, model: str, wl: Workload, out_dir: Path,
                 policy: str) -> dict[str, Any]:
    data = out_dir / f"guidellm_trace_{policy}.jsonl"
    guidellm_dataset(data, wl)
    cmd = guidellm_cmd(a, http, model, data, out_dir, len(wl))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    log("  " + " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.run_timeout + 300)
    (out_dir / f"guidellm_{policy}.log").write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
    report = out_dir / "guidellm.json"
    if r.returncode != 0 or not report.exists():
        raise RuntimeError(f"guidellm failed (rc {r.returncode}): {(r.stdout + r.stderr)[-1500:]}")
    kept = out_dir / f"guidellm_{policy}.json"
    report.rename(kept)
    return {"command": " ".join(cmd), "report": kept.name, **guidellm_summary(json.loads(kept.read_text()))}


def guidellm_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """guidellm's own figures from its JSON report: mean / p50 / p99 request latency (E2E, s) and TTFT
    (s), over its successful requests (request_end - request_start, first token - request_start), plus
    its dispatch delay (how late it sent requests against the trace's arrival times)."""
    b = doc["benchmarks"][0]
    m, reqs = b["metrics"], b["requests"]
    row: dict[str, Any] = {"completed": len(reqs["successful"]),
                           "requests": sum(len(reqs.get(k) or []) for k in ("successful", "errored",
                                                                            "incomplete"))}
    for name, key, scale in (("e2e", "request_latency", 1.0), ("ttft", "time_to_first_token_ms", 1e-3)):
        st = m[key]["successful"]
        row[f"mean_{name}"] = st["mean"] * scale
        row[f"p50_{name}"] = st["percentiles"]["p50"] * scale
        row[f"p99_{name}"] = st["percentiles"]["p99"] * scale
    delay = m.get("request_dispatch_delay", {}).get("successful", {})
    row["dispatch_delay_mean_s"] = delay.get("mean")
    return row


# --- processes ---------------------------------------------------------------------------------------
def start_server(a: argparse.Namespace, policy: str, log_dir: Path) -> tuple[Proc, str, str]:
    args = ["serve", "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--policy", policy,
            "--slots", str(a.slots), "--pages", str(a.pages), "--page-size", str(a.page_size),
            "--max-context", str(a.max_context), "--max-queue", str(a.max_queue), "--grace", "1",
            "--decode-steps", str(a.decode_steps)]
    if a.mock:
        args += ["--mock", "--mock-step-delay", str(a.mock_step_delay)]
    else:
        args += [*(["--model", a.model] if a.model else []), *(["--probe", a.probe] if a.probe else [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = Proc(f"serve_{policy}", jtrail_cmd(*args), env, r"(serving on \S+ metrics_port=\S+ http=\S+)",
                log_dir, a.start_timeout)
    grpc_addr = proc.target.split()[2]
    http_addr = proc.target.split("http=")[1]
    return proc, grpc_addr, http_addr


def served_model(http: str) -> str:
    import openai

    return openai.OpenAI(base_url=f"http://{http}/v1", api_key="unused").models.list().data[0].id


def write_jsonl(a: argparse.Namespace) -> int:
    """ShareGPT (or --prompts) as {"prompt": ...} lines: what the GPU run carries instead of the package."""
    a.raw = True
    pool = load_pool(a)
    Path(a.write_jsonl).parent.mkdir(parents=True, exist_ok=True)
    with open(a.write_jsonl, "w") as f:
        for t in pool:
            f.write(json.dumps({"prompt": t}) + "\n")
    print(f"{len(pool)} prompts -> {a.write_jsonl}")
    return 0


# --- main --------------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF / HF dir / named shape; default: embedded SmolLM2")
    p.add_argument("--probe", default=None, help="probe directory (default: the shipped one); 'none': off")
    p.add_argument("--mock", action="store_true", help="mock engine (fake tokens, no model): a smoke test")
    p.add_argument("--mock-step-delay", type=float, default=0.005)
    p.add_argument("--policies", default="fcfs,trail")
    p.add_argument("--decode-steps", type=int, default=1)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--pages", type=int, default=2048)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--max-queue", type=int, default=4096)
    p.add_argument("--prompts", default="sharegpt", help="sharegpt, mtbench or a JSONL file of prompts")
    p.add_argument("--raw", action="store_true", help="send prompts as plain text, not chat messages")
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--max-output", type=int, default=256, help="cap of the profiled (forced) lengths")
    p.add_argument("--pool", type=int, default=256, help="prompts profiled (the capacity run)")
    p.add_argument("--load", type=float, default=0.9, help="fraction of the measured capacity")
    p.add_argument("--requests", type=int, default=400, help="requests in the trace")
    p.add_argument("--repeats", type=int, default=1, help="runs of each door per policy (order alternates)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outside", default="guidellm", choices=["guidellm", "none"])
    p.add_argument("--guidellm", default=None, help="the guidellm executable (default: on PATH)")
    p.add_argument("--tokenizer-dir", default=None,
                   help="local Hugging Face tokenizer directory for the outside tool (no hub access; "
                        "--export-tokenizer writes one)")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--run-timeout", type=float, default=240.0, help="most seconds of one run")
    p.add_argument("--write-jsonl", default=None, help="only write --pool prompts to this JSONL and exit")
    p.add_argument("--export-tokenizer", default=None,
                   help="only write the model's tokenizer as a Hugging Face directory here and exit")
    p.add_argument("--out", default=str(RESULTS / "http.json"))
    return p.parse_args(argv)


def export_tokenizer(model: str | None, where: str) -> int:
    """Write the served GGUF's tokenizer as a Hugging Face directory (tokenizer.json +
    tokenizer_config.json): the outside tool counts tokens with it, offline (no hub)."""
    import gguf
    from jtrail.models.loader import embedded_gguf_path
    from jtrail.models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(gguf.GGUFReader(str(model or embedded_gguf_path())))
    d = Path(where)
    d.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": tok.chat_template,
           "model_max_length": 8192, **tok.special_tokens}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    print(f"tokenizer -> {d}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.write_jsonl:
        return write_jsonl(a)
    if a.export_tokenizer:
        return export_tokenizer(a.model, a.export_tokenizer)
    policies = [x for x in a.policies.split(",") if x]
    command = "python benchmarks/http_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out_path = Path(a.out)
    out_dir = out_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="jtrail_http_"))
    if a.outside == "guidellm" and not a.tokenizer_dir:
        raise SystemExit("--outside guidellm needs --tokenizer-dir (a local Hugging Face tokenizer "
                         "directory: make one with --export-tokenizer DIR)")
    pool = load_pool(a)
    if not pool:
        raise SystemExit(f"no prompt of at most {a.max_prompt_tokens} tokens in {a.prompts}")
    log(f"{len(pool)} prompts; policies {policies}")
    wl: Workload | None = None
    capacity = rate = float("nan")
    table: dict[str, dict[str, Any]] = {}
    for pi, policy in enumerate(policies):
        server, grpc_addr, http_addr = start_server(a, policy, log_dir)
        try:
            wait_serving([grpc_addr], a.start_timeout)
            model = served_model(http_addr)
            base = f"http://{http_addr}/v1"
            n_pool = len(pool)
            warm = Workload(pool, np.zeros(n_pool), np.full(n_pool, 2), forced=True,
                            request_ids=[f"warm{i}" for i in range(n_pool)])
            drive_grpc(grpc_addr, warm, timeout_s=a.run_timeout)
            drive_http(base, model, Workload(pool[:8], np.zeros(min(8, n_pool)), np.full(min(8, n_pool), 2)),
                       timeout_s=a.run_timeout)
            drain([grpc_addr], 60.0)
            log(f"{policy}: server at gRPC {grpc_addr}, HTTP {http_addr} ({model}); warmed up")
            if wl is None:  # profile once: every policy and door then runs the same trace
                prof = Workload(pool, np.zeros(n_pool), np.full(n_pool, a.max_output), forced=False,
                                request_ids=[f"prof{i}" for i in range(n_pool)])
                res = drive_grpc(grpc_addr, prof, timeout_s=a.run_timeout)
                ok = res.completed & (res.output_tokens > 0)
                fin = np.sort(res.finish[ok])
                k = len(fin) - a.slots
                k = k if k >= len(fin) // 2 else len(fin)
                capacity = float(k / fin[k - 1]) if len(fin) else float("nan")
                prompts = [p for p, good in zip(pool, ok, strict=True) if good]
                lengths = np.minimum(res.output_tokens[ok], a.max_output).astype(np.int64)
                if not prompts or not capacity > 0:
                    raise RuntimeError("the profiling run completed no request")
                rate = a.load * capacity
                pick = np.random.default_rng(a.seed + 1).integers(0, len(prompts), a.requests)
                wl = Workload([prompts[i] for i in pick], arrival_times(a.requests, rate, a.seed),
                              lengths[pick], forced=True, request_ids=[f"r{i}" for i in range(a.requests)])
                log(f"profiled {len(prompts)} prompts, mean output {lengths.mean():.1f}; capacity "
                    f"{capacity:.2f} req/s; trace {a.requests} requests at {rate:.2f} req/s")
                drain([grpc_addr], 60.0)
            doors = ["grpc", "http"] + (["outside"] if a.outside != "none" else [])
            runs: dict[str, list[dict[str, Any]]] = {d: [] for d in doors}
            for rep in range(a.repeats):
                order = doors if (rep + pi) % 2 == 0 else doors[::-1]
                for door in order:
                    drain([grpc_addr], 120.0)
                    ids = [f"{door}{rep}_{i}" for i in range(len(wl))]
                    trace = Workload(wl.prompts, wl.arrival, wl.output_len, forced=True, request_ids=ids)
                    if door == "grpc":
                        row = summarize(drive_grpc(grpc_addr, trace, timeout_s=a.run_timeout))
                    elif door == "http":
                        row = summarize(drive_http(base, model, trace, timeout_s=a.run_timeout))
                    else:
                        row = run_guidellm(a, http_addr, model, trace, out_dir, f"{policy}_{rep}")
                    runs[door].append(row)
                    log(f"{policy:6s} {door:8s} [{rep + 1}/{a.repeats}] done {row['completed']}/"
                        f"{row['requests']}: mean E2E {row['mean_e2e']:.3f} s, "
                        f"mean TTFT {row['mean_ttft']:.3f} s")
            table[policy] = {d: _mean(rows) for d, rows in runs.items()}
        finally:
            server.stop()

    ratios: dict[str, Any] = {}
    for policy, t in table.items():
        g, h = t["grpc"], t["http"]
        ratios[f"{policy}_http_over_grpc_mean_e2e"] = h["mean_e2e"] / g["mean_e2e"]
        ratios[f"{policy}_http_over_grpc_mean_ttft"] = h["mean_ttft"] / g["mean_ttft"]
        if "outside" in t:
            o = t["outside"]
            ratios[f"{policy}_outside_vs_loadgen_mean_e2e_error"] = abs(o["mean_e2e"] / h["mean_e2e"] - 1)
            ratios[f"{policy}_outside_vs_loadgen_mean_ttft_error"] = abs(o["mean_ttft"] / h["mean_ttft"] - 1)
    if "fcfs" in table and "trail" in table:
        for door in table["fcfs"]:
            ratios[f"fcfs_over_trail_mean_e2e_{door}"] = (table["fcfs"][door]["mean_e2e"]
                                                          / table["trail"][door]["mean_e2e"])
    worst = lambda key: max((v for k, v in ratios.items() if k.endswith(key)), default=None,  # noqa: E731
                            key=lambda v: abs(v - 1) if "over" in key else v)
    doc = {
        "command": command, "device": device_name(argparse.Namespace(mock=a.mock, gpus="0")),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "git_commit": git_commit(),
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "workload": {"prompts": a.prompts, "mode": "forced lengths (natural-EOS greedy profile, capped; "
                     "ignore_eos, max_tokens = the length)", "requests": len(wl) if wl else 0,
                     "rate_req_s": rate, "capacity_req_s": capacity,
                     "output_len_mean": float(wl.output_len.mean()) if wl else None},
        "outside_tool": {"name": a.outside, "note": "guidellm replays the same trace (prompts, lengths, "
                         "arrival times) over HTTP; compared with loadgen over HTTP on the same server"},
        "table": table, "ratios": ratios,
        "bars": {"http_over_grpc_mean_e2e": worst("_http_over_grpc_mean_e2e"),
                 "outside_vs_loadgen_mean_e2e_error": worst("_outside_vs_loadgen_mean_e2e_error")},
    }
    out_path.write_text(json.dumps(doc, indent=2))
    if os.environ.get("OUT"):
        dest = Path(os.environ["OUT"])
        dest.mkdir(parents=True, exist_ok=True)
        for f in [out_path, *out_dir.glob("guidellm_*")]:
            if (dest / f.name).resolve() != f.resolve():
                shutil.copy(f, dest / f.name)
    print("\n| policy | door | done | mean E2E | p50 E2E | p99 E2E | mean TTFT | p99 TTFT |")
    print("|---|---|---|---|---|---|---|---|")
    for policy, t in table.items():
        for door, r in t.items():
            print(f"| {policy} | {door} | {r['completed']}/{r['requests']} | {r['mean_e2e']:.3f} | "
                  f"{r['p50_e2e']:.3f} | {r['p99_e2e']:.3f} | {r['mean_ttft']:.3f} | {r['p99_ttft']:.3f} |")
    print(json.dumps(doc["bars"]))
    print(f"-> {out_path}")
    return 0


def _mean(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: float(np.mean([r[k] for r in rows])) for k, v in rows[0].items()
                           if isinstance(v, int | float) and k not in ("completed", "requests")}
    out["completed"] = int(sum(r["completed"] for r in rows))
    out["requests"] = int(sum(r["requests"] for r in rows))
    out["mean_e2e_per_repeat"] = [r["mean_e2e"] for r in rows]
    for extra in ("command", "report"):
        if extra in rows[0]:
            out[extra] = [r[extra] for r in rows]
    return out


if __name__ == "__main__":
    sys.exit(main())
