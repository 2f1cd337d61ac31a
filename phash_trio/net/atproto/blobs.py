"""Download one image blob: the Bluesky CDN first, then the author's own PDS.

The CDN is operator configuration and trusted; the PDS URL comes from a stranger's DID document,
so it is checked (:func:`phash_trio.net.atproto.identity.check_public_url`) before every request and
redirects are never followed. DIDs and CIDs are validated before any URL is built. Bodies are
read as a stream and abandoned as soon as they pass ``max_bytes``. Each attempt has its own
timeout and the whole fetch a total one, both as Trio scopes (httpx's own timeouts are set too).

Errors (``.permanent`` says whether retrying the same blob can help)::

    BlobError
    ├── InvalidDid        malformed DID, nothing requested (also an identity.InvalidDid)  permanent
    ├── InvalidCid        malformed CID, nothing requested                                 permanent
    ├── BlobNotFound      the sources say it is not there, or the PDS cannot be used      permanent
    ├── BlobTooLarge      more than max_bytes                                              permanent
    └── BlobUnavailable   network, 5xx, 429, timeouts, open breaker                        transient
                          (.breaker_open / .retry_at when a breaker refused the last source)

Breakers: one for the CDN (5 failures, 60 s), one per PDS host (3, 300 s, created on first use),
and the PLC one inside :class:`~phash_trio.net.atproto.identity.PdsResolver`. A 404-like answer is neutral,
5xx/429/timeouts/connection errors are failures.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar
from urllib.parse import urlsplit

import attrs
import httpx
import trio
from loguru import logger

from phash_trio.config import Settings
from phash_trio.net.atproto import identity
from phash_trio.net.atproto.identity import (
    IdentityError,
    PdsResolver,
    ResolutionFailed,
    check_public_url,
    is_valid_cid,
    is_valid_did,
    read_capped,
)
from phash_trio.net.breaker import BreakerOpen, CircuitBreaker
from phash_trio.net.transport import refused_address
from phash_trio.runtime.metrics import Metrics

__all__ = [
    "BlobError",
    "BlobFetcher",
    "BlobNotFound",
    "BlobTooLarge",
    "BlobUnavailable",
    "InvalidCid",
    "InvalidDid",
]

DEFAULT_MAX_BYTES = 2_000_000
#: PDS breakers kept, least recently used dropped first (did:web makes hosts cheap to invent).
MAX_PDS_BREAKERS = 10_000
_GET_BLOB = "/xrpc/com.atproto.sync.getBlob"


class BlobError(Exception):
    """Base of blob fetch errors; ``.did`` and ``.cid`` name the blob."""

    #: True when fetching the same blob again cannot help.
    permanent: ClassVar[bool] = True

    def __init__(self, message: str, *, did: str, cid: str) -> None:
        Exception.__init__(self, message)
        self.did = did
        self.cid = cid


class InvalidDid(BlobError, identity.InvalidDid):
    """The DID is malformed; no request was made."""

    def __init__(self, message: str, *, did: str, cid: str) -> None:
        super().__init__(message, did=did, cid=cid)
        self.reason = message


class InvalidCid(BlobError):
    """The CID is malformed; no request was made."""


class BlobNotFound(BlobError):
    """Every source refused the blob for good (404/400, unknown DID, unusable PDS)."""


class BlobTooLarge(BlobError):
    """The blob is bigger than the configured cap."""

    def __init__(
        self, message: str, *, did: str, cid: str, limit: int, size: int | None = None
    ) -> None:
        super().__init__(message, did=did, cid=cid)
        self.limit = limit
        #: Declared Content-Length, or the bytes read when we stopped reading.
        self.size = size


class BlobUnavailable(BlobError):
    """A transient failure: network, 5xx, 429, timeouts, or an open breaker."""

    permanent: ClassVar[bool] = False

    def __init__(
        self, message: str, *, did: str, cid: str, breaker_open: bool, retry_at: float | None
    ) -> None:
        super().__init__(message, did=did, cid=cid)
        #: True when the last source was not tried because its breaker is open.
        self.breaker_open = breaker_open
        #: Trio time when that breaker admits a probe again (``None`` unless ``breaker_open``).
        self.retry_at = retry_at


class _Kind(enum.Enum):
    NOT_FOUND = "not found"  # this source will not serve the blob (404, 400, redirect, ...)
    TOO_LARGE = "too large"  # the source has it, but it exceeds max_bytes
    UNREACHABLE = "unreachable"  # the PDS is unknown or must not be contacted
    TRANSIENT = "transient"  # network, 5xx, 429, timeout, open breaker


@attrs.frozen
class _Failure:
    """Why one source did not give us the blob."""

    kind: _Kind
    detail: str
    #: Set when a breaker refused the call.
    retry_at: float | None = None
    size: int | None = None


class _SourceFailed(Exception):
    def __init__(self, failure: _Failure) -> None:
        super().__init__(failure.detail)
        self.failure = failure


def _classify_status(status: int) -> _Kind:
    if status >= 500 or status in (408, 429):
        return _Kind.TRANSIENT
    return _Kind.NOT_FOUND


class BlobFetcher:
    """Fetch blob bytes by (DID, CID) through one shared ``httpx.AsyncClient``."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        cdn_url: str,
        resolver: PdsResolver,
        metrics: Metrics,
        attempt_timeout: float = 10.0,
        total_timeout: float = 30.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        allow_private_networks: bool = False,
        cdn_breaker: CircuitBreaker | None = None,
        pds_breaker_factory: Callable[[str], CircuitBreaker] | None = None,
        pds_client: httpx.AsyncClient | None = None,
        max_pds_breakers: int = MAX_PDS_BREAKERS,
    ) -> None:
        self._client = client
        self._max_pds_breakers = max_pds_breakers
        #: For PDS hosts (untrusted: see :func:`phash_trio.net.transport.guarded_transport`).
        self._pds_client = pds_client or client
        self._cdn_url = cdn_url.rstrip("/")
        self._resolver = resolver
        self._metrics = metrics
        self._attempt_timeout = attempt_timeout
        self._total_timeout = total_timeout
        self._max_bytes = max_bytes
        self._allow_private = allow_private_networks
        self.cdn_breaker = cdn_breaker or CircuitBreaker(
            "cdn",
            failure_threshold=5,
            reset_timeout=60.0,
            on_transition=metrics.on_breaker_transition,
            on_reject=metrics.on_breaker_reject,
        )
        self._pds_breaker_factory = pds_breaker_factory or self._default_pds_breaker
        self._pds_breakers: OrderedDict[str, CircuitBreaker] = OrderedDict()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        client: httpx.AsyncClient,
        resolver: PdsResolver,
        metrics: Metrics,
        pds_client: httpx.AsyncClient | None = None,
    ) -> BlobFetcher:
        return cls(
            client,
            pds_client=pds_client,
            cdn_url=settings.cdn_url,
            resolver=resolver,
            metrics=metrics,
            attempt_timeout=settings.blob_download_timeout_secs,
            total_timeout=settings.blob_total_timeout_secs,
            max_bytes=settings.max_blob_bytes,
            allow_private_networks=settings.allow_private_networks,
        )

    def _default_pds_breaker(self, host: str) -> CircuitBreaker:
        metrics = self._metrics
        # Metrics use one "pds" label (hosts are unbounded); the breaker's log names the host.
        return CircuitBreaker(
            f"pds:{host}",
            failure_threshold=3,
            reset_timeout=300.0,
            on_transition=lambda _name, old, new: metrics.on_breaker_transition("pds", old, new),
            on_reject=lambda _name: metrics.on_breaker_reject("pds"),
        )

    def pds_breaker(self, host: str) -> CircuitBreaker:
        """The breaker of one PDS host (``host[:port]``), created on first use.

        At most ``max_pds_breakers`` are kept, least recently used dropped first: an invented
        host per post cannot grow memory, and a dropped open breaker costs one request later.
        """
        host = host.lower()
        breaker = self._pds_breakers.get(host)
        if breaker is None:
            breaker = self._pds_breakers[host] = self._pds_breaker_factory(host)
            while len(self._pds_breakers) > self._max_pds_breakers:
                self._pds_breakers.popitem(last=False)
        else:
            self._pds_breakers.move_to_end(host)
        return breaker

    @property
    def pds_breaker_count(self) -> int:
        return len(self._pds_breakers)

    def cdn_blob_url(self, did: str, cid: str) -> str:
        return f"{self._cdn_url}/img/feed_fullsize/plain/{did}/{cid}@jpeg"

    async def fetch(self, did: str, cid: str) -> bytes:
        """The blob's bytes, or a :class:`BlobError` naming every endpoint tried."""
        if not is_valid_did(did):
            raise InvalidDid(f"blob {cid!r} of {did!r}: invalid DID", did=did, cid=cid)
        if not is_valid_cid(cid):
            raise InvalidCid(f"blob {cid!r} of {did}: invalid CID", did=did, cid=cid)
        failures: list[_Failure] = []
        steps: list[str] = []  # what we were doing, for the total-timeout message
        data: bytes | None = None
        with trio.move_on_after(self._total_timeout) as scope:
            data = await self._from_sources(did, cid, failures, steps)
        if scope.cancelled_caught:
            failures.append(
                _Failure(
                    _Kind.TRANSIENT,
                    f"{steps[-1]}: gave up at the total timeout of {self._total_timeout:g} s",
                )
            )
        if data is None:
            raise self._error(did, cid, failures)
        self._metrics.blobs_downloaded.inc()
        return data

    async def _from_sources(
        self, did: str, cid: str, failures: list[_Failure], steps: list[str]
    ) -> bytes | None:
        cdn_url = self.cdn_blob_url(did, cid)
        steps.append(f"CDN {cdn_url}")
        try:
            return await self._download("CDN", cdn_url, None, self.cdn_breaker, self._client)
        except _SourceFailed as exc:
            failures.append(exc.failure)
            logger.debug("blob {} of {}: {}; trying the PDS", cid, did, exc.failure.detail)
        steps.append("PDS lookup")
        try:
            # resolve() checks the PDS URL on every call; check here only if we are stricter.
            url = await self._resolver.resolve(did) + _GET_BLOB
            if self._resolver.allow_private_networks and not self._allow_private:
                url = await check_public_url(url, did)
        except ResolutionFailed as exc:
            retry_at = exc.retry_at if exc.breaker_open else None
            failures.append(_Failure(_Kind.TRANSIENT, f"PDS lookup: {exc}", retry_at=retry_at))
            return None
        except IdentityError as exc:
            failures.append(_Failure(_Kind.UNREACHABLE, f"PDS lookup: {exc}"))
            return None
        breaker = self.pds_breaker(urlsplit(url).netloc)
        steps.append(f"PDS {url}")
        try:
            return await self._download(
                "PDS", url, {"did": did, "cid": cid}, breaker, self._pds_client
            )
        except _SourceFailed as exc:
            failures.append(exc.failure)
            return None

    async def _download(
        self,
        source: str,
        url: str,
        params: dict[str, str] | None,
        breaker: CircuitBreaker,
        client: httpx.AsyncClient,
    ) -> bytes:
        """One attempt through ``breaker``; raises :class:`_SourceFailed`."""
        try:
            breaker.before_call()
        except BreakerOpen as exc:
            raise _SourceFailed(
                _Failure(_Kind.TRANSIENT, f"{source} {url}: {exc}", retry_at=exc.retry_at)
            ) from None
        # A cancelled attempt (total timeout, shutdown) counts as a failure: it must release a
        # half-open probe slot, and closing the breaker on no evidence would be wrong.
        record = breaker.record_failure
        try:
            data = await self._download_once(source, url, params, client)
            record = breaker.record_success
            return data
        except _SourceFailed as exc:
            if exc.failure.kind in (_Kind.NOT_FOUND, _Kind.UNREACHABLE):
                record = breaker.record_neutral
            elif exc.failure.kind is _Kind.TOO_LARGE:
                record = breaker.record_success  # it answered properly
            raise
        finally:
            record()

    async def _download_once(
        self, source: str, url: str, params: dict[str, str] | None, client: httpx.AsyncClient
    ) -> bytes:
        where = f"{source} {url}"
        limit = self._max_bytes
        body = b""
        try:
            with trio.fail_after(self._attempt_timeout):
                async with client.stream(
                    "GET",
                    url,
                    params=params,
                    # Encoded bodies would make the size cap apply after decompression.
                    headers={"accept-encoding": "identity"},
                    timeout=httpx.Timeout(self._attempt_timeout),
                    follow_redirects=False,
                ) as response:
                    status = response.status_code
                    if status != 200:
                        raise _SourceFailed(
                            _Failure(_classify_status(status), f"{where}: {status}")
                        )
                    encoding = response.headers.get("content-encoding", "identity").lower()
                    if encoding not in ("", "identity"):
                        raise _SourceFailed(
                            _Failure(
                                _Kind.NOT_FOUND, f"{where}: unasked content-encoding {encoding!r}"
                            )
                        )
                    declared = _content_length(response)
                    if declared is not None and declared > limit:
                        raise _SourceFailed(
                            _Failure(
                                _Kind.TOO_LARGE,
                                f"{where}: Content-Length {declared} exceeds {limit} bytes",
                                size=declared,
                            )
                        )
                    body, complete = await read_capped(response, limit, raw=True)
                    if not complete:
                        raise _SourceFailed(
                            _Failure(
                                _Kind.TOO_LARGE,
                                f"{where}: body exceeds {limit} bytes",
                                size=len(body),
                            )
                        )
        except trio.TooSlowError:
            raise _SourceFailed(
                _Failure(
                    _Kind.TRANSIENT,
                    f"{where}: no complete answer within {self._attempt_timeout:g} s",
                )
            ) from None
        except httpx.HTTPError as exc:
            refused = refused_address(exc)
            if refused is not None:  # the host rebound to a private address since the check
                raise _SourceFailed(_Failure(_Kind.UNREACHABLE, f"{where}: {refused}")) from None
            raise _SourceFailed(
                _Failure(_Kind.TRANSIENT, f"{where}: {type(exc).__name__}: {exc}")
            ) from None
        except httpx.InvalidURL as exc:  # endpoints are checked first; still never fatal
            raise _SourceFailed(_Failure(_Kind.UNREACHABLE, f"{where}: {exc}")) from None
        return body

    def _error(self, did: str, cid: str, failures: list[_Failure]) -> BlobError:
        """One error for the whole fetch: the PDS is the source of truth, transient wins ties."""
        message = f"blob {cid} of {did}: " + "; ".join(f.detail for f in failures)
        kinds = {f.kind for f in failures}
        last = failures[-1]
        if last.kind is _Kind.TRANSIENT or (
            last.kind is _Kind.UNREACHABLE and _Kind.TRANSIENT in kinds
        ):
            return BlobUnavailable(
                message,
                did=did,
                cid=cid,
                breaker_open=last.retry_at is not None,
                retry_at=last.retry_at,
            )
        too_large = [f for f in failures if f.kind is _Kind.TOO_LARGE]
        if too_large:
            return BlobTooLarge(
                message, did=did, cid=cid, limit=self._max_bytes, size=too_large[-1].size
            )
        return BlobNotFound(message, did=did, cid=cid)


def _content_length(response: httpx.Response) -> int | None:
    raw = response.headers.get("content-length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None
