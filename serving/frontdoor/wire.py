"""Registers a `jtrail.v1.Jtrail` servicer so that undecodable requests get INVALID_ARGUMENT.

With the generated `add_JtrailServicer_to_server`, the gRPC runtime parses each request before the
servicer runs; bytes that are not a valid message (garbage, truncated fields, a string field holding
invalid UTF-8) then fail inside the runtime with UNKNOWN and internal exception text. Here the runtime
hands over the raw bytes and the handler parses them, so a malformed request is the client's error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from .proto import jtrail_v1_pb2 as pb
from .proto import jtrail_v1_pb2_grpc as pb_grpc
from .servicer import SERVICE_NAME


async def parse(cls: type[Message], raw: bytes, context: grpc.aio.ServicerContext) -> Any:
    """`raw` as a `cls` message; aborts the RPC with INVALID_ARGUMENT when it does not decode."""
    try:
        return cls.FromString(raw)
    except (DecodeError, ValueError, RuntimeError) as e:  # upb raises DecodeError; be generous
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"invalid request: not a valid {cls.DESCRIPTOR.full_name} message ({e})")


def add_jtrail_servicer(servicer: pb_grpc.JtrailServicer, server: grpc.aio.Server) -> None:
    """Like `pb_grpc.add_JtrailServicer_to_server`, with request parsing inside the handler."""

    async def generate(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        req = await parse(pb.GenerateRequest, raw, context)
        async for resp in servicer.Generate(req, context):
            yield resp

    async def server_info(raw: bytes, context: grpc.aio.ServicerContext) -> pb.ServerInfoResponse:
        return await servicer.ServerInfo(await parse(pb.ServerInfoRequest, raw, context), context)

    async def stats(raw: bytes, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        return await servicer.Stats(await parse(pb.StatsRequest, raw, context), context)

    handlers = {  # request_deserializer=None: the handler gets the raw bytes
        "Generate": grpc.unary_stream_rpc_method_handler(
            generate, response_serializer=pb.GenerateResponse.SerializeToString),
        "ServerInfo": grpc.unary_unary_rpc_method_handler(
            server_info, response_serializer=pb.ServerInfoResponse.SerializeToString),
        "Stats": grpc.unary_unary_rpc_method_handler(
            stats, response_serializer=pb.StatsResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
