"""Log setup: text and JSON lines, bound fields, redaction, idempotence."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator

import pytest
import trio
import trio.lowlevel
from loguru import logger

from phash_trio.runtime.logs import configure_logging, flush_logs, redact

JWT = (
    "eyJhbGciOiJFUzI1NksifQ.eyJzY29wZSI6ImNvbS5hdHByb3RvLmFjY2VzcyIsInN1YiI6ImRpZDpwbGM6eCJ9"
    ".c2lnbmF0dXJlLWJ5dGVz"
)


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    """A buffer to log into; the logging setup goes back to plain stderr text afterwards."""
    buffer = io.StringIO()
    try:
        yield buffer
    finally:
        configure_logging("text", "INFO", journal=False)


def lines(buffer: io.StringIO) -> list[str]:
    assert flush_logs()
    return buffer.getvalue().splitlines()


def test_json_lines_parse_with_extras(out: io.StringIO) -> None:
    """JSON format writes one object per line with ts, level, msg and every bound field."""
    configure_logging("json", "INFO", sink=out, journal=False)
    logger.bind(uri="at://did:plc:abc/app.bsky.feed.post/3k", cid="bafyrei", n=3).info("matched")
    logger.debug("not shown at INFO")
    (line,) = lines(out)
    data = json.loads(line)
    assert data["level"] == "INFO"
    assert data["msg"] == "matched"
    assert data["uri"] == "at://did:plc:abc/app.bsky.feed.post/3k"
    assert data["cid"] == "bafyrei"
    assert data["n"] == 3
    assert data["ts"].endswith("Z") and "T" in data["ts"]


def test_json_keeps_a_traceback_on_one_line(out: io.StringIO) -> None:
    """An exception is logged inside the same JSON object, so journald keeps it as one entry."""
    configure_logging("json", "INFO", sink=out, journal=False)
    try:
        raise RuntimeError(f"boom with {JWT}")
    except RuntimeError:
        logger.exception("worker failed")
    (line,) = lines(out)
    data = json.loads(line)
    assert data["level"] == "ERROR"
    assert "RuntimeError: boom with [redacted]" in data["exc"]
    assert "eyJ" not in line


def test_text_format_shows_level_message_and_fields(out: io.StringIO) -> None:
    """Text format is one readable line: time, level, message, then key=value fields."""
    configure_logging("text", "DEBUG", sink=out, journal=False)
    logger.bind(endpoint="https://pds.example", note="two words").debug("fetch failed")
    (line,) = lines(out)
    assert ' DEBUG    fetch failed endpoint=https://pds.example note="two words"' in line
    assert line[:4].isdigit() and line[4] == "-"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_tokens_are_redacted_in_messages_and_fields(out: io.StringIO, fmt: str) -> None:
    """JWTs, bearer tokens, passwords and secret-named fields never reach the output."""
    configure_logging(fmt, "INFO", sink=out, journal=False)
    logger.bind(accessJwt=JWT, password="hunter2", header=f"Bearer {JWT}").info(
        "login password=hunter2 got {} with Authorization: Bearer abcdefgh12345678", JWT
    )
    assert flush_logs()
    text = out.getvalue()
    assert "hunter2" not in text
    assert "eyJ" not in text
    assert "abcdefgh12345678" not in text
    assert text.count("[redacted]") >= 5


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (f"token {JWT} end", "token [redacted] end"),
        ("Authorization: Bearer abc.def-ghi_123", "Authorization: [redacted]"),
        ("sent Bearer abcdefghijklmnop", "sent Bearer [redacted]"),
        ("AUTOMOD_PASSWORD=abcd-efgh-ijkl-mnop", "AUTOMOD_PASSWORD=[redacted]"),
        (
            '{"identifier": "mod.bsky", "password": "s3cret"}',
            '{"identifier": "mod.bsky", "password": "[redacted]"}',
        ),
        ("app password abcd-2345-efgh-6789 used", "app password [redacted] used"),
        ("refreshJwt='x.y.z'", "refreshJwt='[redacted]'"),
        ("at://did:plc:abc/app.bsky.feed.post/3kx cid=bafyreia", None),
        ("phash 8f3c0c1e1e3c7e00 distance 2", None),
    ],
)
def test_redact(raw: str, expected: str | None) -> None:
    """Known secret shapes are replaced; ordinary identifiers and hashes are left alone."""
    assert redact(raw) == (raw if expected is None else expected)


def test_configuring_twice_does_not_duplicate_output(out: io.StringIO) -> None:
    """A second configure_logging replaces the first sink instead of adding one."""
    first = io.StringIO()
    configure_logging("text", "INFO", sink=first, journal=False)
    configure_logging("json", "INFO", sink=out, journal=False)
    configure_logging("json", "INFO", sink=out, journal=False)
    logger.info("once")
    assert flush_logs()
    assert first.getvalue() == ""
    assert [json.loads(line)["msg"] for line in lines(out)] == ["once"]


def test_standard_logging_is_routed_and_redacted(out: io.StringIO) -> None:
    """Warnings from stdlib loggers (httpx, redis) come out in our format, scrubbed."""
    configure_logging("json", "INFO", sink=out, journal=False)
    configure_logging("json", "INFO", sink=out, journal=False)
    logging.getLogger("some.library").warning("retrying with %s", f"Bearer {JWT}")
    (line,) = lines(out)
    data = json.loads(line)
    assert data["msg"] == "retrying with Bearer [redacted]"
    assert data["logger"] == "some.library"
    assert data["level"] == "WARNING"


def test_journal_prefix_carries_the_priority(out: io.StringIO) -> None:
    """With the journal prefix each line starts with its syslog priority for journald."""
    configure_logging("json", "DEBUG", sink=out, journal=True)
    logger.debug("d")
    logger.info("i")
    logger.warning("w")
    logger.error("e")
    assert [line[:3] for line in lines(out)] == ["<7>", "<6>", "<4>", "<3>"]
    assert json.loads(lines(out)[2][3:])["msg"] == "w"


@pytest.mark.parametrize(("fmt", "level"), [("yaml", "INFO"), ("json", "LOUD")])
def test_bad_format_or_level_is_a_clear_error(fmt: str, level: str) -> None:
    """An unknown format or level raises ValueError naming the bad value."""
    with pytest.raises(ValueError, match=repr(fmt) if fmt == "yaml" else repr(level)):
        configure_logging(fmt, level)


async def test_a_stalled_log_stream_does_not_block_the_event_loop() -> None:
    """Logging to a pipe nobody reads (a stalled journald) returns at once: lines beyond the
    queue are dropped and counted, and once the pipe is read again the rest arrives in order,
    with a note of how many were dropped."""
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w", encoding="utf-8")
    try:
        configure_logging("text", "INFO", sink=stream, journal=False, queue_lines=50)
        started = trio.current_time()
        for i in range(300):  # ~300 KB: far more than the pipe buffer holds
            logger.info("line {} {}", i, "x" * 1000)
            await trio.lowlevel.checkpoint()
        elapsed = trio.current_time() - started
        received = b""
        with trio.fail_after(10):
            while received.count(b"\n") < 50 or b"dropped" not in received:
                received += await trio.to_thread.run_sync(os.read, read_fd, 1 << 20)
                if flush_logs(0.01) and b"line 299" in received:
                    break
    finally:
        configure_logging("text", "INFO", journal=False)
        stream.close()
        os.close(read_fd)
    assert elapsed < 1.0
    text = received.decode()
    numbers = [int(m) for m in re.findall(r"line (\d+) x", text)]
    assert numbers == sorted(numbers) and numbers[0] == 0
    assert len(numbers) < 300
    assert re.search(r"\[\d+ log line\(s\) dropped", text)
