"""Jetstream reader: websocket frames -> :class:`ImageJob` on a bounded channel.

:func:`run_reader` owns the connection. It stays on the primary URL while it works, fails over
to the next URL after ``failover_after`` consecutive failures, and fails back to the primary
after ``failback_after`` seconds on a fallback. Every reconnect asks for the newest ``time_us``
read minus ``rewind`` seconds: Jetstream instances stamp events with their own clocks, so
resuming a different instance at exactly the old one's newest ``time_us`` skips whatever its
clock puts earlier. The events the rewind brings again are dropped by identity
(:class:`~phash_trio.firehose.events.EventIdentity`, the same on every instance) in a bounded
memory, not by a time cut-off; they do not touch the cursor tracker. When the first event of a
connection is newer than where we resumed, the server could not replay that far back: logged
and counted (``phash_jetstream_replay_gaps_total``).

A full channel blocks the reader (backpressure); the idle timer only runs while it waits for
the socket, never while it waits for the workers. Malformed frames are counted and logged,
never fatal; one whose ``time_us`` is readable still moves the cursor (``tracker.observe``).

Cursor bookkeeping (DESIGN §2): ``tracker.start_job(time_us)`` is called *before*
``send.send(job)``. If the reader is cancelled while that send is blocked, the job was not
delivered and is deliberately left pending in the tracker: the saved cursor then stays at or
before it, and the next start re-reads it from Jetstream. Calling ``finish_job`` there would let
the cursor pass a post nobody hashed.
"""

from __future__ import annotations

import ssl
from collections import OrderedDict
from collections.abc import Iterable
from math import inf
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
import trio
from loguru import logger
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from phash_trio.config import Settings
from phash_trio.firehose.cursor import CursorTracker
from phash_trio.firehose.events import (
    EventIdentity,
    JetstreamError,
    MalformedFrame,
    ParsedEvent,
    parse_event,
)
from phash_trio.pipeline.jobs import POST_COLLECTION, ImageJob
from phash_trio.runtime.metrics import Metrics

__all__ = [
    "ReaderConfig",
    "ReaderConfigError",
    "ReaderState",
    "run_reader",
    "subscribe_url",
]


class ReaderConfigError(JetstreamError, ValueError):
    """A :class:`ReaderConfig` value is unusable."""


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        raise ReaderConfigError(f"expected a list of strings, got the string {values!r}")
    return tuple(values)


def _check_urls(_instance: object, _attribute: object, urls: tuple[str, ...]) -> None:
    if not urls:
        raise ReaderConfigError("ReaderConfig.urls is empty: give at least one Jetstream URL")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ReaderConfigError(f"Jetstream URL {url!r} is not a ws:// or wss:// URL")


def _positive(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ReaderConfigError(f"ReaderConfig.{attribute.name} must be > 0, got {value!r}")


def _non_negative(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ReaderConfigError(f"ReaderConfig.{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class ReaderConfig:
    """How the reader connects: URLs in rotation order, backoff and timeouts in seconds."""

    #: Primary first, then fallbacks, tried in this order.
    urls: tuple[str, ...] = attrs.field(converter=_strings, validator=_check_urls)
    #: Every reconnect resumes this many seconds before the newest event read (clock skew
    #: between instances); the replays this brings are dropped by identity.
    rewind: float = attrs.field(default=10.0, validator=_non_negative)
    #: Consecutive failed connections (refused, or lost before ``healthy_after``) on one URL
    #: before the reader moves to the next URL.
    failover_after: int = attrs.field(default=3, validator=_positive)
    #: Seconds on a fallback after which the reader goes back to the primary.
    failback_after: float = attrs.field(default=600.0, validator=_positive)
    #: Event identities remembered to drop replays (bounded; oldest forgotten first). It must
    #: cover ``rewind`` seconds of the stream plus the skew between instances.
    seen_capacity: int = attrs.field(default=50_000, validator=_positive)
    backoff_initial: float = attrs.field(default=5.0, validator=_positive)
    backoff_max: float = attrs.field(default=300.0, validator=_positive)
    #: A connection that stayed up this long resets the backoff.
    healthy_after: float = attrs.field(default=60.0, validator=_positive)
    #: No message for this long (while waiting on the socket) means the connection is dead.
    idle_timeout: float = attrs.field(default=120.0, validator=_positive)
    #: Largest frame accepted (trio-websocket's default, 1 MiB, is too small for Jetstream).
    max_message_size: int = attrs.field(default=8 * 1024 * 1024, validator=_positive)
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Bound on the closing handshake, so a dead server cannot hold a reconnect.
    close_timeout: float = attrs.field(default=5.0, validator=_positive)
    wanted_collections: tuple[str, ...] = attrs.field(
        default=(POST_COLLECTION,), converter=_strings
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> ReaderConfig:
        """``JETSTREAM_URL`` first, then ``JETSTREAM_FALLBACK_URLS`` (duplicates dropped)."""
        urls = dict.fromkeys((settings.jetstream_url, *settings.jetstream_fallback_urls))
        return cls(
            urls=tuple(u for u in urls if u),
            rewind=settings.jetstream_rewind_secs,
            failover_after=settings.jetstream_failover_after,
            failback_after=settings.jetstream_failback_secs,
        )


@attrs.define
class ReaderState:
    """Live reader status, read by the health endpoint."""

    connected: bool = False
    #: ``trio.current_time()`` of the last frame read, None before the first one.
    last_message_at: float | None = None
    #: The URL of the current (or last) connection.
    url: str | None = None
    #: Connections opened so far.
    connections: int = 0
    #: Newest ``time_us`` read: where a reconnect resumes (minus the rewind).
    newest_time_us: int | None = None
    #: Position of ``url`` in the configured URLs (0: the primary).
    url_index: int = 0


def subscribe_url(
    base: str,
    *,
    cursor: int | None,
    wanted_collections: tuple[str, ...],
    max_message_size: int,
) -> str:
    """``base`` with Jetstream's query parameters added (parameters already there are kept)."""
    parts = urlsplit(base)
    ours = {"wantedCollections", "maxMessageSizeBytes", "cursor"}
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ours]
    query += [("wantedCollections", c) for c in wanted_collections]
    query.append(("maxMessageSizeBytes", str(max_message_size)))
    if cursor is not None:
        query.append(("cursor", str(cursor)))
    return urlunsplit(parts._replace(query=urlencode(query)))


@attrs.define
class _Backoff:
    """Exponential delays: initial, doubling, capped; reset after a healthy connection."""

    initial: float
    maximum: float
    _next: float | None = None

    def next_delay(self) -> float:
        delay = self.initial if self._next is None else self._next
        self._next = min(delay * 2, self.maximum)
        return min(delay, self.maximum)

    def reset(self) -> None:
        self._next = None


@attrs.define
class _SeenEvents:
    """The identities of the newest ``capacity`` events read, to drop what a rewound
    reconnect re-sends. Identities, not times: instances stamp the same event differently."""

    capacity: int
    #: Newest ``time_us`` read on any connection: where a reconnect resumes (minus the rewind).
    newest: int | None = None
    _order: OrderedDict[EventIdentity, None] = attrs.field(factory=OrderedDict)

    def admit(self, event: ParsedEvent) -> bool:
        """False for an event already read (on this or an earlier connection)."""
        if event.identity in self._order:
            return False
        self._order[event.identity] = None
        if len(self._order) > self.capacity:
            self._order.popitem(last=False)
        if self.newest is None or event.time_us > self.newest:
            self.newest = event.time_us
        return True


class _ConnectionLost(Exception):
    """A connect, handshake or idle timeout; ``str()`` is the reason logged."""


class _FailBack(Exception):
    """Time to leave a fallback for the primary (not a failure)."""


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one real error of a connection's nursery (Cancelled siblings dropped), or the group."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else group


class _NoReceivers(Exception):
    """Every worker closed its end of the channel: nobody is left to feed."""


def _describe(exc: BaseException) -> str:
    """One short line for the reconnect log."""
    if isinstance(exc, ConnectionRejected):
        return f"handshake rejected with HTTP {exc.status_code}"
    if isinstance(exc, ConnectionClosed):
        if exc.reason is None:
            return "connection closed"
        detail = f": {exc.reason.reason}" if exc.reason.reason else ""
        return f"closed with {exc.reason.code} {exc.reason.name}{detail}"
    if isinstance(exc, HandshakeError) and exc.__cause__ is not None:
        return f"{type(exc).__name__}: {exc.__cause__}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@attrs.define
class _Reader:
    config: ReaderConfig
    send: trio.MemorySendChannel[ImageJob]
    tracker: CursorTracker
    metrics: Metrics
    state: ReaderState
    start_cursor: int | None
    seen: _SeenEvents = attrs.field(init=False)
    _connected_at: float | None = None
    #: Newest ``time_us`` read before this connection, until its first event is checked.
    _resume_point: int | None = None
    _started: bool = False
    _ssl: ssl.SSLContext | None = None

    async def run(self, task_status: trio.TaskStatus[ReaderState]) -> None:
        config = self.config
        urls = config.urls
        backoff = _Backoff(config.backoff_initial, config.backoff_max)
        index = 0
        failures = 0  # consecutive failed connections on urls[index]
        while True:
            base = urls[index]
            self._connected_at = None
            self.state.url_index = index
            try:
                await self._session(base, task_status)
            except _FailBack:
                logger.info(
                    "jetstream: {:g} s on fallback {}; going back to the primary {}",
                    config.failback_after,
                    base,
                    urls[0],
                )
                self.metrics.jetstream_failovers.labels(to="primary").inc()
                self.metrics.jetstream_reconnects.inc()
                index, failures = 0, 0
                backoff.reset()
                continue
            except (HandshakeError, ConnectionClosed, OSError, trio.BrokenResourceError) as exc:
                reason = _describe(exc)
            except _ConnectionLost as exc:
                reason = str(exc)
            except _NoReceivers:
                logger.warning("jetstream reader stops: every worker closed the job channel")
                return
            now = trio.current_time()
            up = None if self._connected_at is None else now - self._connected_at
            if up is not None and up >= config.healthy_after:
                backoff.reset()
                failures = 0  # it worked: this loss is the first failure of a new run
            failures += 1
            if failures >= config.failover_after and len(urls) > 1:
                index, failures = (index + 1) % len(urls), 0
                self.metrics.jetstream_failovers.labels(
                    to="primary" if index == 0 else "fallback"
                ).inc()
            delay = backoff.next_delay()
            self.metrics.jetstream_reconnects.inc()
            logger.warning(
                "jetstream {} lost ({}{}); trying {} in {:g} s",
                base,
                reason,
                "" if up is None else f" after {up:.0f} s up",
                urls[index],
                delay,
            )
            await trio.sleep(delay)

    def _resume_cursor(self) -> int | None:
        """Where the next connection starts: the newest event read minus the rewind (or the
        saved cursor on the first connection, which needs no rewind: it is a real event's)."""
        newest = self.seen.newest
        if newest is None:
            self._resume_point = self.start_cursor
            return self.start_cursor
        self._resume_point = newest
        return max(1, newest - round(self.config.rewind * 1_000_000))

    def _check_reach(self, base: str, time_us: int) -> None:
        """On a connection's first event: did the server replay back to where we resumed?"""
        resume, self._resume_point = self._resume_point, None
        if resume is not None and time_us > resume:
            self.metrics.jetstream_replay_gaps.inc()
            logger.warning(
                "jetstream {} cannot replay back to {}: its first event is {} ({:.1f} s later);"
                " events in between may be lost",
                base,
                resume,
                time_us,
                (time_us - resume) / 1e6,
            )

    async def _session(self, base: str, task_status: trio.TaskStatus[ReaderState]) -> None:
        """One connection, from TCP connect to its end (always an exception).

        trio-websocket's ``open_websocket_url`` leaves the socket open when the server rejects
        the handshake or closes first; we own the stream here and always close it.
        """
        config = self.config
        cursor = self._resume_cursor()
        url = subscribe_url(
            base,
            cursor=cursor,
            wanted_collections=config.wanted_collections,
            max_message_size=config.max_message_size,
        )
        parts = urlsplit(url)
        host = parts.hostname or ""
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        host_header = host if port in (80, 443) else f"{host}:{port}"
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        deadline = trio.current_time() + config.connect_timeout
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
        with trio.move_on_at(deadline):
            if secure:
                stream = await trio.open_ssl_over_tcp_stream(
                    host, port, ssl_context=self._ssl_context(), https_compatible=True
                )
            else:
                stream = await trio.open_tcp_stream(host, port)
        if stream is None:
            raise _ConnectionLost(f"connect timed out after {config.connect_timeout:g} s")
        try:
            async with trio.open_nursery() as nursery:
                ws: WebSocketConnection | None = None
                with trio.move_on_at(deadline):
                    ws = await wrap_client_stream(
                        nursery,
                        stream,
                        host_header,
                        resource,
                        max_message_size=config.max_message_size,
                        receive_buffer_size=64 * 1024,
                    )
                if ws is None:
                    raise _ConnectionLost(f"handshake timed out after {config.connect_timeout:g} s")
                self._connected_at = trio.current_time()
                self._set_connected(True, base)
                logger.info("jetstream connected to {} (cursor {})", base, cursor)
                if not self._started:
                    self._started = True
                    task_status.started(self.state)
                try:
                    await self._pump(ws, base)
                except Exception:
                    with trio.move_on_after(config.close_timeout):
                        await ws.aclose()  # polite close; a no-op if the server closed first
                    raise
                finally:
                    self._set_connected(False, base)
        except BaseExceptionGroup as group:
            raise _single(group) from None
        finally:
            await trio.aclose_forcefully(stream)

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _set_connected(self, connected: bool, url: str) -> None:
        self.state.connected = connected
        self.state.url = url
        if connected:
            self.state.connections += 1
        self.metrics.jetstream_connected.set(1 if connected else 0)

    async def _pump(self, ws: WebSocketConnection, base: str) -> None:
        """Read frames until the connection fails (or, on a fallback, until it is time to fail
        back); the idle timer runs only on the socket."""
        config = self.config
        connected_at = trio.current_time()
        fail_back_at = connected_at + config.failback_after if self.state.url_index else inf
        while True:
            idle_at = trio.current_time() + config.idle_timeout
            with trio.move_on_at(min(idle_at, fail_back_at)) as waiting:
                frame = await ws.get_message()
            if waiting.cancelled_caught:
                if trio.current_time() >= fail_back_at:
                    raise _FailBack
                raise _ConnectionLost(f"no message for {config.idle_timeout:g} s")
            read_at = self.state.last_message_at = trio.current_time()
            await self._handle(frame, read_at, base)

    async def _handle(self, frame: str | bytes, read_at: float, base: str) -> None:
        metrics, tracker = self.metrics, self.tracker
        metrics.events_received.inc()
        try:
            event = parse_event(frame)
        except MalformedFrame as exc:
            metrics.frames_malformed.inc()
            logger.warning("skipping {}", exc)
            if exc.time_us is not None:
                self._check_reach(base, exc.time_us)
                tracker.observe(exc.time_us)
            return
        self._check_reach(base, event.time_us)
        if not self.seen.admit(event):
            # A replay (the rewind, or a server re-sending): finished long ago. It must not
            # touch the tracker, whose times may come from another instance's clock.
            metrics.events_skipped.labels("replayed").inc()
            return
        self.state.newest_time_us = self.seen.newest
        if event.job is None:
            metrics.events_skipped.labels(event.skip_reason or "other").inc()
            tracker.observe(event.time_us)
            return
        if event.bad_blobs:
            logger.warning(
                "post {} has {} image blob(s) without a valid CID; hashing the other {}",
                event.job.uri,
                event.bad_blobs,
                len(event.job.blobs),
            )
        # Pending before the send: if the send is cancelled the job stays pending, so the
        # saved cursor cannot pass it (see the module docstring).
        job = attrs.evolve(event.job, read_at=read_at)
        tracker.start_job(job.time_us)
        try:
            await self.send.send(job)
        except trio.BrokenResourceError:
            raise _NoReceivers from None
        metrics.jobs_received.inc()


async def run_reader(
    config: ReaderConfig,
    send: trio.MemorySendChannel[ImageJob],
    tracker: CursorTracker,
    metrics: Metrics,
    *,
    start_cursor: int | None,
    state: ReaderState | None = None,
    task_status: trio.TaskStatus[ReaderState] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Feed ``send`` with image jobs from Jetstream until cancelled; closes ``send`` at the end.

    ``task_status.started(state)`` fires once the first connection is open; failed attempts
    before that are retried with backoff, never raised. Resumes from ``start_cursor`` (the saved
    cursor) and, after a reconnect, from the newest ``time_us`` read. Returns early only if
    every receiver of the channel is closed.
    """
    reader = _Reader(
        config=config,
        send=send,
        tracker=tracker,
        metrics=metrics,
        state=state if state is not None else ReaderState(),
        start_cursor=start_cursor,
    )
    reader.seen = _SeenEvents(config.seen_capacity)
    async with send:
        await reader.run(task_status)
