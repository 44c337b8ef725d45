"""AsyncLLMEngine: the `engine_api.AsyncEngine` protocol on top of LLMEngine.

A background thread owns the LLMEngine and runs `step()` while there is work; the asyncio side only
validates, enqueues commands (add / abort) and reads per-request asyncio queues. The device call
releases the GIL, so streaming, detokenizing and gRPC work on the loop overlap device work.
Commands are applied by the engine thread between steps, so the engine is never touched by two
threads at once; an abort frees the request's slot and pages before the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator

from .engine import LLMEngine
from .engine_api import EngineStats, ModelInfo
from .sequence import FinishReason, InvalidRequestError, QueueFullError, RequestOutput, SamplingParams


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, model_name: str = "jtrail", max_queue: int | None = None):
        self.engine = engine
        self.model_name = model_name
        self.max_queue = max_queue if max_queue is not None else engine.config.max_queue
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending_adds = 0  # submitted, not yet taken by the engine thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self._stopping = False
        self._stats = EngineStats()
        self.error: BaseException | None = None

    # ---- AsyncEngine -------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        e = self.engine
        probe = f"layer {e.probe.cfg.layer}, {e.probe.cfg.num_bins} bins" if e.probe is not None else None
        c = e.config
        return ModelInfo(model_name=self.model_name, max_context=c.max_model_len,
                         vocab_size=e.model_cfg.vocab_size, policy=e.policy.name, num_slots=c.num_slots,
                         page_size=c.page_size, num_pages=c.num_pages, probe=probe)

    def stats(self) -> EngineStats:
        return self._stats  # snapshot taken by the engine thread after each step

    def encode(self, text: str) -> list[int]:
        if self.engine.tokenizer is None:
            raise InvalidRequestError("text", "this engine has no tokenizer; send token ids")
        return list(self.engine.tokenizer.encode(text))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None or not hasattr(tok, "apply_chat_template"):
            raise InvalidRequestError("messages", "this engine's tokenizer has no chat template")
        rendered = tok.apply_chat_template(messages)
        if isinstance(rendered, str):  # jtrail's Tokenizer renders text; the template carries its own BOS
            return list(tok.encode(rendered, add_bos=False))
        return list(rendered)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        self.engine.validate_request(prompt_ids, params)
        if request_id in self._streams:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        if self._stopping or self._thread is None:
            raise QueueFullError("engine is not running")
        if self._stats.waiting + self._pending_adds >= self.max_queue:
            raise QueueFullError(f"waiting queue is full ({self.max_queue} requests)")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._pending_adds += 1
        self._send(("add", request_id, list(prompt_ids), params, priority, time.monotonic()))
        finished = False
        try:
            while True:
                out: RequestOutput = await stream.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # client gone: free slot and pages now
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

    def _apply_commands(self) -> list[RequestOutput]:
        outs = []
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return outs
            if cmd[0] == "add":
                _, rid, prompt, params, priority, t = cmd
                self._pending_adds -= 1
                try:
                    self.engine.add_request(rid, prompt, params, priority=priority, arrival_time=t)
                except (InvalidRequestError, QueueFullError) as exc:  # raced past the front-end check
                    outs.append(RequestOutput(rid, [], "", True, FinishReason.ERROR, len(prompt), 0,
                                              error=str(exc)))
            elif cmd[0] == "abort":
                out = self.engine.abort(cmd[1])
                if out is not None:
                    outs.append(out)

    def _run(self) -> None:
        try:
            while not self._stop:
                outs = self._apply_commands()
                if self.engine.has_unfinished():
                    outs += self.engine.step()
                self._stats = self.engine.stats()
                if outs:
                    self._loop.call_soon_threadsafe(self._deliver, outs)
                if not self.engine.has_unfinished() and self._cmds.empty():
                    self._wake.wait(0.1)
                    self._wake.clear()
        except BaseException as exc:  # a dead engine thread must not leave clients hanging
            self.error = exc
            self._loop.call_soon_threadsafe(self._fail_all, repr(exc))

    def _deliver(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)

    def _fail_all(self, message: str) -> None:
        for rid, stream in self._streams.items():
            stream.put_nowait(RequestOutput(rid, [], "", True, FinishReason.ERROR, 0, 0, error=message))
