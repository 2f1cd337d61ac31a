"""Bank import formats (good and bad lines) and the `banks` command on a real redis-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phash_trio.rules.banks import BankEntry
from phash_trio.rules.formats import detect_format, export_lines, parse_text
from phash_trio.testing.redis_server import RedisProcess

P1 = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"
P2 = "d8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"
MD5 = "d41d8cd98f00b204e9800998ecf8427e"


def test_lines_bare_and_typed() -> None:
    """Bare hashes take --type; '<type> <hash>' lines name theirs; bad lines name their number."""
    text = f"# a comment\n{P1}\n\npdq {P2.upper()}\nmd5 {MD5}\nphash 00ff00ff00ff00ff\nnothex\npdq {P1} x\n"
    parsed = parse_text(text, "lines")
    assert [(e.signal_type, e.value) for e in parsed.entries] == [
        ("pdq", P1),
        ("pdq", P2),
        ("md5", MD5),
        ("phash", "00ff00ff00ff00ff"),
    ]
    assert parsed.entries[0].content_id == P1
    assert parsed.errors == [
        "line 7: pdq: 'nothex' is not 64 hex digits",
        "line 8: expected '<hash>' or '<signal_type> <hash>'",
    ]
    assert (
        parse_text("00ff00ff00ff00ff\n", "lines", default_type="phash").entries[0].signal_type
        == "phash"
    )


def test_pdq_photo_hasher_csv() -> None:
    """hash,quality,filename rows: the file name is the content id, the quality metadata."""
    text = f"hash,quality,filename\n{P1},100,img/a.jpg\n{P2},101,b.jpg\n{P1[:-1]},90,c.jpg\nshort\n"
    parsed = parse_text(text, "pdq-csv")
    assert parsed.entries == [BankEntry.make("pdq", P1, "img/a.jpg", metadata={"quality": 100})]
    assert parsed.errors == [
        "line 3: quality '101' is not a whole number from 0 to 100",
        f"line 4: pdq: '{P1[:-1]}' is not 64 hex digits",
        "line 5: expected 'hash,quality,filename'",
    ]


def test_stopncii_json() -> None:
    """signalType/hashValue objects; the id becomes the content id, the rest metadata."""
    items = [
        {"signalType": "pdq", "hashValue": P1, "id": 7, "caseNumber": "X"},
        {"signalType": "md5", "hashValue": MD5},
        {"signalType": "tmk", "hashValue": "00"},
        {"hashValue": P2},
        3,
    ]
    parsed = parse_text(json.dumps({"hashes": items}), "stopncii")
    assert parsed.entries[0] == BankEntry.make(
        "pdq", P1, "7", metadata={"id": 7, "caseNumber": "X"}
    )
    assert parsed.entries[1].content_id == MD5
    assert parsed.errors == [
        "item 3: unknown signal type 'tmk' (pdq, phash, md5, sha256)",
        "item 4: needs string 'signalType' and 'hashValue'",
        "item 5: expected an object",
    ]
    assert parse_text("{not json", "stopncii").errors[0].startswith("item 1: invalid JSON")
    deep = "[" * 100_000 + "]" * 100_000
    assert parse_text(deep, "stopncii").errors[0].startswith("item 1: invalid JSON")


def test_csv_with_a_huge_field_is_one_error() -> None:
    """A field past the csv module's limit ends the file with one error line, no traceback."""
    text = f"{P1},100,a.jpg\n{P2},100,{'x' * 200_000}\n"
    parsed = parse_text(text, "pdq-csv")
    assert len(parsed.entries) == 1
    assert parsed.errors == ["line 2: CSV error: field larger than field limit (131072)"]


def test_threatexchange_te_csv(tmp_path: Path) -> None:
    """simple.HASH_PDQ.te rows of the CLI (4 columns) and of HMA (5); the type from the name."""
    path = tmp_path / "simple.HASH_PDQ.te"
    text = f'{P1},123,2021-01-01,"tag1 tag2"\n{P2},55,66,2021-02-02,\n{P1},1\n'
    assert detect_format(path, text) == "te"
    parsed = parse_text(text, "te", path=path)
    assert parsed.entries[0] == BankEntry.make(
        "pdq",
        P1,
        "123",
        metadata={
            "added_on": "2021-01-01",
            "labels": ["tag1", "tag2"],
            "first_descriptor_id": "123",
        },
    )
    assert (
        parsed.entries[1].content_id == "55"
        and parsed.entries[1].metadata["first_descriptor_id"] == "66"
    )
    assert parsed.errors == ["line 3: expected 4 or 5 CSV columns, got 2"]
    md5 = parse_text(f"{MD5},1,d,\n", "te", path=tmp_path / "simple.HASH_MD5.te")
    assert md5.entries[0].signal_type == "md5"


def test_detect_and_export(tmp_path: Path) -> None:
    """Formats are told apart from the name and first line; export is '<type> <hash>'."""
    assert detect_format(tmp_path / "x.txt", f"{P1}\n") == "lines"
    assert detect_format(tmp_path / "x.csv", f"{P1},100,a.jpg\n") == "pdq-csv"
    assert detect_format(tmp_path / "x.txt", "[{}]") == "stopncii"
    entries = [BankEntry.make("pdq", P1, "a"), BankEntry.make("md5", MD5, "b")]
    assert list(export_lines(entries)) == [f"pdq {P1}", f"md5 {MD5}"]
    with pytest.raises(ValueError):
        parse_text("", "nope")


def banks_cli(redis_proc: RedisProcess, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_proc.url}
    return subprocess.run(
        [sys.executable, "-m", "phash_trio", "banks", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_banks_command_end_to_end(redis_proc: RedisProcess, tmp_path: Path) -> None:
    """import (refused with errors, --skip-bad), list, export, disable, remove, exit codes."""
    bad = tmp_path / "list.txt"
    bad.write_text(f"{P1}\nnothex\n{P2}\n")
    refused = banks_cli(redis_proc, tmp_path, "import", "NCMEC_PDQ", str(bad))
    assert refused.returncode == 1
    assert f"{bad}: line 2: pdq: 'nothex' is not 64 hex digits" in refused.stderr
    assert "nothing imported" in refused.stderr
    assert banks_cli(redis_proc, tmp_path, "list").stdout == "no banks\n"
    skipped = banks_cli(redis_proc, tmp_path, "import", "NCMEC_PDQ", str(bad), "--skip-bad")
    assert skipped.returncode == 1 and "imported 2 hashes" in skipped.stdout
    good = tmp_path / "simple.HASH_MD5.te"
    good.write_text(f"{MD5},9,2020-01-01,\n")
    assert banks_cli(redis_proc, tmp_path, "import", "NCMEC_PDQ", str(good)).returncode == 0
    listed = banks_cli(redis_proc, tmp_path, "list")
    assert listed.stdout == "NCMEC_PDQ\tenabled\t2 pdq, 1 md5\n"
    exported = banks_cli(redis_proc, tmp_path, "export", "NCMEC_PDQ")
    assert exported.stdout.splitlines() == sorted([f"pdq {P1}", f"pdq {P2}", f"md5 {MD5}"])
    assert banks_cli(redis_proc, tmp_path, "disable", "NCMEC_PDQ").returncode == 0
    assert "disabled" in banks_cli(redis_proc, tmp_path, "list").stdout
    assert banks_cli(redis_proc, tmp_path, "remove", "NCMEC_PDQ").returncode == 0
    missing = banks_cli(redis_proc, tmp_path, "export", "NCMEC_PDQ")
    assert missing.returncode == 1 and "no such bank" in missing.stderr
    assert banks_cli(redis_proc, tmp_path, "import", "bad-name", str(good)).returncode == 1


def test_banks_command_without_redis(tmp_path: Path) -> None:
    """No Redis at REDIS_URL: one line and exit 2."""
    env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:1"}
    result = subprocess.run(
        [sys.executable, "-m", "phash_trio", "banks", "list"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        result.stderr.startswith("phash-trio: Redis unavailable")
        and len(result.stderr.splitlines()) == 1
    )


def test_hash_command_prints_pdq(tmp_path: Path) -> None:
    """`hash --pdq` prints mean hash, PDQ and quality, the PDQ within 2 bits of HMA's."""
    from threatexchange.signal_type.pdq.pdq_hasher import pdq_from_bytes

    from phash_trio.image.pdq import pdq_distance
    from phash_trio.testing.capture import IMAGES_DIR

    coffee = IMAGES_DIR / "coffee.jpg"
    result = subprocess.run(
        [sys.executable, "-m", "phash_trio", "hash", "--pdq", "--json", str(coffee)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["phash"] == "fcfcfdd9810181c3"
    hma, quality = pdq_from_bytes(coffee.read_bytes())
    assert pdq_distance(row["pdq"], hma) <= 2 and row["quality"] == quality
