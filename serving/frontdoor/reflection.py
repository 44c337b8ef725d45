"""Server reflection under both names clients use: `grpc.reflection.v1` (current grpcurl, grpcui,
Postman) and `grpc.reflection.v1alpha` (older clients).

grpcio-reflection (up to 1.85.1, the newest at the time of writing) ships only v1alpha. The v1 proto is
the v1alpha one renamed: same messages, same field numbers, so the same bytes on the wire. v1 is
therefore served by the library's own servicer, registered a second time under the v1 method path
with the v1alpha message classes doing the (identical) encoding.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_reflection.v1alpha import _async, reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """List `service_names` (plus both reflection services) through reflection v1 and v1alpha."""
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    reflection.enable_server_reflection(names, server)  # v1alpha
    handler = grpc.stream_stream_rpc_method_handler(
        _async.ReflectionServicer(names).ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),))
