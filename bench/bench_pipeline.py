"""Whole-pipeline benchmark: N image posts through the real service, end to end, on loopback.

Usage: python bench/bench_pipeline.py [--posts N] [--concurrency C] [--pace S] [--keep]

Builds a capture of N image posts (default 2000) from the bundled demo JPEGs, each blob made a
distinct file with its own real CID by appending random bytes after the JPEG EOI marker (it
decodes to the same pixels, but no cache can help), starts a temporary redis-server, the local
network (Jetstream replay, CDN, PDS, PLC, fake Ozone) in this process and ``phash-trio run`` as a
subprocess with CACHE_ENABLED=false and DRY_RUN=true. Once the service is connected the whole
capture is appended to the replay at once (or paced with ``--pace``), and it measures:

- end-to-end images/s: blobs decided from the first event read to the last decision (both seen
  on /metrics, polled every 50 ms);
- event-to-decision latency p50/p99, interpolated in the phash_decision_latency_seconds buckets
  (unpaced, this is mostly time spent queued behind the backlog);
- the service's CPU seconds (utime + stime of /proc/PID/stat) during that window, hence images
  per CPU-second, and its peak RSS (VmHWM of /proc/PID/status);
- this process's CPU in the same window (the fakes serving the replay and the blobs);
- hashing alone: ``mean_hash`` on the same blobs in this process, one thread and one per core.

It prints a table and a line on what limits the throughput.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from phash_trio.firehose.events import parse_event
from phash_trio.image.meanhash import mean_hash
from phash_trio.testing.blobhost import cid_for
from phash_trio.testing.capture import CaptureBuilder, demo_images
from phash_trio.testing.localnet import LocalNetwork, ServiceProcess, run_local_network
from phash_trio.testing.redis_server import free_port, redis_server

#: The decodable demo JPEGs (the EOI trick needs JPEG; webp and the bad blobs are left out).
JPEGS = (
    "astronaut-gray.jpg",
    "chelsea.jpg",
    "coffee.jpg",
    "hubble.jpg",
    "moon.jpg",
    "mountain.jpg",
    "spitfire.jpg",
    "sugarshack.jpg",
    "text.jpg",
)
POLL = 0.05
CLK_TCK = os.sysconf("SC_CLK_TCK")
LATENCY = "phash_decision_latency_seconds"


def build_capture(posts: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """``posts`` one-image posts, every blob a distinct file: the events and blobs by name."""
    rng = random.Random(seed)
    originals = demo_images()
    variants: dict[str, bytes] = {}
    for i in range(posts):
        name = JPEGS[i % len(JPEGS)]
        data = originals[name]
        if not data.endswith(b"\xff\xd9"):
            raise SystemExit(f"{name} does not end with a JPEG EOI marker")
        variants[f"{i:05d}-{name}"] = data + rng.randbytes(8)
    builder = CaptureBuilder(variants, seed=seed)
    for key in variants:
        builder.post(builder.images_embed([key]))
    return builder.events, variants


def host_blobs(net: LocalNetwork, events: list[dict[str, Any]], blobs: dict[str, bytes]) -> int:
    """Put every blob on the CDN and PDS and every author in the PLC directory; blob count."""
    by_cid = {cid_for(data): data for data in blobs.values()}
    count = 0
    for event in events:
        job = parse_event(json.dumps(event)).job
        if job is None:
            continue
        net.plc.add(job.did, net.pds.url)
        for blob in job.blobs:
            net.cdn.add(job.did, blob.cid, by_cid[blob.cid])
            net.pds.add(job.did, blob.cid, by_cid[blob.cid])
            count += 1
    return count


def _stat_fields(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (the hash workers and their forkserver)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(_stat_fields(int(entry.name))[1])
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live descendants (all threads), in seconds."""
    total = 0.0
    for p in descendants(pid):
        try:
            fields = _stat_fields(p)
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each live thread of ``pid`` (since it started), by thread id."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = _task_cpu(task)
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
    return out


def _task_cpu(task: Path) -> float:
    stat = (task / "stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def histogram_quantile(q: float, metrics: dict[str, float], name: str) -> float:
    """Prometheus-style quantile: linear interpolation inside the bucket holding rank q*count."""
    buckets: list[tuple[float, float]] = []
    prefix = f"{name}_bucket[le="
    for key, value in metrics.items():
        if key.startswith(prefix):
            buckets.append((float(key[len(prefix) : -1]), value))
    buckets.sort()
    count = buckets[-1][1] if buckets else 0.0
    if count == 0:
        return math.nan
    rank = q * count
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bucket: its bound is all we know
            inside = cumulative - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, cumulative
    return lower


def total(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k.split("[")[0] == name)


def hash_only(blobs: list[bytes], threads: int) -> tuple[float, float]:
    """Images per second and CPU seconds per image hashing ``blobs`` with ``threads`` threads."""
    cpu0, wall0 = own_cpu_seconds(), time.perf_counter()
    if threads == 1:
        for data in blobs:
            mean_hash(data)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(mean_hash, blobs, chunksize=16))
    wall, cpu = time.perf_counter() - wall0, own_cpu_seconds() - cpu0
    return len(blobs) / wall, cpu / len(blobs)


async def run_pipeline(args: argparse.Namespace, redis_url: str, workdir: Path) -> dict[str, Any]:
    """Run the service over the capture; every measurement of the service side."""
    events, blobs = build_capture(args.posts, args.seed)
    load_before = os.getloadavg()
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=10) as client:
        net: LocalNetwork = await nursery.start(partial(run_local_network, [], {}, pace=args.pace))
        expected_blobs = host_blobs(net, events, blobs)
        port = free_port()
        env = net.service_env(
            redis_url=redis_url,
            state_dir=workdir / "state",
            metrics_port=port,
            dry_run=True,
            CACHE_ENABLED="false",
            PROCESSING_CONCURRENCY=str(args.concurrency),
            HASH_THREADS=str(args.hash_threads),
            HASH_PROCESSES=str(
                args.hash_processes if args.hash_processes >= 0 else (os.cpu_count() or 1)
            ),
            LOG_LEVEL=args.log_level,
        )
        service = ServiceProcess(env, workdir / "service.log", port)
        await service.start(nursery)
        await service.wait_for(
            client,
            lambda m: m.get("phash_jetstream_connected", 0) == 1 and net.replay.connections > 0,
            within=args.timeout,
        )
        startup_cpu = proc_cpu_seconds(service.pid)
        cpu0, own0, t0 = startup_cpu, own_cpu_seconds(), trio.current_time()
        net.replay.append(events)
        first_event = last_decision = None
        metrics: dict[str, float] = {}
        with trio.move_on_after(args.timeout) as guard:
            while True:
                polled = await service.metrics(client)
                now = trio.current_time()
                if polled is not None:
                    metrics = polled
                    if first_event is None and metrics.get("phash_events_received_total", 0):
                        first_event = now
                    decided = total(metrics, "phash_blobs_processed_total") + total(
                        metrics, "phash_blob_errors_total"
                    )
                    posts_done = metrics.get("phash_jobs_processed_total", 0) + metrics.get(
                        "phash_jobs_dead_lettered_total", 0
                    )
                    if decided >= expected_blobs and posts_done >= len(events):
                        last_decision = now
                        break
                await trio.sleep(POLL)
        if guard.cancelled_caught:
            raise SystemExit(f"timed out after {args.timeout} s:\n{service.log_tail()}")
        cpu1, own1 = proc_cpu_seconds(service.pid), own_cpu_seconds()
        threads = thread_cpu_seconds(service.pid)
        # Main process plus each hash worker (each one's own peak; shared pages counted twice).
        peak_kib = sum(proc_status_kib(p, "VmHWM") for p in descendants(service.pid))
        service.signal(signal.SIGTERM)
        with trio.fail_after(60):
            code = await service.wait()
        nursery.cancel_scope.cancel()
    assert first_event is not None and last_decision is not None
    return {
        "events": events,
        "blobs": list(blobs.values()),
        "expected_blobs": expected_blobs,
        "metrics": metrics,
        "window": last_decision - first_event,
        "window_from_append": last_decision - t0,
        "startup_cpu": startup_cpu,
        "service_cpu": cpu1 - cpu0,
        "harness_cpu": own1 - own0,
        "peak_rss_mib": peak_kib / 1024,
        "exit_code": code,
        "load_before": load_before,
        "threads": threads,
        "pid": service.pid,
    }


def report(args: argparse.Namespace, r: dict[str, Any]) -> None:
    m = r["metrics"]
    n = r["expected_blobs"]
    cores = os.cpu_count() or 1
    window = r["window"]
    rate = n / window
    service_cores = r["service_cpu"] / window
    harness_cores = r["harness_cpu"] / window
    per_cpu = n / r["service_cpu"] if r["service_cpu"] else math.inf
    p50 = histogram_quantile(0.5, m, LATENCY)
    p99 = histogram_quantile(0.99, m, LATENCY)
    hashed = total(m, "phash_blobs_processed_total")
    errors = total(m, "phash_blob_errors_total")
    print("hashing the same blobs in this process...", flush=True)
    hash_1, cpu_per_hash = hash_only(r["blobs"], 1)
    hash_n, _ = hash_only(r["blobs"], cores)
    hash_share = cpu_per_hash * per_cpu

    paced = f"paced {args.pace * 1e3:.0f} ms/event" if args.pace else "unpaced (all at once)"
    main_cpu = r["threads"].get(r["pid"], 0.0)
    others = [v for k, v in r["threads"].items() if k != r["pid"]]
    load = ", ".join(f"{x:.2f}" for x in r["load_before"])
    rule = "-" * 78
    rows = [
        ("posts / blobs", f"{len(r['events'])} / {n} distinct blobs ({len(JPEGS)} JPEGs re-keyed)"),
        (
            "set-up",
            f"cache off, dry-run, {args.concurrency} workers, "
            + (
                f"hash processes {args.hash_processes if args.hash_processes >= 0 else cores}"
                if args.hash_processes != 0
                else f"hash threads {args.hash_threads or 'per core'}"
            )
            + f", {cores} CPUs, replay {paced}",
        ),
        ("machine load before", f"{load} (1/5/15 min; other processes share the CPUs)"),
        (
            "end-to-end throughput",
            f"{rate:8.1f} images/s  ({n} blobs in {window:.2f} s, first event -> last decision,"
            f" +-{POLL * 1e3:.0f} ms)",
        ),
        (
            "decision latency",
            f"p50 {p50 * 1e3:8.1f} ms   p99 {p99 * 1e3:8.1f} ms  (histogram buckets, interpolated"
            + (")" if args.pace else "; unpaced: mostly queueing behind the backlog)"),
        ),
        (
            "service CPU",
            f"{r['service_cpu']:8.2f} s   = {service_cores:.2f} cores busy,"
            f" {per_cpu:.1f} images per CPU-second",
        ),
        ("service start-up CPU", f"{r['startup_cpu']:8.2f} s   (imports and connect, excluded)"),
        (
            "service threads",
            f"main {main_cpu:.2f} s, {len(others)} others {sum(others):.2f} s"
            " (CPU since start; the others are hash, Redis and DNS threads)",
        ),
        ("service peak RSS", f"{r['peak_rss_mib']:8.1f} MiB (VmHWM, main + hash workers)"),
        (
            "harness CPU (fakes)",
            f"{r['harness_cpu']:8.2f} s   = {harness_cores:.2f} cores busy (replay, CDN here)",
        ),
        (
            "hash only, 1 thread",
            f"{hash_1:8.1f} images/s  ({cpu_per_hash * 1e3:.2f} ms CPU per image)",
        ),
        (f"hash only, {cores} threads", f"{hash_n:8.1f} images/s"),
        (
            "service outcome",
            f"{hashed:.0f} hashed, {errors:.0f} bad, "
            f"{total(m, 'phash_matches_found_total'):.0f} matches, "
            f"{total(m, 'phash_jobs_dead_lettered_total'):.0f} dead-lettered, exit {r['exit_code']}",
        ),
    ]
    print(rule)
    for label, value in rows:
        print(f"{label:<24}{value}")
    print(rule)
    busy = service_cores + harness_cores
    print(
        f"cores busy: service {service_cores:.2f} + fakes {harness_cores:.2f} of {cores};"
        f" hashing is {hash_share:.0%} of the service's CPU per image"
        f" ({cpu_per_hash * 1e3:.2f} of {1e3 / per_cpu:.2f} ms), the rest is the pipeline"
        " around it (websocket frames, JSON, HTTP fetches, threads, metrics, logs)."
    )
    scaling = f"hashing scales {hash_n / hash_1:.2f}x from 1 to {cores} threads in-process"
    if busy >= 0.85 * cores:
        limit = (
            f"CPU: the cores are saturated; hashing is {hash_share:.0%} of the service's CPU"
            f" per image, the pipeline around it and the fakes share the rest; {scaling}"
        )
    elif rate >= 0.75 * hash_n:
        limit = (
            f"hashing. End to end reaches {rate / hash_n:.0%} of hash-only throughput on"
            f" {cores} threads ({hash_n:.0f} images/s); {scaling}"
        )
    elif harness_cores >= 0.85:
        limit = "the harness: the fakes' single Python thread is saturated"
    elif service_cores >= 0.7:
        limit = (
            f"the GIL. The service keeps {service_cores:.2f} cores busy with {cores} available:"
            " its Trio thread and hash threads take turns on one interpreter lock, and hashing"
            f" (GIL-bound numpy steps, a serialised libjpeg call) is most of the work; {scaling}."
            " More workers or hash threads would not help; a GIL-free decode or several"
            " processes would"
        )
    else:
        limit = (
            f"not CPU ({busy:.2f} of {cores} cores busy): waits on I/O, the replay pace or"
            " PROCESSING_CONCURRENCY"
        )
    print(f"limit: {limit}.")
    if hashed != n or r["exit_code"] != 0:
        print(f"WARNING: expected {n} blobs hashed and exit 0; see {args.workdir_shown}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=2000, help="image posts (one blob each)")
    parser.add_argument("--concurrency", type=int, default=10, help="PROCESSING_CONCURRENCY")
    parser.add_argument("--hash-threads", type=int, default=0, help="HASH_THREADS (0: per core)")
    parser.add_argument(
        "--hash-processes", type=int, default=-1, help="HASH_PROCESSES (-1: per core, 0: threads)"
    )
    parser.add_argument("--pace", type=float, default=0.0, help="seconds between replay frames")
    parser.add_argument("--log-level", default="INFO", help="the service's LOG_LEVEL")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0, help="failure guard, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (service log)")
    args = parser.parse_args(argv)
    if args.posts < 1:
        parser.error("--posts must be >= 1")
    workdir = Path(tempfile.mkdtemp(prefix="phash-bench-"))
    args.workdir_shown = workdir if args.keep else "(rerun with --keep for the log)"
    print(f"building {args.posts} posts and starting redis, fakes and the service...", flush=True)
    try:
        with redis_server() as redis:
            result = trio.run(run_pipeline, args, redis.url, workdir)
        report(args, result)
    finally:
        if args.keep:
            print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
