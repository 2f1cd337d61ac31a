"""The watchdog pings only while the service progresses (issue 9, item 7): reading, a moving
cursor, or idle with nothing pending. Autojump clock, a real notify socket."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from phash_trio.firehose.cursor import CursorTracker
from phash_trio.firehose.reader import ReaderState
from phash_trio.runtime.notify import Notifier, run_watchdog
from phash_trio.runtime.progress import ProgressCheck

T = 1_764_000_000_000_000


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd, and its NOTIFY_SOCKET value."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    with sock:
        yield sock, str(path)


def pings(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            assert sock.recv(64) == b"WATCHDOG=1"
        except BlockingIOError:
            return count
        count += 1


async def test_progress_kinds(autojump_clock: trio.testing.MockClock) -> None:
    """Reading, a moving cursor and idleness each count as progress; pending posts with
    neither reading nor cursor movement for the window is stuck, with the reason."""
    tracker, reader = CursorTracker(), ReaderState()
    assert ProgressCheck(tracker, reader, window=10.0)() is None  # idle: nothing pending
    tracker.start_job(T)
    check = ProgressCheck(tracker, reader, window=10.0)
    assert check() is None
    await trio.sleep(10.5)
    reason = check()
    assert reason is not None and "1 posts pending" in reason and "nothing read yet" in reason
    reader.last_message_at = trio.current_time()  # reading again
    assert check() is None
    await trio.sleep(10.5)
    assert check() is not None
    tracker.start_job(T + 5)
    tracker.finish_job(T)  # the cursor moves from T to T + 5
    assert check() is None
    await trio.sleep(9.0)
    assert check() is None  # moved 9 s ago
    await trio.sleep(2.0)
    assert check() is not None
    tracker.finish_job(T + 5)
    assert check() is None  # idle again


async def test_watchdog_withholds_pings_while_stuck(
    listener: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    """With a 2 s watchdog (ping every 1 s): pings while progressing, none while stuck (so
    systemd would restart us), and pings again once progress resumes."""
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    tracker, reader = CursorTracker(), ReaderState()
    tracker.start_job(T)  # a post that does not finish
    check = ProgressCheck(tracker, reader, window=3.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_watchdog, notifier, check)
        await trio.sleep(3.5)
        assert pings(sock) == 3  # at 1, 2, 3 s: within the window
        await trio.sleep(5.0)
        assert pings(sock) == 0  # 4..8 s: stuck
        tracker.finish_job(T)
        await trio.sleep(2.0)
        assert pings(sock) == 2  # 9, 10 s
        nursery.cancel_scope.cancel()
