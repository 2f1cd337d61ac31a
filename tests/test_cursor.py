"""Low-watermark cursor tracker, atomic cursor file, and the periodic checkpointer."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

from phash_trio.firehose.cursor import Checkpointer, CursorFile, CursorTracker, run_checkpointer


@attrs.define
class WatchedCursorFile(CursorFile):
    """A real cursor file that also tells the test (from its worker thread) what it saved."""

    saved: list[int] = attrs.field(factory=list)
    changed: trio.Event = attrs.field(factory=trio.Event)

    def save(self, cursor: int) -> None:
        super().save(cursor)
        trio.from_thread.run_sync(self._note, cursor)

    def _note(self, cursor: int) -> None:
        self.saved.append(cursor)
        self.changed.set()
        self.changed = trio.Event()

    async def wait_saves(self, count: int, checkpointer: Checkpointer) -> None:
        """Wait for ``count`` saves, then for the checkpointer to be back from its thread.

        The first wait has no deadline, so the mock clock only jumps to the saver's tick; the
        second spins on checkpoints (the clock cannot jump while this task is runnable) until
        the thread returned, so no jump happens while a save is still in flight.
        """
        while len(self.saved) < count:
            await self.changed.wait()
        while checkpointer.last_saved != self.saved[-1]:
            await trio.lowlevel.checkpoint()


# -- CursorTracker ---------------------------------------------------------------------------


def test_initial_cursor_until_the_first_event() -> None:
    """With no event yet the safe cursor is where we started (or None when live)."""
    assert CursorTracker().safe_cursor() is None
    tracker = CursorTracker(initial=500)
    assert tracker.safe_cursor() == 500
    tracker.observe(600)
    assert tracker.safe_cursor() == 600


def test_observe_moves_only_when_nothing_older_is_pending() -> None:
    """Events without work move the cursor, unless an older image post is unfinished."""
    tracker = CursorTracker()
    tracker.observe(10)
    tracker.observe(5)  # an older event never moves the cursor back
    assert tracker.safe_cursor() == 10
    tracker.start_job(20)
    tracker.observe(30)
    tracker.observe(40)
    assert tracker.safe_cursor() == 20
    tracker.finish_job(20)
    assert tracker.safe_cursor() == 40


def test_several_pending_finished_out_of_order() -> None:
    """The cursor is the oldest unfinished post, whatever order posts finish in."""
    tracker = CursorTracker(initial=50)
    for t in (100, 200, 300):
        tracker.start_job(t)
    tracker.observe(350)
    assert (tracker.safe_cursor(), tracker.pending) == (100, 3)
    tracker.finish_job(300)
    assert tracker.safe_cursor() == 100
    tracker.finish_job(200)
    assert tracker.safe_cursor() == 100
    tracker.finish_job(100)
    assert (tracker.safe_cursor(), tracker.pending) == (350, 0)


def test_duplicate_time_us_are_counted() -> None:
    """Two posts with the same ``time_us`` hold the cursor until both finish."""
    tracker = CursorTracker()
    tracker.start_job(100)
    tracker.start_job(100)
    tracker.start_job(150)
    tracker.finish_job(100)
    assert (tracker.safe_cursor(), tracker.pending) == (100, 2)
    tracker.finish_job(100)
    assert tracker.safe_cursor() == 150
    tracker.finish_job(150)
    assert tracker.safe_cursor() == 150


def test_finish_without_start_raises() -> None:
    """Finishing a post that was never started (or twice) is a bug and says so."""
    tracker = CursorTracker()
    with pytest.raises(ValueError, match=r"finish_job\(7\) without start_job"):
        tracker.finish_job(7)
    tracker.start_job(7)
    tracker.finish_job(7)
    with pytest.raises(ValueError, match="without start_job"):
        tracker.finish_job(7)
    assert tracker.pending == 0


# -- CursorFile ------------------------------------------------------------------------------


def test_cursor_file_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    """Save writes one decimal line through a renamed temp file; load reads it back."""
    cursor = CursorFile(tmp_path / "state" / "cursor")
    assert cursor.load() is None
    cursor.save(1_763_700_000_000_001)
    assert cursor.path.read_text() == "1763700000000001\n"
    first_inode = cursor.path.stat().st_ino
    # A stale temp file from a crash mid-save is simply overwritten.
    (tmp_path / "state" / "cursor.tmp").write_text("garbage that is longer than a cursor\n")
    cursor.save(42)
    assert cursor.load() == 42
    assert cursor.path.stat().st_ino != first_inode  # replaced by rename, not rewritten
    assert sorted(p.name for p in cursor.path.parent.iterdir()) == ["cursor"]


@pytest.mark.parametrize("content", ["abc\n", "", "-5\n", "0\n", "12 34\n"])
def test_corrupt_cursor_file_is_moved_aside(
    tmp_path: Path, content: str, log_lines: list[str]
) -> None:
    """A corrupt cursor file is kept as ``.corrupt``, warned about, and read as no cursor."""
    path = tmp_path / "cursor"
    path.write_text(content)
    assert CursorFile(path).load() is None
    assert not path.exists()
    assert (tmp_path / "cursor.corrupt").read_text() == content
    warnings = [line for line in log_lines if line.startswith("WARNING")]
    assert len(warnings) == 1
    assert "is corrupt" in warnings[0] and "cursor.corrupt" in warnings[0]


# -- run_checkpointer ------------------------------------------------------------------------


async def test_checkpointer_saves_each_interval_and_once_more_on_cancel(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A save happens at each interval tick when the cursor moved (never in between, never
    when it did not move), and once more, shielded, when the task is cancelled."""
    tracker = CursorTracker(initial=100)
    file = WatchedCursorFile(tmp_path / "cursor")
    checkpointer = Checkpointer(tracker, file, last_saved=100)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_checkpointer, checkpointer, 1.0)
        tracker.observe(101)
        await file.wait_saves(1, checkpointer)
        assert (trio.current_time(), file.saved) == (1.0, [101])
        tracker.start_job(102)
        tracker.observe(103)
        await file.wait_saves(2, checkpointer)
        assert (trio.current_time(), file.saved) == (2.0, [101, 102])
        await trio.sleep(9.5)  # ticks at 3..11 find nothing new
        assert file.saved == [101, 102]
        tracker.finish_job(102)
        await file.wait_saves(3, checkpointer)
        assert (trio.current_time(), file.saved) == (12.0, [101, 102, 103])
        tracker.observe(104)
        await trio.sleep(0.25)
        nursery.cancel_scope.cancel()
    assert trio.current_time() == 12.25
    assert file.saved == [101, 102, 103, 104]
    assert CursorFile(file.path).load() == 104
    assert checkpointer.last_saved == 104


async def test_checkpointer_survives_write_errors(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, log_lines: list[str]
) -> None:
    """A cursor file that cannot be written is logged as an error; the task keeps going."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    tracker = CursorTracker()
    checkpointer = Checkpointer(tracker, CursorFile(blocker / "cursor"))
    async with trio.open_nursery() as nursery:
        await nursery.start(run_checkpointer, checkpointer, 1.0)
        tracker.observe(5)
        await trio.sleep(3.5)
        nursery.cancel_scope.cancel()
    errors = [line for line in log_lines if line.startswith("ERROR")]
    assert len(errors) >= 2  # at least one tick and the final save
    assert all("cannot write cursor file" in line for line in errors)
    assert checkpointer.last_saved is None
    assert os.listdir(tmp_path) == ["not-a-dir"]
