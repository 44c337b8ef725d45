"""Server processes of the front-door benchmarks (`benchmarks/routing.py`, `benchmarks/http_bench.py`):
start `jtrail serve` replicas and a `jtrail route` router as subprocesses, wait until they serve, read
their stats, wait until they are idle. The driver never imports JAX: the servers own the accelerators.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Every server subprocess still running, from the moment it is spawned: they run in their own sessions,
# so nothing stops them with the benchmark unless it does. `stop_all` (atexit) stops any that a
# `finally` missed: a SIGTERM that lands while a Proc is being built (its object never returned), or a
# stop that failed before the others' turn.
_LIVE: set[subprocess.Popen] = set()


def stop_processes(procs: list[subprocess.Popen], timeout_s: float = 20.0) -> None:
    """SIGTERM to every one at once, then one shared wait (they drain in parallel), then SIGKILL to
    the survivors. Never raises: a cleanup that fails half-way would leave the rest running."""
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except OSError:
                pass
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _LIVE.discard(p)


def stop_all() -> None:
    stop_processes(list(_LIVE))


atexit.register(stop_all)


class Proc:
    """A benchmark's server subprocess: started, its address read from the first stdout line matching
    `pattern`, stderr kept in a log file whose tail a failure shows."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], pattern: str, log_dir: Path,
                 timeout_s: float):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.err = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.err, text=True, env=env,
                                     start_new_session=True)
        _LIVE.add(self.proc)
        self.target = self._wait_line(pattern, timeout_s)

    def _wait_line(self, pattern: str, timeout_s: float) -> str:
        """The first stdout line matching `pattern` (the server prints it once bound); read in a thread
        so a silent crash or hang hits the timeout instead of blocking."""
        import threading

        found: list[str] = []

        def read() -> None:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                m = re.search(pattern, line)
                if m:
                    found.append(m.group(1))
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout_s)
        if not found:
            self.stop()
            tail = self.log_path.read_text()[-2000:] if self.log_path.exists() else ""
            raise RuntimeError(f"{self.name} did not start within {timeout_s:.0f} s "
                               f"(rc {self.proc.poll()}); log tail:\n{tail}")
        threading.Thread(target=self._drain_stdout, daemon=True).start()
        return found[0]

    def _drain_stdout(self) -> None:
        for _ in self.proc.stdout:  # type: ignore[union-attr]
            pass

    def stop(self, timeout_s: float = 20.0) -> None:
        stop_processes([self.proc], timeout_s)
        self.err.close()


def stop_procs(procs: list[Proc], timeout_s: float = 20.0) -> None:
    """Stop several servers in parallel (one shared drain time, not one each)."""
    stop_processes([p.proc for p in procs], timeout_s)
    for p in procs:
        p.err.close()


def exit_on_sigterm() -> None:
    """SIGTERM (`timeout`, a job limit) raises SystemExit in the main thread, so the benchmark's
    `finally` blocks stop its servers: they run in their own sessions (start_new_session), and a
    benchmark killed outright would leave them holding the GPU for the next command."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def jtrail_cmd(*args: str) -> list[str]:
    # -P: the working directory stays off sys.path. Run from the repository root, `-m` would otherwise
    # import the source folder ./jtrail, which lacks the subpackages that pyproject maps in from
    # serving/, models/, kernels/ (jtrail.serving, ...), instead of the installed jtrail (the GPU box
    # installs the checkout with `pip install --target`, not in editable mode).
    return [sys.executable, "-P", "-m", "jtrail.cli", *args]


def start_replica(i: int, a: argparse.Namespace, log_dir: Path) -> Proc:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if a.gpus:
        env["CUDA_VISIBLE_DEVICES"] = a.gpus.split(",")[i]
    if a.mem_fraction:  # replicas sharing one GPU: each preallocates only its share
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(a.mem_fraction)
    args = ["serve", "--host", "127.0.0.1", "--port", "0", "--no-http", "--policy", a.policy,
            "--slots", str(a.slots), "--pages", str(a.pages), "--page-size", str(a.page_size),
            "--max-context", str(a.max_context), "--max-queue", str(a.max_queue), "--grace", "1"]
    if a.mock:
        args += ["--mock", "--mock-step-delay", str(a.mock_step_delay)]
    else:
        if a.model:
            args += ["--model", a.model]
        if a.probe:
            args += ["--probe", a.probe]
        if a.policy in ("trail", "gittins", "srpt-oracle") and a.aging is not None:
            args += ["--aging", str(a.aging)]
        args += ["--decode-steps", str(a.decode_steps)]
    return Proc(f"replica{i}", jtrail_cmd(*args), env, r"serving on ([\d.]+:\d+)", log_dir, a.start_timeout)


def start_replicas(a: argparse.Namespace, log_dir: Path) -> list[Proc]:
    """a.replicas `jtrail serve` processes started in parallel (each prints its address once bound);
    if one fails to start, the others are stopped and its error raised."""
    import concurrent.futures as cf

    reps: list[Proc] = []
    with cf.ThreadPoolExecutor(a.replicas) as ex:
        futs = [ex.submit(start_replica, i, a, log_dir) for i in range(a.replicas)]
        errors = []
        for f in futs:
            try:
                reps.append(f.result())
            except Exception as e:  # noqa: BLE001 - stop the others, then report
                errors.append(e)
    if errors:
        stop_procs(reps)
        raise errors[0]
    return reps


def start_router(policy: str, targets: list[str], a: argparse.Namespace, log_dir: Path) -> Proc:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["route", "--replicas", ",".join(targets), "--router", policy, "--host", "127.0.0.1",
            "--port", "0", "--page-size", str(a.page_size), "--expected-tokens", str(a.expected_tokens),
            "--grace", "1"]
    return Proc(f"router-{policy}", jtrail_cmd(*args), env, r"routing on ([\d.]+:\d+)", log_dir, 60.0)


# --- measurements ----------------------------------------------------------------------------------
def wait_serving(targets: list[str], timeout_s: float) -> None:
    from jtrail.client import Client

    deadline = time.monotonic() + timeout_s
    for t in targets:
        with Client(t) as c:
            while True:
                try:
                    if c.health(timeout=2.0) == "SERVING":
                        break
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{t} never became SERVING")
                time.sleep(0.1)


def replica_stats(targets: list[str]) -> list[Any]:
    from jtrail.client import Client

    out = []
    for t in targets:
        with Client(t) as c:
            out.append(c.stats(timeout=10.0))
    return out


def drain(targets: list[str], timeout_s: float) -> float:
    """Wait until every replica is idle (nothing waiting or running, no KV page held); seconds waited."""
    t0 = time.monotonic()
    while True:
        st = replica_stats(targets)
        if all(s.waiting == 0 and s.running == 0 and s.swapped == 0 and s.pages_used == 0 for s in st):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"replicas not idle after {timeout_s:.0f} s: {[str(s) for s in st]}")
        time.sleep(0.1)


def finished_counts(targets: list[str]) -> list[int]:
    return [sum(s.finished_by_reason.values()) for s in replica_stats(targets)]


def device_name(a: argparse.Namespace) -> str:
    if a.mock:
        return "cpu (mock engines)"
    if a.gpus and shutil.which("nvidia-smi"):
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=index,name", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            chosen = [n for n in names if n.split(",")[0].strip() in a.gpus.split(",")]
            return f"{len(chosen)} x {chosen[0].split(',', 1)[1].strip()}" if chosen else "gpu"
        except (OSError, subprocess.SubprocessError, IndexError):
            return "gpu"
    return "cpu" if not a.gpus else "gpu"


def start_server(a: argparse.Namespace, policy: str, log_dir: Path) -> tuple[Proc, str, str]:
    args = ["serve", "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--policy", policy,
            "--slots", str(a.slots), "--pages", str(a.pages), "--page-size", str(a.page_size),
            "--max-context", str(a.max_context), "--max-queue", str(a.max_queue), "--grace", "1",
            "--decode-steps", str(a.decode_steps)]
    if a.mock:
        args += ["--mock", "--mock-step-delay", str(a.mock_step_delay)]
    else:
        args += [*(["--model", a.model] if a.model else []), *(["--probe", a.probe] if a.probe else [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = Proc(f"serve_{policy}", jtrail_cmd(*args), env, r"(serving on \S+ metrics_port=\S+ http=\S+)",
                log_dir, a.start_timeout)
    grpc_addr = proc.target.split()[2]
    http_addr = proc.target.split("http=")[1]
    return proc, grpc_addr, http_addr


def served_model(http: str) -> str:
    import openai

    return openai.OpenAI(base_url=f"http://{http}/v1", api_key="unused").models.list().data[0].id
