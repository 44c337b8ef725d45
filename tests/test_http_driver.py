"""http_bench's HTTP driver against a real `jtrail serve --mock` process: both clients (the lean SSE
reader and the official `openai` client) count the same tokens for the same trace, chat and text; it
asks for per-chunk usage only against a server decoding several tokens a step, and a count that
disagrees with the server's final usage fails the request instead of being kept."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from jtrail.bench.http_driver import drive_http, request_body
from jtrail.bench.loadgen import Workload
from jtrail.bench.processes import served_model, start_server, wait_serving
from jtrail.bench.server_side import parse_totals, server_means, server_totals

PROMPTS = [[{"role": "user", "content": "hello there"}], "plain text prompt",
           [{"role": "user", "content": "why?"}], "another"]
LENGTHS = np.array([5, 9, 1, 12])


def _serve(tmp: Path, decode_steps: int) -> Iterator[str]:
    a = argparse.Namespace(slots=4, pages=64, page_size=16, max_context=512, max_queue=64,
                           decode_steps=decode_steps, mock=True, mock_step_delay=0.002, start_timeout=120.0)
    proc, grpc_addr, http_addr = start_server(a, "fcfs", tmp)
    try:
        wait_serving([grpc_addr], 60.0)
        yield http_addr
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _serve(Path(tmp_path_factory.mktemp("logs")), decode_steps=1)


@pytest.fixture(scope="module")
def server_2_steps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _serve(Path(tmp_path_factory.mktemp("logs2")), decode_steps=2)


def _trace(tag: str) -> Workload:
    return Workload(PROMPTS, np.array([0.0, 0.01, 0.02, 0.03]), LENGTHS, forced=True,
                    request_ids=[f"{tag}{i}" for i in range(4)])


@pytest.mark.parametrize("client", ["sse", "openai"])
def test_both_clients_count_every_forced_token(server: str, client: str) -> None:
    res = drive_http(f"http://{server}/v1", served_model(server), _trace(client), timeout_s=60.0,
                     client=client, log=pytest.fail)
    assert res.completed.all()
    assert res.output_tokens.tolist() == LENGTHS.tolist()
    assert (res.first_token >= res.arrival).all() and (res.finish >= res.first_token).all()


def test_only_the_final_usage_is_asked_for_one_token_a_step() -> None:
    """An ordinary client's stream options: no per-chunk usage for the server to build."""
    wl = _trace("body")
    assert request_body("m", wl, 0)[1]["stream_options"] == {"include_usage": True}
    assert request_body("m", wl, 1, chunk_usage=True)[1]["stream_options"] == {
        "include_usage": True, "continuous_usage_stats": True}


@pytest.mark.parametrize("client", ["sse", "openai"])
def test_several_tokens_a_chunk_are_counted_from_per_chunk_usage(server_2_steps: str, client: str) -> None:
    res = drive_http(f"http://{server_2_steps}/v1", served_model(server_2_steps), _trace(f"ds2{client}"),
                     timeout_s=60.0, client=client, chunk_usage=True, log=pytest.fail)
    assert res.completed.all()
    assert res.output_tokens.tolist() == LENGTHS.tolist()


def test_counting_chunks_against_several_tokens_a_chunk_fails_loudly(server_2_steps: str) -> None:
    logged: list[str] = []
    res = drive_http(f"http://{server_2_steps}/v1", served_model(server_2_steps), _trace("miscount"),
                     timeout_s=60.0, log=logged.append)
    # the 1-token request is one chunk either way; every longer one holds 2-token chunks
    assert res.completed.tolist() == [bool(n == 1) for n in LENGTHS]
    assert len(logged) == 1 and "3 HTTP requests failed" in logged[0] and "TokenCountError" in logged[0]


def test_server_side_means_cover_exactly_the_runs_requests(server: str) -> None:
    before = server_totals(server)
    res = drive_http(f"http://{server}/v1", served_model(server), _trace("srv"), timeout_s=60.0,
                     log=pytest.fail)
    after = server_totals(server)  # read to [DONE], each stream was observed (its `done`) before it ended
    assert after["e2e_count"] - before["e2e_count"] == 4
    means = server_means(before, after)
    # the server's interval (its door to its first token) lies inside the client's (arrival to reading it)
    assert 0 < means["server_mean_ttft"] <= float(np.mean(res.first_token - res.arrival))
    assert 0 < means["server_mean_tpot"] and means["server_mean_ttft"] < means["server_mean_e2e"]


def test_server_totals_parse_prometheus_text() -> None:
    text = ("# HELP jtrail_e2e_request_latency_seconds End-to-end request latency\n"
            "jtrail_e2e_request_latency_seconds_sum 3.5\njtrail_e2e_request_latency_seconds_count 2.0\n"
            "jtrail_time_to_first_token_seconds_count 2.0\n")
    t = parse_totals(text)
    assert (t["e2e_sum"], t["e2e_count"], t["ttft_count"]) == (3.5, 2.0, 2.0)
    assert np.isnan(t["ttft_sum"]) and np.isnan(t["tpot_count"])
    zero = dict.fromkeys(t, 0.0)
    assert server_means(zero, {**zero, "e2e_sum": 3.0, "e2e_count": 2.0})["server_mean_e2e"] == 1.5


def test_unknown_client_is_refused() -> None:
    wl = Workload(["x"], np.zeros(1), np.ones(1, np.int64), forced=True, request_ids=["x"])
    with pytest.raises(ValueError, match="client must be one of"):
        drive_http("http://127.0.0.1:9/v1", "m", wl, client="curl")
