"""Gapless Jetstream failover (issue 9, finding 3): every fake Jetstream URL has its own clock.

The measured loss: the primary dies after 120 events, the fallback's clock is 2.5 s behind.
Resuming the fallback at the primary's newest ``time_us`` (the old reader) skips the 2.5 s the
fallback stamps earlier. The reader now rewinds every reconnect and drops replays by identity.
Autojump clock: backoff, failover and failback times are exact.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from phash_trio.firehose.cursor import CursorTracker
from phash_trio.firehose.reader import ReaderConfig, run_reader
from phash_trio.pipeline.jobs import ImageJob
from phash_trio.runtime.metrics import Metrics
from phash_trio.testing.jetstream_replay import (
    ReplayServer,
    fake_cid,
    fake_did,
    identity_event,
    make_post,
    run_replay_server,
)

T0 = 1_764_000_000_000_000
STEP = 100_000  # one event every 100 ms
DID = fake_did("failover")
SKEW = 2_500_000


def posts(n: int) -> list[dict[str, Any]]:
    """``n`` image posts 100 ms apart, with an identity event after every tenth."""
    events: list[dict[str, Any]] = []
    for i in range(n):
        events.append(make_post(DID, f"p{i:04d}", T0 + i * STEP, image_cids=[fake_cid(f"i{i}")]))
        if i % 10 == 9:
            events.append(identity_event(fake_did(f"who{i}"), T0 + i * STEP + 1))
    return events


async def serve(nursery: trio.Nursery, events: list[dict[str, Any]], **kw: Any) -> ReplayServer:
    server: ReplayServer = await nursery.start(partial(run_replay_server, events, **kw))
    return server


class Consumer:
    """A reader on a channel, and a worker that finishes each job at once."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.tracker = CursorTracker()
        self.send, self.receive = trio.open_memory_channel[ImageJob](1000)
        self.jobs: list[ImageJob] = []

    def reader(self, *urls: str, **kw: Any) -> Any:
        config = ReaderConfig(urls=urls, **kw)
        return partial(run_reader, config, self.send, self.tracker, self.metrics, start_cursor=None)

    async def take(self, n: int, *, finish: bool = True) -> None:
        for _ in range(n):
            job = await self.receive.receive()
            self.jobs.append(job)
            if finish:
                self.tracker.finish_job(job.time_us)

    def rkeys(self) -> list[str]:
        return [job.rkey for job in self.jobs]


async def test_dead_primary_and_slow_fallback_clock_lose_nothing(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Primary dies after 120 events; the fallback's clock is 2.5 s behind: every one of the
    240 image posts arrives exactly once (the old reader lost the 2.5 s window)."""
    events = posts(240)
    primary = await serve(nursery, events)
    fallback = await serve(nursery, events, clock_offset_us=-SKEW)
    primary.drop_after(120)
    consumer = Consumer()
    await nursery.start(consumer.reader(primary.url, fallback.url))
    primary.reject_next(10**6)  # after the drop it is dead for good
    with trio.fail_after(600):
        await consumer.take(240)
        await trio.sleep(30)
    expected = [f"p{i:04d}" for i in range(240)]
    assert sorted(consumer.rkeys()) == expected
    assert consumer.receive.statistics().current_buffer_used == 0  # no duplicates behind
    assert consumer.metrics.snapshot()["jetstream_failovers[to=fallback]"] == 1
    assert consumer.metrics.total("jetstream_replay_gaps") == 0
    # Nothing pending; the cursor is the newest event read on either clock.
    newest_primary = T0 + 108 * STEP + 1  # event 120 on the wire: the identity after p0108
    assert consumer.tracker.pending == 0
    assert consumer.tracker.safe_cursor() == max(T0 + 239 * STEP + 1 - SKEW, newest_primary)


async def test_replays_do_not_touch_pending_jobs(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A rewound reconnect re-sends a post still in flight: it is dropped, not started again,
    so finishing it once releases the cursor."""
    events = [
        make_post(DID, f"p{i}", T0 + i * 1000, image_cids=[fake_cid(f"x{i}")]) for i in range(5)
    ]
    server = await serve(nursery, events)
    server.drop_after(3)
    consumer = Consumer()
    await nursery.start(consumer.reader(server.url))
    with trio.fail_after(100):
        await consumer.take(3, finish=False)  # p0..p2 in flight across the reconnect
        await consumer.take(2, finish=False)
    assert consumer.rkeys() == ["p0", "p1", "p2", "p3", "p4"]
    assert consumer.metrics.snapshot()["events_skipped[reason=replayed]"] == 3
    assert consumer.tracker.pending == 5
    assert consumer.tracker.safe_cursor() == T0
    for job in consumer.jobs:
        consumer.tracker.finish_job(job.time_us)
    assert consumer.tracker.pending == 0
    assert consumer.tracker.safe_cursor() == T0 + 4000


async def test_stays_on_a_primary_that_works(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A primary that drops a connection but takes the next one keeps the reader: the
    fallback is never contacted."""
    events = posts(30)
    primary = await serve(nursery, events)
    fallback = await serve(nursery, events)
    primary.drop_after(10)
    consumer = Consumer()
    await nursery.start(consumer.reader(primary.url, fallback.url))
    with trio.fail_after(100):
        await consumer.take(30)
    assert fallback.requests == []
    assert primary.connections == 2
    assert primary.cursors[1] == T0 + 9 * STEP - 10_000_000  # 10th frame p0009, rewound 10 s


async def test_fails_over_after_three_failures_and_back_later(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Three refused connections (0, 5, 15 s) move the reader to the fallback (35 s); after
    failback_after on it the reader returns to the primary, rewound, without duplicates."""
    first, second = posts(20), posts(40)[20:]
    primary = await serve(nursery, first)
    fallback = await serve(nursery, first, clock_offset_us=SKEW)
    primary.reject_next(3)
    consumer = Consumer()
    await nursery.start(consumer.reader(primary.url, fallback.url, failback_after=100.0))
    with trio.fail_after(1000):
        await consumer.take(20)
        assert trio.current_time() == 35.0
        primary.append(second)
        fallback.append(second)  # shifted by its own clock
        await trio.sleep_until(140.0)
        await consumer.take(20)
        await trio.sleep(10)
    assert [r.at for r in primary.requests] == [0.0, 5.0, 15.0, 135.0]
    assert [r.at for r in fallback.requests] == [35.0]
    assert sorted(consumer.rkeys()) == [f"p{i:04d}" for i in range(40)]
    assert consumer.receive.statistics().current_buffer_used == 0
    snap = consumer.metrics.snapshot()
    assert (snap["jetstream_failovers[to=fallback]"], snap["jetstream_failovers[to=primary]"]) == (
        1,
        1,
    )


async def test_a_cursor_older_than_the_server_keeps_is_counted(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, log_lines: list[str]
) -> None:
    """A fallback that keeps only 1 s of events cannot replay back to where the reader
    resumes: the gap is logged and counted (the fake records what was missed)."""
    events = posts(100)
    primary = await serve(nursery, events)
    fallback = await serve(nursery, events, replay_window_us=1_000_000)
    primary.drop_after(30)
    consumer = Consumer()
    await nursery.start(consumer.reader(primary.url, fallback.url, failover_after=1))
    primary.reject_next(10**6)
    with trio.fail_after(100):
        await consumer.take(27)  # everything before the drop
        await trio.sleep(30)
    assert consumer.metrics.total("jetstream_replay_gaps") == 1
    [(asked, oldest)] = fallback.gaps
    assert asked == T0 + 27 * STEP - 10_000_000  # the newest read before the drop, rewound
    assert oldest == T0 + 99 * STEP + 1 - 1_000_000
    assert any("cannot replay back to" in line for line in log_lines)


@pytest.mark.parametrize(("capacity", "delivered"), [(5, 5), (4, 10)])
async def test_seen_events_are_bounded(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, capacity: int, delivered: int
) -> None:
    """The identity memory keeps only seen_capacity entries: when it holds every event the
    rewind brings back they are all dropped; one short, each replay evicts the next one's
    entry and all come through again (the bound is real, not a time cut-off)."""
    events = [
        make_post(DID, f"p{i}", T0 + i * 1000, image_cids=[fake_cid(f"b{i}")]) for i in range(5)
    ]
    server = await serve(nursery, events)
    server.drop_after(5)
    consumer = Consumer()
    await nursery.start(consumer.reader(server.url, seen_capacity=capacity))
    with trio.fail_after(100):
        await consumer.take(delivered)
        await trio.sleep(20)
    assert consumer.receive.statistics().current_buffer_used == 0
    assert consumer.metrics.total("events_skipped") == 10 - delivered
