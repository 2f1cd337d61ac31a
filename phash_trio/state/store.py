"""Redis under Trio: hash cache, action claims, daily caps, dead letters and a health monitor.

``redis.asyncio`` only runs on asyncio, so every call goes to redis-py's synchronous client
(``BlockingConnectionPool``, socket, connect and pool timeouts set, no client-side retries)
through ``trio.to_thread.run_sync`` behind one ``CapacityLimiter``. Each call is therefore
bounded by the timeouts. Read-only calls and cache writes abandon their thread when cancelled
(the caller leaves at once); calls whose result decides what the caller does next - ``claim``,
``incr_daily``, ``push_dead_letter``, ``pop_dead_letter`` - let the thread finish (at most the
timeouts) so a cancelled caller still learns that it holds a claim or a popped letter and can
undo it rather than losing it.

Health: a failed call marks the store unhealthy and wakes :func:`run_health_monitor`, which
probes with a 100 ms doubling backoff until a PING answers; only the monitor marks the store
healthy again and wakes :meth:`RedisStore.wait_healthy`. While unhealthy (and a monitor runs)
the fail-open cache does not even try Redis.

Errors::

    StoreError
    ├── RedisUnavailable    connection refused/lost, timeout, no free connection
    ├── RedisCommandError   Redis answered with an error (wrong type, OOM, READONLY, ...)
    └── CorruptDeadLetter   a ``jobs:dead`` entry is not a JSON object (it is left in place)
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import redis
import trio
from loguru import logger
from redis.backoff import NoBackoff
from redis.retry import Retry

from phash_trio.image.pdq import PdqHash
from phash_trio.image.signals import BlobSignals
from phash_trio.runtime.metrics import Metrics

__all__ = [
    "CLAIM_DONE",
    "CLAIM_PENDING_PREFIX",
    "DEAD_LETTER_KEY",
    "CorruptDeadLetter",
    "RedisCommandError",
    "RedisStore",
    "RedisUnavailable",
    "StoreError",
    "backoff_delays",
    "run_health_monitor",
]

T = TypeVar("T")

DEAD_LETTER_KEY = "jobs:dead"
DAILY_TTL_SECS = 2 * 24 * 3600
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
#: A cached BlobSignals: mean hash, PDQ hash, quality, MD5, SHA-256 (see signals_get).
_SIGNALS = re.compile(r"([0-9a-f]{16}) ([0-9a-f]{64}) (\d{1,3}) ([0-9a-f]{32}) ([0-9a-f]{64})")

# DECR that never goes below zero nor creates a key (a stray decrement must not leak a key
# without TTL or give a later day a head start).
_DECR_FLOOR_ZERO = """
local v = tonumber(redis.call('GET', KEYS[1]))
if v and v > 0 then return redis.call('DECR', KEYS[1]) end
return v or 0
"""

#: Value of a claim whose action is done (what skywatch-phash-rs writes).
CLAIM_DONE = "1"
#: Prefix of the value of a claim whose action is being sent: ``pending:{process marker}``.
CLAIM_PENDING_PREFIX = "pending:"

# Take an action claim for ARGV[1] (our pending marker): a free key, or one left pending by
# another process (it died mid-action), becomes ours; done ("1"), ours, or anything else is
# held. Returns 1 (taken), 2 (taken over) or 0 (held).
_CLAIM_ACTION = """
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, 8) ~= 'pending:' then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if cur then return 2 end
return 1
"""


class StoreError(Exception):
    """Base of the errors raised by :class:`RedisStore`."""


class RedisUnavailable(StoreError):
    """Redis could not be reached in time; ``op`` names the operation that failed."""

    def __init__(self, op: str, cause: BaseException) -> None:
        super().__init__(f"Redis unavailable during {op}: {cause}")
        self.op = op


class RedisCommandError(StoreError):
    """Redis answered ``op`` with an error: not an outage, so waiting would not help."""

    def __init__(self, op: str, cause: BaseException) -> None:
        super().__init__(f"Redis refused {op}: {cause}")
        self.op = op


class CorruptDeadLetter(StoreError):
    """A dead-letter entry is not a JSON object; it stays in the list untouched."""

    def __init__(self, index: int, raw: str, reason: str) -> None:
        super().__init__(
            f"dead letter at index {index} of {DEAD_LETTER_KEY!r} is not a JSON object"
            f" ({reason}); it was left in place: {raw[:200]!r}"
        )
        self.index = index
        self.raw = raw


def backoff_delays(initial: float = 0.1, maximum: float = 10.0) -> Iterator[float]:
    """Reconnect delays: ``initial`` doubling up to ``maximum``, then ``maximum`` forever."""
    if initial <= 0 or maximum <= 0:
        raise ValueError(f"backoff delays must be > 0 (initial={initial}, maximum={maximum})")
    delay = min(initial, maximum)
    while True:
        yield delay
        delay = min(delay * 2, maximum)


def _where(url: str) -> str:
    """The URL without credentials, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a malformed port: the pool constructor will say so
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _decode_letter(raw: str, index: int) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise CorruptDeadLetter(index, raw, f"invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CorruptDeadLetter(index, raw, f"a JSON {type(value).__name__}")
    return value


class RedisStore:
    """Every Redis operation the service needs, each bounded in time and mapped to our errors."""

    def __init__(
        self,
        url: str,
        metrics: Metrics,
        *,
        socket_timeout: float = 2.0,
        max_connections: int = 16,
        threads: int = 4,
    ) -> None:
        if socket_timeout <= 0:
            raise ValueError(f"socket_timeout must be > 0, got {socket_timeout}")
        if threads < 1 or max_connections < threads:
            raise ValueError(
                f"need 1 <= threads <= max_connections, got threads={threads},"
                f" max_connections={max_connections}"
            )
        self.metrics = metrics
        self.where = _where(url)
        try:
            self._pool = redis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=socket_timeout,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                retry=Retry(NoBackoff(), 0),
                decode_responses=True,
            )
        except ValueError as exc:  # redis's message may quote the URL; ours drops credentials
            raise ValueError(f"invalid Redis URL ({self.where}): {exc}") from None
        self._client = redis.Redis(connection_pool=self._pool)
        self._limiter = trio.CapacityLimiter(threads)
        #: Current view: optimistic until a call or the monitor's PING says otherwise.
        self.healthy = True
        self._monitors = 0
        self._down_since: float | None = None
        self._back = trio.Event()  # set (then replaced) when the monitor sees Redis again
        self._wake = trio.Event()  # set when a call fails, so the monitor probes at once

    # -- plumbing ---------------------------------------------------------------------------

    async def _call(self, op: str, fn: Callable[[redis.Redis], T], *, abandon: bool = True) -> T:
        client = self._client
        try:
            return await trio.to_thread.run_sync(
                lambda: fn(client), limiter=self._limiter, abandon_on_cancel=abandon
            )
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._mark_unhealthy(op, exc)
            raise RedisUnavailable(op, exc) from exc
        except redis.RedisError as exc:
            self.metrics.redis_failures.inc()
            raise RedisCommandError(op, exc) from exc

    def _mark_unhealthy(self, op: str, exc: BaseException) -> None:
        self.metrics.redis_failures.inc()
        if self.healthy:
            self.healthy = False
            self._down_since = trio.current_time()
            self.metrics.redis_healthy.set(0)
            logger.warning(
                "Redis {} unavailable during {}: {}; reconnecting (claims and dead letters wait)",
                self.where,
                op,
                exc,
            )
        self._wake.set()

    def _mark_healthy(self) -> None:
        self.metrics.redis_healthy.set(1)
        if self.healthy:
            return
        self.healthy = True
        down = 0.0 if self._down_since is None else trio.current_time() - self._down_since
        self._down_since = None
        self.metrics.redis_reconnects.inc()
        logger.info("Redis {} is back after {:.1f} s", self.where, down)
        self._back.set()
        self._back = trio.Event()

    async def _probe(self, op: str) -> None:
        """The monitor's PING: the only call whose success marks the store healthy."""
        await self._call(op, lambda c: c.ping())
        self._mark_healthy()

    # -- health -----------------------------------------------------------------------------

    async def ping(self) -> None:
        """One PING; raises :class:`RedisUnavailable`."""
        await self._call("PING", lambda c: c.ping())

    async def wait_healthy(self) -> None:
        """Return at once if healthy, else once the health monitor sees Redis answer again."""
        if not self.healthy and self._monitors == 0:
            logger.warning("waiting for Redis {} but no health monitor is running", self.where)
        while not self.healthy:
            await self._back.wait()

    async def until_healthy(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``op``, waiting out Redis outages for as long as it takes (cancel to stop).

        For work that must not go on without Redis (claims, dead letters). A call that fails
        again right after a recovery is spaced by the reconnect backoff, so a Redis that
        answers PING but fails the operation is not hammered.
        """
        delays: Iterator[float] | None = None
        attempts = 0
        while True:
            attempts += 1
            try:
                result = await op()
            except RedisUnavailable as exc:
                if delays is None:
                    logger.warning("{} waits for Redis: {}", what, exc)
                    delays = backoff_delays()
                else:
                    await trio.sleep(next(delays))
                await self.wait_healthy()
                continue
            if attempts > 1:
                logger.info("{} done after {} attempts (Redis back)", what, attempts)
            return result

    # -- hash cache (fails open) ------------------------------------------------------------

    def _cache_skipped(self) -> bool:
        # While a monitor is watching an outage, do not pile up calls that would time out.
        return not self.healthy and self._monitors > 0

    async def _cache_read(self, key: str) -> str | None:
        """GET ``key``, failing open: None on a miss, an outage or any Redis error."""
        if self._cache_skipped():
            return None
        try:
            raw = await self._call(f"GET {key}", lambda c: c.get(key))
        except StoreError as exc:
            logger.debug("cache get failed open: {}", exc)
            return None
        return None if raw is None else str(raw)

    async def _cache_write(self, key: str, value: str, ttl: int) -> None:
        """SET ``key`` for ``ttl`` seconds, failing open (errors are logged at debug only)."""
        if ttl < 1:
            raise ValueError(f"cache ttl must be >= 1 s, got {ttl}")
        if self._cache_skipped():
            return
        try:
            await self._call(f"SET {key}", lambda c: c.set(key, value, ex=ttl))
        except StoreError as exc:
            logger.debug("cache set failed open: {}", exc)

    async def cache_get(self, cid: str) -> int | None:
        """The cached hash of ``cid``, or None (a miss, also on any Redis error)."""
        key = f"phash:{cid}"
        text = await self._cache_read(key)
        if text is None:
            return None
        if not _HEX16.fullmatch(text):
            logger.warning("ignoring malformed cached hash {!r} at {}", text[:40], key)
            return None
        return int(text, 16)

    async def cache_set(self, cid: str, phash: int, ttl: int) -> None:
        """Cache ``phash`` for ``ttl`` seconds as 16 lowercase hex digits; errors are ignored."""
        if not 0 <= phash < 1 << 64:
            raise ValueError(f"phash must be a 64-bit unsigned integer, got {phash}")
        await self._cache_write(f"phash:{cid}", f"{phash:016x}", ttl)

    async def signals_get(self, cid: str) -> BlobSignals | None:
        """Every cached signal of ``cid`` (mean hash, PDQ, digests), or None (a miss, also on
        any Redis error or a malformed value). Separate from ``phash:{cid}``, whose format
        skywatch-phash-rs shares."""
        key = f"signals:{cid}"
        text = await self._cache_read(key)
        if text is None:
            return None
        found = _SIGNALS.fullmatch(text)
        if found is None or int(found[3]) > 100:
            logger.warning("ignoring malformed cached signals {!r} at {}", text[:40], key)
            return None
        mean, pdq, quality, md5, sha256 = found.groups()
        return BlobSignals(
            mean=int(mean, 16),
            pdq=PdqHash(hex=pdq, quality=int(quality)),
            md5=md5,
            sha256=sha256,
        )

    async def signals_set(self, cid: str, signals: BlobSignals, ttl: int) -> None:
        """Cache every signal of a blob for ``ttl`` seconds; errors are ignored."""
        if signals.pdq is None or signals.md5 is None or signals.sha256 is None:
            raise ValueError("only complete signals (PDQ and both digests) are cached")
        value = (
            f"{signals.mean:016x} {signals.pdq.hex} {signals.pdq.quality}"
            f" {signals.md5} {signals.sha256}"
        )
        await self._cache_write(f"signals:{cid}", value, ttl)

    # -- claims -----------------------------------------------------------------------------

    async def claim(self, key: str, ttl: int = 604800) -> bool:
        """``SET key 1 NX EX ttl``: True if we took the claim, False if someone holds it."""
        if ttl < 1:
            raise ValueError(f"claim ttl must be >= 1 s, got {ttl}")
        taken = await self._call(
            f"claim {key}", lambda c: c.set(key, 1, nx=True, ex=ttl), abandon=False
        )
        return bool(taken)

    async def claim_action(self, key: str, marker: str, ttl: int = 604800) -> int:
        """Claim ``key`` with ``marker`` (``pending:...``) while the action is being sent.

        Returns 1 if the key was free, 2 if it held a pending marker (a process died, or a
        release failed, before the action was confirmed: it must be sent again) and 0 if the
        action is done. The caller must not ask for a key it is sending right now.
        """
        if ttl < 1:
            raise ValueError(f"claim ttl must be >= 1 s, got {ttl}")
        if not marker.startswith(CLAIM_PENDING_PREFIX):
            raise ValueError(f"claim marker must start with {CLAIM_PENDING_PREFIX!r}")
        result = await self._call(
            f"claim {key}",
            lambda c: c.eval(_CLAIM_ACTION, 1, key, marker, ttl),
            abandon=False,
        )
        return int(result)

    async def confirm_claim(self, key: str, ttl: int = 604800) -> None:
        """The action was sent: ``SET key 1 EX ttl``, the done value skywatch-phash-rs uses."""
        await self._call(f"confirm {key}", lambda c: c.set(key, CLAIM_DONE, ex=ttl), abandon=False)

    async def release(self, key: str) -> None:
        """Drop a claim so a retry can act."""
        await self._call(f"release {key}", lambda c: c.delete(key))

    # -- daily per-rule counters ------------------------------------------------------------

    @staticmethod
    def _daily_key(rule: str, day: str) -> str:
        if not rule:
            raise ValueError("daily counter needs a rule name")
        if not _DAY.fullmatch(day):
            raise ValueError(f"day must be YYYY-MM-DD, got {day!r}")
        return f"actions:{rule}:{day}"

    async def incr_daily(self, rule: str, day: str) -> int:
        """Count one action for ``rule`` on ``day``; returns the day's total so far."""
        key = self._daily_key(rule, day)

        def incr(c: redis.Redis) -> int:
            with c.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, DAILY_TTL_SECS)
                count, _ = pipe.execute()
            return int(count)

        return await self._call(f"INCR {key}", incr, abandon=False)

    async def decr_daily(self, rule: str, day: str) -> None:
        """Take back one counted action (never below zero)."""
        key = self._daily_key(rule, day)
        await self._call(f"DECR {key}", lambda c: c.eval(_DECR_FLOOR_ZERO, 1, key))

    # -- dead letters -----------------------------------------------------------------------

    async def push_dead_letter(self, payload: dict[str, Any]) -> None:
        """Append ``payload`` as JSON to ``jobs:dead``."""
        try:
            raw = json.dumps(payload, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"dead letter payload is not JSON-serialisable: {exc}") from exc
        await self._call(
            f"RPUSH {DEAD_LETTER_KEY}", lambda c: c.rpush(DEAD_LETTER_KEY, raw), abandon=False
        )

    async def list_dead_letters(self, start: int = 0, stop: int = -1) -> list[dict[str, Any]]:
        """Entries ``start..stop`` (inclusive, LRANGE indexes) of ``jobs:dead``."""
        raws = await self._call(
            f"LRANGE {DEAD_LETTER_KEY}", lambda c: c.lrange(DEAD_LETTER_KEY, start, stop)
        )
        first = start if start >= 0 else 0
        return [_decode_letter(str(raw), first + i) for i, raw in enumerate(cast(list[Any], raws))]

    async def pop_dead_letter(self) -> dict[str, Any] | None:
        """Remove and return the oldest dead letter (None if the list is empty).

        An entry that does not decode is pushed back to the head and reported with
        :class:`CorruptDeadLetter`, so nothing is lost.
        """

        def pop(c: redis.Redis) -> str | None:
            popped = c.lpop(DEAD_LETTER_KEY)
            if popped is None:
                return None
            raw = str(popped)
            try:
                _decode_letter(raw, 0)
            except CorruptDeadLetter:
                c.lpush(DEAD_LETTER_KEY, raw)
            return raw

        raw = await self._call(f"LPOP {DEAD_LETTER_KEY}", pop, abandon=False)
        return None if raw is None else _decode_letter(raw, 0)

    async def remove_dead_letter(self, payload: dict[str, Any]) -> bool:
        """Remove one entry equal to ``payload`` (after a retry decided it); True if found."""
        raw = json.dumps(payload, ensure_ascii=False)
        removed = await self._call(
            f"LREM {DEAD_LETTER_KEY}", lambda c: c.lrem(DEAD_LETTER_KEY, 1, raw), abandon=False
        )
        return bool(removed)

    async def purge_dead_letters(self) -> int:
        """Delete ``jobs:dead``; returns how many letters it held."""

        def purge(c: redis.Redis) -> int:
            with c.pipeline(transaction=True) as pipe:
                pipe.llen(DEAD_LETTER_KEY)
                pipe.delete(DEAD_LETTER_KEY)
                count, _ = pipe.execute()
            return int(count)

        return await self._call(f"DEL {DEAD_LETTER_KEY}", purge)

    async def count_dead_letters(self) -> int:
        """How many letters ``jobs:dead`` holds."""
        count = await self._call(f"LLEN {DEAD_LETTER_KEY}", lambda c: c.llen(DEAD_LETTER_KEY))
        return int(count)

    def close(self) -> None:
        """Close every pooled connection (threads still running finish on their own)."""
        self._client.close()
        self._pool.disconnect()


async def _reconnect(store: RedisStore, max_backoff: float, degraded_after: int) -> None:
    """Probe with the doubling backoff until a PING answers (one failure already seen)."""
    failures = 1
    if failures == degraded_after:
        logger.error("Redis {} DEGRADED: {} failed PING in a row", store.where, failures)
    for delay in backoff_delays(0.1, max_backoff):
        await trio.sleep(delay)
        try:
            await store._probe("PING (reconnecting)")
        except RedisUnavailable as exc:
            failures += 1
            if failures == degraded_after:
                logger.error(
                    "Redis {} DEGRADED: {} failed PINGs in a row ({}); still retrying every"
                    " <= {} s, claims and dead letters wait",
                    store.where,
                    failures,
                    exc,
                    max_backoff,
                )
            else:
                logger.debug("Redis PING {} failed: {}", failures, exc)
            continue
        return


async def run_health_monitor(
    store: RedisStore,
    *,
    interval: float,
    max_backoff: float,
    degraded_after: int = 5,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """PING every ``interval`` while healthy; on failure reconnect with backoff; forever.

    Started at once, whether Redis answers or not: the service keeps running through an
    outage at start-up and the monitor keeps probing. A failing call elsewhere wakes it.
    """
    if interval <= 0 or max_backoff <= 0 or degraded_after < 1:
        raise ValueError(
            f"bad monitor settings: interval={interval}, max_backoff={max_backoff},"
            f" degraded_after={degraded_after}"
        )
    store._monitors += 1
    try:
        task_status.started()
        op = "PING at start-up"
        while True:
            try:
                await store._probe(op)
            except RedisUnavailable:
                await _reconnect(store, max_backoff, degraded_after)
            if op != "PING":
                logger.info("Redis {} answers; health check every {} s", store.where, interval)
                op = "PING"
            wake = store._wake = trio.Event()
            with trio.move_on_after(interval):
                await wake.wait()
    finally:
        store._monitors -= 1
