"""Read the quantised DCT coefficients of a JPEG with libjpeg-turbo, as bundled by jpeglib.

Entropy decoding (Huffman, progressive refinement, restart markers) is the one JPEG stage that
cannot be vectorised with numpy, and the coefficients it yields are the same whatever decoder
produces them. We call the ``read_jpeg_dct`` entry point of jpeglib's libjpeg-turbo 2.1 build
directly through ctypes rather than ``jpeglib.read_dct``: that high-level path entropy-decodes
every file twice, leaks a temporary file and prints to stdout when libjpeg fails, and shares
marker buffers between threads. The library handle is ours (not jpeglib's global version
switch), the input is handed over through an in-memory file where the OS offers one, and a lock
serialises the calls.

Beware: ``read_jpeg_dct`` crashes the process (it closes an uninitialised ``FILE *``) when
libjpeg rejects the *header*; errors in the image data are caught cleanly. The stream we pass
is rebuilt by :mod:`phash_trio.image.jpeg.markers`, which applies libjpeg's header checks first.
``read_jpeg_info`` would check safely but entropy-decodes the whole image and warns on stderr.
Buffers are sized with libjpeg's own formula (``jdinput.c``: ``ceil(W * h / (max_h * 8))``).

libjpeg reports damaged image data ("Corrupt JPEG data: ...") only as a warning on C's
``stderr``, which we point at an in-memory stream during the call: the flag tells the caller
that the reference decoder may have stopped early, and fd 2 stays clean.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs
import numpy as np
import numpy.typing as npt

from .errors import JpegFormatError
from .markers import JpegStructure

__all__ = ["Coefficients", "block_dims", "read_coefficients"]

_LIBRARY_VERSION = "turbo210"
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_CORRUPT_WARNING = b"Corrupt JPEG data"
_CAPTURE_LIMIT = 4096  # libjpeg prints its first warning only; never keep more than this


@attrs.frozen
class _Stdio:
    """C stdio's ``stderr`` variable and the libc calls that redirect it."""

    stderr: ctypes.c_void_p
    open_memstream: ctypes._NamedFuncPointer | None
    """None where libc lacks it: warnings then go to a ``FILE *`` on /dev/null, unread."""
    fclose: ctypes._NamedFuncPointer
    free: ctypes._NamedFuncPointer
    devnull: int


#: Set on first use; ``()`` where C's ``stderr`` cannot be redirected at all.
_stdio: _Stdio | tuple[()] | None = None

_short_p = ctypes.POINTER(ctypes.c_short)
_ushort_p = ctypes.POINTER(ctypes.c_ushort)


@attrs.frozen(eq=False)
class Coefficients:
    """Quantised coefficients and quantisation tables, one entry per frame component."""

    blocks: tuple[npt.NDArray[np.int16], ...]
    """Per component, shape (block_rows, block_cols, 64), coefficients in natural order."""
    quant: tuple[npt.NDArray[np.uint16], ...]
    """Per component, the 64 quantisation steps in natural order."""
    corrupt: bool = False
    """libjpeg warned of corrupt image data (and substituted or skipped some of it)."""


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


def read_coefficients(structure: JpegStructure, stream: bytes | None = None) -> Coefficients:
    """Entropy-decode ``stream`` (default: the structure's own) into coefficient arrays.

    ``stream`` must carry the same frame header as ``structure``: the buffers handed to C are
    sized from it. Thread-safe; the GIL is released while libjpeg works.
    """
    data = structure.stream if stream is None else stream
    dims = block_dims(structure)
    blocks = [np.zeros((rows, cols, 64), dtype=np.int16) for rows, cols in dims]
    pointers: list[ctypes._Pointer[ctypes.c_short] | None] = [
        b.ctypes.data_as(_short_p) for b in blocks
    ]
    pointers += [None] * (4 - len(pointers))
    quant = np.zeros((4, 64), dtype=np.uint16)
    table_of = np.full(4, -1, dtype=np.int16)
    with _lock, _file_holding(data) as path, _c_stderr_captured() as warnings:
        status = _lib().read_jpeg_dct(
            os.fsencode(path),
            *pointers,
            quant.ctypes.data_as(_ushort_p),
            table_of.ctypes.data_as(_short_p),
        )
    if status == 0:
        raise JpegFormatError("libjpeg could not decode the JPEG's coefficients")
    tables = []
    for k in range(len(blocks)):
        slot = int(table_of[k])
        if not 0 <= slot < 4:
            raise JpegFormatError(f"JPEG component {k} has no quantisation table")
        tables.append(quant[slot].copy())
    corrupt = _CORRUPT_WARNING in bytes(warnings)
    return Coefficients(blocks=tuple(blocks), quant=tuple(tables), corrupt=corrupt)


def _lib() -> ctypes.CDLL:
    global _library
    if _library is None:
        import jpeglib.cjpeglib as package

        directory = Path(next(iter(package.__path__)))
        pattern = re.compile(rf"cjpeglib_{_LIBRARY_VERSION}(\..*)?\.(so|dll|pyd)")
        found = [p for p in directory.iterdir() if pattern.fullmatch(p.name)]
        if len(found) != 1:
            raise RuntimeError(f"jpeglib's {_LIBRARY_VERSION} library not found in {directory}")
        library = ctypes.CDLL(str(found[0]))
        function = library.read_jpeg_dct
        function.argtypes = [ctypes.c_char_p, *[_short_p] * 4, _ushort_p, _short_p]
        function.restype = ctypes.c_int
        _library = library
    return _library


def _open_stdio() -> _Stdio | tuple[()]:
    try:
        libc = ctypes.CDLL(None)
        fopen, fclose, free = libc.fopen, libc.fclose, libc.free
    except (OSError, AttributeError):
        return ()
    fopen.restype = ctypes.c_void_p
    fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    fclose.argtypes = [ctypes.c_void_p]
    free.argtypes = [ctypes.c_void_p]
    open_memstream = getattr(libc, "open_memstream", None)
    if open_memstream is not None:
        open_memstream.restype = ctypes.c_void_p
        open_memstream.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_size_t),
        ]
    for name in ("stderr", "__stderrp"):  # glibc/musl, BSD/macOS
        try:
            variable = ctypes.c_void_p.in_dll(libc, name)
        except ValueError:
            continue
        devnull = fopen(os.fsencode(os.devnull), b"w")
        if not devnull:
            return ()
        return _Stdio(variable, open_memstream, fclose, free, devnull)
    return ()


@contextlib.contextmanager
def _c_stderr_captured() -> Iterator[bytearray]:
    """Point C stdio's ``stderr`` at memory meanwhile; the text lands in the yielded buffer.

    Call with ``_lock`` held. libjpeg prints warnings such as "Corrupt JPEG data: premature
    end of data segment" with ``fprintf(stderr, ...)``: on the service's fd 2 they would break
    JSON log lines. Python writes fd 2 directly, so its output is unaffected. Where libc has no
    ``open_memstream`` the text goes to /dev/null and the buffer stays empty.
    """
    global _stdio
    if _stdio is None:
        _stdio = _open_stdio()
    captured = bytearray()
    if not _stdio:
        yield captured
        return
    stdio = _stdio
    buffer, size = ctypes.c_void_p(), ctypes.c_size_t()
    memory = None
    if stdio.open_memstream is not None:
        memory = stdio.open_memstream(ctypes.byref(buffer), ctypes.byref(size))
    saved = stdio.stderr.value
    stdio.stderr.value = memory or stdio.devnull
    try:
        yield captured
    finally:
        stdio.stderr.value = saved
        if memory:
            stdio.fclose(memory)  # flushes; buffer and size are valid from here on
            if buffer.value:
                captured += ctypes.string_at(buffer.value, min(size.value, _CAPTURE_LIMIT))
                stdio.free(buffer)


@contextlib.contextmanager
def _file_holding(data: bytes) -> Iterator[str]:
    """A path libjpeg can fopen() that reads ``data``; in memory where the OS allows."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("phash-jpeg", os.MFD_CLOEXEC)
        try:
            _write_all(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    handle, path = tempfile.mkstemp(suffix=".jpg", prefix="phash-")
    try:
        _write_all(handle, data)
        os.close(handle)
        handle = -1
        yield path
    finally:
        if handle >= 0:
            os.close(handle)
        os.unlink(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
