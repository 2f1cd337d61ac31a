"""Rule-index speed with a realistic large list: 100,000 hashes, 1 big rule + 50 small ones.

Run: ``.venv/bin/python bench/bench_match.py [--hashes N] [--lookups N] [--seed N]``.
Prints build time, index memory, lookups per second and p50/p99 latency of one lookup. Queries
mix misses (random hashes, the common case on the firehose) with near-hits (a listed hash with a
few bits flipped), from authors some rules ignore.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import tracemalloc

import numpy as np

from phash_trio.rules.index import RuleIndex, popcount
from phash_trio.rules.model import RuleSet, parse_rules

SMALL_RULES = 50
SMALL_RULE_SIZE = 100
IGNORED = "did:plc:ignoredauthorabcdefghijk"


def build_data(total: int, rng: random.Random) -> list[dict[str, object]]:
    """One big rule holding most hashes, then SMALL_RULES small ones with varied options."""
    hashes = [f"{rng.getrandbits(64):016x}" for _ in range(total)]
    small = min(SMALL_RULES * SMALL_RULE_SIZE, total // 2)
    big, rest = hashes[: total - small], hashes[total - small :]
    data: list[dict[str, object]] = [{"label": "big-list", "phashes": big, "toLabel": True}]
    per_rule = max(1, len(rest) // SMALL_RULES)
    for n in range(SMALL_RULES):
        chunk = rest[n * per_rule : (n + 1) * per_rule]
        if not chunk:
            break
        rule: dict[str, object] = {"label": f"small-{n}", "phashes": chunk, "reportPost": True}
        if n % 5 == 0:
            rule["hammingThreshold"] = 5
        if n % 7 == 0:
            rule["ignoreDID"] = [IGNORED]
        data.append(rule)
    return data


def flip(value: int, bits: int, rng: random.Random) -> int:
    for bit in rng.sample(range(64), bits):
        value ^= 1 << bit
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hashes", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    data = build_data(args.hashes, rng)
    t0 = time.perf_counter()
    ruleset: RuleSet = parse_rules(data)
    t1 = time.perf_counter()
    tracemalloc.start()
    index = RuleIndex(ruleset, default_threshold=3)
    build_mem, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    t2 = time.perf_counter()
    all_hashes = [h for rule in ruleset.rules for h in rule.phashes]

    queries: list[tuple[int, str]] = []
    for n in range(args.lookups):
        did = IGNORED if n % 10 == 0 else "did:plc:someoneelseabcdefghijklm"
        if n % 4 == 0:
            queries.append((flip(rng.choice(all_hashes), rng.randint(0, 6), rng), did))
        else:
            queries.append((rng.getrandbits(64), did))

    for phash, did in queries[:200]:  # warm-up
        index.match(phash, did)
    latencies = []
    hits = 0
    start = time.perf_counter()
    for phash, did in queries:
        q0 = time.perf_counter_ns()
        found = index.match(phash, did)
        latencies.append(time.perf_counter_ns() - q0)
        hits += found is not None
    elapsed = time.perf_counter() - start
    latencies.sort()
    p50 = latencies[len(latencies) // 2] / 1000
    p99 = latencies[int(len(latencies) * 0.99)] / 1000

    print(f"numpy {np.__version__}, popcount: {popcount.__name__}")
    print(f"rules: {len(ruleset.rules)}, hashes: {index.hash_count}")
    print(f"parse+validate {len(data)} rules: {(t1 - t0) * 1000:.1f} ms")
    print(f"index build: {(t2 - t1) * 1000:.1f} ms, index arrays {index.nbytes / 1e6:.2f} MB")
    print(f"  (traced allocations kept by the build: {build_mem / 1e6:.2f} MB)")
    print(f"lookups: {len(queries)} in {elapsed:.2f} s = {len(queries) / elapsed:,.0f}/s")
    print(
        f"latency per lookup: p50 {p50:.0f} us, p99 {p99:.0f} us, mean "
        f"{statistics.fmean(latencies) / 1000:.0f} us; hits {hits}"
    )


if __name__ == "__main__":
    main()
