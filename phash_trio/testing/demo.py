"""``just demo``: the real service, end to end, on this machine with no internet.

Starts a temporary redis-server and the local network (Jetstream replay of the bundled capture,
CDN, PDS, PLC directory, fake Ozone), runs ``phash-trio run`` as a subprocess against them until
every event is consumed and every image post decided, stops it with SIGTERM, and prints what
happened: events, image posts, blobs hashed, matches with rule and distance, the Ozone events
filed, errors, and the saved cursor.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import trio

from phash_trio.testing.capture import (
    DEMO_CAPTURE,
    IGNORED_DID,
    PDS_ONLY_IMAGES,
    demo_images,
    load_jsonl,
)
from phash_trio.testing.localnet import (
    LocalNetwork,
    ServiceProcess,
    image_posts,
    run_local_network,
)
from phash_trio.testing.redis_server import free_port, redis_server

__all__ = ["main"]


def _finished(expected_events: int, expected_posts: int) -> Any:
    def done(m: dict[str, float]) -> bool:
        decided = m.get("phash_jobs_processed_total", 0) + m.get(
            "phash_jobs_dead_lettered_total", 0
        )
        return (
            m.get("phash_events_received_total", 0) >= expected_events and decided >= expected_posts
        )

    return done


def _summary(
    net: LocalNetwork, metrics: dict[str, float], cursor: str, exit_code: int, seconds: float
) -> str:
    def total(prefix: str) -> int:
        return int(sum(v for k, v in metrics.items() if k.split("[")[0] == prefix))

    lines = [
        "",
        "=== phash-trio demo summary ===",
        f"service exit code      {exit_code} (SIGTERM, graceful)",
        f"run time               {seconds:.1f} s",
        f"events read            {total('phash_events_received_total')} of {len(net.events)}"
        f" in the capture (the rest are other collections, filtered by wantedCollections;"
        f" malformed {total('phash_frames_malformed_total')})",
        f"image posts            {total('phash_jobs_processed_total')} decided,"
        f" {total('phash_jobs_dead_lettered_total')} dead-lettered",
        f"blobs hashed           {total('phash_blobs_processed_total')}"
        f"  (downloaded {total('phash_blobs_downloaded_total')},"
        f" cache hits {total('phash_cache_hits_total')})",
        f"matches                {total('phash_matches_found_total')}",
    ]
    skipped = {
        k.split("reason=")[1].rstrip("]"): int(v)
        for k, v in metrics.items()
        if k.startswith("phash_events_skipped_total[")
    }
    lines.append(
        "events without images  " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
    )
    errors = {
        k.split("kind=")[1].rstrip("]"): int(v)
        for k, v in metrics.items()
        if k.startswith("phash_blob_errors_total[")
    }
    lines.append(
        "bad blobs              "
        + (", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none")
    )
    lines.append(
        f"PDS fallback fetches   {net.pds.pds_requests} (CDN requests {net.cdn.cdn_requests})"
    )
    lines.append(f"Ozone events filed     {len(net.ozone.events)}")
    matches: Counter[tuple[str, str, int]] = Counter()
    kinds: Counter[str] = Counter()
    for event in net.ozone.events:
        meta = event.get("modTool", {}).get("meta", {})
        kinds[event["event"]["$type"].split("#")[-1]] += 1
        matches[
            (str(meta.get("rule")), str(meta.get("matchedPhash")), int(meta.get("distance", -1)))
        ] += 1
    for kind, count in sorted(kinds.items()):
        lines.append(f"  {kind:<22} {count}")
    lines.append("events by rule (rule, listed hash, distance):")
    for (rule, matched, distance), count in sorted(matches.items()):
        lines.append(f"  {rule:<20} {matched}  distance {distance}: {count} event(s)")
    ignored = [e for e in net.ozone.events if IGNORED_DID in json.dumps(e["subject"])]
    lines.append(
        f"ignoreDID              {len(ignored)} event(s) about {IGNORED_DID}"
        " (its post shows the cat of example-chelsea, which ignores that author)"
    )
    lines.append(f"saved cursor           {cursor}")
    return "\n".join(lines)


async def _run(args: argparse.Namespace, redis_url: str) -> int:
    events = load_jsonl(Path(args.capture))
    # Replay as if the capture were live now, so cursor lag and latency read naturally.
    shift = int(time.time() * 1e6) - int(events[0]["time_us"]) - 10_000_000
    for event in events:
        event["time_us"] = int(event["time_us"]) + shift
    posts = image_posts(events)
    delivered = [
        e
        for e in events
        if e.get("kind") != "commit"
        or e.get("commit", {}).get("collection") == "app.bsky.feed.post"
    ]
    workdir = Path(tempfile.mkdtemp(prefix="phash-demo-"))
    print(
        f"demo: {len(events)} events ({len(posts)} image posts, {sum(posts.values())} blobs);"
        f" work dir {workdir}"
    )
    async with trio.open_nursery() as nursery:
        net: LocalNetwork = await nursery.start(
            lambda task_status: run_local_network(
                events, demo_images(), pds_only=PDS_ONLY_IMAGES, task_status=task_status
            )
        )
        port = free_port()
        env = net.service_env(
            redis_url=redis_url,
            state_dir=workdir / "state",
            metrics_port=port,
            dry_run=args.dry_run,
        )
        service = ServiceProcess(env, workdir / "service.log", port)
        started = trio.current_time()
        await service.start(nursery)
        print(f"demo: service pid {service.pid}, log {service.log_path}, metrics :{port}")
        async with httpx.AsyncClient() as client:
            metrics = await service.wait_for(
                client, _finished(len(delivered), len(posts)), within=args.timeout
            )
            final = await service.metrics(client) or metrics
        service.signal(signal.SIGTERM)
        with trio.fail_after(30):
            code = await service.wait()
        elapsed = trio.current_time() - started
        cursor_file = workdir / "state" / "cursor"
        cursor = cursor_file.read_text().strip() if cursor_file.exists() else "(none)"
        if args.show_log:
            print(service.log_path.read_text(errors="replace"))
        else:
            for line in service.log_path.read_text(errors="replace").splitlines():
                if any(
                    w in line
                    for w in ("match:", "sent ", "skip blob", "stopped", "cursor saved", "draining")
                ):
                    print("  service| " + line[:220])
        print(_summary(net, final, cursor, code, elapsed))
        if args.json:
            print(json.dumps({"metrics": final, "ozone_events": net.ozone.events})[:2000])
        nursery.cancel_scope.cancel()
    return 0 if code == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture", default=str(DEMO_CAPTURE), help="JSONL capture to replay")
    parser.add_argument("--dry-run", action="store_true", help="run the service in dry-run")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--show-log", action="store_true", help="print the whole service log")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with redis_server() as redis:
        print(f"demo: redis-server on {redis.url}")
        return trio.run(_run, args, redis.url)


if __name__ == "__main__":
    sys.exit(main())
