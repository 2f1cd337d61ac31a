"""The ATproto-HMA bridge's routes as its PerchPics client calls them: multipart ``image`` with
``Authorization: Bearer``, then ``/api/v1/hash``'s JSON answer posted to ``/api/v1/match``."""

from __future__ import annotations

from pathlib import Path

import pytest

from phash_trio.image.signals import compute_signals
from phash_trio.rules.banks import BankEntry
from phash_trio.testing.redis_server import RedisProcess
from tests.apikit import Api, open_api, photo
from tests.test_api_hma import flip


@pytest.fixture
async def api(redis_proc: RedisProcess, tmp_path: Path) -> Api:  # type: ignore[misc]
    async with open_api(redis_proc.url, tmp_path) as handle:
        yield handle


def bearer(api: Api) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.keys['check']}"}


async def test_perchpics_hash_then_match(api: Api) -> None:
    """hashImage (multipart ``image``, Bearer) then matchHash (its JSON answer) find the bank
    entry with its real content id, the matched hash and a numeric distance."""
    data = photo()
    pdq = compute_signals(data).pdq
    assert pdq is not None
    near = flip(pdq.hex, 6)
    api.banks.set_bank("PERCH_BANK")
    api.banks.put(
        "PERCH_BANK", [BankEntry.make("pdq", near, "perch-17", metadata={"source": "test"})]
    )
    await api.synced()
    async with api.client(None, headers=bearer(api)) as client:
        hashed = await client.post("/api/v1/hash", files={"image": ("up.jpg", data, "image/jpeg")})
        matched = await client.post("/api/v1/match", json=hashed.json())
        form = await client.post(
            "/api/v1/match",
            files={"image": ("up.jpg", data, "image/jpeg")},
            data={"threshold": "5", "author_did": "did:plc:abc", "photo_id": "p1"},
        )
    assert hashed.status_code == 200
    body = hashed.json()
    assert body["success"] is True and body["hash"] == pdq.hex and body["matches"] == []
    assert body["hashes"]["pdq"] == pdq.hex and body["quality"] == pdq.quality
    assert matched.status_code == 200
    assert matched.json()["matches"] == [
        {
            "bank": "PERCH_BANK",
            "content_id": "perch-17",
            "distance": 6,
            "hash": near,
            "signal_type": "pdq",
            "metadata": {"source": "test"},
        }
    ]
    assert form.status_code == 200
    assert form.json()["matches"] == []  # 6 bits away, threshold 5
    assert form.json()["photo_id"] == "p1" and form.json()["threshold"] == 5


async def test_bridge_errors(api: Api) -> None:
    """No image is 400, a bad hash is 400, no key is 401, all as ``{"success": false}``."""
    async with api.client() as client, api.client(None) as anonymous:
        no_image = await client.post("/api/v1/match", data={"threshold": "3"})
        no_hash_image = await client.post("/api/v1/hash", json={})
        bad_hash = await client.post("/api/v1/match", json={"hash": "zz"})
        bad_threshold = await client.post(
            "/api/v1/match", json={"hash": "0" * 64, "threshold": "many"}
        )
        broken = await client.post("/api/v1/hash", files={"image": ("x.png", b"\x89PNG\r\n")})
        no_key = await anonymous.post("/api/v1/hash", files={"image": ("a.jpg", photo())})
        health = await anonymous.get("/health")
    assert no_image.status_code == 400 and no_image.json()["success"] is False
    assert "No image provided" in no_image.json()["error"]
    assert no_hash_image.status_code == 400
    assert bad_hash.status_code == 400 and "not a PDQ hash" in bad_hash.json()["error"]
    assert bad_threshold.status_code == 400
    assert broken.status_code == 400 and broken.json()["success"] is False
    assert no_key.status_code == 401 and no_key.json()["success"] is False
    assert health.status_code == 200 and health.json()["status"] == "healthy"


async def test_base64_image_data_as_the_old_bridge_sent_it(api: Api) -> None:
    """JSON ``image_data`` (base64), the bridge's first client shape, hashes the same."""
    import base64

    data = photo()
    pdq = compute_signals(data).pdq
    assert pdq is not None
    async with api.client() as client:
        hashed = await client.post(
            "/api/v1/hash", json={"image_data": base64.b64encode(data).decode()}
        )
    assert hashed.json()["hash"] == pdq.hex
