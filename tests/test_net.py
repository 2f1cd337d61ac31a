"""net.endpoints (one check for every untrusted URL) and net.transport (connect only to the
addresses that were checked: no DNS-rebinding window)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from phash_trio.net.atproto.blobs import BlobFetcher, BlobNotFound
from phash_trio.net.atproto.identity import PdsResolver
from phash_trio.net.breaker import CircuitBreaker
from phash_trio.net.endpoints import BadEndpoint, parse_endpoint, public_addresses
from phash_trio.net.transport import guarded_transport, refused_address
from phash_trio.runtime.metrics import Metrics
from phash_trio.testing.blobhost import PlcDirectory
from phash_trio.testing.httpserver import HttpServer, Request, Response, serve_http
from phash_trio.testing.jetstream_replay import fake_cid, fake_did

PUBLIC = "93.184.216.34"


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("https://pds.example.com", "https://pds.example.com"),
        ("https://PDS.Example.com/", "https://pds.example.com"),
        ("https://pds.example.com:443/base/", "https://pds.example.com/base"),
        ("https://bücher.example", "https://xn--bcher-kva.example"),
        ("https://8.8.8.8", "https://8.8.8.8"),
        ("https://[2606:4700::1111]", "https://[2606:4700::1111]"),
    ],
)
def test_good_endpoints_are_normalised(value: str, url: str) -> None:
    """Sound https endpoints come back with an ASCII, lower-case host and no trailing slash."""
    assert parse_endpoint(value).url == url


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("https://☃.net", "IDNA"),
        ("https://xn--zz.example.com", "IDNA"),
        ("https://" + "a" * 600 + ".com", "longer than"),
        (42, "not a string"),
        (None, "not a string"),
        (["https://pds.example.com"], "not a string"),
        ("http://pds.example.com", "is not https"),
        ("ftp://pds.example.com", "is not https"),
        ("https://user:pw@pds.example.com", "credentials"),
        ("https://pds.example.com?x=1", "query"),
        ("https://pds.example.com#frag", "fragment"),
        ("https://pds.example.com:8443", "port 8443"),
        ("https://pds.example.com:99999", "not a valid URL"),
        ("https://[::1", "not a valid URL"),
        ("https://", "no host"),
        ("https://pds..example.com", "DNS label"),
        ("https://-pds.example.com", "DNS label"),
        ("https://pds.example.com/a b", "whitespace"),
        ("https://pds.example.com/\x00", "control"),
        ("https://localhost", "fully qualified"),
        ("https://127.0.0.1", "non-public"),
        ("https://10.1.2.3", "non-public"),
        ("https://169.254.169.254", "non-public"),
        ("https://[::ffff:127.0.0.1]", "non-public"),
        ("https://0.0.0.0", "non-public"),
        ("https://1.2.3.999", "malformed IP"),
    ],
)
def test_bad_endpoints_give_one_error(value: object, reason: str) -> None:
    """Every malformed, non-https, oversized, credentialed or non-public value is one
    BadEndpoint whose message is short (hostile values are cut) and names the reason."""
    with pytest.raises(BadEndpoint, match=reason) as info:
        parse_endpoint(value)
    assert len(str(info.value)) < 200


def test_allow_private_keeps_the_shape_checks() -> None:
    """ALLOW_PRIVATE_NETWORKS admits http, loopback and odd ports but not broken URLs."""
    assert parse_endpoint("http://127.0.0.1:2583", allow_private=True).url == (
        "http://127.0.0.1:2583"
    )
    assert parse_endpoint("http://localhost:80", allow_private=True).url == "http://localhost"
    for value in ("https://☃.net", "https://u:p@127.0.0.1", 7, "gopher://127.0.0.1"):
        with pytest.raises(BadEndpoint):
            parse_endpoint(value, allow_private=True)


async def test_one_private_address_refuses_the_host() -> None:
    """A name with a public and a private address is refused (the attacker picks the order)."""

    async def resolve(host: str, port: int) -> list[str]:
        return [PUBLIC, "10.0.0.5"]

    with pytest.raises(BadEndpoint, match=r"10\.0\.0\.5"):
        await public_addresses("pds.example.com", 443, resolve=resolve)


class RebindingDns:
    """A DNS server under attacker control: public for the first ``honest`` lookups, then
    loopback."""

    def __init__(self, honest: int) -> None:
        self.honest = honest
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        return [PUBLIC] if len(self.lookups) <= self.honest else ["127.0.0.1"]


@pytest.fixture
async def local(nursery: trio.Nursery) -> AsyncIterator[tuple[HttpServer, list[Request]]]:
    """A loopback HTTP server that records what reaches it."""
    seen: list[Request] = []

    async def handle(request: Request) -> Response:
        seen.append(request)
        return Response(200, b"reached", {"content-type": "text/plain"})

    server = await nursery.start(serve_http, handle, "127.0.0.1")
    yield server, seen


async def test_connection_goes_to_the_checked_address(
    local: tuple[HttpServer, list[Request]],
) -> None:
    """The pinned transport resolves once and connects to that address, keeping the name in
    the Host header (a name the system resolver does not know is reached all the same)."""
    server, seen = local
    lookups: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]

    transport = guarded_transport(allow_private=True, resolve=resolve)
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get(f"http://pds.pinned.test:{server.port}/x")
    assert response.text == "reached"
    assert lookups == ["pds.pinned.test"]
    assert seen[0].headers["host"] == f"pds.pinned.test:{server.port}"


async def test_rebinding_after_the_check_is_refused(
    local: tuple[HttpServer, list[Request]],
) -> None:
    """A DNS answer that turns private between the check and the connection is refused at
    connect time; nothing reaches the loopback server."""
    server, seen = local
    dns = RebindingDns(honest=0)
    transport = guarded_transport(resolve=dns)
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.ConnectError) as info:
            await client.get(f"https://pds.rebind.test:{server.port}/x")
    assert refused_address(info.value) is not None
    assert seen == []


async def test_blob_fetch_refuses_a_pds_that_rebinds(
    nursery: trio.Nursery, local: tuple[HttpServer, list[Request]]
) -> None:
    """End to end through the fetcher: the PDS name passes the resolver's check (public), then
    answers loopback; the blob is not found (unreachable PDS), nothing reaches loopback, and a
    second fetch does not retry it as a transient failure."""
    _server, seen = local
    plc: PlcDirectory = await nursery.start(PlcDirectory.run)
    did, cid = fake_did("rebinder"), fake_cid("rebinder blob")
    plc.add(did, "https://pds.rebind.test")
    dns = RebindingDns(honest=1)
    metrics = Metrics()
    async with (
        httpx.AsyncClient() as plain,
        httpx.AsyncClient(transport=guarded_transport(resolve=dns)) as untrusted,
    ):
        resolver = PdsResolver(plain, plc_endpoint=plc.url, resolve=dns)
        fetcher = BlobFetcher(
            plain,
            cdn_url=plc.url,  # answers 404 for blobs: the PDS is tried
            resolver=resolver,
            metrics=metrics,
            pds_client=untrusted,
            cdn_breaker=CircuitBreaker("cdn"),
        )
        with pytest.raises(BlobNotFound, match=r"non-public address 127\.0\.0\.1"):
            await fetcher.fetch(did, cid)
    assert dns.lookups == ["pds.rebind.test", "pds.rebind.test"]
    assert seen == []


async def test_pds_breakers_are_bounded_lru() -> None:
    """Invented PDS hosts cannot grow the breaker map: the least recently used are dropped."""
    async with httpx.AsyncClient() as client:
        fetcher = BlobFetcher(
            client,
            cdn_url="https://cdn.example.com",
            resolver=PdsResolver(client),
            metrics=Metrics(),
            max_pds_breakers=3,
        )
        keep = fetcher.pds_breaker("keep.example.com")
        for n in range(10):
            fetcher.pds_breaker(f"host{n}.example.com")
            assert fetcher.pds_breaker("keep.example.com") is keep  # recently used: kept
        assert fetcher.pds_breaker_count == 3


async def test_fake_http_server_answers_a_bad_content_length(
    local: tuple[HttpServer, list[Request]],
) -> None:
    """The fakes' little server answers ``Content-Length: abc`` with 400 instead of raising
    out of its nursery (it used to end the test's server)."""
    server, seen = local
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        with trio.fail_after(10):
            answer = await stream.receive_some(4096)
    assert answer.startswith(b"HTTP/1.1 400")
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{server.url}/x")).text == "reached"
    assert len(seen) == 1
