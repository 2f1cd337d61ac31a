"""The log, events, session and webhook routes over real HTTP on loopback, with real keys and
a real redis-server: auth and scopes, the bridge's log shape, SSE resume by id (after a
disconnect, after a restart, out of retention), filters, and a slow client being cut."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import redis
import trio

from phash_trio.api.server import ServerLimits
from phash_trio.state.decisions import DecisionLog
from phash_trio.testing.redis_server import RedisProcess
from tests.decisions_kit import running_app, sse


async def test_keys_scopes_and_the_session_cookie(
    redis_proc: RedisProcess, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """No key: 401; a key without the scope: 403; a read key signs in once and the HttpOnly
    cookie alone then opens the read routes (GET only); webhooks need curate and never show
    their secret."""
    async with (
        running_app(redis_proc.url, tmp_path, nursery) as app,
        httpx.AsyncClient(base_url=app.url) as client,
    ):
        reader = {"X-API-Key": app.keys["reader"]}
        ops = {"Authorization": "Bearer " + app.keys["ops"]}
        assert (await client.get("/api/v1/logs")).status_code == 401
        assert (await client.get("/api/v1/logs", headers=ops)).status_code == 403
        assert (await client.get("/api/v1/logs", headers=reader)).status_code == 200
        assert (await client.post("/api/v1/session")).status_code == 401
        signed = await client.post("/api/v1/session", headers=reader)
        assert signed.status_code == 200
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert app.keys["reader"] not in cookie
        assert (await client.get("/api/v1/logs")).status_code == 200  # the cookie alone
        sub = {"id": "bot", "url": "http://127.0.0.1:9/x", "secret": "0123456789abcdef!"}
        assert (await client.post("/api/v1/webhooks", json=sub)).status_code == 401
        assert (await client.post("/api/v1/webhooks", json=sub, headers=reader)).status_code == 403
        made = await client.post("/api/v1/webhooks", json=sub, headers=ops)
        assert made.status_code == 201
        listed = (await client.get("/api/v1/webhooks", headers=ops)).json()
        assert listed["webhooks"][0]["id"] == "bot" and "secret" not in listed["webhooks"][0]
        bad = await client.post("/api/v1/webhooks", json={**sub, "secret": "x"}, headers=ops)
        assert bad.status_code == 400 and bad.json()["success"] is False
        assert (await client.delete("/api/v1/webhooks/bot", headers=ops)).status_code == 200
        assert (await client.delete("/api/v1/webhooks/bot", headers=ops)).status_code == 404
        page = await client.get("/")
        assert page.status_code == 200 and "EventSource" not in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "EventSource" in (await client.get("/page.js")).text


async def test_logs_in_the_bridge_shape(
    redis_proc: RedisProcess, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """/api/v1/logs pages newest first; /api/v1/logs/<photo_id> finds a blob's entries."""
    async with (
        running_app(redis_proc.url, tmp_path, nursery) as app,
        httpx.AsyncClient(base_url=app.url, headers={"X-API-Key": app.keys["reader"]}) as client,
    ):
        log = app.services.log
        await log.append("match", {"cid": "bafyA", "did": "did:plc:a", "distance": 2})
        await log.append(
            "action_sent", {"cid": "bafyA", "did": "did:plc:a", "action": "label_post"}
        )
        await log.append("bad_blob", {"cid": "bafyB", "did": "did:plc:b"})
        page = (await client.get("/api/v1/logs", params={"limit": 2, "offset": 1})).json()
        assert page["count"] == 2 and page["limit"] == 2 and page["offset"] == 1
        assert [e["kind"] for e in page["logs"]] == ["action_sent", "match"]
        first = page["logs"][0]
        assert first["photo_id"] == "bafyA" and first["author_did"] == "did:plc:a"
        assert first["action_taken"] == "label_post" and first["match_result"] is True
        photo = (await client.get("/api/v1/logs/bafyA")).json()
        assert [e["kind"] for e in photo["logs"]] == ["match", "action_sent"]
        assert (await client.get("/api/v1/logs", params={"limit": "x"})).status_code == 400


async def test_sse_resumes_after_a_disconnect_and_a_restart(
    redis_proc: RedisProcess, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A client reads some events, disconnects, more are logged (also while the app is down);
    reconnecting with Last-Event-ID (header, then query) gets exactly the rest, in order."""
    headers = {}
    ids: list[str] = []
    async with running_app(redis_proc.url, tmp_path / "a", nursery) as app:
        headers = {"X-API-Key": app.keys["reader"]}
        log = app.services.log
        async with sse(app.url, "/api/v1/events", headers) as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            for i in range(3):
                ids.append(await log.append("match", {"n": i, "rule": "r"}))
            got = await events.events(3)
        assert [g[0] for g in got] == ids and [g[1] for g in got] == ["match"] * 3
        for i in range(3, 6):
            ids.append(await log.append("bad_blob", {"n": i}))
        async with sse(app.url, "/api/v1/events", {**headers, "Last-Event-ID": ids[2]}) as events:
            got = await events.events(3)
        assert [g[0] for g in got] == ids[3:6]
        keys_dir = tmp_path / "a"
    # The app is gone; the log keeps growing (another instance, or the pipeline at start-up).
    log = DecisionLog(app.services.redis.__class__(redis_proc.url))
    for i in range(6, 9):
        ids.append(await log.append("match", {"n": i, "rule": "r"}))
    async with running_app(redis_proc.url, tmp_path / "b", nursery) as app2:
        path = f"/api/v1/events?last_event_id={ids[5]}&kind=match"
        async with sse(app2.url, path, {"X-API-Key": app2.keys["reader"]}) as events:
            ids.append(await app2.services.log.append("match", {"n": 9, "rule": "r"}))
            await app2.services.log.append("bad_blob", {"n": 10})  # filtered out
            ids.append(await app2.services.log.append("match", {"n": 11, "rule": "r"}))
            got = await events.events(5)
    assert [g[2]["n"] for g in got] == [6, 7, 8, 9, 11]
    assert [g[0] for g in got] == ids[6:]
    assert keys_dir.exists()


async def test_sse_says_when_the_resume_id_fell_out_of_retention(
    redis_proc: RedisProcess, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A Last-Event-ID older than the newest trimmed entry gets ``event: retention`` first,
    then what is left."""
    raw = redis.Redis.from_url(redis_proc.url)
    raw.xadd("decisions", {"kind": "match", "data": "{}"}, id="1000-0")
    raw.xadd("decisions", {"kind": "match", "data": "{}"}, id="2000-0")
    raw.close()
    async with running_app(redis_proc.url, tmp_path, nursery, decisions_retention_secs=3600) as app:
        kept = await app.services.log.append("match", {"n": 1})
        headers = {"X-API-Key": app.keys["reader"]}
        async with sse(app.url, "/api/v1/events?last_event_id=1000-0", headers) as events:
            got = await events.events(2)
    assert got[0][1] == "retention" and got[0][2]["last_event_id"] == "1000-0"
    assert got[1][0] == kept


async def test_a_slow_client_is_cut_and_the_log_is_not_slowed(
    redis_proc: RedisProcess, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A client that never reads fills its buffer and is cut (counted); meanwhile a client
    that keeps up gets everything, and appending (what the pipeline does) never waits for
    either: 8000 entries of 0.5 kB at 2500/s take no longer than the pacing itself."""
    async with running_app(redis_proc.url, tmp_path, nursery, sse_client_buffer=300) as app:
        host, port = app.url.removeprefix("http://").split(":")
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect((host, int(port)))
        stuck.sendall(
            f"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nX-API-Key: {app.keys['reader']}\r\n\r\n".encode()
        )
        broadcaster = app.services.broadcaster
        with trio.fail_after(10):
            while len(broadcaster.clients) < 1:  # noqa: ASYNC110 - no event for a connect
                await trio.sleep(0.01)
        pad = "x" * 500
        total = 8000
        async with sse(app.url, "/api/v1/events", {"X-API-Key": app.keys["reader"]}) as events:
            with trio.fail_after(10):
                while len(broadcaster.clients) < 2:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            started = trio.current_time()
            async with trio.open_nursery() as inner:

                async def write() -> None:
                    for start in range(0, total, 50):  # 2500 entries/s, as a busy pipeline
                        await app.services.log.append_many(
                            [("match", {"n": i, "pad": pad}) for i in range(start, start + 50)]
                        )
                        await trio.sleep(0.02)

                inner.start_soon(write)
                got = await events.events(total, within=60)
            elapsed = trio.current_time() - started
        stuck.close()
    assert [g[2]["n"] for g in got] == list(range(total))
    assert app.metrics.registry.get_sample_value("phash_sse_clients_cut_total") == 1
    assert elapsed < 3.2 + 10  # 160 paced batches of 20 ms, plus slack for a loaded machine


async def test_an_idle_stream_outlives_the_read_timeout_and_gets_heartbeats(
    redis_proc: RedisProcess, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The server's read timeout (0.3 s here) and connection lifetime (1 s) close silent or
    old connections, but not an event stream whose client is silent by design; heartbeats
    arrive meanwhile and the next event still does."""
    limits = ServerLimits(read_timeout=0.3, max_connection_secs=1.0, max_stream_secs=30)
    async with (
        running_app(redis_proc.url, tmp_path, nursery, limits, sse_heartbeat_secs=0.5) as app,
        sse(app.url, "/api/v1/events", {"X-API-Key": app.keys["reader"]}) as events,
    ):
        await trio.sleep(2.5)
        entry = await app.services.log.append("match", {"n": 1})
        got = await events.events(1)
        assert events.heartbeats >= 3
    assert got[0][0] == entry
