"""GIF: the first frame as the gif crate + image-rs compose it (screen-sized, 0 outside it)."""

from __future__ import annotations

import struct

import numpy as np
from PIL import Image

from phash_trio.image.errors import CorruptImage, ImageTooLarge
from phash_trio.image.pixels import PixelArray, palette_lut

__all__ = ["decode_gif"]


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    while True:
        size = data[pos]
        pos += 1
        if size == 0:
            return pos
        pos += size
        if pos > len(data):
            raise CorruptImage("gif: unexpected end of file")


def decode_gif(data: bytes, limit: int) -> PixelArray:
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
        canvas[top:y1, left:x1] = palette_lut(palette)[indices[: y1 - top, : x1 - left]]
    return canvas
