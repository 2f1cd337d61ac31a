"""``POST /api/v1/check``: every hash, every match and the rules' decision; ``act=true`` files
the Ozone events with the firehose path's claims and externalIds (fake Ozone over HTTP)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio

from phash_trio.api.check import blob_cid
from phash_trio.image.signals import compute_signals
from phash_trio.net.atproto.blobs import BlobFetcher
from phash_trio.net.atproto.identity import PdsResolver
from phash_trio.net.breaker import CircuitBreaker
from phash_trio.net.ozone.client import OzoneClient
from phash_trio.net.ozone.events import ActionKind, externalid
from phash_trio.pipeline.actions import Actions, RateSpacer
from phash_trio.pipeline.jobs import BlobRef, ImageJob
from phash_trio.rules.banks import BankEntry
from phash_trio.rules.index import RuleIndex
from phash_trio.rules.matcher import BlobMatcher
from phash_trio.rules.model import parse_rules
from phash_trio.runtime.metrics import Metrics
from phash_trio.state.store import RedisStore
from phash_trio.testing.blobhost import BlobHost, PlcDirectory, cid_for
from phash_trio.testing.fake_ozone import FakeOzone, run_fake_ozone
from phash_trio.testing.redis_server import RedisProcess
from tests.apikit import open_api, photo
from tests.test_api_hma import flip

DID = "did:plc:z72i7hdynmk6r22z27h6tvur"
POST_CID = "bafyreia3tbsfxe3cc75xrxyyn6qc42oupi73fxiox76prlyi5bpb4ihhtq"
URI = f"at://{DID}/app.bsky.feed.post/3kabcdefghi2x"
HOPPER = "hopper_582x547_q65_422_base.jpg"
COFFEE = "coffee_397x265_q66_420_base_opt.jpg"


def rules_for(hopper_pdq: str) -> RuleIndex:
    """Rule 0 lists hopper's PDQ 4 bits off; rule 1 acts on the CHECK_BANK bank."""
    ruleset = parse_rules(
        [
            {"label": "pdq-rule", "pdqHashes": [flip(hopper_pdq, 4)], "toLabel": True},
            {"label": "bank-rule", "banks": ["CHECK_BANK"], "reportPost": True},
        ]
    )
    return RuleIndex(ruleset, 3)


def test_blob_cid_is_the_network_cid() -> None:
    """The CID we give uploaded bytes is the one a PDS gives the same blob."""
    data = photo()
    assert blob_cid(data) == cid_for(data)


async def test_check_reports_hashes_matches_and_decision(
    redis_proc: RedisProcess, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Raw body, multipart and a did+cid blob reference give the same hashes; the decision is
    the first rule; bank hits are listed with their content id."""
    hopper, coffee = photo(HOPPER), photo(COFFEE)
    hs, cs = compute_signals(hopper), compute_signals(coffee)
    assert hs.pdq is not None and cs.md5 is not None
    host: BlobHost = await nursery.start(BlobHost.run)
    cid = host.add_image(DID, hopper)
    plc: PlcDirectory = await nursery.start(PlcDirectory.run)
    plc.add(DID, host.url)
    metrics = Metrics()
    async with httpx.AsyncClient(timeout=10) as http:
        fetcher = BlobFetcher(
            http,
            cdn_url=host.url,
            resolver=PdsResolver(http, plc_endpoint=plc.url, allow_private_networks=True),
            metrics=metrics,
            allow_private_networks=True,
        )
        rules = rules_for(hs.pdq.hex)
        async with open_api(redis_proc.url, tmp_path, rules=rules, blobs=fetcher) as api:
            api.banks.set_bank("CHECK_BANK")
            api.banks.put("CHECK_BANK", [BankEntry.make("md5", cs.md5, "case-9")])
            api.banks.set_bank("UNROUTED")
            api.banks.put("UNROUTED", [BankEntry.make("pdq", flip(hs.pdq.hex, 2), "u-1")])
            await api.synced()
            async with api.client() as client:
                raw = await client.post(
                    "/api/v1/check", content=hopper, headers={"content-type": "image/jpeg"}
                )
                form = await client.post("/api/v1/check", files={"image": ("h.jpg", hopper)})
                by_ref = await client.post("/api/v1/check", json={"did": DID, "cid": cid})
                banked = await client.post("/api/v1/check", files={"image": ("c.jpg", coffee)})
                missing = await client.post(
                    "/api/v1/check", json={"did": DID, "cid": cid_for(b"nothing")}
                )
                nothing = await client.post("/api/v1/check", json={})
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert body["hashes"] == {
        "pdq": hs.pdq.hex,
        "pdq_quality": hs.pdq.quality,
        "phash": f"{hs.mean:016x}",
        "md5": hs.md5,
        "sha256": hs.sha256,
    }
    assert body["cid"] == cid
    assert body["decision"] == {
        "source": "rule",
        "rule": 0,
        "label": "pdq-rule",
        "signal_type": "pdq",
        "distance": 4,
        "hash": flip(hs.pdq.hex, 4),
        "bank": None,
        "content_id": None,
        "actions": ["label_post"],
    }
    assert body["matches"] == [
        {
            "source": "rule",
            "rule": 0,
            "label": "pdq-rule",
            "signal_type": "pdq",
            "distance": 4,
            "hash": flip(hs.pdq.hex, 4),
            "bank": None,
            "content_id": None,
        },
        {
            "source": "bank",
            "rule": None,
            "label": None,
            "signal_type": "pdq",
            "distance": 2,
            "hash": flip(hs.pdq.hex, 2),
            "bank": "UNROUTED",
            "content_id": "u-1",
        },
    ]
    assert body["acted"] is None
    assert form.json() == body and by_ref.json() == body
    coffee_body = banked.json()
    assert coffee_body["decision"]["label"] == "bank-rule"
    assert coffee_body["decision"]["bank"] == "CHECK_BANK"
    assert coffee_body["decision"]["content_id"] == "case-9"
    assert coffee_body["decision"]["signal_type"] == "md5"
    assert [m["content_id"] for m in coffee_body["matches"]] == ["case-9"]
    assert missing.status_code == 404 and missing.json() == {
        "success": False,
        "error": "blob not found",
    }
    assert nothing.status_code == 400


async def test_act_files_the_firehose_events_once(
    redis_proc: RedisProcess, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """act=true sends the rule's event with the firehose's externalId; the firehose path's own
    Actions (another process's claim marker) then skips the post, and a second check too."""
    fake = FakeOzone()
    await nursery.start(run_fake_ozone, fake)
    hopper = photo(HOPPER)
    hs = compute_signals(hopper)
    assert hs.pdq is not None
    metrics = Metrics()
    store = RedisStore(redis_proc.url, metrics)

    def actions(http: httpx.AsyncClient) -> Actions:
        ozone = OzoneClient(
            http,
            pds_url=fake.url,
            handle=fake.handle,
            password=fake.password,
            labeler_did=fake.labeler_did,
            breaker=CircuitBreaker("ozone", failure_threshold=100, reset_timeout=60.0),
            session_file=tmp_path / "session.json",
            metrics=metrics,
            backoff_initial=0.01,
            request_timeout=10.0,
        )
        return Actions(
            store=store,
            ozone=ozone,
            metrics=metrics,
            labeler_did=fake.labeler_did,
            default_daily_cap=100,
            spacer=RateSpacer(0),
        )

    rules = rules_for(hs.pdq.hex)
    try:
        async with (
            httpx.AsyncClient(timeout=10) as http,
            open_api(redis_proc.url, tmp_path, rules=rules, actions=actions(http)) as api,
            api.client() as client,
        ):
            incomplete = await client.post(
                "/api/v1/check", files={"image": ("h.jpg", hopper)}, data={"act": "true"}
            )
            fields = {"act": "true", "uri": URI, "post_cid": POST_CID}
            first = await client.post(
                "/api/v1/check", files={"image": ("h.jpg", hopper)}, data=fields
            )
            second = await client.post(
                "/api/v1/check", files={"image": ("h.jpg", hopper)}, data=fields
            )
            # The post now reaches the firehose: the worker's Actions decide it again.
            match = await BlobMatcher(rules).match(hs, DID)
            assert match is not None
            job = ImageJob(DID, "3kabcdefghi2x", POST_CID, 1, (BlobRef(blob_cid(hopper)),))
            await actions(http).apply(job, job.blobs[0], match)
    finally:
        store.close()
    assert incomplete.status_code == 400 and "uri and post_cid" in incomplete.json()["error"]
    assert first.status_code == 200, first.text
    assert first.json()["acted"] == {"uri": URI, "actions": ["label_post"]}
    assert second.status_code == 200
    assert len(fake.events) == 1
    event = fake.events[0]
    assert event["subject"]["uri"] == URI and event["subject"]["cid"] == POST_CID
    assert event["externalId"] == externalid(ActionKind.LABEL_POST, URI, "pdq-rule", 0)
    assert event["subjectBlobCids"] == [blob_cid(hopper)]
    assert metrics.snapshot()["actions_skipped[reason=already_done]"] == 2
    assert json.dumps(event).count("pdq-rule") >= 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"act": "true", "uri": "at://did:plc:x/app.bsky.feed.like/1", "post_cid": POST_CID},
            "uri",
        ),
        ({"act": "true", "uri": URI, "post_cid": "not-a-cid"}, "post_cid"),
    ],
)
async def test_act_validates_identifiers(
    redis_proc: RedisProcess, tmp_path: Path, fields: dict[str, str], message: str
) -> None:
    """A malformed uri or post CID is refused before anything is built from it."""
    hopper = photo(HOPPER)
    hs = compute_signals(hopper)
    assert hs.pdq is not None
    rules = rules_for(hs.pdq.hex)
    async with open_api(redis_proc.url, tmp_path, rules=rules) as api, api.client() as client:
        response = await client.post(
            "/api/v1/check", files={"image": ("h.jpg", hopper)}, data=fields
        )
    assert response.status_code == 400 and message in response.json()["error"]
