"""Hashing throughput on one core: our exact mean hash vs ImageHash's average_hash.

Usage: python bench/bench_hash.py [--golden DIR] [--photos DIR] [--rounds N]

Runs sequentially in one process with the BLAS/OpenMP pools held at one thread (set before
numpy is imported) and, where the OS allows, pinned to one CPU. Every file is read into memory
first, so the figures are decode + hash only. Prints first the headline: real photos (the
golden set's JPEG photos of at least 1.5 MP, else bench/data/), images/s of ours, of ImageHash
average_hash and of Pillow's decode + convert("L") alone, measured round by round in turn
(so all three see the same machine load), and the ratio ours / ImageHash. Then the golden
corpus for both (all formats), how many results agree with the golden hex (ImageHash after
reversing the bits of each byte: it packs the first pixel into the most significant bit),
per-image p50/p99, time per format, the largest JPEGs and a synthetic 12-megapixel JPEG.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import imagehash  # noqa: E402
from PIL import Image  # noqa: E402

from phash_trio.image.allocator import tune_allocator  # noqa: E402
from phash_trio.image.decode import decode_gray  # noqa: E402
from phash_trio.image.meanhash import ImageError, format_hash, hash_gray, mean_hash  # noqa: E402

_BENCH_PHOTOS = Path(__file__).resolve().parent / "data"
_FULL_GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
_SUBSET_GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden"
#: The full golden set when ../shared is beside the repository, else the in-repository subset.
DEFAULT_GOLDEN = _FULL_GOLDEN if (_FULL_GOLDEN / "mean8.tsv").is_file() else _SUBSET_GOLDEN


def _pin_one_cpu() -> str:
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity)"
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}"


def _reverse_byte_bits(hex16: str) -> str:
    return bytes(int(f"{b:08b}"[::-1], 2) for b in bytes.fromhex(hex16)).hex()


def _ours(data: bytes) -> str | None:
    try:
        return format_hash(mean_hash(data))
    except ImageError:
        return None


def _imagehash(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return _reverse_byte_bits(str(imagehash.average_hash(im, hash_size=8)))
    except Exception:  # baseline only: anything it cannot do is just a miss
        return None


def _run(
    name: str, fn: Callable[[bytes], str | None], files: list[tuple[str, bytes, str]]
) -> dict[str, float]:
    """Hash every file once; returns per-file seconds keyed by name, prints the summary."""
    times: dict[str, float] = {}
    agree = failed = 0
    start = time.perf_counter()
    for path, data, expected in files:
        t0 = time.perf_counter()
        got = fn(data)
        times[path] = time.perf_counter() - t0
        failed += got is None
        agree += got == expected
    total = time.perf_counter() - start
    per = sorted(times.values())
    p99 = per[min(len(per) - 1, round(0.99 * (len(per) - 1)))]
    print(
        f"{name:<22} {len(files) / total:8.1f} images/s   {total:6.2f} s total   "
        f"p50 {statistics.median(per) * 1e3:6.2f} ms   p99 {p99 * 1e3:7.2f} ms   "
        f"agree {agree}/{len(files)} ({100 * agree / len(files):.1f} %)   errors {failed}"
    )
    return times


def _photos(golden: Path, fallback: Path) -> tuple[list[tuple[str, bytes]], str]:
    """JPEG photos of at least 1.5 MP from the golden set, else the shipped bench photos."""
    found = []
    folder = golden / "images" / "photos" / "jpeg"
    for path in sorted(folder.glob("*.jpg")) if folder.is_dir() else []:
        with Image.open(path) as im:
            if im.width * im.height >= 1_500_000:
                found.append((path.name, path.read_bytes()))
    if found:
        return found, str(folder)
    return [(p.name, p.read_bytes()) for p in sorted(fallback.glob("*.jpg"))], str(fallback)


def _pillow_gray(data: bytes) -> str | None:
    with Image.open(io.BytesIO(data)) as im:
        im.convert("L")
    return None


def _photo_headline(photos: list[tuple[str, bytes]], where: str, rounds: int) -> None:
    """Ours, ImageHash and Pillow alone on the same photos, round by round; best and median."""
    pixels = 0
    for _, data in photos:
        with Image.open(io.BytesIO(data)) as im:
            pixels += im.width * im.height
    print(
        f"real photos: {len(photos)} JPEGs, mean {pixels / len(photos) / 1e6:.2f} MP, "
        f"{sum(len(d) for _, d in photos) / len(photos) / 1e3:.0f} kB, {where}"
    )
    contenders: dict[str, Callable[[bytes], str | None]] = {
        "phash_trio mean_hash": _ours,
        "imagehash average_hash": _imagehash,
        "Pillow decode+L alone": _pillow_gray,
    }
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    cpu_rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(max(1, rounds)):
        for name, fn in contenders.items():
            start, cpu = time.perf_counter(), time.process_time()
            for _, data in photos:
                fn(data)
            rates[name].append(len(photos) / (time.perf_counter() - start))
            cpu_rates[name].append(len(photos) / (time.process_time() - cpu))
    for name, values in rates.items():
        print(
            f"  {name:<24} best {max(values):6.1f} images/s   median "
            f"{statistics.median(values):6.1f} images/s   per CPU-second: best "
            f"{max(cpu_rates[name]):6.1f}   ({len(values)} rounds)"
        )
    ours, theirs = rates["phash_trio mean_hash"], rates["imagehash average_hash"]
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    cpu_ratio = max(cpu_rates["phash_trio mean_hash"]) / max(cpu_rates["imagehash average_hash"])
    print(
        f"  ratio ours / ImageHash: best-vs-best {max(ours) / max(theirs):.2f}, "
        f"median of per-round ratios {statistics.median(ratios):.2f}, per CPU-second "
        f"{cpu_ratio:.2f} (target >= 1.0, stretch 1.3)"
    )
    agree = sum(_ours(d) == _imagehash(d) for _, d in photos)
    print(f"  (ImageHash agrees with us, hence with the reference, on {agree}/{len(photos)})")


def _twelve_megapixels(golden: Path) -> bytes:
    """A 4000x3000 q85 4:2:0 JPEG made from the largest golden photo (upscaled)."""
    photos = sorted((golden / "images" / "photos" / "jpeg").glob("*.jpg"))
    source = max(photos, key=lambda p: p.stat().st_size)
    with Image.open(source) as im:
        big = im.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=85, subsampling="4:2:0")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", type=Path, default=DEFAULT_GOLDEN)
    parser.add_argument("--photos", type=Path, default=_BENCH_PHOTOS, help="fallback photos")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the photo runs")
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's malloc thresholds alone (the service's hashing processes raise them)",
    )
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # Pillow warns on some malformed test images (baseline)
    print(f"threads: OMP/OPENBLAS/MKL = 1, sequential, {_pin_one_cpu()}")
    if not args.default_allocator:
        # As in the service's hashing processes; ImageHash, in the same process, gets it too.
        print(f"allocator: heap thresholds 32 MiB as in the service: {tune_allocator()}")
    photos, where = _photos(args.golden, args.photos)
    for _, data in photos[:3]:  # warm-up
        _ours(data)
        _imagehash(data)
    _photo_headline(photos, where, args.rounds)

    rows = [
        line.split("\t")
        for line in (args.golden / "mean8.tsv").read_text().splitlines()
        if line.strip()
    ]
    files = [(p, (args.golden / "images" / p).read_bytes(), h) for p, h in rows]
    megabytes = sum(len(d) for _, d, _ in files) / 1e6
    print(f"golden corpus: {len(files)} files, {megabytes:.1f} MB, {args.golden}")

    # Warm-up: import the JPEG decoder, build the luma table, compile nothing else.
    for _, data, _ in files[:20]:
        _ours(data)

    ours = _run("phash_trio mean_hash", _ours, files)
    _run("imagehash average_hash", _imagehash, files)

    print("where our time goes, per format (decode -> gray, then resize + mean + bits):")
    stages: dict[str, list[float]] = {}
    for path, data, _ in files:
        t0 = time.perf_counter()
        gray = decode_gray(data, max_pixels=50_000_000)
        t1 = time.perf_counter()
        hash_gray(gray)
        t2 = time.perf_counter()
        entry = stages.setdefault(Path(path).suffix.lower().replace(".mpo", ".jpg"), [0, 0, 0])
        entry[0] += 1
        entry[1] += t1 - t0
        entry[2] += t2 - t1
    for suffix, (count, decode, resize) in sorted(stages.items()):
        print(
            f"  {suffix:<6} {int(count):4d} files   decode {decode / count * 1e3:7.2f} ms/image   "
            f"resize+hash {resize / count * 1e3:6.2f} ms/image"
        )

    jpegs = [f for f in files if f[0].lower().endswith((".jpg", ".jpeg", ".mpo"))]
    largest = sorted(jpegs, key=lambda f: len(f[1]), reverse=True)[:5]
    print("largest JPEGs (ours, decode + hash):")
    for path, data, _ in largest:
        with Image.open(io.BytesIO(data)) as im:
            size = f"{im.width}x{im.height}"
        print(f"  {ours[path] * 1e3:8.1f} ms  {size:>10}  {len(data) / 1e3:7.0f} kB  {path}")

    photo = _twelve_megapixels(args.golden)
    runs = []
    split = []
    for _ in range(max(1, args.rounds)):
        t0 = time.perf_counter()
        gray = decode_gray(photo, max_pixels=50_000_000)
        t1 = time.perf_counter()
        hash_gray(gray)
        t2 = time.perf_counter()
        runs.append(t2 - t0)
        split.append((t1 - t0, t2 - t1))
    best = min(runs)
    decode, resize = min(split)
    print(
        f"12 MP JPEG (4000x3000, q85 4:2:0, {len(photo) / 1e6:.1f} MB): "
        f"best {best * 1e3:.0f} ms, median {statistics.median(runs) * 1e3:.0f} ms "
        f"= {1 / best:.2f} images/s (decode + luma {decode * 1e3:.0f} ms, "
        f"resize + hash {resize * 1e3:.0f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
