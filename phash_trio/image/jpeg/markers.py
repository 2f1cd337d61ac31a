"""Walk the markers of a JPEG's first image and rebuild a minimal stream for libjpeg.

Here the frame is validated and sized before any decoding (so ``max_pixels`` is enforced from
the header), the colour transform of an Adobe APP14 segment is read, and a new stream is built
from SOI, the tables, the frame, the scans and EOI only. Dropping APPn/COM segments keeps
libjpeg's marker savers idle; stopping at the first EOI decodes only the first image of an MPO
or an Ultra HDR file (its MPF gain map follows the primary image's EOI, as zune-jpeg reads it:
mcu.rs stops at the first EOI); a scan whose data runs into the end of the input is flagged so
the caller can tell a truncated file from one that merely lacks EOI. libjpeg's own header
checks are mirrored here so that the reasons are ours, although the compiled binding now turns
any libjpeg error into an exception.
"""

from __future__ import annotations

import re

import attrs

from .errors import (
    JpegDecodeError,
    JpegFormatError,
    JpegTooLargeError,
    JpegTruncatedError,
    JpegUnsupportedError,
)

__all__ = [
    "MAX_PROGRESSIVE_SCANS",
    "MAX_SCANS",
    "FrameComponent",
    "JpegStructure",
    "read_structure",
]

#: A progressive JPEG has about ten scans; far more only costs CPU (a known decoder DoS).
MAX_SCANS = 1000
#: zune-jpeg refuses a progressive image past this many scans ("Too many scans, exceeded
#: limit of 100", mcu_prog.rs with the default DecoderOptions): the reference has no hash.
MAX_PROGRESSIVE_SCANS = 100


class _TooManyScans(JpegUnsupportedError):
    """Refused outright, even after complete scans (the reference fails the whole image)."""

    __module__ = "phash_trio.image.jpeg.decoder"


_SOI = b"\xff\xd8"
_EOI = b"\xff\xd9"
_FRAME_CODES = {0xC0: False, 0xC1: False, 0xC2: True}  # SOF code -> progressive
_UNSUPPORTED_FRAMES = {
    0xC3: "lossless",
    0xC5: "hierarchical",
    0xC6: "hierarchical",
    0xC7: "hierarchical lossless",
    0xC9: "arithmetic-coded",
    0xCA: "arithmetic-coded progressive",
    0xCB: "arithmetic-coded lossless",
    0xCD: "hierarchical arithmetic-coded",
    0xCE: "hierarchical arithmetic-coded",
    0xCF: "hierarchical arithmetic-coded lossless",
}
_KEPT_TABLES = {0xC4, 0xDB, 0xDD}  # DHT, DQT, DRI
_MAX_DIMENSION = 65500  # libjpeg's JPEG_MAX_DIMENSION
# The end of entropy-coded data: 0xFF followed by anything but a stuffed zero, RSTn or fill.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


@attrs.frozen
class FrameComponent:
    """One component of the frame header (SOF)."""

    ident: int
    h: int
    """Horizontal sampling factor, 1..4."""
    v: int
    """Vertical sampling factor, 1..4."""
    quant_table: int


@attrs.frozen
class JpegStructure:
    """What the pixel stages need to know about the first image, and the stream to decode."""

    width: int
    height: int
    progressive: bool
    components: tuple[FrameComponent, ...]
    adobe_transform: int | None
    """Colour transform of an Adobe APP14 segment (0 none, 1 YCbCr, 2 YCCK), if present."""
    stream: bytes
    """SOI, tables, frame, scans and EOI of the first image; no APPn/COM segments."""
    complete: bool
    """False when the last scan's data ran to the end of the input without a marker."""

    @property
    def max_h(self) -> int:
        return max(c.h for c in self.components)

    @property
    def max_v(self) -> int:
        return max(c.v for c in self.components)


@attrs.define
class _Walk:
    """Mutable state of one pass over the markers."""

    data: bytes
    max_pixels: int
    pos: int = 2
    parts: list[bytes] = attrs.Factory(lambda: [_SOI])
    frame: tuple[int, int, bool, tuple[FrameComponent, ...]] | None = None
    adobe_transform: int | None = None
    scans: int = 0
    complete: bool = True
    saw_eoi: bool = False
    final_bits: dict[int, set[int]] = attrs.Factory(dict)
    """Per component id, the coefficients some scan has coded down to their last bit."""


def read_structure(data: bytes, *, max_pixels: int) -> JpegStructure:
    """Validate the first image of ``data`` and return its frame and a minimal stream.

    Raises a :class:`~phash_trio.image.jpeg.errors.JpegDecodeError` subclass for anything that is
    not a decodable baseline/progressive Huffman JPEG, or that is larger than ``max_pixels``.
    After the first complete scan, damage in later segments ends the image instead of failing
    it, as lenient decoders (the reference included) show what they have.
    """
    if not data.startswith(_SOI):
        raise JpegFormatError("not a JPEG: the data does not start with an SOI marker")
    walk = _Walk(data=data, max_pixels=max_pixels)
    while _step(walk):
        pass
    if walk.frame is None:
        raise JpegFormatError("JPEG has no frame header (SOF) before its end")
    if walk.scans == 0:
        raise JpegFormatError("JPEG has no image data (no SOS segment)")
    width, height, progressive, components = walk.frame
    if not walk.saw_eoi and any(len(walk.final_bits.get(c.ident, ())) < 64 for c in components):
        raise JpegTruncatedError("JPEG data stops before the scans that complete its image")
    walk.parts.append(_EOI)
    return JpegStructure(
        width=width,
        height=height,
        progressive=progressive,
        components=components,
        adobe_transform=walk.adobe_transform,
        stream=b"".join(walk.parts),
        complete=walk.complete,
    )


def _step(walk: _Walk) -> bool:
    """Handle the next marker; False once the image is over."""
    try:
        return _next_segment(walk)
    except JpegDecodeError as exc:
        if walk.scans == 0 or not walk.complete or isinstance(exc, _TooManyScans):
            raise
        return False  # damage after complete scans: keep what was decoded


def _next_segment(walk: _Walk) -> bool:
    data = walk.data
    start = data.find(b"\xff", walk.pos)  # bytes before it are garbage, skipped like libjpeg
    if start < 0:
        return _end_of_data(walk)
    code_at = start
    while code_at < len(data) and data[code_at] == 0xFF:
        code_at += 1
    if code_at >= len(data):
        return _end_of_data(walk)
    code = data[code_at]
    walk.pos = code_at + 1
    if code == 0xD9:
        walk.saw_eoi = True
        return False
    if code == 0x00 or code == 0x01 or 0xD0 <= code <= 0xD7:
        return True  # stray stuffing, TEM or RSTn outside a scan: no payload
    if code == 0xD8:
        raise JpegFormatError("JPEG has a second SOI marker before the end of its image")
    seg_start = code_at - 1
    body = _segment_body(walk, code)
    if code in _FRAME_CODES:
        _read_frame(walk, code, body)
        walk.parts.append(data[seg_start : walk.pos])
    elif code in _UNSUPPORTED_FRAMES:
        raise JpegUnsupportedError(f"{_UNSUPPORTED_FRAMES[code]} JPEG is not supported")
    elif code == 0xCC:
        raise JpegUnsupportedError("arithmetic-coded JPEG (DAC segment) is not supported")
    elif code == 0xDC:
        raise JpegUnsupportedError("JPEG with a DNL segment is not supported")
    elif code == 0xDA:
        _read_scan(walk, body, data[seg_start : walk.pos])
    elif code in _KEPT_TABLES:
        _TABLE_CHECKS[code](body)
        walk.parts.append(data[seg_start : walk.pos])
    elif code == 0xEE and body[:5] == b"Adobe":
        _read_adobe(walk, body)
    # any other segment (APPn, COM, JPGn, reserved) carries nothing the pixels depend on
    return True


def _end_of_data(walk: _Walk) -> bool:
    if walk.scans == 0:
        raise JpegTruncatedError("JPEG ends before its image data")
    return False  # complete scans but no EOI: decoders accept that


def _segment_body(walk: _Walk, code: int) -> bytes:
    data, at = walk.data, walk.pos
    if at + 2 > len(data):
        raise JpegTruncatedError(f"JPEG ends inside the header of marker 0xFF{code:02X}")
    length = int.from_bytes(data[at : at + 2], "big")
    if length < 2:
        raise JpegFormatError(f"JPEG marker 0xFF{code:02X} has an invalid length {length}")
    end = at + length
    if end > len(data):
        raise JpegTruncatedError(f"JPEG ends inside segment 0xFF{code:02X}")
    walk.pos = end
    return data[at + 2 : end]


def _check_dqt(body: bytes) -> None:
    """libjpeg's get_dqt checks: table slots 0..3, whole 8- or 16-bit tables, exact length."""
    at = 0
    while at < len(body):
        if body[at] & 0x0F > 3:
            raise JpegFormatError(f"JPEG DQT segment defines table {body[at] & 0x0F}")
        at += 1 + (128 if body[at] >> 4 else 64)
    if at != len(body):
        raise JpegFormatError("JPEG DQT segment length does not match its tables")


def _check_dht(body: bytes) -> None:
    """libjpeg's get_dht checks: slots 0..3, at most 256 codes, exact length."""
    at = 0
    while len(body) - at > 16:
        index = body[at]
        count = sum(body[at + 1 : at + 17])
        at += 17
        if count > 256 or count > len(body) - at:
            raise JpegFormatError("JPEG DHT segment has a bad Huffman table")
        at += count
        if (index - 0x10 if index & 0x10 else index) > 3:
            raise JpegFormatError(f"JPEG DHT segment defines table 0x{index:02X}")
    if at != len(body):
        raise JpegFormatError("JPEG DHT segment length does not match its tables")


def _check_dri(body: bytes) -> None:
    if len(body) != 2:
        raise JpegFormatError(f"JPEG has a DRI segment of {len(body)} bytes instead of 2")


# The stream we rebuild goes to libjpeg, which must never fail while reading the header: the
# entry point we call crashes the process then (see coeffs.py). Mirror its header checks.
_TABLE_CHECKS = {0xDB: _check_dqt, 0xC4: _check_dht, 0xDD: _check_dri}


def _read_frame(walk: _Walk, code: int, body: bytes) -> None:
    if walk.frame is not None:
        raise JpegFormatError("JPEG has two frame headers (SOF)")
    if len(body) < 6:
        raise JpegFormatError(f"JPEG frame header is {len(body)} bytes long, too short")
    precision, height, width, count = body[0], _u16(body, 1), _u16(body, 3), body[5]
    if precision != 8:
        raise JpegUnsupportedError(f"{precision}-bit JPEG is not supported, only 8-bit")
    if width == 0:
        raise JpegFormatError("JPEG frame header has a width of 0")
    if width > _MAX_DIMENSION or height > _MAX_DIMENSION:
        raise JpegUnsupportedError(f"JPEG of {width}x{height} exceeds libjpeg's {_MAX_DIMENSION}")
    if height == 0:
        raise JpegUnsupportedError("JPEG with its height in a DNL segment is not supported")
    if count not in (1, 3, 4):
        raise JpegUnsupportedError(f"JPEG with {count} components is not supported")
    if len(body) != 6 + 3 * count:
        raise JpegFormatError(f"JPEG frame header length does not match its {count} components")
    if width * height > walk.max_pixels:
        raise JpegTooLargeError(width, height, walk.max_pixels)
    components = tuple(
        FrameComponent(
            ident=body[6 + 3 * k],
            h=body[7 + 3 * k] >> 4,
            v=body[7 + 3 * k] & 0x0F,
            quant_table=body[8 + 3 * k],
        )
        for k in range(count)
    )
    _check_sampling(components)
    walk.frame = (width, height, _FRAME_CODES[code], components)


def _check_sampling(components: tuple[FrameComponent, ...]) -> None:
    if len({c.ident for c in components}) != len(components):
        raise JpegFormatError("JPEG frame header repeats a component id")
    for c in components:
        if not (1 <= c.h <= 4 and 1 <= c.v <= 4):
            raise JpegFormatError(f"JPEG component {c.ident} has sampling {c.h}x{c.v}")
        if c.quant_table > 3:
            raise JpegFormatError(
                f"JPEG component {c.ident} uses quantisation table {c.quant_table}"
            )
    if len(components) == 1:
        return
    max_h = max(c.h for c in components)
    max_v = max(c.v for c in components)
    if any(max_h % c.h or max_v % c.v for c in components):
        raise JpegUnsupportedError("JPEG with non-integral chroma subsampling is not supported")
    if sum(c.h * c.v for c in components) > 10:
        raise JpegFormatError("JPEG sampling factors make an MCU of more than 10 blocks")


def _read_scan(walk: _Walk, body: bytes, header: bytes) -> None:
    if walk.frame is None:
        raise JpegFormatError("JPEG has a scan (SOS) before its frame header (SOF)")
    count = body[0] if body else 0
    if not 1 <= count <= 4 or len(body) != 4 + 2 * count:
        raise JpegFormatError("JPEG scan header (SOS) is malformed")
    idents = [body[1 + 2 * k] for k in range(count)]
    _check_scan_components(idents, [c.ident for c in walk.frame[3]])
    first, last, point = body[-3], body[-2], body[-1] & 0x0F
    if not walk.frame[2]:
        first, last, point = 0, 63, 0  # sequential scans code every coefficient fully
    for ident in idents:
        if point == 0:
            walk.final_bits.setdefault(ident, set()).update(range(first, min(last, 63) + 1))
    walk.scans += 1
    if walk.frame[2] and walk.scans > MAX_PROGRESSIVE_SCANS:
        raise _TooManyScans(
            f"progressive JPEG has more than {MAX_PROGRESSIVE_SCANS} scans (Too many scans)"
        )
    if walk.scans > MAX_SCANS:
        raise JpegFormatError(f"JPEG has more than {MAX_SCANS} scans")
    data, start = walk.data, walk.pos
    end = _SCAN_END.search(data, start)
    if end is None:
        walk.parts += [header, data[start:]]
        walk.complete = False
        walk.pos = len(data)
        return
    walk.parts += [header, data[start : end.start()]]
    walk.pos = end.start()


def _check_scan_components(idents: list[int], frame_idents: list[int]) -> None:
    """libjpeg-turbo's get_sos lookup, quirk included.

    A scan entry matches frame component ``ci`` only while scan slot ``ci`` (a slot indexed by
    *scan* position) is still empty, so some out-of-order component lists are refused too.
    """
    if any(ident not in frame_idents for ident in idents):
        raise JpegFormatError("JPEG scan refers to a component the frame does not have")
    if len(set(idents)) != len(idents):
        raise JpegFormatError("JPEG scan lists a component twice")
    slots: list[int | None] = [None] * 4
    for position, ident in enumerate(idents):
        match = next(
            (
                ci
                for ci, frame_ident in enumerate(frame_idents[:4])
                if frame_ident == ident and slots[ci] is None
            ),
            None,
        )
        if match is None:
            raise JpegFormatError("JPEG scan lists its components in an order libjpeg refuses")
        slots[position] = match


def _read_adobe(walk: _Walk, body: bytes) -> None:
    if len(body) < 12:
        raise JpegFormatError("JPEG Adobe APP14 segment is too short")
    if body[11] > 2:
        raise JpegFormatError(f"JPEG Adobe APP14 segment has unknown colour transform {body[11]}")
    walk.adobe_transform = body[11]


def _u16(body: bytes, at: int) -> int:
    return int.from_bytes(body[at : at + 2], "big")
