"""The engine benchmark's runs in their own processes (`benchmarks/engine.py`): the transformers peer,
the baseline tree and each XLA command-buffer setting re-run the script (`args.script`) in a
subprocess, before the main process touches the GPU (JAX preallocates its memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jtrail.bench.engine_decode import k1_summary


def run_hf_subprocess(args) -> dict | None:
    try:
        import torch
        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    cmd = [sys.executable, args.script, "--hf-peer-only", "--ctx", str(args.ctx), "--hf-new-tokens",
           str(args.hf_new_tokens), "--hf-batches", ",".join(map(str, args.hf_batches)),
           "--shape", args.shape]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        print("transformers peer failed:\n", proc.stderr[-3000:], file=sys.stderr)
        return {"error": proc.stderr[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _issue16_subprocess(args, out: Path, extra: list[str], env: dict[str, str], timeout: int = 900) -> None:
    cmd = [sys.executable, args.script, "--issue16", "--no-hf", "--out", str(out), "--ctx", str(args.ctx),
           "--impl", args.impl, "--page-size", str(args.page_size), "--burst-budget", str(args.burst_budget),
           "--command-buffers", "none", *extra]
    if args.smoke:
        cmd.append("--smoke")
    proc = subprocess.run(cmd, text=True, env={**os.environ, "OUT": "", **env}, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(extra) or 'subprocess'} failed (rc {proc.returncode})")


def run_baseline(args) -> dict:
    """The same measurements with jtrail imported from the baseline worktree (own process: its own
    JAX, its own compile caches); runs before this process touches the GPU."""
    import tempfile

    base = str(Path(args.baseline_worktree).resolve())
    for d in ("jtrail", "serving", "models", "kernels"):
        if not Path(base, d, "__init__.py").exists():
            raise SystemExit(f"--baseline-worktree {base}: no {d}/__init__.py "
                             "(need jtrail, serving, models, kernels)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "baseline.json")
        try:
            rows_only = ["--rows-only", args.rows_only] if args.rows_only else []
            _issue16_subprocess(args, out, ["--skip-roofline", *rows_only], {"JTRAIL_BENCH_ROOT": base})
        except RuntimeError as e:
            raise SystemExit(f"baseline run failed: {e}") from None
        return json.loads(out.read_text())


# every command type XLA has, loops and conditionals included (a fori_loop becomes one graph)
ALL_COMMAND_TYPES = ("--xla_gpu_enable_command_buffer="
                     "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL")
# XLA command buffers (CUDA graphs) for the decode step; the main run keeps XLA's default. (XLA's graph
# update modes with CUDA's virtual-memory allocator were tried: jaxlib 0.11.2 has no such flag.)
COMMAND_BUFFERS = {
    "off": "--xla_gpu_enable_command_buffer=",
    # XLA's default command-buffer types, but graphs of any size (default minimum: 5 ops)
    "min1": "--xla_gpu_graph_min_graph_size=1",
    "all": ALL_COMMAND_TYPES + " --xla_gpu_graph_min_graph_size=1",
}


def run_command_buffer_variants(args) -> dict:
    """SmolLM2 at one token per call (batch 32 and 128) under each command-buffer setting; a setting
    that fails is recorded, not fatal."""
    import tempfile

    names = [] if args.command_buffers == "none" else args.command_buffers.split(",")
    out: dict = {}
    for name in names:
        if name not in COMMAND_BUFFERS:
            raise SystemExit(f"--command-buffers: unknown setting {name!r} "
                             f"(known: {sorted(COMMAND_BUFFERS)})")
        flags = (os.environ.get("XLA_FLAGS", "") + " " + COMMAND_BUFFERS[name]).strip()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, f"cmdbuf_{name}.json")
            try:
                # a setting that hangs must not eat the whole run: two rows take well under a minute
                _issue16_subprocess(args, path, ["--rows-only", "k1"],
                                    {"XLA_FLAGS": flags}, timeout=240)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                out[name] = {"xla_flags": flags, "error": str(e)}
                continue
            res = json.loads(path.read_text())
        out[name] = {"xla_flags": flags, **k1_summary(res["rows"])}
    return out
