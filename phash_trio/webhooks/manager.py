"""Run one :class:`~phash_trio.webhooks.delivery.Deliverer` per subscription, following changes.

Subscriptions come from the file (fixed at start) and from Redis (the API); they are re-read
every ``poll_secs``. A new subscription starts delivering, a removed or changed one stops (its
consumer group and dead letters stay until ``webhooks purge``).
"""

from __future__ import annotations

import attrs
import httpx
import trio
from loguru import logger

from phash_trio.state.recorder import DecisionMetrics
from phash_trio.state.redisio import RedisThreads
from phash_trio.state.store import StoreError
from phash_trio.webhooks.delivery import Deliverer, DeliveryConfig
from phash_trio.webhooks.subscriptions import Subscription, SubscriptionStore

__all__ = ["WebhookManager"]


@attrs.define
class WebhookManager:
    """Starts and stops deliverers as subscriptions come and go."""

    redis: RedisThreads
    client: httpx.AsyncClient
    metrics: DecisionMetrics
    consumer: str
    file_subs: tuple[Subscription, ...] = ()
    store: SubscriptionStore | None = None
    config: DeliveryConfig = attrs.field(factory=DeliveryConfig)
    poll_secs: float = 5.0
    deliverers: dict[str, tuple[Deliverer, trio.CancelScope]] = attrs.field(factory=dict)

    async def current(self) -> list[Subscription]:
        subs = {s.id: s for s in (await self.store.all() if self.store else [])}
        subs.update({s.id: s for s in self.file_subs})  # the file wins
        return list(subs.values())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            started = False
            while True:
                try:
                    await self._sync(nursery)
                except StoreError as exc:
                    logger.warning("webhooks: cannot read subscriptions: {}", exc)
                if not started:
                    started = True
                    task_status.started()
                await trio.sleep(self.poll_secs)

    async def _sync(self, nursery: trio.Nursery) -> None:
        wanted = {s.id: s for s in await self.current()}
        for sub_id, (deliverer, scope) in list(self.deliverers.items()):
            if wanted.get(sub_id) != deliverer.sub:
                scope.cancel()
                del self.deliverers[sub_id]
                logger.info("webhook {}: stopped", sub_id)
        for sub_id, sub in wanted.items():
            if sub_id in self.deliverers:
                continue
            deliverer = Deliverer(
                sub, self.redis, self.client, self.metrics, self.consumer, self.config
            )
            await deliverer.ensure_group()  # from here on no entry is missed
            scope = trio.CancelScope()
            self.deliverers[sub_id] = (deliverer, scope)
            nursery.start_soon(_run_in, deliverer, scope)
            logger.info("webhook {}: delivering to {} ({})", sub_id, sub.url, sub.scheme)


async def _run_in(deliverer: Deliverer, scope: trio.CancelScope) -> None:
    with scope:
        await deliverer.run()
