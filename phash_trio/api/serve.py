"""Run the hash-and-match API: inside ``phash-trio run`` or alone as ``phash-trio serve``.

:func:`run_api` builds the auth, the bank sync, the context and the app, refuses an exposed
address without keys (:class:`~phash_trio.api.auth.ExposureError`, one line, exit 2), and
serves until cancelled. It reuses the firehose path's pieces when given a
:class:`~phash_trio.pipeline.JobProcessor`: its hash pool, its blob fetcher (CDN then PDS, with
the SSRF guard) and its :class:`~phash_trio.pipeline.actions.Actions` (same claims and externalIds).
:func:`serve_command` is ``phash-trio serve``: the API, Redis health and the processor's
pieces, no firehose; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from functools import partial

import httpx
import trio
from loguru import logger
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from phash_trio.api.auth import Auth, ExposureError, KeyFileError, RateLimit, check_exposure
from phash_trio.api.context import ApiContext
from phash_trio.api.hashing import HashGate
from phash_trio.api.inputs import UrlFetcher
from phash_trio.api.server import ApiServer, ServerLimits, parse_addr, serve_app
from phash_trio.api.service_app import build_api_app
from phash_trio.api.status import Health
from phash_trio.config import Settings
from phash_trio.net.transport import guarded_transport
from phash_trio.pipeline.processor import JobProcessor
from phash_trio.rules.banks import BankStore
from phash_trio.rules.banksync import BankMetrics, BankSync
from phash_trio.rules.index import RuleIndex
from phash_trio.rules.matcher import BlobMatcher
from phash_trio.runtime.metrics import Metrics

__all__ = ["API_LIMITS", "DEFAULT_SERVE_ADDR", "ApiStartupError", "run_api", "serve_command"]

#: Where ``phash-trio serve`` listens when API_ADDR is empty.
DEFAULT_SERVE_ADDR = "127.0.0.1:8000"
#: Upload checks come from many clients at once: more connections than the status endpoint.
#: A connection is still cut (mid-request too) after ``max_connection_secs``: keep-alive
#: clients then see a dropped connection, so the lifetime is long here.
API_LIMITS = ServerLimits(max_connections=256, backlog=512, max_connection_secs=300.0)


class ApiStartupError(Exception):
    """The API cannot start (exposed without keys, bad key file, port taken); one line."""


def load_auth(settings: Settings, host: str) -> Auth:
    """The key file's keys, or ApiStartupError; refuses an exposed host without keys."""
    try:
        auth = Auth.from_file(
            settings.api_keys_file,
            mode=settings.api_auth,
            rate=RateLimit(settings.api_rate_per_sec, settings.api_rate_burst),
            loopback=True,
        )
        check_exposure(host, settings.api_auth, list(auth.keys))
    except (KeyFileError, ExposureError) as exc:
        raise ApiStartupError(str(exc)) from None
    if settings.api_auth == "none":
        logger.warning(
            "API authentication is off (API_AUTH=none): anyone who reaches {} may call it", host
        )
    elif auth.open_access:
        logger.warning(
            "API on {} has no API keys: open to local clients only (add one with"
            " 'phash-trio api-keys add NAME --scope check')",
            host,
        )
    return auth


async def run_api(
    settings: Settings,
    rules: RuleIndex,
    metrics: Metrics,
    health: Health,
    processor: JobProcessor,
    *,
    addr: str,
    banks: BankSync | None = None,
    extra_routes: Iterable[BaseRoute] = (),
    on_app: Callable[[Starlette, Auth], None] | None = None,
    server_limits: ServerLimits = API_LIMITS,
    task_status: trio.TaskStatus[ApiServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the whole API app on ``addr`` until cancelled; ``started()`` gets the address."""
    host, _port = parse_addr(addr)
    auth = load_auth(settings, host)
    store: BankStore | None = None
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=8)
    transport = guarded_transport(allow_private=settings.allow_private_networks, limits=limits)
    try:
        async with (
            httpx.AsyncClient(transport=transport, trust_env=False) as http,
            trio.open_nursery() as nursery,
        ):
            if banks is None:
                store = BankStore.from_url(settings.redis_url, log_maxlen=settings.banks_log_maxlen)
                banks = BankSync(
                    store,
                    poll_secs=settings.banks_poll_secs,
                    jitter_secs=settings.banks_resync_jitter_secs,
                    # The firehose's matcher registered the bank metrics already under `run`.
                    metrics=(
                        processor.matcher.metrics
                        if processor.matcher is not None and processor.matcher.metrics is not None
                        else BankMetrics.register(metrics.registry)
                    ),
                )
                # Not awaited: /status and /health say 503 until the index is loaded.
                nursery.start_soon(banks.run)
            ctx = ApiContext(
                gate=HashGate(
                    processor.hasher,
                    limit=settings.api_hash_concurrency,
                    max_bytes=settings.max_blob_bytes,
                    max_pixels=settings.max_image_pixels,
                ),
                urls=UrlFetcher(
                    http,
                    max_bytes=settings.max_blob_bytes,
                    timeout=settings.blob_download_timeout_secs,
                    allow_private=settings.allow_private_networks,
                ),
                banks=banks,
                pdq_threshold=settings.pdq_hamming_threshold,
                pdq_quality_min=settings.pdq_quality_min,
                phash_threshold=settings.phash_hamming_threshold,
                matcher=BlobMatcher(
                    rules,
                    banks=banks,
                    pdq_threshold=settings.pdq_hamming_threshold,
                    pdq_quality_min=settings.pdq_quality_min,
                ),
                blobs=processor.fetcher,
                actions=processor.actions,
            )
            app = build_api_app(metrics, health, ctx, auth, extra_routes=extra_routes)
            if on_app is not None:  # issue 14's routes keep their state on the app
                on_app(app, auth)
            try:
                server: ApiServer = await nursery.start(serve_app, app, addr, server_limits)
            except* OSError as group:
                leaf: BaseException = group
                while isinstance(leaf, BaseExceptionGroup):
                    leaf = leaf.exceptions[0]
                reason = getattr(leaf, "strerror", None) or str(leaf)
                raise ApiStartupError(f"API_ADDR {addr}: cannot listen: {reason}") from None
            logger.info(
                "hash-and-match API on {} ({})",
                server.url,
                "no keys" if auth.open_access else f"{len(auth.keys)} API keys",
            )
            task_status.started(server)
    finally:
        if store is not None:
            store.close()


async def serve_command(settings: Settings, rules: RuleIndex) -> int:
    """``phash-trio serve``: the API alone (no firehose) until SIGTERM/SIGINT."""
    from phash_trio.firehose.cursor import CursorTracker
    from phash_trio.runtime.components import open_processor
    from phash_trio.state.store import RedisStore, run_health_monitor

    metrics = Metrics()
    store = RedisStore(settings.redis_url, metrics)
    addr = settings.api_addr or DEFAULT_SERVE_ADDR

    def health() -> tuple[bool, str]:
        return (store.healthy, "ok" if store.healthy else "redis unhealthy")

    try:
        async with (
            open_processor(settings, rules, metrics, store, CursorTracker()) as processor,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(
                partial(
                    run_health_monitor,
                    store,
                    interval=settings.redis_health_check_interval_secs,
                    max_backoff=settings.redis_max_backoff_secs,
                )
            )
            await nursery.start(
                partial(run_api, settings, rules, metrics, health, processor, addr=addr)
            )
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    logger.info("{}: stopping the API", signal.Signals(signum).name)
                    break
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    return 0
