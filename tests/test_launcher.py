"""The launcher issues calls in submission order, on its own thread when threaded; a call's error
comes back from its own future (later calls still run), and drain waits for every queued call."""

from __future__ import annotations

import threading
import time

import pytest
from jtrail.serving.engine.launcher import Launcher


def test_threaded_calls_run_in_order_on_the_launch_thread():
    launcher, seen = Launcher(threaded=True), []

    def call(i: int):
        def run():
            time.sleep(0.002 * (5 - i))  # earlier calls take longer: order must not follow speed
            seen.append((i, threading.current_thread().name))
            return i * i
        return run

    futures = [launcher.submit(call(i)) for i in range(5)]
    assert [f.result() for f in futures] == [0, 1, 4, 9, 16]
    assert [i for i, _ in seen] == list(range(5))
    assert all(name.startswith("jtrail-launch") for _, name in seen)


def test_threaded_error_comes_from_its_future_and_drain_waits():
    launcher, done = Launcher(threaded=True), threading.Event()

    def boom():
        raise RuntimeError("device call failed")

    def slow():
        time.sleep(0.05)
        done.set()

    bad = launcher.submit(boom)
    launcher.submit(slow)
    launcher.drain()  # does not raise the first call's error; returns once the last call ran
    assert done.is_set()
    with pytest.raises(RuntimeError, match="device call failed"):
        bad.result()


def test_inline_runs_at_once_in_the_caller_and_raises_there():
    launcher, me = Launcher(threaded=False), threading.current_thread().name
    assert launcher.submit(lambda: threading.current_thread().name).result() == me

    def boom():
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        launcher.submit(boom)
    launcher.drain()  # nothing queued
