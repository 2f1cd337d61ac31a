"""Banks at scale: PDQ and mean-hash lookups at 1 M hashes, the index built from Redis, its
memory, 20 reloads, and PDQ + mean hash per real photo against the mean hash alone.

Run: ``.venv/bin/python bench/bench_banks.py [--pdq-hashes N] [--reloads N] [--lookups N]``
(``--pdq-hashes 10000000`` shows how it grows; ``--faiss`` also times faiss-cpu's
IndexBinaryMultiHash, what HMA uses, on the same hashes). A throw-away redis-server is started.
Targets (issue 12) are printed beside each figure. The machine is shared: lookups are timed one
by one, so a preempted lookup shows in p99; the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time
from pathlib import Path

import numpy as np
import redis

try:  # the reference, for comparison (a test dependency)
    import pdqhash
except ImportError:  # pragma: no cover
    pdqhash = None

from phash_trio.image import mean_hash
from phash_trio.image.decode import decode_gray, decode_gray_pdq, decode_rgb
from phash_trio.image.meanhash import hash_gray
from phash_trio.image.pdq import pdq_from_rgb
from phash_trio.image.signals import compute_signals
from phash_trio.rules.bankindex import BankIndex
from phash_trio.rules.banks import BankStore
from phash_trio.rules.hashindex import HashIndex
from phash_trio.testing.redis_server import redis_server

REPO = Path(__file__).resolve().parents[1]
GOLDEN = [REPO.parent / "shared" / "golden", REPO / "tests" / "data" / "golden"]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def verdict(ok: bool, judged: bool = True) -> str:
    """ok/MISSED; the targets are set at 1 M hashes, other sizes only show the growth."""
    if not judged:
        return "not judged: the targets are for 1 M hashes"
    return "ok" if ok else "MISSED"


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    ms = np.array(samples) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), float(ms.max())


def time_lookups(
    index: HashIndex, codes: np.ndarray, threshold: int, n: int, seed: int
) -> tuple[float, float, float, float, float, float]:
    """Wall-clock (p50, p99, max) ms, lookups/s, and CPU-time (p50, p99) ms of one lookup.

    Half the queries are near-hits (a stored hash with bits of its first word changed), half
    misses. CPU time (this thread's) leaves out the time another process had the core: on a
    shared machine it is the fairer per-core figure; both are printed.
    """
    rng = np.random.default_rng(seed)
    words = codes.shape[1]
    queries = []
    for i in range(n):
        if i % 2:
            q = codes[rng.integers(len(codes))].copy()
            q[0] ^= np.uint64(int(rng.integers(0, 2**16)))
        else:
            q = rng.integers(0, 2**64, size=words, dtype=np.uint64)
        queries.append(q)
    for q in queries[:50]:  # warm up
        index.search(q, threshold)
    samples, cpu = [], []
    start = time.perf_counter()
    for q in queries:
        t, c = time.perf_counter(), time.thread_time()
        index.search(q, threshold)
        cpu.append(time.thread_time() - c)
        samples.append(time.perf_counter() - t)
    rate = n / (time.perf_counter() - start)
    p50, p99, worst = percentiles(samples)
    c50, c99, _ = percentiles(cpu)
    return p50, p99, worst, rate, c50, c99


def fill_redis(store: BankStore, name: str, hexes: list[str]) -> float:
    """Write the hashes the way an import does, but pipelined straight into the bank's hash
    (the import path is the same Lua script, 500 at a time; this is only the set-up)."""
    start = time.perf_counter()
    store.set_bank(name)
    client = store.client
    value = '{"content_id":"c","note":"","metadata":{},"enabled":true}'
    for lo in range(0, len(hexes), 20_000):
        client.hset(f"bank:{name}", mapping={f"pdq:{h}": value for h in hexes[lo : lo + 20_000]})
    return time.perf_counter() - start


def _best(fn, data: bytes, rounds: int = 3) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time()
        fn(data)
        best = min(best, time.thread_time() - start)
    return best * 1e3


def bench_photos(limit: int) -> None:
    """Mean hash alone vs every signal, per photo: the two are interleaved image by image and
    each timed as its best of 3 in CPU time, so other load on the machine mostly cancels out.
    Two sets: golden JPEG photos (mostly small) and the benchmark's 2 MP photos (bench/data)."""
    golden = next((g for g in GOLDEN if (g / "images").is_dir()), None)
    sets = []
    if golden is not None:
        files = sorted((golden / "images" / "photos" / "jpeg").glob("*.jpg"))[:limit]
        sets.append((f"{len(files)} golden JPEGs, {golden.parent.name}/{golden.name}", files))
    sets.append(("2 MP photos, bench/data", sorted((REPO / "bench" / "data").glob("*.jpg"))))
    for label, files in sets:
        _bench_photo_set(label, [f.read_bytes() for f in files])


def _bench_photo_set(label: str, blobs: list[bytes]) -> None:
    if not blobs:
        print(f"photos ({label}): none found")
        return
    compute_signals(blobs[0])
    parts = dict.fromkeys(["mean", "all", "gray", "gray+pdq", "meanpart", "pdq", "pdqhash"], 0.0)
    for data in blobs:
        parts["mean"] += _best(mean_hash, data)
        parts["all"] += _best(compute_signals, data)
        parts["gray"] += _best(lambda d: decode_gray(d, max_pixels=50_000_000), data)
        parts["gray+pdq"] += _best(lambda d: decode_gray_pdq(d, max_pixels=50_000_000), data)
        gray = decode_gray(data, max_pixels=50_000_000)
        rgb = decode_rgb(data, max_pixels=50_000_000)
        parts["meanpart"] += _best(lambda _, g=gray: hash_gray(g), data)
        parts["pdq"] += _best(lambda _, c=rgb: pdq_from_rgb(c), data)
        if pdqhash is not None:
            parts["pdqhash"] += _best(lambda _, c=rgb: pdqhash.compute(c), data)
    avg = {k: v / len(blobs) for k, v in parts.items()}
    ratio = avg["all"] / avg["mean"]
    print(
        f"per real photo ({label}), CPU ms: mean hash alone {avg['mean']:.2f},"
        f" mean + PDQ + MD5/SHA-256 {avg['all']:.2f} = {ratio:.2f}x"
        f" (target <= 1.3x: {verdict(ratio <= 1.3)})"
    )
    reference = f", pdqhash (Meta's C++) {avg['pdqhash']:.2f}" if pdqhash is not None else ""
    print(
        f"  parts: decode gray {avg['gray']:.2f}, decode gray + PDQ in one pass"
        f" {avg['gray+pdq']:.2f}, resize + mean hash {avg['meanpart']:.2f};"
        f" PDQ of decoded RGB: ours {avg['pdq']:.2f}{reference}"
    )


def bench_faiss(codes: np.ndarray, n: int) -> None:
    try:
        import faiss
    except ImportError:
        print("faiss: not installed (pip install faiss-cpu), skipped")
        return
    faiss.omp_set_num_threads(1)
    before = rss_mb()
    start = time.perf_counter()
    index = faiss.IndexBinaryMultiHash(256, 16, 16)
    index.nflip = 1
    index.add(codes.view(np.uint8).reshape(len(codes), 32))
    build = time.perf_counter() - start
    grown = rss_mb() - before
    rng = np.random.default_rng(3)
    samples = []
    for _ in range(n):
        q = codes[rng.integers(len(codes))].copy()
        q[0] ^= np.uint64(0xFF)
        t = time.perf_counter()
        index.range_search(q.view(np.uint8).reshape(1, 32), 32)
        samples.append(time.perf_counter() - t)
    p50, p99, _ = percentiles(samples)
    print(
        f"faiss IndexBinaryMultiHash (HMA's), same hashes: build {build:.1f} s, +{grown:.0f} MB,"
        f" p50 {p50:.3f} ms, p99 {p99:.3f} ms"
    )
    del index
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pdq-hashes", type=int, default=1_000_000)
    parser.add_argument("--mean-hashes", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=5_000)
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--faiss", action="store_true", help="also time faiss-cpu")
    args = parser.parse_args()
    n = args.pdq_hashes
    print(f"load average before: {load()} (2 cores shared with other work)")

    if args.photos:
        bench_photos(args.photos)

    rng = random.Random(12)
    hexes = [rng.getrandbits(256).to_bytes(32, "big").hex() for _ in range(n)]
    with redis_server() as server:
        client = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=60)
        store = BankStore(client)
        fill = fill_redis(store, "BENCH_PDQ", hexes)
        print(f"set-up: {n:,} PDQ hashes written to Redis in {fill:.1f} s")
        del hexes
        gc.collect()

        base = rss_mb()
        start, cpu_start = time.perf_counter(), time.thread_time()
        index = BankIndex.load(store)
        built, built_cpu = time.perf_counter() - start, time.thread_time() - cpu_start
        first = rss_mb()
        pdq = index.hashes["pdq"]
        print(
            f"PDQ index built from Redis: {built:.1f} s wall, {built_cpu:.1f} s CPU (target <= 15 s"
            f" at 1 M: {verdict(min(built, built_cpu) <= 15, n == 1_000_000)});"
            f" RSS +{first - base:.0f} MB, arrays {index.nbytes / 2**20:.0f} MB"
            f" (target <= 300 MB: {verdict(first - base <= 300, n == 1_000_000)})"
        )
        codes = pdq.rows(np.arange(pdq.keys_used))
        p50, p99, worst, rate, c50, c99 = time_lookups(pdq, codes, 31, args.lookups, 1)
        cpu_rate = 1e3 / c50 if c50 else 0.0
        print(
            f"PDQ lookup, {n:,} hashes, threshold 31: wall p50 {p50:.3f} ms, p99 {p99:.3f} ms,"
            f" max {worst:.1f} ms, {rate:,.0f} lookups/s; CPU time p50 {c50:.3f} ms, p99"
            f" {c99:.3f} ms (~{cpu_rate:,.0f}/s per core)"
            f" (targets p99 <= 2 ms: wall {verdict(p99 <= 2, n == 1_000_000)},"
            f" CPU {verdict(c99 <= 2, n == 1_000_000)};"
            f" >= 2,000/s: {verdict(max(rate, cpu_rate) >= 2000, n == 1_000_000)}); load {load()}"
        )
        if args.faiss:
            bench_faiss(codes.copy(), min(args.lookups, 1000))
        del codes, pdq, index
        gc.collect()

        if args.reloads:
            after: list[float] = []
            index = None
            for _ in range(args.reloads):
                index = None  # the previous one is dropped before the next is built
                gc.collect()
                index = BankIndex.load(store)
                after.append(rss_mb())
            growth = (after[-1] - after[0]) / after[0] * 100
            print(
                f"{args.reloads} reloads of the {n:,}-hash bank: RSS after the first {after[0]:.0f} MB,"
                f" after the last {after[-1]:.0f} MB ({growth:+.1f} %; target within 10 %:"
                f" {verdict(abs(growth) <= 10)}); min/max {min(after):.0f}/{max(after):.0f} MB"
            )
            del index
            gc.collect()
        client.close()

    m = args.mean_hashes
    if not m:
        return
    mrng = np.random.default_rng(5)
    mean_codes = mrng.integers(0, 2**64, size=(m, 1), dtype=np.uint64)
    mean_index = HashIndex(64)
    start = time.perf_counter()
    mean_index.add_many(mean_codes, np.zeros(m, dtype=np.int32))
    mean_index.compact()
    build = time.perf_counter() - start
    for threshold in (3, 8):
        p50, p99, worst, rate, c50, c99 = time_lookups(
            mean_index, mean_codes, threshold, args.lookups, 2
        )
        target = ""
        if threshold == 3:
            judged = m == 1_000_000
            target = (
                f" (target p99 <= 1 ms: wall {verdict(p99 <= 1, judged)},"
                f" CPU {verdict(c99 <= 1, judged)})"
            )
        print(
            f"mean-hash lookup, {m:,} hashes, threshold {threshold}: wall p50 {p50:.3f} ms,"
            f" p99 {p99:.3f} ms, max {worst:.1f} ms, {rate:,.0f}/s; CPU p50 {c50:.3f} ms,"
            f" p99 {c99:.3f} ms{target} (built in {build:.1f} s)"
        )
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
