"""The engine's configuration (`EngineConfig`), policy lookup by name, and what a step ran (`StepStats`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ..brain.scheduler.base import Policy

PREEMPTION_MODES = ("recompute", "swap", "keep")
# EngineConfig's and the simulator's Resources' default: "keep", chosen with trail's limited preemption on
# the simulator (benchmarks/results/tune_keep.json: R1 1.13x fcfs mean E2E, p99 1.24x; recompute 1.05x, p99
# 1.49x); under memory pressure it preempts as recompute does (R3 the same in both modes)
DEFAULT_PREEMPTION_MODE = "keep"


@dataclass
class EngineConfig:
    num_slots: int = 8
    page_size: int = 16
    num_pages: int = 512
    max_model_len: int = 2048
    # the packed prefill call (batch.prefill_layout): rows of prefill_buckets[0] tokens, padded to a
    # bucket below the step budget or to the budget itself
    prefill_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    max_prefill_tokens_per_step: int = 512  # prefill tokens per step, counted in whole rows
    decode_steps_per_call: int = 1
    # what a preempted request's KV becomes: "recompute" drops it (vLLM's default), "swap" copies it to host
    # memory, "keep" leaves it in its device pages and frees only the batch slot, so a length-aware policy's
    # preemption (a shorter request takes the slot) costs no recompute. Under "keep" a preemption for pages
    # drops KV (as recompute), first that of kept requests.
    preemption_mode: str = DEFAULT_PREEMPTION_MODE
    policy: str | Policy = "fcfs"
    dtype: Any = None  # KV cache dtype; None = the model's compute dtype
    kernel_impl: str = "auto"
    max_queue: int = 4096
    seed: int = 0  # seeds requests that give none
    tensor_parallel: int = 1  # shard weights + KV pages over this many local devices
    # vLLM's async scheduling: step N+1 is scheduled and dispatched while step N runs on the device,
    # its decode rows fed step N's sampled tokens on the device; N's outputs are processed after
    # (a stop is found one step late, the row's extra tokens dropped). Same outputs as synchronous;
    # on by default (1.3-1.5x decode tokens/s on the H200, SmolLM2-135M shape); False (`jtrail serve
    # --no-async-scheduling`) makes every step wait for its own outputs.
    async_scheduling: bool = True
    # async scheduling: dispatched steps whose outputs the host has not yet processed when it schedules
    # the next. 1 is vLLM's; with 2 the launch of step N+1 waits for step N-1's tokens, not N's, so the
    # graph launch (~1.3 ms of host time on the H200) and the host's Python overlap the device's step
    # (H200, SmolLM2-135M shape, one process interleaved: 1.17x at batch 32, 1.13x at 128; tokens equal).
    # A stop is then found two steps late. None: 2 with async scheduling on a GPU, else 1.
    steps_in_flight: int | None = None
    # 2 or 3: decode calls rotate over that many compiled copies of the step (ModelRunner's
    # decode_graphs), so each executable's CUDA graph finds its buffers where it left them and is not
    # updated on every call (H200, benchmarks/ENGINE_NOTES.md); None: 2 with async scheduling on a GPU
    # (also with two steps in flight: 3 measured slower), else 1
    decode_graphs: int | None = None
    # likewise for the packed prefill call, per capacity (its fixed-address buffers, step_buffers.PrefillIO,
    # stop the per-call update only where each executable has one call in flight); None: as decode_graphs
    prefill_graphs: int | None = None
    # a step's prefill chunks (probe-only prefills included) and its decode rows run in one forward
    # (vLLM v1's unified batch) instead of a prefill call then a decode call: a small model's layers
    # are ~400 latency-bound kernels, so the second call cost about a decode step of its own (H200,
    # ENGINE_NOTES.md). One token per decode call only (decode_steps_per_call 1); False: two calls.
    mixed_steps: bool = True
    # the runner issues its device calls from a thread of its own (launcher.Launcher): the decode
    # call's CUDA graph launch (~1.5 ms of host time on the H200) overlaps the engine's Python;
    # None: on with async scheduling on a GPU (nothing to overlap in synchronous steps or on the CPU)
    launch_thread: bool | None = None
    # the host waits for a step's outputs by polling their readiness (the copy to the host enqueued
    # right after the launch) instead of blocking in the transfer: on the H200 the launcher's
    # cuGraphLaunch took 2.9 ms under async scheduling at batch 128 against 1.35 ms in synchronous
    # steps, as if held up while the engine's thread blocked in the fetch. None: on with the launch thread
    poll_fetch: bool | None = None
    # decode steps rotate q and k, write the new K/V and attend in one Pallas kernel a layer
    # (ops.decode_rope_write) instead of the model's RoPE, the write kernel and the attention kernel: one
    # of a small model's ~13 latency-bound kernels a layer fewer (H200: 1.03-1.05x a step; ENGINE_NOTES.md).
    # GPU kernels only, one device;
    # None: on where the kernels are the GPU's compiled ones (kernel_impl "pallas" or "auto" on a GPU)
    rope_in_kernel: bool | None = None
    # GEMMs of the multi-token decode call (decode_steps_per_call > 1): "xla" (XLA's Triton GEMM fusions,
    # with split-K at a few rows and its reductions as extra ops) or "cublas" (XLA compiles that call with
    # xla_gpu_enable_triton_gemm off). H200, SmolLM2-135M shape, b128 x 8: 290 GPU ops a token step against
    # 350, busy 15.2 ms a call against 17.6 (ENGINE_NOTES.md); the one-token step keeps XLA's (its step
    # was slower with cuBLAS). None: "cublas" for multi-token calls on a GPU, else "xla"
    decode_gemms: str | None = None

    def __post_init__(self) -> None:
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, "
                             f"got {self.preemption_mode!r}")
        if min(self.num_slots, self.page_size, self.decode_steps_per_call, self.max_queue) < 1:
            raise ValueError("num_slots, page_size, decode_steps_per_call and max_queue must be >= 1")
        if not self.prefill_buckets or list(self.prefill_buckets) != sorted(set(self.prefill_buckets)):
            raise ValueError(f"prefill_buckets must be increasing, got {self.prefill_buckets}")
        if self.max_prefill_tokens_per_step < 1:
            raise ValueError("max_prefill_tokens_per_step must be >= 1")
        if self.decode_graphs not in (None, 1, 2, 3):
            raise ValueError(f"decode_graphs must be 1, 2, 3 or None (automatic), got {self.decode_graphs}")
        if self.prefill_graphs not in (None, 1, 2, 3):
            raise ValueError(f"prefill_graphs must be 1, 2, 3 or None (automatic), got {self.prefill_graphs}")
        if self.decode_gemms not in (None, "xla", "cublas"):
            raise ValueError(f"decode_gemms must be 'xla', 'cublas' or None (automatic), "
                             f"got {self.decode_gemms!r}")
        if self.steps_in_flight not in (None, 1, 2):
            raise ValueError(f"steps_in_flight must be 1, 2 or None (automatic), got {self.steps_in_flight}")

    def runner_options(self) -> dict[str, Any]:
        """ModelRunner's keyword arguments from this configuration (automatic choices resolved)."""
        return dict(num_slots=self.num_slots, num_pages=self.num_pages, page_size=self.page_size,
                    max_model_len=self.max_model_len, decode_steps=self.decode_steps_per_call,
                    kv_dtype=self.dtype, impl=self.kernel_impl, tensor_parallel=self.tensor_parallel,
                    prefill_buckets=self.prefill_buckets, max_prefill_tokens=self.max_prefill_tokens_per_step,
                    decode_graphs=self.resolved_decode_graphs(), launch_thread=self.resolved_launch_thread(),
                    prefill_graphs=self.resolved_prefill_graphs(), poll_fetch=self.resolved_poll_fetch(),
                    mixed_steps=self.mixed_steps, rope_in_kernel=self.resolved_rope_in_kernel(),
                    decode_gemms=self.resolved_decode_gemms())

    def resolved_decode_gemms(self) -> str:
        if self.decode_gemms is not None:
            return self.decode_gemms
        return "cublas" if self.decode_steps_per_call > 1 and _on_gpu() else "xla"

    def resolved_rope_in_kernel(self) -> bool:
        if self.rope_in_kernel is not None:
            return self.rope_in_kernel
        return self.kernel_impl in ("auto", "pallas") and _on_gpu()

    def resolved_decode_graphs(self) -> int:
        """decode_graphs, None resolved: two executables only where the graph would otherwise be
        updated on every call (async scheduling, CUDA graphs: a GPU backend)."""
        if self.decode_graphs is not None:
            return self.decode_graphs
        return 2 if self._async_on_gpu() else 1

    def resolved_prefill_graphs(self) -> int:
        return self.prefill_graphs if self.prefill_graphs is not None else self.resolved_decode_graphs()

    def resolved_steps_in_flight(self) -> int:
        """Steps the host may run ahead under async scheduling (0 without it)."""
        if not self.async_scheduling:
            return 0
        if self.steps_in_flight is not None:
            return self.steps_in_flight
        return 2 if self._async_on_gpu() else 1

    def resolved_launch_thread(self) -> bool:
        return self.launch_thread if self.launch_thread is not None else self._async_on_gpu()

    def resolved_poll_fetch(self) -> bool:
        return self.poll_fetch if self.poll_fetch is not None else self.resolved_launch_thread()

    def _async_on_gpu(self) -> bool:
        return self.async_scheduling and _on_gpu()


def _on_gpu() -> bool:
    import jax  # here: the config is read by processes that never import jax otherwise

    return jax.default_backend() == "gpu"


def resolve_policy(policy: str | Policy) -> Policy:
    if isinstance(policy, Policy):
        return policy
    from ..brain.scheduler.registry import make_policy

    return make_policy(policy)


class StepStats(NamedTuple):
    """What the last `step()` ran, for the step-time model and the benchmarks: tokens computed
    (prefill chunks' tokens + decode rows' steps), KV tokens of the sequences that ran (before the
    step; probe-only prefills attend none that stay), prefill chunks (probe-only ones included: they
    share the step's packed call), decode rows, and the step's seconds (schedule to outputs).
    Under async scheduling: the batch the step dispatched (its outputs come with the next step) and
    the seconds of the call (schedule and dispatch of this batch, outputs of the one before)."""

    batch_tokens: int = 0
    kv_tokens: int = 0
    prefill_chunks: int = 0
    decode_rows: int = 0
    seconds: float = 0.0
