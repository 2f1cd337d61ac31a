"""Rules with PDQ hashes and banks: which rule wins and what the match carries; a running service
matches a bank entry added while it runs, without a restart."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import redis
from e2e_helpers import GUARD, harness, host_blobs

from phash_trio.image.pdq import PdqHash
from phash_trio.image.signals import BlobSignals, compute_signals
from phash_trio.rules.banks import BankEntry, BankStore
from phash_trio.rules.banksync import BankMetrics, BankSync
from phash_trio.rules.check import rules_check
from phash_trio.rules.index import RuleIndex
from phash_trio.rules.matcher import BlobMatcher
from phash_trio.rules.model import parse_rules
from phash_trio.testing.blobhost import cid_for
from phash_trio.testing.capture import demo_images
from phash_trio.testing.jetstream_replay import fake_did, make_post
from phash_trio.testing.redis_server import RedisProcess

P = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"
MEAN = 0x0123456789ABCDEF
MD5 = "d41d8cd98f00b204e9800998ecf8427e"
DID = "did:plc:z72i7hdynmk6r22z27h6tvur"


def near(hex_: str, bits: int) -> str:
    return (int(hex_, 16) ^ ((1 << bits) - 1)).to_bytes(32, "big").hex()


def signals(
    pdq: str = P, quality: int = 100, mean: int = MEAN, md5: str | None = None
) -> BlobSignals:
    return BlobSignals(mean=mean, pdq=PdqHash(pdq, quality), md5=md5, sha256=None)


def matcher_for(rules: list[dict[str, object]], sync: BankSync | None = None) -> BlobMatcher:
    index = RuleIndex(parse_rules(rules), 3)
    return BlobMatcher(index, banks=sync, metrics=sync.metrics if sync else BankMetrics.register())


async def test_inline_pdq_rules_in_file_order() -> None:
    """pdqHashes match within pdqThreshold (default 31); the first matching rule wins."""
    m = matcher_for(
        [
            {"label": "strict", "pdqHashes": [near(P, 10)], "pdqThreshold": 5},
            {"label": "loose", "pdqHashes": [near(P, 30)]},
            {"label": "mean", "phashes": [f"{MEAN:016x}"]},
        ]
    )
    assert m.needs_signals
    match = await m.match(signals(), DID)
    assert match is not None
    assert (match.rule.label, match.signal_type, match.distance) == ("loose", "pdq", 30)
    assert match.matched_hex == near(P, 30) and match.bank is None
    assert match.meta == {"signalType": "pdq", "matchedHash": near(P, 30), "distance": 30}
    far = await m.match(signals(pdq=near(P, 80)), DID)
    assert far is not None and far.rule.label == "mean" and far.signal_type == "phash"


async def test_low_quality_pdq_is_not_matched_and_counted() -> None:
    """Quality below PDQ_QUALITY_MIN: no PDQ match, one count."""
    m = matcher_for([{"label": "x", "pdqHashes": [P]}])
    assert await m.match(signals(quality=49), DID) is None
    assert m.metrics is not None and m.metrics.low_quality._value.get() == 1
    assert await m.match(signals(quality=50), DID) is not None


async def test_bank_rules_thresholds_ignore_did_and_content_id(raw: redis.Redis) -> None:
    """A bank hit goes to the first rule naming the bank that accepts its distance and author;
    the match names bank and content id; hits no rule names are only counted."""
    store = BankStore(raw)
    store.set_bank("NCMEC_PDQ")
    store.set_bank("OTHER")
    store.put("NCMEC_PDQ", [BankEntry.make("pdq", near(P, 20), "case-42")])
    store.put("OTHER", [BankEntry.make("md5", MD5, "f1")])
    sync = BankSync(store, metrics=BankMetrics.register())
    await sync.reload("test")
    m = matcher_for(
        [
            {"label": "tight", "banks": ["NCMEC_PDQ"], "pdqThreshold": 10},
            {"label": "skip-me", "banks": ["NCMEC_PDQ"], "ignoreDID": [DID]},
            {"label": "csam", "banks": ["NCMEC_PDQ"], "toLabel": True},
        ],
        sync,
    )
    match = await m.match(signals(md5=MD5), DID)
    assert match is not None
    assert (match.rule.label, match.bank, match.content_id) == ("csam", "NCMEC_PDQ", "case-42")
    assert match.meta["contentId"] == "case-42" and match.meta["bank"] == "NCMEC_PDQ"
    assert sync.metrics.unrouted.labels(bank="OTHER")._value.get() == 1
    assert sync.metrics.matches.labels(bank="NCMEC_PDQ", signal="pdq")._value.get() == 1


def test_rules_check_reports_unknown_banks(raw: redis.Redis, tmp_path: Path) -> None:
    """rules check lists banks, warns about ones Redis does not have, says when it cannot ask."""
    BankStore(raw).set_bank("KNOWN")
    path = tmp_path / "rules.json"
    path.write_text('[{"label": "a-b", "banks": ["KNOWN", "MISSING"], "pdqHashes": ["' + P + '"]}]')
    out = io.StringIO()
    assert rules_check(path, out=out, known_banks=lambda: {"KNOWN"}) == 0
    text = out.getvalue()
    assert "1 PDQ hash, PDQ threshold 31 (default)" in text and "banks: KNOWN, MISSING" in text
    assert "'MISSING' is not a bank in Redis" in text and "'KNOWN' is not" not in text
    out = io.StringIO()
    rules_check(path, out=out, known_banks=lambda: "Redis unreachable")
    assert "banks not checked: Redis unreachable" in out.getvalue()
    bad = tmp_path / "bad.json"
    bad.write_text('[{"label": "a", "banks": ["lower"], "pdqHashes": ["abc"], "pdqThreshold": -1}]')
    out = io.StringIO()
    assert rules_check(bad, out=out) == 1
    assert "pdqHashes[0]: 'abc' is not a PDQ hash (64 hex digits)" in out.getvalue()
    assert "banks[0]: 'lower' is not a bank name" in out.getvalue()
    assert "pdqThreshold: must be >= 0, got -1" in out.getvalue()


@pytest.mark.e2e
async def test_bank_updated_while_the_service_runs_matches_the_next_post(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """phash-trio run with a rule naming an empty bank: a first post is not matched; the
    image's PDQ is imported into the bank while the service runs; the next post with it is
    labelled, with bank, content id and signal type in modTool.meta."""
    images = demo_images()
    coffee = images["coffee.jpg"]
    rules = tmp_path / "rules.json"
    rules.write_text('[{"label": "bank-hit", "banks": ["LIVE_BANK"], "toLabel": true}]')
    store = BankStore(redis.Redis.from_url(redis_proc.url, decode_responses=True))
    store.set_bank("LIVE_BANK")
    first = make_post(fake_did("alice"), "3lfirst22222x", 1_000, image_cids=[cid_for(coffee)])
    async with harness(redis_proc.url, tmp_path, [first], images=images) as h:
        service = await h.start(RULES_FILE=str(rules), BANKS_POLL_SECS="0.1")
        await service.wait_for(
            h.client, lambda m: m.get("phash_jobs_processed_total", 0) == 1, within=GUARD
        )
        assert h.net.ozone.events == []
        pdq = compute_signals(coffee).pdq
        assert pdq is not None
        store.put("LIVE_BANK", [BankEntry.make("pdq", pdq.hex, "case-7", note="test")])
        await service.wait_for(
            h.client,
            lambda m: m.get("phash_bank_changes_applied_total", 0) >= 1,
            within=GUARD,
        )
        second = make_post(fake_did("bob"), "3lsecond2222x", 2_000, image_cids=[cid_for(coffee)])
        host_blobs(h.net, [second], images)
        h.net.replay.append([second])
        await service.wait_for(
            h.client, lambda m: m.get("phash_posts_labeled_total", 0) == 1, within=GUARD
        )
        assert await h.stop(service) == 0, service.log_tail()
    (event,) = h.net.ozone.events
    assert event["subject"]["uri"].endswith("3lsecond2222x")
    meta = event["modTool"]["meta"]
    assert (meta["bank"], meta["contentId"], meta["signalType"]) == ("LIVE_BANK", "case-7", "pdq")
    assert (meta["matchedHash"], meta["distance"]) == (pdq.hex, 0)
    assert "banks loaded (start)" in service.log_path.read_text()
    store.close()
