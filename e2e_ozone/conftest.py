"""Session fixtures of the real-network suite: Node tree, Postgres, two Redis, the network."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from realnet import HERE, DevNetwork, postgres_cluster

from phash_trio.testing.redis_server import RedisProcess, redis_server


@pytest.fixture(scope="session")
def node_dir() -> Path:
    """The cached Node 22 + @atproto/dev-env install (``e2e_ozone/prepare`` makes it)."""
    given = os.environ.get("PHASH_E2E_NODE_DIR")
    if given:
        return Path(given)
    out = subprocess.run(
        [str(HERE / "prepare")], check=True, stdout=subprocess.PIPE, text=True, timeout=1800
    )
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def network(node_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevNetwork]:
    """PLC, PDS, AppView and Ozone on a throwaway Postgres and their own Redis."""
    logs = tmp_path_factory.mktemp("network")
    started = time.monotonic()
    with postgres_cluster() as postgres, redis_server() as appview_redis:
        net = DevNetwork.start(
            node_dir, postgres, f"127.0.0.1:{appview_redis.port}", logs / "network.log"
        )
        print(f"\nreal network up in {time.monotonic() - started:.1f} s: {net.info['ozone']}")
        try:
            yield net
        finally:
            net.close()


@pytest.fixture(scope="session")
def service_redis_session() -> Iterator[RedisProcess]:
    with redis_server() as server:
        yield server


@pytest.fixture
def service_redis(service_redis_session: RedisProcess) -> RedisProcess:
    """The service's Redis (claims, caps, cache), empty for each test."""
    service_redis_session.flush()
    return service_redis_session
