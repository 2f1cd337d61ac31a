"""Benchmark the hash-and-match API over real HTTP: ``phash-trio serve`` in a subprocess (its
hash worker processes, its bank index loaded from a real redis-server), driven by httpx from
this process.

* ``/api/v1/match`` with a PDQ hash (JSON), at 1,000,000 PDQ hashes in a bank: requests/s and
  latency percentiles, a tenth of the queries within distance 31 of a banked hash;
* ``/api/v1/match`` with an uploaded photo (hash + match);
* ``/h/hash`` with real photos (the golden set's JPEG/PNG/WebP photos): images/s.

The client shares the machine's cores with the server (and here with other work): the figures
are a floor, printed with the load average so a noisy run shows as one.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

from phash_trio.rules.banks import BankStore
from phash_trio.testing.redis_server import redis_server

ROOT = Path(__file__).resolve().parents[1]
PHOTO_DIRS = [
    ROOT.parent / "shared" / "golden" / "images" / "photos",
    ROOT / "tests" / "data" / "golden" / "images" / "photos",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` and its descendants (the forkserver and the
    hash workers) so far, from Linux /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids, todo = [], [pid]
    while todo:
        one = todo.pop()
        pids.append(one)
        children = Path(f"/proc/{one}/task/{one}/children")
        if children.exists():
            todo += [int(p) for p in children.read_text().split()]
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return pick(0.5) * 1000, pick(0.99) * 1000, ordered[-1] * 1000


def fill(store: BankStore, name: str, hexes: list[str]) -> float:
    """Pipelined straight into the bank's hash (set-up only: imports go through the Lua log)."""
    start = time.perf_counter()
    store.set_bank(name)
    value = '{"content_id":"c","note":"","metadata":{},"enabled":true}'
    for lo in range(0, len(hexes), 20_000):
        store.client.hset(
            f"bank:{name}", mapping={f"pdq:{h}": value for h in hexes[lo : lo + 20_000]}
        )
    return time.perf_counter() - start


def near(hex_: str, rng: random.Random, bits: int) -> str:
    value = int(hex_, 16)
    for bit in rng.sample(range(256), bits):
        value ^= 1 << bit
    return f"{value:064x}"


def photos(limit: int) -> list[bytes]:
    for folder in PHOTO_DIRS:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if files:
            return [p.read_bytes() for p in files[:limit]]
    raise SystemExit("no photos found")


async def drive(
    client: httpx.AsyncClient, requests: list[dict[str, object]], concurrency: int, path: str
) -> tuple[list[float], float, int]:
    """Send every request (``json`` or ``files`` kwargs) with ``concurrency`` in flight."""
    samples: list[float] = []
    errors = 0
    queue = iter(requests)

    async def worker() -> None:
        nonlocal errors
        for kwargs in queue:
            t = time.perf_counter()
            try:
                response = await client.post(path, **kwargs)  # type: ignore[arg-type]
            except httpx.TransportError:
                errors += 1  # counted, not fatal: the figure says how many
                continue
            samples.append(time.perf_counter() - t)
            if response.status_code != 200:
                errors += 1

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return samples, time.perf_counter() - start, errors


def report(
    name: str, samples: list[float], elapsed: float, errors: int, unit: str, cpu: float
) -> None:
    """One line: rate and latency as seen by the client, and the server's CPU per request
    (less sensitive to other load on the machine than the wall-clock figures)."""
    p50, p99, worst = percentiles(samples)
    per = cpu / max(1, len(samples)) * 1000
    print(
        f"{name}: {len(samples) / elapsed:,.0f} {unit}/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms,"
        f" max {worst:.1f} ms, {errors} errors ({len(samples)} requests);"
        f" server CPU {per:.1f} ms per request (~{1000 / per:,.0f}/s per core)"
    )


async def bench(url: str, hexes: list[str], args: argparse.Namespace, pid: int) -> None:
    rng = random.Random(7)
    queries: list[dict[str, object]] = []
    for i in range(args.requests):
        if i % 10 == 0:
            queries.append({"json": {"hash": near(rng.choice(hexes), rng, 20)}})
        else:
            queries.append({"json": {"hash": f"{rng.getrandbits(256):064x}"}})
    images = photos(args.photos)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        await drive(client, queries[:200], args.concurrency, "/api/v1/match")  # warm-up
        cpu = cpu_seconds(pid)
        samples, elapsed, errors = await drive(client, queries, args.concurrency, "/api/v1/match")
        report(
            f"/api/v1/match (PDQ hash, {len(hexes):,} hashes, {args.concurrency} in flight)",
            samples,
            elapsed,
            errors,
            "requests",
            cpu_seconds(pid) - cpu,
        )
        uploads = [{"files": {"image": ("p", images[i % len(images)])}} for i in range(300)]
        cpu = cpu_seconds(pid)
        samples, elapsed, errors = await drive(client, uploads, 8, "/api/v1/match")
        report(
            "/api/v1/match (photo upload, 8 in flight)",
            samples,
            elapsed,
            errors,
            "requests",
            cpu_seconds(pid) - cpu,
        )
        hashes = [{"files": {"photo": ("p", images[i % len(images)])}} for i in range(600)]
        cpu = cpu_seconds(pid)
        samples, elapsed, errors = await drive(client, hashes, 8, "/h/hash")
        size = sum(len(b) for b in images) / len(images) / 1024
        report(
            f"/h/hash ({len(images)} real photos, mean {size:.0f} KiB, 8 in flight)",
            samples,
            elapsed,
            errors,
            "images",
            cpu_seconds(pid) - cpu,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pdq-hashes", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--photos", type=int, default=60)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    print(f"bench_api: {os.cpu_count()} cores, {load()}")
    rng = random.Random(1)
    hexes = [f"{rng.getrandbits(256):064x}" for _ in range(args.pdq_hashes)]
    with redis_server() as redis_proc, tempfile.TemporaryDirectory() as tmp:
        store = BankStore.from_url(redis_proc.url)
        print(f"filled Redis with {len(hexes):,} PDQ hashes in {fill(store, 'BENCH', hexes):.1f}s")
        store.close()
        port = free_port()
        env = {
            **os.environ,
            "REDIS_URL": redis_proc.url,
            "API_ADDR": f"127.0.0.1:{port}",
            "API_AUTH": "none",
            "API_RATE_PER_SEC": "0",
            "API_HASH_CONCURRENCY": "64",
            "HASH_PROCESSES": str(args.processes),
            "STATE_DIR": tmp,
            "RULES_FILE": str(ROOT / "rules" / "blobs.json"),
            "METRICS_ADDR": "",
            "LOG_LEVEL": "WARNING",
            "DRY_RUN": "true",
        }
        started = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-m", "phash_trio", "serve"], env=env, cwd=tmp)
        try:
            url = f"http://127.0.0.1:{port}"
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"phash-trio serve exited with {server.returncode}")
                try:
                    if httpx.get(url + "/status", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            print(f"server ready (index loaded) {time.perf_counter() - started:.1f}s after start")
            trio.run(bench, url, hexes, args, server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"bench_api: done, {load()}")


if __name__ == "__main__":
    main()
