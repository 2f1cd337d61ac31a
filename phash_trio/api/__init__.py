"""The HTTP side of the service: one ASGI app (Starlette) served by hypercorn's Trio worker.

Today it carries ``/metrics`` and ``/healthz`` (:mod:`phash_trio.api.status`); later routes
(the HMA API, issue 13) join the same app through :func:`phash_trio.api.app.create_app`'s
``routes``. :mod:`phash_trio.api.server` owns the sockets: timeouts, a connection cap, a
connection lifetime, small header and body limits.
"""

from phash_trio.api.app import create_app
from phash_trio.api.server import AddressError, ApiServer, ServerLimits, parse_addr, serve_app

__all__ = ["AddressError", "ApiServer", "ServerLimits", "create_app", "parse_addr", "serve_app"]
