"""The server's start-up banner: what is being served (model, dtype, policy, slots, KV bytes).

Warm-up itself (compile before serving) is the engine's: `LLMEngine.warmup()`,
serving/engine/warmup.py.
"""

from __future__ import annotations


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
