"""Settings from the environment and .env: names, defaults, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from phash_trio.config import VARIABLES, ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]


def test_defaults_match_skywatch() -> None:
    """With nothing set, the skywatch-phash-rs defaults apply and the service is in dry-run."""
    s = load_settings(environ={}, env_file=None)
    assert (s.processing_concurrency, s.retry_attempts, s.retry_delay_ms) == (10, 3, 1000)
    assert (s.cache_enabled, s.cache_ttl_seconds, s.phash_hamming_threshold) == (True, 86400, 3)
    assert (s.rate_limit_ms, s.redis_health_check_interval_secs, s.redis_max_backoff_secs) == (
        100,
        30.0,
        10.0,
    )
    assert (s.blob_download_timeout_secs, s.blob_total_timeout_secs) == (10.0, 30.0)
    assert s.cdn_url == "https://cdn.bsky.app"
    assert s.rules_file == Path("rules/blobs.json")
    assert s.cursor_file == Path("state/cursor")
    assert (s.cursor_update_interval_ms, s.channel_size, s.shutdown_grace_secs) == (
        5000,
        1000,
        20.0,
    )
    assert s.effective_dry_run


def test_values_are_parsed() -> None:
    """Numbers, booleans and URL lists are parsed from their text."""
    s = load_settings(
        environ={
            "PROCESSING_CONCURRENCY": "4",
            "CACHE_ENABLED": "no",
            "SHUTDOWN_GRACE_SECS": "2.5",
            "JETSTREAM_FALLBACK_URLS": "wss://a.example/subscribe, wss://b.example/subscribe",
            "STATE_DIR": "/var/lib/x",
        },
        env_file=None,
    )
    assert s.processing_concurrency == 4
    assert s.cache_enabled is False
    assert s.shutdown_grace_secs == 2.5
    assert s.jetstream_fallback_urls == ("wss://a.example/subscribe", "wss://b.example/subscribe")
    assert s.cursor_file == Path("/var/lib/x/cursor")


def test_systemd_state_directory_is_the_default_state_dir() -> None:
    """systemd's STATE_DIRECTORY is used when STATE_DIR is not set."""
    s = load_settings(environ={"STATE_DIRECTORY": "/var/lib/phash-trio"}, env_file=None)
    assert s.state_dir == Path("/var/lib/phash-trio")
    assert s.session_file == Path("/var/lib/phash-trio/session.json")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PROCESSING_CONCURRENCY": "ten"}, "PROCESSING_CONCURRENCY: 'ten' is not valid"),
        ({"PROCESSING_CONCURRENCY": "0"}, "PROCESSING_CONCURRENCY: 0 is below the minimum 1"),
        ({"CACHE_ENABLED": "maybe"}, "CACHE_ENABLED: 'maybe' is not valid: expected true or false"),
        ({"RETRY_DELAY_MS": "-5"}, "RETRY_DELAY_MS: -5 is below the minimum 0"),
        ({"JETSTREAM_URL": "http://x/subscribe"}, "JETSTREAM_URL: 'http://x/subscribe' is not"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT: 'xml' is not 'text' or 'json'"),
        ({"METRICS_ADDR": "9464"}, "METRICS_ADDR: '9464' is not HOST:PORT"),
        ({"LABELER_DID": "did:example:x"}, "LABELER_DID: 'did:example:x' is not a did:plc"),
        ({"BLOB_TOTAL_TIMEOUT_SECS": "nan"}, "BLOB_TOTAL_TIMEOUT_SECS: 'nan' is not valid"),
        ({"OZONE_REPORT_REASON_TYPE": "reasonOther"}, "OZONE_REPORT_REASON_TYPE: 'reasonOther'"),
        ({"PDQ_HAMMING_THRESHOLD": "257"}, "PDQ_HAMMING_THRESHOLD: 257 is above 256"),
        ({"PDQ_QUALITY_MIN": "101"}, "PDQ_QUALITY_MIN: 101 is above 100"),
        ({"BANKS_POLL_SECS": "0"}, "BANKS_POLL_SECS: 0.0 is below the minimum 0.05"),
        ({"BANKS_LOG_MAXLEN": "10"}, "BANKS_LOG_MAXLEN: 10 is below the minimum 100"),
        (
            {"AUTOMOD_HANDLE": "mod.example", "OZONE_PDS": "https://pds.example"},
            "AUTOMOD_PASSWORD: missing",
        ),
        (
            {
                "AUTOMOD_HANDLE": "mod.example",
                "AUTOMOD_PASSWORD": "secret-pass",
                "OZONE_PDS": "https://pds.example",
            },
            "LABELER_DID: missing",
        ),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    """Each bad value gives one line that starts with the variable's name."""
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env, env_file=None)
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text


def test_password_never_in_error_or_repr() -> None:
    """The password is left out of the settings' repr and of credential errors."""
    env = {"AUTOMOD_PASSWORD": "hunter2-secret", "OZONE_PDS": "https://pds.example"}
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env, env_file=None)
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in repr(Settings(automod_password="hunter2-secret"))


def test_dotenv_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    """Values come from .env unless the real environment sets them."""
    env_file = tmp_path / ".env"
    env_file.write_text("CHANNEL_SIZE=7\nRETRY_ATTEMPTS=9\n# comment\nDRY_RUN=true\n")
    s = load_settings(environ={"RETRY_ATTEMPTS": "1"}, env_file=env_file)
    assert (s.channel_size, s.retry_attempts, s.dry_run) == (7, 1, True)


def test_env_example_lists_every_variable() -> None:
    """.env.example names every variable the service reads (CURSOR_FILE commented)."""
    text = (REPO / ".env.example").read_text()
    for name in VARIABLES:
        assert f"{name}=" in text, name


def test_cli_exits_2_with_one_line_on_bad_config(tmp_path: Path) -> None:
    """`phash-trio run` with a bad variable exits 2 with one stderr line and no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "phash_trio", "run"],
        env={"PATH": "/usr/bin:/bin", "CHANNEL_SIZE": "lots"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "phash-trio: configuration error: CHANNEL_SIZE: 'lots' is not valid: expected a whole number"
    ]
