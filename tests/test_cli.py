"""The command line: `hash`, `rules check`, exit codes, output formats."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from phash_trio.testing.capture import IMAGES_DIR

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phash_trio", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def golden_hex(golden_dir: Path, name: str) -> str:
    for line in (golden_dir / "mean8.tsv").read_text().splitlines():
        path, hex16 = line.split("\t")
        if path == name:
            return hex16
    raise KeyError(name)


def test_hash_prints_hex_and_name(golden_dir: Path) -> None:
    """`hash FILE…` prints `HEX  FILE` per file, the reference hex, exit 0."""
    coffee = IMAGES_DIR / "coffee.jpg"
    beach = IMAGES_DIR / "beach.webp"
    result = run_cli("hash", str(coffee), str(beach))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{golden_hex(golden_dir, 'photos/jpeg/coffee_397x265_q66_420_base_opt.jpg')}  {coffee}",
        f"{golden_hex(golden_dir, 'photos/webp/beach_397x223_q82_m6.webp')}  {beach}",
    ]


def test_hash_failure_exit_1_others_still_print(tmp_path: Path) -> None:
    """A file that fails prints its error on stderr, the others print, exit code 1."""
    broken = IMAGES_DIR / "not-an-image.jpg"
    missing = tmp_path / "missing.png"
    good = IMAGES_DIR / "moon.jpg"
    result = run_cli("hash", str(broken), str(missing), str(good))
    assert result.returncode == 1
    assert result.stdout.splitlines()[0].endswith(f"  {good}")
    errors = result.stderr.splitlines()
    assert len(errors) == 2
    assert errors[0].startswith(f"error: {broken}: ")
    assert errors[1] == f"error: {missing}: No such file or directory"


def test_hash_json_lines() -> None:
    """`--json` prints one object per file, with `phash` or `error`."""
    result = run_cli(
        "hash", "--json", str(IMAGES_DIR / "spitfire.jpg"), str(IMAGES_DIR / "truncated.jpg")
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0] == {"file": str(IMAGES_DIR / "spitfire.jpg"), "phash": "ffff070080c1ffff"}
    assert set(lines[1]) == {"file", "error"}
    assert result.returncode == 1


def test_rules_check_ok_and_broken(tmp_path: Path) -> None:
    """`rules check` exits 0 on the example file and 1 naming every error of a broken one."""
    ok = run_cli("rules", "check", "rules/blobs.json")
    assert ok.returncode == 0
    assert "OK, 5 rules" in ok.stdout
    broken = tmp_path / "bad.json"
    broken.write_text(json.dumps([{"phashes": ["xyz"], "label": ""}, {"label": "a", "bogus": 1}]))
    bad = run_cli("rules", "check", str(broken))
    assert bad.returncode == 1
    out = bad.stdout
    assert "rule 0" in out and "phashes" in out and "label" in out
    assert "rule 1" in out and "bogus" in out


@pytest.mark.parametrize("args", [[], ["hash"], ["rules"], ["dead-letters", "explode"]])
def test_usage_errors(args: list[str]) -> None:
    """Missing or wrong arguments print usage and exit 2 (argparse)."""
    result = run_cli(*args)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_run_with_broken_rules_exits_2(tmp_path: Path) -> None:
    """`run` refuses to start on a broken rule file: exit 2, one line, nothing connected."""
    rules = tmp_path / "rules.json"
    rules.write_text("[{")
    result = subprocess.run(
        [sys.executable, "-m", "phash_trio", "run"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "RULES_FILE": str(rules)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"phash-trio: rule file {rules}: ")


def _run_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "RULES_FILE": str(REPO / "rules" / "blobs.json"),
        "JETSTREAM_URL": "ws://127.0.0.1:9/subscribe",
        "JETSTREAM_FALLBACK_URLS": "",
        "REDIS_URL": "redis://127.0.0.1:9",
        "STATE_DIR": str(tmp_path / "state"),
        "METRICS_ADDR": "",
        **extra,
    }


def test_run_exits_2_when_metrics_port_is_taken(tmp_path: Path) -> None:
    """A METRICS_ADDR already in use stops start-up with exit 2 and one reason line."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        result = subprocess.run(
            [sys.executable, "-m", "phash_trio", "run"],
            cwd=tmp_path,
            env=_run_env(tmp_path, METRICS_ADDR=addr),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"phash-trio: cannot start: METRICS_ADDR {addr}: cannot listen: Address already in use"
    )
    assert "Traceback" not in result.stderr


def test_run_exits_2_when_state_dir_cannot_be_created(tmp_path: Path) -> None:
    """A state directory that cannot be created stops start-up with exit 2, one line."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = subprocess.run(
        [sys.executable, "-m", "phash_trio", "run"],
        cwd=tmp_path,
        env=_run_env(tmp_path, STATE_DIR=str(blocker / "state")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"phash-trio: cannot start: cannot create state directory {blocker / 'state'}: Not a directory"
    ]


def test_hash_reads_at_most_max_bytes_plus_one() -> None:
    """`hash /dev/zero` under a 400 MB address-space limit ends at once with one line."""
    result = subprocess.run(
        [
            "bash",
            "-c",
            'ulimit -v 400000 && exec "$0" -m phash_trio hash /dev/zero',
            sys.executable,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "error: /dev/zero: larger than 2000000 bytes (see --max-bytes)\n"
    small = run_cli("hash", "--max-bytes", "100", str(IMAGES_DIR / "moon.jpg"))
    assert small.stderr.endswith("larger than 100 bytes (see --max-bytes)\n")


def test_hash_prints_only_one_line_per_failed_file(tmp_path: Path) -> None:
    """Library noise (libtiff on fd 2, Pillow warnings) and log records never reach the
    terminal: stderr holds exactly one line per failed file."""
    from phash_trio.testing import hostile

    noisy = tmp_path / "noisy.tif"
    noisy.write_bytes(hostile.tiff_strip())
    half = tmp_path / "half.png"
    half.write_bytes(hostile.png_half_rows())
    bad_png = IMAGES_DIR / "truncated.jpg"
    result = run_cli("hash", str(noisy), str(half), str(bad_png), str(IMAGES_DIR / "moon.jpg"))
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert [line.split(": ")[1] for line in errors] == [str(noisy), str(half), str(bad_png)]
    assert all(line.startswith("error: ") for line in errors)
    assert len(result.stdout.splitlines()) == 1
