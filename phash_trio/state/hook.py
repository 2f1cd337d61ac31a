"""The one hook the pipeline calls for every decision (see :mod:`phash_trio.state.recorder`).

The pipeline and the actions only know this protocol; the default does nothing, so a
processor built without a decision log (tests, the ``hash`` CLI) behaves as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from phash_trio.pipeline.jobs import BlobRef, ImageJob
    from phash_trio.rules.index import Match

__all__ = ["DecisionHook", "NoDecisions"]


class DecisionHook(Protocol):
    """Called synchronously from the workers; must never block nor raise."""

    def match(self, job: ImageJob, blob: BlobRef, match: Match) -> None: ...

    def action(
        self, action: str, job: ImageJob, blob: BlobRef, match: Match, *, skipped: str | None
    ) -> None: ...

    def dead_letter(self, job: ImageJob, error: str, attempts: int) -> None: ...

    def bad_blob(self, job: ImageJob, blob: BlobRef, kind: str, message: str) -> None: ...


class NoDecisions:
    """The hook that records nothing."""

    def match(self, job: ImageJob, blob: BlobRef, match: Match) -> None:
        pass

    def action(
        self, action: str, job: ImageJob, blob: BlobRef, match: Match, *, skipped: str | None
    ) -> None:
        pass

    def dead_letter(self, job: ImageJob, error: str, attempts: int) -> None:
        pass

    def bad_blob(self, job: ImageJob, blob: BlobRef, kind: str, message: str) -> None:
        pass
