"""run_reader against the in-process Jetstream replay server (real websockets on 127.0.0.1)."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from phash_trio.config import Settings
from phash_trio.firehose.cursor import CursorTracker
from phash_trio.firehose.reader import ReaderConfig, ReaderConfigError, ReaderState, run_reader
from phash_trio.firehose.reader import subscribe_url as build_url
from phash_trio.pipeline.jobs import ImageJob
from phash_trio.runtime.metrics import Metrics
from phash_trio.testing.jetstream_replay import (
    CaptureError,
    ReplayServer,
    fake_cid,
    fake_did,
    identity_event,
    load_capture,
    make_event,
    make_post,
    run_replay_server,
)

T0 = 1_725_000_000_000_000
#: The default rewind of every reconnect, in microseconds.
REWIND = 10_000_000
DID = fake_did("reader")
MIB = 1024 * 1024


def image_post(i: int, *, time_us: int | None = None, text: str = "") -> dict[str, Any]:
    """Image post number ``i`` (rkey ``p{i}``), at ``T0 + i*1000`` unless told."""
    when = T0 + i * 1000 if time_us is None else time_us
    return make_post(DID, f"p{i}", when, image_cids=[fake_cid(f"img{i}")], text=text)


@attrs.define
class Rig:
    """The reader's collaborators, as the service wires them."""

    channel_size: int = 100
    metrics: Metrics = attrs.field(factory=Metrics)
    tracker: CursorTracker = attrs.field(factory=CursorTracker)
    send: trio.MemorySendChannel[ImageJob] = attrs.field(init=False)
    receive: trio.MemoryReceiveChannel[ImageJob] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[ImageJob](self.channel_size)

    def reader(self, *urls: str, start_cursor: int | None = None, **kw: Any) -> Any:
        config = ReaderConfig(urls=urls, **kw)
        return partial(
            run_reader, config, self.send, self.tracker, self.metrics, start_cursor=start_cursor
        )

    async def jobs(self, n: int) -> list[ImageJob]:
        return [await self.receive.receive() for _ in range(n)]

    def count(self, name: str) -> float:
        return self.metrics.total(name)


async def serve(nursery: trio.Nursery, events: Any = (), **kw: Any) -> ReplayServer:
    server: ReplayServer = await nursery.start(partial(run_replay_server, events, **kw))
    return server


async def until(predicate: Callable[[], bool]) -> None:
    """Let the other tasks run until a condition the test cannot await directly holds."""
    while not predicate():
        await trio.testing.wait_all_tasks_blocked(cushion=0.001)


def rkeys(jobs: list[ImageJob]) -> list[str]:
    return [job.rkey for job in jobs]


async def test_image_posts_arrive_as_jobs_in_order(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Every image post of a capture arrives once, in order; other events are counted as skipped."""
    events = [
        image_post(1),
        identity_event(DID, T0 + 1500),
        make_event(DID, T0 + 1600, operation="delete", rkey="old"),
        make_event(DID, T0 + 1700, collection="app.bsky.feed.like"),  # filtered by the server
        image_post(2),
        make_post(DID, "noimg", T0 + 2500, text="hello"),
        image_post(3),
    ]
    capture = tmp_path / "capture.jsonl"
    capture.write_text("\n".join(json.dumps(e) for e in events) + "\n\n")
    with trio.fail_after(10):
        server = await serve(nursery, load_capture(capture))
        rig = Rig()
        state: ReaderState = await nursery.start(rig.reader(server.url))
        assert state.connected and state.url == server.url
        jobs = await rig.jobs(3)
        await until(lambda: rig.count("jobs_received") == 3)
    assert rkeys(jobs) == ["p1", "p2", "p3"]
    assert [job.time_us for job in jobs] == [T0 + 1000, T0 + 2000, T0 + 3000]
    assert all(job.read_at is not None for job in jobs)
    assert rig.metrics.snapshot()["events_skipped[reason=no_embed]"] == 1
    assert rig.count("events_skipped") == 3 and rig.count("events_received") == 6
    assert rig.count("jobs_received") == 3 and rig.count("jetstream_connected") == 1
    assert state.last_message_at is not None and state.newest_time_us == T0 + 3000
    assert rig.tracker.safe_cursor() == T0 + 1000  # nothing finished yet
    for job in jobs:
        rig.tracker.finish_job(job.time_us)
    assert rig.tracker.safe_cursor() == T0 + 3000


async def test_connect_sends_cursor_collections_and_size(nursery: trio.Nursery) -> None:
    """The first connection asks for the saved cursor, posts only, and an 8 MiB frame limit."""
    with trio.fail_after(10):
        server = await serve(nursery, [image_post(i) for i in range(1, 6)])
        rig = Rig()
        await nursery.start(rig.reader(server.url, start_cursor=T0 + 3000))
        jobs = await rig.jobs(3)
    assert rkeys(jobs) == ["p3", "p4", "p5"]
    (record,) = server.requests
    assert (record.cursor, record.wanted, record.max_message_size) == (
        T0 + 3000,
        ("app.bsky.feed.post",),
        8 * MIB,
    )


async def test_reconnect_after_drop_has_no_duplicates_or_gaps(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A dropped connection resumes the rewind before the newest time_us; the replayed events
    are dropped by identity (p4 shares p3's time_us and still arrives)."""
    events = [
        image_post(1),
        image_post(2),
        image_post(3),
        image_post(4, time_us=T0 + 3000),  # same time_us as p3, sent after the drop
        image_post(5),
        image_post(6),
    ]
    with trio.fail_after(100):
        server = await serve(nursery, events)
        server.drop_after(3)
        rig = Rig()
        await nursery.start(rig.reader(server.url))
        jobs = await rig.jobs(6)
        await trio.sleep(1)
    assert rkeys(jobs) == ["p1", "p2", "p3", "p4", "p5", "p6"]
    assert server.cursors == [None, T0 + 3000 - REWIND]
    assert [r.at for r in server.requests] == [0.0, 5.0]
    assert rig.receive.statistics().current_buffer_used == 0
    assert rig.metrics.snapshot()["events_skipped[reason=replayed]"] == 3
    assert rig.count("jetstream_reconnects") == 1


async def test_garbage_frames_are_counted_and_skipped(nursery: trio.Nursery) -> None:
    """Garbage is counted and skipped; a malformed frame with a time_us still moves the cursor."""
    broken = image_post(9)
    del broken["commit"]["rkey"]
    with trio.fail_after(10):
        server = await serve(nursery, [image_post(1), image_post(2), image_post(3)])
        server.send_garbage(["{nope", b"\xff\xfe", "[]"], at=1)
        server.send_garbage([json.dumps(broken)])
        rig = Rig()
        await nursery.start(rig.reader(server.url))
        jobs = await rig.jobs(3)
        await until(lambda: rig.count("events_received") == 7)
    assert rkeys(jobs) == ["p1", "p2", "p3"]
    assert rig.count("frames_malformed") == 4
    for job in jobs:
        rig.tracker.finish_job(job.time_us)
    assert rig.tracker.safe_cursor() == T0 + 9000


async def test_live_events_arrive_without_reconnect(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Events appended while the reader idles arrive on the same connection, paced as served."""
    with trio.fail_after(100):
        server = await serve(nursery, [image_post(1)], pace=2.0)
        rig = Rig()
        await nursery.start(rig.reader(server.url))
        first = await rig.receive.receive()
        arrivals = [(first.rkey, trio.current_time())]
        await server.wait_idle()
        await trio.sleep_until(50.0)
        server.append([image_post(2), image_post(3)])
        for _ in range(2):
            job = await rig.receive.receive()
            arrivals.append((job.rkey, trio.current_time()))
    assert arrivals == [("p1", 0.0), ("p2", 50.0), ("p3", 52.0)]
    assert server.connections == 1


async def test_server_closing_after_each_replay_doubles_backoff(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Short connections closed by the server back off 5 then 10 s and re-deliver nothing."""
    with trio.fail_after(100):
        server = await serve(nursery, [image_post(1), image_post(2)], close_when_done=True)
        rig = Rig()
        await nursery.start(rig.reader(server.url))
        jobs = await rig.jobs(2)
        await trio.sleep_until(20.0)
    assert rkeys(jobs) == ["p1", "p2"]
    assert [r.at for r in server.requests] == [0.0, 5.0, 15.0]
    assert server.cursors == [None, T0 + 2000 - REWIND, T0 + 2000 - REWIND]
    assert rig.receive.statistics().current_buffer_used == 0


async def test_rotation_and_backoff_timing(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """With failover_after=1, failed attempts alternate between URLs after 5, 10, 20 ...
    seconds, capped at the maximum."""
    with trio.fail_after(1000):
        a = await serve(nursery)
        b = await serve(nursery)
        a.reject_next(100)
        b.reject_next(100)
        rig = Rig()
        state = ReaderState()
        nursery.start_soon(
            partial(rig.reader(a.url, b.url, backoff_max=300.0, failover_after=1), state=state)
        )
        await trio.sleep(700)
    assert [r.at for r in a.requests] == [0.0, 15.0, 75.0, 315.0]
    assert [r.at for r in b.requests] == [5.0, 35.0, 155.0, 615.0]
    assert rig.count("jetstream_reconnects") == 8
    assert not state.connected and state.connections == 0
    assert rig.count("jetstream_connected") == 0


async def test_fallback_after_dead_primary_and_started_only_when_connected(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """With the primary refusing connections (failover_after=1), start-up completes on the
    fallback after 5 s."""
    with trio.socket.socket() as dead:
        await dead.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        dead_url = f"ws://127.0.0.1:{dead.getsockname()[1]}/subscribe"
        with trio.fail_after(100):
            server = await serve(nursery, [image_post(1)])
            rig = Rig()
            state: ReaderState = await nursery.start(
                rig.reader(dead_url, server.url, failover_after=1)
            )
            assert trio.current_time() == 5.0
            assert state.url == server.url
            assert rkeys(await rig.jobs(1)) == ["p1"]


async def test_backoff_resets_after_a_healthy_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A connection up for 60 s resets the backoff to 5 s; a shorter one keeps doubling."""
    with trio.fail_after(1000):
        server = await serve(nursery)
        server.reject_next(2)
        rig = Rig()
        await nursery.start(rig.reader(server.url))
        assert trio.current_time() == 15.0  # rejected at 0 and 5, connected at 15
        await trio.sleep_until(80.0)  # up for 65 s: healthy
        server.close_all()
        await trio.sleep_until(100.0)  # reconnected at 85, up for 15 s: not healthy
        server.close_all()
        await trio.sleep_until(200.0)
    assert [r.at for r in server.requests] == [0.0, 5.0, 15.0, 85.0, 110.0]
    assert server.connections == 3


async def test_idle_connection_is_replaced(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """No message for idle_timeout seconds reconnects (rewound), without duplicates."""
    with trio.fail_after(1000):
        server = await serve(nursery, [image_post(1), image_post(2)])
        rig = Rig()
        await nursery.start(rig.reader(server.url))
        assert rkeys(await rig.jobs(2)) == ["p1", "p2"]
        await trio.sleep_until(130.0)
    assert [r.at for r in server.requests] == [0.0, 125.0]
    assert server.cursors == [None, T0 + 2000 - REWIND]
    assert rig.count("jetstream_reconnects") == 1
    assert rig.metrics.snapshot()["events_skipped[reason=replayed]"] == 2
    assert rig.receive.statistics().current_buffer_used == 0


async def test_full_channel_bounds_what_is_read(nursery: trio.Nursery) -> None:
    """With a channel of 2 and no worker, the reader reads exactly 3 jobs and waits."""
    with trio.fail_after(10):
        server = await serve(nursery, [image_post(i) for i in range(1, 11)])
        rig = Rig(channel_size=2)
        await nursery.start(rig.reader(server.url))
        await server.wait_idle()
        await until(lambda: rig.tracker.pending == 3)
        await trio.testing.wait_all_tasks_blocked()
    assert rig.count("events_received") == 3
    assert rig.count("jobs_received") == 2
    assert rig.tracker.pending == 3
    assert rig.receive.statistics().current_buffer_used == 2


async def test_blocked_channel_does_not_trigger_idle_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Waiting 500 s on a full channel is backpressure, not idleness: no reconnect, nothing lost."""
    with trio.fail_after(1000):
        server = await serve(nursery, [image_post(i) for i in range(1, 6)])
        rig = Rig(channel_size=1)
        await nursery.start(rig.reader(server.url, idle_timeout=120.0))
        await trio.sleep(500)
        assert rig.count("jobs_received") == 1 and rig.tracker.pending == 2
        jobs = await rig.jobs(5)
    assert rkeys(jobs) == ["p1", "p2", "p3", "p4", "p5"]
    assert server.connections == 1 and rig.count("jetstream_reconnects") == 0


async def test_message_larger_than_one_mib_is_accepted(nursery: trio.Nursery) -> None:
    """A 3 MiB frame (over trio-websocket's 1 MiB default) is read as a normal job."""
    big = image_post(1, text="z" * (3 * MIB))
    assert len(json.dumps(big)) > 3 * MIB
    with trio.fail_after(10):
        server = await serve(nursery, [big, image_post(2)])
        rig = Rig()
        await nursery.start(rig.reader(server.url))
        jobs = await rig.jobs(2)
    assert rkeys(jobs) == ["p1", "p2"]
    assert server.connections == 1


async def test_cancelled_send_leaves_job_pending_and_closes_channel(
    nursery: trio.Nursery,
) -> None:
    """Cancelling the reader mid-send keeps that job pending, so the cursor cannot pass it."""
    with trio.fail_after(10):
        server = await serve(nursery, [image_post(1), image_post(2), image_post(3)])
        rig = Rig(channel_size=1)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                await inner.start(rig.reader(server.url))
                await until(lambda: rig.tracker.pending == 2)
                scope.cancel()
        assert (await rig.receive.receive()).rkey == "p1"
        with pytest.raises(trio.EndOfChannel):
            await rig.receive.receive()
    rig.tracker.finish_job(T0 + 1000)
    assert rig.tracker.pending == 1
    assert rig.tracker.safe_cursor() == T0 + 2000  # p2 was never delivered


async def test_reader_stops_when_every_worker_is_gone(nursery: trio.Nursery) -> None:
    """If the receive side is closed, the reader returns instead of crashing the pipeline."""
    with trio.fail_after(10):
        server = await serve(nursery, [image_post(1)])
        rig = Rig()
        await rig.receive.aclose()
        async with trio.open_nursery() as inner:
            await inner.start(rig.reader(server.url))
    assert rig.tracker.pending == 1 and rig.count("jobs_received") == 0


def test_subscribe_url_keeps_existing_parameters() -> None:
    """Jetstream parameters are added to (and replace ours in) the configured URL's query."""
    url = build_url(
        "wss://js.example/subscribe?compress=false&cursor=1",
        cursor=42,
        wanted_collections=("app.bsky.feed.post",),
        max_message_size=MIB,
    )
    assert url == (
        "wss://js.example/subscribe?compress=false&wantedCollections=app.bsky.feed.post"
        "&maxMessageSizeBytes=1048576&cursor=42"
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"urls": ()}, "empty"),
        ({"urls": ("http://js.example/subscribe",)}, "ws://"),
        ({"urls": ("wss:///subscribe",)}, "ws://"),
        ({"urls": ("ws://h/s",), "idle_timeout": 0}, "idle_timeout"),
        ({"urls": "ws://h/s"}, "the string"),
    ],
)
def test_reader_config_is_validated(kwargs: dict[str, Any], match: str) -> None:
    """An empty URL list, a non-websocket URL or a zero timeout is refused clearly."""
    with pytest.raises(ReaderConfigError, match=match):
        ReaderConfig(**kwargs)


def test_reader_config_from_settings() -> None:
    """The primary Jetstream URL comes first, then the fallbacks, without duplicates."""
    settings = Settings(
        jetstream_url="wss://a.example/subscribe",
        jetstream_fallback_urls=("wss://b.example/subscribe", "wss://a.example/subscribe"),
    )
    config = ReaderConfig.from_settings(settings)
    assert config.urls == ("wss://a.example/subscribe", "wss://b.example/subscribe")
    assert (config.backoff_initial, config.backoff_max, config.max_message_size) == (
        5.0,
        300.0,
        8 * MIB,
    )


def test_load_capture_names_the_bad_line(tmp_path: Path) -> None:
    """A capture line that is not a JSON object is an error naming file and line."""
    capture = tmp_path / "bad.jsonl"
    capture.write_text('{"time_us": 1}\n\n[1]\n')
    with pytest.raises(CaptureError, match=r"bad\.jsonl:3: not a JSON object"):
        load_capture(capture)
