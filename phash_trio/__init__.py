"""phash_trio: perceptual-hash moderation for Bluesky on Trio."""

__version__ = "0.1.0"
