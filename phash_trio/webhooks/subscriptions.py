"""Webhook subscriptions: from a JSON file (``WEBHOOKS_FILE``) or the API (kept in Redis).

A subscription::

    {"id": "slack-bot", "url": "https://hooks.example/phash", "secret": "…",
     "kinds": ["match", "action_sent"], "rules": ["csam"], "labels": [], "scheme": "phash"}

``kinds`` defaults to every kind; ``rules``/``labels`` (empty = any) filter on the entry's rule
label and label. ``scheme`` ``hma`` signs as atproto-hma's ``/api/v1/webhook/hma-callback``
expects and sends only matches, as ``{"event_type": "match_found", …}``. Receiver URLs pass the
SSRF guard's shape checks (https and a public host unless ALLOW_PRIVATE_NETWORKS); the
connection itself goes through the pinned transport.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs

from phash_trio.net.endpoints import BadEndpoint, parse_endpoint
from phash_trio.state.decisions import KINDS, Decision
from phash_trio.state.redisio import RedisThreads
from phash_trio.webhooks.signing import hma_headers, phash_headers

__all__ = [
    "Subscription",
    "SubscriptionError",
    "SubscriptionStore",
    "load_subscriptions",
    "parse_subscription",
]

_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SCHEMES = ("phash", "hma")
SUBS_KEY = "webhooks:subs"
#: Longest receiver URL.
MAX_URL_CHARS = 512


class SubscriptionError(ValueError):
    """A subscription that cannot be used; one line, never the secret."""


@attrs.frozen
class Subscription:
    """Where to deliver which entries, and how to sign them."""

    id: str
    url: str
    secret: str = attrs.field(repr=False)
    kinds: tuple[str, ...] = KINDS
    rules: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    scheme: str = "phash"

    def wants(self, decision: Decision) -> bool:
        if decision.kind not in self.kinds:
            return False
        if self.rules and decision.data.get("rule") not in self.rules:
            return False
        return not (self.labels and decision.data.get("label") not in self.labels)

    def request(self, decision: Decision, now: float) -> tuple[bytes, dict[str, str]]:
        """The body and headers of one delivery."""
        if self.scheme == "hma":
            body = json.dumps(hma_payload(decision), separators=(",", ":")).encode()
            headers = hma_headers(self.secret, body)
            headers["X-Phash-Delivery"] = decision.id
            return body, headers
        body = decision.json().encode()
        return body, phash_headers(self.secret, body, decision.id, now)

    def public(self) -> dict[str, Any]:
        """What ``GET /api/v1/webhooks`` and ``webhooks list`` show (no secret)."""
        return {
            "id": self.id,
            "url": self.url,
            "kinds": list(self.kinds),
            "rules": list(self.rules),
            "labels": list(self.labels),
            "scheme": self.scheme,
        }

    def stored(self) -> dict[str, Any]:
        return {**self.public(), "secret": self.secret}


def hma_payload(decision: Decision) -> dict[str, Any]:
    """A match in the shape atproto-hma's ``hma-callback`` reads."""
    data = decision.data
    return {
        "event_type": "match_found",
        "content_id": data.get("uri"),
        "match_info": {
            "bank": data.get("bank") or data.get("rule"),
            "content_id": data.get("content_id"),
            "distance": data.get("distance"),
            "signal_type": data.get("signal_type"),
            "hash": data.get("phash"),
            "label": data.get("label"),
            "severity": data.get("severity", "unknown"),
        },
        "photo_id": data.get("cid"),
        "author_did": data.get("did"),
        "delivery_id": decision.id,
    }


def _strings(value: object, field: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SubscriptionError(f"{field} must be a list of strings")
    if len(value) > 100:
        raise SubscriptionError(f"{field} has more than 100 entries")
    if allowed is not None:
        unknown = [v for v in value if v not in allowed]
        if unknown:
            raise SubscriptionError(f"{field}: unknown {unknown[0][:40]!r} (one of {allowed})")
    return tuple(value)


def parse_subscription(raw: object, *, allow_private: bool = False) -> Subscription:
    """A checked subscription from JSON data, or :class:`SubscriptionError`."""
    if not isinstance(raw, dict):
        raise SubscriptionError("a subscription must be a JSON object")
    sub_id = raw.get("id")
    if not isinstance(sub_id, str) or not _ID.fullmatch(sub_id):
        raise SubscriptionError("id must be 1-64 letters, digits, '.', '_' or '-'")
    url = raw.get("url")
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise SubscriptionError(f"{sub_id}: url must be a string of at most {MAX_URL_CHARS}")
    try:
        endpoint = parse_endpoint(url, allow_private=allow_private)
    except BadEndpoint as exc:
        raise SubscriptionError(f"{sub_id}: url refused: {exc.reason}") from None
    secret = raw.get("secret")
    if not isinstance(secret, str) or not 16 <= len(secret) <= 256:
        raise SubscriptionError(f"{sub_id}: secret must be a string of 16-256 characters")
    scheme = raw.get("scheme", "phash")
    if scheme not in SCHEMES:
        raise SubscriptionError(f"{sub_id}: scheme must be one of {SCHEMES}")
    kinds = _strings(raw.get("kinds", list(KINDS)), "kinds", KINDS)
    if scheme == "hma":
        kinds = ("match",)
    unknown = set(raw) - {"id", "url", "secret", "kinds", "rules", "labels", "scheme"}
    if unknown:
        raise SubscriptionError(f"{sub_id}: unknown field {sorted(unknown)[0]!r}")
    return Subscription(
        id=sub_id,
        url=endpoint.url,
        secret=secret,
        kinds=kinds,
        rules=_strings(raw.get("rules", []), "rules"),
        labels=_strings(raw.get("labels", []), "labels"),
        scheme=scheme,
    )


def load_subscriptions(path: Path, *, allow_private: bool = False) -> list[Subscription]:
    """The subscriptions of a JSON file (a list of objects); SubscriptionError names the file."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SubscriptionError(f"{path}: cannot read: {exc}") from None
    if not isinstance(raw, list):
        raise SubscriptionError(f"{path}: must hold a JSON list of subscriptions")
    subs: list[Subscription] = []
    for item in raw:
        try:
            subs.append(parse_subscription(item, allow_private=allow_private))
        except SubscriptionError as exc:
            raise SubscriptionError(f"{path}: {exc}") from None
    ids = [s.id for s in subs]
    if len(set(ids)) != len(ids):
        raise SubscriptionError(f"{path}: duplicate subscription ids")
    return subs


@attrs.define
class SubscriptionStore:
    """Subscriptions made through the API, in one Redis hash (id -> JSON)."""

    redis: RedisThreads
    allow_private: bool = False

    async def all(self) -> list[Subscription]:
        raw = await self.redis.call("HGETALL webhooks", lambda c: c.hgetall(SUBS_KEY))
        subs = []
        for text in raw.values():
            try:
                subs.append(parse_subscription(json.loads(text), allow_private=self.allow_private))
            except (ValueError, SubscriptionError):
                continue  # written by us, so only a hand edit gets here; skip it
        return sorted(subs, key=lambda s: s.id)

    async def put(self, sub: Subscription) -> None:
        text = json.dumps(sub.stored())
        await self.redis.call("HSET webhooks", lambda c: c.hset(SUBS_KEY, sub.id, text))

    async def delete(self, sub_id: str) -> bool:
        n = await self.redis.call("HDEL webhooks", lambda c: c.hdel(SUBS_KEY, sub_id))
        return bool(n)
