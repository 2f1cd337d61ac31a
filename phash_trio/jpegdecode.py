"""Decode a JPEG to exactly the pixels of the Rust reference (image 0.25.10 / zune-jpeg 0.5.15).

The mean hash must match hashes computed by Rust ``image_hasher``; libjpeg-based decoders
(Pillow & co.) differ from zune-jpeg by a level or two on some pixels and so flip hash bits on a
few percent of photos. We take the quantised coefficients from libjpeg-turbo (they are the same
in every decoder) and redo zune-jpeg's IDCT, upsampling and colour conversion on them.

Errors (all :class:`JpegDecodeError`, see :mod:`phash_trio._jpeg_errors` for the tree):
malformed or non-JPEG data, truncated image data, unsupported codings (12-bit, lossless,
arithmetic, DNL, 2 components) and images above ``max_pixels``. Only the first image of an
MPO is decoded. EXIF orientation and ICC profiles are ignored, as by the reference.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ._jpeg_coeffs import Coefficients, read_coefficients
from ._jpeg_errors import (
    JpegDecodeError,
    JpegFormatError,
    JpegTooLargeError,
    JpegTruncatedError,
    JpegUnsupportedError,
)
from ._jpeg_markers import JpegStructure, read_structure
from ._jpeg_pixels import ColourModel, assemble, idct_plane

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
    planes = [
        _padded(idct_plane(blocks, quant), structure, index)
        for index, (blocks, quant) in enumerate(
            zip(coefficients.blocks, coefficients.quant, strict=True)
        )
    ]
    ratios = [(structure.max_h // c.h, structure.max_v // c.v) for c in structure.components]
    return assemble(planes, ratios, structure.width, structure.height, _colour_model(structure))


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
