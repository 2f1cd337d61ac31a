"""Decode a JPEG to exactly the pixels of the Rust reference (image 0.25.10 / zune-jpeg 0.5.15).

The mean hash must match hashes computed by Rust ``image_hasher``; libjpeg-based decoders
(Pillow & co.) differ from zune-jpeg by a level or two on some pixels and so flip hash bits on a
few percent of photos. We take the quantised coefficients from libjpeg-turbo (they are the same
in every decoder) and redo zune-jpeg's IDCT, upsampling and colour conversion on them.

Errors (all :class:`JpegDecodeError`, see :mod:`phash_trio.image.jpeg.errors` for the tree):
malformed or non-JPEG data, truncated image data, unsupported codings (12-bit, lossless,
arithmetic, DNL, 2 components) and images above ``max_pixels``. Only the first image of an
MPO is decoded. EXIF orientation and ICC profiles are ignored, as by the reference.

Corrupt image data: where libjpeg substitutes zero for an undecodable Huffman code and goes on,
zune-jpeg stops (see :mod:`phash_trio.image.jpeg.zune_walk`). For baseline single-scan images we find
that point and redo its result: the MCU row it stops in is still output, but its blocks from the
failing one onward hold whatever zune's one-MCU-row buffers held, the previous MCU row's pixels
(zeros in the first row); all output rows after it stay at 128. With vertical chroma
subsampling (4:2:0, 4:4:0) zune holds back the last ``max_v`` rows of each MCU row until the
next one arrives, so those rows stay 128 too; the stale chroma blocks feed the upsampling of
the rows before them exactly as in zune, since we substitute them in the planes first.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .coeffs import Coefficients, read_coefficients
from .errors import (
    JpegDecodeError,
    JpegFormatError,
    JpegTooLargeError,
    JpegTruncatedError,
    JpegUnsupportedError,
)
from .markers import JpegStructure, read_structure
from .pixels import ColourModel, assemble, idct_plane
from .zune_walk import ZuneStop, find_zune_stop

__all__ = [
    "JpegDecodeError",
    "JpegFormatError",
    "JpegTooLargeError",
    "JpegTruncatedError",
    "JpegUnsupportedError",
    "decode_jpeg",
]

# Appended to a scan that runs into the end of the input: if decoding it changes any
# coefficient, the data really stopped early (a complete scan ignores trailing bytes). Varied
# bits, never 0xFF: zero bits could decode as end-of-block codes and hide the truncation.
_PROBE = bytes((i * 167 + 13) % 255 for i in range(4096))


def decode_jpeg(data: bytes, *, max_pixels: int = 50_000_000) -> npt.NDArray[np.uint8]:
    """Pixels of the first image in ``data``: (H, W) uint8 for gray, (H, W, 3) RGB otherwise.

    Raises :class:`JpegDecodeError` (or a subclass) with a one-line message; the size limit is
    checked from the frame header before anything is decoded.
    """
    structure = read_structure(bytes(data), max_pixels=max_pixels)
    coefficients = read_coefficients(structure)
    if not structure.complete:
        _check_scan_was_complete(structure, coefficients)
    stop = find_zune_stop(structure) if coefficients.corrupt else None
    planes = [
        _padded(idct_plane(blocks, quant), structure, index)
        for index, (blocks, quant) in enumerate(
            zip(coefficients.blocks, coefficients.quant, strict=True)
        )
    ]
    ratios = [(structure.max_h // c.h, structure.max_v // c.v) for c in structure.components]
    if stop is not None:
        _keep_stale_blocks(planes, structure, stop)
    pixels = assemble(planes, ratios, structure.width, structure.height, _colour_model(structure))
    if stop is not None:
        pixels[_rows_output(structure, ratios, stop) :] = 128
    return pixels


def _keep_stale_blocks(
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


def _check_scan_was_complete(structure: JpegStructure, coefficients: Coefficients) -> None:
    """Raise JpegTruncatedError unless the last scan, lacking a terminator, had all its data."""
    padded = structure.stream[:-2] + _PROBE + b"\xff\xd9"
    try:
        probe = read_coefficients(structure, padded)
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


def _padded(
    plane: npt.NDArray[np.uint8], structure: JpegStructure, index: int
) -> npt.NDArray[np.uint8]:
    """Extend a component plane to whole MCUs, as zune decodes them.

    libjpeg keeps only the blocks that cover the image; zune upsamples the plane of every
    decoded MCU. The two agree for all common samplings (the chroma of 4:2:0 and 4:2:2 covers
    exactly the MCUs); for exotic ones the missing blocks are approximated by edge replication.
    """
    if len(structure.components) == 1:
        return plane
    component = structure.components[index]
    mcu_cols = -(-structure.width // (8 * structure.max_h))
    mcu_rows = -(-structure.height // (8 * structure.max_v))
    rows, cols = mcu_rows * component.v * 8, mcu_cols * component.h * 8
    if plane.shape == (rows, cols):
        return plane
    return np.pad(plane, ((0, rows - plane.shape[0]), (0, cols - plane.shape[1])), mode="edge")
