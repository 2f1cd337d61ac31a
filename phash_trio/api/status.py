"""``GET /metrics`` (prometheus_client's ASGI app) and ``GET /healthz`` (200 ``ok`` or 503 with
the reason, so a probe or a human with curl sees why the service is unhealthy)."""

from __future__ import annotations

from collections.abc import Callable

from loguru import logger
from prometheus_client import make_asgi_app
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from phash_trio.runtime.metrics import Metrics

__all__ = ["Health", "status_routes"]

Health = Callable[[], tuple[bool, str]]


class _Utf8Only:
    """prometheus_client decodes the query and headers as UTF-8 and raises on anything else;
    answer such a request 400 here instead of a 500 with a traceback in the log. (A class, not
    a function: Starlette treats plain functions as request handlers, not ASGI apps.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            scope.get("query_string", b"").decode("utf-8")
            for _name, value in scope.get("headers", ()):
                value.decode("utf-8")
        except UnicodeDecodeError:
            response = PlainTextResponse("request is not UTF-8\n", status_code=400)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def status_routes(metrics: Metrics, health: Health) -> list[Route]:
    """The operator's routes, GET only (Starlette answers 405 with ``Allow`` otherwise)."""

    async def healthz(_request: Request) -> PlainTextResponse:
        try:
            healthy, reason = health()
        except Exception as exc:
            logger.exception("health check raised")
            healthy, reason = False, f"health check failed: {exc!r}"
        headers = {"cache-control": "no-store"}
        if healthy:
            return PlainTextResponse("ok\n", headers=headers)
        return PlainTextResponse((reason or "unhealthy") + "\n", status_code=503, headers=headers)

    return [
        Route("/metrics", _Utf8Only(make_asgi_app(metrics.registry)), methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
