"""Turn a match into Ozone moderation events, each at most once.

For every flag of the matched rule (``toLabel``, ``reportPost``, ``labelAcct``, ``reportAcct``,
``takedownPost``, ``takedownAcct``) one event is sent. Each action stands alone: one that Ozone
refuses or that cannot be sent never stops the others; once all were tried, every failure is
logged and the job gets one error (a transient one if any was transient, so it is retried; the
actions already done are claimed and skipped on the retry). Before each, a Redis claim is taken with
the skywatch-phash-rs key (7-day TTL): its value is ``pending:{this process}`` while the event
is sent and ``1`` (what the Rust service writes) once Ozone accepted it. A claim that is done,
or pending in this process, means the action is skipped. A failed send releases the claim so
the retry can act. A claim left pending by another process (killed mid-send) is taken over and
the event sent again: Ozone's ``externalId`` refuses a true duplicate, which counts as success,
and so does an answer saying the effect already holds ("Subject is already taken down": Ozone
checks the subject's status before the externalId, and a human moderator may have acted first).

A per-rule daily cap stops a bad hash from labelling the whole network: over the cap the action
is skipped, logged loudly and counted. ``RATE_LIMIT_MS`` spaces every Ozone call across workers.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs
import trio
from loguru import logger

from phash_trio.net.ozone.client import (
    OzoneAuthError,
    OzoneClient,
    OzoneError,
    OzoneRejected,
    OzoneUnavailable,
)
from phash_trio.net.ozone.events import ACCOUNT_PERIOD_SECS, REASON_OTHER, ActionKind, build_event
from phash_trio.pipeline.jobs import BlobRef, ImageJob
from phash_trio.rules.index import Match
from phash_trio.runtime.metrics import Metrics
from phash_trio.state.hook import DecisionHook, NoDecisions
from phash_trio.state.store import CLAIM_PENDING_PREFIX, RedisStore, StoreError

__all__ = ["Actions", "ActionsRejected", "RateSpacer", "claim_key", "planned_actions"]

#: Also the period of account-action externalIds (:data:`events.ACCOUNT_PERIOD_SECS`).
CLAIM_TTL_SECS = ACCOUNT_PERIOD_SECS
#: ``createdBy`` of the bodies a dry run logs when no LABELER_DID is set (no session exists).
DRY_RUN_ACTOR = "did:web:dry-run.invalid"
#: Failures a retry of the job may cure.
_TRANSIENT = (OzoneUnavailable, OzoneAuthError, StoreError)


class ActionsRejected(OzoneRejected):
    """Ozone refused one or more actions of a match for good; ``failures`` names each."""

    def __init__(self, failures: list[tuple[ActionKind, OzoneError]]) -> None:
        first = failures[0][1]
        status = first.status if isinstance(first, OzoneRejected) else 400
        error = first.error if isinstance(first, OzoneRejected) else ""
        text = "; ".join(f"{kind.value}: {exc}" for kind, exc in failures)
        super().__init__("actions", status, error, text)
        self.failures = failures


def claim_key(kind: ActionKind, job: ImageJob, label: str) -> str:
    """The skywatch-phash-rs compatible claim key for one action."""
    return {
        ActionKind.LABEL_POST: f"claim:post:label:{job.uri}:{label}",
        ActionKind.REPORT_POST: f"claim:post:report:{job.uri}:{label}",
        ActionKind.TAKEDOWN_POST: f"claim:post:takedown:{job.uri}",
        ActionKind.LABEL_ACCOUNT: f"claim:account:label:{job.did}:{label}",
        ActionKind.REPORT_ACCOUNT: f"claim:account:report:{job.did}:{label}",
        ActionKind.TAKEDOWN_ACCOUNT: f"claim:account:takedown:{job.did}",
    }[kind]


def planned_actions(match: Match) -> list[ActionKind]:
    """The events a rule asks for, in a fixed order (labels before reports before takedowns)."""
    rule = match.rule
    flags = [
        (rule.to_label, ActionKind.LABEL_POST),
        (rule.label_acct, ActionKind.LABEL_ACCOUNT),
        (rule.report_post, ActionKind.REPORT_POST),
        (rule.report_acct, ActionKind.REPORT_ACCOUNT),
        (rule.takedown_post, ActionKind.TAKEDOWN_POST),
        (rule.takedown_acct, ActionKind.TAKEDOWN_ACCOUNT),
    ]
    return [kind for wanted, kind in flags if wanted]


_SENT_METRIC = {
    ActionKind.LABEL_POST: "posts_labeled",
    ActionKind.REPORT_POST: "posts_reported",
    ActionKind.TAKEDOWN_POST: "posts_taken_down",
    ActionKind.LABEL_ACCOUNT: "accounts_labeled",
    ActionKind.REPORT_ACCOUNT: "accounts_reported",
    ActionKind.TAKEDOWN_ACCOUNT: "accounts_taken_down",
}


@attrs.define
class RateSpacer:
    """At most one call every ``interval`` seconds, shared by all workers."""

    interval: float
    _next_at: float = 0.0
    _lock: trio.Lock = attrs.field(factory=trio.Lock)

    async def wait(self) -> None:
        if self.interval <= 0:
            return
        async with self._lock:
            now = trio.current_time()
            if now < self._next_at:
                await trio.sleep_until(self._next_at)
                now = trio.current_time()
            self._next_at = now + self.interval


def _utc_day() -> str:
    # Calendar days are wall-clock facts; the only wall-clock read in this module.
    return datetime.fromtimestamp(time.time(), UTC).strftime("%Y-%m-%d")


@attrs.define
class Actions:
    """Claims, caps, spacing and sending for the events a match asks for."""

    store: RedisStore
    ozone: OzoneClient | None
    metrics: Metrics
    labeler_did: str
    default_daily_cap: int
    spacer: RateSpacer
    dry_run: bool = False
    today: Callable[[], str] = _utc_day
    wall_now: Callable[[], datetime] = attrs.field(factory=lambda: lambda: datetime.now(UTC))
    #: ``reportType`` of report events (OZONE_REPORT_REASON_TYPE).
    report_reason_type: str = REASON_OTHER
    #: Value of the claims this process is sending (unique per process).
    claim_marker: str = attrs.field(factory=lambda: CLAIM_PENDING_PREFIX + secrets.token_hex(8))
    #: Told of every action sent or skipped (the decision log).
    decisions: DecisionHook = attrs.field(factory=NoDecisions)
    #: Claim keys this process is sending right now.
    _in_flight: set[str] = attrs.field(factory=set, init=False)

    def _body(
        self, kind: ActionKind, job: ImageJob, blob: BlobRef, match: Match, created_by: str
    ) -> dict[str, Any]:
        rule = match.rule
        return build_event(
            kind,
            post_uri=job.uri,
            post_cid=job.cid,
            did=job.did,
            blob_cid=blob.cid,
            post_blob_cids=[b.cid for b in job.blobs],
            label=rule.label,
            rule_comment=rule.comment,
            rule_name=rule.label,
            phash_hex=match.phash_hex,
            matched_hex=match.matched_hex,
            distance=match.distance,
            created_by=created_by,
            match_meta=match.meta,
            now=self.wall_now(),
            time_us=job.time_us,
            reason_type=self.report_reason_type,
        )

    async def apply(self, job: ImageJob, blob: BlobRef, match: Match) -> None:
        """Try every event the rule asks for, each on its own; then raise if any failed.

        Raises the first transient failure (:class:`OzoneUnavailable`, :class:`OzoneAuthError`,
        :class:`StoreError`) if there was one, else :class:`ActionsRejected` naming every
        refusal. Cancellation and unexpected errors propagate at once.
        """
        failures: list[tuple[ActionKind, OzoneError | StoreError]] = []
        for kind in planned_actions(match):
            try:
                await self._one(kind, job, blob, match)
            except (OzoneError, StoreError) as error:
                failures.append((kind, error))
        if not failures:
            return
        if len(failures) > 1:
            for kind, failure in failures:
                logger.warning("{} for {} failed: {}", kind.value, job.uri, failure)
        transient = [f for _, f in failures if isinstance(f, _TRANSIENT)]
        if transient:
            raise transient[0]
        raise ActionsRejected([(k, e) for k, e in failures if isinstance(e, OzoneError)])

    async def _one(self, kind: ActionKind, job: ImageJob, blob: BlobRef, match: Match) -> None:
        rule = match.rule
        if self.dry_run or self.ozone is None:
            body = self._body(kind, job, blob, match, self.labeler_did or DRY_RUN_ACTOR)
            self.metrics.actions_skipped.labels(reason="dry_run").inc()
            logger.info(
                "dry-run: would send {} for {} (rule {!r}, distance {}): {}",
                kind.value,
                job.uri,
                rule.label,
                match.distance,
                json.dumps(body, sort_keys=True),
            )
            self.decisions.action(kind.value, job, blob, match, skipped="dry_run")
            return
        key = claim_key(kind, job, rule.label)
        if key in self._in_flight:
            # Another worker of ours is sending this very action (e.g. the same account label
            # from two posts at once); if it fails, its own job retries.
            self.metrics.actions_skipped.labels(reason="already_done").inc()
            self.decisions.action(kind.value, job, blob, match, skipped="claim_held")
            return
        self._in_flight.add(key)
        try:
            await self._claim_and_send(kind, job, blob, match, key)
        finally:
            self._in_flight.discard(key)

    async def _claim_and_send(
        self, kind: ActionKind, job: ImageJob, blob: BlobRef, match: Match, key: str
    ) -> None:
        rule = match.rule
        claimed = await self.store.until_healthy(
            lambda: self.store.claim_action(key, self.claim_marker, CLAIM_TTL_SECS),
            f"claim {key}",
        )
        if claimed == 0:
            self.metrics.actions_skipped.labels(reason="already_done").inc()
            logger.debug("skip {} for {}: already done ({})", kind.value, job.uri, key)
            self.decisions.action(kind.value, job, blob, match, skipped="claim_held")
            return
        if claimed == 2:
            logger.warning(
                "{} for {}: an earlier run stopped while sending it; sending it again ({})",
                kind.value,
                job.uri,
                key,
            )
        cap = rule.max_actions_per_day
        cap = self.default_daily_cap if cap is None else cap
        cap_key = f"{match.rule_index}:{rule.label}"
        day = self.today()
        # True while this action holds one count of the day: it is taken back exactly once,
        # and only if it was made (an incr that never ran, or a second decr, undercounts).
        counted = False
        try:
            used = await self.store.until_healthy(
                lambda: self.store.incr_daily(cap_key, day), "daily counter"
            )
            counted = True
            if used > cap:
                await self.store.until_healthy(
                    lambda: self.store.decr_daily(cap_key, day), "daily counter"
                )
                counted = False
                await self.store.until_healthy(lambda: self.store.release(key), "release")
                self.metrics.actions_skipped.labels(reason="daily_cap").inc()
                logger.error(
                    "DAILY CAP: rule {} ({!r}) reached {} actions today; not sending {} for {}"
                    " - check the rule's hashes",
                    match.rule_index,
                    rule.label,
                    cap,
                    kind.value,
                    job.uri,
                )
                self.decisions.action(kind.value, job, blob, match, skipped="daily_cap")
                return
            assert self.ozone is not None  # _one returns early in dry-run
            session = await self.ozone.ensure_session()
            body = self._body(kind, job, blob, match, session.did)
            await self.spacer.wait()
            result = await self.ozone.emit_event(body)
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await self.store.release(key)
                except Exception as exc:  # the claim expires in 7 days at worst
                    logger.warning("could not release claim {}: {}", key, exc)
                if counted:
                    try:
                        await self.store.decr_daily(cap_key, day)
                    except Exception as exc:  # the day's count stays one high
                        logger.warning("could not take back the daily count {}: {}", cap_key, exc)
            raise
        await self.store.until_healthy(
            lambda: self.store.confirm_claim(key, CLAIM_TTL_SECS), f"confirm {key}"
        )
        getattr(self.metrics, _SENT_METRIC[kind]).inc()
        logger.info(
            "sent {} for {} (rule {!r}, distance {}){}",
            kind.value,
            job.uri,
            rule.label,
            match.distance,
            " (Ozone already had it)"
            if result.duplicate
            else " (its effect already held)"
            if result.already_holds
            else "",
        )
        self.decisions.action(kind.value, job, blob, match, skipped=None)
