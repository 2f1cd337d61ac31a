"""Hostile inputs: every known cost trap runs in a limited child process and stays bounded."""

from __future__ import annotations

import io
import struct
import zlib
from functools import partial

import numpy as np
import pytest
from PIL import Image, ImageCms

from phash_trio.image.bmprle import use_fast_rle
from phash_trio.image.decode import SAMPLE_BUDGET, decode_gray
from phash_trio.image.meanhash import CorruptImage, ImageTooLarge, mean_hash
from phash_trio.testing import hostile
from phash_trio.testing.sandbox import run_limited

LIMITS = {"max_pixels": hostile.CAP, "max_bytes": 2_000_000}
#: The documented target is 2 s of CPU; the test allows for a loaded 2-core CI machine.
CPU_SECS = 3.0
PEAK_BYTES = 400 << 20

#: What each class must end as: a hash, or the ImageError subclass named.
EXPECTED = {
    "jpeg_zero_huffman_gray": "hash",
    "jpeg_zero_huffman_cmyk": "hash",
    "jpeg_sof_height_65344": "hash",
    "tiff_tile_40000": "ImageTooLarge",
    "tiff_strip_40000_rows": "CorruptImage",
    "tiff_rgba16_deflate_at_cap": "ImageTooLarge",
    "tiff_rgba16_deflate_at_sample_budget": "hash",
    "webp_lossless_at_cap": "hash",
    "png_rgba16_at_cap": "ImageTooLarge",
    "png_rgba16_at_sample_budget": "hash",
    "png_half_rows": "CorruptImage",
    "bmp_rle8_eol_padding": "hash",
    "gif_frame_at_cap_in_1x1": "hash",
}


#: JPEG classes of issue 9 item 4, left out until the jpeg branch (the zune-jpeg core and its
#: work-bounded replay) lands: measured today 2.7 s (gray), 5.5 s / 418 MB (CMYK), 4.1 s (SOF
#: height). On merge, move each into EXPECTED as "hash" (or its ImageError).
PENDING_JPEG: tuple[str, ...] = ()  # the compiled JPEG core brought all three within budget


def test_every_generator_has_an_expectation() -> None:
    """No generator is left out of the suite below (JPEG ones wait for the jpeg branch)."""
    assert set(EXPECTED) | set(PENDING_JPEG) == set(hostile.GENERATORS)
    assert not set(EXPECTED) & set(PENDING_JPEG)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostile_input_costs_little_and_ends_typed(name: str) -> None:
    """Under a 1 GB address-space and 10 s CPU limit: a hash or the expected ImageError,
    within the CPU and peak-RSS budget (the numbers are in the README)."""
    data = hostile.GENERATORS[name]()
    assert len(data) <= 2_000_000
    out = run_limited(partial(mean_hash, **LIMITS), data, mem_bytes=1 << 30, cpu_secs=10)
    expected = EXPECTED[name]
    if expected == "hash":
        assert out.status == "returned", out
    else:
        assert out.raised(expected), out
        assert "\n" not in out.message
    assert out.call_cpu_secs is not None and out.call_cpu_secs <= CPU_SECS, out
    assert out.max_rss_bytes <= PEAK_BYTES, out


def _tiff(im: Image.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "TIFF", **params)
    return buf.getvalue()


def _rgb(seed: int, shape: tuple[int, int] = (30, 44)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8), "RGB")


def test_tiff_with_icc_profile_hashes_like_the_png() -> None:
    """A TIFF carrying an ICC profile (a multi-byte UNDEFINED tag) decodes; it was refused."""
    im = _rgb(1)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    im.save(buf, "PNG")
    assert mean_hash(_tiff(im, icc_profile=icc)) == mean_hash(buf.getvalue())


def test_jpeg_compressed_tiff_hashes() -> None:
    """A JPEG-compressed TIFF (JPEGTables, YCbCr tags) decodes; it was refused."""
    im = _rgb(2, (48, 64))
    gray = decode_gray(_tiff(im, compression="jpeg"), max_pixels=10_000)
    assert gray.shape == (48, 64)


def test_tiff_tile_larger_than_the_cap_is_refused_before_decoding() -> None:
    """A tile past the pixel cap is ImageTooLarge even when the image itself is tiny."""
    with pytest.raises(ImageTooLarge, match="tile 40000x40000"):
        mean_hash(hostile.tiff_tile(), **LIMITS)


def test_sample_budget_refuses_16_bit_colour_past_it() -> None:
    """16-bit RGBA past the sample budget is refused from the header; at it, it hashes."""
    assert SAMPLE_BUDGET == 4096 * 4096 * 8
    with pytest.raises(ImageTooLarge, match="MiB of samples"):
        mean_hash(hostile.png16_rgba(), **LIMITS)


# ------------------------------------------------------------------------------- PNG data


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _png(width: int, height: int, raw: bytes, *, interlace: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, interlace)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def test_png_whose_data_ends_on_a_row_boundary_is_refused() -> None:
    """Half the rows in a complete zlib stream: refused as the png crate refuses it."""
    with pytest.raises(CorruptImage, match="not have enough data"):
        mean_hash(hostile.png_half_rows())


def test_interlaced_png_missing_its_last_pass_is_refused() -> None:
    """Adam7 data that stops before pass 7 (the odd rows) is refused too."""
    width, height = 8, 8
    full = Image.new("L", (width, height), 77)
    buf = io.BytesIO()
    full.save(buf, "PNG", interlace=1)
    # Passes 1-6 of an 8x8 gray image: rows*(1 + cols) bytes each.
    passes = [(1, 1), (1, 1), (1, 2), (2, 2), (2, 4), (4, 4)]
    raw = b"".join(bytes(1 + cols) * rows for rows, cols in passes)
    with pytest.raises(CorruptImage, match="not have enough data"):
        mean_hash(_png(width, height, raw, interlace=1))
    complete = raw + bytes(1 + 8) * 4
    assert mean_hash(_png(width, height, complete, interlace=1)) == mean_hash(
        _png(width, height, bytes(1 + 8) * 8)
    )


def test_png_whose_last_row_matches_the_sentinel_still_hashes() -> None:
    """A complete image whose last row holds the sentinel value pays a count and hashes."""
    rows = [bytes([0]) + bytes([0x5A]) * 5 for _ in range(4)]
    rows[0] = bytes([0]) + bytes([10, 20, 30, 40, 50])
    gray = decode_gray(_png(5, 4, b"".join(rows)), max_pixels=100)
    assert gray[-1].tolist() == [0x5A] * 5 and gray[0].tolist() == [10, 20, 30, 40, 50]


# ------------------------------------------------------------------------------- BMP RLE


def _bmp_rle(width: int, height: int, rle: bytes, *, rle4: bool) -> bytes:
    bits, colours = (4, 16) if rle4 else (8, 256)
    palette = bytes(v for i in range(colours) for v in (i * 7 % 256, i * 13 % 256, i * 29 % 256, 0))
    header = struct.pack(
        "<IiiHHIIiiII", 40, width, height, 1, bits, 2 if rle4 else 1, len(rle), 0, 0, colours, 0
    )
    offset = 14 + len(header) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(rle), 0, 0, offset) + header + palette + rle


def _random_rle(rng: np.random.Generator, rle4: bool) -> bytes:
    out = bytearray()
    for _ in range(int(rng.integers(0, 60))):
        kind = int(rng.integers(6))
        if kind < 3:  # encoded run
            out += bytes([int(rng.integers(1, 60)), int(rng.integers(256))])
        elif kind == 3:  # end of line
            out += b"\x00\x00"
        elif kind == 4:  # delta
            out += bytes([0, 2, int(rng.integers(0, 10)), int(rng.integers(0, 3))])
        else:  # absolute run, sometimes padded to a word
            count = int(rng.integers(3, 50))
            size = (count + 1) // 2 if rle4 else count
            out += bytes([0, count]) + rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            if rng.integers(2):
                out += b"\x00"
    if rng.integers(4) == 0:
        out = out[: int(rng.integers(0, len(out) + 1))]
    return bytes(out)


def _load(data: bytes, fast: bool) -> tuple[str, bytes | str]:
    im = Image.open(io.BytesIO(data))
    if fast:
        use_fast_rle(im)
    try:
        im.load()
    except (OSError, ValueError) as exc:
        return "error", f"{type(exc).__name__}: {exc}"
    return "ok", im.tobytes()


def test_fast_rle_decoder_gives_pillows_bytes() -> None:
    """On 600 random RLE8/RLE4 streams (runs, EOLs, deltas, absolute runs, cuts) the fast
    decoder yields exactly Pillow's pixels, or the same error."""
    rng = np.random.default_rng(3)
    for trial in range(600):
        rle4 = bool(trial % 2)
        width, height = int(rng.integers(1, 40)), int(rng.integers(1, 30))
        data = _bmp_rle(width, height, _random_rle(rng, rle4), rle4=rle4)
        assert _load(data, fast=True) == _load(data, fast=False), trial


# ------------------------------------------------------------------------------- TIFF 16-bit


def _tiff16(samples: np.ndarray, compression: int) -> bytes:
    """A little-endian 16-bit RGB(A) TIFF, one strip, uncompressed (1) or deflate (8)."""
    height, width, spp = samples.shape
    raw = samples.astype("<u2").tobytes()
    body = zlib.compress(raw) if compression == 8 else raw
    bits = struct.pack(f"<{spp}H", *([16] * spp))
    entries: list[tuple[int, int, int, int | bytes]] = [
        (256, 3, 1, width),
        (257, 3, 1, height),
        (258, 3, spp, bits),
        (259, 3, 1, compression),
        (262, 3, 1, 2),
        (277, 3, 1, spp),
        (278, 4, 1, height),
        (279, 4, 1, len(body)),
    ]
    if spp == 4:
        entries.append((338, 3, 1, 2))
    offset = hostile._tiff_data_offset(len(entries) + 1, len(bits))
    return hostile._tiff([*entries, (273, 4, 1, offset)], body)


@pytest.mark.parametrize(("spp", "compression"), [(3, 1), (3, 8), (4, 1), (4, 8)])
def test_16_bit_rgb_tiff_keeps_all_16_bits(spp: int, compression: int) -> None:
    """16-bit RGB(A) TIFF (raw and libtiff-decoded) converts from the full samples, as the
    reference does; Pillow alone keeps only the high byte."""
    from phash_trio.image.luma import luma_from_rgb16

    rng = np.random.default_rng(spp * 10 + compression)
    samples = rng.integers(0, 65536, (9, 13, spp), dtype=np.uint16)
    samples[0, :4, 0] = [0x01FF, 0x80FF, 0xFF80, 0x0080]  # the low byte changes the result
    gray = decode_gray(_tiff16(samples, compression), max_pixels=10_000)
    assert np.array_equal(gray, luma_from_rgb16(samples))


def _tiff16_big_endian(samples: np.ndarray) -> bytes:
    """The same image as a big-endian ("MM") uncompressed TIFF."""
    height, width, spp = samples.shape
    body = samples.astype(">u2").tobytes()
    entries = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, spp, None), (259, 3, 1, 1)]
    entries += [(262, 3, 1, 2), (273, 4, 1, None), (277, 3, 1, spp), (278, 4, 1, height)]
    entries += [(279, 4, 1, len(body))]
    ifd_end = 8 + 2 + 12 * len(entries) + 4
    bits_at, data_at = ifd_end, ifd_end + 2 * spp
    out = bytearray(b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", len(entries)))
    for tag, kind, count, value in entries:
        if tag == 258:
            field = struct.pack(">I", bits_at)
        elif tag == 273:
            field = struct.pack(">I", data_at)
        elif kind == 3:
            field = struct.pack(">HH", value, 0)
        else:
            field = struct.pack(">I", value)
        out += struct.pack(">HHI", tag, kind, count) + field
    out += b"\x00\x00\x00\x00" + struct.pack(f">{spp}H", *([16] * spp)) + body
    return bytes(out)


def test_big_endian_16_bit_tiff_keeps_all_16_bits_in_gray_and_rgb() -> None:
    """Big-endian 16-bit RGB: full samples for to_luma8, (v + 128) / 257 for to_rgb8."""
    from phash_trio.image.decode import decode_rgb
    from phash_trio.image.luma import luma_from_rgb16

    rng = np.random.default_rng(42)
    samples = rng.integers(0, 65536, (5, 11, 3), dtype=np.uint16)
    data = _tiff16_big_endian(samples)
    assert np.array_equal(decode_gray(data, max_pixels=10_000), luma_from_rgb16(samples))
    expected_rgb = ((samples.astype(np.uint32) + 128) // 257).astype(np.uint8)
    assert np.array_equal(decode_rgb(data, max_pixels=10_000), expected_rgb)
