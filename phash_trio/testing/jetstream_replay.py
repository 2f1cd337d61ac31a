"""An in-process Jetstream replay server, plus builders for realistic Jetstream events.

The server speaks Jetstream's v1 JSON wire protocol at ``/subscribe`` on a real websocket
(trio-websocket, ``127.0.0.1:0``). On each connection it honours ``cursor`` (events with
``time_us >= cursor``), ``wantedCollections`` (repeatable; ``prefix.*`` allowed; identity and
account events always pass) and ``maxMessageSizeBytes`` (larger frames are not sent), sends the
events in order, then idles like a live Jetstream with nothing new, or closes if asked. Each
server has its own clock (``clock_offset_us`` shifts every ``time_us``) and may replay only a
bounded window (``replay_window_us``; what a cursor older than that missed is in ``gaps``).
Start it with ``server = await nursery.start(run_replay_server, events)``.

Test controls on :class:`ReplayServer`: :meth:`~ReplayServer.drop_after`,
:meth:`~ReplayServer.reject_next`, :meth:`~ReplayServer.send_garbage`,
:meth:`~ReplayServer.append`, :meth:`~ReplayServer.close_all`, :meth:`~ReplayServer.wait_idle`,
``pace`` and ``close_when_done``; every connection attempt is recorded in ``requests``.

A frame that is not a JSON object with an integer ``time_us`` (garbage) keeps its place in the
log and is treated as belonging to the ``time_us`` of the frame before it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

__all__ = [
    "CaptureError",
    "ConnectionRecord",
    "ReplayServer",
    "fake_cid",
    "fake_did",
    "identity_event",
    "load_capture",
    "make_blob",
    "make_event",
    "make_legacy_blob",
    "make_post",
    "run_replay_server",
]

Event = Mapping[str, Any] | str | bytes

RAW = 0x55
DAG_CBOR = 0x71


# --------------------------------------------------------------------------------------------
# Event builders


def fake_cid(seed: str | bytes, *, codec: int = RAW) -> str:
    """A syntactically real CIDv1 (sha2-256, base32): ``bafkrei...`` for raw, ``bafyrei...``."""
    data = seed.encode() if isinstance(seed, str) else seed
    digest = hashlib.sha256(data).digest()
    raw = bytes([0x01, codec, 0x12, 0x20]) + digest
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


def fake_did(seed: str) -> str:
    """A syntactically valid ``did:plc:`` derived from ``seed``."""
    digest = hashlib.sha256(seed.encode()).digest()
    return "did:plc:" + base64.b32encode(digest).decode().lower()[:24]


def make_blob(cid: str, *, mime_type: str = "image/jpeg", size: int = 1000) -> dict[str, Any]:
    """A blob in the current shape."""
    return {"$type": "blob", "ref": {"$link": cid}, "mimeType": mime_type, "size": size}


def make_legacy_blob(cid: str, *, mime_type: str = "image/jpeg") -> dict[str, Any]:
    """A blob in the legacy shape (old records)."""
    return {"cid": cid, "mimeType": mime_type}


def images_embed(*blobs: Mapping[str, Any]) -> dict[str, Any]:
    """An ``app.bsky.embed.images`` embed holding these blobs."""
    return {
        "$type": "app.bsky.embed.images",
        "images": [{"alt": "", "image": dict(blob)} for blob in blobs],
    }


def make_event(
    did: str,
    time_us: int,
    *,
    collection: str = "app.bsky.feed.post",
    operation: str = "create",
    rkey: str = "3kabc",
    record: Mapping[str, Any] | None = None,
    cid: str | None = None,
) -> dict[str, Any]:
    """A Jetstream commit event (``record`` and ``cid`` only for creates and updates)."""
    commit: dict[str, Any] = {
        "rev": "3l" + str(time_us)[-11:],
        "operation": operation,
        "collection": collection,
        "rkey": rkey,
    }
    if operation != "delete":
        commit["record"] = dict(record) if record is not None else {"$type": collection}
        commit["cid"] = cid if cid is not None else fake_cid(f"{did}/{rkey}", codec=DAG_CBOR)
    return {"did": did, "time_us": time_us, "kind": "commit", "commit": commit}


def make_post(
    did: str,
    rkey: str,
    time_us: int,
    *,
    embed: Mapping[str, Any] | None = None,
    image_cids: Iterable[str] = (),
    text: str = "",
) -> dict[str, Any]:
    """A post create; ``image_cids`` is a shortcut for an images embed with those blobs."""
    cids = list(image_cids)
    if cids:
        embed = images_embed(*(make_blob(c) for c in cids))
    record: dict[str, Any] = {
        "$type": "app.bsky.feed.post",
        "text": text,
        "createdAt": "2025-01-01T00:00:00.000Z",
    }
    if embed is not None:
        record["embed"] = dict(embed)
    return make_event(did, time_us, rkey=rkey, record=record)


def identity_event(did: str, time_us: int, *, kind: str = "identity") -> dict[str, Any]:
    """An ``identity`` (or ``account``) event."""
    body: dict[str, Any] = {"did": did, "seq": time_us % 10**9, "time": "2025-01-01T00:00:00Z"}
    if kind == "account":
        body["active"] = True
    return {"did": did, "time_us": time_us, "kind": kind, kind: body}


class CaptureError(Exception):
    """A capture file line is not a JSON object."""


def load_capture(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL capture (one Jetstream event per line, blank lines ignored)."""
    events: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError as exc:
                raise CaptureError(f"{path}:{lineno}: invalid JSON: {exc}") from None
            if not isinstance(event, dict):
                raise CaptureError(f"{path}:{lineno}: not a JSON object")
            events.append(event)
    return events


# --------------------------------------------------------------------------------------------
# Server


@attrs.frozen
class _Frame:
    """One frame of the log with what the filters need."""

    data: str | bytes
    #: Own ``time_us``, or for garbage the one of the frame before it.
    time_us: int
    #: ``commit.collection`` for commits; None for identity/account events and garbage.
    collection: str | None


@attrs.frozen
class ConnectionRecord:
    """One connection attempt as the server saw it."""

    at: float
    target: str
    cursor: int | None
    wanted: tuple[str, ...]
    max_message_size: int | None
    accepted: bool


def _collection_of(data: str | bytes) -> tuple[int | None, str | None]:
    try:
        event = json.loads(data)
    except ValueError:
        return None, None
    if not isinstance(event, dict):
        return None, None
    time_us = event.get("time_us")
    if not isinstance(time_us, int) or isinstance(time_us, bool):
        time_us = None
    commit = event.get("commit")
    collection = None
    if event.get("kind") == "commit" and isinstance(commit, dict):
        value = commit.get("collection")
        collection = value if isinstance(value, str) else ""
    return time_us, collection


def _wanted(collection: str | None, wanted: tuple[str, ...]) -> bool:
    if collection is None or not wanted:
        return True
    for pattern in wanted:
        if pattern.endswith(".*"):
            if collection.startswith(pattern[:-1]):
                return True
        elif collection == pattern:
            return True
    return False


class _Rejected(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@attrs.define(eq=False)
class ReplayServer:
    """The running server: its URL, its event log and the test controls."""

    port: int = 0
    #: Least seconds between two frames on a connection (0 = as fast as the socket takes them).
    pace: float = 0.0
    #: Close each connection once it has sent everything (instead of idling).
    close_when_done: bool = False
    #: This instance's clock minus the capture's: every event's ``time_us`` is shifted by it
    #: (Jetstream instances stamp events with their own clocks).
    clock_offset_us: int = 0
    #: How far back before its newest event this instance can replay (None: everything). An
    #: older cursor starts at the oldest event it still has, as Jetstream does.
    replay_window_us: int | None = None
    requests: list[ConnectionRecord] = attrs.field(factory=list)
    #: ``(cursor asked, oldest time_us replayed instead)`` of each connection whose cursor was
    #: older than the replay window: what the client could not get.
    gaps: list[tuple[int, int]] = attrs.field(factory=list)
    _log: list[_Frame] = attrs.field(factory=list)
    _grew: trio.Event = attrs.field(factory=trio.Event)
    _idle: trio.Event = attrs.field(factory=trio.Event)
    _drop_next: int | None = None
    _reject_next: int = 0
    _reject_status: int = 503
    _active: set[trio.CancelScope] = attrs.field(factory=set)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/subscribe"

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        return sum(1 for r in self.requests if r.accepted)

    @property
    def cursors(self) -> list[int | None]:
        """The ``cursor`` each accepted connection asked for (None: live)."""
        return [r.cursor for r in self.requests if r.accepted]

    @property
    def log_size(self) -> int:
        """Frames in the log (events and garbage)."""
        return len(self._log)

    # Controls ------------------------------------------------------------------------------

    def append(self, events: Iterable[Event]) -> None:
        """Add events to the log; idle connections send them at once (live events)."""
        for event in events:
            if isinstance(event, Mapping):
                when = event.get("time_us")
                if self.clock_offset_us and isinstance(when, int) and not isinstance(when, bool):
                    event = {**event, "time_us": when + self.clock_offset_us}
                data: str | bytes = json.dumps(event, separators=(",", ":"))
            else:
                data = event
            time_us, collection = _collection_of(data)
            if time_us is None:
                time_us = self._log[-1].time_us if self._log else 0
            self._log.append(_Frame(data, time_us, collection))
        self._changed()

    def send_garbage(self, frames: Iterable[str | bytes], *, at: int | None = None) -> None:
        """Insert raw frames before log position ``at`` (default: the end, i.e. next live).

        Insert before clients connect, or at the end: a position behind a live connection's
        reading point shifts what that connection sends next.
        """
        position = len(self._log) if at is None else at
        before = self._log[position - 1].time_us if position > 0 else 0
        for offset, data in enumerate(frames):
            self._log.insert(position + offset, _Frame(data, before, None))
        self._changed()

    def drop_after(self, n: int) -> None:
        """Close the next accepted connection (code 1011) after it has sent ``n`` frames."""
        self._drop_next = n

    def reject_next(self, n: int, *, status: int = 503) -> None:
        """Refuse the websocket handshake of the next ``n`` connection attempts."""
        self._reject_next = n
        self._reject_status = status

    def close_all(self) -> None:
        """Close every open connection now (a server restart)."""
        for scope in self._active:
            scope.cancel()

    async def wait_idle(self) -> None:
        """Return once a connection has sent everything currently in the log."""
        await self._idle.wait()

    def _changed(self) -> None:
        grew, self._grew = self._grew, trio.Event()
        grew.set()
        if self._idle.is_set():
            self._idle = trio.Event()

    # Serving -------------------------------------------------------------------------------

    def _parse_target(self, target: str) -> tuple[int | None, tuple[str, ...], int | None]:
        parts = urlsplit(target)
        if parts.path != "/subscribe":
            raise _Rejected(404, f"no such endpoint {parts.path}")
        query = parse_qs(parts.query)
        try:
            cursor = int(query["cursor"][-1]) if "cursor" in query else None
            size = int(query["maxMessageSizeBytes"][-1]) if "maxMessageSizeBytes" in query else None
        except ValueError:
            raise _Rejected(400, "cursor and maxMessageSizeBytes must be integers") from None
        return cursor, tuple(query.get("wantedCollections", ())), size

    async def _handle(self, request: WebSocketRequest) -> None:
        try:
            await self._serve(request)
        except* ConnectionClosed:
            pass  # the client went away: that ends its connection, not the server

    async def _serve(self, request: WebSocketRequest) -> None:
        now = trio.current_time()
        target = request.path
        try:
            cursor, wanted, size = self._parse_target(target)
        except _Rejected as exc:
            self.requests.append(ConnectionRecord(now, target, None, (), None, False))
            await request.reject(exc.status, body=str(exc).encode())
            return
        if self._reject_next > 0:
            self._reject_next -= 1
            self.requests.append(ConnectionRecord(now, target, cursor, wanted, size, False))
            await request.reject(self._reject_status, body=b"replay server: rejected")
            return
        self.requests.append(ConnectionRecord(now, target, cursor, wanted, size, True))
        drop, self._drop_next = self._drop_next, None
        ws = await request.accept()
        scope = trio.CancelScope()
        self._active.add(scope)
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_until_client_closes, ws, nursery.cancel_scope)
                    dropped = await self._stream(ws, cursor, wanted, size, drop)
                    if dropped:
                        with trio.move_on_after(5):
                            await ws.aclose(code=1011, reason="replay server: drop_after")
                    nursery.cancel_scope.cancel()
        finally:
            self._active.discard(scope)

    async def _stream(
        self,
        ws: WebSocketConnection,
        cursor: int | None,
        wanted: tuple[str, ...],
        size: int | None,
        drop: int | None,
    ) -> bool:
        """Send the log from ``cursor`` on; True if stopped by ``drop_after``."""
        position = sent = 0
        last_sent = 0.0
        if drop == 0:
            return True
        if cursor is not None and self.replay_window_us is not None and self._log:
            oldest = self._log[-1].time_us - self.replay_window_us
            if cursor < oldest:
                self.gaps.append((cursor, oldest))
                cursor = oldest
        while True:
            while position < len(self._log):
                frame = self._log[position]
                position += 1
                if cursor is not None and frame.time_us < cursor:
                    continue
                if not _wanted(frame.collection, wanted):
                    continue
                if size and len(frame.data) > size:
                    continue
                if self.pace and sent:
                    await trio.sleep_until(last_sent + self.pace)
                await ws.send_message(frame.data)
                last_sent = trio.current_time()
                sent += 1
                if drop is not None and sent >= drop:
                    return True
            self._idle.set()
            if self.close_when_done:
                return False
            await self._grew.wait()


async def _until_client_closes(ws: WebSocketConnection, scope: trio.CancelScope) -> None:
    """Read (and ignore) client messages; end the connection when the client goes away."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed:
        scope.cancel()


async def run_replay_server(
    events: Iterable[Event] = (),
    *,
    pace: float = 0.0,
    close_when_done: bool = False,
    clock_offset_us: int = 0,
    replay_window_us: int | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[ReplayServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``events`` until cancelled; ``task_status.started`` gives the :class:`ReplayServer`."""
    server = ReplayServer(
        pace=pace,
        close_when_done=close_when_done,
        clock_offset_us=clock_offset_us,
        replay_window_us=replay_window_us,
    )
    server.append(events)
    async with trio.open_nursery() as nursery:
        ws_server = await nursery.start(
            partial(serve_websocket, server._handle, host, port, None, disconnect_timeout=5)
        )
        server.port = ws_server.port
        task_status.started(server)
