"""Turn a match into Ozone moderation events, each at most once.

For every flag of the matched rule (``toLabel``, ``reportPost``, ``labelAcct``, ``reportAcct``,
``takedownPost``, ``takedownAcct``) one event is sent. Before each, a Redis claim is taken with
the skywatch-phash-rs key (7-day TTL): its value is ``pending:{this process}`` while the event
is sent and ``1`` (what the Rust service writes) once Ozone accepted it. A claim that is done,
or pending in this process, means the action is skipped. A failed send releases the claim so
the retry can act. A claim left pending by another process (killed mid-send) is taken over and
the event sent again: Ozone's ``externalId`` refuses a true duplicate, which counts as success.

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

from phash_trio.events import ActionKind, build_event
from phash_trio.jobs import BlobRef, ImageJob
from phash_trio.metrics import Metrics
from phash_trio.ozone import OzoneClient
from phash_trio.rules.index import Match
from phash_trio.state.hook import DecisionHook, NoDecisions
from phash_trio.store import CLAIM_PENDING_PREFIX, RedisStore

__all__ = ["Actions", "RateSpacer", "claim_key", "planned_actions"]

CLAIM_TTL_SECS = 7 * 24 * 3600


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
    #: Value of the claims this process is sending (unique per process).
    claim_marker: str = attrs.field(factory=lambda: CLAIM_PENDING_PREFIX + secrets.token_hex(8))
    #: Told of every action sent or skipped (the decision log).
    decisions: DecisionHook = attrs.field(factory=NoDecisions)
    #: Claim keys this process is sending right now.
    _in_flight: set[str] = attrs.field(factory=set, init=False)

    def _body(self, kind: ActionKind, job: ImageJob, blob: BlobRef, match: Match) -> dict[str, Any]:
        rule = match.rule
        return build_event(
            kind,
            post_uri=job.uri,
            post_cid=job.cid,
            did=job.did,
            blob_cid=blob.cid,
            label=rule.label,
            rule_comment=rule.comment,
            rule_name=rule.label,
            phash_hex=f"{match.phash:016x}",
            matched_hex=f"{match.matched_phash:016x}",
            distance=match.distance,
            labeler_did=self.labeler_did,
            now=self.wall_now(),
        )

    async def apply(self, job: ImageJob, blob: BlobRef, match: Match) -> None:
        """Send every event the rule asks for; raise on a failure that a retry may fix."""
        for kind in planned_actions(match):
            await self._one(kind, job, blob, match)

    async def _one(self, kind: ActionKind, job: ImageJob, blob: BlobRef, match: Match) -> None:
        rule = match.rule
        body = self._body(kind, job, blob, match)
        if self.dry_run or self.ozone is None:
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
            await self._claim_and_send(kind, job, blob, match, key, body)
        finally:
            self._in_flight.discard(key)

    async def _claim_and_send(
        self,
        kind: ActionKind,
        job: ImageJob,
        blob: BlobRef,
        match: Match,
        key: str,
        body: dict[str, Any],
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
        try:
            used = await self.store.until_healthy(
                lambda: self.store.incr_daily(cap_key, day), "daily counter"
            )
            if used > cap:
                await self.store.until_healthy(
                    lambda: self.store.decr_daily(cap_key, day), "daily counter"
                )
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
            await self.spacer.wait()
            result = await self.ozone.emit_event(body)
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await self.store.release(key)
                    await self.store.decr_daily(cap_key, day)
                except Exception as exc:  # the claim expires in 7 days at worst
                    logger.warning("could not release claim {}: {}", key, exc)
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
            " (Ozone already had it)" if result.duplicate else "",
        )
        self.decisions.action(kind.value, job, blob, match, skipped=None)
