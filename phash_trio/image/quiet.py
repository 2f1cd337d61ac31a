"""Keep library noise off the terminal: fd 2 and Python warnings silenced around a decode.

libtiff and friends write straight to file descriptor 2 ("TIFFFillTile: ...", "Using code not
yet in table."), and Pillow issues Python warnings for odd files; ``phash-trio hash`` promises
one line per failed file and nothing else. :func:`quiet_stderr` points fd 2 at a temporary file
for the duration and hands back what was written (the hash workers of the service do the same
for their whole life, see :mod:`phash_trio.image.pool`). Process-wide: use it only where no
other thread writes to stderr meanwhile (the CLI).
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["quiet_stderr"]


@contextmanager
def quiet_stderr() -> Iterator[list[str]]:
    """Silence fd 2 and warnings inside the block; the list gets what was written, at exit."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read(64 << 10).decode("utf-8", "replace").strip()
            if text:
                captured.append(text)
