"""The bridge's audit-log reads over the decision log (scope ``read``).

``GET /api/v1/logs?limit=&offset=`` (newest first) and ``GET /api/v1/logs/<photo_id>`` (a blob
CID or a post URI, oldest first) answer in atproto-hma's shape — ``{"logs": [{id, photo_id,
author_did, match_result, match_type, match_score, action_taken, created_at}], "count", …}`` —
with our entry's ``kind`` and full ``event`` added beside those fields.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from phash_trio.api.auth import ApiError
from phash_trio.api.session import require_read
from phash_trio.state.decisions import Decision, DecisionLog

__all__ = ["bridge_log", "log_routes"]

MAX_LIMIT = 1000
MAX_OFFSET = 100_000


def bridge_log(decision: Decision) -> dict[str, Any]:
    """One entry in the bridge's log shape (plus ``kind`` and ``event``)."""
    data = decision.data
    return {
        "id": decision.id,
        "photo_id": data.get("cid") or data.get("uri"),
        "author_did": data.get("did"),
        "match_result": decision.kind in ("match", "action_sent", "action_skipped"),
        "match_type": data.get("signal_type"),
        "match_score": data.get("distance"),
        "action_taken": data.get("action") if decision.kind == "action_sent" else None,
        "created_at": data.get("time"),
        "kind": decision.kind,
        "event": decision.as_dict(),
    }


def _int(request: Request, name: str, default: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > maximum:
        raise ApiError(f"{name} must be a whole number from 0 to {maximum}")
    return int(raw)


def log_routes(log: DecisionLog) -> list[Route]:
    async def logs(request: Request) -> Response:
        require_read(request)
        limit = _int(request, "limit", 100, MAX_LIMIT)
        offset = _int(request, "offset", 0, MAX_OFFSET)
        entries = [bridge_log(d) for d in await log.latest(limit, offset)]
        return JSONResponse(
            {"logs": entries, "count": len(entries), "limit": limit, "offset": offset}
        )

    async def photo_logs(request: Request) -> Response:
        require_read(request)
        photo_id = request.path_params["photo_id"]
        if not 0 < len(photo_id) <= 512:
            raise ApiError("photo_id must be 1-512 characters")
        entries = [bridge_log(d) for d in await log.for_photo(photo_id)]
        return JSONResponse({"logs": entries, "count": len(entries)})

    return [
        Route("/api/v1/logs", logs, methods=["GET"]),
        Route("/api/v1/logs/{photo_id:path}", photo_logs, methods=["GET"]),
    ]
