"""Does the decode step's CUDA graph get updated on every call, and what does each XLA setting do to
the engine's step time and tokens (issue 16)?

    python -m jtrail.bench.graph_modes [SETTING,...] [--batches 32,128]
                                          # -> $OUT/graph_modes.json (or ./graph_modes.json)

SmolLM2-135M shape, random bf16 weights, ctx 512, batch 32 (default), one token per call, async engine.
Each setting (names of engine_subprocesses.COMMAND_BUFFERS: XLA flags and, for "vmm*", CUDA's
virtual-memory allocator; "twin": XLA's defaults, the engine alternating two compiled copies of the
decode step, EngineConfig.decode_graphs=2) runs in its own process: three timed windows of 150
engine steps, then a profiler trace of 20 steps whose command-buffer spans (update, launch) are
summarized, and a hash of every token the engine produced, which must equal the default setting's
(a graph not updated when an address moved computes garbage). The file is rewritten after each
setting.

On the H200 (2026-12-03, jaxlib 0.11.2, default setting, batch 32) every decode call updated its
graph (`command_buffer::update` medians 951 and 1,290 us of host time per call in two runs, then
`cuGraphLaunch` 977 and 1,264 us; results/engine_dispatch.json, followup_2026_12_03) although the
call's inputs and outputs keep their addresses (model_runner.DecodeIO): the step is host-bound on
these two spans.
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
from jtrail.bench.engine_subprocesses import COMMAND_BUFFER_ENV, COMMAND_BUFFERS

SETTINGS = ("thread_ab",)  # ~2 minutes each on a fresh H200
# settings beyond XLA's flags: the engine's decode_graphs and environment variables of CUDA's driver
# (CUDA_SCALE_LAUNCH_QUEUES: the host blocks in a launch when the driver's launch queue is full)
TWIN_SETTINGS = {"twin": {}, "twin_queues4x": {"CUDA_SCALE_LAUNCH_QUEUES": "4x"}, "twin_thread": {}}
THREAD_SETTINGS = ("twin_thread",)  # and the runner's launch thread (EngineConfig.launch_thread)


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


def device_work(trace_dir: str, steps: int) -> dict[str, float]:
    """Per engine step: the GPU's ops (kernels, copies: events on a GPU's stream lines, not on the
    trace's derived lines such as "XLA Ops") and their summed microseconds."""
    n, busy = 0, 0.0
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
    return {"ops_per_step": round(n / steps, 1), "busy_us_per_step": round(busy / steps, 1)}


def measure(batches: tuple[int, ...], decode_graphs: int = 1, windows: int = 3,
            window_steps: int = 150, launch_thread: bool = False) -> dict:
    """This process's setting: per batch, step ms per window, graph spans, token hash."""
    import jax

    from jtrail.bench import step_breakdown as sb

    model = sb.random_model(sb.CFG, seed=0)
    out: dict = {"jax": jax.__version__, "device": jax.devices()[0].device_kind}
    for b in batches:
        for asyn in (True, False):
            out[f"b{b}" + ("" if asyn else "_sync")] = _measure_one(
                sb.make_engine(model, b, asyn=asyn, steps=windows * window_steps + 60,
                               decode_graphs=decode_graphs, launch_thread=launch_thread),
                b, windows if asyn else 1, window_steps)
    return out


def _measure_one(engine, b: int, windows: int, window_steps: int) -> dict:
    import jax

    tokens: dict[str, list[int]] = defaultdict(list)

    def step() -> None:
        for o in engine.step():
            tokens[o.request_id].extend(o.new_token_ids)

    def drain() -> None:
        wait_in_flight(engine)

    for _ in range(10):
        step()
    drain()
    row: dict = {"step_ms": []}
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(window_steps):
            step()
        drain()
        row["step_ms"].append(round(1e3 * (time.perf_counter() - t0) / window_steps, 3))
    trace = tempfile.mkdtemp()
    jax.profiler.start_trace(trace)
    for _ in range(20):
        step()
    drain()
    jax.profiler.stop_trace()
    row["spans"] = graph_spans(trace)
    row["device"] = device_work(trace, 20)
    shutil.rmtree(trace)
    while engine.has_unfinished() and sum(map(len, tokens.values())) < b * (windows * window_steps + 30):
        step()
    row["tokens_sha1"] = hashlib.sha1(json.dumps(sorted(tokens.items())).encode()).hexdigest()[:16]
    row["tokens"] = sum(map(len, tokens.values()))
    return row


def measure_thread_ab(batches: tuple[int, ...], windows: int = 6, window_steps: int = 150) -> dict:
    """One process, three engines (two decode executables each): the runner's launch thread off, on,
    and on with Python's thread switch interval at 0.5 ms instead of 5 ms (the launcher waits for the
    GIL after each call while the engine's thread runs Python), timed in windows of rotating order:
    the host's drift between processes and minutes cannot rank them, same-process interleaving can.
    Tokens must be equal."""
    import jax

    from jtrail.bench import step_breakdown as sb

    model = sb.random_model(sb.CFG, seed=0)
    out: dict = {"jax": jax.__version__, "device": jax.devices()[0].device_kind}
    variants = {"off": (False, None), "on": (True, None), "on_switch_0.5ms": (True, 0.0005)}
    for b in batches:
        engines = {v: sb.make_engine(model, b, asyn=True, steps=windows * window_steps + 60, decode_graphs=2,
                                     launch_thread=t) for v, (t, _) in variants.items()}
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

        names = list(engines)
        for v in names:
            window(v, 10)
        for i in range(windows):
            for v in names[i % 3:] + names[:i % 3]:
                row[f"{v}_step_ms"].append(round(window(v, window_steps), 3))
        for v, e in engines.items():
            while e.has_unfinished():
                window(v, 1)
        off = sum(row["off_step_ms"])
        for v in names[1:]:
            row[f"off_over_{v}"] = round(off / sum(row[f"{v}_step_ms"]), 3)
        row["tokens_equal"] = all(tokens[v] == tokens["off"] for v in names)
        row["tokens"] = sum(map(len, tokens["off"].values()))
        out[f"b{b}"] = row
    return out


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child-ab"]:
        batches = tuple(int(x) for x in argv[1].split(","))
        print("RESULT " + json.dumps(measure_thread_ab(batches)), flush=True)
        return
    if argv[:1] == ["--child"]:
        batches = tuple(int(x) for x in argv[1].split(","))
        print("RESULT " + json.dumps(measure(batches, decode_graphs=int(argv[2]),
                                             launch_thread=argv[3:] == ["thread"])), flush=True)
        return
    batches = "32"
    if "--batches" in argv:
        i = argv.index("--batches")
        batches, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    names = argv[0].split(",") if argv else list(SETTINGS)
    path = os.path.join(os.environ.get("OUT") or ".", "graph_modes.json")
    res: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "git_commit": os.environ.get("GIT_COMMIT"), "settings": {}}
    for name in names:
        flags = "" if name in ("default", "thread_ab") or name in TWIN_SETTINGS else COMMAND_BUFFERS[name]
        extra = {**COMMAND_BUFFER_ENV.get(name, {}), **TWIN_SETTINGS.get(name, {})}
        env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip(), **extra}
        t0 = time.time()
        try:
            graphs = "2" if name in TWIN_SETTINGS else "1"
            cmd = [sys.executable, "-m", "jtrail.bench.graph_modes", "--child", batches, graphs,
                   *(["thread"] if name in THREAD_SETTINGS else [])]
            if name == "thread_ab":
                cmd = [sys.executable, "-m", "jtrail.bench.graph_modes", "--child-ab", batches]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            got = json.loads(line[0][7:]) if line else {"rc": p.returncode, "stderr_tail": p.stderr[-800:]}
        except subprocess.TimeoutExpired:
            got = {"error": "timed out after 300 s"}
        got.update(xla_flags=env["XLA_FLAGS"], wall_s=round(time.time() - t0, 1), **extra)
        res["settings"][name] = got
        ref = res["settings"].get("default", {})
        for key in [f"b{b}{m}" for b in batches.split(",") for m in ("", "_sync")]:
            if key in got and key in ref:
                got[key]["tokens_equal_default"] = got[key]["tokens_sha1"] == ref[key]["tokens_sha1"]
        print(name, json.dumps(got)[:600], flush=True)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
