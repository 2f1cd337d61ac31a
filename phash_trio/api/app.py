"""The app factory: every route of the service's HTTP side, behind one body limit."""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phash_trio.api.status import Health, status_routes
from phash_trio.runtime.metrics import Metrics

__all__ = ["DEFAULT_MAX_BODY_BYTES", "BodyLimit", "create_app"]

#: Request bodies larger than this are refused (413); today's routes take none at all.
DEFAULT_MAX_BODY_BYTES = 64 * 1024
#: Request heads larger than this are refused (431). hypercorn's own cap only applies to a
#: head that arrives in pieces; one that arrives in a single read is checked here.
DEFAULT_MAX_HEADER_BYTES = 16 * 1024


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 431 for a head over ``max_header_bytes``, 413 for a declared
    Content-Length over ``max_bytes``, and a streamed body is cut off as soon as it passes it
    (nothing larger is ever buffered)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", ())
        head = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
        head += sum(len(name) + len(value) + 4 for name, value in headers)
        if head > self.max_header_bytes:
            await _refuse(scope, send, 431, f"request head over {self.max_header_bytes} bytes")
            return
        for name, value in headers:
            if name != b"content-length":
                continue
            # h11 refuses a malformed Content-Length itself; HTTP/2 (h2c) may pass it on.
            if not value.isdigit():
                await _refuse(scope, send, 400, "bad content-length")
                return
            if int(value) > self.max_bytes:
                await _refuse(scope, send, 413, f"request body over {self.max_bytes} bytes")
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _refuse(scope, send, 413, f"request body over {self.max_bytes} bytes")


async def _refuse(scope: Scope, send: Send, status: int, text: str) -> None:
    """A JSON error in the shape the path's clients read: the bridge's under ``/api/``,
    HMA's ``{"message"}`` elsewhere."""
    path = str(scope.get("path", ""))
    shape = {"success": False, "error": text} if path.startswith("/api/") else {"message": text}
    body = json.dumps(shape).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(
    metrics: Metrics,
    health: Health,
    *,
    routes: Iterable[BaseRoute] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> Starlette:
    """The service's ASGI app: /metrics, /healthz, then ``routes`` (later APIs join here)."""
    return Starlette(
        routes=[*status_routes(metrics, health), *routes],
        middleware=[Middleware(BodyLimit, max_bytes=max_body_bytes)],
    )
