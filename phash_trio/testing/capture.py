"""Realistic Jetstream events for the demo and the tests, built deterministically from a seed.

``python -m phash_trio.testing.capture`` rewrites the bundled ``data/demo_capture.jsonl``. The
events are shaped like Jetstream v1 frames: post creates with image, gallery and
quote-with-media embeds (current and legacy blob shapes), posts without images, video and link
embeds, deletes, updates, identity and account events.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import attrs

from phash_trio.testing.blobhost import cid_for
from phash_trio.testing.jetstream_replay import (
    DAG_CBOR,
    fake_cid,
    identity_event,
    make_blob,
    make_event,
    make_legacy_blob,
)

__all__ = [
    "DATA_DIR",
    "DEMO_CAPTURE",
    "IMAGES_DIR",
    "CaptureBuilder",
    "demo_images",
    "load_jsonl",
    "record_cid",
    "tid",
]

DATA_DIR = Path(__file__).parent / "data"
IMAGES_DIR = DATA_DIR / "images"
DEMO_CAPTURE = DATA_DIR / "demo_capture.jsonl"

#: Images the demo's CDN lacks, so their posts are fetched from the author's PDS.
PDS_ONLY_IMAGES = ("mountain.jpg", "text.jpg")
#: The author the example rule for chelsea.jpg ignores (rules/blobs.json ``ignoreDID``).
IGNORED_DID = "did:plc:ignoreauthorexample23456"

_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_TID_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"


def tid(time_us: int, clock_id: int = 0) -> str:
    """An atproto TID (record key) for a timestamp."""
    value = (time_us << 10) | (clock_id & 0x3FF)
    chars = []
    for _ in range(13):
        chars.append(_TID_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def record_cid(seed: str) -> str:
    """A syntactically real CIDv1 (dag-cbor, sha2-256) for a record, derived from ``seed``."""
    return fake_cid(seed, codec=DAG_CBOR)


def _did(rng: random.Random) -> str:
    return "did:plc:" + "".join(rng.choice(_B32) for _ in range(24))


def demo_images() -> dict[str, bytes]:
    """The bundled image files by name."""
    return {path.name: path.read_bytes() for path in sorted(IMAGES_DIR.iterdir())}


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mime(name: str) -> str:
    return {"webp": "image/webp", "png": "image/png", "gif": "image/gif"}.get(
        name.rsplit(".", 1)[-1], "image/jpeg"
    )


@attrs.define
class CaptureBuilder:
    """Appends events with increasing ``time_us``; ``images`` maps names to bytes."""

    images: dict[str, bytes]
    seed: int = 1
    start_us: int = 1_763_700_000_000_000
    events: list[dict[str, Any]] = attrs.field(factory=list)
    rng: random.Random = attrs.field(init=False)
    now_us: int = attrs.field(init=False)
    authors: list[str] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.now_us = self.start_us
        self.authors = [_did(self.rng) for _ in range(40)]

    def _tick(self) -> int:
        self.now_us += self.rng.randint(500, 40_000)
        return self.now_us

    def blob(self, name: str, legacy: bool = False) -> dict[str, Any]:
        data = self.images[name]
        if legacy:
            return make_legacy_blob(cid_for(data), mime_type=_mime(name))
        return make_blob(cid_for(data), mime_type=_mime(name), size=len(data))

    def _add(self, event: dict[str, Any]) -> dict[str, Any]:
        self.events.append(event)
        return event

    def images_embed(self, names: list[str], legacy: bool = False) -> dict[str, Any]:
        return {
            "$type": "app.bsky.embed.images",
            "images": [
                {"alt": "", "image": self.blob(n, legacy), "aspectRatio": {"width": 4, "height": 3}}
                for n in names
            ],
        }

    def gallery_embed(self, names: list[str]) -> dict[str, Any]:
        return {
            "$type": "app.bsky.embed.gallery",
            "items": [
                {"$type": "app.bsky.embed.gallery#image", "image": self.blob(n), "alt": ""}
                for n in names
            ],
        }

    def post(
        self,
        embed: dict[str, Any] | None = None,
        did: str | None = None,
        operation: str = "create",
        text: str = "",
    ) -> dict[str, Any]:
        time_us = self._tick()
        did = did or self.rng.choice(self.authors)
        rkey = tid(time_us, self.rng.randint(0, 1023))
        record: dict[str, Any] = {
            "$type": "app.bsky.feed.post",
            "createdAt": "2025-11-21T08:00:00.000Z",
            "langs": ["en"],
            "text": text or self.rng.choice(["look at this", "hello", "new pic", "☕", "wow"]),
        }
        if embed is not None:
            record["embed"] = embed
        cid = record_cid(f"{did}/{rkey}/{operation}")
        return self._add(
            make_event(did, time_us, operation=operation, rkey=rkey, record=record, cid=cid)
        )

    def delete(self) -> dict[str, Any]:
        time_us = self._tick()
        did = self.rng.choice(self.authors)
        return self._add(make_event(did, time_us, operation="delete", rkey=tid(time_us - 10**9)))

    def like(self) -> dict[str, Any]:
        time_us = self._tick()
        did = self.rng.choice(self.authors)
        record = {"$type": "app.bsky.feed.like", "createdAt": "2025-11-21T08:00:00Z"}
        return self._add(
            make_event(
                did,
                time_us,
                collection="app.bsky.feed.like",
                rkey=tid(time_us),
                record=record,
                cid=record_cid(f"like/{time_us}"),
            )
        )

    def identity(self) -> dict[str, Any]:
        time_us = self._tick()
        return self._add(identity_event(self.rng.choice(self.authors), time_us))

    def account(self) -> dict[str, Any]:
        time_us = self._tick()
        return self._add(identity_event(self.rng.choice(self.authors), time_us, kind="account"))

    def quote_with_media(self, names: list[str]) -> dict[str, Any]:
        quoted = f"at://{self.rng.choice(self.authors)}/app.bsky.feed.post/{tid(self.now_us)}"
        return {
            "$type": "app.bsky.embed.recordWithMedia",
            "media": self.images_embed(names),
            "record": {
                "$type": "app.bsky.embed.record",
                "record": {"uri": quoted, "cid": record_cid(quoted)},
            },
        }


def build_demo_capture(
    images: dict[str, bytes], seed: int = 7, size: int = 300
) -> list[dict[str, Any]]:
    """A few hundred events with every kind the service meets, image posts among them."""
    b = CaptureBuilder(images, seed=seed)
    rng = b.rng
    good = [n for n in images if n not in ("truncated.jpg", "not-an-image.jpg")]
    while len(b.events) < size:
        roll = rng.random()
        if roll < 0.35:
            b.post()  # text only
        elif roll < 0.60:
            count = rng.choice([1, 1, 1, 2, 2, 3, 4])
            b.post(b.images_embed(rng.sample(good, count), legacy=rng.random() < 0.1))
        elif roll < 0.65:
            b.post(b.gallery_embed(rng.sample(good, rng.choice([2, 3, 4]))))
        elif roll < 0.70:
            b.post(b.quote_with_media(rng.sample(good, 1)))
        elif roll < 0.73:
            b.post(
                {
                    "$type": "app.bsky.embed.video",
                    "video": b.blob("moon.jpg") | {"mimeType": "video/mp4"},
                }
            )
        elif roll < 0.77:
            b.post(
                {
                    "$type": "app.bsky.embed.external",
                    "external": {
                        "uri": "https://example.com/",
                        "title": "a link",
                        "description": "",
                    },
                }
            )
        elif roll < 0.84:
            b.delete()
        elif roll < 0.87:
            b.post(b.images_embed([rng.choice(good)]), operation="update")
        elif roll < 0.90:
            b.like()
        elif roll < 0.95:
            b.identity()
        else:
            b.account()
    # The cases the demo must show, at fixed places near the end.
    b.post(b.images_embed(["chelsea.jpg"]), did=IGNORED_DID, text="my own cat (ignored author)")
    b.post(b.images_embed(["truncated.jpg", "coffee.jpg"]), text="a broken image and coffee")
    b.post(b.images_embed(["not-an-image.jpg"]), text="not an image")
    b.post(b.images_embed(["spitfire.jpg", "beach.webp"]), text="plane and beach")
    return b.events


def main() -> None:
    events = build_demo_capture(demo_images())
    DEMO_CAPTURE.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events))
    print(f"wrote {len(events)} events to {DEMO_CAPTURE}")


if __name__ == "__main__":
    main()
