"""JSON errors in the shape each family of clients reads.

HMA 2.0's clients read ``{"message": "…"}`` (Flask's ``abort(code, message)`` as HMA's
blueprints use it); the ATproto-HMA bridge's clients read ``{"success": false, "error": "…"}``.
Routes raise :class:`~phash_trio.api.auth.ApiError`; :func:`install_error_handlers` renders it by
path: ``/api/`` in the bridge's shape, anything else in HMA's.
"""

from __future__ import annotations

from collections.abc import Mapping

from loguru import logger
from prometheus_client import CollectorRegistry, Counter
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from phash_trio.api.auth import ApiError

__all__ = ["error_response", "install_error_handlers"]


def error_response(
    path: str, status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """``message`` with ``status`` in the shape the clients of ``path`` expect."""
    body: dict[str, object]
    if path.startswith("/api/"):
        body = {"success": False, "error": message}
    else:
        body = {"message": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _count(request: Request, status: int, message: str) -> None:
    """One counter increment and one DEBUG line per refused request (never the body or key:
    messages name fields and reasons only)."""
    counter: Counter | None = getattr(request.app.state, "api_errors", None)
    if counter is not None:
        counter.labels(status=str(status)).inc()
    logger.debug("API {} {} -> {}: {}", request.method, request.url.path, status, message)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    _count(request, exc.status, exc.message)
    return error_response(request.url.path, exc.status, exc.message, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    _count(request, exc.status_code, str(exc.detail))
    return error_response(request.url.path, exc.status_code, str(exc.detail), exc.headers)


def install_error_handlers(app: Starlette, registry: CollectorRegistry | None = None) -> None:
    """ApiError and Starlette's own 404/405 as JSON in the path's client shape; with a
    ``registry``, ``phash_api_errors_total{status}`` counts them."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    if registry is not None:
        app.state.api_errors = Counter(
            "phash_api_errors", "API requests answered with an error", ["status"], registry=registry
        )
