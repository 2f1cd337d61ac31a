"""Hash banks in Redis: named lists of signals every instance sees, and a log of their changes.

A bank (name as HMA has them, ``[A-Z_][A-Z0-9_]*``) holds entries, one per signal value: a PDQ
hash, a mean hash (``phash``), or the MD5/SHA-256 of a file. Each entry carries a content id, an
optional note and metadata, and an enabled flag; a bank has an enabled flag too. A value is in a
bank at most once (importing it again updates its entry).

Redis keys::

    banks                 HASH  name -> {"enabled": bool}
    bank:{NAME}           HASH  "{signal}:{value}" -> {"content_id", "note", "metadata", "enabled"}
    banks:seq             STRING the number of the last change
    banks:log             STREAM one entry per change, id "{seq}-1": op, bank, fields

Every write goes through one Lua script that changes the data, increments ``banks:seq`` and
appends to ``banks:log`` atomically, so a reader that saw change ``n`` knows it must apply
``n + 1`` next; a gap means the log was trimmed past it (``MAXLEN ~``), and only then does it
reload everything (:class:`LogTrimmed`). Operations: ``bank`` (created or flag changed),
``drop`` (bank removed), ``put`` (entries written: read them back), ``del`` (entries removed).

These calls are synchronous (redis-py); the service runs them in threads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import attrs
import redis

__all__ = [
    "BANK_NAME_RE",
    "SIGNAL_TYPES",
    "BankEntry",
    "BankError",
    "BankInfo",
    "BankStore",
    "Change",
    "LogTrimmed",
    "normalize_signal",
]

BANK_NAME_RE = re.compile(r"[A-Z_][A-Z0-9_]*")
#: Signal type -> number of hex digits of its value.
SIGNAL_TYPES: dict[str, int] = {"pdq": 64, "phash": 16, "md5": 32, "sha256": 64}
#: Entries changed per log entry (and per script call).
BATCH = 500
#: Longest bank name, content id and note accepted.
MAX_NAME, MAX_CONTENT_ID, MAX_NOTE = 100, 200, 2000

_BANKS, _SEQ, _LOG = "banks", "banks:seq", "banks:log"
_HEX = re.compile(r"[0-9a-fA-F]+")

# KEYS: banks, bank:{NAME}, banks:seq, banks:log.
# ARGV: op, bank name, maxlen, bank flag JSON (or ""), then field/value pairs (value "" = delete).
_WRITE = """
local op, name, maxlen, flag = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
if op == 'drop' then
  redis.call('HDEL', KEYS[1], name)
  redis.call('DEL', KEYS[2])
elseif flag ~= '' then
  redis.call('HSET', KEYS[1], name, flag)
elseif redis.call('HEXISTS', KEYS[1], name) == 0 then
  return redis.error_reply('no such bank: ' .. name)
end
local fields = {}
for i = 5, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[2], ARGV[i])
  else
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
  fields[#fields + 1] = ARGV[i]
end
local seq = redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, seq .. '-1',
  'op', op, 'bank', name, 'fields', table.concat(fields, ' '))
return seq
"""


class BankError(ValueError):
    """A bank name, signal or entry is invalid, or the bank does not exist."""


class LogTrimmed(Exception):
    """The change log no longer holds the changes after ours: reload everything."""


def check_bank_name(name: str) -> str:
    if not isinstance(name, str) or not BANK_NAME_RE.fullmatch(name) or len(name) > MAX_NAME:
        raise BankError(f"bank name {name!r:.60} is not [A-Z_][A-Z0-9_]* (at most {MAX_NAME})")
    return name


def normalize_signal(signal_type: str, value: str) -> tuple[str, str]:
    """``(type, lowercase hex)``; BankError if the type is unknown or the value malformed."""
    kind = signal_type.strip().lower()
    if kind in ("pdq_hash", "photo_pdq"):
        kind = "pdq"
    if kind in ("mean", "mean_hash", "ahash"):
        kind = "phash"
    digits = SIGNAL_TYPES.get(kind)
    if digits is None:
        raise BankError(f"unknown signal type {signal_type!r:.40} (pdq, phash, md5, sha256)")
    text = value.strip()
    if len(text) != digits or not _HEX.fullmatch(text):
        raise BankError(f"{kind}: {text!r:.80} is not {digits} hex digits")
    return kind, text.lower()


@attrs.frozen(kw_only=True)
class BankEntry:
    """One signal in a bank."""

    signal_type: str
    value: str
    content_id: str
    note: str = ""
    metadata: dict[str, Any] = attrs.field(factory=dict)
    enabled: bool = True

    @property
    def field(self) -> str:
        return f"{self.signal_type}:{self.value}"

    def to_json(self) -> str:
        return json.dumps(
            {
                "content_id": self.content_id,
                "note": self.note,
                "metadata": self.metadata,
                "enabled": self.enabled,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_field(cls, field: str, raw: str) -> BankEntry:
        kind, _, value = field.partition(":")
        data = json.loads(raw)
        return cls(
            signal_type=kind,
            value=value,
            content_id=str(data.get("content_id", "")),
            note=str(data.get("note", "")),
            metadata=data.get("metadata") or {},
            enabled=bool(data.get("enabled", True)),
        )

    @classmethod
    def make(
        cls,
        signal_type: str,
        value: str,
        content_id: str,
        note: str = "",
        metadata: dict[str, Any] | None = None,
        enabled: bool = True,
    ) -> BankEntry:
        """A checked entry: normalised signal, bounded content id and note."""
        kind, text = normalize_signal(signal_type, value)
        if not content_id or len(content_id) > MAX_CONTENT_ID:
            raise BankError(f"content id must be 1..{MAX_CONTENT_ID} characters")
        if len(note) > MAX_NOTE:
            raise BankError(f"note longer than {MAX_NOTE} characters")
        return cls(
            signal_type=kind,
            value=text,
            content_id=content_id,
            note=note,
            metadata=dict(metadata or {}),
            enabled=enabled,
        )


@attrs.frozen
class BankInfo:
    """A bank's flag and how many entries of each signal type it holds."""

    name: str
    enabled: bool
    counts: dict[str, int]


@attrs.frozen
class Change:
    """One entry of the change log."""

    seq: int
    op: str
    bank: str
    fields: tuple[str, ...]


class BankStore:
    """Bank reads and writes on a synchronous redis-py client (``decode_responses=True``)."""

    def __init__(self, client: redis.Redis, *, log_maxlen: int = 5000) -> None:
        #: Typed loosely: with ``decode_responses=True`` every reply is ``str``.
        self.client: Any = client
        self.log_maxlen = log_maxlen
        self._write = client.register_script(_WRITE)

    @classmethod
    def from_url(cls, url: str, *, log_maxlen: int = 5000, timeout: float = 10.0) -> BankStore:
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        return cls(client, log_maxlen=log_maxlen)

    def close(self) -> None:
        self.client.close()

    def _run(self, op: str, name: str, flag: str, pairs: Sequence[str] = ()) -> int:
        keys = [_BANKS, f"bank:{name}", _SEQ, _LOG]
        try:
            seq = self._write(keys=keys, args=[op, name, self.log_maxlen, flag, *pairs])
        except redis.ResponseError as exc:
            if "no such bank" in str(exc):
                raise BankError(f"no such bank: {name}") from None
            raise
        return int(seq)

    # -- banks --------------------------------------------------------------------------------

    def bank_names(self) -> dict[str, bool]:
        """Every bank and its enabled flag."""
        raw: dict[str, str] = self.client.hgetall(_BANKS)
        return {name: bool(json.loads(flag).get("enabled", True)) for name, flag in raw.items()}

    def list_banks(self) -> list[BankInfo]:
        result = []
        for name, enabled in sorted(self.bank_names().items()):
            counts = dict.fromkeys(SIGNAL_TYPES, 0)
            for field, _raw in self.client.hscan_iter(f"bank:{name}", count=5000):
                kind = field.partition(":")[0]
                counts[kind] = counts.get(kind, 0) + 1
            result.append(BankInfo(name, enabled, counts))
        return result

    def set_bank(self, name: str, *, enabled: bool = True) -> int:
        """Create the bank or set its flag; returns the change number."""
        check_bank_name(name)
        return self._run("bank", name, json.dumps({"enabled": enabled}))

    def remove_bank(self, name: str) -> bool:
        check_bank_name(name)
        if not self.client.hexists(_BANKS, name):
            return False
        self._run("drop", name, "")
        return True

    # -- entries ------------------------------------------------------------------------------

    def put(self, name: str, entries: Iterable[BankEntry]) -> int:
        """Write entries (batches of 500, one log entry each); returns how many."""
        check_bank_name(name)
        count = 0
        batch: list[str] = []
        for entry in entries:
            batch += [entry.field, entry.to_json()]
            count += 1
            if len(batch) >= 2 * BATCH:
                self._run("put", name, "", batch)
                batch = []
        if batch:
            self._run("put", name, "", batch)
        return count

    def delete(self, name: str, fields: Iterable[str]) -> int:
        """Remove entries by ``signal:value`` field; returns how many were there."""
        check_bank_name(name)
        wanted = list(dict.fromkeys(fields))
        removed = 0
        for start in range(0, len(wanted), BATCH):
            chunk = wanted[start : start + BATCH]
            values = self.client.hmget(f"bank:{name}", chunk)
            present = [f for f, v in zip(chunk, values, strict=True) if v]
            if present:
                self._run("del", name, "", [x for f in present for x in (f, "")])
                removed += len(present)
        return removed

    def get(self, name: str, fields: Sequence[str]) -> list[BankEntry | None]:
        """The entries at ``fields`` (None where absent)."""
        if not fields:
            return []
        raws = self.client.hmget(f"bank:{name}", list(fields))
        return [
            BankEntry.from_field(f, raw) if raw else None
            for f, raw in zip(fields, raws, strict=True)
        ]

    def entries(self, name: str, *, count: int = 10_000) -> Iterator[BankEntry]:
        """Every entry of a bank (HSCAN: Redis is never blocked for long)."""
        for field, raw in self.client.hscan_iter(f"bank:{name}", count=count):
            yield BankEntry.from_field(field, raw)

    def raw_fields(self, name: str, *, count: int = 10_000) -> Iterator[tuple[str, str]]:
        """``(field, JSON)`` of every entry, unparsed (the index loader is in a hurry)."""
        yield from self.client.hscan_iter(f"bank:{name}", count=count)

    # -- change log ---------------------------------------------------------------------------

    def seq(self) -> int:
        return int(self.client.get(_SEQ) or 0)

    def changes_since(self, seq: int, *, count: int = 1000) -> list[Change]:
        """Changes after ``seq``, in order (at most ``count``); LogTrimmed on a gap."""
        rows = self.client.xrange(_LOG, min=f"({seq}-1", max="+", count=count)
        changes = [
            Change(
                seq=int(entry_id.split("-")[0]),
                op=data.get("op", ""),
                bank=data.get("bank", ""),
                fields=tuple(data.get("fields", "").split()),
            )
            for entry_id, data in rows
        ]
        expected = seq + 1
        if changes and changes[0].seq != expected:
            raise LogTrimmed(
                f"change {expected} is no longer in the log (first is {changes[0].seq})"
            )
        if not changes:
            current = self.seq()
            if current > seq:
                raise LogTrimmed(f"changes after {seq} are no longer in the log")
            if current < seq:
                raise LogTrimmed(f"the change counter went back from {seq} to {current}")
        return changes
