"""End to end: ``phash-trio run`` (a real subprocess on the local network) logs its decisions
and delivers them to loopback webhook receivers, across a SIGKILL mid-delivery."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import trio
from e2e_helpers import GUARD, delivered, finished, harness, jobs_of

from phash_trio.state.decisions import DecisionLog
from phash_trio.state.redisio import RedisThreads
from phash_trio.testing.capture import DEMO_CAPTURE, load_jsonl
from phash_trio.testing.redis_server import RedisProcess, free_port
from phash_trio.testing.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.e2e

SECRET = "e2e-webhook-secret-0123"


async def _until(predicate: object, within: float = GUARD) -> None:
    assert callable(predicate)
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - polling a subprocess's effects
            await trio.sleep(0.05)


async def test_sigkill_mid_delivery_then_restart_delivers_every_event_once_in_order(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """The receiver holds a delivery unanswered, the service is SIGKILLed, the receiver
    recovers and the service restarts: each receiver (both signing schemes, every signature
    verified) ends up with every logged event it subscribed to, once by delivery id, in log
    order; only the delivery on the wire at the kill arrives twice."""
    events = load_jsonl(DEMO_CAPTURE)
    async with harness(redis_proc.url, tmp_path, events, pace=0.01) as h:
        rx = WebhookReceiver(SECRET)
        bridge = WebhookReceiver(SECRET, scheme="hma")
        await rx.start(h.nursery)
        await bridge.start(h.nursery)
        hooks = tmp_path / "hooks.json"
        hooks.write_text(
            json.dumps(
                [
                    {"id": "guide", "url": rx.url, "secret": SECRET},
                    {"id": "bridge", "url": bridge.url, "secret": SECRET, "scheme": "hma"},
                ]
            )
        )
        env = {"WEBHOOKS_FILE": str(hooks), "WEBHOOK_LEASE_SECS": "2"}
        first = await h.start(**env)
        await _until(lambda: len(rx.received) >= 5)
        rx.mode = "hang"
        attempts = rx.attempts
        await _until(lambda: rx.attempts > attempts)  # a delivery is on the wire, unanswered
        assert await h.stop(first, signal.SIGKILL) == -signal.SIGKILL
        rx.mode = "ok"
        cursor = h.saved_cursor()
        replayed = [e for e in delivered(events) if e["time_us"] >= cursor]
        posts = len([j for j in jobs_of(events) if j.time_us >= cursor])

        second = await h.start(**env)
        await second.wait_for(h.client, finished(len(replayed), posts), within=GUARD)
        redis = RedisThreads(redis_proc.url)
        logged = await DecisionLog(redis).after("0-0", count=100_000)
        redis.close()
        matches = [d.id for d in logged if d.kind == "match"]
        await _until(
            lambda: len(rx.unique()) >= len(logged) and len(bridge.unique()) >= len(matches)
        )
        assert await h.stop(second) == 0, second.log_tail()
    assert rx.unique() == [d.id for d in logged]
    assert bridge.unique() == matches
    assert len(rx.received) - len(rx.unique()) <= 1
    assert rx.bad_signatures == bridge.bad_signatures == 0
    assert {d.kind for d in logged} >= {"match", "action_sent"}


async def test_with_api_addr_the_routes_move_to_the_api_app(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """With API_ADDR set, the log, events and page are served there (beside the HMA routes),
    not on the status endpoint; the log holds the run's decisions."""
    events = load_jsonl(DEMO_CAPTURE)
    api_port = free_port()
    async with harness(redis_proc.url, tmp_path, events) as h:
        service = await h.start(API_ADDR=f"127.0.0.1:{api_port}")
        await service.wait_for(
            h.client, lambda m: m.get("phash_matches_found_total", 0) >= 1, within=GUARD
        )
        api = f"http://127.0.0.1:{api_port}"
        with trio.fail_after(GUARD):
            while (await h.client.get(f"{api}/api/v1/logs")).status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.1)
        logs = (await h.client.get(f"{api}/api/v1/logs", params={"limit": 500})).json()
        page = await h.client.get(f"{api}/")
        status_side = await h.client.get(f"http://127.0.0.1:{service.metrics_port}/api/v1/logs")
        assert await h.stop(service) == 0, service.log_tail()
    assert any(entry["kind"] == "match" for entry in logs["logs"])
    assert page.status_code == 200 and "/page.js" in page.text
    assert status_side.status_code == 404
