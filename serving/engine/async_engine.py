"""AsyncLLMEngine: the `engine_api.AsyncEngine` protocol on top of LLMEngine.

A background thread owns the LLMEngine and runs `step()` while there is work; the asyncio side only
validates, enqueues commands (add / abort) and reads per-request asyncio queues. The device call
releases the GIL, so streaming, detokenizing and gRPC work on the loop overlap device work.
Commands are applied by the engine thread between steps, so the engine is never touched by two
threads at once; an abort frees the request's slot and pages before the next step.

Failure isolation (one bad request must never take the server down):
- an error in `add_request` fails that request alone (typed: InvalidRequestError, QueueFullError, or
  RequestFailedError naming it);
- an error in `step()` that names its request (RequestFailedError) fails that request alone; one
  that names none fails the requests of that step (the batch cannot be trusted any more: their
  partial state is dropped and their pages freed) and the engine serves on;
- if the loop itself dies (an error outside a step, an abort that fails, or `MAX_FAILED_STEPS`
  steps failing in a row, e.g. a lost device), every open stream and every later request gets
  EngineDeadError at once, and `on_fatal` tells the server (health NOT_SERVING, process exits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

from ..engine_api import EngineStats, ModelInfo
from ..frontdoor.chat import check_messages
from ..sequence import (
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    RequestOutput,
    SamplingParams,
    check_priority,
)
from .llm_engine import LLMEngine

log = logging.getLogger(__name__)

MAX_FAILED_STEPS = 3  # steps failing in a row before the engine is declared dead


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, model_name: str = "jtrail", max_queue: int | None = None):
        self.engine = engine
        self.model_name = model_name
        self.max_queue = max_queue if max_queue is not None else engine.config.max_queue
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending_adds = 0  # submitted, not yet taken by the engine thread (under _lock)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self._stopping = False
        self._stats = EngineStats()
        self.error: BaseException | None = None  # set once the engine loop has died
        self.on_fatal: Callable[[BaseException], None] | None = None  # called on the loop thread

    # ---- AsyncEngine -------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        e = self.engine
        probe = f"layer {e.probe.cfg.layer}, {e.probe.cfg.num_bins} bins" if e.probe is not None else None
        c = e.config
        return ModelInfo(model_name=self.model_name, max_model_len=c.max_model_len,
                         vocab_size=e.model_cfg.vocab_size, policy=e.policy.name, num_slots=c.num_slots,
                         page_size=c.page_size, num_pages=c.num_pages, probe=probe)

    def stats(self) -> EngineStats:
        return self._stats  # snapshot taken by the engine thread after each step

    def encode(self, text: str) -> list[int]:
        """Client text as plain text: control-token strings in it stay text (thread-safe)."""
        tok = self.engine.tokenizer
        if tok is None:
            raise InvalidRequestError("text", "this engine has no tokenizer; send token ids")
        if hasattr(tok, "encode_chat"):  # jtrail's Tokenizer: can keep control tokens out
            return list(tok.encode(text, special=False))
        return list(tok.encode(text))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Template tokens with control tokens, message content as plain text (thread-safe)."""
        tok = self.engine.tokenizer
        if tok is None or not hasattr(tok, "encode_chat"):
            raise InvalidRequestError("messages", "this engine's tokenizer has no chat template")
        try:
            return list(tok.encode_chat(check_messages(messages)))
        except ValueError as e:  # ChatTemplateError: the template rejected the conversation
            if isinstance(e, InvalidRequestError):
                raise
            raise InvalidRequestError("messages", str(e)) from e

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        if self.error is not None:
            raise EngineDeadError(f"the engine has stopped: {self.error!r}")
        self.engine.validate_request(prompt_ids, params)
        priority = check_priority(priority)
        if request_id in self._streams:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        if self._stopping or self._thread is None:
            raise QueueFullError("engine is not running")
        with self._lock:  # the engine thread decrements it when it takes the request
            if self._stats.waiting + self._pending_adds >= self.max_queue:
                raise QueueFullError(f"waiting queue is full ({self.max_queue} requests)")
            self._pending_adds += 1
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._send(("add", request_id, list(prompt_ids), params, priority, time.monotonic()))
        finished = False
        try:
            while True:
                out: RequestOutput | BaseException = await stream.get()
                if isinstance(out, BaseException):  # this request failed (or the engine died)
                    finished = True
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and self.error is None:  # client gone: free slot and pages now
                self._send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        if request_id in self._streams:
            self._send(("abort", request_id))

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stop = self._stopping = False
        self._thread = threading.Thread(target=self._run, name="jtrail-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Refuse new requests, let in-flight ones finish for up to `grace_s`, then cancel the rest."""
        self._stopping = True
        deadline = time.monotonic() + grace_s
        while self._streams and time.monotonic() < deadline and self._thread is not None:
            await asyncio.sleep(0.01)
        for rid in list(self._streams):
            self._send(("abort", rid))
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
            self._thread = None

    # ---- engine thread -----------------------------------------------------------------------
    def _send(self, cmd: tuple) -> None:
        self._cmds.put(cmd)
        self._wake.set()

    def _apply_commands(self) -> list[RequestOutput | tuple[str, BaseException]]:
        outs: list[RequestOutput | tuple[str, BaseException]] = []
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return outs
            if cmd[0] == "add":
                _, rid, prompt, params, priority, t = cmd
                with self._lock:
                    self._pending_adds -= 1
                try:
                    self.engine.add_request(rid, prompt, params, priority=priority, arrival_time=t)
                except (InvalidRequestError, QueueFullError) as exc:  # raced past the front-end check
                    outs.append((rid, exc))
                except Exception as exc:  # tied to this request: it alone fails
                    log.exception("engine failed to add request %r", rid)
                    with contextlib.suppress(Exception):  # add_request may have half-registered it
                        self.engine.abort(rid)
                    outs.append((rid, RequestFailedError(rid, f"{type(exc).__name__}: {exc}")))
            elif cmd[0] == "abort":
                out = self.engine.abort(cmd[1])
                if out is not None:
                    outs.append(out)

    def _step(self) -> list[RequestOutput | tuple[str, BaseException]]:
        """One engine step; a failure is confined to the request(s) it belongs to (see module doc)."""
        before = {s.request_id for s in self.engine.running}
        try:
            outs: list = list(self.engine.step())
        except RequestFailedError as exc:
            log.error("engine step failed on request %r: %s", exc.request_id, exc)
            self.engine.abort(exc.request_id)
            return [(exc.request_id, exc)]
        except Exception as exc:
            self._failed_steps += 1
            if self._failed_steps >= MAX_FAILED_STEPS:
                raise
            # the step's requests: those that ran, were admitted, or got output (maybe finished)
            # in it; an output the failed step did not return would leave its stream waiting
            ran = before | {s.request_id for s in self.engine.running} | self.engine.pending_output_ids()
            rids = sorted(ran
                          # nothing ran: the step failed on the waiting ones (e.g. a probe prefill)
                          or {s.request_id for s in self.engine.waiting})
            log.exception("engine step failed; failing the requests it ran: %s", rids)
            outs = []
            for rid in rids:
                self.engine.abort(rid)  # frees slot and pages; raising here kills the loop
                outs.append((rid, RequestFailedError(rid, f"{type(exc).__name__}: {exc}")))
            return outs
        self._failed_steps = 0
        return outs

    def _run(self) -> None:
        self._failed_steps = 0
        try:
            while not self._stop:
                outs = self._apply_commands()
                if self.engine.has_unfinished():
                    outs += self._step()
                self._stats = self.engine.stats()
                if outs:
                    self._loop.call_soon_threadsafe(self._deliver, outs)
                if not self.engine.has_unfinished() and self._cmds.empty():
                    self._wake.wait(0.1)
                    self._wake.clear()
        except BaseException as exc:  # a dead engine thread must not leave clients hanging
            log.critical("engine loop died: %r", exc, exc_info=exc)
            self.error = exc  # generate() refuses from now on
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                self._loop.call_soon_threadsafe(self._fail_all, exc)

    def _deliver(self, outs: list[RequestOutput | tuple[str, BaseException]]) -> None:
        for out in outs:
            rid, item = (out[0], out[1]) if isinstance(out, tuple) else (out.request_id, out)
            stream = self._streams.get(rid)
            if stream is not None:
                stream.put_nowait(item)

    def _fail_all(self, exc: BaseException) -> None:
        dead = EngineDeadError(f"the engine has stopped: {exc!r}")
        for stream in self._streams.values():
            stream.put_nowait(dead)
        if self.on_fatal is not None:
            self.on_fatal(exc)
