"""Token sampling with per-row parameters, jittable (one compiled function serves a mixed batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def needs_filter(temperature: np.ndarray, top_p: np.ndarray, top_k: np.ndarray) -> bool:
    """Host side: does any sampled row (temperature > 0) ask for top-p or top-k? If not,
    `sample_tokens(..., filtered=False)` gives the same tokens without sorting the vocabulary."""
    sampled = np.asarray(temperature) > 0
    return bool(np.any(sampled & ((np.asarray(top_p) < 1.0) | (np.asarray(top_k) > 0))))


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array,
                  top_k: jax.Array, filtered: bool = True) -> jax.Array:
    """logits [B, V] f32; keys [B] PRNG keys (one per row: a row's draws don't depend on its
    neighbours); temperature/top_p [B] f32 (temperature 0 = greedy); top_k [B] int32 (0 = off).
    `filtered=False` (static) skips top-p/top-k: valid only when no sampled row uses them
    (`needs_filter`). The sort over the vocabulary costs more device time than the rest of the
    sampling (H200, SmolLM2 decode: 0.3 ms of a 1.8 ms step at batch 32, 0.55 of 2.55 at 128)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    if not filtered:
        sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(temperature > 0, sampled, greedy)
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    # top-k: keep values >= the k-th largest.
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)
    # top-p: keep the smallest prefix of sorted probabilities whose mass reaches top_p.
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    cum = jnp.cumsum(sorted_probs, axis=-1)
    keep_sorted = (cum - sorted_probs) < top_p[:, None]
    n_keep = jnp.maximum(jnp.sum(keep_sorted, axis=-1), 1)
    pth = jnp.take_along_axis(sorted_logits, (n_keep - 1)[:, None], axis=-1)
    threshold = jnp.maximum(kth, pth)
    masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, masked).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
