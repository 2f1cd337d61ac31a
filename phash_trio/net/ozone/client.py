"""XRPC client for Ozone: an app-password session and ``tools.ozone.moderation.emitEvent``.

Every call goes to ``OZONE_PDS``; emitEvent carries ``atproto-proxy: {LABELER_DID}#atproto_labeler``
so the PDS forwards it to the labeler's Ozone with a service token (DESIGN §3).

Session: ``createSession`` is rate-limited to a few dozen per hour, so the session is kept in a
JSON file (mode 0600, written atomically) and reused across restarts. The access token's ``exp``
claim is read (no signature check: we only need to know when to refresh) and the token is
refreshed with ``refreshSession`` a margin before it expires, and again whenever Ozone answers
``ExpiredToken``/``InvalidToken`` (the call is then retried once). A refresh token that is
refused falls back to ``createSession``.

Transport: each HTTP attempt goes through the Ozone :class:`CircuitBreaker`. Transient
failures (5xx, timeouts, connection errors, 429) are retried, 3 tries in total, with backoff
100 ms doubling to 5 s; 429 and ``ratelimit-remaining: 0`` make every call wait until
``ratelimit-reset``. Other 4xx are not retried and are neutral for the breaker.

Errors::

    OzoneError
    ├── OzoneUnavailable   transient: retries used up, breaker open or rate-limited for long
    ├── OzoneRejected      permanent: Ozone refused the request (status, error, message)
    └── OzoneAuthError     the PDS refused our credentials (bad password, account taken down)

Tokens and the password never reach a log line or a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from loguru import logger

from phash_trio.config import Settings
from phash_trio.net.breaker import BreakerOpen, CircuitBreaker
from phash_trio.runtime.metrics import Metrics

__all__ = [
    "EmitResult",
    "OzoneAuthError",
    "OzoneClient",
    "OzoneError",
    "OzoneRejected",
    "OzoneUnavailable",
    "Session",
    "jwt_claims",
]

CREATE_SESSION = "com.atproto.server.createSession"
REFRESH_SESSION = "com.atproto.server.refreshSession"
EMIT_EVENT = "tools.ozone.moderation.emitEvent"
GET_CONFIG = "tools.ozone.server.getConfig"
GET_SERVICES = "app.bsky.labeler.getServices"

#: Refusals that mean the event's effect already holds (Ozone checks the subject's status
#: before the externalId, so a replayed takedown, or one a human moderator made first, gets
#: this instead of ``DuplicateExternalId``).
_ALREADY_HOLDS = frozenset({("InvalidRequest", "Subject is already taken down")})

#: Errors on a bearer token that a new session can cure.
_TOKEN_ERRORS = frozenset({"ExpiredToken", "InvalidToken"})
#: Refresh no more than this long before the access token expires...
_REFRESH_MARGIN_MAX = 300.0
#: ...and no more than this share of the token's lifetime (short-lived tokens in tests).
_REFRESH_MARGIN_SHARE = 0.1
_SESSION_FILE_VERSION = 1


class OzoneError(Exception):
    """Base of every error this module raises."""


class OzoneUnavailable(OzoneError):
    """Ozone could not be reached or kept failing; trying again later may work."""

    def __init__(
        self,
        message: str,
        *,
        breaker_open: bool = False,
        rate_limited: bool = False,
        retry_at: float | None = None,
    ) -> None:
        super().__init__(message)
        #: The Ozone circuit breaker refused the call (nothing was sent).
        self.breaker_open = breaker_open
        #: The last answer was a rate limit (429, or a reset too far away to wait for).
        self.rate_limited = rate_limited
        #: Trio time before which a new attempt is pointless, when known.
        self.retry_at = retry_at


class _XrpcRefusal(OzoneError):
    """A 4xx answer with Ozone's ``error``/``message`` (shared by the two subclasses)."""

    def __init__(self, what: str, status: int, error: str, message: str) -> None:
        super().__init__(f"{what}: HTTP {status} {error}: {message}")
        #: Which XRPC method was refused.
        self.what = what
        self.status = status
        #: XRPC error name, e.g. ``InvalidRequest`` (empty when the body had none).
        self.error = error
        self.message = message


class OzoneRejected(_XrpcRefusal):
    """Ozone refused the event for good (bad body, unknown subject...): do not retry."""


class OzoneAuthError(_XrpcRefusal):
    """The PDS refused the credentials: the service cannot act until someone fixes them."""


@attrs.frozen
class EmitResult:
    """What Ozone answered to an accepted event."""

    #: ``id`` of the new moderation event (None when the body had none, or on a duplicate).
    event_id: int | None = None
    #: Ozone already had an event with this ``externalId``: done earlier, counted as success.
    duplicate: bool = False
    #: Ozone refused it because its effect already holds (subject already taken down).
    already_holds: bool = False


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, unverified; ``{}`` when it is not JWT-shaped."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _number_claim(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@attrs.frozen
class Session:
    """An app-password session on the PDS (what createSession/refreshSession return)."""

    #: PDS base URL it belongs to (a stored session for another PDS is not reused).
    pds: str
    did: str
    handle: str
    access_jwt: str = attrs.field(repr=False)
    refresh_jwt: str = attrs.field(repr=False)

    @property
    def access_expires(self) -> float | None:
        """Epoch seconds from the access token's ``exp`` claim."""
        return _number_claim(jwt_claims(self.access_jwt), "exp")

    @property
    def refresh_expires(self) -> float | None:
        return _number_claim(jwt_claims(self.refresh_jwt), "exp")

    def refresh_due(self, now: float) -> bool:
        """True once ``now`` (epoch seconds) is within the refresh margin of ``exp``."""
        claims = jwt_claims(self.access_jwt)
        exp = _number_claim(claims, "exp")
        if exp is None:
            return False  # unknown lifetime: rely on ExpiredToken answers
        iat = _number_claim(claims, "iat")
        margin = _REFRESH_MARGIN_MAX
        if iat is not None and exp > iat:
            margin = min(margin, (exp - iat) * _REFRESH_MARGIN_SHARE)
        return now >= exp - margin

    def refresh_usable(self, now: float) -> bool:
        exp = self.refresh_expires
        return exp is None or now < exp

    def to_json(self) -> dict[str, Any]:
        return {
            "version": _SESSION_FILE_VERSION,
            "pds": self.pds,
            "did": self.did,
            "handle": self.handle,
            "accessJwt": self.access_jwt,
            "refreshJwt": self.refresh_jwt,
        }

    @classmethod
    def from_json(cls, data: Any) -> Session:
        """Raise ``ValueError`` (no token in the message) when ``data`` is not a session."""
        if not isinstance(data, dict) or data.get("version") != _SESSION_FILE_VERSION:
            raise ValueError("not a version 1 session object")
        fields = {}
        for key in ("pds", "did", "handle", "accessJwt", "refreshJwt"):
            value = data.get(key)
            if not isinstance(value, str) or not value:
                raise ValueError(f"field {key!r} missing or not a string")
            fields[key] = value
        return cls(
            pds=fields["pds"],
            did=fields["did"],
            handle=fields["handle"],
            access_jwt=fields["accessJwt"],
            refresh_jwt=fields["refreshJwt"],
        )


def _read_session_file(path: Path) -> Any:
    """Load the JSON and make sure the file is private (0600)."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return None
    if mode != 0o600:
        logger.warning("session file {} had mode {:o}; setting 0600", path, mode)
        os.chmod(path, 0o600)
    return json.loads(path.read_text(encoding="utf-8"))


def _write_session_file(path: Path, data: dict[str, Any]) -> None:
    """Temp file created 0600, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an old temp file keeps its mode through O_CREAT
        os.write(fd, json.dumps(data).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _xrpc_error(response: httpx.Response) -> tuple[str, str]:
    """``(error, message)`` from an XRPC error body; tolerant of non-JSON bodies."""
    try:
        data = response.json()
    except ValueError:
        return "", response.text[:200]
    if not isinstance(data, dict):
        return "", ""
    error, message = data.get("error"), data.get("message")
    return (error if isinstance(error, str) else "", message if isinstance(message, str) else "")


def _header_float(response: httpx.Response, name: str) -> float | None:
    raw = response.headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if value == value else None


class OzoneClient:
    """One per service: owns the session, shares the injected ``httpx.AsyncClient``."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        pds_url: str,
        handle: str,
        password: str,
        labeler_did: str,
        breaker: CircuitBreaker,
        session_file: Path | None = None,
        metrics: Metrics | None = None,
        wall_clock: Callable[[], float] = time.time,
        max_attempts: int = 3,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        request_timeout: float = 30.0,
        max_rate_limit_wait: float = 300.0,
        auth_cooldown: float = 600.0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._http = http
        self._pds = pds_url.rstrip("/")
        self._handle = handle
        self._password = password
        self._labeler_did = labeler_did
        self._breaker = breaker
        self._session_file = session_file
        self._metrics = metrics
        # The ONLY wall-clock read: token ``exp`` claims and ``ratelimit-reset`` are epoch
        # seconds set by the server, so they must be compared with real time. Everything that
        # waits converts them to a Trio deadline at once (tests inject a fake clock).
        self._wall_clock = wall_clock
        self._max_attempts = max_attempts
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._request_timeout = request_timeout
        self._max_rate_limit_wait = max_rate_limit_wait
        self._auth_cooldown = auth_cooldown
        #: Last createSession refusal and the Trio time until which it is repeated without
        #: asking again: every job retrying a wrong password would burn the login rate limit.
        self._auth_failure: OzoneAuthError | None = None
        self._auth_failure_until = float("-inf")
        self._session: Session | None = None
        self._session_loaded = False
        self._session_lock = trio.Lock()
        #: Trio time before which no request is sent (rate limit reset).
        self._not_before = float("-inf")

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        http: httpx.AsyncClient,
        breaker: CircuitBreaker,
        metrics: Metrics | None = None,
    ) -> OzoneClient:
        return cls(
            http,
            pds_url=settings.ozone_pds,
            handle=settings.automod_handle,
            password=settings.automod_password,
            labeler_did=settings.labeler_did,
            breaker=breaker,
            session_file=settings.session_file,
            metrics=metrics,
        )

    def __repr__(self) -> str:
        return f"<OzoneClient {self._handle!r} at {self._pds!r}>"

    @property
    def labeler_did(self) -> str:
        return self._labeler_did

    @property
    def session(self) -> Session | None:
        """The current session, if any (tokens hidden from its repr)."""
        return self._session

    # -- session ---------------------------------------------------------------------------

    async def ensure_session(self) -> Session:
        """A usable session: from memory, the session file, refreshSession or createSession.

        Call it at start-up to fail early (:class:`OzoneAuthError`) on bad credentials. After
        a refused login the same error is raised without a new attempt for ``auth_cooldown``.
        """
        async with self._session_lock:
            failed = self._auth_failure
            if failed is not None and trio.current_time() < self._auth_failure_until:
                raise OzoneAuthError(failed.what, failed.status, failed.error, failed.message)
            if not self._session_loaded:
                self._session_loaded = True
                self._session = await self._load_session()
            session = self._session
            now = self._wall_clock()
            if session is None:
                session = await self._create_session()
            elif session.refresh_due(now):
                try:
                    session = await self._refresh_or_create(session)
                except OzoneUnavailable:
                    expires = session.access_expires
                    if expires is None or now >= expires:
                        raise
                    # The old token still works for a while: use it, refresh next call.
                    logger.warning("session refresh failed; using the current token meanwhile")
            return session

    async def _renew_after_refusal(self, stale: Session) -> None:
        """Ozone refused ``stale``'s access token; renew unless another task already did."""
        async with self._session_lock:
            if self._session is not stale:
                return
            await self._refresh_or_create(stale)

    async def _load_session(self) -> Session | None:
        if self._session_file is None:
            return None
        path = self._session_file
        try:
            data = await trio.to_thread.run_sync(_read_session_file, path)
        except (OSError, ValueError) as exc:
            logger.warning("session file {} unreadable ({}); logging in again", path, exc)
            return None
        if data is None:
            return None
        try:
            session = Session.from_json(data)
        except ValueError as exc:
            logger.warning("session file {} ignored: {}", path, exc)
            return None
        same_account = self._handle.lower() in (session.handle.lower(), session.did.lower())
        if session.pds != self._pds or not same_account:
            logger.info("session file {} is for another account or PDS; ignored", path)
            return None
        if not session.refresh_usable(self._wall_clock()):
            logger.info("stored session for {} has an expired refresh token", session.handle)
            return None
        logger.info("reusing stored session for {} ({})", session.handle, session.did)
        return session

    async def _store(self, session: Session) -> Session:
        self._session = session
        if self._session_file is not None:
            try:
                await trio.to_thread.run_sync(
                    _write_session_file, self._session_file, session.to_json()
                )
            except OSError as exc:
                # Not fatal: the session works in memory; a restart will log in again.
                logger.error("could not write session file {}: {}", self._session_file, exc)
        return session

    def _session_from(self, response: httpx.Response, what: str) -> Session:
        try:
            data = response.json()
            session = Session(
                pds=self._pds,
                did=data["did"],
                handle=data["handle"],
                access_jwt=data["accessJwt"],
                refresh_jwt=data["refreshJwt"],
            )
        except (ValueError, KeyError, TypeError):
            session = None
        if session is None or not all(
            isinstance(v, str) and v
            for v in (session.did, session.handle, session.access_jwt, session.refresh_jwt)
        ):
            # A 2xx that is not a session: OZONE_PDS probably points at something else.
            self._count_error("auth")
            raise OzoneAuthError(
                what, response.status_code, "MalformedSession", "answer is not a session"
            )
        return session

    async def _create_session(self) -> Session:
        response = await self._send(
            CREATE_SESSION, {"identifier": self._handle, "password": self._password}
        )
        if response.status_code >= 400:
            error, message = _xrpc_error(response)
            logger.error(
                "createSession for {} refused: HTTP {} {}: {}",
                self._handle,
                response.status_code,
                error,
                message,
            )
            self._count_error("auth")
            failure = OzoneAuthError("createSession", response.status_code, error, message)
            self._auth_failure = failure
            self._auth_failure_until = trio.current_time() + self._auth_cooldown
            raise failure
        session = self._session_from(response, "createSession")
        logger.info("created session for {} ({})", session.handle, session.did)
        return await self._store(session)

    async def _refresh_or_create(self, session: Session) -> Session:
        if not session.refresh_usable(self._wall_clock()):
            logger.info("refresh token expired; creating a new session")
            return await self._create_session()
        response = await self._send(REFRESH_SESSION, None, bearer=session.refresh_jwt)
        if response.status_code >= 400:
            error, message = _xrpc_error(response)
            if error == "AccountTakedown":
                self._count_error("auth")
                raise OzoneAuthError("refreshSession", response.status_code, error, message)
            logger.info(
                "refreshSession refused (HTTP {} {}); creating a new session",
                response.status_code,
                error,
            )
            return await self._create_session()
        fresh = self._session_from(response, "refreshSession")
        logger.info("refreshed session for {}", fresh.handle)
        return await self._store(fresh)

    # -- transport -------------------------------------------------------------------------

    def _note_rate_limit(self, response: httpx.Response) -> None:
        """Push ``_not_before`` out to the server's reset when it says to wait."""
        wait: float | None = None
        reset = _header_float(response, "ratelimit-reset")
        remaining = _header_float(response, "ratelimit-remaining")
        if reset is not None and (response.status_code == 429 or remaining == 0):
            wait = reset - self._wall_clock()
        retry_after = response.headers.get("retry-after")
        if retry_after is not None and response.status_code in (429, 503):
            seconds = _header_float(response, "retry-after")
            if seconds is None:
                try:
                    when = email.utils.parsedate_to_datetime(retry_after)
                    seconds = when.timestamp() - self._wall_clock()
                except (TypeError, ValueError):
                    seconds = None
            if seconds is not None:
                wait = seconds if wait is None else max(wait, seconds)
        if wait is not None and wait > 0:
            deadline = trio.current_time() + wait
            if deadline > self._not_before:
                self._not_before = deadline
                logger.info("Ozone rate limit: holding calls for {:.1f} s", wait)

    async def _wait_for_rate_limit(self) -> None:
        now = trio.current_time()
        if self._not_before <= now:
            return
        if self._not_before - now > self._max_rate_limit_wait:
            self._count_error("rate_limited")
            raise OzoneUnavailable(
                f"rate-limited for {self._not_before - now:.0f} s",
                rate_limited=True,
                retry_at=self._not_before,
            )
        await trio.sleep_until(self._not_before)

    async def _send(
        self,
        nsid: str,
        body: dict[str, Any] | None,
        *,
        bearer: str | None = None,
        proxy: bool = False,
        params: dict[str, str | list[str]] | None = None,
    ) -> httpx.Response:
        """POST ``body`` (or GET with ``params`` for a query) with retries.

        Returns the 2xx or final non-429 4xx answer.
        """
        url = f"{self._pds}/xrpc/{nsid}"
        headers = {}
        if bearer is not None:
            headers["authorization"] = f"Bearer {bearer}"
        if proxy:
            headers["atproto-proxy"] = f"{self._labeler_did}#atproto_labeler"
        delay = self._backoff_initial
        reason = ""
        rate_limited = False
        for attempt in range(1, self._max_attempts + 1):
            if attempt > 1:
                await trio.sleep(delay)
                delay = min(delay * 2, self._backoff_max)
            await self._wait_for_rate_limit()
            try:
                self._breaker.before_call()
            except BreakerOpen as exc:
                self._count_error("breaker_open")
                raise OzoneUnavailable(
                    f"{nsid}: Ozone circuit breaker is open",
                    breaker_open=True,
                    retry_at=exc.retry_at,
                ) from None
            try:
                with trio.fail_after(self._request_timeout):
                    if params is not None:
                        response = await self._http.get(url, params=params, headers=headers)
                    else:
                        response = await self._http.post(url, json=body, headers=headers)
            except (httpx.TransportError, trio.TooSlowError) as exc:
                self._breaker.record_failure()
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                rate_limited = False
            except BaseException:
                # Cancelled or a bug mid-call: an unfinished call is no evidence of health.
                self._breaker.record_failure()
                raise
            else:
                self._note_rate_limit(response)
                status = response.status_code
                if status == 429 or status >= 500:
                    self._breaker.record_failure()
                    error, message = _xrpc_error(response)
                    reason = f"HTTP {status} {error} {message}".strip()
                    rate_limited = status == 429
                elif status >= 400:
                    self._breaker.record_neutral()
                    return response
                else:
                    self._breaker.record_success()
                    return response
            logger.warning("{} attempt {}/{} failed: {}", nsid, attempt, self._max_attempts, reason)
        self._count_error("rate_limited" if rate_limited else "unavailable")
        raise OzoneUnavailable(
            f"{nsid}: failed {self._max_attempts} times, last: {reason}",
            rate_limited=rate_limited,
            retry_at=self._not_before if self._not_before > trio.current_time() else None,
        )

    def _count_error(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.ozone_errors.labels(kind=kind).inc()

    # -- events ----------------------------------------------------------------------------

    async def _authed(
        self,
        nsid: str,
        body: dict[str, Any] | None = None,
        *,
        params: dict[str, str | list[str]] | None = None,
        proxy: bool = True,
    ) -> httpx.Response:
        """A call with the session's bearer token, renewed once on a token error.

        Returns the 2xx or the final 4xx answer; raises :class:`OzoneAuthError` when a fresh
        token is refused too, :class:`OzoneUnavailable` as :meth:`_send` does.
        """
        for auth_try in (1, 2):
            session = await self.ensure_session()
            response = await self._send(
                nsid, body, bearer=session.access_jwt, proxy=proxy, params=params
            )
            status = response.status_code
            if status < 400:
                return response
            error, message = _xrpc_error(response)
            if error in _TOKEN_ERRORS and status in (400, 401):
                if auth_try == 1:
                    logger.info("Ozone answered {}; renewing the session, retrying once", error)
                    await self._renew_after_refusal(session)
                    continue
                logger.error("Ozone refused a fresh session token: {}: {}", error, message)
                self._count_error("auth")
                raise OzoneAuthError(nsid, status, error, message)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def emit_event(self, body: dict[str, Any]) -> EmitResult:
        """Send one emitEvent body (see :func:`phash_trio.net.ozone.events.build_event`).

        ``DuplicateExternalId`` is a success (``duplicate=True``), and so is an answer saying
        the effect already holds (``already_holds=True``). Raises :class:`OzoneUnavailable`,
        :class:`OzoneRejected` or :class:`OzoneAuthError`.
        """
        event = body.get("event")
        event_type = event.get("$type", "") if isinstance(event, dict) else ""
        event_name = str(event_type).rpartition("#")[2] or "unknown"
        response = await self._authed(EMIT_EVENT, body)
        status = response.status_code
        if status < 400:
            return self._accepted(response, event_name)
        error, message = _xrpc_error(response)
        if (error, message) in _ALREADY_HOLDS:
            logger.info(
                "{} not needed: {} (externalId {})", event_name, message, body.get("externalId")
            )
            if self._metrics is not None:
                self._metrics.ozone_events.labels(event=event_name).inc()
            return EmitResult(already_holds=True)
        if error == "DuplicateExternalId":
            logger.debug("{} already in Ozone (externalId {})", event_name, body.get("externalId"))
            if self._metrics is not None:
                self._metrics.ozone_events.labels(event=event_name).inc()
            return EmitResult(duplicate=True)
        logger.warning(
            "Ozone rejected {} (externalId {}): HTTP {} {}: {}",
            event_name,
            body.get("externalId"),
            status,
            error,
            message,
        )
        self._count_error("rejected")
        raise OzoneRejected(EMIT_EVENT, status, error, message)

    async def _query_json(self, nsid: str, params: dict[str, str | list[str]], proxy: bool) -> Any:
        response = await self._authed(nsid, params=params, proxy=proxy)
        if response.status_code >= 400:
            error, message = _xrpc_error(response)
            raise OzoneRejected(nsid, response.status_code, error, message)
        try:
            return response.json()
        except ValueError:
            raise OzoneRejected(nsid, response.status_code, "", "answer is not JSON") from None

    async def viewer_role(self) -> str:
        """The session's role on the labeler's Ozone (``tools.ozone.server.getConfig``).

        A ``tools.ozone.team.defs#role…`` token, or ``""`` when the answer names none. An
        account that is no member of the Ozone team gets :class:`OzoneRejected` (401).
        """
        data = await self._query_json(GET_CONFIG, {}, proxy=True)
        viewer = data.get("viewer") if isinstance(data, dict) else None
        role = viewer.get("role") if isinstance(viewer, dict) else None
        return role if isinstance(role, str) else ""

    async def labeler_view(self) -> dict[str, Any] | None:
        """The labeler's detailed view from the AppView (through the PDS), or None.

        ``app.bsky.labeler.getServices`` with ``detailed=true`` is what Ozone itself reads to
        judge report reason types, so its ``reasonTypes`` and ``policies`` are the ones that
        count. None when the AppView knows no service record for ``LABELER_DID``.
        """
        data = await self._query_json(
            GET_SERVICES, {"dids": [self._labeler_did], "detailed": "true"}, proxy=False
        )
        views = data.get("views") if isinstance(data, dict) else None
        if not isinstance(views, list):
            return None
        for view in views:
            creator = view.get("creator") if isinstance(view, dict) else None
            if isinstance(creator, dict) and creator.get("did") == self._labeler_did:
                found: dict[str, Any] = view
                return found
        return None

    def _accepted(self, response: httpx.Response, event_name: str) -> EmitResult:
        if self._metrics is not None:
            self._metrics.ozone_events.labels(event=event_name).inc()
        try:
            data = response.json()
        except ValueError:
            return EmitResult()
        event_id = data.get("id") if isinstance(data, dict) else None
        if isinstance(event_id, bool) or not isinstance(event_id, int):
            event_id = None
        return EmitResult(event_id=event_id)
