"""Hamming range search over millions of binary hashes (PDQ 256-bit, mean hash 64-bit).

Multi-index hashing (Norouzi et al.), in numpy: a hash of ``B`` bits is cut into ``m = B / 16``
chunks of 16 bits. Two hashes within distance ``t`` agree to within ``t // m`` bits on at least
one chunk (pigeonhole), so a query probes, in each chunk's sorted column, every value within
``t // m`` flips of its own chunk (1 probe for ``t < m``, 17 for ``t < 2m``, 137 for ``t < 3m``),
and only those candidates are compared in full. PDQ at 31: 16 chunks x 17 probes, about 4,000
candidates per query at a million random hashes. When a query would gather more than a quarter
of the hashes (``t >= 3m``, or many near-duplicates: the adversarial case) a plain vectorised
scan is cheaper, and is what runs; the result is the same.

Updates without rebuilds: every hash ever added gets a *key* (0, 1, 2, ...) and a row in one
growing code buffer. Keys below ``main_upto`` are in the immutable multi-index ("main"); newer
ones are the *delta*, scanned directly; removal clears the key's ``alive`` flag (a tombstone).
:meth:`HashIndex.compact` (run in a thread by the owner when :meth:`needs_compaction`) rebuilds
main from the live keys and swaps it in; adds and removes made meanwhile stay valid because keys
never change. Memory: the buffer keeps dead rows until the owner rebuilds the whole index.

Not thread-safe for writers: one task mutates and searches; only ``_build_main`` runs in a
worker thread, on copies.
"""

from __future__ import annotations

import mmap
from itertools import combinations
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from phash_trio.rules.index import popcount

__all__ = ["HashIndex", "MultiIndex", "SearchResult"]

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
U16 = npt.NDArray[np.uint16]

CHUNK_BITS = 16
#: Most flips probed per chunk; beyond that a scan is cheaper.
MAX_FLIPS = 2
#: A query gathering more than this fraction of the hashes is answered by a scan.
SCAN_FRACTION = 0.25


def _flip_masks(flips: int) -> U16:
    masks = [0]
    for r in range(1, flips + 1):
        for bits in combinations(range(CHUNK_BITS), r):
            masks.append(sum(1 << b for b in bits))
    return np.array(masks, dtype=np.uint16)


_MASKS = tuple(_flip_masks(r).astype(np.int64) for r in range(MAX_FLIPS + 1))
_VALUES = 1 << CHUNK_BITS


def _big_zeros(shape: tuple[int, ...], dtype: Any) -> Any:
    """Zeroed array in its own anonymous mapping, with transparent huge pages asked for.

    A lookup reads a few thousand random rows: with 4 KiB pages nearly each one is a TLB miss
    (measured: huge pages cut the gather by about a third). Its own mapping also means the
    memory goes back to the system the moment the array is dropped (no heap fragmentation
    across index reloads).
    """
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size < 1 << 21:
        return np.zeros(shape, dtype=dtype)
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


@attrs.frozen
class SearchResult:
    """Keys within the threshold, closest first, with their distances."""

    keys: I64
    distances: I64


def _distances(codes: U64, query: U64) -> I64:
    """Hamming distance of each row of ``codes`` (k, W) to ``query`` (W,)."""
    if codes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    dist: I64 = popcount(codes ^ query).sum(axis=1, dtype=np.int64)
    return dist


class MultiIndex:
    """The immutable multi-index over a set of keys; built once, then only searched.

    Per chunk, the keys sorted by their chunk value and a table of where each of the 65,536
    values starts: a probe is two table reads, no binary search.
    """

    def __init__(self, codes: U64, keys: I64) -> None:
        """``codes`` (n, W) uint64 rows for ``keys`` (n,)."""
        codes = np.ascontiguousarray(codes, dtype=np.uint64)
        n = codes.shape[0]
        chunks = codes.shape[1] * 64 // CHUNK_BITS
        columns = codes.view(np.uint16).reshape(n, chunks)
        self.size = n
        self.chunks = chunks
        #: Row j: the keys sorted by their chunk j (flattened, row j starts at j * n).
        self.keys: I32 = _big_zeros((chunks, n), np.int32)
        #: Row j: position in row j of ``keys`` where each chunk value starts (65,537 entries).
        self.starts: I64 = np.empty((chunks, _VALUES + 1), dtype=np.int64)
        for j in range(chunks):
            column = np.ascontiguousarray(columns[:, j])
            order = np.argsort(column, kind="stable")
            self.keys[j] = keys[order]
            self.starts[j, 0] = 0
            np.cumsum(np.bincount(column, minlength=_VALUES), out=self.starts[j, 1:])
            self.starts[j] += j * n
        self._flat_keys = self.keys.reshape(-1)
        self._flat_starts = self.starts.reshape(-1)
        self._row_base = (np.arange(chunks, dtype=np.int64) * (_VALUES + 1))[:, None]

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.starts.nbytes)

    def candidates(self, query: U64, threshold: int, limit: int) -> I64 | None:
        """Keys that may be within ``threshold`` (a superset), or None if there are > ``limit``."""
        if self.size == 0:
            return np.zeros(0, dtype=np.int64)
        flips = threshold // self.chunks
        if flips > MAX_FLIPS:
            return None
        parts = query.view(np.uint16).astype(np.int64)
        # (chunks, probes): every value within ``flips`` of each chunk (distinct masks give
        # distinct probes), as indexes into the flattened start tables.
        probes = (parts[:, None] ^ _MASKS[flips][None, :]) + self._row_base
        lo = self._flat_starts[probes].reshape(-1)
        lengths = self._flat_starts[probes + 1].reshape(-1) - lo
        total = int(lengths.sum())
        if total > limit:
            return None
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        keep = lengths > 0
        lo, lengths = lo[keep], lengths[keep]
        # Positions lo..lo+len-1 of every range, in one vectorised step.
        positions = np.arange(total) + np.repeat(lo - np.cumsum(lengths) + lengths, lengths)
        found = np.sort(self._flat_keys[positions]).astype(np.int64)
        if found.size > 1:  # a key found through several chunks is compared once
            found = found[np.concatenate(([True], found[1:] != found[:-1]))]
        return found


class HashIndex:
    """Range search over ``bits``-bit hashes with cheap adds and removes (see module doc)."""

    def __init__(self, bits: int, *, delta_max: int = 8192, dead_fraction: float = 0.25) -> None:
        if bits % 64 or bits <= 0:
            raise ValueError(f"bits must be a positive multiple of 64, got {bits}")
        self.bits = bits
        self.words = bits // 64
        self.delta_max = delta_max
        self.dead_fraction = dead_fraction
        self._codes: U64 = np.zeros((1024, self.words), dtype=np.uint64)
        self._alive = np.zeros(1024, dtype=bool)
        self._tags: I32 = np.zeros(1024, dtype=np.int32)
        self._n = 0
        self._live = 0
        self._main = MultiIndex(np.zeros((0, self.words), dtype=np.uint64), np.zeros(0, np.int64))
        self._main_upto = 0
        #: Keys in main that were removed after it was built.
        self._main_dead = 0

    # -- sizes --------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Live hashes."""
        return self._live

    @property
    def keys_used(self) -> int:
        return self._n

    @property
    def delta_size(self) -> int:
        return self._n - self._main_upto

    @property
    def nbytes(self) -> int:
        """Memory of the arrays (buffer capacity included)."""
        return int(self._codes.nbytes + self._alive.nbytes + self._tags.nbytes + self._main.nbytes)

    # -- writes -------------------------------------------------------------------------------

    def _grow(self, need: int) -> None:
        capacity = self._codes.shape[0]
        if need <= capacity:
            return
        new = max(need, capacity * 2)
        codes: U64 = _big_zeros((new, self.words), np.uint64)
        codes[: self._n] = self._codes[: self._n]
        alive = np.zeros(new, dtype=bool)
        alive[: self._n] = self._alive[: self._n]
        tags = np.zeros(new, dtype=np.int32)
        tags[: self._n] = self._tags[: self._n]
        self._codes, self._alive, self._tags = codes, alive, tags

    def add_many(self, codes: U64, tags: npt.NDArray[np.integer]) -> I64:
        """Add rows ``codes`` (k, W) with ``tags`` (k,); returns their new keys."""
        codes = np.asarray(codes, dtype=np.uint64).reshape(-1, self.words)
        k = codes.shape[0]
        self._grow(self._n + k)
        start = self._n
        self._codes[start : start + k] = codes
        self._tags[start : start + k] = tags
        self._alive[start : start + k] = True
        self._n += k
        self._live += k
        return np.arange(start, start + k, dtype=np.int64)

    def add(self, code: U64, tag: int) -> int:
        return int(self.add_many(code.reshape(1, -1), np.array([tag]))[0])

    def remove(self, key: int) -> bool:
        """Tombstone ``key``; False if it was not live."""
        if not 0 <= key < self._n or not self._alive[key]:
            return False
        self._alive[key] = False
        self._live -= 1
        if key < self._main_upto:
            self._main_dead += 1
        return True

    def remove_tag(self, tag: int) -> int:
        """Tombstone every live key with ``tag``; returns how many."""
        keys = np.flatnonzero(self._alive[: self._n] & (self._tags[: self._n] == tag))
        self._alive[keys] = False
        self._live -= keys.size
        self._main_dead += int((keys < self._main_upto).sum())
        return int(keys.size)

    # -- reads --------------------------------------------------------------------------------

    def code(self, key: int) -> U64:
        row: U64 = self._codes[key].copy()
        return row

    def tag(self, key: int) -> int:
        return int(self._tags[key])

    def tags_of(self, keys: I64) -> I32:
        return self._tags[keys]

    def find(self, code: U64, tag: int | None = None) -> I64:
        """Live keys holding exactly ``code`` (and ``tag``, if given)."""
        keys = self.search(code, 0).keys
        if tag is not None:
            keys = keys[self._tags[keys] == tag]
        return keys

    def search(self, code: U64, threshold: int) -> SearchResult:
        """Live keys within ``threshold`` of ``code``, closest first (then by key)."""
        query = np.ascontiguousarray(code, dtype=np.uint64).reshape(self.words)
        limit = max(int(self._main.size * SCAN_FRACTION), 1024)
        cand = self._main.candidates(query, threshold, limit)
        if cand is None:  # many near-duplicates, or a wide threshold: scan main's keys
            cand = np.arange(self._main_upto, dtype=np.int64)
        delta = np.arange(self._main_upto, self._n, dtype=np.int64)
        keys = np.concatenate((cand, delta)) if delta.size else cand
        keys = keys[self._alive[keys]]
        dist = _distances(self._codes[keys], query)
        within = dist <= threshold
        keys, dist = keys[within], dist[within]
        order = np.lexsort((keys, dist))
        return SearchResult(keys=keys[order], distances=dist[order])

    # -- compaction ---------------------------------------------------------------------------

    def needs_compaction(self) -> bool:
        return (
            self.delta_size > self.delta_max
            or self._main_dead > self.dead_fraction * max(self._main.size, 1) > 0
        )

    def compaction_input(self) -> tuple[int, U64, I64]:
        """``(upto, codes, keys)``: a copy of the live rows below ``upto`` to build main from."""
        upto = self._n
        keys = np.flatnonzero(self._alive[:upto]).astype(np.int64)
        return upto, self._codes[keys].copy(), keys

    @staticmethod
    def build_main(codes: U64, keys: I64) -> MultiIndex:
        """The slow part (sorting every chunk): safe to run in a worker thread."""
        return MultiIndex(codes, keys)

    def install_main(self, upto: int, main: MultiIndex) -> None:
        """Swap in a main built from :meth:`compaction_input` (keys below ``upto``)."""
        self._main = main
        self._main_upto = upto
        # Keys removed since the snapshot are still in the new main: count them as dead.
        self._main_dead = main.size - int(self._alive[:upto].sum())

    def compact(self) -> None:
        """Rebuild main now, in this thread (start-up, tests)."""
        upto, codes, keys = self.compaction_input()
        self.install_main(upto, self.build_main(codes, keys))
