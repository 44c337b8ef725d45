"""What each engine and XLA setting does to the decode step's CUDA graph, step time and tokens (issue 16).

    python -m jtrail.bench.graph_modes [SETTING,...] [--batches 32,128]
                                          # -> $OUT/graph_modes.json (or ./graph_modes.json)

SmolLM2-135M shape, random bf16 weights, ctx 512, batch 32 (default), async engine. Each setting of
SETTINGS (XLA flags, environment variables, EngineConfig fields) runs in its own process: three timed
windows of engine steps (150 at one token per call), a profiler trace of 20 steps (the host spans of
XLA's command buffers and graph launches; the GPU's ops and busy time per step), a synchronous window,
and hashes of the tokens produced: every request's first 256 tokens must equal those of the run's first
setting (a graph not updated after an address moved, or a wrong fusion, computes other tokens). The
sets of AB_SETS (`thread_ab`: the launch thread off and on; `depth_ab`: one or two steps in flight;
`fetch_ab`: a blocking fetch or a polled one)
instead time their variants in one process, interleaved.
The file is rewritten after each setting.

On the H200 (2026-12-03, jaxlib 0.11.2; results/engine_dispatch.json, graph_modes_2026_12_03): with one
decode executable every call updated its graph (`command_buffer::update` 1,737 us median); with two
(`twin`, now the default on a GPU) no update is left and the tokens are the same; the launch itself
(`cuGraphLaunch` 1.5-1.8 ms, also with the device idle) is what the launch thread overlaps (b32 1.13x).
"""


from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

from jtrail.bench.engine_decode import wait_in_flight
from jtrail.bench.engine_subprocesses import ALL_COMMAND_TYPES, COMMAND_BUFFERS

BEFORE = {"decode_graphs": 1, "launch_thread": False}  # the engine before 5c7ba84
# name -> (XLA flags, environment variables, EngineConfig fields); {} = the engine's defaults
SETTINGS: dict[str, tuple[str, dict, dict]] = {
    "default": ("", {}, BEFORE),
    "twin": ("", {}, {**BEFORE, "decode_graphs": 2}),
    # the host blocks in a launch when the driver's launch queue is full
    "twin_queues4x": ("", {"CUDA_SCALE_LAUNCH_QUEUES": "4x"}, {**BEFORE, "decode_graphs": 2}),
    "engine": ("", {}, {}),
    # GEMMs as XLA's Triton fusions only (no cuBLAS): producers and consumers may fuse into them
    "triton_gemm": ("--xla_gpu_cublas_fallback=false", {}, {}),
    # how XLA orders a command buffer's commands: SERIALIZE (each after the one before), CONCURRENT
    # (dependencies from buffer conflicts); the launch's host time may depend on the graph's shape
    "serialize": ("--xla_gpu_command_buffer_scheduling_mode=SERIALIZE", {}, {}),
    "concurrent": ("--xla_gpu_command_buffer_scheduling_mode=CONCURRENT", {}, {}),
    "k8": ("", {}, {"decode_steps_per_call": 8}),
    # loops inside the graph: the k-token fori_loop is one graph, not a body launched op by op
    "k8_while": (ALL_COMMAND_TYPES, {}, {"decode_steps_per_call": 8}),
    "xla_rope": ("", {}, {"rope_in_kernel": False}),  # the engine before decode_rope_write
    # XLA's Triton GEMMs pick split-K at SmolLM2's 32-128 rows (4, 8, 2 and 8 splits at b32): each GEMM's
    # partial sums need a reduction, fused into the next elementwise op, but the qkv GEMM's is an op of
    # its own (its consumer is the attention kernel). Unsplit GEMMs: one op a layer fewer, slower GEMMs?
    "no_split_k": ("--xla_gpu_experimental_force_split_k=1", {}, {}),
    "cublas_gemm": ("--xla_gpu_enable_triton_gemm=false", {}, {}),  # GEMMs as cuBLAS calls
    "k8_cublas": ("--xla_gpu_enable_triton_gemm=false", {}, {"decode_steps_per_call": 8}),
    **{name: (flags, {}, BEFORE) for name, flags in COMMAND_BUFFERS.items()},
}
DEFAULT_RUN = ("engine", "triton_gemm", "k8", "k8_while")  # ~2 minutes each on a fresh H200
PREFIX = 256  # tokens per request compared between settings (k8 settings generate more per window)


def graph_spans(trace_dir: str) -> dict[str, list[float]]:
    """Host spans of XLA's command buffers and CUDA graph launches in a profiler trace: name ->
    [count, median microseconds]."""
    import numpy as np

    agg: dict[str, list[float]] = defaultdict(list)
    for path in glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True):
        for e in json.load(gzip.open(path))["traceEvents"]:
            name = e.get("name", "")
            if e.get("ph") == "X" and "dur" in e and ("command_buffer" in name or "cuGraph" in name):
                agg[name].append(e["dur"])
    return {k: [len(v), round(float(np.median(v)), 1)] for k, v in agg.items()}


def device_work(trace_dir: str, steps: int, top: int = 40) -> dict:
    """Per engine step: the GPU's ops (kernels, copies: events on a GPU's stream lines, not on the
    trace's derived lines such as "XLA Ops") and their summed microseconds; `ops_by_name`: the `top`
    names by time, each [ops per step, microseconds per step] (which ops a fusion would remove)."""
    n, busy = 0, 0.0
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for path in glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True):
        events = json.load(gzip.open(path))["traceEvents"]
        meta = [e for e in events if e.get("ph") == "M"]
        gpu = {e["pid"] for e in meta if e.get("name") == "process_name"
               and "GPU" in str(e.get("args", {}).get("name", ""))}
        streams = {(e["pid"], e.get("tid")) for e in meta if e.get("name") == "thread_name"
                   and e["pid"] in gpu and "Stream" in str(e.get("args", {}).get("name", ""))}
        for e in events:
            if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams and "dur" in e:
                n, busy = n + 1, busy + e["dur"]
                agg = by_name[e.get("name", "?")[:120]]
                agg[0], agg[1] = agg[0] + 1, agg[1] + e["dur"]
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {"ops_per_step": round(n / steps, 1), "busy_us_per_step": round(busy / steps, 1),
            "ops_by_name": {k: [round(c / steps, 2), round(us / steps, 1)] for k, (c, us) in ranked}}


def measure(batches: tuple[int, ...], config: dict, windows: int = 3, window_steps: int = 150) -> dict:
    """This process's setting (`config`: EngineConfig fields): per batch, step ms per window, graph
    spans, token hashes."""
    import jax

    from jtrail.bench import step_breakdown as sb

    model = sb.random_model(sb.CFG, seed=0)
    out: dict = {"jax": jax.__version__, "device": jax.devices()[0].device_kind}
    k = config.get("decode_steps_per_call", 1)
    window_steps = max(20, window_steps // k)
    for b in batches:
        for asyn in (True, False):
            engine = sb.make_engine(model, b, asyn=asyn, steps=(windows * window_steps + 60) * k, **config)
            row = _measure_one(engine, b, windows if asyn else 1, window_steps, k)
            row["tokens_per_s"] = [round(b * k * 1e3 / ms) for ms in row["step_ms"]]
            out[f"b{b}" + ("" if asyn else "_sync")] = row
    return out


def _measure_one(engine, b: int, windows: int, window_steps: int, k: int = 1) -> dict:
    import jax

    tokens: dict[str, list[int]] = defaultdict(list)

    def step() -> None:
        for o in engine.step():
            tokens[o.request_id].extend(o.new_token_ids)

    for _ in range(10):
        step()
    wait_in_flight(engine)
    row: dict = {"step_ms": []}
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(window_steps):
            step()
        wait_in_flight(engine)
        row["step_ms"].append(round(1e3 * (time.perf_counter() - t0) / window_steps, 3))
    trace = tempfile.mkdtemp()
    jax.profiler.start_trace(trace)
    for _ in range(20):
        step()
    wait_in_flight(engine)
    jax.profiler.stop_trace()
    row["spans"] = graph_spans(trace)
    row["device"] = device_work(trace, 20)
    shutil.rmtree(trace)
    while engine.has_unfinished() and sum(map(len, tokens.values())) < b * (windows * window_steps + 30) * k:
        step()
    row["tokens_sha1"] = hashlib.sha1(json.dumps(sorted(tokens.items())).encode()).hexdigest()[:16]
    # every request's first PREFIX tokens: comparable between settings of any tokens per call
    first = sorted((r, t[:PREFIX]) for r, t in tokens.items())
    row[f"first{PREFIX}_sha1"] = hashlib.sha1(json.dumps(first).encode()).hexdigest()[:16]
    row["tokens"] = sum(map(len, tokens.values()))
    return row


# interleaved comparisons in one process: name -> {variant: (EngineConfig fields, thread switch interval)}
AB_SETS: dict[str, dict[str, tuple[dict, float | None]]] = {
    # the launcher's thread, and Python's thread switch interval at 0.5 ms instead of 5 ms (the
    # launcher waits for the GIL after each call while the engine's thread runs Python)
    "thread_ab": {"off": ({"decode_graphs": 2, "launch_thread": False}, None),
                  "on": ({"decode_graphs": 2, "launch_thread": True}, None),
                  "on_switch_0.5ms": ({"decode_graphs": 2, "launch_thread": True}, 0.0005)},
    # steps in flight: 1 (vLLM's async scheduling) against 2 (the host two steps ahead) with two
    # decode executables or one per call in flight (3)
    "depth_ab": {"depth1": ({"steps_in_flight": 1, "decode_graphs": 2}, None),
                 "depth2_graphs2": ({"steps_in_flight": 2, "decode_graphs": 2}, None),
                 "depth2_graphs3": ({"steps_in_flight": 2, "decode_graphs": 3}, None)},
    # the fetch blocks in the transfer, or polls readiness with the copy to host enqueued at launch
    "fetch_ab": {"block": ({"poll_fetch": False}, None), "poll": ({"poll_fetch": True}, None)},
    # a decode step's RoPE by the model (XLA) before the write and attention kernels, or inside one kernel
    # that rotates, writes the new K/V and attends (ops.decode_rope_write); one and eight tokens per call
    "rope_ab": {"xla_rope": ({"rope_in_kernel": False}, None),
                "kernel_rope": ({"rope_in_kernel": True}, None)},
    "rope_k8_ab": {"xla_rope": ({"rope_in_kernel": False, "decode_steps_per_call": 8}, None),
                   "kernel_rope": ({"rope_in_kernel": True, "decode_steps_per_call": 8}, None)},
    # the eight-token decode call's GEMMs: XLA's Triton fusions (split-K, its reductions extra ops) or cuBLAS
    "gemm_k8_ab": {"xla": ({"decode_gemms": "xla", "decode_steps_per_call": 8}, None),
                   "cublas": ({"decode_gemms": "cublas", "decode_steps_per_call": 8}, None)},
}


def measure_ab(set_name: str, batches: tuple[int, ...], windows: int = 6, window_steps: int = 150) -> dict:
    """One process, one engine per variant of AB_SETS[set_name], timed in windows of rotating order:
    the host's drift between processes and minutes cannot rank them, same-process interleaving can.
    Tokens must be equal. Ratios are the first variant's time over each other's."""
    import jax

    from jtrail.bench import step_breakdown as sb

    model = sb.random_model(sb.CFG, seed=0)
    out: dict = {"jax": jax.__version__, "device": jax.devices()[0].device_kind}
    variants = AB_SETS[set_name]
    names = list(variants)
    k = max(config.get("decode_steps_per_call", 1) for config, _ in variants.values())
    window_steps = max(20, window_steps // k)  # tokens per window as at one token per call
    for b in batches:
        engines = {v: sb.make_engine(model, b, asyn=True, steps=(windows * window_steps + 60) * k, **config)
                   for v, (config, _) in variants.items()}
        tokens: dict[str, dict[str, list[int]]] = {v: defaultdict(list) for v in engines}
        row: dict = {f"{v}_step_ms": [] for v in engines}

        def window(v: str, n: int, engines=engines, tokens=tokens) -> float:
            e, default_switch = engines[v], sys.getswitchinterval()
            if variants[v][1] is not None:
                sys.setswitchinterval(variants[v][1])
            t0 = time.perf_counter()
            for _ in range(n):
                for o in e.step():
                    tokens[v][o.request_id].extend(o.new_token_ids)
            wait_in_flight(e)
            took = 1e3 * (time.perf_counter() - t0) / n
            sys.setswitchinterval(default_switch)
            return took

        for v in names:
            window(v, 10)
        for i in range(windows):
            for v in names[i % len(names):] + names[:i % len(names)]:
                row[f"{v}_step_ms"].append(round(window(v, window_steps), 3))
        for v, e in engines.items():
            while e.has_unfinished():
                window(v, 1)
        first = sum(row[f"{names[0]}_step_ms"])
        for v in names[1:]:
            row[f"{names[0]}_over_{v}"] = round(first / sum(row[f"{v}_step_ms"]), 3)
        row["tokens_equal"] = all(tokens[v] == tokens[names[0]] for v in names)
        row["tokens"] = sum(map(len, tokens[names[0]].values()))
        out[f"b{b}"] = row
    return out


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child-ab"]:
        batches = tuple(int(x) for x in argv[2].split(","))
        print("RESULT " + json.dumps(measure_ab(argv[1], batches)), flush=True)
        return
    if argv[:1] == ["--child"]:
        batches = tuple(int(x) for x in argv[2].split(","))
        print("RESULT " + json.dumps(measure(batches, SETTINGS[argv[1]][2])), flush=True)
        return
    batches = "32"
    if "--batches" in argv:
        i = argv.index("--batches")
        batches, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    names = argv[0].split(",") if argv else list(DEFAULT_RUN)
    unknown = [n for n in names if n not in SETTINGS and n not in AB_SETS]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; known: {', '.join([*AB_SETS, *SETTINGS])}")
    path = os.path.join(os.environ.get("OUT") or ".", "graph_modes.json")
    res: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "git_commit": os.environ.get("GIT_COMMIT"), "settings": {}}
    for name in names:
        flags, extra, config = SETTINGS.get(name, ("", {}, {}))
        env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip(), **extra}
        cmd = [sys.executable, "-m", "jtrail.bench.graph_modes",
               *(["--child-ab", name, batches] if name in AB_SETS else ["--child", name, batches])]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            got = json.loads(line[0][7:]) if line else {"rc": p.returncode, "stderr_tail": p.stderr[-800:]}
        except subprocess.TimeoutExpired:
            got = {"error": "timed out after 300 s"}
        got.update(xla_flags=env["XLA_FLAGS"], engine_config=config, **extra)
        got["wall_s"] = round(time.time() - t0, 1)
        first = next(iter(res["settings"].values()), {})  # tokens compared with the run's first setting
        res["settings"][name] = got
        for key in [f"b{b}{m}" for b in batches.split(",") for m in ("", "_sync")]:
            if key in got and key in first and f"first{PREFIX}_sha1" in first[key]:
                got[key]["tokens_equal_first_setting"] = (got[key][f"first{PREFIX}_sha1"]
                                                          == first[key][f"first{PREFIX}_sha1"])
        print(name, json.dumps(got)[:600], flush=True)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
