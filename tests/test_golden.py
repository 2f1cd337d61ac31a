"""Every golden file hashes exactly as the Rust reference did, and the refused ones are refused.

Two corpora: the curated subset in ``tests/data/golden`` (always checked) and the full set in
``../shared/golden`` (checked when present, skipped with the reason otherwise).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from phash_trio.image import ImageError, format_hash, mean_hash, parse_hash

# Format groups, so one slow group (JPEG) can be run on its own: pytest -k jpeg.
_GROUPS = {
    "png": (".png",),
    "jpeg": (".jpg", ".jpeg", ".mpo"),
    "gif": (".gif",),
    "webp": (".webp",),
}
#: Rows of mean8.tsv / undecodable.txt in each corpus, so a lost file cannot go unnoticed.
_EXPECTED_ROWS = {"subset": (108, 4), "full": (746, 4)}

#: Files we knowingly hash differently, path -> our hash, with the reason in a comment. The test
#: fails if one of them starts to match (remove it here) or if any other file differs. None now:
#: pillow/hopper_bad_exif.jpg, the last one, matches since the JPEG decoder emulates zune's stop.
KNOWN_MISSES: dict[str, str] = {}


@pytest.fixture(params=["subset", "full"])
def corpus(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(name, directory) of the in-repository subset, then of the full set when present."""
    name: str = request.param
    fixture = "golden_dir" if name == "subset" else "full_golden_dir"
    return name, request.getfixturevalue(fixture)


def _rows(golden_dir: Path, name: str) -> Iterator[tuple[str, str]]:
    for line in (golden_dir / name).read_text(encoding="utf-8").splitlines():
        if line.strip():
            path, value = line.split("\t", 1)
            yield path, value


def test_golden_table_is_complete(corpus: tuple[str, Path]) -> None:
    """mean8.tsv has its rows, every one in a tested group, every file present."""
    name, golden_dir = corpus
    rows = list(_rows(golden_dir, "mean8.tsv"))
    assert len(rows) == _EXPECTED_ROWS[name][0]
    suffixes = {s for group in _GROUPS.values() for s in group}
    for path, _ in rows:
        assert Path(path).suffix.lower() in suffixes, path
        assert (golden_dir / "images" / path).is_file(), path


def test_subset_is_part_of_the_full_set(golden_dir: Path, full_golden_dir: Path) -> None:
    """Each subset file is byte-identical to the full set's and carries the same verdict."""
    full = dict(_rows(full_golden_dir, "mean8.tsv")) | dict(
        _rows(full_golden_dir, "undecodable.txt")
    )
    for table in ("mean8.tsv", "undecodable.txt"):
        for path, value in _rows(golden_dir, table):
            assert full[path] == value, path
            ours = (golden_dir / "images" / path).read_bytes()
            assert ours == (full_golden_dir / "images" / path).read_bytes(), path


@pytest.mark.parametrize("group", sorted(_GROUPS))
def test_golden_hashes_match(corpus: tuple[str, Path], group: str) -> None:
    """Each file of the group gets the reference hex; all misses are listed with bit distances."""
    _, golden_dir = corpus
    suffixes = _GROUPS[group]
    checked = 0
    misses: list[str] = []
    for path, expected in _rows(golden_dir, "mean8.tsv"):
        if Path(path).suffix.lower() not in suffixes:
            continue
        checked += 1
        data = (golden_dir / "images" / path).read_bytes()
        try:
            got = mean_hash(data)
        except ImageError as exc:
            misses.append(f"{path}: expected {expected}, got {type(exc).__name__}: {exc}")
            continue
        if path in KNOWN_MISSES:
            assert format_hash(got) == KNOWN_MISSES[path], f"{path} changed: update KNOWN_MISSES"
            assert format_hash(got) != expected
            continue
        if format_hash(got) != expected:
            bits = (got ^ parse_hash(expected)).bit_count()
            misses.append(f"{path}: expected {expected}, got {format_hash(got)} ({bits} bits)")
    assert checked > 0
    assert not misses, f"{len(misses)} of {checked} {group} files differ:\n" + "\n".join(misses)


def test_undecodable_files_are_refused(corpus: tuple[str, Path]) -> None:
    """The files the reference cannot decode raise an ImageError here too."""
    name, golden_dir = corpus
    rows = list(_rows(golden_dir, "undecodable.txt"))
    assert len(rows) == _EXPECTED_ROWS[name][1]
    accepted = []
    for path, reference_error in rows:
        try:
            value = mean_hash((golden_dir / "images" / path).read_bytes())
        except ImageError:
            continue
        accepted.append(f"{path}: hashed to {format_hash(value)}; reference: {reference_error}")
    assert not accepted, "\n".join(accepted)
