"""Containment at the job boundary (issue 9, finding 1): a fault at any stage ends one job.

Every fault comes from a real part: hostile DID documents served by the fake PLC, peers that
answer garbage over real sockets (as PLC, CDN, PDS or Ozone), a real redis-server made to
refuse writes (``OOM`` via maxmemory, ``READONLY`` via REPLICAOF a dead port), a source that
hangs past the job deadline. After each, the same processor decides an honest post and sends
its Ozone event: the service keeps working and the cursor is never held.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
from test_pipeline import World, label_events
from test_pipeline import world as world

from phash_trio.net.atproto.blobs import BlobFetcher
from phash_trio.net.atproto.identity import PdsResolver
from phash_trio.net.breaker import CircuitBreaker
from phash_trio.net.ozone.client import OzoneClient
from phash_trio.pipeline.jobs import ImageJob
from phash_trio.pipeline.processor import JobProcessor
from phash_trio.state.store import run_health_monitor
from phash_trio.testing.garbage_http import Garbage, GarbageServer
from phash_trio.testing.jetstream_replay import fake_did
from phash_trio.testing.redis_server import RedisProcess

#: Real time throughout (real Redis threads and sockets): short limits keep the tests quick.
DEADLINE = 3.0


@pytest.fixture
async def garbage(nursery: trio.Nursery) -> AsyncIterator[GarbageServer]:
    yield await nursery.start(GarbageServer().serve)


def _processor(world: World, **kwargs: object) -> JobProcessor:
    kwargs.setdefault("retry_attempts", 1)
    kwargs.setdefault("retry_delay", 0.01)
    kwargs.setdefault("job_deadline", DEADLINE)
    return world.processor(cache=False, **kwargs)  # type: ignore[arg-type]


def _fetcher(
    world: World, *, cdn_url: str | None = None, plc_url: str | None = None
) -> BlobFetcher:
    resolver = PdsResolver(
        world.http,
        plc_endpoint=plc_url or world.plc.url,
        timeout=5.0,
        allow_private_networks=True,
        plc_breaker=CircuitBreaker("plc", failure_threshold=100),
    )
    return BlobFetcher(
        world.http,
        cdn_url=cdn_url or world.host.url,
        resolver=resolver,
        metrics=world.metrics,
        attempt_timeout=5.0,
        total_timeout=10.0,
        allow_private_networks=True,
        cdn_breaker=CircuitBreaker("cdn", failure_threshold=100),
        pds_breaker_factory=lambda host: CircuitBreaker(host, failure_threshold=100),
    )


async def _settle(world: World, processor: JobProcessor, job: ImageJob) -> bool:
    """Process one job as a worker does (started in the tracker first), within a guard."""
    world.tracker.start_job(job.time_us)
    with trio.fail_after(DEADLINE + 10):  # a guard: the deadline must end it well before
        return await processor.process(job)


async def _honest_post_still_acts(world: World, processor: JobProcessor) -> None:
    """The next post is decided and its label reaches Ozone: the service goes on."""
    job = world.post("coffee.jpg")
    assert await _settle(world, processor, job) is True
    assert job.uri in label_events(world.fake)
    assert world.tracker.pending == 0


HOSTILE_ENDPOINTS = [
    "https://☃.net",
    "https://" + "a" * 60_000 + ".com",
    42,
    ["https://pds.example.com"],
    {"uri": "https://pds.example.com"},
    "https://user:secret@pds.example.com",
    "https://pds.example.com:99999",
    "https://[::1",
    "javascript:alert(1)",
    "https://pds..example.com",
    "https://pds.example.com/\x00",
    "https://xn--zz.example.com",
    "",
]


@pytest.mark.parametrize("endpoint", HOSTILE_ENDPOINTS, ids=lambda e: repr(e)[:30])
async def test_hostile_did_document_is_a_bad_blob(world: World, endpoint: object) -> None:
    """A DID document naming a malformed PDS endpoint makes its blob a bad blob: the post is
    decided in one attempt, nothing crashes, nothing is dead-lettered."""
    did = fake_did(f"hostile {endpoint!r}"[:100])
    job = world.post("moon.jpg", did=did, host=False)  # not on the CDN: the PDS is looked up
    world.plc.add_document(
        did,
        {
            "id": did,
            "service": [
                {
                    "id": "#atproto_pds",
                    "type": "AtprotoPersonalDataServer",
                    "serviceEndpoint": endpoint,
                }
            ],
        },
    )
    processor = _processor(world)
    assert await _settle(world, processor, job) is True
    snap = world.metrics.snapshot()
    assert world.metrics.total("job_crashes") == 0
    assert world.metrics.total("jobs_dead_lettered") == 0
    assert snap["blob_errors[kind=BlobNotFound]"] == 1
    await _honest_post_still_acts(world, processor)


@pytest.mark.parametrize("mode", list(Garbage), ids=lambda m: m.name)
async def test_garbage_from_plc_cdn_and_pds_ends_one_job(
    world: World, garbage: GarbageServer, mode: Garbage
) -> None:
    """A PLC directory, CDN and PDS answering garbage fail the job's attempts; the job is
    dead-lettered with the error (a well-formed 200 of junk is a bad image instead) and the next
    post (honest peers) is decided."""
    garbage.mode = mode
    did = fake_did(f"garbage {mode.name}")
    job = world.post("moon.jpg", did=did, host=False)
    world.plc.add(did, garbage.url)  # the PDS is the garbage server too
    processor = _processor(world)
    processor.fetcher = _fetcher(world, cdn_url=garbage.url, plc_url=garbage.url)
    decided = await _settle(world, processor, job)
    if mode is Garbage.NOT_JSON:  # the CDN's answer is a complete body: a bad image
        assert decided is True
        assert world.metrics.snapshot()["blob_errors[kind=UnsupportedImage]"] == 1
    else:
        assert decided is False
        [letter] = world.dead_letters()
        assert letter["job"]["rkey"] == job.rkey and "PDS lookup" in letter["error"]
    assert world.metrics.total("job_crashes") == 0
    assert world.tracker.pending == 0
    assert garbage.requests >= (1 if mode is Garbage.NOT_JSON else 2)  # CDN, then PLC
    processor.fetcher = _fetcher(world)
    await _honest_post_still_acts(world, processor)


@pytest.mark.parametrize("mode", list(Garbage), ids=lambda m: m.name)
async def test_garbage_from_ozone_ends_one_job(
    world: World, garbage: GarbageServer, mode: Garbage
) -> None:
    """An Ozone answering garbage to createSession/emitEvent fails the matching post's
    attempts and it is dead-lettered; with Ozone healthy again the next post acts."""
    garbage.mode = mode
    job = world.post("coffee.jpg")
    processor = _processor(world)
    honest_ozone = processor.actions.ozone
    processor.actions.ozone = OzoneClient(
        world.http,
        pds_url=garbage.url,
        handle=world.fake.handle,
        password=world.fake.password,
        labeler_did=world.fake.labeler_did,
        breaker=CircuitBreaker("ozone", failure_threshold=100),
        metrics=world.metrics,
        backoff_initial=0.01,
        request_timeout=5.0,
    )
    assert await _settle(world, processor, job) is False
    [letter] = world.dead_letters()
    assert letter["job"]["rkey"] == job.rkey
    assert world.tracker.pending == 0
    processor.actions.ozone = honest_ozone
    await _honest_post_still_acts(world, processor)


@pytest.mark.parametrize("fault", ["out_of_memory", "read_only"])
async def test_redis_refusing_writes_loses_no_cursor_time(
    world: World, redis_proc: RedisProcess, fault: str, log_lines: list[str]
) -> None:
    """Redis refusing every write (OOM, READONLY) fails the claim and then the dead-letter
    write: the job ends at the deadline with its letter logged in full and counted, the cursor
    moves on, and once Redis takes writes again the next post acts."""
    job = world.post("coffee.jpg")
    processor = _processor(world)
    started = trio.current_time()
    with getattr(redis_proc, fault)():
        assert await _settle(world, processor, job) is False
    assert trio.current_time() - started < DEADLINE + 1.0  # the deadline, plus thread slack
    assert world.tracker.pending == 0
    assert world.metrics.total("dead_letters_lost") == 1
    assert world.metrics.total("jobs_dead_lettered") == 0
    [lost] = [line for line in log_lines if "dead letter LOST" in line]
    assert lost.startswith("CRITICAL") and job.rkey in lost and job.cid in lost
    assert world.fake.events == []
    await _honest_post_still_acts(world, processor)


async def test_hung_source_ends_at_the_deadline(world: World) -> None:
    """A CDN and PDS that never answer (client timeouts infinite) hold the job only until
    JOB_DEADLINE_SECS: it is dead-lettered in time, counted, and the cursor moves on."""
    world.host.hang = True
    job = world.post("coffee.jpg")
    processor = _processor(world)
    started = trio.current_time()
    assert await _settle(world, processor, job) is False
    assert trio.current_time() - started < DEADLINE + 0.5
    [letter] = world.dead_letters()
    assert letter["error"] == "fetch: job deadline of 3 s passed"
    assert world.metrics.total("jobs_timed_out") == 1
    assert world.tracker.pending == 0
    world.host.hang = False
    await _honest_post_still_acts(world, processor)


async def test_unexpected_error_in_the_hash_stage_is_contained(
    world: World, log_lines: list[str]
) -> None:
    """A hash pool that refuses work (closed under the job: HashPoolClosed, not an image
    error) ends the job at the boundary: logged once with its traceback, counted by stage and
    kind, dead-lettered; the cursor moves on."""
    job = world.post("coffee.jpg")
    processor = _processor(world)
    processor.hasher.close()
    assert await _settle(world, processor, job) is False
    snap = world.metrics.snapshot()
    assert snap["job_crashes[kind=HashPoolClosed,stage=hash]"] == 1
    [letter] = world.dead_letters()
    assert letter["error"].startswith("hash: HashPoolClosed: ")
    crash_lines = [line for line in log_lines if "unexpected HashPoolClosed" in line]
    assert len(crash_lines) == 1 and "Traceback" in crash_lines[0]
    assert world.tracker.pending == 0


async def test_redis_down_holds_a_job_only_until_its_deadline(
    world: World, redis_proc: RedisProcess, log_lines: list[str]
) -> None:
    """With Redis stopped, a matching post waits for it in the claim (until_healthy) only
    until JOB_DEADLINE_SECS: the dead letter cannot be stored either, so it is logged in full
    and counted, and the cursor moves on; with Redis back the next post acts."""
    job = world.post("coffee.jpg")
    processor = _processor(world)
    await trio.to_thread.run_sync(redis_proc.stop)
    started = trio.current_time()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_health_monitor(
                    world.store, interval=0.05, max_backoff=0.05, task_status=task_status
                )
            )
            assert await _settle(world, processor, job) is False
            elapsed = trio.current_time() - started
            await trio.to_thread.run_sync(redis_proc.start)
            await world.store.wait_healthy()
            await _honest_post_still_acts(world, processor)
            nursery.cancel_scope.cancel()
    finally:
        if redis_proc.process is None:
            redis_proc.start()
    assert DEADLINE - 0.5 < elapsed < DEADLINE + 1.5  # held to the deadline, not forever
    assert world.metrics.total("dead_letters_lost") == 1
    assert any("dead letter LOST" in line and job.rkey in line for line in log_lines)
