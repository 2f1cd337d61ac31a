"""Sign in once with an API key, then read with an HttpOnly cookie (EventSource sends no headers).

``POST /api/v1/session`` with the key in ``X-API-Key`` (or ``Authorization: Bearer``) and the
``read`` scope sets ``phash_session``: ``<base64url JSON {key name, expiry}>.<hex HMAC>``, signed
with a random secret kept in Redis (``api:session-secret``, made once, shared by instances).
The raw key never goes into a URL nor a cookie. The cookie is ``HttpOnly; SameSite=Strict``
(``Secure`` over https), lives ``SESSION_TTL_SECS``, and only opens the read routes (GET): a
key removed from the key file ends its sessions at the next request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from typing import Any

import attrs
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from phash_trio.api.auth import ANONYMOUS, ApiError, ApiKey, Auth, Unauthorized
from phash_trio.state.redisio import RedisThreads

__all__ = ["COOKIE", "SessionSigner", "load_session_secret", "require_read", "session_routes"]

COOKIE = "phash_session"
SECRET_KEY = "api:session-secret"
DEFAULT_SESSION_TTL_SECS = 8 * 3600


async def load_session_secret(redis: RedisThreads) -> bytes:
    """The shared signing secret (created on first use)."""

    def run(c: Any) -> str:
        c.set(SECRET_KEY, secrets.token_hex(32), nx=True)
        return str(c.get(SECRET_KEY))

    return bytes.fromhex(await redis.call("session secret", run))


@attrs.frozen
class SessionSigner:
    secret: bytes = attrs.field(repr=False)
    ttl_secs: float = DEFAULT_SESSION_TTL_SECS

    def issue(self, key_name: str, now: float) -> str:
        payload = json.dumps({"n": key_name, "e": int(now + self.ttl_secs)}).encode()
        body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
        return body + "." + self._mac(body)

    def _mac(self, body: str) -> str:
        return hmac.new(self.secret, body.encode(), hashlib.sha256).hexdigest()

    def check(self, token: str, now: float) -> str | None:
        """The key name of a valid, unexpired token; None otherwise."""
        body, _, mac = token.partition(".")
        if len(token) > 512 or not hmac.compare_digest(self._mac(body).encode(), mac.encode()):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("n"), str):
            return None
        expiry = data.get("e")
        if not isinstance(expiry, int) or expiry < now:
            return None
        name: str = data["n"]
        return name


def require_read(request: Request) -> ApiKey:
    """The caller's key for the ``read`` scope: a session cookie (GET only) or an API key."""
    auth: Auth = request.app.state.auth
    token = request.cookies.get(COOKIE)
    signer: SessionSigner | None = getattr(request.app.state, "session_signer", None)
    if token and signer is not None and request.method == "GET":
        name = signer.check(token, time.time())
        if name is not None:
            if auth.open_access:
                return ANONYMOUS
            for key in auth.keys:
                if key.name == name and key.allows("read"):
                    return key
    return auth.require(request, "read")


def session_routes() -> list[Route]:
    async def sign_in(request: Request) -> Response:
        auth: Auth = request.app.state.auth
        signer: SessionSigner | None = getattr(request.app.state, "session_signer", None)
        if signer is None:
            raise ApiError("sign-in is not ready yet (Redis)", status=503)
        if auth.open_access:
            key = ANONYMOUS
        elif request.headers.get("x-api-key") or request.headers.get("authorization"):
            key = auth.require(request, "read")
        else:
            raise Unauthorized("sign in with the API key in X-API-Key")
        response = JSONResponse({"success": True, "key": key.name, "expires_in": signer.ttl_secs})
        response.set_cookie(
            COOKIE,
            signer.issue(key.name, time.time()),
            max_age=int(signer.ttl_secs),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    async def sign_out(request: Request) -> Response:
        response = JSONResponse({"success": True})
        response.delete_cookie(COOKIE, path="/")
        return response

    return [
        Route("/api/v1/session", sign_in, methods=["POST"]),
        Route("/api/v1/session", sign_out, methods=["DELETE"]),
    ]
