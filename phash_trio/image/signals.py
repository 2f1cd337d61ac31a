"""Every signal a blob is matched on, from one decode: mean hash, PDQ (+ quality), MD5, SHA-256.

Decoding is most of the cost of a hash, so the pixels are decoded once and both perceptual
hashes are taken from them: the mean hash from the gray image image-rs's ``to_luma8`` gives (bit
exact with the Rust reference), PDQ from the RGB8 image of ``to_rgb8``. MD5 and SHA-256 of the
bytes are for exact-match banks. :func:`compute_signals` is synchronous and picklable: the
service runs it in the hash worker pool (``HashPool.call``).
"""

from __future__ import annotations

import hashlib

import attrs
import numpy as np
import numpy.typing as npt

from phash_trio.image.decode import ImageTooLarge
from phash_trio.image.meanhash import DEFAULT_MAX_PIXELS, hash_gray
from phash_trio.image.pdq import PdqHash, pdq_from_rgb

__all__ = ["BlobSignals", "compute_signals", "decode_gray_rgb"]

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
    gray, rgb = decode_gray_rgb(data, max_pixels=max_pixels, rgb=pdq)
    return BlobSignals(
        mean=hash_gray(gray),
        pdq=pdq_from_rgb(rgb) if rgb is not None else None,
        md5=hashlib.md5(data, usedforsecurity=False).hexdigest(),
        sha256=hashlib.sha256(data).hexdigest(),
    )


# ---------------------------------------------------------------------------------------------
# MERGE: private fallback until the "images" branch lands ``decode_pixels``/``to_luma8``/
# ``to_rgb8`` in image/decode.py. Then this whole section becomes:
#
#     pixels = decode_pixels(data, max_pixels=max_pixels)
#     return to_luma8(pixels), (to_rgb8(pixels) if rgb else None)
#
# JPEG (nearly every firehose blob) is decoded once here already; other formats are decoded
# twice (gray as the reference does, RGB through Pillow).


def decode_gray_rgb(
    data: bytes, *, max_pixels: int, rgb: bool = True
) -> tuple[U8Array, U8Array | None]:
    """The gray pixels of ``to_luma8`` and (if ``rgb``) the RGB8 pixels of ``to_rgb8``."""
    from phash_trio.image import decode

    if not rgb:
        return decode.decode_gray(data, max_pixels=max_pixels), None
    if decode.sniff_format(data) is decode.ImageFormat.JPEG:
        pixels = _decode_jpeg_pixels(data, max_pixels)
        if pixels.ndim == 2:
            return pixels, np.repeat(pixels[:, :, None], 3, axis=2)
        return decode.luma_from_rgb8(pixels), np.ascontiguousarray(pixels[..., :3])
    gray = decode.decode_gray(data, max_pixels=max_pixels)  # checks caps and format first
    return gray, _pillow_rgb(data)


def _decode_jpeg_pixels(data: bytes, max_pixels: int) -> U8Array:
    from phash_trio.image import decode
    from phash_trio.image.jpeg import decoder as jpegdecode

    width, height = decode.header_size(decode.ImageFormat.JPEG, data)
    limit = decode._pixel_limit(max_pixels)
    if width <= 0 or height <= 0:
        raise decode.CorruptImage(f"jpeg: zero width or height ({width}x{height})")
    if width * height > limit:
        raise ImageTooLarge(f"jpeg: {width}x{height} is {width * height} pixels, limit {limit}")
    try:
        pixels = jpegdecode.decode_jpeg(data, max_pixels=limit)
    except jpegdecode.JpegTooLargeError as exc:
        raise ImageTooLarge(f"jpeg: {decode._one_line(exc)}") from None
    except jpegdecode.JpegUnsupportedError as exc:
        raise decode.UnsupportedImage(f"jpeg: {decode._one_line(exc)}") from None
    except jpegdecode.JpegDecodeError as exc:
        raise decode.CorruptImage(f"jpeg: {decode._one_line(exc)}") from None
    arr = np.asarray(pixels, dtype=np.uint8)
    if arr.size == 0 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] >= 3)):
        raise decode.CorruptImage(f"jpeg: decoder returned pixels of shape {arr.shape}")
    return arr


def _pillow_rgb(data: bytes) -> U8Array | None:
    """Pillow's RGB, or None where it refuses a file the reference decodes (PDQ is skipped)."""
    import io
    import warnings

    from PIL import Image

    from phash_trio.image import decode

    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as im:
            warnings.simplefilter("ignore")
            im.seek(0)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except decode._DECODER_ERRORS:
        return None


# ---------------------------------------------------------------------------------------------
