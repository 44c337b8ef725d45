"""What a step that also prefills costs over a decode-only step (issues 15 and 16).

    python -m jtrail.bench.prefill_cost LABEL      # -> $OUT/prefill_cost_LABEL.json, a table on stdout

Serving steps that admit a request (or run trail's probe-only prefill of a waiting one) carry a
packed prefill call beside the decode call. On the H200 such a step cost ~2 ms more than a
decode-only step (4.7 against 2.4-2.5 ms medians in the replay benchmark's step logs), about as
much as a whole decode step, and in overload that extra time queues every later arrival.

Method: random SmolLM2-135M weights (the tiny shape on a CPU, to check the script), batch 32 slots, the
engine's defaults but for three prefill capacities. One engine per variant (VARIANTS: a step's prefill
as a call of its own, `mixed_steps=False`, or in one forward with the decode rows), in one process.
In each, DECODE_ROWS requests run as already prefilled at ctx 512 and never finish in the run; the
other slots take the arrivals. Windows in rotating order over (variant, P): P = 0 adds nothing (decode
only); otherwise every step adds one request of P random tokens and max_tokens 1 (it prefills, samples
its one token and leaves), so every step prefills. Per window: wall ms per step and device calls per
step (the runner's count). What a prefill adds to a step: the P window's ms - the decode-only
window's, same engine. Then one profiled window per (variant, P): the host spans of the graph
launches and updates and the GPU's ops by name (graph_modes' helpers). A tree without `mixed_steps`
(an older commit) runs the first variant only.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from jtrail.bench.engine_decode import place_prefilled, wait_in_flight
from jtrail.bench.graph_modes import device_work, graph_spans

SLOTS, DECODE_ROWS, CTX = 32, 28, 512
# engine variants measured in one process (EngineConfig fields); a tree without a field is measured
# with "two_calls" only
VARIANTS = {"two_calls": {"mixed_steps": False}, "mixed": {"mixed_steps": True}}


def _engine(model, cpu: bool, config: dict):
    from jtrail.serving.engine.config import EngineConfig
    from jtrail.serving.engine.llm_engine import LLMEngine

    ctx = 32 if cpu else CTX
    max_len = ctx + 4000
    # three prefill capacities (16, 32, 256 tokens): the ones the windows use, few compilations
    cfg = EngineConfig(kernel_impl="reference" if cpu else "auto", num_slots=SLOTS, page_size=16,
                       num_pages=SLOTS * (max_len // 16 + 2) + 1, max_model_len=max_len, max_queue=4096,
                       prefill_buckets=(16, 32, 256), max_prefill_tokens_per_step=256, **config)
    engine = LLMEngine(model, config=cfg)
    place_prefilled(engine, DECODE_ROWS, ctx, 3900, np.random.default_rng(0))
    return engine


def run(label: str, prompt_lens: tuple[int, ...], windows: int, steps: int) -> dict:
    import dataclasses

    import jax

    from jtrail.bench import step_breakdown as sb
    from jtrail.serving.engine.config import EngineConfig

    cpu = jax.default_backend() == "cpu"
    model = sb.random_model(sb.CFG, seed=0)
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    engines = {v: _engine(model, cpu, {k: x for k, x in c.items() if k in fields})
               for v, c in VARIANTS.items() if set(c) <= fields or v == "two_calls"}
    vocab = int(model.cfg.vocab_size)
    rng = np.random.default_rng(1)
    added = [0]

    def window(engine, plen: int, n: int) -> tuple[float, float]:
        calls0 = engine.runner.calls
        t0 = time.perf_counter()
        for _ in range(n):
            if plen:
                added[0] += 1
                engine.add_request(f"p{added[0]}", rng.integers(3, vocab, plen).tolist(),
                                   _params(max_tokens=1))
            engine.step()
        wait_in_flight(engine)
        ms = 1e3 * (time.perf_counter() - t0) / n
        return ms, (engine.runner.calls - calls0) / n

    cells = [(v, p) for v in engines for p in (0, *prompt_lens)]
    for v, p in cells:  # untimed: compiles what the windows use (each compiled copy)
        window(engines[v], p, 10)
    rows: dict = {cell: {"step_ms": [], "calls_per_step": []} for cell in cells}
    for i in range(windows):
        for v, p in cells[i % len(cells):] + cells[:i % len(cells)]:
            ms, calls = window(engines[v], p, steps)
            rows[v, p]["step_ms"].append(round(ms, 3))
            rows[v, p]["calls_per_step"].append(round(calls, 3))
    out: dict = {"label": label, "jax": jax.__version__, "device": jax.devices()[0].device_kind,
                 "slots": SLOTS, "decode_rows": DECODE_ROWS, "ctx": 32 if cpu else CTX,
                 "windows": windows, "steps_per_window": steps, "variants": {}}
    for v, engine in engines.items():
        decode_ms = float(np.mean(rows[v, 0]["step_ms"]))
        res: dict = {"config": VARIANTS[v], "decode_only": rows[v, 0]}
        for plen in prompt_lens:
            r = rows[v, plen]
            r["added_ms_per_step"] = round(float(np.mean(r["step_ms"])) - decode_ms, 3)
            trace = tempfile.mkdtemp()
            jax.profiler.start_trace(trace)
            window(engine, plen, 20)
            jax.profiler.stop_trace()
            r["spans"] = graph_spans(trace)
            r["device"] = device_work(trace, 20)
            shutil.rmtree(trace)
            res[f"prompt_{plen}"] = r
        out["variants"][v] = res
    return out


def _params(**kw):
    from jtrail.serving.sequence import SamplingParams

    return SamplingParams(ignore_eos=True, **kw)


def main(argv: list[str]) -> None:
    label = argv[0] if argv else "run"
    import jax

    cpu = jax.default_backend() == "cpu"
    res = run(label, (16, 256) if cpu else (32, 256), windows=2 if cpu else 4, steps=8 if cpu else 100)
    path = os.path.join(os.environ.get("OUT") or ".", f"prefill_cost_{label}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    for v, r in res["variants"].items():
        print(f"{label} {v}: decode-only {np.mean(r['decode_only']['step_ms']):.3f} ms/step")
        for key in [k for k in r if k.startswith("prompt_")]:
            p = r[key]
            print(f"{label} {v}: {key}: {np.mean(p['step_ms']):.3f} ms/step "
                  f"(+{p['added_ms_per_step']:.3f} over decode-only), "
                  f"{np.mean(p['calls_per_step']):.2f} device calls/step; "
                  f"ops/step {p['device'].get('ops_per_step')}, "
                  f"busy us/step {p['device'].get('busy_us_per_step')}")


if __name__ == "__main__":
    main(sys.argv[1:])
