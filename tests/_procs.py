"""Shared by the tests that start `jtrail serve` / `jtrail route` processes on loopback."""

from __future__ import annotations

import signal
import subprocess


def stop_gracefully(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """SIGTERM (the server's graceful path: drain, stop the engine, exit), then wait; a process that
    hangs is killed so no test leaves one behind. Returns the exit status (negative: a signal)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
