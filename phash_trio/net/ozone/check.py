"""Does Ozone let the automod account do what the rules ask? Checked at start and on demand.

Real Ozone refuses labels and takedowns from a ``triage`` member and everything from an
account outside the team, and apps show only labels the labeler declares. Finding this at the
first match (hours later, as a rejected event) is too late, so with credentials the service asks
at start-up, and ``phash-trio rules check --ozone`` asks on demand:

* ``tools.ozone.server.getConfig`` (through the PDS, proxied to the labeler) gives the role;
  a role too low for a rule's labels or takedowns, or no membership, is an error (exit 2).
* ``app.bsky.labeler.getServices`` (the AppView's view of the labeler's
  ``app.bsky.labeler.service`` record, which is also what Ozone reads to judge report reasons)
  gives the declared label values and ``reasonTypes``: a warning per rule whose label is not
  declared (or has no definition, for a custom value) and per reporting rule whose reason type
  the labeler would refuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO

import attrs
import httpx
from loguru import logger

from phash_trio.config import Settings
from phash_trio.net.breaker import CircuitBreaker
from phash_trio.net.ozone.client import OzoneAuthError, OzoneClient, OzoneError, OzoneRejected
from phash_trio.net.ozone.events import reason_accepted
from phash_trio.rules.model import Rule

__all__ = [
    "GLOBAL_LABELS",
    "MODERATOR_ROLES",
    "OzoneCheck",
    "check_at_start",
    "check_ozone",
    "print_ozone_check",
    "role_name",
]

MODERATOR_ROLES = frozenset(
    {"tools.ozone.team.defs#roleAdmin", "tools.ozone.team.defs#roleModerator"}
)
#: Label values every app defines itself: no labelValueDefinitions entry is needed for them.
GLOBAL_LABELS = frozenset(
    {"!hide", "!warn", "!no-unauthenticated", "porn", "sexual", "nudity", "graphic-media", "gore"}
)


def role_name(role: str) -> str:
    """``moderator`` for ``tools.ozone.team.defs#roleModerator`` (``none`` for empty)."""
    tail = role.rpartition("#")[2]
    return tail.removeprefix("role").lower() or "none"


@attrs.frozen
class OzoneCheck:
    """What the check found: ``errors`` stop the service, ``warnings`` are logged."""

    role: str = ""
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def _rule_name(index: int, rule: Rule) -> str:
    return f"rule {index} {rule.label!r}"


def _moderator_only(rule: Rule) -> list[str]:
    """The rule's actions that need a moderator or admin (labels and takedowns)."""
    flags = (
        ("toLabel", rule.to_label),
        ("labelAcct", rule.label_acct),
        ("takedownPost", rule.takedown_post),
        ("takedownAcct", rule.takedown_acct),
    )
    return [name for name, wanted in flags if wanted]


def _role_errors(role: str, rules: Sequence[Rule]) -> list[str]:
    if role in MODERATOR_ROLES:
        return []
    needing = [
        f"{_rule_name(i, rule)} ({', '.join(flags)})"
        for i, rule in enumerate(rules)
        if (flags := _moderator_only(rule))
    ]
    if not needing:
        return []
    return [
        f"the automod account's Ozone role is {role_name(role)}; labels and takedowns need"
        f" moderator or admin: {'; '.join(needing)}"
    ]


def _string_list(value: object) -> list[str] | None:
    if not isinstance(value, list):
        return None
    return [item for item in value if isinstance(item, str)]


def _labeler_warnings(
    view: dict[str, object] | None, rules: Sequence[Rule], reason_type: str, labeler: str
) -> list[str]:
    if view is None:
        return [
            f"LABELER_DID {labeler} has no labeler service record the AppView knows"
            " (app.bsky.labeler.service/self): apps will show none of its labels"
        ]
    warnings: list[str] = []
    policies = view.get("policies")
    policies = policies if isinstance(policies, dict) else {}
    declared = set(_string_list(policies.get("labelValues")) or [])
    definitions = policies.get("labelValueDefinitions")
    defined = {
        d.get("identifier")
        for d in (definitions if isinstance(definitions, list) else [])
        if isinstance(d, dict)
    }
    reasons = _string_list(view.get("reasonTypes"))
    for index, rule in enumerate(rules):
        name = _rule_name(index, rule)
        if rule.to_label or rule.label_acct:
            if rule.label not in declared:
                warnings.append(
                    f"{name}: label value {rule.label!r} is not declared in the labeler's"
                    " service record (policies.labelValues): Ozone applies it but apps do"
                    " not show it"
                )
            elif rule.label not in GLOBAL_LABELS and rule.label not in defined:
                warnings.append(
                    f"{name}: label value {rule.label!r} has no labelValueDefinitions entry:"
                    " apps cannot name or blur it"
                )
        if (rule.report_post or rule.report_acct) and not reason_accepted(reason_type, reasons):
            listed = ", ".join(reasons or [])
            warnings.append(
                f"{name}: the labeler refuses report reason {reason_type} (its reasonTypes:"
                f" {listed}); set OZONE_REPORT_REASON_TYPE to one it lists"
            )
    return warnings


async def check_ozone(client: OzoneClient, rules: Sequence[Rule], reason_type: str) -> OzoneCheck:
    """Ask Ozone and the AppView; raises what :class:`OzoneClient` raises on a failed call.

    An account outside the Ozone team is an error in the result, not an exception.
    """
    try:
        role = await client.viewer_role()
    except OzoneRejected as exc:
        if exc.status not in (401, 403):
            raise
        return OzoneCheck(
            errors=(
                f"the automod account is not a member of the labeler's Ozone team"
                f" ({exc.error or exc.status}: {exc.message})",
            )
        )
    errors = _role_errors(role, rules)
    view = await client.labeler_view()
    warnings = _labeler_warnings(view, rules, reason_type, client.labeler_did)
    return OzoneCheck(role=role, errors=tuple(errors), warnings=tuple(warnings))


async def check_at_start(
    client: OzoneClient, rules: Sequence[Rule], reason_type: str
) -> str | None:
    """The service's start-up check: log each warning; return the line to exit 2 with, if any.

    A refused login is fatal (nothing could be sent); Ozone or the AppView being unreachable
    is not (the service starts and the events wait for Ozone as usual).
    """
    try:
        result = await check_ozone(client, rules, reason_type)
    except OzoneAuthError as exc:
        return f"Ozone login refused: {exc}"
    except OzoneError as exc:
        logger.warning("could not check the Ozone role and labeler record at start: {}", exc)
        return None
    for warning in result.warnings:
        logger.warning("labeler {}: {}", client.labeler_did, warning)
    if result.errors:
        return "; ".join(result.errors)
    logger.info("Ozone role of the automod account: {}", role_name(result.role))
    return None


async def print_ozone_check(settings: Settings, rules: Sequence[Rule], out: TextIO) -> int:
    """``rules check --ozone``: print the role, every warning and error; 0 when no error."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as http:
        breaker = CircuitBreaker("ozone", failure_threshold=5, reset_timeout=60.0)
        # No session file: a check must not rotate the running service's stored session.
        client = OzoneClient(
            http,
            pds_url=settings.ozone_pds,
            handle=settings.automod_handle,
            password=settings.automod_password,
            labeler_did=settings.labeler_did,
            breaker=breaker,
        )
        try:
            result = await check_ozone(client, rules, settings.ozone_report_reason_type)
        except OzoneError as exc:
            print(f"Ozone check failed: {exc}", file=out)
            return 1
    if result.role:
        print(
            f"Ozone: {settings.automod_handle} has role {role_name(result.role)}"
            f" on labeler {settings.labeler_did}",
            file=out,
        )
    for warning in result.warnings:
        print(f"  warning: {warning}", file=out)
    for error in result.errors:
        print(f"error: {error}", file=out)
    if not result.errors and not result.warnings:
        print("Ozone: OK, every rule can be carried out as written", file=out)
    return 1 if result.errors else 0
