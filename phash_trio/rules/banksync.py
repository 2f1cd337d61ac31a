"""Keep this instance's :class:`BankIndex` in step with the banks in Redis, without restarts.

Start-up loads every bank (in a thread) and reports ready. Then, every ``BANKS_POLL_SECS``, the
change log is read from the last change applied: each change updates the index in place (no
rebuild), so an edit made by ``phash-trio banks import`` or the API is matched by the next post,
on every instance, within seconds. Only when the log was trimmed past this instance (it was
away longer than the log's length) does it reload everything, after a random pause of up to
``BANKS_RESYNC_JITTER_SECS`` so a fleet does not reload all at once; the new index is built
beside the old one, which keeps answering, and then replaces it (the old one's memory is freed:
the big arrays live in their own mappings). The multi-index is compacted in a thread when its
delta or tombstones grow. Redis errors are logged and counted, and the loop carries on with the
index it has.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import redis
import trio
from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Gauge

from phash_trio.rules.bankindex import BankIndex
from phash_trio.rules.banks import BankStore, LogTrimmed

__all__ = ["BankMetrics", "BankSync"]


@attrs.frozen
class BankMetrics:
    """The banks' metrics, registered beside the service's own."""

    matches: Counter
    unrouted: Counter
    low_quality: Counter
    changes: Counter
    reloads: Counter
    errors: Counter
    hashes: Gauge

    @classmethod
    def register(cls, registry: CollectorRegistry | None = None) -> BankMetrics:
        r = registry if registry is not None else CollectorRegistry()
        p = "phash_bank_"
        return cls(
            matches=Counter(
                p + "matches", "Blobs matched through a bank", ["bank", "signal"], registry=r
            ),
            unrouted=Counter(
                p + "hits_unrouted", "Bank hits no rule names (logged only)", ["bank"], registry=r
            ),
            low_quality=Counter(
                "phash_pdq_low_quality", "Images whose PDQ quality is too low to match", registry=r
            ),
            changes=Counter(p + "changes_applied", "Bank change-log entries applied", registry=r),
            reloads=Counter(p + "reloads", "Full reloads of the banks", ["reason"], registry=r),
            errors=Counter(p + "sync_errors", "Failed bank syncs (Redis)", registry=r),
            hashes=Gauge(p + "index_hashes", "Hashes in the bank index", ["signal"], registry=r),
        )


_REDIS_ERRORS = (redis.RedisError, OSError)
T = TypeVar("T")


class BankSync:
    """Owns the current :class:`BankIndex`; :meth:`run` keeps it current."""

    def __init__(
        self,
        store: BankStore,
        *,
        poll_secs: float = 2.0,
        jitter_secs: float = 30.0,
        metrics: BankMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.poll_secs = poll_secs
        self.jitter_secs = jitter_secs
        self.metrics = metrics if metrics is not None else BankMetrics.register()
        self._rng = rng if rng is not None else random.Random()
        self.index: BankIndex | None = None
        self._limiter = trio.CapacityLimiter(1)

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _update_gauges(self) -> None:
        if self.index is not None:
            for kind, count in self.index.size.items():
                self.metrics.hashes.labels(signal=kind).set(count)

    async def reload(self, reason: str) -> BankIndex:
        """Build a fresh index from Redis in a thread, then swap it in."""
        started = trio.current_time()
        index: BankIndex = await self._thread(BankIndex.load, self.store)
        self.index = index
        self.metrics.reloads.labels(reason=reason).inc()
        self._update_gauges()
        logger.info(
            "banks loaded ({}): {} banks, {} in {:.1f}s",
            reason,
            len(index.bank_names),
            ", ".join(f"{n} {k}" for k, n in index.size.items() if n),
            trio.current_time() - started,
        )
        return index

    async def poll_once(self) -> int:
        """Apply every pending change; returns how many. Raises LogTrimmed or Redis errors."""
        index = self.index
        if index is None:
            await self.reload("start")
            return 0
        applied = 0
        while True:
            changes = await self._thread(self.store.changes_since, index.seq)
            if not changes:
                break
            flags_changed = False
            for change in changes:
                entries = None
                if change.op == "put":
                    entries = await self._thread(self.store.get, change.bank, list(change.fields))
                index.apply(change, entries)
                flags_changed |= change.op in ("bank", "drop")
            if flags_changed:
                index.set_flags(await self._thread(self.store.bank_names))
            applied += len(changes)
            self.metrics.changes.inc(len(changes))
        if applied:
            self._update_gauges()
            logger.info("banks: applied {} changes (now at change {})", applied, index.seq)
        await self._compact(index)
        return applied

    async def _compact(self, index: BankIndex) -> None:
        for hash_index, upto, build in index.compaction_jobs():
            main = await self._thread(build)
            if self.index is index:  # not replaced by a reload meanwhile
                hash_index.install_main(upto, main)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load (retrying while Redis is away), report ready, then follow the log forever."""
        delay = 0.5
        while self.index is None:
            try:
                await self.reload("start")
            except _REDIS_ERRORS as exc:
                self.metrics.errors.inc()
                logger.warning("banks: cannot load from Redis ({}); retry in {:.1f}s", exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 30.0)
        task_status.started()
        while True:
            await trio.sleep(self.poll_secs)
            try:
                await self.poll_once()
            except LogTrimmed as exc:
                pause = self._rng.uniform(0, self.jitter_secs)
                logger.warning("banks: {}; full reload in {:.1f}s", exc, pause)
                await trio.sleep(pause)
                try:
                    await self.reload("log trimmed")
                except _REDIS_ERRORS as exc2:
                    self.metrics.errors.inc()
                    logger.warning("banks: reload failed ({}); keeping the current index", exc2)
            except _REDIS_ERRORS as exc:
                self.metrics.errors.inc()
                logger.warning("banks: sync failed ({}); keeping the current index", exc)
