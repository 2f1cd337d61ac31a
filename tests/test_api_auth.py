"""API keys: the key file, constant-time lookup, scopes, the per-key rate and the exposure check."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import trio
from starlette.requests import Request

from phash_trio.api.auth import (
    ANONYMOUS,
    Auth,
    ExposureError,
    Forbidden,
    KeyFileError,
    RateLimit,
    RateLimited,
    Unauthorized,
    add_key,
    check_exposure,
    hash_key,
    load_keys,
    parse_keys,
)


def _request(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": raw})


def _keyfile(tmp_path: Path) -> tuple[Path, str, str]:
    path = tmp_path / "keys"
    checker = add_key(path, "checker", ["check"])
    curator = add_key(path, "curator", ["check", "curate"])
    return path, checker, curator


def test_add_key_stores_only_the_hash_with_mode_0600(tmp_path: Path) -> None:
    """The key file holds the sha256 of each key, never the key, and only its owner reads it."""
    path, checker, curator = _keyfile(tmp_path)
    text = path.read_text()
    assert checker not in text and curator not in text
    assert f"sha256:{hash_key(checker)} check checker" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keys = load_keys(path)
    assert [(k.name, sorted(k.scopes)) for k in keys] == [
        ("checker", ["check"]),
        ("curator", ["check", "curate"]),
    ]


def test_add_key_refuses_a_duplicate_name_and_unknown_scope(tmp_path: Path) -> None:
    """A second key with the same name, or a scope we do not know, is refused before writing."""
    path, _, _ = _keyfile(tmp_path)
    before = path.read_text()
    with pytest.raises(KeyFileError, match="already exists"):
        add_key(path, "checker", ["check"])
    with pytest.raises(KeyFileError, match="scopes must be"):
        add_key(path, "other", ["admin"])
    assert path.read_text() == before


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("sha256:abc check x", "not sha256:<64"),
        (f"sha256:{'A' * 64} check x", "not sha256:<64"),
        (f"sha256:{'a' * 64} admin x", "unknown scope admin"),
        (f"sha256:{'a' * 64} check", "expected"),
        (f"sha256:{'a' * 64} check bad/name", "key name"),
    ],
)
def test_parse_keys_names_the_bad_line(line: str, message: str) -> None:
    """Each malformed line is reported with its file and line number."""
    text = f"# comment\n\nsha256:{'b' * 64} check,read ok  # trailing comment\n{line}\n"
    with pytest.raises(KeyFileError, match=message) as info:
        parse_keys(text, "keys.txt")
    assert str(info.value).startswith("keys.txt:4: ")


async def test_keys_from_either_header_and_scopes(tmp_path: Path) -> None:
    """X-API-Key and Authorization: Bearer both work; a missing or wrong key is 401, a
    missing scope 403."""
    path, checker, curator = _keyfile(tmp_path)
    auth = Auth.from_file(path)
    assert auth.require(_request({"X-API-Key": checker}), "check").name == "checker"
    assert auth.require(_request({"Authorization": f"Bearer {curator}"}), "curate").name == (
        "curator"
    )
    with pytest.raises(Unauthorized, match="required"):
        auth.require(_request({}), "check")
    with pytest.raises(Unauthorized, match="not valid"):
        auth.require(_request({"X-API-Key": checker + "x"}), "check")
    with pytest.raises(Unauthorized):
        auth.require(_request({"Authorization": f"Basic {checker}"}), "check")
    with pytest.raises(Forbidden, match="'curate'"):
        auth.require(_request({"X-API-Key": checker}), "curate")
    assert auth.refused == {"missing": 2, "unknown": 1, "scope": 1, "rate": 0}


async def test_open_modes(tmp_path: Path) -> None:
    """API_AUTH=none, or no keys on loopback, lets requests in as the anonymous key; no keys
    elsewhere stays closed."""
    empty = tmp_path / "none"
    assert Auth.from_file(empty, loopback=True).require(_request({}), "curate") is ANONYMOUS
    path, _, _ = _keyfile(tmp_path)
    assert Auth.from_file(path, mode="none").require(_request({}), "curate") is ANONYMOUS
    with pytest.raises(Unauthorized):
        Auth.from_file(empty, loopback=False).require(_request({}), "check")


def test_exposure_check() -> None:
    """A public address with no keys refuses to start unless API_AUTH=none."""
    check_exposure("127.0.0.1", "keys", [])
    check_exposure("::1", "keys", [])
    check_exposure("localhost", "keys", [])
    check_exposure("0.0.0.0", "none", [])
    check_exposure("0.0.0.0", "keys", parse_keys(f"sha256:{'a' * 64} check k"))
    with pytest.raises(ExposureError, match="API_AUTH=none"):
        check_exposure("0.0.0.0", "keys", [])
    with pytest.raises(ExposureError):
        check_exposure("192.0.2.7", "keys", [])


async def test_rate_limit_per_key(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """Each key has its own bucket: a burst passes, the next request is 429 with Retry-After,
    and tokens come back at the configured rate."""
    path, checker, curator = _keyfile(tmp_path)
    auth = Auth.from_file(path, rate=RateLimit(per_sec=0.5, burst=3))
    req = _request({"X-API-Key": checker})
    for _ in range(3):
        auth.require(req, "check")
    with pytest.raises(RateLimited) as info:
        auth.require(req, "check")
    assert info.value.retry_after == 2
    assert info.value.headers == {"retry-after": "2"}
    auth.require(_request({"X-API-Key": curator}), "check")  # another key, another bucket
    await trio.sleep(2.0)
    auth.require(req, "check")
    with pytest.raises(RateLimited):
        auth.require(req, "check")
    assert auth.refused["rate"] == 2


async def test_key_file_is_reloaded_when_it_changes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A key added while the server runs works after the reload interval; a file that turns
    bad keeps the old keys."""
    path, checker, _ = _keyfile(tmp_path)
    auth = Auth.from_file(path)
    auth.require(_request({"X-API-Key": checker}), "check")
    newer = add_key(path, "newer", ["read"])
    await trio.sleep(auth.reload_secs)
    assert auth.require(_request({"X-API-Key": newer}), "read").name == "newer"
    with path.open("a") as out:
        out.write("garbage\n")
    import os

    os.utime(path, (1, 1))
    await trio.sleep(auth.reload_secs)
    assert auth.require(_request({"X-API-Key": newer}), "read").name == "newer"


async def test_first_key_closes_an_open_loopback_api(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Loopback with no keys is open; once a key is added, requests need it (no restart)."""
    path = tmp_path / "keys"
    auth = Auth.from_file(path, loopback=True)
    assert auth.require(_request({}), "check") is ANONYMOUS
    key = add_key(path, "first", ["check"])
    await trio.sleep(auth.reload_secs)
    with pytest.raises(Unauthorized):
        auth.require(_request({}), "check")
    assert auth.require(_request({"X-API-Key": key}), "check").name == "first"
