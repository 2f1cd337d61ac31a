"""The decision log: every match, action, dead letter and bad blob, in one Redis Stream.

It is the audit trail (``phash-trio log``, ``GET /api/v1/logs``), the source of the live event
stream (SSE) and of webhook deliveries (one consumer group per subscription). Each entry is
``kind`` + ``data`` (one JSON object); its stream id (``<ms>-<seq>``, Redis's clock) is the
event id everywhere. Entries older than the retention are trimmed by time at every append
(``XADD ... MINID ~``), so a quiet log keeps a week and a busy one does not grow without bound
in count either (approximate trimming works on whole macro nodes).

A small per-photo index (``decisions:photo:<blob cid or post uri>`` -> entry ids, same expiry)
answers ``/api/v1/logs/<photo_id>`` without scanning the stream.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import attrs

from phash_trio.state.redisio import RedisThreads

__all__ = [
    "DEFAULT_RETENTION_SECS",
    "KINDS",
    "STREAM_KEY",
    "Decision",
    "DecisionLog",
    "entry_key",
    "parse_entry_id",
]

STREAM_KEY = "decisions"
PHOTO_PREFIX = "decisions:photo:"
DEFAULT_RETENTION_SECS = 7 * 24 * 3600
#: Every kind of entry; the SSE ``event:`` name and the webhook ``kind``.
KINDS = ("match", "action_sent", "action_skipped", "dead_letter", "bad_blob")
#: Most entry ids kept per photo in the index (a photo reposted a million times stays small).
PHOTO_INDEX_MAX = 1000
#: Longest photo id (blob CID or post URI) accepted for the index.
MAX_PHOTO_ID_CHARS = 512
_ENTRY_ID = re.compile(r"\d{1,20}(-\d{1,20})?")

# Append one entry and index it by photo; trims by time with Redis's own clock.
# KEYS[1] stream, KEYS[2..] photo index keys; ARGV: retention ms, kind, data json, index size.
# When a trim removes entries, "<stream>:trimmed" becomes "<cutoff>-0": every id below it may
# be gone (Redis 7.0 does not update XINFO's max-deleted-entry-id on trimming, and finding the
# newest trimmed id with XREVRANGE costs 5x the append), so a reader can tell it fell out of
# retention (at worst it is told so when nothing it missed was actually there).
_APPEND = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now_ms - tonumber(ARGV[1])
if cutoff < 0 then cutoff = 0 end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #first > 0 and tonumber(string.match(first[1][1], '^(%d+)')) < cutoff then
  redis.call('SET', KEYS[1] .. ':trimmed', tostring(cutoff) .. '-0')
end
local id = redis.call('XADD', KEYS[1], 'MINID', '=', tostring(cutoff), '*',
                      'kind', ARGV[2], 'data', ARGV[3])
local ttl = math.ceil(tonumber(ARGV[1]) / 1000)
for i = 2, #KEYS do
  redis.call('RPUSH', KEYS[i], id)
  redis.call('LTRIM', KEYS[i], -tonumber(ARGV[4]), -1)
  redis.call('EXPIRE', KEYS[i], ttl)
end
return id
"""


def parse_entry_id(text: str) -> tuple[int, int]:
    """``"<ms>-<seq>"`` (or ``"<ms>"``) as a comparable pair; ValueError when malformed."""
    if not isinstance(text, str) or not _ENTRY_ID.fullmatch(text):
        raise ValueError(f"not a stream entry id: {text[:40]!r}")
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def entry_key(entry_id: str) -> tuple[int, int]:
    """Sort key of a well-formed entry id."""
    return parse_entry_id(entry_id)


@attrs.frozen
class Decision:
    """One log entry: its stream id, its kind and its data (a JSON object)."""

    id: str
    kind: str
    data: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """The event as clients see it: ``{"id", "kind", **data}``."""
        return {"id": self.id, "kind": self.kind, **self.data}

    def json(self) -> str:
        """One compact JSON line (the SSE ``data:`` and the webhook body)."""
        return json.dumps(self.as_dict(), separators=(",", ":"), sort_keys=True)


def decision_from_fields(entry_id: str, fields: dict[str, str] | None) -> Decision | None:
    """An entry read back from Redis; None for a trimmed one (XREADGROUP of a deleted id) or
    one that is not ours (wrong fields, data not a JSON object)."""
    if not fields:
        return None
    kind = fields.get("kind")
    try:
        data = json.loads(fields.get("data", ""))
    except ValueError:
        return None
    if not isinstance(kind, str) or not isinstance(data, dict):
        return None
    return Decision(entry_id, kind, data)


def photo_ids(data: dict[str, Any]) -> list[str]:
    """What an entry is indexed under: its blob CID and its post URI (when present)."""
    out = []
    for field in ("cid", "uri"):
        value = data.get(field)
        if isinstance(value, str) and 0 < len(value) <= MAX_PHOTO_ID_CHARS:
            out.append(value)
    return out


@attrs.define
class DecisionLog:
    """Append and read the stream; every call is one bounded Redis round trip (or pipeline)."""

    redis: RedisThreads
    retention_secs: float = DEFAULT_RETENTION_SECS
    key: str = STREAM_KEY

    async def append_many(self, items: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """Append entries in order (one pipeline); their ids."""
        retention_ms = str(int(self.retention_secs * 1000))

        def run(c: Any) -> list[str]:
            script = c.register_script(_APPEND)
            pipe = c.pipeline(transaction=False)
            for kind, data in items:
                keys = [self.key, *(PHOTO_PREFIX + p for p in photo_ids(data))]
                body = json.dumps(data, separators=(",", ":"), sort_keys=True)
                script(keys=keys, args=[retention_ms, kind, body, PHOTO_INDEX_MAX], client=pipe)
            return [str(x) for x in pipe.execute()]

        if not items:
            return []
        return await self.redis.call("XADD decisions", run, abandon=False)

    async def append(self, kind: str, data: dict[str, Any]) -> str:
        return (await self.append_many([(kind, data)]))[0]

    async def after(self, last_id: str, count: int = 500) -> list[Decision]:
        """Entries strictly after ``last_id`` ("0-0" for the oldest), oldest first."""
        start = f"({last_id}" if last_id not in ("0", "0-0") else "-"

        def run(c: Any) -> Any:
            return c.xrange(self.key, start, "+", count=count)

        return _decisions(await self.redis.call("XRANGE decisions", run))

    async def since(self, start_ms: int, batch: int = 1000) -> AsyncIterator[Decision]:
        """Every entry from ``start_ms`` (Unix ms) on, oldest first, read in batches."""
        start = str(start_ms)
        while True:

            def run(c: Any, start: str = start) -> Any:
                return c.xrange(self.key, start, "+", count=batch)

            rows = await self.redis.call("XRANGE decisions", run)
            if not rows:
                return
            for decision in _decisions(rows):
                yield decision
            start = f"({rows[-1][0]}"

    async def latest(self, limit: int, offset: int = 0) -> list[Decision]:
        """Newest first, skipping ``offset`` (the bridge's ``/api/v1/logs`` paging)."""

        def run(c: Any) -> Any:
            return c.xrevrange(self.key, "+", "-", count=offset + limit)

        rows = await self.redis.call("XREVRANGE decisions", run)
        return _decisions(rows[offset:])

    async def for_photo(self, photo_id: str) -> list[Decision]:
        """Entries indexed under a blob CID or post URI, oldest first (trimmed ones gone)."""
        if not 0 < len(photo_id) <= MAX_PHOTO_ID_CHARS:
            return []

        def run(c: Any) -> list[Any]:
            ids = c.lrange(PHOTO_PREFIX + photo_id, 0, -1)
            pipe = c.pipeline(transaction=False)
            for entry_id in ids:
                pipe.xrange(self.key, entry_id, entry_id, count=1)
            return [rows[0] for rows in pipe.execute() if rows]

        return _decisions(await self.redis.call("photo index", run))

    async def last_id(self) -> str:
        """The id of the newest entry ever appended ("0-0" for a new log)."""

        def run(c: Any) -> str:
            try:
                info = c.xinfo_stream(self.key)
            except Exception as exc:  # no such key: a new log
                if "no such key" in str(exc).lower():
                    return "0-0"
                raise
            return str(info["last-generated-id"])

        return await self.redis.call("XINFO decisions", run)

    async def trimmed_past(self, last_id: str) -> bool:
        """True when entries after ``last_id`` may have been trimmed (it fell out of retention):
        it is older than the last trim's cutoff."""
        trimmed = await self.redis.call("GET trimmed", lambda c: c.get(self.key + ":trimmed"))
        if not isinstance(trimmed, str):
            return False
        return entry_key(last_id) < entry_key(trimmed)

    async def count(self) -> int:
        return int(await self.redis.call("XLEN decisions", lambda c: c.xlen(self.key)))


def _decisions(rows: Iterable[Any]) -> list[Decision]:
    out = []
    for entry_id, fields in rows:
        decision = decision_from_fields(str(entry_id), fields)
        if decision is not None:
            out.append(decision)
    return out
