"""Decoded pixels and their conversion: the array shapes, bands of big images, Pillow access.

A decoder returns a :data:`PixelArray` in the colour type the reference's decoder gives, or a
:class:`Banded` view read band by band (a Pillow image, two Pillow images for 16-bit PNG), so a
25 MP image is converted without a second full-size copy. :func:`to_luma8` and :func:`to_rgb8`
are image-rs's conversions of either.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile, UnidentifiedImageError

from phash_trio.image.errors import CorruptImage, UnsupportedImage
from phash_trio.image.luma import gray16_to_8, luma_from_rgb8, luma_from_rgb16

__all__ = [
    "BAND_PIXELS",
    "Banded",
    "PixelArray",
    "U8Array",
    "open_image",
    "palette_lut",
    "pillow_banded",
    "pillow_pixels",
    "to_luma8",
    "to_rgb8",
]

U8Array = npt.NDArray[np.uint8]
#: Decoded pixels: uint8 or uint16, ``(H, W)`` gray or ``(H, W, 3|4)`` RGB(A).
PixelArray = npt.NDArray[Any]


@attrs.frozen
class Banded:
    """Pixels read band by band, so converting a big image never holds a second full copy.

    ``band(y0, y1)`` returns rows ``y0:y1`` as a pixel array (what :func:`decode_pixels`
    would hold for them); a 25 MP RGBA image then costs its decoder's buffer plus one band,
    not three more full-size arrays.
    """

    height: int
    width: int
    band: Callable[[int, int], PixelArray]

    def rows(self) -> Iterator[tuple[int, PixelArray]]:
        step = max(1, BAND_PIXELS // max(self.width, 1))
        for y0 in range(0, self.height, step):
            yield y0, self.band(y0, min(y0 + step, self.height))

    def whole(self) -> PixelArray:
        return np.concatenate([part for _, part in self.rows()], axis=0)


BAND_PIXELS = 1 << 20


def pillow_banded(im: Image.Image) -> Banded:
    """Bands of a loaded RGB/RGBA/RGBX Pillow image (``np.asarray`` would copy it whole)."""
    width, height = im.size

    def band(y0: int, y1: int) -> PixelArray:
        return np.asarray(im.crop((0, y0, width, y1)))

    return Banded(height, width, band)


def to_luma8(pixels: PixelArray | Banded) -> U8Array:
    """image-rs ``to_luma8`` of what :func:`decode_pixels` returns."""
    if isinstance(pixels, Banded):
        out = np.empty((pixels.height, pixels.width), dtype=np.uint8)
        for y0, part in pixels.rows():
            out[y0 : y0 + part.shape[0]] = to_luma8(part)
        return out
    if pixels.ndim == 2:
        return pixels if pixels.dtype == np.uint8 else gray16_to_8(pixels)
    if pixels.dtype == np.uint8:
        return luma_from_rgb8(pixels)
    return luma_from_rgb16(pixels)


def to_rgb8(pixels: PixelArray | Banded) -> U8Array:
    """image-rs ``to_rgb8`` of what :func:`decode_pixels` returns."""
    if isinstance(pixels, Banded):
        out = np.empty((pixels.height, pixels.width, 3), dtype=np.uint8)
        for y0, part in pixels.rows():
            out[y0 : y0 + part.shape[0]] = to_rgb8(part)
        return out
    if pixels.dtype == np.uint16:
        pixels = gray16_to_8(pixels[..., :3] if pixels.ndim == 3 else pixels)
    if pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])


def open_image(data: bytes, fmt: str) -> ImageFile.ImageFile:
    """Open with the one Pillow plugin that the magic bytes named."""
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
    except UnidentifiedImageError:
        raise CorruptImage(f"{fmt.lower()}: cannot be read as {fmt}") from None
    assert isinstance(im, ImageFile.ImageFile)
    return im


def pillow_pixels(im: Image.Image) -> PixelArray | Banded:
    """The pixels of a loaded Pillow image in the colour type image-rs would decode."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im)
    if mode == "LA":
        return np.ascontiguousarray(np.asarray(im)[..., 0])
    if mode == "1":
        return np.asarray(im.convert("L"))
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im).astype(np.uint16)
    if mode == "P":
        rgb: U8Array = palette_lut(im.getpalette("RGB") or [])[np.asarray(im)]
        return rgb
    if mode in ("RGB", "RGBA", "RGBX"):
        return pillow_banded(im)
    raise UnsupportedImage(f"{(im.format or 'image').lower()}: pixel mode {mode} not supported")


def palette_lut(palette: bytes | list[int]) -> U8Array:
    """A 256-entry RGB table; entries the file does not define are black (as in png/gif)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    raw = palette if isinstance(palette, bytes) else bytes(palette)
    colours = np.frombuffer(raw, dtype=np.uint8)[: 256 * 3]
    colours = colours[: len(colours) - len(colours) % 3].reshape(-1, 3)
    lut[: len(colours)] = colours
    return lut
