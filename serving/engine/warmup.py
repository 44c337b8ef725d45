"""Engine warm-up: compile before serving (without it a fresh engine's first requests wait 7-20 s
for XLA, and a benchmark's first steps stall for seconds).

`warm_up` drives the engine's public API (add_request/step) with one synthetic request per packed
prefill capacity, each generating past one decode call, so every prefill shape and the decode step
are compiled before the engine takes traffic. `LLMEngine.warmup()` is the entry point.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..paging import pages_for
from ..sequence import SamplingParams

if TYPE_CHECKING:
    from .llm_engine import LLMEngine

log = logging.getLogger(__name__)


def warm_up(engine: LLMEngine, report: Callable[[str], None] = log.info) -> float:
    """Run one request per prefill capacity of `engine.runner` to completion; returns the seconds it
    took. Leaves the engine empty (every warm-up request finishes; its pages are freed)."""
    t0 = time.perf_counter()
    runner, cfg = engine.runner, engine.config
    caps = tuple(getattr(runner, "prefill_capacities", ())) or (16,)
    # the first token comes from prefill, then one decode call per decode executable (decode_graphs)
    new = cfg.decode_steps_per_call * getattr(runner, "decode_graphs", 1) + 1
    # the longest prompt the engine admits: context and the KV pool both bound it
    limit = max(1, min(cfg.max_model_len, cfg.num_pages * cfg.page_size) - new - 1)
    row = int(getattr(runner, "prefill_row_tokens", 1))
    prevs = (0, *caps[:-1])
    plans = [p for p in (_prompts_for(c, prev, limit, row, cfg, new)
                         for prev, c in zip(prevs, caps, strict=True)) if p]
    vocab = int(engine.model_cfg.vocab_size)
    shapes = len(plans)
    # each prefill capacity once per compiled copy of the prefill step (prefill_graphs); a mixed step
    # (prefill and decode rows in one forward) also has a variant that sorts the vocabulary for top-p
    # or top-k: both, or the first such request would compile it under traffic
    copies = int(getattr(runner, "prefill_graphs", 1))
    top_ps = (1.0, 0.9) if getattr(runner, "mixed_steps", False) else (1.0,)
    # (copies innermost: consecutive calls of a capacity take its copies in turn)
    plans = [(p, top_p) for p in plans for top_p in top_ps for _ in range(copies)]
    for i, (lengths, top_p) in enumerate(plans, 1):
        report(f"warm-up {i}/{len(plans)}: compiling prefill of {sum(lengths)} tokens "
               f"({len(lengths)} prompt{'s' if len(lengths) > 1 else ''}) and the decode step")
        params = SamplingParams(max_tokens=new, ignore_eos=True, temperature=1.0 if top_p < 1 else 0.0,
                                top_p=top_p, seed=0)
        for j, n in enumerate(lengths):  # added together: one step packs them into one call
            ids = (np.arange(n) % max(1, vocab - 3) + 3).tolist()  # any valid ids: only shapes matter
            # its length is known (ignore_eos): srpt-oracle engines warm up too
            engine.add_request(f"__warmup-{i}-{j}", ids, params, oracle_length=new)
        while engine.has_unfinished():
            engine.step()
    took = time.perf_counter() - t0
    report(f"warm-up done in {took:.1f}s ({shapes} prefill shapes)")
    return took


def _prompts_for(cap: int, prev: int, limit: int, row: int, cfg: Any, new: int) -> list[int]:
    """Prompt lengths whose packed prefill compiles capacity `cap`: a padded total in (prev, cap],
    as large as the slots allow (several prompts when one may not be that long); [] when no step
    can need this capacity (the slots or KV pages cannot hold more than `prev` tokens at once).
    `new`: the tokens each warm-up request generates."""
    if cap <= limit:
        return [cap]
    unit = -(-limit // row) * row  # what the longest admissible prompt occupies in the packed call
    total = min(cap, cfg.num_slots * unit)
    if total <= prev:
        return []
    k = -(-total // unit)
    sizes = [unit] * (k - 1) + [total - unit * (k - 1)]
    lengths = [min(n, limit) for n in sizes]  # each pads back to its size: the call holds `total`
    pages = sum(pages_for(n + new, cfg.page_size) for n in lengths)
    return lengths if pages <= cfg.num_pages else []
