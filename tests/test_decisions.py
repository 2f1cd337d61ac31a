"""The decision log on a real redis-server: append, read back, retention by time, photo index,
and the recorder hook's buffer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import trio
from prometheus_client import CollectorRegistry

from phash_trio.state.decisions import DecisionLog, parse_entry_id
from phash_trio.state.recorder import DecisionMetrics, DecisionRecorder
from phash_trio.state.redisio import RedisThreads
from phash_trio.testing.redis_server import RedisProcess


@pytest.fixture
def threads(redis_proc: RedisProcess) -> Iterator[RedisThreads]:
    r = RedisThreads(redis_proc.url, socket_timeout=1.0)
    yield r
    r.close()


async def test_append_and_read_back_in_order(threads: RedisThreads) -> None:
    """Entries come back in append order, with their kind and data, after any id."""
    log = DecisionLog(threads)
    ids = await log.append_many([("match", {"n": i, "cid": f"c{i % 2}"}) for i in range(5)])
    assert ids == sorted(ids, key=parse_entry_id)
    every = await log.after("0-0")
    assert [d.data["n"] for d in every] == [0, 1, 2, 3, 4]
    assert [d.data["n"] for d in await log.after(ids[2])] == [3, 4]
    assert [d.data["n"] for d in await log.latest(2, offset=1)] == [3, 2]
    assert [d.data["n"] for d in await log.for_photo("c1")] == [1, 3]
    assert await log.last_id() == ids[-1]
    assert not await log.trimmed_past(ids[0])


async def test_retention_trims_by_time_and_says_so(
    threads: RedisThreads, redis_proc: RedisProcess
) -> None:
    """Entries older than the retention go at the next append (by id time, not by count), and
    a reader resuming from a trimmed id is told it fell out of retention."""
    raw = redis.Redis.from_url(redis_proc.url, decode_responses=True)
    old = [raw.xadd("decisions", {"kind": "match", "data": "{}"}, id=f"{i}-1") for i in (1, 2, 3)]
    raw.close()
    log = DecisionLog(threads, retention_secs=3600)
    # Enough entries that approximate trimming can drop a whole node (100 entries).
    await log.append_many([("match", {"n": i}) for i in range(150)])
    remaining = await log.after("0-0", count=1000)
    assert all(parse_entry_id(d.id)[0] > 3 for d in remaining)
    assert len(remaining) == 150
    assert await log.trimmed_past(old[0])
    assert not await log.trimmed_past(remaining[0].id)


async def test_recorder_writes_everything_in_order_and_drops_when_full(
    threads: RedisThreads,
) -> None:
    """The writer task writes entries in emit order; a full buffer drops and counts."""
    metrics = DecisionMetrics(CollectorRegistry())
    log = DecisionLog(threads)
    recorder = DecisionRecorder(log, metrics, buffer=10)
    for i in range(15):  # no writer yet: 10 fit, 5 are dropped
        recorder.emit("bad_blob", {"n": i})
    assert recorder.dropped == 5
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        await recorder.settled()
        for i in range(10, 20):
            recorder.emit("bad_blob", {"n": i})
        await recorder.settled()
        nursery.cancel_scope.cancel()
    assert [d.data["n"] for d in await log.after("0-0")] == list(range(20))
