"""sd_notify client against real AF_UNIX datagram sockets."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from loguru import logger

from phash_trio.runtime.notify import Notifier, run_watchdog


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd, and its NOTIFY_SOCKET value."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    with sock:
        yield sock, str(path)


def drain(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock``, decoded."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


async def test_messages_reach_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    """READY, STATUS, WATCHDOG and STOPPING arrive as separate datagrams in order."""
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert await notifier.ready()
    assert await notifier.status("running: 3 posts")
    assert await notifier.watchdog()
    assert await notifier.stopping()
    assert drain(sock) == ["READY=1", "STATUS=running: 3 posts", "WATCHDOG=1", "STOPPING=1"]


async def test_messages_reach_an_abstract_socket() -> None:
    """An '@name' NOTIFY_SOCKET addresses the abstract namespace."""
    name = f"phash-trio-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert await notifier.ready()
        assert drain(sock) == ["READY=1"]


async def test_status_newlines_do_not_inject_assignments(
    listener: tuple[socket.socket, str],
) -> None:
    """A multi-line status becomes one STATUS= line, so it cannot smuggle in READY=1 etc."""
    sock, path = listener
    await Notifier({"NOTIFY_SOCKET": path}).status("draining\nREADY=1")
    assert drain(sock) == ["STATUS=draining READY=1"]


async def test_no_socket_is_a_no_op() -> None:
    """Without NOTIFY_SOCKET nothing is sent and there is no watchdog."""
    notifier = Notifier({"WATCHDOG_USEC": "2000000"})
    assert not notifier.enabled
    assert not await notifier.ready()
    assert not await notifier.status("x")
    assert notifier.watchdog_interval() is None


async def test_send_failure_is_logged_once_and_not_raised(tmp_path: Path) -> None:
    """A socket that is not there makes sends return False with a single warning."""
    lines: list[str] = []
    handler = logger.add(lines.append, level="WARNING", format="{message}")
    try:
        notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})
        assert not await notifier.ready()
        assert not await notifier.watchdog()
    finally:
        logger.remove(handler)
    assert len(lines) == 1
    assert "sd_notify" in lines[0]
    assert "missing.sock" in lines[0]


@pytest.mark.parametrize("value", ["run/notify", "vsock:2:1234"])
def test_unusable_socket_address_disables_notifying(value: str) -> None:
    """NOTIFY_SOCKET must be an absolute path or @abstract; anything else disables notifying."""
    assert not Notifier({"NOTIFY_SOCKET": value}).enabled


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "2000000"}, 2.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 60.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    """WATCHDOG_USEC gives the interval, only for our pid and only when it is a positive number."""
    notifier = Notifier({"NOTIFY_SOCKET": "/run/nothing-here", **env})
    assert notifier.watchdog_interval() == expected


@pytest.mark.parametrize(
    ("usec", "window", "pings"),
    [(2_000_000, 5.5, 5), (2_000_000, 0.9, 0), (500_000, 1.1, 4), (60_000_000, 95.0, 3)],
)
async def test_watchdog_pings_every_half_interval(
    listener: tuple[socket.socket, str],
    autojump_clock: trio.testing.MockClock,
    usec: int,
    window: float,
    pings: int,
) -> None:
    """run_watchdog sends WATCHDOG=1 at every half interval, counted exactly within a window."""
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(usec)})
    start = trio.current_time()
    with trio.move_on_after(window):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_watchdog, notifier)
    assert trio.current_time() - start == window
    assert drain(sock) == ["WATCHDOG=1"] * pings


async def test_watchdog_returns_at_once_when_not_configured(
    listener: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    """Without WATCHDOG_USEC run_watchdog starts and returns without sleeping or sending."""
    sock, path = listener
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_watchdog, Notifier({"NOTIFY_SOCKET": path}))
    assert trio.current_time() == start
    assert drain(sock) == []
