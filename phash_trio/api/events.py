"""``GET /api/v1/events``: the decision log as Server-Sent Events, resumable by entry id.

One :class:`Broadcaster` per process tails the stream (``XREAD BLOCK``) and hands each entry to
every connected client's bounded buffer with ``send_nowait``: a client whose buffer is full is
cut (its stream ends; it resumes with ``Last-Event-ID``), so neither a slow client nor hundreds
of them can slow the tail, and the tail never touches the pipeline (which only appends).

A client joins the live feed *before* reading its history (entries after ``Last-Event-ID``),
then skips live entries it already had, so nothing falls between the two. A resume id older
than the newest trimmed entry gets a first ``event: retention`` saying entries may be missing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import attrs
import trio
from loguru import logger
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from phash_trio.api.auth import ApiError
from phash_trio.api.session import require_read
from phash_trio.state.decisions import (
    KINDS,
    Decision,
    DecisionLog,
    decision_from_fields,
    entry_key,
    parse_entry_id,
)
from phash_trio.state.recorder import DecisionMetrics
from phash_trio.state.redisio import RedisThreads, run_in_thread
from phash_trio.state.store import StoreError, backoff_delays

__all__ = ["Broadcaster", "Filters", "event_routes", "format_event"]

HEARTBEAT_SECS = 15.0
#: Entries read per history batch.
HISTORY_BATCH = 500
_BLOCK_SECS = 1.0


@attrs.frozen
class Filters:
    """``?kind=&rule=&label=`` (comma-separated; empty = any)."""

    kinds: frozenset[str] = frozenset()
    rules: frozenset[str] = frozenset()
    labels: frozenset[str] = frozenset()

    @classmethod
    def from_query(cls, query: Any) -> Filters:
        def values(name: str) -> frozenset[str]:
            raw = ",".join(query.getlist(name))
            items = frozenset(v.strip() for v in raw.split(",") if v.strip())
            if len(items) > 50 or any(len(v) > 200 for v in items):
                raise ApiError(f"too many or too long values for {name!r}")
            return items

        kinds = values("kind")
        unknown = kinds - set(KINDS)
        if unknown:
            raise ApiError(f"unknown kind {sorted(unknown)[0][:40]!r}; kinds: {', '.join(KINDS)}")
        return cls(kinds, values("rule"), values("label"))

    def wants(self, decision: Decision) -> bool:
        if self.kinds and decision.kind not in self.kinds:
            return False
        if self.rules and decision.data.get("rule") not in self.rules:
            return False
        return not (self.labels and decision.data.get("label") not in self.labels)


def format_event(decision: Decision) -> str:
    """One SSE message: id, event (the kind), one JSON data line."""
    return f"id: {decision.id}\nevent: {decision.kind}\ndata: {decision.json()}\n\n"


#: An entry and its SSE text, formatted once for every client.
_Item = tuple[Decision, str]


@attrs.define(eq=False)
class _Client:
    send: trio.MemorySendChannel[_Item]
    receive: trio.MemoryReceiveChannel[_Item]
    cut: bool = False


@attrs.define
class Broadcaster:
    """Tails the decision stream and fans entries out to bounded client buffers."""

    log: DecisionLog
    redis: RedisThreads
    metrics: DecisionMetrics
    buffer: int = 1000
    heartbeat_secs: float = HEARTBEAT_SECS
    max_clients: int = 256
    clients: set[_Client] = attrs.field(factory=set)
    #: Id of the newest entry handed out (clients joining now start after it).
    last_seen: str = "0-0"
    fanned_out: int = 0
    #: Set once ``last_seen`` is read from Redis (live-only clients start after it).
    ready: trio.Event = attrs.field(factory=trio.Event)

    def subscribe(self) -> _Client:
        send, receive = trio.open_memory_channel[_Item](self.buffer)
        client = _Client(send, receive)
        self.clients.add(client)
        return client

    def unsubscribe(self, client: _Client) -> None:
        self.clients.discard(client)
        client.send.close()

    def _offer(self, decision: Decision) -> None:
        item = (decision, format_event(decision))
        for client in list(self.clients):
            try:
                client.send.send_nowait(item)
            except trio.WouldBlock:
                client.cut = True
                self.clients.discard(client)
                client.send.close()
                self.metrics.sse_cut.inc()
                logger.info("SSE client too slow (buffer of {} full): cut", self.buffer)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tail the stream until cancelled (Redis outages are waited out; start-up does not
        wait for Redis)."""
        task_status.started()
        delays = backoff_delays(0.2, 5.0)
        while True:
            try:
                self.last_seen = await self.log.last_id()
                break
            except StoreError as exc:
                logger.warning("SSE: cannot read the decision log yet: {}", exc)
                await trio.sleep(next(delays))
        self.ready.set()
        blocking = self.redis.blocking_client(_BLOCK_SECS)
        key = self.log.key
        # A burst larger than a client's buffer would cut even a client that keeps up.
        batch = max(1, min(500, self.buffer // 2))
        try:
            while True:
                last = self.last_seen

                def read(c: Any, last: str = last) -> Any:
                    return c.xread({key: last}, count=batch, block=int(_BLOCK_SECS * 1000))

                try:
                    reply = await run_in_thread("XREAD", read, blocking)
                except StoreError as exc:
                    logger.warning("SSE: tail of the decision log failed: {}", exc)
                    await trio.sleep(next(delays))
                    continue
                for _, rows in reply or []:
                    for entry_id, fields in rows:
                        self.last_seen = str(entry_id)
                        decision = decision_from_fields(str(entry_id), fields)
                        if decision is not None:
                            self.fanned_out += 1
                            self._offer(decision)
        finally:
            blocking.close()

    async def stream(self, last_id: str | None, filters: Filters) -> AsyncGenerator[str, None]:
        """The text of one client's event stream."""
        await self.ready.wait()
        client = self.subscribe()
        try:
            cursor = self.last_seen
            if last_id is not None:
                cursor = last_id
                if await self.log.trimmed_past(last_id):
                    note = {"last_event_id": last_id, "message": "fell out of retention"}
                    yield f"event: retention\ndata: {json.dumps(note)}\n\n"
                while True:
                    batch = await self.log.after(cursor, HISTORY_BATCH)
                    for decision in batch:
                        cursor = decision.id
                        if filters.wants(decision):
                            yield format_event(decision)
                    if len(batch) < HISTORY_BATCH:
                        break
            yield ": connected\n\n"
            seen = entry_key(cursor)
            while True:
                with trio.move_on_after(self.heartbeat_secs) as quiet:
                    try:
                        pending = [await client.receive.receive()]
                    except trio.EndOfChannel:
                        return  # cut for being slow: the client resumes by id
                if quiet.cancelled_caught:
                    yield ": heartbeat\n\n"
                    continue
                # Everything already buffered goes out in one write.
                while len(pending) < 1000:
                    try:
                        pending.append(client.receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                chunk = []
                for decision, text in pending:
                    if entry_key(decision.id) <= seen:
                        continue
                    seen = entry_key(decision.id)
                    if filters.wants(decision):
                        chunk.append(text)
                if chunk:
                    yield "".join(chunk)
        finally:
            self.unsubscribe(client)


class EventStreamResponse(Response):
    """``text/event-stream`` from an async generator that is always closed (aclosing) when
    the client goes away, so its clean-up (leaving the broadcaster) runs at once."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        # No super().__init__: it would declare a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self.events = events

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async with aclosing(self.events) as events:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with trio.open_nursery() as nursery:

                async def until_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until_disconnect)
                async for text in events:
                    await send(
                        {"type": "http.response.body", "body": text.encode(), "more_body": True}
                    )
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                nursery.cancel_scope.cancel()


def _last_event_id(request: Request) -> str | None:
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if not raw:
        return None
    try:
        parse_entry_id(raw.strip())
    except ValueError:
        raise ApiError("Last-Event-ID is not an event id") from None
    return raw.strip()


def event_routes(broadcaster: Broadcaster) -> list[Route]:
    async def events(request: Request) -> Response:
        require_read(request)
        filters = Filters.from_query(request.query_params)
        last_id = _last_event_id(request)
        if len(broadcaster.clients) >= broadcaster.max_clients:
            raise ApiError(
                f"already {broadcaster.max_clients} event-stream clients; try again later",
                status=503,
            )
        return EventStreamResponse(broadcaster.stream(last_id, filters))

    return [Route("/api/v1/events", events, methods=["GET"])]
