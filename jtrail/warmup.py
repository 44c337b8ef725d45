"""Compile before serving: without it the first requests of a fresh server wait 7-20 s for XLA.

`warm_up` drives the engine's public API (add_request/step) with one synthetic request per packed
prefill capacity, each generating past one decode call, so every prefill shape and the decode step
are compiled before the server says it is ready. Then the start-up banner: what is being served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from jtrail.serving.paging import pages_for

log = logging.getLogger("jtrail.serve")


def warm_up(engine, report: Callable[[str], None] = log.info) -> float:
    """Run one request per prefill capacity of `engine.runner` (LLMEngine) to completion; returns the
    seconds it took. Leaves the engine empty (every warm-up request finishes; its pages are freed)."""
    from jtrail.serving.sequence import SamplingParams

    t0 = time.perf_counter()
    runner, cfg = engine.runner, engine.config
    caps = tuple(getattr(runner, "prefill_capacities", ())) or (16,)
    new = cfg.decode_steps_per_call + 1  # the first token comes from prefill: > 1 decode call
    # the longest prompt the engine admits: context and the KV pool both bound it
    limit = max(1, min(cfg.max_model_len, cfg.num_pages * cfg.page_size) - new - 1)
    row = int(getattr(runner, "prefill_row_tokens", 1))
    prevs = (0, *caps[:-1])
    plans = [p for p in (_prompts_for(c, prev, limit, row, cfg) for prev, c in zip(prevs, caps, strict=True))
             if p]
    vocab = int(engine.model_cfg.vocab_size)
    for i, lengths in enumerate(plans, 1):
        report(f"warm-up {i}/{len(plans)}: compiling prefill of {sum(lengths)} tokens "
               f"({len(lengths)} prompt{'s' if len(lengths) > 1 else ''}) and the decode step")
        for j, n in enumerate(lengths):  # added together: one step packs them into one call
            ids = (np.arange(n) % max(1, vocab - 3) + 3).tolist()  # any valid ids: only shapes matter
            # its length is known (ignore_eos): srpt-oracle engines warm up too
            engine.add_request(f"__warmup-{i}-{j}", ids, SamplingParams(max_tokens=new, ignore_eos=True),
                               oracle_length=new)
        while engine.has_unfinished():
            engine.step()
    took = time.perf_counter() - t0
    report(f"warm-up done in {took:.1f}s ({len(plans)} prefill shapes)")
    return took


def _prompts_for(cap: int, prev: int, limit: int, row: int, cfg) -> list[int]:
    """Prompt lengths whose packed prefill compiles capacity `cap`: a padded total in (prev, cap],
    as large as the slots allow (several prompts when one may not be that long); [] when no step
    can need this capacity (the slots or KV pages cannot hold more than `prev` tokens at once)."""
    if cap <= limit:
        return [cap]
    unit = -(-limit // row) * row  # what the longest admissible prompt occupies in the packed call
    total = min(cap, cfg.num_slots * unit)
    if total <= prev:
        return []
    k = -(-total // unit)
    sizes = [unit] * (k - 1) + [total - unit * (k - 1)]
    lengths = [min(n, limit) for n in sizes]  # each pads back to its size: the call holds `total`
    pages = sum(pages_for(n + cfg.decode_steps_per_call + 1, cfg.page_size) for n in lengths)
    return lengths if pages <= cfg.num_pages else []


def _kv_bytes(engine) -> tuple[int | None, str]:
    caches = getattr(getattr(engine, "runner", None), "caches", None)
    if caches is None:
        return None, "-"
    import jax

    leaves = jax.tree.leaves(caches)
    dtype = str(leaves[0].dtype) if leaves else "-"  # the model computes in its KV cache's dtype
    return int(sum(getattr(x, "nbytes", 0) for x in leaves)), dtype


def banner(async_engine, addresses: dict[str, str]) -> list[str]:
    """Lines that say what is served, as vLLM prints at start-up: model, dtype, policy, probe, slots,
    KV pages and bytes, max context, and where to reach it."""
    info = async_engine.info()
    inner = getattr(async_engine, "engine", None)
    kv, dtype = _kv_bytes(inner) if inner is not None else (None, "-")
    kv_text = f" ({kv / 2**20:.1f} MiB)" if kv else ""
    lines = [f"model {info.model_name} (dtype {dtype}, vocab {info.vocab_size}); policy {info.policy}; "
             f"probe {info.probe or 'none'}",
             f"{info.num_slots} slots; KV cache {info.num_pages} pages x {info.page_size} tokens{kv_text}; "
             f"max context {info.max_model_len} tokens",
             "; ".join(f"{k} {v}" for k, v in addresses.items())]
    return lines
