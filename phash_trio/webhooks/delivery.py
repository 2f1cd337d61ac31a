"""Deliver the decision log to one subscription: at least once, in order, signed.

Each subscription has its own Redis consumer group on the decision stream (``wh:<id>``,
created at the end of the stream when the subscription first appears). One instance at a time
delivers for a subscription: it holds a lease (``webhooks:lease:<id>``, renewed every third of
its life). On taking the lease it claims every pending entry of the group (``XAUTOCLAIM``, left
by an instance that died mid-delivery) and delivers those first, oldest first, then new ones
(``XREADGROUP >``). An entry is acknowledged (``XACK``) only after a 2xx, or once it is given
up on and written to the subscription's dead letters (``webhooks:dead:<id>``).

Failures: 5xx, 408, 429, timeouts and connection errors are retried with exponential backoff
and full jitter (1 s doubling to 5 min, times 0.5-1) for up to ``retry_max_secs`` (24 h) from
the entry's first attempt. That time is kept in Redis (``webhooks:first:<id>``, a hash of entry
id -> wall time, the field removed with the XACK), so a restart or another instance taking the
lease continues the same window instead of opening a new one; the receiver's breaker (5 failures open it for 30 s) holds attempts while it is open. Any other
4xx is final: dead letter at once. Because one entry is delivered at a time, order per
subscription holds even across retries; receivers deduplicate by ``X-Phash-Delivery``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

import attrs
import httpx
import trio
from loguru import logger

from phash_trio.net.breaker import BreakerOpen, CircuitBreaker
from phash_trio.state.decisions import STREAM_KEY, Decision, decision_from_fields
from phash_trio.state.recorder import DecisionMetrics
from phash_trio.state.redisio import RedisThreads, run_in_thread
from phash_trio.state.store import StoreError, backoff_delays
from phash_trio.webhooks.subscriptions import Subscription

__all__ = ["DEAD_PREFIX", "Deliverer", "DeliveryConfig", "group_name"]

DEAD_PREFIX = "webhooks:dead:"
LEASE_PREFIX = "webhooks:lease:"
#: Hash per subscription: entry id -> wall time of its first delivery attempt.
FIRST_PREFIX = "webhooks:first:"
#: Dead letters kept per subscription.
DEAD_MAX = 10_000
#: Seconds one XREADGROUP blocks waiting for new entries.
BLOCK_SECS = 1.0

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def group_name(sub_id: str) -> str:
    return f"wh:{sub_id}"


@attrs.frozen
class DeliveryConfig:
    """Delivery bounds (seconds)."""

    retry_max_secs: float = 86400.0
    timeout_secs: float = 10.0
    lease_secs: float = 15.0
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    breaker_failures: int = 5
    breaker_reset_secs: float = 30.0


class _LeaseLost(Exception):
    pass


@attrs.define
class Deliverer:
    """Delivers one subscription's entries until cancelled."""

    sub: Subscription
    redis: RedisThreads
    client: httpx.AsyncClient
    metrics: DecisionMetrics
    consumer: str
    config: DeliveryConfig = attrs.field(factory=DeliveryConfig)
    key: str = STREAM_KEY
    wall_now: Callable[[], float] = time.time
    rng: random.Random = attrs.field(factory=random.Random)
    breaker: CircuitBreaker = attrs.field(init=False)
    #: Entries delivered (2xx) and given up on, for tests and `webhooks list`.
    delivered: int = 0
    dead: int = 0

    def __attrs_post_init__(self) -> None:
        self.breaker = CircuitBreaker(
            f"webhook:{self.sub.id}",
            failure_threshold=self.config.breaker_failures,
            reset_timeout=self.config.breaker_reset_secs,
        )

    @property
    def group(self) -> str:
        return group_name(self.sub.id)

    async def ensure_group(self) -> None:
        def create(c: Any) -> None:
            try:
                c.xgroup_create(self.key, self.group, id="$", mkstream=True)
            except Exception as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        await self.redis.call("XGROUP CREATE", create)

    # -- lease ----------------------------------------------------------------------------

    async def _acquire(self) -> None:
        ms = int(self.config.lease_secs * 1000)
        lease = LEASE_PREFIX + self.sub.id
        while True:
            got = await self.redis.call(
                "lease", lambda c: c.set(lease, self.consumer, nx=True, px=ms)
            )
            if got:
                return
            await trio.sleep(self.config.lease_secs / 3)

    async def _renew(self, scope: trio.CancelScope) -> None:
        ms = int(self.config.lease_secs * 1000)
        lease = LEASE_PREFIX + self.sub.id
        while True:
            await trio.sleep(self.config.lease_secs / 3)
            try:
                ok = await self.redis.call(
                    "lease renew",
                    lambda c: c.eval(_RENEW, 1, lease, self.consumer, ms),
                )
            except StoreError as exc:
                logger.warning("webhook {}: lease renewal failed: {}", self.sub.id, exc)
                continue
            if not ok:
                logger.warning("webhook {}: lease lost; stopping deliveries", self.sub.id)
                scope.cancel()
                return

    async def _release(self) -> None:
        lease = LEASE_PREFIX + self.sub.id
        release = "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end"
        with trio.move_on_after(2), trio.CancelScope(shield=True):
            try:
                await self.redis.call(
                    "lease release", lambda c: c.eval(release, 1, lease, self.consumer)
                )
            except StoreError:
                pass

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Hold the lease and deliver; on a Redis failure wait and start over."""
        delays = backoff_delays(0.5, 10.0)
        while True:
            try:
                await self.ensure_group()
                await self._acquire()
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._renew, nursery.cancel_scope)
                        await self._deliver_all()
                finally:
                    await self._release()
            except StoreError as exc:
                delay = next(delays)
                logger.warning("webhook {}: Redis: {}; again in {:.1f}s", self.sub.id, exc, delay)
                await trio.sleep(delay)

    async def _deliver_all(self) -> None:
        await self._claim_pending()
        # Our own pending entries first (claimed above, or left by our earlier self).
        while True:
            rows = await self._read("0")
            if not rows:
                break
            for entry_id, fields in rows:
                await self._handle(entry_id, fields)
        blocking = self.redis.blocking_client(BLOCK_SECS)
        try:
            while True:
                rows = await self._read(">", blocking)
                for entry_id, fields in rows:
                    await self._handle(entry_id, fields)
        finally:
            blocking.close()

    async def _claim_pending(self) -> None:
        def claim(c: Any) -> None:
            start = "0-0"
            while True:
                reply = c.xautoclaim(self.key, self.group, self.consumer, 0, start, count=100)
                start = reply[0]
                if start in ("0-0", b"0-0"):
                    return

        await self.redis.call("XAUTOCLAIM", claim)

    async def _read(self, start: str, blocking: Any = None) -> list[tuple[str, Any]]:
        def read(c: Any) -> list[tuple[str, Any]]:
            reply = c.xreadgroup(
                self.group,
                self.consumer,
                {self.key: start},
                count=50,
                block=int(BLOCK_SECS * 1000) if start == ">" else None,
            )
            if not reply:
                return []
            return [(str(i), f) for i, f in reply[0][1]]

        if blocking is None:
            return await self.redis.call("XREADGROUP", read)
        return await run_in_thread("XREADGROUP", read, blocking)

    async def _ack(self, entry_id: str) -> None:
        first = FIRST_PREFIX + self.sub.id

        def ack(c: Any) -> None:
            pipe = c.pipeline(transaction=False)
            pipe.xack(self.key, self.group, entry_id)
            pipe.hdel(first, entry_id)
            pipe.execute()

        await self.redis.call("XACK", ack, abandon=False)

    async def _first_attempt(self, entry_id: str) -> float:
        """Wall time of the entry's first attempt: now, unless an earlier one (this process
        before a restart, or another instance) already noted it."""
        first, now = FIRST_PREFIX + self.sub.id, self.wall_now()

        def note(c: Any) -> Any:
            pipe = c.pipeline(transaction=False)
            pipe.hsetnx(first, entry_id, repr(now))
            pipe.hget(first, entry_id)
            return pipe.execute()[1]

        raw = await self.redis.call("HSETNX", note, abandon=False)
        try:
            noted = float(raw)
        except (TypeError, ValueError):
            return now
        return noted if noted <= now else now

    async def _handle(self, entry_id: str, fields: Any) -> None:
        decision = decision_from_fields(entry_id, fields)
        if decision is None:  # trimmed while pending, or not one of ours
            logger.warning("webhook {}: entry {} is gone from the log", self.sub.id, entry_id)
            await self._ack(entry_id)
            return
        if self.sub.wants(decision):
            await self._deliver(decision)
        await self._ack(entry_id)

    # -- one entry ------------------------------------------------------------------------

    async def _deliver(self, decision: Decision) -> None:
        """POST until a 2xx, a final refusal, or the retry window closes (dead letter)."""
        started = await self._first_attempt(decision.id)
        spent = self.wall_now() - started
        give_up_at = trio.current_time() + max(0.0, self.config.retry_max_secs - spent)
        attempt = 0
        while True:
            attempt += 1
            outcome, detail = await self._attempt(decision, give_up_at)
            self.metrics.webhook_deliveries.labels(outcome=outcome).inc()
            if outcome == "ok":
                self.delivered += 1
                return
            if outcome == "refused":
                await self._dead_letter(decision, detail, attempt)
                return
            delay = min(
                self.config.backoff_initial * 2 ** (attempt - 1), self.config.backoff_max
            ) * self.rng.uniform(0.5, 1.0)
            now = trio.current_time()
            if now + delay > give_up_at:
                await self._dead_letter(decision, detail, attempt)
                return
            logger.info(
                "webhook {}: {} attempt {} failed ({}); retry in {:.1f}s",
                self.sub.id,
                decision.id,
                attempt,
                detail,
                delay,
            )
            await trio.sleep(delay)

    async def _attempt(self, decision: Decision, give_up_at: float) -> tuple[str, str]:
        """One POST: ("ok" | "retry" | "refused", detail)."""
        with trio.move_on_at(give_up_at) as waiting:
            await self.breaker.wait_until_admitting()
        if waiting.cancelled_caught:
            return "retry", "breaker open until the retry window closed"
        try:
            self.breaker.before_call()
        except BreakerOpen:
            return "retry", "breaker open"
        body, headers = self.sub.request(decision, self.wall_now())
        try:
            response = await self.client.post(
                self.sub.url, content=body, headers=headers, timeout=self.config.timeout_secs
            )
        except httpx.HTTPError as exc:
            self.breaker.record_failure()
            return "retry", f"{type(exc).__name__}: {exc}"[:200]
        status = response.status_code
        if 200 <= status < 300:
            self.breaker.record_success()
            return "ok", str(status)
        if status >= 500 or status in (408, 429):
            self.breaker.record_failure()
            return "retry", f"HTTP {status}"
        self.breaker.record_neutral()
        return "refused", f"HTTP {status}"

    async def _dead_letter(self, decision: Decision, detail: str, attempts: int) -> None:
        self.dead += 1
        self.metrics.webhook_dead.inc()
        letter = json.dumps(
            {
                "subscription": self.sub.id,
                "event": decision.as_dict(),
                "error": detail,
                "attempts": attempts,
                "failed_at": self.wall_now(),
            }
        )
        key = DEAD_PREFIX + self.sub.id

        def push(c: Any) -> None:
            pipe = c.pipeline(transaction=False)
            pipe.lpush(key, letter)
            pipe.ltrim(key, 0, DEAD_MAX - 1)
            pipe.execute()

        await self.redis.call("dead letter", push, abandon=False)
        logger.error(
            "webhook {}: gave up on {} after {} attempts ({}); in {}",
            self.sub.id,
            decision.id,
            attempts,
            detail,
            key,
        )
