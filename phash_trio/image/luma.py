"""image-rs ``to_luma8`` arithmetic: the exact f32 BT.709 luma of 8- and 16-bit RGB, Luma16 -> 8."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "KB",
    "KG",
    "KR",
    "gray16_to_8",
    "luma8_table",
    "luma_from_rgb8",
    "luma_from_rgb16",
    "luma_tables",
]

U8Array = npt.NDArray[np.uint8]
F32 = np.float32


def f32_bits(bits: int) -> np.float32:
    return F32(np.frombuffer(bits.to_bytes(4, "little"), dtype="<f4")[0])


# BT.709 Y row derived by moxcms, as image >= 0.25.7 uses (not the rounded 0.2126/0.7152/0.0722).
KR = f32_bits(0x3E59C05B)
KG = f32_bits(0x3F3715FC)
KB = f32_bits(0x3D93CF75)
_CHUNK = 1 << 18  # pixels per block: keeps the f32 temporaries in cache


@functools.cache
def luma_tables(depth: int) -> tuple[npt.NDArray[np.float32], ...]:
    """``(v as f32 * (1/max)) * k`` for every sample value: the same f32 ops, done once."""
    top = (1 << depth) - 1
    scale = F32(1.0) / F32(top)
    values = np.arange(top + 1, dtype=F32) * scale
    return tuple((values * k).astype(F32) for k in (KR, KG, KB))


@functools.cache
def luma8_table() -> U8Array:
    """``to_luma8`` of every 8-bit colour, indexed by ``r | g << 8 | b << 16`` (16 MiB).

    Built from the same f32 operations (9 ms, once); one table lookup per pixel then beats
    redoing the float arithmetic on every pixel of a photo by 3x. Rounding half away from zero
    is ``floor(x + 0.5)``, here in f32 with truncation: a test compares all 2**24 entries
    with an f64 rounding to prove that is exact (and that nothing exceeds 255).
    """
    tr, tg, tb = luma_tables(8)
    planes = np.empty((256, 256 * 256), dtype=np.uint8)
    red_green = (tr[None, :] + tg[:, None]).reshape(-1)  # [g, r] -> pr + pg
    for blue in range(256):
        total = red_green + tb[blue]
        total *= F32(255.0)
        total += F32(0.5)
        planes[blue] = total
    table: U8Array = planes.reshape(-1)
    table.setflags(write=False)
    return table


def luma_from_rgb8(rgb: U8Array) -> U8Array:
    """image-rs ``to_luma8`` of an 8-bit ``(H, W, >=3)`` RGB(A) array (alpha ignored)."""
    table = luma8_table()
    height, width, channels = rgb.shape
    flat = rgb.reshape(-1, channels)
    out = np.empty(flat.shape[0], dtype=np.uint8)
    words = np.zeros((min(flat.shape[0], _CHUNK), 4), dtype=np.uint8)
    for start in range(0, flat.shape[0], _CHUNK):
        part = flat[start : start + _CHUNK, :3]
        packed = words[: part.shape[0]]
        for channel in range(3):  # column by column: a (n, 3) block copy is 3x slower
            packed[:, channel] = part[:, channel]
        np.take(table, packed.view("<u4").reshape(-1), out=out[start : start + part.shape[0]])
    return out.reshape(height, width)


def luma_from_rgb16(rgb: npt.NDArray[np.integer[Any]]) -> U8Array:
    """image-rs ``to_luma8`` of a 16-bit ``(H, W, >=3)`` RGB(A) array (alpha ignored).

    ``((0 + r*kr) + g*kg) + b*kb`` in f32 with ``c as f32 * (1/65535)``, then
    ``(l * 255).round()`` (half away from zero, in f64 so that ``+ 0.5`` is exact), saturated.
    """
    tr, tg, tb = luma_tables(16)
    total: npt.NDArray[np.float32] = tr.take(rgb[..., 0])  # take: 3x faster than indexing
    total += tg.take(rgb[..., 1])
    total += tb.take(rgb[..., 2])
    total *= F32(255.0)
    wide = total.astype(np.float64)
    wide += 0.5
    np.floor(wide, out=wide)
    np.clip(wide, 0.0, 255.0, out=wide)
    out: U8Array = wide.astype(np.uint8)
    return out


def gray16_to_8(gray: npt.NDArray[Any]) -> U8Array:
    """Luma16 -> Luma8 is ``(v + 128) / 257`` in integers."""
    return ((gray.astype(np.uint32) + 128) // 257).astype(np.uint8)
