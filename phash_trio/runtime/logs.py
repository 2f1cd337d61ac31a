"""Log output: one line per event, human text or compact JSON, with secrets scrubbed.

``configure_logging`` installs a single loguru sink (calling it again replaces that sink rather
than adding another) and routes the standard ``logging`` module (httpx, trio-websocket, redis)
into it at WARNING and above. Both formats carry the fields bound with ``logger.bind`` (uri,
cid, endpoint, ...). Under systemd, when stderr is the journal (``JOURNAL_STREAM``), each line
starts with a ``<N>`` syslog priority that journald strips and records, so
``journalctl -p warning`` works.

Lines are written by a writer thread, never on the event loop: a stalled stderr (a journald
that stops reading, a full pipe) must not freeze the service. The thread's queue is bounded;
when it is full, lines are dropped and counted, and the count is written once the stream moves
again. :func:`flush_logs` waits for the queue to drain (also run at exit).

:func:`redact` is the last line of defence against a token reaching the journal: JWTs, bearer
tokens, ``password=...``-style pairs and app passwords become ``[redacted]`` in messages, bound
fields and tracebacks. Code must still never log secrets in the first place.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import sys
import threading
import traceback
from datetime import UTC
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from loguru import logger

if TYPE_CHECKING:
    from loguru import Message, Record

__all__ = ["FORMATS", "LogWriter", "configure_logging", "flush_logs", "redact"]

FORMATS = ("text", "json")
REDACTED = "[redacted]"

_SECRET_KEY = r"[\w.-]*(?:password|passwd|secret|token|jwt|api_?key|authorization|cookie)[\w.-]*"
_SECRET_KEY_RE = re.compile(rf"^{_SECRET_KEY}$", re.IGNORECASE)
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # password=hunter2, "accessJwt": "...", Authorization: Bearer ...  (key kept, value dropped)
    (
        re.compile(
            rf"""(["']?\b{_SECRET_KEY}["']?\s*[=:]\s*)(["']?)(?:(?:Bearer|Basic)\s+)?[^\s"',;&}}]+""",
            re.IGNORECASE,
        ),
        rf"\1\2{REDACTED}",
    ),
    (re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE), rf"\1 {REDACTED}"),
    # JWT: base64url('{"') = "eyJ", header.payload[.signature]
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}(?:\.[A-Za-z0-9_-]*){0,2}"), REDACTED),
    # Bluesky app password: xxxx-xxxx-xxxx-xxxx
    (re.compile(r"\b[a-z0-9]{4}-[a-z0-9]{4}-[a-z0-9]{4}-[a-z0-9]{4}\b"), REDACTED),
)

_handler_id: int | None = None
_default_removed = False
_writer: LogWriter | None = None

#: Lines waiting for the writer thread at most; beyond, lines are dropped and counted.
DEFAULT_QUEUE_LINES = 10_000


class LogWriter:
    """Writes lines to a stream from its own thread; ``put`` never blocks."""

    def __init__(self, stream: TextIO, max_lines: int = DEFAULT_QUEUE_LINES) -> None:
        self.stream = stream
        self.max_lines = max_lines
        #: Lines dropped because the queue was full (the stream did not keep up).
        self.dropped = 0
        self._unreported = 0
        self._queue: queue.Queue[str | None] = queue.Queue(max_lines)
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def put(self, line: str) -> None:
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1
            self._unreported += 1

    def _run(self) -> None:
        while True:
            line = self._queue.get()
            try:
                if line is None:
                    return
                if self._unreported:
                    lost, self._unreported = self._unreported, 0
                    self._write(f"[{lost} log line(s) dropped: the log stream did not keep up]")
                self._write(line)
            finally:
                self._queue.task_done()

    def _write(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr gone or closed: nowhere left to say so

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued line is written (False if ``timeout`` passed first)."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the thread."""
        self.flush(timeout)
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)


def flush_logs(timeout: float = 5.0) -> bool:
    """Wait until every log line so far is written (tests, and the end of a command)."""
    return _writer.flush(timeout) if _writer is not None else True


@atexit.register
def _close_writer() -> None:
    if _writer is not None:
        _writer.close()


def _after_fork() -> None:
    """A forked child has no writer thread (threads do not survive fork): start its own."""
    global _writer
    if _writer is not None:
        _writer = LogWriter(_writer.stream, _writer.max_lines)


os.register_at_fork(after_in_child=_after_fork)


def redact(text: str) -> str:
    """``text`` with anything that looks like a credential replaced by ``[redacted]``."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _clean_extra(extra: dict[Any, Any]) -> dict[str, Any]:
    """Bound fields, secrets removed; private ``_keys`` left out; JSON scalars kept as is."""
    out: dict[str, Any] = {}
    for key, value in extra.items():
        name = str(key)
        if name.startswith("_"):
            continue
        if _SECRET_KEY_RE.match(name):
            out[name] = REDACTED
        elif value is None or isinstance(value, bool | int | float):
            out[name] = value
        else:
            out[name] = redact(str(value))
    return out


def _exception_text(record: Record) -> str | None:
    exc = record["exception"]
    if exc is None or exc.type is None:
        return None
    lines = traceback.format_exception(exc.type, exc.value, exc.traceback)
    return redact("".join(lines).rstrip("\n"))


def _syslog_priority(levelno: int) -> int:
    for threshold, priority in ((50, 2), (40, 3), (30, 4), (25, 5), (20, 6)):
        if levelno >= threshold:
            return priority
    return 7


def _text_value(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in "\"'=" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def _format_text(record: Record) -> str:
    time = record["time"]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S") + f".{time.microsecond // 1000:03d}"
    line = f"{stamp} {record['level'].name:<8} {redact(record['message'])}"
    fields = _clean_extra(record["extra"])
    if fields:
        line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
    exc = _exception_text(record)
    return f"{line}\n{exc}" if exc else line


def _format_json(record: Record) -> str:
    ts = record["time"].astimezone(UTC).isoformat(timespec="milliseconds")
    data: dict[str, Any] = {
        "ts": ts.replace("+00:00", "Z"),
        "level": record["level"].name,
        "msg": redact(record["message"]),
    }
    for key, value in _clean_extra(record["extra"]).items():
        data[key if key not in data else f"extra_{key}"] = value
    exc = _exception_text(record)
    if exc:
        data["exc"] = exc
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)


def _is_journal(stream: TextIO) -> bool:
    """True when ``stream`` is the journal stream systemd named in ``JOURNAL_STREAM``."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class _InterceptHandler(logging.Handler):
    """Hands standard-library log records to loguru, keeping the caller's location."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame: FrameType | None = logging.currentframe()
        depth = 2
        while frame is not None and frame.f_code.co_filename == logging.__file__:
            frame = frame.f_back
            depth += 1
        logger.bind(logger=record.name).opt(depth=depth, exception=record.exc_info).log(
            level, record.getMessage()
        )


def configure_logging(
    fmt: str = "text",
    level: str = "INFO",
    *,
    sink: TextIO | None = None,
    journal: bool | None = None,
    queue_lines: int = DEFAULT_QUEUE_LINES,
) -> None:
    """Send logs at ``level`` and above to ``sink`` (stderr) as ``fmt`` ('text' or 'json').

    ``journal`` forces the ``<N>`` priority prefix on or off; by default it is on only when
    stderr is the journal. Idempotent: the previous sink installed here is replaced.
    """
    global _handler_id, _default_removed, _writer
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    try:
        levelno = logger.level(level.upper()).no
    except ValueError:
        raise ValueError(f"log level {level!r} is not a loguru level") from None
    stream = sys.stderr if sink is None else sink
    prefix = _is_journal(stream) if journal is None else journal
    render = _format_json if fmt == "json" else _format_text

    if _handler_id is not None:
        logger.remove(_handler_id)
        _handler_id = None
    if _writer is not None:
        _writer.close()
    _writer = LogWriter(stream, queue_lines)

    def write(message: Message) -> None:
        record = message.record
        line = render(record)
        if prefix:
            line = f"<{_syslog_priority(record['level'].no)}>{line}"
        if _writer is not None:  # the global: a forked child gets its own (see _after_fork)
            _writer.put(line)

    if not _default_removed:
        _default_removed = True
        try:
            logger.remove(0)  # loguru's default stderr sink
        except ValueError:
            pass
    _handler_id = logger.add(
        write, level=levelno, format="{message}", colorize=False, backtrace=False, diagnose=False
    )
    root = logging.getLogger()
    if not any(isinstance(h, _InterceptHandler) for h in root.handlers):
        root.addHandler(_InterceptHandler())
