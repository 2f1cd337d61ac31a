"""The operator's window: ``GET /metrics`` for Prometheus and ``GET /healthz`` for probes.

Served by the small in-house HTTP server on ``METRICS_ADDR`` (default ``127.0.0.1:9464``).
``/healthz`` answers 200 ``ok`` while the injected ``health()`` says so, else 503 with its
reason, so a probe or a human with curl sees why the service is unhealthy.
"""

from __future__ import annotations

from collections.abc import Callable

import trio
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from phash_trio.httpserver import Handler, HttpServer, Request, Response, serve_http
from phash_trio.metrics import Metrics

__all__ = ["StatusAddressError", "make_handler", "parse_addr", "run_status_server"]

Health = Callable[[], tuple[bool, str]]

_TEXT = "text/plain; charset=utf-8"


class StatusAddressError(ValueError):
    """The listen address is not ``HOST:PORT``."""


def parse_addr(addr: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too) into host and port; port 0 picks a free one."""
    host, sep, port = addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise StatusAddressError(f"status address {addr!r} is not HOST:PORT")
    return host, int(port)


def make_handler(metrics: Metrics, health: Health) -> Handler:
    """The request handler, separate from the socket so the routing is easy to read."""

    async def handle(request: Request) -> Response:
        if request.path not in ("/metrics", "/healthz"):
            return Response(404, b"not found\n", {"content-type": _TEXT})
        if request.method != "GET":
            return Response(405, b"method not allowed\n", {"content-type": _TEXT, "allow": "GET"})
        if request.path == "/metrics":
            return Response(
                200, generate_latest(metrics.registry), {"content-type": CONTENT_TYPE_LATEST}
            )
        try:
            healthy, reason = health()
        except Exception as exc:
            logger.exception("health check raised")
            healthy, reason = False, f"health check failed: {exc!r}"
        headers = {"content-type": _TEXT, "cache-control": "no-store"}
        if healthy:
            return Response(200, b"ok\n", headers)
        return Response(503, (reason or "unhealthy").encode() + b"\n", headers)

    return handle


async def run_status_server(
    addr: str,
    metrics: Metrics,
    health: Health,
    *,
    task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics and /healthz on ``addr`` until cancelled; started() gets the real port."""
    host, port = parse_addr(addr)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_http, make_handler(metrics, health), host, port)
        logger.info("status endpoint on {}/metrics and /healthz", server.url)
        task_status.started(server)
