"""Issue 18 item 7: `jtrail chat` (multi-turn, Ctrl-C stops the answer, EOF exits, no traceback) and
`jtrail client` (--stop, --top-k, --priority, --json, a readable --info), against a real
`jtrail serve --mock` process on loopback, driven through stdin as a person would."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from jtrail.serving.engine.fake_runner import ByteTokenizer

CLI = [sys.executable, "-m", "jtrail.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@dataclass
class Server:
    proc: subprocess.Popen
    target: str

    def request_log(self) -> list[tuple[str, int, int]]:
        """Stop the server; (finish reason, prompt tokens, output tokens) of each request it logged."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=20)
        return [(m.group(1), int(m.group(2)), int(m.group(3))) for m in
                re.finditer(r"finished: (\w+); prompt (\d+) tokens, output (\d+) tokens", err)]


@pytest.fixture
def server() -> Iterator[Server]:
    proc = subprocess.Popen([sys.executable, "-m", "jtrail.serve", "--mock", "--port", "0", "--no-http",
                             "--mock-step-delay", "0.03", "--log-stats-interval", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    m = re.search(r"serving on (\S+) ", proc.stdout.readline())
    assert m, "server did not start"
    yield Server(proc, m.group(1))
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _chat_prompt_tokens(messages: list[dict[str, str]]) -> int:
    return len(ByteTokenizer().apply_chat_template(messages))


def test_chat_keeps_the_history_and_exits_on_eof(server: Server) -> None:
    r = subprocess.run([*CLI, "chat", "--target", server.target, "--system", "be brief", "--max-tokens", "7"],
                       input="hello\n\nand again\n", capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    answers = r.stdout.splitlines()
    assert len(answers) == 2 and all(len(a) == 7 for a in answers), r.stdout
    # what the server received: the second turn carries the first question and answer
    sys_msg = {"role": "system", "content": "be brief"}
    first = [sys_msg, {"role": "user", "content": "hello"}]
    second = [*first, {"role": "assistant", "content": answers[0]}, {"role": "user", "content": "and again"}]
    assert server.request_log() == [("length", _chat_prompt_tokens(first), 7),
                                    ("length", _chat_prompt_tokens(second), 7)]


def test_ctrl_c_stops_the_answer_not_the_chat(server: Server) -> None:
    chat = subprocess.Popen([*CLI, "chat", "--target", server.target, "--max-tokens", "60"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    chat.stdin.write(b"tell me a long story\n")
    chat.stdin.flush()
    seen = b""
    while len(seen) < 3:  # the answer is streaming (60 tokens at 30 ms each)
        seen += os.read(chat.stdout.fileno(), 1)
    chat.send_signal(signal.SIGINT)
    time.sleep(0.3)
    chat.stdin.write(b"second question\n")
    chat.stdin.close()  # then end of input: the chat exits
    chat.wait(timeout=30)
    out, err = chat.stdout.read(), chat.stderr.read()
    out = (seen + out).decode()
    assert chat.returncode == 0 and b"Traceback" not in err, err.decode()
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].endswith(" [stopped]") and len(lines[1]) == 60, out
    log = server.request_log()
    assert [x[0] for x in log] == ["cancelled", "length"] and log[0][2] < 60, log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv", [["chat"], ["client", "hello"], ["client", "--info"]])
def test_no_server_is_one_line_not_a_traceback(argv: list[str]) -> None:
    target = f"127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    r = subprocess.run([*CLI, *argv, "--target", target], input="hi\n", capture_output=True, text=True,
                       env=ENV, timeout=30)
    assert r.returncode == 1 and time.monotonic() - t0 < 10
    assert r.stderr.count("\n") == 1 and target in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_client_json_stop_top_k_priority_and_info(server: Server) -> None:
    def client(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, "client", "--target", server.target, *args], capture_output=True,
                              text=True, env=ENV, timeout=60)

    r = client("hello", "--max-tokens", "12", "--json", "--top-k", "5", "--priority", "2")
    assert r.returncode == 0, r.stderr
    full = json.loads(r.stdout)
    assert full["finish_reason"] == "length" and len(full["text"]) == 12
    assert full["usage"]["completion_tokens"] == 12 and full["usage"]["prompt_tokens"] > 0
    # --stop: the answer ends before the stop string's first occurrence, finish "stop"
    stop = full["text"][5]
    r = client("hello", "--max-tokens", "12", "--json", "--stop", stop)
    cut = json.loads(r.stdout)
    assert (cut["text"], cut["finish_reason"]) == (full["text"][:full["text"].index(stop)], "stop")
    r = client("--info")
    assert r.returncode == 0 and "Response" not in r.stdout, r.stdout
    assert re.search(r"model +mock \(max context 2048 tokens", r.stdout), r.stdout
    assert re.search(r"policy +trail", r.stdout) and "finished     length 1, stop 1" in r.stdout, r.stdout
    info = json.loads(client("--info", "--json").stdout)
    assert info["health"] == "SERVING" and info["model"] == "mock" and info["num_slots"] == 8
