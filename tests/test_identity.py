"""DID/CID validation and DID -> PDS resolution against an in-process PLC directory."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
import trio.testing

from phash_trio.config import Settings
from phash_trio.net.atproto.identity import (
    DidNotFound,
    InvalidDid,
    NoPdsInDocument,
    PdsResolver,
    ResolutionFailed,
    UnsafePdsUrl,
    check_public_url,
    did_web_host,
    is_valid_cid,
    is_valid_did,
)
from phash_trio.net.breaker import BreakerState
from phash_trio.runtime.metrics import Metrics
from phash_trio.testing.blobhost import PlcDirectory, cid_for

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
OTHER = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
PDS = "https://93.184.216.34"  # public literal: the safety check needs no DNS


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as c:
        yield c


@pytest.fixture
async def plc(nursery: trio.Nursery) -> PlcDirectory:
    directory: PlcDirectory = await nursery.start(PlcDirectory.run)
    return directory


def make_resolver(
    client: httpx.AsyncClient, plc: PlcDirectory, *, private: bool = True, **kw: object
) -> PdsResolver:
    return PdsResolver(
        client,
        plc_endpoint=plc.url,
        allow_private_networks=private,
        did_web_base=plc.did_web_base,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    "did",
    [
        DID,
        "did:web:example.com",
        "did:web:sub.example-host.co.uk",
        "did:web:localhost%3A8080",
        "did:web:localhost%3a65535",
    ],
)
def test_valid_dids(did: str) -> None:
    """Well-formed did:plc and did:web identifiers are accepted."""
    assert is_valid_did(did)


@pytest.mark.parametrize(
    "did",
    [
        "",
        "did:plc:",
        "did:plc:ewvi7nxzyoun6zhxrhs64oi",  # 23 chars
        "did:plc:ewvi7nxzyoun6zhxrhs64oizz",  # 25 chars
        "did:plc:EWVI7NXZYOUN6ZHXRHS64OIZ",  # upper case
        "did:plc:ewvi7nxzyoun6zhxrhs64oi1",  # 1 is not base32
        "did:plc:ewvi7nxzyoun6zhxrhs64oiz/../x",
        "did:web:example.com:path",
        "did:web:example.com/x",
        "did:web:example.com%3A99999",
        "did:web:exa mple.com",
        "did:web:-bad.com",
        "did:web:" + "a." * 1100 + "com",  # over 2048 chars
        "did:key:z6Mkabc",
        " did:plc:ewvi7nxzyoun6zhxrhs64oiz",
        None,
    ],
)
def test_invalid_dids(did: str) -> None:
    """Malformed, over-long, path-carrying and foreign-method DIDs are refused."""
    assert not is_valid_did(did)


def test_cids() -> None:
    """Real CIDv1 (base32) and CIDv0 (base58btc) pass; anything that could bend a URL fails."""
    assert is_valid_cid(cid_for(b"x"))
    assert is_valid_cid("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG")
    for bad in [
        "",
        "b" + "a" * 19,
        "b" + "a" * 100,
        "B" + "a" * 30,
        "bafkrei?x=1aaaaaaaaaaaaaaaaaaa",
        "bafkrei/../aaaaaaaaaaaaaaaaaaaa",
        "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbd0",  # 0 is not base58
        "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdGG",
        cid_for(b"x") + "\n",
    ]:
        assert not is_valid_cid(bad), bad


def test_did_web_host() -> None:
    """The did:web host decodes its %3A port separator."""
    assert did_web_host("did:web:Example.com%3A8443") == "example.com:8443"
    assert did_web_host("did:web:example.com") == "example.com"


async def test_resolves_plc_document(client: httpx.AsyncClient, plc: PlcDirectory) -> None:
    """A PLC document's #atproto_pds endpoint is the answer, without a trailing slash."""
    plc.add(DID, PDS + "/")
    resolver = make_resolver(client, plc, private=False)
    assert await resolver.resolve(DID) == PDS
    assert plc.requests == [f"/{DID}"]


async def test_resolution_cached_until_ttl(
    client: httpx.AsyncClient, plc: PlcDirectory, mock_clock: trio.testing.MockClock
) -> None:
    """A resolution is reused for the TTL and asked again once it expires."""
    plc.add(DID, PDS)
    resolver = make_resolver(client, plc, ttl=3600.0)
    assert await resolver.resolve(DID) == PDS
    mock_clock.jump(3599)
    assert await resolver.resolve(DID) == PDS
    assert plc.request_count == 1
    plc.add(DID, "https://[2606:4700::1111]")
    mock_clock.jump(1)
    assert await resolver.resolve(DID) == "https://[2606:4700::1111]"
    assert plc.request_count == 2


async def test_not_found_cached_for_negative_ttl(
    client: httpx.AsyncClient, plc: PlcDirectory, mock_clock: trio.testing.MockClock
) -> None:
    """An unknown DID is remembered for 5 minutes, then asked again."""
    resolver = make_resolver(client, plc)
    for _ in range(3):
        with pytest.raises(DidNotFound, match="answered 404"):
            await resolver.resolve(DID)
    assert plc.request_count == 1
    plc.add(DID, PDS)
    mock_clock.jump(299)
    with pytest.raises(DidNotFound):
        await resolver.resolve(DID)
    mock_clock.jump(1)
    assert await resolver.resolve(DID) == PDS
    assert plc.request_count == 2


async def test_did_web(client: httpx.AsyncClient, plc: PlcDirectory) -> None:
    """did:web is resolved from the host's /.well-known/did.json."""
    did = "did:web:alice.test%3A8443"
    plc.add(did, PDS)
    resolver = make_resolver(client, plc)
    assert await resolver.resolve(did) == PDS
    assert plc.requests == ["/did-web/alice.test:8443/.well-known/did.json"]


async def test_did_web_private_host_refused(client: httpx.AsyncClient, plc: PlcDirectory) -> None:
    """A did:web naming a loopback host is refused before any request."""
    resolver = PdsResolver(client, plc_endpoint=plc.url)
    for did in ("did:web:localhost", "did:web:127.0.0.1", "did:web:10.1.2.3%3A443"):
        with pytest.raises(UnsafePdsUrl, match=r"non-public address|fully qualified"):
            await resolver.resolve(did)
    assert plc.requests == []


@pytest.mark.parametrize(
    "pds_url",
    [
        "http://127.0.0.1:8080",
        "http://pds.example.com",
        "https://10.0.0.1",
        "https://172.16.5.4",
        "https://192.168.1.1",
        "https://169.254.169.254",
        "https://[::1]",
        "https://[fe80::1]",
        "https://[::ffff:127.0.0.1]",
        "https://0.0.0.0",
        "https://100.64.0.1",
        "https://224.0.0.1",
        "https://localhost:2583",
        "https://user:pw@pds.example.com",
        "https://pds.example.com/?x=1",
        "ftp://pds.example.com",
        "https://",
        "https://[::1",
    ],
)
async def test_unsafe_pds_refused(
    client: httpx.AsyncClient, plc: PlcDirectory, pds_url: str
) -> None:
    """A document pointing at a private, loopback or non-https URL gives UnsafePdsUrl."""
    plc.add(DID, pds_url)
    resolver = make_resolver(client, plc, private=False)
    with pytest.raises(UnsafePdsUrl):
        await resolver.resolve(DID)


async def test_private_pds_allowed_with_flag(client: httpx.AsyncClient, plc: PlcDirectory) -> None:
    """With allow_private_networks an http loopback PDS is accepted."""
    plc.add(DID, "http://127.0.0.1:2583")
    assert await make_resolver(client, plc).resolve(DID) == "http://127.0.0.1:2583"


async def test_public_literal_address_passes() -> None:
    """A public IP literal over https passes the check without any DNS lookup."""
    await check_public_url("https://8.8.8.8/xrpc", DID)
    await check_public_url("https://[2606:4700::1111]", DID)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"id": DID, "service": []}, "no #atproto_pds"),
        ({"id": DID}, "no service list"),
        ([1, 2], "not a JSON object"),
        ({"id": OTHER, "service": []}, "is for"),
        (
            {"service": [{"id": "#atproto_pds", "type": "Other", "serviceEndpoint": PDS}]},
            "no #atproto_pds",
        ),
        (
            {"service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer"}]},
            "no string serviceEndpoint",
        ),
    ],
)
async def test_document_without_pds(
    client: httpx.AsyncClient, plc: PlcDirectory, document: object, message: str
) -> None:
    """Documents without a usable PDS service give NoPdsInDocument with the reason."""
    plc.add_document(DID, document)
    with pytest.raises(NoPdsInDocument, match=message):
        await make_resolver(client, plc).resolve(DID)


async def test_full_service_id_accepted(client: httpx.AsyncClient, plc: PlcDirectory) -> None:
    """A service id written as DID#atproto_pds is recognised."""
    service = {"id": f"{DID}#atproto_pds", "type": "AtprotoPersonalDataServer"}
    plc.add_document(DID, {"id": DID, "service": [{**service, "serviceEndpoint": PDS}]})
    assert await make_resolver(client, plc, private=False).resolve(DID) == PDS


async def test_invalid_did_makes_no_request(client: httpx.AsyncClient, plc: PlcDirectory) -> None:
    """A malformed DID raises InvalidDid and never reaches the directory."""
    with pytest.raises(InvalidDid):
        await make_resolver(client, plc).resolve("did:plc:../../admin")
    assert plc.requests == []


async def test_plc_breaker_opens_and_recovers(
    client: httpx.AsyncClient, plc: PlcDirectory, mock_clock: trio.testing.MockClock
) -> None:
    """Three PLC 5xx open the breaker; it then fails fast until 300 s have passed."""
    metrics = Metrics()
    resolver = make_resolver(client, plc, metrics=metrics)
    plc.fail = 500
    for _ in range(3):
        with pytest.raises(ResolutionFailed, match="answered 500") as info:
            await resolver.resolve(DID)
        assert not info.value.breaker_open
    opened_at = trio.current_time()
    with pytest.raises(ResolutionFailed, match="open") as info:
        await resolver.resolve(DID)
    assert info.value.breaker_open
    assert info.value.retry_at == opened_at + 300
    assert plc.request_count == 3
    assert metrics.snapshot()["breaker_transitions[breaker=plc,to=open]"] == 1
    assert metrics.snapshot()["breaker_rejections[breaker=plc]"] == 1
    plc.fail = None
    plc.add(DID, PDS)
    mock_clock.jump(300)
    assert await resolver.resolve(DID) == PDS
    assert resolver.plc_breaker.current_state() is BreakerState.CLOSED


async def test_plc_404_is_neutral(client: httpx.AsyncClient, plc: PlcDirectory) -> None:
    """Unknown DIDs do not count against the PLC breaker."""
    resolver = make_resolver(client, plc)
    for i in range(5):
        with pytest.raises(DidNotFound):
            await resolver.resolve("did:plc:" + "a" * 23 + "abcde"[i])
    assert plc.request_count == 5
    assert resolver.plc_breaker.current_state() is BreakerState.CLOSED


async def test_plc_timeout(
    client: httpx.AsyncClient, plc: PlcDirectory, autojump_clock: trio.testing.MockClock
) -> None:
    """A hanging directory gives ResolutionFailed after exactly the per-attempt timeout."""
    plc.hang = True
    resolver = make_resolver(client, plc, timeout=7.0)
    start = trio.current_time()
    with pytest.raises(ResolutionFailed, match="7 s"):
        await resolver.resolve(DID)
    assert trio.current_time() == start + 7.0
    assert resolver.plc_breaker.consecutive_failures == 1


async def test_plc_unreachable(client: httpx.AsyncClient) -> None:
    """A closed port gives ResolutionFailed naming the connection error."""
    resolver = PdsResolver(client, plc_endpoint="http://127.0.0.1:9", allow_private_networks=True)
    with pytest.raises(ResolutionFailed, match="ConnectError"):
        await resolver.resolve(DID)


async def test_from_settings(client: httpx.AsyncClient, plc: PlcDirectory) -> None:
    """from_settings uses PLC_ENDPOINT and the network policy from the settings."""
    plc.add(DID, "http://127.0.0.1:2583")
    settings = Settings(plc_endpoint=plc.url, allow_private_networks=True)
    resolver = PdsResolver.from_settings(settings, client, Metrics())
    assert await resolver.resolve(DID) == "http://127.0.0.1:2583"
    assert resolver.allow_private_networks and plc.request_count == 1


async def test_oversized_document(client: httpx.AsyncClient, plc: PlcDirectory) -> None:
    """A document over 64 KiB is refused as NoPdsInDocument without reading it all."""
    plc.add_document(DID, {"id": DID, "pad": "x" * 70_000})
    with pytest.raises(NoPdsInDocument, match="larger than"):
        await make_resolver(client, plc).resolve(DID)
