"""The `jtrail.v1.Jtrail` gRPC service: turns requests into engine calls and engine errors into statuses.

Error mapping (the server must never go down for one bad request):
InvalidRequestError -> INVALID_ARGUMENT naming the field, QueueFullError -> RESOURCE_EXHAUSTED,
EngineDeadError -> UNAVAILABLE, anything else from the engine -> INTERNAL naming the request.
Client text is size-checked before it is tokenized, and tokenized off the event loop (a large prompt
must not stall every other call); chat roles are checked by `chat.check_messages`, as `LLM.chat` does.
Deadlines and client cancellation reach the handler as
asyncio cancellation; closing the engine's stream then aborts the request so its slot and pages
are freed (the gRPC runtime reports DEADLINE_EXCEEDED / CANCELLED to the client).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from ..engine_api import AsyncEngine, EngineStats, ModelInfo
from ..sequence import EngineDeadError, FinishReason, InvalidRequestError, QueueFullError, SamplingParams
from .chat import check_messages, check_text_size
from .metrics import RequestTiming, ServerMetrics
from .proto import jtrail_v1_pb2 as pb
from .proto import jtrail_v1_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Jtrail"].full_name
_REASONS = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
            FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED, FinishReason.ERROR: pb.FINISH_REASON_ERROR}


def stats_to_pb(s: EngineStats) -> pb.StatsResponse:
    return pb.StatsResponse(waiting=s.waiting, running=s.running, swapped=s.swapped,
                            pages_used=s.pages_used, pages_total=s.pages_total, preemptions=s.preemptions,
                            outstanding_tokens=s.outstanding_tokens, steps=s.steps,
                            finished_by_reason=s.finished_by_reason,
                            slot_free_tokens=list(s.slot_free_tokens))


def info_to_pb(i: ModelInfo, stats: EngineStats, max_queue: int = 0) -> pb.ServerInfoResponse:
    return pb.ServerInfoResponse(model=i.model_name, max_model_len=i.max_model_len, vocab_size=i.vocab_size,
                                 policy=i.policy, num_slots=i.num_slots, num_pages=i.num_pages,
                                 page_size=i.page_size, probe=i.probe or "", max_queue=max_queue,
                                 stats=stats_to_pb(stats))


def sampling_from_pb(req: pb.GenerateRequest, default_max_tokens: int) -> SamplingParams:
    """Build validated SamplingParams; raises InvalidRequestError naming the bad field."""
    sp = req.sampling
    return SamplingParams(
        max_tokens=req.max_tokens if req.HasField("max_tokens") else default_max_tokens,
        temperature=sp.temperature if sp.HasField("temperature") else 0.0,
        top_p=sp.top_p if sp.HasField("top_p") else 1.0,
        top_k=sp.top_k if sp.HasField("top_k") else 0,
        seed=sp.seed if sp.HasField("seed") else None,
        stop=tuple(req.stop), stop_token_ids=tuple(req.stop_token_ids), ignore_eos=req.ignore_eos,
        forced_output_ids=tuple(req.forced_output_ids))


def resolve_max_tokens(requested: int | None, default: int, room: int) -> int:
    """The request's max_tokens: unset means "up to the default, as far as the context allows" (vLLM);
    a set value that does not fit the `room` left after the prompt is refused (shared by gRPC and HTTP)."""
    if requested is None:
        return min(default, room)
    if requested > room:
        raise InvalidRequestError("max_tokens", f"{requested} does not fit: only {room} of "
                                                "the context is left after the prompt")
    return requested


class JtrailServicer(pb_grpc.JtrailServicer):
    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, default_max_tokens: int = 256,
                 max_queue: int = 0) -> None:
        self.engine = engine
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens
        self.max_queue = max_queue

    async def _prompt_ids(self, req: pb.GenerateRequest) -> list[int]:
        kind = req.WhichOneof("prompt")
        if kind is None:
            raise InvalidRequestError("prompt", "set one of text, token_ids or chat")
        max_model_len = self.engine.info().max_model_len
        if kind == "text":
            if not req.text:
                raise InvalidRequestError("prompt", "must not be empty")
            check_text_size(req.text, max_model_len)
            return await asyncio.to_thread(self.engine.encode, req.text)
        if kind == "token_ids":
            if len(req.token_ids.ids) >= max_model_len:  # before copying a huge list
                raise InvalidRequestError("prompt", f"{len(req.token_ids.ids)} tokens leave no room in the "
                                                    f"{max_model_len}-token context")
            return list(req.token_ids.ids)
        msgs = check_messages([{"role": m.role, "content": m.content} for m in req.chat.messages],
                              max_model_len)
        return await asyncio.to_thread(self.engine.apply_chat_template, msgs)

    def _check_prompt(self, prompt_ids: list[int]) -> int:
        """Engine-independent prompt limits (every engine gets the same errors); returns the room left."""
        info = self.engine.info()
        if not prompt_ids:
            raise InvalidRequestError("prompt", "must not be empty")
        if len(prompt_ids) >= info.max_model_len:
            raise InvalidRequestError("prompt", f"{len(prompt_ids)} tokens leave no room in the "
                                                f"{info.max_model_len}-token context")
        if any(not 0 <= t < info.vocab_size for t in prompt_ids):
            raise InvalidRequestError("prompt.token_ids", f"ids must be in [0, {info.vocab_size})")
        return info.max_model_len - len(prompt_ids)

    async def _reject(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, msg: str) -> None:
        self.metrics.rejected.labels(code=code.name).inc()
        await context.abort(code, msg)

    async def Generate(self, request: pb.GenerateRequest,  # noqa: N802 - gRPC method name
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        arrival = time.monotonic()
        dead = getattr(self.engine, "error", None)
        if dead is not None:  # before any await: the server is stopping, answer at once
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, f"server unavailable: the engine "
                                                                     f"has stopped: {dead!r}")
            return
        try:
            prompt_ids = await self._prompt_ids(request)
            room = self._check_prompt(prompt_ids)
            params = sampling_from_pb(request, min(self.default_max_tokens, room))
            resolve_max_tokens(params.max_tokens, self.default_max_tokens, room)
        except InvalidRequestError as e:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {e}")
            return
        except EngineDeadError as e:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, f"server unavailable: {e}")
            return
        except Exception as e:  # a tokenizer/template bug: this request fails, the server serves on
            log.exception("could not prepare the prompt of a request")
            await self._reject(context, grpc.StatusCode.INTERNAL, f"could not prepare the prompt: "
                                                                  f"{type(e).__name__}")
            return
        request_id = request.request_id or uuid.uuid4().hex
        stream = self.engine.generate(request_id, prompt_ids, params, priority=request.priority)
        first_token: float | None = None
        n_out, reason = 0, FinishReason.CANCELLED
        n_prompt: int | None = None
        error: tuple[grpc.StatusCode, str] | None = None
        try:
            async for out in stream:
                if out.new_token_ids and first_token is None:
                    first_token = time.monotonic()
                n_out, n_prompt = out.completion_tokens, out.prompt_tokens
                resp = pb.GenerateResponse(
                    request_id=request_id, token_ids=out.new_token_ids, text=out.new_text,
                    usage=pb.Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens))
                if out.remaining_estimate is not None:
                    resp.remaining_estimate = out.remaining_estimate
                if out.finished:
                    reason = out.finish_reason or FinishReason.STOP
                    resp.finish_reason = _REASONS[reason]
                    if out.error:
                        error = (grpc.StatusCode.INTERNAL, f"engine error: {out.error}")
                        break
                yield resp
        except InvalidRequestError as e:
            error = (grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {e}")
        except QueueFullError as e:
            error = (grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {e}")
        except EngineDeadError as e:
            error, reason = (grpc.StatusCode.UNAVAILABLE, f"server unavailable: {e}"), FinishReason.ERROR
        except Exception as e:  # never let one request take the server down
            log.exception("engine failed on request %s", request_id)
            error, reason = (grpc.StatusCode.INTERNAL, f"engine error on request {request_id!r}: "
                                                       f"{type(e).__name__}: {e}"), FinishReason.ERROR
        finally:
            # Client cancelled / deadline passed (CancelledError) or an error: abort in the engine.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
            if error is None or first_token is not None:
                self.metrics.observe_request(RequestTiming(arrival, first_token, time.monotonic(), n_out,
                                                           request_id, n_prompt), reason.value)
        if error is not None:
            await self._reject(context, *error)

    async def ServerInfo(self, request: pb.ServerInfoRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.ServerInfoResponse:
        return info_to_pb(self.engine.info(), self.engine.stats(), self.max_queue)

    async def Stats(self, request: pb.StatsRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        return stats_to_pb(self.engine.stats())
