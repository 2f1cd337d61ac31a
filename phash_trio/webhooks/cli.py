"""``phash-trio webhooks list|redeliver|purge|verify``."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

from phash_trio.config import Settings
from phash_trio.net.transport import guarded_transport
from phash_trio.state.decisions import STREAM_KEY, Decision
from phash_trio.state.redisio import RedisThreads
from phash_trio.state.store import StoreError
from phash_trio.webhooks.delivery import DEAD_PREFIX, group_name
from phash_trio.webhooks.signing import SignatureError, verify, verify_hma
from phash_trio.webhooks.subscriptions import (
    Subscription,
    SubscriptionError,
    SubscriptionStore,
    load_subscriptions,
)

__all__ = ["verify_command", "webhooks_command"]


async def _subscriptions(settings: Settings, redis: RedisThreads) -> list[Subscription]:
    subs = {s.id: s for s in await SubscriptionStore(redis, settings.allow_private_networks).all()}
    if settings.webhooks_file is not None:
        for sub in load_subscriptions(
            settings.webhooks_file, allow_private=settings.allow_private_networks
        ):
            subs[sub.id] = sub
    return sorted(subs.values(), key=lambda s: s.id)


async def _pending(redis: RedisThreads, sub_id: str) -> int:
    def run(c: Any) -> int:
        try:
            return int(c.xpending(STREAM_KEY, group_name(sub_id))["pending"])
        except Exception as exc:
            if "NOGROUP" in str(exc) or "no such key" in str(exc).lower():
                return 0
            raise

    return await redis.call("XPENDING", run)


async def webhooks_command(
    settings: Settings, action: str, sub_id: str = "", limit: int = 100, out: TextIO = sys.stdout
) -> int:
    redis = RedisThreads(settings.redis_url)
    try:
        subs = await _subscriptions(settings, redis)
        if action == "list":
            for sub in subs:
                dead_key = DEAD_PREFIX + sub.id

                def llen(c: Any, key: str = dead_key) -> int:
                    return int(c.llen(key))

                dead = await redis.call("LLEN", llen)
                row = {**sub.public(), "pending": await _pending(redis, sub.id), "dead": dead}
                out.write(json.dumps(row) + "\n")
            return 0
        if action == "purge":
            n = await redis.call(
                "purge",
                lambda c: (c.llen(DEAD_PREFIX + sub_id), c.delete(DEAD_PREFIX + sub_id))[0],
            )
            out.write(f"purged {n} dead letters of {sub_id}\n")
            return 0
        if action == "redeliver":
            found = [s for s in subs if s.id == sub_id]
            if not found:
                print(f"phash-trio: no webhook {sub_id[:64]!r}", file=sys.stderr)
                return 1
            return await _redeliver(settings, redis, found[0], limit, out)
        raise ValueError(action)
    except (StoreError, SubscriptionError) as exc:
        print(f"phash-trio: {exc}", file=sys.stderr)
        return 1
    finally:
        redis.close()


async def _redeliver(
    settings: Settings, redis: RedisThreads, sub: Subscription, limit: int, out: TextIO
) -> int:
    """POST the dead letters again, oldest first; those answered 2xx leave the list."""
    key = DEAD_PREFIX + sub.id
    letters = await redis.call("LRANGE", lambda c: c.lrange(key, -limit, -1))
    sent = failed = 0
    transport = guarded_transport(allow_private=settings.allow_private_networks)
    async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
        for raw in reversed(letters):
            event = json.loads(raw)["event"]
            decision = Decision(
                event.pop("id"), event.pop("kind"), {k: v for k, v in event.items()}
            )
            body, headers = sub.request(decision, time.time())
            try:
                response = await client.post(
                    sub.url, content=body, headers=headers, timeout=settings.webhook_timeout_secs
                )
                ok = 200 <= response.status_code < 300
            except httpx.HTTPError:
                ok = False
            if ok:

                def remove(c: Any, raw: Any = raw) -> None:
                    c.lrem(key, 1, raw)

                await redis.call("LREM", remove)
                sent += 1
            else:
                failed += 1
    out.write(f"redelivered {sent}, still failing {failed} ({sub.id})\n")
    return 0 if failed == 0 else 1


def verify_command(
    body_file: Path, headers: list[str], secret_env: str, scheme: str, tolerance: float
) -> int:
    """Check a saved delivery: exit 0 if its signature is valid, 1 with the reason if not."""
    secret = os.environ.get(secret_env, "")
    if not secret:
        print(f"phash-trio: set the secret in ${secret_env}", file=sys.stderr)
        return 2
    parsed = {}
    for header in headers:
        name, sep, value = header.partition(":")
        if not sep:
            print(f"phash-trio: --header {header[:40]!r} is not 'Name: value'", file=sys.stderr)
            return 2
        parsed[name.strip()] = value.strip()
    body = body_file.read_bytes()
    try:
        if scheme == "hma":
            verify_hma(secret, body, parsed)
            delivery = parsed.get("X-Phash-Delivery", "")
        else:
            delivery = verify(secret, body, parsed, tolerance=tolerance)
    except SignatureError as exc:
        print(f"invalid: {exc}")
        return 1
    print(f"valid (delivery {delivery or '-'})")
    return 0
