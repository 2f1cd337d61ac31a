"""``phash-trio serve`` as an operator runs it: a subprocess on loopback with a key file, real
Redis, SIGTERM to stop; an exposed address without keys exits 2 with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from phash_trio.api.auth import add_key
from phash_trio.image.signals import compute_signals
from phash_trio.testing.redis_server import RedisProcess
from tests.apikit import photo
from tests.test_api_hma import image_host

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free loopback port (closed again before the server binds it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(redis_proc: RedisProcess, tmp_path: Path, addr: str) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": redis_proc.url,
        "API_ADDR": addr,
        "STATE_DIR": str(tmp_path / "state"),
        "RULES_FILE": str(ROOT / "rules" / "blobs.json"),
        "METRICS_ADDR": "",
        "HASH_PROCESSES": "1",
        "DRY_RUN": "true",
        "ALLOW_PRIVATE_NETWORKS": "true",
    }


async def test_exposed_without_keys_exits_2(redis_proc: RedisProcess, tmp_path: Path) -> None:
    """0.0.0.0 with an empty key file: exit 2, one line naming the fix."""
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "phash_trio", "serve"],
            env=env_for(redis_proc, tmp_path, "0.0.0.0:0"),
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert lines[-1].startswith("phash-trio: cannot start: API on 0.0.0.0 has no API keys")
    assert "API_AUTH=none" in lines[-1]


async def test_serve_answers_with_a_key_and_stops_on_sigterm(
    redis_proc: RedisProcess, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The served API hashes a photo fetched by URL for a keyed client, refuses a keyless one,
    and exits 0 on SIGTERM."""
    key = add_key(tmp_path / "state" / "api-keys", "e2e", ["check"])
    port = free_port()
    env = env_for(redis_proc, tmp_path, f"127.0.0.1:{port}")
    data = photo()
    pdq = compute_signals(data).pdq
    assert pdq is not None
    host = await image_host(nursery, {"/p.jpg": (data, "image/jpeg")})
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "phash_trio", "serve"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            with trio.fail_after(60):
                while True:
                    try:
                        if (await client.get("/status")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.2)
            keyed = await client.get(
                "/h/hash", params={"url": host + "/p.jpg"}, headers={"X-API-Key": key}
            )
            keyless = await client.get("/h/hash", params={"url": host + "/p.jpg"})
        assert keyed.json() == {"pdq": pdq.hex}
        assert keyless.status_code == 401
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            code = await process.wait()
        assert code == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
