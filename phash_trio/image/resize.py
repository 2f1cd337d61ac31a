"""Lanczos3 resize of an 8-bit gray image, bit-exact with image-rs ``imageops::resize``.

Rust computes, per output pixel, ``t += v * w`` over the filter taps one after another in f32,
vertical pass first (kept as unrounded f32), then the horizontal pass (clamped to [0, 255] and
rounded half away from zero). Float addition is not associative, so the order matters: the
compiled core (:mod:`phash_trio.image.hashcore`, ``resize_u8``) does exactly these operations
in exactly this order, built without FMA contraction or fast-math. Its weights come from
``lanczos3(x) = sinc(x) * sinc(x / 3)`` with the C library's ``sinf``, which is what Rust's
``f32::sin`` calls on Linux (glibc). tests/test_hashing.py checks it against a scalar
transcription of ``sample.rs``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from phash_trio.image import hashcore

__all__ = ["resize_gray"]

U8Array = npt.NDArray[np.uint8]


def resize_gray(img: U8Array, width: int, height: int) -> U8Array:
    """``imageops::resize(img, width, height, Lanczos3)`` for a 2-D uint8 image."""
    if img.ndim != 2 or img.dtype != np.uint8 or img.size == 0:
        raise ValueError(f"need a non-empty 2-D uint8 array, got {img.dtype} {img.shape}")
    src_h, src_w = img.shape
    raw = hashcore.resize_gray(np.ascontiguousarray(img), src_w, src_h, width, height)
    return np.frombuffer(raw, dtype=np.uint8).reshape(height, width)
