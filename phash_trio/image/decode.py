"""Image bytes -> the pixels image-rs ``load_from_memory(..)`` gives, then ``to_luma8``/``to_rgb8``.

:func:`decode_gray` is what the mean hash uses; :func:`decode_rgb` (``to_rgb8``) is for PDQ;
:func:`decode_pixels` is the colour type the reference's decoder produced, before conversion.

The reference (image 0.25.10 with features jpeg, png, gif, webp, bmp, tiff) is reproduced
format by format:

* the format comes from the magic bytes (``image::guess_format``), never from a file name;
* the size is read from the header and checked against ``max_pixels`` before any pixel is
  decoded, so a tiny file claiming 100000x100000 costs nothing;
* PNG: chunks are walked here (CRCs checked like the ``png`` crate, text chunks dropped so no
  size limit of Pillow's applies to them), then Pillow unfilters; 16-bit samples are recovered
  in full by decoding the IDAT stream a second time with a low-byte raw mode;
* GIF: the first frame is parsed here (palette colour even for the transparent index, 0 outside
  the frame's rectangle, no palette is an error) and only its LZW data goes to Pillow;
* JPEG/MPO: :mod:`phash_trio.image.jpeg.decoder`, a zune-jpeg port (libjpeg's pixels differ);
* WebP: Pillow (libwebp) for stills; the first frame of an animation is cut out into a still,
  decoded, and composited as image-webp 0.2.4 does (transparent canvas, its integer blend);
* BMP, TIFF: Pillow, first frame.

No EXIF orientation, no ICC; alpha is dropped, never composited. Every failure is one of the
typed errors below, with a one-line message::

    ImageError
    ├── ImageTooLarge      byte or pixel cap exceeded
    ├── UnsupportedImage   empty input, not an image, or a format the reference lacks
    └── CorruptImage       truncated or malformed data
"""

from __future__ import annotations

import enum
import functools
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile, TiffTags, UnidentifiedImageError

from phash_trio.image.bmprle import use_fast_rle

try:
    from PIL import _webp
except ImportError:  # pragma: no cover - Pillow built without WebP
    _webp = None  # type: ignore[assignment]

__all__ = [
    "CorruptImage",
    "ImageError",
    "ImageFormat",
    "ImageTooLarge",
    "UnsupportedImage",
    "decode_gray",
    "decode_pixels",
    "decode_rgb",
    "header_size",
    "luma_from_rgb8",
    "luma_from_rgb16",
    "sniff_format",
    "to_luma8",
    "to_rgb8",
]

U8Array = npt.NDArray[np.uint8]
#: Decoded pixels: uint8 or uint16, ``(H, W)`` gray or ``(H, W, 3|4)`` RGB(A).
PixelArray = npt.NDArray[Any]
F32 = np.float32

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


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    body = 20
    if chunk == b"VP8X":
        w = int.from_bytes(data[body + 4 : body + 7], "little") + 1
        h = int.from_bytes(data[body + 7 : body + 10], "little") + 1
        if len(data) < body + 10:
            raise IndexError
        return w, h
    if chunk == b"VP8L":
        if data[body] != 0x2F:
            raise CorruptImage("webp: bad VP8L signature")
        bits = int.from_bytes(data[body + 1 : body + 5], "little")
        if len(data) < body + 5:
            raise IndexError
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        if data[body + 3 : body + 6] != b"\x9d\x01\x2a":
            raise CorruptImage("webp: bad VP8 start code")
        w, h = struct.unpack_from("<HH", data, body + 6)
        return int(w) & 0x3FFF, int(h) & 0x3FFF
    raise CorruptImage(f"webp: unknown first chunk {chunk!r}")


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


# Bytes per value of each TIFF field type Pillow reads.
_TIFF_UNIT = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
              16: 8, 17: 8, 18: 8}  # fmt: skip


def _tiff_size(data: bytes) -> tuple[int, int]:
    fields = _tiff_fields(data)
    if 256 not in fields or 257 not in fields:
        raise CorruptImage("tiff: no image size in the first IFD")
    return fields[256], fields[257]


#: Tags whose first value we keep: size, samples, tile and strip geometry.
_TIFF_WANTED = frozenset({256, 257, 258, 277, 278, 322, 323})
#: Types whose count is a byte count (BYTE, ASCII, SBYTE, UNDEFINED): ICC profiles, JPEG
#: tables, XMP. Pillow's "length 1" for such tags means one blob, not one byte.
_TIFF_BYTES = frozenset({1, 2, 6, 7})


def _tiff_fields(data: bytes) -> dict[int, int]:
    """First values of the tags in :data:`_TIFF_WANTED`, from a well-formed first IFD.

    Pillow only *warns* about IFD entries pointing past the end of the file, a truncated IFD or
    extra values in single-valued numeric tags, then decodes whatever it can; we refuse those
    files (a warning is no answer, and the tiff crate is strict).
    """
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    if big:
        (ifd,) = struct.unpack_from(order + "Q", data, 8)
        (count,) = struct.unpack_from(order + "Q", data, ifd)
        entry, first, inline = 20, ifd + 8, 8
    else:
        (ifd,) = struct.unpack_from(order + "I", data, 4)
        (count,) = struct.unpack_from(order + "H", data, ifd)
        entry, first, inline = 12, ifd + 2, 4
    if first + count * entry + inline > len(data):
        raise CorruptImage("tiff: first IFD runs past the end of the file")
    found: dict[int, int] = {}
    total = 0
    for n in range(count):
        at = first + n * entry
        tag, kind = struct.unpack_from(order + "HH", data, at)
        (values,) = struct.unpack_from(order + ("Q" if big else "I"), data, at + 4)
        unit = _TIFF_UNIT.get(kind)
        if unit is None:
            continue  # Pillow skips unknown types
        size = values * unit
        where = at + 4 + inline
        if size > inline:
            (where,) = struct.unpack_from(order + ("Q" if big else "I"), data, where)
            total += size
            if where + size > len(data) or total > len(data):
                raise CorruptImage(f"tiff: data of tag {tag} lies past the end of the file")
        numeric = kind not in _TIFF_BYTES
        if numeric and values > 1 and tag != 262 and TiffTags.lookup(tag).length == 1:
            raise CorruptImage(f"tiff: tag {tag} has {values} values, expected 1")
        if tag in _TIFF_WANTED and values >= 1 and kind in (3, 4, 16):
            fmt = {3: "H", 4: "I", 16: "Q"}[kind]
            (value,) = struct.unpack_from(order + fmt, data, where)
            found[tag] = int(value)
    return found


def _tiff_check_blocks(data: bytes, limit: int) -> None:
    """The pixel cap applies to each tile and strip too: libtiff allocates a whole one.

    A 16x16 image may declare one 40000x40000 tile (1.6 GB before a pixel is read).
    """
    fields = _tiff_fields(data)
    width, height = fields.get(256, 0), fields.get(257, 0)
    if 322 in fields or 323 in fields:
        tile_w, tile_h = fields.get(322, 0), fields.get(323, 0)
        if tile_w <= 0 or tile_h <= 0:
            raise CorruptImage(f"tiff: bad tile size {tile_w}x{tile_h}")
        if tile_w * tile_h > limit:
            raise ImageTooLarge(
                f"tiff: tile {tile_w}x{tile_h} is {tile_w * tile_h} pixels, limit {limit}"
            )
    rows = min(fields.get(278, height), height)
    if width * rows > limit:  # cannot happen while width x height is capped; kept explicit
        raise ImageTooLarge(f"tiff: strip of {rows} rows of {width} exceeds {limit} pixels")


_HEADER_READERS = {
    ImageFormat.PNG: _png_size,
    ImageFormat.GIF: _gif_size,
    ImageFormat.WEBP: _webp_size,
    ImageFormat.JPEG: _jpeg_size,
    ImageFormat.BMP: _bmp_size,
    ImageFormat.TIFF: _tiff_size,
}


# --------------------------------------------------------------------------- luma


def _f32_bits(bits: int) -> np.float32:
    return F32(np.frombuffer(bits.to_bytes(4, "little"), dtype="<f4")[0])


# BT.709 Y row derived by moxcms, as image >= 0.25.7 uses (not the rounded 0.2126/0.7152/0.0722).
_KR = _f32_bits(0x3E59C05B)
_KG = _f32_bits(0x3F3715FC)
_KB = _f32_bits(0x3D93CF75)
_CHUNK = 1 << 18  # pixels per block: keeps the f32 temporaries in cache


@functools.cache
def _luma_tables(depth: int) -> tuple[npt.NDArray[np.float32], ...]:
    """``(v as f32 * (1/max)) * k`` for every sample value: the same f32 ops, done once."""
    top = (1 << depth) - 1
    scale = F32(1.0) / F32(top)
    values = np.arange(top + 1, dtype=F32) * scale
    return tuple((values * k).astype(F32) for k in (_KR, _KG, _KB))


@functools.cache
def luma8_table() -> U8Array:
    """``to_luma8`` of every 8-bit colour, indexed by ``r | g << 8 | b << 16`` (16 MiB).

    Built from the same f32 operations (9 ms, once); one table lookup per pixel then beats
    redoing the float arithmetic on every pixel of a photo by 3x. Rounding half away from zero
    is ``floor(x + 0.5)``, here in f32 with truncation: a test compares all 2**24 entries
    with an f64 rounding to prove that is exact (and that nothing exceeds 255).
    """
    tr, tg, tb = _luma_tables(8)
    planes = np.empty((256, 256 * 256), dtype=np.uint8)
    red_green = (tr[None, :] + tg[:, None]).reshape(-1)  # [g, r] -> pr + pg
    for blue in range(256):
        total = red_green + tb[blue]
        total *= F32(255.0)
        total += F32(0.5)
        planes[blue] = total
    table: U8Array = planes.reshape(-1)
    table.setflags(write=False)
    return table


def luma_from_rgb8(rgb: U8Array) -> U8Array:
    """image-rs ``to_luma8`` of an 8-bit ``(H, W, >=3)`` RGB(A) array (alpha ignored)."""
    table = luma8_table()
    height, width, channels = rgb.shape
    flat = rgb.reshape(-1, channels)
    out = np.empty(flat.shape[0], dtype=np.uint8)
    words = np.zeros((min(flat.shape[0], _CHUNK), 4), dtype=np.uint8)
    for start in range(0, flat.shape[0], _CHUNK):
        part = flat[start : start + _CHUNK, :3]
        packed = words[: part.shape[0]]
        for channel in range(3):  # column by column: a (n, 3) block copy is 3x slower
            packed[:, channel] = part[:, channel]
        np.take(table, packed.view("<u4").reshape(-1), out=out[start : start + part.shape[0]])
    return out.reshape(height, width)


def luma_from_rgb16(rgb: npt.NDArray[np.integer[Any]]) -> U8Array:
    """image-rs ``to_luma8`` of a 16-bit ``(H, W, >=3)`` RGB(A) array (alpha ignored).

    ``((0 + r*kr) + g*kg) + b*kb`` in f32 with ``c as f32 * (1/65535)``, then
    ``(l * 255).round()`` (half away from zero, in f64 so that ``+ 0.5`` is exact), saturated.
    """
    tr, tg, tb = _luma_tables(16)
    total: npt.NDArray[np.float32] = tr.take(rgb[..., 0])  # take: 3x faster than indexing
    total += tg.take(rgb[..., 1])
    total += tb.take(rgb[..., 2])
    total *= F32(255.0)
    wide = total.astype(np.float64)
    wide += 0.5
    np.floor(wide, out=wide)
    np.clip(wide, 0.0, 255.0, out=wide)
    out: U8Array = wide.astype(np.uint8)
    return out


def _gray16_to_8(gray: npt.NDArray[Any]) -> U8Array:
    """Luma16 -> Luma8 is ``(v + 128) / 257`` in integers."""
    return ((gray.astype(np.uint32) + 128) // 257).astype(np.uint8)


# --------------------------------------------------------------------------- entry point


def decode_gray(data: bytes, *, max_pixels: int) -> U8Array:
    """The 2-D uint8 gray image the reference hashes, or a typed :class:`ImageError`."""
    return _converted(to_luma8, _decode(data, max_pixels))


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


def _decode(data: bytes, max_pixels: int) -> PixelArray | Banded:
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
    try:
        if fmt is ImageFormat.PNG:
            pixels = _decode_png(data)
        elif fmt is ImageFormat.GIF:
            pixels = _decode_gif(data, limit)
        elif fmt is ImageFormat.JPEG:
            pixels = _decode_jpeg(data, limit)
        elif fmt is ImageFormat.WEBP:
            pixels = _decode_webp(data, limit)
        else:
            pixels = _decode_pillow(data, fmt, limit)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{fmt.value}: {exc}") from None
    except MemoryError:
        raise ImageTooLarge(f"{fmt.value}: out of memory decoding {width}x{height}") from None
    except _DECODER_ERRORS as exc:
        raise CorruptImage(f"{fmt.value}: {_one_line(exc)}") from None
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
    if fmt is ImageFormat.TIFF:
        fields = _tiff_fields(data)
        return max(1, fields.get(277, 1) * -(-fields.get(258, 8) // 8))
    return 4


def _is_pixel_array(pixels: PixelArray) -> bool:
    if pixels.dtype not in (np.uint8, np.uint16):
        return False
    return pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4))


@attrs.frozen
class Banded:
    """Pixels read band by band, so converting a big image never holds a second full copy.

    ``band(y0, y1)`` returns rows ``y0:y1`` as a pixel array (what :func:`decode_pixels`
    would hold for them); a 25 MP RGBA image then costs its decoder's buffer plus one band,
    not three more full-size arrays.
    """

    height: int
    width: int
    band: Callable[[int, int], PixelArray]

    def rows(self) -> Iterator[tuple[int, PixelArray]]:
        step = max(1, _BAND_PIXELS // max(self.width, 1))
        for y0 in range(0, self.height, step):
            yield y0, self.band(y0, min(y0 + step, self.height))

    def whole(self) -> PixelArray:
        return np.concatenate([part for _, part in self.rows()], axis=0)


_BAND_PIXELS = 1 << 20


def _pillow_banded(im: Image.Image) -> Banded:
    """Bands of a loaded RGB/RGBA/RGBX Pillow image (``np.asarray`` would copy it whole)."""
    width, height = im.size

    def band(y0: int, y1: int) -> PixelArray:
        return np.asarray(im.crop((0, y0, width, y1)))

    return Banded(height, width, band)


def to_luma8(pixels: PixelArray | Banded) -> U8Array:
    """image-rs ``to_luma8`` of what :func:`decode_pixels` returns."""
    if isinstance(pixels, Banded):
        out = np.empty((pixels.height, pixels.width), dtype=np.uint8)
        for y0, part in pixels.rows():
            out[y0 : y0 + part.shape[0]] = to_luma8(part)
        return out
    if pixels.ndim == 2:
        return pixels if pixels.dtype == np.uint8 else _gray16_to_8(pixels)
    if pixels.dtype == np.uint8:
        return luma_from_rgb8(pixels)
    return luma_from_rgb16(pixels)


def to_rgb8(pixels: PixelArray | Banded) -> U8Array:
    """image-rs ``to_rgb8`` of what :func:`decode_pixels` returns."""
    if isinstance(pixels, Banded):
        out = np.empty((pixels.height, pixels.width, 3), dtype=np.uint8)
        for y0, part in pixels.rows():
            out[y0 : y0 + part.shape[0]] = to_rgb8(part)
        return out
    if pixels.dtype == np.uint16:
        pixels = _gray16_to_8(pixels[..., :3] if pixels.ndim == 3 else pixels)
    if pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])


def _pixel_limit(max_pixels: int) -> int:
    """Our cap, never above Pillow's own bomb threshold (which would only warn)."""
    pillow = Image.MAX_IMAGE_PIXELS
    return max_pixels if pillow is None else min(max_pixels, pillow)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _open(data: bytes, fmt: str) -> ImageFile.ImageFile:
    """Open with the one Pillow plugin that the magic bytes named."""
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
    except UnidentifiedImageError:
        raise CorruptImage(f"{fmt.lower()}: cannot be read as {fmt}") from None
    assert isinstance(im, ImageFile.ImageFile)
    return im


def _pillow_pixels(im: Image.Image) -> PixelArray | Banded:
    """The pixels of a loaded Pillow image in the colour type image-rs would decode."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im)
    if mode == "LA":
        return np.ascontiguousarray(np.asarray(im)[..., 0])
    if mode == "1":
        return np.asarray(im.convert("L"))
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im).astype(np.uint16)
    if mode == "P":
        rgb: U8Array = _palette_lut(im.getpalette("RGB") or [])[np.asarray(im)]
        return rgb
    if mode in ("RGB", "RGBA", "RGBX"):
        return _pillow_banded(im)
    raise UnsupportedImage(f"{(im.format or 'image').lower()}: pixel mode {mode} not supported")


def _palette_lut(palette: bytes | list[int]) -> U8Array:
    """A 256-entry RGB table; entries the file does not define are black (as in png/gif)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    raw = palette if isinstance(palette, bytes) else bytes(palette)
    colours = np.frombuffer(raw, dtype=np.uint8)[: 256 * 3]
    colours = colours[: len(colours) - len(colours) % 3].reshape(-1, 3)
    lut[: len(colours)] = colours
    return lut


def _decode_pillow(data: bytes, fmt: ImageFormat, limit: int) -> PixelArray | Banded:
    name = {ImageFormat.WEBP: "WEBP", ImageFormat.BMP: "BMP", ImageFormat.TIFF: "TIFF"}[fmt]
    if fmt is ImageFormat.TIFF:
        _tiff_check_blocks(data, limit)
    im = _open(data, name)  # not closed: a closed image has no pixels for the bands
    if im.width * im.height > limit:
        raise ImageTooLarge(f"{fmt.value}: {im.width}x{im.height} exceeds {limit} pixels")
    if fmt is ImageFormat.BMP:
        use_fast_rle(im)
    im.load()
    if im.mode == "CMYK":
        return _pillow_banded(im.convert("RGB"))
    return _pillow_pixels(im)


# --------------------------------------------------------------------------- WebP


def _riff_chunks(data: bytes, start: int, stop: int) -> list[tuple[bytes, int, int]]:
    """``(fourcc, body_start, body_end)`` of the RIFF chunks in ``data[start:stop]``."""
    chunks = []
    pos = start
    while pos + 8 <= stop:
        fourcc = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        body = pos + 8
        if body + size > stop:
            raise CorruptImage(f"webp: truncated {fourcc.decode('latin-1')!r} chunk")
        chunks.append((fourcc, body, body + size))
        pos = body + size + (size & 1)
    return chunks


def _decode_webp(data: bytes, limit: int) -> PixelArray | Banded:
    """Stills through Pillow; animations by their first frame, composited like image-webp.

    libwebp (Pillow) composites the first frame onto a transparent canvas without blending;
    image-webp 0.2.4 blends it (when the frame asks for blending) with its integer formula,
    which turns fully transparent pixels black and can lower other values by one.
    """
    if data[12:16] != b"VP8X" or not data[20] & 0x02:
        return _decode_webp_still(data, limit)
    canvas_w, canvas_h = _webp_size(data)
    chunks = _riff_chunks(data, 12, len(data))
    frames = [c for c in chunks if c[0] == b"ANMF"]
    if not frames or not any(c[0] == b"ANIM" for c in chunks):
        raise CorruptImage("webp: animation without ANIM or ANMF chunk")
    _, start, stop = frames[0]
    if stop - start < 24:
        raise CorruptImage("webp: ANMF chunk too small")
    head = data[start : start + 16]
    x = int.from_bytes(head[0:3], "little") * 2
    y = int.from_bytes(head[3:6], "little") * 2
    width = int.from_bytes(head[6:9], "little") + 1
    height = int.from_bytes(head[9:12], "little") + 1
    blend = not head[15] & 0x02
    if width > 16384 or height > 16384 or width * height > limit:
        raise ImageTooLarge(f"webp: animation frame {width}x{height} is too large")
    if x + width > canvas_w or y + height > canvas_h:
        raise CorruptImage("webp: animation frame lies outside the canvas")
    frame, has_alpha = _webp_frame_pixels(data, _riff_chunks(data, start + 16, stop), limit)
    if frame.shape[:2] != (height, width):
        raise CorruptImage("webp: animation frame size disagrees with its ANMF header")
    canvas = np.zeros((canvas_h, canvas_w, 4), dtype=np.uint8)
    region = canvas[y : y + height, x : x + width]
    if has_alpha and blend:  # the canvas starts transparent: no background colour (0.2.2+)
        region[...] = _webp_blend_over_transparent(frame)
    else:
        region[..., : frame.shape[2]] = frame
        if frame.shape[2] == 3:
            region[..., 3] = 255
    return canvas


def _decode_webp_still(data: bytes, limit: int) -> PixelArray | Banded:
    """A still WebP with libwebp through Pillow's decoder object, keeping one copy of it.

    ``Image.open`` + ``load`` holds libwebp's two canvases, the frame bytes and Pillow's image
    at once: 16 bytes a pixel, 433 MB at 25 MP. Here the decoder (its canvases) is dropped as
    soon as the frame bytes are out and numpy reads those bytes in place: peak 12 bytes a
    pixel, then 4. Falls back to ``Image.open`` if Pillow's private decoder ever goes away.
    """
    decoder_class = getattr(_webp, "WebPAnimDecoder", None) if _webp is not None else None
    if decoder_class is None:  # pragma: no cover - Pillow without its private decoder
        return _decode_pillow(data, ImageFormat.WEBP, limit)
    decoder = decoder_class(data)
    (width, height), *_ = decoder.get_info()
    if width * height > limit:
        raise ImageTooLarge(f"webp: {width}x{height} exceeds {limit} pixels")
    frame = decoder.get_next()
    del decoder
    if frame is None:
        raise CorruptImage("webp: failed to decode next frame in WebP file")
    raw = frame[0]
    if len(raw) != width * height * 4:
        raise CorruptImage("webp: decoder returned a frame of the wrong size")
    pixels: PixelArray = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 4)
    return pixels


def _webp_frame_pixels(
    data: bytes, subchunks: list[tuple[bytes, int, int]], limit: int
) -> tuple[U8Array, bool]:
    """Decode one ANMF frame by re-wrapping its bitstream as a still WebP for Pillow."""
    if not subchunks:
        raise CorruptImage("webp: empty animation frame")

    def chunk(c: tuple[bytes, int, int]) -> bytes:
        body = data[c[1] : c[2]]
        return c[0] + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) & 1)

    kind = subchunks[0][0]
    if kind == b"VP8L":
        payload, has_alpha = chunk(subchunks[0]), True
    elif kind == b"VP8 ":
        payload, has_alpha = chunk(subchunks[0]), False
    elif kind == b"ALPH" and len(subchunks) > 1 and subchunks[1][0] == b"VP8 ":
        vp8 = data[subchunks[1][1] : subchunks[1][2]]
        if len(vp8) < 10:
            raise CorruptImage("webp: truncated VP8 frame")
        w, h = (int(v) & 0x3FFF for v in struct.unpack_from("<HH", vp8, 6))
        vp8x = b"\x10\x00\x00\x00" + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
        payload = b"VP8X\x0a\x00\x00\x00" + vp8x + chunk(subchunks[0]) + chunk(subchunks[1])
        has_alpha = True
    else:
        raise CorruptImage(f"webp: unexpected {kind.decode('latin-1')!r} chunk in a frame")
    still = b"RIFF" + struct.pack("<I", len(payload) + 4) + b"WEBP" + payload
    with _open(still, "WEBP") as im:
        if im.width * im.height > limit:
            raise ImageTooLarge(f"webp: frame {im.width}x{im.height} exceeds {limit} pixels")
        im.load()
        pixels = np.asarray(im.convert("RGBA") if im.mode not in ("RGB", "RGBA") else im)
    if has_alpha and pixels.shape[2] == 3:  # VP8L without the alpha hint: all opaque
        pixels = np.concatenate([pixels, np.full((*pixels.shape[:2], 1), 255, np.uint8)], 2)
    return pixels, has_alpha


def _webp_blend_over_transparent(frame: U8Array) -> U8Array:
    """image-webp's ``do_alpha_blending(src, [0, 0, 0, 0])`` (libwebp's integer formula).

    With a transparent destination: alpha 0 gives ``[0, 0, 0, 0]``; otherwise each channel is
    ``(c * a * (2**24 // a)) >> 24`` and alpha stays ``a``.
    """
    alpha = frame[..., 3].astype(np.uint64)
    scale = np.where(alpha > 0, (1 << 24) // np.maximum(alpha, 1), 0)
    rgb = (frame[..., :3].astype(np.uint64) * alpha[..., None] * scale[..., None]) >> 24
    out = np.zeros(frame.shape, dtype=np.uint8)
    out[..., :3] = rgb.astype(np.uint8)
    out[..., 3] = frame[..., 3]
    return out


# --------------------------------------------------------------------------- PNG

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_VALID = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _png_minimal(data: bytes) -> tuple[bytes, int, int]:
    """Check the chunks the reference reads and rebuild a PNG with only what matters.

    Returns ``(png_bytes, bit_depth, colour_type)``. Up to the end of the first IDAT run, as
    the ``png`` crate (0.18) decides: a CRC error in a critical chunk (IHDR, PLTE, IDAT) is
    fatal, in an ancillary one the chunk is skipped; an unknown critical chunk, a second PLTE
    or a PLTE outside 3..768 bytes is fatal. Only IHDR, PLTE and IDAT are kept: ancillary
    chunks never change the RGB pixels (tRNS only adds alpha, which is dropped), and Pillow
    refuses some the crate skips (a short tRNS, oversized text).
    """
    pos = len(_PNG_SIG)
    kept = [_PNG_SIG]
    ihdr: bytes | None = None
    idat_seen = False
    while True:
        if idat_seen and pos == len(data):
            break  # no IEND: fine if the IDAT data is complete (Pillow checks that)
        if pos + 8 > len(data):
            raise CorruptImage("png: truncated before the image data ended")
        length, ctype = struct.unpack_from(">I4s", data, pos)
        if idat_seen and ctype != b"IDAT":
            break  # image data complete; the reference reads no further
        if ihdr is None and ctype != b"IHDR":
            raise CorruptImage(f"png: {ctype!r} chunk appeared before IHDR")
        end = pos + 8 + length
        if end + 4 > len(data):
            raise CorruptImage(f"png: truncated {ctype.decode('latin-1')!r} chunk")
        (crc,) = struct.unpack_from(">I", data, end)
        critical = not ctype[0] & 0x20
        name = ctype.decode("latin-1")
        if zlib.crc32(data[pos + 4 : end]) != crc:
            if critical:
                raise CorruptImage(f"png: CRC error in {name!r} chunk")
            pos = end + 4  # the crate skips an ancillary chunk with a bad CRC
            continue
        chunk = data[pos : end + 4]
        if ctype == b"IHDR":
            if ihdr is not None or length != 13:
                raise CorruptImage("png: bad IHDR chunk")
            ihdr = data[pos + 8 : end]
            kept.append(chunk)
        elif ctype == b"IDAT":
            idat_seen = True
            kept.append(chunk)
        elif ctype == b"IEND":
            break
        elif ctype == b"PLTE":
            if any(c[4:8] == b"PLTE" for c in kept):
                raise CorruptImage("png: Chunk PLTE must appear at most once")
            if not 3 <= length <= 768:
                raise CorruptImage("png: PLTE chunk has the wrong length")
            kept.append(chunk)
        elif critical:
            raise CorruptImage(f"png: unrecognized critical chunk {name!r}")
        pos = end + 4
    if ihdr is None or not idat_seen:
        raise CorruptImage("png: no image data")
    if ihdr[9] == 3 and not any(c[4:8] == b"PLTE" for c in kept):
        raise CorruptImage("png: palette image without a PLTE chunk")
    depth, colour, compression, filtering, interlace = ihdr[8:13]
    if depth not in _PNG_VALID.get(colour, ()):
        raise CorruptImage(f"png: invalid bit depth {depth} for colour type {colour}")
    if compression != 0 or filtering != 0 or interlace > 1:
        raise CorruptImage("png: unknown compression, filter or interlace method")
    kept.append(b"\x00\x00\x00\x00IEND\xaeB`\x82")
    return b"".join(kept), depth, colour


def _decode_png(data: bytes) -> PixelArray | Banded:
    png, depth, colour = _png_minimal(data)
    if depth == 16 and colour in (2, 4, 6):
        return _decode_png16_colour(png, colour)
    return _pillow_pixels(_load_png(png))


def _load_png(png: bytes, rawmode: str | None = None, *, check: bool = True) -> Image.Image:
    """Decode with Pillow (optionally another raw mode, same filter stride); refuse when the
    image data ends before the last row, as the png crate does.

    Pillow's zip decoder stops silently when the zlib stream ends on a row boundary and leaves
    the other rows black. So the image memory is filled with a sentinel first; if the rows the
    last pass writes still hold it, the stream is inflated once more to count its bytes (a
    real image whose last row happens to equal the sentinel only pays that count).
    """
    im = _open(png, "PNG")  # not closed: a closed image has no pixels for the bands
    if rawmode is not None:
        im.tile = [tile._replace(args=rawmode) for tile in im.tile]
    sentinel = _SENTINELS.get(im.mode) if check else None
    if sentinel is not None:
        im.im = Image.new(im.mode, im.size, sentinel).im
    try:
        im.load()
    except OSError as exc:
        repaired = _repair_adler32(png) if "broken data stream" in str(exc) else None
        if repaired is None:
            raise
        return _load_png(repaired, rawmode, check=check)
    if sentinel is not None and _last_rows_untouched(im, sentinel):
        _check_png_data_length(png, interlaced=bool(im.info.get("interlace")))
    return im


_SENTINELS: dict[str, int | tuple[int, ...]] = {
    "1": 255,
    "L": 0x5A,
    "P": 0x5A,
    "LA": (0x5A, 0xA5),
    "I;16": 0x5AA5,
    "I;16B": 0x5AA5,
    "RGB": (0x5A, 0xA5, 0x3C),
    "RGBA": (0x5A, 0xA5, 0x3C, 0xC3),
}


def _last_rows_untouched(im: Image.Image, sentinel: int | tuple[int, ...]) -> bool:
    """Whether the last row, or the last odd row (Adam7's last pass), is all sentinel."""
    width, height = im.size
    rows = {height - 1}
    if height > 1:
        rows.add(height - 1 if (height - 1) % 2 else height - 2)
    probe = Image.new(im.mode, (width, 1), sentinel).tobytes()
    return any(im.crop((0, y, width, y + 1)).tobytes() == probe for y in rows)


def _idat_stream(png: bytes) -> bytes:
    pos, idat = 8, []
    while pos + 8 <= len(png):
        length, ctype = struct.unpack_from(">I4s", png, pos)
        if ctype == b"IDAT":
            idat.append(png[pos + 8 : pos + 8 + length])
        pos += 12 + length
    return b"".join(idat)


def _repair_adler32(png: bytes) -> bytes | None:
    """The PNG with its zlib checksum corrected, if that is all that is wrong with it.

    The png crate ignores the Adler-32 at the end of the image data (``ignore_adler32``
    defaults to true); zlib, and so Pillow, refuses it. Only reached after Pillow failed:
    inflate raw (no checksum), recompute the Adler-32, put it in place.
    """
    stream = _idat_stream(png)
    if len(stream) < 6:
        return None
    inflater = zlib.decompressobj(-15)
    adler, rest = 1, stream[2:]
    try:
        while rest and not inflater.eof:
            adler = zlib.adler32(inflater.decompress(rest, 1 << 20), adler)
            rest = inflater.unconsumed_tail
        while not inflater.eof:
            out = inflater.decompress(b"", 1 << 20)
            if not out:
                return None
            adler = zlib.adler32(out, adler)
    except zlib.error:
        return None
    end = len(stream) - len(inflater.unused_data)
    stored = stream[end : end + 4]
    if stored == adler.to_bytes(4, "big"):
        return None  # the checksum was right: something else is broken
    fixed = stream[:end] + adler.to_bytes(4, "big") + stream[end + 4 :]
    ihdr_end = 8 + 12 + 13
    head = png[:ihdr_end]
    pos, palette = ihdr_end, b""
    while pos + 8 <= len(png):
        length, ctype = struct.unpack_from(">I4s", png, pos)
        if ctype == b"PLTE":
            palette = png[pos : pos + 12 + length]
        pos += 12 + length
    idat = struct.pack(">I", len(fixed)) + b"IDAT" + fixed
    idat += struct.pack(">I", zlib.crc32(idat[4:]))
    return head + palette + idat + b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _png_row_bytes(width: int, bits: int) -> int:
    return (width * bits + 7) // 8


def _check_png_data_length(png: bytes, *, interlaced: bool) -> None:
    """Inflate the IDAT data and compare its length with what the header needs."""
    width, height = struct.unpack_from(">II", png, 16)
    depth, colour = png[24], png[25]
    bits = depth * {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    if interlaced:
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                  (1, 0, 2, 2), (0, 1, 1, 2)]  # fmt: skip
        need = 0
        for x0, y0, dx, dy in passes:
            cols, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
            if cols > 0 and rows > 0:
                need += rows * (1 + _png_row_bytes(cols, bits))
    else:
        need = height * (1 + _png_row_bytes(width, bits))
    stream, inflater, got = _idat_stream(png), zlib.decompressobj(), 0
    while got < need and not inflater.eof:
        out = inflater.decompress(stream, 1 << 20)
        if not out and not stream:
            break
        got += len(out)
        stream = inflater.unconsumed_tail
    if got < need:
        raise CorruptImage("png: IDAT or fDAT chunk does not have enough data for image")


def _decode_png16_colour(png: bytes, colour: int) -> Banded:
    """16-bit RGB, RGBA, gray+alpha: Pillow keeps only the high bytes, so fetch the low ones.

    The unfilter stride comes from the raw mode's bits per pixel, so ``RGB;16L``/
    ``RGBA;16L`` (which pick the odd bytes) unfilter exactly like the ``;16B`` modes; gray+alpha
    (4 bytes a pixel) is read with plain ``RGBA``, which copies the 4 bytes as they are.
    """
    if colour == 4:
        both = _pillow_banded(_load_png(png, "RGBA"))

        def gray_band(y0: int, y1: int) -> PixelArray:
            raw = both.band(y0, y1)
            return (raw[..., 0].astype(np.uint16) << 8) | raw[..., 1]

        return Banded(both.height, both.width, gray_band)
    base = "RGB" if colour == 2 else "RGBA"
    high = _pillow_banded(_load_png(png, base + ";16B"))
    low = _pillow_banded(_load_png(png, base + ";16L", check=False))  # same stream again

    def rgb_band(y0: int, y1: int) -> PixelArray:
        return (high.band(y0, y1).astype(np.uint16) << 8) | low.band(y0, y1)

    return Banded(high.height, high.width, rgb_band)


# --------------------------------------------------------------------------- GIF


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    while True:
        size = data[pos]
        pos += 1
        if size == 0:
            return pos
        pos += size
        if pos > len(data):
            raise CorruptImage("gif: unexpected end of file")


def _decode_gif(data: bytes, limit: int) -> PixelArray:
    """First frame as the gif crate + image-rs compose it: screen-sized, 0 outside the frame."""
    try:
        return _decode_gif_frame(data, limit)
    except (IndexError, struct.error):
        raise CorruptImage("gif: unexpected end of file") from None


def _decode_gif_frame(data: bytes, limit: int) -> PixelArray:
    screen_w, screen_h, flags = struct.unpack_from("<HHB", data, 6)
    pos = 13
    global_palette = b""
    if flags & 0x80:
        size = 3 << ((flags & 7) + 1)
        global_palette = data[pos : pos + size]
        pos += size
    transparent: int | None = None
    while True:
        block = data[pos]
        pos += 1
        if block == 0x21:  # extension
            label = data[pos]
            pos += 1
            if label == 0xF9 and data[pos] >= 4:  # graphic control
                packed, index = data[pos + 1], data[pos + 4]
                transparent = index if packed & 1 else None
            pos = _skip_sub_blocks(data, pos)
        elif block == 0x2C:  # image descriptor
            break
        elif block == 0x3B:
            raise CorruptImage("gif: no image in file")
        else:
            raise CorruptImage(f"gif: unknown block type 0x{block:02x}")
    left, top, width, height, desc_flags = struct.unpack_from("<HHHHB", data, pos)
    pos += 9
    palette = global_palette
    if desc_flags & 0x80:
        size = 3 << ((desc_flags & 7) + 1)
        palette = data[pos : pos + size]
        pos += size
    if len(palette) % 3 or pos > len(data):
        raise CorruptImage("gif: unexpected end of file")
    if not palette:
        raise CorruptImage("gif: no color table available for current frame")
    if width == 0 or height == 0:
        raise CorruptImage("gif: empty frame")
    if width * height > limit:  # the frame is decoded whole, even where the screen clips it
        raise ImageTooLarge(f"gif: frame {width}x{height} exceeds the limit of {limit} pixels")
    code_size = data[pos]
    if not 1 <= code_size <= 11:
        raise CorruptImage(f"gif: invalid LZW minimum code size {code_size}")
    lzw = data[pos + 1 : _skip_sub_blocks(data, pos + 1)]
    interlace = bool(desc_flags & 0x40)
    frame = Image.frombytes("L", (width, height), lzw, "gif", code_size, interlace, -1)
    indices = np.asarray(frame)

    # Palette colour for every index (transparent too); indices past the table stay black.
    del transparent  # alpha is dropped: the transparent index keeps its palette colour
    canvas = np.zeros((screen_h, screen_w, 3), dtype=np.uint8)
    x1, y1 = min(left + width, screen_w), min(top + height, screen_h)
    if left < x1 and top < y1:
        canvas[top:y1, left:x1] = _palette_lut(palette)[indices[: y1 - top, : x1 - left]]
    return canvas


# --------------------------------------------------------------------------- JPEG


def _decode_jpeg(data: bytes, limit: int) -> PixelArray:
    """zune-jpeg's pixels via :mod:`phash_trio.image.jpeg.decoder` (imported on first use).

    No Pillow fallback: libjpeg-turbo's pixels differ from zune-jpeg's, and a file the zune
    port refuses is refused by the reference too.
    """
    from phash_trio.image.jpeg import decoder as jpegdecode

    too_large = getattr(jpegdecode, "JpegTooLargeError", ())
    unsupported = getattr(jpegdecode, "JpegUnsupportedError", ())
    try:
        pixels = jpegdecode.decode_jpeg(data, max_pixels=limit)
    except too_large as exc:
        raise ImageTooLarge(f"jpeg: {_one_line(exc)}") from None
    except unsupported as exc:
        raise UnsupportedImage(f"jpeg: {_one_line(exc)}") from None
    except jpegdecode.JpegDecodeError as exc:
        raise CorruptImage(f"jpeg: {_one_line(exc)}") from None
    arr = np.asarray(pixels, dtype=np.uint8)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3):
        return arr
    raise CorruptImage(f"jpeg: decoder returned pixels of shape {arr.shape}")
