"""A peer that answers HTTP requests with garbage: what a broken or hostile server sends.

Each :class:`Garbage` mode is one kind of bad answer seen in the wild or in fuzzing. The server
reads the request head (bounded), writes the mode's bytes and closes. Use it as a CDN, PDS, PLC
or Ozone URL to check that clients turn every such answer into a clean, typed failure.
"""

from __future__ import annotations

import enum

import attrs
import trio

__all__ = ["Garbage", "GarbageServer"]


class Garbage(enum.Enum):
    """What the server sends back."""

    NOT_HTTP = b"\x00\xff garbage that is not HTTP at all\r\n\r\n"
    BAD_CONTENT_LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nxyz"
    HUGE_HEADER = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
    TRUNCATED_BODY = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly this"
    NOT_JSON = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{not json"
    )
    CLOSE = b""


@attrs.define
class GarbageServer:
    """Listens on 127.0.0.1; ``mode`` may be changed at any time."""

    mode: Garbage = Garbage.NOT_HTTP
    port: int = 0
    requests: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[GarbageServer]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._answer, listeners)
            task_status.started(self)

    async def _answer(self, stream: trio.SocketStream) -> None:
        async with stream:
            self.requests += 1
            head = b""
            with trio.move_on_after(5):
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    head += chunk
            try:
                if self.mode.value:
                    await stream.send_all(self.mode.value)
            except trio.BrokenResourceError:
                pass
