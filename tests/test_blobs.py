"""Blob fetch against in-process CDN, PDS and PLC servers, through a real httpx client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import httpx
import pytest
import trio
import trio.testing

from phash_trio.config import Settings
from phash_trio.net.atproto import identity
from phash_trio.net.atproto.blobs import (
    BlobError,
    BlobFetcher,
    BlobNotFound,
    BlobTooLarge,
    BlobUnavailable,
    InvalidCid,
    InvalidDid,
)
from phash_trio.net.atproto.identity import PdsResolver
from phash_trio.net.breaker import BreakerState
from phash_trio.runtime.metrics import Metrics
from phash_trio.testing.blobhost import BlobHost, PlcDirectory, cid_for

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
IMAGE = b"\xff\xd8\xff\xe0 not really a jpeg, but bytes are bytes" * 10
CID = cid_for(IMAGE)
MB = 1_000_000


@attrs.define
class World:
    """The three fake servers, the client and a fetcher wired to them."""

    cdn: BlobHost
    pds: BlobHost
    plc: PlcDirectory
    client: httpx.AsyncClient
    metrics: Metrics = attrs.field(factory=Metrics)

    def fetcher(self, *, private: bool = True, **kw: object) -> BlobFetcher:
        resolver = PdsResolver(
            self.client,
            plc_endpoint=self.plc.url,
            timeout=kw.get("attempt_timeout", 10.0),  # type: ignore[arg-type]
            allow_private_networks=private,
            did_web_base=self.plc.did_web_base,
            metrics=self.metrics,
        )
        return BlobFetcher(
            self.client,
            cdn_url=self.cdn.url,
            resolver=resolver,
            metrics=self.metrics,
            allow_private_networks=private,
            **kw,  # type: ignore[arg-type]
        )


def pds_host(world: World) -> str:
    return world.pds.url.removeprefix("http://")


@pytest.fixture
async def world(nursery: trio.Nursery) -> AsyncIterator[World]:
    cdn: BlobHost = await nursery.start(BlobHost.run)
    pds: BlobHost = await nursery.start(BlobHost.run)
    plc: PlcDirectory = await nursery.start(PlcDirectory.run)
    plc.add(DID, pds.url)
    async with httpx.AsyncClient(trust_env=False) as client:
        yield World(cdn, pds, plc, client)


async def test_cdn_success(world: World) -> None:
    """A blob on the CDN is returned from the CDN without asking PLC or the PDS."""
    world.cdn.add(DID, CID, IMAGE)
    assert await world.fetcher().fetch(DID, CID) == IMAGE
    assert world.cdn.requests == [(f"/img/feed_fullsize/plain/{DID}/{CID}@jpeg", {})]
    assert world.plc.requests == [] and world.pds.requests == []
    assert world.metrics.total("blobs_downloaded") == 1


async def test_cdn_miss_falls_back_to_pds(world: World) -> None:
    """A CDN 404 leads to the PDS found through PLC, with did and cid as query parameters."""
    world.pds.add(DID, CID, IMAGE)
    assert await world.fetcher().fetch(DID, CID) == IMAGE
    assert world.cdn.cdn_requests == 1
    assert world.plc.requests == [f"/{DID}"]
    assert world.pds.requests == [
        ("/xrpc/com.atproto.sync.getBlob", {"did": DID, "cid": CID}),
    ]


async def test_did_web_pds(world: World) -> None:
    """A did:web author's PDS is found from its did.json; the DID survives URL encoding."""
    did = "did:web:alice.test%3A8443"
    world.plc.add(did, world.pds.url)
    world.pds.add(did, CID, IMAGE)
    assert await world.fetcher().fetch(did, CID) == IMAGE
    assert world.plc.requests == ["/did-web/alice.test:8443/.well-known/did.json"]
    assert world.pds.requests[0][1] == {"did": did, "cid": CID}


async def test_resolution_cached_between_fetches(
    world: World, mock_clock: trio.testing.MockClock
) -> None:
    """Fetches from one author ask PLC once per TTL."""
    fetcher = world.fetcher()
    images = [IMAGE + bytes([i]) for i in range(3)]
    for image in images:
        world.pds.add(DID, cid_for(image), image)
    for image in images:
        assert await fetcher.fetch(DID, cid_for(image)) == image
    assert world.plc.request_count == 1
    mock_clock.jump(3600)
    assert await fetcher.fetch(DID, cid_for(images[0])) == images[0]
    assert world.plc.request_count == 2


async def test_not_found_anywhere(world: World) -> None:
    """CDN 404 and PDS 400 give a permanent BlobNotFound naming endpoints, DID and CID."""
    with pytest.raises(BlobNotFound) as info:
        await world.fetcher().fetch(DID, CID)
    message = str(info.value)
    assert DID in message and CID in message
    assert f"CDN {world.cdn.url}/img/feed_fullsize/plain/{DID}/{CID}@jpeg: 404" in message
    assert f"PDS {world.pds.url}/xrpc/com.atproto.sync.getBlob: 400" in message
    assert info.value.permanent and (info.value.did, info.value.cid) == (DID, CID)
    assert world.metrics.total("blobs_downloaded") == 0


@pytest.mark.parametrize(
    ("cdn_status", "pds_status", "plc_status", "expected"),
    [
        (500, 404, None, BlobNotFound),  # the PDS is the source of truth
        (404, 503, None, BlobUnavailable),
        (404, 429, None, BlobUnavailable),
        (404, 302, None, BlobNotFound),  # redirects are not followed
        (503, None, 404, BlobUnavailable),  # the CDN may come back
        (404, None, 404, BlobNotFound),  # unknown DID
        (404, None, 500, BlobUnavailable),
        (404, None, 400, BlobUnavailable),
    ],
)
async def test_outcome_table(
    world: World,
    cdn_status: int,
    pds_status: int | None,
    plc_status: int | None,
    expected: type[BlobError],
) -> None:
    """Each combination of source answers maps to the right permanent or transient error."""
    world.cdn.fail_cdn = cdn_status
    world.pds.fail_pds = pds_status
    world.plc.fail = plc_status
    with pytest.raises(expected) as info:
        await world.fetcher().fetch(DID, CID)
    assert info.value.permanent is (expected is not BlobUnavailable)


async def test_hanging_cdn_times_out_then_pds(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    """A CDN that never answers costs exactly one attempt timeout, then the PDS serves."""
    world.cdn.hang = True
    world.pds.add(DID, CID, IMAGE)
    fetcher = world.fetcher(attempt_timeout=4.0, total_timeout=30.0)
    start = trio.current_time()
    assert await fetcher.fetch(DID, CID) == IMAGE
    assert trio.current_time() == start + 4.0
    assert world.cdn.cdn_requests == 1 and world.pds.pds_requests == 1
    assert fetcher.cdn_breaker.consecutive_failures == 1


async def test_total_timeout(world: World, autojump_clock: trio.testing.MockClock) -> None:
    """When both sources hang the fetch ends at the total timeout with BlobUnavailable."""
    world.cdn.hang = world.pds.hang = True
    fetcher = world.fetcher(attempt_timeout=10.0, total_timeout=15.0)
    start = trio.current_time()
    with pytest.raises(BlobUnavailable, match="total timeout of 15 s") as info:
        await fetcher.fetch(DID, CID)
    assert trio.current_time() == start + 15.0
    assert f"PDS {world.pds.url}/xrpc/com.atproto.sync.getBlob: gave up" in str(info.value)
    assert "no complete answer within 10 s" in str(info.value)
    assert not info.value.breaker_open and not info.value.permanent
    assert fetcher.pds_breaker(pds_host(world)).consecutive_failures == 1


async def test_slow_body_counts_against_attempt(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    """A body trickling in slower than the attempt timeout is abandoned at the timeout."""
    world.cdn.slow_body = 1.0
    world.cdn.add(DID, CID, b"x" * 100_000)  # 7 pieces of 16 KiB, one per second
    world.pds.add(DID, CID, IMAGE)
    start = trio.current_time()
    assert await world.fetcher(attempt_timeout=3.0).fetch(DID, CID) == IMAGE
    assert trio.current_time() == start + 3.0


async def test_size_cap_while_streaming(world: World) -> None:
    """A 3 MB body without Content-Length is cut off just past 2 MB and the server stops."""
    big = b"\x00" * (3 * MB)
    world.pds.add(DID, CID, big)
    world.pds.slow_body = 0.0005
    with pytest.raises(BlobTooLarge, match="body exceeds 2000000 bytes") as info:
        await world.fetcher().fetch(DID, CID)
    assert info.value.permanent and info.value.limit == 2 * MB
    assert info.value.size is not None and 2 * MB < info.value.size <= 2 * MB + 64 * 1024
    await trio.sleep(0.2)  # let the server notice the closed connection
    assert world.pds.bytes_streamed < 2.3 * MB


async def test_content_length_rejected_early(world: World) -> None:
    """A declared Content-Length over the cap is refused from the header, on both sources."""
    big = b"\x00" * (3 * MB)
    world.cdn.add(DID, CID, big)
    world.pds.add(DID, CID, big)
    with pytest.raises(BlobTooLarge, match="Content-Length 3000000 exceeds") as info:
        await world.fetcher().fetch(DID, CID)
    assert info.value.size == 3 * MB
    assert world.cdn.cdn_requests == 1 and world.pds.pds_requests == 1


async def test_exactly_at_cap_is_accepted(world: World) -> None:
    """A blob of exactly max_bytes is accepted, streamed or not."""
    data = b"\x01" * 1000
    world.cdn.add(DID, CID, data)
    world.cdn.chunked = True
    assert await world.fetcher(max_bytes=1000).fetch(DID, CID) == data


@pytest.mark.parametrize(
    ("did", "cid", "error"),
    [
        ("did:plc:short", CID, InvalidDid),
        ("did:plc:ewvi7nxzyoun6zhxrhs64oiz/../../x", CID, InvalidDid),
        ("did:web:evil.com/path", CID, InvalidDid),
        ("", CID, InvalidDid),
        (DID, "", InvalidCid),
        (DID, "bafy?x=1", InvalidCid),
        (DID, CID + "/../../admin", InvalidCid),
        (DID, "QmNotBase58l0l0000000000000000000000000000000000", InvalidCid),
    ],
)
async def test_bad_input_makes_no_request(
    world: World, did: str, cid: str, error: type[BlobError]
) -> None:
    """Malformed DIDs and CIDs are refused before any URL is built or requested."""
    with pytest.raises(error) as info:
        await world.fetcher().fetch(did, cid)
    assert info.value.permanent
    assert world.cdn.requests == [] and world.pds.requests == [] and world.plc.requests == []


def test_invalid_did_is_also_an_identity_error() -> None:
    """blobs.InvalidDid can be caught as a BlobError or as identity.InvalidDid."""
    error = InvalidDid("bad", did="x", cid="y")
    assert isinstance(error, BlobError) and isinstance(error, identity.InvalidDid)


@pytest.mark.parametrize(
    "pds_url",
    [
        "http://127.0.0.1:{port}",
        "https://localhost:{port}",
        "https://10.0.0.1",
        "https://169.254.169.254",
        "https://[::1]:{port}",
        "https://0.0.0.0:{port}",
    ],
)
async def test_private_pds_refused(world: World, pds_url: str) -> None:
    """A PDS on a private or loopback address is never contacted without the flag."""
    world.plc.add(DID, pds_url.format(port=pds_host(world).rpartition(":")[2]))
    world.pds.add(DID, CID, IMAGE)
    with pytest.raises(
        BlobNotFound, match=r"non-public address|is not https|fully qualified"
    ) as info:
        await world.fetcher(private=False).fetch(DID, CID)
    assert "PDS lookup" in str(info.value)
    assert world.pds.requests == []


async def test_private_pds_allowed_with_flag(world: World) -> None:
    """With allow_private_networks the loopback PDS is used."""
    world.pds.add(DID, CID, IMAGE)
    assert await world.fetcher(private=True).fetch(DID, CID) == IMAGE


async def test_fetcher_stricter_than_resolver(world: World) -> None:
    """A fetcher refusing private networks refuses them even with a permissive resolver."""
    world.pds.add(DID, CID, IMAGE)
    resolver = PdsResolver(world.client, plc_endpoint=world.plc.url, allow_private_networks=True)
    fetcher = BlobFetcher(
        world.client, cdn_url=world.cdn.url, resolver=resolver, metrics=world.metrics
    )
    with pytest.raises(BlobNotFound, match="is not https"):
        await fetcher.fetch(DID, CID)
    assert world.pds.requests == []


async def test_pds_breaker(world: World, mock_clock: trio.testing.MockClock) -> None:
    """Three PDS failures open its breaker: the next fetch fails fast, then a probe recovers."""
    world.pds.fail_pds = 500
    fetcher = world.fetcher()
    for _ in range(3):
        with pytest.raises(BlobUnavailable, match="getBlob: 500") as info:
            await fetcher.fetch(DID, CID)
        assert not info.value.breaker_open
    opened_at = trio.current_time()
    with pytest.raises(BlobUnavailable, match="is open") as info:
        await fetcher.fetch(DID, CID)
    assert info.value.breaker_open and info.value.retry_at == opened_at + 300
    assert world.pds.pds_requests == 3
    snapshot = world.metrics.snapshot()
    assert snapshot["breaker_transitions[breaker=pds,to=open]"] == 1
    assert snapshot["breaker_rejections[breaker=pds]"] == 1
    world.pds.fail_pds = None
    world.pds.add(DID, CID, IMAGE)
    mock_clock.jump(300)
    assert await fetcher.fetch(DID, CID) == IMAGE
    assert fetcher.pds_breaker(pds_host(world)).current_state() is BreakerState.CLOSED


async def test_pds_breakers_are_per_host(world: World, nursery: trio.Nursery) -> None:
    """An open breaker for one PDS host does not block another host."""
    other_pds: BlobHost = await nursery.start(BlobHost.run)
    other = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"
    world.plc.add(other, other_pds.url)
    other_pds.add(other, CID, IMAGE)
    world.pds.fail_pds = 502
    fetcher = world.fetcher()
    for _ in range(4):
        with pytest.raises(BlobUnavailable):
            await fetcher.fetch(DID, CID)
    assert await fetcher.fetch(other, CID) == IMAGE


async def test_plc_breaker_fails_fetch_fast(world: World) -> None:
    """With the PLC breaker open, a CDN miss gives BlobUnavailable(breaker_open) at once."""
    world.plc.fail = 500
    fetcher = world.fetcher()
    for _ in range(3):
        with pytest.raises(BlobUnavailable, match="answered 500"):
            await fetcher.fetch(DID, CID)
    with pytest.raises(BlobUnavailable) as info:
        await fetcher.fetch(DID, CID)
    assert info.value.breaker_open and info.value.retry_at is not None
    assert world.plc.request_count == 3


async def test_cdn_breaker_skips_cdn(world: World) -> None:
    """Five CDN failures open its breaker; later fetches go straight to the PDS."""
    world.cdn.fail_cdn = 500
    world.pds.add(DID, CID, IMAGE)
    fetcher = world.fetcher()
    for _ in range(7):
        assert await fetcher.fetch(DID, CID) == IMAGE
    assert world.cdn.cdn_requests == 5 and world.pds.pds_requests == 7
    assert fetcher.cdn_breaker.current_state() is BreakerState.OPEN
    assert world.metrics.snapshot()["breaker_rejections[breaker=cdn]"] == 2


async def test_cdn_404_does_not_trip_breaker(world: World) -> None:
    """CDN misses are neutral: many 404s leave the CDN breaker closed."""
    world.pds.add(DID, CID, IMAGE)
    fetcher = world.fetcher()
    for _ in range(6):
        assert await fetcher.fetch(DID, CID) == IMAGE
    assert world.cdn.cdn_requests == 6
    assert fetcher.cdn_breaker.current_state() is BreakerState.CLOSED


async def test_from_settings(world: World) -> None:
    """from_settings wires the configured CDN, timeouts and cap."""
    settings = Settings(cdn_url=world.cdn.url + "/", max_blob_bytes=10, allow_private_networks=True)
    resolver = PdsResolver(world.client, plc_endpoint=world.plc.url, allow_private_networks=True)
    fetcher = BlobFetcher.from_settings(settings, world.client, resolver, world.metrics)
    world.cdn.add(DID, CID, IMAGE)
    with pytest.raises(BlobTooLarge):
        await fetcher.fetch(DID, CID)
    assert world.cdn.cdn_requests == 1
