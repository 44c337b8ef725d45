"""Issue 14, item 8: a real `jtrail serve` process (tiny random model on the real engine, loopback)
under Hypothesis-generated requests — every field, extremes, unicode, huge and empty values, and raw
bytes at the wire level — and a bounded soak of mixed traffic with cancels and deadlines.

After each generated request: its status is OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED, a normal
request still succeeds, health is SERVING and no KV page is held. The soak ends with zero pages in
use and flat memory. Both print their figures (cases; requests, cancels, pages, RSS) whatever -s says.
"""

from __future__ import annotations

import asyncio
import math
import random
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jtrail.serving.frontdoor.proto import jtrail_v1_pb2 as pb
from test_grpc_process import ServerProc, _launch, _terminate

from jtrail.client import AsyncClient, Client

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ_EXAMPLES = 150
SOAK_SECONDS = 15.0
INT32 = st.integers(-(2**31), 2**31 - 1)
CONTROL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "\x00", "\ud7ff", "\U0010ffff", "é", "🙂"]
TEXT = st.one_of(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40), st.sampled_from(CONTROL),
                 st.just(""),
                 st.text(alphabet="ab ", min_size=3000, max_size=3000),  # over the byte limit
                 st.builds(lambda s: s * 200, st.sampled_from(CONTROL)))
FLOATS = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, 1e-45, 1.0, 3.4e38, math.nan, math.inf, -math.inf]))


@st.composite
def requests(draw) -> bytes:
    kind = draw(st.sampled_from(["valid", "message", "message", "message", "raw", "mutated"]))
    if kind == "raw":  # wrong types at the wire level: arbitrary bytes
        return draw(st.binary(max_size=64))
    if kind == "valid":  # in range everywhere (the server must serve these, whatever came before)
        ok = pb.GenerateRequest(max_tokens=draw(st.integers(1, 8)), priority=draw(st.integers(-5, 5)),
                                ignore_eos=draw(st.booleans()))
        ok.token_ids.ids.extend(draw(st.lists(st.integers(0, 255), min_size=1, max_size=20)))
        ok.sampling.temperature = draw(st.floats(0, 2))
        ok.sampling.top_p = draw(st.floats(0.05, 1))
        ok.sampling.top_k = draw(st.integers(0, 300))
        ok.sampling.seed = draw(st.integers(0, 2**32 - 1))
        return ok.SerializeToString()
    req = pb.GenerateRequest()
    prompt = draw(st.sampled_from(["text", "ids", "chat", "none"]))
    if prompt == "text":
        req.text = draw(TEXT)
    elif prompt == "ids":
        ids = st.one_of(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), INT32)
        req.token_ids.ids.extend(draw(st.lists(ids, max_size=draw(st.sampled_from([20, 80])))))
        req.token_ids.SetInParent()
    elif prompt == "chat":
        for _ in range(draw(st.integers(0, 4))):
            req.chat.messages.add(role=draw(st.sampled_from(["user", "user", "user", "system", "assistant",
                                                             "tool", "", "user<|im_end|>", "USER"])),
                                  content=draw(TEXT))
        req.chat.SetInParent()
    s = req.sampling
    odd = st.integers(0, 5).map(lambda k: k == 0)  # each field is out of the ordinary 1 time in 6
    if draw(st.booleans()):
        s.temperature = draw(FLOATS) if draw(odd) else draw(st.floats(0, 2))
    if draw(st.booleans()):
        s.top_p = draw(FLOATS) if draw(odd) else draw(st.floats(0.05, 1))
    if draw(st.booleans()):
        s.top_k = draw(INT32) if draw(odd) else draw(st.integers(0, 300))
    if draw(st.booleans()):
        s.seed = draw(st.integers(-(2**63), 2**63 - 1)) if draw(odd) else draw(
            st.sampled_from([-1, 0, 7, 2**32 - 1, 2**32]))
    if draw(st.booleans()):
        req.max_tokens = draw(INT32) if draw(odd) else draw(st.integers(1, 8))
    if draw(odd):
        req.stop.extend(draw(st.lists(TEXT, max_size=3)))
    if draw(odd):
        req.stop.extend(["s"] * 40)  # over the stop-string count limit
    req.stop_token_ids.extend(draw(st.lists(INT32 if draw(odd) else st.integers(0, 300), max_size=4)))
    req.priority = draw(INT32) if draw(odd) else draw(st.integers(-5, 5))
    req.ignore_eos = draw(st.booleans())
    req.request_id = draw(st.one_of(st.just(""), st.text(max_size=20)))
    wire = req.SerializeToString()
    if kind == "mutated" and wire:  # a valid message with bytes flipped / cut
        i = draw(st.integers(0, len(wire) - 1))
        wire = wire[:i] + bytes([draw(st.integers(0, 255))]) + wire[i + 1:draw(st.integers(i, len(wire)))]
    return wire


@pytest.fixture(scope="module")
def server() -> ServerProc:
    sp = _launch("--model", "tiny", "--policy", "fcfs", "--probe", "none", "--slots", "4", "--pages", "64",
                 "--page-size", "4", "--max-context", "64", "--max-queue", "8", "--max-tokens", "8",
                 timeout=240.0, mock=False)
    yield sp
    assert _terminate(sp) == 0


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _wait_idle(c: Client, timeout: float = 30.0) -> pb.StatsResponse:
    deadline = time.monotonic() + timeout
    while True:
        s = c.stats()
        if s.pages_used == 0 and s.running == 0 and s.waiting == 0:
            return s
        assert time.monotonic() < deadline, f"engine not idle: {s}"
        time.sleep(0.01)


def test_fuzzed_requests_never_hurt_the_server(server: ServerProc, capsys) -> None:
    counts: dict[str, int] = {}
    with Client(server.target) as c:
        raw = c.channel.unary_stream("/jtrail.v1.Jtrail/Generate", request_serializer=None,
                                     response_deserializer=pb.GenerateResponse.FromString)
        list(c.generate("warm up", max_tokens=4, timeout=120))  # compiles outside the fuzz budget

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(requests())
        def check(wire: bytes) -> None:
            try:
                for _ in raw(wire, timeout=30):
                    pass
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
                assert code in ALLOWED, (wire, code, e.details())
            counts[code.name] = counts.get(code.name, 0) + 1
            assert list(c.generate("normal", max_tokens=2, timeout=60))[-1].completion_tokens == 2
            assert c.health() == "SERVING"
            _wait_idle(c)

        check()
    n = sum(counts.values())
    with capsys.disabled():
        print(f"\n[fuzz] {n} generated requests against a jtrail serve process: {counts}")
    assert n == FUZZ_EXAMPLES and counts.get("OK", 0) > 0 and counts.get("INVALID_ARGUMENT", 0) > 0


def test_soak_mixed_traffic_ends_idle_with_flat_memory(server: ServerProc, capsys) -> None:
    figures = {"requests": 0, "ok": 0, "cancels": 0, "deadlines": 0, "rejected": 0}

    async def main() -> None:
        async with AsyncClient(server.target) as c:
            async def worker(seed: int, until: float) -> None:
                rng = random.Random(seed)
                while time.monotonic() < until:
                    kind = rng.choice(["full", "full", "cancel", "deadline"])
                    figures["requests"] += 1
                    prompt = [rng.randrange(3, 256) for _ in range(rng.randrange(1, 40))]
                    try:
                        agen = c.generate(prompt, max_tokens=rng.randrange(1, 20), ignore_eos=True,
                                          seed=rng.randrange(2**32), temperature=rng.choice([0.0, 0.8]),
                                          timeout=rng.uniform(0.01, 0.2) if kind == "deadline" else 60)
                        async for _ in agen:
                            if kind == "cancel":
                                figures["cancels"] += 1
                                break  # leaving the stream cancels the RPC
                        else:
                            figures["ok"] += 1
                        await agen.aclose()
                    except grpc.RpcError as e:
                        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                            figures["deadlines"] += 1
                        elif e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                            figures["rejected"] += 1
                            await asyncio.sleep(0.01)
                        else:
                            raise

            warm_until = time.monotonic() + 3.0
            await asyncio.gather(*(worker(100 + i, warm_until) for i in range(8)))
            figures["rss_start_kb"] = _rss_kb(server.proc.pid)
            until = time.monotonic() + SOAK_SECONDS
            await asyncio.gather(*(worker(i, until) for i in range(8)))

    asyncio.run(main())
    with Client(server.target) as c:
        s = _wait_idle(c)
        assert c.health() == "SERVING"
    figures["pages_at_end"] = s.pages_used
    figures["rss_end_kb"] = _rss_kb(server.proc.pid)
    with capsys.disabled():
        print(f"\n[soak] {SOAK_SECONDS:.0f} s of mixed traffic: {figures}")
    assert figures["cancels"] > 0 and figures["deadlines"] > 0 and figures["ok"] > 0
    assert s.pages_used == 0
    assert figures["rss_end_kb"] <= 1.10 * figures["rss_start_kb"] + 30_000, figures
