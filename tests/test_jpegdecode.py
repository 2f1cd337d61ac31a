"""decode_jpeg gives zune-jpeg's pixels: golden hashes, pixel-level checks and clear errors."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jpeglib
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from phash_trio.image.decode import luma_from_rgb8
from phash_trio.image.jpeg.coeffs import read_coefficients
from phash_trio.image.jpeg.decoder import (
    JpegDecodeError,
    JpegFormatError,
    JpegTooLargeError,
    JpegTruncatedError,
    JpegUnsupportedError,
    decode_jpeg,
    keep_stale_blocks,
)
from phash_trio.image.jpeg.markers import read_structure
from phash_trio.image.jpeg.pixels import ColourModel, assemble, idct_plane
from phash_trio.image.jpeg.zune_walk import ZuneStop, find_zune_stop
from phash_trio.image.meanhash import format_hash, hash_gray

_JPEG_SUFFIXES = (".jpg", ".jpeg", ".mpo")
# Golden files whose hash we do not reproduce, and why (none since zune's stop is emulated).
_KNOWN_MISSES: set[str] = set()
# One file per feature; those marked (*) get a different hash from a libjpeg decode (Pillow).
_FEATURES = {
    "gray-baseline": "photos/jpeg/text_385x148_q87_gray_base.jpg",
    "gray-progressive": "photos/jpeg/moon_330x318_q89_gray_prog.jpg",
    "420-baseline(*)": "photos/jpeg/china_596x299_q88_420_base_opt.jpg",
    "420-progressive(*)": "pillow/app13-multiple.jpg",
    "422-baseline": "photos/jpeg/spitfire_341x226_q88_422_base_opt.jpg",
    "422-progressive(*)": "photos/jpeg/mate-wood_739x554_q87_422_prog_opt.jpg",
    "444-baseline": "photos/jpeg/beach_323x161_q80_444_base.jpg",
    "444-progressive": "photos/jpeg/dahlia_343x229_q92_444_prog.jpg",
    "restart-markers-baseline": "photos/jpeg/sugarshack_518x450_q75_420_base_rst4.jpg",
    "restart-markers-progressive": "photos/jpeg/mate-twowings_432x422_q82_422_prog_rst2.jpg",
    "cmyk-adobe-ycck": "pillow/pil_sample_cmyk.jpg",
    "mpo-first-frame": "pillow/sugarshack.mpo",
    "sof1-16bit-quant-tables": "pillow/hopper_16bit_qtables.jpg",
    "garbage-between-segments": "pillow/photoshop-200dpi-broken.jpg",
    "2x1-pixels": "pillow/orientation_rectangle.jpg",
    "1x1-pixel": "pillow/jfif_unit_cm.jpg",
}
_U8 = npt.NDArray[np.uint8]


def _golden(golden_dir: Path) -> dict[str, str]:
    rows = (golden_dir / "mean8.tsv").read_text(encoding="utf-8").splitlines()
    table = dict(row.split("\t", 1) for row in rows if row.strip())
    return {name: value for name, value in table.items() if name.lower().endswith(_JPEG_SUFFIXES)}


def _luma(rgb: _U8) -> _U8:
    return luma_from_rgb8(rgb)


def _hex(pixels: _U8) -> str:
    gray = pixels if pixels.ndim == 2 else luma_from_rgb8(pixels)
    return format_hash(hash_gray(gray))


def _read(golden_dir: Path, name: str) -> bytes:
    return (golden_dir / "images" / name).read_bytes()


def _hopper(golden_dir: Path) -> bytes:
    return _read(golden_dir, "pillow/hopper.jpg")


@pytest.mark.parametrize("name", list(_FEATURES.values()), ids=list(_FEATURES))
def test_feature_file_hashes_like_the_reference(golden_dir: Path, name: str) -> None:
    """Each JPEG feature has a golden file whose decode hashes to the reference hex."""
    assert _hex(decode_jpeg(_read(golden_dir, name))) == _golden(golden_dir)[name]


def test_every_golden_jpeg_hashes_like_the_reference(golden_dir: Path) -> None:
    """Every JPEG/MPO file of the in-repository subset decodes to the reference hash.

    The full set's 281 are checked through ``mean_hash`` by test_golden.py."""
    golden = _golden(golden_dir)
    assert len(golden) == 57
    misses = {
        name
        for name, value in golden.items()
        if _hex(decode_jpeg(_read(golden_dir, name))) != value
    }
    assert misses == _KNOWN_MISSES


def test_shapes_and_dtypes(golden_dir: Path) -> None:
    """want="gray" gives (H, W) uint8, want="rgb" (H, W, 3) uint8 (gray replicated)."""
    gray_jpeg = _read(golden_dir, "pillow/hopper_gray.jpg")
    colour_jpeg = _read(golden_dir, "photos/jpeg/china_596x299_q88_420_base_opt.jpg")
    gray, colour = decode_jpeg(gray_jpeg), decode_jpeg(colour_jpeg, want="rgb")
    assert (gray.shape, gray.dtype) == ((128, 128), np.uint8)
    assert (colour.shape, colour.dtype) == ((299, 596, 3), np.uint8)
    assert decode_jpeg(colour_jpeg).shape == (299, 596)
    assert colour.flags.c_contiguous and gray.flags.c_contiguous
    replicated = decode_jpeg(gray_jpeg, want="rgb")
    assert all(np.array_equal(replicated[..., c], gray) for c in range(3))


def test_gray_output_is_to_luma8_of_the_rgb_output(golden_dir: Path) -> None:
    """The direct luma path equals image-rs to_luma8 applied to the RGB output."""
    for name in _FEATURES.values():
        data = _read(golden_dir, name)
        assert np.array_equal(decode_jpeg(data), _luma(decode_jpeg(data, want="rgb"))), name


def test_want_must_be_gray_or_rgb(golden_dir: Path) -> None:
    """Any other ``want`` is a programming error, not a decode error."""
    with pytest.raises(ValueError, match="want"):
        decode_jpeg(_hopper(golden_dir), want="rgba")  # type: ignore[arg-type]


def test_mpo_decodes_the_first_frame_only(golden_dir: Path) -> None:
    """An MPO decodes as its first JPEG alone; its second frame is ignored."""
    data = _read(golden_dir, "pillow/sugarshack.mpo")
    second_start = data.index(b"\xff\xd8\xff", data.index(b"\xff\xda"))  # after frame 1's scan
    whole = decode_jpeg(data)
    assert np.array_equal(whole, decode_jpeg(data[:second_start]))
    assert not np.array_equal(whole, decode_jpeg(data[second_start:]))


def test_missing_eoi_is_accepted(golden_dir: Path) -> None:
    """A file whose data is complete but lacks the final EOI decodes to the same pixels."""
    for name in ("pillow/hopper.jpg", "pillow/app13-multiple.jpg"):
        data = _read(golden_dir, name)
        assert data.endswith(b"\xff\xd9")
        assert np.array_equal(decode_jpeg(data[:-2]), decode_jpeg(data))


@pytest.mark.parametrize("name", ["pillow/hopper.jpg", "pillow/app13-multiple.jpg"])
def test_truncated_image_data_raises(golden_dir: Path, name: str) -> None:
    """Cutting the file anywhere in its image data raises JpegTruncatedError, never pixels."""
    data = _read(golden_dir, name)
    scan_start = data.index(b"\xff\xda")
    for cut in np.linspace(scan_start + 20, len(data) - 40, 25).astype(int):
        with pytest.raises(JpegTruncatedError):
            decode_jpeg(data[:cut])


def test_progressive_cut_between_scans_raises(golden_dir: Path) -> None:
    """A progressive file cut right before a later scan (all kept scans whole) is truncated."""
    data = _read(golden_dir, "pillow/app13-multiple.jpg")
    third_scan = data.index(b"\xff\xda", data.index(b"\xff\xda", data.index(b"\xff\xda") + 2) + 2)
    with pytest.raises(JpegTruncatedError, match="stops before the scans"):
        decode_jpeg(data[:third_scan])


def test_cut_in_headers_raises(golden_dir: Path) -> None:
    """A file cut before its image data raises a JpegFormatError subclass."""
    data = _hopper(golden_dir)
    for cut in (2, 3, 20, 200, data.index(b"\xff\xda") + 5):
        with pytest.raises(JpegFormatError):
            decode_jpeg(data[:cut])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"GIF89a\x01\x00\x01\x00",
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff\xd9",
        b"\xff\xd8" + b"x" * 50,
    ],
    ids=["empty", "gif", "png", "soi-eoi", "soi-garbage"],
)
def test_not_a_jpeg_raises_format_error(data: bytes) -> None:
    """Non-JPEG or image-less data raises JpegFormatError with a one-line message."""
    with pytest.raises(JpegFormatError) as caught:
        decode_jpeg(data)
    assert "\n" not in str(caught.value)


def _patch(data: bytes, marker: bytes, offset: int, value: int, nth: int = 0) -> bytes:
    """``data`` with byte ``offset`` after the ``nth`` occurrence of ``marker`` set to ``value``."""
    at = -1
    for _ in range(nth + 1):
        at = data.index(marker, at + 1)
    patched = bytearray(data)
    patched[at + offset] = value
    return bytes(patched)


@pytest.mark.parametrize(
    ("marker", "offset", "value"),
    [
        (b"\xff\xc4", 4, 0x05),  # DHT defines table 5
        (b"\xff\xc4", 3, 0x15),  # DHT length disagrees with its code counts
        (b"\xff\xdb", 4, 0x07),  # DQT defines table 7
        (b"\xff\xdb", 3, 0x40),  # DQT length is not whole tables
        (b"\xff\xda", 5, 0x09),  # scan names a component the frame lacks
        (b"\xff\xc0", 13, 0x01),  # frame repeats a component id
        (b"\xff\xc0", 11, 0x51),  # sampling factor 5
        (b"\xff\xc0", 3, 0x12),  # frame length does not match its component count
    ],
    ids=[
        "dht-index",
        "dht-length",
        "dqt-index",
        "dqt-length",
        "sos-id",
        "sof-dup-id",
        "sof-sampling",
        "sof-length",
    ],
)
def test_damaged_headers_raise_format_error(
    golden_dir: Path, marker: bytes, offset: int, value: int
) -> None:
    """Header damage libjpeg would choke on is reported as JpegFormatError (no crash)."""
    with pytest.raises(JpegFormatError):
        decode_jpeg(_patch(_hopper(golden_dir), marker, offset, value))


def test_duplicate_component_in_scan_raises(golden_dir: Path) -> None:
    """A scan listing the same component twice is refused."""
    data = _patch(_hopper(golden_dir), b"\xff\xda", 7, 0x01)  # second scan component := id 1
    with pytest.raises(JpegFormatError, match="twice"):
        decode_jpeg(data)


@pytest.mark.parametrize("order", [(2, 1, 3), (1, 3, 2)])
def test_scan_component_order_libjpeg_refuses_is_refused(
    golden_dir: Path, order: tuple[int, ...]
) -> None:
    """Scan orders libjpeg-turbo rejects while reading the header are refused before it runs."""
    data = _hopper(golden_dir)
    at = data.index(b"\xff\xda")
    tables = {1: 0x00, 2: 0x11, 3: 0x11}
    entries = b"".join(bytes([ident, tables[ident]]) for ident in order)
    patched = data[: at + 5] + entries + data[at + 11 :]
    with pytest.raises(JpegFormatError, match="order"):
        decode_jpeg(patched)


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [(1, 0xC9, "arithmetic"), (1, 0xC3, "lossless"), (4, 12, "12-bit"), (5, 0, "DNL")],
    ids=["arithmetic", "lossless", "12-bit", "dnl-height"],
)
def test_unsupported_codings_raise(golden_dir: Path, offset: int, value: int, match: str) -> None:
    """Codings zune-jpeg refuses too raise JpegUnsupportedError naming the coding."""
    data = _hopper(golden_dir)
    patched = bytearray(data)
    sof = data.index(b"\xff\xc0")
    patched[sof + offset] = value
    if offset == 5:
        patched[sof + 6] = 0
    with pytest.raises(JpegUnsupportedError, match=match):
        decode_jpeg(bytes(patched))


def test_max_pixels_allows_the_limit_and_refuses_one_less(golden_dir: Path) -> None:
    """128x128 decodes with max_pixels=16384 and raises JpegTooLargeError at 16383."""
    data = _hopper(golden_dir)
    assert decode_jpeg(data, max_pixels=128 * 128).shape == (128, 128)
    with pytest.raises(JpegTooLargeError) as caught:
        decode_jpeg(data, max_pixels=128 * 128 - 1)
    assert (caught.value.width, caught.value.height, caught.value.max_pixels) == (128, 128, 16383)


def test_max_pixels_is_checked_from_the_header_alone() -> None:
    """A bare header claiming 60000x60000 is refused as too large before any data is read."""
    sof = b"\xff\xc0\x00\x0b\x08" + (60000).to_bytes(2, "big") * 2 + b"\x01\x01\x11\x00"
    with pytest.raises(JpegTooLargeError, match="60000x60000"):
        decode_jpeg(b"\xff\xd8" + sof)


def test_adobe_rgb_is_not_colour_converted(golden_dir: Path) -> None:
    """A 3-component JPEG with Adobe transform 0 is RGB: within 1 level of libjpeg's decode."""
    source = Image.open(io.BytesIO(_hopper(golden_dir))).convert("RGB")
    buffer = io.BytesIO()
    source.save(buffer, "JPEG", keep_rgb=True, quality=90)
    assert read_structure(buffer.getvalue(), max_pixels=10**6).adobe_transform == 0
    ours = decode_jpeg(buffer.getvalue(), want="rgb").astype(int)
    libjpeg = np.asarray(Image.open(buffer).convert("RGB")).astype(int)
    assert np.abs(ours - libjpeg).max() <= 1


def test_adobe_cmyk_multiplies_inverted_ink(golden_dir: Path) -> None:
    """Adobe (inverted) CMYK becomes ``blinn(c, k)`` per channel, within 1 level of libjpeg."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(_hopper(golden_dir))).convert("CMYK").save(buffer, "JPEG", quality=90)
    ink = 255 - np.asarray(Image.open(buffer)).astype(int)  # Pillow un-inverts; invert back
    t = ink[..., :3] * ink[..., 3:] + 128
    expected = (t + (t >> 8)) >> 8
    assert np.abs(decode_jpeg(buffer.getvalue(), want="rgb").astype(int) - expected).max() <= 1


@pytest.mark.parametrize(
    "factors",
    [[[2, 1], [1, 1], [1, 1]], [[1, 4], [1, 1], [1, 1]], [[2, 2], [1, 2], [1, 1]]],
    ids=["440", "411", "mixed-chroma"],
)
def test_unusual_samplings_decode_close_to_libjpeg(
    golden_dir: Path, tmp_path: Path, factors: list[list[int]]
) -> None:
    """4:4:0, 4:1:1 and unequal chroma samplings decode within 3 levels of libjpeg."""
    source = np.asarray(Image.open(io.BytesIO(_hopper(golden_dir))).convert("RGB"))
    path = tmp_path / "sampled.jpg"
    jpeg = jpeglib.from_spatial(source.copy())
    jpeg.samp_factor = np.array(factors)  # jpeglib orders each pair (vertical, horizontal)
    jpeg.write_spatial(str(path), qt=90)
    data = path.read_bytes()
    ours = decode_jpeg(data, want="rgb").astype(int)
    libjpeg = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert np.abs(ours - libjpeg).max() <= 3
    assert np.abs(ours - libjpeg).mean() < 0.5


def _stb_idct(coefficients: list[int]) -> list[int]:
    """zune-jpeg's scalar ``idct_int``, transcribed loop for loop (i32 wrap ignored)."""
    v = list(coefficients)
    if not any(v[1:]):
        return [min(255, max(0, (v[0] + 4 + 1024) >> 3))] * 64

    def one_d(x: list[int], bias: int, shift: int) -> list[int]:
        p1 = (x[2] + x[6]) * 2217
        t2, t3 = p1 + x[6] * -7567, p1 + x[2] * 3135
        t0, t1 = (x[0] + x[4]) << 12, (x[0] - x[4]) << 12
        x0, x3, x1, x2 = t0 + t3 + bias, t0 - t3 + bias, t1 + t2 + bias, t1 - t2 + bias
        a0, a1, a2, a3 = x[7], x[5], x[3], x[1]
        p3, p4, q1, q2 = a0 + a2, a1 + a3, a0 + a3, a1 + a2
        p5 = (p3 + p4) * 4816
        q1, q2, p3, p4 = p5 + q1 * -3685, p5 + q2 * -10497, p3 * -8034, p4 * -1597
        a3, a2 = a3 * 6149 + q1 + p4, a2 * 12586 + q2 + p3
        a1, a0 = a1 * 8410 + q2 + p4, a0 * 1223 + q1 + p3
        outs = [x0 + a3, x1 + a2, x2 + a1, x3 + a0, x3 - a0, x2 - a1, x1 - a2, x0 - a3]
        return [o >> shift for o in outs]

    for col in range(8):
        column = one_d([v[col + 8 * k] for k in range(8)], 512, 10)
        for k in range(8):
            v[col + 8 * k] = column[k]
    out = []
    for row in range(8):
        out += [
            min(255, max(0, p))
            for p in one_d(v[8 * row : 8 * row + 8], 512 + 65536 + (128 << 17), 17)
        ]
    return out


def test_idct_matches_a_scalar_transcription() -> None:
    """The vectorised IDCT equals a loop-for-loop transcription of zune's on random blocks."""
    rng = np.random.default_rng(7)
    blocks = rng.integers(-60, 60, size=(3, 5, 64)).astype(np.int16)
    blocks[0, 0, 1:] = 0  # a DC-only block takes the shortcut
    blocks[1, 2, 20:] = 0
    quant = rng.integers(1, 40, size=64).astype(np.uint16)
    plane = idct_plane(blocks, quant)
    for row in range(3):
        for col in range(5):
            expected = _stb_idct(
                [int(c) * int(q) for c, q in zip(blocks[row, col], quant, strict=True)]
            )
            got = plane[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8].reshape(-1).tolist()
            assert got == expected, (row, col)


def test_dc_only_block_rounds_like_zune() -> None:
    """A DC-only block becomes ``(dc * q + 1028) >> 3`` everywhere, clamped."""
    blocks = np.zeros((1, 3, 64), dtype=np.int16)
    blocks[0, :, 0] = [-3, 5, 400]
    quant = np.full(64, 2, dtype=np.uint16)
    plane = idct_plane(blocks, quant)
    assert [int(plane[0, 0]), int(plane[0, 8]), int(plane[0, 16])] == [127, 129, 228]
    assert len(np.unique(plane[:, :8])) == 1


def _zune_h(row: list[int], scalar: bool) -> list[int]:
    """zune's horizontal 2x triangle filter on one row (scalar fallback or AVX2 ending)."""
    n = len(row)
    out = [row[0], (row[0] * 3 + row[1] + 2) >> 2]
    for i in range(1, n - 1):
        out += [(3 * row[i] + 2 + row[i - 1]) >> 2, (3 * row[i] + 2 + row[i + 1]) >> 2]
    last = (3 * row[-2] + row[-1] + 2) >> 2 if scalar else (3 * row[-1] + row[-2] + 2) >> 2
    return [*out, last, row[-1]]


def test_chroma_upsampling_matches_zunes_filters() -> None:
    """4:2:0 chroma is the vertical then horizontal triangle filter, edges replicated."""
    rng = np.random.default_rng(3)
    for width in (8, 24):  # 8 uses zune's scalar row ending, 24 its AVX2 one
        luma = np.zeros((32, 2 * width), dtype=np.uint8)
        chroma = rng.integers(0, 256, size=(16, width)).astype(np.uint8)
        out = assemble(
            [luma, chroma, chroma], [(1, 1), (2, 2), (2, 2)], 2 * width, 32, ColourModel.RGB
        )
        c = chroma.astype(int).tolist()
        for y in range(32):
            i = y // 2
            other = c[max(i - 1, 0)] if y % 2 == 0 else c[min(i + 1, 15)]
            vertical = [(3 * a + b + 2) >> 2 for a, b in zip(c[i], other, strict=True)]
            assert out[y, :, 1].tolist() == _zune_h(vertical, scalar=width < 18), (width, y)


def test_colour_conversions_use_zunes_fixed_point() -> None:
    """YCbCr uses 14-bit fixed point; CMYK and YCCK use the rounded ``a * k / 255``."""
    one = [np.full((8, 8), v, dtype=np.uint8) for v in (100, 50, 200, 100)]
    ratios = [(1, 1)] * 4
    assert assemble(one[:3], ratios[:3], 1, 1, ColourModel.YCBCR)[0, 0].tolist() == [201, 75, 0]
    gray = [np.full((8, 8), v, dtype=np.uint8) for v in (77, 128, 128)]
    assert assemble(gray, ratios[:3], 1, 1, ColourModel.YCBCR)[0, 0].tolist() == [77, 77, 77]
    assert assemble(one, ratios, 1, 1, ColourModel.CMYK)[0, 0].tolist() == [39, 20, 78]
    # YCCK: (201, 75, 0) inverted to (54, 180, 255), then times k=100
    assert assemble(one, ratios, 1, 1, ColourModel.YCCK)[0, 0].tolist() == [21, 71, 100]


def test_concurrent_decodes_agree(golden_dir: Path) -> None:
    """Decoding in several threads at once gives the same pixels as one after another."""
    names = list(_FEATURES.values())[:8]
    datas = [_read(golden_dir, name) for name in names]
    serial = [decode_jpeg(d) for d in datas]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(decode_jpeg, datas * 2))
    for got, expected in zip(parallel, serial * 2, strict=True):
        assert np.array_equal(got, expected)


def test_random_damage_only_raises_jpeg_errors(golden_dir: Path) -> None:
    """Randomly damaged files either decode to a full-size image or raise JpegDecodeError."""
    rng = np.random.default_rng(2024)
    originals = [_hopper(golden_dir), _read(golden_dir, "pillow/app13-multiple.jpg")]
    outcomes = {"decoded": 0, "refused": 0}
    for attempt in range(300):
        data = bytearray(originals[attempt % 2])
        for _ in range(int(rng.integers(1, 6))):
            data[int(rng.integers(2, len(data)))] = int(rng.integers(256))
        try:
            pixels = decode_jpeg(bytes(data), max_pixels=1_000_000)
        except JpegDecodeError as exc:
            assert str(exc) and "\n" not in str(exc)
            outcomes["refused"] += 1
        else:
            assert pixels.dtype == np.uint8 and pixels.ndim in (2, 3)
            outcomes["decoded"] += 1
    assert outcomes["decoded"] > 0 and outcomes["refused"] > 0


def test_coefficients_come_from_the_first_image_only(golden_dir: Path) -> None:
    """The rebuilt stream holds one image: SOI, tables, frame, scans, EOI and no APPn/COM."""
    structure = read_structure(_read(golden_dir, "pillow/sugarshack.mpo"), max_pixels=10**7)
    assert structure.stream.count(b"\xff\xd8") == 1 and structure.stream.endswith(b"\xff\xd9")
    assert b"\xff\xe1" not in structure.stream[: structure.stream.index(b"\xff\xda")]
    coefficients = read_coefficients(structure)
    assert [b.shape for b in coefficients.blocks] == [(60, 80, 64), (60, 40, 64), (60, 40, 64)]


_BAD_HUFFMAN = "pillow/hopper_bad_exif.jpg"  # gray 500x500, DRI 63, bad code in MCU row 19


def _china_with_bad_code(golden_dir: Path) -> bytes:
    """A 4:2:0 baseline photo with 16 one bits (no Huffman code) put inside MCU row 11."""
    data = bytearray(_read(golden_dir, "photos/jpeg/china_596x299_q88_420_base_opt.jpg"))
    data[31796:31800] = b"\xff\x00\xff\x00"
    return bytes(data)


def test_libjpeg_corrupt_data_warning_is_flagged_and_kept_off_fd2(
    golden_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """libjpeg's "Corrupt JPEG data" warning sets the flag and never reaches file descriptor 2."""
    bad = read_coefficients(read_structure(_read(golden_dir, _BAD_HUFFMAN), max_pixels=10**6))
    clean = read_coefficients(read_structure(_hopper(golden_dir), max_pixels=10**6))
    assert (bad.corrupt, clean.corrupt) == (True, False)
    assert capfd.readouterr().err == ""


def test_zune_walk_stops_at_the_bad_huffman_code(golden_dir: Path) -> None:
    """The walk stops where zune-jpeg does on hopper_bad_exif.jpg: MCU row 19, column 19."""
    structure = read_structure(_read(golden_dir, _BAD_HUFFMAN), max_pixels=10**6)
    assert find_zune_stop(structure) == ZuneStop(row=19, col=19, block=0)


@pytest.mark.parametrize(
    "name",
    [
        "photos/jpeg/sugarshack_518x450_q75_420_base_rst4.jpg",
        "photos/jpeg/spitfire_341x226_q88_422_base_opt.jpg",
        "photos/jpeg/text_385x148_q87_gray_base.jpg",
    ],
)
def test_zune_walk_finds_no_stop_in_clean_files(golden_dir: Path, name: str) -> None:
    """On clean baseline files (restart markers, 4:2:2, gray) the walk runs to the end: None."""
    assert find_zune_stop(read_structure(_read(golden_dir, name), max_pixels=10**6)) is None


def test_zune_walk_gives_up_beyond_its_block_budget(golden_dir: Path) -> None:
    """With one block fewer than it takes to reach the stop, the walk gives up with None."""
    structure = read_structure(_read(golden_dir, _BAD_HUFFMAN), max_pixels=10**6)
    needed = 19 * 63 + 20  # 63 one-block MCUs a row; the failing MCU counts
    assert find_zune_stop(structure, max_blocks=needed) == ZuneStop(19, 19, 0)
    assert find_zune_stop(structure, max_blocks=needed - 1) is None


def test_zune_walk_ignores_progressive_files(golden_dir: Path) -> None:
    """Progressive scans are outside the model: None, libjpeg's decode stands."""
    name = _FEATURES["420-progressive(*)"]
    assert find_zune_stop(read_structure(_read(golden_dir, name), max_pixels=10**7)) is None


def test_gray_stop_keeps_previous_mcu_row_and_leaves_the_rest_mid_grey(golden_dir: Path) -> None:
    """From the failing MCU on, row 19 repeats row 18's pixels; lines 160 and below are 128.

    Before the stop, zune and libjpeg differ only in blocks whose AC run passes position 63
    (libjpeg clamps it to the last coefficient, zune wraps ``pos & 63``), so only blocks
    where libjpeg holds a coefficient at position 63 may differ.
    """
    data = _read(golden_dir, _BAD_HUFFMAN)
    coefficients = read_coefficients(read_structure(data, max_pixels=10**6))
    expected = idct_plane(coefficients.blocks[0], coefficients.quant[0])[:500, :500]
    got = decode_jpeg(data)
    decoded = np.zeros(got.shape, dtype=bool)
    decoded[:152] = True
    decoded[152:160, :152] = True  # the stop is block 19 of MCU row 19
    differing = {(int(y) // 8, int(x) // 8) for y, x in np.argwhere(decoded & (got != expected))}
    assert differing and all(coefficients.blocks[0][r, c, 63] != 0 for r, c in differing)
    assert np.array_equal(got[152:160, 152:], got[144:152, 152:])
    assert (got[160:] == 128).all()
    assert format_hash(hash_gray(got)) == _golden(golden_dir)[_BAD_HUFFMAN]


def test_subsampled_stop_holds_back_the_last_rows_of_its_mcu_row(golden_dir: Path) -> None:
    """4:2:0 stop in MCU row 11: rows before it as libjpeg decodes them, rows from 190 on 128."""
    data = _china_with_bad_code(golden_dir)
    structure = read_structure(data, max_pixels=10**6)
    assert find_zune_stop(structure) == ZuneStop(row=11, col=18, block=5)
    coefficients = read_coefficients(structure)
    planes = [
        idct_plane(b, q) for b, q in zip(coefficients.blocks, coefficients.quant, strict=True)
    ]
    libjpeg = assemble(planes, [(1, 1), (2, 2), (2, 2)], 596, 299, ColourModel.YCBCR)
    got = decode_jpeg(data, want="rgb")
    assert np.array_equal(got[: 11 * 16 - 1], libjpeg[: 11 * 16 - 1])
    assert (got[12 * 16 - 2 :] == 128).all()
    assert not (got[12 * 16 - 3] == 128).all()


def test_stale_blocks_follow_zunes_block_order() -> None:
    """Blocks from the failing one on (Y rows, then Cb, Cr) and later MCUs take the row above."""
    structure = read_structure(_hopper_like_420(), max_pixels=10**6)
    luma = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32).astype(np.uint8)
    chroma = np.full((16, 16), 7, dtype=np.uint8)
    chroma[8:] = 9
    planes = [luma.copy(), chroma.copy(), chroma.copy()]
    keep_stale_blocks(planes, structure, ZuneStop(row=1, col=0, block=3))
    expected_luma = luma.copy()
    expected_luma[24:32, 8:16] = luma[8:16, 8:16]  # Y block 3 of MCU (1, 0): bottom right
    expected_luma[16:32, 16:] = luma[0:16, 16:]  # MCU (1, 1): all four Y blocks
    assert np.array_equal(planes[0], expected_luma)
    expected_chroma = chroma.copy()
    expected_chroma[8:16] = 7  # Cb and Cr of MCUs (1, 0) and (1, 1)
    assert np.array_equal(planes[1], expected_chroma) and np.array_equal(planes[2], expected_chroma)
    first_row = [luma.copy(), chroma.copy(), chroma.copy()]
    keep_stale_blocks(first_row, structure, ZuneStop(row=0, col=1, block=5))
    assert np.array_equal(first_row[0], luma) and np.array_equal(first_row[1], chroma)
    assert (first_row[2][:8, 8:] == 0).all() and (first_row[2][:8, :8] == 7).all()


def _hopper_like_420() -> bytes:
    """A 32x32 4:2:0 baseline JPEG (two by two MCUs) made by libjpeg."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 120, 200)).save(buffer, "JPEG", subsampling=2)
    return buffer.getvalue()
