"""The systemd unit and the env file example in deploy/ are valid and agree with the code."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from dotenv import dotenv_values

from phash_trio.config import VARIABLES, Settings, load_settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNIT = DEPLOY / "phash-trio.service"
ENV_EXAMPLE = DEPLOY / "phash-trio.env.example"
EXEC_PATH = "/opt/phash-trio/venv/bin/phash-trio"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value given (systemd allows repeated keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def env_lines() -> tuple[dict[str, str], set[str]]:
    """Active ``NAME=value`` settings, and names only documented as ``# NAME=value``."""
    active: dict[str, str] = {}
    commented: set[str] = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        body = line.removeprefix("# ")
        name, sep, value = body.partition("=")
        if not sep or not name.isupper() or not name.replace("_", "").isalnum():
            continue
        if line.startswith("#"):
            commented.add(name)
        else:
            active[name] = value
    return active, commented


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit with no error and no warning."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze not found: install it with `apt-get install -y systemd`")
    fake = tmp_path / "venv" / "bin" / "phash-trio"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = UNIT.read_text()
    assert f"ExecStart={EXEC_PATH} run" in text
    copy = tmp_path / "phash-trio.service"
    copy.write_text(text.replace(EXEC_PATH, str(fake)))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_unit_has_the_required_directives() -> None:
    """Type=notify, watchdog, restart policy, stop handling, state directory and hardening."""
    unit = parse_unit(UNIT.read_text())
    expected = {
        "Unit": {
            "After": "network-online.target redis-server.service",
            "Wants": "network-online.target",
        },
        "Service": {
            "Type": "notify",
            "NotifyAccess": "main",
            "ExecStart": f"{EXEC_PATH} run",
            "WorkingDirectory": "/opt/phash-trio",
            "WatchdogSec": "60",
            "Restart": "on-failure",
            "RestartSec": "5",
            "RestartPreventExitStatus": "2",
            "KillSignal": "SIGTERM",
            "KillMode": "mixed",
            "TimeoutStopSec": "45",
            "EnvironmentFile": "/etc/phash-trio/phash-trio.env",
            "StateDirectory": "phash-trio",
            "User": "phash-trio",
            "Group": "phash-trio",
            "ProtectSystem": "strict",
            "ProtectHome": "true",
            "PrivateTmp": "true",
            "PrivateDevices": "true",
            "NoNewPrivileges": "true",
            "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
            "ProtectKernelTunables": "true",
            "ProtectKernelModules": "true",
            "ProtectControlGroups": "true",
            "RestrictNamespaces": "true",
            "LockPersonality": "true",
            "MemoryDenyWriteExecute": "true",
            "RestrictRealtime": "true",
            "SystemCallArchitectures": "native",
            "CapabilityBoundingSet": "",
            "UMask": "0077",
        },
        "Install": {"WantedBy": "multi-user.target"},
    }
    for section, directives in expected.items():
        for key, value in directives.items():
            assert unit[section].get(key) == [value], f"[{section}] {key}"
    assert "ReadWritePaths" not in unit["Service"]


def test_stop_timeout_leaves_room_for_the_grace_period() -> None:
    """TimeoutStopSec exceeds the drain grace so systemd never SIGKILLs a clean shutdown."""
    unit = parse_unit(UNIT.read_text())
    stop_timeout = float(unit["Service"]["TimeoutStopSec"][0])
    active, _ = env_lines()
    grace = float(active["SHUTDOWN_GRACE_SECS"])
    assert grace == Settings().shutdown_grace_secs
    assert stop_timeout >= grace + 20


def test_env_example_documents_every_variable() -> None:
    """Every variable the config reads is in the example, each after a comment, nothing extra."""
    active, commented = env_lines()
    assert set(active) | commented == set(VARIABLES)
    assert not set(active) & commented
    lines = ENV_EXAMPLE.read_text().splitlines()
    for index, line in enumerate(lines):
        if line.split("=")[0].removeprefix("# ") in VARIABLES and "=" in line:
            assert lines[index - 1].startswith("# "), f"no comment above {line!r}"


def test_env_example_loads_as_production_settings(tmp_path: Path) -> None:
    """The example is a valid configuration: dry-run, JSON logs, rules under /opt."""
    state = tmp_path / "state"
    env = {**dotenv_values(ENV_EXAMPLE), "STATE_DIRECTORY": str(state)}
    settings = load_settings({k: v for k, v in env.items() if v is not None}, env_file=None)
    assert settings.log_format == "json"
    assert settings.rules_file == Path("/opt/phash-trio/rules/blobs.json")
    assert settings.metrics_addr == "127.0.0.1:9464"
    assert settings.state_dir == state
    assert settings.cursor_file == state / "cursor"
    assert settings.effective_dry_run
    assert settings.automod_password == ""


def test_env_example_reads_the_same_in_sh_and_dotenv(tmp_path: Path) -> None:
    """`set -a; . file` (used by the admin wrapper in deploy/README.md) sees the same values."""
    result = subprocess.run(
        ["sh", "-c", 'set -a; . "$1"; set +a; env -0', "sh", str(ENV_EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    seen = dict(item.split("=", 1) for item in result.stdout.split("\0") if "=" in item)
    active, _ = env_lines()
    assert {name: seen.get(name) for name in active} == active
    parsed = dotenv_values(ENV_EXAMPLE)
    assert {name: parsed.get(name) for name in active} == active
