"""Decision-log fan-out benchmark: events/s through the log to 100 SSE clients and to 10
webhook receivers, on loopback with a temporary redis-server.

Usage: python bench/bench_events.py [--events N] [--sse-clients C] [--hooks H]

Everything runs in this one process (one Trio loop): the recorder (what the pipeline calls),
the broadcaster and its HTTP server, the webhook deliverers, the SSE clients (raw sockets that
count ``id:`` lines, no parsing) and the receivers (which verify every signature). The clients'
and receivers' CPU is therefore counted against the service: the figures are a lower bound.

It prints: entries/s written by the recorder alone; with C SSE clients, the time until every
client has every event (events/s per client, deliveries/s in total) and how many were cut; with
H webhook subscriptions, the same for signed POSTs (each subscription delivers one event at a
time, in order, so its rate is bounded by one round trip per event).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phash_trio.api import create_app, serve_app
from phash_trio.api.auth import Auth
from phash_trio.api.server import ServerLimits
from phash_trio.config import Settings
from phash_trio.runtime.metrics import Metrics
from phash_trio.state.services import open_decision_services
from phash_trio.testing.redis_server import redis_server
from phash_trio.testing.webhook_receiver import WebhookReceiver
from phash_trio.webhooks.delivery import Deliverer
from phash_trio.webhooks.manager import WebhookManager
from phash_trio.webhooks.subscriptions import Subscription

SECRET = "bench-secret-0123456789"
DATA = {"uri": "at://did:plc:x/app.bsky.feed.post/3k", "did": "did:plc:x", "rule": "r",
        "label": "r", "distance": 2, "phash": "ffff070080c1ffff"}  # fmt: skip


async def _sse_client(port: int, counts: list[int], i: int, done: trio.Event, n: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /api/v1/events HTTP/1.1\r\nHost: b\r\n\r\n")
    tail = b""
    while counts[i] < n:
        data = await stream.receive_some(1 << 16)
        if not data:
            break
        chunk = tail + data
        counts[i] += chunk.count(b"\nid: ") + chunk.startswith(b"id: ")
        tail = chunk[-8:]
    if all(c >= n for c in counts):
        done.set()
    await stream.aclose()


async def main(events: int, sse_clients: int, hooks: int) -> None:
    with redis_server() as redis, tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            redis_url=redis.url,
            allow_private_networks=True,
            sse_client_buffer=2000,
            sse_max_clients=sse_clients + 10,
            state_dir=Path(tmp),
        )
        metrics = Metrics()
        async with (
            open_decision_services(settings, metrics.registry) as services,
            trio.open_nursery() as nursery,
        ):
            app = create_app(metrics, lambda: (True, "ok"), routes=services.routes())
            services.install(app, Auth((), open_access=True))
            await nursery.start(services.run)
            limits = ServerLimits(max_connections=sse_clients + 64)
            server = await nursery.start(serve_app, app, "127.0.0.1:0", limits)
            recorder = services.recorder

            # 1. The recorder alone (what the pipeline's hook costs end to end).
            t = time.perf_counter()
            for _ in range(events):
                recorder.emit("match", DATA)
            await recorder.settled()
            alone = events / (time.perf_counter() - t)
            print(
                f"recorder alone: {events} entries in {events / alone:.2f} s = {alone:,.0f} entries/s"
            )

            # 2. SSE clients.
            counts = [0] * sse_clients
            done = trio.Event()
            for i in range(sse_clients):
                nursery.start_soon(_sse_client, server.port, counts, i, done, events)
            while len(services.broadcaster.clients) < sse_clients:  # noqa: ASYNC110
                await trio.sleep(0.01)
            t = time.perf_counter()
            for _ in range(events):
                recorder.emit("match", DATA)
            await recorder.settled()
            written = time.perf_counter() - t
            with trio.move_on_after(300):
                await done.wait()
            took = time.perf_counter() - t
            cut = metrics.registry.get_sample_value("phash_sse_clients_cut_total") or 0
            complete = sum(c >= events for c in counts)
            print(
                f"SSE: {events} events to {sse_clients} clients in {took:.2f} s "
                f"(log written in {written:.2f} s = {events / written:,.0f}/s): "
                f"{events / took:,.0f} events/s per client, "
                f"{events * complete / took:,.0f} deliveries/s; {complete} complete, {cut:.0f} cut"
            )

            # 3. Webhook receivers.
            n_hooks = max(1, events // 10)
            receivers = [WebhookReceiver(SECRET) for _ in range(hooks)]
            for rx in receivers:
                await rx.start(nursery)
            subs = tuple(
                Subscription(f"bench{i}", rx.url, SECRET) for i, rx in enumerate(receivers)
            )
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=hooks * 2)) as client:
                manager = WebhookManager(
                    services.redis, client, services.manager.metrics, "bench", subs, poll_secs=60
                )
                await nursery.start(manager.run)
                deliverers: list[Deliverer] = [d for d, _ in manager.deliverers.values()]
                t = time.perf_counter()
                for _ in range(n_hooks):
                    recorder.emit("match", DATA)
                await recorder.settled()
                with trio.move_on_after(300):
                    while min(len(rx.received) for rx in receivers) < n_hooks:  # noqa: ASYNC110
                        await trio.sleep(0.02)
                took = time.perf_counter() - t
                got = sum(len(rx.received) for rx in receivers)
                bad = sum(rx.bad_signatures for rx in receivers)
                print(
                    f"webhooks: {n_hooks} events to {hooks} receivers in {took:.2f} s: "
                    f"{n_hooks / took:,.0f} events/s per subscription, {got / took:,.0f} signed "
                    f"POSTs/s in total; {got} delivered, {bad} bad signatures, "
                    f"{sum(d.dead for d in deliverers)} dead letters"
                )
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--sse-clients", type=int, default=100)
    parser.add_argument("--hooks", type=int, default=10)
    args = parser.parse_args()
    trio.run(main, args.events, args.sse_clients, args.hooks)
