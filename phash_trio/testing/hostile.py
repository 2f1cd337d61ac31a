"""Small files that cost a naive decoder seconds or gigabytes: one generator per known class.

Each builds its file from scratch (no fixtures), deterministic, at most a few hundred KB, and
describes the trap in its docstring. The hostile-input suite (tests/test_hostile.py) runs
every one through ``mean_hash`` in a limited child process (:mod:`phash_trio.testing.sandbox`)
and asserts bounded cost and a typed error or a hash; ``python -m phash_trio.testing.hostile``
prints the cost of each at the service's default limits.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from collections.abc import Callable, Sequence
from functools import partial

__all__ = ["GENERATORS", "main"]

#: The service's default MAX_IMAGE_PIXELS; generators aim at it.
CAP = 25_000_000
_SIDE = 5000  # 5000 x 5000 = the cap


def _tiff(entries: Sequence[tuple[int, int, int, int | bytes]], data: bytes) -> bytes:
    """A little-endian TIFF: header, one IFD of ``(tag, type, count, value)``, then ``data``.

    A ``bytes`` value is stored after the IFD (before ``data``); ``data`` starts at the offset
    the caller put in its strip/tile offset (see :func:`_tiff_data_offset`).
    """
    entries = sorted(entries)
    ifd_size = 2 + 12 * len(entries) + 4
    extra_at = 8 + ifd_size
    extra = b""
    packed = []
    for tag, kind, count, value in entries:
        if isinstance(value, bytes):
            field = struct.pack("<I", extra_at + len(extra))
            extra += value + b"\x00" * (len(value) & 1)
        elif kind == 3 and count == 1:
            field = struct.pack("<HH", value, 0)
        else:
            field = struct.pack("<I", value)
        packed.append(struct.pack("<HHI", tag, kind, count) + field)
    ifd = struct.pack("<H", len(entries)) + b"".join(packed) + b"\x00\x00\x00\x00"
    return b"II*\x00" + struct.pack("<I", 8) + ifd + extra + data


def _tiff_data_offset(entries: int, extra: int = 0) -> int:
    return 8 + 2 + 12 * entries + 4 + extra


#: A 16x16 8-bit gray image; the callers add compression and the strip or tile layout.
_GRAY_16X16 = [(256, 3, 1, 16), (257, 3, 1, 16), (258, 3, 1, 8), (262, 3, 1, 1), (277, 3, 1, 1)]
_GARBAGE = b"\x80\x01\x02\x03\x04\x05\x06\x07" * 3


def tiff_tile(tile: int = 40_000, compression: int = 5) -> bytes:
    """16x16 gray image in one ``tile`` x ``tile`` LZW tile: libtiff allocates the whole tile
    (1.6 GB at 40000) and complains on fd 2 ("TIFFFillTile", "Using code not yet in table")."""
    layout = [(322, 4, 1, tile), (323, 4, 1, tile), (324, 4, 1, _tiff_data_offset(9))]
    layout += [(325, 4, 1, len(_GARBAGE)), (259, 3, 1, compression)]
    return _tiff(_GRAY_16X16 + layout, _GARBAGE)


def tiff_strip() -> bytes:
    """16x16 gray image whose one LZW strip claims 40000 rows (RowsPerStrip past the height)."""
    layout = [(273, 4, 1, _tiff_data_offset(10)), (278, 4, 1, 40_000)]
    layout += [(279, 4, 1, len(_GARBAGE)), (284, 3, 1, 1), (259, 3, 1, 5)]
    return _tiff(_GRAY_16X16 + layout, _GARBAGE)


def tiff_wide_deflate(side: int = _SIDE) -> bytes:
    """A ``side`` x ``side`` 16-bit RGBA deflate TIFF of zeros (5000: 200 MB of samples in
    ~200 KB)."""
    width = height = side
    body = zlib.compress(bytes(width * 8 * height), 9)
    offset = _tiff_data_offset(11, 8)
    return _tiff(
        [
            (256, 4, 1, width),
            (257, 4, 1, height),
            (258, 3, 4, struct.pack("<4H", 16, 16, 16, 16)),
            (259, 3, 1, 8),
            (262, 3, 1, 2),
            (273, 4, 1, offset),
            (277, 3, 1, 4),
            (278, 4, 1, height),
            (279, 4, 1, len(body)),
            (284, 3, 1, 1),
            (338, 3, 1, 2),
        ],
        body,
    )


def webp_lossless(side: int = _SIDE) -> bytes:
    """A lossless WebP of one colour at the pixel cap: a few dozen bytes, 100 MB of RGBA."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (side, side), (10, 200, 30, 255)).save(
        buf, "WEBP", lossless=True, quality=0, method=0, exact=True
    )
    return buf.getvalue()


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(ctype + body)
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", crc)


def _png(width: int, height: int, depth: int, colour: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _zeros_rows(row_bytes: int, rows: int) -> bytes:
    """zlib data of ``rows`` filter-0 rows of zeros, compressed row by row (fast to build)."""
    comp = zlib.compressobj(9)
    row = bytes(row_bytes + 1)
    out = [comp.compress(row) for _ in range(rows)]
    out.append(comp.flush())
    return b"".join(out)


def png16_rgba() -> bytes:
    """A 5000x5000 16-bit RGBA PNG of zeros: ~200 KB, 200 MB of samples."""
    return _png(_SIDE, _SIDE, 16, 6, _zeros_rows(_SIDE * 8, _SIDE))


def png16_rgba_at_budget() -> bytes:
    """The largest 16-bit RGBA PNG the sample budget lets through: 4096x4096, 128 MiB."""
    return _png(4096, 4096, 16, 6, _zeros_rows(4096 * 8, 4096))


def png_half_rows() -> bytes:
    """A 64x64 RGB PNG whose (complete) zlib stream holds only 32 rows: the reference refuses."""
    raw = b"".join(b"\x00" + bytes(range(64)) * 3 for _ in range(32))
    return _png(64, 64, 8, 2, zlib.compress(raw))


def bmp_rle8(side: int = _SIDE) -> bytes:
    """RLE8 BMP: each row is one pixel then end-of-line, so the rest of every row is padding
    (Pillow pads one byte per Python loop turn: 25 M turns from ~20 KB)."""
    rle = b"\x01\x05\x00\x00" * side + b"\x00\x01"
    palette = bytes(v for i in range(256) for v in (i, i, i, 0))
    header = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(rle), 2835, 2835, 256, 0)
    offset = 14 + len(header) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(rle), 0, 0, offset) + header + palette + rle


def gif_big_frame() -> bytes:
    """A 1x1 screen whose first frame is 5000x5000 (~20 KB of LZW; decoded whole, then clipped)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("P", (_SIDE, _SIDE), 1).save(buf, "GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", 1, 1)  # the logical screen
    return bytes(data)


def _jpeg_segment(marker: int, body: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(body) + 2) + body


def jpeg_zero_huffman(components: int = 1) -> bytes:
    """A 5000x5000 baseline JPEG whose only Huffman code is sixteen 0 bits, with 16 bytes of
    entropy data: every block must be replayed from data that is not there (1 component gray,
    4 an Adobe CMYK one)."""
    side = _SIDE
    dqt = _jpeg_segment(0xDB, b"\x00" + bytes([1] * 64))
    specs = b"".join(bytes([i + 1, 0x11, 0]) for i in range(components))
    sof = _jpeg_segment(0xC0, struct.pack(">BHHB", 8, side, side, components) + specs)
    counts = bytes([0] * 15 + [1])
    dht = _jpeg_segment(0xC4, b"\x00" + counts + b"\x00" + b"\x10" + counts + b"\x00")
    selectors = b"".join(bytes([i + 1, 0x00]) for i in range(components))
    sos = _jpeg_segment(0xDA, bytes([components]) + selectors + b"\x00\x3f\x00")
    adobe = _jpeg_segment(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x00") if components == 4 else b""
    return b"\xff\xd8" + adobe + dqt + dht + sof + sos + bytes(16) + b"\xff\xd9"


def jpeg_tall_sof() -> bytes:
    """A real progressive photo (375x473) whose SOF height byte now says 65344: 24.5 MP of
    coefficients from 25 KB of data."""
    from phash_trio.testing.fuzz import GOLDEN_IMAGES

    data = bytearray(
        (GOLDEN_IMAGES / "photos" / "jpeg" / "mountain_375x473_q82_444_prog_opt.jpg").read_bytes()
    )
    sof = next(i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] == 0xC2)
    data[sof + 5 : sof + 7] = struct.pack(">H", 65344)
    return bytes(data)


GENERATORS: dict[str, Callable[[], bytes]] = {
    "tiff_tile_40000": tiff_tile,
    "tiff_strip_40000_rows": tiff_strip,
    "tiff_rgba16_deflate_at_cap": tiff_wide_deflate,
    "tiff_rgba16_deflate_at_sample_budget": partial(tiff_wide_deflate, 4096),
    "webp_lossless_at_cap": webp_lossless,
    "png_rgba16_at_cap": png16_rgba,
    "png_rgba16_at_sample_budget": png16_rgba_at_budget,
    "png_half_rows": png_half_rows,
    "bmp_rle8_eol_padding": bmp_rle8,
    "gif_frame_at_cap_in_1x1": gif_big_frame,
    "jpeg_zero_huffman_gray": jpeg_zero_huffman,
    "jpeg_zero_huffman_cmyk": partial(jpeg_zero_huffman, 4),
    "jpeg_sof_height_65344": jpeg_tall_sof,
}


def main(argv: list[str] | None = None) -> int:
    """Print size, outcome, CPU and peak RSS of every class at the default limits."""
    from phash_trio.image.meanhash import mean_hash
    from phash_trio.testing.sandbox import run_limited

    names = (argv if argv is not None else sys.argv[1:]) or list(GENERATORS)
    for name in names:
        data = GENERATORS[name]()
        out = run_limited(
            partial(mean_hash, max_pixels=CAP, max_bytes=2_000_000),
            data,
            mem_bytes=4 << 30,
            cpu_secs=60,
            wall_secs=120,
        )
        what = out.status if out.status != "raised" else (out.error_type or "").rsplit(".")[-1]
        if out.status == "returned":
            what = f"hash {out.value:016x}"
        print(
            f"{name:30} {len(data):>8} B  {what:24} call cpu {out.call_cpu_secs or 0:6.2f} s"
            f"  peak rss {out.max_rss_bytes / 2**20:7.0f} MB  {out.message[:60]}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
