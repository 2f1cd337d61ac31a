"""The mean hash: arithmetic against a scalar transcription of image-rs, decoding, typed errors."""

from __future__ import annotations

import ctypes
import io
import math
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import trio
from PIL import Image

from phash_trio.image import decode as _decode
from phash_trio.image import hashcore
from phash_trio.image import luma as _luma
from phash_trio.image import resize as _resize
from phash_trio.image.meanhash import (
    CorruptImage,
    ImageError,
    ImageTooLarge,
    UnsupportedImage,
    format_hash,
    hash_file,
    hash_gray,
    mean_hash,
    parse_hash,
)

F32 = np.float32
U8 = npt.NDArray[np.uint8]

# ---------------------------------------------------------------- scalar reference (sample.rs)

_LIBM = ctypes.CDLL("libm.so.6")
_LIBM.sinf.restype = ctypes.c_float
_LIBM.sinf.argtypes = [ctypes.c_float]


def _sinf(x: np.float32) -> np.float32:
    return F32(_LIBM.sinf(float(x)))


def _ref_lanczos3(x: np.float32) -> np.float32:
    def sinc(t: np.float32) -> np.float32:
        a = t * F32(math.pi)
        return F32(1.0) if t == 0 else F32(_sinf(a) / a)

    return F32(sinc(x) * sinc(x / F32(3.0))) if abs(x) < F32(3.0) else F32(0.0)


def _ref_weights(n: int, out: int, o: int) -> tuple[int, list[np.float32]]:
    ratio = F32(n) / F32(out)
    sratio = F32(1.0) if ratio < F32(1.0) else ratio
    support = F32(3.0) * sratio
    centre = (F32(o) + F32(0.5)) * ratio
    left = min(max(math.floor(centre - support), 0), n - 1)
    right = min(max(math.ceil(centre + support), left + 1), n)
    centre = centre - F32(0.5)
    raw = [_ref_lanczos3((F32(i) - centre) / sratio) for i in range(left, right)]
    total = F32(0.0)
    for w in raw:
        total = F32(total + w)
    return left, [F32(w / total) for w in raw]


def _ref_resize(img: U8, width: int, height: int) -> U8:
    """``imageops::resize(.., Lanczos3)`` written out scalar by scalar, as sample.rs does it."""
    src_h, src_w = img.shape
    if (src_h, src_w) == (height, width):
        return img.copy()
    tmp = [[F32(0.0)] * src_w for _ in range(height)]
    for oy in range(height):
        left, ws = _ref_weights(src_h, height, oy)
        for x in range(src_w):
            t = F32(0.0)
            for i, w in enumerate(ws):
                t = F32(t + F32(img[left + i, x]) * w)
            tmp[oy][x] = t
    out = np.zeros((height, width), dtype=np.uint8)
    for ox in range(width):
        left, ws = _ref_weights(src_w, width, ox)
        for y in range(height):
            t = F32(0.0)
            for i, w in enumerate(ws):
                t = F32(t + tmp[y][left + i] * w)
            out[y, ox] = math.floor(float(min(max(t, F32(0.0)), F32(255.0))) + 0.5)
    return out


def _ref_hash(gray: U8) -> int:
    small = _ref_resize(gray, 8, 8)
    mean = sum(int(v) for v in small.ravel()) // 64
    value = 0
    for byte_index, row in enumerate(small):
        byte = sum(1 << j for j, v in enumerate(row) if int(v) >= mean)
        value |= byte << (8 * (7 - byte_index))
    return value


def _ref_luma8(rgb: U8) -> U8:
    """``to_luma8`` with the moxcms coefficients, scalar f32, rounding half away in f64."""
    kr, kg, kb = (
        np.frombuffer(struct.pack("<I", bits), dtype="<f4")[0]
        for bits in (0x3E59C05B, 0x3F3715FC, 0x3D93CF75)
    )
    inv = F32(1.0) / F32(255.0)
    out = np.zeros(rgb.shape[:2], dtype=np.uint8)
    for (y, x), _ in np.ndenumerate(out):
        r, g, b = (F32(c) * inv for c in rgb[y, x, :3])
        lum = F32(F32(F32(F32(0.0) + r * kr) + g * kg) + b * kb)
        out[y, x] = min(255, math.floor(float(lum * F32(255.0)) + 0.5))
    return out


# ---------------------------------------------------------------- small encoders


def _png_bytes(im: Image.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **params)
    return buf.getvalue()


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _filter_rows(raw: bytes, stride: int, bpp: int, kinds: list[int]) -> bytes:
    """PNG filtering (None, Sub, Up, Average, Paeth) written plainly, one row type each."""
    rows = [raw[i : i + stride] for i in range(0, len(raw), stride)]
    prev = bytes(stride)
    out = bytearray()
    for row, kind in zip(rows, kinds, strict=True):
        out.append(kind)
        for i, value in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if kind == 0:
                pred = 0
            elif kind == 1:
                pred = a
            elif kind == 2:
                pred = b
            elif kind == 3:
                pred = (a + b) // 2
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            out.append((value - pred) & 0xFF)
        prev = row
    return bytes(out)


def _png16(samples: npt.NDArray[np.uint16], colour: int, extra: bytes = b"") -> bytes:
    """A 16-bit PNG of colour type 0/2/4/6 with every filter type used in turn."""
    height, width = samples.shape[:2]
    raw = samples.astype(">u2").tobytes()
    bpp = 2 * (samples.shape[2] if samples.ndim == 3 else 1)
    kinds = [k % 5 for k in range(height)]
    idat = zlib.compress(_filter_rows(raw, width * bpp, bpp, kinds))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + extra
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def _lzw_plain(indices: bytes, code_size: int) -> bytes:
    """GIF LZW data that never grows the code width: a clear code every 200 literals."""
    clear = 1 << code_size
    width = code_size + 1
    codes = [clear]
    for n, value in enumerate(indices):
        if n and n % 200 == 0:
            codes.append(clear)
        codes.append(value)
    codes.append(clear + 1)
    bits = 0
    nbits = 0
    out = bytearray()
    for code in codes:
        bits |= code << nbits
        nbits += width
        while nbits >= 8:
            out.append(bits & 0xFF)
            bits >>= 8
            nbits -= 8
    if nbits:
        out.append(bits)
    blocks = b"".join(
        bytes([len(out[i : i + 255])]) + out[i : i + 255] for i in range(0, len(out), 255)
    )
    return bytes([code_size]) + blocks + b"\x00"


def _gif(
    screen: tuple[int, int],
    rect: tuple[int, int, int, int],
    indices: bytes,
    *,
    global_palette: bytes | None = None,
    local_palette: bytes | None = None,
    transparent: int | None = None,
    truncate_lzw: int | None = None,
) -> bytes:
    """A one-frame GIF89a built byte by byte (palettes of 256 entries)."""
    flags = 0xF7 if global_palette is not None else 0
    out = b"GIF89a" + struct.pack("<HHBBB", *screen, flags, 0, 0)
    if global_palette is not None:
        out += global_palette.ljust(768, b"\x00")
    if transparent is not None:
        out += b"\x21\xf9\x04\x01\x00\x00" + bytes([transparent]) + b"\x00"
    left, top, width, height = rect
    desc_flags = 0x87 if local_palette is not None else 0
    out += b"\x2c" + struct.pack("<HHHHB", left, top, width, height, desc_flags)
    if local_palette is not None:
        out += local_palette.ljust(768, b"\x00")
    lzw = _lzw_plain(indices, 8)
    if truncate_lzw is not None:
        lzw = lzw[:truncate_lzw] + b"\x00"
    return out + lzw + b"\x3b"


# ---------------------------------------------------------------- arithmetic


@pytest.mark.parametrize(("n", "out"), [(1, 8), (5, 8), (8, 3), (13, 8), (100, 8), (2999, 8)])
def test_one_dimensional_resize_matches_scalar_reference(n: int, out: int) -> None:
    """A 1-pixel-tall strip resized along its length only uses the weights of sample.rs."""
    rng = np.random.default_rng(n * 31 + out)
    img = rng.integers(0, 256, (1, n), dtype=np.uint8)
    assert np.array_equal(_resize.resize_gray(img, out, 1), _ref_resize(img, out, 1))
    column = np.ascontiguousarray(img.T)
    assert np.array_equal(_resize.resize_gray(column, 1, out), _ref_resize(column, 1, out))


@pytest.mark.parametrize(
    ("height", "width"),
    [(1, 1), (3, 5), (8, 8), (8, 21), (21, 8), (37, 101), (64, 64), (9, 150), (211, 163)],
)
def test_resize_matches_scalar_reference(height: int, width: int) -> None:
    """The compiled Lanczos3 resize equals the scalar f32 transcription pixel for pixel."""
    rng = np.random.default_rng(height * 1000 + width)
    img = rng.integers(0, 256, (height, width), dtype=np.uint8)
    assert np.array_equal(_resize.resize_gray(img, 8, 8), _ref_resize(img, 8, 8))


def test_resize_matches_reference_on_smooth_image() -> None:
    """A smooth gradient, where many values sit near .5, also resizes exactly."""
    y, x = np.mgrid[0:47, 0:61]
    img = ((x * 3 + y * 2) % 256).astype(np.uint8)
    assert np.array_equal(_resize.resize_gray(img, 8, 8), _ref_resize(img, 8, 8))
    assert np.array_equal(_resize.resize_gray(img, 13, 5), _ref_resize(img, 13, 5))


def test_hash_gray_matches_scalar_reference_on_random_images() -> None:
    """hash_gray (compiled resize, mean and packing) equals the scalar chain on varied sizes."""
    rng = np.random.default_rng(5)
    for height, width in [(1, 1), (2, 9), (17, 3), (90, 120), (130, 77)]:
        gray = rng.integers(0, 256, (height, width), dtype=np.uint8)
        assert hash_gray(gray) == _ref_hash(gray), (height, width)


def test_compiled_luma_rounds_exactly_for_every_colour() -> None:
    """hashcore's to_luma8 equals the f32 table for all 2**24 colours."""
    table = _luma.luma8_table()  # index r | g << 8 | b << 16
    colours = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([colours & 255, (colours >> 8) & 255, colours >> 16], axis=1).astype(np.uint8)
    luma = np.frombuffer(hashcore.luma(rgb), dtype=np.uint8)
    assert np.array_equal(luma, table)


def test_luma_table_rounds_exactly_for_every_colour() -> None:
    """All 2**24 entries of the f32-rounded luma table equal an f64 half-away rounding."""
    table = _luma.luma8_table().reshape(256, 256, 256)  # [b, g, r]
    tr, tg, tb = _luma.luma_tables(8)
    for blue in range(0, 256, 1):
        total = (tr[None, :] + tg[:, None]) + tb[blue]
        exact = np.floor((total * F32(255.0)).astype(np.float64) + 0.5)
        assert exact.max() <= 255
        assert np.array_equal(table[blue], exact.astype(np.uint8))


def test_luma_matches_scalar_reference() -> None:
    """RGB to gray follows image-rs to_luma8 (moxcms coefficients, f32, half away)."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    rgb[0, :3] = [[255, 255, 255], [0, 0, 0], [1, 2, 3]]
    assert np.array_equal(_decode.luma_from_rgb8(rgb), _ref_luma8(rgb))


def test_whole_hash_matches_scalar_reference() -> None:
    """mean_hash of an RGB PNG equals luma + resize + mean + packing done scalar by scalar."""
    rng = np.random.default_rng(11)
    rgb = rng.integers(0, 256, (29, 40, 3), dtype=np.uint8)
    data = _png_bytes(Image.fromarray(rgb, "RGB"))
    assert mean_hash(data) == _ref_hash(_ref_luma8(rgb))


# ---------------------------------------------------------------- hash semantics


def test_flat_image_hashes_to_all_ones() -> None:
    """Every value equals the mean, and the comparison is >=, so a flat image is all ones."""
    for mode, colour in [("L", 77), ("RGB", (10, 200, 30)), ("RGBA", (0, 0, 0, 0))]:
        data = _png_bytes(Image.new(mode, (37, 23), colour))
        assert format_hash(mean_hash(data)) == "ffffffffffffffff"


def test_bit_order_is_lsb_first_row_major() -> None:
    """Pixel (row r, column c) of the 8x8 grid is bit c of byte r; byte 0 is the top row."""
    for row, col in [(0, 0), (0, 7), (3, 2), (7, 7)]:
        gray = np.zeros((8, 8), dtype=np.uint8)
        gray[row, col] = 255  # mean = 255 // 64 = 3: only this pixel is >= mean
        expected = (1 << col) << (8 * (7 - row))
        assert mean_hash(_png_bytes(Image.fromarray(gray, "L"))) == expected


def test_value_equal_to_mean_sets_the_bit() -> None:
    """A pixel exactly at the (integer) mean gets a 1 bit: the test is >=, not >."""
    gray = np.ones((8, 8), dtype=np.uint8)
    gray[2, 5] = 0
    gray[6, 1] = 2  # sum 64, mean 1: every pixel but (2, 5) is >= 1
    expected = 0xFFFF_FFFF_FFFF_FFFF & ~((1 << 5) << (8 * 5))
    assert mean_hash(_png_bytes(Image.fromarray(gray, "L"))) == expected
    assert hash_gray(gray) == expected


def test_format_and_parse_round_trip() -> None:
    """format_hash writes 16 lowercase digits and parse_hash reads them (any case) back."""
    for value in [0, 1, 0x0123456789ABCDEF, 2**64 - 1]:
        text = format_hash(value)
        assert len(text) == 16 and text == text.lower()
        assert parse_hash(text) == value
        assert parse_hash(text.upper()) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "123",
        "0123456789abcdef0",
        "0x0123456789abcd",
        " 0123456789abcdef",
        "0123456789abcdef\n",
        "+123456789abcdef",
        "0123_456789abcde",
        "0123456789abcdeg",
        "٠١٢٣٤٥٦٧٨٩abcdef",
    ],
)
def test_parse_hash_rejects_bad_text(text: str) -> None:
    """Anything but exactly 16 ASCII hex digits is a ValueError."""
    with pytest.raises(ValueError, match="16-hex-digit"):
        parse_hash(text)


def test_format_hash_rejects_out_of_range() -> None:
    """Negative, >= 2**64 and non-int values are refused."""
    for bad in [-1, 2**64]:
        with pytest.raises(ValueError, match="outside"):
            format_hash(bad)
    with pytest.raises(TypeError):
        format_hash(True)


# ---------------------------------------------------------------- typed errors


def test_empty_input_is_unsupported() -> None:
    """Zero bytes is UnsupportedImage, not a crash."""
    with pytest.raises(UnsupportedImage, match="empty"):
        mean_hash(b"")


def test_random_bytes_are_unsupported() -> None:
    """Bytes with no known magic number are UnsupportedImage, whatever follows."""
    data = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    with pytest.raises(UnsupportedImage, match="not a supported image format"):
        mean_hash(b"\x00" + data)


def test_formats_the_reference_lacks_are_unsupported() -> None:
    """ICO, QOI, PPM and friends are refused even though Pillow could read some of them."""
    im = Image.new("RGB", (16, 16), "red")
    for fmt in ["ICO", "PPM", "TGA", "QOI"]:
        buf = io.BytesIO()
        im.save(buf, fmt)
        with pytest.raises(UnsupportedImage):
            mean_hash(buf.getvalue())


def test_truncated_png_is_corrupt() -> None:
    """A PNG cut in its image data is CorruptImage, with a one-line message."""
    rng = np.random.default_rng(5)
    data = _png_bytes(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    for cut in [20, 40, len(data) // 2, len(data) - 13]:
        with pytest.raises(CorruptImage) as info:
            mean_hash(data[:cut])
        assert "\n" not in str(info.value)


def test_truncated_jpeg_header_is_corrupt() -> None:
    """A JPEG cut before its frame header or scan is CorruptImage."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(buf, "JPEG")
    data = buf.getvalue()
    for cut in [3, 10, data.index(b"\xff\xda") + 4]:
        with pytest.raises(CorruptImage):
            mean_hash(data[:cut])


def test_png_crc_error_before_image_end_is_corrupt() -> None:
    """A bad CRC in a chunk the reference reads is refused, as the png crate does."""
    data = bytearray(_png_bytes(Image.new("L", (9, 9), 3)))
    idat = data.index(b"IDAT")
    data[idat + 6] ^= 0xFF
    with pytest.raises(CorruptImage, match="CRC"):
        mean_hash(bytes(data))


def test_png_chunk_before_ihdr_is_corrupt() -> None:
    """IHDR must come first (pillow/broken.png's failure in the reference)."""
    good = _png_bytes(Image.new("L", (9, 9), 3))
    data = good[:8] + _chunk(b"tEXt", b"a\x00b") + good[8:]
    with pytest.raises(CorruptImage, match="IHDR"):
        mean_hash(data)


def test_png_ending_after_complete_image_data_is_hashed() -> None:
    """No IEND, or a broken chunk after the last IDAT, is fine: nothing is read there."""
    good = _png_bytes(Image.new("L", (9, 9), 3))
    no_iend = good[: good.index(b"IEND") - 4]
    assert mean_hash(no_iend) == mean_hash(good)
    assert mean_hash(no_iend + _chunk(b"tEXt", b"k\x00v")[:-3]) == mean_hash(good)


def test_palette_png_without_plte_is_corrupt() -> None:
    """An indexed PNG needs its palette; without PLTE it is refused."""
    good = _png_bytes(Image.new("P", (9, 9), 1))
    start = good.index(b"PLTE") - 4
    (length,) = struct.unpack(">I", good[start : start + 4])
    with pytest.raises(CorruptImage, match="PLTE"):
        mean_hash(good[:start] + good[start + 12 + length :])


def test_huge_text_chunk_is_ignored() -> None:
    """Text chunks do not matter (no Pillow text limit applies): the pixels are hashed."""
    im = Image.new("L", (9, 9), 3)
    good = _png_bytes(im)
    at = good.index(b"IDAT") - 4
    bomb = _chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"x" * 20_000_000))
    assert mean_hash(good[:at] + bomb + good[at:]) == mean_hash(good)


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b""))


def test_huge_dimensions_rejected_from_header_without_allocating() -> None:
    """Headers claiming 100000x100000 are ImageTooLarge before any pixel buffer exists."""
    jpeg_sof = (
        b"\xff\xd8\xff\xc0\x00\x11\x08" + struct.pack(">HH", 65000, 65000) + b"\x03" + bytes(9)
    )
    webp = b"RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00" + b"\xff\xff\x01" * 2
    cases = [
        _png_header_only(100_000, 100_000),
        b"GIF89a" + struct.pack("<HHBBB", 60000, 60000, 0, 0, 0) + b"\x3b",
        jpeg_sof,
        webp,
    ]
    tracemalloc.start()
    try:
        for data in cases:
            with pytest.raises(ImageTooLarge, match="limit"):
                mean_hash(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000


def test_max_pixels_is_inclusive() -> None:
    """An image of exactly max_pixels is hashed; one pixel more is ImageTooLarge."""
    data = _png_bytes(Image.new("L", (100, 50), 9))
    assert mean_hash(data, max_pixels=5000) == 2**64 - 1
    with pytest.raises(ImageTooLarge):
        mean_hash(data, max_pixels=4999)


def test_max_bytes_caps_the_input() -> None:
    """More than max_bytes is ImageTooLarge before decoding; exactly max_bytes is fine."""
    data = _png_bytes(Image.new("L", (10, 10), 9))
    assert mean_hash(data, max_bytes=len(data)) == 2**64 - 1
    with pytest.raises(ImageTooLarge, match="bytes"):
        mean_hash(data, max_bytes=len(data) - 1)


def test_errors_share_one_base() -> None:
    """Every typed error is an ImageError, so callers need one except clause."""
    for cls in (ImageTooLarge, UnsupportedImage, CorruptImage):
        assert issubclass(cls, ImageError)


# ---------------------------------------------------------------- decoding details


def test_exif_orientation_is_not_applied() -> None:
    """A JPEG tagged 'rotate 90' hashes its stored pixel grid, like the reference."""
    rng = np.random.default_rng(9)
    im = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    plain, tagged, rotated = io.BytesIO(), io.BytesIO(), io.BytesIO()
    im.save(plain, "JPEG", quality=95)
    im.save(tagged, "JPEG", quality=95, exif=exif.tobytes())
    im.transpose(Image.Transpose.ROTATE_270).save(rotated, "JPEG", quality=95)
    assert mean_hash(tagged.getvalue()) == mean_hash(plain.getvalue())
    assert mean_hash(tagged.getvalue()) != mean_hash(rotated.getvalue())


def test_same_pixels_same_hash_across_lossless_formats() -> None:
    """PNG, lossless WebP, BMP and TIFF of one RGB image decode to the same hash."""
    rng = np.random.default_rng(4)
    im = Image.fromarray(rng.integers(0, 256, (30, 44, 3), dtype=np.uint8), "RGB")
    hashes = set()
    for fmt, params in [("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {})]:
        buf = io.BytesIO()
        im.save(buf, fmt, **params)
        hashes.add(mean_hash(buf.getvalue()))
    assert hashes == {_ref_hash(_ref_luma8(np.asarray(im)))}


def test_alpha_is_dropped_not_composited() -> None:
    """RGBA and RGB with the same colour channels hash alike, whatever the alpha."""
    rng = np.random.default_rng(8)
    rgba = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
    with_alpha = mean_hash(_png_bytes(Image.fromarray(rgba, "RGBA")))
    assert with_alpha == mean_hash(_png_bytes(Image.fromarray(rgba[..., :3].copy(), "RGB")))


def test_palette_png_uses_palette_colours() -> None:
    """A palette PNG hashes like the RGB image its palette describes."""
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (19, 27, 3), dtype=np.uint8)
    pal = Image.fromarray(rgb, "RGB").quantize(64)
    expected = mean_hash(_png_bytes(pal.convert("RGB")))
    assert mean_hash(_png_bytes(pal)) == expected
    assert mean_hash(_png_bytes(pal, bits=8, transparency=3)) == expected


@pytest.mark.parametrize("colour", [0, 2, 4, 6])
def test_png_16bit_keeps_all_16_bits(colour: int) -> None:
    """16-bit PNGs convert from the full samples (Pillow alone keeps only the high byte)."""
    rng = np.random.default_rng(colour)
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    shape = (11, 13, channels) if channels > 1 else (11, 13)
    samples = rng.integers(0, 65536, shape, dtype=np.uint16)
    samples.reshape(-1)[:4] = [0x01FF, 0x80FF, 0xFF80, 0x0080]  # low byte changes the result
    gray = _decode.decode_gray(_png16(samples, colour), max_pixels=10_000)
    if colour in (0, 4):
        luma16 = samples if colour == 0 else samples[..., 0]
        expected = ((luma16.astype(np.uint32) + 128) // 257).astype(np.uint8)
    else:
        kr, kg, kb = _luma.KR, _luma.KG, _luma.KB
        inv = F32(1.0) / F32(65535.0)
        r, g, b = (samples[..., i].astype(F32) * inv for i in range(3))
        lum = ((r * kr + g * kg) + b * kb) * F32(255.0)
        expected = np.floor(lum.astype(np.float64) + 0.5).clip(0, 255).astype(np.uint8)
    assert np.array_equal(gray, expected)


def test_gif_frame_is_placed_on_a_black_screen() -> None:
    """Outside the first frame's rectangle the screen is 0; inside, the palette colours."""
    gray_palette = bytes(v for i in range(256) for v in (i, i, i))  # index i -> (i, i, i)
    data = _gif(
        (6, 5), (2, 1, 3, 2), bytes([200, 100, 50, 10, 20, 30]), global_palette=gray_palette
    )
    expected = np.zeros((5, 6), dtype=np.uint8)
    expected[1:3, 2:5] = [[200, 100, 50], [10, 20, 30]]
    assert np.array_equal(_decode.decode_gray(data, max_pixels=100), expected)


def test_gif_transparent_index_keeps_its_palette_colour() -> None:
    """The transparent index shows its palette colour (alpha dropped), frame clipped to screen."""
    palette = bytes([255, 0, 0]) + bytes([0, 0, 255])
    data = _gif((3, 2), (1, 0, 4, 2), bytes([0, 1, 0, 1] * 2), local_palette=palette, transparent=0)
    red = _decode.luma_from_rgb8(np.array([[[255, 0, 0]]], dtype=np.uint8))[0, 0]
    blue = _decode.luma_from_rgb8(np.array([[[0, 0, 255]]], dtype=np.uint8))[0, 0]
    row = [0, red, blue]
    assert _decode.decode_gray(data, max_pixels=100).tolist() == [row, row]


def test_gif_without_palette_is_corrupt() -> None:
    """No global or local colour table is an error (pillow/no_palette.gif in the reference)."""
    data = _gif((2, 2), (0, 0, 2, 2), bytes(4))
    with pytest.raises(CorruptImage, match="color table"):
        mean_hash(data)


def test_gif_with_missing_pixels_is_corrupt() -> None:
    """LZW data ending before the frame is full is refused (the gif crate says truncated)."""
    pal = bytes(range(255)) * 3
    data = _gif((40, 40), (0, 0, 40, 40), bytes(1600), global_palette=pal, truncate_lzw=300)
    with pytest.raises(CorruptImage):
        mean_hash(data)


def _animated_webp(
    frame_vp8l: bytes, size: tuple[int, int], at: tuple[int, int], flags: int
) -> bytes:
    """A one-frame animated WebP (canvas ``size``) holding a VP8L frame at ``at``."""
    bits = int.from_bytes(frame_vp8l[9:13], "little")
    width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    body = b"".join(
        v.to_bytes(3, "little") for v in (at[0] // 2, at[1] // 2, width - 1, height - 1, 100)
    )
    body += bytes([flags]) + frame_vp8l
    anmf = b"ANMF" + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) & 1)
    canvas = (size[0] - 1).to_bytes(3, "little") + (size[1] - 1).to_bytes(3, "little")
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x12\x00\x00\x00" + canvas
    anim = b"ANIM" + struct.pack("<I", 6) + b"\xff\xff\xff\xff\x00\x00"  # white background
    payload = b"WEBP" + vp8x + anim + anmf
    return b"RIFF" + struct.pack("<I", len(payload)) + payload


def test_animated_webp_first_frame_is_composited_like_image_webp() -> None:
    """First frame on a transparent canvas (background colour ignored); blending is integer."""
    rng = np.random.default_rng(6)
    rgba = rng.integers(0, 256, (6, 10, 4), dtype=np.uint8)
    rgba[0, :4, 3] = 0
    rgba[1, :4, 3] = 255
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "WEBP", lossless=True, exact=True)
    vp8l = buf.getvalue()[12:]
    copied = _decode.decode_gray(_animated_webp(vp8l, (16, 12), (4, 2), 0x02), max_pixels=999)
    expected = np.zeros((12, 16), dtype=np.uint8)
    expected[2:8, 4:14] = _decode.luma_from_rgb8(rgba)
    assert np.array_equal(copied, expected)

    blended = _decode.decode_gray(_animated_webp(vp8l, (16, 12), (4, 2), 0x00), max_pixels=999)
    a = rgba[..., 3:4].astype(np.uint64)
    rgb = (rgba[..., :3] * a * np.where(a > 0, (1 << 24) // np.maximum(a, 1), 0)) >> 24
    expected[2:8, 4:14] = _decode.luma_from_rgb8(rgb.astype(np.uint8))
    assert np.array_equal(blended, expected)
    assert blended[2, 4] == 0  # alpha 0: black, whatever RGB the frame stored


def test_animated_webp_from_pillow_hashes_its_first_frame() -> None:
    """An opaque two-frame animation hashes like its first frame as a still."""
    rng = np.random.default_rng(10)
    frames = [Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)) for _ in "ab"]
    anim, still = io.BytesIO(), io.BytesIO()
    frames[0].save(anim, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    frames[0].save(still, "WEBP", lossless=True)
    assert anim.getvalue()[12:16] == b"VP8X"
    assert mean_hash(anim.getvalue()) == mean_hash(still.getvalue())


def test_hash_file_reads_a_path(tmp_path: Path) -> None:
    """hash_file returns the hex of the file's mean hash."""
    path = tmp_path / "flat.webp"
    Image.new("RGB", (31, 17), (1, 2, 3)).save(path, "WEBP", lossless=True)
    assert hash_file(path) == "ffffffffffffffff"


async def test_mean_hash_is_thread_safe() -> None:
    """Hashing different images in worker threads at once gives the sequential results."""
    rng = np.random.default_rng(12)
    images = [
        _png_bytes(Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)))
        for _ in range(6)
    ]
    expected = [mean_hash(data) for data in images]
    got: dict[int, int] = {}

    async def one(i: int) -> None:
        got[i] = await trio.to_thread.run_sync(mean_hash, images[i])

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            for i in range(len(images)):
                nursery.start_soon(one, i)
    assert [got[i] for i in range(len(images))] == expected


def _mutations(data: bytes, rng: np.random.Generator, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        d = bytearray(data)
        kind = int(rng.integers(3))
        at = int(rng.integers(len(d)))
        if kind == 0:
            for pos in rng.integers(0, len(d), int(rng.integers(1, 6))):
                d[int(pos)] = int(rng.integers(256))
        elif kind == 1:
            del d[at : at + int(rng.integers(1, 40))]
        else:
            d[at:at] = rng.integers(0, 256, int(rng.integers(1, 20)), dtype=np.uint8).tobytes()
        out.append(bytes(d))
    return out


def test_mutated_files_give_a_hash_or_a_typed_error() -> None:
    """Flipped, cut and inserted bytes in every format never escape as another exception."""
    rng = np.random.default_rng(2024)
    im = Image.fromarray(rng.integers(0, 256, (21, 26, 3), dtype=np.uint8), "RGB")
    seeds = []
    for fmt, params in [
        ("PNG", {}),
        ("GIF", {}),
        ("WEBP", {}),
        ("WEBP", {"lossless": True}),
        ("BMP", {}),
        ("TIFF", {}),
        ("JPEG", {}),
    ]:
        buf = io.BytesIO()
        (im.convert("P") if fmt == "GIF" else im).save(buf, fmt, **params)
        seeds.append(buf.getvalue())
    outcomes: set[str] = set()
    for seed in seeds:
        for data in _mutations(seed, rng, 80):
            try:
                mean_hash(data)
            except ImageError as exc:
                assert "\n" not in str(exc)
                outcomes.add(type(exc).__name__)
            else:
                outcomes.add("hashed")
    assert {"hashed", "CorruptImage"} <= outcomes
