"""The service against a real AT Protocol network (npm @atproto/dev-env: PLC, PDS, AppView and
Ozone on Postgres): real posts, blobs through the PDS's getBlob, events to the real Ozone."""

from __future__ import annotations

import json
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import redis
import trio
from realnet import (
    Account,
    DevNetwork,
    admin_takedown,
    blob_status,
    jetstream_event,
    labels_on,
    mod_events,
    now_us,
    post_images,
    put_labeler_record,
    subject_status,
)

from phash_trio.image.meanhash import format_hash, mean_hash
from phash_trio.testing.capture import IMAGES_DIR
from phash_trio.testing.jetstream_replay import ReplayServer, run_replay_server
from phash_trio.testing.localnet import ServiceProcess
from phash_trio.testing.redis_server import RedisProcess, free_port

GUARD = 120.0
JOBS = "phash_jobs_processed_total"
REVIEW_OPEN = "tools.ozone.moderation.defs#reviewOpen"


def image(name: str) -> bytes:
    return (IMAGES_DIR / name).read_bytes()


def rule(name: str, label: str, **flags: bool) -> dict[str, Any]:
    """A rule matching the image ``name`` exactly (threshold 0)."""
    return {
        "phashes": [format_hash(mean_hash(image(name)))],
        "label": label,
        "comment": f"e2e: {name}",
        "hammingThreshold": 0,
        **flags,
    }


LABEL_AND_REPORT = rule(
    "coffee.jpg", "phash-coffee", toLabel=True, reportPost=True, labelAcct=True, reportAcct=True
)
TAKE_DOWN = rule("chelsea.jpg", "phash-chelsea", takedownPost=True, takedownAcct=True)
REPORT_ONLY = rule("moon.jpg", "phash-moon", reportPost=True)


async def start_service(
    nursery: trio.Nursery,
    net: DevNetwork,
    tmp_path: Path,
    redis_proc: RedisProcess,
    events: list[dict[str, Any]],
    rules: list[dict[str, Any]],
    *,
    account: str = "automod",
    run: str = "run",
    **extra: str,
) -> ServiceProcess:
    """``phash-trio run`` reading ``events`` from an in-process Jetstream, acting on ``net``."""
    replay: ReplayServer = await nursery.start(partial(run_replay_server, events))
    work = tmp_path / run
    work.mkdir()
    rules_file = work / "rules.json"
    rules_file.write_text(json.dumps(rules))
    mod = net.account(account)
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "JETSTREAM_URL": replay.url,
        "JETSTREAM_FALLBACK_URLS": "",
        # The PDS answers 404 to CDN paths: every blob comes through getBlob via PLC.
        "CDN_URL": net.info["pds"],
        "PLC_ENDPOINT": net.info["plc"],
        "PDS_ENDPOINT": net.info["pds"],
        "ALLOW_PRIVATE_NETWORKS": "true",
        "REDIS_URL": redis_proc.url,
        "STATE_DIR": str(work / "state"),
        "RULES_FILE": str(rules_file),
        "METRICS_ADDR": f"127.0.0.1:{port}",
        "AUTOMOD_HANDLE": mod.handle,
        "AUTOMOD_PASSWORD": mod.app_password,
        "OZONE_PDS": net.info["pds"],
        "OZONE_URL": net.info["ozone"],
        "LABELER_DID": net.info["labelerDid"],
        "CURSOR_UPDATE_INTERVAL_MS": "200",
        "RATE_LIMIT_MS": "0",
        "RETRY_DELAY_MS": "200",
        "PROCESSING_CONCURRENCY": "2",
        "HASH_PROCESSES": "0",
        "LOG_LEVEL": "DEBUG",
        **extra,
    }
    service = ServiceProcess(env, work / "service.log", port)
    await service.start(nursery)
    return service


async def run_to_end(
    net: DevNetwork,
    tmp_path: Path,
    redis_proc: RedisProcess,
    events: list[dict[str, Any]],
    rules: list[dict[str, Any]],
    **kwargs: Any,
) -> tuple[dict[str, float], str]:
    """Run the service until every post is decided, stop it (exit 0); final metrics and log."""
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=10) as client:
        service = await start_service(nursery, net, tmp_path, redis_proc, events, rules, **kwargs)
        metrics = await service.wait_for(
            client, lambda m: m.get(JOBS, 0) >= len(events), within=GUARD
        )
        service.signal(signal.SIGTERM)
        with trio.fail_after(GUARD):
            assert await service.wait() == 0
        nursery.cancel_scope.cancel()
    log = service.log_path.read_text(errors="replace")
    return metrics, log


def _times(count: int) -> list[int]:
    start = now_us()
    return [start + i for i in range(count)]


OURS = frozenset({"modEventLabel", "modEventReport", "modEventTakedown", "modEventComment"})


def _ours(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events of the kinds we send (Ozone adds ``modEventTag`` events of its own)."""
    return [e for e in events if e["event"]["$type"].rpartition("#")[2] in OURS]


def _types(events: list[dict[str, Any]]) -> list[str]:
    return sorted(e["event"]["$type"].rpartition("#")[2] for e in _ours(events))


async def test_labels_reports_takedowns_and_reruns_file_nothing_twice(
    network: DevNetwork, service_redis: RedisProcess, tmp_path: Path
) -> None:
    """Labels applied and signed, reports in the queue, a two-image post and its account taken
    down with every blob gone, createdBy the automod account; reruns from an empty cursor, with
    and then without the Redis claims (hashes still cached), file nothing more."""
    alice, bob, _ = network.authors
    pds, ozone = network.info["pds"], network.info["ozone"]
    automod = network.account("automod")
    async with httpx.AsyncClient(timeout=30) as http:
        labelled = await post_images(http, pds, alice, [image("coffee.jpg")])
        taken = await post_images(http, pds, bob, [image("chelsea.jpg"), image("mountain.jpg")])
        clean = await post_images(http, pds, alice, [image("hubble.jpg")])
        network.sync()
        posts = [labelled, taken, clean]
        events = [jetstream_event(p, t) for p, t in zip(posts, _times(3), strict=True)]
        rules = [LABEL_AND_REPORT, TAKE_DOWN]

        metrics, log = await run_to_end(network, tmp_path, service_redis, events, rules)
        assert metrics.get("phash_matches_found_total") == 2
        assert "ERROR" not in log
        network.sync()

        for subject in (labelled.uri, alice.did):
            labels = await labels_on(http, ozone, subject)
            assert [(lab["val"], lab["src"]) for lab in labels] == [
                ("phash-coffee", network.info["labelerDid"])
            ]
            assert labels[0].get("sig"), "labels are signed by the labeler"
        post_events = await mod_events(http, ozone, labelled.uri)
        assert _types(post_events) == ["modEventLabel", "modEventReport"]
        assert {e["createdBy"] for e in _ours(post_events)} == {automod.did}
        assert _types(await mod_events(http, ozone, alice.did)) == [
            "modEventLabel",
            "modEventReport",
        ]
        assert (await subject_status(http, ozone, labelled.uri))["reviewState"] == REVIEW_OPEN
        assert (await subject_status(http, ozone, alice.did))["reviewState"] == REVIEW_OPEN

        assert (await subject_status(http, ozone, taken.uri))["takendown"] is True
        assert (await subject_status(http, ozone, bob.did))["takendown"] is True
        takedown = _ours(await mod_events(http, ozone, taken.uri))[0]
        assert sorted(takedown["subjectBlobCids"]) == sorted(taken.blob_cids)
        for cid in taken.blob_cids:
            assert await blob_status(http, pds, bob.did, cid) != 200, "every blob is gone"
        assert await blob_status(http, pds, alice.did, clean.blob_cids[0]) == 200
        assert _ours(await mod_events(http, ozone, clean.uri)) == []

        before = {s: len(await mod_events(http, ozone, s)) for s in (
            labelled.uri, alice.did, taken.uri, bob.did)}  # fmt: skip
        _, with_claims = await run_to_end(
            network, tmp_path, service_redis, events, rules, run="rerun-claims"
        )
        assert "ERROR" not in with_claims
        # The claims go, the hash cache stays: the taken-down blobs cannot be fetched again.
        claims = redis.Redis.from_url(service_redis.url)
        deleted = claims.delete(*claims.keys("claim:*"))
        assert deleted == 6
        _, no_claims = await run_to_end(
            network, tmp_path, service_redis, events, rules, run="rerun-no-claims"
        )
        assert "ERROR" not in no_claims
        assert "its effect already held" in no_claims  # the takedowns, refused by status
        assert "Ozone already had it" in no_claims  # labels and reports, by externalId
        after = {s: len(await mod_events(http, ozone, s)) for s in before}
        assert after == before


async def test_post_a_human_took_down_first(
    network: DevNetwork, service_redis: RedisProcess, tmp_path: Path
) -> None:
    """Ozone refuses our takedown of a post a moderator already took down (the record only, so
    its image is still served); that confirms the claim, and the account takedown is sent."""
    carol = network.authors[2]
    pds, ozone = network.info["pds"], network.info["ozone"]
    async with httpx.AsyncClient(timeout=30) as http:
        post = await post_images(http, pds, carol, [image("chelsea.jpg")])
        network.sync()
        await admin_takedown(http, ozone, post, network.info["labelerDid"], blobs=False)
        network.sync()
        assert (await subject_status(http, ozone, post.uri))["takendown"] is True
        assert await blob_status(http, pds, carol.did, post.blob_cids[0]) == 200
        events = [jetstream_event(post, now_us())]
        metrics, log = await run_to_end(network, tmp_path, service_redis, events, [TAKE_DOWN])
        assert "Subject is already taken down" in log and "ERROR" not in log
        assert metrics.get("phash_ozone_errors_total[kind=rejected]", 0) == 0
        claims = redis.Redis.from_url(service_redis.url, decode_responses=True)
        assert claims.get(f"claim:post:takedown:{post.uri}") == "1"
        assert claims.get(f"claim:account:takedown:{carol.did}") == "1"
        assert (await subject_status(http, ozone, carol.did))["takendown"] is True
        assert len(_ours(await mod_events(http, ozone, post.uri))) == 1  # the human's only


async def test_labeler_with_new_form_reason_types(
    network: DevNetwork, service_redis: RedisProcess, tmp_path: Path
) -> None:
    """A labeler listing only new-form reasonTypes: our default reason is accepted, the old
    form is refused by Ozone, and the start-up check warned about it beforehand."""
    alice = network.authors[0]
    pds, ozone = network.info["pds"], network.info["ozone"]
    labeler = Account(network.info["labelerDid"], **network.info["labeler"])
    async with httpx.AsyncClient(timeout=30) as http:
        await put_labeler_record(
            http,
            pds,
            labeler,
            {"reasonTypes": ["tools.ozone.report.defs#reasonOther",
                             "tools.ozone.report.defs#reasonSexualNCII"]},
        )  # fmt: skip
        accepted = await post_images(http, pds, alice, [image("moon.jpg")], "a")
        refused = await post_images(http, pds, alice, [image("moon.jpg")], "b")
        network.sync()
        await trio.sleep(1.0)  # Ozone's cached copy of the record expires (500 ms)

        await run_to_end(
            network, tmp_path, service_redis, [jetstream_event(accepted, now_us())], [REPORT_ONLY]
        )
        assert _types(await mod_events(http, ozone, accepted.uri)) == ["modEventReport"]
        report = _ours(await mod_events(http, ozone, accepted.uri))[0]["event"]
        assert report["reportType"] == "tools.ozone.report.defs#reasonOther"

        legacy = "com.atproto.moderation.defs#reasonOther"
        metrics, log = await run_to_end(
            network,
            tmp_path,
            service_redis,
            [jetstream_event(refused, now_us())],
            [REPORT_ONLY],
            run="legacy",
            OZONE_REPORT_REASON_TYPE=legacy,
        )
        assert f"the labeler refuses report reason {legacy}" in log  # the start-up warning
        assert f"Invalid reason type: {legacy}" in log
        assert metrics["phash_ozone_errors_total[kind=rejected]"] == 1
        assert _ours(await mod_events(http, ozone, refused.uri)) == []


async def test_moderator_with_too_low_a_role(
    network: DevNetwork, service_redis: RedisProcess, tmp_path: Path
) -> None:
    """A triage member: start-up with takedown rules exits 2 with one line; `rules check
    --ozone` says the same; with a report-only rule the service runs and its report lands."""
    alice = network.authors[0]  # bob and carol may be taken down by the tests before
    pds, ozone = network.info["pds"], network.info["ozone"]
    async with trio.open_nursery() as nursery:
        service = await start_service(
            nursery, network, tmp_path, service_redis, [], [TAKE_DOWN], account="triage"
        )
        with trio.fail_after(GUARD):
            assert await service.wait() == 2
        nursery.cancel_scope.cancel()  # the Jetstream replay
    last = service.log_path.read_text().strip().splitlines()[-1]
    assert last == (
        "phash-trio: cannot start: the automod account's Ozone role is triage; labels and"
        " takedowns need moderator or admin: rule 0 'phash-chelsea' (takedownPost, takedownAcct)"
    )
    check = await trio.run_process(
        [sys.executable, "-m", "phash_trio", "rules", "check", str(tmp_path / "run" / "rules.json"),
         "--ozone"],
        env=service.env,
        capture_stdout=True,
        check=False,
    )  # fmt: skip
    assert check.returncode == 1
    assert "has role triage" in check.stdout.decode()

    async with httpx.AsyncClient(timeout=30) as http:
        post = await post_images(http, pds, alice, [image("moon.jpg")], "triage")
        network.sync()
        await run_to_end(
            network,
            tmp_path,
            service_redis,
            [jetstream_event(post, now_us())],
            [REPORT_ONLY],
            account="triage",
            run="reports",
        )
        events = _ours(await mod_events(http, ozone, post.uri))
        assert _types(events) == ["modEventReport"]
        assert events[0]["createdBy"] == network.account("triage").did
