"""Jetstream events, parsed: one frame in, one :class:`ParsedEvent` out (pure, no I/O).

:func:`parse_event` turns a frame into an image job, or the reason the event needs no work, or
:class:`MalformedFrame`. DIDs are validated only where a job needs them (post creates). A post
whose image blobs all lack a valid CID is malformed (it cannot be hashed, and must be seen);
with some valid, the bad ones are counted in ``ParsedEvent.bad_blobs``.

Each event also gets an :class:`EventIdentity` that is the same on every Jetstream instance
(their ``time_us`` differ: each stamps events with its own clock), used to drop the replays a
rewound reconnect brings.

Errors::

    JetstreamError
    ├── MalformedFrame       a frame that is not a valid Jetstream event (counted and skipped)
    └── ReaderConfigError    a bad ReaderConfig (also a ValueError; in firehose.reader)

Gallery embeds follow the ``app.bsky.embed.gallery`` lexicon (``items``: union of ``#image``,
each ``{"image": blob, "alt", "aspectRatio"}``); items of another ``$type`` are ignored, items
with no ``$type`` but an ``image`` blob are taken as ``#image``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import attrs

from phash_trio.net.atproto.syntax import is_valid_cid, is_valid_did
from phash_trio.pipeline.jobs import POST_COLLECTION, BlobRef, ImageJob

__all__ = [
    "EXCERPT_CHARS",
    "EventIdentity",
    "JetstreamError",
    "MalformedFrame",
    "ParsedEvent",
    "parse_event",
]

#: Longest excerpt of a bad frame kept in errors and logs.
EXCERPT_CHARS = 200

EMBED_IMAGES = "app.bsky.embed.images"
EMBED_GALLERY = "app.bsky.embed.gallery"
EMBED_GALLERY_IMAGE = "app.bsky.embed.gallery#image"
EMBED_RECORD_WITH_MEDIA = "app.bsky.embed.recordWithMedia"
EMBED_RECORD = "app.bsky.embed.record"
EMBED_VIDEO = "app.bsky.embed.video"
EMBED_EXTERNAL = "app.bsky.embed.external"

_RKEY_RE = re.compile(r"[A-Za-z0-9._:~-]{1,512}")
_MAX_TIME_US = 2**63 - 1


# --------------------------------------------------------------------------------------------
# Errors and values


class JetstreamError(Exception):
    """Base of this module's errors."""


class MalformedFrame(JetstreamError):
    """A frame that is not a valid Jetstream event; the reader counts it and moves on."""

    def __init__(self, reason: str, excerpt: str, time_us: int | None = None) -> None:
        super().__init__(reason, excerpt, time_us)
        self.reason = reason
        #: At most :data:`EXCERPT_CHARS` characters of the frame, for the log.
        self.excerpt = excerpt
        #: The frame's ``time_us`` when it could be read (the cursor may still pass it).
        self.time_us = time_us

    def __str__(self) -> str:
        return f"malformed Jetstream frame ({self.reason}): {self.excerpt!r}"


@attrs.frozen
class EventIdentity:
    """What makes an event unique in the network, the same on every Jetstream instance (unlike
    ``time_us``, which each instance stamps with its own clock); used to drop replays."""

    did: str
    #: The commit's collection, or the event kind (``identity``, ``account``) for the others.
    collection: str
    rkey: str
    #: The commit's repo ``rev``; the relay's ``seq`` for identity and account events. An event
    #: without either falls back to ``t{time_us}`` (then only the same instance matches it).
    rev: str
    operation: str


@attrs.frozen
class ParsedEvent:
    """One Jetstream event: an image job, or the reason it needs no work."""

    time_us: int
    job: ImageJob | None
    #: Why there is no job (``delete``, ``identity``, ``no_embed``, ``video``...), else None.
    skip_reason: str | None
    identity: EventIdentity
    #: Image entries dropped because their blob had no valid CID (the others are kept).
    bad_blobs: int = 0


# --------------------------------------------------------------------------------------------
# Parsing


def _excerpt(frame: str | bytes) -> str:
    if isinstance(frame, bytes):
        return frame[: EXCERPT_CHARS * 4].decode("utf-8", "replace")[:EXCERPT_CHARS]
    return frame[:EXCERPT_CHARS]


def _blob_ref(value: object) -> BlobRef | None:
    """A blob in the current or the legacy shape, or None when it has no valid CID."""
    if not isinstance(value, Mapping):
        return None
    ref = value.get("ref")
    cid = ref.get("$link") if isinstance(ref, Mapping) else value.get("cid")
    if not is_valid_cid(cid):
        return None
    assert isinstance(cid, str)
    mime = value.get("mimeType")
    size = value.get("size")
    return BlobRef(
        cid=cid,
        mime_type=mime if isinstance(mime, str) else None,
        size=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None,
    )


@attrs.define
class _Media:
    """Image blobs found in one embed, or why there are none."""

    blobs: list[BlobRef] = attrs.field(factory=list)
    bad: int = 0
    skip_reason: str | None = None


def _image_media(embed: Mapping[str, Any], fail: _Fail) -> _Media:
    """``app.bsky.embed.images`` and ``app.bsky.embed.gallery`` embeds."""
    media = _Media()
    if embed["$type"] == EMBED_IMAGES:
        entries = embed.get("images")
        if not isinstance(entries, list):
            raise fail("app.bsky.embed.images without an images list")
        for entry in entries:
            blob = _blob_ref(entry.get("image")) if isinstance(entry, Mapping) else None
            if blob is None:
                media.bad += 1
            else:
                media.blobs.append(blob)
    else:
        entries = embed.get("items")
        if not isinstance(entries, list):
            raise fail("app.bsky.embed.gallery without an items list")
        for entry in entries:
            if not isinstance(entry, Mapping):
                media.bad += 1
                continue
            kind = entry.get("$type", EMBED_GALLERY_IMAGE)
            if kind not in (EMBED_GALLERY_IMAGE, "#image"):
                continue  # another kind of gallery item (none defined yet): not an image
            blob = _blob_ref(entry.get("image"))
            if blob is None:
                media.bad += 1
            else:
                media.blobs.append(blob)
    if not media.blobs and not media.bad:
        media.skip_reason = "no_images"
    return media


def _embed_media(embed: object, fail: _Fail) -> _Media:
    if embed is None:
        return _Media(skip_reason="no_embed")
    if not isinstance(embed, Mapping):
        raise fail("record.embed is not an object")
    kind = embed.get("$type")
    if not isinstance(kind, str):
        raise fail("record.embed has no $type")
    if kind in (EMBED_IMAGES, EMBED_GALLERY):
        return _image_media(embed, fail)
    if kind == EMBED_RECORD_WITH_MEDIA:
        media = embed.get("media")
        if not isinstance(media, Mapping) or not isinstance(media.get("$type"), str):
            raise fail("recordWithMedia without a typed media object")
        if media["$type"] == EMBED_RECORD_WITH_MEDIA:
            raise fail("recordWithMedia nested in recordWithMedia")
        return _embed_media(media, fail)
    if kind == EMBED_RECORD:
        return _Media(skip_reason="record_only")
    if kind == EMBED_VIDEO:
        return _Media(skip_reason="video")
    if kind == EMBED_EXTERNAL:
        return _Media(skip_reason="external")
    return _Media(skip_reason="other_embed")


@attrs.define
class _Fail:
    """Builds :class:`MalformedFrame` for one frame, carrying its excerpt and time_us."""

    frame: str | bytes
    time_us: int | None = None

    def __call__(self, reason: str) -> MalformedFrame:
        return MalformedFrame(reason, _excerpt(self.frame), self.time_us)


def _string(data: Mapping[str, Any], key: str, where: str, fail: _Fail) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise fail(f"{where}{key} is missing or not a string")
    return value


def parse_event(frame: str | bytes) -> ParsedEvent:
    """Turn one Jetstream frame into a job or a skip reason; raise :class:`MalformedFrame`.

    Only commits that create an ``app.bsky.feed.post`` with image embeds become jobs.
    Image entries whose blob has no valid CID are dropped and counted in ``bad_blobs``; a post
    whose image entries are all bad is malformed (it cannot be hashed, and must be seen).
    """
    fail = _Fail(frame)
    try:
        text = frame.decode("utf-8") if isinstance(frame, bytes) else frame
        data = json.loads(text)
    except UnicodeDecodeError:
        raise fail("not UTF-8") from None
    except RecursionError:
        raise fail("JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and over-long integer literals
        raise fail(f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise fail("not a JSON object")

    time_us = data.get("time_us")
    if not isinstance(time_us, int) or isinstance(time_us, bool):
        raise fail("time_us is missing or not an integer")
    if not 0 < time_us <= _MAX_TIME_US:
        raise fail("time_us is out of range")
    fail.time_us = time_us

    did = data.get("did")
    did = did if isinstance(did, str) else ""
    kind = data.get("kind")
    if not isinstance(kind, str):
        raise fail("kind is missing or not a string")

    if kind != "commit":
        reason = kind if kind in ("identity", "account") else "other_kind"
        body = data.get(kind)
        seq = body.get("seq") if isinstance(body, dict) else None
        rev = str(seq) if isinstance(seq, int) and not isinstance(seq, bool) else f"t{time_us}"
        return ParsedEvent(time_us, None, reason, EventIdentity(did, kind, "", rev, ""))

    commit = data.get("commit")
    if not isinstance(commit, dict):
        raise fail("commit is missing or not an object")
    operation = _string(commit, "operation", "commit.", fail)
    collection = _string(commit, "collection", "commit.", fail)
    rkey = commit.get("rkey")
    raw_rev = commit.get("rev")
    identity = EventIdentity(
        did,
        collection,
        rkey if isinstance(rkey, str) else "",
        raw_rev if isinstance(raw_rev, str) and raw_rev else f"t{time_us}",
        operation,
    )
    if operation != "create":
        reason = operation if operation in ("delete", "update") else "other_operation"
        return ParsedEvent(time_us, None, reason, identity)
    if collection != POST_COLLECTION:
        return ParsedEvent(time_us, None, "other_collection", identity)

    # A post was created: everything a job needs must be present and well-formed.
    if not is_valid_did(did):
        raise fail("did is missing or not a valid DID")
    rkey = _string(commit, "rkey", "commit.", fail)
    if not _RKEY_RE.fullmatch(rkey) or rkey in (".", ".."):
        raise fail("commit.rkey is not a valid record key")
    cid = _string(commit, "cid", "commit.", fail)
    if not is_valid_cid(cid):
        raise fail("commit.cid is not a valid CID")
    record = commit.get("record")
    if not isinstance(record, dict):
        raise fail("commit.record is missing or not an object")

    media = _embed_media(record.get("embed"), fail)
    if media.skip_reason is not None:
        return ParsedEvent(time_us, None, media.skip_reason, identity)
    if not media.blobs:
        raise fail(f"none of the {media.bad} image blobs has a valid CID")
    unique: dict[str, BlobRef] = {}
    for blob in media.blobs:
        unique.setdefault(blob.cid, blob)  # the same image twice is hashed once
    job = ImageJob(did=did, rkey=rkey, cid=cid, time_us=time_us, blobs=tuple(unique.values()))
    return ParsedEvent(time_us, job, None, identity, bad_blobs=media.bad)
