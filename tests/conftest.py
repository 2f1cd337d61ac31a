"""Shared fixtures: a real redis-server per test session (flushed for each test that asks),
clients and a store on it, metrics, an HTTP client and a loguru capture."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from loguru import logger

from phash_trio.runtime.metrics import Metrics
from phash_trio.state.store import RedisStore
from phash_trio.testing.redis_server import RedisProcess, redis_server

#: The curated golden subset shipped with the repository: always there, always tested.
GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "golden"
#: The full golden set (750 files), beside the repository in ``../shared`` or named by
#: ``PHASH_GOLDEN_DIR``; tests of the full set are skipped when it is absent.
FULL_GOLDEN_DIR = Path(
    os.environ.get("PHASH_GOLDEN_DIR")
    or Path(__file__).resolve().parents[1].parent / "shared" / "golden"
)


@pytest.fixture(scope="session")
def redis_session() -> Iterator[RedisProcess]:
    with redis_server() as server:
        yield server


@pytest.fixture
def redis_proc(redis_session: RedisProcess) -> Iterator[RedisProcess]:
    """The session's redis-server, empty; restarted if a test stopped it."""
    if redis_session.process is None:
        redis_session.start()
    redis_session.flush()
    yield redis_session
    if redis_session.process is None:
        redis_session.start()


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The in-repository golden subset (tests/data/golden); never skipped."""
    if not (GOLDEN_DIR / "mean8.tsv").is_file():
        pytest.fail(f"the in-repository golden subset is missing at {GOLDEN_DIR}")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def full_golden_dir() -> Path:
    """The full golden set, or a skip saying where it was looked for."""
    if not (FULL_GOLDEN_DIR / "mean8.tsv").is_file():
        pytest.skip(
            f"full golden set not found at {FULL_GOLDEN_DIR} (put ../shared beside the repository"
            " or set PHASH_GOLDEN_DIR); the in-repository subset was checked"
        )
    return FULL_GOLDEN_DIR


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def store(redis_proc: RedisProcess, metrics: Metrics) -> Iterator[RedisStore]:
    """The store on ``redis_proc``; a 1 s socket timeout keeps calls to a stopped Redis short."""
    s = RedisStore(redis_proc.url, metrics, socket_timeout=1.0)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def raw(redis_proc: RedisProcess) -> Iterator[redis.Redis]:
    """A plain synchronous client to look behind the store's back."""
    client = redis.Redis.from_url(redis_proc.url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """A client without httpx timeouts: the code under test sets its own Trio deadlines, and
    with an autojump clock a pending timeout would be jumped to while a request is on the wire."""
    async with httpx.AsyncClient(timeout=None) as client:
        yield client


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Every loguru record (DEBUG and up), formatted as ``LEVEL message``."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG", format="{level} {message}")
    try:
        yield lines
    finally:
        logger.remove(sink)
