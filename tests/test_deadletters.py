"""``phash-trio dead-letters list | retry | purge`` as a subprocess, against a real Redis and
the local network's fakes (CDN/PDS, PLC, Ozone) for ``retry``."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis
import trio

from phash_trio.firehose.events import parse_event
from phash_trio.pipeline.jobs import BlobRef, ImageJob
from phash_trio.pipeline.processor import job_to_json
from phash_trio.state.store import DEAD_LETTER_KEY
from phash_trio.testing.capture import CaptureBuilder, demo_images, record_cid
from phash_trio.testing.jetstream_replay import fake_did
from phash_trio.testing.localnet import LocalNetwork, run_local_network
from phash_trio.testing.redis_server import RedisProcess, free_port

pytestmark = pytest.mark.e2e

#: Failure guard for one CLI run (never an expected duration).
GUARD = 60.0


@attrs.frozen
class Run:
    code: int
    out: str
    err: str


@attrs.define
class World:
    net: LocalNetwork
    raw: redis.Redis
    env: dict[str, str]
    #: Image posts of the capture, by image: coffee (label), chelsea (reports), moon (nothing).
    jobs: dict[str, ImageJob]

    async def cli(self, *args: str, env: dict[str, str] | None = None) -> Run:
        with trio.fail_after(GUARD):
            done = await trio.run_process(
                [sys.executable, "-m", "phash_trio", "dead-letters", *args],
                env=env or self.env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        return Run(done.returncode, done.stdout.decode(), done.stderr.decode())

    def push(self, job: ImageJob, error: str = "blob x: CDN 503", attempts: int = 4) -> None:
        """A letter exactly as the pipeline stores it."""
        payload = {
            "job": job_to_json(job),
            "error": error,
            "attempts": attempts,
            "failed_at": datetime(2025, 11, 21, 8, 0, tzinfo=UTC).isoformat(),
        }
        self.raw.rpush(DEAD_LETTER_KEY, json.dumps(payload, ensure_ascii=False))

    def letters(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.raw.lrange(DEAD_LETTER_KEY, 0, -1)]


@pytest.fixture
async def world(redis_proc: RedisProcess, raw: redis.Redis, tmp_path: Path) -> AsyncIterator[World]:
    images = demo_images()
    builder = CaptureBuilder(images, seed=5)
    for name in ("coffee.jpg", "chelsea.jpg", "moon.jpg"):
        builder.post(builder.images_embed([name]))
    jobs = {}
    for name, event in zip(("coffee", "chelsea", "moon"), builder.events, strict=True):
        job = parse_event(json.dumps(event)).job
        assert job is not None
        jobs[name] = job
    async with trio.open_nursery() as nursery:
        net: LocalNetwork = await nursery.start(
            lambda task_status: run_local_network(builder.events, images, task_status=task_status)
        )
        env = net.service_env(
            redis_url=redis_proc.url,
            state_dir=tmp_path / "state",
            metrics_port=free_port(),
            RETRY_ATTEMPTS="0",
            RETRY_DELAY_MS="10",
        )
        yield World(net, raw, env, jobs)
        nursery.cancel_scope.cancel()


def unreachable_job(world: World) -> ImageJob:
    """A coffee post whose author's PDS refuses connections and that no CDN has: it fails
    again on every retry (a transient error)."""
    did = fake_did("pds-is-down")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    world.net.plc.add(did, f"http://127.0.0.1:{closed_port}")
    coffee = world.jobs["coffee"].blobs[0]
    return ImageJob(
        did=did,
        rkey="3lunreach2222x",
        cid=record_cid("unreachable"),
        time_us=1_763_700_000_500_000,
        blobs=(BlobRef(coffee.cid, coffee.mime_type, coffee.size),),
    )


async def test_list_shows_entries_and_limit(world: World) -> None:
    """``list`` prints one line per letter (URI, blobs, attempts, error) and the total."""
    empty = await world.cli("list")
    assert (empty.code, empty.out) == (0, "0 dead letter(s)\n")
    for name in ("coffee", "chelsea", "moon"):
        world.push(world.jobs[name], error=f"failure of {name}")
    listed = await world.cli("list")
    assert listed.code == 0, listed.err
    lines = listed.out.splitlines()
    assert lines[-1] == "3 dead letter(s)"
    for line, name in zip(lines, ("coffee", "chelsea", "moon"), strict=False):
        assert world.jobs[name].uri in line
        assert "1 blob(s)" in line and "attempts 4" in line and f"error: failure of {name}" in line
    limited = await world.cli("list", "--limit", "2")
    assert limited.code == 0
    assert len(limited.out.splitlines()) == 3
    assert limited.out.splitlines()[-1] == "3 dead letter(s), first 2 shown"
    assert len(world.letters()) == 3  # listing changes nothing


async def test_retry_reprocesses_and_removes(world: World) -> None:
    """``retry`` runs every letter through the pipeline against the fakes, files the events
    the rules ask for, and removes the letters; exit 0."""
    for name in ("coffee", "chelsea", "moon"):
        world.push(world.jobs[name])
    run = await world.cli("retry")
    assert run.code == 0, run.out + run.err
    for name in ("coffee", "chelsea", "moon"):
        assert f"done: {world.jobs[name].uri}" in run.out
    assert "retried 3: 3 done, 0 failed again, 0 unreadable (left in place)" in run.out
    assert world.letters() == []
    filed = sorted(
        (e["event"]["$type"].rpartition("#")[2], e["subject"].get("uri") or e["subject"]["did"])
        for e in world.net.ozone.events
    )
    assert filed == sorted(
        [
            ("modEventLabel", world.jobs["coffee"].uri),
            ("modEventReport", world.jobs["chelsea"].uri),
            ("modEventReport", world.jobs["chelsea"].did),
        ]
    )
    again = await world.cli("retry")
    assert (again.code, again.out.splitlines()[-1]) == (
        0,
        "retried 0: 0 done, 0 failed again, 0 unreadable (left in place)",
    )


async def test_retry_stores_a_job_that_fails_again_anew(world: World) -> None:
    """A letter whose job fails again is replaced by a fresh letter (new error and time),
    the others are done and removed; exit 1 says something is left."""
    failing = unreachable_job(world)
    world.push(failing, error="old error")
    world.push(world.jobs["coffee"])
    run = await world.cli("retry")
    assert run.code == 1, run.out + run.err
    assert f"failed again (stored anew): {failing.uri}" in run.out
    assert f"done: {world.jobs['coffee'].uri}" in run.out
    assert "retried 2: 1 done, 1 failed again" in run.out
    [letter] = world.letters()
    assert letter["job"] == job_to_json(failing)
    assert letter["attempts"] == 1
    assert letter["error"] != "old error" and "PDS" in letter["error"]
    assert letter["failed_at"] != "2025-11-21T08:00:00+00:00"
    assert [e["subject"]["uri"] for e in world.net.ozone.events] == [world.jobs["coffee"].uri]


async def test_unreadable_letter_is_left_in_place(world: World) -> None:
    """A letter whose job cannot be read is reported and kept; the others are retried."""
    world.raw.rpush(DEAD_LETTER_KEY, json.dumps({"job": {"did": 5}, "error": "?"}))
    world.push(world.jobs["moon"])
    run = await world.cli("retry")
    assert run.code == 1
    assert "skip unreadable letter" in run.out
    assert "retried 2: 1 done, 0 failed again, 1 unreadable (left in place)" in run.out
    assert world.letters() == [{"job": {"did": 5}, "error": "?"}]
    listed = await world.cli("list")
    assert (listed.code, listed.out.splitlines()[-1]) == (0, "1 dead letter(s)")


async def test_purge_empties(world: World) -> None:
    """``purge`` deletes every letter and says how many; a second purge finds none."""
    for name in ("coffee", "chelsea"):
        world.push(world.jobs[name])
    run = await world.cli("purge")
    assert (run.code, run.out) == (0, "purged 2 dead letter(s)\n")
    assert world.letters() == []
    again = await world.cli("purge")
    assert (again.code, again.out) == (0, "purged 0 dead letter(s)\n")


async def test_unreachable_redis_and_bad_usage_exit_2(world: World) -> None:
    """No Redis: one line on stderr and exit 2; an unknown action is a usage error (2)."""
    env = dict(world.env, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    run = await world.cli("list", env=env)
    assert run.code == 2
    assert "is not reachable" in run.err and "Traceback" not in run.err
    bad = await world.cli("frobnicate")
    assert bad.code == 2 and "invalid choice" in bad.err


async def test_corrupt_letter_is_a_clear_error(world: World) -> None:
    """A ``jobs:dead`` entry that is not a JSON object gives one clear line, not a traceback,
    and stays in the list."""
    world.raw.rpush(DEAD_LETTER_KEY, "this is not json")
    for action in ("list", "retry"):
        run = await world.cli(action)
        assert run.code != 0
        assert "Traceback" not in run.err, run.err
        assert "not a JSON object" in run.err
    assert world.raw.lrange(DEAD_LETTER_KEY, 0, -1) == ["this is not json"]


def test_cli_help_lists_the_actions() -> None:
    """``dead-letters --help`` names the three actions."""
    done = subprocess.run(
        [sys.executable, "-m", "phash_trio", "dead-letters", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=GUARD,
    )
    assert done.returncode == 0
    assert "{list,retry,purge}" in done.stdout
