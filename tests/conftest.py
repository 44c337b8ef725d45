"""Suite-wide settings, applied before any test module imports JAX; the servers, CLIs and benchmark
scripts the tests start inherit them through the environment."""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# The repository root off sys.path (`python -m pytest` puts the working directory first): its kernels/
# directory (installed as jtrail.kernels) would otherwise shadow the `kernels` distribution (Hugging
# Face's hub kernels), which transformers >= 5.25 requires and imports with the first Llama config.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT]

# XLA's CPU backend without its expensive LLVM passes. Compiling is most of this suite's CPU time
# (measured: tests/test_kernels.py 88 -> 66 CPU seconds, test_engine.py + test_llm.py 146 -> 120), and
# the tests check what the programs compute, not how fast CPU code runs; XLA's graph-level passes
# (fusion, layout, sharding) still run. Flags already set (fake devices, in a child) are kept.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()

# One persistent compilation cache for the whole run: both workers and every server, CLI and benchmark
# script a test starts (they inherit the environment) load what another process already compiled
# instead of compiling it again. A fresh directory per run (made by the first process, removed by it
# at the end), so nothing carries over between runs. JAX reports a load from it as a backend compile
# too, so step_programs.BACKEND_COMPILES and the no-compile-under-traffic tests still see it
# (tests/test_warmup.py checks that).
CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE = CACHE_ENV not in os.environ
if _OWN_CACHE:
    os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="jtrail-test-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the tiny test programs compile fast
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

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

# Tests that bound a wall time (a start-up mistake reported within 5 s, a stats call within 0.3 s):
# under two workers each runs alone, while the other worker waits between tests, so that what they
# measure is the code, not a neighbour compiling a model on the other core. Node id prefixes.
TIMED_ALONE = (
    "tests/test_startup_errors.py::",
    "tests/test_train_probe_safety.py::test_train_probe_input_errors_before_any_model",
    "tests/test_input_hardening.py::test_tokenization_runs_off_the_event_loop",
)


LOCK_DIR_ENV = "JTRAIL_TEST_LOCK_DIR"  # set by the xdist controller, read by its workers


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("numprocesses", None) and LOCK_DIR_ENV not in os.environ:  # the controller
        os.environ[LOCK_DIR_ENV] = tempfile.mkdtemp(prefix="jtrail-test-locks-")  # workers inherit it


def pytest_unconfigure(config: pytest.Config) -> None:
    if "PYTEST_XDIST_WORKER" not in os.environ and LOCK_DIR_ENV in os.environ:
        shutil.rmtree(os.environ.pop(LOCK_DIR_ENV), ignore_errors=True)
    if _OWN_CACHE:
        shutil.rmtree(os.environ.pop(CACHE_ENV), ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Under xdist: each test (its set-up, module fixtures included, and tear-down) holds a shared lock;
    a TIMED_ALONE test holds it exclusively. A gate held by a test waiting for the exclusive lock stops
    new shared holders, so the timed test gets its turn when the neighbour's current test ends."""
    lock_dir = os.environ.get(LOCK_DIR_ENV)
    if "PYTEST_XDIST_WORKER" not in os.environ or lock_dir is None:  # one process: nothing beside it
        return (yield)
    alone = item.nodeid.startswith(TIMED_ALONE)
    with open(Path(lock_dir, "gate"), "a") as gate, open(Path(lock_dir, "lock"), "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            return (yield)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
