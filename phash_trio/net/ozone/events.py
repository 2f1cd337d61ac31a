"""Request bodies for ``tools.ozone.moderation.emitEvent``: pure functions, no I/O.

One :class:`ActionKind` per thing the actions layer may do; :func:`build_event` turns a match
into the exact JSON body Ozone expects (lexicons ``tools.ozone.moderation.emitEvent`` and
``tools.ozone.moderation.defs``). Every body carries a deterministic ``externalId`` (see
:func:`externalid`) so Ozone itself refuses a repeat with ``DuplicateExternalId``: a crash
between "Ozone accepted" and "claim recorded" cannot produce a second label or report.

Account actions are keyed by period as well (:func:`account_period`, the 7-day claim TTL, taken
from the post's Jetstream ``time_us``): a replay of the same post finds the same id, while a
repeat offender posting again after the claim expired gets a new id and is acted on again.

``createdBy`` is the DID of the session that sends the event: for a moderator token Ozone
records the token's DID whatever the body says, so the body says the same.

Errors: :class:`EventError` (a ``ValueError``) names the argument that is wrong.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs

__all__ = [
    "ACCOUNT_PERIOD_SECS",
    "LEGACY_REASON_OTHER",
    "MOD_TOOL_NAME",
    "REASON_OTHER",
    "AccountSubject",
    "ActionKind",
    "EventError",
    "PostSubject",
    "Subject",
    "account_period",
    "build_event",
    "comment_text",
    "externalid",
    "format_timestamp",
    "is_reason_type",
    "reason_accepted",
]

MOD_TOOL_NAME = "phash-trio"
EXTERNAL_ID_PREFIX = "phash-trio:"

_DEFS = "tools.ozone.moderation.defs"
#: Default report reason: accepted by Ozone with no reasonTypes list, an old-style list (it
#: maps to ``com.atproto.moderation.defs#reasonOther``) and a new-style list alike.
REASON_OTHER = "tools.ozone.report.defs#reasonOther"
#: The old form, refused by a labeler whose reasonTypes list only the new form.
LEGACY_REASON_OTHER = "com.atproto.moderation.defs#reasonOther"
#: Account-action externalIds change every this many seconds of post time (= claim TTL).
ACCOUNT_PERIOD_SECS = 7 * 24 * 3600
STRONG_REF = "com.atproto.repo.strongRef"
REPO_REF = "com.atproto.admin.defs#repoRef"

_HEX64_RE = re.compile(r"^[0-9a-f]{16}$")
_REASON_RE = re.compile(
    r"^(tools\.ozone\.report\.defs|com\.atproto\.moderation\.defs)#reason[A-Za-z]{1,64}$"
)


def is_reason_type(value: str) -> bool:
    """True for a report reason token of either lexicon (``...defs#reasonSomething``)."""
    return bool(_REASON_RE.fullmatch(value))


_OLD_REASON = "com.atproto.moderation.defs#reason"
_NEW_REASON = "tools.ozone.report.defs#reason"
#: Ozone's NEW_TO_OLD_REASON_MAPPING (mod-service/profile.ts), by the part after ``#reason``;
#: each prefix stands for its whole family. Longer prefixes first.
_NEW_TO_OLD = (
    ("MisleadingSpam", "Spam"),
    ("Appeal", "Appeal"),
    ("Other", "Other"),
    ("Violence", "Violation"),
    ("Sexual", "Sexual"),
    ("ChildSafety", "Violation"),
    ("Harassment", "Rude"),
    ("Misleading", "Misleading"),
    ("Rule", "Violation"),
    ("SelfHarm", "Violation"),
)


def reason_accepted(reason: str, listed: Sequence[str] | None) -> bool:
    """Whether Ozone accepts report reason ``reason`` from a labeler listing ``listed``.

    No list accepts everything; a listed reason passes; a new-form reason also passes when
    the old-form reason it maps to is listed (never the other way round).
    """
    if listed is None or reason in listed:
        return True
    if not reason.startswith(_NEW_REASON):
        return False
    tail = reason.removeprefix(_NEW_REASON)
    for prefix, old in _NEW_TO_OLD:
        if tail.startswith(prefix):
            return _OLD_REASON + old in listed
    return False


def account_period(time_us: int) -> int:
    """The period (``ACCOUNT_PERIOD_SECS`` long) a post's Jetstream ``time_us`` falls in."""
    return time_us // (ACCOUNT_PERIOD_SECS * 1_000_000)


#: A matched hash: mean hash (16), MD5 (32), PDQ or SHA-256 (64 hex digits).
_MATCHED_RE = re.compile(r"^(?:[0-9a-f]{16}|[0-9a-f]{32}|[0-9a-f]{64})$")


class EventError(ValueError):
    """An argument cannot make a valid emitEvent body; the message names it."""


class ActionKind(enum.Enum):
    """What to do, and to which kind of subject (a post record or the whole account)."""

    LABEL_POST = "label_post"
    REPORT_POST = "report_post"
    TAKEDOWN_POST = "takedown_post"
    #: A moderator note on the post (sent beside a label so the queue shows why).
    COMMENT_POST = "comment_post"
    LABEL_ACCOUNT = "label_account"
    REPORT_ACCOUNT = "report_account"
    TAKEDOWN_ACCOUNT = "takedown_account"
    COMMENT_ACCOUNT = "comment_account"

    @property
    def on_post(self) -> bool:
        """True when the subject is the post record (strongRef), else the account (repoRef)."""
        return self.value.endswith("_post")

    @property
    def verb(self) -> str:
        """``label``, ``report``, ``takedown`` or ``comment``."""
        return self.value.rsplit("_", 1)[0]

    @property
    def event_type(self) -> str:
        """Short name of the event definition, e.g. ``modEventLabel`` (also a metrics label)."""
        return _EVENT_TYPES[self.verb]


_EVENT_TYPES = {
    "label": "modEventLabel",
    "report": "modEventReport",
    "takedown": "modEventTakedown",
    "comment": "modEventComment",
}


@attrs.frozen
class PostSubject:
    """A post record: ``com.atproto.repo.strongRef`` (Ozone needs the CID it judged)."""

    uri: str
    cid: str

    @property
    def key(self) -> str:
        return self.uri

    def to_json(self) -> dict[str, str]:
        return {"$type": STRONG_REF, "uri": self.uri, "cid": self.cid}


@attrs.frozen
class AccountSubject:
    """A whole account: ``com.atproto.admin.defs#repoRef``."""

    did: str

    @property
    def key(self) -> str:
        return self.did

    def to_json(self) -> dict[str, str]:
        return {"$type": REPO_REF, "did": self.did}


#: The two subject shapes emitEvent accepts; ``.key`` is the post URI or the DID.
Subject = PostSubject | AccountSubject


def externalid(kind: ActionKind, subject: Subject | str, label: str, time_us: int) -> str:
    """Deterministic ``externalId``: same action, subject and label give the same id.

    ``subject`` is a :class:`Subject` or its key (post URI or DID). The record CID is left out
    on purpose: the claim keys of skywatch-phash-rs are per URI too. ``time_us`` (the post's
    Jetstream time) matters for account kinds only: their id holds its :func:`account_period`,
    so an account is acted on again once per period at most, like its 7-day claim.
    """
    key = subject if isinstance(subject, str) else subject.key
    text = f"{kind.value}\x00{key}\x00{label}"
    if not kind.on_post:
        text += f"\x00p{account_period(time_us)}"
    digest = hashlib.sha256(text.encode()).hexdigest()
    return EXTERNAL_ID_PREFIX + digest[:32]


def format_timestamp(now: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and ``Z`` (the AT Protocol datetime style)."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise EventError("now: must be a timezone-aware datetime")
    utc = now.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def comment_text(
    *,
    now: datetime,
    rule_comment: str,
    phash_hex: str,
    matched_hex: str,
    distance: int,
    subject_key: str,
) -> str:
    """The moderator-facing comment, in skywatch-phash-rs's shape."""
    return (
        f"{format_timestamp(now)}: {rule_comment} - phash {phash_hex} matched {matched_hex} "
        f"(distance {distance}) on {subject_key}"
    )


def _require(name: str, value: str | None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise EventError(f"{name}: required and must be a non-empty string")
    return value


def _check_hex(name: str, value: str) -> None:
    if not isinstance(value, str) or not _HEX64_RE.match(value):
        raise EventError(f"{name}: {value!r} is not 16 lowercase hex digits")


def build_event(
    kind: ActionKind,
    *,
    post_uri: str | None = None,
    post_cid: str | None = None,
    did: str | None = None,
    label: str,
    rule_comment: str,
    rule_name: str,
    phash_hex: str,
    matched_hex: str,
    distance: int,
    created_by: str,
    now: datetime,
    time_us: int,
    blob_cid: str | None = None,
    post_blob_cids: Sequence[str] = (),
    reason_type: str = REASON_OTHER,
    match_meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The full emitEvent body for ``kind``.

    Post kinds need ``post_uri`` and ``post_cid``; account kinds need ``did`` (``post_uri`` is
    then only used in the comment, to say which post triggered it). ``blob_cid`` (the matched
    image) goes to ``subjectBlobCids`` for post subjects only: Ozone refuses blob CIDs on account
    subjects, so it is dropped there. A post takedown lists ``post_blob_cids`` too (every image
    of the post, matched one first): Ozone takes down only the blobs it is given. ``label`` is
    part of the externalId for every kind and the label value for label kinds; ``time_us`` is
    the post's Jetstream time (see :func:`externalid`); ``reason_type`` goes into reports.
    """
    if not isinstance(kind, ActionKind):
        raise EventError(f"kind: {kind!r} is not an ActionKind")
    subject: Subject
    if kind.on_post:
        subject = PostSubject(_require("post_uri", post_uri), _require("post_cid", post_cid))
        if not subject.key.startswith("at://"):
            raise EventError(f"post_uri: {post_uri!r} is not an at:// URI")
    else:
        subject = AccountSubject(_require("did", did))
        if not subject.key.startswith("did:"):
            raise EventError(f"did: {did!r} is not a DID")
    _require("label", label)
    if not _require("created_by", created_by).startswith("did:"):
        raise EventError(f"created_by: {created_by!r} is not a DID")
    if not is_reason_type(reason_type):
        raise EventError(f"reason_type: {reason_type!r} is not a report reason token")
    if isinstance(time_us, bool) or not isinstance(time_us, int) or time_us < 0:
        raise EventError(f"time_us: {time_us!r} is not a non-negative whole number")
    _check_hex("phash_hex", phash_hex)
    if not isinstance(matched_hex, str) or not _MATCHED_RE.match(matched_hex):
        raise EventError(f"matched_hex: {matched_hex!r} is not 16, 32 or 64 lowercase hex digits")
    if isinstance(distance, bool) or not isinstance(distance, int) or not 0 <= distance <= 256:
        raise EventError(f"distance: {distance!r} is not a whole number from 0 to 256")
    if blob_cid is not None:
        _require("blob_cid", blob_cid)
    for extra in post_blob_cids:
        _require("post_blob_cids", extra)

    comment = comment_text(
        now=now,
        rule_comment=rule_comment,
        phash_hex=phash_hex,
        matched_hex=matched_hex,
        distance=distance,
        subject_key=post_uri if post_uri else subject.key,
    )
    event: dict[str, Any] = {"$type": f"{_DEFS}#{kind.event_type}"}
    if kind.verb == "label":
        event["createLabelVals"] = [label]
        event["negateLabelVals"] = []
    elif kind.verb == "report":
        event["reportType"] = reason_type
    event["comment"] = comment

    body: dict[str, Any] = {
        "event": event,
        "subject": subject.to_json(),
        "createdBy": created_by,
        "modTool": {
            "name": MOD_TOOL_NAME,
            "meta": {
                "phash": phash_hex,
                "matchedPhash": matched_hex,
                "distance": distance,
                "rule": rule_name,
                # What matched (signal type, bank, content id): see rules.index.Match.meta.
                **(match_meta or {}),
            },
        },
        "externalId": externalid(kind, subject, label, time_us),
    }
    if kind.on_post:
        cids = [] if blob_cid is None else [blob_cid]
        if kind is ActionKind.TAKEDOWN_POST:
            cids += [cid for cid in dict.fromkeys(post_blob_cids) if cid != blob_cid]
        if cids:
            body["subjectBlobCids"] = cids
    return body
