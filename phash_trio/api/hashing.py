"""Hash uploaded images in the hash worker pool, never on the event loop, with a cap.

Every request that hashes goes through :class:`HashGate`: at most ``limit`` of them are inside
the pool (running or queued for a worker) at once; one more is refused at once with 503 and
``Retry-After`` (:class:`Overloaded`) instead of joining an unbounded queue, so a burst costs
memory for ``limit`` bodies at most and a client learns to come back. An image the decoders
refuse is :class:`BadImage` (400): its message names the reason, never the bytes.
"""

from __future__ import annotations

from functools import partial

from phash_trio.api.auth import ApiError
from phash_trio.image.meanhash import ImageError
from phash_trio.image.pool import HashPool
from phash_trio.image.signals import BlobSignals, compute_signals

__all__ = ["BadImage", "HashGate", "Overloaded"]


class Overloaded(ApiError):
    """Every hashing slot is taken (503, ``Retry-After``)."""

    status = 503

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after)}


class BadImage(ApiError):
    """The bytes are not an image we can hash (400)."""

    status = 400


class HashGate:
    """:func:`compute_signals` in ``pool``, at most ``limit`` requests at once."""

    def __init__(
        self, pool: HashPool, *, limit: int, max_bytes: int, max_pixels: int, retry_after: int = 1
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.pool = pool
        self.limit = limit
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.retry_after = retry_after
        self.active = 0
        #: Requests refused because every slot was taken.
        self.refused = 0

    async def signals(self, data: bytes) -> BlobSignals:
        """Mean hash, PDQ + quality, MD5 and SHA-256 of ``data`` from one decode."""
        if len(data) > self.max_bytes:
            raise BadImage(f"image is {len(data)} bytes, over the limit of {self.max_bytes}")
        if not data:
            raise BadImage("the image is empty")
        if self.active >= self.limit:
            self.refused += 1
            raise Overloaded(
                f"all {self.limit} hashing slots are busy; retry shortly", self.retry_after
            )
        self.active += 1
        try:
            job = partial(
                compute_signals, data, max_pixels=self.max_pixels, max_bytes=self.max_bytes
            )
            return await self.pool.call(job)
        except ImageError as exc:
            raise BadImage(f"image could not be hashed: {exc}") from None
        finally:
            self.active -= 1
