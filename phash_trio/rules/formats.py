"""Bank import/export in the formats hash lists come in.

* ``lines``: one hash per line, bare (of ``--type``, default pdq) or ``<signal_type> <hash>``
  as python-threatexchange's file exchange writes them; blank lines and ``#`` comments skipped.
* ``pdq-csv``: what Meta's ``pdq-photo-hasher`` prints, ``hash,quality,filename`` (a header
  line ``hash,quality,filename`` is allowed); the file name becomes the content id, the quality
  metadata.
* ``stopncii``: JSON, a list of objects (or ``{"hashes": [...]}``) with ``signalType`` and
  ``hashValue``; ``id``/``contentId`` becomes the content id, the other keys metadata.
* ``te``: python-threatexchange's ``simple.<TYPE>.te`` CSV: ``indicator, first_descriptor_id,
  added_on, "label label"`` (the CLI's), or with the indicator id second (HMA's); the type comes
  from the file name (``HASH_PDQ``, ``HASH_MD5``, ...).

Every bad line is reported with its line number; the caller imports nothing from a file with
errors unless told to skip them. Without a content id in the file, the hash is its own id.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs

from phash_trio.rules.banks import BankEntry, BankError

__all__ = ["FORMATS", "ParsedFile", "detect_format", "export_lines", "parse_text"]

FORMATS = ("lines", "pdq-csv", "stopncii", "te")
#: Largest import file read (a 10 M-line PDQ list is about 650 MB: split it).
MAX_FILE_BYTES = 1 << 30
_TE_NAME = re.compile(r"simple\.([A-Za-z0-9_]+)\.te")
_TE_TYPES = {"HASH_PDQ": "pdq", "HASH_MD5": "md5", "HASH_SHA256": "sha256", "PDQ": "pdq"}
_TE_TYPES.update({"MD5": "md5", "SHA256": "sha256", "VIDEO_MD5": "md5", "PHASH": "phash"})


@attrs.frozen
class ParsedFile:
    """What a file holds: good entries and one message per bad line."""

    entries: list[BankEntry]
    errors: list[str]


def detect_format(path: Path, head: str) -> str:
    """The format a file's name and first line suggest."""
    if _TE_NAME.fullmatch(path.name):
        return "te"
    first = next((line.strip() for line in head.splitlines() if line.strip()), "")
    if path.suffix.lower() == ".json" or first.startswith(("[", "{")):
        return "stopncii"
    if first.lower().replace(" ", "") == "hash,quality,filename" or re.fullmatch(
        r"[0-9a-fA-F]{64},\s*\d+,.*", first
    ):
        return "pdq-csv"
    return "lines"


def _entry(
    kind: str,
    value: str,
    content_id: str | None,
    note: str = "",
    metadata: dict[str, Any] | None = None,
) -> BankEntry:
    text = value.strip()
    return BankEntry.make(kind, text, content_id or text.lower(), note, metadata)


def _lines(text: str, default_type: str) -> Iterator[tuple[int, BankEntry | str]]:
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parts = stripped.split()
        try:
            if len(parts) == 1:
                yield number, _entry(default_type, parts[0], None)
            elif len(parts) == 2:
                yield number, _entry(parts[0], parts[1], None)
            else:
                yield number, "expected '<hash>' or '<signal_type> <hash>'"
        except BankError as exc:
            yield number, str(exc)


def _pdq_csv(text: str) -> Iterator[tuple[int, BankEntry | str]]:
    for number, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row or not "".join(row).strip():
            continue
        if number == 1 and [c.strip().lower() for c in row] == ["hash", "quality", "filename"]:
            continue
        if len(row) < 3:
            yield number, "expected 'hash,quality,filename'"
            continue
        hash_, quality, filename = row[0], row[1].strip(), ",".join(row[2:]).strip()
        if not quality.isdigit() or int(quality) > 100:
            yield number, f"quality {quality!r:.20} is not a whole number from 0 to 100"
            continue
        try:
            yield number, _entry("pdq", hash_, filename or None, "", {"quality": int(quality)})
        except BankError as exc:
            yield number, str(exc)


def _stopncii(text: str) -> Iterator[tuple[int, BankEntry | str]]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        yield getattr(exc, "lineno", 1), f"invalid JSON: {exc}"
        return
    items = data.get("hashes", data.get("data")) if isinstance(data, dict) else data
    if not isinstance(items, list):
        yield 1, "expected a JSON array of hashes (or an object with 'hashes')"
        return
    for number, item in enumerate(items, 1):
        where = number  # the item's position in the array
        if not isinstance(item, dict):
            yield where, "expected an object"
            continue
        kind, value = item.get("signalType"), item.get("hashValue")
        if not isinstance(kind, str) or not isinstance(value, str):
            yield where, "needs string 'signalType' and 'hashValue'"
            continue
        cid = item.get("contentId", item.get("id"))
        meta = {k: v for k, v in item.items() if k not in ("signalType", "hashValue")}
        try:
            yield where, _entry(kind, value, str(cid) if cid is not None else None, "", meta)
        except BankError as exc:
            yield where, str(exc)


def _te(text: str, te_type: str) -> Iterator[tuple[int, BankEntry | str]]:
    kind = _TE_TYPES.get(te_type.upper(), te_type.lower())
    for number, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row:
            continue
        if len(row) not in (4, 5):
            yield number, f"expected 4 or 5 CSV columns, got {len(row)}"
            continue
        indicator = row[0]
        if len(row) == 5:  # HMA's: indicator, indicator id, descriptor, added_on, labels
            cid, descriptor, added_on, labels = row[1], row[2], row[3], row[4]
        else:  # the CLI's: indicator, descriptor, added_on, labels
            descriptor, added_on, labels = row[1], row[2], row[3]
            cid = descriptor
        meta = {"added_on": added_on, "labels": labels.split(" ") if labels else []}
        meta["first_descriptor_id"] = descriptor
        try:
            yield number, _entry(kind, indicator, cid, "", meta)
        except BankError as exc:
            yield number, str(exc)


def parse_text(
    text: str, fmt: str, *, path: Path | None = None, default_type: str = "pdq"
) -> ParsedFile:
    """Parse ``text`` in ``fmt``; every bad line becomes ``line N: problem``."""
    if fmt == "lines":
        rows: Iterable[tuple[int, BankEntry | str]] = _lines(text, default_type)
    elif fmt == "pdq-csv":
        rows = _pdq_csv(text)
    elif fmt == "stopncii":
        rows = _stopncii(text)
    elif fmt == "te":
        match = _TE_NAME.fullmatch(path.name) if path is not None else None
        rows = _te(text, match.group(1) if match else default_type)
    else:
        raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    label = "item" if fmt == "stopncii" else "line"
    entries: list[BankEntry] = []
    errors: list[str] = []
    for number, result in rows:
        if isinstance(result, str):
            errors.append(f"{label} {number}: {result}")
        else:
            entries.append(result)
    return ParsedFile(entries, errors)


def export_lines(entries: Iterable[BankEntry]) -> Iterator[str]:
    """``<signal_type> <hash>`` per entry (python-threatexchange's file exchange format)."""
    for entry in entries:
        yield f"{entry.signal_type} {entry.value}"
