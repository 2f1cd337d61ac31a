"""The pipeline reports every decision through its one hook: a real recorder on a real Redis
behind the real JobProcessor and Actions (fake Ozone, local blob host)."""

from __future__ import annotations

import attrs
import trio
from prometheus_client import CollectorRegistry
from test_pipeline import World
from test_pipeline import world as world_fixture  # noqa: F401 - the fixture, by this name

from phash_trio.state.decisions import Decision, DecisionLog
from phash_trio.state.recorder import DecisionMetrics, DecisionRecorder
from phash_trio.state.redisio import RedisThreads
from phash_trio.testing.redis_server import RedisProcess


async def _recorded(
    world: World, redis_proc: RedisProcess, run: object, **processor_args: object
) -> list[Decision]:
    redis = RedisThreads(redis_proc.url)
    log = DecisionLog(redis)
    recorder = DecisionRecorder(log, DecisionMetrics(CollectorRegistry()), cdn_url="https://cdn.x")
    processor = world.processor(decisions=recorder, **processor_args)
    processor.actions = attrs.evolve(processor.actions, decisions=recorder)
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        assert callable(run)
        await run(processor)
        await recorder.settled()
        nursery.cancel_scope.cancel()
    entries = await log.after("0-0", 1000)
    redis.close()
    return entries


async def test_match_actions_sent_then_claim_held(
    world_fixture: World,  # noqa: F811 - the imported fixture
    redis_proc: RedisProcess,
) -> None:
    """A matching post logs its match and each action sent; the same post again logs the
    match and each action skipped because its claim is held."""
    world = world_fixture
    job = world.post("spitfire.jpg")
    again = job  # the same post replayed (after a restart, say)

    async def run(processor: object) -> None:
        for j in (job, again):
            world.tracker.start_job(j.time_us)
            assert await processor.process(j)  # type: ignore[attr-defined]

    entries = await _recorded(world, redis_proc, run)
    kinds = [(d.kind, d.data.get("action"), d.data.get("reason")) for d in entries]
    assert kinds == [
        ("match", None, None),
        ("action_sent", "label_post", None),
        ("action_sent", "takedown_post", None),
        ("match", None, None),
        ("action_skipped", "label_post", "claim_held"),
        ("action_skipped", "takedown_post", "claim_held"),
    ]
    first = entries[0].data
    assert first["uri"] == job.uri and first["cid"] == job.blobs[0].cid
    assert first["rule"] == "example-spitfire" and isinstance(first["distance"], int)
    assert first["thumb"] == f"https://cdn.x/img/feed_thumbnail/plain/{job.did}/{first['cid']}@jpeg"


async def test_daily_cap_dry_run_bad_blob_and_dead_letter(
    world_fixture: World,  # noqa: F811 - the imported fixture
    redis_proc: RedisProcess,
) -> None:
    """Over the daily cap and in dry run the actions are logged as skipped with the reason;
    an unknown blob is a bad blob; a post whose blobs keep failing is a dead letter."""
    world = world_fixture
    capped = world.post("spitfire.jpg")
    dry = world.post("coffee.jpg")
    bad = world.post("coffee.jpg", host=False)

    async def run(processor: object) -> None:
        actions = processor.actions  # type: ignore[attr-defined]
        processor.actions = attrs.evolve(actions, default_daily_cap=0)  # type: ignore[attr-defined]
        world.tracker.start_job(capped.time_us)
        await processor.process(capped)  # type: ignore[attr-defined]
        processor.actions = attrs.evolve(actions, dry_run=True)  # type: ignore[attr-defined]
        world.tracker.start_job(dry.time_us)
        await processor.process(dry)  # type: ignore[attr-defined]
        world.tracker.start_job(bad.time_us)
        await processor.process(bad)  # type: ignore[attr-defined]
        world.host.fail_cdn = 500
        world.host.fail_pds = 503
        failing = world.post("spitfire.jpg")
        world.tracker.start_job(failing.time_us)
        assert not await processor.process(failing)  # type: ignore[attr-defined]

    entries = await _recorded(world, redis_proc, run, retry_attempts=0, cache=False)
    kinds = [(d.kind, d.data.get("reason")) for d in entries]
    assert kinds[:3] == [
        ("match", None),
        ("action_skipped", "daily_cap"),
        ("action_skipped", "daily_cap"),
    ]
    assert ("action_skipped", "dry_run") in kinds
    assert [d.kind for d in entries[-2:]] == ["bad_blob", "dead_letter"]
    letter = entries[-1].data
    assert (
        letter["attempts"] == 1
        and letter["error"].startswith("blob ")
        and len(letter["error"]) <= 300
    )
