"""Banks on a real redis-server: storage, the change log, the in-memory index and its sync."""

from __future__ import annotations

import random

import numpy as np
import pytest
import redis
import trio

from phash_trio.rules.bankindex import BankIndex
from phash_trio.rules.banks import BankEntry, BankError, BankStore, LogTrimmed, normalize_signal
from phash_trio.rules.banksync import BankMetrics, BankSync


def pdq(seed: int) -> str:
    return random.Random(seed).getrandbits(256).to_bytes(32, "big").hex()


def flip(hex_: str, bits: int) -> str:
    """``hex_`` with its ``bits`` lowest bits inverted."""
    width = len(hex_) * 4
    return (int(hex_, 16) ^ ((1 << bits) - 1)).to_bytes(width // 8, "big").hex()


def entry(value: str, cid: str = "c1", kind: str = "pdq", **kw: object) -> BankEntry:
    return BankEntry.make(kind, value, cid, **kw)  # type: ignore[arg-type]


@pytest.fixture
def banks(raw: redis.Redis) -> BankStore:
    return BankStore(raw, log_maxlen=100)


def test_store_roundtrip_and_change_log(banks: BankStore) -> None:
    """Banks, entries, flags and removals are stored and each write is one numbered change."""
    assert banks.seq() == 0 and banks.bank_names() == {}
    banks.set_bank("NCMEC_PDQ")
    banks.put(
        "NCMEC_PDQ",
        [entry(pdq(1), "a", note="n", metadata={"k": 1}), entry("AB" * 8, "b", "phash")],
    )
    (got,) = banks.get("NCMEC_PDQ", [f"pdq:{pdq(1)}"])
    assert got == entry(pdq(1), "a", note="n", metadata={"k": 1})
    assert banks.delete("NCMEC_PDQ", [f"phash:{'ab' * 8}", "phash:0000000000000000"]) == 1
    banks.set_bank("NCMEC_PDQ", enabled=False)
    (info,) = banks.list_banks()
    assert (info.name, info.enabled, info.counts["pdq"], info.counts["phash"]) == (
        "NCMEC_PDQ",
        False,
        1,
        0,
    )
    changes = banks.changes_since(0)
    assert [(c.seq, c.op) for c in changes] == [(1, "bank"), (2, "put"), (3, "del"), (4, "bank")]
    assert changes[1].fields == (f"pdq:{pdq(1)}", f"phash:{'ab' * 8}")
    assert banks.changes_since(4) == []
    assert banks.remove_bank("NCMEC_PDQ") and not banks.remove_bank("NCMEC_PDQ")
    assert banks.changes_since(4)[0].op == "drop" and banks.bank_names() == {}


def test_writes_to_a_missing_bank_and_bad_names_are_refused(banks: BankStore) -> None:
    """A put into a bank that does not exist, a bad name or a bad hash: BankError, no change."""
    with pytest.raises(BankError, match="no such bank"):
        banks.put("NOPE", [entry(pdq(1))])
    for bad in ("lower", "1ABC", "A-B", ""):
        with pytest.raises(BankError):
            banks.set_bank(bad)
    with pytest.raises(BankError, match="64 hex"):
        entry("abc")
    with pytest.raises(BankError, match="unknown signal"):
        normalize_signal("tmk", "00")
    assert normalize_signal("PDQ", pdq(2).upper()) == ("pdq", pdq(2))
    assert banks.seq() == 0


def test_trimmed_log_is_detected(banks: BankStore, raw: redis.Redis) -> None:
    """A reader whose next change was trimmed away (or whose counter is ahead) must reload."""
    banks.set_bank("B")
    for i in range(5):
        banks.put("B", [entry(pdq(i))])
    assert [c.seq for c in banks.changes_since(2)] == [3, 4, 5, 6]
    raw.xtrim("banks:log", maxlen=2, approximate=False)
    with pytest.raises(LogTrimmed):
        banks.changes_since(2)
    assert [c.seq for c in banks.changes_since(4)] == [5, 6]
    with pytest.raises(LogTrimmed):
        banks.changes_since(99)


def test_index_load_and_incremental_changes(banks: BankStore) -> None:
    """The index finds what is enabled, within threshold, in enabled banks; changes apply in place."""
    banks.set_bank("A")
    banks.set_bank("B")
    base = pdq(10)
    banks.put(
        "A", [entry(base, "x"), entry(flip(base, 20), "y"), entry(pdq(11), "off", enabled=False)]
    )
    banks.put(
        "B", [entry(flip(base, 40), "z"), entry("d41d8cd98f00b204e9800998ecf8427e", "e", "md5")]
    )
    index = BankIndex.load(banks)
    assert index.seq == banks.seq() and index.size["pdq"] == 3 and index.size["md5"] == 1
    hits = index.search("pdq", base, 31)
    assert [(h.bank, h.distance) for h in hits] == [("A", 0), ("A", 20)]
    assert [h.bank for h in index.search("pdq", base, 40)] == ["A", "A", "B"]
    assert index.search("pdq", pdq(11), 31) == []  # disabled entry
    assert [h.bank for h in index.search("md5", "d41d8cd98f00b204e9800998ecf8427e")] == ["B"]
    assert index.search("pdq", base, 40, banks=frozenset({"B"}))[0].value == flip(base, 40)

    start = index.seq
    banks.put("A", [entry(flip(base, 20), "y", enabled=False)])  # disable one
    banks.delete("A", [f"pdq:{base}"])
    banks.put("B", [entry(pdq(12), "new")])
    banks.set_bank("B", enabled=False)
    for change in banks.changes_since(start):
        fetched = banks.get(change.bank, list(change.fields)) if change.op == "put" else None
        index.apply(change, fetched)
    index.set_flags(banks.bank_names())
    assert index.search("pdq", base, 40) == []
    assert index.search("pdq", pdq(12), 0) == []  # bank B disabled
    banks.set_bank("B", enabled=True)
    index.set_flags(banks.bank_names())
    assert [h.value for h in index.search("pdq", pdq(12), 0)] == [pdq(12)]
    banks.remove_bank("B")
    index.apply(banks.changes_since(banks.seq() - 1)[0])
    assert (
        index.search("pdq", pdq(12), 0) == []
        and index.search("md5", "d41d8cd98f00b204e9800998ecf8427e") == []
    )


def test_index_equals_brute_force_on_a_bank(banks: BankStore) -> None:
    """5,000 hashes around a few centres in two banks: every lookup equals a scan."""
    rng = np.random.default_rng(5)
    centres = [pdq(100 + i) for i in range(5)]
    values = {
        flip(c, int(rng.integers(0, 30))) if i % 2 else pdq(1000 + i * 7 + j)
        for i, c in enumerate(centres)
        for j in range(1000)
    }
    values_list = sorted(values)
    banks.set_bank("A")
    banks.set_bank("B")
    banks.put("A", [entry(v, f"a{i}") for i, v in enumerate(values_list[::2])])
    banks.put("B", [entry(v, f"b{i}") for i, v in enumerate(values_list[1::2])])
    index = BankIndex.load(banks)
    for query in [*centres, *(flip(c, 12) for c in centres), pdq(5)]:
        got = sorted((h.value, h.distance) for h in index.search("pdq", query, 31))
        want = sorted(
            (v, (int(v, 16) ^ int(query, 16)).bit_count())
            for v in values_list
            if (int(v, 16) ^ int(query, 16)).bit_count() <= 31
        )
        assert got == want


async def test_sync_follows_changes_and_reloads_after_a_trim(
    banks: BankStore, raw: redis.Redis
) -> None:
    """A running sync applies new entries within a poll, and reloads (after its jitter) on a gap."""
    metrics = BankMetrics.register()
    sync = BankSync(banks, poll_secs=0.05, jitter_secs=0.1, metrics=metrics, rng=random.Random(1))
    banks.set_bank("LIVE")
    async with trio.open_nursery() as nursery:
        await nursery.start(sync.run)
        assert sync.index is not None and sync.index.search("pdq", pdq(1), 0) == []
        banks.put("LIVE", [entry(pdq(1), "first")])
        with trio.fail_after(5):
            while not sync.index.search("pdq", pdq(1), 0):
                await sync.wait_updated()
        before = sync.index
        banks.put("LIVE", [entry(pdq(i), f"n{i}") for i in range(2, 30)])
        raw.xtrim(
            "banks:log", maxlen=0, approximate=False
        )  # as if the log had been trimmed while we were away
        with trio.fail_after(5):
            while sync.index is before:
                await sync.wait_updated()
        assert len(sync.index.search("pdq", pdq(29), 0)) == 1
        nursery.cancel_scope.cancel()
    assert metrics.reloads.labels(reason="log trimmed")._value.get() == 1
    assert metrics.changes._value.get() >= 1
