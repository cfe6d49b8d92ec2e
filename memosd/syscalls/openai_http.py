"""The OpenAI-compatible HTTP API ([http] listen): POST /v1/chat/completions (SSE streaming or not) and
GET /v1/models, served by uvicorn on the daemon's event loop beside the gRPC server.

This module is only HTTP: routes, JSON and SSE framing, the error shape. The calls themselves go through
the gate (openai_chat.py); request shape is convert_openai.py; errors are openai_errors.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from memosd.errors import InvalidField, MalformedRequest, MemosError
from memosd.syscalls import convert_openai as co
from memosd.syscalls.openai_chat import (
    CHAT_METHOD,
    MODELS_METHOD,
    ChatRun,
    refuse_before_start,
    visible_cube_names,
)
from memosd.syscalls.openai_errors import error_body, http_status
from memosd.syscalls.openai_owner import OwnerChatRun, open_chat
from memosd.syscalls.router import Router
from memosd.syscalls.servicer import MemOSServicer

MAX_BODY_BYTES = 64 * 1024 * 1024  # as gRPC's message limit


def _error_response(error: MemosError) -> JSONResponse:
    status, _type = http_status(error)
    return JSONResponse(error_body(error), status_code=status)


def _authorization(request: Request) -> list[str]:
    return request.headers.getlist("authorization")


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


Run = ChatRun | OwnerChatRun


class OpenAIApp:
    def __init__(self, servicer: MemOSServicer, router: Router | None = None) -> None:
        self.servicer = servicer
        self.router = router  # a cluster node's: chats on other nodes' cubes run on their owner (openai_owner.py)
        self.created = int(time.time())
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
        ])

    async def _body(self, request: Request) -> Any:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:  # refused unread
            raise MalformedRequest(f"the request body is {declared} bytes, over the {MAX_BODY_BYTES} allowed")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise MalformedRequest(f"the request body is {len(raw)} bytes, over the {MAX_BODY_BYTES} allowed")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidField(f"body: the request body is not JSON ({error})", field="body") from None

    async def list_models(self, request: Request) -> Response:
        gate = self.servicer.gate
        try:
            names = await asyncio.wrap_future(gate.executor.submit(visible_cube_names, self.servicer,
                                                                   _authorization(request)))
        except Exception as error:
            return _error_response(gate.public_error(MODELS_METHOD, error))
        return JSONResponse(co.models(names, self.created))

    async def chat_completions(self, request: Request) -> Response:
        gate = self.servicer.gate
        try:
            chat = co.chat_request(await self._body(request))
        except MemosError as error:
            return _error_response(await refuse_before_start(gate, _authorization(request), error))
        try:
            run = await open_chat(self.servicer, self.router, _authorization(request), chat)
        except Exception as error:  # no token, or cubes on several nodes: refused before any call
            return _error_response(await refuse_before_start(gate, _authorization(request),
                                                             gate.public_error(CHAT_METHOD, error)))
        try:
            await run.start()
            first = await run.next_event()  # validation errors surface here, before any byte is sent
        except asyncio.CancelledError:
            run.abandon()
            raise
        except Exception as error:
            await run.finish(error)
            return _error_response(gate.public_error(CHAT_METHOD, error))
        if chat.stream:
            return StreamingResponse(self._stream(run, first), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._whole(run, first)

    async def _whole(self, run: Run, event: str | Any) -> Response:
        parts: list[str] = []
        try:
            while isinstance(event, str):
                parts.append(event)
                event = await run.next_event()
        except asyncio.CancelledError:
            run.abandon()
            raise
        except Exception as error:
            await run.finish(error)
            return _error_response(run.gate.public_error(CHAT_METHOD, error))
        await run.finish(None)
        if event is None:  # Generate always ends with a summary; an end without one is a bug
            return _error_response(run.gate.public_error(CHAT_METHOD, RuntimeError("no summary")))
        return JSONResponse(co.completion(run.chat, run.call_id, "".join(parts), event, run.names))

    async def _stream(self, run: Run, event: str | Any) -> AsyncIterator[bytes]:
        finished = False
        try:
            yield _sse(co.chunk(run.chat, run.call_id, {"role": "assistant", "content": ""}))
            while isinstance(event, str):
                if event:
                    yield _sse(co.chunk(run.chat, run.call_id, {"content": event}))
                event = await run.next_event()
            finished = True
            await run.finish(None)
            if event is not None:
                for last in co.last_chunks(run.chat, run.call_id, event, run.names):
                    yield _sse(last)
            yield b"data: [DONE]\n\n"
        except Exception as error:  # after the headers: OpenAI's SDKs raise on an "error" event
            if not finished:
                await run.finish(error)
            yield _sse(error_body(run.gate.public_error(CHAT_METHOD, error)))
        finally:
            if not finished:  # cancelled or closed (the client left); a no-op after finish(error)
                run.abandon()


class HttpServer:
    """uvicorn on the daemon's loop, on a socket bound here (so a taken port fails at once, and port 0 works)."""

    def __init__(self, listen: str, servicer: MemOSServicer, router: Router | None = None) -> None:
        host, _, port = listen.rpartition(":")
        bare = host.strip("[]")  # "[::1]" in config, "::1" to the socket
        # As the metrics server: the family of the first address the host resolves to; OSError if none.
        family = socket.getaddrinfo(bare, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self.socket = socket.create_server((bare, int(port)), family=family)
        self.address = f"{host}:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(OpenAIApp(servicer, router).app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self.socket]))
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()  # raises why it did not start

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self.socket.close()
