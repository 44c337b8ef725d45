"""Suite-wide settings, applied before any test module imports JAX; the servers, CLIs and benchmark
scripts the tests start inherit them through the environment."""

from __future__ import annotations

import os

# XLA's CPU backend without its expensive LLVM passes. Compiling is most of this suite's CPU time
# (measured: tests/test_kernels.py 88 -> 66 CPU seconds, test_engine.py + test_llm.py 146 -> 120), and
# the tests check what the programs compute, not how fast CPU code runs; XLA's graph-level passes
# (fusion, layout, sharding) still run. Flags already set (fake devices, in a child) are kept.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()

# The files that cost the most (CPU seconds under `make test`'s two workers, 2 cores), most first.
# `make test` runs files in collection order (--dist loadfile --no-loadscope-reorder): these go first
# so that the last files to start are short ones and neither worker is left alone at the end with a
# long file. Only an order: a file missing here runs after these, in the usual order.
SLOW_FILES_FIRST = (
    "test_benchmark_runs.py", "test_kernels.py", "test_engine.py", "test_llm.py", "test_http_api.py",
    "test_tensor_parallel.py", "test_async_scheduling.py", "test_grpc_real_engine.py", "test_datasets.py",
    "test_model_parity.py", "test_failure_isolation.py", "test_fuzz_server.py", "test_probe.py",
    "test_warmup.py",
)


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
