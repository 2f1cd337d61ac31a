"""One blob's signals -> the rule that acts on it: mean hashes, PDQ hashes and banks together.

Rules are still tried in file order and the first one that matches wins; a rule matches when
the image's mean hash is within its ``hammingThreshold`` of one of its ``phashes`` (as before),
its PDQ within ``pdqThreshold`` of one of its ``pdqHashes``, or any signal is in one of its
``banks`` (PDQ within ``pdqThreshold``, mean hash within ``hammingThreshold``, MD5/SHA-256
equal). Within the winning rule the strongest evidence is reported: an exact file hash, then
PDQ, then the mean hash, closest first. A PDQ of quality below ``PDQ_QUALITY_MIN`` is not
matched at all (counted). Bank hits that no rule names are logged and counted, not acted on.

A bank match carries the entry's content id, read from Redis for that one entry (fail-open: a
Redis error leaves it out rather than losing the match).
"""

from __future__ import annotations

from collections import defaultdict

import attrs
import numpy as np
import redis
import trio
from loguru import logger

from phash_trio.image.signals import BlobSignals
from phash_trio.rules.bankindex import BankHit, codes_from_hex
from phash_trio.rules.banksync import BankMetrics, BankSync
from phash_trio.rules.hashindex import HashIndex
from phash_trio.rules.index import Match, RuleIndex
from phash_trio.rules.model import Rule

__all__ = ["BlobMatcher"]

#: Which evidence wins within one rule (lower first).
_PRIORITY = {"sha256": 0, "md5": 0, "pdq": 1, "phash": 2}


@attrs.frozen
class _Candidate:
    rule_index: int
    priority: int
    distance: int
    signal_type: str
    value: str
    bank: str | None = None

    @property
    def order(self) -> tuple[int, int, int]:
        return (self.rule_index, self.priority, self.distance)


class BlobMatcher:
    """Built once per rule set; ``banks`` (optional) supplies the live bank index."""

    def __init__(
        self,
        rules: RuleIndex,
        *,
        banks: BankSync | None = None,
        pdq_threshold: int = 31,
        pdq_quality_min: int = 50,
        metrics: BankMetrics | None = None,
    ) -> None:
        self.rules = rules
        self.banks = banks
        self.pdq_threshold = pdq_threshold
        self.pdq_quality_min = pdq_quality_min
        self.metrics = metrics if metrics is not None else (banks.metrics if banks else None)
        ruleset = rules.rules
        self._pdq_index = HashIndex(256)
        hexes = [h for rule in ruleset for h in rule.pdq_hashes]
        if hexes:
            tags = np.repeat(np.arange(len(ruleset)), [len(r.pdq_hashes) for r in ruleset])
            self._pdq_index.add_many(codes_from_hex(hexes, 256), tags)
            self._pdq_index.compact()
        self._bank_rules: dict[str, list[int]] = defaultdict(list)
        for index, rule in enumerate(ruleset):
            for bank in rule.banks:
                self._bank_rules[bank].append(index)
        pdq_limits = [r.pdq_limit(pdq_threshold) for r in ruleset if r.pdq_hashes or r.banks]
        self._max_pdq = min(max(pdq_limits, default=0), 256)
        bank_rules = [ruleset[i] for rules_of in self._bank_rules.values() for i in rules_of]
        self._max_bank_phash = min(
            max((r.threshold(rules.default_threshold) for r in bank_rules), default=0), 64
        )

    @property
    def bank_names(self) -> frozenset[str]:
        """Banks some rule names."""
        return frozenset(self._bank_rules)

    @property
    def needs_signals(self) -> bool:
        """True when the mean hash alone is not enough (PDQ hashes or banks in the rules)."""
        return bool(self._bank_rules) or len(self._pdq_index) > 0

    def _ok(self, rule: Rule, did: str) -> bool:
        return did not in rule.ignore_did

    def _within(self, rule: Rule, kind: str, distance: int) -> bool:
        if kind == "pdq":
            return distance <= rule.pdq_limit(self.pdq_threshold)
        if kind == "phash":
            return distance <= rule.threshold(self.rules.default_threshold)
        return distance == 0

    def candidates(self, signals: BlobSignals, did: str) -> list[_Candidate]:
        """Every (rule, evidence) pair that matches, unordered."""
        ruleset = self.rules.rules
        found: list[_Candidate] = []
        own = self.rules.match(signals.mean, did)
        if own is not None:
            found.append(
                _Candidate(own.rule_index, 2, own.distance, "phash", f"{own.matched_phash:016x}")
            )
        if not self.needs_signals:
            return found
        pdq = signals.pdq
        pdq_ok = pdq is not None and pdq.quality >= self.pdq_quality_min
        if pdq is not None and not pdq_ok and self.metrics is not None:
            self.metrics.low_quality.inc()
        if pdq is not None and pdq_ok and len(self._pdq_index):
            result = self._pdq_index.search(codes_from_hex([pdq.hex], 256)[0], self._max_pdq)
            for key, distance in zip(result.keys, result.distances, strict=True):
                index = self._pdq_index.tag(int(key))
                rule = ruleset[index]
                if self._ok(rule, did) and self._within(rule, "pdq", int(distance)):
                    value = self._pdq_index.code(int(key)).tobytes().hex()
                    found.append(_Candidate(index, 1, int(distance), "pdq", value))
        bank_index = self.banks.index if self.banks is not None else None
        if bank_index is None or not self._bank_rules:
            return found
        hits: list[BankHit] = []
        if pdq is not None and pdq_ok:
            hits += bank_index.search("pdq", pdq.hex, self._max_pdq)
        hits += bank_index.search("phash", f"{signals.mean:016x}", self._max_bank_phash)
        for kind in ("md5", "sha256"):
            digest = getattr(signals, kind)
            if digest is not None:
                hits += bank_index.search(kind, digest)
        for hit in hits:
            rule_indexes = self._bank_rules.get(hit.bank, [])
            routed = False
            for index in rule_indexes:
                rule = ruleset[index]
                if self._ok(rule, did) and self._within(rule, hit.signal_type, hit.distance):
                    routed = True
                    found.append(
                        _Candidate(
                            index,
                            _PRIORITY[hit.signal_type],
                            hit.distance,
                            hit.signal_type,
                            hit.value,
                            hit.bank,
                        )
                    )
            if not routed and self.metrics is not None:
                self.metrics.unrouted.labels(bank=hit.bank).inc()
                logger.debug(
                    "bank {} {} hit at distance {} not acted on (no rule for it)",
                    hit.bank,
                    hit.signal_type,
                    hit.distance,
                )
        return found

    async def match(self, signals: BlobSignals, did: str) -> Match | None:
        """The first rule (file order) that matches, with its strongest evidence, or None."""
        found = self.candidates(signals, did)
        if not found:
            return None
        best = min(found, key=lambda c: c.order)
        rule = self.rules.rules[best.rule_index]
        content_id = None
        if best.bank is not None:
            content_id = await self._content_id(best.bank, f"{best.signal_type}:{best.value}")
            if self.metrics is not None:
                self.metrics.matches.labels(bank=best.bank, signal=best.signal_type).inc()
        is_mean = best.signal_type == "phash"
        return Match(
            rule=rule,
            rule_index=best.rule_index,
            phash=signals.mean,
            matched_phash=int(best.value, 16) if is_mean else 0,
            distance=best.distance,
            signal_type=best.signal_type,
            bank=best.bank,
            content_id=content_id,
            matched_value=None if is_mean else best.value,
        )

    async def _content_id(self, bank: str, field: str) -> str | None:
        if self.banks is None:
            return None
        store = self.banks.store
        try:
            (entry,) = await trio.to_thread.run_sync(store.get, bank, [field])
        except (redis.RedisError, OSError) as exc:
            logger.warning("bank {}: content id of a match unavailable ({})", bank, exc)
            return None
        return entry.content_id if entry is not None else None
