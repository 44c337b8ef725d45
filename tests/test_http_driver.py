"""http_bench's HTTP driver against a real `jtrail serve --mock` process: both clients (the lean SSE
reader and the official `openai` client) count the same tokens for the same trace, chat and text."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from jtrail.bench.http_driver import drive_http
from jtrail.bench.loadgen import Workload
from jtrail.bench.processes import served_model, start_server, wait_serving


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    a = argparse.Namespace(slots=4, pages=64, page_size=16, max_context=512, max_queue=64, decode_steps=1,
                           mock=True, mock_step_delay=0.002, start_timeout=120.0)
    proc, grpc_addr, http_addr = start_server(a, "fcfs", Path(tmp_path_factory.mktemp("logs")))
    try:
        wait_serving([grpc_addr], 60.0)
        yield http_addr
    finally:
        proc.stop()


@pytest.mark.parametrize("client", ["sse", "openai"])
def test_both_clients_count_every_forced_token(server: str, client: str) -> None:
    prompts = [[{"role": "user", "content": "hello there"}], "plain text prompt",
               [{"role": "user", "content": "why?"}], "another"]
    lengths = np.array([5, 9, 1, 12])
    wl = Workload(prompts, np.array([0.0, 0.01, 0.02, 0.03]), lengths, forced=True,
                  request_ids=[f"{client}{i}" for i in range(4)])
    res = drive_http(f"http://{server}/v1", served_model(server), wl, timeout_s=60.0, client=client,
                     log=pytest.fail)
    assert res.completed.all()
    assert res.output_tokens.tolist() == lengths.tolist()
    assert (res.first_token >= res.arrival).all() and (res.finish >= res.first_token).all()


def test_unknown_client_is_refused() -> None:
    wl = Workload(["x"], np.zeros(1), np.ones(1, np.int64), forced=True, request_ids=["x"])
    with pytest.raises(ValueError, match="client must be one of"):
        drive_http("http://127.0.0.1:9/v1", "m", wl, client="curl")
