"""Is the service making progress? What the systemd watchdog asks before each ping.

A ping says "restart me only if I stop saying this". Pinging from a timer alone (as before)
only proves the event loop runs; a service whose workers are all wedged would be pinged
forever. Progress is any of:

* **reading**: the reader got a frame within ``window`` seconds;
* **moving**: the saved (safe) cursor changed within ``window`` seconds;
* **idle but healthy**: nothing is pending, so nothing can be stuck (a quiet stream, or a
  reader waiting to reconnect to an upstream that is down: restarting would not help).

Otherwise posts are pending, the cursor has not moved and nothing was read for ``window``
seconds: the service is stuck. With ``JOB_DEADLINE_SECS`` bounding every job, this should not
happen; the window is the job deadline plus a margin, so the watchdog only fires when that
bound itself failed.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from phash_trio.firehose.cursor import CursorTracker
from phash_trio.firehose.reader import ReaderState

__all__ = ["ProgressCheck"]


@attrs.define
class ProgressCheck:
    """Call it: ``None`` while the service progresses, else why it is stuck."""

    tracker: CursorTracker
    reader: ReaderState
    #: Seconds without any progress that count as stuck.
    window: float
    now: Callable[[], float] = trio.current_time
    _cursor: int | None = attrs.field(init=False)
    _moved_at: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._cursor, self._moved_at = self.tracker.safe_cursor(), self.now()

    def __call__(self) -> str | None:
        """Sampled on each call: a cursor change is seen at the next call after it."""
        now = self.now()
        cursor = self.tracker.safe_cursor()
        if cursor != self._cursor:
            self._cursor, self._moved_at = cursor, now
        last_read = self.reader.last_message_at
        if last_read is not None and now - last_read <= self.window:
            return None
        if now - self._moved_at <= self.window:
            return None
        pending = self.tracker.pending
        if pending == 0:
            return None
        read = "nothing read yet" if last_read is None else f"last read {now - last_read:.0f} s ago"
        return (
            f"{pending} posts pending, cursor {cursor} unmoved for {now - self._moved_at:.0f} s,"
            f" {read}"
        )
