"""API keys: a file of hashed keys with scopes, checked in constant time, with a per-key rate.

The key file (``API_KEYS_FILE``) holds one key per line, never the key itself::

    # sha256 of the key            scopes          name
    sha256:9f86d08188...0f00a08   check,read      perchpics-upload
    sha256:60303ae22b...ad3c8a0   check,curate    ops

Blank lines and ``#`` comments are ignored; a malformed line is a :class:`KeyFileError` naming
its line number. ``phash-trio api-keys add NAME --scope check`` makes a key, prints it once and
appends only its hash.

A request presents its key as ``X-API-Key: <key>`` (the bridge's clients) or
``Authorization: Bearer <key>``. The presented key is hashed and compared with *every* stored
hash by :func:`hmac.compare_digest`, so neither the time taken nor an early exit tells how much
of a key matched. Outcomes (:class:`ApiError` subclasses, rendered by the app as JSON):

* no key, or a key that is not in the file → 401 (:class:`Unauthorized`);
* a key without the route's scope → 403 (:class:`Forbidden`);
* a key over its rate (token bucket, Trio time) → 429 with ``Retry-After`` (:class:`RateLimited`).

With ``API_AUTH=none`` (or no keys at all on a loopback address, see :func:`check_exposure`)
every request is let through as the anonymous key, which holds every scope and has no rate.
Keys are never logged: only their names are.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

import attrs
import trio
from loguru import logger
from starlette.requests import Request

__all__ = [
    "ANONYMOUS",
    "SCOPES",
    "ApiError",
    "ApiKey",
    "Auth",
    "ExposureError",
    "Forbidden",
    "KeyFileError",
    "RateLimited",
    "Unauthorized",
    "add_key",
    "check_exposure",
    "hash_key",
    "load_keys",
    "parse_keys",
    "require_scope",
]

#: ``check``: hash and match (HMA's /h and /m, the bridge, /api/v1/check);
#: ``curate``: change banks (HMA's /c); ``read``: read the decision log and its stream.
SCOPES = frozenset({"check", "curate", "read"})
_NAME = re.compile(r"^[A-Za-z0-9_.@:-]{1,64}$")
_HASH = re.compile(r"^sha256:([0-9a-f]{64})$")


class ApiError(Exception):
    """An HTTP error with a status and a message for the client (never a secret)."""

    status = 400

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    @property
    def headers(self) -> dict[str, str]:
        return {}


class Unauthorized(ApiError):
    """No API key, or one that is not known (401)."""

    status = 401

    @property
    def headers(self) -> dict[str, str]:
        return {"www-authenticate": 'Bearer realm="phash-trio"'}


class Forbidden(ApiError):
    """A known key without the scope the route needs (403)."""

    status = 403


class RateLimited(ApiError):
    """A key over its request rate (429); ``retry_after`` is in whole seconds."""

    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after)}


class KeyFileError(Exception):
    """The key file is malformed; ``str()`` is one line naming the file and line."""


class ExposureError(Exception):
    """The API would listen on a non-loopback address with no keys (and API_AUTH is not none)."""


@attrs.frozen
class ApiKey:
    """One configured key: its name (for logs and metrics), its scopes, the hex sha256."""

    name: str
    scopes: frozenset[str]
    digest: str = attrs.field(repr=False)

    def allows(self, scope: str) -> bool:
        return scope in self.scopes


#: The caller when authentication is off: every scope, no rate limit.
ANONYMOUS = ApiKey("anonymous", SCOPES, "")


def hash_key(key: str) -> str:
    """The stored form of a key: lowercase hex sha256 of its UTF-8 bytes."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_keys(text: str, source: str = "<keys>") -> list[ApiKey]:
    """Parse a key file's text; raise :class:`KeyFileError` at the first bad line."""
    keys: list[ApiKey] = []
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{source}:{number}"
        if len(parts) != 3:
            raise KeyFileError(f"{where}: expected 'sha256:<hex> <scope,...> <name>'")
        digest_field, scope_field, name = parts
        match = _HASH.match(digest_field)
        if match is None:
            raise KeyFileError(f"{where}: the key hash is not sha256:<64 lowercase hex digits>")
        scopes = frozenset(s for s in scope_field.split(",") if s)
        unknown = sorted(scopes - SCOPES)
        if not scopes or unknown:
            raise KeyFileError(
                f"{where}: unknown scope {', '.join(unknown) or '(none)'}"
                f" (known: {', '.join(sorted(SCOPES))})"
            )
        if not _NAME.match(name):
            raise KeyFileError(f"{where}: key name {name!r} is not [A-Za-z0-9_.@:-]{{1,64}}")
        if name in names:
            raise KeyFileError(f"{where}: key name {name!r} appears twice")
        names.add(name)
        keys.append(ApiKey(name, scopes, match.group(1)))
    return keys


def load_keys(path: Path) -> list[ApiKey]:
    """Read the key file; a missing file means no keys."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read: {exc}") from None
    return parse_keys(text, str(path))


def add_key(path: Path, name: str, scopes: Iterable[str]) -> str:
    """Make a new random key, append its hash to ``path`` (mode 0600), return the key."""
    scope_set = frozenset(scopes)
    if not scope_set or scope_set - SCOPES:
        raise KeyFileError(f"scopes must be among {', '.join(sorted(SCOPES))}")
    existing = load_keys(path)
    if any(key.name == name for key in existing):
        raise KeyFileError(f"{path}: a key named {name!r} already exists")
    key = "pt_" + secrets.token_urlsafe(32)
    line = f"sha256:{hash_key(key)} {','.join(sorted(scope_set))} {name}\n"
    parse_keys(line)  # the name is checked here, before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as out:
        out.write(line)
    return key


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and 127.0.0.0/8 / ::1 literals."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, auth_mode: str, keys: list[ApiKey]) -> None:
    """Refuse to serve a non-loopback address with no keys unless auth is off on purpose."""
    if auth_mode == "none" or keys or is_loopback_host(host):
        return
    raise ExposureError(
        f"API on {host} has no API keys: add one with 'phash-trio api-keys add NAME --scope check'"
        " or set API_AUTH=none to serve it without keys on purpose"
    )


@attrs.define
class _Bucket:
    tokens: float
    stamp: float


@attrs.frozen
class RateLimit:
    """Per key: ``per_sec`` requests a second on average, bursts of ``burst``; 0 = unlimited."""

    per_sec: float = 0.0
    burst: int = 0


def _presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


class Auth:
    """The keys, the mode and the rate buckets of one app.

    ``open_access`` (API_AUTH=none) lets every request in as :data:`ANONYMOUS`; so does
    ``open_when_empty`` (a loopback address) while the file holds no key. The key file is re-read when its modification time changes (looked at
    no more often than every ``reload_secs``), so ``api-keys add`` needs no restart; a file
    that turns bad keeps the keys already loaded (logged once per change).
    """

    def __init__(
        self,
        keys: Iterable[ApiKey] = (),
        *,
        open_access: bool = False,
        open_when_empty: bool = False,
        rate: RateLimit | None = None,
        path: Path | None = None,
        reload_secs: float = 2.0,
    ) -> None:
        self.keys: tuple[ApiKey, ...] = tuple(keys)
        self._open_access = open_access
        self.open_when_empty = open_when_empty
        self.rate = rate or RateLimit()
        self.path = path
        self.reload_secs = reload_secs
        self._buckets: dict[str, _Bucket] = {}
        self._mtime = self._stat()
        self._next_check = -math.inf
        #: Outcomes by kind, read by metrics and tests.
        self.refused: dict[str, int] = {"missing": 0, "unknown": 0, "scope": 0, "rate": 0}

    @classmethod
    def from_file(
        cls,
        path: Path,
        *,
        mode: str = "keys",
        rate: RateLimit | None = None,
        loopback: bool = True,
    ) -> Auth:
        """Keys from ``path``; open when ``mode`` is ``none``, or no keys on loopback."""
        keys = load_keys(path)
        return cls(keys, open_access=mode == "none", open_when_empty=loopback, rate=rate, path=path)

    @property
    def open_access(self) -> bool:
        """True while requests need no key (API_AUTH=none, or no keys on loopback)."""
        return self._open_access or (self.open_when_empty and not self.keys)

    def _stat(self) -> float | None:
        if self.path is None:
            return None
        try:
            return self.path.stat().st_mtime
        except OSError:
            return None

    def _maybe_reload(self, now: float) -> None:
        if self.path is None or now < self._next_check:
            return
        self._next_check = now + self.reload_secs
        mtime = self._stat()
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            keys = load_keys(self.path)
        except KeyFileError as exc:
            logger.warning("API key file changed but is not valid, keeping the old keys: {}", exc)
            return
        self.keys = tuple(keys)
        known = {key.name for key in keys}
        for name in list(self._buckets):
            if name not in known:
                del self._buckets[name]
        logger.info("API keys reloaded: {} key(s)", len(keys))

    def authenticate(self, request: Request) -> ApiKey:
        """The caller's key, or :class:`Unauthorized`."""
        self._maybe_reload(trio.current_time())  # a first key closes an open loopback API
        if self.open_access:
            return ANONYMOUS
        presented = _presented_key(request)
        if presented is None:
            self.refused["missing"] += 1
            raise Unauthorized("an API key is required (X-API-Key or Authorization: Bearer)")
        digest = hash_key(presented)
        found: ApiKey | None = None
        for key in self.keys:  # every key is compared: the time does not depend on which matched
            if hmac.compare_digest(digest, key.digest):
                found = key
        if found is None:
            self.refused["unknown"] += 1
            raise Unauthorized("the API key is not valid")
        return found

    def require(self, request: Request, scope: str) -> ApiKey:
        """The caller's key if it holds ``scope`` and is within its rate; else an ApiError."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}")
        key = self.authenticate(request)
        if not key.allows(scope):
            self.refused["scope"] += 1
            raise Forbidden(f"the API key {key.name!r} lacks the {scope!r} scope")
        if key is not ANONYMOUS:
            self._take_token(key)
        return key

    def _take_token(self, key: ApiKey) -> None:
        rate = self.rate
        if rate.per_sec <= 0:
            return
        burst = max(rate.burst, 1)
        now = trio.current_time()
        bucket = self._buckets.get(key.name)
        if bucket is None:
            bucket = self._buckets[key.name] = _Bucket(float(burst), now)
        bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.stamp) * rate.per_sec)
        bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return
        self.refused["rate"] += 1
        wait = (1.0 - bucket.tokens) / rate.per_sec
        raise RateLimited(
            f"the API key {key.name!r} is over {rate.per_sec:g} requests/s",
            retry_after=max(1, math.ceil(wait)),
        )


def require_scope(request: Request, scope: str) -> ApiKey:
    """The caller's key for ``scope``, from the :class:`Auth` the app holds in
    ``app.state.auth`` (see :func:`phash_trio.api.service_app.build_api_app`)."""
    auth: Auth = request.app.state.auth
    return auth.require(request, scope)
