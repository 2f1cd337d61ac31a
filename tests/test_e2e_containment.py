"""End to end: one hostile post must not stop the service (issue 9, finding 1).

The author's DID document names ``https://☃.net`` as its PDS (anyone can publish one). Before
containment httpx raised ``InvalidURL`` out of the worker, the process exited 1 and, since the
cursor had not passed the post, every restart read it again and exited again.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from e2e_helpers import GUARD, decided, finished, harness, total

from phash_trio.testing.blobhost import cid_for
from phash_trio.testing.capture import demo_images
from phash_trio.testing.jetstream_replay import fake_cid, fake_did, make_post
from phash_trio.testing.redis_server import RedisProcess

pytestmark = pytest.mark.e2e

T0 = 1_764_000_000_000_000


async def test_snowman_pds_does_not_stop_the_service(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """A post whose author names ``https://☃.net`` as PDS is settled; the next post is decided."""
    images = demo_images()
    hostile, honest = fake_did("snowman"), fake_did("honest")
    missing_cid = fake_cid("not on the CDN")  # forces the PDS lookup
    events = [
        make_post(hostile, "3ksnowman00001", T0, image_cids=[missing_cid]),
        make_post(honest, "3khonest000001", T0 + 1000, image_cids=[cid_for(images["coffee.jpg"])]),
    ]
    async with harness(redis_proc.url, tmp_path, events) as h:
        h.net.plc.add(hostile, "https://☃.net")
        service = await h.start(RETRY_ATTEMPTS="0")
        await service.wait_for(h.client, finished(2, 2), within=GUARD)
        metrics = await h.metrics(service)
        code = await h.stop(service)
    assert code == 0, service.log_tail()
    uris = decided(service.log_path)
    assert sorted(uris) == sorted(
        [
            f"at://{hostile}/app.bsky.feed.post/3ksnowman00001",
            f"at://{honest}/app.bsky.feed.post/3khonest000001",
        ]
    )
    assert total(metrics, "phash_jobs_processed_total") == 2
    assert h.saved_cursor() == T0 + 1000


async def test_bad_content_length_on_metrics_does_not_stop_the_service(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """``Content-Length: abc`` sent to /metrics (finding 2) gets a 400; the service stays up,
    answers the next scrape and stops cleanly."""
    images = demo_images()
    events = [
        make_post(fake_did("a"), "3kaaaaaaaaaa1", T0, image_cids=[cid_for(images["coffee.jpg"])])
    ]
    async with harness(redis_proc.url, tmp_path, events) as h:
        service = await h.start()
        await service.wait_for(h.client, finished(1, 1), within=GUARD)
        stream = await trio.open_tcp_stream("127.0.0.1", service.metrics_port)
        async with stream:
            await stream.send_all(
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"
            )
            with trio.fail_after(GUARD):
                answer = await stream.receive_some(4096)
        await trio.sleep(0.5)  # time for a crash to happen, if it would
        assert service.process is not None and service.process.poll() is None, service.log_tail()
        metrics = await h.metrics(service)
        code = await h.stop(service)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    assert total(metrics, "phash_jobs_processed_total") == 1
    assert code == 0, service.log_tail()
