"""Build the job processor and everything it talks to (shared by the service and the CLI)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from phash_trio.config import Settings
from phash_trio.firehose.cursor import CursorTracker
from phash_trio.image.pool import HashPool
from phash_trio.net.atproto.blobs import BlobFetcher
from phash_trio.net.atproto.identity import PdsResolver
from phash_trio.net.breaker import CircuitBreaker
from phash_trio.net.ozone.client import OzoneClient
from phash_trio.net.transport import guarded_transport
from phash_trio.pipeline.actions import Actions, RateSpacer
from phash_trio.pipeline.processor import JobProcessor
from phash_trio.rules.index import RuleIndex
from phash_trio.rules.matcher import build_matcher
from phash_trio.runtime.metrics import Metrics
from phash_trio.state.hook import DecisionHook, NoDecisions
from phash_trio.state.store import RedisStore

__all__ = ["open_processor"]


@asynccontextmanager
async def open_processor(
    settings: Settings,
    rules: RuleIndex,
    metrics: Metrics,
    store: RedisStore,
    tracker: CursorTracker,
    decisions: DecisionHook | None = None,
) -> AsyncIterator[JobProcessor]:
    """A :class:`JobProcessor` with a shared HTTP client and hash pool; breakers feed metrics."""
    dry_run = settings.effective_dry_run
    decisions = decisions or NoDecisions()

    def breaker(name: str, failures: int, timeout: float) -> CircuitBreaker:
        return CircuitBreaker(
            name,
            failure_threshold=failures,
            reset_timeout=timeout,
            on_transition=metrics.on_breaker_transition,
            on_reject=metrics.on_breaker_reject,
        )

    limits = httpx.Limits(max_connections=100, max_keepalive_connections=40)
    timeout = httpx.Timeout(settings.blob_download_timeout_secs)
    hasher = HashPool.from_settings(settings, metrics)
    matcher = build_matcher(settings, rules, metrics.registry)
    try:
        # Hosts named by strangers (PDS, did:web) go through a client that connects only to
        # the public addresses it checked; operator-configured hosts through the plain one.
        untrusted_transport = guarded_transport(
            allow_private=settings.allow_private_networks, limits=limits
        )
        async with (
            httpx.AsyncClient(limits=limits, timeout=timeout) as http,
            httpx.AsyncClient(
                transport=untrusted_transport, timeout=timeout, trust_env=False
            ) as untrusted,
        ):
            resolver = PdsResolver.from_settings(settings, http, metrics, web_client=untrusted)
            fetcher = BlobFetcher.from_settings(
                settings, http, resolver, metrics, pds_client=untrusted
            )
            ozone: OzoneClient | None = None
            if not dry_run:
                ozone = OzoneClient.from_settings(
                    settings,
                    http,
                    breaker("ozone", 5, settings.ozone_breaker_reset_secs),
                    metrics=metrics,
                )
            actions = Actions(
                store=store,
                ozone=ozone,
                metrics=metrics,
                labeler_did=settings.labeler_did,
                default_daily_cap=settings.max_actions_per_day,
                spacer=RateSpacer(settings.rate_limit_ms / 1000),
                dry_run=dry_run,
                report_reason_type=settings.ozone_report_reason_type,
                decisions=decisions,
            )
            processor = JobProcessor(
                fetcher=fetcher,
                rules=rules,
                actions=actions,
                store=store,
                metrics=metrics,
                tracker=tracker,
                hasher=hasher,
                cache_enabled=settings.cache_enabled,
                cache_ttl=settings.cache_ttl_seconds,
                retry_attempts=settings.retry_attempts,
                retry_delay=settings.retry_delay_ms / 1000,
                breaker_wait_max=settings.breaker_wait_max_secs,
                job_deadline=settings.job_deadline_secs,
                max_image_pixels=settings.max_image_pixels,
                max_blob_bytes=settings.max_blob_bytes,
                matcher=matcher,
                decisions=decisions,
            )
            yield processor
    finally:
        hasher.close()
        if matcher.banks is not None:
            matcher.banks.store.close()  # the workers stop once their current image is done
