"""Settings from the environment (and an optional ``.env``), validated once at start-up.

Names and defaults follow skywatch-phash-rs so an existing ``.env`` keeps working; ours are
added beside them (DESIGN §4). A bad value raises :class:`ConfigError` whose message is one line
naming the variable: the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
from dotenv import dotenv_values

from phash_trio.net.atproto.syntax import is_valid_did
from phash_trio.net.ozone.events import is_reason_type

__all__ = ["ConfigError", "Settings", "load_settings"]

DEFAULT_JETSTREAM_URL = "wss://jetstream1.us-east.bsky.network/subscribe"
DEFAULT_JETSTREAM_FALLBACK_URLS = (
    "wss://jetstream2.us-east.bsky.network/subscribe",
    "wss://jetstream1.us-west.bsky.network/subscribe",
    "wss://jetstream2.us-west.bsky.network/subscribe",
    "wss://jetstream.fire.hose.cam/subscribe",
    "wss://jetstream2.fr.hose.cam/subscribe",
)


class ConfigError(Exception):
    """A setting is missing or malformed; ``str()`` is one line naming the variable."""


@attrs.frozen(kw_only=True)
class Settings:
    """Everything the service reads from its environment."""

    # Ozone credentials and target; all empty means dry-run.
    automod_handle: str = ""
    automod_password: str = attrs.field(default="", repr=False)
    labeler_did: str = ""
    ozone_url: str = ""
    ozone_pds: str = ""

    jetstream_url: str = DEFAULT_JETSTREAM_URL
    jetstream_fallback_urls: tuple[str, ...] = DEFAULT_JETSTREAM_FALLBACK_URLS
    #: Seconds every Jetstream reconnect rewinds (instances' clocks differ by seconds).
    jetstream_rewind_secs: float = 10.0
    #: Consecutive failed connections before moving to the next Jetstream URL.
    jetstream_failover_after: int = 3
    #: Seconds on a fallback Jetstream before going back to the primary.
    jetstream_failback_secs: float = 600.0
    redis_url: str = "redis://localhost:6379"
    plc_endpoint: str = "https://plc.directory"
    pds_endpoint: str = "https://bsky.social"
    cdn_url: str = "https://cdn.bsky.app"

    processing_concurrency: int = 10
    retry_attempts: int = 3
    retry_delay_ms: int = 1000
    cache_enabled: bool = True
    cache_ttl_seconds: int = 86400
    phash_hamming_threshold: int = 3
    rate_limit_ms: int = 100
    redis_health_check_interval_secs: float = 30.0
    redis_max_backoff_secs: float = 10.0
    blob_download_timeout_secs: float = 10.0
    blob_total_timeout_secs: float = 30.0

    rules_file: Path = Path("rules/blobs.json")
    state_dir: Path = Path("state")
    #: Defaults to ``{state_dir}/cursor`` when not set.
    cursor_file: Path = Path("state/cursor")
    cursor_update_interval_ms: int = 5000
    channel_size: int = 1000
    shutdown_grace_secs: float = 20.0
    dry_run: bool = False
    metrics_addr: str = "127.0.0.1:9464"
    log_format: str = "text"
    log_level: str = "INFO"
    #: Refuse PDS hosts on private/loopback addresses unless this is true (tests, demo).
    allow_private_networks: bool = False
    #: How long a job held up only by an open circuit breaker may wait before it fails.
    breaker_wait_max_secs: float = 900.0
    #: Seconds after which a job is dead-lettered whatever holds it (the cursor waits no longer).
    job_deadline_secs: float = 300.0
    #: Seconds the Ozone circuit breaker stays open before it lets a probe through.
    ozone_breaker_reset_secs: float = 60.0
    #: ``reportType`` of the reports the service files (new form: accepted by every labeler).
    ozone_report_reason_type: str = "tools.ozone.report.defs#reasonOther"
    #: Per-rule daily action cap used when a rule has no ``maxActionsPerDay``.
    max_actions_per_day: int = 1000
    #: Threads hashing images at once when ``hash_processes`` is 0; 0 means one per core.
    hash_threads: int = 0
    #: Worker processes hashing images (threads share one GIL); 0 hashes in threads instead.
    hash_processes: int = attrs.field(factory=lambda: os.cpu_count() or 1)
    #: Largest accepted image blob in bytes (the AT Protocol limit for images is 2 MB).
    max_blob_bytes: int = 2_000_000
    #: Largest accepted decoded image in pixels (decompression bombs).
    max_image_pixels: int = 25_000_000
    #: Wall-clock seconds one image may take to hash; then its worker is killed, the blob bad.
    hash_timeout_secs: float = 10.0

    # Banks and PDQ (issue 12).
    #: PDQ distance (of 256 bits) that still matches when a rule has no ``pdqThreshold``.
    pdq_hamming_threshold: int = 31
    #: PDQ quality below which no PDQ match is attempted (HMA's cut is 50).
    pdq_quality_min: int = 50
    #: How often an instance reads the banks' change log from Redis.
    banks_poll_secs: float = 2.0
    #: A full bank reload (only when the change log was trimmed past us) waits a random
    #: 0..this many seconds, so instances do not all reload at once.
    banks_resync_jitter_secs: float = 30.0
    #: Entries kept in the banks' change log (each holds up to 500 changed hashes).
    banks_log_maxlen: int = 5000

    # Decision log, webhooks, live events and the moderators' page (issue 14).
    #: Seconds the decision log keeps entries (trimmed by time at every append).
    decisions_retention_secs: float = 7 * 24 * 3600.0
    #: Decisions buffered in memory while Redis is slow; beyond it they are dropped and counted.
    decisions_buffer: int = 10_000
    #: JSON file of webhook subscriptions (empty: only those made through the API).
    webhooks_file: Path | None = None
    #: Seconds a webhook event is retried (5xx, timeouts) before it becomes a dead letter.
    webhook_retry_max_secs: float = 86400.0
    #: Seconds one webhook POST may take.
    webhook_timeout_secs: float = 10.0
    #: Seconds an instance's claim on a subscription lasts without renewal (failover time).
    webhook_lease_secs: float = 15.0
    #: Events buffered per SSE client; a client that falls this far behind is disconnected.
    sse_client_buffer: int = 1000
    #: Most SSE clients at once per instance (more get 503); the HTTP connection cap grows by it.
    sse_max_clients: int = 256
    #: Seconds between SSE heartbeat comments.
    sse_heartbeat_secs: float = 15.0
    #: Seconds a moderators' page sign-in lasts.
    session_ttl_secs: float = 8 * 3600.0
    # The hash-and-match API (issue 13).
    #: Where the API listens (with /metrics and /healthz); empty: no API in ``run``, and
    #: ``serve`` listens on 127.0.0.1:8000.
    api_addr: str = ""
    #: ``keys`` (API keys from API_KEYS_FILE) or ``none`` (no authentication, on purpose).
    api_auth: str = "keys"
    #: The file of hashed API keys; defaults to ``{state_dir}/api-keys``.
    api_keys_file: Path = Path("state/api-keys")
    #: Requests a second per API key on average (0: unlimited), and the burst allowed.
    api_rate_per_sec: float = 20.0
    api_rate_burst: int = 40
    #: Requests hashing at once; one more is answered 503 with Retry-After.
    api_hash_concurrency: int = 16

    @property
    def has_credentials(self) -> bool:
        """True when every Ozone credential is present."""
        return bool(self.automod_handle and self.automod_password and self.ozone_pds)

    @property
    def effective_dry_run(self) -> bool:
        """Dry-run when asked for, or when there is nothing to log in with."""
        return self.dry_run or not self.has_credentials

    @property
    def session_file(self) -> Path:
        return self.state_dir / "session.json"

    @property
    def effective_hash_threads(self) -> int:
        return self.hash_threads or (os.cpu_count() or 1)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected true or false")


def _parse_int(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError("expected a whole number") from None


def _parse_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("expected a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return value


def _parse_urls(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _parse_str(raw: str) -> str:
    return raw.strip()


def _parse_path(raw: str) -> Path:
    if not raw.strip():
        raise ValueError("expected a path")
    return Path(raw.strip())


# variable -> (field, parser, minimum for numbers)
_SPEC: dict[str, tuple[str, Callable[[str], Any], float | None]] = {
    "AUTOMOD_HANDLE": ("automod_handle", _parse_str, None),
    "AUTOMOD_PASSWORD": ("automod_password", _parse_str, None),
    "LABELER_DID": ("labeler_did", _parse_str, None),
    "OZONE_URL": ("ozone_url", _parse_str, None),
    "OZONE_PDS": ("ozone_pds", _parse_str, None),
    "JETSTREAM_URL": ("jetstream_url", _parse_str, None),
    "JETSTREAM_FALLBACK_URLS": ("jetstream_fallback_urls", _parse_urls, None),
    "JETSTREAM_REWIND_SECS": ("jetstream_rewind_secs", _parse_float, 0),
    "JETSTREAM_FAILOVER_AFTER": ("jetstream_failover_after", _parse_int, 1),
    "JETSTREAM_FAILBACK_SECS": ("jetstream_failback_secs", _parse_float, 1),
    "REDIS_URL": ("redis_url", _parse_str, None),
    "PLC_ENDPOINT": ("plc_endpoint", _parse_str, None),
    "PDS_ENDPOINT": ("pds_endpoint", _parse_str, None),
    "CDN_URL": ("cdn_url", _parse_str, None),
    "PROCESSING_CONCURRENCY": ("processing_concurrency", _parse_int, 1),
    "RETRY_ATTEMPTS": ("retry_attempts", _parse_int, 0),
    "RETRY_DELAY_MS": ("retry_delay_ms", _parse_int, 0),
    "CACHE_ENABLED": ("cache_enabled", _parse_bool, None),
    "CACHE_TTL_SECONDS": ("cache_ttl_seconds", _parse_int, 1),
    "PHASH_HAMMING_THRESHOLD": ("phash_hamming_threshold", _parse_int, 0),
    "RATE_LIMIT_MS": ("rate_limit_ms", _parse_int, 0),
    "REDIS_HEALTH_CHECK_INTERVAL_SECS": ("redis_health_check_interval_secs", _parse_float, 0.01),
    "REDIS_MAX_BACKOFF_SECS": ("redis_max_backoff_secs", _parse_float, 0.1),
    "BLOB_DOWNLOAD_TIMEOUT_SECS": ("blob_download_timeout_secs", _parse_float, 0.01),
    "BLOB_TOTAL_TIMEOUT_SECS": ("blob_total_timeout_secs", _parse_float, 0.01),
    "RULES_FILE": ("rules_file", _parse_path, None),
    "STATE_DIR": ("state_dir", _parse_path, None),
    "CURSOR_FILE": ("cursor_file", _parse_path, None),
    "CURSOR_UPDATE_INTERVAL_MS": ("cursor_update_interval_ms", _parse_int, 1),
    "CHANNEL_SIZE": ("channel_size", _parse_int, 1),
    "SHUTDOWN_GRACE_SECS": ("shutdown_grace_secs", _parse_float, 0),
    "DRY_RUN": ("dry_run", _parse_bool, None),
    "METRICS_ADDR": ("metrics_addr", _parse_str, None),
    "LOG_FORMAT": ("log_format", _parse_str, None),
    "LOG_LEVEL": ("log_level", _parse_str, None),
    "ALLOW_PRIVATE_NETWORKS": ("allow_private_networks", _parse_bool, None),
    "BREAKER_WAIT_MAX_SECS": ("breaker_wait_max_secs", _parse_float, 0),
    "OZONE_BREAKER_RESET_SECS": ("ozone_breaker_reset_secs", _parse_float, 0.1),
    "JOB_DEADLINE_SECS": ("job_deadline_secs", _parse_float, 1),
    "OZONE_REPORT_REASON_TYPE": ("ozone_report_reason_type", _parse_str, None),
    "MAX_ACTIONS_PER_DAY": ("max_actions_per_day", _parse_int, 0),
    "HASH_THREADS": ("hash_threads", _parse_int, 0),
    "HASH_PROCESSES": ("hash_processes", _parse_int, 0),
    "MAX_BLOB_BYTES": ("max_blob_bytes", _parse_int, 1),
    "MAX_IMAGE_PIXELS": ("max_image_pixels", _parse_int, 1),
    "HASH_TIMEOUT_SECS": ("hash_timeout_secs", _parse_float, 0.1),
    "PDQ_HAMMING_THRESHOLD": ("pdq_hamming_threshold", _parse_int, 0),
    "PDQ_QUALITY_MIN": ("pdq_quality_min", _parse_int, 0),
    "BANKS_POLL_SECS": ("banks_poll_secs", _parse_float, 0.05),
    "BANKS_RESYNC_JITTER_SECS": ("banks_resync_jitter_secs", _parse_float, 0),
    "BANKS_LOG_MAXLEN": ("banks_log_maxlen", _parse_int, 100),
    "DECISIONS_RETENTION_SECS": ("decisions_retention_secs", _parse_float, 60),
    "DECISIONS_BUFFER": ("decisions_buffer", _parse_int, 10),
    "WEBHOOKS_FILE": ("webhooks_file", _parse_path, None),
    "WEBHOOK_RETRY_MAX_SECS": ("webhook_retry_max_secs", _parse_float, 0),
    "WEBHOOK_TIMEOUT_SECS": ("webhook_timeout_secs", _parse_float, 0.1),
    "WEBHOOK_LEASE_SECS": ("webhook_lease_secs", _parse_float, 1),
    "SSE_CLIENT_BUFFER": ("sse_client_buffer", _parse_int, 1),
    "SSE_MAX_CLIENTS": ("sse_max_clients", _parse_int, 1),
    "SSE_HEARTBEAT_SECS": ("sse_heartbeat_secs", _parse_float, 0.1),
    "SESSION_TTL_SECS": ("session_ttl_secs", _parse_float, 60),
    "API_ADDR": ("api_addr", _parse_str, None),
    "API_AUTH": ("api_auth", _parse_str, None),
    "API_KEYS_FILE": ("api_keys_file", _parse_path, None),
    "API_RATE_PER_SEC": ("api_rate_per_sec", _parse_float, 0),
    "API_RATE_BURST": ("api_rate_burst", _parse_int, 1),
    "API_HASH_CONCURRENCY": ("api_hash_concurrency", _parse_int, 1),
}

VARIABLES: tuple[str, ...] = tuple(_SPEC)


def _check_url(name: str, value: str, schemes: tuple[str, ...]) -> None:
    if not value:
        return
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in schemes or not rest:
        raise ConfigError(f"{name}: {value!r} is not a {'/'.join(schemes)} URL")


def _check(settings: Settings) -> None:
    for name in ("JETSTREAM_URL",):
        _check_url(name, settings.jetstream_url, ("ws", "wss"))
    for url in settings.jetstream_fallback_urls:
        _check_url("JETSTREAM_FALLBACK_URLS", url, ("ws", "wss"))
    for name, value in (
        ("OZONE_URL", settings.ozone_url),
        ("OZONE_PDS", settings.ozone_pds),
        ("PLC_ENDPOINT", settings.plc_endpoint),
        ("PDS_ENDPOINT", settings.pds_endpoint),
        ("CDN_URL", settings.cdn_url),
    ):
        _check_url(name, value, ("http", "https"))
    _check_url("REDIS_URL", settings.redis_url, ("redis", "rediss", "unix"))
    if not settings.jetstream_url:
        raise ConfigError("JETSTREAM_URL: must not be empty")
    if settings.pdq_hamming_threshold > 256:
        raise ConfigError(f"PDQ_HAMMING_THRESHOLD: {settings.pdq_hamming_threshold} is above 256")
    if settings.pdq_quality_min > 100:
        raise ConfigError(f"PDQ_QUALITY_MIN: {settings.pdq_quality_min} is above 100")
    if settings.log_format not in ("text", "json"):
        raise ConfigError(f"LOG_FORMAT: {settings.log_format!r} is not 'text' or 'json'")
    if settings.log_level.upper() not in ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL: {settings.log_level!r} is not a log level")
    if settings.metrics_addr:
        host, sep, port = settings.metrics_addr.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(
                f"METRICS_ADDR: {settings.metrics_addr!r} is not HOST:PORT (empty disables it)"
            )
    if not is_reason_type(settings.ozone_report_reason_type):
        raise ConfigError(
            f"OZONE_REPORT_REASON_TYPE: {settings.ozone_report_reason_type!r} is not a reason"
            " token like tools.ozone.report.defs#reasonOther"
        )
    if settings.api_auth not in ("keys", "none"):
        raise ConfigError(f"API_AUTH: {settings.api_auth!r} is not 'keys' or 'none'")
    if settings.api_addr:
        host, sep, port = settings.api_addr.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(
                f"API_ADDR: {settings.api_addr!r} is not HOST:PORT (empty disables it)"
            )
    if settings.labeler_did and not is_valid_did(settings.labeler_did):
        raise ConfigError(f"LABELER_DID: {settings.labeler_did!r} is not a did:plc or did:web")
    creds = {
        "AUTOMOD_HANDLE": settings.automod_handle,
        "AUTOMOD_PASSWORD": settings.automod_password,
        "OZONE_PDS": settings.ozone_pds,
    }
    if any(creds.values()) and not settings.dry_run:
        for name, value in creds.items():
            if not value:
                raise ConfigError(f"{name}: missing (needed with the other Ozone credentials)")
        if not settings.labeler_did:
            raise ConfigError("LABELER_DID: missing (needed to send events to Ozone)")


def read_environment(
    environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")
) -> dict[str, str]:
    """Merge ``.env`` (if present) under the real environment, which wins."""
    merged: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        for key, value in dotenv_values(env_file).items():
            if value is not None:
                merged[key] = value
    merged.update(os.environ if environ is None else environ)
    return merged


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")
) -> Settings:
    """Build :class:`Settings`; raise :class:`ConfigError` on the first bad variable."""
    env = read_environment(environ, env_file)
    values: dict[str, Any] = {}
    for name, (field, parse, minimum) in _SPEC.items():
        raw = env.get(name)
        if raw is None:
            continue
        if raw.strip() == "" and parse is not _parse_str and parse is not _parse_urls:
            continue  # an empty value means "use the default"
        try:
            value = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}: {raw!r} is not valid: {exc}") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name}: {value} is below the minimum {minimum:g}")
        values[field] = value
    if "state_dir" not in values and env.get("STATE_DIRECTORY"):
        # systemd's StateDirectory= exports this; use it when STATE_DIR is not set.
        values["state_dir"] = Path(env["STATE_DIRECTORY"].split(":")[0])
    if "cursor_file" not in values:
        values["cursor_file"] = values.get("state_dir", Path("state")) / "cursor"
    if "api_keys_file" not in values:
        values["api_keys_file"] = values.get("state_dir", Path("state")) / "api-keys"
    settings = Settings(**values)
    _check(settings)
    return settings
