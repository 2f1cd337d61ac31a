"""The 8x8 mean hash, bit-exact with Rust ``image_hasher`` (``HashAlg::Mean``, 8x8) on ``image``.

Rule files hold hashes made by the Rust service, so ours must agree bit for bit, not just be
"perceptually close": decode as image-rs does (:mod:`phash_trio.image.decode`), ``to_luma8``, Lanczos3
resize to 8x8 in f32 exactly as ``imageops::resize`` (:mod:`phash_trio.image.resize`), mean by integer
division, bit = ``value >= mean``, bits packed LsbFirst (all from resize on in the compiled core,
:mod:`phash_trio.image.hashcore`). See ``shared/HASH.md``.

The value is ``int.from_bytes(hash_bytes, "big")``, so ``f"{value:016x}"`` is the reference hex.
:func:`mean_hash` is synchronous and thread-safe; the service runs it in worker processes
(:mod:`phash_trio.image.pool`, or threads with ``HASH_PROCESSES=0``), and
the heavy parts (the compiled core, Pillow decoding, numpy) release the GIL.

Errors (all subclasses of :class:`ImageError`, message one line)::

    ImageError
    ├── ImageTooLarge      more than max_bytes, or more than max_pixels per the header
    ├── UnsupportedImage   empty input, not an image, or a format the reference lacks
    └── CorruptImage       truncated or malformed data
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import numpy.typing as npt

from phash_trio.image import hashcore
from phash_trio.image.decode import (
    CorruptImage,
    ImageError,
    ImageTooLarge,
    UnsupportedImage,
    decode_gray,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "CorruptImage",
    "ImageError",
    "ImageTooLarge",
    "UnsupportedImage",
    "format_hash",
    "hash_file",
    "hash_gray",
    "mean_hash",
    "parse_hash",
]

DEFAULT_MAX_PIXELS = 50_000_000
_HEX16 = re.compile(r"[0-9a-fA-F]{16}")


def mean_hash(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None
) -> int:
    """The 64-bit mean hash of an encoded image (PNG, JPEG/MPO, GIF, WebP, BMP or TIFF).

    ``max_bytes`` caps the input size and ``max_pixels`` the width x height the header claims
    (checked before any pixel is decoded; never above Pillow's ``MAX_IMAGE_PIXELS``, 89 M by
    default, past which Pillow would warn). Raises an :class:`ImageError` subclass.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLarge(f"input is {len(data)} bytes, limit {max_bytes}")
    return hash_gray(decode_gray(bytes(data), max_pixels=max_pixels))


def hash_gray(gray: npt.NDArray[np.uint8]) -> int:
    """The mean hash of an already decoded 8-bit gray image (``image_hasher`` from resize on)."""
    if gray.ndim != 2 or gray.dtype != np.uint8 or gray.size == 0:
        raise ValueError(f"need a non-empty 2-D uint8 array, got {gray.dtype} {gray.shape}")
    height, width = gray.shape
    return hashcore.mean_hash(np.ascontiguousarray(gray), width, height)


def format_hash(value: int) -> str:
    """16 lowercase hex digits, as the reference writes ``hash.as_bytes()``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"hash must be an int, got {type(value).__name__}")
    if not 0 <= value < 1 << 64:
        raise ValueError(f"hash {value} is outside 0..2**64-1")
    return f"{value:016x}"


def parse_hash(text: str) -> int:
    """Inverse of :func:`format_hash`; exactly 16 hex digits (either case), else ValueError."""
    if not isinstance(text, str) or not _HEX16.fullmatch(text):
        raise ValueError(f"not a 16-hex-digit hash: {text!r:.40}")
    return int(text, 16)


def hash_file(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """Hex mean hash of an image file (reading errors propagate as ``OSError``)."""
    return format_hash(mean_hash(Path(path).read_bytes(), max_pixels=max_pixels))
