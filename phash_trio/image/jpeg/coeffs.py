"""Entropy decoding in the compiled core: zune's baseline decoder, our progressive one, libjpeg.

Single-scan baseline images go through the port of zune-jpeg's own decoder
(:func:`read_baseline`), intact progressive ones through the compiled progressive decoder
(:func:`read_progressive`, libjpeg's algorithm and results, faster); everything else, and any
progressive file that decoder finds unusual, through libjpeg-turbo as described below.

The quantised DCT coefficients are the same whatever decoder produces them, so libjpeg-turbo
(the system's, through ``jpeglib.h``) reads them; :mod:`phash_trio.image.hashcore` calls
``jpeg_read_coefficients`` on a ``jpeg_mem_src`` with a setjmp/longjmp ``error_exit`` (a
rejected header or image is an exception, never a dead process), an ``emit_message`` hook
that records libjpeg's "Corrupt JPEG data" warnings (nothing is written to stderr), one
decompress object per call (threads decode in parallel; the GIL is released meanwhile) and
``max_memory_to_use`` plus our own estimate checked before anything large is allocated.

:func:`read_planes` goes on to zune-jpeg's IDCT in C and returns the padded component planes;
:func:`read_coefficients` returns the raw coefficients (for the truncation probe and tests).
"""

from __future__ import annotations

import attrs
import numpy as np
import numpy.typing as npt

from phash_trio.image import hashcore

from .errors import JpegFormatError, JpegTooLargeError, JpegTruncatedError
from .markers import JpegStructure
from .zune_walk import ZuneStop

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "BaselinePlanes",
    "Coefficients",
    "Planes",
    "block_dims",
    "read_baseline",
    "read_coefficients",
    "read_planes",
    "read_progressive",
]

#: Bytes one decode may allocate (coefficients, planes, output); issue 9 allows 400 MB a worker.
DEFAULT_MAX_MEMORY = 320 << 20


@attrs.frozen(eq=False)
class Coefficients:
    """Quantised coefficients and quantisation tables, one entry per frame component."""

    blocks: tuple[npt.NDArray[np.int16], ...]
    """Per component, shape (block_rows, block_cols, 64), coefficients in natural order."""
    quant: tuple[npt.NDArray[np.uint16], ...]
    """Per component, the 64 quantisation steps in natural order."""
    corrupt: bool = False
    """libjpeg warned of corrupt image data (and substituted or skipped some of it)."""


@attrs.frozen(eq=False)
class Planes:
    """zune's IDCT output per component, padded to whole MCUs (edges replicated)."""

    planes: tuple[npt.NDArray[np.uint8], ...]
    corrupt: bool


@attrs.frozen(eq=False)
class BaselinePlanes:
    """zune's IDCT output of every MCU, and where zune's entropy decoder stopped (if it did)."""

    planes: tuple[npt.NDArray[np.uint8], ...]
    """Writable, one per component, padded to whole MCUs."""
    stop: ZuneStop | None


def read_progressive(
    structure: JpegStructure, *, max_memory: int = DEFAULT_MAX_MEMORY
) -> tuple[npt.NDArray[np.uint8], ...] | None:
    """Padded planes of a progressive image from the compiled progressive decoder.

    None when the file is unusual in any way (a bad code, a missing table, a lost restart
    marker...): the caller then uses libjpeg (:func:`read_planes`), as for damaged files before.
    """
    try:
        decoded = hashcore.decode_progressive(structure.stream, max_memory)
    except hashcore.MemoryLimitError as exc:
        raise JpegTooLargeError(
            structure.width, structure.height, 0, reason=f"JPEG {exc}"
        ) from None
    if decoded is None:
        return None
    width, height, parts, _ = decoded
    if (width, height) != (structure.width, structure.height):
        raise JpegFormatError("the progressive decoder read a different frame")
    return tuple(
        np.frombuffer(buffer, dtype=np.uint8).reshape(rows, cols)
        for _, _, rows, cols, buffer, _ in parts
    )


def read_baseline(
    structure: JpegStructure, *, max_memory: int = DEFAULT_MAX_MEMORY
) -> BaselinePlanes | None:
    """Decode a single-scan baseline image with the port of zune's own entropy decoder.

    None when the image is outside what that port models (progressive, several scans, ...):
    the caller then uses :func:`read_planes`. Raises JpegTruncatedError where zune runs out
    of data at a restart marker ("Exhausted data in the image").
    """
    try:
        decoded = hashcore.decode_baseline(structure.stream, max_memory)
    except hashcore.MemoryLimitError as exc:
        raise JpegTooLargeError(
            structure.width, structure.height, 0, reason=f"JPEG {exc}"
        ) from None
    except hashcore.JpegLibError as exc:
        raise JpegTruncatedError(f"JPEG: {exc}") from None
    if decoded is None:
        return None
    width, height, parts, stop = decoded
    if (width, height) != (structure.width, structure.height):
        raise JpegFormatError("the baseline decoder read a different frame")
    planes = tuple(
        np.frombuffer(buffer, dtype=np.uint8).reshape(rows, cols)
        for _, _, rows, cols, buffer, _ in parts
    )
    return BaselinePlanes(planes=planes, stop=None if stop is None else ZuneStop(*stop))


def block_dims(structure: JpegStructure) -> list[tuple[int, int]]:
    """(rows, cols) of coded blocks per component, as libjpeg sizes its coefficient arrays."""
    max_h, max_v = structure.max_h, structure.max_v
    return [
        (
            -(-structure.height * c.v // (max_v * 8)),
            -(-structure.width * c.h // (max_h * 8)),
        )
        for c in structure.components
    ]


def read_coefficients(
    structure: JpegStructure,
    stream: bytes | None = None,
    *,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> Coefficients:
    """Entropy-decode ``stream`` (default: the structure's own) into coefficient arrays."""
    data = structure.stream if stream is None else stream
    parts, corrupt = _decode(structure, data, max_memory, hashcore.MODE_COEFS)
    blocks = tuple(
        np.frombuffer(buffer, dtype=np.int16).reshape(rows, cols, 64)
        for _, _, rows, cols, buffer, _ in parts
    )
    quant = tuple(np.frombuffer(q, dtype=np.uint16) for *_, q in parts)
    return Coefficients(blocks=blocks, quant=quant, corrupt=corrupt)


def read_planes(structure: JpegStructure, *, max_memory: int = DEFAULT_MAX_MEMORY) -> Planes:
    """Entropy-decode and inverse-transform the structure's stream into padded planes."""
    parts, corrupt = _decode(structure, structure.stream, max_memory, hashcore.MODE_PLANES)
    planes = tuple(
        np.frombuffer(buffer, dtype=np.uint8).reshape(rows, cols)
        for _, _, rows, cols, buffer, _ in parts
    )
    return Planes(planes=planes, corrupt=corrupt)


def _decode(
    structure: JpegStructure, data: bytes, max_memory: int, mode: int
) -> tuple[list[tuple[int, int, int, int, bytearray, bytes]], bool]:
    try:
        width, height, parts, corrupt = hashcore.decode_planes(data, max_memory, mode)
    except hashcore.MemoryLimitError as exc:
        raise JpegTooLargeError(
            structure.width, structure.height, 0, reason=f"JPEG {exc}"
        ) from None
    except hashcore.JpegLibError as exc:
        raise JpegFormatError(f"libjpeg: {exc}") from None
    sampling = [(c.h, c.v) for c in structure.components]
    if (width, height) != (structure.width, structure.height) or [
        (h, v) for h, v, *_ in parts
    ] != sampling:
        raise JpegFormatError("libjpeg read a different frame than the JPEG's first image")
    return parts, corrupt
