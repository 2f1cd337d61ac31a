"""Our compiled PDQ (pdqcore.c) against Meta's C++ reference as HMA calls it (``pdqhash``).

The core is a streamed port: 8 rows at a time in SIMD lanes, column passes down a window of
rows, the second passes only where the 64x64 grid samples. It must give the same 256 bits and
quality as ``pdqhash.compute`` on the same RGB8 pixels, for every size (the 64x64 shortcut,
the under-5 zero hash, windows of 1, long thin images), every kind of content (noise, flat
areas where the median ties, gradients) and every golden image; and the one-pass JPEG path
must give the same gray image as the mean hash's decoder and the same PDQ as its RGB pixels.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pdqhash
import pytest
from PIL import Image

from phash_trio.image import ImageError, hashcore
from phash_trio.image.decode import (
    ImageFormat,
    ImageTooLarge,
    decode_gray,
    decode_gray_pdq,
    decode_rgb,
    sniff_format,
)
from phash_trio.image.pdq import pdq_from_rgb
from phash_trio.image.signals import compute_signals

MAX_PIXELS = 50_000_000


def _reference(rgb: np.ndarray) -> tuple[bytes, int]:
    vector, quality = pdqhash.compute(np.ascontiguousarray(rgb))
    return np.packbits(np.asarray(vector, dtype=np.uint8)).tobytes(), int(quality)


def _ours(rgb: np.ndarray) -> tuple[bytes, int]:
    return hashcore.pdq_rgb(np.ascontiguousarray(rgb), rgb.shape[1], rgb.shape[0])


def _images(height: int, width: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pattern = np.stack([(x * 7 + y * 3) % 256, (x * y) % 256, (x + 2 * y) % 256], axis=-1)
    halves = np.full((height, width, 3), 200, dtype=np.uint8)
    halves[height // 3 :, : width // 2] = 10
    return [
        rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        pattern.astype(np.uint8),
        halves,
        np.full((height, width, 3), 77, dtype=np.uint8),  # flat: every coefficient ties
    ]


SHAPES = [
    (5, 5),
    (5, 300),
    (300, 5),
    (63, 63),
    (64, 64),  # the reference skips the blur
    (64, 65),
    (65, 64),
    (127, 129),
    (128, 128),
    (129, 1000),
    (333, 1501),
    (6, 2000),
    (2000, 7),
    (1024, 768),
    (17, 17),
]


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_core_equals_pdqhash_on_synthetic_images(height: int, width: int) -> None:
    for index, rgb in enumerate(_images(height, width, seed=height * 7919 + width)):
        assert _ours(rgb) == _reference(rgb), f"image kind {index} at {width}x{height}"


@pytest.mark.parametrize(("height", "width"), [(1, 1), (4, 100), (100, 4), (4, 4)])
def test_under_five_pixels_is_the_zero_hash_as_in_the_reference(height: int, width: int) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert _ours(rgb) == _reference(rgb) == (bytes(32), 0)


def test_pdq_from_rgb_formats_the_core_hash() -> None:
    rgb = _images(200, 300, seed=5)[1]
    value, quality = _reference(rgb)
    assert pdq_from_rgb(rgb).hex == value.hex()
    assert pdq_from_rgb(rgb).quality == quality


def test_bad_buffers_are_refused() -> None:
    with pytest.raises(ValueError, match="RGB8"):
        hashcore.pdq_rgb(bytes(10), 2, 2)
    with pytest.raises(ValueError, match="RGB8"):
        hashcore.pdq_rgb(bytes(12), 0, 2)
    with pytest.raises(ValueError, match="RGB8"):
        hashcore.pdq_rgb(bytes(12), 1 << 62, 1 << 62)


def _decodable(root: Path) -> list[tuple[str, bytes]]:
    files = []
    for path in sorted((root / "images").rglob("*")):
        if path.is_file():
            files.append((str(path.relative_to(root / "images")), path.read_bytes()))
    return files


def _check_corpus(root: Path, *, jpeg_only: bool = False) -> int:
    checked = 0
    for name, data in _decodable(root):
        try:
            fmt = sniff_format(data)
        except ImageError:
            continue
        if jpeg_only and fmt is not ImageFormat.JPEG:
            continue
        try:
            rgb = decode_rgb(data, max_pixels=MAX_PIXELS)
        except ImageError:
            continue
        reference = _reference(rgb)
        assert _ours(rgb) == reference, name
        gray, value, quality = decode_gray_pdq(data, max_pixels=MAX_PIXELS)
        assert (value, quality) == reference, f"one-pass PDQ of {name}"
        assert np.array_equal(gray, decode_gray(data, max_pixels=MAX_PIXELS)), name
        checked += 1
    return checked


def test_core_and_one_pass_path_equal_pdqhash_on_the_golden_subset(golden_dir: Path) -> None:
    # Every format, and the damaged JPEG where the zune port stops (rows after it are grey).
    assert _check_corpus(golden_dir) >= 100


def test_core_and_one_pass_path_equal_pdqhash_on_the_full_golden_set(
    full_golden_dir: Path,
) -> None:
    assert _check_corpus(full_golden_dir, jpeg_only=True) >= 270


def test_signals_take_both_hashes_from_one_decode(golden_dir: Path) -> None:
    data = (golden_dir / "images" / "photos" / "jpeg").glob("*.jpg").__next__().read_bytes()
    signals = compute_signals(data)
    rgb = decode_rgb(data, max_pixels=MAX_PIXELS)
    assert signals.pdq is not None
    assert bytes.fromhex(signals.pdq.hex) == _reference(rgb)[0]
    assert signals.mean == compute_signals(data, pdq=False).mean


def test_threads_hash_at_once_and_agree() -> None:
    images = [_images(400 + 37 * i, 500 - 29 * i, seed=i)[i % 3] for i in range(8)]
    expected = [_reference(rgb) for rgb in images]
    results: list[list[tuple[bytes, int]]] = [[] for _ in images]

    def work(index: int) -> None:
        for _ in range(5):
            results[index].append(_ours(images[index]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, got in enumerate(results):
        assert got == [expected[index]] * 5


def test_integer_luma_is_pdqhash_luma_for_every_colour() -> None:
    # pdqcore.h computes pdqhash's float(r * 0.299 + g * 0.587 + b * 0.114) (double sums) as
    # float(299 r + 587 g + 114 b) / 1000.0f: the same float for all 2^24 colours.
    every = np.arange(1 << 24, dtype=np.uint32)
    r, g, b = (((every >> shift) & 255).astype(np.uint8) for shift in (16, 8, 0))
    reference = (r * 0.299 + g * 0.587 + b * 0.114).astype(np.float32)
    exact = 299 * r.astype(np.int32) + 587 * g.astype(np.int32) + 114 * b.astype(np.int32)
    ours = exact.astype(np.float32) / np.float32(1000)
    assert np.array_equal(reference.view(np.uint32), ours.view(np.uint32))


def _encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def test_a_tiny_jpeg_has_the_zero_hash_and_the_same_gray() -> None:
    rgb = np.random.default_rng(3).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    data = _encoded(Image.fromarray(rgb), "JPEG")
    gray, value, quality = decode_gray_pdq(data, max_pixels=MAX_PIXELS)
    assert (value, quality) == (bytes(32), 0)
    assert np.array_equal(gray, decode_gray(data, max_pixels=MAX_PIXELS))


def test_an_absurdly_wide_image_is_refused_for_pdq_in_bounded_memory() -> None:
    # 200,000 x 100 pixels: PDQ's row buffers would need ~77 MiB; one clear error, nothing
    # allocated. The mean hash alone still works on it.
    data = _encoded(Image.new("1", (200_000, 100)), "PNG")
    with pytest.raises(ImageTooLarge, match="too wide for PDQ"):
        compute_signals(data, max_pixels=MAX_PIXELS)
    assert compute_signals(data, max_pixels=MAX_PIXELS, pdq=False).pdq is None
    with pytest.raises(MemoryError):
        hashcore.pdq_rgb(bytes(200_000 * 100 * 3), 200_000, 100)
