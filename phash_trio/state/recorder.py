"""The decision hook that writes to the log: never blocks a worker, never raises into one.

Workers hand entries to a bounded in-memory buffer (``send_nowait``); one writer task drains it
in batches into the Redis Stream, in order. A Redis outage makes the writer retry the same
batch with backoff while the buffer absorbs new entries; a full buffer drops the newest entry,
counts it (``phash_decisions_dropped_total``) and logs (the first drop, then every 1000th).
At shutdown what is buffered is written within a few seconds, shielded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import trio
from loguru import logger
from prometheus_client import CollectorRegistry, Counter

from phash_trio.net.atproto.syntax import is_valid_cid, is_valid_did
from phash_trio.pipeline.jobs import BlobRef, ImageJob
from phash_trio.rules.index import Match
from phash_trio.state.decisions import DecisionLog
from phash_trio.state.store import StoreError, backoff_delays

__all__ = ["DecisionMetrics", "DecisionRecorder"]

#: Entries written per XADD pipeline.
BATCH = 500
#: Seconds allowed at shutdown to write what is still buffered.
FLUSH_SECS = 5.0
#: Longest error text kept in an entry.
MAX_TEXT = 300


class DecisionMetrics:
    """Counters of the decision log, webhooks and SSE, on the service's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p = "phash_"
        self.recorded = Counter(
            p + "decisions_recorded", "Decision log entries written", ["kind"], registry=registry
        )
        self.dropped = Counter(
            p + "decisions_dropped", "Decision log entries dropped (buffer full)", registry=registry
        )
        self.sse_cut = Counter(
            p + "sse_clients_cut", "SSE clients disconnected for being too slow", registry=registry
        )
        self.webhook_deliveries = Counter(
            p + "webhook_deliveries",
            "Webhook delivery attempts by outcome",
            ["outcome"],
            registry=registry,
        )
        self.webhook_dead = Counter(
            p + "webhook_dead_letters", "Webhook events given up on", registry=registry
        )


def _wall_iso() -> str:
    # A timestamp for people reading the log; wall clock on purpose.
    return datetime.fromtimestamp(time.time(), UTC).isoformat(timespec="milliseconds")


class DecisionRecorder:
    """Implements :class:`~phash_trio.state.hook.DecisionHook` over a :class:`DecisionLog`."""

    def __init__(
        self,
        log: DecisionLog,
        metrics: DecisionMetrics,
        *,
        buffer: int = 10_000,
        cdn_url: str = "https://cdn.bsky.app",
        wall_now: Callable[[], str] = _wall_iso,
    ) -> None:
        self.log = log
        self.metrics = metrics
        self.cdn_url = cdn_url.rstrip("/")
        self.wall_now = wall_now
        self._send, self._receive = trio.open_memory_channel[tuple[str, dict[str, Any]]](buffer)
        self.emitted = 0
        self.written = 0
        self.dropped = 0
        self._progress = trio.Event()

    # -- the hook -------------------------------------------------------------------------

    def _base(self, job: ImageJob, blob: BlobRef | None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "time": self.wall_now(),
            "uri": job.uri,
            "did": job.did,
            "rkey": job.rkey,
        }
        if blob is not None:
            data["cid"] = blob.cid
        return data

    def _match_fields(self, job: ImageJob, blob: BlobRef, match: Match) -> dict[str, Any]:
        data = self._base(job, blob)
        data.update(
            rule=match.rule.label,
            rule_index=match.rule_index,
            label=match.rule.label,
            distance=match.distance,
            signal_type=match.signal_type,
            phash=f"{match.phash:016x}",
            matched=match.matched_value or f"{match.matched_phash:016x}",
            bank=match.bank,
            content_id=match.content_id,
        )
        if is_valid_did(job.did) and is_valid_cid(blob.cid):
            data["thumb"] = f"{self.cdn_url}/img/feed_thumbnail/plain/{job.did}/{blob.cid}@jpeg"
        return data

    def match(self, job: ImageJob, blob: BlobRef, match: Match) -> None:
        self.emit("match", self._match_fields(job, blob, match))

    def action(
        self, action: str, job: ImageJob, blob: BlobRef, match: Match, *, skipped: str | None
    ) -> None:
        data = self._match_fields(job, blob, match)
        data.pop("thumb", None)
        data["action"] = action
        if skipped is None:
            self.emit("action_sent", data)
        else:
            data["reason"] = skipped
            self.emit("action_skipped", data)

    def dead_letter(self, job: ImageJob, error: str, attempts: int) -> None:
        data = self._base(job, None)
        data.update(error=error[:MAX_TEXT], attempts=attempts, cids=[b.cid for b in job.blobs][:4])
        self.emit("dead_letter", data)

    def bad_blob(self, job: ImageJob, blob: BlobRef, kind: str, message: str) -> None:
        data = self._base(job, blob)
        data.update(error=kind, message=message[:MAX_TEXT])
        self.emit("bad_blob", data)

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Queue one entry; drop and count it when the buffer is full."""
        try:
            self._send.send_nowait((kind, data))
        except trio.WouldBlock:
            self.metrics.dropped.inc()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.error(
                    "decision log buffer full (Redis slow or down): {} entries dropped so far",
                    self.dropped,
                )
            return
        self.emitted += 1

    # -- the writer -----------------------------------------------------------------------

    async def _write(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        delays = backoff_delays(0.1, 5.0)
        while True:
            try:
                await self.log.append_many(batch)
                break
            except StoreError as exc:
                delay = next(delays)
                logger.warning("decision log write failed ({}); retry in {:.1f}s", exc, delay)
                await trio.sleep(delay)
        for kind, _ in batch:
            self.metrics.recorded.labels(kind=kind).inc()
        self.written += len(batch)
        self._progress.set()
        self._progress = trio.Event()

    def _drain(self, first: tuple[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        batch = [first]
        while len(batch) < BATCH:
            try:
                batch.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
        return batch

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write entries until cancelled, then flush what is buffered (shielded, bounded)."""
        task_status.started()
        try:
            while True:
                first = await self._receive.receive()
                await self._write(self._drain(first))
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_SECS) as flush:
                while True:
                    try:
                        first = self._receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    await self._write(self._drain(first))
            if flush.cancelled_caught:
                logger.error("decision log: shutdown flush timed out; buffered entries lost")

    async def settled(self) -> None:
        """Return once everything emitted so far is written (tests, benchmarks)."""
        target = self.emitted
        while self.written < target:
            await self._progress.wait()
