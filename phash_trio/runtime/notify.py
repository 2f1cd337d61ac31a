"""A tiny sd_notify client, so systemd knows when we are ready, alive and stopping.

The protocol is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket named by
``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Without ``NOTIFY_SOCKET``
(tests, a terminal) every call is a no-op. A failed send is logged once and never raised: losing
a status update must not take the service down (a missed watchdog ping is for systemd to judge).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping

import trio
from loguru import logger

__all__ = ["Notifier", "run_watchdog"]


class Notifier:
    """Sends sd_notify messages to the socket named in the environment it was given."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._environ: Mapping[str, str] = dict(env)
        self._error_logged = False
        self._address = self._parse_address(self._environ.get("NOTIFY_SOCKET", ""))

    @property
    def enabled(self) -> bool:
        """True when there is a socket to talk to."""
        return self._address is not None

    def _parse_address(self, raw: str) -> str | None:
        if not raw:
            return None
        if raw.startswith("@"):
            return "\0" + raw[1:]
        if raw.startswith("/"):
            return raw
        # systemd >= 254 may hand out "vsock:..." addresses; we do not speak those.
        logger.warning("NOTIFY_SOCKET={!r} is not a path or @abstract name; not notifying", raw)
        return None

    async def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False when disabled or the send failed."""
        if self._address is None:
            return False
        payload = "\n".join(assignments).encode()
        try:
            with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                await sock.sendto(payload, self._address)
        except OSError as exc:
            if not self._error_logged:
                self._error_logged = True
                logger.warning(
                    "sd_notify to {!r} failed: {} (further failures are not logged)",
                    self._address.replace("\0", "@"),
                    exc,
                )
            return False
        return True

    async def ready(self) -> bool:
        """Start-up is complete (Type=notify units are 'active' from here)."""
        return await self.send("READY=1")

    async def stopping(self) -> bool:
        """Shutdown has begun; systemd shows 'deactivating' while we drain."""
        return await self.send("STOPPING=1")

    async def status(self, text: str) -> bool:
        """One line shown by ``systemctl status`` (newlines would start a new assignment)."""
        return await self.send("STATUS=" + " ".join(text.splitlines()))

    async def watchdog(self) -> bool:
        """Keep-alive ping for ``WatchdogSec=``."""
        return await self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or None when systemd expects no pings from us.

        ``WATCHDOG_USEC`` sets it; when ``WATCHDOG_PID`` is set it must be our pid (otherwise
        the watchdog is meant for another process, e.g. a parent shell).
        """
        if self._address is None:
            return None
        raw_usec = self._environ.get("WATCHDOG_USEC", "")
        if not raw_usec:
            return None
        raw_pid = self._environ.get("WATCHDOG_PID", "")
        if raw_pid and raw_pid != str(os.getpid()):
            return None
        try:
            usec = int(raw_usec)
        except ValueError:
            usec = 0
        if usec <= 0:
            logger.warning("WATCHDOG_USEC={!r} is not a positive number; no watchdog", raw_usec)
            return None
        return usec / 1_000_000


async def run_watchdog(
    notifier: Notifier,
    stuck: Callable[[], str | None] | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ping ``WATCHDOG=1`` every half watchdog interval while ``stuck()`` says None.

    ``stuck`` returns why the service makes no progress (see
    :class:`phash_trio.runtime.progress.ProgressCheck`); while it does, pings stop (logged once
    per episode) and systemd restarts the service when its interval passes. Returns at once
    when no watchdog is configured. Pings are scheduled on a fixed grid (``sleep_until``), so a
    slow send does not push later pings back.
    """
    interval = notifier.watchdog_interval()
    task_status.started()
    if interval is None:
        return
    period = interval / 2
    logger.debug("systemd watchdog: {}s, pinging every {}s", interval, period)
    next_ping = trio.current_time() + period
    withheld = False
    while True:
        await trio.sleep_until(next_ping)
        reason = stuck() if stuck is not None else None
        if reason is None:
            if withheld:
                logger.info("watchdog: progress again; pinging")
                withheld = False
            await notifier.watchdog()
        elif not withheld:
            logger.error("watchdog: no progress ({}); not pinging, systemd will restart", reason)
            withheld = True
        next_ping = max(next_ping + period, trio.current_time())
