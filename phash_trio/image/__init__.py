"""Images: decoding as the Rust ``image`` crate does, the 8x8 mean hash, and the hash worker pool.

``decode`` turns bytes into the gray pixels of ``image::load_from_memory(..).to_luma8()``
(``jpeg/`` is the zune-jpeg port), ``resize`` is the exact Lanczos3, ``meanhash`` the hash,
``pool`` runs it in worker processes. Other parts of the service import from here.
"""

from phash_trio.image.decode import (
    CorruptImage,
    ImageError,
    ImageTooLarge,
    UnsupportedImage,
    decode_gray,
    decode_rgb,
)
from phash_trio.image.meanhash import (
    DEFAULT_MAX_PIXELS,
    format_hash,
    hash_file,
    hash_gray,
    mean_hash,
    parse_hash,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "CorruptImage",
    "ImageError",
    "ImageTooLarge",
    "UnsupportedImage",
    "decode_gray",
    "decode_rgb",
    "format_hash",
    "hash_file",
    "hash_gray",
    "mean_hash",
    "parse_hash",
]
