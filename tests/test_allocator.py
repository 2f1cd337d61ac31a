"""The allocator tuning of the hashing processes (image/allocator.py), measured, not assumed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH_PHOTO = sorted((Path(__file__).resolve().parents[1] / "bench" / "data").glob("*.jpg"))[0]

#: Hash one photo 20 times and print the minor page faults taken by the last 10 hashes.
_CHILD = """
import resource, sys
from phash_trio.image import mean_hash
from phash_trio.image.allocator import tune_allocator
if sys.argv[2] == "tuned":
    assert tune_allocator()
data = open(sys.argv[1], "rb").read()
for _ in range(10):
    mean_hash(data)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    mean_hash(data)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(BENCH_PHOTO), mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return int(out.stdout.strip())


def test_tuned_hashing_stops_taking_fresh_pages_for_every_image() -> None:
    default, tuned = _faults("default"), _faults("tuned")
    # Untuned, every image maps and faults in its buffers again (hundreds of pages each);
    # tuned, the heap reuses them.
    assert default >= 10 * 100
    assert tuned * 10 <= default
