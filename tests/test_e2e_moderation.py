"""End to end: what ``phash-trio run`` files in (fake) Ozone, across restarts and an outage.

The expected events are computed independently from the capture and the rule file: every blob
of every image post is hashed from the image bytes, matched with :class:`RuleIndex`, and each
flag of the matched rule gives one event, deduplicated the way claims deduplicate them (post
actions once per post and label, account actions once per author and label). Real time
throughout (real subprocesses); timeouts are failure guards only.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from e2e_helpers import GUARD, delivered, finished, harness, host_blobs, jobs_of, total

from phash_trio.image.meanhash import ImageError, mean_hash
from phash_trio.net.ozone.events import externalid
from phash_trio.pipeline.actions import claim_key, planned_actions
from phash_trio.rules.index import RuleIndex
from phash_trio.rules.model import load_rules
from phash_trio.testing.blobhost import cid_for
from phash_trio.testing.capture import DEMO_CAPTURE, CaptureBuilder, demo_images, load_jsonl
from phash_trio.testing.fake_ozone import FakeOzone
from phash_trio.testing.jetstream_replay import fake_did, make_post
from phash_trio.testing.redis_server import RedisProcess

pytestmark = pytest.mark.e2e

RULES = Path(__file__).resolve().parents[1] / "rules" / "blobs.json"
PROCESSED = "phash_jobs_processed_total"
DEAD = "phash_jobs_dead_lettered_total"
#: One event as Ozone saw it: (subject: post URI or DID, event type, externalId).
Action = tuple[str, str, str]


@attrs.frozen
class Expected:
    """What the capture must produce in Ozone."""

    #: Every event, once.
    actions: frozenset[Action]
    #: Actions asked for before claim deduplication (a full replay skips each as already done).
    planned: int
    #: Image posts (jobs) in the capture, by URI.
    posts: dict[str, int]


def expected_actions(events: list[dict[str, Any]], images: Mapping[str, bytes]) -> Expected:
    """Hash, match and plan independently of the service; deduplicate by claim key."""
    hashes: dict[str, int | None] = {}
    for data in images.values():
        try:
            hashes[cid_for(data)] = mean_hash(data)
        except ImageError:
            hashes[cid_for(data)] = None
    index = RuleIndex(load_rules(RULES), 3)
    claimed: dict[str, Action] = {}
    planned = 0
    jobs = jobs_of(events)
    for job in jobs:
        for blob in job.blobs:
            phash = hashes.get(blob.cid)
            match = None if phash is None else index.match(phash, job.did)
            if match is None:
                continue
            for kind in planned_actions(match):
                planned += 1
                subject = job.uri if kind.on_post else job.did
                action = (
                    subject,
                    kind.event_type,
                    externalid(kind, subject, match.rule.label, job.time_us),
                )
                claimed.setdefault(claim_key(kind, job, match.rule.label), action)
    return Expected(frozenset(claimed.values()), planned, {j.uri: j.time_us for j in jobs})


def filed(fake: FakeOzone) -> list[Action]:
    """The events the fake accepted, as actions (in order)."""
    out = []
    for body in fake.events:
        subject = body["subject"]
        out.append(
            (
                subject.get("uri") or subject["did"],
                body["event"]["$type"].rpartition("#")[2],
                body["externalId"],
            )
        )
    return out


def refused_emits(fake: FakeOzone) -> int:
    """emitEvent calls Ozone did not accept (here: DuplicateExternalId refusals)."""
    return sum(r.status != 200 for r in fake.calls("emitEvent"))


def from_cursor(events: list[dict[str, Any]], cursor: int) -> tuple[int, int]:
    """(events, image posts) a reader resuming at ``cursor`` gets."""
    sent = [e for e in delivered(events) if e["time_us"] >= cursor]
    posts = [j for j in jobs_of(events) if j.time_us >= cursor]
    return len(sent), len(posts)


@pytest.fixture(scope="module")
def demo() -> tuple[list[dict[str, Any]], Expected]:
    events = load_jsonl(DEMO_CAPTURE)
    return events, expected_actions(events, demo_images())


def test_expected_set_covers_every_rule_shape(demo: tuple[list[dict[str, Any]], Expected]) -> None:
    """The computed expectation holds post and account actions of every kind the demo rules
    ask for, and fewer actions than planned (claims deduplicate account actions)."""
    _, want = demo
    kinds = Counter(kind for _, kind, _ in want.actions)
    assert set(kinds) == {"modEventLabel", "modEventReport", "modEventTakedown"}
    assert any(s.startswith("did:") for s, _, _ in want.actions)  # reportAcct (chelsea)
    assert want.planned > len(want.actions)


async def test_every_match_gets_its_events_once_and_a_clean_restart_sends_nothing(
    redis_proc: RedisProcess, tmp_path: Path, demo: tuple[list[dict[str, Any]], Expected]
) -> None:
    """The demo capture files exactly the expected events, once; after SIGTERM a full replay
    (cursor deleted) attempts no emitEvent at all (claims) and reuses the stored session."""
    events, want = demo
    sent = delivered(events)
    async with harness(redis_proc.url, tmp_path, events) as h:
        first = await h.start()
        await first.wait_for(h.client, finished(len(sent), len(want.posts)), within=GUARD)
        assert await h.stop(first) == 0, first.log_tail()
        fake = h.net.ozone
        actions = filed(fake)
        assert Counter(actions).most_common(1)[0][1] == 1
        assert set(actions) == want.actions
        assert refused_emits(fake) == 0
        assert fake.create_session_calls == 1
        session_file = h.state_dir / "session.json"
        assert os.stat(session_file).st_mode & 0o777 == 0o600

        h.cursor_file.unlink()
        second = await h.start()
        metrics = await second.wait_for(
            h.client, finished(len(sent), len(want.posts)), within=GUARD
        )
        assert filed(fake) == actions
        assert len(fake.calls("emitEvent")) == len(actions)  # not even a DuplicateExternalId
        assert metrics["phash_actions_skipped_total[reason=already_done]"] == want.planned
        assert total(metrics, PROCESSED) == len(want.posts)

        # One new matching post: sent with the session stored by the first run.
        images = demo_images()
        new_post = make_post(
            fake_did("newcomer"),
            "3lnewpost2222x",
            max(e["time_us"] for e in events) + 1000,
            image_cids=[cid_for(images["coffee.jpg"])],
        )
        host_blobs(h.net, [new_post], images)
        h.net.replay.append([new_post])
        await second.wait_for(
            h.client, lambda m: m.get("phash_posts_labeled_total", 0) == 1, within=GUARD
        )
        assert await h.stop(second) == 0, second.log_tail()
    assert len(filed(fake)) == len(actions) + 1
    assert (fake.create_session_calls, fake.refresh_session_calls) == (1, 0)
    assert "reusing stored session" in second.log_path.read_text()
    assert os.stat(session_file).st_mode & 0o777 == 0o600
    assert h.net.replay.cursors == [None, None]


async def test_sigkill_mid_stream_then_replay_files_everything_once(
    redis_proc: RedisProcess, tmp_path: Path, demo: tuple[list[dict[str, Any]], Expected]
) -> None:
    """SIGKILL while events are being filed, restart from the saved cursor: every expected
    event ends up in Ozone once; only actions in flight at the kill may be tried twice."""
    events, want = demo
    concurrency = 4
    async with harness(redis_proc.url, tmp_path, events, pace=0.01) as h:
        first = await h.start(PROCESSING_CONCURRENCY=str(concurrency))
        await first.wait_for(
            h.client,
            lambda m: total(m, PROCESSED) >= 30 and h.cursor_file.exists(),
            within=GUARD,
        )
        assert await h.stop(first, signal.SIGKILL) == -signal.SIGKILL
        fake = h.net.ozone
        before = len(fake.events)
        assert 0 < before < len(want.actions), "not killed mid-stream"
        cursor = h.saved_cursor()

        second = await h.start(PROCESSING_CONCURRENCY=str(concurrency))
        await second.wait_for(h.client, finished(*from_cursor(events, cursor)), within=GUARD)
        assert await h.stop(second) == 0, second.log_tail()
    assert h.net.replay.cursors == [None, cursor]
    actions = filed(fake)
    assert Counter(actions).most_common(1)[0][1] == 1
    assert set(actions) == want.actions
    assert refused_emits(fake) <= concurrency * 6  # at most the actions of in-flight posts
    assert fake.create_session_calls == 1


async def test_sigkill_with_an_event_on_the_wire_sends_it_after_restart(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """SIGKILL while an emitEvent is on the wire (claim taken, Ozone never answered): after
    the restart the post is replayed and its event is sent, not skipped as already done."""
    images = demo_images()
    builder = CaptureBuilder(images, seed=9)
    first_post = builder.post(builder.images_embed(["coffee.jpg"]))
    second_post = builder.post(builder.images_embed(["spitfire.jpg"]))  # label + takedown
    want = expected_actions(builder.events, images)
    async with harness(redis_proc.url, tmp_path, [first_post]) as h:
        fake = h.net.ozone
        first = await h.start()
        await first.wait_for(
            h.client, lambda m: m.get("phash_posts_labeled_total", 0) == 1, within=GUARD
        )
        fake.hang = True  # the next emitEvent reaches the fake and waits for an answer
        host_blobs(h.net, [second_post], images)
        h.net.replay.append([second_post])
        await first.wait_for(
            h.client, lambda m: m.get("phash_matches_found_total", 0) == 2, within=GUARD
        )
        await trio.sleep(0.5)  # the claim is taken and the request sent within milliseconds
        assert await h.stop(first, signal.SIGKILL) == -signal.SIGKILL
        fake.down = True  # the held request is answered 503: it never reached "Ozone"
        fake.hang = False
        await trio.sleep(0.1)
        fake.down = False
        assert len(fake.events) == 1
        assert any(r.status == 503 for r in fake.calls("emitEvent"))

        second = await h.start()
        await second.wait_for(
            h.client, lambda m: m.get("phash_posts_taken_down_total", 0) == 1, within=GUARD
        )
        assert await h.stop(second) == 0, second.log_tail()
    assert set(filed(fake)) == want.actions
    assert len(fake.events) == len(want.actions) == 3
    assert "earlier run stopped while sending it" in second.log_path.read_text()


async def test_ozone_outage_mid_run_delivers_everything(
    redis_proc: RedisProcess, tmp_path: Path, demo: tuple[list[dict[str, Any]], Expected]
) -> None:
    """Ozone answers 503 for 3 s mid-stream: the breaker opens, jobs wait for it (reset timeout
    5 s here, 60 s by default) without spending attempts, and in the end every event is
    delivered and nothing is dead-lettered."""
    events, want = demo
    sent = delivered(events)
    async with harness(redis_proc.url, tmp_path, events, pace=0.01) as h:
        service = await h.start(OZONE_BREAKER_RESET_SECS="5")
        await service.wait_for(
            h.client,
            lambda m: m.get("phash_posts_labeled_total", 0) >= 3,
            within=GUARD,
        )
        fake = h.net.ozone
        fake.down = True
        await trio.sleep(3)
        fake.down = False
        metrics = await service.wait_for(
            h.client, finished(len(sent), len(want.posts)), within=GUARD + 10
        )
        assert await h.stop(service) == 0, service.log_tail()
    assert set(filed(fake)) == want.actions
    assert len(filed(fake)) == len(want.actions)
    assert total(metrics, DEAD) == 0
    assert metrics["phash_breaker_transitions_total[breaker=ozone,to=open]"] >= 1
    assert metrics["phash_breaker_transitions_total[breaker=ozone,to=closed]"] >= 1
    assert any(r.status == 503 for r in fake.calls("emitEvent"))
