"""emitEvent bodies: exact shapes per the Ozone lexicons, deterministic externalIds, bad input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from phash_trio.events import (
    AccountSubject,
    ActionKind,
    EventError,
    PostSubject,
    build_event,
    externalid,
    format_timestamp,
)

DID = "did:plc:z72i7hdynmk6r22z27h6tvur"
URI = f"at://{DID}/app.bsky.feed.post/3kabcdefghi2x"
POST_CID = "bafyreia3tbsfxe3cc75xrxyyn6qc42oupi73fxiox76prlyi5bpb4ihhtq"
BLOB_CID = "bafkreibme22gw2h7y2h7tg2fhqotaqjucnbc24deqo72b6mkl2egezxhvy"
LABELER = "did:plc:ar7c4by46qjdydhdevvrndac"
NOW = datetime(2025, 3, 1, 12, 30, 45, 123456, tzinfo=UTC)
META = {
    "phash": "e0f0f8fcfefe7e3c",
    "matchedPhash": "e0f0f8fcfefe7e3d",
    "distance": 1,
    "rule": "r1",
}
COMMENT = (
    "2025-03-01T12:30:45.123Z: known spam image - phash e0f0f8fcfefe7e3c matched "
    f"e0f0f8fcfefe7e3d (distance 1) on {URI}"
)
DEFS = "tools.ozone.moderation.defs#"


def _build(kind: ActionKind, **overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "post_uri": URI,
        "post_cid": POST_CID,
        "did": DID,
        "label": "spam",
        "rule_comment": "known spam image",
        "rule_name": "r1",
        "phash_hex": "e0f0f8fcfefe7e3c",
        "matched_hex": "e0f0f8fcfefe7e3d",
        "distance": 1,
        "labeler_did": LABELER,
        "now": NOW,
        "blob_cid": BLOB_CID,
    }
    args.update(overrides)
    return build_event(kind, **args)


def test_label_post_body_matches_lexicon() -> None:
    """A post label is a modEventLabel on a strongRef with the blob, modTool and externalId."""
    assert _build(ActionKind.LABEL_POST) == {
        "event": {
            "$type": DEFS + "modEventLabel",
            "createLabelVals": ["spam"],
            "negateLabelVals": [],
            "comment": COMMENT,
        },
        "subject": {"$type": "com.atproto.repo.strongRef", "uri": URI, "cid": POST_CID},
        "subjectBlobCids": [BLOB_CID],
        "createdBy": LABELER,
        "modTool": {"name": "phash-trio", "meta": META},
        "externalId": externalid(ActionKind.LABEL_POST, URI, "spam"),
    }


def test_report_account_body_matches_lexicon() -> None:
    """An account report is a modEventReport (reasonOther) on a repoRef, with no blob CIDs."""
    assert _build(ActionKind.REPORT_ACCOUNT) == {
        "event": {
            "$type": DEFS + "modEventReport",
            "reportType": "com.atproto.moderation.defs#reasonOther",
            "comment": COMMENT,
        },
        "subject": {"$type": "com.atproto.admin.defs#repoRef", "did": DID},
        "createdBy": LABELER,
        "modTool": {"name": "phash-trio", "meta": META},
        "externalId": externalid(ActionKind.REPORT_ACCOUNT, DID, "spam"),
    }


@pytest.mark.parametrize(
    ("kind", "event"),
    [
        (ActionKind.REPORT_POST, {"$type": DEFS + "modEventReport",
                                  "reportType": "com.atproto.moderation.defs#reasonOther"}),
        (ActionKind.TAKEDOWN_POST, {"$type": DEFS + "modEventTakedown"}),
        (ActionKind.COMMENT_POST, {"$type": DEFS + "modEventComment"}),
    ],
)  # fmt: skip
def test_other_post_kinds(kind: ActionKind, event: dict[str, Any]) -> None:
    """Report, takedown and comment on a post carry the strongRef subject and the blob CID."""
    assert _build(kind) == {
        "event": {**event, "comment": COMMENT},
        "subject": {"$type": "com.atproto.repo.strongRef", "uri": URI, "cid": POST_CID},
        "subjectBlobCids": [BLOB_CID],
        "createdBy": LABELER,
        "modTool": {"name": "phash-trio", "meta": META},
        "externalId": externalid(kind, URI, "spam"),
    }


@pytest.mark.parametrize(
    ("kind", "event"),
    [
        (ActionKind.LABEL_ACCOUNT, {"$type": DEFS + "modEventLabel", "createLabelVals": ["spam"],
                                    "negateLabelVals": []}),
        (ActionKind.TAKEDOWN_ACCOUNT, {"$type": DEFS + "modEventTakedown"}),
        (ActionKind.COMMENT_ACCOUNT, {"$type": DEFS + "modEventComment"}),
    ],
)  # fmt: skip
def test_other_account_kinds(kind: ActionKind, event: dict[str, Any]) -> None:
    """Label, takedown and comment on an account use a repoRef and never send blob CIDs."""
    assert _build(kind) == {
        "event": {**event, "comment": COMMENT},
        "subject": {"$type": "com.atproto.admin.defs#repoRef", "did": DID},
        "createdBy": LABELER,
        "modTool": {"name": "phash-trio", "meta": META},
        "externalId": externalid(kind, DID, "spam"),
    }


def test_post_without_blob_cid_has_no_subject_blob_cids() -> None:
    """``subjectBlobCids`` appears only when a blob CID is given."""
    assert "subjectBlobCids" not in _build(ActionKind.LABEL_POST, blob_cid=None)


def test_account_comment_names_the_did_without_a_post() -> None:
    """Without a post URI, the comment says which account was acted on."""
    body = _build(ActionKind.LABEL_ACCOUNT, post_uri=None, post_cid=None)
    assert body["event"]["comment"].endswith(f"(distance 1) on {DID}")


def test_externalid_is_deterministic_and_distinct() -> None:
    """Same kind, subject and label give the same id; changing any one gives another."""
    first = externalid(ActionKind.LABEL_POST, URI, "spam")
    assert first == externalid(ActionKind.LABEL_POST, PostSubject(URI, "othercid"), "spam")
    assert first.startswith("phash-trio:") and len(first) == len("phash-trio:") + 32
    others = {
        externalid(ActionKind.REPORT_POST, URI, "spam"),
        externalid(ActionKind.LABEL_POST, URI + "x", "spam"),
        externalid(ActionKind.LABEL_POST, URI, "porn"),
        externalid(ActionKind.LABEL_ACCOUNT, AccountSubject(DID), "spam"),
    }
    assert first not in others and len(others) == 4


def test_body_id_ignores_time_and_rule_text() -> None:
    """A re-delivered event built later, or under a reworded rule, keeps its externalId."""
    later = _build(ActionKind.LABEL_POST, now=NOW + timedelta(hours=3), rule_comment="other")
    assert later["externalId"] == _build(ActionKind.LABEL_POST)["externalId"]


def test_timestamp_is_utc_milliseconds() -> None:
    """Comment timestamps are UTC with milliseconds and a Z, whatever the input zone."""
    plus_two = NOW.astimezone(timezone(timedelta(hours=2)))
    assert format_timestamp(plus_two) == "2025-03-01T12:30:45.123Z"


@pytest.mark.parametrize(
    ("kind", "overrides", "field"),
    [
        (ActionKind.LABEL_POST, {"post_uri": None}, "post_uri"),
        (ActionKind.LABEL_POST, {"post_cid": ""}, "post_cid"),
        (ActionKind.LABEL_POST, {"post_uri": "https://bsky.app/x"}, "post_uri"),
        (ActionKind.REPORT_ACCOUNT, {"did": None}, "did"),
        (ActionKind.REPORT_ACCOUNT, {"did": "alice.test"}, "did"),
        (ActionKind.LABEL_POST, {"label": ""}, "label"),
        (ActionKind.LABEL_POST, {"phash_hex": "E0F0F8FCFEFE7E3C"}, "phash_hex"),
        (ActionKind.LABEL_POST, {"matched_hex": "abc"}, "matched_hex"),
        (ActionKind.LABEL_POST, {"distance": -1}, "distance"),
        (ActionKind.LABEL_POST, {"distance": True}, "distance"),
        (ActionKind.LABEL_POST, {"labeler_did": "labeler"}, "labeler_did"),
        (ActionKind.LABEL_POST, {"now": datetime(2025, 1, 1)}, "now"),
        (ActionKind.LABEL_POST, {"blob_cid": ""}, "blob_cid"),
    ],
)
def test_bad_input_names_the_field(kind: ActionKind, overrides: dict[str, Any], field: str) -> None:
    """Each malformed argument raises EventError whose message starts with its name."""
    with pytest.raises(EventError, match=f"^{field}: "):
        _build(kind, **overrides)


def test_kind_properties() -> None:
    """Kinds know their subject shape, verb and event type (used for metrics labels)."""
    assert ActionKind.TAKEDOWN_ACCOUNT.verb == "takedown"
    assert not ActionKind.TAKEDOWN_ACCOUNT.on_post
    assert ActionKind.COMMENT_POST.on_post
    assert ActionKind.REPORT_POST.event_type == "modEventReport"
