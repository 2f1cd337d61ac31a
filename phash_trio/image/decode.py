"""Image bytes -> the pixels image-rs ``load_from_memory(..)`` gives, then ``to_luma8``/``to_rgb8``.

:func:`decode_gray` is what the mean hash uses; :func:`decode_rgb` (``to_rgb8``) is for PDQ;
:func:`decode_pixels` is the colour type the reference's decoder produced, before conversion.

The reference (image 0.25.10 with features jpeg, png, gif, webp, bmp, tiff) is reproduced
format by format:

* the format comes from the magic bytes (``image::guess_format``), never from a file name;
* the size is read from the header and checked against ``max_pixels`` before any pixel is
  decoded, so a tiny file claiming 100000x100000 costs nothing;
* PNG (:mod:`~phash_trio.image.png`): chunks walked as the ``png`` crate does, Pillow
  unfilters; 16-bit samples are recovered in full with a second, low-byte decode;
* GIF (:mod:`~phash_trio.image.gif`): the first frame, parsed here, composed on the screen;
* JPEG/MPO: :mod:`phash_trio.image.jpeg.decoder`, a zune-jpeg port (libjpeg's pixels differ);
* WebP (:mod:`~phash_trio.image.webp`): libwebp for stills; animations by their first frame,
  composited as image-webp 0.2.4 does;
* BMP (RLE with :mod:`~phash_trio.image.bmprle`), TIFF (:mod:`~phash_trio.image.tiff` checks the
  IFD first): Pillow, first frame.

Decoded pixels are converted by :mod:`~phash_trio.image.pixels` (``to_luma8``/``to_rgb8``, band
by band for big images) with the arithmetic of :mod:`~phash_trio.image.luma`. Before any pixel
is decoded, the header's size is checked against ``max_pixels`` and :data:`SAMPLE_BUDGET`.

No EXIF orientation, no ICC; alpha is dropped, never composited. Every failure is one of the
typed errors below, with a one-line message::

    ImageError
    ├── ImageTooLarge      byte or pixel cap exceeded
    ├── UnsupportedImage   empty input, not an image, or a format the reference lacks
    └── CorruptImage       truncated or malformed data
"""

from __future__ import annotations

import contextlib
import enum
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
from PIL import Image

from phash_trio.image import hashcore
from phash_trio.image.bmprle import use_fast_rle
from phash_trio.image.errors import (
    CorruptImage,
    ImageError,
    ImageTooLarge,
    UnsupportedImage,
    one_line,
)
from phash_trio.image.gif import decode_gif
from phash_trio.image.luma import luma_from_rgb8, luma_from_rgb16
from phash_trio.image.pixels import (
    Banded,
    PixelArray,
    U8Array,
    open_image,
    pillow_banded,
    pillow_pixels,
    to_luma8,
    to_rgb8,
)
from phash_trio.image.png import decode_png
from phash_trio.image.tiff import (
    tiff_check_blocks,
    tiff_fields,
    tiff_low_byte_rawmode,
    tiff_rgb16,
    tiff_size,
)
from phash_trio.image.webp import decode_webp, webp_size

__all__ = [
    "SAMPLE_BUDGET",
    "CorruptImage",
    "ImageError",
    "ImageFormat",
    "ImageTooLarge",
    "UnsupportedImage",
    "decode_gray",
    "decode_gray_pdq",
    "decode_pixels",
    "decode_rgb",
    "header_size",
    "luma_from_rgb8",
    "luma_from_rgb16",
    "sniff_format",
    "to_luma8",
    "to_rgb8",
]

# Exceptions Pillow (and struct/zlib under it) raise on broken data.
_DECODER_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
    OverflowError,
)


class ImageFormat(enum.Enum):
    """The formats the reference build decodes."""

    PNG = "png"
    JPEG = "jpeg"
    GIF = "gif"
    WEBP = "webp"
    BMP = "bmp"
    TIFF = "tiff"


def sniff_format(data: bytes) -> ImageFormat:
    """The format named by the magic bytes, as ``image::guess_format`` decides."""
    if not data:
        raise UnsupportedImage("empty input")
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ImageFormat.PNG
    if data.startswith(b"\xff\xd8\xff"):
        return ImageFormat.JPEG
    if data.startswith((b"GIF87a", b"GIF89a")):
        return ImageFormat.GIF
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ImageFormat.WEBP
    if data.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return ImageFormat.TIFF
    if data.startswith(b"BM"):
        return ImageFormat.BMP
    raise UnsupportedImage(f"not a supported image format (starts with {data[:8].hex()})")


# --------------------------------------------------------------------------- header sizes


def header_size(fmt: ImageFormat, data: bytes) -> tuple[int, int]:
    """``(width, height)`` read from the header alone, without decoding pixels."""
    try:
        return _HEADER_READERS[fmt](data)
    except (struct.error, IndexError):
        raise CorruptImage(f"{fmt.value}: header truncated") from None


def _png_size(data: bytes) -> tuple[int, int]:
    if data[12:16] != b"IHDR":
        raise CorruptImage("png: first chunk is not IHDR")
    width, height = struct.unpack_from(">II", data, 16)
    return int(width), int(height)


def _gif_size(data: bytes) -> tuple[int, int]:
    width, height = struct.unpack_from("<HH", data, 6)
    return int(width), int(height)


_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


def _jpeg_size(data: bytes) -> tuple[int, int]:
    pos = 2
    while True:
        while data[pos] != 0xFF:  # garbage between segments: decoders skip it too
            pos += 1
        while data[pos] == 0xFF:  # fill bytes
            pos += 1
        marker = data[pos]
        pos += 1
        if marker in _JPEG_SOF:
            height, width = struct.unpack_from(">HH", data, pos + 3)
            return int(width), int(height)
        if marker in (0xD9, 0xDA):
            raise CorruptImage("jpeg: no frame header before the scan data")
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue
        (length,) = struct.unpack_from(">H", data, pos)
        pos += length


def _bmp_size(data: bytes) -> tuple[int, int]:
    (header,) = struct.unpack_from("<I", data, 14)
    if header == 12:
        w, h = struct.unpack_from("<HH", data, 18)
        return int(w), int(h)
    w, h = struct.unpack_from("<ii", data, 18)
    return abs(int(w)), abs(int(h))


_HEADER_READERS = {
    ImageFormat.PNG: _png_size,
    ImageFormat.GIF: _gif_size,
    ImageFormat.WEBP: webp_size,
    ImageFormat.JPEG: _jpeg_size,
    ImageFormat.BMP: _bmp_size,
    ImageFormat.TIFF: tiff_size,
}


# --------------------------------------------------------------------------- entry point


def decode_gray(data: bytes, *, max_pixels: int) -> U8Array:
    """The 2-D uint8 gray image the reference hashes, or a typed :class:`ImageError`."""
    return _converted(to_luma8, _decode(data, max_pixels, jpeg_want="gray"))


def decode_rgb(data: bytes, *, max_pixels: int) -> U8Array:
    """``(H, W, 3)`` uint8: what image-rs ``load_from_memory(..).to_rgb8()`` gives (for PDQ).

    Alpha is dropped (never composited), gray is repeated into the three channels, 16-bit
    samples become ``(v + 128) / 257``. Same errors and limits as :func:`decode_gray`.
    """
    return _converted(to_rgb8, _decode(data, max_pixels))


def _converted(
    convert: Callable[[PixelArray | Banded], U8Array], source: PixelArray | Banded
) -> U8Array:
    try:
        return convert(source)
    except MemoryError:
        raise ImageTooLarge("out of memory converting the decoded pixels") from None


def decode_pixels(data: bytes, *, max_pixels: int) -> PixelArray:
    """The decoded pixels in the colour type the reference's decoder gives.

    One of: ``(H, W)`` uint8 (Luma8) or uint16 (Luma16); ``(H, W, 3|4)`` uint8 (Rgb8/Rgba8)
    or uint16 (Rgb16/Rgba16). Gray+alpha arrives as gray: the alpha is never used.
    """
    source = _decode(data, max_pixels)
    return source if isinstance(source, np.ndarray) else source.whole()


def _checked_size(data: bytes, max_pixels: int) -> tuple[ImageFormat, int, int, int]:
    """The format, the pixel limit, the width and the height, checked against every limit."""
    fmt = sniff_format(data)
    width, height = header_size(fmt, data)
    if width <= 0 or height <= 0:
        raise CorruptImage(f"{fmt.value}: zero width or height ({width}x{height})")
    limit = _pixel_limit(max_pixels)
    if width * height > limit:
        raise ImageTooLarge(
            f"{fmt.value}: {width}x{height} is {width * height} pixels, limit {limit}"
        )
    sample_bytes = width * height * _bytes_per_pixel(fmt, data)
    if sample_bytes > SAMPLE_BUDGET:
        raise ImageTooLarge(
            f"{fmt.value}: {width}x{height} at {sample_bytes // (width * height)} bytes a pixel"
            f" is {sample_bytes >> 20} MiB of samples, limit {SAMPLE_BUDGET >> 20} MiB"
        )
    return fmt, limit, width, height


def _decode(
    data: bytes, max_pixels: int, *, jpeg_want: Literal["gray", "rgb"] = "rgb"
) -> PixelArray | Banded:
    """``jpeg_want="gray"`` lets the compiled JPEG path go straight to luma (same values)."""
    fmt, limit, width, height = _checked_size(data, max_pixels)
    try:
        if fmt is ImageFormat.PNG:
            pixels = decode_png(data)
        elif fmt is ImageFormat.GIF:
            pixels = decode_gif(data, limit)
        elif fmt is ImageFormat.JPEG:
            pixels = _decode_jpeg(data, limit, jpeg_want)
        elif fmt is ImageFormat.WEBP:
            pixels = decode_webp(data, limit)
        else:
            pixels = _decode_pillow(data, fmt, limit)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{fmt.value}: {exc}") from None
    except MemoryError:
        raise ImageTooLarge(f"{fmt.value}: out of memory decoding {width}x{height}") from None
    except _DECODER_ERRORS as exc:
        raise CorruptImage(f"{fmt.value}: {one_line(exc)}") from None
    if isinstance(pixels, np.ndarray) and (pixels.size == 0 or not _is_pixel_array(pixels)):
        raise CorruptImage(f"{fmt.value}: decoder returned no pixels")
    return pixels


#: Most bytes of decoded samples one image may need. 8-bit images stay under it up to the
#: pixel cap (25 MP RGBA is 100 MB); 16-bit colour PNG/TIFF past ~16 MP do not: Pillow decodes
#: such a PNG twice (high, then low bytes), 2.4 s and 280 MB at 25 MP. Such a file fits in a
#: 2 MB blob only when it is synthetic (a real 16 MP 16-bit photo is > 50 MB).
SAMPLE_BUDGET = 128 << 20


def _bytes_per_pixel(fmt: ImageFormat, data: bytes) -> int:
    """Decoded bytes per pixel as the header declares them (4 where it does not say)."""
    if fmt is ImageFormat.PNG and len(data) >= 26:
        depth, colour = data[24], data[25]
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 4)
        return max(1, channels * depth // 8)
    if fmt is ImageFormat.JPEG:
        return 3  # RGB8 at most; the JPEG decoder budgets its own working memory (max_memory)
    if fmt is ImageFormat.TIFF:
        fields = tiff_fields(data)
        return max(1, fields.get(277, 1) * -(-fields.get(258, 8) // 8))
    return 4


def _is_pixel_array(pixels: PixelArray) -> bool:
    if pixels.dtype not in (np.uint8, np.uint16):
        return False
    return pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4))


def _pixel_limit(max_pixels: int) -> int:
    """Our cap, never above Pillow's own bomb threshold (which would only warn)."""
    pillow = Image.MAX_IMAGE_PIXELS
    return max_pixels if pillow is None else min(max_pixels, pillow)


def _decode_pillow(data: bytes, fmt: ImageFormat, limit: int) -> PixelArray | Banded:
    name = {ImageFormat.WEBP: "WEBP", ImageFormat.BMP: "BMP", ImageFormat.TIFF: "TIFF"}[fmt]
    if fmt is ImageFormat.TIFF:
        tiff_check_blocks(data, limit)
    im = open_image(data, name)  # not closed: a closed image has no pixels for the bands
    if im.width * im.height > limit:
        raise ImageTooLarge(f"{fmt.value}: {im.width}x{im.height} exceeds {limit} pixels")
    if fmt is ImageFormat.BMP:
        use_fast_rle(im)
    low_mode = tiff_low_byte_rawmode(im) if fmt is ImageFormat.TIFF else None
    im.load()
    if low_mode is not None:
        return tiff_rgb16(data, im, low_mode)
    if im.mode == "CMYK":
        return pillow_banded(im.convert("RGB"))
    return pillow_pixels(im)


# --------------------------------------------------------------------------- JPEG


def _decode_jpeg(data: bytes, limit: int, want: Literal["gray", "rgb"]) -> PixelArray:
    """zune-jpeg's pixels via :mod:`phash_trio.image.jpeg.decoder` (imported on first use).

    No Pillow fallback: libjpeg-turbo's pixels differ from zune-jpeg's, and a file the zune
    port refuses is refused by the reference too.
    """
    from phash_trio.image.jpeg import decoder as jpegdecode

    with _jpeg_errors():
        pixels = jpegdecode.decode_jpeg(data, max_pixels=limit, want=want)
    arr = np.asarray(pixels, dtype=np.uint8)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3):
        return arr
    raise CorruptImage(f"jpeg: decoder returned pixels of shape {arr.shape}")


@contextlib.contextmanager
def _jpeg_errors() -> Iterator[None]:
    """The JPEG decoder's errors as our typed ImageErrors, one line each."""
    from phash_trio.image.jpeg import decoder as jpegdecode

    try:
        yield
    except jpegdecode.JpegTooLargeError as exc:
        raise ImageTooLarge(f"jpeg: {one_line(exc)}") from None
    except jpegdecode.JpegUnsupportedError as exc:
        raise UnsupportedImage(f"jpeg: {one_line(exc)}") from None
    except jpegdecode.JpegDecodeError as exc:
        raise CorruptImage(f"jpeg: {one_line(exc)}") from None


# --------------------------------------------------------------------------- gray + PDQ


def decode_gray_pdq(data: bytes, *, max_pixels: int) -> tuple[U8Array, bytes, int]:
    """The gray image of :func:`decode_gray` and the PDQ of :func:`decode_rgb`'s pixels (32
    bytes, quality 0-100), from one decode.

    A JPEG goes through the compiled core in one pass (gray rows and PDQ's float luma from the
    same colour conversion, no RGB image held); other formats are decoded, converted to gray
    and RGB8, and hashed by the core's PDQ. Same errors and limits as :func:`decode_gray`.
    """
    fmt, limit, width, height = _checked_size(data, max_pixels)
    stream = hashcore.pdq_stream_bytes(width, height)
    if stream > hashcore.PDQ_MAX_STREAM_BYTES:
        raise ImageTooLarge(
            f"{fmt.value}: {width}x{height} is too wide for PDQ: its row buffers would need"
            f" {stream >> 20} MiB, limit {hashcore.PDQ_MAX_STREAM_BYTES >> 20} MiB"
        )
    if fmt is ImageFormat.JPEG:
        from phash_trio.image.jpeg import decoder as jpegdecode

        try:
            with _jpeg_errors():
                return jpegdecode.decode_jpeg_pdq(data, max_pixels=limit)
        except MemoryError:
            raise ImageTooLarge(f"jpeg: out of memory decoding {width}x{height}") from None
    pixels = decode_pixels(data, max_pixels=max_pixels)
    gray = _converted(to_luma8, pixels)
    rgb = np.ascontiguousarray(_converted(to_rgb8, pixels))
    try:
        pdq, quality = hashcore.pdq_rgb(rgb, rgb.shape[1], rgb.shape[0])
    except MemoryError:
        raise ImageTooLarge("out of memory hashing the decoded pixels with PDQ") from None
    return gray, pdq, quality
