"""Work items flowing from the Jetstream reader to the workers."""

from __future__ import annotations

import attrs

__all__ = ["BlobRef", "ImageJob"]

POST_COLLECTION = "app.bsky.feed.post"


@attrs.frozen
class BlobRef:
    """One image blob of a post, as named in the record."""

    cid: str
    mime_type: str | None = None
    #: Size the record claims, in bytes (not trusted: the fetch enforces its own cap).
    size: int | None = None


@attrs.frozen
class ImageJob:
    """A new post with at least one image: the unit the cursor waits for."""

    did: str
    rkey: str
    #: CID of the post record (for strongRef subjects).
    cid: str
    #: Jetstream ``time_us`` of the commit; the cursor position of this job.
    time_us: int
    blobs: tuple[BlobRef, ...]
    #: Trio time at which the reader read the event (for the decision-latency histogram);
    #: not part of the job's identity.
    read_at: float | None = attrs.field(default=None, eq=False)

    @property
    def uri(self) -> str:
        return f"at://{self.did}/{POST_COLLECTION}/{self.rkey}"
