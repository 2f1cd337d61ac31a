"""The compiled core: libjpeg errors as exceptions, zune's decoder vs its model, cost bounds."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from phash_trio.image import hashcore
from phash_trio.image.jpeg.coeffs import block_dims, read_baseline, read_planes, read_progressive
from phash_trio.image.jpeg.decoder import (
    JpegDecodeError,
    JpegTooLargeError,
    JpegUnsupportedError,
    decode_jpeg,
)
from phash_trio.image.jpeg.markers import read_structure
from phash_trio.image.jpeg.zune_walk import find_zune_stop

_HOPPER = "pillow/hopper.jpg"
_RESTARTS = "photos/jpeg/sugarshack_518x450_q75_420_base_rst4.jpg"
_PROGRESSIVE = "pillow/app13-multiple.jpg"


def _read(golden_dir: Path, name: str) -> bytes:
    return (golden_dir / "images" / name).read_bytes()


def _segment(code: int, body: bytes) -> bytes:
    return bytes([0xFF, code]) + (len(body) + 2).to_bytes(2, "big") + body


def _one_code_jpeg(width: int, height: int, components: int = 1) -> bytes:
    """A tiny JPEG whose only Huffman code (DC and AC) is sixteen zero bits: issue 9's case."""
    counts = bytes(15) + b"\x01"
    sof = bytes([8]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([components])
    sof += b"".join(bytes([k + 1, 0x11, 0]) for k in range(components))
    sos = bytes([components]) + b"".join(bytes([k + 1, 0x00]) for k in range(components))
    return (
        b"\xff\xd8"
        + _segment(0xDB, b"\x00" + bytes(range(1, 65)))
        + _segment(0xC4, b"\x00" + counts + b"\x00" + b"\x10" + counts + b"\x00")
        + _segment(0xC0, sof)
        + _segment(0xDA, sos + b"\x00\x3f\x00")
        + b"\x00" * 16
        + b"\xff\xd9"
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xd8",
        b"\xff\xd8\xff\xd9",
        b"not a jpeg at all",
        b"\xff\xd8" + _segment(0xC4, b"\x00" + b"\xff" * 16),  # DHT counting 4080 codes
        b"\xff\xd8" + _segment(0xC0, b"\x08\x00\x10\x00\x00\x01\x01\x11\x00"),  # width 0
        b"\xff\xd8" + _segment(0xDB, b"\x07" + bytes(64)),  # quantisation table 7
    ],
    ids=["empty", "soi", "soi-eoi", "text", "dht", "sof-width-0", "dqt-slot"],
)
def test_libjpeg_errors_are_exceptions_not_crashes(data: bytes) -> None:
    """Headers libjpeg rejects reach error_exit, which longjmps back: one exception, no exit."""
    with pytest.raises(hashcore.JpegLibError) as caught:
        hashcore.decode_planes(data, 1 << 24)
    assert str(caught.value) and "\n" not in str(caught.value)


def test_libjpeg_warnings_never_reach_stderr(
    golden_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Damaged data makes libjpeg warn; the hook records it and file descriptor 2 stays empty."""
    data = bytearray(_read(golden_dir, _HOPPER))
    scan = data.index(b"\xff\xda")
    data[scan + 200 : scan + 204] = b"\xff\x00\xff\x00"
    width, height, parts, corrupt = hashcore.decode_planes(bytes(data), 1 << 26)
    assert (width, height, len(parts), corrupt) == (128, 128, 3, True)
    assert capfd.readouterr().err == ""


def test_memory_limit_is_checked_before_allocating(golden_dir: Path) -> None:
    """A decode that needs more than max_memory is refused up front by both decoders."""
    structure = read_structure(_read(golden_dir, _HOPPER), max_pixels=10**6)
    with pytest.raises(hashcore.MemoryLimitError, match="MB"):
        hashcore.decode_planes(structure.stream, 10_000)
    with pytest.raises(hashcore.MemoryLimitError):
        hashcore.decode_baseline(structure.stream, 10_000)
    with pytest.raises(JpegTooLargeError, match="limit"):
        decode_jpeg(_read(golden_dir, _HOPPER), max_memory=30_000)
    with pytest.raises(JpegTooLargeError, match="output alone"):
        decode_jpeg(_read(golden_dir, _HOPPER), max_memory=100)
    with pytest.raises(hashcore.MemoryLimitError):
        hashcore.decode_baseline(structure.stream, -1)


def test_zune_port_and_libjpeg_agree_on_intact_files(golden_dir: Path) -> None:
    """On undamaged baseline files zune's decoder and libjpeg give the same coded blocks.

    (Past libjpeg's coded blocks zune has the MCU padding blocks the encoder wrote; libjpeg's
    planes are edge-replicated there.)"""
    for name in (_HOPPER, _RESTARTS, "photos/jpeg/china_596x299_q88_420_base_opt.jpg"):
        structure = read_structure(_read(golden_dir, name), max_pixels=10**7)
        ours = read_baseline(structure)
        assert ours is not None and ours.stop is None
        libjpeg = read_planes(structure)
        dims = block_dims(structure)
        for mine, theirs, (rows, cols) in zip(ours.planes, libjpeg.planes, dims, strict=True):
            coded = (slice(0, rows * 8), slice(0, cols * 8))
            assert np.array_equal(mine[coded], theirs[coded]), name


def _stb_idct(v: list[int]) -> list[int]:
    """zune's scalar idct_int, loop for loop, with Rust's wrapping i32 arithmetic."""

    def i32(x: int) -> int:
        return (x + (1 << 31)) % (1 << 32) - (1 << 31)

    if not any(v[1:]):
        return [min(255, max(0, (v[0] + 4 + 1024) >> 3))] * 64

    def one_d(x: list[int], bias: int, shift: int) -> list[int]:
        p1 = i32((x[2] + x[6]) * 2217)
        t2, t3 = i32(p1 + x[6] * -7567), i32(p1 + x[2] * 3135)
        t0, t1 = i32((x[0] + x[4]) << 12), i32((x[0] - x[4]) << 12)
        x0, x3 = i32(t0 + t3 + bias), i32(t0 - t3 + bias)
        x1, x2 = i32(t1 + t2 + bias), i32(t1 - t2 + bias)
        a0, a1, a2, a3 = x[7], x[5], x[3], x[1]
        q3, q4, q1, q2 = i32(a0 + a2), i32(a1 + a3), i32(a0 + a3), i32(a1 + a2)
        p5 = i32((q3 + q4) * 4816)
        q1, q2 = i32(p5 + q1 * -3685), i32(p5 + q2 * -10497)
        q3, q4 = i32(q3 * -8034), i32(q4 * -1597)
        a3, a2 = i32(a3 * 6149 + q1 + q4), i32(a2 * 12586 + q2 + q3)
        a1, a0 = i32(a1 * 8410 + q2 + q4), i32(a0 * 1223 + q1 + q3)
        outs = [x0 + a3, x1 + a2, x2 + a1, x3 + a0, x3 - a0, x2 - a1, x1 - a2, x0 - a3]
        return [i32(o) >> shift for o in outs]

    cols = [one_d([v[u + 8 * k] for k in range(8)], 512, 10) for u in range(8)]
    rows = [one_d([cols[u][y] for u in range(8)], 512 + 65536 + (128 << 17), 17) for y in range(8)]
    return [min(255, max(0, p)) for row in rows for p in row]


def test_compiled_idct_matches_zunes_scalar_transform() -> None:
    """Full, 4x4-corner and DC-only blocks, small and huge (wrapping) values: bit for bit."""
    rng = np.random.default_rng(17)
    blocks = rng.integers(-2000, 2000, size=(300, 64)).astype(np.int32)
    blocks[:60, 1:] = 0  # DC only
    corner = np.zeros((8, 8), dtype=bool)
    corner[:4, :4] = True
    blocks[60:150, ~corner.reshape(-1)] = 0  # zune's 4x4 case
    blocks[150:180] = rng.integers(-(2**31), 2**31 - 1, size=(30, 64))  # overflow wraps
    blocks[180:200, 1:] = rng.integers(-1, 2, size=(20, 63)) * (rng.random((20, 63)) < 0.05)
    got = np.frombuffer(hashcore.idct(blocks), dtype=np.uint8).reshape(-1, 64)
    for block, pixels in zip(blocks, got, strict=True):
        assert pixels.tolist() == _stb_idct([int(c) for c in block])


def test_progressive_files_are_outside_the_baseline_port(golden_dir: Path) -> None:
    """The zune port models single-scan baseline only: progressive is outside (None)."""
    structure = read_structure(_read(golden_dir, _PROGRESSIVE), max_pixels=10**7)
    assert read_baseline(structure) is None


def _progressive_names(golden_dir: Path) -> list[str]:
    names = []
    for path in sorted((golden_dir / "images").rglob("*")):
        if path.suffix.lower() in {".jpg", ".jpeg", ".mpo"}:
            try:
                structure = read_structure(path.read_bytes(), max_pixels=10**7)
            except JpegDecodeError:
                continue
            if structure.progressive:
                names.append(str(path.relative_to(golden_dir / "images")))
    return names


def test_progressive_decoder_gives_libjpegs_blocks(golden_dir: Path) -> None:
    """Every intact progressive file of the subset: the compiled decoder == libjpeg, block for block."""
    names = _progressive_names(golden_dir)
    assert len(names) >= 10
    for name in names:
        structure = read_structure(_read(golden_dir, name), max_pixels=10**7)
        ours = read_progressive(structure)
        assert ours is not None, name
        libjpeg = read_planes(structure)
        for mine, theirs, (rows, cols) in zip(
            ours, libjpeg.planes, block_dims(structure), strict=True
        ):
            coded = (slice(0, rows * 8), slice(0, cols * 8))
            assert np.array_equal(mine[coded], theirs[coded]), name


def test_damaged_progressive_files_fall_back_to_libjpeg(golden_dir: Path) -> None:
    """Where the progressive decoder finds anything odd it declines and libjpeg decodes."""
    original = _read(golden_dir, _PROGRESSIVE)
    first_scan = original.index(b"\xff\xda", original.index(b"\xff\xc2"))
    rng = np.random.default_rng(5)
    declined = decoded = 0
    for _ in range(100):
        data = bytearray(original)
        for _ in range(4):
            data[int(rng.integers(first_scan + 20, len(data) - 2))] = int(rng.integers(255))
        try:
            structure = read_structure(bytes(data), max_pixels=10**7)
        except JpegDecodeError:
            continue
        if read_progressive(structure) is None:
            declined += 1
            try:
                pixels = decode_jpeg(bytes(data))
            except JpegDecodeError:  # libjpeg refused it (e.g. a damaged scan header)
                continue
            assert pixels.shape == (structure.height, structure.width)
            decoded += 1
    assert declined > 5 and decoded > 0


@pytest.mark.parametrize(("name", "tries", "min_stops"), [(_HOPPER, 150, 10), (_RESTARTS, 40, 0)])
def test_compiled_stop_matches_the_python_model_under_random_damage(
    golden_dir: Path, name: str, tries: int, min_stops: int
) -> None:
    """Where the Python walk (the oracle) finds a stop, the compiled decoder stops there too."""
    original = _read(golden_dir, name)
    scan = original.index(b"\xff\xda") + 20
    rng = np.random.default_rng(99)
    compared = stopped = 0
    for _ in range(tries):
        data = bytearray(original)
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(scan, len(data) - 2))] = int(rng.integers(256))
        try:
            structure = read_structure(bytes(data), max_pixels=10**7)
            compiled = read_baseline(structure)
        except JpegDecodeError:
            continue
        if compiled is None:
            continue
        expected = find_zune_stop(structure)
        compared += 1
        stopped += compiled.stop is not None
        assert compiled.stop == expected
    assert compared > tries // 3 and stopped >= min_stops


def test_ultra_hdr_decodes_the_primary_image_only(golden_dir: Path) -> None:
    """An Ultra HDR file (primary JPEG with an MPF index, gain map appended) is its primary."""
    primary = _read(golden_dir, _HOPPER)
    gain_map = _read(golden_dir, "pillow/hopper_gray.jpg")
    mpf = _segment(0xE2, b"MPF\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + bytes(40))
    ultra_hdr = primary[:2] + mpf + primary[2:] + gain_map
    assert np.array_equal(decode_jpeg(ultra_hdr), decode_jpeg(primary))
    assert np.array_equal(decode_jpeg(ultra_hdr, want="rgb"), decode_jpeg(primary, want="rgb"))


def _with_scans(data: bytes, extra: int) -> bytes:
    """``data`` (progressive) with its last scan repeated ``extra`` more times before EOI."""
    last = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * extra + data[end:]


def test_progressive_scan_limit_is_zunes(golden_dir: Path) -> None:
    """Up to 100 progressive scans decode; the 101st is zune's "Too many scans" refusal."""
    data = _read(golden_dir, _PROGRESSIVE)
    scans = read_structure(data, max_pixels=10**7).stream.count(b"\xff\xda")
    decode_jpeg(_with_scans(data, 100 - scans))
    with pytest.raises(JpegUnsupportedError, match="Too many scans"):
        decode_jpeg(_with_scans(data, 101 - scans))


def test_threads_decode_in_parallel_and_agree(golden_dir: Path) -> None:
    """Eight threads decoding gray and RGB at once get the serial results (no shared state)."""
    names = [_HOPPER, _RESTARTS, _PROGRESSIVE, "pillow/pil_sample_cmyk.jpg"]
    jobs = [(_read(golden_dir, n), want) for n in names for want in ("gray", "rgb")] * 4
    serial = [decode_jpeg(data, want=want) for data, want in jobs]  # type: ignore[arg-type]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda job: decode_jpeg(job[0], want=job[1]), jobs))
    assert all(np.array_equal(a, b) for a, b in zip(parallel, serial, strict=True))


_COST_PROBE = textwrap.dedent(
    """
    import json, resource, sys, time
    from phash_trio.image.meanhash import ImageError, mean_hash
    data = sys.stdin.buffer.read()
    start = time.process_time()
    try:
        outcome = "%016x" % mean_hash(data, max_pixels=int(sys.argv[1]))
    except ImageError as exc:
        outcome = type(exc).__name__
    cpu = time.process_time() - start
    # VmHWM belongs to this exec's address space; ru_maxrss would carry over the peak of the
    # (large) pytest process that forked us, since Linux keeps it across execve.
    try:
        with open("/proc/self/status") as status:
            peak = next(int(l.split()[1]) for l in status if l.startswith("VmHWM:")) * 1024
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"outcome": outcome, "cpu": cpu, "peak": peak}))
    """
)


def _cost(data: bytes, max_pixels: int = 25_000_000) -> dict[str, object]:
    """Hash ``data`` in a fresh interpreter; its outcome, CPU seconds and peak RSS in bytes."""
    done = subprocess.run(
        [sys.executable, "-c", _COST_PROBE, str(max_pixels)],
        input=data,
        capture_output=True,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize("components", [1, 4])
def test_sixteen_bit_huffman_code_costs_little(components: int) -> None:
    """Issue 9's 149-byte all-zero 16-bit code JPEG (and its CMYK cousin): < 2 s, < 400 MB."""
    data = _one_code_jpeg(4990, 5000, components)
    assert len(data) < 200
    cost = _cost(data)
    assert isinstance(cost["cpu"], float) and cost["cpu"] < 2.0
    assert isinstance(cost["peak"], int) and cost["peak"] < 400 << 20


def test_huge_frame_from_a_one_byte_change_costs_little(golden_dir: Path) -> None:
    """A real photo whose SOF says 65344x624 (issue 9: 614 MB, 8.5 s) stays under 2 s, 400 MB.

    40.8 MP: decoded (to a hash) under a 50 MP cap, refused up front under the service's 25 MP.
    """
    data = bytearray(_read(golden_dir, "photos/jpeg/china_596x299_q88_420_base_opt.jpg"))
    sof = data.index(b"\xff\xc0")
    data[sof + 7 : sof + 9] = (65344).to_bytes(2, "big")
    data[sof + 5 : sof + 7] = (624).to_bytes(2, "big")
    assert _cost(bytes(data))["outcome"] == "ImageTooLarge"
    cost = _cost(bytes(data), max_pixels=50_000_000)
    assert isinstance(cost["outcome"], str) and len(cost["outcome"]) == 16
    assert isinstance(cost["cpu"], float) and cost["cpu"] < 2.0
    assert isinstance(cost["peak"], int) and cost["peak"] < 400 << 20
