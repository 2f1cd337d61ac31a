"""A tiny HTTP/1.1 server on Trio streams, for the in-process fakes (CDN/PDS, PLC, Ozone).

The service's own HTTP side is :mod:`phash_trio.api` (hypercorn); this one belongs with the
fakes in ``testing/`` and can move there once its users are. It reads
one request at a time per connection (keep-alive supported), hands a :class:`Request` to an async
handler and writes the :class:`Response` it returns. It is deliberately small: no chunked request
bodies, no pipelining, request bodies capped.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import trio

__all__ = ["Handler", "HttpServer", "Request", "Response", "json_response", "serve_http"]

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024

_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


@attrs.frozen
class Request:
    method: str
    target: str
    headers: dict[str, str]  # lower-cased names
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        """First value of each query parameter."""
        return {k: v[0] for k, v in parse_qs(urlsplit(self.target).query).items()}

    def json(self) -> Any:
        return json.loads(self.body)


@attrs.frozen
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = attrs.field(factory=dict)
    #: Optional body streamed in pieces (slow servers in tests); replaces ``body``.
    stream: Callable[[], AsyncIterator[bytes]] | None = None


Handler = Callable[[Request], Awaitable[Response]]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        status,
        json.dumps(data).encode(),
        {"content-type": "application/json", **(headers or {})},
    )


class _BadRequest(Exception):
    pass


async def _read_request(stream: trio.abc.Stream, buffer: bytearray) -> Request | None:
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HEAD_BYTES:
            raise _BadRequest("request head too large")
        chunk = await stream.receive_some(65536)
        if not chunk:
            if buffer:
                raise _BadRequest("connection closed mid-request")
            return None
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    del buffer[:]
    buffer += rest
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _version = lines[0].split(" ", 2)
    except ValueError:
        raise _BadRequest("bad request line") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequest("bad header line")
        headers[name.strip().lower()] = value.strip()
    raw_length = headers.get("content-length", "0") or "0"
    if not raw_length.isdigit():  # "abc" used to raise ValueError out of the server
        raise _BadRequest("bad content-length")
    length = int(raw_length)
    if length > MAX_BODY_BYTES:
        raise _BadRequest("bad content-length")
    while len(buffer) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise _BadRequest("connection closed mid-body")
        buffer += chunk
    body = bytes(buffer[:length])
    del buffer[:length]
    return Request(method.upper(), target, headers, body)


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _write_response(stream: trio.abc.Stream, response: Response, keep_alive: bool) -> None:
    headers = {k.lower(): v for k, v in response.headers.items()}
    headers.setdefault("content-type", "application/octet-stream")
    if not keep_alive:
        headers["connection"] = "close"
    if response.stream is None:
        headers["content-length"] = str(len(response.body))
        await stream.send_all(_head(response.status, headers) + response.body)
        return
    headers["transfer-encoding"] = "chunked"
    headers.pop("content-length", None)
    await stream.send_all(_head(response.status, headers))
    pieces = response.stream()
    try:
        async for piece in pieces:
            if piece:
                await stream.send_all(b"%x\r\n%s\r\n" % (len(piece), piece))
    finally:
        # Close the generator here, not in the garbage collector (the client may hang up).
        aclose = getattr(pieces, "aclose", None)
        if aclose is not None:
            with trio.CancelScope(shield=True):
                await aclose()
    await stream.send_all(b"0\r\n\r\n")


async def _serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    buffer = bytearray()
    async with stream:
        try:
            while True:
                try:
                    request = await _read_request(stream, buffer)
                except _BadRequest as exc:
                    await _write_response(stream, Response(400, str(exc).encode()), False)
                    return
                if request is None:
                    return
                keep_alive = request.headers.get("connection", "").lower() != "close"
                try:
                    response = await handler(request)
                except Exception as exc:  # a fake's bug must be visible, not a hang
                    response = Response(500, f"handler error: {exc!r}".encode())
                await _write_response(stream, response, keep_alive)
                if not keep_alive:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


@attrs.define
class HttpServer:
    """A running server: where it listens."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


async def serve_http(
    handler: Handler,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``task_status.started`` gets the bound address."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    sockname = listeners[0].socket.getsockname()
    server = HttpServer(host=sockname[0], port=sockname[1])

    async def on_connection(stream: trio.SocketStream) -> None:
        await _serve_connection(stream, handler)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, on_connection, listeners)
        task_status.started(server)
