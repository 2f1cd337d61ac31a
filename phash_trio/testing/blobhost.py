"""In-process fakes of the blob CDN, a PDS's ``getBlob`` and the PLC directory (tests, demo).

Both run on :mod:`phash_trio.testing.httpserver` on ``127.0.0.1:0``. Start one with
``host = await nursery.start(BlobHost.run)`` (or ``async with run_blobhost() as host``); ``.url``
says where it listens. One :class:`BlobHost` answers both the CDN path and the PDS path, so a
test can use one instance for both roles or two instances on separate ports. Faults are plain
attributes, changed at any time: ``fail_cdn``/``fail_pds`` (status to answer), ``delay`` (seconds
before answering), ``hang``/``hang_cdn``/``hang_pds`` (never answer), ``slow_body`` (seconds
between small pieces), ``chunked`` (no Content-Length). Every request is logged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from phash_trio.testing.httpserver import HttpServer, Request, Response, json_response, serve_http
from phash_trio.testing.jetstream_replay import RAW, fake_cid

__all__ = ["BlobHost", "PlcDirectory", "cid_for", "did_document", "run_blobhost", "run_plc"]

CDN_PREFIX = "/img/feed_fullsize/plain/"
#: The CDN's thumbnail path (the moderators' page shows these); same bytes here.
CDN_THUMB_PREFIX = "/img/feed_thumbnail/plain/"
GET_BLOB = "/xrpc/com.atproto.sync.getBlob"
#: Piece size for ``slow_body`` and ``chunked`` answers.
PIECE_BYTES = 16 * 1024


def cid_for(data: bytes) -> str:
    """The real CIDv1 of ``data`` (raw codec, sha2-256), as a PDS names an uploaded blob."""
    return fake_cid(data, codec=RAW)


def _xrpc_error(status: int, error: str, message: str) -> Response:
    return json_response({"error": error, "message": message}, status)


@attrs.define
class BlobHost:
    """A CDN and PDS in one: serves added blobs by (DID, CID), with injectable faults."""

    blobs: dict[tuple[str, str], bytes] = attrs.field(factory=dict)
    #: Status the CDN path answers instead of the blob (``None``: behave).
    fail_cdn: int | None = None
    #: Status the PDS path answers instead of the blob (``None``: behave).
    fail_pds: int | None = None
    #: Seconds to wait before answering anything.
    delay: float = 0.0
    #: Never answer (both paths, or one).
    hang: bool = False
    hang_cdn: bool = False
    hang_pds: bool = False
    #: Seconds between pieces of ``PIECE_BYTES`` (``None``: send at once).
    slow_body: float | None = None
    #: Send bodies chunked, without Content-Length (implied by ``slow_body``).
    chunked: bool = False
    #: ``(path, query)`` of every request, in order.
    requests: list[tuple[str, dict[str, str]]] = attrs.field(factory=list)
    cdn_requests: int = 0
    pds_requests: int = 0
    #: Body bytes handed to the socket by streamed answers (to see a client stop reading).
    bytes_streamed: int = 0
    server: HttpServer | None = None

    cid_for = staticmethod(cid_for)

    @property
    def url(self) -> str:
        if self.server is None:
            raise RuntimeError("BlobHost is not running")
        return self.server.url

    def add(self, did: str, cid: str, data: bytes) -> None:
        """Serve ``data`` as blob ``cid`` of ``did`` on both paths."""
        self.blobs[(did, cid)] = data

    def add_image(self, did: str, data: bytes) -> str:
        """Add ``data`` under its real CID and return the CID."""
        cid = cid_for(data)
        self.add(did, cid, data)
        return cid

    @classmethod
    async def run(
        cls,
        host: str = "127.0.0.1",
        *,
        task_status: trio.TaskStatus[BlobHost] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Create a host and serve it until cancelled (``nursery.start`` gets the instance)."""
        await cls().serve(host, task_status=task_status)

    async def serve(
        self,
        host: str = "127.0.0.1",
        *,
        task_status: trio.TaskStatus[BlobHost] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            self.server = await nursery.start(serve_http, self.handle, host)
            task_status.started(self)

    async def handle(self, request: Request) -> Response:
        path, query = request.path, request.query
        self.requests.append((path, query))
        if path.startswith(CDN_PREFIX):
            self.cdn_requests += 1
            return await self._cdn(path.removeprefix(CDN_PREFIX))
        if path.startswith(CDN_THUMB_PREFIX):
            return await self._cdn(path.removeprefix(CDN_THUMB_PREFIX))
        if path == GET_BLOB:
            self.pds_requests += 1
            return await self._pds(query)
        return _xrpc_error(404, "NotFound", f"no route for {path}")

    async def _misbehave(self, hang: bool) -> None:
        if self.delay:
            await trio.sleep(self.delay)
        if self.hang or hang:
            await trio.sleep_forever()

    async def _cdn(self, rest: str) -> Response:
        await self._misbehave(self.hang_cdn)
        if self.fail_cdn is not None:
            return Response(self.fail_cdn, b"cdn failure", {"content-type": "text/plain"})
        did, _, name = rest.partition("/")
        cid = name.removesuffix("@jpeg")
        data = self.blobs.get((did, cid))
        if data is None or not name.endswith("@jpeg"):
            return Response(404, b"Not Found", {"content-type": "text/plain"})
        return self._body(data, "image/jpeg")

    async def _pds(self, query: dict[str, str]) -> Response:
        await self._misbehave(self.hang_pds)
        if self.fail_pds is not None:
            return _xrpc_error(self.fail_pds, "InternalServerError", "pds failure")
        did, cid = query.get("did"), query.get("cid")
        if not did or not cid:
            return _xrpc_error(400, "InvalidRequest", "did and cid are required")
        data = self.blobs.get((did, cid))
        if data is None:
            return _xrpc_error(400, "BlobNotFound", "Blob not found")
        return self._body(data, "application/octet-stream")

    def _body(self, data: bytes, content_type: str) -> Response:
        headers = {"content-type": content_type}
        if self.slow_body is None and not self.chunked:
            return Response(200, data, headers)
        return Response(200, headers=headers, stream=lambda: _Pieces(self, data, self.slow_body))


class _Pieces:
    """Body pieces with optional pauses; an iterator object, not an async generator, because
    the server abandons it when the client hangs up and Trio warns about abandoned generators."""

    def __init__(self, host: BlobHost, data: bytes, pause: float | None) -> None:
        self._host = host
        self._data = data
        self._pause = pause
        self._offset = 0

    def __aiter__(self) -> _Pieces:
        return self

    async def __anext__(self) -> bytes:
        if self._offset >= len(self._data):
            raise StopAsyncIteration
        if self._pause:
            await trio.sleep(self._pause)
        piece = self._data[self._offset : self._offset + PIECE_BYTES]
        self._offset += len(piece)
        self._host.bytes_streamed += len(piece)
        return piece


def did_document(did: str, pds_url: str, handle: str = "alice.test") -> dict[str, Any]:
    """A DID document shaped like plc.directory's answer."""
    return {
        "@context": [
            "https://www.w3.org/ns/did/v1",
            "https://w3id.org/security/multikey/v1",
            "https://w3id.org/security/suites/secp256k1-2019/v1",
        ],
        "id": did,
        "alsoKnownAs": [f"at://{handle}"],
        "verificationMethod": [
            {
                "id": f"{did}#atproto",
                "type": "Multikey",
                "controller": did,
                "publicKeyMultibase": "zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF",
            }
        ],
        "service": [
            {
                "id": "#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": pds_url,
            }
        ],
    }


@attrs.define
class PlcDirectory:
    """A PLC directory: ``GET /{did}`` answers the DID document.

    It also serves did:web documents at ``/did-web/{host}/.well-known/did.json``, so a resolver
    built with ``did_web_base=plc.did_web_base`` finds did:web DIDs here.
    """

    documents: dict[str, Any] = attrs.field(factory=dict)
    #: Status to answer instead of the document (``None``: behave).
    fail: int | None = None
    hang: bool = False
    delay: float = 0.0
    requests: list[str] = attrs.field(factory=list)
    server: HttpServer | None = None

    @property
    def url(self) -> str:
        if self.server is None:
            raise RuntimeError("PlcDirectory is not running")
        return self.server.url

    @property
    def request_count(self) -> int:
        return len(self.requests)

    def did_web_base(self, host: str) -> str:
        """Where this directory serves the did:web document of ``host`` (for ``PdsResolver``)."""
        return f"{self.url}/did-web/{host}"

    def add(self, did: str, pds_url: str) -> None:
        """Register ``did`` with a realistic document pointing at ``pds_url``."""
        self.documents[did] = did_document(did, pds_url)

    def add_document(self, did: str, document: Any) -> None:
        """Register any JSON value as the document of ``did`` (malformed ones included)."""
        self.documents[did] = document

    @classmethod
    async def run(
        cls,
        host: str = "127.0.0.1",
        *,
        task_status: trio.TaskStatus[PlcDirectory] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await cls().serve(host, task_status=task_status)

    async def serve(
        self,
        host: str = "127.0.0.1",
        *,
        task_status: trio.TaskStatus[PlcDirectory] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            self.server = await nursery.start(serve_http, self.handle, host)
            task_status.started(self)

    async def handle(self, request: Request) -> Response:
        path = request.path
        self.requests.append(path)
        if self.delay:
            await trio.sleep(self.delay)
        if self.hang:
            await trio.sleep_forever()
        if self.fail is not None:
            return json_response({"message": "directory failure"}, self.fail)
        if path.startswith("/did-web/") and path.endswith("/.well-known/did.json"):
            host = path.removeprefix("/did-web/").removesuffix("/.well-known/did.json")
            did = "did:web:" + host.replace(":", "%3A")
        else:
            did = path.lstrip("/")
        if did not in self.documents:
            return json_response({"message": f"DID not registered: {did}"}, 404)
        return json_response(self.documents[did])


@asynccontextmanager
async def run_blobhost() -> AsyncIterator[BlobHost]:
    """A running :class:`BlobHost` for the duration of the block."""
    async with trio.open_nursery() as nursery:
        host: BlobHost = await nursery.start(BlobHost.run)
        try:
            yield host
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def run_plc() -> AsyncIterator[PlcDirectory]:
    """A running :class:`PlcDirectory` for the duration of the block."""
    async with trio.open_nursery() as nursery:
        plc: PlcDirectory = await nursery.start(PlcDirectory.run)
        try:
            yield plc
        finally:
            nursery.cancel_scope.cancel()
