"""``phash-trio log tail|show|export``: read the decision log from a terminal (JSON lines)."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import Any, TextIO

import trio
import trio.lowlevel

from phash_trio.config import Settings
from phash_trio.state.decisions import Decision, DecisionLog, decision_from_fields, parse_entry_id
from phash_trio.state.redisio import RedisThreads, run_in_thread
from phash_trio.state.store import StoreError

__all__ = ["log_command", "parse_since"]


def parse_since(text: str, now: float) -> int:
    """Unix ms from ``2026-12-01T10:00:00+00:00``, a date, ``90m``/``2h``/``7d`` ago, or ms."""
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[:-1].isdigit() and text[-1:] in units:
        return int((now - int(text[:-1]) * units[text[-1]]) * 1000)
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--since {text[:40]!r}: not a time (ISO 8601, 2h, 7d or Unix ms)"
        ) from None
    if when.tzinfo is None:
        raise ValueError("--since needs a time zone (e.g. +00:00)")
    return int(when.timestamp() * 1000)


def _print(decision: Decision, out: TextIO) -> None:
    out.write(decision.json() + "\n")


async def log_command(
    settings: Settings,
    action: str,
    *,
    limit: int = 20,
    target: str = "",
    since: str = "",
    follow: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    redis = RedisThreads(settings.redis_url)
    log = DecisionLog(redis)
    try:
        if action == "tail":
            entries = list(reversed(await log.latest(limit)))
            for decision in entries:
                _print(decision, out)
            out.flush()
            if follow:
                last = entries[-1].id if entries else await log.last_id()
                await _follow(redis, log, last, out)
            return 0
        if action == "show":
            try:
                parse_entry_id(target)
            except ValueError:
                found = await log.for_photo(target)
            else:
                found = [d for d in await log.after(_before(target), 1) if d.id == target]
            for decision in found:
                _print(decision, out)
            if not found:
                print(f"phash-trio: nothing in the log for {target[:80]!r}", file=sys.stderr)
                return 1
            return 0
        if action == "export":
            try:
                start = parse_since(since, time.time()) if since else 0
            except ValueError as exc:
                print(f"phash-trio: {exc}", file=sys.stderr)
                return 2
            async for decision in log.since(start):
                _print(decision, out)
            return 0
        raise ValueError(action)
    except StoreError as exc:
        print(f"phash-trio: {exc}", file=sys.stderr)
        return 1
    finally:
        redis.close()


def _before(entry_id: str) -> str:
    ms, seq = parse_entry_id(entry_id)
    if seq > 0:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-18446744073709551615" if ms > 0 else "0-0"


async def _follow(redis: RedisThreads, log: DecisionLog, last: str, out: TextIO) -> None:
    blocking = redis.blocking_client(1.0)
    try:
        while True:

            def read(c: Any, last: str = last) -> Any:
                return c.xread({log.key: last}, count=500, block=1000)

            for _, rows in await run_in_thread("XREAD", read, blocking) or []:
                for entry_id, fields in rows:
                    last = str(entry_id)
                    decision = decision_from_fields(last, fields)
                    if decision is not None:
                        _print(decision, out)
            out.flush()
            await trio.lowlevel.checkpoint()
    finally:
        blocking.close()
