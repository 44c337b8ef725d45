"""Scratch (issue 3): run each default GPU kernel a few times so `ncu` can profile one launch of each
(registers, shared memory, occupancy, DRAM throughput, duration):
    ncu --clock-control none -k regex:jtrail --launch-count 2 python -m jtrail.bench.kernel_profile
"""

from __future__ import annotations


def main() -> None:
    import jax
    import jax.numpy as jnp

    from jtrail.kernels.paged_attention_gpu import decode_attention_pallas, prefill_attention_pallas_gpu

    b, ctx = 64, 512
    k = jax.random.normal(jax.random.key(0), (8, 2 * b * ctx // 16 + 1, 16, 128), jnp.bfloat16)
    bt = jnp.arange(1, b * ctx // 16 + 1, dtype=jnp.int32).reshape(b, -1)
    n = jnp.full((b,), ctx, jnp.int32)
    jax.block_until_ready(decode_attention_pallas(jnp.ones((b, 32, 128), jnp.bfloat16), k, k, n, bt))
    q = jnp.ones((4, 1024, 32, 128), jnp.bfloat16)
    n4 = jnp.full((4,), 1024, jnp.int32)
    jax.block_until_ready(prefill_attention_pallas_gpu(q, k, k, n4 * 0, n4, bt[:4, :64]))


if __name__ == "__main__":
    main()
