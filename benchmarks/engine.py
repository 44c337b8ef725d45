"""Engine decode throughput vs the HBM roofline and vs Hugging Face transformers.

    python benchmarks/engine.py               # GPU: Llama-3-8B shape, random bf16 weights
    python benchmarks/engine.py --smoke       # CPU: tiny shapes, checks the script end to end
    python benchmarks/engine.py --smollm2-gguf PATH   # adds real-model (SmolLM2) end-to-end throughput
    python benchmarks/engine.py --issue16 --baseline-worktree DIR   # issue 16's bars, before vs after
    python benchmarks/engine.py --async-compare   # sync vs async scheduling -> results/engine_async.json
                                                  # (~1 min on an H200; the file is rewritten per row)

--issue16: SmolLM2-135M shape, ctx 512, batch 32 and 128 at one token per call and batch 128 at 8
(256 tokens per sequence each: 256 timed steps at one token per call, 32 at eight), the prefill burst
(64 prompts of 512 tokens at once, max_tokens 1: seconds from submission to the last first token),
and the Llama-3-8B shape at batch 128 (ctx 1024, 8 tokens per call, 8 steps: the roofline row of the
default run). With --baseline-worktree DIR (a checkout of the commit before the change, e.g.
`git archive f6c35c1 jtrail serving models kernels | tar -x -C DIR`), the same measurements run first
in a subprocess that imports jtrail from DIR, and the result holds both and their ratios. Then, unless
--command-buffers none, the SmolLM2 rows at one token per call run once more per XLA command-buffer
(CUDA graph) setting, each in a subprocess with its XLA_FLAGS ("off": none; "all": every command
type, loops included, graphs of any size; "min1": graphs of any size); the main run is XLA's default.
All weights are random (the real GGUF is not needed). All subprocesses run before this process touches
the GPU.

Decode measurement: for each batch size B, B requests with `ctx`-token contexts are placed in the
engine as already prefilled (pages allocated, lengths set; the KV pages hold zeros, which does not
change the work), then `engine.step()` runs `--steps` times, each a jitted call of
`decode_steps_per_call` tokens per sequence. tokens/s = B * tokens per sequence / wall time of the
step loop. Roofline: bytes read per token step (all weights except the embedding table, plus every
sequence's KV) / copy bandwidth measured in this run (preallocated elementwise bf16 op). Host gap:
1 - (device time of the jitted decode call alone, same inputs) / (engine step wall time).
The transformers peer runs in a subprocess before JAX touches the GPU (JAX preallocates memory):
decode tokens/s = B * N / (time of generate(N+1 new tokens) - time of generate(1 new token)).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

T_START = time.perf_counter()  # --async-compare reports its start-up (imports, weights) as a part


def _mount_jtrail(root: str) -> None:
    """Import jtrail from a source tree (jtrail/, serving/, models/, kernels/ side by side, as the
    repo and a baseline `git archive` lay them out) without installing it."""
    import importlib.util

    def pkg(name: str, path: str):
        spec = importlib.util.spec_from_file_location(name, path + "/__init__.py",
                                                      submodule_search_locations=[path])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        return spec, mod

    root_spec, root_mod = pkg("jtrail", root + "/jtrail")
    subs = {s: pkg("jtrail." + s, f"{root}/{s}") for s in ("kernels", "models", "serving")}
    # the measuring code (jtrail.bench) is always this repo's: a baseline tree may predate it
    subs["bench"] = pkg("jtrail.bench", str(Path(__file__).resolve().parent.parent / "jtrail" / "bench"))
    for s, (_, mod) in subs.items():
        setattr(root_mod, s, mod)
    for spec, mod in subs.values():
        spec.loader.exec_module(mod)
    root_spec.loader.exec_module(root_mod)


# JTRAIL_BENCH_ROOT: the tree to measure (the baseline subprocess sets it). Otherwise the installed
# jtrail, or this repo's tree when none is installed (a copy on a lent GPU).
if os.environ.get("JTRAIL_BENCH_ROOT"):
    _mount_jtrail(str(Path(os.environ["JTRAIL_BENCH_ROOT"]).resolve()))
else:
    try:
        import jtrail  # noqa: F401
    except ImportError:
        _mount_jtrail(str(Path(__file__).resolve().parent.parent))

from jtrail.bench.engine_decode import (  # noqa: E402
    TOKENS_PER_SEQ,
    bench_decode,
    bench_smollm2,
    copy_bandwidth,
    hf_peer,
    issue16_bars,
    k1_summary,
    nnx_state,
    run_issue16,
    write_result,
)
from jtrail.bench.engine_subprocesses import (  # noqa: E402
    COMMAND_BUFFERS,
    run_baseline,
    run_command_buffer_variants,
    run_hf_subprocess,
)
from jtrail.provenance import git_commit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "engine.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check of the script)")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batches", default="32,64,128,256")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8, help="timed engine steps per batch size")
    ap.add_argument("--decode-steps", type=int, default=8, help="decode tokens per jitted call")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--hf-batches", default="32,128")
    ap.add_argument("--hf-new-tokens", type=int, default=32)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--hf-peer-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--smollm2-gguf", default=None)
    ap.add_argument("--smollm2-batch", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--issue16", action="store_true",
                    help="issue 16's rows: smollm2-135m ctx 512, b32/b128 x 1 token/call, b128 x 8; burst")
    ap.add_argument("--baseline-worktree", default=None,
                    help="with --issue16: jtrail checkout to compare against")
    ap.add_argument("--burst-budget", type=int, default=8192, help="prefill tokens per step in the burst")
    ap.add_argument("--baseline-label", default=None,
                    help="with --baseline-worktree: what DIR holds, recorded (e.g. the commit f6c35c1)")
    ap.add_argument("--command-buffers", default="off,all",
                    help="with --issue16: XLA command-buffer settings to measure besides the default "
                         f"({','.join(COMMAND_BUFFERS)}), each in a subprocess; 'none' skips them")
    ap.add_argument("--rows-only", default=None, choices=("k1", "k8"), help=argparse.SUPPRESS)
    ap.add_argument("--skip-roofline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--async-compare", action="store_true", help="sync vs async scheduling on issue 16's "
                    "rows and a mixed workload (smollm2-135m, ctx 512 unless given)")
    ap.add_argument("--mixed-requests", type=int, default=256,
                    help="with --async-compare: requests in the mixed workload (128 slots)")
    args = ap.parse_args()
    args.script = __file__  # the subprocesses re-run this script
    args.batches = [int(x) for x in args.batches.split(",")]
    args.hf_batches = [int(x) for x in args.hf_batches.split(",")]
    if args.hf_peer_only:
        print(json.dumps(hf_peer(args.shape, args.hf_batches, args.ctx, args.hf_new_tokens)))
        return
    if args.async_compare:
        args.no_hf = True
        args.shape = args.shape if "--shape" in sys.argv else "smollm2-135m"
        args.ctx = args.ctx if "--ctx" in sys.argv else 512
        args.out = args.out if "--out" in sys.argv else str(RESULTS.with_name("engine_async.json"))
    if args.issue16:
        args.shape, args.no_hf = "smollm2-135m", True
        if "--ctx" not in sys.argv:
            args.ctx = 512
    if args.smoke:
        args.shape, args.batches, args.ctx, args.steps, args.decode_steps = "tiny", [2, 4], 48, 3, 2
        args.page_size, args.no_hf, args.hf_batches = 8, True, []
    before = run_baseline(args) if args.issue16 and args.baseline_worktree else None
    cmdbuf = run_command_buffer_variants(args) if args.issue16 and args.command_buffers != "none" else None

    hf = None if args.no_hf else run_hf_subprocess(args)  # before JAX claims the GPU
    # b256 x 1k KV (~38 GB) + 16 GB weights: let JAX's pool take most of the 80 GB
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    import jax
    import jax.numpy as jnp
    from jtrail.models.config import NAMED_CONFIGS
    from jtrail.models.loader import random_model

    cfg = NAMED_CONFIGS[args.shape]
    t0 = time.perf_counter()
    model = random_model(cfg, jnp.bfloat16)
    jax.block_until_ready(nnx_state(model))
    init_s = time.perf_counter() - t0
    bw = copy_bandwidth(jax, jnp, (1 << 20) if args.smoke else (1 << 30))
    command = " ".join([Path(sys.executable).name, *sys.argv])
    if args.async_compare:
        from jtrail.bench.engine_async import async_compare_result

        def emit(result: dict) -> None:  # after every row: a run cut short still leaves its rows
            write_result(result, args.out, os.environ.get("OUT"), "engine_async.json")

        async_compare_result(args, model, cfg, bw, command, emit, setup_s=time.perf_counter() - T_START)
        return
    if args.issue16:
        import jtrail

        after = run_issue16(args, model, cfg, bw)
        if cmdbuf is not None:
            cmdbuf["default"] = {"xla_flags": os.environ.get("XLA_FLAGS", ""), **k1_summary(after["rows"])}
        result = {"command": command,
                  "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
                  "jax": jax.__version__,
                  "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "git_commit": git_commit(),
                  "jtrail_from": str(Path(jtrail.__file__).resolve().parent.parent),
                  "shape": args.shape, "dtype": "bfloat16", "smoke": args.smoke,
                  "tokens_per_seq_timed": None if args.smoke else TOKENS_PER_SEQ,
                  "copy_bandwidth_GBps": bw / 1e9, "baseline_worktree": args.baseline_worktree,
                  "baseline_label": args.baseline_label,
                  "rows": after["rows"], "prefill_burst": after["prefill_burst"],
                  "roofline": after["roofline"],
                  "before": before, "command_buffers": cmdbuf,
                  "bars": issue16_bars(after, before) if after["roofline"] is not None else None}
        write_result(result, args.out, os.environ.get("OUT"), "engine_issue16.json")
        print(json.dumps(result["bars"]))
        return
    rows = []
    for b in args.batches:
        rows.append(bench_decode(model, cfg, b, args, bw))
        print(json.dumps(rows[-1]), flush=True)
    by_b = {r["batch"]: r for r in rows}
    ref_b = 128 if 128 in by_b else args.batches[-1]
    bars = {"roofline_fraction_b128": by_b[ref_b]["roofline_fraction"],
            "host_gap_fraction": max(r["host_gap_fraction"] for r in rows),
            "speedup_vs_transformers_b128": None}
    if hf and "error" not in hf and str(ref_b) in hf:
        peer = hf[str(ref_b)]["decode_tokens_per_s"]
        bars["speedup_vs_transformers_b128"] = by_b[ref_b]["tokens_per_s"] / peer
    result = {
        "command": command,
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})", "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "shape": args.shape, "dtype": "bfloat16", "smoke": args.smoke,
        "copy_bandwidth_GBps": bw / 1e9, "weight_init_s": init_s,
        "decode_measurement": "KV pages allocated for ctx tokens and lengths set directly (no prefill); "
                              "bars' host gap is the max over batch sizes",
        "table": rows, "transformers": hf,
        "smollm2": bench_smollm2(args.smollm2_gguf, args) if args.smollm2_gguf else None,
        "bars": bars,
    }
    write_result(result, args.out, os.environ.get("OUT"), "engine.json")
    print(json.dumps(bars))


if __name__ == "__main__":
    main()
