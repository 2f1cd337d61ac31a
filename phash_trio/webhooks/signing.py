"""Webhook signatures, both schemes, and the verification function receivers call.

``phash`` (the ML-pipeline integration guide's scheme)::

    X-Phash-Timestamp: <unix seconds>
    X-Phash-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>
    X-Phash-Delivery:  <decision log entry id>   (the receiver's idempotency key)

``hma`` (what atproto-hma's ``/api/v1/webhook/hma-callback`` checks)::

    X-HMA-Signature: <hex HMAC-SHA256(secret, body)>

Comparisons are constant-time; a timestamp more than ``tolerance`` seconds away is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

__all__ = [
    "DEFAULT_TOLERANCE_SECS",
    "SignatureError",
    "hma_headers",
    "phash_headers",
    "sign",
    "verify",
    "verify_hma",
]

DEFAULT_TOLERANCE_SECS = 300


class SignatureError(ValueError):
    """A delivery that must be refused; ``str()`` says why (never the secret)."""


def sign(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """``sha256=<hex>`` over ``timestamp + "." + body``."""
    key = secret.encode() if isinstance(secret, str) else secret
    mac = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def phash_headers(secret: str, body: bytes, delivery: str, now: float) -> dict[str, str]:
    timestamp = str(int(now))
    return {
        "Content-Type": "application/json",
        "X-Phash-Timestamp": timestamp,
        "X-Phash-Signature": sign(secret, timestamp, body),
        "X-Phash-Delivery": delivery,
    }


def hma_headers(secret: str, body: bytes) -> dict[str, str]:
    mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-HMA-Signature": mac}


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


def verify(
    secret: str | bytes,
    body: bytes,
    headers: Mapping[str, str],
    *,
    tolerance: float = DEFAULT_TOLERANCE_SECS,
    now: float | None = None,
) -> str:
    """Check a ``phash``-scheme delivery; return its delivery id or raise :class:`SignatureError`.

    ``body`` must be the raw request bytes (not re-serialised JSON); ``headers`` any mapping
    (case-insensitive lookup).
    """
    timestamp = _header(headers, "X-Phash-Timestamp")
    signature = _header(headers, "X-Phash-Signature")
    if not timestamp or not signature:
        raise SignatureError("missing X-Phash-Timestamp or X-Phash-Signature")
    if not timestamp.isdigit() or len(timestamp) > 12:
        raise SignatureError("X-Phash-Timestamp is not Unix seconds")
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance:
        raise SignatureError(f"timestamp outside the {tolerance:g} s window")
    expected = sign(secret, timestamp, body)
    if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
        raise SignatureError("signature does not match")
    return _header(headers, "X-Phash-Delivery") or ""


def verify_hma(secret: str | bytes, body: bytes, headers: Mapping[str, str]) -> None:
    """Check an ``hma``-scheme delivery (no timestamp in that scheme) or raise."""
    signature = _header(headers, "X-HMA-Signature")
    if not signature:
        raise SignatureError("missing X-HMA-Signature")
    key = secret.encode() if isinstance(secret, str) else secret
    expected = hmac.new(key, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
        raise SignatureError("signature does not match")
