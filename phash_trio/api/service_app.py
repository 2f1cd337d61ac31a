"""The whole HTTP side in one app: /metrics, /healthz and the hash-and-match API.

:func:`build_api_app` puts the routes of :mod:`~phash_trio.api.hma`,
:mod:`~phash_trio.api.bridge`, :mod:`~phash_trio.api.check` and ``/openapi.json`` (plus any
``extra_routes``, e.g. issue 14's log and events) on :func:`~phash_trio.api.app.create_app`'s
app, with the :class:`~phash_trio.api.auth.Auth` in ``app.state.auth`` (read by
:func:`~phash_trio.api.auth.require_scope`), the :class:`ApiContext` in ``app.state.api``, and
errors rendered as JSON in each family's shape (:mod:`~phash_trio.api.errors`).
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.applications import Starlette
from starlette.routing import BaseRoute

from phash_trio.api.app import create_app
from phash_trio.api.auth import Auth
from phash_trio.api.bridge import bridge_routes
from phash_trio.api.check import check_routes
from phash_trio.api.context import ApiContext
from phash_trio.api.errors import install_error_handlers
from phash_trio.api.hma import hma_routes
from phash_trio.api.openapi import openapi_routes
from phash_trio.api.status import Health
from phash_trio.runtime.metrics import Metrics

__all__ = ["api_body_limit", "build_api_app"]

#: Room for the multipart framing and form fields around an image of the blob cap.
MULTIPART_OVERHEAD = 64 * 1024


def api_body_limit(max_image_bytes: int) -> int:
    """The request body cap: one image of ``max_image_bytes`` plus its multipart framing."""
    return max_image_bytes * 4 // 3 + MULTIPART_OVERHEAD  # base64 image_data fits too


def build_api_app(
    metrics: Metrics,
    health: Health,
    ctx: ApiContext,
    auth: Auth,
    *,
    extra_routes: Iterable[BaseRoute] = (),
) -> Starlette:
    """The service's app with every API route, auth and JSON errors."""
    routes = [
        *hma_routes(),
        *bridge_routes(),
        *check_routes(),
        *openapi_routes(),
        *extra_routes,
    ]
    app = create_app(
        metrics, health, routes=routes, max_body_bytes=api_body_limit(ctx.gate.max_bytes)
    )
    app.state.auth = auth
    app.state.api = ctx
    install_error_handlers(app, metrics.registry)
    return app
