"""Lanczos3 resize of an 8-bit gray image, bit-exact with image-rs ``imageops::resize``.

Rust computes, per output pixel, ``t += v * w`` over the filter taps one after another in f32,
vertical pass first (kept as unrounded f32), then the horizontal pass (clamped to [0, 255] and
rounded half away from zero). Float addition is not associative, so the order matters. We keep
that exact order but run it vectorised *across* output positions and columns: for tap ``k`` every
accumulator does one f32 multiply and one f32 add, which is precisely Rust's operation sequence
for that accumulator (numpy rounds each f32 op like Rust, which emits no FMA here). Output
positions with fewer taps are padded with weight 0.0 at a valid index: ``acc + v * 0.0`` is
``acc`` exactly. No fallback path is needed because no step is approximated.

Weights are ``lanczos3`` with C ``sinf`` semantics (Rust's ``f32::sin`` calls glibc ``sinf`` on
Linux). See :func:`sinf` for how we get glibc's results without one ctypes call per weight.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math

import numpy as np
import numpy.typing as npt

__all__ = ["lanczos3_weights", "resize_gray", "sinf", "sinf_exact"]

F32 = np.float32
U8Array = npt.NDArray[np.uint8]
F32Array = npt.NDArray[np.float32]

_PI = F32(math.pi)  # f32::consts::PI
_SUPPORT = F32(3.0)


def _load_sinf() -> ctypes._NamedFuncPointer:
    name = ctypes.util.find_library("m") or "libm.so.6"
    fn = ctypes.CDLL(name).sinf
    fn.restype = ctypes.c_float
    fn.argtypes = [ctypes.c_float]
    return fn


_SINF = _load_sinf()

# glibc documents its sinf (sysdeps/ieee754/flt-32/s_sinf.c, since 2.28) as "Worst-case ULP is
# 0.5607". So when the exact sine lies closer than 1 - 0.5607 = 0.4393 ulp to the nearest f32,
# that nearest f32 is the only candidate sinf can return. Below this threshold the
# correctly-rounded double result is glibc's; above it we ask glibc itself.
_AMBIGUOUS_ULP = 0.43


def sinf_exact(a: F32Array) -> F32Array:
    """glibc ``sinf`` element by element through ctypes (slow, the ground truth)."""
    flat = np.asarray(a, dtype=F32).ravel()
    out = np.fromiter((_SINF(float(v)) for v in flat), dtype=F32, count=flat.size)
    return out.reshape(np.shape(a))


def sinf(a: F32Array) -> F32Array:
    """glibc ``sinf`` of each element, vectorised; agrees with :func:`sinf_exact` everywhere.

    ``sin`` in double precision is within a few double ulps of the true sine, i.e. ~1e-8 f32
    ulp, so rounding it to f32 gives the correctly rounded result, which glibc must return
    unless the true value is within 0.5607 ulp of the other neighbour too; those few (about
    one in seven) are recomputed with the real ``sinf``.
    """
    a = np.asarray(a, dtype=F32)
    exact = np.sin(a.astype(np.float64))
    near = exact.astype(F32)
    up = np.nextafter(near, F32(np.inf)).astype(np.float64)
    down = np.nextafter(near, F32(-np.inf)).astype(np.float64)
    near64 = near.astype(np.float64)
    spacing = np.minimum(up - near64, near64 - down)
    ambiguous = np.abs(exact - near64) > _AMBIGUOUS_ULP * spacing
    if ambiguous.any():
        near[ambiguous] = sinf_exact(a[ambiguous])
    return near


def _lanczos3(x: F32Array) -> F32Array:
    """image-rs ``lanczos3_kernel``: ``sinc(x) * sinc(x / 3)`` for ``|x| < 3``, else 0."""
    out = np.zeros(x.shape, dtype=F32)
    inside = np.abs(x) < _SUPPORT
    xi = x[inside]
    out[inside] = _sinc(xi) * _sinc(xi / _SUPPORT)
    return out


def _sinc(t: F32Array) -> F32Array:
    a = t * _PI
    zero = t == F32(0.0)
    safe = np.where(zero, F32(1.0), a)
    with np.errstate(divide="ignore", invalid="ignore"):
        val = sinf(safe) / safe
    return np.where(zero, F32(1.0), val).astype(F32)


# Photos come in many sizes; 128 entries of at most (8 x 6n/8) taps stay within a few MB.
@functools.lru_cache(maxsize=128)
def lanczos3_weights(n: int, out: int) -> tuple[npt.NDArray[np.int32], F32Array]:
    """Tap start and normalised weights for resampling length ``n`` to ``out``.

    Returns ``(index, weights)`` of shape ``(out, K)``: output ``o`` is the sequential f32 sum of
    ``src[index[o, k]] * weights[o, k]`` for ``k`` in order. Rows with fewer than ``K`` real taps
    are padded with weight 0.0 pointing at a valid index. The arrays are read-only (cached).
    """
    if n <= 0 or out <= 0:
        raise ValueError(f"cannot resample length {n} to {out}")
    ratio = F32(n) / F32(out)
    sratio = F32(1.0) if ratio < F32(1.0) else ratio
    src_support = _SUPPORT * sratio
    lefts: list[int] = []
    rights: list[int] = []
    centres: list[np.float32] = []
    for o in range(out):
        centre = (F32(o) + F32(0.5)) * ratio
        left = min(max(math.floor(centre - src_support), 0), n - 1)
        right = min(max(math.ceil(centre + src_support), left + 1), n)
        lefts.append(left)
        rights.append(right)
        centres.append(centre - F32(0.5))
    taps = max(r - lf for lf, r in zip(lefts, rights, strict=True))
    k = np.arange(taps)
    starts = np.array(lefts, dtype=np.int32)
    counts = np.array(rights, dtype=np.int32) - starts
    valid = k[None, :] < counts[:, None]
    index = np.where(valid, starts[:, None] + k[None, :], starts[:, None]).astype(np.int32)
    x = (index.astype(F32) - np.array(centres, dtype=F32)[:, None]) / sratio
    raw = np.where(valid, _lanczos3(x.astype(F32)), F32(0.0)).astype(F32)
    # Sequential f32 sum per row (accumulate, unlike sum, never reorders), then w /= sum.
    total = np.add.accumulate(raw, axis=1, dtype=F32)[:, -1]
    weights = (raw / total[:, None]).astype(F32)
    weights[~valid] = F32(0.0)
    index.setflags(write=False)
    weights.setflags(write=False)
    return index, weights


def resize_gray(img: U8Array, width: int, height: int) -> U8Array:
    """``imageops::resize(img, width, height, Lanczos3)`` for a 2-D uint8 image."""
    src_h, src_w = img.shape
    if (src_h, src_w) == (height, width):
        return img.copy()
    vertical = _vertical(img, height)
    return _horizontal(vertical, width)


def _vertical(img: U8Array, out_h: int) -> F32Array:
    """Vertical pass into f32, no rounding: ``acc[o, x] += img[i, x] * w`` tap by tap."""
    index, weights = lanczos3_weights(img.shape[0], out_h)
    width = img.shape[1]
    acc = np.zeros((out_h, width), dtype=F32)
    rows = np.empty((out_h, width), dtype=np.uint8)
    prod = np.empty((out_h, width), dtype=F32)
    for k in range(index.shape[1]):
        np.take(img, index[:, k], axis=0, out=rows)
        np.multiply(rows, weights[:, k : k + 1], out=prod)
        np.add(acc, prod, out=acc)
    return acc


def _horizontal(tmp: F32Array, out_w: int) -> U8Array:
    """Horizontal pass: sequential f32 sums, then clamp to [0, 255] and round half away."""
    index, weights = lanczos3_weights(tmp.shape[1], out_w)
    products = tmp[:, index] * weights[None, :, :]  # (rows, out_w, K), each an f32 product
    sums = np.add.accumulate(products, axis=2, dtype=F32)[:, :, -1]
    clamped = np.clip(sums, F32(0.0), F32(255.0)).astype(np.float64)
    return np.floor(clamped + 0.5).astype(np.uint8)
