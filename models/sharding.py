"""Tensor parallelism: a device mesh, named shardings for Llama weights and KV caches.

XLA's SPMD partitioner is the distributed engine: we only say where each array lives (NamedSharding)
and the jitted step is partitioned from its inputs. Megatron layout over the mesh axis "tp":

  column-parallel (output dim split): qkv_proj [d, Hkv*(G+2)*D] over kv heads, gate_up_proj [d, F*2]
                                      over F (the fused layouts of fused.py: a contiguous split
                                      keeps each kv head's q group, k and v on one device)
  row-parallel (input dim split):     o_proj [Hq*D, d], down_proj [F, d]  (XLA inserts the all-reduce)
  vocab-parallel:                     embed [V, d] over V, lm_head [d, V] over V
  replicated:                         norms, and any parameter we do not know (e.g. a probe head)
  KV cache over kv heads:             paged [Hkv, P, S, D] on axis 0, contiguous [B, S, Hkv, D] on axis 2

The fused qkv columns are grouped by kv head (its G query heads, then k, then v), so a contiguous
split gives device i the kv heads [i*Hkv/tp, (i+1)*Hkv/tp) with exactly their GQA groups of q heads
[i*Hq/tp, (i+1)*Hq/tp); gate/up columns interleave (gate f, up f), so device i gets one F range of both.
Attention kernels are per-head, so under TP they run per shard through `shard_attention_fn`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .attention import unpack_qkv
from .config import ModelConfig
from .errors import JtrailError

TP_AXIS = "tp"

COLUMN_PARALLEL = ("qkv_proj", "gate_up_proj")
COLUMN_BIASES = ("qkv_bias",)
ROW_PARALLEL = ("o_proj", "down_proj")

# KV cache layouts: paged per layer [Hkv, num_pages, page_size, D]; contiguous [B, S, Hkv, D].
KV_SPECS = {"paged": P(TP_AXIS, None, None, None), "contiguous": P(None, None, TP_AXIS, None)}


class ShardingError(JtrailError, ValueError):
    """A tensor-parallel layout that cannot be built (bad degree, too few devices, bad layout)."""


def check_tp_compatible(cfg: ModelConfig, tp: int) -> None:
    """Raise ShardingError unless heads and FFN columns split evenly over `tp` devices."""
    if not isinstance(tp, int) or tp < 1:
        raise ShardingError(f"tensor_parallel must be a positive int, got {tp!r}")
    if cfg.n_kv_heads % tp:
        divisors = [d for d in range(1, cfg.n_kv_heads + 1) if cfg.n_kv_heads % d == 0]
        raise ShardingError(
            f"tensor_parallel={tp} is impossible for model {cfg.name!r}: its {cfg.n_kv_heads} kv heads "
            f"do not split evenly over {tp} devices (TP shards attention by kv head). Use a degree in "
            f"{divisors}, or data-parallel replicas (one per device) instead.")
    if cfg.ffn_dim % tp:
        raise ShardingError(f"tensor_parallel={tp} does not divide ffn_dim={cfg.ffn_dim} of {cfg.name!r}")


def make_mesh(tp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over the first `tp` of `devices` (default: all devices, every host)."""
    devs = list(jax.devices() if devices is None else devices)
    if not isinstance(tp, int) or tp < 1:
        raise ShardingError(f"tensor_parallel must be a positive int, got {tp!r}")
    if tp > len(devs):
        raise ShardingError(
            f"tensor_parallel={tp} needs {tp} devices but only {len(devs)} are available "
            f"({jax.default_backend()}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={tp} "
            "before importing jax")
    return Mesh(np.array(devs[:tp]), (TP_AXIS,))


def replica_meshes(tp: int, num_replicas: int, devices: Sequence[jax.Device] | None = None) -> list[Mesh]:
    """Disjoint meshes for data-parallel replicas: replica r gets devices [r*tp, (r+1)*tp)."""
    devs = list(jax.devices() if devices is None else devices)
    if tp * num_replicas > len(devs):
        raise ShardingError(f"{num_replicas} replicas x tensor_parallel={tp} need {tp * num_replicas} "
                            f"devices, have {len(devs)}")
    return [make_mesh(tp, devs[r * tp:(r + 1) * tp]) for r in range(num_replicas)]


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Join a multi-host job via `jax.distributed` (call before any other JAX work).

    Arguments default to JTRAIL_COORDINATOR / JTRAIL_NUM_PROCESSES / JTRAIL_PROCESS_ID; with none
    given and no cluster auto-detected this is a single-host run and nothing happens (returns False).
    Afterwards `jax.devices()` lists every host's devices, so `make_mesh` spans hosts."""
    coordinator_address = coordinator_address or os.environ.get("JTRAIL_COORDINATOR")
    if num_processes is None and "JTRAIL_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JTRAIL_NUM_PROCESSES"])
    if process_id is None and "JTRAIL_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JTRAIL_PROCESS_ID"])
    if coordinator_address is None and (num_processes or 1) <= 1:
        return False
    if coordinator_address is None or num_processes is None or process_id is None:
        raise ShardingError("multi-host needs coordinator_address, num_processes and process_id "
                            f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True


def param_spec(path: Sequence[Any], shape: tuple[int, ...], tp: int) -> P:
    """PartitionSpec of one parameter from its name (last module/attribute in `path`)."""
    names = [getattr(k, "key", getattr(k, "name", k)) for k in path]
    names = [n for n in names if n != "value"]
    name = str(names[-1]) if names else ""
    if name == "weight" and len(names) >= 2 and "norm" in str(names[-2]):
        return P()
    if name in COLUMN_PARALLEL and len(shape) == 2:
        spec = P(None, TP_AXIS)
    elif name in COLUMN_BIASES and len(shape) == 1:
        spec = P(TP_AXIS)
    elif name in ROW_PARALLEL and len(shape) == 2:
        spec = P(TP_AXIS, None)
    elif name == "embed" and len(shape) == 2:
        spec = P(TP_AXIS, None)
    elif name == "lm_head" and len(shape) == 2:
        spec = P(None, TP_AXIS)
    else:
        return P()
    # A dim that does not split evenly (e.g. an odd vocab) stays replicated rather than failing.
    for dim, ax in zip(shape, spec, strict=False):
        if ax is not None and dim % tp:
            return P()
    return spec


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A pytree of NamedSharding matching `state` (arrays or ShapeDtypeStructs)."""
    tp = mesh.shape[TP_AXIS]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(path, tuple(x.shape), tp)), state)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place `model`'s state on `mesh` (in place; returns the model for chaining)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        check_tp_compatible(cfg, mesh.shape[TP_AXIS])
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
    return model


def init_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
    """Build a (random-init) model directly on the mesh: each device materializes only its shards,
    so an 8B model never passes through one device or the host."""
    abstract = nnx.eval_shape(make_model)
    cfg = getattr(abstract, "cfg", None)
    if cfg is not None:
        check_tp_compatible(cfg, mesh.shape[TP_AXIS])
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh)
    state = jax.jit(lambda: nnx.split(make_model())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def kv_sharding(mesh: Mesh, layout: str) -> NamedSharding:
    if layout not in KV_SPECS:
        raise ShardingError(f"KV layout must be one of {sorted(KV_SPECS)}, got {layout!r}")
    return NamedSharding(mesh, KV_SPECS[layout])


def shard_kv_cache(caches: Any, mesh: Mesh, layout: str) -> Any:
    """Place every array of a KV cache pytree (any nesting of per-layer K/V) over kv heads."""
    sharding = kv_sharding(mesh, layout)
    head_axis = KV_SPECS[layout].index(TP_AXIS)
    tp = mesh.shape[TP_AXIS]
    for leaf in jax.tree_util.tree_leaves(caches):
        if leaf.shape[head_axis] % tp:
            raise ShardingError(f"KV cache of shape {leaf.shape} ({layout}) has {leaf.shape[head_axis]} "
                                f"kv heads, not divisible by tensor_parallel={tp}")
    return jax.device_put(caches, sharding)


def _shard_map(f: Callable, mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable:
    # jax >= 0.6 has jax.shard_map(check_vma); older only the experimental one (check_rep).
    # Checks off: Pallas calls inside carry no replication rule.
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def shard_attention_fn(attn_fn: Callable, mesh: Mesh, layout: str) -> Callable:
    """Run `attn_fn(q, k, v, layer_cache, meta)` once per kv-head shard (kernels are per head).

    q [B, T, Hq, D] and k/v [B, T, Hkv, D] split on the head axis, every cache array by `layout`,
    metadata (positions, block tables, lengths) replicated. Each shard sees Hq/tp and Hkv/tp heads:
    the same GQA ratio, so any attention function works unchanged."""
    cache_spec = kv_sharding(mesh, layout).spec  # validates layout
    head = P(None, None, TP_AXIS, None)

    def wrapped(q, k, v, layer_cache, meta):
        if layer_cache is None:  # cache-free pass: nothing to shard but q/k/v
            f = _shard_map(lambda q, k, v, m: attn_fn(q, k, v, None, m)[0], mesh,
                           (head, head, head, P()), head)
            return f(q, k, v, meta), None
        f = _shard_map(attn_fn, mesh, (head, head, head, cache_spec, P()), (head, cache_spec))
        return f(q, k, v, layer_cache, meta)

    packed = getattr(attn_fn, "packed_qkv", None)
    if packed is not None:  # the fused qkv [B, T, Hkv, G + 2, D] splits on its kv-head axis
        qkv_head = P(None, None, TP_AXIS, None, None)

        def wrapped_packed(qkv, layer_cache, meta):
            if layer_cache is None:
                return wrapped(*unpack_qkv(qkv), None, meta)
            f = _shard_map(packed, mesh, (qkv_head, cache_spec, P()), (head, cache_spec))
            return f(qkv, layer_cache, meta)

        wrapped.packed_qkv = wrapped_packed
    return wrapped
