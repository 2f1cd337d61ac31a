"""/metrics and /healthz over a real socket."""

from __future__ import annotations

import httpx
import pytest
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from phash_trio.httpserver import HttpServer
from phash_trio.metrics import Metrics
from phash_trio.status_http import StatusAddressError, parse_addr, run_status_server


class Health:
    """A switchable health source, as the service's Redis monitor would provide."""

    def __init__(self) -> None:
        self.state = (True, "")

    def __call__(self) -> tuple[bool, str]:
        return self.state


def sample(text: str, name: str) -> float:
    """The value of the unlabelled sample ``name`` in a Prometheus exposition."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and not s.labels:
                return float(s.value)
    raise AssertionError(f"{name} not in the exposition")


async def start(nursery: trio.Nursery, metrics: Metrics, health: Health) -> HttpServer:
    server: HttpServer = await nursery.start(run_status_server, "127.0.0.1:0", metrics, health)
    return server


async def test_metrics_exposition_shows_counters_moving(nursery: trio.Nursery) -> None:
    """GET /metrics is Prometheus text whose counters follow inc() between two scrapes."""
    metrics = Metrics()
    server = await start(nursery, metrics, Health())
    assert server.port != 0
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=server.url) as client:
            first = await client.get("/metrics")
            metrics.jobs_processed.inc()
            metrics.jobs_processed.inc()
            metrics.queue_depth.set(4)
            second = await client.get("/metrics")
    assert first.status_code == 200
    assert first.headers["content-type"] == CONTENT_TYPE_LATEST
    assert sample(first.text, "phash_jobs_processed_total") == 0
    assert sample(second.text, "phash_jobs_processed_total") == 2
    assert sample(second.text, "phash_queue_depth") == 4


async def test_healthz_follows_health(nursery: trio.Nursery) -> None:
    """GET /healthz is 200 'ok' while healthy and 503 with the reason when not."""
    health = Health()
    server = await start(nursery, Metrics(), health)
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=server.url) as client:
            ok = await client.get("/healthz")
            health.state = (False, "redis unreachable for 42s")
            bad = await client.get("/healthz")
    assert (ok.status_code, ok.text) == (200, "ok\n")
    assert (bad.status_code, bad.text) == (503, "redis unreachable for 42s\n")
    assert bad.headers["cache-control"] == "no-store"


async def test_healthz_when_the_check_itself_fails(nursery: trio.Nursery) -> None:
    """A health function that raises gives 503 naming the error, not a 500 or a hang."""

    def broken() -> tuple[bool, str]:
        raise RuntimeError("monitor not started")

    server: HttpServer = await nursery.start(run_status_server, "127.0.0.1:0", Metrics(), broken)
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=server.url) as client:
            response = await client.get("/healthz")
    assert response.status_code == 503
    assert "monitor not started" in response.text


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 404),
        ("GET", "/metrics/x", 404),
        ("POST", "/metrics", 405),
        ("PUT", "/healthz", 405),
    ],
)
async def test_other_paths_and_methods(
    nursery: trio.Nursery, method: str, path: str, status: int
) -> None:
    """Unknown paths are 404 and anything but GET on a known path is 405."""
    server = await start(nursery, Metrics(), Health())
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=server.url) as client:
            response = await client.request(method, path)
    assert response.status_code == status
    if status == 405:
        assert response.headers["allow"] == "GET"


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:0", ("::1", 0)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
    ],
)
def test_parse_addr(addr: str, expected: tuple[str, int]) -> None:
    """HOST:PORT and [v6]:PORT split into host and port."""
    assert parse_addr(addr) == expected


@pytest.mark.parametrize("addr", ["9464", ":9464", "localhost:", "localhost:http", "h:70000"])
def test_parse_addr_rejects(addr: str) -> None:
    """Anything but HOST:PORT is a StatusAddressError quoting the value."""
    with pytest.raises(StatusAddressError, match="is not HOST:PORT"):
        parse_addr(addr)
