"""The multi-index hash search against a brute-force scan, on random and adversarial sets."""

from __future__ import annotations

import numpy as np
import pytest

from phash_trio.rules.hashindex import HashIndex


def _brute(codes: np.ndarray, alive: np.ndarray, query: np.ndarray, t: int) -> dict[int, int]:
    bits = np.unpackbits((codes ^ query).view(np.uint8), axis=1).sum(axis=1)
    return {int(k): int(bits[k]) for k in np.flatnonzero((bits <= t) & alive)}


def _result(index: HashIndex, query: np.ndarray, t: int) -> dict[int, int]:
    found = index.search(query, t)
    assert list(found.distances) == sorted(found.distances)
    return dict(zip(found.keys.tolist(), found.distances.tolist(), strict=True))


def _near(rng: np.random.Generator, base: np.ndarray, flips: int) -> np.ndarray:
    """``base`` (W,) with ``flips`` distinct random bits flipped."""
    bits = np.unpackbits(base.view(np.uint8))
    bits[rng.choice(bits.size, flips, replace=False)] ^= 1
    return np.packbits(bits).view(np.uint64)


@pytest.mark.parametrize(
    ("bits", "thresholds"), [(256, (0, 15, 16, 31, 32, 47, 60)), (64, (0, 3, 5, 8, 12, 20))]
)
def test_random_and_near_queries_equal_brute_force(bits: int, thresholds: tuple[int, ...]) -> None:
    """Queries at and around real neighbours find exactly what a scan finds, at every threshold."""
    rng = np.random.default_rng(bits)
    words = bits // 64
    n = 20_000
    codes = rng.integers(0, 2**64, size=(n, words), dtype=np.uint64)
    index = HashIndex(bits, delta_max=1_000)
    index.add_many(codes, np.zeros(n, dtype=np.int32))
    index.compact()
    alive = np.ones(n, dtype=bool)
    for t in thresholds:
        for i in range(30):
            base = codes[rng.integers(n)]
            query = (
                _near(rng, base, int(rng.integers(0, t + 3)))
                if i % 3
                else rng.integers(0, 2**64, size=words, dtype=np.uint64)
            )
            assert _result(index, query, t) == _brute(codes, alive, query, t)


def test_adversarial_cluster_equals_brute_force() -> None:
    """Thousands of PDQ hashes within 31 of one another (one huge bucket per chunk) stay exact."""
    rng = np.random.default_rng(7)
    centre = rng.integers(0, 2**64, size=4, dtype=np.uint64)
    cluster = np.stack([_near(rng, centre, int(rng.integers(0, 16))) for _ in range(5_000)])
    noise = rng.integers(0, 2**64, size=(5_000, 4), dtype=np.uint64)
    codes = np.concatenate((cluster, noise))
    index = HashIndex(256)
    index.add_many(codes, np.arange(len(codes), dtype=np.int32) % 3)
    index.compact()
    alive = np.ones(len(codes), dtype=bool)
    for flips in (0, 8, 16, 24, 31, 40):
        query = _near(rng, centre, flips)
        assert _result(index, query, 31) == _brute(codes, alive, query, 31)


def test_adds_removes_and_compaction_keep_results_exact() -> None:
    """Delta rows, tombstones in main and in delta, and a compaction between them: still exact."""
    rng = np.random.default_rng(3)
    index = HashIndex(256, delta_max=500)
    codes = rng.integers(0, 2**64, size=(3_000, 4), dtype=np.uint64)
    index.add_many(codes[:2_000], np.zeros(2_000, dtype=np.int32))
    index.compact()
    index.add_many(codes[2_000:], np.zeros(1_000, dtype=np.int32))  # delta
    assert index.delta_size == 1_000 and index.needs_compaction()
    alive = np.ones(3_000, dtype=bool)
    for key in rng.choice(3_000, 400, replace=False):
        assert index.remove(int(key))
        alive[key] = False
    assert not index.remove(int(np.flatnonzero(~alive)[0]))  # twice: no-op
    assert len(index) == 2_600

    def check() -> None:
        for _ in range(40):
            query = _near(rng, codes[rng.integers(3_000)], int(rng.integers(0, 35)))
            assert _result(index, query, 31) == _brute(codes, alive, query, 31)

    check()
    upto, snap_codes, snap_keys = index.compaction_input()
    main = index.build_main(snap_codes, snap_keys)
    for key in np.flatnonzero(alive)[:50]:  # removed while "the thread" was building
        index.remove(int(key))
        alive[key] = False
    index.install_main(upto, main)
    assert index.delta_size == 0
    check()
    extra = rng.integers(0, 2**64, size=(10, 4), dtype=np.uint64)
    keys = index.add_many(extra, np.full(10, 2, dtype=np.int32))
    assert list(keys) == list(range(3_000, 3_010))
    assert index.find(extra[4]).tolist() == [3_004]
    assert index.find(extra[4], tag=1).tolist() == []
    assert index.tag(3_004) == 2


def test_empty_index_and_bad_sizes() -> None:
    """An empty index finds nothing; bit sizes must be multiples of 64."""
    index = HashIndex(64)
    assert index.search(np.zeros(1, dtype=np.uint64), 10).keys.size == 0
    with pytest.raises(ValueError):
        HashIndex(100)
