"""Workers: take an image post from the channel and see it through to a decision.

Per blob: hash cache -> fetch (CDN, then PDS) -> hash (in worker processes, or threads: see
:mod:`phash_trio.image.pool`) -> match -> actions. A bad blob (not found, too large, not an image,
or one that killed the hash worker twice) is counted and logged and does not fail the post. A
transient failure (network, 5xx, Redis or Ozone down) fails the attempt: the post is tried again
``RETRY_ATTEMPTS`` times with a doubling delay, then stored in the dead-letter list. A failure
caused only by an open circuit breaker waits for the breaker instead of spending an attempt
(bounded by ``BREAKER_WAIT_MAX_SECS``). The post is marked finished in the cursor tracker only
once it is decided or dead-lettered, so the saved cursor never passes it.

:meth:`JobProcessor.process` is the job boundary: any other exception (a bug, a hostile input
nobody foresaw) is logged once with its traceback, counted by stage and kind and the job
dead-lettered; and the whole job, dead-letter write included, ends within ``JOB_DEADLINE_SECS``.
A dead letter Redis will not take by then (down, READONLY, OOM) is logged in full at CRITICAL
and counted, and the cursor moves on: holding it would stop all moderation.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from functools import partial
from typing import Any

import attrs
import cattrs
import trio
from loguru import logger

from phash_trio.firehose.cursor import CursorTracker
from phash_trio.image.meanhash import ImageError
from phash_trio.image.pool import HashPool
from phash_trio.image.signals import BlobSignals, compute_signals
from phash_trio.net.atproto.blobs import BlobError, BlobFetcher, BlobUnavailable
from phash_trio.net.ozone.client import OzoneAuthError, OzoneError, OzoneUnavailable
from phash_trio.pipeline.actions import Actions
from phash_trio.pipeline.jobs import BlobRef, ImageJob
from phash_trio.rules.index import Match, RuleIndex
from phash_trio.rules.matcher import BlobMatcher
from phash_trio.runtime.metrics import Metrics
from phash_trio.state.hook import DecisionHook, NoDecisions
from phash_trio.state.store import RedisStore, StoreError, backoff_delays

__all__ = ["JobProcessor", "job_from_json", "job_to_json", "run_worker"]

_converter = cattrs.Converter()
#: Most of the job deadline kept for the dead-letter write (a quarter when the deadline is short).
DEAD_LETTER_RESERVE_SECS = 10.0
#: Shortest pause between attempts of a job held up by a half-open breaker's pending probe.
_MIN_BREAKER_POLL = 0.05


def job_to_json(job: ImageJob) -> dict[str, Any]:
    data: dict[str, Any] = _converter.unstructure(job)
    data.pop("read_at", None)
    return data


def job_from_json(data: dict[str, Any]) -> ImageJob:
    return _converter.structure(data, ImageJob)


class _TransientFailure(Exception):
    """An attempt failed for a reason that may pass; ``breaker_retry_at`` if a breaker said so."""

    def __init__(self, message: str, breaker_retry_at: float | None = None) -> None:
        super().__init__(message)
        self.breaker_retry_at = breaker_retry_at


def _error_kind(exc: BaseException) -> str:
    return type(exc).__name__


@attrs.define
class _Stage:
    """Where a job is, for the log line and the crash metric's ``stage`` label."""

    name: str = "start"


@attrs.define
class JobProcessor:
    """Everything a worker needs; one instance shared by all workers."""

    fetcher: BlobFetcher
    rules: RuleIndex
    actions: Actions
    store: RedisStore
    metrics: Metrics
    tracker: CursorTracker
    hasher: HashPool
    cache_enabled: bool = True
    cache_ttl: int = 86400
    retry_attempts: int = 3
    retry_delay: float = 1.0
    breaker_wait_max: float = 900.0
    #: Seconds after which a job is dead-lettered whatever it waits for (JOB_DEADLINE_SECS).
    job_deadline: float = 300.0
    max_image_pixels: int = 50_000_000
    max_blob_bytes: int = 2_000_000
    #: Rules + PDQ + banks (issue 12); None: the rules' mean hashes only.
    matcher: BlobMatcher | None = None
    #: Told of every match, bad blob and dead letter (the decision log).
    decisions: DecisionHook = attrs.field(factory=NoDecisions)

    def __attrs_post_init__(self) -> None:
        if self.matcher is None:
            self.matcher = BlobMatcher(self.rules)

    async def _hash_blob(self, job: ImageJob, blob: BlobRef, stage: _Stage) -> BlobSignals | None:
        """The blob's signals, or None for a bad blob (counted, logged, not retried)."""
        assert self.matcher is not None
        # With PDQ or banks in the rules every signal is needed: cached under its own key.
        full = self.matcher.needs_signals
        stage.name = "cache"
        if self.cache_enabled:
            if full:
                hit = await self.store.signals_get(blob.cid)
            else:
                cached = await self.store.cache_get(blob.cid)
                hit = BlobSignals(mean=cached) if cached is not None else None
            if hit is not None:
                self.metrics.cache_hits.inc()
                return hit
            self.metrics.cache_misses.inc()
        stage.name = "fetch"
        try:
            data = await self.fetcher.fetch(job.did, blob.cid)
        except BlobUnavailable as exc:
            retry_at = exc.retry_at if exc.breaker_open else None
            raise _TransientFailure(f"blob {blob.cid}: {exc}", retry_at) from exc
        except BlobError as exc:
            self.metrics.blob_errors.labels(kind=_error_kind(exc)).inc()
            logger.warning("skip blob {} of {}: {}", blob.cid, job.uri, exc)
            self.decisions.bad_blob(job, blob, _error_kind(exc), str(exc))
            return None
        stage.name = "hash"
        try:
            if full:
                signals = await self.hasher.call(
                    partial(
                        compute_signals,
                        data,
                        max_pixels=self.max_image_pixels,
                        max_bytes=self.max_blob_bytes,
                    )
                )
            else:
                phash = await self.hasher.hash(
                    data, max_pixels=self.max_image_pixels, max_bytes=self.max_blob_bytes
                )
                signals = BlobSignals(mean=phash)
        except ImageError as exc:  # HashWorkerDied too: a blob that kills workers is bad
            self.metrics.blob_errors.labels(kind=_error_kind(exc)).inc()
            logger.warning("skip blob {} of {}: {}", blob.cid, job.uri, exc)
            self.decisions.bad_blob(job, blob, _error_kind(exc), str(exc))
            return None
        self.metrics.blobs_processed.inc()
        if self.cache_enabled:
            stage.name = "cache"
            await self.store.cache_set(blob.cid, signals.mean, self.cache_ttl)
            if full and signals.pdq is not None:
                await self.store.signals_set(blob.cid, signals, self.cache_ttl)
        return signals

    async def _attempt(self, job: ImageJob, done: set[str], stage: _Stage) -> None:
        for blob in job.blobs:
            if blob.cid in done:
                continue
            signals = await self._hash_blob(job, blob, stage)
            match: Match | None = None
            if signals is not None:
                stage.name = "match"
                assert self.matcher is not None
                match = await self.matcher.match(signals, job.did)
            if match is not None:
                self.metrics.matches_found.inc()
                logger.info(
                    "match: {} blob {} phash {} ~ {} {} (rule {} {!r}, distance {}{})",
                    job.uri,
                    blob.cid,
                    match.phash_hex,
                    match.signal_type,
                    match.matched_hex,
                    match.rule_index,
                    match.rule.label,
                    match.distance,
                    f", bank {match.bank} content {match.content_id}" if match.bank else "",
                )
                self.decisions.match(job, blob, match)
                stage.name = "act"
                try:
                    await self.actions.apply(job, blob, match)
                except OzoneUnavailable as exc:
                    # An open breaker or a rate limit says when to come back: wait, do not
                    # spend an attempt.
                    waiting = exc.breaker_open or exc.rate_limited
                    raise _TransientFailure(
                        f"ozone: {exc}", exc.retry_at if waiting else None
                    ) from exc
                except OzoneAuthError as exc:
                    # Bad or revoked credentials: retry, then dead-letter, never drop.
                    self.metrics.errors.labels(kind="ozone_auth").inc()
                    raise _TransientFailure(f"ozone login: {exc}") from exc
                except OzoneError as exc:
                    # Rejected by Ozone (a 4xx other than rate limits): retrying cannot help.
                    self.metrics.errors.labels(kind=_error_kind(exc)).inc()
                    logger.error("ozone refused an event for {}: {}", job.uri, exc)
                except StoreError as exc:
                    raise _TransientFailure(f"redis: {exc}") from exc
            done.add(blob.cid)

    async def process(self, job: ImageJob) -> bool:
        """Decide the job (True) or dead-letter it (False); then mark it finished for the cursor.

        This is the job boundary: any exception but a cancellation is contained here (logged
        once with its traceback, counted by stage and kind, dead-lettered), and the whole job,
        dead-letter write included, ends within ``job_deadline`` seconds. A cancellation
        (shutdown) leaves the job pending so the saved cursor stays before it.
        """
        started = trio.current_time()
        deadline = started + self.job_deadline
        reserve = min(DEAD_LETTER_RESERVE_SECS, self.job_deadline / 4)
        stage = _Stage()
        error: str | None = None
        attempts = 1
        with trio.move_on_at(deadline - reserve) as work:
            try:
                outcome = await self._decide(job, stage)
            except Exception as exc:
                kind = _error_kind(exc)
                self.metrics.job_crashes.labels(stage=stage.name, kind=kind).inc()
                logger.opt(exception=exc).error(
                    "{} failed at stage {} with an unexpected {}: {}",
                    job.uri,
                    stage.name,
                    kind,
                    exc,
                )
                error = f"{stage.name}: {kind}: {exc}"
            else:
                if outcome is not None:
                    error, attempts = outcome
        if work.cancelled_caught:
            self.metrics.jobs_timed_out.inc()
            error = f"{stage.name}: job deadline of {self.job_deadline:g} s passed"
            logger.error("{} stopped at stage {}: {}", job.uri, stage.name, error)
        if error is not None:
            with trio.move_on_at(deadline) as writing:
                await self._dead_letter(job, error, attempts)
            if writing.cancelled_caught:
                self._dead_letter_lost(job, error, attempts, "no Redis write succeeded in time")
            self.decisions.dead_letter(job, error, attempts)
        else:
            self.metrics.jobs_processed.inc()
        if job.read_at is not None:
            self.metrics.decision_latency.observe(trio.current_time() - job.read_at)
        self.tracker.finish_job(job.time_us)
        logger.debug("decided {} time_us={} blobs={}", job.uri, job.time_us, len(job.blobs))
        return error is None

    async def _decide(self, job: ImageJob, stage: _Stage) -> tuple[str, int] | None:
        """Attempts with retries and breaker waits: None once decided, else (error, attempts)."""
        done: set[str] = set()
        failures = 0
        breaker_deadline: float | None = None
        while True:
            try:
                await self._attempt(job, done, stage)
                return None
            except _TransientFailure as exc:
                now = trio.current_time()
                if exc.breaker_retry_at is not None:
                    if breaker_deadline is None:
                        breaker_deadline = now + self.breaker_wait_max
                    if now < breaker_deadline:
                        wait_until = min(exc.breaker_retry_at, breaker_deadline)
                        if wait_until <= now:
                            # A retry time already past means a half-open breaker whose probe
                            # is still out: poll instead of spinning through the attempt.
                            wait_until = min(
                                now + max(self.retry_delay, _MIN_BREAKER_POLL), breaker_deadline
                            )
                        logger.info(
                            "{} waits {:.1f}s for an open breaker ({})",
                            job.uri,
                            max(0.0, wait_until - now),
                            exc,
                        )
                        stage.name = "breaker_wait"
                        await trio.sleep_until(max(wait_until, now))
                        continue
                # Past the job's one breaker-wait budget (never renewed), an open breaker
                # spends attempts like any other failure, so the job reaches the dead letters.
                failures += 1
                self.metrics.jobs_failed.inc()
                self.metrics.errors.labels(kind="job_attempt").inc()
                if failures > self.retry_attempts:
                    return str(exc), failures
                delay = self.retry_delay * 2 ** (failures - 1)
                self.metrics.jobs_retried.inc()
                logger.warning(
                    "{} attempt {} failed: {}; retry in {:.1f}s", job.uri, failures, exc, delay
                )
                stage.name = "retry_wait"
                await trio.sleep(delay)

    def _payload(self, job: ImageJob, error: str, attempts: int) -> dict[str, Any]:
        return {
            "job": job_to_json(job),
            "error": error,
            "attempts": attempts,
            # A timestamp for operators reading the list; wall clock on purpose.
            "failed_at": datetime.fromtimestamp(time.time(), UTC).isoformat(),
        }

    async def _dead_letter(self, job: ImageJob, error: str, attempts: int) -> None:
        """Store the job in ``jobs:dead``, retrying any Redis error (outage, READONLY, OOM)
        with backoff until the caller's deadline cancels us."""
        payload = self._payload(job, error, attempts)
        delays = backoff_delays(0.1, 2.0)
        while True:
            try:
                await self.store.push_dead_letter(payload)
                break
            except StoreError as exc:
                delay = next(delays)
                logger.warning("dead letter for {} not stored yet: {}", job.uri, exc)
                await trio.sleep(delay)
        self.metrics.jobs_dead_lettered.inc()
        logger.error(
            "{} dead-lettered after {} attempts: {} ({})",
            job.uri,
            attempts,
            error,
            json.dumps(payload["job"])[:300],
        )

    def _dead_letter_lost(self, job: ImageJob, error: str, attempts: int, why: str) -> None:
        """The last resort: the whole dead letter goes to the log, and the cursor moves on.

        Holding the cursor for a Redis that refuses writes would stop all moderation; the log
        line carries everything needed to re-queue the job by hand.
        """
        self.metrics.dead_letters_lost.inc()
        logger.critical(
            "dead letter LOST for {} ({}); re-queue it from this line: {}",
            job.uri,
            why,
            json.dumps(self._payload(job, error, attempts)),
        )


async def run_worker(processor: JobProcessor, receive: trio.MemoryReceiveChannel[ImageJob]) -> None:
    """Process jobs until the channel is closed and empty."""
    async with receive:
        async for job in receive:
            await processor.process(job)
