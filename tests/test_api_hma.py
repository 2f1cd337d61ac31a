"""HMA 2.0's routes over real HTTP (hypercorn on loopback, real Redis), with the request shapes
HMA's own clients send: multipart field ``photo``, query parameters, JSON bodies."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from phash_trio.api import serve_app
from phash_trio.image.signals import compute_signals
from phash_trio.testing.redis_server import RedisProcess
from tests.apikit import Api, open_api, photo


def flip(hex_: str, bits: int) -> str:
    """``hex_`` with its ``bits`` lowest bits inverted."""
    return (int(hex_, 16) ^ ((1 << bits) - 1)).to_bytes(len(hex_) // 2, "big").hex()


@pytest.fixture
async def api(redis_proc: RedisProcess, tmp_path: Path) -> Api:  # type: ignore[misc]
    async with open_api(redis_proc.url, tmp_path) as handle:
        yield handle


async def exchange(url: str, data: bytes) -> bytes:
    """Send raw bytes to the server at ``url`` and return the answer's head (httpx leaves its
    request stream unclosed when a server answers early, which pytest reports as an error)."""
    port = int(url.rsplit(":", 1)[1])
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        answer = b""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    try:
                        await stream.send_all(data)
                    except trio.BrokenResourceError:
                        pass

                nursery.start_soon(send)
                while True:
                    try:
                        chunk = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        break
                    answer += chunk
                    if not chunk or b"\r\n\r\n" in answer:
                        break  # the status and head are enough (the client may still be sending)
                nursery.cancel_scope.cancel()
    return answer


async def image_host(nursery: trio.Nursery, images: dict[str, tuple[bytes, str]]) -> str:
    """A real HTTP server on loopback serving ``path -> (body, content type)``."""

    async def serve(request: Request) -> Response:
        body, kind = images.get(request.url.path, (b"", ""))
        if not kind:
            return Response(status_code=404)
        return Response(body, media_type=kind)

    app = Starlette(routes=[Route("/{path:path}", serve)])
    server = await nursery.start(serve_app, app, "127.0.0.1:0")
    return str(server.url)


async def test_hash_upload_and_url(api: Api, nursery: trio.Nursery) -> None:
    """POST /h/hash (field ``photo``) and GET /h/hash?url= give ``{"pdq": hex}`` equal to our
    PDQ of the same bytes."""
    data = photo()
    expected = compute_signals(data).pdq
    assert expected is not None and expected.quality >= 50
    host = await image_host(nursery, {"/a.jpg": (data, "image/jpeg"), "/t": (b"x", "text/html")})
    async with api.client() as client:
        posted = await client.post("/h/hash", files={"photo": ("a.jpg", data, "image/jpeg")})
        fetched = await client.get("/h/hash", params={"url": host + "/a.jpg"})
        not_image = await client.get("/h/hash", params={"url": host + "/t"})
        missing = await client.get("/h/hash", params={"url": host + "/nope.jpg"})
        video = await client.post("/h/hash", files={"video": ("a.mp4", data, "video/mp4")})
        two = await client.post(
            "/h/hash", files=[("photo", ("a", data, "image/jpeg")), ("photo", ("b", data))]
        )
    assert posted.status_code == 200 and posted.json() == {"pdq": expected.hex}
    assert fetched.status_code == 200 and fetched.json() == {"pdq": expected.hex}
    assert (
        not_image.status_code == 400
        and "unsupported url ContentType" in not_image.json()["message"]
    )
    assert missing.status_code == 400 and "HTTP 404" in missing.json()["message"]
    assert video.status_code == 400 and video.json() == {"message": "no such content_type: 'video'"}
    assert two.status_code == 400 and two.json() == {"message": "Only one file allowed per request"}


async def test_low_quality_image_hashes_to_empty_string(api: Api) -> None:
    """A flat image (PDQ quality below 50) gets ``{"pdq": ""}``, as HMA answers."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 120, 120)).save(buf, "PNG")
    async with api.client() as client:
        response = await client.post("/h/hash", files={"photo": ("flat.png", buf.getvalue())})
    assert response.status_code == 200 and response.json() == {"pdq": ""}


async def test_url_to_a_private_address_is_refused(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """Without ALLOW_PRIVATE_NETWORKS a URL on loopback is refused before any connection."""
    async with open_api(redis_proc.url, tmp_path, allow_private=False) as api, api.client() as c:
        loopback = await c.get("/h/hash", params={"url": "http://127.0.0.1:9/a.jpg"})
        https_loop = await c.get("/h/hash", params={"url": "https://127.0.0.1/a.jpg"})
        named = await c.get("/m/lookup", params={"url": "https://localhost/a.jpg"})
    assert loopback.status_code == 400 and "url refused" in loopback.json()["message"]
    assert https_loop.status_code == 400 and "non-public" in https_loop.json()["message"]
    assert named.status_code == 400 and "url refused" in named.json()["message"]


async def test_curation_and_matching_round_trip(api: Api) -> None:
    """Create a bank, add a photo, look it up every way HMA offers, disable, delete."""
    data = photo()
    signals = compute_signals(data)
    assert signals.pdq is not None
    pdq = signals.pdq.hex
    async with api.client("curate") as client:
        created = await client.post("/c/banks", json={"name": "TEST_BANK"})
        again = await client.post("/c/banks", json={"name": "TEST_BANK"})
        bad_name = await client.post("/c/banks", json={"name": "lower"})
        other = await client.post("/c/banks", json={"name": "OTHER", "enabled": False})
        listed = await client.get("/c/banks")
        added = await client.post(
            "/c/bank/TEST_BANK/content",
            files={"photo": ("a.jpg", data, "image/jpeg")},
            data={"metadata": '{"content_id": "ext-1"}'},
        )
        signal = await client.post("/c/bank/OTHER/signal", json={"pdq": flip(pdq, 3)})
        await api.synced()
        lookup = await client.get("/m/lookup", params={"signal_type": "pdq", "signal": pdq})
        near = await client.get("/m/lookup", params={"signal_type": "pdq", "signal": flip(pdq, 5)})
        raw = await client.get("/m/raw_lookup", params={"signal_type": "pdq", "signal": pdq})
        raw_d = await client.get(
            "/m/raw_lookup",
            params={"signal_type": "pdq", "signal": pdq, "include_distance": "true"},
        )
        posted = await client.post("/m/lookup", files={"photo": ("a.jpg", data, "image/jpeg")})
        md5 = await client.get("/m/lookup", params={"signal_type": "md5", "signal": signals.md5})
        content = await client.get(
            "/c/bank/TEST_BANK/content/1", params={"include_signals": "true"}
        )
        status = await client.get("/m/index/status")
    assert created.status_code == 201
    assert created.json() == {"name": "TEST_BANK", "matching_enabled_ratio": 1.0}
    assert again.status_code == 403 and again.json() == {"message": "Bank already exists"}
    assert bad_name.status_code == 400 and "bank name" in bad_name.json()["message"]
    assert other.status_code == 201 and other.json()["matching_enabled_ratio"] == 0.0
    assert listed.json() == [
        {"name": "OTHER", "matching_enabled_ratio": 0.0},
        {"name": "TEST_BANK", "matching_enabled_ratio": 1.0},
    ]
    assert added.status_code == 201
    assert added.json() == {
        "id": 1,
        "signals": {"pdq": pdq, "md5": signals.md5, "sha256": signals.sha256},
    }
    assert signal.status_code == 201 and signal.json()["id"] == 2
    # OTHER is disabled: its near hash does not show up.
    assert lookup.json() == {"TEST_BANK": [{"bank_content_id": 1, "distance": "0"}]}
    assert near.json() == {"TEST_BANK": [{"bank_content_id": 1, "distance": "5"}]}
    assert raw.json() == {"matches": [1]}
    assert raw_d.json() == {"matches": [{"bank_content_id": 1, "distance": "0"}]}
    assert posted.json() == {"pdq": {"TEST_BANK": [{"bank_content_id": 1, "distance": "0"}]}}
    assert md5.json() == {"TEST_BANK": [{"bank_content_id": 1, "distance": "0"}]}
    assert content.status_code == 200
    body = content.json()
    assert body["id"] == 1 and body["disable_until_ts"] == 0
    assert body["bank"] == {"name": "TEST_BANK", "matching_enabled_ratio": 1.0}
    assert body["signals"] == {"pdq": pdq, "md5": signals.md5, "sha256": signals.sha256}
    assert status.json()["pdq"] == {"present": True, "built_to": api.sync.index.seq, "size": 2}  # type: ignore[union-attr]

    async with api.client("curate") as client:
        enable = await client.put("/c/bank/OTHER", json={"enabled_ratio": 1})
        until = int(time.time()) + 3600
        disabled = await client.put("/c/bank/TEST_BANK/content/1", json={"disable_until_ts": until})
        await api.synced()
        after = await client.get("/m/lookup", params={"signal_type": "pdq", "signal": pdq})
        restored = await client.put("/c/bank/TEST_BANK/content/1", json={"disable_until_ts": 0})
        await api.synced()
        back = await client.get("/m/lookup", params={"signal_type": "pdq", "signal": pdq})
        deleted = await client.delete("/c/bank/TEST_BANK/content/1")
        gone = await client.get("/c/bank/TEST_BANK/content/1")
        dropped = await client.delete("/c/bank/OTHER")
        await api.synced()
        final = await client.get("/m/lookup", params={"signal_type": "pdq", "signal": pdq})
        no_bank = await client.get("/c/bank/OTHER")
    assert enable.json() == {"name": "OTHER", "matching_enabled_ratio": 1.0}
    assert disabled.status_code == 200 and disabled.json()["disable_until_ts"] == until
    assert after.json() == {"OTHER": [{"bank_content_id": 2, "distance": "3"}]}
    assert restored.json()["disable_until_ts"] == 0
    assert back.json() == {
        "OTHER": [{"bank_content_id": 2, "distance": "3"}],
        "TEST_BANK": [{"bank_content_id": 1, "distance": "0"}],
    } or back.json() == {
        "TEST_BANK": [{"bank_content_id": 1, "distance": "0"}],
        "OTHER": [{"bank_content_id": 2, "distance": "3"}],
    }
    assert deleted.json() == {"deleted": 3}
    assert gone.status_code == 404 and gone.json() == {"message": "content '1' not found"}
    assert dropped.json() == {"message": "Done"}
    assert final.json() == {}
    assert no_bank.status_code == 404


async def test_banks_filter_and_url_lookup(api: Api, nursery: trio.Nursery) -> None:
    """``banks=A,B`` restricts a lookup; ``?url=`` answers keyed by signal type, elided when
    ``signal_type`` is given."""
    data = photo()
    pdq = compute_signals(data).pdq
    assert pdq is not None
    host = await image_host(nursery, {"/p.jpg": (data, "image/jpeg")})
    async with api.client("curate") as client:
        for name in ("A_BANK", "B_BANK"):
            await client.post("/c/banks", json={"name": name})
            await client.post(f"/c/bank/{name}/signal", json={"pdq": pdq.hex})
        await api.synced()
        only_b = await client.get(
            "/m/lookup", params={"signal_type": "pdq", "signal": pdq.hex, "banks": "B_BANK"}
        )
        by_url = await client.get("/m/lookup", params={"url": host + "/p.jpg", "banks": "A_BANK"})
        elided = await client.get(
            "/m/lookup", params={"url": host + "/p.jpg", "signal_type": "pdq"}
        )
        raw_b = await client.get(
            "/m/raw_lookup", params={"signal_type": "pdq", "signal": pdq.hex, "banks": "B_BANK"}
        )
    assert only_b.json() == {"B_BANK": [{"bank_content_id": 2, "distance": "0"}]}
    assert by_url.json() == {"pdq": {"A_BANK": [{"bank_content_id": 1, "distance": "0"}]}}
    assert set(elided.json()) == {"A_BANK", "B_BANK"}
    assert raw_b.json() == {"matches": [2]}


async def test_compare_and_status(api: Api) -> None:
    """/m/compare answers ``[match, {"distance": n}]`` per signal type; /status says
    I-AM-ALIVE once the index is loaded."""
    a = "f" * 64
    async with api.client() as client:
        compared = await client.post("/m/compare", json={"pdq": [a, flip(a, 9)]})
        far = await client.post("/m/compare", json={"pdq": [a, flip(a, 40)]})
        short = await client.post("/m/compare", json={"pdq": [a]})
        not_dict = await client.post("/m/compare", json=["pdq"])
        status = await client.get("/status")
        live = await client.get("/status/live")
    assert compared.json() == {"pdq": [True, {"distance": 9}]}
    assert far.json() == {"pdq": [False, {"distance": 40}]}
    assert short.status_code == 400
    assert short.json() == {"message": "Comparison hash list length must be exactly 2"}
    assert not_dict.status_code == 400 and not_dict.json() == {
        "message": "Request input was not a dict"
    }
    assert (status.status_code, status.text) == (200, "I-AM-ALIVE")
    assert (live.status_code, live.text) == (200, "I-AM-ALIVE")


async def test_errors_are_json_with_the_right_status(api: Api) -> None:
    """Bad hash, unknown type, missing parameters, broken image, no key, wrong scope, unknown
    bank, oversized body: each gets its status and an HMA ``{"message"}``."""
    async with api.client() as client, api.client(None) as anonymous:
        bad_hash = await client.get("/m/lookup", params={"signal_type": "pdq", "signal": "abc"})
        bad_type = await client.get(
            "/m/raw_lookup", params={"signal_type": "video_md5", "signal": "ab" * 16}
        )
        missing = await client.get("/m/raw_lookup", params={"signal_type": "pdq"})
        neither = await client.get("/m/lookup")
        broken = await client.post(
            "/h/hash", files={"photo": ("x.jpg", b"\xff\xd8\xff" + b"\0" * 100, "image/jpeg")}
        )
        no_file = await client.post("/h/hash", data={"a": "b"})
        no_key = await anonymous.get("/m/index/status")
        bad_key = await anonymous.get("/m/index/status", headers={"X-API-Key": "nope"})
        wrong_scope = await client.get("/c/banks")
        no_bank = await client.get("/m/index/status", params={"signal_type": "nope"})
        unknown = await client.get("/m/nothing")
    async with api.client("curate") as client:
        unknown_bank = await client.get("/c/bank/NOPE")
        add_to_unknown = await client.post("/c/bank/NOPE/signal", json={"pdq": "0" * 64})
    assert bad_hash.status_code == 400 and bad_hash.json()["message"].startswith("invalid signal")
    assert bad_type.status_code == 400
    assert bad_type.json() == {"message": "No such SignalType 'video_md5'"}
    assert missing.status_code == 400 and missing.json() == {"message": "signal is required"}
    assert neither.status_code == 400
    assert broken.status_code == 400 and "could not be hashed" in broken.json()["message"]
    assert no_file.status_code == 400
    assert no_file.json() == {"message": "Missing multipart/form-data file upload"}
    assert no_key.status_code == 401 and "API key is required" in no_key.json()["message"]
    assert bad_key.status_code == 401 and bad_key.json() == {"message": "the API key is not valid"}
    assert wrong_scope.status_code == 403 and "'curate'" in wrong_scope.json()["message"]
    assert no_bank.status_code == 400
    assert unknown.status_code == 404 and unknown.json() == {"message": "Not Found"}
    assert unknown_bank.status_code == 404
    assert unknown_bank.json() == {"message": "bank 'NOPE' not found"}
    assert add_to_unknown.status_code == 404


async def test_bearer_token_and_metrics_stay_open(api: Api) -> None:
    """``Authorization: Bearer`` works like X-API-Key; /metrics and /status need no key."""
    async with httpx.AsyncClient(base_url=api.url) as client:
        bearer = await client.get(
            "/m/index/status", headers={"Authorization": f"Bearer {api.keys['check']}"}
        )
        metrics = await client.get("/metrics")
        status = await client.get("/status")
    assert bearer.status_code == 200 and "pdq" in bearer.json()
    assert metrics.status_code == 200 and status.status_code == 200


async def test_oversized_bodies_are_refused(api: Api) -> None:
    """A declared body over the cap is 413 unread; a chunked one is cut off at the cap."""
    key = api.keys["check"]
    head = (
        f"POST /h/hash HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n"
        "Content-Type: multipart/form-data; boundary=XyZ\r\n"
    )
    declared = await exchange(api.url, (head + "Content-Length: 9000000\r\n\r\n").encode())
    chunk = b"\0" * 65536
    part = b'--XyZ\r\nContent-Disposition: form-data; name="photo"; filename="f"\r\n\r\n'
    chunks = [part, *[chunk] * 60]
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    chunked = await exchange(api.url, (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + body)
    assert declared.startswith(b"HTTP/1.1 413"), declared[:100]
    assert chunked.startswith(b"HTTP/1.1 413"), chunked[:100]
    async with api.client() as client:  # and the server still answers
        assert (await client.get("/m/index/status")).status_code == 200
