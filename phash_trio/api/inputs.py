"""Getting an image (or parameters) out of a request: multipart files, JSON, URLs.

Uploads are read from a multipart form whose size the app's body limit already capped; a URL
is fetched through the SSRF-guarded client (:func:`phash_trio.net.transport.guarded_transport`:
public addresses only unless ``ALLOW_PRIVATE_NETWORKS``), after :func:`parse_endpoint`'s shape
checks, streamed and cut off at the image cap. Errors are :class:`BadInput` (400) whose message
names the field or the URL's host, never the body.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import Response

from phash_trio.api.auth import ApiError
from phash_trio.net.endpoints import BadEndpoint, parse_endpoint
from phash_trio.net.transport import refused_address

__all__ = [
    "BadInput",
    "UrlFetcher",
    "closing",
    "form_files",
    "read_form",
    "read_json",
    "read_upload",
]

#: Non-file form fields accepted per request, and their largest size.
MAX_FIELDS = 32
MAX_FIELD_BYTES = 64 * 1024
MAX_URL_CHARS = 2048


class BadInput(ApiError):
    """A malformed request (400)."""

    status = 400


Handler = Callable[[Request], Awaitable[Response]]


def closing(handler: Handler) -> Handler:
    """Close the request's parsed form (its spooled upload files) whatever the outcome."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        finally:
            await request.close()

    return wrapper


async def read_form(request: Request) -> FormData:
    """The multipart (or urlencoded) form; a malformed one is BadInput."""
    try:
        return await request.form(max_files=4, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES)
    except (MultiPartException, HTTPException) as exc:
        # Anything else (the body limit cutting the stream off) is not ours to translate.
        detail = exc.detail if isinstance(exc, HTTPException) else exc.message
        raise BadInput(f"malformed form data: {detail}") from None


def form_files(form: FormData) -> list[tuple[str, UploadFile]]:
    """Every uploaded file of the form with its field name."""
    return [(name, value) for name, value in form.multi_items() if isinstance(value, UploadFile)]


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """The file's bytes, at most ``max_bytes`` (BadInput beyond)."""
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BadInput(f"the uploaded file is over {max_bytes} bytes")
    return data


async def read_json(request: Request) -> Any:
    """The JSON body (None when there is none); malformed JSON is BadInput."""
    body = await request.body()
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadInput("the request body is not valid JSON") from None


def is_multipart(request: Request) -> bool:
    kind = request.headers.get("content-type", "").lower()
    return kind.startswith("multipart/form-data") or kind.startswith(
        "application/x-www-form-urlencoded"
    )


def first_file(form: FormData, names: Sequence[str]) -> UploadFile | None:
    """The file under the first of ``names`` present (clients disagree on the field)."""
    for name in names:
        value = form.get(name)
        if isinstance(value, UploadFile):
            return value
    return None


class UrlFetcher:
    """GET an image by URL from a stranger's request, within time and size limits."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        max_bytes: int,
        timeout: float = 10.0,
        allow_private: bool = False,
    ) -> None:
        self.client = client
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.allow_private = allow_private

    async def fetch(self, url: str) -> tuple[bytes, str]:
        """``(body, content type)``; BadInput for a refused URL, a failure or a large body."""
        if len(url) > MAX_URL_CHARS or not url.isprintable() or any(c.isspace() for c in url):
            raise BadInput("url is malformed or longer than 2048 characters")
        try:
            parts = urlsplit(url)
            # parse_endpoint refuses queries (a PDS endpoint has none): it judges the scheme,
            # host, port and address; the path and query are sent as given.
            endpoint = parse_endpoint(
                f"{parts.scheme}://{parts.netloc}", allow_private=self.allow_private
            )
        except BadEndpoint as exc:
            raise BadInput(f"url refused: {exc.reason}") from None
        except ValueError:
            raise BadInput("url is malformed") from None
        target = endpoint.url + (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = endpoint.host
        try:
            with trio.fail_after(self.timeout):
                async with self.client.stream("GET", target, follow_redirects=False) as response:
                    if response.status_code != 200:
                        raise BadInput(f"url returned HTTP {response.status_code} ({host})")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > self.max_bytes:
                        raise BadInput(f"url's content is over {self.max_bytes} bytes ({host})")
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > self.max_bytes:
                            raise BadInput(f"url's content is over {self.max_bytes} bytes ({host})")
                        chunks.append(chunk)
                    return b"".join(chunks), response.headers.get("content-type", "")
        except trio.TooSlowError:
            raise BadInput(f"url fetch timed out after {self.timeout:g}s ({host})") from None
        except httpx.HTTPError as exc:
            if refused_address(exc) is not None:
                raise BadInput(f"url refused: {host} is not a public address") from None
            raise BadInput(f"url fetch failed: {type(exc).__name__} ({host})") from None
