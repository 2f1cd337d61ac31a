"""Every signal a blob is matched on, from one decode: mean hash, PDQ (+ quality), MD5, SHA-256.

Decoding is most of the cost of a hash, so the pixels are decoded once and both perceptual
hashes are taken from them: the mean hash from the gray image image-rs's ``to_luma8`` gives (bit
exact with the Rust reference), PDQ from the RGB8 image of ``to_rgb8`` (for a JPEG both come out
of one pass of the compiled core, :func:`~phash_trio.image.decode.decode_gray_pdq`). MD5 and
SHA-256 of the bytes are for exact-match banks. :func:`compute_signals` is synchronous and
picklable: the service runs it in the hash worker pool (``HashPool.call``).
"""

from __future__ import annotations

import hashlib

import attrs
import numpy as np
import numpy.typing as npt

from phash_trio.image.decode import ImageTooLarge, decode_gray, decode_gray_pdq
from phash_trio.image.meanhash import DEFAULT_MAX_PIXELS, hash_gray
from phash_trio.image.pdq import PdqHash, pdq_from_bytes

__all__ = ["BlobSignals", "compute_signals"]

U8Array = npt.NDArray[np.uint8]


@attrs.frozen
class BlobSignals:
    """What one blob is matched on."""

    #: The 64-bit mean hash (``image_hasher`` Mean 8x8).
    mean: int
    #: The PDQ hash, or None when nothing needed it.
    pdq: PdqHash | None = None
    #: Hex digests of the blob's bytes (None when only the mean hash is known, e.g. cached).
    md5: str | None = None
    sha256: str | None = None


def compute_signals(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = None,
    pdq: bool = True,
) -> BlobSignals:
    """Decode ``data`` once and hash it every way; an ``ImageError`` if it cannot be decoded."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLarge(f"input is {len(data)} bytes, limit {max_bytes}")
    data = bytes(data)
    if pdq:
        gray, value, quality = decode_gray_pdq(data, max_pixels=max_pixels)
        pdq_hash: PdqHash | None = pdq_from_bytes(value, quality)
    else:
        gray, pdq_hash = decode_gray(data, max_pixels=max_pixels), None
    return BlobSignals(
        mean=hash_gray(gray),
        pdq=pdq_hash,
        md5=hashlib.md5(data, usedforsecurity=False).hexdigest(),
        sha256=hashlib.sha256(data).hexdigest(),
    )
