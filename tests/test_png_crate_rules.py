"""PNG acceptance follows the png crate (0.18) where it differs from Pillow, both ways."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from phash_trio.image.meanhash import CorruptImage, mean_hash


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _bad_crc(chunk: bytes) -> bytes:
    return chunk[:-4] + bytes(b ^ 0xFF for b in chunk[-4:])


_RNG = np.random.default_rng(0)
_RAW = b"".join(b"\x00" + _RNG.integers(0, 256, 30, dtype=np.uint8).tobytes() for _ in range(10))
_IHDR = _chunk(b"IHDR", struct.pack(">IIBBBBB", 10, 10, 8, 2, 0, 0, 0))
_IDAT = _chunk(b"IDAT", zlib.compress(_RAW))
_IEND = _chunk(b"IEND", b"")


def _png(*chunks: bytes) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


GOOD = mean_hash(_png(_IHDR, _IDAT, _IEND))


def test_wrong_adler32_is_ignored_as_by_the_crate() -> None:
    """A zlib checksum that does not match: the crate ignores it (zlib and Pillow refuse)."""
    stream = zlib.compress(_RAW)
    wrong = _chunk(b"IDAT", stream[:-4] + b"\x00\x00\x00\x00")
    assert mean_hash(_png(_IHDR, wrong, _IEND)) == GOOD


@pytest.mark.parametrize(
    "chunk",
    [
        _bad_crc(_chunk(b"tEXt", b"Comment\x00hello")),
        _bad_crc(_chunk(b"pHYs", bytes(9))),
        _chunk(b"tRNS", b"\x00"),  # too short for RGB: Pillow raises, the crate skips it
        _chunk(b"zTXt", b"k\x00\x00" + b"not zlib"),
    ],
)
def test_bad_ancillary_chunks_are_skipped(chunk: bytes) -> None:
    """An ancillary chunk with a bad CRC or bad contents is skipped, not fatal."""
    assert mean_hash(_png(_IHDR, chunk, _IDAT, _IEND)) == GOOD


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ((_IHDR, _chunk(b"ABCD", b"xy"), _IDAT, _IEND), "unrecognized critical chunk 'ABCD'"),
        ((_IHDR, _bad_crc(_IDAT), _IEND), "CRC error in 'IDAT'"),
        ((_chunk(b"tEXt", b"a\x00b"), _IHDR, _IDAT, _IEND), "not IHDR"),
    ],
)
def test_what_the_crate_refuses_is_refused(chunks: tuple[bytes, ...], message: str) -> None:
    """Unknown critical chunks, critical CRC errors, chunks before IHDR: refused (one line)."""
    with pytest.raises(CorruptImage, match=message):
        mean_hash(_png(*chunks))


def test_palette_rules() -> None:
    """A second PLTE or one outside 3..768 bytes is fatal in the crate, so here too."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 2, 8, 3, 0, 0, 0))
    idat = _chunk(b"IDAT", zlib.compress(b"\x00\x00\x01\x00\x01" * 2))
    plte = _chunk(b"PLTE", bytes([10, 20, 30, 200, 100, 50]))
    assert mean_hash(_png(ihdr, plte, idat, _IEND)) >= 0
    with pytest.raises(CorruptImage, match="PLTE must appear at most once"):
        mean_hash(_png(ihdr, plte, plte, idat, _IEND))
    with pytest.raises(CorruptImage, match="PLTE chunk has the wrong length"):
        mean_hash(_png(ihdr, _chunk(b"PLTE", bytes(771)), idat, _IEND))
