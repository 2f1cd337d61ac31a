"""``phash-trio log`` and ``phash-trio webhooks`` as real subprocesses against a real Redis and
a real loopback receiver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import trio

from phash_trio.state.decisions import DecisionLog
from phash_trio.state.redisio import RedisThreads
from phash_trio.testing.redis_server import RedisProcess
from phash_trio.testing.webhook_receiver import WebhookReceiver
from phash_trio.webhooks.delivery import DEAD_PREFIX
from phash_trio.webhooks.signing import phash_headers

SECRET = "cli-secret-0123456789"


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phash_trio", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_log_tail_show_export(redis_proc: RedisProcess, tmp_path: Path) -> None:
    """tail prints the newest entries oldest first; show finds an id or a photo; export
    --since filters by time; a bad --since exits 2."""
    redis = RedisThreads(redis_proc.url)
    log = DecisionLog(redis)
    ids = [await log.append("match", {"n": i, "cid": f"bafy{i}"}) for i in range(5)]
    redis.close()
    env = {"REDIS_URL": redis_proc.url}
    tail = await trio.to_thread.run_sync(
        lambda: _run(["log", "tail", "--limit", "2"], env, tmp_path)
    )
    assert [json.loads(x)["n"] for x in tail.stdout.splitlines()] == [3, 4], tail.stderr
    show = await trio.to_thread.run_sync(lambda: _run(["log", "show", ids[1]], env, tmp_path))
    assert json.loads(show.stdout)["id"] == ids[1]
    photo = await trio.to_thread.run_sync(lambda: _run(["log", "show", "bafy2"], env, tmp_path))
    assert json.loads(photo.stdout)["n"] == 2
    since = ids[3].split("-")[0]
    export = await trio.to_thread.run_sync(
        lambda: _run(["log", "export", "--since", since], env, tmp_path)
    )
    want = [i for i, entry in enumerate(ids) if int(entry.split("-")[0]) >= int(since)]
    assert [json.loads(x)["n"] for x in export.stdout.splitlines()] == want
    assert want[-2:] == [3, 4]
    bad = await trio.to_thread.run_sync(
        lambda: _run(["log", "export", "--since", "yesterday"], env, tmp_path)
    )
    assert bad.returncode == 2 and "--since" in bad.stderr


async def test_webhooks_list_redeliver_purge_verify(
    redis_proc: RedisProcess, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """list shows a file subscription without its secret; redeliver posts the dead letters
    (signed, verified by the receiver) and removes them; purge empties the list; verify
    checks a saved delivery."""
    rx = WebhookReceiver(SECRET)
    await rx.start(nursery)
    subs = tmp_path / "hooks.json"
    subs.write_text(json.dumps([{"id": "rx", "url": rx.url, "secret": SECRET}]))
    env = {
        "REDIS_URL": redis_proc.url,
        "WEBHOOKS_FILE": str(subs),
        "ALLOW_PRIVATE_NETWORKS": "true",
        "WEBHOOK_SECRET": SECRET,
    }
    redis = RedisThreads(redis_proc.url)
    letters = [
        json.dumps({"event": {"id": f"{i}-0", "kind": "match", "n": i}, "error": "HTTP 500"})
        for i in (2, 1)  # newest first, as the deliverer pushes them
    ]
    await redis.call("seed", lambda c: c.rpush(DEAD_PREFIX + "rx", *letters))
    listed = await trio.to_thread.run_sync(lambda: _run(["webhooks", "list"], env, tmp_path))
    row = json.loads(listed.stdout)
    assert row["id"] == "rx" and row["dead"] == 2 and "secret" not in row, listed.stderr
    again = await trio.to_thread.run_sync(
        lambda: _run(["webhooks", "redeliver", "rx"], env, tmp_path)
    )
    assert again.returncode == 0, again.stderr
    assert [d for d, _ in rx.received] == ["1-0", "2-0"] and rx.bad_signatures == 0
    assert await redis.call("llen", lambda c: c.llen(DEAD_PREFIX + "rx")) == 0
    await redis.call("seed", lambda c: c.rpush(DEAD_PREFIX + "rx", letters[0]))
    purged = await trio.to_thread.run_sync(lambda: _run(["webhooks", "purge", "rx"], env, tmp_path))
    assert "purged 1" in purged.stdout
    redis.close()

    body = b'{"id":"9-0","kind":"match"}'
    (tmp_path / "body").write_bytes(body)
    headers = phash_headers(SECRET, body, "9-0", now=__import__("time").time())
    args = ["webhooks", "verify", "--body", str(tmp_path / "body")]
    for name, value in headers.items():
        args += ["--header", f"{name}: {value}"]
    ok = await trio.to_thread.run_sync(lambda: _run(args, env, tmp_path))
    assert ok.returncode == 0 and "valid (delivery 9-0)" in ok.stdout
    (tmp_path / "body").write_bytes(body + b" ")
    bad = await trio.to_thread.run_sync(lambda: _run(args, env, tmp_path))
    assert bad.returncode == 1 and "invalid" in bad.stdout
