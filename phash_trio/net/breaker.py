"""Circuit breakers: one small state machine per remote endpoint.

Closed  -- calls pass; ``failure_threshold`` consecutive failures open it.
Open    -- calls fail fast with :class:`BreakerOpen` until ``reset_timeout`` has passed.
HalfOpen-- up to ``half_open_max_calls`` probe calls pass; a success closes it, a failure
           opens it again for another ``reset_timeout``.

Time is read through ``trio.current_time()`` so a ``MockClock`` drives it in tests.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs
import trio
from loguru import logger

__all__ = ["BreakerOpen", "BreakerState", "CircuitBreaker"]


class BreakerState(enum.Enum):
    CLOSED = "closed"  # healthy: every call goes through
    OPEN = "open"  # failing: calls are refused until the reset timeout passes
    HALF_OPEN = "half_open"  # probing: a few calls go through to test recovery


class BreakerOpen(Exception):
    """The endpoint's breaker is open: the call was not attempted."""

    def __init__(self, name: str, retry_at: float) -> None:
        super().__init__(f"circuit breaker {name!r} is open")
        self.name = name
        #: Trio time at which the breaker will admit a probe.
        self.retry_at = retry_at


@attrs.define
class CircuitBreaker:
    """Closed -> Open -> HalfOpen -> Closed, with transitions reported to ``on_transition``."""

    name: str
    failure_threshold: int = 5
    reset_timeout: float = 60.0
    half_open_max_calls: int = 1
    #: Called as ``on_transition(name, old, new)``; metrics hook.
    on_transition: Callable[[str, BreakerState, BreakerState], None] | None = None
    #: Called as ``on_reject(name)`` when a call is refused.
    on_reject: Callable[[str], None] | None = None
    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    half_open_in_flight: int = 0
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def _transition(self, new: BreakerState) -> None:
        old = self.state
        if old is new:
            return
        self.state = new
        level = "WARNING" if new is BreakerState.OPEN else "INFO"
        logger.log(level, "breaker {}: {} -> {}", self.name, old.value, new.value)
        if self.on_transition is not None:
            self.on_transition(self.name, old, new)
        self._changed.set()
        self._changed = trio.Event()

    @property
    def retry_at(self) -> float:
        return self.opened_at + self.reset_timeout

    def _refresh(self) -> None:
        if self.state is BreakerState.OPEN and trio.current_time() >= self.retry_at:
            self.half_open_in_flight = 0
            self._transition(BreakerState.HALF_OPEN)

    def current_state(self) -> BreakerState:
        """The state now (an open breaker whose timeout passed reads as half-open)."""
        self._refresh()
        return self.state

    def before_call(self) -> None:
        """Admit a call or raise :class:`BreakerOpen`. Pair with ``record_*``."""
        self._refresh()
        if self.state is BreakerState.OPEN or (
            self.state is BreakerState.HALF_OPEN
            and self.half_open_in_flight >= self.half_open_max_calls
        ):
            if self.on_reject is not None:
                self.on_reject(self.name)
            raise BreakerOpen(self.name, self.retry_at)
        if self.state is BreakerState.HALF_OPEN:
            self.half_open_in_flight += 1

    def record_success(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self.half_open_in_flight = max(0, self.half_open_in_flight - 1)
        self.consecutive_failures = 0
        self._transition(BreakerState.CLOSED)

    def record_failure(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self.half_open_in_flight = max(0, self.half_open_in_flight - 1)
            self.opened_at = trio.current_time()
            self._transition(BreakerState.OPEN)
            return
        self.consecutive_failures += 1
        if self.state is BreakerState.CLOSED and (
            self.consecutive_failures >= self.failure_threshold
        ):
            self.opened_at = trio.current_time()
            self._transition(BreakerState.OPEN)

    def record_neutral(self) -> None:
        """A call finished with an answer that says nothing about health (e.g. a 404)."""
        if self.state is BreakerState.HALF_OPEN:
            self.half_open_in_flight = max(0, self.half_open_in_flight - 1)
            self.consecutive_failures = 0
            self._transition(BreakerState.CLOSED)
        else:
            self.consecutive_failures = 0

    async def wait_until_admitting(self) -> None:
        """Sleep until the breaker would admit a call (returns at once when it does)."""
        while True:
            self._refresh()
            if self.state is BreakerState.CLOSED:
                return
            if (
                self.state is BreakerState.HALF_OPEN
                and self.half_open_in_flight < self.half_open_max_calls
            ):
                return
            changed = self._changed
            if self.state is BreakerState.OPEN:
                with trio.move_on_at(self.retry_at):
                    await changed.wait()
            else:
                await changed.wait()
