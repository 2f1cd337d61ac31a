"""OzoneClient against the fake PDS/Ozone over real HTTP: sessions, retries, limits, breaker."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from loguru import logger

from phash_trio.config import Settings
from phash_trio.net.breaker import BreakerState, CircuitBreaker
from phash_trio.net.ozone.client import (
    EmitResult,
    OzoneAuthError,
    OzoneClient,
    OzoneRejected,
    OzoneUnavailable,
)
from phash_trio.net.ozone.events import ActionKind, build_event
from phash_trio.runtime.metrics import Metrics
from phash_trio.testing.fake_ozone import FakeOzone, FakeWallClock, run_fake_ozone

DID = "did:plc:z72i7hdynmk6r22z27h6tvur"
URI = f"at://{DID}/app.bsky.feed.post/3kabcdefghi2x"


@pytest.fixture
def wall() -> FakeWallClock:
    return FakeWallClock()


@pytest.fixture
async def fake(nursery: trio.Nursery, wall: FakeWallClock) -> FakeOzone:
    fake = FakeOzone(wall_clock=wall)
    await nursery.start(run_fake_ozone, fake)
    return fake


@pytest.fixture
def log_text() -> Iterator[list[str]]:
    """Every loguru record (TRACE and up) formatted with its arguments."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="TRACE", format="{message}")
    try:
        yield lines
    finally:
        logger.remove(sink)


def make_client(
    http: httpx.AsyncClient,
    fake: FakeOzone,
    path: Path,
    wall: FakeWallClock,
    **kwargs: Any,
) -> OzoneClient:
    kwargs.setdefault("breaker", CircuitBreaker("ozone", failure_threshold=5, reset_timeout=60.0))
    kwargs.setdefault("password", fake.password)
    return OzoneClient(
        http,
        pds_url=fake.url,
        handle=fake.handle,
        labeler_did=fake.labeler_did,
        session_file=path / "state" / "session.json",
        wall_clock=wall,
        **kwargs,
    )


def body(fake: FakeOzone, label: str = "spam", kind: ActionKind = ActionKind.LABEL_POST) -> Any:
    return build_event(
        kind,
        post_uri=URI,
        post_cid="bafyreia3tbsfxe3cc75xrxyyn6qc42oupi73fxiox76prlyi5bpb4ihhtq",
        did=DID,
        label=label,
        rule_comment="known image",
        rule_name="r1",
        phash_hex="e0f0f8fcfefe7e3c",
        matched_hex="e0f0f8fcfefe7e3d",
        distance=1,
        created_by=fake.did,
        now=datetime(2025, 3, 1, tzinfo=UTC),
        time_us=1_740_787_200_000_000,
        blob_cid="bafkreibme22gw2h7y2h7tg2fhqotaqjucnbc24deqo72b6mkl2egezxhvy",
    )


async def test_emit_event_delivers_the_exact_body(
    fake: FakeOzone, http: httpx.AsyncClient, tmp_path: Path, wall: FakeWallClock
) -> None:
    """Every kind reaches the fake (proxy header, token, lexicon checks) byte-for-byte."""
    client = make_client(http, fake, tmp_path, wall)
    sent = [body(fake, kind=kind) for kind in ActionKind]
    results = [await client.emit_event(b) for b in sent]
    assert results == [EmitResult(event_id=i + 1) for i in range(len(sent))]
    assert fake.events == sent
    assert fake.create_session_calls == 1


async def test_session_is_reused_from_the_file(
    fake: FakeOzone, http: httpx.AsyncClient, tmp_path: Path, wall: FakeWallClock
) -> None:
    """A restarted client reuses the stored 0600 session instead of calling createSession."""
    first = make_client(http, fake, tmp_path, wall)
    await first.emit_event(body(fake, "a"))
    path = tmp_path / "state" / "session.json"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert json.loads(path.read_text())["accessJwt"] == fake.issued_tokens[0]

    second = make_client(http, fake, tmp_path, wall)
    await second.emit_event(body(fake, "b"))
    assert (fake.create_session_calls, fake.refresh_session_calls) == (1, 0)
    assert len(fake.events) == 2


async def test_loose_session_file_mode_is_fixed(
    fake: FakeOzone, http: httpx.AsyncClient, tmp_path: Path, wall: FakeWallClock
) -> None:
    """A session file readable by others is set back to 0600 when loaded."""
    await make_client(http, fake, tmp_path, wall).ensure_session()
    path = tmp_path / "state" / "session.json"
    path.chmod(0o644)
    await make_client(http, fake, tmp_path, wall).ensure_session()
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert fake.create_session_calls == 1


async def test_corrupt_session_file_means_a_new_login(
    fake: FakeOzone, http: httpx.AsyncClient, tmp_path: Path, wall: FakeWallClock
) -> None:
    """An unreadable session file is replaced by a fresh session, not a crash."""
    path = tmp_path / "state" / "session.json"
    path.parent.mkdir()
    path.write_text("{not json")
    session = await make_client(http, fake, tmp_path, wall).ensure_session()
    assert fake.create_session_calls == 1
    assert json.loads(path.read_text())["accessJwt"] == session.access_jwt


async def test_session_of_another_account_is_not_reused(
    fake: FakeOzone, http: httpx.AsyncClient, tmp_path: Path, wall: FakeWallClock
) -> None:
    """A stored session for a different handle is ignored (the file is then overwritten)."""
    await make_client(http, fake, tmp_path, wall).ensure_session()
    path = tmp_path / "state" / "session.json"
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({**stored, "handle": "someone-else.test"}))
    await make_client(http, fake, tmp_path, wall).ensure_session()
    assert fake.create_session_calls == 2


async def test_token_is_refreshed_before_it_expires(
    fake: FakeOzone, http: httpx.AsyncClient, tmp_path: Path, wall: FakeWallClock
) -> None:
    """Within 5 min of ``exp`` (the margin for a 1 h token) the client refreshes first."""
    fake.access_lifetime = 3600
    client = make_client(http, fake, tmp_path, wall)
    await client.emit_event(body(fake, "a"))
    wall.advance(3600 - 301)
    await client.emit_event(body(fake, "b"))
    assert fake.refresh_session_calls == 0
    wall.advance(2)
    await client.emit_event(body(fake, "c"))
    assert (fake.create_session_calls, fake.refresh_session_calls) == (1, 1)
    assert [r.status for r in fake.calls("emitEvent")] == [200, 200, 200]
    stored = json.loads((tmp_path / "state" / "session.json").read_text())
    assert client.session is not None and stored["accessJwt"] == client.session.access_jwt


async def test_unavailable_refresh_keeps_using_a_still_valid_token(
    fake: FakeOzone,
    http: httpx.AsyncClient,
    tmp_path: Path,
    wall: FakeWallClock,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """If refreshSession keeps failing, the not-yet-expired access token is used meanwhile."""
    fake.access_lifetime = 3600
    client = make_client(http, fake, tmp_path, wall)
    await client.ensure_session()
    wall.advance(3400)
    fake.fail_next(3, 503)
    assert await client.emit_event(body(fake)) == EmitResult(event_id=1)
    assert [(r.nsid.rpartition(".")[2], r.status) for r in fake.requests[1:]] == [
        ("refreshSession", 503),
        ("refreshSession", 503),
        ("refreshSession", 503),
        ("emitEvent", 200),
    ]
    wall.advance(300)  # now past exp: the next call must refresh (and here it can)
    await client.emit_event(body(fake, "b"))
    assert fake.refresh_session_calls == 1


async def test_expired_token_answer_refreshes_and_retries_once(
    fake: FakeOzone, http: httpx.AsyncClient, tmp_path: Path, wall: FakeWallClock
) -> None:
    """``ExpiredToken`` from the server triggers refreshSession and one retry that succeeds."""
    client = make_client(http, fake, tmp_path, wall)
    await client.ensure_session()
    fake.expire_access_tokens()
    assert await client.emit_event(body(fake)) == EmitResult(event_id=1)
    assert [r.status for r in fake.calls("emitEvent")] == [400, 200]
    assert (fake.create_session_calls, fake.refresh_session_calls) == (1, 1)


async def test_refused_refresh_falls_back_to_create_session(
    fake: FakeOzone, http: httpx.AsyncClient, tmp_path: Path, wall: FakeWallClock
) -> None:
    """When the refresh token is refused too (InvalidToken) the client logs in again."""
    client = make_client(http, fake, tmp_path, wall)
    await client.ensure_session()
    fake.revoke_all_sessions()
    await client.emit_event(body(fake))
    assert (fake.create_session_calls, fake.refresh_session_calls) == (2, 1)
    assert len(fake.events) == 1


async def test_stored_session_with_expired_refresh_token_logs_in(
    fake: FakeOzone, http: httpx.AsyncClient, tmp_path: Path, wall: FakeWallClock
) -> None:
    """After the refresh token's ``exp`` a restart goes straight to createSession."""
    await make_client(http, fake, tmp_path, wall).ensure_session()
    wall.advance(fake.refresh_lifetime + 1)
    await make_client(http, fake, tmp_path, wall).emit_event(body(fake))
    assert (fake.create_session_calls, fake.refresh_session_calls) == (2, 0)


async def test_concurrent_first_calls_share_one_session(
    fake: FakeOzone, http: httpx.AsyncClient, tmp_path: Path, wall: FakeWallClock
) -> None:
    """Ten workers starting at once cause one createSession, not ten."""
    client = make_client(http, fake, tmp_path, wall)
    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(client.emit_event, body(fake, f"label{i}"))
    assert fake.create_session_calls == 1
    assert len(fake.events) == 10


async def test_bad_password_raises_auth_error(
    fake: FakeOzone, http: httpx.AsyncClient, tmp_path: Path, wall: FakeWallClock
) -> None:
    """A refused createSession is OzoneAuthError with the server's error, not retried."""
    client = make_client(http, fake, tmp_path, wall, password="wrong-password")
    with pytest.raises(OzoneAuthError) as info:
        await client.emit_event(body(fake))
    assert (info.value.status, info.value.error) == (401, "AuthenticationRequired")
    assert info.value.message == "Invalid identifier or password"
    assert "wrong-password" not in str(info.value)
    assert fake.create_session_calls == 1
    assert not (tmp_path / "state" / "session.json").exists()

    with pytest.raises(OzoneAuthError, match="AuthenticationRequired"):
        await client.emit_event(body(fake))
    assert fake.create_session_calls == 1  # the refusal is remembered, not re-tried per job


async def test_auth_refusal_is_retried_after_the_cooldown(
    fake: FakeOzone,
    http: httpx.AsyncClient,
    tmp_path: Path,
    wall: FakeWallClock,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Once ``auth_cooldown`` has passed the client tries createSession again."""
    fake.password = "old-password"
    client = make_client(http, fake, tmp_path, wall, password="new-password", auth_cooldown=600)
    with pytest.raises(OzoneAuthError):
        await client.ensure_session()
    fake.password = "new-password"  # the operator fixed the account, not the service
    await trio.sleep(599)
    with pytest.raises(OzoneAuthError):
        await client.ensure_session()
    await trio.sleep(1)
    await client.ensure_session()
    assert fake.create_session_calls == 2


async def test_5xx_is_retried_with_exact_backoff_then_unavailable(
    fake: FakeOzone,
    http: httpx.AsyncClient,
    tmp_path: Path,
    wall: FakeWallClock,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Three tries 100 ms then 200 ms apart, then OzoneUnavailable; a retry can succeed."""
    metrics = Metrics()
    client = make_client(http, fake, tmp_path, wall, metrics=metrics)
    await client.ensure_session()
    fake.fail_next(3, 500)
    start = trio.current_time()
    with pytest.raises(OzoneUnavailable) as info:
        await client.emit_event(body(fake))
    assert not info.value.breaker_open and not info.value.rate_limited
    assert "HTTP 500" in str(info.value)
    assert [r.time for r in fake.calls("emitEvent")] == [start, start + 0.1, start + 0.1 + 0.2]
    assert metrics.total("ozone_errors") == 1

    fake.fail_next(1, 503)  # a 4th consecutive failure: the breaker (5) stays closed
    start = trio.current_time()
    assert await client.emit_event(body(fake)) == EmitResult(event_id=1)
    assert trio.current_time() == start + 0.1


async def test_outage_shorter_than_the_retries_is_ridden_out(
    fake: FakeOzone,
    http: httpx.AsyncClient,
    tmp_path: Path,
    wall: FakeWallClock,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An outage until t+0.2 fails the tries at t and t+0.1; the one at t+0.3 succeeds."""
    client = make_client(http, fake, tmp_path, wall)
    await client.ensure_session()
    start = trio.current_time()
    fake.fail_until(start + 0.2)
    assert await client.emit_event(body(fake)) == EmitResult(event_id=1)
    assert [r.status for r in fake.calls("emitEvent")] == [503, 503, 200]


async def test_hanging_server_times_out_and_is_retried(
    fake: FakeOzone,
    http: httpx.AsyncClient,
    tmp_path: Path,
    wall: FakeWallClock,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A request without an answer fails after ``request_timeout`` and counts as transient."""
    client = make_client(http, fake, tmp_path, wall, request_timeout=2.0)
    await client.ensure_session()
    fake.hang = True
    start = trio.current_time()
    with pytest.raises(OzoneUnavailable, match="TooSlowError"):
        await client.emit_event(body(fake))
    assert trio.current_time() == start + 2.0 + 0.1 + 2.0 + 0.2 + 2.0
    # Released, the server processes the abandoned requests (as a real one would): the retry
    # is then refused as a duplicate externalId, which counts as success.
    fake.hang = False
    await trio.testing.wait_all_tasks_blocked()
    assert len(fake.events) == 1
    assert await client.emit_event(body(fake)) == EmitResult(duplicate=True)
    assert len(fake.events) == 1


async def test_rate_limit_is_honoured(
    fake: FakeOzone,
    http: httpx.AsyncClient,
    tmp_path: Path,
    wall: FakeWallClock,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``remaining: 0`` holds the next call until the reset; a 429 waits for it and retries."""
    ours = make_client(http, fake, tmp_path, wall)
    other = make_client(http, fake, tmp_path, wall)  # shares the stored session
    await ours.ensure_session()
    await other.ensure_session()
    fake.rate_limit(1, reset_after=10)
    reset_at = trio.current_time() + (1_700_000_010 - wall())

    await ours.emit_event(body(fake, "a"))  # allowed; answer says remaining 0
    await other.emit_event(body(fake, "b"))  # 429, then waits for the reset
    await ours.emit_event(body(fake, "c"))  # waits for the reset itself, no 429
    emits = fake.calls("emitEvent")
    assert [r.status for r in emits] == [200, 429, 200, 200]
    assert emits[2].time == reset_at and emits[3].time == reset_at
    assert len(fake.events) == 3


async def test_retry_after_is_honoured(
    fake: FakeOzone,
    http: httpx.AsyncClient,
    tmp_path: Path,
    wall: FakeWallClock,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 503 with ``retry-after: 7`` delays the next try by 7 s rather than 100 ms."""
    client = make_client(http, fake, tmp_path, wall)
    await client.ensure_session()
    fake.fail_next(1, 503, {"retry-after": "7"})
    start = trio.current_time()
    assert await client.emit_event(body(fake)) == EmitResult(event_id=1)
    assert [r.time for r in fake.calls("emitEvent")] == [start, start + 7.0]


async def test_far_rate_limit_reset_fails_fast(
    fake: FakeOzone,
    http: httpx.AsyncClient,
    tmp_path: Path,
    wall: FakeWallClock,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A reset further away than ``max_rate_limit_wait`` is OzoneUnavailable with retry_at."""
    client = make_client(http, fake, tmp_path, wall, max_rate_limit_wait=60.0)
    await client.ensure_session()
    fake.rate_limit(1, reset_after=3600)
    start = trio.current_time()
    await client.emit_event(body(fake, "a"))
    with pytest.raises(OzoneUnavailable) as info:
        await client.emit_event(body(fake, "b"))
    assert info.value.rate_limited and info.value.retry_at == start + 3600
    assert trio.current_time() == start
    assert len(fake.calls("emitEvent")) == 1


async def test_4xx_is_not_retried_and_carries_ozone_error(
    fake: FakeOzone, http: httpx.AsyncClient, tmp_path: Path, wall: FakeWallClock
) -> None:
    """A refused body raises OzoneRejected at once with error/message; breaker unaffected."""
    breaker = CircuitBreaker("ozone", failure_threshold=5, reset_timeout=60.0)
    client = make_client(http, fake, tmp_path, wall, breaker=breaker)
    bad = body(fake)
    bad["subject"] = {"$type": "com.atproto.admin.defs#repoRef", "did": DID}  # keeps blob CIDs
    with pytest.raises(OzoneRejected) as info:
        await client.emit_event(bad)
    assert (info.value.status, info.value.error) == (400, "InvalidRequest")
    assert info.value.message == "Blobs can only be specified for record subjects"
    assert len(fake.calls("emitEvent")) == 1
    assert breaker.current_state() is BreakerState.CLOSED and breaker.consecutive_failures == 0


async def test_duplicate_external_id_counts_as_success(
    fake: FakeOzone, http: httpx.AsyncClient, tmp_path: Path, wall: FakeWallClock
) -> None:
    """Re-sending an event Ozone already has returns ``duplicate=True`` and adds nothing."""
    metrics = Metrics()
    client = make_client(http, fake, tmp_path, wall, metrics=metrics)
    assert await client.emit_event(body(fake)) == EmitResult(event_id=1)
    assert await client.emit_event(body(fake)) == EmitResult(duplicate=True)
    assert len(fake.events) == 1
    assert [r.status for r in fake.calls("emitEvent")] == [200, 400]
    assert metrics.snapshot()["ozone_events[event=modEventLabel]"] == 2
    assert metrics.total("ozone_errors") == 0


async def test_breaker_opens_after_five_failures_and_stops_calls(
    fake: FakeOzone,
    http: httpx.AsyncClient,
    tmp_path: Path,
    wall: FakeWallClock,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Five failed attempts open the breaker; later calls fail fast until it half-opens."""
    breaker = CircuitBreaker("ozone", failure_threshold=5, reset_timeout=60.0)
    client = make_client(http, fake, tmp_path, wall, breaker=breaker)
    await client.ensure_session()
    fake.down = True
    with pytest.raises(OzoneUnavailable) as first:
        await client.emit_event(body(fake))
    assert not first.value.breaker_open
    with pytest.raises(OzoneUnavailable) as second:
        await client.emit_event(body(fake))
    assert second.value.breaker_open and second.value.retry_at == breaker.opened_at + 60.0
    with pytest.raises(OzoneUnavailable) as third:
        await client.emit_event(body(fake))
    assert third.value.breaker_open and third.value.retry_at == second.value.retry_at
    assert len(fake.calls("emitEvent")) == 5
    assert breaker.current_state() is BreakerState.OPEN

    fake.down = False
    await trio.sleep_until(third.value.retry_at)
    assert await client.emit_event(body(fake)) == EmitResult(event_id=1)
    assert breaker.current_state() is BreakerState.CLOSED


async def test_tokens_and_password_never_reach_the_logs(
    fake: FakeOzone,
    http: httpx.AsyncClient,
    tmp_path: Path,
    wall: FakeWallClock,
    log_text: list[str],
) -> None:
    """Create, refresh, expired-token retry and rejection log nothing secret."""
    fake.access_lifetime = 3600
    client = make_client(http, fake, tmp_path, wall)
    await client.emit_event(body(fake, "a"))
    wall.advance(3500)
    await client.emit_event(body(fake, "b"))
    fake.expire_access_tokens()
    await client.emit_event(body(fake, "c"))
    fake.revoke_all_sessions()
    await client.emit_event(body(fake, "d"))
    bad = body(fake, "e")
    bad["event"]["$type"] = "tools.ozone.moderation.defs#modEventMute"
    with pytest.raises(OzoneRejected):
        await client.emit_event(bad)
    with pytest.raises(OzoneAuthError):
        await make_client(http, fake, tmp_path / "x", wall, password="nope").ensure_session()

    assert (fake.create_session_calls, fake.refresh_session_calls) == (3, 3)
    text = "\n".join(log_text) + repr(client) + repr(client.session)
    assert "refreshed session" in text and "created session" in text
    secrets = [*fake.issued_tokens, fake.password, "nope"]
    assert len(fake.issued_tokens) == 8
    assert [s for s in secrets if s in text] == []


async def test_client_from_settings_talks_to_the_configured_pds(
    nursery: trio.Nursery, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """``from_settings`` wires OZONE_PDS, the credentials, LABELER_DID and STATE_DIR."""
    fake = FakeOzone()  # real wall clock, like the service
    await nursery.start(run_fake_ozone, fake)
    settings = Settings(
        automod_handle=fake.handle,
        automod_password=fake.password,
        labeler_did=fake.labeler_did,
        ozone_pds=fake.url,
        state_dir=tmp_path,
    )
    client = OzoneClient.from_settings(settings, http, CircuitBreaker("ozone"))
    assert await client.emit_event(body(fake)) == EmitResult(event_id=1)
    assert (tmp_path / "session.json").is_file()
