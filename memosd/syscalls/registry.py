"""Registers the MemOS servicer with gRPC, from the service descriptor.

grpcio answers a request it cannot parse with a bare INTERNAL. We register the
handlers ourselves so that bytes which are not a valid message become
INVALID_ARGUMENT / MALFORMED_REQUEST (after authentication, in the gate),
like every other bad input.

On a cluster node (``router`` given) every method takes its request as raw bytes: the router
(syscalls/router.py) parses it to find the owner, runs the gate here or forwards the same bytes, and
a response is either a message of ours or the owner's bytes. A single node keeps the plain path.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import DecodeError
from memosd_client.v1 import memos_pb2

from memosd.syscalls.gate import Malformed
from memosd.syscalls.router import Router
from memosd.syscalls.servicer import MemOSServicer

SERVICE = memos_pb2.DESCRIPTOR.services_by_name["MemOS"]
SERVICE_NAME = SERVICE.full_name


def _safe_deserializer(cls: Any) -> Any:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as error:
            return Malformed(cls.DESCRIPTOR.full_name, error)

    return parse


def _unimplemented(name: str) -> Any:
    async def run(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"{name} is in the wire contract but not implemented by this memosd yet (see README)")

    return run


def _raw_or_message(cls: Any) -> Any:
    def serialize(response: Any) -> bytes:
        return response if isinstance(response, bytes) else bytes(cls.SerializeToString(response))

    return serialize


def generic_handler(servicer: MemOSServicer, router: Router | None = None) -> grpc.GenericRpcHandler:
    gate = servicer.gate
    handlers = {}
    for method in SERVICE.methods:
        request_cls = getattr(memos_pb2, method.input_type.name)
        response_cls = getattr(memos_pb2, method.output_type.name)
        implementation = getattr(servicer, method.name, None)
        options: dict[str, Any] = {"request_deserializer": _safe_deserializer(request_cls),
                                   "response_serializer": response_cls.SerializeToString}
        if router is not None and implementation:
            parse = _safe_deserializer(request_cls)
            options = {"request_deserializer": None, "response_serializer": _raw_or_message(response_cls)}
            if method.client_streaming:
                handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                    router.client_stream(method.name, parse, gate.client_stream(method.name, implementation)),
                    **options)
            elif method.server_streaming:
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                    router.server_stream(method.name, parse, gate.server_stream(method.name, implementation)),
                    **options)
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    router.unary(method.name, parse, gate.unary(method.name, implementation)), **options)
            continue
        if method.client_streaming:
            # The handler receives an iterator of requests; each is checked as it is read (in the gate).
            behaviour = (gate.client_stream(method.name, implementation) if implementation
                         else _unimplemented(method.name))
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(behaviour, **options)
        elif method.server_streaming:
            behaviour = (gate.server_stream(method.name, implementation) if implementation
                         else _unimplemented(method.name))
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(behaviour, **options)
        else:
            behaviour = gate.unary(method.name, implementation) if implementation else _unimplemented(method.name)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(behaviour, **options)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
