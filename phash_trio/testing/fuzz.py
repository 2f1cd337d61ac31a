"""Fuzz ``mean_hash`` with mutations of real JPEG/PNG/GIF/WebP files, in limited child processes.

Every case is a deterministic function of ``(seed, index)``: a real file from the golden subset
(tests/data/golden/images, files under 60 KB) and a stack of 1-4 mutations - bit flips, byte
sets, truncation, insertion, deletion, duplication of a span, and format surgery (JPEG marker
segments and their lengths, PNG chunk lengths/types/CRCs, GIF block sizes, RIFF chunk sizes).
Cases run in batches in a child process (:func:`~phash_trio.testing.sandbox.run_limited`,
1 GB address space) that writes the index of the case it is on to a progress file, so a crash,
a hang or a kill names its case. A case *passes* when ``mean_hash`` returns a hash or raises an
``ImageError`` subclass within the CPU budget without the process's peak RSS passing the memory
budget; an ``ImageTooLarge`` that only hides a ``MemoryError`` ("out of memory") is a finding.

``python -m phash_trio.testing.fuzz --cases 20000`` (``just fuzz``) runs the full set and
writes findings to ``fuzz-findings/``; the test suite runs a small seeded sample.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "TARGETS",
    "Finding",
    "FuzzReport",
    "hash_case",
    "make_case",
    "rgb_case",
    "run_fuzz",
    "seed_files",
    "segfault_on_gif",
]

GOLDEN_IMAGES = Path(__file__).resolve().parents[2] / "tests" / "data" / "golden" / "images"
_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")
#: The service's defaults.
MAX_PIXELS = 25_000_000
MAX_BYTES = 2_000_000
CPU_BUDGET = 2.0
MEMORY_BUDGET = 1 << 30


@cache
def seed_files(root: Path = GOLDEN_IMAGES, max_size: int = 60_000) -> tuple[bytes, ...]:
    """The real files mutations start from: JPEG/PNG/GIF/WebP under ``max_size`` bytes."""
    paths = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in _SUFFIXES and p.is_file() and p.stat().st_size <= max_size
    )
    return tuple(p.read_bytes() for p in paths)


# ------------------------------------------------------------------------------ mutations


def _flip_bits(data: bytearray, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)


def _set_bytes(data: bytearray, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))


def _truncate(data: bytearray, rng: random.Random) -> None:
    del data[rng.randrange(len(data)) :]


def _insert(data: bytearray, rng: random.Random) -> None:
    pos = rng.randrange(len(data) + 1)
    data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))


def _delete(data: bytearray, rng: random.Random) -> None:
    pos = rng.randrange(len(data))
    del data[pos : pos + rng.randint(1, 256)]


def _duplicate(data: bytearray, rng: random.Random) -> None:
    start = rng.randrange(len(data))
    span = bytes(data[start : start + rng.randint(1, 512)])
    pos = rng.randrange(len(data) + 1)
    data[pos:pos] = span


def _big_u16(rng: random.Random) -> int:
    return rng.choice((0, 1, 2, 0xFFFF, 0x7FFF, 0x8000, rng.randrange(0x10000)))


def _jpeg_surgery(data: bytearray, rng: random.Random) -> None:
    """Hit a marker segment: its length, its first fields (SOF size, DHT counts), or remove,
    duplicate or swap it."""
    markers = [
        i for i in range(2, len(data) - 3) if data[i] == 0xFF and 0xC0 <= data[i + 1] <= 0xFE
    ]
    if not markers:
        return _set_bytes(data, rng)
    at = rng.choice(markers)
    length = int.from_bytes(data[at + 2 : at + 4], "big")
    choice = rng.randrange(5)
    if choice == 0:  # segment length
        data[at + 2 : at + 4] = _big_u16(rng).to_bytes(2, "big")
    elif choice == 1:  # a field inside (SOF height/width, DHT code counts, SOS selectors)
        pos = at + 4 + rng.randrange(max(1, min(length, 24)))
        if pos + 2 <= len(data):
            data[pos : pos + 2] = _big_u16(rng).to_bytes(2, "big")
    elif choice == 2:  # remove the segment
        del data[at : at + 2 + length]
    elif choice == 3:  # duplicate the segment
        data[at:at] = data[at : at + 2 + length]
    else:  # change the marker kind
        data[at + 1] = rng.choice((0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xD9, 0xDA, 0xDB, 0xDD, 0xE1))
    return None


def _png_surgery(data: bytearray, rng: random.Random) -> None:
    """Hit a chunk: its length, type or body (then fix the CRC so the damage gets through),
    or remove/duplicate it."""
    chunks = []
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        chunks.append((pos, length))
        pos += 12 + length
    if not chunks:
        return _set_bytes(data, rng)
    at, length = rng.choice(chunks)
    choice = rng.randrange(5)
    if choice == 0:
        data[at : at + 4] = rng.choice((0, 1, 0x7FFFFFFF, rng.randrange(1 << 20))).to_bytes(
            4, "big"
        )
    elif choice == 1:
        data[at + 4 : at + 8] = rng.choice((b"IHDR", b"IDAT", b"IEND", b"PLTE", b"tRNS", b"acTL"))
    elif choice == 2 and length:
        end = min(at + 8 + length, len(data) - 4)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(at + 8, max(at + 9, end))] = rng.randrange(256)
        body = bytes(data[at + 4 : end])
        data[end : end + 4] = struct.pack(">I", zlib.crc32(body))
    elif choice == 3:
        del data[at : at + 12 + length]
    else:
        data[at:at] = data[at : at + 12 + length]
    return None


def _riff_surgery(data: bytearray, rng: random.Random) -> None:
    """WebP/RIFF: the RIFF size, the first chunk's size, or a VP8X/VP8L size field."""
    targets = [4, 16, 24, 21, 27]
    pos = rng.choice([t for t in targets if t + 4 <= len(data)] or [0])
    data[pos : pos + 4] = rng.choice(
        (0, 1, 0xFFFFFFFF, 0x3FFF3FFF, rng.randrange(1 << 32))
    ).to_bytes(4, "little")


def _gif_surgery(data: bytearray, rng: random.Random) -> None:
    """GIF: screen or frame size, flags, LZW code size, or a sub-block length."""
    descriptors = [i for i in range(13, len(data)) if data[i] == 0x2C][:4]
    pos = rng.choice([6, 8, 10, 11, *descriptors])
    if pos < len(data):
        if data[pos] == 0x2C and pos + 10 <= len(data):  # image descriptor: size fields
            field = pos + 1 + 2 * rng.randrange(4)
            data[field : field + 2] = _big_u16(rng).to_bytes(2, "little")
            if rng.random() < 0.5 and pos + 10 < len(data):
                data[pos + 10] = rng.randrange(256)  # LZW code size (no local table)
        else:
            data[pos : pos + 2] = _big_u16(rng).to_bytes(2, "little")[: len(data) - pos]


_GENERIC = (_flip_bits, _set_bytes, _truncate, _insert, _delete, _duplicate)


def _surgery(data: bytearray, rng: random.Random) -> None:
    if data[:3] == b"\xff\xd8\xff":
        _jpeg_surgery(data, rng)
    elif data[:4] == b"\x89PNG":
        _png_surgery(data, rng)
    elif data[:4] == b"RIFF":
        _riff_surgery(data, rng)
    elif data[:3] == b"GIF":
        _gif_surgery(data, rng)
    else:
        _flip_bits(data, rng)


def make_case(seed: int, index: int) -> bytes:
    """Case ``index`` of run ``seed``: a seed file with 1-4 mutations (deterministic)."""
    rng = random.Random(seed * 1_000_003 + index)
    files = seed_files()
    data = bytearray(rng.choice(files))
    for _ in range(rng.randint(1, 4)):
        if not data:
            break
        mutation = _surgery if rng.random() < 0.4 else rng.choice(_GENERIC)
        mutation(data, rng)
    return bytes(data)


# ------------------------------------------------------------------------------ running


def _peak_rss() -> int:
    from phash_trio.testing.sandbox import peak_rss_bytes

    return peak_rss_bytes()


def hash_case(data: bytes) -> int:
    """What each case goes through: ``mean_hash`` at the service's default limits."""
    from phash_trio.image.meanhash import mean_hash

    return mean_hash(data, max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES)


def signals_case(data: bytes) -> int:
    """``compute_signals`` (the PDQ path: gray + PDQ in one pass of the compiled core for a
    JPEG) at the same limits; returns the mean hash."""
    from phash_trio.image.signals import compute_signals

    return compute_signals(data, max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES).mean


def rgb_case(data: bytes) -> int:
    """``decode_rgb`` (RGB8 pixels, as pdqhash would get them) at the same limits; returns the
    pixel count."""
    from phash_trio.image.decode import decode_rgb
    from phash_trio.image.meanhash import ImageTooLarge

    if len(data) > MAX_BYTES:
        raise ImageTooLarge(f"input is {len(data)} bytes, limit {MAX_BYTES}")
    return int(decode_rgb(data, max_pixels=MAX_PIXELS).size)


TARGETS: dict[str, Callable[[bytes], Any]] = {
    "mean_hash": hash_case,
    "signals": signals_case,
    "decode_rgb": rgb_case,
}


def segfault_on_gif(data: bytes) -> int:
    """A target that crashes on GIF input (to test that the harness names the case)."""
    if data.startswith(b"GIF"):
        from phash_trio.testing.sandbox import die_by_signal

        die_by_signal(11)
    return hash_case(data)


def run_batch(
    seed: int, start: int, stop: int, progress: str, target: Callable[[bytes], Any] = hash_case
) -> dict[str, Any]:
    """Run cases ``start:stop`` here (in the child): outcome counts and findings."""
    from phash_trio.image.meanhash import ImageError

    counts: dict[str, int] = {}
    findings: list[tuple[int, str]] = []
    slowest = (0.0, -1)
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for index in range(start, stop):
            os.pwrite(fd, struct.pack("<q", index), 0)
            data = make_case(seed, index)
            before = resource.getrusage(resource.RUSAGE_SELF)
            try:
                target(data)
                kind = "hashed"
            except ImageError as exc:
                kind = type(exc).__name__
                if "out of memory" in str(exc):
                    findings.append((index, f"memory: {exc}"))
                if "\n" in str(exc):
                    findings.append((index, f"multi-line message: {exc!r}"))
            except Exception as exc:  # the finding this suite is for
                kind = "unexpected"
                findings.append((index, f"{type(exc).__module__}.{type(exc).__name__}: {exc}"))
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            if cpu > CPU_BUDGET:
                findings.append((index, f"slow: {cpu:.2f} s CPU"))
            slowest = max(slowest, (cpu, index))
            counts[kind] = counts.get(kind, 0) + 1
    finally:
        os.close(fd)
    return {"counts": counts, "findings": findings, "slowest": slowest, "peak": _peak_rss()}


@attrs.frozen
class Finding:
    """A case that did not end as a hash or a typed error within budget."""

    index: int
    problem: str


@attrs.frozen
class FuzzReport:
    seed: int
    cases: int
    counts: dict[str, int]
    findings: list[Finding]
    slowest_cpu_secs: float
    slowest_index: int
    peak_rss_bytes: int
    wall_secs: float


def run_fuzz(
    seed: int,
    cases: int,
    *,
    batch: int = 500,
    mem_bytes: int = MEMORY_BUDGET,
    target: Callable[[bytes], Any] = hash_case,
) -> FuzzReport:
    """Run ``cases`` cases in child processes of ``batch`` cases each; a child that dies or
    hangs becomes a finding for the case it was on and the run goes on after it."""
    # By its module name, never __main__'s: the child must be able to import it.
    from phash_trio.testing.fuzz import run_batch as batch_fn
    from phash_trio.testing.sandbox import run_limited

    counts: dict[str, int] = {}
    findings: list[Finding] = []
    slowest = (0.0, -1)
    peak = 0
    started = time.monotonic()
    # Ranges still to run; a crash at case k re-queues the cases before it (their counts died
    # with the child) and goes on after it.
    todo = [(i, min(i + batch, cases)) for i in range(0, cases, batch)][::-1]
    with tempfile.TemporaryDirectory(prefix="phash-fuzz-") as tmp:
        progress = str(Path(tmp, "progress"))
        while todo:
            index, stop = todo.pop()
            Path(progress).write_bytes(struct.pack("<q", -1))
            wall = 60.0 + 4 * CPU_BUDGET * (stop - index)
            out = run_limited(
                batch_fn,
                seed,
                index,
                stop,
                progress,
                target,
                mem_bytes=mem_bytes,
                cpu_secs=int(wall),
                wall_secs=wall,
            )
            peak = max(peak, out.max_rss_bytes)
            if out.status == "returned":
                report = out.value
                for kind, n in report["counts"].items():
                    counts[kind] = counts.get(kind, 0) + n
                findings += [Finding(i, p) for i, p in report["findings"]]
                slowest = max(slowest, tuple(report["slowest"]))
                continue
            (at,) = struct.unpack("<q", Path(progress).read_bytes()[:8])
            if at < 0:  # died before its first case: the harness, not an input
                raise RuntimeError(f"fuzz child failed to start: {out.status} {out.stderr[-500:]}")
            how = out.status + (f" by signal {out.signal}" if out.signal else "")
            if out.status == "raised":
                how += f": {out.message}"
            findings.append(Finding(at, f"child {how}; stderr: {out.stderr[-300:]!r}"))
            counts["crashed"] = counts.get("crashed", 0) + 1
            if at + 1 < stop:
                todo.append((at + 1, stop))
            if index < at:
                todo.append((index, at))
    findings.sort(key=lambda f: f.index)
    return FuzzReport(
        seed, cases, counts, findings, slowest[0], int(slowest[1]), peak, time.monotonic() - started
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz mean_hash with mutated real images.")
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--findings", type=Path, default=Path("fuzz-findings"))
    parser.add_argument("--target", choices=sorted(TARGETS), default="mean_hash")
    args = parser.parse_args(argv)
    # By its module name, never __main__'s: the child must be able to import the target.
    from phash_trio.testing import fuzz as importable

    target = importable.TARGETS[args.target]
    report = run_fuzz(args.seed, args.cases, batch=args.batch, target=target)
    print(
        f"fuzz: {report.cases} cases (seed {report.seed}) from {len(seed_files())} real files"
        f" in {report.wall_secs:.0f} s; outcomes {dict(sorted(report.counts.items()))};"
        f" slowest case {report.slowest_index} {report.slowest_cpu_secs:.2f} s CPU;"
        f" peak RSS {report.peak_rss_bytes / 2**20:.0f} MB; findings {len(report.findings)}"
    )
    if report.findings:
        args.findings.mkdir(parents=True, exist_ok=True)
        for finding in report.findings:
            path = args.findings / f"seed{report.seed}-case{finding.index}.bin"
            path.write_bytes(make_case(report.seed, finding.index))
            print(f"  case {finding.index}: {finding.problem}  -> {path}")
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
