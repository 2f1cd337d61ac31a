"""emitEvent bodies: exact shapes per the Ozone lexicons, deterministic externalIds, bad input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from phash_trio.net.ozone.events import (
    ACCOUNT_PERIOD_SECS,
    LEGACY_REASON_OTHER,
    REASON_OTHER,
    AccountSubject,
    ActionKind,
    EventError,
    PostSubject,
    account_period,
    build_event,
    externalid,
    format_timestamp,
    is_reason_type,
)

DID = "did:plc:z72i7hdynmk6r22z27h6tvur"
URI = f"at://{DID}/app.bsky.feed.post/3kabcdefghi2x"
POST_CID = "bafyreia3tbsfxe3cc75xrxyyn6qc42oupi73fxiox76prlyi5bpb4ihhtq"
BLOB_CID = "bafkreibme22gw2h7y2h7tg2fhqotaqjucnbc24deqo72b6mkl2egezxhvy"
OTHER_BLOB = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
#: The session's DID (the automod account), what Ozone records as createdBy.
ACTOR = "did:plc:ar7c4by46qjdydhdevvrndac"
TIME_US = 1_740_832_245_123_456
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
        "created_by": ACTOR,
        "now": NOW,
        "time_us": TIME_US,
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
        "createdBy": ACTOR,
        "modTool": {"name": "phash-trio", "meta": META},
        "externalId": externalid(ActionKind.LABEL_POST, URI, "spam", TIME_US),
    }


def test_report_account_body_matches_lexicon() -> None:
    """An account report is a modEventReport (new-form reasonOther) on a repoRef, no blob CIDs."""
    assert _build(ActionKind.REPORT_ACCOUNT) == {
        "event": {
            "$type": DEFS + "modEventReport",
            "reportType": "tools.ozone.report.defs#reasonOther",
            "comment": COMMENT,
        },
        "subject": {"$type": "com.atproto.admin.defs#repoRef", "did": DID},
        "createdBy": ACTOR,
        "modTool": {"name": "phash-trio", "meta": META},
        "externalId": externalid(ActionKind.REPORT_ACCOUNT, DID, "spam", TIME_US),
    }


@pytest.mark.parametrize(
    ("kind", "event"),
    [
        (ActionKind.REPORT_POST, {"$type": DEFS + "modEventReport",
                                  "reportType": "tools.ozone.report.defs#reasonOther"}),
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
        "createdBy": ACTOR,
        "modTool": {"name": "phash-trio", "meta": META},
        "externalId": externalid(kind, URI, "spam", TIME_US),
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
        "createdBy": ACTOR,
        "modTool": {"name": "phash-trio", "meta": META},
        "externalId": externalid(kind, DID, "spam", TIME_US),
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
    first = externalid(ActionKind.LABEL_POST, URI, "spam", TIME_US)
    assert first == externalid(ActionKind.LABEL_POST, PostSubject(URI, "othercid"), "spam", 0)
    assert first.startswith("phash-trio:") and len(first) == len("phash-trio:") + 32
    others = {
        externalid(ActionKind.REPORT_POST, URI, "spam", TIME_US),
        externalid(ActionKind.LABEL_POST, URI + "x", "spam", TIME_US),
        externalid(ActionKind.LABEL_POST, URI, "porn", TIME_US),
        externalid(ActionKind.LABEL_ACCOUNT, AccountSubject(DID), "spam", TIME_US),
    }
    assert first not in others and len(others) == 4


def test_account_externalid_changes_once_per_claim_period() -> None:
    """Account ids are the same within one 7-day period of post time and differ across it,
    so a repeat offender is acted on again once the claim has expired; post ids never change."""
    period_us = ACCOUNT_PERIOD_SECS * 1_000_000
    assert ACCOUNT_PERIOD_SECS == 7 * 24 * 3600
    start = account_period(TIME_US) * period_us
    assert account_period(start) == account_period(start + period_us - 1) == TIME_US // period_us
    for kind in (ActionKind.LABEL_ACCOUNT, ActionKind.REPORT_ACCOUNT, ActionKind.TAKEDOWN_ACCOUNT):
        same = {externalid(kind, DID, "spam", t) for t in (start, TIME_US, start + period_us - 1)}
        assert len(same) == 1
        assert externalid(kind, DID, "spam", start + period_us) not in same
        assert externalid(kind, DID, "spam", start - 1) not in same
    post = {externalid(ActionKind.LABEL_POST, URI, "spam", t) for t in (0, start + 9 * period_us)}
    assert len(post) == 1


def test_post_takedown_lists_every_blob_of_the_post() -> None:
    """A post takedown names the matched blob first, then every other blob of the post once
    (Ozone takes down only what it is given); other post events name the matched blob only."""
    blobs = [OTHER_BLOB, BLOB_CID, OTHER_BLOB]
    body = _build(ActionKind.TAKEDOWN_POST, post_blob_cids=blobs)
    assert body["subjectBlobCids"] == [BLOB_CID, OTHER_BLOB]
    for kind in (ActionKind.LABEL_POST, ActionKind.REPORT_POST, ActionKind.COMMENT_POST):
        assert _build(kind, post_blob_cids=blobs)["subjectBlobCids"] == [BLOB_CID]
    assert "subjectBlobCids" not in _build(ActionKind.TAKEDOWN_ACCOUNT, post_blob_cids=blobs)


def test_report_reason_type_is_configurable() -> None:
    """Reports carry the given reason; both lexicons' tokens are reasons, other text is not."""
    body = _build(ActionKind.REPORT_POST, reason_type=LEGACY_REASON_OTHER)
    assert body["event"]["reportType"] == "com.atproto.moderation.defs#reasonOther"
    assert REASON_OTHER == "tools.ozone.report.defs#reasonOther"
    assert is_reason_type("tools.ozone.report.defs#reasonSexualNCII")
    assert is_reason_type(LEGACY_REASON_OTHER)
    for bad in ("reasonOther", "tools.ozone.report.defs#other", "x.y#reasonOther", ""):
        assert not is_reason_type(bad)


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
        (ActionKind.LABEL_POST, {"created_by": "labeler"}, "created_by"),
        (ActionKind.LABEL_POST, {"created_by": ""}, "created_by"),
        (ActionKind.REPORT_POST, {"reason_type": "other"}, "reason_type"),
        (ActionKind.LABEL_POST, {"time_us": -1}, "time_us"),
        (ActionKind.LABEL_POST, {"time_us": 1.5}, "time_us"),
        (ActionKind.TAKEDOWN_POST, {"post_blob_cids": [""]}, "post_blob_cids"),
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
