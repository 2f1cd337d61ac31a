"""Find the MCU where zune-jpeg 0.5 gives up on a corrupt baseline scan (the Python model).

The decoder no longer calls this: the compiled core (``hashcore.c``, "zune's baseline
decoder") decodes single-scan baseline images with the same model and reports the stop
itself, at C speed and with coefficients. This module stays as the independent, readable
model the tests check the compiled decoder against (tests/test_hashcore.py).

libjpeg substitutes zero for a bit pattern that no Huffman code matches and decodes on; zune-jpeg
0.5 (non-strict, as the reference uses it) logs the error and stops: the MCU row in progress is
still output, the rest of the image is not. To reproduce its pixels we must know *where* it
stops, which depends on its own bit reader (32-bit refills, zero bits after a marker, a 9-bit
lookup with a fast AC path) and on how it handles the end of each restart interval (skip to the
next marker, restart on any RSTn). This module replays that entropy walk without producing
coefficients; it runs only when libjpeg reported corrupt data, and gives up (None) on anything
it does not model, so the caller keeps libjpeg's decode then.
"""

from __future__ import annotations

import re

import attrs

from .markers import JpegStructure

__all__ = ["DEFAULT_MAX_BLOCKS", "ZuneStop", "find_zune_stop"]

#: Blocks the walk may decode before giving up (pure Python, about 5 us a block: ~1.3 s).
DEFAULT_MAX_BLOCKS = 1 << 18

_LOOK = 9
_LOOK_MASK = (1 << _LOOK) - 1
_SLOW = (_LOOK + 1) << _LOOK  # lookup entry of a prefix no code of at most _LOOK bits matches
_EOI = 0xD9
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


@attrs.frozen
class ZuneStop:
    """Where zune stopped: MCU row and column, and the failing block's index in the MCU."""

    row: int
    col: int
    block: int
    """Index in zune's order: frame components in turn, each its rows of blocks left to right."""


class _Stop(Exception):
    """zune's decode_mcu_block returned an error (the reason is for debugging only)."""


class _GiveUp(Exception):
    """The stream holds something this model does not cover."""


class _Table:
    """zune's Huffman table: a 9-bit lookup, maxcode/offset for longer codes, fast AC flags."""

    def __init__(self, counts: bytes, symbols: bytes, *, is_dc: bool) -> None:
        self.maxcode = [0] * 18
        self.offset = [0] * 18
        self.values = list(symbols) + [0] * (256 - len(symbols))
        sizes = [length for length in range(1, 17) for _ in range(counts[length - 1])]
        codes: list[int] = []
        code, size, p = 0, sizes[0] if sizes else 0, 0
        while p < len(sizes):
            while p < len(sizes) and sizes[p] == size:
                codes.append(code)
                code += 1
                p += 1
            if code > 1 << size:
                raise _GiveUp("bogus Huffman table")
            self.maxcode[size] = code << (16 - size)
            code <<= 1
            size += 1
        p = 0
        for length in range(17):
            if length == 0 or counts[length - 1] == 0:
                self.maxcode[length] = -1
            else:
                self.offset[length] = p - codes[p]
                p += counts[length - 1]
        self.maxcode[17] = 0xFFFFF
        self.lookup = [_SLOW] * (1 << _LOOK)
        for index, (size, code) in enumerate(zip(sizes, codes, strict=True)):
            if size <= _LOOK:
                base = code << (_LOOK - size)
                for j in range(1 << (_LOOK - size)):
                    self.lookup[base + j] = (size << _LOOK) | self.values[index]
        self.fast = [False] * (1 << _LOOK)
        if not is_dc:
            for i, entry in enumerate(self.lookup):
                size = entry >> _LOOK
                magnitude = entry & 15
                if size <= _LOOK and magnitude and size + magnitude <= _LOOK:
                    k = ((i << size) & _LOOK_MASK) >> (_LOOK - magnitude)
                    if k < 1 << (magnitude - 1):
                        k += (-1 << magnitude) + 1
                    self.fast[i] = -128 <= k <= 127


class _Bits:
    """zune's BitStream over the entropy-coded bytes starting at ``pos``."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos
        self.acc = 0
        self.bits = 0
        self.marker: int | None = None
        self.overread = 0
        self.eoi = False

    def _byte(self) -> int:
        self.pos += 1
        if self.pos <= len(self.data):
            return self.data[self.pos - 1]
        self.overread += 1
        return 0

    def refill(self) -> None:
        if self.bits >= 32:
            return
        if self.marker is not None or self.eoi:
            self.acc <<= 32
            self.bits += 32
            return
        if self.overread > 0:
            if self.bits == 0:
                raise _Stop("no more data")
            return
        chunk = self.data[self.pos : self.pos + 4]
        if len(chunk) == 4 and 0xFF not in chunk:
            self.acc = (self.acc << 32) | int.from_bytes(chunk, "big")
            self.bits += 32
            self.pos += 4
            return
        for _ in range(4):
            byte = self._byte()
            if byte == 0xFF:
                following = self._byte()
                while following == 0xFF:
                    following = self._byte()
                if following != 0:
                    self.marker = following
                    if following == _EOI:
                        self.acc <<= 8
                        self.bits += 8
                    return
            self.acc = (self.acc << 8) | byte
            self.bits += 8

    def peek(self, count: int) -> int:
        if self.bits >= count:
            return self.acc >> (self.bits - count)
        return self.acc << (count - self.bits)

    def drop(self, count: int) -> None:
        if count >= self.bits:
            self.acc = 0
            self.bits = 0
        else:
            self.bits -= count
            self.acc &= (1 << self.bits) - 1

    def symbol(self, table: _Table, entry: int) -> int:
        length = entry >> _LOOK
        value = entry & _LOOK_MASK
        if length > _LOOK:
            code = self.peek(16)
            while length < 17 and code >= table.maxcode[length]:
                length += 1
            if length == 17:
                raise _Stop("bad Huffman code")
            value = table.values[((code >> (16 - length)) + table.offset[length]) & 0xFF]
        if length > self.bits:
            raise _Stop("Huffman code longer than the bits left")
        self.drop(length)
        return value

    def block(self, dc: _Table, ac: _Table) -> None:
        if self.bits < 1 and self.marker is not None:
            raise _Stop("no more bytes before a marker")
        if self.bits < 32:
            self.refill()
        size = self.symbol(dc, dc.lookup[self.peek(_LOOK)])
        if size:
            self.drop(size)
        position = 1
        while position < 64:
            self.refill()
            look = self.peek(_LOOK)
            if ac.fast[look]:
                entry = ac.lookup[look]
                position += (entry >> 4 & 15) + 1
                self.drop((entry >> _LOOK) + (entry & 15))
                continue
            run_size = self.symbol(ac, ac.lookup[look])
            run, size = run_size >> 4, run_size & 15
            if size:
                position += run + 1
                self.drop(size)
            elif run != 15:
                return
            else:
                position += 16

    def restart(self) -> None:
        self.acc = 0
        self.bits = 0
        self.marker = None
        self.overread = 0

    def next_marker(self) -> int | None:
        """The next marker in the data (zune's get_marker), skipping whatever precedes it."""
        data = self.data
        while True:
            at = data.find(b"\xff", self.pos)
            if at < 0:
                self.pos = len(data)
                return None
            at += 1
            while at < len(data) and data[at] == 0xFF:
                at += 1
            if at >= len(data):
                self.pos = len(data)
                return None
            self.pos = at + 1
            if data[at] != 0:
                return data[at]


@attrs.frozen
class _Scan:
    start: int
    restart_interval: int
    tables: tuple[tuple[_Table, _Table, int], ...]
    """Per frame component, in frame order: DC table, AC table, blocks per MCU."""
    mcu_cols: int
    mcu_rows: int


def find_zune_stop(
    structure: JpegStructure, *, max_blocks: int = DEFAULT_MAX_BLOCKS
) -> ZuneStop | None:
    """Where zune-jpeg would stop decoding this baseline image, or None if it decodes it all.

    None too when the image is outside the model (progressive, several scans, scan components
    not in frame order, a marker other than RSTn/EOI in the data) or the walk would decode more
    than ``max_blocks`` blocks, so a hostile file costs at most that much work.
    """
    if structure.progressive:
        return None
    try:
        scan = _read_scan(structure)
        return _walk(structure.stream, scan, max_blocks)
    except _GiveUp:
        return None


def _read_scan(structure: JpegStructure) -> _Scan:
    """Tables, restart interval and grid of the only scan of the rebuilt stream."""
    data = structure.stream
    dc: dict[int, _Table] = {}
    ac: dict[int, _Table] = {}
    restart_interval = 0
    at = 2
    while True:
        code = data[at + 1]
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        body = data[at + 4 : at + 2 + length]
        at += 2 + length
        if code == 0xC4:
            _read_dht(body, dc, ac)
        elif code == 0xDD:
            restart_interval = int.from_bytes(body, "big")
        elif code == 0xDA:
            break
    end = _SCAN_END.search(data, at)
    if end is None or end.start() != len(data) - 2:
        raise _GiveUp("the image has more than one scan")
    count = body[0]
    idents = [body[1 + 2 * k] for k in range(count)]
    selectors = [body[2 + 2 * k] for k in range(count)]
    components = structure.components
    if idents != [c.ident for c in components]:
        raise _GiveUp("the scan does not code every component in frame order")
    if len(components) == 1:
        blocks = [1]
        cols, rows = -(-structure.width // 8), -(-structure.height // 8)
    else:
        blocks = [c.h * c.v for c in components]
        cols = -(-structure.width // (8 * structure.max_h))
        rows = -(-structure.height // (8 * structure.max_v))
    try:
        tables = tuple(
            (dc[selector >> 4], ac[selector & 15], n)
            for selector, n in zip(selectors, blocks, strict=True)
        )
    except KeyError as exc:
        raise _GiveUp("a Huffman table the scan uses is missing") from exc
    return _Scan(at, restart_interval, tables, cols, rows)


def _read_dht(body: bytes, dc: dict[int, _Table], ac: dict[int, _Table]) -> None:
    at = 0
    while at + 17 <= len(body):
        index, counts = body[at], body[at + 1 : at + 17]
        count = sum(counts)
        symbols = body[at + 17 : at + 17 + count]
        at += 17 + count
        is_dc = not index & 0x10
        (dc if is_dc else ac)[index & 3] = _Table(counts, symbols, is_dc=is_dc)


def _walk(data: bytes, scan: _Scan, max_blocks: int) -> ZuneStop | None:
    """zune's decode_mcu_ycbcr_baseline loop, decoding nothing but the bits."""
    bits = _Bits(data, scan.start)
    interval = scan.restart_interval
    todo = interval
    budget = max_blocks
    per_mcu = sum(n for _, _, n in scan.tables)
    for row in range(scan.mcu_rows):
        if bits.overread > 0:
            raise _GiveUp("premature end of data")
        for col in range(scan.mcu_cols):
            budget -= per_mcu
            if budget < 0:
                raise _GiveUp("block budget exhausted")
            index = 0
            try:
                for dc, ac, count in scan.tables:
                    for _ in range(count):
                        bits.block(dc, ac)
                        index += 1
            except _Stop:
                return ZuneStop(row, col, index)
            if interval:
                todo -= 1
                if todo == 0:
                    _end_interval(bits)
                    todo = interval
        if bits.marker == _EOI:
            bits.marker = None
            bits.eoi = True
        elif bits.marker is not None and not 0xD0 <= bits.marker <= 0xD7:
            raise _GiveUp(f"marker 0xFF{bits.marker:02X} inside the scan")
    return None


def _end_interval(bits: _Bits) -> None:
    """zune's handle_rst_main: find the next marker, restart the reader on any RSTn."""
    bits.refill()
    if bits.marker is None and not bits.eoi:
        bits.marker = bits.next_marker()
    if bits.marker is not None and 0xD0 <= bits.marker <= 0xD7:
        bits.restart()
