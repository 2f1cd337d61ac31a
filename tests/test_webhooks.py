"""Webhooks on real parts: a loopback receiver that verifies every signature (both schemes),
a real redis-server, the decision log and the deliverers."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry

from phash_trio.state.decisions import DecisionLog
from phash_trio.state.recorder import DecisionMetrics
from phash_trio.state.redisio import RedisThreads
from phash_trio.testing.redis_server import RedisProcess
from phash_trio.testing.webhook_receiver import WebhookReceiver
from phash_trio.webhooks.delivery import DEAD_PREFIX, FIRST_PREFIX, Deliverer, DeliveryConfig
from phash_trio.webhooks.manager import WebhookManager
from phash_trio.webhooks.signing import SignatureError, phash_headers, sign, verify, verify_hma
from phash_trio.webhooks.subscriptions import (
    Subscription,
    SubscriptionError,
    parse_subscription,
)

SECRET = "s3cret-s3cret-s3cret"
FAST = DeliveryConfig(
    retry_max_secs=30, timeout_secs=2, lease_secs=3, backoff_initial=0.05, backoff_max=0.2,
    breaker_failures=3, breaker_reset_secs=0.3,
)  # fmt: skip
GUARD = 30.0


@pytest.fixture
def threads(redis_proc: RedisProcess) -> Iterator[RedisThreads]:
    r = RedisThreads(redis_proc.url, socket_timeout=2.0)
    yield r
    r.close()


def test_sign_and_verify_the_guide_scheme() -> None:
    """A signed body verifies; a changed body, another secret, an old timestamp or missing
    headers are refused."""
    body = b'{"id":"1-0","kind":"match"}'
    headers = phash_headers(SECRET, body, "1-0", now=1_000_000)
    expected = hmac.new(SECRET.encode(), b"1000000." + body, hashlib.sha256).hexdigest()
    assert headers["X-Phash-Signature"] == "sha256=" + expected == sign(SECRET, 1000000, body)
    assert verify(SECRET, body, headers, now=1_000_100) == "1-0"
    for bad_body, secret, now in (
        (body + b" ", SECRET, 1_000_000),
        (body, "another-secret-value", 1_000_000),
        (body, SECRET, 1_000_301),
    ):
        with pytest.raises(SignatureError):
            verify(secret, bad_body, headers, now=now)
    with pytest.raises(SignatureError, match="missing"):
        verify(SECRET, body, {"X-Phash-Signature": headers["X-Phash-Signature"]}, now=1_000_000)
    hma = {"x-hma-signature": hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()}
    verify_hma(SECRET, body, hma)
    with pytest.raises(SignatureError):
        verify_hma(SECRET, body + b"x", hma)


def test_subscriptions_are_checked() -> None:
    """Bad ids, private or non-https URLs (unless allowed), short secrets and unknown kinds
    are refused with one line that never shows the secret."""
    good = {"id": "bot", "url": "https://hooks.example.com/x", "secret": SECRET}
    assert parse_subscription(good).kinds[0] == "match"
    cases = [
        {**good, "id": "a b"},
        {**good, "url": "http://hooks.example.com/x"},
        {**good, "url": "https://127.0.0.1/x"},
        {**good, "url": "https://hooks.example.com/x?token=1"},
        {**good, "secret": "short"},
        {**good, "kinds": ["nope"]},
        {**good, "extra": 1},
    ]
    for case in cases:
        with pytest.raises(SubscriptionError) as info:
            parse_subscription(case)
        assert SECRET not in str(info.value)
    local = parse_subscription({**good, "url": "http://127.0.0.1:9/x"}, allow_private=True)
    assert local.url == "http://127.0.0.1:9/x"
    hma = parse_subscription({**good, "scheme": "hma"})
    assert hma.kinds == ("match",)


async def _wait(predicate: object, what: str) -> None:
    assert callable(predicate)
    with trio.fail_after(GUARD):
        while not predicate():  # noqa: ASYNC110 - the receiver and deliverers have no event for this
            await trio.sleep(0.02)


async def test_every_event_once_in_order_across_outage_and_500s(
    threads: RedisThreads, nursery: trio.Nursery
) -> None:
    """Receiver down, then back; then answering 500 for a while: each subscription's receiver
    (one per scheme) verifies every signature and sees each event exactly once, in order."""
    log = DecisionLog(threads)
    phash_rx = WebhookReceiver(SECRET)
    hma_rx = WebhookReceiver(SECRET, scheme="hma")
    await phash_rx.start(nursery)
    await hma_rx.start(nursery)
    subs = (
        Subscription("guide", phash_rx.url, SECRET),
        Subscription("bridge", hma_rx.url, SECRET, kinds=("match",), scheme="hma"),
    )
    metrics = DecisionMetrics(CollectorRegistry())
    async with httpx.AsyncClient() as client:
        manager = WebhookManager(threads, client, metrics, "test-1", subs, config=FAST)
        await nursery.start(manager.run)
        ids = [await log.append("match" if i % 2 else "action_sent", {"n": i}) for i in range(6)]
        guide = manager.deliverers["guide"][0]
        # Stop once the sixth 2xx has reached the deliverer (not merely been recorded): a
        # receiver killed between recording and answering gets that event again, by design.
        await _wait(lambda: guide.delivered == 6, "first six")

        phash_rx.stop()  # down: connection refused
        ids += [await log.append("match", {"n": i}) for i in range(6, 12)]
        await trio.sleep(0.5)
        await phash_rx.start(nursery)
        await _wait(lambda: len(phash_rx.received) == 12, "after the outage")

        phash_rx.mode = hma_rx.mode = "fail"
        ids += [await log.append("match", {"n": i}) for i in range(12, 18)]
        await _wait(lambda: phash_rx.attempts > 16 and hma_rx.attempts > 14, "500s")
        phash_rx.mode = hma_rx.mode = "ok"
        await _wait(lambda: len(phash_rx.received) == 18, "after the 500s")
        matches = [i for i in ids if i not in ids[0:6:2]]
        await _wait(lambda: len(hma_rx.received) == len(matches), "hma scheme")
    assert [d for d, _ in phash_rx.received] == ids
    assert [body["n"] for _, body in phash_rx.received] == list(range(18))
    assert [d for d, _ in hma_rx.received] == matches
    assert all(body["event_type"] == "match_found" for _, body in hma_rx.received)
    assert phash_rx.bad_signatures == hma_rx.bad_signatures == 0
    nursery.cancel_scope.cancel()


async def test_final_refusal_and_exhausted_retries_go_to_dead_letters(
    threads: RedisThreads, nursery: trio.Nursery
) -> None:
    """A 4xx (here: the receiver has another secret, so 401) is final: dead letter at once;
    a receiver that fails past the retry window is dead-lettered too; later events flow."""
    log = DecisionLog(threads)
    rx = WebhookReceiver("a-different-secret-value")
    await rx.start(nursery)
    sub = Subscription("wrong-secret", rx.url, SECRET)
    metrics = DecisionMetrics(CollectorRegistry())
    config = DeliveryConfig(
        retry_max_secs=0.5, backoff_initial=0.05, backoff_max=0.1, breaker_reset_secs=0.1
    )
    async with httpx.AsyncClient() as client:
        manager = WebhookManager(threads, client, metrics, "t", (sub,), config=config)
        await nursery.start(manager.run)
        first = await log.append("match", {"n": 1})
        dead_key = DEAD_PREFIX + "wrong-secret"
        await _wait(lambda: rx.bad_signatures == 1, "refused")
        await trio.sleep(0.2)
        assert rx.attempts == 1
        rx.secret = SECRET
        rx.mode = "fail"
        second = await log.append("match", {"n": 2})
        await _wait(lambda: manager.deliverers["wrong-secret"][0].dead == 2, "window closes")
        rx.mode = "ok"
        third = await log.append("match", {"n": 3})
        await _wait(lambda: len(rx.received) == 1, "later event")
        letters = await threads.call("LRANGE", lambda c: c.lrange(dead_key, 0, -1))
    assert [d for d, _ in rx.received] == [third]
    assert [__import__("json").loads(x)["event"]["id"] for x in letters] == [second, first]
    nursery.cancel_scope.cancel()


async def test_the_retry_window_survives_a_restart(
    threads: RedisThreads, nursery: trio.Nursery
) -> None:
    """The retry window counts from an entry's first attempt, noted in Redis: the instance that
    takes over after a restart continues that window instead of opening a new one (here it
    starts an hour later with a one-hour window, so one more failure ends it)."""
    log = DecisionLog(threads)
    rx = WebhookReceiver(SECRET)
    await rx.start(nursery)
    rx.mode = "fail"
    sub = Subscription("restarted", rx.url, SECRET)
    config = DeliveryConfig(
        retry_max_secs=3600, lease_secs=3, backoff_initial=0.05, backoff_max=0.1,
        breaker_failures=1000,
    )  # fmt: skip
    metrics = DecisionMetrics(CollectorRegistry())

    async def run(deliverer: Deliverer, scope: trio.CancelScope) -> None:
        with scope:
            await deliverer.run()

    async with httpx.AsyncClient() as client:
        before = Deliverer(sub, threads, client, metrics, "before", config)
        await before.ensure_group()
        entry = await log.append("match", {"n": 1})
        stop = trio.CancelScope()
        nursery.start_soon(run, before, stop)
        await _wait(lambda: rx.attempts >= 3, "retries before the restart")
        stop.cancel()
        noted = await threads.call("HGET", lambda c: c.hget(FIRST_PREFIX + sub.id, entry))
        assert noted is not None and abs(float(noted) - time.time()) < GUARD
        assert before.dead == 0

        hour_later = Deliverer(
            sub, threads, client, metrics, "after", config,
            wall_now=lambda: time.time() + 3600,
        )  # fmt: skip
        tried = rx.attempts
        nursery.start_soon(run, hour_later, trio.CancelScope())
        await _wait(lambda: hour_later.dead == 1, "the window closes after the restart")
        assert rx.attempts == tried + 1
        left = await threads.call("HLEN", lambda c: c.hlen(FIRST_PREFIX + sub.id))
        letters = await threads.call("LRANGE", lambda c: c.lrange(DEAD_PREFIX + sub.id, 0, -1))
    assert left == 0
    assert [json.loads(x)["event"]["id"] for x in letters] == [entry]
    nursery.cancel_scope.cancel()
