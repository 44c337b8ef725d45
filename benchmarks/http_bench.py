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
   `drive_grpc`), through HTTP (`jtrail.bench.http_driver`: /v1/chat/completions, SSE; --http-client
   sse reads the stream with httpx2, openai with the `openai` client, whose per-chunk cost the driver
   then measures as well) and through the outside tool, fed the same prompts, lengths and arrival
   times (guidellm's `replay` profile, `schedule_turn=timestamp`); the server drains between runs;
   the doors' order alternates.
3. bars: `http_over_grpc_mean_e2e` (HTTP mean E2E / gRPC mean E2E, the worse policy) and
   `outside_vs_loadgen_mean_e2e_error` (|guidellm mean E2E / loadgen-over-HTTP mean E2E - 1|, the worse
   policy); TTFT the same way in `ratios`. Writes benchmarks/results/http.json and guidellm's own
   reports in one file beside it (http_guidellm.json), both copied to $OUT when set.

Offline GPU box (python 3.12, no registry): carry the wheels it lacks (grpcio >= 1.85.1 and protobuf
>= 7.35.1 for the committed stubs, grpcio-health-checking/-reflection, fastapi, starlette, uvicorn,
httptools, pydantic, openai and its httpx2 stack, guidellm and its closure minus torch / transformers
/ tokenizers / numpy / pandas / pyarrow, which the box has), install them with `pip install
--no-index --no-deps --target /tmp/site WHEELS/*.whl` and this checkout with the same flags plus
--no-build-isolation and `.` (PYTHONPATH=/tmp/site); export the tokenizer there with
--export-tokenizer DIR --model GGUF. guidellm runs with HF_HUB_OFFLINE=1
(set here), so it never reaches a hub; without its script on PATH it runs as `python -m guidellm`.

The driver never imports JAX: the server owns the accelerator.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jtrail.bench.guidellm import export_tokenizer, keep_reports
from jtrail.bench.http_driver import CLIENTS
from jtrail.bench.http_report import door_ratios
from jtrail.bench.http_runs import print_table, profile_trace, run_doors, warm_up
from jtrail.bench.loadgen import Workload
from jtrail.bench.processes import device_name, exit_on_sigterm, served_model, start_server, wait_serving
from jtrail.bench.prompt_pools import load_pool
from jtrail.provenance import git_commit

RESULTS = Path(__file__).resolve().parent / "results"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


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
    # 0.7: at 0.9 of a capacity measured within ~8%, a run can reach saturation and the queue, not the
    # door, decides E2E (results/http.json, run 2: fcfs's repeats 1.30 -> 3.10 s on one trace)
    p.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity")
    p.add_argument("--requests", type=int, default=400, help="requests in the trace")
    p.add_argument("--repeats", type=int, default=1, help="runs of each door per policy (order alternates)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outside", default="guidellm", choices=["guidellm", "none"])
    p.add_argument("--http-client", default="sse", choices=list(CLIENTS),
                   help="the HTTP door's driver: sse (httpx2, lean) or openai (the official client)")
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


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    exit_on_sigterm()
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
    outside_errors: list[str] = []
    for pi, policy in enumerate(policies):
        server, grpc_addr, http_addr = start_server(a, policy, log_dir)
        try:
            wait_serving([grpc_addr], a.start_timeout)
            model = served_model(http_addr)
            warm_up(a, grpc_addr, f"http://{http_addr}/v1", model, pool)
            log(f"{policy}: server at gRPC {grpc_addr}, HTTP {http_addr} ({model}); warmed up")
            if wl is None:  # profile once: every policy and door then runs the same trace
                wl, capacity = profile_trace(a, grpc_addr, pool, log)
                rate = a.load * capacity
            table[policy] = run_doors(a, policy, pi, wl, (grpc_addr, http_addr), model, log_dir,
                                      outside_errors, log)
        finally:
            server.stop()

    ratios, bars = door_ratios(table)
    doc = {
        "command": command, "device": device_name(argparse.Namespace(mock=a.mock, gpus="0")),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "git_commit": git_commit(),
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "workload": {"prompts": a.prompts, "mode": "forced lengths (natural-EOS greedy profile, capped; "
                     "ignore_eos, max_tokens = the length)", "requests": len(wl) if wl else 0,
                     "rate_req_s": rate, "capacity_req_s": capacity,
                     "output_len_mean": float(wl.output_len.mean()) if wl else None},
        "outside_tool": {"name": a.outside, "note": "guidellm replays the same trace (prompts, lengths, "
                         "arrival times) over HTTP; compared with loadgen over HTTP on the same server",
                         "errors": outside_errors},
        "table": table, "ratios": ratios, "bars": bars,
    }
    out_path.write_text(json.dumps(doc, indent=2))
    reports = keep_reports(log_dir, out_dir / f"{out_path.stem}_guidellm.json")
    if os.environ.get("OUT"):
        dest = Path(os.environ["OUT"])
        dest.mkdir(parents=True, exist_ok=True)
        for f in [out_path, *([reports] if reports else [])]:
            if (dest / f.name).resolve() != f.resolve():
                shutil.copy(f, dest / f.name)
    print_table(table)
    print(json.dumps(doc["bars"]))
    print(f"-> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
