"""The Ozone role and labeler-record check: at start-up (exit 2) and `rules check --ozone`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from phash_trio.net.breaker import CircuitBreaker
from phash_trio.net.ozone.check import check_ozone, role_name
from phash_trio.net.ozone.client import OzoneClient
from phash_trio.net.ozone.events import LEGACY_REASON_OTHER, REASON_OTHER
from phash_trio.rules.model import Rule
from phash_trio.testing.fake_ozone import (
    ROLE_ADMIN,
    ROLE_TRIAGE,
    FakeOzone,
    labeler_record,
    run_fake_ozone,
)

HASH = 0xFCFCFDD9810181C0
LABEL = Rule(label="example-coffee", phashes=(HASH,), to_label=True)
REPORT = Rule(label="example-tea", phashes=(HASH,), report_post=True, report_acct=True)
TAKEDOWN = Rule(label="example-water", phashes=(HASH,), takedown_post=True, takedown_acct=True)
DECLARED = labeler_record(["example-coffee", "example-tea", "example-water", "porn"])


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeOzone:
    fake = FakeOzone(service_record=DECLARED)
    await nursery.start(run_fake_ozone, fake)
    return fake


def client(http: httpx.AsyncClient, fake: FakeOzone) -> OzoneClient:
    return OzoneClient(
        http,
        pds_url=fake.url,
        handle=fake.handle,
        password=fake.password,
        labeler_did=fake.labeler_did,
        breaker=CircuitBreaker("ozone", failure_threshold=5, reset_timeout=60.0),
    )


async def test_moderator_with_declared_labels_passes(
    http: httpx.AsyncClient, fake: FakeOzone
) -> None:
    """A moderator whose labeler declares and defines every label: no error, no warning."""
    result = await check_ozone(client(http, fake), [LABEL, REPORT, TAKEDOWN], REASON_OTHER)
    assert result.role == "tools.ozone.team.defs#roleModerator"
    assert result.errors == () and result.warnings == ()
    assert [r.nsid for r in fake.requests] == [
        "com.atproto.server.createSession",
        "tools.ozone.server.getConfig",
        "app.bsky.labeler.getServices",
    ]


async def test_triage_role_is_an_error_for_labels_and_takedowns_only(
    http: httpx.AsyncClient, fake: FakeOzone
) -> None:
    """Ozone lets triage report but not label or take down: the error names those rules."""
    fake.role = ROLE_TRIAGE
    result = await check_ozone(client(http, fake), [LABEL, REPORT, TAKEDOWN], REASON_OTHER)
    assert result.errors == (
        "the automod account's Ozone role is triage; labels and takedowns need moderator or"
        " admin: rule 0 'example-coffee' (toLabel); rule 2 'example-water' (takedownPost,"
        " takedownAcct)",
    )
    reports_only = await check_ozone(client(http, fake), [REPORT], REASON_OTHER)
    assert reports_only.errors == () and role_name(reports_only.role) == "triage"
    fake.role = ROLE_ADMIN
    assert (await check_ozone(client(http, fake), [TAKEDOWN], REASON_OTHER)).errors == ()


async def test_account_outside_the_team_is_an_error(
    http: httpx.AsyncClient, fake: FakeOzone
) -> None:
    """Ozone refuses an account outside its team (401): one error, no exception."""
    fake.role = None
    result = await check_ozone(client(http, fake), [REPORT], REASON_OTHER)
    assert result.errors == (
        "the automod account is not a member of the labeler's Ozone team"
        " (AuthRequired: not a moderator account)",
    )


@pytest.mark.parametrize(
    ("record", "rules", "reason", "warnings"),
    [
        (None, [REPORT], REASON_OTHER, ["has no labeler service record the AppView knows"]),
        (
            labeler_record(["porn"]),
            [LABEL, Rule(label="porn", phashes=(HASH,), label_acct=True)],
            REASON_OTHER,
            ["rule 0 'example-coffee': label value 'example-coffee' is not declared"],
        ),
        (
            labeler_record(["example-coffee"], defined=[]),
            [LABEL],
            REASON_OTHER,
            ["rule 0 'example-coffee': label value 'example-coffee' has no labelValueDefinitions"],
        ),
        (
            labeler_record(["example-tea"], reason_types=[REASON_OTHER]),
            [REPORT, LABEL],
            LEGACY_REASON_OTHER,
            [
                "rule 0 'example-tea': the labeler refuses report reason"
                " com.atproto.moderation.defs#reasonOther",
                "rule 1 'example-coffee': label value 'example-coffee' is not declared",
            ],
        ),
        (labeler_record(["x"], reason_types=[LEGACY_REASON_OTHER]), [REPORT], REASON_OTHER, []),
    ],
)
async def test_labeler_record_warnings(
    record: dict[str, Any] | None,
    rules: list[Rule],
    reason: str,
    warnings: list[str],
    http: httpx.AsyncClient,
    fake: FakeOzone,
) -> None:
    """One warning per rule whose label apps would not show or whose report the labeler
    refuses; a missing record is one warning; global labels need no definition."""
    fake.service_record = record
    result = await check_ozone(client(http, fake), rules, reason)
    assert result.errors == ()
    assert len(result.warnings) == len(warnings)
    for got, start in zip(result.warnings, warnings, strict=True):
        assert start in got


def _env(tmp_path: Path, fake: FakeOzone, rules: list[dict[str, Any]]) -> dict[str, str]:
    rules_file = tmp_path / "rules.json"
    rules_file.write_text(json.dumps(rules))
    return {
        "PATH": "/usr/bin:/bin",
        "RULES_FILE": str(rules_file),
        "JETSTREAM_URL": "ws://127.0.0.1:9/subscribe",
        "JETSTREAM_FALLBACK_URLS": "",
        "REDIS_URL": "redis://127.0.0.1:9",
        "STATE_DIR": str(tmp_path / "state"),
        "METRICS_ADDR": "",
        "AUTOMOD_HANDLE": fake.handle,
        "AUTOMOD_PASSWORD": fake.password,
        "OZONE_PDS": fake.url,
        "LABELER_DID": fake.labeler_did,
    }


RULE_JSON = {"phashes": ["fcfcfdd9810181c0"], "label": "example-coffee", "comment": "c"}


async def test_run_exits_2_when_the_role_cannot_take_down(fake: FakeOzone, tmp_path: Path) -> None:
    """A triage automod account and a takedown rule: the service stops at start-up, exit 2,
    one line naming the rule, before reading Jetstream."""
    fake.role = ROLE_TRIAGE
    env = _env(tmp_path, fake, [{**RULE_JSON, "takedownPost": True}])
    result = await trio.run_process(
        [sys.executable, "-m", "phash_trio", "run"],
        env=env,
        cwd=tmp_path,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last == (
        "phash-trio: cannot start: the automod account's Ozone role is triage; labels and"
        " takedowns need moderator or admin: rule 0 'example-coffee' (takedownPost)"
    )
    assert fake.calls("emitEvent") == []


async def test_run_exits_2_when_the_login_is_refused(fake: FakeOzone, tmp_path: Path) -> None:
    """A wrong app password is found at start-up (not at the first match): exit 2, one line."""
    env = {**_env(tmp_path, fake, [{**RULE_JSON, "toLabel": True}]), "AUTOMOD_PASSWORD": "nope"}
    result = await trio.run_process(
        [sys.executable, "-m", "phash_trio", "run"],
        env=env,
        cwd=tmp_path,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith("phash-trio: cannot start: Ozone login refused: createSession: HTTP 401")
    )
    assert "nope" not in stderr and "Traceback" not in stderr


async def test_rules_check_ozone_prints_role_warnings_and_errors(
    fake: FakeOzone, tmp_path: Path
) -> None:
    """`rules check --ozone` prints the role and each finding; exit 1 only on an error."""
    fake.service_record = labeler_record(["porn"])
    env = _env(tmp_path, fake, [{**RULE_JSON, "toLabel": True}])
    argv = [sys.executable, "-m", "phash_trio", "rules", "check", env["RULES_FILE"], "--ozone"]
    ok = await trio.run_process(argv, env=env, capture_stdout=True, check=False)
    out = ok.stdout.decode()
    assert ok.returncode == 0
    assert f"Ozone: automod.test has role moderator on labeler {fake.labeler_did}" in out
    assert "  warning: rule 0 'example-coffee': label value 'example-coffee' is not declared" in out

    fake.role = ROLE_TRIAGE
    bad = await trio.run_process(argv, env=env, capture_stdout=True, check=False)
    assert bad.returncode == 1
    assert "error: the automod account's Ozone role is triage" in bad.stdout.decode()

    creds = ("AUTOMOD_HANDLE", "AUTOMOD_PASSWORD", "OZONE_PDS")
    no_creds = {k: v for k, v in env.items() if k not in creds}
    missing = await trio.run_process(argv, env=no_creds, capture_stderr=True, check=False)
    assert missing.returncode == 2
    assert missing.stderr.decode().startswith("phash-trio: --ozone needs AUTOMOD_HANDLE")
