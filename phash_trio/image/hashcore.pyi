"""Type stub of the compiled core (phash_trio/image/hashcore.c)."""

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np

# Anything with the buffer protocol; numpy arrays are not typed as Buffer before Python 3.12.
Buffer: TypeAlias = bytes | bytearray | memoryview | np.ndarray[Any, Any]

class JpegLibError(Exception): ...
class MemoryLimitError(Exception): ...

MODEL_LUMA: int
MODEL_YCBCR: int
MODEL_RGB: int
MODEL_CMYK: int
MODEL_YCCK: int
WANT_GRAY: int
WANT_RGB: int
PDQ_MAX_STREAM_BYTES: int
MODE_PLANES: int
MODE_COEFS: int
JPEG_LIB_VERSION: int
LIBJPEG_TURBO_VERSION_NUMBER: int

def decode_planes(
    data: Buffer, max_memory: int, mode: int = ..., /
) -> tuple[int, int, list[tuple[int, int, int, int, bytearray, bytes]], bool]: ...
def decode_baseline(
    data: Buffer, max_memory: int, /
) -> (
    tuple[int, int, list[tuple[int, int, int, int, bytearray, bytes]], tuple[int, int, int] | None]
    | None
): ...
def decode_progressive(
    data: Buffer, max_memory: int, /
) -> tuple[int, int, list[tuple[int, int, int, int, bytearray, bytes]], None] | None: ...
def assemble(
    planes: Sequence[tuple[Buffer, int, int, int, int]],
    width: int,
    height: int,
    model: int,
    want: int,
    /,
) -> bytearray: ...
def assemble_pdq(
    planes: Sequence[tuple[Buffer, int, int, int, int]],
    width: int,
    height: int,
    model: int,
    fill_row: int,
    /,
) -> tuple[bytearray, bytes, int]: ...
def pdq_stream_bytes(width: int, height: int, /) -> int: ...
def pdq_rgb(rgb: Buffer, width: int, height: int, /) -> tuple[bytes, int]: ...
def luma(rgb: Buffer, /) -> bytearray: ...
def idct(blocks: Buffer, /) -> bytearray: ...
def resize_gray(
    gray: Buffer, width: int, height: int, out_width: int, out_height: int, /
) -> bytearray: ...
def mean_hash(gray: Buffer, width: int, height: int, /) -> int: ...
