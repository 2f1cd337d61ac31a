"""decode_rgb: the RGB8 pixels of image-rs ``to_rgb8`` (for PDQ), agreeing with decode_gray."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phash_trio.image.decode import (
    ImageError,
    ImageTooLarge,
    decode_gray,
    decode_pixels,
    decode_rgb,
    luma_from_rgb8,
)

GOLDEN = Path(__file__).parent / "data" / "golden" / "images"
LIMIT = 25_000_000


def _encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _png16(samples: np.ndarray, colour: int) -> bytes:
    height, width = samples.shape[:2]
    rows = samples.astype(">u2").reshape(height, -1).view(np.uint8)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def _golden_files() -> list[Path]:
    return sorted(p for p in GOLDEN.rglob("*") if p.is_file() and p.suffix != ".md")


def test_rgb_of_every_golden_image_gives_its_gray() -> None:
    """For every 8-bit golden image that decodes, to_luma8 of decode_rgb equals decode_gray."""
    checked = 0
    for path in _golden_files():
        data = path.read_bytes()
        try:
            pixels = decode_pixels(data, max_pixels=LIMIT)
        except ImageError:
            continue
        rgb = decode_rgb(data, max_pixels=LIMIT)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, path
        assert rgb.shape[:2] == pixels.shape[:2], path
        if pixels.dtype == np.uint8:
            assert np.array_equal(luma_from_rgb8(rgb), decode_gray(data, max_pixels=LIMIT)), path
        checked += 1
    assert checked >= 80


def test_rgb_png_gives_its_own_pixels_and_drops_alpha() -> None:
    """An RGBA PNG gives its RGB samples unchanged, even where alpha is 0 (never composited)."""
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (9, 14, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0
    rgb = decode_rgb(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), max_pixels=LIMIT)
    assert np.array_equal(rgb, rgba[..., :3])


def test_gray_images_are_repeated_into_three_channels() -> None:
    """Luma8 becomes (l, l, l), as image-rs FromColor<Luma> for Rgb does."""
    rng = np.random.default_rng(6)
    gray = rng.integers(0, 256, (7, 5), dtype=np.uint8)
    for fmt in ("PNG", "BMP", "TIFF", "GIF"):
        rgb = decode_rgb(_encode(Image.fromarray(gray, "L"), fmt), max_pixels=LIMIT)
        assert np.array_equal(rgb, np.repeat(gray[:, :, None], 3, axis=2)), fmt


@pytest.mark.parametrize("colour", [0, 2, 4, 6])
def test_16_bit_samples_scale_as_image_rs(colour: int) -> None:
    """16-bit samples become (v + 128) / 257, image-rs FromPrimitive<u16> for u8; alpha dropped."""
    rng = np.random.default_rng(colour)
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    shape = (6, 11, channels) if channels > 1 else (6, 11)
    samples = rng.integers(0, 65536, shape, dtype=np.uint16)
    samples.reshape(-1)[:4] = [127, 128, 0x80FF, 65535]
    rgb = decode_rgb(_png16(samples, colour), max_pixels=LIMIT)
    scaled = ((samples.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if colour == 0:
        expected = np.repeat(scaled[:, :, None], 3, axis=2)
    elif colour == 4:
        expected = np.repeat(scaled[:, :, :1], 3, axis=2)
    else:
        expected = scaled[..., :3]
    assert np.array_equal(rgb, expected)


def test_rgb_jpeg_and_webp_agree_with_gray_path() -> None:
    """Lossy formats: decode_rgb gives the pixels whose luma decode_gray hashes."""
    rng = np.random.default_rng(8)
    im = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8), "RGB")
    for fmt in ("JPEG", "WEBP"):
        data = _encode(im, fmt)
        rgb = decode_rgb(data, max_pixels=LIMIT)
        assert rgb.shape == (24, 40, 3)
        assert np.array_equal(luma_from_rgb8(rgb), decode_gray(data, max_pixels=LIMIT)), fmt


def test_rgb_respects_the_pixel_cap() -> None:
    """The same pixel cap applies before decoding."""
    data = _encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageTooLarge):
        decode_rgb(data, max_pixels=9_999)
