"""Shared fixtures: a real redis-server per test session, flushed for each test that asks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from phash_trio.testing.redis_server import RedisProcess, redis_server

GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


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
    if not (GOLDEN_DIR / "mean8.tsv").is_file():
        pytest.fail(
            f"golden vectors not found at {GOLDEN_DIR} (../shared must sit beside the repo)"
        )
    return GOLDEN_DIR
