"""PNG: chunks walked as the png crate 0.18 walks them, then Pillow unfilters the image data.

16-bit colour samples are recovered in full by decoding the IDAT stream a second time with a
low-byte raw mode; image data that ends before the last row is refused as the crate refuses it.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image

from phash_trio.image.errors import CorruptImage
from phash_trio.image.pixels import Banded, PixelArray, open_image, pillow_banded, pillow_pixels

__all__ = ["decode_png"]


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


def decode_png(data: bytes) -> PixelArray | Banded:
    png, depth, colour = _png_minimal(data)
    if depth == 16 and colour in (2, 4, 6):
        return _decode_png16_colour(png, colour)
    return pillow_pixels(_load_png(png))


def _load_png(png: bytes, rawmode: str | None = None, *, check: bool = True) -> Image.Image:
    """Decode with Pillow (optionally another raw mode, same filter stride); refuse when the
    image data ends before the last row, as the png crate does.

    Pillow's zip decoder stops silently when the zlib stream ends on a row boundary and leaves
    the other rows black. So the image memory is filled with a sentinel first; if the rows the
    last pass writes still hold it, the stream is inflated once more to count its bytes (a
    real image whose last row happens to equal the sentinel only pays that count).
    """
    im = open_image(png, "PNG")  # not closed: a closed image has no pixels for the bands
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
        both = pillow_banded(_load_png(png, "RGBA"))

        def gray_band(y0: int, y1: int) -> PixelArray:
            raw = both.band(y0, y1)
            return (raw[..., 0].astype(np.uint16) << 8) | raw[..., 1]

        return Banded(both.height, both.width, gray_band)
    base = "RGB" if colour == 2 else "RGBA"
    high = pillow_banded(_load_png(png, base + ";16B"))
    low = pillow_banded(_load_png(png, base + ";16L", check=False))  # same stream again

    def rgb_band(y0: int, y1: int) -> PixelArray:
        return (high.band(y0, y1).astype(np.uint16) << 8) | low.band(y0, y1)

    return Banded(high.height, high.width, rgb_band)
