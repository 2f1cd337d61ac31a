"""A fake PDS + Ozone on :mod:`phash_trio.testing.httpserver`, for tests and the demo.

It speaks the XRPC methods the service uses: ``createSession`` (checks the password, issues
JWT-shaped tokens with ``iat``/``exp`` claims), ``refreshSession`` (rotates the refresh token),
``emitEvent``, ``tools.ozone.server.getConfig`` (the account's Ozone role) and
``app.bsky.labeler.getServices`` (the labeler's service record, as the AppView serves it).

``emitEvent`` follows Ozone 0.4.2's order of checks (measured against the real one, issue 11):
bearer token and ``atproto-proxy`` header; lexicon shape; team role (a non-member is refused,
labels and takedowns need a moderator or admin); the subject's status (a takedown of a subject
already taken down is ``400 InvalidRequest "Subject is already taken down"``, before any
``externalId`` check); the report reason type against the service record's ``reasonTypes``
(new-form reasons pass when they map to a listed old-form one); then a repeated ``externalId``
is ``DuplicateExternalId``. ``createdBy`` is recorded as the token's DID, whatever the body says.
A takedown marks the subject, and the blobs it lists, as taken down.

Failure controls: :meth:`FakeOzone.fail_next`, :meth:`FakeOzone.fail_until`, ``down``,
:meth:`FakeOzone.rate_limit` (429 with ``ratelimit-*`` headers), ``hang``,
:meth:`FakeOzone.expire_access_tokens` and :meth:`FakeOzone.revoke_all_sessions`. Token
lifetimes are judged with an injectable wall clock; :class:`FakeWallClock` ties one to Trio's
clock so ``autojump_clock`` tests move both together.

Start it with ``server = await nursery.start(run_fake_ozone, FakeOzone())``; ``server.url``.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import trio

from phash_trio.net.ozone.events import reason_accepted
from phash_trio.testing.httpserver import HttpServer, Request, Response, json_response, serve_http

__all__ = [
    "ROLE_ADMIN",
    "ROLE_MODERATOR",
    "ROLE_TRIAGE",
    "FakeOzone",
    "FakeWallClock",
    "RecordedRequest",
    "labeler_record",
    "run_fake_ozone",
]

ROLE_ADMIN = "tools.ozone.team.defs#roleAdmin"
ROLE_MODERATOR = "tools.ozone.team.defs#roleModerator"
ROLE_TRIAGE = "tools.ozone.team.defs#roleTriage"
_MODERATOR_ROLES = frozenset({ROLE_ADMIN, ROLE_MODERATOR})

_DEFS = "tools.ozone.moderation.defs#"
_EVENT_TYPES = frozenset(
    _DEFS + name
    for name in ("modEventLabel", "modEventReport", "modEventTakedown", "modEventComment")
)
_BODY_KEYS = frozenset(
    {"event", "subject", "subjectBlobCids", "createdBy", "modTool", "externalId"}
)


@attrs.define
class FakeWallClock:
    """Epoch seconds that advance with Trio's clock (so MockClock moves them), plus a skew."""

    start: float = 1_700_000_000.0
    skew: float = 0.0

    def __call__(self) -> float:
        return self.start + trio.current_time() + self.skew

    def advance(self, seconds: float) -> None:
        """Jump the wall clock without moving Trio's clock."""
        self.skew += seconds


def labeler_record(
    label_values: list[str],
    *,
    defined: list[str] | None = None,
    reason_types: list[str] | None = None,
) -> dict[str, Any]:
    """An ``app.bsky.labeler.service`` record: declared values, custom definitions, reasons."""
    definitions = [
        {
            "identifier": value,
            "severity": "alert",
            "blurs": "media",
            "defaultSetting": "warn",
            "locales": [{"lang": "en", "name": value, "description": value}],
        }
        for value in (label_values if defined is None else defined)
    ]
    record: dict[str, Any] = {
        "$type": "app.bsky.labeler.service",
        "policies": {"labelValues": list(label_values), "labelValueDefinitions": definitions},
        "createdAt": "2025-01-01T00:00:00.000Z",
    }
    if reason_types is not None:
        record["reasonTypes"] = list(reason_types)
    return record


@attrs.frozen
class RecordedRequest:
    """One request the fake answered."""

    #: Trio time at arrival.
    time: float
    #: XRPC method name, e.g. ``tools.ozone.moderation.emitEvent``.
    nsid: str
    status: int


class _Invalid(Exception):
    def __init__(self, message: str, error: str = "InvalidRequest", status: int = 400) -> None:
        super().__init__(message)
        self.error = error
        self.status = status


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _xrpc_error(
    status: int, error: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    return json_response({"error": error, "message": message}, status, headers)


@attrs.define
class FakeOzone:
    """State and controls of the fake; :meth:`serve_request` is the HTTP handler."""

    handle: str = "automod.test"
    password: str = "fake-app-password"
    did: str = "did:plc:automodfakeaccount234567"
    labeler_did: str = "did:plc:fakelabeler2345672345672"
    #: Lifetime of issued access tokens, in seconds.
    access_lifetime: float = 7200.0
    refresh_lifetime: float = 60 * 86400.0
    wall_clock: Callable[[], float] = time.time

    #: Bodies of accepted emitEvent calls, in order (``createdBy`` as Ozone records it).
    events: list[dict[str, Any]] = attrs.field(factory=list)
    #: ``createdBy`` of each accepted body as the client sent it.
    received_created_by: list[str] = attrs.field(factory=list)
    requests: list[RecordedRequest] = attrs.field(factory=list)
    create_session_calls: int = 0
    refresh_session_calls: int = 0
    #: Every token issued (tests check none of them reaches a log).
    issued_tokens: list[str] = attrs.field(factory=list)
    #: Answer 503 to everything while true.
    down: bool = False
    url: str = ""
    #: The account's role in the Ozone team; None: not a member (every Ozone call refused).
    role: str | None = ROLE_MODERATOR
    #: The labeler's ``app.bsky.labeler.service`` record (see :func:`labeler_record`); None
    #: when it has none (the AppView then knows no labeler and Ozone accepts every reason).
    service_record: dict[str, Any] | None = None
    #: Subjects (post URI or DID) and blob CIDs that are taken down.
    taken_down: set[str] = attrs.field(factory=set)
    taken_down_blobs: set[str] = attrs.field(factory=set)

    _access: dict[str, float] = attrs.field(factory=dict, init=False)
    _refresh: dict[str, float] = attrs.field(factory=dict, init=False)
    _external_ids: set[tuple[str, str, str]] = attrs.field(factory=set, init=False)
    _failures: list[tuple[int, dict[str, str]]] = attrs.field(factory=list, init=False)
    _fail_until: float = attrs.field(default=float("-inf"), init=False)
    _limit: int | None = attrs.field(default=None, init=False)
    _limit_used: int = attrs.field(default=0, init=False)
    _limit_reset_at: float = attrs.field(default=0.0, init=False)
    _hang: bool = attrs.field(default=False, init=False)
    _unhang: trio.Event = attrs.field(factory=trio.Event, init=False)

    # -- controls --------------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 500, headers: dict[str, str] | None = None) -> None:
        """The next ``n`` requests (any method) get ``status`` and ``headers`` (retry-after...)."""
        self._failures.extend([(status, dict(headers or {}))] * n)

    def fail_until(self, trio_time: float) -> None:
        """Answer 503 to everything until Trio's clock reaches ``trio_time``."""
        self._fail_until = trio_time

    def rate_limit(self, n_requests: int, reset_after: float) -> None:
        """Allow ``n_requests`` more requests, then 429 until ``reset_after`` seconds pass."""
        self._limit = n_requests
        self._limit_used = 0
        self._limit_reset_at = math.ceil(self.wall_clock() + reset_after)

    @property
    def hang(self) -> bool:
        """While true, requests are held without an answer (until set false again)."""
        return self._hang

    @hang.setter
    def hang(self, value: bool) -> None:
        self._hang = value
        if not value:
            self._unhang.set()
            self._unhang = trio.Event()

    def expire_access_tokens(self) -> None:
        """Every access token issued so far is now expired (the client does not know)."""
        for token in self._access:
            self._access[token] = self.wall_clock() - 1

    def revoke_all_sessions(self) -> None:
        """Forget every token: access and refresh tokens become ``InvalidToken``."""
        self._access.clear()
        self._refresh.clear()

    def take_down(self, subject: str, blobs: list[str] | None = None) -> None:
        """A human moderator takes ``subject`` (post URI or DID) down, outside the service."""
        self.taken_down.add(subject)
        self.taken_down_blobs.update(blobs or [])

    def calls(self, nsid_suffix: str) -> list[RecordedRequest]:
        """Recorded requests whose method name ends with ``nsid_suffix`` (e.g. ``emitEvent``)."""
        return [r for r in self.requests if r.nsid.endswith(nsid_suffix)]

    # -- HTTP ------------------------------------------------------------------------------

    async def serve_request(self, request: Request) -> Response:
        arrived = trio.current_time()
        nsid = request.path.removeprefix("/xrpc/")
        if self._hang:
            await self._unhang.wait()
        response = self._answer(request, nsid)
        self.requests.append(RecordedRequest(arrived, nsid, response.status))
        return response

    def _answer(self, request: Request, nsid: str) -> Response:
        if self._failures:
            status, headers = self._failures.pop(0)
            return _xrpc_error(status, "InternalServerError", "fake failure", headers)
        if self.down or trio.current_time() < self._fail_until:
            return _xrpc_error(503, "ServiceUnavailable", "fake outage")
        limit_headers: dict[str, str] = {}
        if self._limit is not None:
            if self.wall_clock() >= self._limit_reset_at:
                self._limit = None
            else:
                self._limit_used += 1
                remaining = max(0, self._limit - self._limit_used)
                limit_headers = {
                    "ratelimit-limit": str(self._limit),
                    "ratelimit-remaining": str(remaining),
                    "ratelimit-reset": str(int(self._limit_reset_at)),
                    "ratelimit-policy": f"{self._limit};w=60",
                }
                if self._limit_used > self._limit:
                    return _xrpc_error(
                        429, "RateLimitExceeded", "Rate Limit Exceeded", limit_headers
                    )
        queries = {
            "tools.ozone.server.getConfig": self._get_config,
            "app.bsky.labeler.getServices": self._get_services,
        }
        try:
            if nsid in queries:
                if request.method != "GET":
                    raise _Invalid("queries need GET", "InvalidRequest", 405)
                return json_response(queries[nsid](request), 200, limit_headers)
            if request.method != "POST":
                raise _Invalid("procedures need POST", "InvalidRequest", 405)
            if nsid == "com.atproto.server.createSession":
                data = self._create_session(request)
            elif nsid == "com.atproto.server.refreshSession":
                data = self._refresh_session(request)
            elif nsid == "tools.ozone.moderation.emitEvent":
                data = self._emit_event(request)
            else:
                raise _Invalid(f"no method {nsid}", "MethodNotImplemented", 501)
        except _Invalid as exc:
            return _xrpc_error(exc.status, exc.error, str(exc), limit_headers)
        return json_response(data, 200, limit_headers)

    # -- sessions --------------------------------------------------------------------------

    def _token(self, scope: str, lifetime: float) -> tuple[str, float]:
        now = self.wall_clock()
        exp = math.floor(now + lifetime)
        header = {"typ": "at+jwt" if scope.endswith("access") else "refresh+jwt", "alg": "ES256K"}
        payload = {
            "scope": scope,
            "sub": self.did,
            "aud": "did:web:fake.pds.test",
            "iat": math.floor(now),
            "exp": exp,
            "jti": secrets.token_hex(8),
        }
        token = ".".join(
            (
                _b64(json.dumps(header).encode()),
                _b64(json.dumps(payload).encode()),
                _b64(secrets.token_bytes(32)),
            )
        )
        self.issued_tokens.append(token)
        return token, exp

    def _issue(self) -> dict[str, Any]:
        access, access_exp = self._token("com.atproto.access", self.access_lifetime)
        refresh, refresh_exp = self._token("com.atproto.refresh", self.refresh_lifetime)
        self._access[access] = access_exp
        self._refresh[refresh] = refresh_exp
        return {
            "did": self.did,
            "handle": self.handle,
            "accessJwt": access,
            "refreshJwt": refresh,
            "active": True,
        }

    def _create_session(self, request: Request) -> dict[str, Any]:
        self.create_session_calls += 1
        body = _json_object(request)
        identifier, password = body.get("identifier"), body.get("password")
        if not isinstance(identifier, str) or not isinstance(password, str):
            raise _Invalid("identifier and password are required strings")
        if identifier not in (self.handle, self.did) or password != self.password:
            raise _Invalid("Invalid identifier or password", "AuthenticationRequired", 401)
        return self._issue()

    def _bearer(self, request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _Invalid("Authentication Required", "AuthenticationRequired", 401)
        return token.strip()

    def _check_token(self, tokens: dict[str, float], token: str) -> None:
        exp = tokens.get(token)
        if exp is None:
            raise _Invalid("Token could not be verified", "InvalidToken", 400)
        if self.wall_clock() >= exp:
            raise _Invalid("Token has expired", "ExpiredToken", 400)

    def _refresh_session(self, request: Request) -> dict[str, Any]:
        self.refresh_session_calls += 1
        token = self._bearer(request)
        self._check_token(self._refresh, token)
        del self._refresh[token]  # rotation: a refresh token works once
        return self._issue()

    # -- Ozone ---------------------------------------------------------------------------

    def _ozone_member(self, request: Request) -> str:
        """The caller's role, after the token and proxy checks; non-members are refused."""
        self._check_token(self._access, self._bearer(request))
        expected = f"{self.labeler_did}#atproto_labeler"
        proxy = request.headers.get("atproto-proxy")
        if proxy != expected:
            raise _Invalid(f"atproto-proxy header is {proxy!r}, expected {expected!r}")
        if self.role is None:
            raise _Invalid("not a moderator account", "AuthRequired", 401)
        return self.role

    def _get_config(self, request: Request) -> dict[str, Any]:
        role = self._ozone_member(request)
        return {"appview": {"url": "https://appview.invalid"}, "viewer": {"role": role}}

    def _get_services(self, request: Request) -> dict[str, Any]:
        """The AppView's answer (through the PDS): the labeler's view, if it has a record."""
        self._check_token(self._access, self._bearer(request))
        wanted = parse_qs(urlsplit(request.target).query).get("dids", [])
        record = self.service_record
        if record is None or self.labeler_did not in wanted:
            return {"views": []}
        view: dict[str, Any] = {
            "$type": "app.bsky.labeler.defs#labelerViewDetailed",
            "uri": f"at://{self.labeler_did}/app.bsky.labeler.service/self",
            "cid": "bafyreifakelabelerservicerecord",
            "creator": {"did": self.labeler_did, "handle": "labeler.test"},
            "policies": record.get("policies", {}),
            "indexedAt": _iso(self.wall_clock()),
        }
        if "reasonTypes" in record:
            view["reasonTypes"] = record["reasonTypes"]
        return {"views": [view]}

    def _emit_event(self, request: Request) -> dict[str, Any]:
        role = self._ozone_member(request)
        body = _json_object(request)
        _validate_emit_body(body)
        subject = body["subject"]
        subject_key = subject.get("uri") or subject["did"]
        event = body["event"]
        event_type = event["$type"]
        is_takedown = event_type.endswith("#modEventTakedown")
        if (is_takedown or event_type.endswith("#modEventLabel")) and (
            role not in _MODERATOR_ROLES
        ):
            what = "take this type of action" if is_takedown else "label content"
            raise _Invalid(f"Must be a full moderator to {what}", "AuthRequired", 401)
        if is_takedown and subject_key in self.taken_down:
            raise _Invalid("Subject is already taken down")
        if event_type.endswith("#modEventReport"):
            listed = None if self.service_record is None else self.service_record.get("reasonTypes")
            if not reason_accepted(event["reportType"], listed):
                raise _Invalid(f"Invalid reason type: {event['reportType']}")
        external_id = body.get("externalId")
        if external_id is not None:
            key = (subject_key, event_type, external_id)
            if key in self._external_ids:
                raise _Invalid(
                    "An event with the same external ID already exists for the subject.",
                    "DuplicateExternalId",
                )
            self._external_ids.add(key)
        # Ozone records a moderator token's DID, not the body's createdBy.
        self.received_created_by.append(body["createdBy"])
        self.events.append({**body, "createdBy": self.did})
        if is_takedown:
            self.taken_down.add(subject_key)
            self.taken_down_blobs.update(body.get("subjectBlobCids", []))
        return {
            "id": len(self.events),
            "event": event,
            "subject": subject,
            "subjectBlobCids": body.get("subjectBlobCids", []),
            "createdBy": self.did,
            "createdAt": _iso(self.wall_clock()),
        }


async def run_fake_ozone(
    fake: FakeOzone,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``fake`` until cancelled; ``task_status.started`` gets the :class:`HttpServer`."""
    async with trio.open_nursery() as nursery:
        server: HttpServer = await nursery.start(serve_http, fake.serve_request, host, port)
        fake.url = server.url
        task_status.started(server)


# -- body validation (what Ozone's lexicon validation would refuse) ----------------------------


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(epoch))


def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = request.json()
    except ValueError:
        raise _Invalid("body is not JSON") from None
    if not isinstance(body, dict):
        raise _Invalid("body must be a JSON object")
    return body


def _string(obj: dict[str, Any], key: str, where: str, *, required: bool = True) -> None:
    if key not in obj:
        if required:
            raise _Invalid(f"{where} must have the property {key!r}")
        return
    if not isinstance(obj[key], str):
        raise _Invalid(f"{where}/{key} must be a string")


def _string_list(obj: dict[str, Any], key: str, where: str) -> list[str]:
    value = obj.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f"{where}/{key} must be an array of strings")
    return value


def _validate_emit_body(body: dict[str, Any]) -> None:
    unknown = set(body) - _BODY_KEYS
    if unknown:
        raise _Invalid(f"unexpected input properties {sorted(unknown)} (strict fake)")
    for key in ("event", "subject", "createdBy"):
        if key not in body:
            raise _Invalid(f"Input must have the property {key!r}")
    created_by = body["createdBy"]
    if not isinstance(created_by, str) or not created_by.startswith("did:"):
        raise _Invalid("Input/createdBy must be a did")

    subject = body["subject"]
    if not isinstance(subject, dict):
        raise _Invalid("Input/subject must be an object")
    subject_type = subject.get("$type")
    if subject_type == "com.atproto.repo.strongRef":
        _string(subject, "uri", "Input/subject")
        _string(subject, "cid", "Input/subject")
        if not subject["uri"].startswith("at://"):
            raise _Invalid("Input/subject/uri must be an at-uri")
    elif subject_type == "com.atproto.admin.defs#repoRef":
        _string(subject, "did", "Input/subject")
        if not subject["did"].startswith("did:"):
            raise _Invalid("Input/subject/did must be a did")
    else:
        raise _Invalid(f"Input/subject $type {subject_type!r} is not repoRef or strongRef")

    if "subjectBlobCids" in body:
        _string_list(body, "subjectBlobCids", "Input")
        if subject_type != "com.atproto.repo.strongRef":
            raise _Invalid("Blobs can only be specified for record subjects")

    event = body["event"]
    if not isinstance(event, dict):
        raise _Invalid("Input/event must be an object")
    event_type = event.get("$type")
    if event_type not in _EVENT_TYPES:
        raise _Invalid(f"Input/event $type {event_type!r} is not supported by the fake")
    _string(event, "comment", "Input/event", required=event_type.endswith("modEventComment"))
    if event_type.endswith("modEventLabel"):
        if not _string_list(event, "createLabelVals", "Input/event"):
            raise _Invalid("Input/event/createLabelVals must not be empty")
        _string_list(event, "negateLabelVals", "Input/event")
    elif event_type.endswith("modEventReport"):
        _string(event, "reportType", "Input/event")

    if "modTool" in body:
        tool = body["modTool"]
        if not isinstance(tool, dict):
            raise _Invalid("Input/modTool must be an object")
        _string(tool, "name", "Input/modTool")
    if "externalId" in body:
        _string(body, "externalId", "Input")
