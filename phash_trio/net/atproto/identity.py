"""DID -> PDS resolution, and the checks that run before any URL is built from untrusted input.

DIDs and CIDs come from the firehose and DID documents come from strangers, so both are
validated before they go into a URL, and a PDS URL found in a document is refused when it points
into a private network (SSRF) unless ``allow_private_networks`` is set (tests, demo).

Errors::

    IdentityError
    ├── InvalidDid          malformed DID: nothing was requested
    ├── DidNotFound         the directory / did:web host says the DID does not exist (404/410)
    ├── NoPdsInDocument     the document has no usable #atproto_pds service (or is not a document)
    ├── UnsafePdsUrl        not https, or the host resolves to a private/loopback/... address
    └── ResolutionFailed    network error, 5xx, 429, timeout, or the PLC breaker is open
                            (transient: worth retrying later)

Documents are cached for ``ttl`` (1 h); DidNotFound, NoPdsInDocument and an unsafe did:web host
for ``negative_ttl`` (5 min) so a broken account does not cost a directory request per image.
The PDS URL itself is checked on every call (DNS may change within the hour).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import trio
from loguru import logger

from phash_trio.config import Settings
from phash_trio.net.atproto.syntax import WEB_DID_RE, is_valid_cid, is_valid_did
from phash_trio.net.breaker import BreakerOpen, CircuitBreaker
from phash_trio.net.endpoints import (
    BadEndpoint,
    Resolve,
    parse_endpoint,
    public_addresses,
    system_resolve,
)
from phash_trio.net.transport import refused_address
from phash_trio.runtime.metrics import Metrics

__all__ = [
    "DidNotFound",
    "IdentityError",
    "InvalidDid",
    "NoPdsInDocument",
    "PdsResolver",
    "ResolutionFailed",
    "UnsafePdsUrl",
    "check_public_url",
    "did_web_host",
    "is_valid_cid",
    "is_valid_did",
    "read_capped",
]

#: DID documents are a few hundred bytes; anything this big is not one.
MAX_DOCUMENT_BYTES = 64 * 1024
#: Bound on cached resolutions (oldest entries are dropped first).
MAX_CACHE_ENTRIES = 100_000

_PDS_SERVICE_TYPE = "AtprotoPersonalDataServer"


def did_web_host(did: str) -> str:
    """``did:web:example.com%3A8080`` -> ``example.com:8080`` (the DID must be valid)."""
    m = WEB_DID_RE.fullmatch(did)
    if m is None:
        raise InvalidDid(did, "not a valid did:web")
    port = m.group("port")
    return m.group("host").lower() + (f":{port}" if port else "")


class IdentityError(Exception):
    """Base of DID resolution errors; ``.did`` names the DID."""

    def __init__(self, did: str, message: str) -> None:
        super().__init__(f"{did!r}: {message}")
        self.did = did
        self.reason = message


class InvalidDid(IdentityError):
    """The DID is malformed; no request was made."""


class DidNotFound(IdentityError):
    """The directory (or did:web host) says this DID does not exist."""


class NoPdsInDocument(IdentityError):
    """The DID document has no usable ``#atproto_pds`` service."""


class UnsafePdsUrl(IdentityError):
    """A URL taken from untrusted data is not https or points into a private network."""


class ResolutionFailed(IdentityError):
    """Transient failure: network, 5xx, 429, timeout, or the PLC breaker is open."""

    def __init__(
        self, did: str, message: str, *, breaker_open: bool = False, retry_at: float | None = None
    ) -> None:
        super().__init__(did, message)
        #: True when nothing was requested because the PLC breaker is open.
        self.breaker_open = breaker_open
        #: Trio time when the breaker will admit a probe (only with ``breaker_open``).
        self.retry_at = retry_at


class _UnexpectedStatus(ResolutionFailed):
    """A status other than 200/404/410 (the caller decides what it means for the breaker)."""

    def __init__(self, did: str, message: str, *, status: int) -> None:
        super().__init__(did, message)
        self.status = status


async def check_public_url(
    url: object,
    did: str,
    *,
    allow_private_networks: bool = False,
    resolve: Resolve = system_resolve,
) -> str:
    """The URL, normalised (ASCII host), once its shape is sound and its host public.

    Every check lives in :mod:`phash_trio.net.endpoints`; any failure there becomes one
    :class:`UnsafePdsUrl`. With ``allow_private_networks`` only the shape is checked (http and
    private addresses allowed). A host that does not resolve raises :class:`ResolutionFailed`
    (DNS trouble is usually transient). The connection itself is pinned to checked addresses
    by :mod:`phash_trio.net.transport`, which closes the DNS-rebinding window after this check.
    """
    try:
        endpoint = parse_endpoint(url, allow_private=allow_private_networks)
    except BadEndpoint as exc:
        raise UnsafePdsUrl(did, f"PDS URL {exc}") from None
    if allow_private_networks:
        return endpoint.url
    try:
        await public_addresses(endpoint.host, endpoint.port, resolve=resolve)
    except BadEndpoint as exc:
        raise UnsafePdsUrl(did, f"{endpoint.url} {exc.reason}") from None
    except OSError as exc:
        raise ResolutionFailed(did, f"cannot resolve host of {endpoint.url}: {exc}") from None
    return endpoint.url


def _pds_from_document(did: str, doc: Any) -> str:
    if not isinstance(doc, dict):
        raise NoPdsInDocument(did, "DID document is not a JSON object")
    doc_id = doc.get("id")
    if doc_id is not None and doc_id != did:
        raise NoPdsInDocument(did, f"DID document is for {doc_id!r}, not this DID")
    services = doc.get("service")
    if not isinstance(services, list):
        raise NoPdsInDocument(did, "DID document has no service list")
    for service in services:
        if not isinstance(service, dict):
            continue
        sid = service.get("id")
        if not isinstance(sid, str) or not (sid == "#atproto_pds" or sid.endswith("#atproto_pds")):
            continue
        if service.get("type") != _PDS_SERVICE_TYPE:
            continue
        endpoint = service.get("serviceEndpoint")
        if not isinstance(endpoint, str) or not endpoint:
            raise NoPdsInDocument(did, "#atproto_pds service has no string serviceEndpoint")
        return endpoint.rstrip("/")
    raise NoPdsInDocument(did, f"DID document has no #atproto_pds {_PDS_SERVICE_TYPE} service")


async def read_capped(
    response: httpx.Response, limit: int, *, raw: bool = False
) -> tuple[bytes, bool]:
    """Read a streamed body; stop and drop the connection as soon as it passes ``limit``.

    Returns ``(body, True)``, or ``(what was read, False)`` when over the limit. ``raw`` skips
    content decoding. httpx reads through a chain of async generators; abandoning them half-way
    makes Trio warn when they are collected (encode/httpx#3686), so after closing the response
    we let the chain run into its (immediate) read error instead of leaving it suspended.
    """
    chunks: AsyncIterator[bytes] = response.aiter_raw() if raw else response.aiter_bytes()
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            break
    else:
        return bytes(body), True
    await response.aclose()
    try:
        async for _ in chunks:
            pass
    except httpx.HTTPError:
        pass
    return bytes(body), False


class PdsResolver:
    """Resolve a DID to its PDS base URL, with a cache and a PLC circuit breaker.

    ``did_web_base`` maps a did:web host (``example.com:8080``) to the base URL its document is
    fetched from; the default is ``https://{host}``. Tests point it at an in-process server (which
    also needs ``allow_private_networks``).
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        plc_endpoint: str = "https://plc.directory",
        timeout: float = 10.0,
        ttl: float = 3600.0,
        negative_ttl: float = 300.0,
        allow_private_networks: bool = False,
        did_web_base: Callable[[str], str] | None = None,
        plc_breaker: CircuitBreaker | None = None,
        metrics: Metrics | None = None,
        web_client: httpx.AsyncClient | None = None,
        resolve: Resolve = system_resolve,
    ) -> None:
        self._client = client
        #: DNS lookups of the address check (injectable: tests play a rebinding DNS server).
        self._resolve = resolve
        #: For did:web hosts (untrusted: see :func:`phash_trio.net.transport.guarded_transport`).
        self._web_client = web_client or client
        self._plc_endpoint = plc_endpoint.rstrip("/")
        self._timeout = timeout
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._allow_private = allow_private_networks
        self._did_web_base = did_web_base or (lambda host: f"https://{host}")
        self.plc_breaker = plc_breaker or CircuitBreaker(
            "plc",
            failure_threshold=3,
            reset_timeout=300.0,
            on_transition=metrics.on_breaker_transition if metrics else None,
            on_reject=metrics.on_breaker_reject if metrics else None,
        )
        # did -> (expires_at, pds url or the permanent error to raise again)
        self._cache: dict[str, tuple[float, str | IdentityError]] = {}

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        client: httpx.AsyncClient,
        metrics: Metrics | None = None,
        web_client: httpx.AsyncClient | None = None,
    ) -> PdsResolver:
        """PLC endpoint, per-attempt timeout and network policy from the service settings."""
        return cls(
            client,
            plc_endpoint=settings.plc_endpoint,
            timeout=settings.blob_download_timeout_secs,
            allow_private_networks=settings.allow_private_networks,
            metrics=metrics,
            web_client=web_client,
        )

    @property
    def allow_private_networks(self) -> bool:
        return self._allow_private

    async def resolve(self, did: str) -> str:
        """The PDS base URL of ``did`` (no trailing slash).

        The document is cached; :func:`check_public_url` runs on every call, so a host whose DNS
        changed since is caught, and a DNS failure is not cached.
        """
        if not is_valid_did(did):
            raise InvalidDid(did, "not a valid did:plc or did:web")
        pds = await self._document_pds(did)
        return await check_public_url(
            pds, did, allow_private_networks=self._allow_private, resolve=self._resolve
        )

    async def _document_pds(self, did: str) -> str:
        now = trio.current_time()
        cached = self._cache.get(did)
        if cached is not None:
            expires_at, value = cached
            if now < expires_at:
                if isinstance(value, IdentityError):
                    # A fresh instance: a shared one would collect tracebacks and contexts.
                    raise type(value)(value.did, value.reason)
                return value
            del self._cache[did]
        try:
            pds = await self._resolve_uncached(did)
        except (DidNotFound, NoPdsInDocument, UnsafePdsUrl) as exc:
            self._remember(did, exc, self._negative_ttl)
            raise
        self._remember(did, pds, self._ttl)
        return pds

    def forget(self, did: str) -> None:
        """Drop a cached answer (e.g. after the PDS said the repo moved)."""
        self._cache.pop(did, None)

    def _remember(self, did: str, value: str | IdentityError, ttl: float) -> None:
        self._cache[did] = (trio.current_time() + ttl, value)
        while len(self._cache) > MAX_CACHE_ENTRIES:
            del self._cache[next(iter(self._cache))]

    async def _resolve_uncached(self, did: str) -> str:
        if did.startswith("did:plc:"):
            doc = await self._fetch_plc(did)
        else:
            url = f"{self._did_web_base(did_web_host(did)).rstrip('/')}/.well-known/did.json"
            url = await check_public_url(
                url, did, allow_private_networks=self._allow_private, resolve=self._resolve
            )
            doc = await self._fetch_document(did, url, self._web_client)
        pds = _pds_from_document(did, doc)
        logger.debug("resolved {} -> {}", did, pds)
        return pds

    async def _fetch_plc(self, did: str) -> Any:
        try:
            self.plc_breaker.before_call()
        except BreakerOpen as exc:
            raise ResolutionFailed(
                did,
                f"PLC directory {self._plc_endpoint}: {exc}",
                breaker_open=True,
                retry_at=exc.retry_at,
            ) from None
        outcome = "failure"  # what a cancellation counts as (releases a half-open probe)
        try:
            doc = await self._fetch_document(did, f"{self._plc_endpoint}/{did}", self._client)
            outcome = "success"
            return doc
        except (DidNotFound, NoPdsInDocument):
            outcome = "neutral"
            raise
        except _UnexpectedStatus as exc:
            # 5xx, 408 and 429 are the directory's trouble; other answers say nothing about it.
            unhealthy = exc.status >= 500 or exc.status in (408, 429)
            outcome = "failure" if unhealthy else "neutral"
            raise
        finally:
            if outcome == "success":
                self.plc_breaker.record_success()
            elif outcome == "neutral":
                self.plc_breaker.record_neutral()
            else:
                self.plc_breaker.record_failure()

    async def _fetch_document(self, did: str, url: str, client: httpx.AsyncClient) -> Any:
        """GET one DID document within the per-attempt timeout; map every failure to our errors."""
        try:
            with trio.fail_after(self._timeout):
                async with client.stream(
                    "GET",
                    url,
                    headers={"accept": "application/did+ld+json, application/json"},
                    timeout=httpx.Timeout(self._timeout),
                    follow_redirects=False,
                ) as response:
                    status = response.status_code
                    if status in (404, 410):
                        raise DidNotFound(did, f"{url} answered {status}")
                    if status != 200:
                        raise _UnexpectedStatus(did, f"{url} answered {status}", status=status)
                    body, complete = await read_capped(response, MAX_DOCUMENT_BYTES)
                    if not complete:
                        raise NoPdsInDocument(
                            did, f"{url}: document larger than {MAX_DOCUMENT_BYTES} bytes"
                        )
        except trio.TooSlowError:
            raise ResolutionFailed(did, f"{url}: no answer within {self._timeout:g} s") from None
        except httpx.HTTPError as exc:
            refused = refused_address(exc)
            if refused is not None:
                raise UnsafePdsUrl(did, f"{url}: {refused}") from None
            raise ResolutionFailed(did, f"{url}: {type(exc).__name__}: {exc}") from None
        except httpx.InvalidURL as exc:  # parse_endpoint should have caught it; never fatal
            raise UnsafePdsUrl(did, f"{url}: {exc}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise NoPdsInDocument(did, f"{url}: document is not JSON") from None
