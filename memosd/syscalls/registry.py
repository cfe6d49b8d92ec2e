"""Registers the MemOS servicer with gRPC, from the service descriptor.

grpcio answers a request it cannot parse with a bare INTERNAL. We register the
handlers ourselves so that bytes which are not a valid message become
INVALID_ARGUMENT / MALFORMED_REQUEST, like every other bad input.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import DecodeError
from memos.v1 import memos_pb2

from memosd.errors import MalformedRequest
from memosd.syscalls.errors import to_status
from memosd.syscalls.servicer import MemOSServicer

SERVICE = memos_pb2.DESCRIPTOR.services_by_name["MemOS"]
SERVICE_NAME = SERVICE.full_name


class _Malformed:
    def __init__(self, message_type: str, error: Exception) -> None:
        self.message_type = message_type
        self.error = error


def _safe_deserializer(cls: Any) -> Any:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as error:
            return _Malformed(cls.DESCRIPTOR.full_name, error)

    return parse


def _reject_malformed(handler: Any) -> Any:
    def run(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            context.abort_with_status(to_status(MalformedRequest(
                f"the request is not a valid {request.message_type} message ({request.error}); "
                "send a message built from protos/memos/v1/memos.proto")))
        return handler(request, context)

    return run


def generic_handler(servicer: MemOSServicer) -> grpc.GenericRpcHandler:
    handlers = {}
    for method in SERVICE.methods:
        request_cls = getattr(memos_pb2, method.input_type.name)
        response_cls = getattr(memos_pb2, method.output_type.name)
        implementation = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _reject_malformed(servicer.dispatch_stream(method.name, implementation)),
                request_deserializer=_safe_deserializer(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _reject_malformed(servicer.dispatch(method.name, implementation)),
                request_deserializer=_safe_deserializer(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
