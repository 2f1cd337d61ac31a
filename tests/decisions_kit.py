"""An in-process app with the issue-14 routes on real HTTP (hypercorn on loopback), a real
redis-server and real API keys; plus a small SSE reader."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import h11
import trio

from phash_trio.api import create_app, serve_app
from phash_trio.api.auth import Auth, add_key, load_keys
from phash_trio.api.server import ServerLimits
from phash_trio.config import Settings
from phash_trio.runtime.metrics import Metrics
from phash_trio.state.services import DecisionServices, open_decision_services


@attrs.define
class Running:
    services: DecisionServices
    url: str
    keys: dict[str, str]
    metrics: Metrics
    scope: trio.CancelScope


@asynccontextmanager
async def running_app(
    redis_url: str,
    tmp_path: Path,
    nursery: trio.Nursery,
    limits: ServerLimits | None = None,
    **settings: Any,
) -> AsyncIterator[Running]:
    """The routes of issue 14 on a loopback port; keys ``reader`` (read) and ``ops`` (curate)."""
    keys_file = tmp_path / "keys"
    keys = {
        "reader": add_key(keys_file, "reader", ["read"]),
        "ops": add_key(keys_file, "ops", ["curate"]),
    }
    auth = Auth(load_keys(keys_file), path=keys_file)
    metrics = Metrics()
    cfg = Settings(redis_url=redis_url, allow_private_networks=True, **settings)
    async with open_decision_services(cfg, metrics.registry) as services:
        app = create_app(metrics, lambda: (True, "ok"), routes=services.routes())
        services.install(app, auth)
        scope = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[Any]) -> None:
            with scope:
                async with trio.open_nursery() as inner:
                    await inner.start(services.run)
                    await services.signer_ready()
                    server = await inner.start(serve_app, app, "127.0.0.1:0", limits)
                    task_status.started(server)

        server = await nursery.start(serve)
        try:
            yield Running(services, server.url, keys, metrics, scope)
        finally:
            scope.cancel()


@attrs.define
class SseClient:
    """A raw SSE client (trio socket + h11): no generators left to the garbage collector."""

    stream: trio.SocketStream
    conn: h11.Connection
    status: int = 0
    headers: dict[str, str] = attrs.field(factory=dict)
    _buffer: str = ""
    _lines: deque[str] = attrs.field(factory=deque)
    _fields: dict[str, str] = attrs.field(factory=dict)
    closed: bool = False
    heartbeats: int = 0

    @classmethod
    async def open(
        cls, base_url: str, path: str, headers: dict[str, str] | None = None
    ) -> SseClient:
        host, port = base_url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        conn = h11.Connection(h11.CLIENT)
        head = [("Host", host), ("Accept", "text/event-stream"), *(headers or {}).items()]
        data = conn.send(h11.Request(method="GET", target=path, headers=head))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        client = cls(stream, conn)
        while True:
            event = await client._next()
            if isinstance(event, h11.Response):
                client.status = event.status_code
                client.headers = {k.decode(): v.decode() for k, v in event.headers}
                return client

    async def _next(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
                continue
            return event

    async def events(
        self, n: int, *, within: float = 20.0
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """The next ``n`` events (id, event, data); fewer if the server ends the stream."""
        out: list[tuple[str, str, dict[str, Any]]] = []
        with trio.fail_after(within):
            while len(out) < n:
                if not self._lines:
                    if self.closed:
                        return out
                    event = await self._next()
                    if isinstance(event, h11.Data):
                        self._buffer += bytes(event.data).decode()
                        *lines, self._buffer = self._buffer.split("\n")
                        self._lines.extend(lines)
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        self.closed = True
                    continue
                line = self._lines.popleft()
                if line == "":
                    if "data" in self._fields:
                        f = self._fields
                        out.append((f.get("id", ""), f.get("event", ""), json.loads(f["data"])))
                    self._fields = {}
                elif line.startswith(": heartbeat"):
                    self.heartbeats += 1
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    self._fields[name] = value.removeprefix(" ")
        return out

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def sse(
    base_url: str, path: str, headers: dict[str, str] | None = None
) -> AsyncIterator[SseClient]:
    client = await SseClient.open(base_url, path, headers)
    try:
        yield client
    finally:
        await client.aclose()
