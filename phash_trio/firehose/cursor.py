"""Low-watermark cursor: the saved cursor never passes an unfinished image post.

The reader calls :meth:`CursorTracker.start_job` before it queues an image post and
:meth:`CursorTracker.observe` for every event that needs no work; a worker calls
:meth:`CursorTracker.finish_job` once the post is fully decided (or dead-lettered). The safe
cursor is then the oldest unfinished ``time_us`` (Jetstream replays events ``>= cursor``), or,
with nothing pending, the newest event seen. Restarting from it re-delivers at most a few
already-finished events, which the idempotent actions absorb.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter
from pathlib import Path

import attrs
import trio
from loguru import logger

__all__ = ["Checkpointer", "CursorFile", "CursorTracker", "run_checkpointer"]


@attrs.define
class CursorTracker:
    """Which events are still in flight, and so how far the cursor may go."""

    #: Where we started (the saved cursor), used until the first event arrives.
    initial: int | None = None
    _pending: Counter[int] = attrs.field(factory=Counter)
    _heap: list[int] = attrs.field(factory=list)
    _newest: int | None = None

    def _see(self, time_us: int) -> None:
        if self._newest is None or time_us > self._newest:
            self._newest = time_us

    def observe(self, time_us: int) -> None:
        """An event that needs no work (finished the moment it is read)."""
        self._see(time_us)

    def start_job(self, time_us: int) -> None:
        """An image post is about to be queued; the cursor may not pass it until it finishes."""
        self._see(time_us)
        if self._pending[time_us] == 0:
            heapq.heappush(self._heap, time_us)
        self._pending[time_us] += 1

    def finish_job(self, time_us: int) -> None:
        """The post is decided (or dead-lettered)."""
        count = self._pending[time_us]
        if count <= 0:
            raise ValueError(f"finish_job({time_us}) without start_job")
        if count == 1:
            del self._pending[time_us]
        else:
            self._pending[time_us] = count - 1
        while self._heap and self._heap[0] not in self._pending:
            heapq.heappop(self._heap)

    @property
    def pending(self) -> int:
        return sum(self._pending.values())

    def safe_cursor(self) -> int | None:
        """The cursor to save now: resume here and no unfinished post is skipped."""
        if self._heap:
            return self._heap[0]
        if self._newest is not None:
            return self._newest
        return self.initial


@attrs.define
class CursorFile:
    """The cursor on disk: one decimal ``time_us``, replaced atomically."""

    path: Path

    def load(self) -> int | None:
        """The saved cursor, or None (no file, or a corrupt one moved aside with a warning)."""
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return None
        try:
            value = int(text)
            if value <= 0:
                raise ValueError("not positive")
        except ValueError:
            aside = self.path.with_name(self.path.name + ".corrupt")
            os.replace(self.path, aside)
            logger.warning(
                "cursor file {} is corrupt ({!r}); moved to {}; starting live",
                self.path,
                text[:40],
                aside,
            )
            return None
        return value

    def save(self, cursor: int) -> None:
        """Write to a temp file, fsync, rename, fsync the directory."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, f"{cursor}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@attrs.define
class Checkpointer:
    """Saves the tracker's safe cursor when it moved; remembers what it last wrote."""

    tracker: CursorTracker
    file: CursorFile
    last_saved: int | None = None

    async def save_now(self) -> int | None:
        cursor = self.tracker.safe_cursor()
        if cursor is not None and cursor != self.last_saved:
            await trio.to_thread.run_sync(self.file.save, cursor)
            self.last_saved = cursor
        return cursor


async def run_checkpointer(
    checkpointer: Checkpointer,
    interval: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Save every ``interval`` seconds; on cancellation, save once more (shielded)."""
    task_status.started()
    try:
        while True:
            await trio.sleep(interval)
            try:
                await checkpointer.save_now()
            except OSError as exc:
                logger.error("cannot write cursor file {}: {}", checkpointer.file.path, exc)
    finally:
        with trio.CancelScope(shield=True):
            try:
                cursor = await checkpointer.save_now()
                if cursor is None:
                    logger.info("no cursor to save yet (nothing read)")
                else:
                    logger.info("cursor saved at {}", cursor)
            except OSError as exc:
                logger.error("cannot write cursor file {}: {}", checkpointer.file.path, exc)
