"""`jtrail client` (one prompt, or the server's info) and `jtrail chat` (a conversation), over gRPC.

    jtrail client "What is the capital of France?" --max-tokens 32
    jtrail client --info
    jtrail chat --system "You are terse."

Errors are one line on stderr, never a traceback: a server that is not there is exit 1 with the
address; in `chat`, Ctrl-C stops the answer being streamed (the server frees its slot) and the
conversation goes on; Ctrl-D (end of input) or /exit ends it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Iterator
from typing import Any

import grpc

from jtrail.client import Client, Delta


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    p.add_argument("--max-tokens", type=int, default=None, help="answer length cap (server default if unset)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (the server default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeat for several); it is not included in the answer")
    p.add_argument("--priority", type=int, default=0, help="lower runs first under --policy priority")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stop=args.stop, priority=args.priority)


def _unreachable(prog: str, target: str, e: grpc.RpcError) -> str:
    return (f"{prog}: error: no jtrail server answers at {target} ({e.code().name}); start one with "
            "`jtrail serve` or pass --target HOST:PORT")


def _check_server(c: Client, target: str, prog: str) -> bool:
    """True when the server answers its health check; else prints one line."""
    try:
        status = c.health(timeout=5.0)
    except grpc.RpcError as e:
        print(_unreachable(prog, target, e), file=sys.stderr)
        return False
    if status != "SERVING":
        print(f"{prog}: error: the server at {target} is {status}", file=sys.stderr)
        return False
    return True


def info_summary(target: str, health: str, i: Any) -> str:
    """ServerInfo as a few readable lines (the `--info` output)."""
    s = i.stats
    finished = ", ".join(f"{k} {v}" for k, v in sorted(s.finished_by_reason.items())) or "none yet"
    return "\n".join([
        f"server       {target}: {health}",
        f"model        {i.model} (max context {i.max_model_len} tokens, vocab {i.vocab_size})",
        f"policy       {i.policy}, probe {i.probe or 'none'}",
        f"capacity     {i.num_slots} slots, {i.num_pages} KV pages of {i.page_size} tokens, "
        f"queue up to {i.max_queue}",
        f"load         {s.running} running, {s.waiting} waiting, KV pages {s.pages_used}/{s.pages_total} "
        f"used, {s.preemptions} preemptions, {s.steps} steps",
        f"finished     {finished}",
    ]) + "\n"


def add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None,
                   help="prompt text (sent as a chat user message); none: same as --info")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, not chat")
    p.add_argument("--system", default=None, help="system message before the prompt (chat only)")
    _sampling_args(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, finish_reason, usage; or the server info) instead")
    p.add_argument("--info", action="store_true", help="print the server's model, policy and load, then exit")


def run_client(args: argparse.Namespace) -> int:
    with Client(args.target) as c:
        try:
            if args.info or args.prompt is None:
                return _print_info(c, args)
            if args.raw:
                prompt: Any = args.prompt
            else:
                prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
                    {"role": "user", "content": args.prompt}]
            text, last = [], None
            for d in c.generate(prompt, timeout=args.timeout, **_options(args)):
                if not args.json:
                    print(d.text, end="", flush=True)
                text.append(d.text)
                last = d
            if args.json:
                print(json.dumps({"request_id": last.request_id, "text": "".join(text),
                                  "finish_reason": last.finish_reason,
                                  "usage": {"prompt_tokens": last.prompt_tokens,
                                            "completion_tokens": last.completion_tokens}}))
            elif last is not None:
                print(f"\n[{last.finish_reason}; prompt {last.prompt_tokens} tokens, "
                      f"completion {last.completion_tokens} tokens]", file=sys.stderr)
        except grpc.RpcError as e:
            if e.code() is grpc.StatusCode.UNAVAILABLE:
                print(_unreachable("jtrail client", args.target, e), file=sys.stderr)
            else:
                print(f"jtrail client: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # the stream's generator cancels the RPC on the way out
            print("\n[stopped]", file=sys.stderr)
            return 130
    return 0


def _print_info(c: Client, args: argparse.Namespace) -> int:
    health = c.health(timeout=5.0)
    info = c.server_info()
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps({"target": args.target, "health": health,
                          **MessageToDict(info, preserving_proto_field_name=True)}))
    else:
        print(info_summary(args.target, health, info), end="")
    return 0


def add_chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system message that opens the conversation")
    _sampling_args(p)


def _read_line(prompt: str) -> str | None:
    """One line of user input; None at end of input (Ctrl-D, or the end of piped input)."""
    try:
        return input(prompt)
    except EOFError:
        return None


def run_chat(args: argparse.Namespace) -> int:
    # Ctrl-C stops an answer even when the chat was started from a shell that ignores SIGINT for
    # background jobs (Python keeps an ignored SIGINT ignored: no KeyboardInterrupt would ever come)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tty = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    with Client(args.target) as c:
        if not _check_server(c, args.target, "jtrail chat"):
            return 1
        if tty:
            model = c.server_info().model
            print(f"jtrail chat with {model} at {args.target}. Ctrl-C stops an answer; Ctrl-D or /exit "
                  "quits; /clear forgets the conversation.")
        while True:
            try:
                line = _read_line("> " if tty else "")
            except KeyboardInterrupt:  # at the prompt: not a way out, as in Python's REPL
                print("\n(Ctrl-D or /exit to quit)")
                continue
            if line is None or line.strip() in ("/exit", "/quit"):
                if tty and line is None:
                    print()
                return 0
            if not line.strip():
                continue
            if line.strip() == "/clear":
                history.clear()
                print("(conversation cleared)")
                continue
            turn = [*history, {"role": "user", "content": line}]
            try:
                answer, ok = _stream_answer(c.generate(system + turn, timeout=args.timeout, **_options(args)))
            except grpc.RpcError as e:
                if e.code() is grpc.StatusCode.UNAVAILABLE:  # the server went away
                    print(_unreachable("jtrail chat", args.target, e), file=sys.stderr)
                    return 1
                print(f"jtrail chat: error: {e.code().name}: {e.details()}", file=sys.stderr)
                continue  # the turn is dropped: the conversation stays as it was
            if answer or ok:  # a stopped answer stays in the history as far as it got
                history = [*turn, {"role": "assistant", "content": answer}]


def _stream_answer(deltas: Iterator[Delta]) -> tuple[str, bool]:
    """Print an answer as it streams; Ctrl-C stops it (closing the stream cancels the request on the
    server). Returns (the text received, whether it finished)."""
    parts: list[str] = []
    try:
        for d in deltas:
            print(d.text, end="", flush=True)
            parts.append(d.text)
        print(flush=True)
        return "".join(parts), True
    except KeyboardInterrupt:
        deltas.close()  # type: ignore[attr-defined] - a generator: cancels the RPC now
        print(" [stopped]", flush=True)
        return "".join(parts), False


def add_client(sub: argparse._SubParsersAction) -> None:
    """Register `jtrail client` on the CLI's subparsers."""
    p = sub.add_parser("client", help="send a prompt to a jtrail server and stream the answer, or --info")
    add_client_args(p)
    p.set_defaults(func=run_client)


def add_chat(sub: argparse._SubParsersAction) -> None:
    """Register `jtrail chat` on the CLI's subparsers."""
    p = sub.add_parser("chat", help="an interactive multi-turn chat with a jtrail server (gRPC)")
    add_chat_args(p)
    p.set_defaults(func=run_chat)
