"""The API served for real on 127.0.0.1:0 (hypercorn's Trio worker) over a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import redis
import trio

from phash_trio.api import ServerLimits, serve_app
from phash_trio.api.auth import Auth, RateLimit, add_key
from phash_trio.api.context import ApiContext
from phash_trio.api.hashing import HashGate
from phash_trio.api.inputs import UrlFetcher
from phash_trio.api.service_app import build_api_app
from phash_trio.image.pool import HashPool
from phash_trio.net.transport import guarded_transport
from phash_trio.rules.banks import BankStore
from phash_trio.rules.banksync import BankSync
from phash_trio.rules.index import RuleIndex
from phash_trio.rules.matcher import BlobMatcher
from phash_trio.runtime.metrics import Metrics

PHOTOS = Path(__file__).resolve().parent / "data" / "golden" / "images" / "photos" / "jpeg"


def photo(name: str = "hopper_582x547_q65_422_base.jpg") -> bytes:
    return (PHOTOS / name).read_bytes()


def photos() -> list[bytes]:
    return [p.read_bytes() for p in sorted(PHOTOS.glob("*.jpg"))]


@attrs.define
class Api:
    """A running API: its URL, keys by scope set, the context and the bank store."""

    url: str
    keys: dict[str, str]
    ctx: ApiContext
    banks: BankStore
    sync: BankSync
    auth: Auth
    metrics: Metrics

    def client(
        self,
        key: str | None = "check",
        headers: dict[str, str] | None = None,
        connections: int = 10,
    ) -> httpx.AsyncClient:
        """A client sending the ``key`` scope's key as X-API-Key (None: no key)."""
        sent = {"X-API-Key": self.keys[key]} if key else {}
        sent.update(headers or {})
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(base_url=self.url, headers=sent, timeout=60, limits=limits)

    async def synced(self) -> None:
        """Wait (at most 10 s) until the index has applied every bank change made so far."""
        target = self.banks.seq()
        with trio.fail_after(10):
            # The index has no event to wait on: poll it.
            while self.sync.index is None or self.sync.index.seq < target:  # noqa: ASYNC110
                await trio.sleep(0.01)


@asynccontextmanager
async def open_api(
    redis_url: str,
    tmp_path: Path,
    *,
    rules: RuleIndex | None = None,
    open_access: bool = False,
    rate: RateLimit | None = None,
    hash_limit: int = 16,
    max_bytes: int = 2_000_000,
    limits: ServerLimits | None = None,
    allow_private: bool = True,
    blobs: object = None,
    actions: object = None,
) -> AsyncIterator[Api]:
    """Serve the whole API app; keys ``check``, ``curate`` (check+curate) and ``read``."""
    keyfile = tmp_path / "api-keys"
    keys = {
        "check": add_key(keyfile, "checker", ["check"]),
        "curate": add_key(keyfile, "curator", ["check", "curate"]),
        "read": add_key(keyfile, "reader", ["read"]),
    }
    auth = Auth.from_file(keyfile, mode="none" if open_access else "keys", rate=rate)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    banks = BankStore(client)
    sync = BankSync(banks, poll_secs=0.05, jitter_secs=0)
    pool = HashPool(0, threads=2)
    metrics = Metrics()
    try:
        async with (
            httpx.AsyncClient(transport=guarded_transport(allow_private=allow_private)) as http,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(sync.run)
            matcher = None
            if rules is not None:
                matcher = BlobMatcher(rules, banks=sync, pdq_threshold=31, pdq_quality_min=50)
            ctx = ApiContext(
                gate=HashGate(pool, limit=hash_limit, max_bytes=max_bytes, max_pixels=50_000_000),
                urls=UrlFetcher(http, max_bytes=max_bytes, allow_private=allow_private),
                banks=sync,
                matcher=matcher,
                blobs=blobs,  # type: ignore[arg-type]
                actions=actions,  # type: ignore[arg-type]
            )
            app = build_api_app(metrics, lambda: (True, "ok"), ctx, auth)
            limits = limits or ServerLimits(max_connections=256, backlog=512)
            server = await nursery.start(serve_app, app, "127.0.0.1:0", limits)
            yield Api(server.url, keys, ctx, banks, sync, auth, metrics)
            nursery.cancel_scope.cancel()
    finally:
        pool.close()
        client.close()
