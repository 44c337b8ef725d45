"""What a step that also prefills costs over a decode-only step (issues 15 and 16).

    python -m jtrail.bench.prefill_cost LABEL      # -> $OUT/prefill_cost_LABEL.json, a table on stdout

Serving steps that admit a request (or run trail's probe-only prefill of a waiting one) carry a
packed prefill call beside the decode call. On the H200 such a step cost ~2 ms more than a
decode-only step (4.7 against 2.4-2.5 ms medians in the replay benchmark's step logs), about as
much as a whole decode step, and in overload that extra time queues every later arrival.

Method: random SmolLM2-135M weights (the tiny shape on a CPU, to check the script), batch 32 slots, the
engine's defaults. `decode_rows` requests run as already prefilled at ctx 512 and never finish in the
run; the other slots take the arrivals. Windows alternate, in one engine: a decode-only window
(nothing added) and, per prompt length P, a window where every step adds one request of P random
tokens and max_tokens 1 (it prefills, samples its one token and leaves). Per window: wall ms per step
and prefill calls per step (the runner's call count). The marginal cost of a prefill call is
(prefill window's ms - decode window's ms) / prefill calls per step. Then one profiled window per P:
the host spans of the graph launches and updates and the GPU's ops by name (graph_modes' helpers).
Run it from two trees (two processes, alternating) to compare them; the figures are this machine's.
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


def _engine(model, cpu: bool):
    from jtrail.serving.engine.config import EngineConfig
    from jtrail.serving.engine.llm_engine import LLMEngine

    ctx = 32 if cpu else CTX
    max_len = ctx + 4000
    cfg = EngineConfig(kernel_impl="reference" if cpu else "auto", num_slots=SLOTS, page_size=16,
                       num_pages=SLOTS * (max_len // 16 + 2) + 1, max_model_len=max_len, max_queue=4096)
    engine = LLMEngine(model, config=cfg)
    engine.warmup()
    place_prefilled(engine, DECODE_ROWS, ctx, 3900, np.random.default_rng(0))
    return engine


def run(label: str, prompt_lens: tuple[int, ...], windows: int, steps: int) -> dict:
    import jax

    from jtrail.bench import step_breakdown as sb

    cpu = jax.default_backend() == "cpu"
    model = sb.random_model(sb.CFG, seed=0)
    engine = _engine(model, cpu)
    vocab = int(engine.model_cfg.vocab_size)
    rng = np.random.default_rng(1)
    added = [0]

    def window(plen: int, n: int) -> tuple[float, float]:
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
        return ms, (engine.runner.calls - calls0) / n - 1.0  # the decode call is one a step

    variants = (0, *prompt_lens)
    for v in variants:
        window(v, 10)
    rows: dict = {v: {"step_ms": [], "prefill_calls_per_step": []} for v in variants}
    for i in range(windows):
        order = variants[i % len(variants):] + variants[:i % len(variants)]
        for v in order:
            ms, pre = window(v, steps)
            rows[v]["step_ms"].append(round(ms, 3))
            rows[v]["prefill_calls_per_step"].append(round(pre, 3))
    decode_ms = float(np.mean(rows[0]["step_ms"]))
    out: dict = {"label": label, "jax": jax.__version__, "device": jax.devices()[0].device_kind,
                 "slots": SLOTS, "decode_rows": DECODE_ROWS, "ctx": 32 if cpu else CTX,
                 "windows": windows, "steps_per_window": steps, "decode_only": rows[0]}
    for plen in prompt_lens:
        r = rows[plen]
        ms, calls = float(np.mean(r["step_ms"])), float(np.mean(r["prefill_calls_per_step"]))
        r["marginal_ms_per_prefill_call"] = round((ms - decode_ms) / max(calls, 1e-9), 3)
        trace = tempfile.mkdtemp()
        jax.profiler.start_trace(trace)
        window(plen, 20)
        jax.profiler.stop_trace()
        r["spans"] = graph_spans(trace)
        r["device"] = device_work(trace, 20)
        shutil.rmtree(trace)
        out[f"prompt_{plen}"] = r
    return out


def _params(**kw):
    from jtrail.serving.sequence import SamplingParams

    return SamplingParams(ignore_eos=True, **kw)


def main(argv: list[str]) -> None:
    label = argv[0] if argv else "run"
    import jax

    cpu = jax.default_backend() == "cpu"
    res = run(label, (16, 256) if cpu else (32, 256), windows=2 if cpu else 6, steps=8 if cpu else 100)
    path = os.path.join(os.environ.get("OUT") or ".", f"prefill_cost_{label}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{label}: decode-only {np.mean(res['decode_only']['step_ms']):.3f} ms/step")
    for key in [k for k in res if k.startswith("prompt_")]:
        r = res[key]
        print(f"{label}: {key}: {np.mean(r['step_ms']):.3f} ms/step, "
              f"{np.mean(r['prefill_calls_per_step']):.2f} prefill calls/step, "
              f"+{r['marginal_ms_per_prefill_call']:.3f} ms per prefill call; "
              f"ops/step {r['device'].get('ops_per_step')}, "
              f"busy us/step {r['device'].get('busy_us_per_step')}")


if __name__ == "__main__":
    main(sys.argv[1:])
