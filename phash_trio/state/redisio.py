"""A small synchronous redis-py client run in threads, for the decision log and webhooks.

Same rules as :mod:`phash_trio.state.store`: redis-py's blocking client (timeouts set, no client-side
retries) called through ``trio.to_thread.run_sync`` behind a ``CapacityLimiter``, errors mapped
to :class:`~phash_trio.state.store.RedisUnavailable` / :class:`~phash_trio.state.store.RedisCommandError`.
Blocking reads (``XREAD BLOCK``) get their own client so they never hold a shared connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from phash_trio.state.store import RedisCommandError, RedisUnavailable

__all__ = ["RedisThreads"]

T = TypeVar("T")


class RedisThreads:
    """redis-py calls in worker threads, each bounded by the socket timeout."""

    def __init__(
        self,
        url: str,
        *,
        socket_timeout: float = 5.0,
        max_connections: int = 16,
        threads: int = 8,
    ) -> None:
        self.url = url
        self.socket_timeout = socket_timeout
        self._pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self.client = redis.Redis(connection_pool=self._pool)
        self._limiter = trio.CapacityLimiter(threads)

    async def call(self, op: str, fn: Callable[[redis.Redis], T], *, abandon: bool = True) -> T:
        """Run ``fn(client)`` in a thread; ``abandon`` lets a cancelled caller leave at once."""
        return await run_in_thread(op, fn, self.client, self._limiter, abandon)

    def blocking_client(self, block_secs: float) -> redis.Redis:
        """A client of its own for ``XREAD BLOCK`` (its socket timeout outlasts the block)."""
        return redis.Redis.from_url(
            self.url,
            socket_timeout=self.socket_timeout + block_secs,
            socket_connect_timeout=self.socket_timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )

    def close(self) -> None:
        self._pool.disconnect()


async def run_in_thread(
    op: str,
    fn: Callable[[redis.Redis], T],
    client: redis.Redis,
    limiter: trio.CapacityLimiter | None = None,
    abandon: bool = True,
) -> T:
    """``fn(client)`` in a thread with redis errors mapped to the store's errors."""
    try:
        return await trio.to_thread.run_sync(
            lambda: fn(client), limiter=limiter, abandon_on_cancel=abandon
        )
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnavailable(op, exc) from exc
    except redis.RedisError as exc:
        raise RedisCommandError(op, exc) from exc
