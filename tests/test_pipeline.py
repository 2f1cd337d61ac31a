"""JobProcessor with real fakes (CDN/PDS, PLC, Ozone over HTTP) and a real redis-server.

Timing tests use the autojump clock with every client-side timeout set to infinity and no
other timer running: virtual time then only moves when every task sleeps, so retry delays,
breaker waits and the arrival times the fakes record are exact.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import redis
import trio
import trio.testing

from phash_trio.firehose.cursor import CursorTracker
from phash_trio.image.meanhash import mean_hash
from phash_trio.image.pool import HashPool
from phash_trio.image.signals import compute_signals
from phash_trio.net.atproto.blobs import BlobFetcher
from phash_trio.net.atproto.identity import PdsResolver
from phash_trio.net.breaker import BreakerState, CircuitBreaker
from phash_trio.net.ozone.client import OzoneClient
from phash_trio.pipeline.actions import Actions, RateSpacer
from phash_trio.pipeline.jobs import BlobRef, ImageJob
from phash_trio.pipeline.processor import JobProcessor, job_from_json, job_to_json, run_worker
from phash_trio.rules.banksync import BankMetrics
from phash_trio.rules.index import RuleIndex
from phash_trio.rules.matcher import BlobMatcher
from phash_trio.rules.model import load_rules, parse_rules
from phash_trio.runtime.metrics import Metrics
from phash_trio.state.store import DEAD_LETTER_KEY, RedisStore, run_health_monitor
from phash_trio.testing.blobhost import BlobHost, PlcDirectory
from phash_trio.testing.capture import IMAGES_DIR, record_cid
from phash_trio.testing.fake_ozone import FakeOzone, run_fake_ozone
from phash_trio.testing.jetstream_replay import fake_did
from phash_trio.testing.redis_server import RedisProcess

RULES = Path(__file__).resolve().parents[1] / "rules" / "blobs.json"
INF = float("inf")
CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def image(name: str) -> bytes:
    return (IMAGES_DIR / name).read_bytes()


@attrs.define
class TimedBlobHost(BlobHost):
    """The blob host fake, also noting the Trio time of every CDN request."""

    cdn_times: list[float] = attrs.field(factory=list)

    async def handle(self, request: Any) -> Any:
        if request.path.startswith("/img/"):
            self.cdn_times.append(trio.current_time())
        return await super().handle(request)


class Transitions:
    """Breaker hook recording ``(time, new state)``; ``reopened`` is set when a probe fails."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, BreakerState]] = []
        self.reopened = trio.Event()
        self._changed = trio.Event()

    def __call__(self, name: str, old: BreakerState, new: BreakerState) -> None:
        self.seen.append((trio.current_time(), new))
        if old is HALF_OPEN and new is OPEN:
            self.reopened.set()
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, state: BreakerState) -> None:
        """Until the breaker's latest transition is into ``state``."""
        while not self.seen or self.seen[-1][1] is not state:
            await self._changed.wait()


@attrs.define
class World:
    """The fakes, one HTTP client, Redis, and a processor factory wired to them."""

    host: TimedBlobHost
    plc: PlcDirectory
    fake: FakeOzone
    http: httpx.AsyncClient
    store: RedisStore
    metrics: Metrics
    raw: redis.Redis
    tracker: CursorTracker = attrs.field(factory=CursorTracker)
    ozone_transitions: Transitions = attrs.field(factory=Transitions)
    ozone_breaker: CircuitBreaker | None = None
    fetcher: BlobFetcher | None = None
    ozone: OzoneClient | None = None
    _next_time: int = 1_763_700_000_000_000

    def post(self, *names: str, did: str | None = None, host: bool = True) -> ImageJob:
        """A post by ``did`` carrying the named images (served by the host unless told not)."""
        did = did or fake_did(f"author-{self._next_time}")
        self.plc.add(did, self.host.url)
        blobs = []
        for name in names:
            data = image(name)
            cid = self.host.cid_for(data)
            if host:
                self.host.add(did, cid, data)
            blobs.append(BlobRef(cid, "image/jpeg", len(data)))
        self._next_time += 1000
        rkey = f"3kpost{self._next_time % 10**7:07d}"
        return ImageJob(
            did=did,
            rkey=rkey,
            cid=record_cid(f"{did}/{rkey}"),
            time_us=self._next_time,
            blobs=tuple(blobs),
        )

    def processor(
        self,
        *,
        cdn_breaker: tuple[int, float] = (100, 60.0),
        pds_breaker: tuple[int, float] = (100, 300.0),
        ozone_breaker: tuple[int, float] = (100, 60.0),
        cache: bool = True,
        **kwargs: Any,
    ) -> JobProcessor:
        m = self.metrics
        resolver = PdsResolver(
            self.http,
            plc_endpoint=self.plc.url,
            timeout=INF,
            allow_private_networks=True,
            plc_breaker=CircuitBreaker("plc", failure_threshold=100),
        )
        self.fetcher = BlobFetcher(
            self.http,
            cdn_url=self.host.url,
            resolver=resolver,
            metrics=m,
            attempt_timeout=INF,
            total_timeout=INF,
            allow_private_networks=True,
            cdn_breaker=CircuitBreaker(
                "cdn",
                failure_threshold=cdn_breaker[0],
                reset_timeout=cdn_breaker[1],
                on_transition=m.on_breaker_transition,
                on_reject=m.on_breaker_reject,
            ),
            pds_breaker_factory=lambda host: CircuitBreaker(
                f"pds:{host}", failure_threshold=pds_breaker[0], reset_timeout=pds_breaker[1]
            ),
        )

        def on_transition(name: str, old: BreakerState, new: BreakerState) -> None:
            m.on_breaker_transition(name, old, new)
            self.ozone_transitions(name, old, new)

        self.ozone_breaker = CircuitBreaker(
            "ozone",
            failure_threshold=ozone_breaker[0],
            reset_timeout=ozone_breaker[1],
            on_transition=on_transition,
            on_reject=m.on_breaker_reject,
        )
        self.ozone = OzoneClient(
            self.http,
            pds_url=self.fake.url,
            handle=self.fake.handle,
            password=self.fake.password,
            labeler_did=self.fake.labeler_did,
            breaker=self.ozone_breaker,
            metrics=m,
            backoff_initial=0.125,
            request_timeout=INF,
        )
        actions = Actions(
            store=self.store,
            ozone=self.ozone,
            metrics=m,
            labeler_did=self.fake.labeler_did,
            default_daily_cap=1000,
            spacer=RateSpacer(0),
            today=lambda: "2025-11-21",
        )
        kwargs.setdefault("retry_attempts", 3)
        kwargs.setdefault("retry_delay", 0.0625)
        kwargs.setdefault("job_deadline", INF)  # a pending deadline would be autojumped to
        return JobProcessor(
            fetcher=self.fetcher,
            rules=RuleIndex(load_rules(RULES), 3),
            actions=actions,
            store=self.store,
            metrics=m,
            tracker=self.tracker,
            hasher=HashPool(0, threads=2),
            cache_enabled=cache,
            **kwargs,
        )

    def dead_letters(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.raw.lrange(DEAD_LETTER_KEY, 0, -1)]

    def emit_arrivals(self) -> list[tuple[float, int]]:
        return [(r.time, r.status) for r in self.fake.calls("emitEvent")]


async def feed_workers(
    nursery: trio.Nursery, world: World, processor: JobProcessor, jobs: list[ImageJob]
) -> None:
    """Start three workers on one channel in ``nursery`` and send them ``jobs`` (each started
    in the tracker first)."""
    send, receive = trio.open_memory_channel[ImageJob](len(jobs))
    async with receive:
        for _ in range(3):
            nursery.start_soon(run_worker, processor, receive.clone())
    async with send:
        for job in jobs:
            world.tracker.start_job(job.time_us)
            await send.send(job)


@pytest.fixture
async def world(nursery: trio.Nursery, redis_proc: RedisProcess) -> AsyncIterator[World]:
    host = TimedBlobHost()
    await nursery.start(host.serve)
    plc: PlcDirectory = await nursery.start(PlcDirectory.run)
    fake = FakeOzone()
    await nursery.start(run_fake_ozone, fake)
    metrics = Metrics()
    store = RedisStore(redis_proc.url, metrics)
    raw = redis.Redis.from_url(redis_proc.url, decode_responses=True)
    try:
        async with httpx.AsyncClient(timeout=None, trust_env=False) as http:
            yield World(host, plc, fake, http, store, metrics, raw)
    finally:
        store.close()
        raw.close()


async def poll_until(condition: Callable[[], bool]) -> None:
    """Poll state that offers nothing to wait on (a metric) every 10 ms."""
    while not condition():  # noqa: ASYNC110 - no event to wait for
        await trio.sleep(0.01)


def label_events(fake: FakeOzone) -> list[str]:
    return sorted(e["subject"]["uri"] for e in fake.events)


async def test_bad_blobs_are_per_blob(world: World, log_lines: list[str]) -> None:
    """Broken, non-image and missing blobs are counted and skipped; the post is decided in one
    attempt and its good blob still acts."""
    job = world.post("truncated.jpg", "not-an-image.jpg", "coffee.jpg")
    missing = world.post("moon.jpg", host=False)
    job = attrs.evolve(job, blobs=(*job.blobs, missing.blobs[0]))
    processor = world.processor()
    world.tracker.start_job(job.time_us)
    assert await processor.process(job) is True
    snap = world.metrics.snapshot()
    assert snap["blob_errors[kind=CorruptImage]"] == 1
    assert snap["blob_errors[kind=UnsupportedImage]"] == 1
    assert snap["blob_errors[kind=BlobNotFound]"] == 1
    assert snap["blobs_processed"] == 1
    assert snap["jobs_processed"] == 1
    assert world.metrics.total("jobs_failed") == 0
    assert world.host.cdn_requests == 4 and world.host.pds_requests == 1  # nothing retried
    assert label_events(world.fake) == [job.uri]
    assert world.dead_letters() == []
    assert (world.tracker.pending, world.tracker.safe_cursor()) == (0, job.time_us)
    assert sum(line.startswith("WARNING skip blob") for line in log_lines) == 3
    assert f"DEBUG decided {job.uri} time_us={job.time_us} blobs=4\n" in log_lines


async def test_transient_failure_retries_with_doubling_delay_then_dead_letters(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    """A blob that keeps failing (5xx) is tried RETRY_ATTEMPTS+1 times, 1x/2x/4x the delay
    apart, then the job goes to ``jobs:dead`` with its last error and counts as finished."""
    world.host.fail_cdn = 500
    world.host.fail_pds = 503
    job = world.post("coffee.jpg")
    processor = world.processor(retry_attempts=3, retry_delay=0.0625)
    world.tracker.start_job(job.time_us)
    assert await processor.process(job) is False
    assert world.host.cdn_times == [0.0, 0.0625, 0.1875, 0.4375]
    assert trio.current_time() == 0.4375
    [letter] = world.dead_letters()
    assert letter["attempts"] == 4
    assert job_from_json(letter["job"]) == job
    assert letter["job"] == job_to_json(job)
    assert "CDN" in letter["error"] and ": 500" in letter["error"] and ": 503" in letter["error"]
    assert letter["failed_at"].endswith("+00:00")
    snap = world.metrics.snapshot()
    assert (snap["jobs_failed"], snap["jobs_retried"], snap["jobs_dead_lettered"]) == (4, 3, 1)
    assert snap["jobs_processed"] == 0
    assert world.tracker.pending == 0
    assert world.fake.requests == []


async def test_dead_letter_waits_for_redis_before_finishing(
    world: World, redis_proc: RedisProcess
) -> None:
    """With Redis down at dead-letter time the job stays pending (cursor held) until the
    letter is stored; only then is it finished."""
    world.host.fail_cdn = 500
    world.host.fail_pds = 500
    job = world.post("coffee.jpg")
    processor = world.processor(retry_attempts=1, retry_delay=0.05, cache=False)
    world.tracker.start_job(job.time_us)
    await trio.to_thread.run_sync(redis_proc.stop)
    result: list[bool] = []
    with trio.fail_after(30):  # a guard only
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_health_monitor(
                    world.store, interval=0.05, max_backoff=0.05, task_status=task_status
                )
            )

            async def run() -> None:
                result.append(await processor.process(job))
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            await poll_until(lambda: world.metrics.total("jobs_failed") == 2)
            await trio.sleep(0.3)
            assert world.tracker.pending == 1
            assert world.metrics.total("jobs_dead_lettered") == 0
            await trio.to_thread.run_sync(redis_proc.start)
    assert result == [False]
    assert world.tracker.pending == 0
    [letter] = world.dead_letters()
    assert letter["job"] == job_to_json(job) and letter["attempts"] == 2


async def test_open_breakers_are_waited_for_without_spending_attempts(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    """A fetch refused only by open breakers waits until they admit a probe, however few
    attempts are allowed, and then succeeds."""
    job = world.post("coffee.jpg")
    processor = world.processor(cdn_breaker=(1, 10.0), pds_breaker=(1, 10.0), retry_attempts=0)
    assert world.fetcher is not None
    for breaker in (
        world.fetcher.cdn_breaker,
        world.fetcher.pds_breaker(world.host.url.removeprefix("http://")),
    ):
        breaker.before_call()
        breaker.record_failure()
        assert breaker.state is OPEN
    world.tracker.start_job(job.time_us)
    assert await processor.process(job) is True
    assert trio.current_time() == 10.0
    assert world.host.cdn_times == [10.0]
    assert world.host.pds_requests == 0
    assert world.metrics.total("jobs_failed") == 0
    assert world.fetcher.cdn_breaker.state is CLOSED
    assert label_events(world.fake) == [job.uri]


async def test_ozone_storm_one_job_exact(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    """Ozone answering 503 for 100 s: the breaker opens at the 5th failure, nothing reaches
    Ozone while it is open, one probe per half-open spell, and the event is delivered once
    Ozone is back - without the job spending more than the one pre-breaker attempt."""
    processor = world.processor(ozone_breaker=(5, 60.0), retry_delay=0.0625)
    assert world.ozone is not None
    await world.ozone.ensure_session()
    world.fake.fail_until(100.0)
    job = world.post("coffee.jpg")
    world.tracker.start_job(job.time_us)
    assert await processor.process(job) is True
    assert trio.current_time() == 120.5625
    assert world.emit_arrivals() == [
        (0.0, 503),
        (0.125, 503),
        (0.375, 503),  # attempt 1 used up (3 tries): one spent attempt
        (0.4375, 503),
        (0.5625, 503),  # 5th failure: open until 60.5625
        (60.5625, 503),  # half-open probe fails: open until 120.5625
        (120.5625, 200),  # probe succeeds
    ]
    assert world.ozone_transitions.seen == [
        (0.5625, OPEN),
        (60.5625, HALF_OPEN),
        (60.5625, OPEN),
        (120.5625, HALF_OPEN),
        (120.5625, CLOSED),
    ]
    snap = world.metrics.snapshot()
    assert (snap["jobs_failed"], snap["jobs_retried"]) == (1, 1)
    assert snap["breaker_rejections[breaker=ozone]"] == 2
    assert label_events(world.fake) == [job.uri]
    assert world.dead_letters() == []


async def test_ozone_storm_many_workers(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    """Several workers through an Ozone outage toggled by a task: no call reaches Ozone while
    the breaker is open, one probe per half-open spell, and every event is delivered."""
    processor = world.processor(ozone_breaker=(5, 60.0))
    assert world.ozone is not None
    await world.ozone.ensure_session()
    jobs = [world.post("coffee.jpg") for _ in range(8)]
    world.fake.down = True

    async def end_outage() -> None:
        await world.ozone_transitions.reopened.wait()  # a probe failed: Ozone comes back now
        world.fake.down = False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(end_outage)
        await feed_workers(nursery, world, processor, jobs)

    assert label_events(world.fake) == sorted(j.uri for j in jobs)
    assert world.dead_letters() == []
    assert world.tracker.pending == 0
    seen = world.ozone_transitions.seen
    assert [state for _, state in seen] == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]
    arrivals = world.emit_arrivals()
    for (start, state), (end, _) in itertools.pairwise(seen):
        inside = [t for t, _ in arrivals if start < t < end]
        assert inside == [], f"calls reached Ozone while {state.value}"
    # A failed probe is the only call of its half-open spell; after the last (successful)
    # probe every call succeeds.
    [(probe_at, _)] = [(t, s) for t, s in seen if s is HALF_OPEN][:1]
    assert [a for a in arrivals if a[0] == probe_at] == [(probe_at, 503)]
    last_probe = seen[-2][0]
    assert all(status == 200 for t, status in arrivals if t >= last_probe)
    assert sum(t >= last_probe for t, _ in arrivals) == len(jobs)
    assert world.metrics.total("jobs_dead_lettered") == 0


async def test_jobs_poll_while_a_half_open_probe_is_out(world: World) -> None:
    """While the one half-open probe hangs, the other jobs poll every RETRY_DELAY instead of
    spinning through attempts (real time; the count bounds the polls)."""
    processor = world.processor(ozone_breaker=(1, 0.2), retry_delay=0.25)
    assert world.ozone is not None and world.ozone_breaker is not None
    breaker = world.ozone_breaker
    await world.ozone.ensure_session()
    jobs = [world.post("coffee.jpg") for _ in range(3)]
    world.fake.down = True
    refused_while_probing = 0

    async def control() -> None:
        nonlocal refused_while_probing
        await world.ozone_transitions.wait_for(OPEN)
        world.fake.down = False
        world.fake.hang = True
        await world.ozone_transitions.wait_for(HALF_OPEN)  # entered by the probe's own call
        assert breaker.half_open_in_flight == 1
        before = world.metrics.total("breaker_rejections")
        await trio.sleep(1.0)
        refused_while_probing = int(world.metrics.total("breaker_rejections") - before)
        world.fake.hang = False

    with trio.fail_after(30):  # a guard only
        async with trio.open_nursery() as nursery:
            nursery.start_soon(control)
            await feed_workers(nursery, world, processor, jobs)
    # Two waiting jobs, one poll each per 0.25 s: at most 2 * 5 in a second (a spin: hundreds).
    assert 1 <= refused_while_probing <= 10
    assert label_events(world.fake) == sorted(j.uri for j in jobs)
    assert world.dead_letters() == []


async def test_ozone_down_past_breaker_wait_max_dead_letters(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    """If Ozone stays down past BREAKER_WAIT_MAX, jobs go to ``jobs:dead`` (none lost, no
    claim left behind) instead of waiting forever."""
    processor = world.processor(
        ozone_breaker=(5, 60.0), retry_attempts=1, retry_delay=0.0625, breaker_wait_max=100.0
    )
    assert world.ozone is not None
    await world.ozone.ensure_session()
    world.fake.down = True
    jobs = [world.post("coffee.jpg") for _ in range(3)]
    for job in jobs:
        world.tracker.start_job(job.time_us)
    ended: list[float] = []
    for job in jobs:
        assert await processor.process(job) is False
        ended.append(trio.current_time())
    # Attempt 1 fails at 0.375 (3 tries); attempt 2 opens the breaker at 0.5625 and is refused
    # at 0.8125; it may wait until 0.8125 + 100 and is refused again then.
    assert ended[0] == 100.8125
    letters = world.dead_letters()
    assert [job_from_json(letter["job"]) for letter in letters] == jobs
    assert all("circuit breaker is open" in letter["error"] for letter in letters)
    assert world.fake.events == []
    assert world.raw.keys("claim:*") == []
    assert world.tracker.pending == 0
    assert world.metrics.total("jobs_dead_lettered") == 3


async def test_cache_hit_skips_the_fetch(world: World) -> None:
    """A cached hash is used without downloading; the first fetch fills the cache."""
    coffee = mean_hash(image("coffee.jpg"))
    assert coffee == 0xFCFCFDD9810181C3
    processor = world.processor()
    first = world.post("coffee.jpg")
    second = world.post("coffee.jpg")
    for job in (first, second):
        world.tracker.start_job(job.time_us)
        assert await processor.process(job) is True
    assert world.host.cdn_requests == 1
    assert world.raw.get(f"phash:{first.blobs[0].cid}") == f"{coffee:016x}"
    # A blob nobody serves, but whose hash is cached: decided from the cache alone.
    unserved = world.post("spitfire.jpg", host=False)
    await world.store.cache_set(unserved.blobs[0].cid, 0xFFFF070080C1FFFC, 3600)
    world.tracker.start_job(unserved.time_us)
    assert await processor.process(unserved) is True
    assert world.host.cdn_requests == 1
    snap = world.metrics.snapshot()
    assert (snap["cache_hits"], snap["cache_misses"], snap["blobs_downloaded"]) == (2, 1, 1)
    assert label_events(world.fake) == sorted([first.uri, second.uri, unserved.uri, unserved.uri])


async def test_every_signal_is_cached_when_the_rules_need_pdq(world: World) -> None:
    """With PDQ in the rules the mean-hash cache is not enough: every signal is cached under
    ``signals:{cid}``, so a repost is decided without a download; a malformed value is a miss."""
    coffee = compute_signals(image("coffee.jpg"))
    assert coffee.pdq is not None
    rule = {k: v for k, v in json.loads(RULES.read_text())[1].items() if k != "phashes"}
    rules = RuleIndex(parse_rules([{**rule, "pdqHashes": [coffee.pdq.hex]}]), 3)
    processor = world.processor(matcher=BlobMatcher(rules, metrics=BankMetrics.register()))
    first, second = world.post("coffee.jpg"), world.post("coffee.jpg")
    for job in (first, second):
        world.tracker.start_job(job.time_us)
        assert await processor.process(job) is True
    assert world.host.cdn_requests == 1
    cid = first.blobs[0].cid
    assert world.raw.get(f"signals:{cid}") == (
        f"{coffee.mean:016x} {coffee.pdq.hex} {coffee.pdq.quality} {coffee.md5} {coffee.sha256}"
    )
    assert world.raw.get(f"phash:{cid}") == f"{coffee.mean:016x}"  # skywatch's key as before
    events = label_events(world.fake)
    assert events.count(first.uri) == events.count(second.uri) >= 1
    world.raw.set(f"signals:{cid}", "0123 not signals")
    third = world.post("coffee.jpg")
    world.tracker.start_job(third.time_us)
    assert await processor.process(third) is True
    assert world.host.cdn_requests == 2
    snap = world.metrics.snapshot()
    assert (snap["cache_hits"], snap["cache_misses"]) == (1, 2)
