"""End to end: ``phash-trio run`` as a subprocess against the local network and a real Redis.

Each test starts the fakes (Jetstream replay, CDN, PDS, PLC, Ozone) in its own nursery and the
real service against them, then checks what the service did from its DEBUG ``decided`` lines,
its /metrics, its cursor file and what the fakes saw. Real time throughout (real subprocesses);
the timeouts are failure guards, not expectations.
"""

from __future__ import annotations

import json
import signal
import socket
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_helpers import (
    GUARD,
    by_label,
    decided,
    delivered,
    finished,
    harness,
    host_blobs,
    post_blobs,
    post_times,
    total,
    vm_rss_mb,
)

from phash_trio.firehose.events import ParsedEvent, parse_event
from phash_trio.testing.blobhost import cid_for
from phash_trio.testing.capture import (
    DEMO_CAPTURE,
    CaptureBuilder,
    build_demo_capture,
    demo_images,
    load_jsonl,
)
from phash_trio.testing.localnet import ServiceProcess
from phash_trio.testing.redis_server import RedisProcess, free_port

pytestmark = pytest.mark.e2e

PROCESSED = "phash_jobs_processed_total"
RECEIVED = "phash_events_received_total"
MALFORMED = "phash_frames_malformed_total"
#: Seconds a drained service may take to exit on top of its grace period (scheduling slack).
EXIT_SLACK = 5.0


def _capture(seed: int, size: int) -> list[dict[str, Any]]:
    """A fresh demo-like capture (every event kind, bad blobs at the end)."""
    return build_demo_capture(demo_images(), seed=seed, size=size)


def _from(events: list[dict[str, Any]], cursor: int) -> tuple[int, int]:
    """(events, image posts) a reader resuming at ``cursor`` gets."""
    events_left = [e for e in delivered(events) if e["time_us"] >= cursor]
    posts_left = [t for t in post_times(events).values() if t >= cursor]
    return len(events_left), len(posts_left)


def _parse(event: Mapping[str, Any]) -> ParsedEvent:
    return parse_event(json.dumps(event))


def _redis_connections(redis: RedisProcess) -> int:
    """``total_connections_received`` of the redis-server (this query counts as one)."""
    with socket.create_connection(("127.0.0.1", redis.port), timeout=2) as sock:
        sock.sendall(b"INFO stats\r\n")
        data = b""
        while b"total_connections_received:" not in data or not data.endswith(b"\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    for line in data.decode().splitlines():
        if line.startswith("total_connections_received:"):
            return int(line.split(":")[1])
    raise AssertionError("no total_connections_received in INFO stats")


# --------------------------------------------------------------------------------------------
# 1. The bundled capture


async def test_demo_capture_every_image_post_decided(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """Every image post of the bundled capture is decided once; events, skips, bad blobs counted."""
    events = load_jsonl(DEMO_CAPTURE)
    posts = post_times(events)
    sent = delivered(events)
    images = demo_images()
    bad_kind = {
        cid_for(images["truncated.jpg"]): "CorruptImage",
        cid_for(images["not-an-image.jpg"]): "UnsupportedImage",
    }
    expected_errors = Counter(
        bad_kind[cid] for cids in post_blobs(events).values() for cid in cids if cid in bad_kind
    )
    expected_skips = Counter(p.skip_reason for p in map(_parse, sent) if p.job is None)
    async with harness(redis_proc.url, tmp_path, events) as h:
        service = await h.start()
        await service.wait_for(h.client, finished(len(sent), len(posts)), within=GUARD)
        metrics = await h.metrics(service)
        code = await h.stop(service)
    assert code == 0, service.log_tail()
    assert sorted(decided(service.log_path)) == sorted(posts)
    assert total(metrics, RECEIVED) == len(sent)
    assert total(metrics, PROCESSED) == len(posts)
    assert total(metrics, "phash_jobs_dead_lettered_total") == 0
    assert total(metrics, MALFORMED) == 0
    assert by_label(metrics, "phash_events_skipped_total", "reason") == dict(expected_skips)
    assert by_label(metrics, "phash_blob_errors_total", "kind") == dict(expected_errors)
    assert set(expected_errors) == {"CorruptImage", "UnsupportedImage"}
    # Nothing pending at a clean stop: the cursor is the newest event read.
    assert h.saved_cursor() == max(e["time_us"] for e in sent)


# --------------------------------------------------------------------------------------------
# 2-3. Stops mid-stream and restarts


async def test_sigterm_mid_stream_drains_then_restart_resumes(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """SIGTERM mid-stream drains within the grace period; the restart resumes at the cursor."""
    events = _capture(seed=21, size=120)
    posts = post_times(events)
    grace = 5.0
    extra = {
        "CACHE_ENABLED": "false",
        "CHANNEL_SIZE": "10",
        "SHUTDOWN_GRACE_SECS": str(grace),
    }
    async with harness(redis_proc.url, tmp_path, events, pace=0.03) as h:
        h.net.cdn.delay = h.net.pds.delay = 0.05
        first = await h.start(**extra)
        await first.wait_for(h.client, lambda m: total(m, PROCESSED) >= 10, within=GUARD)
        assert await h.stop(first, within=grace + EXIT_SLACK) == 0
        cursor = h.saved_cursor()
        run1 = decided(first.log_path)
        undecided = set(posts) - set(run1)
        assert undecided, "the first run saw the whole stream: not mid-stream"
        assert all(posts[uri] >= cursor for uri in undecided)

        second = await h.start(**extra)
        await second.wait_for(h.client, finished(*_from(events, cursor)), within=GUARD)
        assert await h.stop(second) == 0
    log1 = first.log_path.read_text()
    assert "draining" in log1 and "grace period over" not in log1
    assert h.net.replay.cursors == [None, cursor]
    run2 = decided(second.log_path)
    assert set(run1) | set(run2) == set(posts)
    assert len(run1) == len(set(run1)) and len(run2) == len(set(run2))
    # After a clean drain only the event at the cursor itself can come back.
    reprocessed = set(run1) & set(run2)
    assert len(reprocessed) <= 1
    assert all(posts[uri] == cursor for uri in reprocessed)


async def test_sigterm_grace_expires_cursor_stays_at_oldest_unfinished(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """Fetches that hang past the grace period stay pending: exit 0, cursor at the oldest one."""
    events = _capture(seed=22, size=80)
    posts = post_times(events)
    grace = 1.0
    extra = {
        "CACHE_ENABLED": "false",
        "CHANNEL_SIZE": "10",
        "SHUTDOWN_GRACE_SECS": str(grace),
    }
    async with harness(redis_proc.url, tmp_path, events, pace=0.02) as h:
        first = await h.start(**extra)
        await first.wait_for(h.client, lambda m: total(m, PROCESSED) >= 5, within=GUARD)
        h.net.cdn.hang = h.net.pds.hang = True
        # Every worker is stuck on a hung fetch and more posts wait behind them.
        await first.wait_for(
            h.client,
            lambda m: total(m, "phash_jobs_received_total") - total(m, PROCESSED) >= 5,
            within=GUARD,
        )
        assert await h.stop(first, within=grace + EXIT_SLACK) == 0
        cursor = h.saved_cursor()
        run1 = decided(first.log_path)
        undecided = set(posts) - set(run1)
        # Read posts are decided or pending, unread ones are newer: the oldest undecided post
        # is the oldest pending one, and the cursor must sit exactly on it.
        assert cursor == min(posts[uri] for uri in undecided)

        h.net.cdn.hang = h.net.pds.hang = False
        second = await h.start(**extra)
        await second.wait_for(h.client, finished(*_from(events, cursor)), within=GUARD)
        assert await h.stop(second) == 0
    assert "grace period over" in first.log_path.read_text()
    assert h.net.replay.cursors == [None, cursor]
    assert set(run1) | set(decided(second.log_path)) == set(posts)


async def test_sigkill_mid_stream_then_restart_skips_nothing(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """After a SIGKILL mid-stream the restart resumes at the last checkpoint; no post is skipped."""
    events = _capture(seed=23, size=100)
    posts = post_times(events)
    extra = {"CACHE_ENABLED": "false", "CHANNEL_SIZE": "10"}
    async with harness(redis_proc.url, tmp_path, events, pace=0.03) as h:
        h.net.cdn.delay = 0.05
        first = await h.start(**extra)
        await first.wait_for(
            h.client,
            lambda m: total(m, PROCESSED) >= 10 and h.cursor_file.exists(),
            within=GUARD,
        )
        assert await h.stop(first, signal.SIGKILL) == -signal.SIGKILL
        cursor = h.saved_cursor()
        run1 = decided(first.log_path)
        undecided = set(posts) - set(run1)
        assert undecided, "the first run saw the whole stream: not mid-stream"
        assert all(posts[uri] >= cursor for uri in undecided)

        second = await h.start(**extra)
        await second.wait_for(h.client, finished(*_from(events, cursor)), within=GUARD)
        assert await h.stop(second) == 0
    assert h.net.replay.cursors == [None, cursor]
    run2 = decided(second.log_path)
    assert set(run1) | set(run2) == set(posts)
    assert all(posts[uri] >= cursor for uri in run2)


# --------------------------------------------------------------------------------------------
# 4. A flaky stream

GARBAGE: list[str | bytes] = [
    "this is not json",
    "[1, 2, 3]",
    b"\xff\xfe\x00 not utf-8",
    '{"kind": "commit"}',
    '{"time_us": "soon", "kind": "commit", "did": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"}',
]


async def test_dropped_connection_and_garbage_frames(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """A dropped connection is resumed without duplicates; garbage frames are counted, not fatal."""
    events = _capture(seed=24, size=80)
    posts = post_times(events)
    sent = delivered(events)
    at, drop = 10, 40
    # What the first connection sends: the log with the garbage inserted, wanted frames only.
    wanted = {id(e) for e in sent}
    log: list[Any] = [*events[:at], *GARBAGE, *events[at:]]
    first_conn = [f for f in log if not isinstance(f, dict) or id(f) in wanted][:drop]
    newest = max(f["time_us"] for f in first_conn if isinstance(f, dict))
    # The reconnect rewinds 10 s: what the first connection sent from there comes again, the
    # events dropped as replays, the garbage (it has the time of the event before it) malformed.
    cursor = newest - 10_000_000
    garbage_time = events[at - 1]["time_us"]
    replayed = sum(1 for f in first_conn if isinstance(f, dict) and f["time_us"] >= cursor)
    garbage_again = len(GARBAGE) if garbage_time >= cursor else 0
    async with harness(redis_proc.url, tmp_path, events) as h:
        h.net.replay.send_garbage(GARBAGE, at=at)
        h.net.replay.drop_after(drop)
        service = await h.start()
        expected_events = len(sent) + len(GARBAGE) + replayed + garbage_again
        metrics = await service.wait_for(
            h.client, finished(expected_events, len(posts)), within=GUARD
        )

        # The live connection survives garbage and keeps delivering.
        builder = CaptureBuilder(
            demo_images(), seed=99, start_us=max(e["time_us"] for e in events) + 10**6
        )
        late = builder.post(builder.images_embed(["coffee.jpg"]))
        host_blobs(h.net, [late], demo_images())
        h.net.replay.send_garbage(["{broken"])
        h.net.replay.append([late])
        final = await service.wait_for(
            h.client, finished(expected_events + 2, len(posts) + 1), within=GUARD
        )
        assert await h.stop(service) == 0
    assert h.net.replay.cursors == [None, cursor]
    assert total(metrics, "phash_jetstream_reconnects_total") == 1
    assert total(metrics, RECEIVED) == expected_events
    assert total(metrics, MALFORMED) == len(GARBAGE) + garbage_again
    assert by_label(metrics, "phash_events_skipped_total", "reason")["replayed"] == replayed
    assert total(final, MALFORMED) == len(GARBAGE) + garbage_again + 1
    runs = decided(service.log_path)
    assert sorted(runs) == sorted(
        [*posts, f"at://{late['did']}/app.bsky.feed.post/{late['commit']['rkey']}"]
    )
    assert h.saved_cursor() == late["time_us"]


# --------------------------------------------------------------------------------------------
# 5. Backpressure


async def test_slow_blob_hosts_fill_the_channel_and_hold_the_reader(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """With slow CDN and PDS the bounded channel holds the reader back and memory stays flat."""
    channel, workers = 5, 2
    events = _capture(seed=25, size=150)
    posts = post_times(events)
    sent = delivered(events)
    is_post = [_parse(e).job is not None for e in sent]
    extra = {
        "CACHE_ENABLED": "false",
        "CHANNEL_SIZE": str(channel),
        "PROCESSING_CONCURRENCY": str(workers),
    }
    samples: list[tuple[dict[str, float], float]] = []
    async with harness(redis_proc.url, tmp_path, events) as h:
        h.net.cdn.slow_body = 0.2
        h.net.pds.delay = 0.3
        service = await h.start(**extra)
        # Channel full and both workers busy.
        await service.wait_for(
            h.client,
            lambda m: (
                total(m, "phash_jobs_received_total") - total(m, PROCESSED) >= channel + workers
            ),
            within=GUARD,
        )
        for _ in range(8):
            samples.append((await h.metrics(service), vm_rss_mb(service.pid)))
            await trio.sleep(0.25)
        h.net.cdn.slow_body = None
        h.net.pds.delay = 0.0
        await service.wait_for(h.client, finished(len(sent), len(posts)), within=GUARD)
        assert await h.stop(service) == 0
    for metrics, rss in samples:
        read = int(total(metrics, RECEIVED))
        processed = total(metrics, PROCESSED)
        assert read < len(sent), "the reader was not held back"
        # In flight: the workers' jobs, the channel, and at most one send blocked on it.
        assert sum(is_post[:read]) - processed <= channel + workers + 1
        assert total(metrics, "phash_jobs_received_total") - processed <= channel + workers
        # The gauge is the channel's depth now: everything queued and not in a worker's hands.
        queued = total(metrics, "phash_jobs_received_total") - processed - workers
        assert queued <= total(metrics, "phash_queue_depth") <= channel
        assert rss < 400, f"RSS {rss:.0f} MiB"
    assert total(samples[-1][0], PROCESSED) > total(samples[0][0], PROCESSED)
    assert max(total(m, "phash_queue_depth") for m, _ in samples) == channel  # it did fill
    assert sorted(decided(service.log_path)) == sorted(posts)


# --------------------------------------------------------------------------------------------
# 6. Timeouts and the size cap


async def test_hung_cdn_falls_back_to_pds_and_large_blob_is_refused(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """A hung CDN times out into the PDS fallback; a 3 MB blob is BlobTooLarge, its post decided."""
    images = demo_images()
    big = images["coffee.jpg"] + b"\0" * 3_000_000  # a valid JPEG with 3 MB of trailing bytes
    b = CaptureBuilder({**images, "big.jpg": big}, seed=31)
    hung = b.post(b.images_embed(["coffee.jpg"]))
    first = [hung]
    later = [
        b.post(b.images_embed(["spitfire.jpg"])),
        b.post(b.images_embed(["big.jpg", "moon.jpg"])),
    ]
    uri = {id(e): f"at://{e['did']}/app.bsky.feed.post/{e['commit']['rkey']}" for e in b.events}
    coffee, spitfire = cid_for(images["coffee.jpg"]), cid_for(images["spitfire.jpg"])
    async with harness(redis_proc.url, tmp_path, first, images={**images, "big.jpg": big}) as h:
        h.net.cdn.hang = True
        h.net.pds.chunked = True  # the PDS streams without Content-Length: the cap must cut it
        service = await h.start(BLOB_DOWNLOAD_TIMEOUT_SECS="0.5")
        await service.wait_for(h.client, finished(1, 1), within=GUARD)
        h.net.cdn.hang = False
        host_blobs(h.net, later, {**images, "big.jpg": big})
        h.net.replay.append(later)
        metrics = await service.wait_for(h.client, finished(3, 3), within=GUARD)
        assert await h.stop(service) == 0
    cdn_cids = [path.rsplit("/", 1)[-1].removesuffix("@jpeg") for path, _ in h.net.cdn.requests]
    pds_cids = [query.get("cid") for _, query in h.net.pds.requests]
    assert cdn_cids.count(coffee) == 1 and pds_cids.count(coffee) == 1  # timed out, fell back
    assert spitfire in cdn_cids and spitfire not in pds_cids  # the CDN is used again
    assert by_label(metrics, "phash_blob_errors_total", "kind") == {"BlobTooLarge": 1}
    assert total(metrics, "phash_jobs_failed_total") == 0
    log = service.log_path.read_text()
    assert f"{coffee}@jpeg: no complete answer within 0.5 s; trying the PDS" in log
    assert "body exceeds 2000000 bytes" in log  # the chunked PDS answer was cut off
    assert sorted(decided(service.log_path)) == sorted(uri[id(e)] for e in b.events)
    subjects = [event["subject"].get("uri") for event in h.net.ozone.events]
    assert uri[id(hung)] in subjects  # hashed from the PDS copy, matched example-coffee
    assert uri[id(later[1])] not in subjects  # the oversized copy of coffee was never hashed


# --------------------------------------------------------------------------------------------
# 7. Hostile input


async def test_bad_dids_cids_and_private_pds_are_refused(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """Bad DIDs/CIDs are malformed or dropped blobs; private PDS hosts are refused, CDN still used."""
    images = demo_images()
    b = CaptureBuilder(images, seed=41)
    author, private_author = b.authors[0], b.authors[1]
    web_author = "did:web:localhost%3A9"  # resolves to loopback: refused before any request
    on_cdn = b.post(b.images_embed(["coffee.jpg"]), did=author)
    refused = [
        b.post(b.images_embed(["mountain.jpg"]), did=author),  # PDS is http://127.0.0.1
        b.post(b.images_embed(["text.jpg"]), did=private_author),  # PDS is https://10.20.30.40
        b.post(b.images_embed(["mountain.jpg"]), did=web_author),
    ]
    bad_blob = {"$type": "blob", "ref": {"$link": "not-a-cid"}, "mimeType": "image/jpeg"}
    mixed = b.post(
        {
            "$type": "app.bsky.embed.images",
            "images": [
                {"alt": "", "image": bad_blob},
                {"alt": "", "image": b.blob("moon.jpg")},
                {"alt": "", "image": {"cid": "QmTooShort", "mimeType": "image/jpeg"}},
            ],
        }
    )
    b.post(b.images_embed(["moon.jpg"]), did="did:plc:NOT-A-VALID-DID")
    b.post({"$type": "app.bsky.embed.images", "images": [{"alt": "", "image": bad_blob}]})
    b.identity()["did"] = "did:nonsense"
    events = b.events
    posts = post_times(events)
    assert len(posts) == 5
    async with harness(redis_proc.url, tmp_path, events) as h:
        h.net.plc.add(private_author, "https://10.20.30.40")
        service = await h.start(ALLOW_PRIVATE_NETWORKS="false")
        metrics = await service.wait_for(
            h.client, finished(len(delivered(events)), len(posts)), within=GUARD
        )
        assert await h.stop(service) == 0
    assert sorted(decided(service.log_path)) == sorted(posts)
    assert total(metrics, MALFORMED) == 2
    assert by_label(metrics, "phash_blob_errors_total", "kind") == {"BlobNotFound": len(refused)}
    assert total(metrics, "phash_jobs_failed_total") == 0
    assert h.net.pds.pds_requests == 0
    log = service.log_path.read_text()
    assert "PDS URL 'http://127.0.0.1:" in log and "': is not https" in log
    assert "PDS URL 'https://10.20.30.40': 10.20.30.40 is a non-public address" in log
    assert (
        "PDS URL 'https://localhost:9/.well-known/did.json': host is not a fully qualified" in log
    )
    assert total(metrics, "phash_blobs_processed_total") == 2  # coffee from the CDN, moon
    subjects = [event["subject"].get("uri") for event in h.net.ozone.events]
    assert f"at://{author}/app.bsky.feed.post/{on_cdn['commit']['rkey']}" in subjects
    assert f"at://{mixed['did']}/app.bsky.feed.post/{mixed['commit']['rkey']}" in posts


# --------------------------------------------------------------------------------------------
# 8. Start-up validation


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PROCESSING_CONCURRENCY", "lots"),
        ("JETSTREAM_URL", "http://jetstream.example/subscribe"),
        ("CHANNEL_SIZE", "0"),
    ],
)
async def test_bad_config_value_exits_2_naming_the_variable(
    redis_proc: RedisProcess, tmp_path: Path, variable: str, value: str
) -> None:
    """A bad setting: exit 2, one line naming the variable, no traceback, no connection made."""
    await _assert_refused_at_startup(redis_proc, tmp_path, {variable: value}, variable)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("[{", "invalid JSON"),
        ('[{"phashes": ["not-hex-at-all!!"], "label": "x", "comment": "c"}]', "is not hexadecimal"),
    ],
)
async def test_broken_rule_file_exits_2_with_one_line(
    redis_proc: RedisProcess, tmp_path: Path, content: str, needle: str
) -> None:
    """A broken rule file: exit 2 with a one-line reason, no traceback, no connection made."""
    rules = tmp_path / "rules.json"
    rules.write_text(content)
    await _assert_refused_at_startup(
        redis_proc, tmp_path, {"RULES_FILE": str(rules)}, needle, prefix="rule file"
    )


async def _assert_refused_at_startup(
    redis_proc: RedisProcess,
    tmp_path: Path,
    extra: dict[str, str],
    needle: str,
    *,
    prefix: str = "configuration error",
) -> None:
    before = _redis_connections(redis_proc)
    async with harness(redis_proc.url, tmp_path, _capture(seed=51, size=20)) as h:
        port = free_port()
        service = ServiceProcess(h.env(port, **extra), tmp_path / "refused.log", port)
        await service.start(h.nursery)
        with trio.fail_after(GUARD):
            code = await service.wait()
    output = service.log_path.read_text()
    assert code == 2, output
    assert "Traceback" not in output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert prefix in lines[0] and needle in lines[0]
    net = h.net
    assert net.replay.requests == []
    assert net.cdn.requests == [] and net.pds.requests == [] and net.plc.requests == []
    assert net.ozone.requests == []
    assert _redis_connections(redis_proc) == before + 1  # only our own INFO query
