"""zune-jpeg 0.5's pixel stages, bit for bit, vectorised with numpy.

The reference (image 0.25.10) decodes JPEG with zune-jpeg, whose three pixel stages differ
from libjpeg's, so the hash of a libjpeg decode is off by a few bits on some photos:

* IDCT: stb_image's integer IDCT (columns then rows, 12-bit constants, rounding constants 512
  and ``512 + 65536 + (128 << 17)``, shifts 10 and 17, clamp to 0..255); a block whose 63 AC
  coefficients are zero is ``(dc + 4 + 1024) >> 3`` clamped. The AVX2 version zune picks at run
  time does the same 32-bit arithmetic, so one model covers both.
* Chroma upsampling, on the whole padded plane (every MCU decoded, edges replicated): 2x
  vertical is ``(3 * near + far + 2) >> 2`` with the row above/below, 2x horizontal the same
  with the left/right sample, vertical first then horizontal for 4:2:0, rounding after each
  pass. The first and last output columns copy the input; for rows shorter than 18 samples
  zune's scalar fallback weights the next-to-last output the wrong way round, kept here. Any
  other ratio is nearest-neighbour replication.
* Colour: YCbCr to RGB in 14-bit fixed point (``y * 16384 + 8191``; 22970, -11700, -5638,
  29032; ``>> 14``; clamp); CMYK and YCCK through ``t = a * k + 128; (t + (t >> 8)) >> 8``.
"""

from __future__ import annotations

import enum

import numpy as np
import numpy.typing as npt

__all__ = ["ColourModel", "assemble", "idct_plane"]

_I32 = npt.NDArray[np.int32]
_I16 = npt.NDArray[np.int16]
_U8 = npt.NDArray[np.uint8]

_BLOCKS_PER_CHUNK = 2048
_BAND_ROWS = 256
_ROW_BIAS = 512
_COL_BIAS = 512 + 65536 + (128 << 17)
_TRIANGLE_RATIOS = {(2, 1), (1, 2), (2, 2)}
_SCALAR_FALLBACK_BELOW = 18  # zune's AVX2 horizontal upsampler defers shorter rows to scalar


class ColourModel(enum.Enum):
    LUMA = "luma"  # one component, output as is
    YCBCR = "ycbcr"  # three components, the usual JFIF colour JPEG
    RGB = "rgb"  # three components, Adobe transform 0: no conversion
    CMYK = "cmyk"  # four components, Adobe transform 0 (or no Adobe segment)
    YCCK = "ycck"  # four components, Adobe transform 2


def idct_plane(blocks: npt.NDArray[np.int16], quant: npt.NDArray[np.uint16]) -> _U8:
    """Dequantise and inverse-transform (rows, cols, 64) blocks into a (rows*8, cols*8) plane."""
    rows, cols = blocks.shape[:2]
    flat = blocks.reshape(rows * cols, 64)
    steps = quant.astype(np.int32)
    out = np.empty((rows * cols, 8, 8), dtype=np.uint8)
    for start in range(0, rows * cols, _BLOCKS_PER_CHUNK):
        chunk = flat[start : start + _BLOCKS_PER_CHUNK].astype(np.int32) * steps
        out[start : start + len(chunk)] = _idct_blocks(chunk)
    return out.reshape(rows, cols, 8, 8).transpose(0, 2, 1, 3).reshape(rows * 8, cols * 8)


def _idct_blocks(coef: _I32) -> _U8:
    """(n, 64) dequantised blocks -> (n, 8, 8) pixels; frequency-major layout keeps rows contiguous."""
    n = len(coef)
    # int32 arrays wrap on overflow exactly like the reference's release-mode i32 arithmetic
    freq = np.ascontiguousarray(coef.T).reshape(8, 8, n)  # (vertical k, horizontal u, block)
    columns = np.stack(_idct_1d([freq[k] for k in range(8)], _ROW_BIAS, 10))  # (y, u, block)
    rows = _idct_1d([columns[:, u] for u in range(8)], _COL_BIAS, 17)  # per x: (y, block)
    pixels = np.stack(rows, axis=1)  # (y, x, block)
    np.clip(pixels, 0, 255, out=pixels)
    out = pixels.astype(np.uint8).transpose(2, 0, 1)
    dc_only = ~coef[:, 1:].any(axis=1)
    if dc_only.any():
        dc = np.clip((coef[dc_only, 0] + 4 + 1024) >> 3, 0, 255).astype(np.uint8)
        out[dc_only] = dc[:, None, None]
    return out


def _idct_1d(v: list[_I32], bias: int, shift: int) -> list[_I32]:
    """One stb_image 1-D pass over eight frequency vectors."""
    p1 = (v[2] + v[6]) * np.int32(2217)
    t2 = p1 + v[6] * np.int32(-7567)
    t3 = p1 + v[2] * np.int32(3135)
    t0 = (v[0] + v[4]) << 12
    t1 = (v[0] - v[4]) << 12
    x0 = t0 + t3 + np.int32(bias)
    x3 = t0 - t3 + np.int32(bias)
    x1 = t1 + t2 + np.int32(bias)
    x2 = t1 - t2 + np.int32(bias)
    o0, o1, o2, o3 = v[7], v[5], v[3], v[1]
    q3 = o0 + o2
    q4 = o1 + o3
    q1 = o0 + o3
    q2 = o1 + o2
    p5 = (q3 + q4) * np.int32(4816)
    q1 = p5 + q1 * np.int32(-3685)
    q2 = p5 + q2 * np.int32(-10497)
    q3 = q3 * np.int32(-8034)
    q4 = q4 * np.int32(-1597)
    o3 = o3 * np.int32(6149) + q1 + q4
    o2 = o2 * np.int32(12586) + q2 + q3
    o1 = o1 * np.int32(8410) + q2 + q4
    o0 = o0 * np.int32(1223) + q1 + q3
    return [
        (x0 + o3) >> shift,
        (x1 + o2) >> shift,
        (x2 + o1) >> shift,
        (x3 + o0) >> shift,
        (x3 - o0) >> shift,
        (x2 - o1) >> shift,
        (x1 - o2) >> shift,
        (x0 - o3) >> shift,
    ]


def assemble(
    planes: list[_U8],
    ratios: list[tuple[int, int]],
    width: int,
    height: int,
    model: ColourModel,
) -> _U8:
    """Upsample each padded plane by its (h, v) ratio, crop, and convert to gray or RGB."""
    if model is ColourModel.LUMA:
        return np.ascontiguousarray(planes[0][:height, :width])
    out = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, _BAND_ROWS):
        bottom = min(height, top + _BAND_ROWS)
        band = [
            _upsampled_rows(plane, ratio, top, bottom)[:, :width]
            for plane, ratio in zip(planes, ratios, strict=True)
        ]
        _convert(band, model, out[top:bottom])
    return out


def _upsampled_rows(plane: _U8, ratio: tuple[int, int], top: int, bottom: int) -> _I16:
    """Rows ``top:bottom`` of ``plane`` upsampled by ``ratio`` = (horizontal, vertical)."""
    rh, rv = ratio
    triangle = ratio in _TRIANGLE_RATIOS
    wanted = np.arange(top, bottom)
    if rv == 1:
        rows = plane[top:bottom].astype(np.int16)
    elif triangle:
        rows = _triangle_vertical(plane, wanted)
    else:
        rows = plane[wanted // rv].astype(np.int16)
    if rh == 1:
        return rows
    if triangle:
        return _triangle_horizontal(rows)
    return np.repeat(rows, rh, axis=1)


def _triangle_vertical(plane: _U8, wanted: npt.NDArray[np.intp]) -> _I16:
    source = wanted >> 1
    last = plane.shape[0] - 1
    neighbour = np.where(wanted & 1, np.minimum(source + 1, last), np.maximum(source - 1, 0))
    out: _I16 = plane[source].astype(np.int16)
    out *= 3
    out += plane[neighbour]
    out += 2
    out >>= 2
    return out


def _triangle_horizontal(rows: _I16) -> _I16:
    n = rows.shape[1]
    out = np.empty((rows.shape[0], 2 * n), dtype=np.int16)
    centre = 3 * rows + 2
    np.right_shift(centre[:, 1:] + rows[:, :-1], 2, out=out[:, 2::2])
    np.right_shift(centre[:, :-1] + rows[:, 1:], 2, out=out[:, 1:-1:2])
    out[:, 0] = rows[:, 0]
    out[:, -1] = rows[:, -1]
    if n < _SCALAR_FALLBACK_BELOW:
        out[:, -2] = (3 * rows[:, -2] + rows[:, -1] + 2) >> 2
    return out


def _convert(band: list[_I16], model: ColourModel, out: _U8) -> None:
    """Write the RGB of one band of samples (each 0..255) into ``out``."""
    if model is ColourModel.RGB:
        for channel in range(3):
            out[..., channel] = band[channel]
        return
    if model is ColourModel.CMYK:
        for channel in range(3):
            out[..., channel] = _blinn(band[channel], band[3])
        return
    _ycbcr_to_rgb(band[0], band[1], band[2], out)
    if model is ColourModel.YCCK:
        for channel in range(3):
            out[..., channel] = _blinn(255 - out[..., channel].astype(np.int16), band[3])


def _ycbcr_to_rgb(y: _I16, cb: _I16, cr: _I16, out: _U8) -> None:
    """``(y * 16384 + 8191 + c) >> 14`` is ``y + ((8191 + c) >> 14)``: tables of the second term."""
    out[..., 0] = np.clip(y + np.take(_R_FROM_CR, cr), 0, 255)
    out[..., 1] = np.clip(y + np.take(_G_FROM_CB_CR, (cb.astype(np.intp) << 8) | cr), 0, 255)
    out[..., 2] = np.clip(y + np.take(_B_FROM_CB, cb), 0, 255)


def _chroma_table(cb_weight: int, cr_weight: int) -> _I16:
    """``(8191 + cb' * cb_weight + cr' * cr_weight) >> 14`` for every ``cb << 8 | cr``."""
    cb, cr = np.divmod(np.arange(256 * 256, dtype=np.int32), 256)
    table: _I32 = (8191 + (cb - 128) * cb_weight + (cr - 128) * cr_weight) >> 14
    return table.astype(np.int16)


_R_FROM_CR = _chroma_table(0, 22970)[:256]
_G_FROM_CB_CR = _chroma_table(-5638, -11700)
_B_FROM_CB = _chroma_table(29032, 0)[::256]


def _blinn(channel: _I16, k: _I16) -> _I16:
    """stb's rounded ``a * k / 255`` for 0..255 operands."""
    t = channel.astype(np.int32) * k + 128
    out: _I16 = ((t + (t >> 8)) >> 8).astype(np.int16)
    return out
