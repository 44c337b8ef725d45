"""The OpenAI-compatible HTTP API of a real `python -m jtrail.serve` process on loopback, driven by the
official `openai` client: completions and chat, streaming and not, usage, stop strings, bad requests,
queue full, deadline, disconnect. The mock engine keeps it fast; one test loads the embedded SmolLM2 to
check greedy output against the library's own `LLM.chat`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest
from _procs import stop_gracefully
from jtrail.serving.engine.fake_runner import ByteTokenizer, decode_ids, encode_text, fake_token

from jtrail.client import Client


@dataclass
class Server:
    proc: subprocess.Popen
    http: str  # host:port of the HTTP API
    grpc: str  # host:port of the gRPC API (same engine: its Stats RPC reads the engine's state)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://{self.http}/v1", api_key="unused", max_retries=0, **kw)


def _spawn(*args: str, mock: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jtrail.serve", *(["--mock"] if mock else []), "--host", "127.0.0.1",
           "--port", "0", "--http-port", "0", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _ready(proc: subprocess.Popen, timeout: float = 30.0) -> Server:
    line = proc.stdout.readline()  # "jtrail: serving on G metrics_port=N http=H": printed once bound
    m = re.search(r"serving on ([\d.]+:\d+) metrics_port=\S+ http=([\d.]+:\d+)", line)
    if m is None:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} (rc {proc.wait()})")
    sv = Server(proc, http=m.group(2), grpc=m.group(1))
    deadline = time.monotonic() + timeout
    while True:
        try:
            if urllib.request.urlopen(f"http://{sv.http}/health", timeout=2).status == 200:
                return sv
        except OSError:
            pass
        assert time.monotonic() < deadline, "never healthy"
        time.sleep(0.05)


def _launch(*args: str, mock: bool = True, timeout: float = 30.0) -> Server:
    return _ready(_spawn(*args, mock=mock), timeout)


def _stop(sv: Server) -> int:
    return stop_gracefully(sv.proc, timeout=20)


@pytest.fixture(scope="module")
def mock_server() -> Iterator[Server]:
    sv = _launch("--slots", "4", "--pages", "256", "--max-context", "256", "--mock-step-delay", "0.005")
    yield sv
    assert _stop(sv) == 0


def _expected(prompt_ids: list[int], n: int) -> str:
    """What the mock engine generates: its deterministic fake tokens, decoded."""
    return decode_ids([fake_token(prompt_ids, i) for i in range(n)])


def _chat_ids(messages: list[dict[str, str]]) -> list[int]:
    return ByteTokenizer().apply_chat_template(messages)


def test_models_health_and_metrics(mock_server: Server) -> None:
    c = mock_server.client()
    models = c.models.list().data
    assert [m.id for m in models] == ["mock"]
    card = models[0].model_dump()
    assert card["policy"] == "trail" and card["max_model_len"] == 256 and "probe" in card
    c.completions.create(model="mock", prompt="warm", max_tokens=2)
    text = urllib.request.urlopen(f"http://{mock_server.http}/metrics", timeout=5).read().decode()
    m = re.search(r"^jtrail_e2e_request_latency_seconds_count (\S+)$", text, re.MULTILINE)
    assert m and float(m.group(1)) >= 1
    assert re.search(r"^jtrail_kv_pages_total 255", text, re.MULTILINE)  # 256 pages, page 0 the null page


def test_completion_and_chat_non_streaming(mock_server: Server) -> None:
    c = mock_server.client()
    r = c.completions.create(model="mock", prompt="hello there", max_tokens=7, temperature=0)
    assert r.choices[0].text == _expected(encode_text("hello there"), 7)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (11, 7, 18)
    # token-id prompt, as vLLM accepts
    r = c.completions.create(model="mock", prompt=[100, 101, 102], max_tokens=3)
    assert r.choices[0].text == _expected([100, 101, 102], 3)

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = c.chat.completions.create(model="mock", messages=msgs, max_completion_tokens=5)
    ids = _chat_ids(msgs)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _expected(ids, 5)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 5)
    assert r.model_dump()["remaining_estimate"] == 0.0  # jtrail extension: nothing left at the end


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_usage_equals_tokens_streamed(mock_server: Server, chat: bool) -> None:
    c = mock_server.client()
    opts = {"include_usage": True}
    if chat:
        msgs = [{"role": "user", "content": "count"}]
        stream = c.chat.completions.create(model="mock", messages=msgs, max_tokens=12, stream=True,
                                           stream_options=opts)
        ids = _chat_ids(msgs)
    else:
        stream = c.completions.create(model="mock", prompt="count", max_tokens=12, stream=True,
                                      stream_options=opts)
        ids = encode_text("count")
    pieces, reasons, estimates, usage = [], [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []  # the usage chunk comes last, with no choices
            usage = chunk.usage
            continue
        ch = chunk.choices[0]
        piece = ch.delta.content if chat else ch.text
        if piece:
            pieces.append(piece)
        reasons.append(ch.finish_reason)
        estimates.append(chunk.model_dump()["remaining_estimate"])
    # the mock streams one token per engine step, so one non-empty piece per token
    assert "".join(pieces) == _expected(ids, 12)
    assert usage is not None and usage.completion_tokens == len(pieces) == 12
    assert usage.prompt_tokens == len(ids)
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert estimates[-1] == 0.0 and all(e is not None and e >= 0 for e in estimates)


def test_raw_sse_ends_with_done(mock_server: Server) -> None:
    req = urllib.request.Request(f"http://{mock_server.http}/v1/completions", method="POST",
                                 data=b'{"prompt": "x", "max_tokens": 2, "stream": true}',
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and len(events) == 3  # two tokens, then [DONE]


def _bad_requests(c: openai.OpenAI) -> list[tuple[str, int, str | None]]:
    """Five kinds of bad request; (what, status, param named in the error)."""
    cases = [
        ("negative temperature", lambda: c.completions.create(model="mock", prompt="x", temperature=-1)),
        ("logprobs", lambda: c.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "x"}], logprobs=True)),
        ("unknown model", lambda: c.completions.create(model="gpt-17", prompt="x")),
        ("max_tokens past the context", lambda: c.completions.create(model="mock", prompt="x",
                                                                    max_tokens=10_000)),
        ("n=2", lambda: c.completions.create(model="mock", prompt="x", n=2)),
        ("no messages", lambda: c.chat.completions.create(model="mock", messages=[])),
        ("min_tokens", lambda: c.completions.create(model="mock", prompt="x",
                                                    extra_body={"min_tokens": 3})),
        ("token id out of vocab", lambda: c.completions.create(model="mock", prompt=[10**6])),
    ]
    got = []
    for what, call in cases:
        with pytest.raises(openai.APIStatusError) as e:
            call()
        body = e.value.body if isinstance(e.value.body, dict) else {}
        got.append((what, e.value.status_code, body.get("param")))
    return got


def test_bad_requests_get_their_status_and_spare_a_concurrent_stream(mock_server: Server) -> None:
    c = mock_server.client()
    pieces: list[str] = []
    finish: list[str | None] = []

    def good() -> None:  # ~100 steps of 5 ms: spans every bad request below
        for chunk in c.completions.create(model="mock", prompt="good", max_tokens=100, stream=True):
            pieces.append(chunk.choices[0].text)
            finish.append(chunk.choices[0].finish_reason)

    t = threading.Thread(target=good)
    t.start()
    got = _bad_requests(c)
    t.join(timeout=30)
    assert got == [
        ("negative temperature", 400, "temperature"),
        ("logprobs", 400, "logprobs"),
        ("unknown model", 404, "model"),
        ("max_tokens past the context", 400, "max_tokens"),
        ("n=2", 400, "n"),
        ("no messages", 400, "messages"),
        ("min_tokens", 400, "min_tokens"),
        ("token id out of vocab", 400, "prompt.token_ids"),
    ]
    assert "".join(pieces) == _expected(encode_text("good"), 100) and finish[-1] == "length"


def test_queue_full_deadline_and_disconnect_frees_slot_within_one_step() -> None:
    # One slot, one waiting place, 100 ms steps: "within one engine step" is measurable.
    sv = _launch("--slots", "1", "--max-queue", "1", "--mock-step-delay", "0.1")
    try:
        c = sv.client()
        running = c.chat.completions.create(model="mock", messages=[{"role": "user", "content": "a"}],
                                            max_tokens=1000, stream=True)
        next(iter(running))  # admitted and decoding
        queued: list = []
        tq = threading.Thread(target=lambda: queued.append(
            c.completions.create(model="mock", prompt="queued", max_tokens=2)), daemon=True)
        tq.start()
        with Client(sv.grpc) as g:
            for _ in range(500):
                if g.stats().waiting == 1:
                    break
                time.sleep(0.01)
            with pytest.raises(openai.APIStatusError) as e:
                c.completions.create(model="mock", prompt="overflow", max_tokens=2)
            assert e.value.status_code == 503 and e.value.response.headers.get("retry-after") == "1"
            assert e.value.body["code"] == "queue_full"

            before = g.stats()
            assert before.running == 1 and before.pages_used > 0
            running.close()  # the client goes away mid-stream
            for _ in range(2000):
                s = g.stats()
                if s.finished_by_reason.get("cancelled", 0) == 1:
                    break
                time.sleep(0.002)
            # the abort is applied at the next step boundary; the stats snapshot is published after
            # the step that follows it (as for gRPC in test_grpc_process)
            assert s.finished_by_reason["cancelled"] == 1 and s.steps <= before.steps + 2
            tq.join(timeout=10)  # the queued request takes the freed slot
            assert queued and queued[0].choices[0].text == _expected(encode_text("queued"), 2)
            for _ in range(500):
                s = g.stats()
                if (s.running, s.waiting, s.pages_used) == (0, 0, 0):
                    break
                time.sleep(0.01)
            assert (s.running, s.waiting, s.pages_used) == (0, 0, 0)

            # A server-side deadline (jtrail's `timeout` field) gives 504 and frees the request too.
            with pytest.raises(openai.APIStatusError) as e:
                c.completions.create(model="mock", prompt="slow", max_tokens=100, extra_body={"timeout": 0.3})
            assert e.value.status_code == 504 and e.value.body["param"] == "timeout"
            for _ in range(500):
                s = g.stats()
                if s.running == 0 and s.pages_used == 0:
                    break
                time.sleep(0.01)
            assert (s.running, s.pages_used) == (0, 0)

        # SIGTERM drains: an in-flight stream still gets every token, then the process exits 0.
        draining = c.completions.create(model="mock", prompt="drain", max_tokens=6, stream=True)
        it = iter(draining)
        first = next(it)
        sv.proc.send_signal(signal.SIGTERM)
        rest = list(it)
        assert first.choices[0].text + "".join(ch.choices[0].text for ch in rest) == \
            _expected(encode_text("drain"), 6)
        assert sv.proc.wait(timeout=20) == 0
    finally:
        if sv.proc.poll() is None:
            _stop(sv)


def test_flags_turn_either_door_off() -> None:
    r = subprocess.run([sys.executable, "-m", "jtrail.serve", "--mock", "--no-http", "--no-grpc"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "nothing to serve" in r.stderr
    sv = _launch_http_only()
    try:
        c = sv.client()
        assert c.completions.create(model="mock", prompt="x", max_tokens=2).usage.completion_tokens == 2
    finally:
        assert _stop(sv) == 0


def _launch_http_only() -> Server:
    proc = subprocess.Popen([sys.executable, "-m", "jtrail.serve", "--mock", "--no-grpc", "--http-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()
    m = re.search(r"serving on - metrics_port=\S+ http=([\d.]+:\d+)", line)
    assert m, line
    sv = Server(proc, http=m.group(1), grpc="")
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://{sv.http}/health", timeout=2)
            return sv
        except (OSError, urllib.error.URLError):
            time.sleep(0.05)
    raise AssertionError("never healthy")


def test_greedy_and_stop_string_match_the_library() -> None:
    """The embedded SmolLM2 through HTTP gives exactly what `jtrail.LLM.chat` gives in-process."""
    import jtrail

    proc = _spawn("--policy", "fcfs", "--probe", "none", "--slots", "2", "--pages", "128",
                  "--max-context", "512", "--no-warmup", mock=False)  # warm-up: test_warmup.py
    try:
        # the reference, computed while the server process loads the same model
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        llm = jtrail.LLM(progress=False)
        want = llm.chat(msgs, jtrail.SamplingParams(max_tokens=16))[0]
        want_stop = llm.chat(msgs, jtrail.SamplingParams(max_tokens=16, stop=("Paris",)))[0]
        del llm
        sv = _ready(proc, timeout=240)
        c = sv.client(timeout=240)
        name = c.models.list().data[0].id
        r = c.chat.completions.create(model=name, messages=msgs, max_tokens=16, temperature=0)
        stopped = c.chat.completions.create(model=name, messages=msgs, max_tokens=16, temperature=0,
                                            stop=["Paris"], stream=True,
                                            stream_options={"include_usage": True})
        chunks = list(stopped)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert "Paris" in want.text
    assert r.choices[0].message.content == want.text
    assert r.usage.completion_tokens == want.completion_tokens
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want_stop.text and "Paris" not in text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == want_stop.completion_tokens
