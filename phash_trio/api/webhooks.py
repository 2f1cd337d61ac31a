"""``POST|GET /api/v1/webhooks`` and ``DELETE /api/v1/webhooks/<id>`` (scope ``curate``).

Subscriptions made here live in Redis; every instance picks them up within its poll interval.
Secrets are write-only: the listing never shows them.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from phash_trio.api.auth import ApiError, require_scope
from phash_trio.webhooks.subscriptions import (
    Subscription,
    SubscriptionError,
    SubscriptionStore,
    parse_subscription,
)

__all__ = ["webhook_routes"]


def webhook_routes(store: SubscriptionStore, file_subs: tuple[Subscription, ...]) -> list[Route]:
    fixed = {s.id for s in file_subs}

    async def create(request: Request) -> Response:
        require_scope(request, "curate")
        try:
            raw = await request.json()
        except ValueError:
            raise ApiError("the body must be a JSON subscription") from None
        try:
            sub = parse_subscription(raw, allow_private=store.allow_private)
        except SubscriptionError as exc:
            raise ApiError(str(exc)) from None
        if sub.id in fixed:
            raise ApiError(f"{sub.id!r} comes from WEBHOOKS_FILE", status=409)
        await store.put(sub)
        return JSONResponse({"success": True, "webhook": sub.public()}, status_code=201)

    async def listing(request: Request) -> Response:
        require_scope(request, "curate")
        subs = [*file_subs, *(s for s in await store.all() if s.id not in fixed)]
        return JSONResponse({"webhooks": [s.public() for s in subs]})

    async def delete(request: Request) -> Response:
        require_scope(request, "curate")
        sub_id = request.path_params["sub_id"]
        if sub_id in fixed:
            raise ApiError(f"{sub_id!r} comes from WEBHOOKS_FILE", status=409)
        if not await store.delete(sub_id):
            raise ApiError(f"no webhook {sub_id[:64]!r}", status=404)
        return JSONResponse({"success": True})

    return [
        Route("/api/v1/webhooks", create, methods=["POST"]),
        Route("/api/v1/webhooks", listing, methods=["GET"]),
        Route("/api/v1/webhooks/{sub_id}", delete, methods=["DELETE"]),
    ]
