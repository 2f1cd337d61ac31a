"""The service: one nursery tree (DESIGN §1).

```
run_service
├── signal task          SIGTERM/SIGINT: 1st = drain, 2nd = stop now
├── redis health monitor
├── cursor checkpointer  saves the low-watermark every N ms and, shielded, at exit
├── status endpoint      /metrics, /healthz
├── stats logger         one line every 60 s, STATUS= for systemd
├── watchdog             WATCHDOG=1 at half WatchdogSec
└── pipeline nursery
    ├── jetstream reader -> bounded channel
    └── worker × PROCESSING_CONCURRENCY
```

Graceful shutdown: the first signal cancels the reader (no new jobs; closing its send channel
ends the stream), workers finish what is queued within ``SHUTDOWN_GRACE_SECS``, then the rest is
cancelled; unfinished jobs stay pending in the tracker so the final cursor does not pass them.
"""

from __future__ import annotations

import os
import signal
import time
from functools import partial

import attrs
import trio
from loguru import logger

from phash_trio.api import create_app, serve_app
from phash_trio.api.server import ServerLimits
from phash_trio.config import Settings
from phash_trio.firehose.cursor import Checkpointer, CursorFile, CursorTracker, run_checkpointer
from phash_trio.firehose.reader import ReaderConfig, ReaderState, run_reader
from phash_trio.net.ozone.check import check_at_start
from phash_trio.pipeline.jobs import ImageJob
from phash_trio.pipeline.processor import run_worker
from phash_trio.rules.index import RuleIndex
from phash_trio.runtime.components import open_processor
from phash_trio.runtime.metrics import Metrics
from phash_trio.runtime.notify import Notifier, run_watchdog
from phash_trio.runtime.progress import ProgressCheck
from phash_trio.state.services import (
    DecisionConfigError,
    decision_settings,
    open_decision_services,
)
from phash_trio.state.store import RedisStore, run_health_monitor

__all__ = ["Service", "StartupError", "run_service"]

STATS_INTERVAL_SECS = 60.0
#: The watchdog calls the service stuck after JOB_DEADLINE_SECS plus this without progress.
WATCHDOG_MARGIN_SECS = 60.0


class StartupError(Exception):
    """The service cannot start (state directory not writable, metrics port taken...)."""


def _check_state_dir(settings: Settings) -> None:
    """Fail at start, not at the first checkpoint, when the cursor cannot be written."""
    for directory in {settings.state_dir, settings.cursor_file.parent}:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"cannot create state directory {directory}: {exc.strerror}"
            ) from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StartupError(f"state directory {directory} is not writable")


@attrs.define
class Service:
    """Shared state of one running service (what the status endpoint and stats read)."""

    settings: Settings
    rules: RuleIndex
    metrics: Metrics = attrs.field(factory=Metrics)
    notifier: Notifier = attrs.field(factory=Notifier)
    reader_state: ReaderState = attrs.field(factory=ReaderState)
    store: RedisStore | None = None
    stopping: bool = False

    def health(self) -> tuple[bool, str]:
        problems = []
        if not self.reader_state.connected:
            problems.append("jetstream reader not connected")
        if self.store is not None and not self.store.healthy:
            problems.append("redis unhealthy")
        if self.stopping:
            problems.append("shutting down")
        return (not problems, "; ".join(problems) or "ok")


def _status_line(service: Service, tracker: CursorTracker) -> str:
    """One line for the periodic log, systemd's STATUS= and the shutdown message."""
    m = service.metrics
    snap = m.snapshot()
    cursor = tracker.safe_cursor()
    # Jetstream cursors are wall-clock microseconds, so the lag is measured on the wall clock.
    lag = (time.time() - cursor / 1e6) if cursor else None
    if lag is not None:
        m.cursor_lag_seconds.set(lag)
    lag_text = "-" if lag is None else f"{lag:.1f}s"
    return (
        f"events {snap.get('events_received', 0):.0f}, "
        f"posts {snap.get('jobs_processed', 0):.0f}/{snap.get('jobs_received', 0):.0f}, "
        f"blobs {snap.get('blobs_processed', 0):.0f}, "
        f"matches {snap.get('matches_found', 0):.0f}, "
        f"dead {snap.get('jobs_dead_lettered', 0):.0f}, "
        f"pending {tracker.pending}, "
        f"lag {lag_text}"
    )


async def _stats_logger(service: Service, tracker: CursorTracker) -> None:
    while True:
        await trio.sleep(STATS_INTERVAL_SECS)
        line = _status_line(service, tracker)
        logger.info("stats: {}", line)
        await service.notifier.status(line)


async def run_service(settings: Settings, rules: RuleIndex) -> int:
    """Run until a signal; return the exit code (0 on a clean stop)."""
    _check_state_dir(settings)
    service = Service(settings=settings, rules=rules)
    metrics = service.metrics
    cursor_file = CursorFile(settings.cursor_file)
    start_cursor = cursor_file.load()
    tracker = CursorTracker(initial=start_cursor)
    checkpointer = Checkpointer(tracker, cursor_file, last_saved=start_cursor)
    store = service.store = RedisStore(settings.redis_url, metrics)
    dry_run = settings.effective_dry_run
    logger.info(
        "phash-trio starting: {} rules, cursor {}, {} workers, {}",
        len(rules.rules),
        start_cursor if start_cursor is not None else "live",
        settings.processing_concurrency,
        "DRY-RUN (no Ozone events)" if dry_run else f"Ozone at {settings.ozone_pds}",
    )
    for warning in rules.ruleset.warnings:
        logger.warning("rule file {}: {}", settings.rules_file, warning)

    try:  # issue 14: the webhooks file and the API keys, checked before anything starts
        file_subs, auth = decision_settings(settings)
    except DecisionConfigError as exc:
        raise StartupError(str(exc)) from None
    async with (
        open_decision_services(settings, metrics.registry, file_subs) as decisions,
        open_processor(settings, rules, metrics, store, tracker, decisions.recorder) as processor,
    ):
        if processor.actions.ozone is not None:
            problem = await check_at_start(
                processor.actions.ozone, rules.ruleset.rules, settings.ozone_report_reason_type
            )
            if problem is not None:
                raise StartupError(problem)
        reader_config = ReaderConfig.from_settings(settings)
        try:
            async with trio.open_nursery() as root:
                pipeline_scope = trio.CancelScope()
                reader_scope = trio.CancelScope()

                async def on_signals() -> None:
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                        async for signum in signals:
                            name = signal.Signals(signum).name
                            if not service.stopping:
                                service.stopping = True
                                logger.info(
                                    "{}: draining (grace {:.0f}s; send again to stop now)",
                                    name,
                                    settings.shutdown_grace_secs,
                                )
                                await service.notifier.stopping()
                                reader_scope.cancel()
                                pipeline_scope.deadline = (
                                    trio.current_time() + settings.shutdown_grace_secs
                                )
                            else:
                                logger.warning("{} again: stopping now", name)
                                pipeline_scope.cancel()

                root.start_soon(on_signals)
                await root.start(
                    partial(
                        run_health_monitor,
                        store,
                        interval=settings.redis_health_check_interval_secs,
                        max_backoff=settings.redis_max_backoff_secs,
                    )
                )
                if processor.matcher is not None and processor.matcher.banks is not None:
                    # Banks the rules name: loaded before the first post, then kept current.
                    await root.start(processor.matcher.banks.run)
                root.start_soon(
                    run_checkpointer, checkpointer, settings.cursor_update_interval_ms / 1000
                )
                await root.start(decisions.run)
                # Issue 14's routes (log, events, webhooks, page) go on the API app when there
                # is one, else on the status endpoint's.
                on_status = not settings.api_addr
                if settings.metrics_addr:
                    routes = decisions.routes() if on_status else ()
                    app = create_app(metrics, service.health, routes=routes)
                    decisions.install(app, auth)
                    try:
                        # Event-stream clients hold a connection each: room for them too.
                        limits = ServerLimits(max_connections=64 + settings.sse_max_clients)
                        server = await root.start(serve_app, app, settings.metrics_addr, limits)
                    except* OSError as group:
                        leaf: BaseException = group
                        while isinstance(leaf, BaseExceptionGroup):
                            leaf = leaf.exceptions[0]
                        reason = getattr(leaf, "strerror", None) or str(leaf)
                        raise StartupError(
                            f"METRICS_ADDR {settings.metrics_addr}: cannot listen: {reason}"
                        ) from None
                    logger.info("status endpoint on {}/metrics and /healthz", server.url)
                if settings.api_addr:  # the hash-and-match API (issue 13), same processor
                    from phash_trio.api.serve import API_LIMITS, ApiStartupError, run_api

                    try:
                        await root.start(
                            partial(
                                run_api,
                                settings,
                                rules,
                                metrics,
                                service.health,
                                processor,
                                addr=settings.api_addr,
                                # One bank index per process: the firehose's, when it has one.
                                banks=processor.matcher.banks if processor.matcher else None,
                                extra_routes=decisions.routes(),
                                on_app=decisions.install,
                                # Event-stream clients hold a connection each: room for them.
                                server_limits=attrs.evolve(
                                    API_LIMITS,
                                    max_connections=API_LIMITS.max_connections
                                    + settings.sse_max_clients,
                                ),
                            )
                        )
                    except* ApiStartupError as group:
                        raise StartupError(str(group.exceptions[0])) from None
                root.start_soon(_stats_logger, service, tracker)
                progress = ProgressCheck(
                    tracker,
                    service.reader_state,
                    window=settings.job_deadline_secs + WATCHDOG_MARGIN_SECS,
                )
                root.start_soon(run_watchdog, service.notifier, progress)

                with pipeline_scope:
                    async with trio.open_nursery() as pipeline:
                        send, receive = trio.open_memory_channel[ImageJob](settings.channel_size)
                        # Read at scrape time: the workers' updates miss a channel that fills
                        # while every worker is busy (it would read 0 when it is full).
                        metrics.queue_depth.set_function(
                            lambda: send.statistics().current_buffer_used
                        )
                        async with receive:
                            for _ in range(settings.processing_concurrency):
                                pipeline.start_soon(run_worker, processor, receive.clone())
                        pipeline.start_soon(
                            _run_reader,
                            service,
                            reader_scope,
                            reader_config,
                            send,
                            tracker,
                            start_cursor,
                        )
                if pipeline_scope.cancelled_caught and service.stopping:
                    logger.warning(
                        "grace period over: {} posts unfinished (they resume from the cursor)",
                        tracker.pending,
                    )
                root.cancel_scope.cancel()
        finally:
            store.close()
            line = _status_line(service, tracker)
            logger.info("stopped: {}", line)
            totals = ", ".join(
                f"{name}={value:g}" for name, value in sorted(metrics.snapshot().items()) if value
            )
            logger.info("final metrics: {}", totals or "all zero")
    return 0


async def _run_reader(
    service: Service,
    scope: trio.CancelScope,
    config: ReaderConfig,
    send: trio.MemorySendChannel[ImageJob],
    tracker: CursorTracker,
    start_cursor: int | None,
) -> None:
    """The reader, inside the scope the first signal cancels; READY=1 once it is connected."""
    with scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    run_reader,
                    config,
                    send,
                    tracker,
                    service.metrics,
                    start_cursor=start_cursor,
                    state=service.reader_state,
                )
            )
            logger.info("connected to {}", service.reader_state.url)
            await service.notifier.ready()
            await service.notifier.status("connected to " + str(service.reader_state.url))
