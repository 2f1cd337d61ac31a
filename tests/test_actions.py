"""Actions against a real redis-server and the fake Ozone over HTTP: events, claims, caps."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trio
import trio.testing

from phash_trio.net.breaker import CircuitBreaker
from phash_trio.net.ozone.client import OzoneClient, OzoneRejected, OzoneUnavailable
from phash_trio.net.ozone.events import (
    LEGACY_REASON_OTHER,
    REASON_OTHER,
    ActionKind,
    build_event,
    externalid,
)
from phash_trio.pipeline.actions import (
    CLAIM_TTL_SECS,
    Actions,
    ActionsRejected,
    RateSpacer,
    claim_key,
    planned_actions,
)
from phash_trio.pipeline.jobs import BlobRef, ImageJob
from phash_trio.rules.index import Match
from phash_trio.rules.model import Rule
from phash_trio.runtime.metrics import Metrics
from phash_trio.state.store import RedisStore, StoreError
from phash_trio.testing.fake_ozone import ROLE_TRIAGE, FakeOzone, labeler_record, run_fake_ozone
from phash_trio.testing.redis_server import RedisProcess

DID = "did:plc:z72i7hdynmk6r22z27h6tvur"
OTHER_DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
POST_CID = "bafyreia3tbsfxe3cc75xrxyyn6qc42oupi73fxiox76prlyi5bpb4ihhtq"
BLOB_CID = "bafkreibme22gw2h7y2h7tg2fhqotaqjucnbc24deqo72b6mkl2egezxhvy"
OTHER_BLOB = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
THIRD_BLOB = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
NOW = datetime(2025, 11, 21, 8, 30, 0, 123000, tzinfo=UTC)
DAY = "2025-11-21"
PHASH = 0xFCFCFDD9810181C3
LISTED = 0xFCFCFDD9810181C0  # two bits away
LABELER = FakeOzone().labeler_did

FLAG_KINDS = {
    "to_label": ActionKind.LABEL_POST,
    "report_post": ActionKind.REPORT_POST,
    "label_acct": ActionKind.LABEL_ACCOUNT,
    "report_acct": ActionKind.REPORT_ACCOUNT,
    "takedown_post": ActionKind.TAKEDOWN_POST,
    "takedown_acct": ActionKind.TAKEDOWN_ACCOUNT,
}


def job(rkey: str = "3kabcdefghi2x", did: str = DID) -> ImageJob:
    return ImageJob(did=did, rkey=rkey, cid=POST_CID, time_us=1, blobs=(BlobRef(BLOB_CID),))


def match(rule_index: int = 0, label: str = "example-coffee", **flags: Any) -> Match:
    rule = Rule(label=label, phashes=(LISTED,), comment="known coffee picture", **flags)
    return Match(rule=rule, rule_index=rule_index, phash=PHASH, matched_phash=LISTED, distance=2)


def expected_body(kind: ActionKind, j: ImageJob, m: Match, created_by: str) -> dict[str, Any]:
    return build_event(
        kind,
        post_uri=j.uri,
        post_cid=j.cid,
        did=j.did,
        blob_cid=j.blobs[0].cid,
        post_blob_cids=[b.cid for b in j.blobs],
        time_us=j.time_us,
        label=m.rule.label,
        rule_comment=m.rule.comment,
        rule_name=m.rule.label,
        phash_hex=f"{PHASH:016x}",
        matched_hex=f"{LISTED:016x}",
        distance=2,
        created_by=created_by,
        match_meta={"signalType": "phash", "matchedHash": f"{LISTED:016x}", "distance": 2},
        now=NOW,
    )


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeOzone:
    fake = FakeOzone()
    await nursery.start(run_fake_ozone, fake)
    return fake


@pytest.fixture
def ozone(
    http: httpx.AsyncClient, fake: FakeOzone, tmp_path: Path, metrics: Metrics
) -> OzoneClient:
    return OzoneClient(
        http,
        pds_url=fake.url,
        handle=fake.handle,
        password=fake.password,
        labeler_did=fake.labeler_did,
        breaker=CircuitBreaker("ozone", failure_threshold=100, reset_timeout=60.0),
        session_file=tmp_path / "session.json",
        metrics=metrics,
        backoff_initial=0.01,
        request_timeout=float("inf"),
    )


def make_actions(
    store: RedisStore,
    ozone: OzoneClient | None,
    metrics: Metrics,
    *,
    cap: int = 1000,
    interval: float = 0.0,
    dry_run: bool = False,
) -> Actions:
    return Actions(
        store=store,
        ozone=ozone,
        metrics=metrics,
        labeler_did=LABELER,
        default_daily_cap=cap,
        spacer=RateSpacer(interval),
        dry_run=dry_run,
        today=lambda: DAY,
        wall_now=lambda: NOW,
    )


def event_types(fake: FakeOzone) -> list[str]:
    """The event type (``modEventLabel``...) of each event the fake accepted, in order."""
    return [e["event"]["$type"].rpartition("#")[2] for e in fake.events]


SENT_METRIC = {
    ActionKind.LABEL_POST: "posts_labeled",
    ActionKind.REPORT_POST: "posts_reported",
    ActionKind.TAKEDOWN_POST: "posts_taken_down",
    ActionKind.LABEL_ACCOUNT: "accounts_labeled",
    ActionKind.REPORT_ACCOUNT: "accounts_reported",
    ActionKind.TAKEDOWN_ACCOUNT: "accounts_taken_down",
}


@pytest.mark.parametrize("flag", sorted(FLAG_KINDS))
async def test_each_flag_sends_exactly_its_event(
    flag: str,
    store: RedisStore,
    ozone: OzoneClient,
    fake: FakeOzone,
    metrics: Metrics,
    raw: redis.Redis,
) -> None:
    """One flag gives one event with the exact body, a skywatch claim key with a 7-day TTL,
    and its own counter."""
    kind = FLAG_KINDS[flag]
    j, m = job(), match(**{flag: True})
    await make_actions(store, ozone, metrics).apply(j, j.blobs[0], m)

    body = expected_body(kind, j, m, fake.did)
    assert fake.events == [body]
    sent = fake.events[0]
    subject_key = j.uri if kind.on_post else j.did
    if kind.on_post:
        assert sent["subject"] == {
            "$type": "com.atproto.repo.strongRef",
            "uri": j.uri,
            "cid": j.cid,
        }
        assert sent["subjectBlobCids"] == [BLOB_CID]
    else:
        assert sent["subject"] == {"$type": "com.atproto.admin.defs#repoRef", "did": DID}
        assert "subjectBlobCids" not in sent
    assert sent["event"]["$type"] == f"tools.ozone.moderation.defs#{kind.event_type}"
    assert sent["createdBy"] == fake.did
    assert sent["modTool"] == {
        "name": "phash-trio",
        "meta": {
            "phash": "fcfcfdd9810181c3",
            "matchedPhash": "fcfcfdd9810181c0",
            "distance": 2,
            "rule": "example-coffee",
            "signalType": "phash",
            "matchedHash": "fcfcfdd9810181c0",
        },
    }
    assert sent["externalId"] == externalid(kind, subject_key, "example-coffee", j.time_us)

    key = {
        ActionKind.LABEL_POST: f"claim:post:label:{j.uri}:example-coffee",
        ActionKind.REPORT_POST: f"claim:post:report:{j.uri}:example-coffee",
        ActionKind.TAKEDOWN_POST: f"claim:post:takedown:{j.uri}",
        ActionKind.LABEL_ACCOUNT: f"claim:account:label:{DID}:example-coffee",
        ActionKind.REPORT_ACCOUNT: f"claim:account:report:{DID}:example-coffee",
        ActionKind.TAKEDOWN_ACCOUNT: f"claim:account:takedown:{DID}",
    }[kind]
    assert claim_key(kind, j, "example-coffee") == key
    assert raw.keys("claim:*") == [key]
    assert raw.get(key) == "1"
    assert CLAIM_TTL_SECS - 5 <= raw.ttl(key) <= CLAIM_TTL_SECS == 7 * 24 * 3600
    assert raw.get(f"actions:0:example-coffee:{DAY}") == "1"

    snap = metrics.snapshot()
    assert snap[SENT_METRIC[kind]] == 1
    assert (
        metrics.total("posts_labeled")
        + metrics.total("posts_reported")
        + metrics.total("posts_taken_down")
        + metrics.total("accounts_labeled")
        + metrics.total("accounts_reported")
        + metrics.total("accounts_taken_down")
        == 1
    )
    assert snap[f"ozone_events[event={kind.event_type}]"] == 1


async def test_all_flags_in_fixed_order(
    store: RedisStore, ozone: OzoneClient, fake: FakeOzone, metrics: Metrics
) -> None:
    """A rule with every flag sends labels, then reports, then takedowns, post before account."""
    j = job()
    m = match(**dict.fromkeys(FLAG_KINDS, True))
    order = [
        ActionKind.LABEL_POST,
        ActionKind.LABEL_ACCOUNT,
        ActionKind.REPORT_POST,
        ActionKind.REPORT_ACCOUNT,
        ActionKind.TAKEDOWN_POST,
        ActionKind.TAKEDOWN_ACCOUNT,
    ]
    assert planned_actions(m) == order
    await make_actions(store, ozone, metrics).apply(j, j.blobs[0], m)
    assert fake.events == [expected_body(k, j, m, fake.did) for k in order]
    assert metrics.total("actions_skipped") == 0


async def test_no_flag_sends_nothing(
    store: RedisStore, ozone: OzoneClient, fake: FakeOzone, metrics: Metrics, raw: redis.Redis
) -> None:
    """A rule without action flags only matches: no event, no claim, no session."""
    j = job()
    await make_actions(store, ozone, metrics).apply(j, j.blobs[0], match())
    assert fake.requests == []
    assert raw.keys("*") == []


async def test_same_post_twice_sends_once(
    store: RedisStore, ozone: OzoneClient, fake: FakeOzone, metrics: Metrics
) -> None:
    """The second time the claims are held: nothing reaches Ozone, each skip is counted."""
    j, m = job(), match(to_label=True, label_acct=True)
    actions = make_actions(store, ozone, metrics)
    await actions.apply(j, j.blobs[0], m)
    await actions.apply(j, j.blobs[0], m)
    # Another post by the same author: the account label is already claimed.
    other = job("3kzzzzzzzzz2x")
    await actions.apply(other, other.blobs[0], m)
    assert event_types(fake) == [
        "modEventLabel",
        "modEventLabel",
        "modEventLabel",
    ]
    assert [e["subject"].get("uri", e["subject"].get("did")) for e in fake.events] == [
        j.uri,
        DID,
        other.uri,
    ]
    assert len(fake.calls("emitEvent")) == 3  # no DuplicateExternalId attempt either
    assert metrics.snapshot()["actions_skipped[reason=already_done]"] == 3


async def test_claim_held_elsewhere_is_skipped(
    store: RedisStore,
    ozone: OzoneClient,
    fake: FakeOzone,
    metrics: Metrics,
    raw: redis.Redis,
) -> None:
    """A claim set by someone else (the Rust service, another instance) means "done": skip it
    and leave the claim alone."""
    j, m = job(), match(to_label=True, report_post=True)
    held = f"claim:post:label:{j.uri}:example-coffee"
    raw.set(held, "1", ex=3600)
    await make_actions(store, ozone, metrics).apply(j, j.blobs[0], m)
    assert event_types(fake) == ["modEventReport"]
    assert metrics.snapshot()["actions_skipped[reason=already_done]"] == 1
    assert 3590 <= raw.ttl(held) <= 3600
    assert raw.get(f"actions:0:example-coffee:{DAY}") == "1"  # the skip used no cap


async def test_claim_is_pending_while_sending_then_done(
    store: RedisStore, ozone: OzoneClient, fake: FakeOzone, metrics: Metrics, raw: redis.Redis
) -> None:
    """While the event is on the wire the claim holds this process's pending marker; once Ozone
    accepted it, the skywatch "done" value ``1``."""
    j, m = job(), match(to_label=True)
    actions = make_actions(store, ozone, metrics)
    key = f"claim:post:label:{j.uri}:example-coffee"
    await ozone.ensure_session()
    fake.hang = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actions.apply, j, j.blobs[0], m)
        while raw.get(key) is None:  # noqa: ASYNC110 - Redis offers nothing to wait on
            await trio.sleep(0.005)
        assert raw.get(key) == actions.claim_marker
        assert actions.claim_marker.startswith("pending:")
        fake.hang = False
    assert raw.get(key) == "1"
    assert CLAIM_TTL_SECS - 5 <= raw.ttl(key) <= CLAIM_TTL_SECS
    assert len(fake.events) == 1


async def test_claim_left_pending_by_a_killed_process_is_taken_over(
    store: RedisStore,
    ozone: OzoneClient,
    fake: FakeOzone,
    metrics: Metrics,
    raw: redis.Redis,
    log_lines: list[str],
) -> None:
    """A claim left pending (a process killed mid-send, or our own release that failed while
    Redis was down) does not block the action: it is sent again."""
    j, m = job(), match(to_label=True, report_post=True)
    actions = make_actions(store, ozone, metrics)
    label_key = f"claim:post:label:{j.uri}:example-coffee"
    report_key = f"claim:post:report:{j.uri}:example-coffee"
    raw.set(label_key, "pending:0123456789abcdef", ex=600)
    raw.set(report_key, actions.claim_marker, ex=600)  # ours, left by a failed release
    await actions.apply(j, j.blobs[0], m)
    assert event_types(fake) == [
        "modEventLabel",
        "modEventReport",
    ]
    assert raw.get(label_key) == "1"
    assert raw.get(report_key) == "1"
    assert any("earlier run stopped while sending" in line for line in log_lines)
    # Had the killed process's event reached Ozone, the repeat is refused and counts as sent.
    raw.set(label_key, "pending:0123456789abcdef", ex=600)
    await actions.apply(j, j.blobs[0], match(to_label=True))
    assert len(fake.events) == 2
    assert [r.status for r in fake.calls("emitEvent")] == [200, 200, 400]
    assert raw.get(label_key) == "1"
    assert metrics.snapshot()["posts_labeled"] == 2


async def test_ozone_failure_releases_the_claim(
    store: RedisStore,
    ozone: OzoneClient,
    fake: FakeOzone,
    metrics: Metrics,
    raw: redis.Redis,
) -> None:
    """When Ozone keeps failing the claim and the cap count are given back; a retry sends."""
    j, m = job(), match(to_label=True)
    actions = make_actions(store, ozone, metrics)
    await ozone.ensure_session()
    fake.fail_next(3, 503)
    with pytest.raises(OzoneUnavailable):
        await actions.apply(j, j.blobs[0], m)
    assert fake.events == []
    assert raw.keys("claim:*") == []
    assert raw.get(f"actions:0:example-coffee:{DAY}") == "0"
    await actions.apply(j, j.blobs[0], m)
    assert fake.events == [expected_body(ActionKind.LABEL_POST, j, m, fake.did)]
    assert raw.keys("claim:*") == [f"claim:post:label:{j.uri}:example-coffee"]
    assert raw.get(f"actions:0:example-coffee:{DAY}") == "1"


async def test_ozone_rejection_releases_the_claim_and_the_rest_still_runs(
    store: RedisStore,
    ozone: OzoneClient,
    fake: FakeOzone,
    metrics: Metrics,
    raw: redis.Redis,
) -> None:
    """A refused event (4xx) leaves no claim behind, the rule's next action is still sent and
    confirmed, and the job gets an ActionsRejected naming the refused one."""
    j, m = job(), match(to_label=True, report_post=True)
    await ozone.ensure_session()
    fake.fail_next(1, 400)
    with pytest.raises(ActionsRejected) as caught:
        await make_actions(store, ozone, metrics).apply(j, j.blobs[0], m)
    assert [kind for kind, _ in caught.value.failures] == [ActionKind.LABEL_POST]
    assert isinstance(caught.value, OzoneRejected)
    assert event_types(fake) == ["modEventReport"]
    assert raw.keys("claim:*") == [f"claim:post:report:{j.uri}:example-coffee"]
    assert raw.get(f"actions:0:example-coffee:{DAY}") == "1"
    assert metrics.snapshot()["ozone_errors[kind=rejected]"] == 1


async def test_every_refusal_is_reported_and_no_action_stops_another(
    store: RedisStore,
    ozone: OzoneClient,
    fake: FakeOzone,
    metrics: Metrics,
    raw: redis.Redis,
    log_lines: list[str],
) -> None:
    """A triage account may report but not label or take down: both refusals are named in the
    one error and logged, while the two reports between them are sent."""
    fake.role = ROLE_TRIAGE
    j = job()
    m = match(to_label=True, report_post=True, report_acct=True, takedown_post=True)
    with pytest.raises(ActionsRejected) as caught:
        await make_actions(store, ozone, metrics).apply(j, j.blobs[0], m)
    failed = [kind for kind, _ in caught.value.failures]
    assert failed == [ActionKind.LABEL_POST, ActionKind.TAKEDOWN_POST]
    assert "label_post: " in str(caught.value) and "takedown_post: " in str(caught.value)
    assert "Must be a full moderator" in str(caught.value)
    assert event_types(fake) == ["modEventReport", "modEventReport"]
    assert sorted(raw.keys("claim:*")) == [
        f"claim:account:report:{DID}:example-coffee",
        f"claim:post:report:{j.uri}:example-coffee",
    ]
    assert raw.get(f"actions:0:example-coffee:{DAY}") == "2"
    assert sum("failed: " in line and j.uri in line for line in log_lines) == 2


async def test_transient_failure_of_one_action_is_raised_after_the_others_ran(
    store: RedisStore,
    ozone: OzoneClient,
    fake: FakeOzone,
    metrics: Metrics,
    raw: redis.Redis,
) -> None:
    """Ozone down for the label's three tries: the report still goes out, the job gets the
    OzoneUnavailable (so it is retried), and the retry sends only the label."""
    j, m = job(), match(to_label=True, report_post=True)
    actions = make_actions(store, ozone, metrics)
    await ozone.ensure_session()
    fake.fail_next(3, 503)
    with pytest.raises(OzoneUnavailable):
        await actions.apply(j, j.blobs[0], m)
    assert event_types(fake) == ["modEventReport"]
    await actions.apply(j, j.blobs[0], m)
    assert event_types(fake) == ["modEventReport", "modEventLabel"]
    assert raw.get(f"actions:0:example-coffee:{DAY}") == "2"


async def test_already_taken_down_confirms_the_claim_and_the_account_takedown_is_sent(
    store: RedisStore,
    ozone: OzoneClient,
    fake: FakeOzone,
    metrics: Metrics,
    raw: redis.Redis,
    log_lines: list[str],
) -> None:
    """A post a human took down first answers "Subject is already taken down": the claim is
    confirmed (no replay sends it again), and the rule's account takedown still goes out."""
    j, m = job(), match(takedown_post=True, takedown_acct=True)
    fake.take_down(j.uri)
    actions = make_actions(store, ozone, metrics)
    await actions.apply(j, j.blobs[0], m)
    assert [r.status for r in fake.calls("emitEvent")] == [400, 200]
    assert event_types(fake) == ["modEventTakedown"]
    assert fake.events[0]["subject"] == {"$type": "com.atproto.admin.defs#repoRef", "did": DID}
    assert raw.get(f"claim:post:takedown:{j.uri}") == "1"
    assert raw.get(f"claim:account:takedown:{DID}") == "1"
    assert any("its effect already held" in line for line in log_lines)
    assert metrics.total("ozone_errors") == 0

    fake.requests.clear()
    await actions.apply(j, j.blobs[0], m)
    assert fake.calls("emitEvent") == []


async def test_replayed_takedown_without_claims_is_not_an_error(
    store: RedisStore,
    ozone: OzoneClient,
    fake: FakeOzone,
    metrics: Metrics,
    raw: redis.Redis,
) -> None:
    """With the Redis claims gone, a replay of a takedown gets "already taken down" from Ozone
    (not DuplicateExternalId) and counts as done."""
    j, m = job(), match(takedown_post=True)
    actions = make_actions(store, ozone, metrics)
    await actions.apply(j, j.blobs[0], m)
    raw.flushdb()
    await actions.apply(j, j.blobs[0], m)
    assert [r.status for r in fake.calls("emitEvent")] == [200, 400]
    assert len(fake.events) == 1
    assert raw.get(f"claim:post:takedown:{j.uri}") == "1"


async def test_post_takedown_takes_down_every_blob_of_the_post(
    store: RedisStore, ozone: OzoneClient, fake: FakeOzone, metrics: Metrics
) -> None:
    """The job knows all images of the post; the takedown lists each, matched one first."""
    blobs = (BlobRef(BLOB_CID), BlobRef(OTHER_BLOB), BlobRef(THIRD_BLOB))
    j = ImageJob(did=DID, rkey="3kabcdefghi2x", cid=POST_CID, time_us=1, blobs=blobs)
    await make_actions(store, ozone, metrics).apply(j, blobs[1], match(takedown_post=True))
    assert fake.events[0]["subjectBlobCids"] == [OTHER_BLOB, BLOB_CID, THIRD_BLOB]
    assert fake.taken_down_blobs == {BLOB_CID, OTHER_BLOB, THIRD_BLOB}


async def test_created_by_is_the_session_did_not_the_labeler(
    store: RedisStore, ozone: OzoneClient, fake: FakeOzone, metrics: Metrics
) -> None:
    """The body's createdBy is the automod account's DID (what Ozone records for it)."""
    j = job()
    await make_actions(store, ozone, metrics).apply(j, j.blobs[0], match(report_post=True))
    assert fake.received_created_by == [fake.did]
    assert fake.did != LABELER


@pytest.mark.parametrize(
    ("listed", "reason", "accepted"),
    [
        (None, REASON_OTHER, True),
        (None, LEGACY_REASON_OTHER, True),
        ([LEGACY_REASON_OTHER], REASON_OTHER, True),
        ([REASON_OTHER], REASON_OTHER, True),
        ([REASON_OTHER], LEGACY_REASON_OTHER, False),
        (["tools.ozone.report.defs#reasonSexualNCII"], REASON_OTHER, False),
    ],
)
async def test_report_reason_type_against_the_labelers_list(
    listed: list[str] | None,
    reason: str,
    accepted: bool,
    store: RedisStore,
    ozone: OzoneClient,
    fake: FakeOzone,
    metrics: Metrics,
) -> None:
    """The reason is a setting; the default new form passes every list Ozone was seen to
    accept, the old form is refused by a labeler that lists only new-form reasons."""
    fake.service_record = labeler_record(["example-coffee"], reason_types=listed)
    actions = make_actions(store, ozone, metrics)
    actions.report_reason_type = reason
    j = job()
    if accepted:
        await actions.apply(j, j.blobs[0], match(report_post=True))
        assert fake.events[0]["event"]["reportType"] == reason
    else:
        with pytest.raises(ActionsRejected, match=f"Invalid reason type: {reason}"):
            await actions.apply(j, j.blobs[0], match(report_post=True))
        assert fake.events == []


async def test_daily_cap(
    store: RedisStore,
    ozone: OzoneClient,
    fake: FakeOzone,
    metrics: Metrics,
    raw: redis.Redis,
    log_lines: list[str],
) -> None:
    """With a cap of 2 the third action of the rule that day is skipped, logged loudly, counted,
    and its claim released; another rule has its own count."""
    actions = make_actions(store, ozone, metrics, cap=2)
    m = match(to_label=True)
    posts = [job(f"3kaaaaaaaaa{i}x") for i in range(2, 5)]
    for p in posts:
        await actions.apply(p, p.blobs[0], m)
    assert [e["subject"]["uri"] for e in fake.events] == [posts[0].uri, posts[1].uri]
    assert metrics.snapshot()["actions_skipped[reason=daily_cap]"] == 1
    assert raw.get(f"actions:0:example-coffee:{DAY}") == "2"
    assert f"claim:post:label:{posts[2].uri}:example-coffee" not in raw.keys("claim:*")
    assert len(raw.keys("claim:*")) == 2
    cap_lines = [line for line in log_lines if "DAILY CAP" in line]
    assert len(cap_lines) == 1
    assert cap_lines[0].startswith("ERROR") and posts[2].uri in cap_lines[0]

    other_rule = match(rule_index=1, label="other-rule", to_label=True)
    await actions.apply(posts[2], posts[2].blobs[0], other_rule)
    assert len(fake.events) == 3
    assert raw.get(f"actions:1:other-rule:{DAY}") == "1"


async def test_rule_cap_overrides_default(
    store: RedisStore, ozone: OzoneClient, fake: FakeOzone, metrics: Metrics
) -> None:
    """``maxActionsPerDay`` on the rule wins over the service default."""
    actions = make_actions(store, ozone, metrics, cap=1000)
    m = match(to_label=True, report_post=True, max_actions_per_day=1)
    j = job()
    await actions.apply(j, j.blobs[0], m)
    assert event_types(fake) == ["modEventLabel"]
    assert metrics.snapshot()["actions_skipped[reason=daily_cap]"] == 1


async def test_dry_run_sends_nothing_and_logs_the_body(
    store: RedisStore,
    ozone: OzoneClient,
    fake: FakeOzone,
    metrics: Metrics,
    raw: redis.Redis,
    log_lines: list[str],
) -> None:
    """Dry-run takes no claim, counts no cap, calls nobody, and logs each full body."""
    j = job()
    m = match(to_label=True, report_acct=True)
    for client in (None, ozone):
        await make_actions(store, client, metrics, dry_run=True).apply(j, j.blobs[0], m)
    assert fake.requests == []
    assert raw.keys("*") == []
    assert metrics.snapshot()["actions_skipped[reason=dry_run]"] == 4
    for kind in (ActionKind.LABEL_POST, ActionKind.REPORT_ACCOUNT):
        dumped = json.dumps(expected_body(kind, j, m, LABELER), sort_keys=True)
        assert sum(dumped in line for line in log_lines) == 2


async def test_dry_run_without_any_ozone_setting_logs_instead_of_failing(
    store: RedisStore, metrics: Metrics, log_lines: list[str]
) -> None:
    """No credentials and no LABELER_DID (the default dry run): a match is logged with a
    placeholder createdBy, never an EventError that would fail the job."""
    j = job()
    actions = make_actions(store, None, metrics, dry_run=True)
    actions.labeler_did = ""
    await actions.apply(j, j.blobs[0], match(takedown_post=True))
    assert sum('"createdBy": "did:web:dry-run.invalid"' in line for line in log_lines) == 1


async def test_rate_spacer_spaces_concurrent_callers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Callers pass one per interval, in turn; after a quiet spell the next passes at once."""
    spacer = RateSpacer(0.25)
    times: list[float] = []

    async def call() -> None:
        await spacer.wait()
        times.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(call)
    assert times == [0.0, 0.25, 0.5, 0.75]
    await trio.sleep_until(5)
    await call()
    await call()
    assert times[4:] == [5.0, 5.25]
    no_wait = RateSpacer(0.0)
    await no_wait.wait()
    await no_wait.wait()
    assert trio.current_time() == 5.25


async def test_rate_limit_spaces_ozone_calls(
    store: RedisStore,
    ozone: OzoneClient,
    fake: FakeOzone,
    metrics: Metrics,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With RATE_LIMIT 250 ms the six events of one match reach Ozone 250 ms apart."""
    await ozone.ensure_session()
    start = trio.current_time()
    j = job()
    await make_actions(store, ozone, metrics, interval=0.25).apply(
        j, j.blobs[0], match(**dict.fromkeys(FLAG_KINDS, True))
    )
    arrivals = [r.time - start for r in fake.calls("emitEvent")]
    assert arrivals == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
    assert len(fake.events) == 6


@pytest.fixture
def limited_store(
    redis_proc: RedisProcess, raw: redis.Redis, metrics: Metrics
) -> Iterator[Callable[[str], RedisStore]]:
    """Stores logged in as a Redis ACL user refused one command (a real NOPERM error)."""
    made: list[tuple[str, RedisStore]] = []

    def make(refused: str) -> RedisStore:
        user = f"no-{refused}"
        raw.acl_setuser(user, enabled=True, nopass=True, keys=["*"], channels=["*"],
                        commands=["+@all", f"-{refused}"])  # fmt: skip
        url = redis_proc.url.replace("redis://", f"redis://{user}:x@")
        made.append((user, RedisStore(url, metrics, socket_timeout=1.0)))
        return made[-1][1]

    yield make
    for user, s in made:
        s.close()
        raw.acl_deluser(user)


async def test_daily_count_is_not_taken_back_when_it_was_never_made(
    limited_store: Callable[[str], RedisStore],
    ozone: OzoneClient,
    fake: FakeOzone,
    metrics: Metrics,
    raw: redis.Redis,
) -> None:
    """INCRBY refused (NOPERM): the action fails without touching the day's count, which used
    to be decremented anyway and let a bad rule past its cap."""
    raw.set(f"actions:0:example-coffee:{DAY}", 5)
    j = job()
    with pytest.raises(StoreError):
        await make_actions(limited_store("incrby"), ozone, metrics).apply(
            j, j.blobs[0], match(to_label=True)
        )
    assert raw.get(f"actions:0:example-coffee:{DAY}") == "5"
    assert raw.keys("claim:*") == []
    assert fake.events == []


async def test_daily_count_over_the_cap_is_taken_back_once(
    limited_store: Callable[[str], RedisStore],
    ozone: OzoneClient,
    fake: FakeOzone,
    metrics: Metrics,
    raw: redis.Redis,
) -> None:
    """Over the cap the count is taken back; when releasing the claim then fails (DEL
    refused), the count is not taken back a second time."""
    raw.set(f"actions:0:example-coffee:{DAY}", 2)
    j = job()
    with pytest.raises(StoreError):
        await make_actions(limited_store("del"), ozone, metrics, cap=2).apply(
            j, j.blobs[0], match(to_label=True)
        )
    assert raw.get(f"actions:0:example-coffee:{DAY}") == "2"
    assert fake.events == []
