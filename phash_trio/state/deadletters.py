"""``phash-trio dead-letters list | retry | purge``: inspect and reprocess ``jobs:dead``.

``retry`` runs each stored job through the same processor the service uses (claims make it
idempotent). An entry is removed only after its job was decided or stored again as a new dead
letter, so a crash in the middle can at worst leave a duplicate entry, never lose one.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

import cattrs
import trio

from phash_trio.config import Settings
from phash_trio.firehose.cursor import CursorTracker
from phash_trio.pipeline.processor import job_from_json
from phash_trio.rules.index import RuleIndex
from phash_trio.runtime.components import open_processor
from phash_trio.runtime.metrics import Metrics
from phash_trio.state.store import RedisStore, StoreError

__all__ = ["dead_letters_command"]


def _describe(letter: dict[str, Any]) -> str:
    job = letter.get("job") or {}
    uri = f"at://{job.get('did')}/app.bsky.feed.post/{job.get('rkey')}"
    blobs = len(job.get("blobs") or [])
    return (
        f"{letter.get('failed_at', '?')}  {uri}  {blobs} blob(s)  "
        f"attempts {letter.get('attempts', '?')}  error: {letter.get('error', '?')}"
    )


async def dead_letters_command(
    settings: Settings,
    rules: RuleIndex,
    action: str,
    limit: int = 100,
    out: TextIO | None = None,
) -> int:
    """Run one sub-command; returns the exit code."""
    out = out or sys.stdout
    metrics = Metrics()
    store = RedisStore(settings.redis_url, metrics)
    try:
        with trio.fail_after(30):
            await store.ping()
    except (StoreError, trio.TooSlowError) as exc:
        print(f"phash-trio: Redis at {store.where} is not reachable: {exc}", file=sys.stderr)
        return 2
    try:
        if action == "list":
            total = await store.count_dead_letters()
            letters = await store.list_dead_letters(0, max(0, limit - 1))
            for letter in letters:
                print(_describe(letter), file=out)
            shown = f", first {len(letters)} shown" if total > len(letters) else ""
            print(f"{total} dead letter(s){shown}", file=out)
            return 0
        if action == "purge":
            removed = await store.purge_dead_letters()
            print(f"purged {removed} dead letter(s)", file=out)
            return 0
        return await _retry(settings, rules, store, metrics, limit, out)
    except StoreError as exc:  # a corrupt entry, or Redis lost mid-command: one clear line
        print(f"phash-trio: dead-letters {action}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()


async def _retry(
    settings: Settings,
    rules: RuleIndex,
    store: RedisStore,
    metrics: Metrics,
    limit: int,
    out: TextIO,
) -> int:
    letters = await store.list_dead_letters(0, max(0, limit - 1))
    tracker = CursorTracker()
    decided = failed_again = unreadable = 0
    async with open_processor(settings, rules, metrics, store, tracker) as processor:
        if processor.matcher is not None and processor.matcher.banks is not None:
            await processor.matcher.banks.reload("dead-letters retry")  # the rules name banks
        for letter in letters:
            try:
                job = job_from_json(letter["job"])
            except (KeyError, TypeError, cattrs.BaseValidationError) as exc:
                unreadable += 1
                print(f"skip unreadable letter ({exc}): {json.dumps(letter)[:200]}", file=out)
                continue
            tracker.start_job(job.time_us)
            if not await processor.process(job):
                failed_again += 1
                print(f"failed again (stored anew): {job.uri}", file=out)
            else:
                decided += 1
                print(f"done: {job.uri}", file=out)
            await store.remove_dead_letter(letter)
    print(
        f"retried {len(letters)}: {decided} done, {failed_again} failed again, "
        f"{unreadable} unreadable (left in place)",
        file=out,
    )
    return 0 if failed_again == 0 and unreadable == 0 else 1
