"""WebP: stills through libwebp with one copy of the pixels; animations composited like
image-webp 0.2.4 (first frame on a transparent canvas, its integer blend)."""

from __future__ import annotations

import struct

import numpy as np

from phash_trio.image.errors import CorruptImage, ImageTooLarge
from phash_trio.image.pixels import Banded, PixelArray, U8Array, open_image, pillow_pixels

try:
    from PIL import _webp
except ImportError:  # pragma: no cover - Pillow built without WebP
    _webp = None  # type: ignore[assignment]

__all__ = ["decode_webp", "webp_size"]


def webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    body = 20
    if chunk == b"VP8X":
        w = int.from_bytes(data[body + 4 : body + 7], "little") + 1
        h = int.from_bytes(data[body + 7 : body + 10], "little") + 1
        if len(data) < body + 10:
            raise IndexError
        return w, h
    if chunk == b"VP8L":
        if data[body] != 0x2F:
            raise CorruptImage("webp: bad VP8L signature")
        bits = int.from_bytes(data[body + 1 : body + 5], "little")
        if len(data) < body + 5:
            raise IndexError
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        if data[body + 3 : body + 6] != b"\x9d\x01\x2a":
            raise CorruptImage("webp: bad VP8 start code")
        w, h = struct.unpack_from("<HH", data, body + 6)
        return int(w) & 0x3FFF, int(h) & 0x3FFF
    raise CorruptImage(f"webp: unknown first chunk {chunk!r}")


def _riff_chunks(data: bytes, start: int, stop: int) -> list[tuple[bytes, int, int]]:
    """``(fourcc, body_start, body_end)`` of the RIFF chunks in ``data[start:stop]``."""
    chunks = []
    pos = start
    while pos + 8 <= stop:
        fourcc = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        body = pos + 8
        if body + size > stop:
            raise CorruptImage(f"webp: truncated {fourcc.decode('latin-1')!r} chunk")
        chunks.append((fourcc, body, body + size))
        pos = body + size + (size & 1)
    return chunks


def decode_webp(data: bytes, limit: int) -> PixelArray | Banded:
    """Stills through Pillow; animations by their first frame, composited like image-webp.

    libwebp (Pillow) composites the first frame onto a transparent canvas without blending;
    image-webp 0.2.4 blends it (when the frame asks for blending) with its integer formula,
    which turns fully transparent pixels black and can lower other values by one.
    """
    if data[12:16] != b"VP8X" or not data[20] & 0x02:
        return _decode_webp_still(data, limit)
    canvas_w, canvas_h = webp_size(data)
    chunks = _riff_chunks(data, 12, len(data))
    frames = [c for c in chunks if c[0] == b"ANMF"]
    if not frames or not any(c[0] == b"ANIM" for c in chunks):
        raise CorruptImage("webp: animation without ANIM or ANMF chunk")
    _, start, stop = frames[0]
    if stop - start < 24:
        raise CorruptImage("webp: ANMF chunk too small")
    head = data[start : start + 16]
    x = int.from_bytes(head[0:3], "little") * 2
    y = int.from_bytes(head[3:6], "little") * 2
    width = int.from_bytes(head[6:9], "little") + 1
    height = int.from_bytes(head[9:12], "little") + 1
    blend = not head[15] & 0x02
    if width > 16384 or height > 16384 or width * height > limit:
        raise ImageTooLarge(f"webp: animation frame {width}x{height} is too large")
    if x + width > canvas_w or y + height > canvas_h:
        raise CorruptImage("webp: animation frame lies outside the canvas")
    frame, has_alpha = _webp_frame_pixels(data, _riff_chunks(data, start + 16, stop), limit)
    if frame.shape[:2] != (height, width):
        raise CorruptImage("webp: animation frame size disagrees with its ANMF header")
    canvas = np.zeros((canvas_h, canvas_w, 4), dtype=np.uint8)
    region = canvas[y : y + height, x : x + width]
    if has_alpha and blend:  # the canvas starts transparent: no background colour (0.2.2+)
        region[...] = _webp_blend_over_transparent(frame)
    else:
        region[..., : frame.shape[2]] = frame
        if frame.shape[2] == 3:
            region[..., 3] = 255
    return canvas


def _decode_webp_still(data: bytes, limit: int) -> PixelArray | Banded:
    """A still WebP with libwebp through Pillow's decoder object, keeping one copy of it.

    ``Image.open`` + ``load`` holds libwebp's two canvases, the frame bytes and Pillow's image
    at once: 16 bytes a pixel, 433 MB at 25 MP. Here the decoder (its canvases) is dropped as
    soon as the frame bytes are out and numpy reads those bytes in place: peak 12 bytes a
    pixel, then 4. Falls back to ``Image.open`` if Pillow's private decoder ever goes away.
    """
    decoder_class = getattr(_webp, "WebPAnimDecoder", None) if _webp is not None else None
    if decoder_class is None:  # pragma: no cover - Pillow without its private decoder
        im = open_image(data, "WEBP")
        if im.width * im.height > limit:
            raise ImageTooLarge(f"webp: {im.width}x{im.height} exceeds {limit} pixels")
        im.load()
        return pillow_pixels(im)
    decoder = decoder_class(data)
    (width, height), *_ = decoder.get_info()
    if width * height > limit:
        raise ImageTooLarge(f"webp: {width}x{height} exceeds {limit} pixels")
    frame = decoder.get_next()
    del decoder
    if frame is None:
        raise CorruptImage("webp: failed to decode next frame in WebP file")
    raw = frame[0]
    if len(raw) != width * height * 4:
        raise CorruptImage("webp: decoder returned a frame of the wrong size")
    pixels: PixelArray = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 4)
    return pixels


def _webp_frame_pixels(
    data: bytes, subchunks: list[tuple[bytes, int, int]], limit: int
) -> tuple[U8Array, bool]:
    """Decode one ANMF frame by re-wrapping its bitstream as a still WebP for Pillow."""
    if not subchunks:
        raise CorruptImage("webp: empty animation frame")

    def chunk(c: tuple[bytes, int, int]) -> bytes:
        body = data[c[1] : c[2]]
        return c[0] + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) & 1)

    kind = subchunks[0][0]
    if kind == b"VP8L":
        payload, has_alpha = chunk(subchunks[0]), True
    elif kind == b"VP8 ":
        payload, has_alpha = chunk(subchunks[0]), False
    elif kind == b"ALPH" and len(subchunks) > 1 and subchunks[1][0] == b"VP8 ":
        vp8 = data[subchunks[1][1] : subchunks[1][2]]
        if len(vp8) < 10:
            raise CorruptImage("webp: truncated VP8 frame")
        w, h = (int(v) & 0x3FFF for v in struct.unpack_from("<HH", vp8, 6))
        vp8x = b"\x10\x00\x00\x00" + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
        payload = b"VP8X\x0a\x00\x00\x00" + vp8x + chunk(subchunks[0]) + chunk(subchunks[1])
        has_alpha = True
    else:
        raise CorruptImage(f"webp: unexpected {kind.decode('latin-1')!r} chunk in a frame")
    still = b"RIFF" + struct.pack("<I", len(payload) + 4) + b"WEBP" + payload
    with open_image(still, "WEBP") as im:
        if im.width * im.height > limit:
            raise ImageTooLarge(f"webp: frame {im.width}x{im.height} exceeds {limit} pixels")
        im.load()
        pixels = np.asarray(im.convert("RGBA") if im.mode not in ("RGB", "RGBA") else im)
    if has_alpha and pixels.shape[2] == 3:  # VP8L without the alpha hint: all opaque
        pixels = np.concatenate([pixels, np.full((*pixels.shape[:2], 1), 255, np.uint8)], 2)
    return pixels, has_alpha


def _webp_blend_over_transparent(frame: U8Array) -> U8Array:
    """image-webp's ``do_alpha_blending(src, [0, 0, 0, 0])`` (libwebp's integer formula).

    With a transparent destination: alpha 0 gives ``[0, 0, 0, 0]``; otherwise each channel is
    ``(c * a * (2**24 // a)) >> 24`` and alpha stays ``a``.
    """
    alpha = frame[..., 3].astype(np.uint64)
    scale = np.where(alpha > 0, (1 << 24) // np.maximum(alpha, 1), 0)
    rgb = (frame[..., :3].astype(np.uint64) * alpha[..., None] * scale[..., None]) >> 24
    out = np.zeros(frame.shape, dtype=np.uint8)
    out[..., :3] = rgb.astype(np.uint8)
    out[..., 3] = frame[..., 3]
    return out
