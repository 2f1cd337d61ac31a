"""TIFF: the first IFD read strictly, and the pixel cap applied to tiles and strips."""

from __future__ import annotations

import re
import struct
import sys

import numpy as np
from PIL import Image, TiffTags

from phash_trio.image.errors import CorruptImage, ImageTooLarge
from phash_trio.image.pixels import Banded, PixelArray, open_image, pillow_banded

__all__ = [
    "tiff_check_blocks",
    "tiff_fields",
    "tiff_low_byte_rawmode",
    "tiff_rgb16",
    "tiff_size",
]


# Bytes per value of each TIFF field type Pillow reads.
_TIFF_UNIT = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
              16: 8, 17: 8, 18: 8}  # fmt: skip


def tiff_size(data: bytes) -> tuple[int, int]:
    fields = tiff_fields(data)
    if 256 not in fields or 257 not in fields:
        raise CorruptImage("tiff: no image size in the first IFD")
    return fields[256], fields[257]


#: Tags whose first value we keep: size, samples, tile and strip geometry.
_TIFF_WANTED = frozenset({256, 257, 258, 277, 278, 322, 323})
#: Types whose count is a byte count (BYTE, ASCII, SBYTE, UNDEFINED): ICC profiles, JPEG
#: tables, XMP. Pillow's "length 1" for such tags means one blob, not one byte.
_TIFF_BYTES = frozenset({1, 2, 6, 7})


def tiff_fields(data: bytes) -> dict[int, int]:
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


def tiff_check_blocks(data: bytes, limit: int) -> None:
    """The pixel cap applies to each tile and strip too: libtiff allocates a whole one.

    A 16x16 image may declare one 40000x40000 tile (1.6 GB before a pixel is read).
    """
    fields = tiff_fields(data)
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


_RGB16 = re.compile(r"^(RGB|RGBA|RGBX);16([LBN])$")
_NATIVE = "L" if sys.byteorder == "little" else "B"


def tiff_low_byte_rawmode(im: Image.Image) -> str | None:
    """For a 16-bit RGB(A) TIFF, the Pillow raw mode that unpacks the *low* bytes.

    Pillow keeps only the high byte of each 16-bit colour sample (``RGB;16L`` takes byte 1 of
    little-endian data); the reference keeps all 16 bits until ``to_luma8``. Unpacking the same
    data as the other byte order picks the low bytes instead. ``None`` for anything else.
    """
    modes = {t.args[0] if isinstance(t.args, tuple) else t.args for t in getattr(im, "tile", [])}
    if len(modes) != 1:
        return None
    match = _RGB16.match(str(modes.pop()))
    if match is None:
        return None
    order = _NATIVE if match[2] == "N" else match[2]
    return f"{match[1]};16{'B' if order == 'L' else 'L'}"


def tiff_rgb16(data: bytes, high: Image.Image, low_mode: str) -> Banded:
    """Full 16-bit samples: ``high`` (loaded as Pillow does) and a second decode of ``data``
    with ``low_mode``, combined band by band."""
    low = open_image(data, "TIFF")
    low.tile = [
        t._replace(args=(low_mode, *t.args[1:]) if isinstance(t.args, tuple) else low_mode)
        for t in low.tile
    ]
    low.load()
    high_bands, low_bands = pillow_banded(high), pillow_banded(low)

    def band(y0: int, y1: int) -> PixelArray:
        return (high_bands.band(y0, y1).astype(np.uint16) << 8) | low_bands.band(y0, y1)

    return Banded(high_bands.height, high_bands.width, band)
