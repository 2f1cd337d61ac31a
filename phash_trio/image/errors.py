"""The typed errors of image decoding: every failure is one of them, with a one-line message.

ImageError
├── ImageTooLarge      byte or pixel cap exceeded
├── UnsupportedImage   empty input, not an image, or a format the reference lacks
└── CorruptImage       truncated or malformed data
"""

from __future__ import annotations

__all__ = ["CorruptImage", "ImageError", "ImageTooLarge", "UnsupportedImage", "one_line"]


class ImageError(Exception):
    """The bytes cannot be hashed; ``str()`` is one line saying why."""

    __module__ = "phash_trio.image"


class ImageTooLarge(ImageError):
    """More bytes or pixels than allowed (a decompression bomb or just too big)."""

    __module__ = "phash_trio.image"


class UnsupportedImage(ImageError):
    """Empty input, not an image, or a format the reference does not decode."""

    __module__ = "phash_trio.image"


class CorruptImage(ImageError):
    """Truncated or malformed image data."""

    __module__ = "phash_trio.image"


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
