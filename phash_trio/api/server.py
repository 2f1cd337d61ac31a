"""Serve an ASGI app with hypercorn's Trio worker, bounded against hostile clients.

hypercorn parses HTTP/1.1 (h11) and turns malformed requests (``Content-Length: abc``, bad
request lines, oversized heads) into 400s without reaching the app. Around its per-connection
``TCPServer`` we own the listening socket so that:

* at most ``max_connections`` connections are served at once (further ones wait in the
  kernel backlog instead of costing us memory);
* a connection lives at most ``max_connection_secs`` (a slow-body client cannot hold a slot);
* ``read_timeout`` closes a connection silent mid-request, ``keep_alive_timeout`` an idle one
  (and a request head trickled in byte by byte, since the head never ends the idle phase);
* request heads are capped at ``max_header_bytes``.

A port that cannot be bound raises ``OSError`` before ``task_status.started`` (the service
turns it into one line and exit code 2).
"""

from __future__ import annotations

import logging
import math
import socket
from typing import Any

import attrs
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, RawData
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app
from loguru import logger
from starlette.types import ASGIApp

__all__ = ["AddressError", "ApiServer", "ServerLimits", "parse_addr", "serve_app"]


class AddressError(ValueError):
    """The listen address is not ``HOST:PORT``."""


def parse_addr(addr: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too) into host and port; port 0 picks a free one."""
    host, sep, port = addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise AddressError(f"listen address {addr!r} is not HOST:PORT")
    return host, int(port)


@attrs.frozen(kw_only=True)
class ServerLimits:
    """Per-connection bounds (seconds, bytes, counts)."""

    #: Silence allowed while a request is being read.
    read_timeout: float = 10.0
    #: Idle time allowed between requests (and for a whole request head to arrive).
    keep_alive_timeout: float = 5.0
    max_connections: int = 64
    #: Longest life of one connection, requests included.
    max_connection_secs: float = 60.0
    #: Largest request head (request line and headers).
    max_header_bytes: int = 16 * 1024
    backlog: int = 64
    #: Longest life of a connection carrying an event stream (``text/event-stream``): the
    #: client is silent by design there, so ``read_timeout`` does not apply once the stream
    #: has started; the client reconnects with ``Last-Event-ID`` when this ends it.
    max_stream_secs: float = 3600.0


class _StreamState:
    """Whether the connection is serving an event stream right now."""

    streaming = False


def _flag_streams(app: ASGIApp, state: _StreamState) -> ASGIApp:
    """Wrap ``app`` to set ``state.streaming`` while a ``text/event-stream`` response runs."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        async def flagging_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                state.streaming = any(
                    name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                    for name, value in message.get("headers", ())
                )
            await send(message)

        try:
            await app(scope, receive, flagging_send)
        finally:
            state.streaming = False

    return wrapped


class _StreamAwareServer(TCPServer):
    """hypercorn's connection, minus the read timeout while an event stream is being sent."""

    def __init__(self, *args: Any, stream_state: _StreamState, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream_state = stream_state

    async def _read_data(self) -> None:
        while True:
            try:
                with trio.move_on_after(self.config.read_timeout or math.inf) as silent:
                    data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            if silent.cancelled_caught:
                if self.stream_state.streaming:
                    continue
                break
            await self.protocol.handle(RawData(bytes(data)))
            if data == b"":
                break
        await self.protocol.handle(Closed())


@attrs.frozen
class ApiServer:
    """Where the server listens (the real port when 0 was asked for)."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def _config(limits: ServerLimits) -> Config:
    config = Config()
    config.read_timeout = limits.read_timeout  # type: ignore[assignment] # a float works
    config.keep_alive_timeout = limits.keep_alive_timeout
    config.h11_max_incomplete_size = limits.max_header_bytes
    config.include_server_header = False
    config.accesslog = None
    # hypercorn logs through the standard logging module, which logs.py routes to loguru.
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def serve_app(
    app: ASGIApp,
    addr: str,
    limits: ServerLimits | None = None,
    *,
    task_status: trio.TaskStatus[ApiServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``addr`` until cancelled; ``started()`` gets the real address."""
    limits = limits or ServerLimits()
    host, port = parse_addr(addr)
    sock = _listen(host, port, limits.backlog)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    config = _config(limits)
    context = WorkerContext(None)
    slots = trio.Semaphore(limits.max_connections)

    async def connection(stream: trio.SocketStream) -> None:
        state = _StreamState()
        app_here = wrap_app(_flag_streams(app, state), config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
        try:
            with trio.move_on_after(limits.max_connection_secs) as life:
                async with trio.open_nursery() as nursery:

                    async def extend_for_streams() -> None:
                        # An event stream may outlive max_connection_secs (up to max_stream_secs).
                        while True:
                            await trio.sleep(min(1.0, limits.max_connection_secs / 2))
                            if state.streaming:
                                life.deadline = max(
                                    life.deadline, trio.current_time() + limits.max_stream_secs
                                )
                                return

                    nursery.start_soon(extend_for_streams)
                    await _StreamAwareServer(
                        app_here, config, context, {}, stream, stream_state=state
                    )
                    nursery.cancel_scope.cancel()
        except Exception:  # hypercorn contains app errors; this is a last line of defence
            logger.exception("HTTP connection handler failed")
        finally:
            slots.release()
            await trio.aclose_forcefully(stream)

    async with listener, trio.open_nursery() as nursery:
        server = ApiServer(host, sock.getsockname()[1])
        task_status.started(server)
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: wait for descriptors to free up
                slots.release()
                logger.warning("HTTP accept failed: {}", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(connection, stream)
