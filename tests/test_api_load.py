"""The API under load and at its limits: 200 concurrent clients, the hashing cap (503 +
Retry-After), the per-key rate (429 + Retry-After), the OpenAPI document, and keys never in logs."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio
from starlette.routing import Route

from phash_trio.api.auth import RateLimit
from phash_trio.api.openapi import OPERATIONS
from phash_trio.image.signals import compute_signals
from phash_trio.rules.banks import BankEntry
from phash_trio.testing.redis_server import RedisProcess
from tests.apikit import open_api, photo, photos


def small(data: bytes) -> bytes:
    """The photo scaled to 160 pixels wide, as JPEG."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im.thumbnail((160, 160))
        out = io.BytesIO()
        im.save(out, "JPEG", quality=90)
    return out.getvalue()


async def test_200_concurrent_clients_get_no_errors(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """200 clients at once (200 connections), uploading a real photo (scaled down:
    this is about concurrency, the bench measures hashing) to /api/v1/match: every one gets
    200 and the right match."""
    images = [small(p) for p in photos()]
    pdq = compute_signals(images[0]).pdq
    assert pdq is not None
    statuses: list[int] = []
    matched: list[bool] = []
    async with open_api(redis_proc.url, tmp_path, hash_limit=256) as api:
        api.banks.set_bank("LOAD")
        api.banks.put("LOAD", [BankEntry.make("pdq", pdq.hex, "first")])
        await api.synced()

        async def one(client: httpx.AsyncClient, i: int) -> None:
            data = images[i % len(images)]
            response = await client.post(
                "/api/v1/match", files={"image": ("p.jpg", data, "image/jpeg")}
            )
            statuses.append(response.status_code)
            if i % len(images) == 0:
                matched.append(response.json()["matches"][0]["content_id"] == "first")

        with trio.fail_after(120):
            async with api.client(connections=200) as client, trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(one, client, i)
            async with api.client() as client:  # and the server still serves after the burst
                assert (await client.get("/health")).status_code == 200
    assert statuses == [200] * 200
    assert matched and all(matched)


async def test_hashing_cap_answers_503_with_retry_after(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """With two hashing slots, 40 simultaneous uploads get 200 or 503 + Retry-After, nothing
    else, and every refusal is counted."""
    data = photo()
    answers: list[httpx.Response] = []
    async with open_api(redis_proc.url, tmp_path, hash_limit=2) as api:

        async def one() -> None:
            async with api.client() as client:
                answers.append(await client.post("/h/hash", files={"photo": ("p.jpg", data)}))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(40):
                    nursery.start_soon(one)
        refused = api.ctx.gate.refused
    codes = sorted({r.status_code for r in answers})
    busy = [r for r in answers if r.status_code == 503]
    assert codes == [200, 503], codes
    assert len(busy) == refused
    assert all(r.headers["retry-after"] == "1" for r in busy)
    assert all("hashing slots are busy" in r.json()["message"] for r in busy)
    assert api.metrics.registry.get_sample_value("phash_api_errors_total", {"status": "503"}) == (
        len(busy)
    )


async def test_rate_limit_per_key(redis_proc: RedisProcess, tmp_path: Path) -> None:
    """Over its burst a key gets 429 with Retry-After; another key is not affected."""
    rate = RateLimit(per_sec=0.2, burst=3)
    async with (
        open_api(redis_proc.url, tmp_path, rate=rate) as api,
        api.client() as checker,
        api.client("curate") as curator,
    ):
        codes = [(await checker.get("/m/index/status")).status_code for _ in range(4)]
        limited = await checker.post("/api/v1/match", json={"hash": "0" * 64})
        other = await curator.get("/m/index/status")
    assert codes == [200, 200, 200, 429]
    assert limited.status_code == 429 and limited.headers["retry-after"] == "5"
    assert limited.json()["success"] is False and "requests/s" in limited.json()["error"]
    assert other.status_code == 200


async def test_openapi_lists_every_route(redis_proc: RedisProcess, tmp_path: Path) -> None:
    """Every API route of the app is in /openapi.json with its methods, and nothing else is."""
    async with open_api(redis_proc.url, tmp_path) as api, api.client(None) as client:
        document = (await client.get("/openapi.json")).json()
        from phash_trio.api.bridge import bridge_routes
        from phash_trio.api.check import check_routes
        from phash_trio.api.hma import hma_routes
        from phash_trio.api.openapi import openapi_routes

        served = set()
        for route in [*hma_routes(), *bridge_routes(), *check_routes(), *openapi_routes()]:
            assert isinstance(route, Route)
            path = route.path.replace("{content_id:int}", "{content_id}")
            for method in route.methods or ():
                if method != "HEAD":
                    served.add((method.lower(), path))
    documented = {(m, p) for p, ops in document["paths"].items() for m in ops}
    assert documented == served == {(m, p) for m, p, *_ in OPERATIONS}
    assert document["components"]["securitySchemes"]["apiKey"]["name"] == "X-API-Key"


async def test_keys_and_images_never_reach_the_log(
    redis_proc: RedisProcess, tmp_path: Path, log_lines: list[str]
) -> None:
    """Calls with good and bad keys and a broken image log neither the keys nor the bytes."""
    secret_image = b"\xff\xd8\xffSECRET-PIXELS" + b"\0" * 64
    async with open_api(redis_proc.url, tmp_path) as api:
        async with api.client() as client:
            await client.post("/h/hash", files={"photo": ("x.jpg", secret_image)})
            await client.post(
                "/api/v1/check", content=secret_image, headers={"content-type": "image/jpeg"}
            )
        async with api.client(None, {"X-API-Key": "pt_not-a-real-key-1234"}) as bad:
            await bad.get("/m/index/status")
        keys = list(api.keys.values())
    text = "\n".join(log_lines)
    assert "SECRET-PIXELS" not in text
    assert "pt_not-a-real-key-1234" not in text
    assert not any(key in text for key in keys)
