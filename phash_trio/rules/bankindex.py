"""The banks in memory: one PDQ and one mean-hash range index, exact-hash maps, bank flags.

Built whole from Redis once (:meth:`BankIndex.load`, in a thread: nothing else touches the new
object), then kept current by applying the change log entry by entry (:meth:`apply`): a changed
entry is added or tombstoned in place, a bank's flag is a mask checked at lookup time, so no
change ever rebuilds the index. Only the multi-index part is rebuilt, in a thread, when the
delta or the tombstones grow (:meth:`compaction_jobs`). Memory per hash: the code (32 or 8
bytes) + 4 bytes of bank id + 4 bytes per chunk (16 or 4) in the multi-index.

Entry details (content id, note, metadata) stay in Redis and are read for the few hashes that
match: the index holds no Python object per hash.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable

import attrs
import numpy as np
import numpy.typing as npt

from phash_trio.rules.banks import BankEntry, BankStore, Change
from phash_trio.rules.hashindex import HashIndex, MultiIndex

__all__ = ["BankHit", "BankIndex", "codes_from_hex"]

_BITS = {"pdq": 256, "phash": 64}
_EXACT = ("md5", "sha256")


def codes_from_hex(hexes: list[str], bits: int) -> npt.NDArray[np.uint64]:
    """Hex hashes (first digit most significant) to ``(n, bits / 64)`` uint64 rows.

    The rows are the hash's bytes in order, viewed as native uint64: only equality of layout
    between stored hashes and queries matters, and both come through here.
    """
    raw = bytes.fromhex("".join(hexes))
    return np.frombuffer(raw, dtype=np.uint64).reshape(len(hexes), bits // 64).copy()


def hex_from_code(code: npt.NDArray[np.uint64]) -> str:
    return code.tobytes().hex()


@attrs.frozen
class BankHit:
    """A bank entry close enough to an image's signal."""

    bank: str
    signal_type: str
    #: The bank's hash (hex), i.e. the entry's value.
    value: str
    distance: int


class BankIndex:
    """Every enabled entry of every bank, searchable; see the module docstring."""

    def __init__(self) -> None:
        self.hashes: dict[str, HashIndex] = {kind: HashIndex(bits) for kind, bits in _BITS.items()}
        self.exact: dict[str, dict[str, set[int]]] = {kind: {} for kind in _EXACT}
        self._ids: dict[str, int] = {}
        self._names: list[str] = []
        self._enabled = np.zeros(16, dtype=bool)
        #: The last change of the log this index reflects.
        self.seq = 0

    # -- banks --------------------------------------------------------------------------------

    @property
    def bank_names(self) -> list[str]:
        return sorted(self._ids)

    def bank_enabled(self, name: str) -> bool | None:
        bank_id = self._ids.get(name)
        return None if bank_id is None else bool(self._enabled[bank_id])

    def _bank(self, name: str, enabled: bool | None = None) -> int:
        bank_id = self._ids.get(name)
        if bank_id is None:
            bank_id = len(self._names)
            self._names.append(name)
            self._ids[name] = bank_id
            if bank_id >= self._enabled.size:
                self._enabled = np.concatenate((self._enabled, np.zeros_like(self._enabled)))
            self._enabled[bank_id] = True
        if enabled is not None:
            self._enabled[bank_id] = enabled
        return bank_id

    def _drop_bank(self, name: str) -> None:
        bank_id = self._ids.pop(name, None)
        if bank_id is None:
            return
        self._enabled[bank_id] = False
        for index in self.hashes.values():
            index.remove_tag(bank_id)
        for values in self.exact.values():
            for value in [v for v, banks in values.items() if bank_id in banks]:
                banks = values[value]
                banks.discard(bank_id)
                if not banks:
                    del values[value]

    # -- entries ------------------------------------------------------------------------------

    def _remove(self, bank_id: int, kind: str, value: str) -> None:
        if kind in self.hashes:
            index = self.hashes[kind]
            for key in index.find(codes_from_hex([value], index.bits)[0], tag=bank_id):
                index.remove(int(key))
        elif kind in self.exact:
            banks = self.exact[kind].get(value)
            if banks is not None:
                banks.discard(bank_id)
                if not banks:
                    del self.exact[kind][value]

    def _add(self, bank_id: int, kind: str, value: str) -> None:
        if kind in self.hashes:
            index = self.hashes[kind]
            code = codes_from_hex([value], index.bits)[0]
            if index.find(code, tag=bank_id).size == 0:
                index.add(code, bank_id)
        elif kind in self.exact:
            self.exact[kind].setdefault(value, set()).add(bank_id)

    def put_field(self, bank: str, field: str, entry: BankEntry | None) -> None:
        """Make the index agree with one entry as Redis has it now (None: gone)."""
        kind, _, value = field.partition(":")
        bank_id = self._bank(bank)
        if entry is None or not entry.enabled:
            self._remove(bank_id, kind, value)
        else:
            self._add(bank_id, kind, value)

    def apply(self, change: Change, entries: list[BankEntry | None] | None = None) -> None:
        """Apply one log entry; ``put`` needs the entries as read after the change."""
        if change.op == "bank":  # the flag itself is re-read with set_flags
            self._bank(change.bank)
        elif change.op == "drop":
            self._drop_bank(change.bank)
        elif change.op == "put":
            for field, entry in zip(change.fields, entries or (), strict=True):
                self.put_field(change.bank, field, entry)
        elif change.op == "del":
            bank_id = self._bank(change.bank)
            for field in change.fields:
                kind, _, value = field.partition(":")
                self._remove(bank_id, kind, value)
        self.seq = max(self.seq, change.seq)

    def set_flags(self, flags: dict[str, bool]) -> None:
        """Bank flags as Redis has them now (a ``bank`` change re-reads them all)."""
        for name, enabled in flags.items():
            self._bank(name, enabled)

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def load(cls, store: BankStore) -> BankIndex:
        """Everything from Redis, built and compacted (slow: run it in a thread)."""
        index = cls()
        index.seq = store.seq()  # before reading: later changes are re-applied, idempotently
        flags = store.bank_names()
        for name, enabled in sorted(flags.items()):
            index._load_bank(name, enabled, store.raw_fields(name))
        for hash_index in index.hashes.values():
            hash_index.compact()
        return index

    def _load_bank(self, name: str, enabled: bool, fields: Iterable[tuple[str, str]]) -> None:
        bank_id = self._bank(name, enabled)
        values: dict[str, list[str]] = {kind: [] for kind in _BITS}
        for field, raw in fields:
            kind, _, value = field.partition(":")
            if '"enabled":false' in raw and not json.loads(raw).get("enabled", True):
                continue
            if kind in values:
                values[kind].append(value)
            elif kind in self.exact:
                self.exact[kind].setdefault(value, set()).add(bank_id)
        for kind, hexes in values.items():
            if hexes:
                index = self.hashes[kind]
                index.add_many(codes_from_hex(hexes, index.bits), np.full(len(hexes), bank_id))

    # -- compaction ---------------------------------------------------------------------------

    def compaction_jobs(
        self,
    ) -> list[tuple[HashIndex, int, Callable[[], MultiIndex]]]:
        """``(index, upto, build)`` for each index that needs it; run ``build`` in a thread,
        then ``index.install_main(upto, result)`` back here."""
        jobs: list[tuple[HashIndex, int, Callable[[], MultiIndex]]] = []
        for index in self.hashes.values():
            if index.needs_compaction():
                upto, codes, keys = index.compaction_input()
                jobs.append((index, upto, functools.partial(HashIndex.build_main, codes, keys)))
        return jobs

    # -- lookups ------------------------------------------------------------------------------

    @property
    def size(self) -> dict[str, int]:
        sizes = {kind: len(index) for kind, index in self.hashes.items()}
        sizes.update({kind: sum(len(b) for b in v.values()) for kind, v in self.exact.items()})
        return sizes

    @property
    def nbytes(self) -> int:
        return sum(index.nbytes for index in self.hashes.values())

    def search(
        self, kind: str, value: str, threshold: int = 0, banks: frozenset[str] | None = None
    ) -> list[BankHit]:
        """Entries of enabled banks (of ``banks`` if given) within ``threshold`` of ``value``."""
        allowed = None if banks is None else {self._ids[b] for b in banks if b in self._ids}
        hits: list[BankHit] = []
        if kind in self.exact:
            for bank_id in sorted(self.exact[kind].get(value, ())):
                if self._enabled[bank_id] and (allowed is None or bank_id in allowed):
                    hits.append(BankHit(self._names[bank_id], kind, value, 0))
            return hits
        index = self.hashes[kind]
        found = index.search(codes_from_hex([value], index.bits)[0], threshold)
        tags = index.tags_of(found.keys)
        for key, tag, distance in zip(found.keys, tags, found.distances, strict=True):
            bank_id = int(tag)
            if not self._enabled[bank_id] or (allowed is not None and bank_id not in allowed):
                continue
            hits.append(
                BankHit(
                    self._names[bank_id], kind, hex_from_code(index.code(int(key))), int(distance)
                )
            )
        return hits
