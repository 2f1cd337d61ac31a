"""Decode a JPEG to exactly the pixels of the Rust reference (image 0.25.10 / zune-jpeg 0.5.15).

The mean hash must match hashes computed by Rust ``image_hasher``; libjpeg-based decoders
(Pillow & co.) differ from zune-jpeg by a level or two on some pixels and so flip hash bits on a
few percent of photos. The quantised coefficients (the same in every decoder, on intact data)
come from the compiled core (:mod:`phash_trio.image.hashcore`): a port of zune's own baseline
entropy decoder, a progressive decoder, or libjpeg-turbo for the rest (see
:mod:`phash_trio.image.jpeg.coeffs`); zune-jpeg's IDCT, upsampling and colour conversion are
redone on them there too (:mod:`.pixels` is the numpy model of those stages, the tests' oracle).

``want="gray"`` (the default) goes straight to image-rs ``to_luma8`` per row, never holding the
RGB image; ``want="rgb"`` returns (H, W, 3) RGB8 (gray JPEGs replicated), e.g. for PDQ.

Errors (all :class:`JpegDecodeError`, see :mod:`phash_trio.image.jpeg.errors` for the tree):
malformed or non-JPEG data, truncated image data, unsupported codings (12-bit, lossless,
arithmetic, DNL, 2 components), more than 100 progressive scans, and images above
``max_pixels`` or needing more than ``max_memory`` bytes. Only the first image of an
MPO / Ultra HDR file is decoded. EXIF orientation and ICC profiles are ignored, as by the
reference.

Corrupt image data: where libjpeg substitutes zero for an undecodable Huffman code and goes on,
zune-jpeg stops. For baseline single-scan images the zune port stops at the same point (its
Python model is :mod:`phash_trio.image.jpeg.zune_walk`) and we redo zune's result: the MCU row
it stops in is still output, but its blocks from the failing one onward hold whatever zune's
one-MCU-row buffers held, the previous MCU row's pixels (zeros in the first row); all output
rows after it stay at 128. With vertical chroma
subsampling (4:2:0, 4:4:0) zune holds back the last ``max_v`` rows of each MCU row until the
next one arrives, so those rows stay 128 too; the stale chroma blocks feed the upsampling of
the rows before them exactly as in zune, since we substitute them in the planes first.
"""

from __future__ import annotations

from typing import Literal

import attrs
import numpy as np
import numpy.typing as npt

from phash_trio.image import hashcore

from .coeffs import (
    DEFAULT_MAX_MEMORY,
    read_baseline,
    read_coefficients,
    read_planes,
    read_progressive,
)
from .errors import (
    JpegDecodeError,
    JpegFormatError,
    JpegTooLargeError,
    JpegTruncatedError,
    JpegUnsupportedError,
)
from .markers import JpegStructure, read_structure
from .pixels import ColourModel
from .zune_walk import ZuneStop

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "JpegDecodeError",
    "JpegFormatError",
    "JpegTooLargeError",
    "JpegTruncatedError",
    "JpegUnsupportedError",
    "decode_jpeg",
    "decode_jpeg_pdq",
    "keep_stale_blocks",
]

_MODELS = {
    ColourModel.LUMA: hashcore.MODEL_LUMA,
    ColourModel.YCBCR: hashcore.MODEL_YCBCR,
    ColourModel.RGB: hashcore.MODEL_RGB,
    ColourModel.CMYK: hashcore.MODEL_CMYK,
    ColourModel.YCCK: hashcore.MODEL_YCCK,
}
_WANTS = {"gray": hashcore.WANT_GRAY, "rgb": hashcore.WANT_RGB}

# Appended to a scan that runs into the end of the input: if decoding it changes any
# coefficient, the data really stopped early (a complete scan ignores trailing bytes). Varied
# bits, never 0xFF: zero bits could decode as end-of-block codes and hide the truncation.
_PROBE = bytes((i * 167 + 13) % 255 for i in range(4096))


def decode_jpeg(
    data: bytes,
    *,
    max_pixels: int = 50_000_000,
    want: Literal["gray", "rgb"] = "gray",
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> npt.NDArray[np.uint8]:
    """Pixels of the first image in ``data``: (H, W) luma8, or (H, W, 3) RGB8 with ``want="rgb"``.

    Raises :class:`JpegDecodeError` (or a subclass) with a one-line message; the pixel and
    memory limits are checked from the frame header before anything large is allocated.
    Thread-safe; the GIL is released while decoding.
    """
    if want not in _WANTS:
        raise ValueError(f"want must be 'gray' or 'rgb', not {want!r}")
    channels = 3 if want == "rgb" else 1
    ready = _prepare(bytes(data), max_pixels, channels, max_memory)
    raw = hashcore.assemble(ready.sources, ready.width, ready.height, ready.model, _WANTS[want])
    shape = (ready.height, ready.width, 3) if want == "rgb" else (ready.height, ready.width)
    pixels = np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    pixels[ready.fill_row :] = 128
    return pixels


def decode_jpeg_pdq(
    data: bytes, *, max_pixels: int = 50_000_000, max_memory: int = DEFAULT_MAX_MEMORY
) -> tuple[npt.NDArray[np.uint8], bytes, int]:
    """The luma8 image of :func:`decode_jpeg` and the PDQ (32 bytes, quality) of its RGB8
    image, from one pass over the decoded planes: the RGB image is never held."""
    ready = _prepare(bytes(data), max_pixels, 1, max_memory, pdq=True)
    raw, pdq, quality = hashcore.assemble_pdq(
        ready.sources, ready.width, ready.height, ready.model, ready.fill_row
    )
    gray = np.frombuffer(raw, dtype=np.uint8).reshape(ready.height, ready.width)
    return gray, pdq, quality


@attrs.frozen
class _Ready:
    """Everything the compiled core's assembly needs, and where zune stopped writing rows."""

    width: int
    height: int
    sources: list[tuple[npt.NDArray[np.uint8], int, int, int, int]]
    model: int
    fill_row: int


def _prepare(
    data: bytes, max_pixels: int, channels: int, max_memory: int, *, pdq: bool = False
) -> _Ready:
    structure = read_structure(data, max_pixels=max_pixels)
    output = structure.width * structure.height * channels
    if pdq:
        output += hashcore.pdq_stream_bytes(structure.width, structure.height)
    budget = max_memory - output
    if budget <= 0:
        raise JpegTooLargeError(
            structure.width,
            structure.height,
            max_pixels,
            reason=f"JPEG output alone needs more than the {max_memory >> 20} MB memory limit",
        )
    if not structure.complete:
        _check_scan_was_complete(structure, budget)
    planes, stop = _planes(structure, budget)
    ratios = [(structure.max_h // c.h, structure.max_v // c.v) for c in structure.components]
    fill_row = structure.height
    if stop is not None:
        keep_stale_blocks(planes, structure, stop)
        fill_row = min(fill_row, _rows_output(structure, ratios, stop))
    sources = [
        (plane, plane.shape[0], plane.shape[1], rh, rv)
        for plane, (rh, rv) in zip(planes, ratios, strict=True)
    ]
    model = _MODELS[_colour_model(structure)]
    return _Ready(structure.width, structure.height, sources, model, fill_row)


def _planes(
    structure: JpegStructure, max_memory: int
) -> tuple[list[npt.NDArray[np.uint8]], ZuneStop | None]:
    """Padded planes from our compiled decoders where they apply, else from libjpeg's."""
    if structure.progressive:
        progressive = read_progressive(structure, max_memory=max_memory)
        if progressive is not None:
            return list(progressive), None
    else:
        baseline = read_baseline(structure, max_memory=max_memory)
        if baseline is not None:
            return list(baseline.planes), baseline.stop
    return list(read_planes(structure, max_memory=max_memory).planes), None


def keep_stale_blocks(
    planes: list[npt.NDArray[np.uint8]], structure: JpegStructure, stop: ZuneStop
) -> None:
    """Blocks zune did not decode in the MCU row it stopped in show its buffers' old pixels.

    zune decodes each MCU row into per-component buffers one MCU row tall, never cleared: a
    block it did not reach still holds the block at the same place one MCU row up, or 0.
    """
    single = len(structure.components) == 1
    first = 0  # index in the MCU of each component's first block
    for plane, component in zip(planes, structure.components, strict=True):
        h, v = (1, 1) if single else (component.h, component.v)
        top, height = stop.row * 8 * v, 8 * v
        for index in range(h * v):
            if first + index >= stop.block:
                y, x = divmod(index, h)
                _stale(plane, (top + 8 * y, 8), ((stop.col * h + x) * 8, 8), height)
        _stale(plane, (top, height), ((stop.col + 1) * h * 8, plane.shape[1]), height)
        first += h * v


def _stale(
    plane: npt.NDArray[np.uint8], rows: tuple[int, int], columns: tuple[int, int], up: int
) -> None:
    """Replace the (start, count) ``rows`` and ``columns`` by the pixels ``up`` rows up, or 0."""
    (top, count), (left, width) = rows, columns
    target = plane[top : top + count, left : left + width]
    if top >= up:
        target[...] = plane[top - up : top - up + count, left : left + width]
    else:
        target[...] = 0


def _rows_output(structure: JpegStructure, ratios: list[tuple[int, int]], stop: ZuneStop) -> int:
    """How many image rows zune wrote before stopping; the rest of its buffer stays 128."""
    if len(structure.components) == 1:
        return (stop.row + 1) * 8
    mcu_height = 8 * structure.max_v
    rows = (stop.row + 1) * mcu_height
    last_row = -(-structure.height // mcu_height) - 1
    if stop.row < last_row and any(ratio in {(1, 2), (2, 2)} for ratio in ratios):
        rows -= structure.max_v  # held back until the next MCU row's chroma arrives
    return rows


def _check_scan_was_complete(structure: JpegStructure, max_memory: int) -> None:
    """Raise JpegTruncatedError unless the last scan, lacking a terminator, had all its data."""
    coefficients = read_coefficients(structure, max_memory=max_memory)
    padded = structure.stream[:-2] + _PROBE + b"\xff\xd9"
    try:
        probe = read_coefficients(structure, padded, max_memory=max_memory)
    except JpegFormatError as exc:
        raise JpegTruncatedError("JPEG image data is truncated") from exc
    pairs = zip(coefficients.blocks, probe.blocks, strict=True)
    if any(not np.array_equal(original, extended) for original, extended in pairs):
        raise JpegTruncatedError("JPEG image data is truncated")


def _colour_model(structure: JpegStructure) -> ColourModel:
    """zune-jpeg's choice: component count first, then the Adobe APP14 transform."""
    count = len(structure.components)
    if count == 1:
        return ColourModel.LUMA
    if count == 3:
        return ColourModel.RGB if structure.adobe_transform == 0 else ColourModel.YCBCR
    return ColourModel.YCCK if structure.adobe_transform == 2 else ColourModel.CMYK
