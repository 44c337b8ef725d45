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
