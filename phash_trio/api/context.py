"""What the API routes share: the hash gate, the URL fetcher, the banks, the rules, actions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import redis
import trio

from phash_trio.api.auth import ApiError
from phash_trio.api.content import ContentStore
from phash_trio.api.hashing import HashGate
from phash_trio.api.inputs import UrlFetcher
from phash_trio.net.atproto.blobs import BlobFetcher
from phash_trio.pipeline.actions import Actions
from phash_trio.rules.bankindex import BankHit, BankIndex
from phash_trio.rules.banks import BankStore
from phash_trio.rules.banksync import BankSync
from phash_trio.rules.matcher import BlobMatcher

__all__ = ["ApiContext", "NotReady", "StoreUnavailable"]

T = TypeVar("T")


class NotReady(ApiError):
    """The bank index has not been loaded yet (503)."""

    status = 503

    @property
    def headers(self) -> dict[str, str]:
        return {"retry-after": "2"}


class StoreUnavailable(ApiError):
    """Redis did not answer (503)."""

    status = 503

    @property
    def headers(self) -> dict[str, str]:
        return {"retry-after": "2"}


@attrs.define
class ApiContext:
    """Everything a route needs; built once per app (see ``api.service_app``)."""

    gate: HashGate
    urls: UrlFetcher
    #: Keeps the bank index current (None: no banks at all, every lookup is empty).
    banks: BankSync | None
    #: PDQ distance that still matches (PDQ_HAMMING_THRESHOLD, HMA's 31).
    pdq_threshold: int = 31
    #: PDQ quality below which an image's PDQ is not matched (and HMA's hash is "").
    pdq_quality_min: int = 50
    #: Mean-hash distance that still matches a bank's mean hash (PHASH_HAMMING_THRESHOLD).
    phash_threshold: int = 3
    #: The rules for /api/v1/check's decision (None: no decision, matches only).
    matcher: BlobMatcher | None = None
    #: Blob fetches by (did, cid) through the CDN/PDS path (None: refused).
    blobs: BlobFetcher | None = None
    #: Ozone events for act=true (None: refused).
    actions: Actions | None = None
    _limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(8))

    @property
    def store(self) -> BankStore:
        if self.banks is None:
            raise NotReady("no bank storage is configured")
        return self.banks.store

    @property
    def content(self) -> ContentStore:
        return ContentStore(self.store)

    def index(self) -> BankIndex:
        """The live bank index, or 503 while it loads."""
        if self.banks is None:
            return _EMPTY
        index = self.banks.index
        if index is None:
            raise NotReady("the bank index is still loading")
        return index

    @property
    def ready(self) -> bool:
        return self.banks is None or self.banks.index is not None

    async def redis(self, fn: Callable[..., T], *args: Any) -> T:
        """A synchronous Redis call in a worker thread; 503 when Redis fails."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"bank storage unavailable: {type(exc).__name__}") from None

    def threshold(self, kind: str) -> int:
        return {"pdq": self.pdq_threshold, "phash": self.phash_threshold}.get(kind, 0)

    def search(
        self,
        kind: str,
        value: str,
        threshold: int | None = None,
        banks: frozenset[str] | None = None,
    ) -> list[BankHit]:
        """Bank hits for one signal, closest first (within the kind's threshold by default)."""
        limit = self.threshold(kind) if threshold is None else threshold
        hits = self.index().search(kind, value, limit, banks)
        return sorted(hits, key=lambda h: (h.distance, h.bank, h.value))

    async def content_ids(
        self, hits: list[BankHit]
    ) -> list[tuple[BankHit, str | None, dict[str, Any]]]:
        """Each hit with its entry's content id and metadata (read from Redis, per bank)."""
        by_bank: dict[str, list[BankHit]] = {}
        for hit in hits:
            by_bank.setdefault(hit.bank, []).append(hit)
        found: dict[tuple[str, str], tuple[str | None, dict[str, Any]]] = {}
        for bank, bank_hits in by_bank.items():
            fields = [f"{h.signal_type}:{h.value}" for h in bank_hits]
            entries = await self.redis(self.store.get, bank, fields)
            for field, entry in zip(fields, entries, strict=True):
                if entry is not None:
                    found[(bank, field)] = (entry.content_id, entry.metadata)
        result = []
        for hit in hits:
            content_id, metadata = found.get(
                (hit.bank, f"{hit.signal_type}:{hit.value}"), (None, {})
            )
            result.append((hit, content_id, metadata))
        return result


_EMPTY = BankIndex()
