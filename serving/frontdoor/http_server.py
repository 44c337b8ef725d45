"""jtrail's OpenAI-compatible HTTP front door (FastAPI on uvicorn), beside the gRPC one on the same engine.

Endpoints: POST /v1/completions, POST /v1/chat/completions (JSON, or SSE with `stream: true`, ending in
`data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text from the same registry the
gRPC server fills). Request shapes and jtrail's extensions are in `openai_protocol`.

It talks to the `engine_api.AsyncEngine` protocol exactly as `servicer.JtrailServicer` does and reuses
its prompt checks, so both doors accept and refuse the same requests.

Status codes (body in OpenAI's shape, {"error": {"message", "type", "param", "code"}}):
- 400: a bad or unsupported parameter; `param` names it (pydantic's validation errors too: FastAPI's
  default 422 is turned into 400, as OpenAI and vLLM answer).
- 404: a `model` this server does not serve.
- 503 (with Retry-After) when the engine's waiting queue is full or the server is shutting down. Not
  429: 429 tells a client that *it* exceeded a rate or quota (OpenAI's meaning), while a full queue is
  the server's capacity shared by everyone; 503 is "temporarily unable, retry later", which is what
  load balancers and the `openai` SDK's retry logic expect of an overloaded upstream.
- 504 when the request's own deadline (`timeout`, seconds, in the body) passes: the engine behind this
  front door did not answer in time, which is the gateway-timeout meaning (grpc-gateway maps gRPC's
  DEADLINE_EXCEEDED to 504 the same way). 408 is kept for its RFC meaning: the *client* was too slow
  to send its request (uvicorn's business, not ours).
- 500: the engine failed on this request (the server keeps serving).
Once a stream has started (200 sent) a later error arrives as one SSE event `data: {"error": ...}`
followed by `data: [DONE]`, which the `openai` SDK raises as an APIError.

Client disconnects: a non-streaming request races its handler against the ASGI `http.disconnect`
message, and a stream's response does the same (`_EventStream`), so a client that goes away cancels
the handler at once; closing the engine's stream then aborts the request, and the engine thread frees
its slot and KV pages before its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from ...models.errors import JtrailError
from ..engine_api import AsyncEngine
from ..sequence import FinishReason, InvalidRequestError, QueueFullError, RequestOutput, SamplingParams
from . import openai_protocol as api
from .metrics import RequestTiming, ServerMetrics
from .servicer import JtrailServicer, resolve_max_tokens

log = logging.getLogger(__name__)
T = TypeVar("T")

# Error status -> the gRPC code name the shared `requests_rejected` counter already uses, so one metric
# counts refusals the same way whichever door a request came through.
_GRPC_CODE = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 500: "INTERNAL", 503: "RESOURCE_EXHAUSTED",
              504: "DEADLINE_EXCEEDED"}
_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


class ApiError(JtrailError):
    """An error answered in OpenAI's JSON shape with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return api.ErrorResponse(error=api.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                     code=self.code)).model_dump()


class _ClientGone(Exception):
    """The HTTP client disconnected while its request was being served."""


def _as_api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, f"invalid request: {exc}", param=exc.field)
    if isinstance(exc, QueueFullError):
        return ApiError(503, f"server busy: {exc}; retry later", code="queue_full")
    return ApiError(500, f"engine error: {type(exc).__name__}: {exc}", code="engine_error")


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"  # loopback unless the operator opts in to exposure
    port: int = 8000  # 0 picks a free port (see HttpServer.port)
    default_max_tokens: int = 256
    max_queue: int = 0  # reported in /v1/models; the engine enforces it
    grace_s: float = 10.0  # drain time for in-flight requests on shutdown


class _EventStream(StreamingResponse):
    """SSE response that notices a client disconnect at once and always closes its body iterator.

    Starlette only listens for `http.disconnect` on ASGI servers older than spec 2.4 (newer ones are
    expected to fail the next `send`, i.e. after the next token), and it never closes the iterator, so
    an abandoned generator would keep its request alive until garbage collection. Closing it here runs
    the generator's `finally`, which aborts the request in the engine."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def run(func: Callable[[], Awaitable[None]]) -> None:
                    with contextlib.suppress(OSError):  # the socket went away mid-send
                        await func()
                    tg.cancel_scope.cancel()

                tg.start_soon(run, lambda: self.stream_response(send))
                tg.start_soon(run, lambda: self.listen_for_disconnect(receive))
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise _ClientGone (vLLM's
    `with_cancellation` idea: uvicorn does not cancel a handler whose client has left)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # this handler itself was cancelled (server shutdown)
        watcher.cancel()
        task.cancel()
        raise
    watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise _ClientGone()
    return task.result()


def _sse(obj: BaseModel | dict[str, Any]) -> str:
    data = obj.model_dump_json(exclude_none=False) if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


class OpenAIFrontDoor:
    """The request handlers, bound to one engine; `app` is the FastAPI application."""

    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, config: HttpConfig) -> None:
        self.engine = engine
        self.metrics = metrics
        self.config = config
        # The gRPC servicer owns the engine-independent prompt checks; reuse them so both doors agree.
        self._checks = JtrailServicer(engine, metrics, config.default_max_tokens, config.max_queue)
        self.created = int(time.time())
        self.app = self._build_app()

    # ---- app ------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="jtrail OpenAI-compatible API", docs_url=None, redoc_url=None)

        @app.exception_handler(ApiError)
        async def api_error(_: Request, exc: ApiError) -> JSONResponse:
            return self._error_response(exc)

        @app.exception_handler(RequestValidationError)
        async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
            err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
            if err.get("type") == "json_invalid":
                return self._error_response(ApiError(400, "the body is not valid JSON"))
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            param = ".".join(loc) or None
            return self._error_response(ApiError(400, f"{param or 'body'}: {err.get('msg')}", param=param))

        @app.post("/v1/completions", response_model=None)
        async def completions(body: api.CompletionRequest, request: Request) -> Response:
            return await self._serve(body, request, chat=False)

        @app.post("/v1/chat/completions", response_model=None)
        async def chat_completions(body: api.ChatCompletionRequest, request: Request) -> Response:
            return await self._serve(body, request, chat=True)

        @app.get("/v1/models")
        async def models() -> api.ModelList:
            i = self.engine.info()
            return api.ModelList(data=[api.ModelCard(
                id=i.model_name, created=self.created, max_model_len=i.max_model_len, policy=i.policy,
                probe=i.probe, num_slots=i.num_slots, max_queue=self.config.max_queue)])

        @app.get("/health")
        async def health() -> Response:
            err = getattr(self.engine, "error", None)
            if err is not None:
                return self._error_response(ApiError(503, f"engine failed: {err!r}", code="engine_dead"))
            return Response(status_code=200)

        @app.get("/metrics")
        async def metrics() -> Response:
            self.metrics.update_engine(self.engine.stats())  # fresh gauges even with no gRPC refresher
            return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

        return app

    def _error_response(self, exc: ApiError) -> JSONResponse:
        self.metrics.rejected.labels(code=_GRPC_CODE.get(exc.status, str(exc.status))).inc()
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    # ---- request -> engine ----------------------------------------------------------------------
    def _check_model(self, name: str | None) -> str:
        served = self.engine.info().model_name
        if name is not None and name != served:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves `{served}`",
                           param="model", code="model_not_found")
        return served

    def _prompt_ids(self, body: api.CompletionRequest | api.ChatCompletionRequest, chat: bool) -> list[int]:
        if chat:
            msgs = [{"role": m.role, "content": m.text()} for m in body.messages]  # type: ignore[union-attr]
            return self.engine.apply_chat_template(msgs)
        p = body.prompt  # type: ignore[union-attr]
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise InvalidRequestError("prompt", f"one prompt per request (got a batch of {len(p)})")
            p = p[0]
        if isinstance(p, str):
            if not p:
                raise InvalidRequestError("prompt", "must not be empty")
            return self.engine.encode(p)
        return list(p)

    def _sampling(self, body: api.CompletionRequest | api.ChatCompletionRequest, room: int) -> SamplingParams:
        top_k = body.top_k if body.top_k not in (None, -1) else 0  # vLLM: -1 means no cut
        return SamplingParams(
            max_tokens=resolve_max_tokens(body.max_tokens, self.config.default_max_tokens, room),
            temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
            top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k, seed=body.seed,
            stop=body.stop_list(), stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos)

    async def _serve(self, body: api.CompletionRequest | api.ChatCompletionRequest, request: Request,
                     chat: bool) -> Response:
        arrival = time.monotonic()
        model = self._check_model(body.model)
        bad = body.unsupported()
        if bad is not None:
            raise ApiError(400, f"{bad[0]}: {bad[1]}", param=bad[0])
        try:
            prompt_ids = self._prompt_ids(body, chat)
            room = self._checks._check_prompt(prompt_ids)
            params = self._sampling(body, room)
        except InvalidRequestError as e:
            raise _as_api_error(e) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        req = _Live(self, rid, model, chat, body, arrival)
        stream = self.engine.generate(rid, prompt_ids, params, priority=body.priority)
        try:
            # The first output validates and enqueues (errors become statuses), then waits for the
            # first token: a streamed response starts (200) only once there is something to send.
            first = await _until_disconnect(request, req.next(stream))
            if body.stream:
                return _EventStream(req.events(stream, first), media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache"})

            async def collect() -> list[RequestOutput]:
                outs = [first]
                while not outs[-1].finished:
                    outs.append(await req.next(stream))
                return outs

            outs = await _until_disconnect(request, collect())  # one watcher for the whole answer
        except _ClientGone:
            await stream.aclose()  # type: ignore[attr-defined]
            req.done(FinishReason.CANCELLED, started=req.first_token is not None)
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
        except BaseException as e:
            await stream.aclose()
            req.done(FinishReason.ERROR, started=req.first_token is not None)
            if isinstance(e, Exception):
                raise _as_api_error(e) from None
            raise
        await stream.aclose()
        return req.response(outs)


class _Live:
    """One request in flight: deadline, timing for the metrics, and the OpenAI objects it produces."""

    def __init__(self, door: OpenAIFrontDoor, rid: str, model: str, chat: bool,
                 body: api.CompletionRequest | api.ChatCompletionRequest, arrival: float) -> None:
        self.door, self.rid, self.model, self.chat, self.body = door, rid, model, chat, body
        self.arrival = arrival
        self.deadline = arrival + body.timeout if body.timeout is not None else None
        self.created = int(time.time())
        self.first_token: float | None = None
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self._observed = False

    async def next(self, stream: AsyncIterator[RequestOutput]) -> RequestOutput:
        """The next engine output; ApiError on deadline, engine error or a server-side cancel."""
        try:
            if self.deadline is None:
                out = await anext(stream)
            else:
                out = await asyncio.wait_for(anext(stream), max(0.0, self.deadline - time.monotonic()))
        except TimeoutError:
            raise ApiError(504, f"deadline of {self.body.timeout}s exceeded", param="timeout",
                           code="deadline_exceeded") from None
        except StopAsyncIteration:
            raise ApiError(500, "engine stream ended without a finish", code="engine_error") from None
        if out.error:
            raise ApiError(500, f"engine error: {out.error}", code="engine_error")
        if out.finished and out.finish_reason is FinishReason.CANCELLED:
            raise ApiError(503, "request cancelled by the server (shutting down)", code="cancelled")
        if out.new_token_ids and self.first_token is None:
            self.first_token = time.monotonic()
        self.completion_tokens, self.prompt_tokens = out.completion_tokens, out.prompt_tokens
        return out

    def done(self, reason: FinishReason, started: bool = True) -> None:
        """Record the request in the latency metrics once (refusals are counted as rejections)."""
        if self._observed or not started:
            return
        self._observed = True
        self.door.metrics.observe_request(
            RequestTiming(self.arrival, self.first_token, time.monotonic(), self.completion_tokens, self.rid,
                          self.prompt_tokens),
            reason.value)

    def _usage(self) -> api.Usage:
        return api.Usage.of(self.prompt_tokens, self.completion_tokens)

    def response(self, outs: list[RequestOutput]) -> JSONResponse:
        last = outs[-1]
        self.done(last.finish_reason or FinishReason.STOP)
        text = "".join(o.new_text for o in outs)
        reason = _FINISH.get(last.finish_reason or FinishReason.STOP)
        common = dict(id=self.rid, created=self.created, model=self.model, usage=self._usage(),
                      remaining_estimate=last.remaining_estimate)
        if self.chat:
            resp: BaseModel = api.ChatCompletionResponse(
                choices=[api.ChatChoice(message=api.ChatMessageOut(content=text), finish_reason=reason)],
                **common)
        else:
            resp = api.CompletionResponse(choices=[api.CompletionChoice(text=text, finish_reason=reason)],
                                          **common)
        return JSONResponse(resp.model_dump())

    def _chunk(self, text: str | None, reason: str | None, estimate: float | None,
               role: bool = False) -> BaseModel:
        opts = self.body.stream_options
        usage = self._usage() if opts is not None and opts.continuous_usage_stats else None
        common = dict(id=self.rid, created=self.created, model=self.model, usage=usage,
                      remaining_estimate=estimate)
        if self.chat:
            delta = api.ChatDelta(role="assistant" if role else None, content=text)
            return api.ChatCompletionChunk(choices=[api.ChatChunkChoice(delta=delta, finish_reason=reason)],
                                           **common)
        return api.CompletionChunk(choices=[api.CompletionChoice(text=text or "", finish_reason=reason)],
                                   **common)

    async def events(self, stream: AsyncIterator[RequestOutput], first: RequestOutput) -> AsyncIterator[str]:
        """SSE body: one chunk per engine output that carries tokens, the usage chunk if asked, [DONE]."""
        reason = FinishReason.CANCELLED  # until the engine says otherwise (client gone, server stop)
        try:
            if self.chat:  # OpenAI opens a chat stream with the role
                yield _sse(self._chunk("", None, first.remaining_estimate, role=True))
            out = first
            while True:
                if out.new_token_ids or out.finished:
                    fin = _FINISH.get(out.finish_reason) if out.finished else None
                    yield _sse(self._chunk(out.new_text, fin, out.remaining_estimate))
                if out.finished:
                    reason = out.finish_reason or FinishReason.STOP
                    break
                out = await self.next(stream)
            opts = self.body.stream_options
            if opts is not None and opts.include_usage:
                kind = "chat.completion.chunk" if self.chat else "text_completion"
                yield _sse({"id": self.rid, "object": kind, "created": self.created, "model": self.model,
                            "choices": [], "usage": self._usage().model_dump()})
        except ApiError as e:
            reason = FinishReason.ERROR
            self.door.metrics.rejected.labels(code=_GRPC_CODE.get(e.status, str(e.status))).inc()
            yield _sse({"error": {**e.body()["error"], "code": e.status}})
        except Exception as e:  # never let one request take the server down
            log.exception("stream %s failed", self.rid)
            reason = FinishReason.ERROR
            yield _sse(_as_api_error(e).body())
        finally:
            # Client gone (cancelled here or closed by _EventStream) or done: abort/free in the engine.
            await stream.aclose()  # type: ignore[attr-defined]
            self.done(reason)
        yield "data: [DONE]\n\n"


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # noqa: ANN201
        # `jtrail serve` owns SIGTERM/SIGINT: one handler drains both doors, then stops the engine.
        yield


class HttpServer:
    """Runs the front door's app on uvicorn inside the caller's asyncio loop (the engine's loop)."""

    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, config: HttpConfig | None = None) -> None:
        self.config = config or HttpConfig()
        self.door = OpenAIFrontDoor(engine, metrics, self.config)
        self.port: int | None = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task | None = None

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def start(self) -> None:
        """Bind (raises OSError if the port is taken) and serve in a background task."""
        c = self.config
        family = socket.AF_INET6 if ":" in c.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((c.host, c.port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot bind HTTP server to {c.host}:{c.port}: {e.strerror}") from None
        sock.listen(2048)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        cfg = uvicorn.Config(self.door.app, lifespan="off", log_level="warning", access_log=False,
                             timeout_graceful_shutdown=max(int(c.grace_s), 1))
        self._server = _Uvicorn(cfg)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="jtrail-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # re-raise the start-up failure
                raise RuntimeError("HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        log.info("OpenAI-compatible HTTP API on http://%s/v1", self.address)

    async def stop(self) -> None:
        """Stop accepting; in-flight requests get up to `grace_s` to finish, then are cancelled."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._server, self._task = None, None
