"""Errors raised while decoding a JPEG (re-exported by :mod:`phash_trio.image.jpeg.decoder`).

JpegDecodeError          -- any JPEG that does not yield pixels
 +-- JpegFormatError     -- not a JPEG, or a malformed one
 |    +-- JpegTruncatedError -- the image data stops before the image is complete
 +-- JpegUnsupportedError -- a valid JPEG using a coding the reference decoder refuses too
 +-- JpegTooLargeError   -- width x height above ``max_pixels``, or memory above ``max_memory``
"""

from __future__ import annotations

__all__ = [
    "JpegDecodeError",
    "JpegFormatError",
    "JpegTooLargeError",
    "JpegTruncatedError",
    "JpegUnsupportedError",
]


class JpegDecodeError(Exception):
    """The bytes could not be decoded to pixels; the message says why in one line."""

    __module__ = "phash_trio.image.jpeg.decoder"


class JpegFormatError(JpegDecodeError):
    """The bytes are not a well-formed JPEG."""

    __module__ = "phash_trio.image.jpeg.decoder"


class JpegTruncatedError(JpegFormatError):
    """The entropy-coded data ends before every block of the image was coded."""

    __module__ = "phash_trio.image.jpeg.decoder"


class JpegUnsupportedError(JpegDecodeError):
    """The JPEG uses a coding process (12-bit, lossless, arithmetic, DNL...) we do not decode."""

    __module__ = "phash_trio.image.jpeg.decoder"


class JpegTooLargeError(JpegDecodeError):
    """The header announces more pixels (or a decode needing more memory) than allowed."""

    __module__ = "phash_trio.image.jpeg.decoder"

    def __init__(
        self, width: int, height: int, max_pixels: int, *, reason: str | None = None
    ) -> None:
        super().__init__(
            reason
            or f"JPEG is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}"
        )
        self.width = width
        self.height = height
        self.max_pixels = max_pixels
