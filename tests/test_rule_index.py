"""Rule index semantics (order, ignoreDID, thresholds, closest hash) and a 100,000-hash check."""

from __future__ import annotations

import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from phash_trio.rules.index import Match, RuleIndex, _popcount_native, _popcount_swar
from phash_trio.rules.model import Rule, RuleSet, format_phash, parse_rules

AUTHOR = "did:plc:someoneelseabcdefghijklm"
IGNORED = "did:plc:ignoreauthorexample23456"
BASE = 0xFEFEFEE3221F0B0A


def flip(value: int, *bits: int) -> int:
    """``value`` with the given bit positions inverted."""
    for bit in bits:
        value ^= 1 << bit
    return value


def make_index(*rules: dict[str, object], default: int = 3) -> RuleIndex:
    return RuleIndex(parse_rules(list(rules)), default_threshold=default)


def rule(label: str, *hashes: int, **fields: object) -> dict[str, object]:
    return {"label": label, "phashes": [format_phash(h) for h in hashes], "toLabel": True, **fields}


def test_exact_match() -> None:
    """An identical hash matches at distance 0 and reports the rule and both hashes."""
    index = make_index(rule("a", 0x1234, BASE))
    found = index.match(BASE, AUTHOR)
    assert found == Match(
        rule=index.rules[0], rule_index=0, phash=BASE, matched_phash=BASE, distance=0
    )
    assert (found.phash_hex, found.matched_hex) == ("fefefee3221f0b0a", "fefefee3221f0b0a")


def test_no_match() -> None:
    """A hash far from every listed hash matches nothing."""
    assert make_index(rule("a", BASE)).match(~BASE & (2**64 - 1), AUTHOR) is None


def test_empty_index() -> None:
    """An index without rules answers None."""
    index = RuleIndex(RuleSet(()), default_threshold=3)
    assert index.match(BASE, AUTHOR) is None
    assert index.hash_count == 0


def test_first_rule_in_file_order_wins() -> None:
    """When two rules match, the earlier one wins even if the later one is closer."""
    index = make_index(rule("first", flip(BASE, 1, 2)), rule("second", BASE))
    found = index.match(BASE, AUTHOR)
    assert found is not None
    assert (found.rule.label, found.rule_index, found.distance) == ("first", 0, 2)


def test_ignore_did_skips_rule() -> None:
    """An author in a rule's ignoreDID falls through to the next matching rule."""
    index = make_index(rule("first", BASE, ignoreDID=[IGNORED]), rule("second", flip(BASE, 0)))
    ignored = index.match(BASE, IGNORED)
    assert ignored is not None and (ignored.rule_index, ignored.distance) == (1, 1)
    other = index.match(BASE, AUTHOR)
    assert other is not None and (other.rule_index, other.distance) == (0, 0)


def test_ignore_did_everywhere_means_no_match() -> None:
    """An author ignored by every matching rule gets no match."""
    index = make_index(
        rule("a", BASE, ignoreDID=[IGNORED]), rule("b", BASE, ignoreDID=[IGNORED, AUTHOR])
    )
    assert index.match(BASE, IGNORED) is None
    found = index.match(BASE, AUTHOR)
    assert found is not None and found.rule_index == 0


def test_default_threshold_is_inclusive() -> None:
    """With the default threshold 3, distance 3 matches and distance 4 does not."""
    index = make_index(rule("a", BASE), default=3)
    found = index.match(flip(BASE, 0, 9, 63), AUTHOR)
    assert found is not None and found.distance == 3
    assert index.match(flip(BASE, 0, 9, 63, 30), AUTHOR) is None


def test_default_threshold_comes_from_the_index() -> None:
    """Rules without hammingThreshold follow the index's default."""
    ruleset = parse_rules([rule("a", BASE)])
    probe = flip(BASE, 5, 6)
    assert RuleIndex(ruleset, default_threshold=1).match(probe, AUTHOR) is None
    assert RuleIndex(ruleset, default_threshold=2).match(probe, AUTHOR) is not None


def test_per_rule_threshold_is_inclusive() -> None:
    """A rule's hammingThreshold replaces the default: 5 matches at 5 and not at 6."""
    index = make_index(rule("wide", BASE, hammingThreshold=5), default=3)
    five = flip(BASE, 1, 2, 3, 4, 5)
    found = index.match(five, AUTHOR)
    assert found is not None and found.distance == 5
    assert index.match(flip(five, 6), AUTHOR) is None


def test_threshold_zero_is_exact_only() -> None:
    """hammingThreshold 0 matches only the identical hash, while later rules use the default."""
    index = make_index(rule("exact", BASE, hammingThreshold=0), rule("loose", BASE), default=3)
    exact = index.match(BASE, AUTHOR)
    near = index.match(flip(BASE, 7), AUTHOR)
    assert exact is not None and exact.rule.label == "exact"
    assert near is not None and near.rule.label == "loose"


def test_threshold_above_64_matches_everything() -> None:
    """A threshold beyond 64 behaves like 64 (every hash), not like an overflowed small one."""
    index = make_index(rule("all", BASE, hammingThreshold=300))
    found = index.match(~BASE & (2**64 - 1), AUTHOR)
    assert found is not None and found.distance == 64


def test_closest_hash_within_rule() -> None:
    """Within the winning rule the smallest distance is reported, wherever it is in the list."""
    index = make_index(rule("a", flip(BASE, 1, 2, 3), flip(BASE, 4), flip(BASE, 5, 6)))
    found = index.match(BASE, AUTHOR)
    assert found is not None
    assert (found.matched_phash, found.distance) == (flip(BASE, 4), 1)


def test_tie_goes_to_first_hash_in_list() -> None:
    """Two hashes at the same distance: the one listed first is reported."""
    index = make_index(rule("a", flip(BASE, 10, 11), flip(BASE, 1), flip(BASE, 2)))
    found = index.match(BASE, AUTHOR)
    assert found is not None and found.matched_phash == flip(BASE, 1)


def test_rejects_values_that_are_not_64_bit_hashes() -> None:
    """Negative or too-large hash values are a programming error, not a silent miss."""
    index = make_index(rule("a", BASE))
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError, match="64-bit"):
            index.match(bad, AUTHOR)
    with pytest.raises(ValueError, match=">= 0"):
        RuleIndex(RuleSet(()), default_threshold=-1)


def test_index_built_from_rules_made_in_code() -> None:
    """Rules constructed in code (as other modules' tests do) index like loaded ones."""
    ruleset = RuleSet((Rule(label="a", phashes=(BASE,), ignore_did=frozenset({IGNORED})),))
    index = RuleIndex(ruleset, default_threshold=3)
    assert index.match(BASE, IGNORED) is None
    assert index.match(BASE, AUTHOR) is not None
    assert index.nbytes == 8 + 4 + 1


def test_popcount_fallback_agrees_with_numpy() -> None:
    """The SWAR popcount used on numpy < 2 gives the same counts as np.bitwise_count."""
    rng = np.random.default_rng(5)
    values = rng.integers(0, 2**64 - 1, size=5000, dtype=np.uint64, endpoint=True)
    values[:3] = [0, 2**64 - 1, 1 << 63]
    expected = [int(v).bit_count() for v in values]
    assert _popcount_swar(values).tolist() == expected
    assert _popcount_native(values).tolist() == expected


def brute_force(
    rules: tuple[Rule, ...], default: int, phash: int, did: str
) -> tuple[int, int, int] | None:
    """Reference semantics in plain Python: (rule index, matched hash, distance)."""
    for index, candidate in enumerate(rules):
        if did in candidate.ignore_did:
            continue
        distances = [(h ^ phash).bit_count() for h in candidate.phashes]
        best = min(distances)
        if best <= candidate.threshold(default):
            return index, candidate.phashes[distances.index(best)], best
    return None


def large_rules(rng: random.Random) -> list[dict[str, object]]:
    """100,000 hashes: small rules around one 90,000-hash rule, some sharing hashes."""
    pool = [rng.getrandbits(64) for _ in range(100_000)]
    rules: list[dict[str, object]] = []
    sizes = [169] * 59
    sizes[-1] += 10_000 - sum(sizes)
    sizes.insert(21, 90_000)
    start = 0
    for n, size in enumerate(sizes):
        chunk = pool[start : start + size]
        start += size
        if n % 6 == 1:  # overlap with an earlier rule: order decides
            chunk[:3] = pool[:3]
        extra: dict[str, object] = {}
        if n % 4 == 0:
            extra["hammingThreshold"] = n % 9
        if n % 5 == 0:
            extra["ignoreDID"] = [IGNORED]
        rules.append(rule(f"rule-{n}", *chunk, **extra))
    assert start == len(pool) == 100_000
    return rules


def test_large_index_agrees_with_brute_force() -> None:
    """On 100,000 hashes, 200 lookups (near-hits and misses) equal the plain-Python answer."""
    rng = random.Random(42)
    ruleset = parse_rules(large_rules(rng))
    index = RuleIndex(ruleset, default_threshold=3)
    assert index.hash_count == 100_000
    listed = [h for r in ruleset.rules for h in r.phashes]
    outcomes: Counter[int | None] = Counter()
    for n in range(200):
        did = (IGNORED, AUTHOR)[n % 2]
        if n % 4 == 3:
            phash = rng.getrandbits(64)
        else:  # a listed hash, one of those shared by several rules every 5th time
            near = rng.choice(listed[:3] if n % 5 == 0 else listed)
            phash = flip(near, *rng.sample(range(64), rng.randint(0, 6)))
        expected = brute_force(ruleset.rules, 3, phash, did)
        found = index.match(phash, did)
        got = None if found is None else (found.rule_index, found.matched_phash, found.distance)
        assert got == expected, (n, format_phash(phash), did)
        outcomes[None if found is None else found.rule_index] += 1
    # Misses, the big rule, the shared hashes resolved by order (0 first, else 1), other rules.
    assert outcomes[None] >= 50 and outcomes[21] >= 30
    assert outcomes[0] >= 1 and outcomes[1] >= 5 and len(outcomes) >= 8


def test_concurrent_lookups_from_threads() -> None:
    """Lookups from several threads at once give the same answers as one by one."""
    rng = random.Random(3)
    hashes = [rng.getrandbits(64) for _ in range(2000)]
    index = make_index(rule("a", *hashes[:1000]), rule("b", *hashes[1000:], hammingThreshold=6))
    probes = [flip(h, rng.randrange(64)) for h in hashes[::4]] + [rng.getrandbits(64)] * 50
    serial = [index.match(p, AUTHOR) for p in probes]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda p: index.match(p, AUTHOR), probes))
    assert parallel == serial
    assert sum(m is not None for m in serial) == 500
