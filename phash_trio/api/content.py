"""HMA's integer content ids over our banks (synchronous redis-py: run it in a thread).

HMA numbers each piece of banked content (``bank_content_id``, an integer) and hangs one signal
per signal type on it; our banks hold one entry per signal value with a free-form content id.
Content added through HMA's ``/c`` routes gets the next number of ``hma:content:seq`` as its
content id on every signal entry, and ``hma:content:{BANK}`` (HASH id -> JSON list of the entry
fields) finds them again for ``GET|PUT|DELETE /c/bank/<name>/content/<id>``. Entries imported
some other way whose content id is a number are found too, by a scan of the bank (slow on very
large banks, and only done when the map has no such id).
"""

from __future__ import annotations

import json
from typing import Any

from phash_trio.rules.banks import BankEntry, BankStore

__all__ = ["ContentStore", "content_id_json"]

_SEQ = "hma:content:seq"


def _map_key(bank: str) -> str:
    return f"hma:content:{bank}"


def content_id_json(content_id: str) -> int | str:
    """HMA's clients expect an integer id: numbers are sent as numbers, other ids as strings."""
    if content_id.isdigit() and len(content_id) < 19:
        return int(content_id)
    return content_id


class ContentStore:
    """Content ids for the HMA curation routes, beside a :class:`BankStore`."""

    def __init__(self, banks: BankStore) -> None:
        self.banks = banks
        self.client: Any = banks.client

    def add(self, bank: str, entries: list[BankEntry]) -> int:
        """Put ``entries`` (their content id is replaced by a new number); return the number."""
        number = int(self.client.incr(_SEQ))
        stamped = [
            BankEntry.make(
                e.signal_type, e.value, str(number), e.note, e.metadata, enabled=e.enabled
            )
            for e in entries
        ]
        self.banks.put(bank, stamped)
        self.client.hset(_map_key(bank), str(number), json.dumps([e.field for e in stamped]))
        return number

    def fields(self, bank: str, number: int) -> list[str]:
        """The entry fields of content ``number`` that are still in the bank."""
        raw = self.client.hget(_map_key(bank), str(number))
        wanted = str(number)
        if raw is not None:
            fields = [str(f) for f in json.loads(raw)]
        else:
            fields = [
                field
                for field, data in self.banks.raw_fields(bank)
                if json.loads(data).get("content_id") == wanted
            ]
        entries = self.banks.get(bank, fields)
        return [f for f, e in zip(fields, entries, strict=True) if e is not None]

    def entries(self, bank: str, number: int) -> list[BankEntry]:
        fields = self.fields(bank, number)
        return [e for e in self.banks.get(bank, fields) if e is not None]

    def set_enabled(self, bank: str, number: int, enabled: bool, until: int) -> list[BankEntry]:
        """Enable or disable every signal of the content (``until`` kept in the metadata)."""
        updated = []
        for entry in self.entries(bank, number):
            metadata = dict(entry.metadata)
            if enabled:
                metadata.pop("disable_until_ts", None)
            else:
                metadata["disable_until_ts"] = until
            updated.append(
                BankEntry.make(
                    entry.signal_type,
                    entry.value,
                    entry.content_id,
                    entry.note,
                    metadata,
                    enabled=enabled,
                )
            )
        if updated:
            self.banks.put(bank, updated)
        return updated

    def delete(self, bank: str, number: int) -> int:
        """Remove every signal of the content; returns how many entries went."""
        removed = self.banks.delete(bank, self.fields(bank, number))
        self.client.hdel(_map_key(bank), str(number))
        return removed

    def drop_bank(self, bank: str) -> None:
        self.client.delete(_map_key(bank))
