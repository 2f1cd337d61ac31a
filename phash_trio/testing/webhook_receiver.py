"""A webhook receiver on loopback that verifies every signature, as a real one must.

It answers 2xx only to a delivery whose signature checks out (``phash`` or ``hma`` scheme),
records it, and can be told to answer 500, to hang, or be stopped and started again on the same
port (a receiver that is down). ``unique()`` is what an idempotent receiver keeps: the first
copy of each ``X-Phash-Delivery``.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from phash_trio.api.server import ApiServer, serve_app
from phash_trio.webhooks.signing import SignatureError, verify, verify_hma

__all__ = ["WebhookReceiver"]


@attrs.define
class WebhookReceiver:
    secret: str
    scheme: str = "phash"
    #: "ok", "fail" (500) or "hang" (never answers).
    mode: str = "ok"
    #: Deliveries accepted, in arrival order: (delivery id, parsed body).
    received: list[tuple[str, dict[str, Any]]] = attrs.field(factory=list)
    bad_signatures: int = 0
    attempts: int = 0
    port: int = 0
    _scope: trio.CancelScope | None = None
    arrived: trio.Event = attrs.field(factory=trio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: Request) -> Response:
        body = await request.body()
        self.attempts += 1
        self.arrived.set()
        self.arrived = trio.Event()
        try:
            if self.scheme == "hma":
                verify_hma(self.secret, body, request.headers)
                delivery = request.headers.get("x-phash-delivery", "")
            else:
                delivery = verify(self.secret, body, request.headers)
        except SignatureError as exc:
            self.bad_signatures += 1
            return JSONResponse({"error": str(exc)}, status_code=401)
        if self.mode == "hang":
            await trio.sleep_forever()
        if self.mode == "fail":
            return JSONResponse({"error": "down for maintenance"}, status_code=500)
        self.received.append((delivery, json.loads(body)))
        return JSONResponse({"status": "success"})

    def unique(self) -> list[str]:
        seen: set[str] = set()
        out = []
        for delivery, _ in self.received:
            if delivery not in seen:
                seen.add(delivery)
                out.append(delivery)
        return out

    async def start(self, nursery: trio.Nursery) -> None:
        """Listen (on the same port again after ``stop``)."""
        app = Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])
        scope = self._scope = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[ApiServer]) -> None:
            with scope:
                await serve_app(app, f"127.0.0.1:{self.port}", task_status=task_status)

        server: ApiServer = await nursery.start(serve)
        self.port = server.port

    def stop(self) -> None:
        """Stop listening: connections are refused until ``start`` again."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
