"""End-to-end operations (issue 5): a Redis outage, /metrics and /healthz, sd_notify, JSON logs.

Each test runs ``phash-trio run`` as a subprocess against the in-process local network
(Jetstream replay, CDN, PDS, PLC, fake Ozone) and the real redis-server of ``redis_proc``.
Real time throughout; every timeout below is only a guard that turns a hang into a failure.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from e2e_helpers import finished, host_blobs, jobs_of
from prometheus_client.parser import text_string_to_metric_families

from phash_trio.image.meanhash import ImageError, mean_hash
from phash_trio.net.ozone.events import externalid
from phash_trio.pipeline.actions import planned_actions
from phash_trio.rules.index import RuleIndex
from phash_trio.rules.model import load_rules
from phash_trio.testing.blobhost import cid_for
from phash_trio.testing.capture import CaptureBuilder, demo_images
from phash_trio.testing.jetstream_replay import fake_did
from phash_trio.testing.localnet import (
    REPO_ROOT,
    LocalNetwork,
    ServiceProcess,
    image_posts,
    run_local_network,
)
from phash_trio.testing.redis_server import RedisProcess, free_port

pytestmark = pytest.mark.e2e

RULES = REPO_ROOT / "rules" / "blobs.json"
IMAGES = demo_images()
BY_CID = {cid_for(data): data for data in IMAGES.values()}
#: Cycled through the posts: coffee, spitfire and chelsea match a rule, the others nothing.
CYCLE = (
    "coffee.jpg",
    "moon.jpg",
    "spitfire.jpg",
    "hubble.jpg",
    "chelsea.jpg",
    "text.jpg",
    "sugarshack.jpg",
)
DECIDED = re.compile(r"decided (\S+) time_us=\d+ blobs=\d+")
#: Failure guard for every wait (never a duration the test relies on).
GUARD = 60.0
CONCURRENCY = 4

EVENTS = "phash_events_received_total"
JOBS = "phash_jobs_processed_total"
DEAD = "phash_jobs_dead_lettered_total"
BLOBS = "phash_blobs_processed_total"
MATCHES = "phash_matches_found_total"


# -- captures and what the rules say about them ------------------------------------------------


def build_posts(count: int, *, seed: int, two_every: int = 0) -> list[dict[str, Any]]:
    """``count`` image posts, each by its own author, cycling through :data:`CYCLE`.

    Every ``two_every``-th post carries a second image, so per-post and per-blob counts differ.
    """
    builder = CaptureBuilder(IMAGES, seed=seed)
    for i in range(count):
        names = [CYCLE[i % len(CYCLE)]]
        if two_every and i % two_every == 0:
            names.append(CYCLE[(i + 3) % len(CYCLE)])
        builder.post(builder.images_embed(names), did=fake_did(f"ops-{seed}-{i}"))
    return builder.events


@attrs.frozen
class Expected:
    """What the service must do with a capture under the example rules."""

    posts: dict[str, int]
    blobs: int
    matches: int
    external_ids: frozenset[str]


def expect(events: list[dict[str, Any]]) -> Expected:
    """Hash every blob in-process and ask the real rule index which Ozone events are due."""
    index = RuleIndex(load_rules(RULES), 3)
    blobs = matches = 0
    ids: set[str] = set()
    for job in jobs_of(events):
        for blob in job.blobs:
            try:
                phash = mean_hash(BY_CID[blob.cid])
            except ImageError:
                continue  # a bad blob: skipped and counted as an error, not as hashed
            blobs += 1
            match = index.match(phash, job.did)
            if match is None:
                continue
            matches += 1
            for kind in planned_actions(match):
                subject = job.uri if kind.on_post else job.did
                ids.add(externalid(kind, subject, match.rule.label, job.time_us))
    return Expected(image_posts(events), blobs, matches, frozenset(ids))


# -- running the service -----------------------------------------------------------------------


async def start(
    nursery: trio.Nursery,
    tmp_path: Path,
    redis: RedisProcess,
    events: list[dict[str, Any]],
    *,
    pace: float = 0.0,
    env: dict[str, str] | None = None,
) -> tuple[LocalNetwork, ServiceProcess]:
    """The local network serving ``events`` and the service subprocess pointed at it, with
    ``env`` on top of the defaults (DEBUG logs, a few workers)."""
    extra = {"LOG_LEVEL": "DEBUG", "PROCESSING_CONCURRENCY": str(CONCURRENCY), **(env or {})}
    net: LocalNetwork = await nursery.start(partial(run_local_network, events, IMAGES, pace=pace))
    port = free_port()
    full = net.service_env(redis_url=redis.url, state_dir=tmp_path / "state", metrics_port=port)
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        full.pop(name, None)  # only what the test asks for, nothing inherited
    full.update(extra)
    service = ServiceProcess(full, tmp_path / "service.log", port)
    await service.start(nursery)
    return net, service


async def stop(service: ServiceProcess) -> int:
    """SIGTERM and the exit code (a graceful stop must be quick: nothing is left to drain)."""
    service.signal(signal.SIGTERM)
    with trio.fail_after(GUARD):
        return await service.wait()


async def healthz(client: httpx.AsyncClient, service: ServiceProcess) -> tuple[int, str]:
    response = await client.get(f"http://127.0.0.1:{service.metrics_port}/healthz")
    return response.status_code, response.text


async def wait_healthz(client: httpx.AsyncClient, service: ServiceProcess, status: int) -> str:
    """Poll /healthz until it answers ``status``; its body."""
    seen: tuple[int, str] | None = None
    with trio.move_on_after(GUARD):
        while True:
            try:
                seen = await healthz(client, service)
            except httpx.HTTPError:
                seen = None
            if seen is not None and seen[0] == status:
                return seen[1]
            await trio.sleep(0.05)
    raise AssertionError(f"/healthz never answered {status} (last {seen}):\n{service.log_tail()}")


def decided_uris(log: str) -> Counter[str]:
    return Counter(DECIDED.findall(log))


# -- the tests ---------------------------------------------------------------------------------


async def test_redis_outage_mid_run_loses_nothing_and_acts_once(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """Redis stopped and restarted mid-run: health and metrics follow it, every post is decided
    and every Ozone event is sent exactly once."""
    events = build_posts(42, seed=11)
    first, rest = events[:21], events[21:]
    want = expect(events)
    held_back = expect(rest)
    assert want.matches and held_back.matches  # the outage must hold some actions back
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=5) as client:
        net, service = await start(nursery, tmp_path, redis_proc, first, pace=0.02)
        before = await service.wait_for(client, lambda m: m.get(JOBS, 0) >= 6, within=GUARD)
        assert await wait_healthz(client, service, 200) == "ok\n"
        assert before["phash_redis_healthy"] == 1
        assert before["phash_redis_reconnects_total"] == 0

        await trio.to_thread.run_sync(redis_proc.stop)
        assert "redis" in await wait_healthz(client, service, 503)
        await service.wait_for(client, lambda m: m["phash_redis_healthy"] == 0, within=GUARD)
        # The second half of the stream arrives while Redis is down.
        host_blobs(net, rest, IMAGES)
        net.replay.append(rest)
        during = await service.wait_for(client, lambda m: m[EVENTS] >= len(events), within=GUARD)
        assert during["phash_redis_healthy"] == 0
        assert during[JOBS] + during[DEAD] < len(want.posts)  # matches wait for their claims

        await trio.to_thread.run_sync(redis_proc.start)
        assert await wait_healthz(client, service, 200) == "ok\n"
        await service.wait_for(
            client,
            lambda m: m["phash_redis_healthy"] == 1 and m["phash_redis_reconnects_total"] >= 1,
            within=GUARD,
        )
        final = await service.wait_for(client, finished(len(events), len(want.posts)), within=GUARD)
        code = await stop(service)
        nursery.cancel_scope.cancel()

    assert code == 0, service.log_tail()
    assert final[DEAD] == 0
    assert final[JOBS] == len(want.posts)
    assert decided_uris(service.log_path.read_text()) == dict.fromkeys(want.posts, 1)
    sent = Counter(event["externalId"] for event in net.ozone.events)
    assert set(sent) == want.external_ids
    assert max(sent.values()) == 1
    refused = [r for r in net.ozone.calls("emitEvent") if r.status != 200]
    assert len(refused) <= CONCURRENCY  # at most the actions in flight when Redis went away


async def test_metrics_move_during_a_paced_replay(redis_proc: RedisProcess, tmp_path: Path) -> None:
    """/metrics, read with prometheus_client's parser, shows the counters moving while events
    stream in, ends on the exact totals, and /healthz is 200 while connected."""
    events = build_posts(30, seed=12, two_every=4)
    first, rest = events[:8], events[8:]
    want = expect(events)
    counters = (EVENTS, JOBS, BLOBS, MATCHES)
    url = ""

    async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
        text = (await client.get(url)).text
        families = {family.name: family for family in text_string_to_metric_families(text)}
        for name in counters:
            assert families[name.removesuffix("_total")].type == "counter"
        assert families["phash_decision_latency_seconds"].type == "histogram"
        return {
            sample.name: sample.value
            for family in families.values()
            for sample in family.samples
            if not sample.labels
        }

    async def scrape_until(
        client: httpx.AsyncClient, done: Callable[[dict[str, float]], bool]
    ) -> dict[str, float]:
        metrics: dict[str, float] = {}
        with trio.move_on_after(GUARD):
            while True:
                metrics = await scrape(client)
                if done(metrics):
                    return metrics
                await trio.sleep(0.05)
        raise AssertionError(f"metrics never got there: {metrics}\n{service.log_tail()}")

    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=5) as client:
        net, service = await start(
            nursery, tmp_path, redis_proc, first, pace=0.03, env={"CACHE_ENABLED": "false"}
        )
        url = f"http://127.0.0.1:{service.metrics_port}/metrics"
        await service.wait_for(client, lambda m: m.get(MATCHES, 0) >= 1, within=GUARD)
        assert await wait_healthz(client, service, 200) == "ok\n"
        early = await scrape(client)
        assert early[EVENTS] <= len(first)
        host_blobs(net, rest, IMAGES)
        net.replay.append(rest)
        await scrape_until(client, lambda m: all(m[k] > early[k] for k in counters))
        final = await scrape_until(client, finished(len(events), len(want.posts)))
        assert await wait_healthz(client, service, 200) == "ok\n"
        code = await stop(service)
        nursery.cancel_scope.cancel()

    assert code == 0, service.log_tail()
    assert final[EVENTS] == len(events)
    assert final["phash_jobs_received_total"] == final[JOBS] == len(want.posts)
    assert final[BLOBS] == want.blobs
    assert final[MATCHES] == want.matches
    assert final["phash_decision_latency_seconds_count"] == len(want.posts)
    assert final["phash_jetstream_connected"] == 1


async def test_sd_notify_ready_status_watchdog_stopping(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """With NOTIFY_SOCKET set the service sends READY=1 once the reader is connected, then
    STATUS=, WATCHDOG=1 pings, and STOPPING=1 after SIGTERM, in that order."""
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 108 bytes"
    received: list[tuple[str, int]] = []  # (line, replay connections when it arrived)
    arrived = trio.Event()
    events = build_posts(3, seed=13)
    async with trio.open_nursery() as nursery:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        await sock.bind(str(path))
        net: LocalNetwork | None = None

        async def listen() -> None:
            nonlocal arrived
            with sock:
                while True:
                    data = await sock.recv(65536)
                    connections = net.replay.connections if net is not None else 0
                    received.extend((line, connections) for line in data.decode().splitlines())
                    arrived.set()
                    arrived = trio.Event()

        async def until(done: Callable[[list[str]], bool]) -> None:
            with trio.move_on_after(GUARD):
                while not done([line for line, _ in received]):
                    await arrived.wait()
                return
            raise AssertionError(f"sd_notify got {received}:\n{service.log_tail()}")

        nursery.start_soon(listen)
        # No WATCHDOG_PID: the service would compare it with its own pid, unknown here.
        notify = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
        net, service = await start(nursery, tmp_path, redis_proc, events, env=notify)

        def watchdog_after_status(lines: list[str]) -> bool:
            status = next((i for i, x in enumerate(lines) if x.startswith("STATUS=")), None)
            return status is not None and "WATCHDOG=1" in lines[status:]

        await until(watchdog_after_status)
        before_signal = len(received)
        code = await stop(service)
        await until(lambda lines: "STOPPING=1" in lines)
        nursery.cancel_scope.cancel()

    assert code == 0, service.log_tail()
    lines = [line for line, _ in received]
    assert "STOPPING=1" not in lines[:before_signal]
    ready = lines.index("READY=1")
    status = next(i for i, line in enumerate(lines) if line.startswith("STATUS="))
    watchdog = lines.index("WATCHDOG=1", status)
    stopping = lines.index("STOPPING=1")
    assert ready < status < watchdog < stopping
    assert received[ready][1] >= 1  # the reader had connected before READY=1
    assert lines[status] == f"STATUS=connected to {net.replay.url}"
    assert lines.count("READY=1") == 1


async def test_json_logs_are_json_and_never_carry_secrets(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """LOG_FORMAT=json: every output line is a JSON object, and neither the password nor any
    token issued (through a login and a token refresh) appears anywhere in the output."""
    events = build_posts(14, seed=14)
    bad = CaptureBuilder(IMAGES, seed=15, start_us=events[-1]["time_us"] + 1)
    bad.post(bad.images_embed(["truncated.jpg", "not-an-image.jpg"]), did=fake_did("ops-bad"))
    events += bad.events
    first, rest = events[:7], events[7:]
    want = expect(events)
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=5) as client:
        net, service = await start(nursery, tmp_path, redis_proc, first, env={"LOG_FORMAT": "json"})
        await service.wait_for(
            client, lambda m: m.get("phash_posts_labeled_total", 0) >= 1, within=GUARD
        )
        net.ozone.expire_access_tokens()  # the next emitEvent meets ExpiredToken: a refresh
        host_blobs(net, rest, IMAGES)
        net.replay.append(rest)
        await service.wait_for(client, finished(len(events), len(events)), within=GUARD)
        code = await stop(service)
        nursery.cancel_scope.cancel()

    assert code == 0, service.log_tail()
    assert net.ozone.create_session_calls >= 1
    assert net.ozone.refresh_session_calls >= 1
    assert {e["externalId"] for e in net.ozone.events} == want.external_ids
    output = service.log_path.read_text()
    records = []
    for number, line in enumerate(output.splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"output line {number} is not JSON: {line!r}")
        assert isinstance(record, dict) and {"ts", "level", "msg"} <= record.keys(), line
        records.append(record)
    levels = Counter(record["level"] for record in records)
    assert levels["DEBUG"] and levels["INFO"] and levels["WARNING"]  # all paths were logged
    assert len(decided_uris("\n".join(r["msg"] for r in records))) == len(events)
    assert net.ozone.password not in output
    assert net.ozone.issued_tokens
    for token in net.ozone.issued_tokens:
        _header, payload, signature = token.split(".")
        assert payload not in output and signature not in output
