"""Everything of issue 14 a running instance holds: the decision log and its writer, the SSE
broadcaster, the webhook deliverers and the HTTP routes (log, events, webhooks, page).

``open_decision_services`` builds them; ``run`` (in the service's root nursery) starts the
writer, the broadcaster and the webhook manager; ``install`` puts the routes' shared state on
the app (session signer, and the key check when the app has none yet).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import httpx
import trio
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from phash_trio.api.auth import (
    Auth,
    ExposureError,
    KeyFileError,
    RateLimit,
    check_exposure,
    is_loopback_host,
)
from phash_trio.api.errors import install_error_handlers
from phash_trio.api.events import Broadcaster, event_routes
from phash_trio.api.logs import log_routes
from phash_trio.api.page import page_routes
from phash_trio.api.server import parse_addr
from phash_trio.api.session import SessionSigner, load_session_secret, session_routes
from phash_trio.api.webhooks import webhook_routes
from phash_trio.config import Settings
from phash_trio.net.transport import guarded_transport
from phash_trio.state.decisions import DecisionLog
from phash_trio.state.recorder import DecisionMetrics, DecisionRecorder
from phash_trio.state.redisio import RedisThreads
from phash_trio.state.store import StoreError, backoff_delays
from phash_trio.webhooks.delivery import DeliveryConfig
from phash_trio.webhooks.manager import WebhookManager
from phash_trio.webhooks.subscriptions import (
    Subscription,
    SubscriptionError,
    SubscriptionStore,
    load_subscriptions,
)

__all__ = [
    "DecisionConfigError",
    "DecisionServices",
    "auth_from_settings",
    "decision_settings",
    "open_decision_services",
]


class DecisionConfigError(Exception):
    """WEBHOOKS_FILE or the API keys cannot be used (one line)."""


def decision_settings(settings: Settings) -> tuple[tuple[Subscription, ...], Auth]:
    """The file's subscriptions and the key check, or :class:`DecisionConfigError`."""
    try:
        file_subs: tuple[Subscription, ...] = ()
        if settings.webhooks_file is not None:
            file_subs = tuple(
                load_subscriptions(
                    settings.webhooks_file, allow_private=settings.allow_private_networks
                )
            )
        # The routes live on API_ADDR's app when it is set (it checks its own exposure),
        # else on METRICS_ADDR's.
        addr = settings.api_addr or settings.metrics_addr or "127.0.0.1:0"
        auth = auth_from_settings(settings, addr)
    except (SubscriptionError, KeyFileError, ExposureError) as exc:
        raise DecisionConfigError(str(exc)) from None
    return file_subs, auth


def auth_from_settings(settings: Settings, addr: str) -> Auth:
    """The key check for an app on ``addr`` (API_KEYS_FILE, API_AUTH, the per-key rate):
    KeyFileError for a bad key file, ExposureError for a non-loopback address with no keys
    and API_AUTH not ``none``."""
    host = parse_addr(addr)[0]
    auth = Auth.from_file(
        settings.api_keys_file,
        mode=settings.api_auth,
        rate=RateLimit(settings.api_rate_per_sec, settings.api_rate_burst),
        loopback=is_loopback_host(host),
    )
    check_exposure(host, settings.api_auth, list(auth.keys))
    return auth


def instance_name() -> str:
    """A consumer name unique to this process (host, pid, random)."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


@attrs.define
class DecisionServices:
    redis: RedisThreads
    log: DecisionLog
    recorder: DecisionRecorder
    broadcaster: Broadcaster
    manager: WebhookManager
    subs: SubscriptionStore
    file_subs: tuple[Subscription, ...]
    signer: SessionSigner | None = None
    apps: list[Starlette] = attrs.field(factory=list)
    ttl_secs: float = 8 * 3600.0
    _ready: trio.Event = attrs.field(factory=trio.Event)

    def routes(self) -> list[BaseRoute]:
        return [
            *page_routes(),
            *session_routes(),
            *log_routes(self.log),
            *event_routes(self.broadcaster),
            *webhook_routes(self.subs, self.file_subs),
        ]

    async def prepare(self) -> None:
        """Read the session secret from Redis (waiting out an outage) and hand it to the apps."""
        delays = backoff_delays(0.2, 5.0)
        while True:
            try:
                secret = await load_session_secret(self.redis)
                break
            except StoreError:
                await trio.sleep(next(delays))
        ttl = self.ttl_secs
        self.signer = SessionSigner(secret, ttl)
        for app in self.apps:
            app.state.session_signer = self.signer
        self._ready.set()

    async def signer_ready(self) -> None:
        """Wait until the session secret is read (tests; sign-in answers 503 until then)."""
        await self._ready.wait()

    def install(self, app: Starlette, auth: Auth) -> None:
        """Give ``app`` the key check and (once read) the session signer; JSON errors."""
        if not hasattr(app.state, "auth"):
            app.state.auth = auth
        app.state.session_signer = self.signer
        self.apps.append(app)
        install_error_handlers(app)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.prepare)
            await nursery.start(self.recorder.run)
            await nursery.start(self.broadcaster.run)
            await nursery.start(self.manager.run)
            task_status.started()


@asynccontextmanager
async def open_decision_services(
    settings: Settings, registry: CollectorRegistry, file_subs: tuple[Subscription, ...] = ()
) -> AsyncIterator[DecisionServices]:
    """Build the services for ``settings`` (nothing runs until :meth:`DecisionServices.run`)."""
    metrics = DecisionMetrics(registry)
    redis = RedisThreads(settings.redis_url)
    log = DecisionLog(redis, retention_secs=settings.decisions_retention_secs)
    recorder = DecisionRecorder(
        log, metrics, buffer=settings.decisions_buffer, cdn_url=settings.cdn_url
    )
    broadcaster = Broadcaster(
        log,
        redis,
        metrics,
        buffer=settings.sse_client_buffer,
        heartbeat_secs=settings.sse_heartbeat_secs,
        max_clients=settings.sse_max_clients,
    )
    subs = SubscriptionStore(redis, allow_private=settings.allow_private_networks)
    config = DeliveryConfig(
        retry_max_secs=settings.webhook_retry_max_secs,
        timeout_secs=settings.webhook_timeout_secs,
        lease_secs=settings.webhook_lease_secs,
    )
    transport = guarded_transport(allow_private=settings.allow_private_networks)
    try:
        async with httpx.AsyncClient(
            transport=transport, trust_env=False, follow_redirects=False
        ) as client:
            manager = WebhookManager(
                redis, client, metrics, instance_name(), file_subs, subs, config
            )
            services = DecisionServices(
                redis,
                log,
                recorder,
                broadcaster,
                manager,
                subs,
                file_subs,
                ttl_secs=settings.session_ttl_secs,
            )
            yield services
    finally:
        redis.close()
