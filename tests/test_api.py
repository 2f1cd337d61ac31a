"""The HTTP side (api package, hypercorn + Starlette) over real sockets: /metrics, /healthz,
and malformed or hostile clients (bad Content-Length, huge heads, slowloris, garbage, half-closed
connections, oversized bodies, too many connections) that must never stop it."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from phash_trio.api import AddressError, ApiServer, ServerLimits, create_app, parse_addr, serve_app
from phash_trio.runtime.metrics import Metrics


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


async def start(
    nursery: trio.Nursery,
    metrics: Metrics,
    health: Callable[[], tuple[bool, str]],
    limits: ServerLimits | None = None,
) -> ApiServer:
    server: ApiServer = await nursery.start(
        serve_app, create_app(metrics, health), "127.0.0.1:0", limits
    )
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
    # prometheus_client negotiates the format; without an Accept header, the classic text one.
    assert first.headers["content-type"].startswith("text/plain; version=")
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

    server = await start(nursery, Metrics(), broken)
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
        assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD"}


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
    """Anything but HOST:PORT is an AddressError quoting the value."""
    with pytest.raises(AddressError, match="is not HOST:PORT"):
        parse_addr(addr)


# --------------------------------------------------------------------------------------------
# Hostile clients over raw sockets: the server answers or closes, and keeps serving others.

#: Short limits so the timeouts show within a test; real time (real sockets).
FAST = ServerLimits(
    read_timeout=0.5,
    keep_alive_timeout=0.5,
    max_connections=4,
    max_connection_secs=2.0,
    max_header_bytes=8 * 1024,
)


async def exchange(server: ApiServer, data: bytes, *, half_close: bool = False) -> bytes:
    """Send raw bytes, then read until the server closes (within a guard)."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(data)
        if half_close:
            await stream.send_eof()
        answer = b""
        with trio.fail_after(10):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                answer += chunk
    return answer


async def still_serving(server: ApiServer) -> None:
    """A well-behaved client still gets /healthz."""
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=server.url) as client:
            response = await client.get("/healthz")
    assert (response.status_code, response.text) == (200, "ok\n")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", b"400"),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", b"400"),
        (
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"400",
        ),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", b"431"),
        (b"\x00\xff\xfe garbage \r\n\r\n", b"400"),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", b"400"),
        (b"GET /metrics?\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: \xff\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: zip\r\n\r\n", b"501"),
    ],
    ids=[
        "content-length-abc",
        "content-length-negative",
        "content-length-twice",
        "huge-header",
        "garbage",
        "header-without-colon",
        "non-utf8-query",
        "non-utf8-accept",
        "unknown-transfer-encoding",
    ],
)
async def test_malformed_requests_get_an_error_status(
    nursery: trio.Nursery, request_bytes: bytes, status: bytes
) -> None:
    """Each malformed request gets an error status line (never a crash, never a 500), and the
    server keeps answering well-formed requests."""
    server = await start(nursery, Metrics(), Health(), FAST)
    answer = await exchange(server, request_bytes, half_close=True)
    first_line = answer.split(b"\r\n", 1)[0]
    assert first_line.startswith(b"HTTP/1.1 " + status), answer[:200]
    await still_serving(server)


async def test_body_over_the_limit_is_refused_unread(nursery: trio.Nursery) -> None:
    """A declared body over the limit is answered 413 at once, without reading it."""
    server = await start(nursery, Metrics(), Health(), FAST)
    answer = await exchange(
        server, b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    await still_serving(server)


async def test_half_closed_client_still_gets_its_answer(nursery: trio.Nursery) -> None:
    """A client that shuts down its sending side after the request is answered, then closed."""
    server = await start(nursery, Metrics(), Health(), FAST)
    answer = await exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", half_close=True)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok\n")
    await still_serving(server)


async def test_slowloris_head_is_cut_off(nursery: trio.Nursery) -> None:
    """A request head trickled in a byte every 0.2 s (never silent for read_timeout) is closed
    once the keep-alive timeout passes, not held open for the minute it would take."""
    server = await start(nursery, Metrics(), Health(), FAST)
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 300
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    started = trio.current_time()
    closed_at = None
    async with stream:
        for byte in head:
            try:
                await stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                closed_at = trio.current_time()
                break
            with trio.move_on_after(0.2):
                if await stream.receive_some(1024) == b"":
                    closed_at = trio.current_time()
                    break
    assert closed_at is not None and closed_at - started < 3.0
    await still_serving(server)


async def test_slow_body_is_cut_off_at_the_connection_lifetime(nursery: trio.Nursery) -> None:
    """A client that declares a body and sends it a byte every 0.2 s loses the connection at
    max_connection_secs."""
    server = await start(nursery, Metrics(), Health(), FAST)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    started = trio.current_time()
    closed_at = None
    async with stream:
        await stream.send_all(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        with trio.fail_after(10):
            while closed_at is None:
                try:
                    await stream.send_all(b"a")
                    with trio.move_on_after(0.2):
                        while await stream.receive_some(1024):
                            pass
                        closed_at = trio.current_time()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    closed_at = trio.current_time()
    assert closed_at - started < FAST.max_connection_secs + 1.0
    await still_serving(server)


async def test_connection_cap_queues_the_rest(nursery: trio.Nursery) -> None:
    """With max_connections held by idle clients, a further client is served only once one of
    them goes (by the keep-alive timeout here), never refused or crashing the server."""
    limits = ServerLimits(
        read_timeout=5, keep_alive_timeout=1.0, max_connections=2, max_connection_secs=30
    )
    server = await start(nursery, Metrics(), Health(), limits)
    idle = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(2)]
    await trio.sleep(0.2)  # both accepted: every slot taken
    started = trio.current_time()
    await still_serving(server)
    waited = trio.current_time() - started
    for stream in idle:
        await stream.aclose()
    assert 0.6 < waited < 5.0


@pytest.mark.parametrize(
    "data",
    [
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" * 1000,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: !!!not-base64!!!\r\n\r\n",
    ],
    ids=["h2-preface-then-garbage", "h2-window-update-flood", "h2c-upgrade-bad-settings"],
)
async def test_http2_garbage_is_contained(nursery: trio.Nursery, data: bytes) -> None:
    """hypercorn also speaks HTTP/2 in clear text (prior knowledge or h2c upgrade): garbage
    there ends that connection (within a guard) and the server keeps serving."""
    server = await start(nursery, Metrics(), Health(), FAST)
    await exchange(server, data, half_close=True)
    await still_serving(server)


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/healthz", {"message": "request body over 10 bytes"}),
        ("/api/v1/match", {"success": False, "error": "request body over 10 bytes"}),
    ],
)
async def test_refusals_are_json_in_the_paths_client_shape(
    path: str, shape: dict[str, object]
) -> None:
    """413 from the body limit is HMA's {"message"} or, under /api/, the bridge's error shape."""
    app = create_app(Metrics(), Health(), max_body_bytes=10)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
        answer = await client.post(path, content=b"x" * 11)
    assert answer.status_code == 413
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == shape
