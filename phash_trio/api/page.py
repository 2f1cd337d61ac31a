"""The moderators' page at ``/``: plain HTML and JS from the package, no build step.

Served with a strict Content-Security-Policy (scripts only from this origin, no inline script,
images from https/http for the CDN thumbnails) and ``no-store``.
"""

from __future__ import annotations

from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["page_routes"]

_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' https: http:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def _asset(name: str) -> bytes:
    return files("phash_trio.api").joinpath("static", name).read_bytes()


def page_routes() -> list[Route]:
    index = _asset("index.html")
    script = _asset("page.js")
    headers = {
        "Content-Security-Policy": _CSP,
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }

    async def page(request: Request) -> Response:
        return Response(index, media_type="text/html; charset=utf-8", headers=headers)

    async def page_js(request: Request) -> Response:
        return Response(script, media_type="text/javascript; charset=utf-8", headers=headers)

    return [Route("/", page, methods=["GET"]), Route("/page.js", page_js, methods=["GET"])]
