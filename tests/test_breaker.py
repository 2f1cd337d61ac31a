"""CircuitBreaker transitions on Trio's mock clock, with exact times, hooks and metrics."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from phash_trio.net.breaker import BreakerOpen, BreakerState, CircuitBreaker
from phash_trio.runtime.metrics import Metrics

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class Recorder:
    """Collects the breaker's hook calls with the Trio time they happened at."""

    def __init__(self) -> None:
        self.transitions: list[tuple[float, str, BreakerState, BreakerState]] = []
        self.rejections: list[tuple[float, str]] = []

    def on_transition(self, name: str, old: BreakerState, new: BreakerState) -> None:
        self.transitions.append((trio.current_time(), name, old, new))

    def on_reject(self, name: str) -> None:
        self.rejections.append((trio.current_time(), name))


def make(recorder: Recorder | None = None, **kwargs: object) -> CircuitBreaker:
    kwargs.setdefault("failure_threshold", 3)
    kwargs.setdefault("reset_timeout", 10.0)
    if recorder is not None:
        kwargs["on_transition"] = recorder.on_transition
        kwargs["on_reject"] = recorder.on_reject
    return CircuitBreaker("ozone", **kwargs)  # type: ignore[arg-type]


def fail(breaker: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        breaker.before_call()
        breaker.record_failure()


async def test_opens_after_threshold_consecutive_failures(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Only ``failure_threshold`` consecutive failures open it; a success resets the count."""
    rec = Recorder()
    breaker = make(rec)
    fail(breaker, 2)
    breaker.before_call()
    breaker.record_success()
    assert breaker.consecutive_failures == 0
    fail(breaker, 2)
    assert breaker.current_state() is CLOSED
    await trio.sleep(1.5)
    fail(breaker, 1)
    assert breaker.current_state() is OPEN
    assert breaker.opened_at == 1.5
    assert rec.transitions == [(1.5, "ozone", CLOSED, OPEN)]


async def test_open_fails_fast_with_exact_retry_at(autojump_clock: trio.testing.MockClock) -> None:
    """While open every call is refused with ``retry_at`` = opening time + reset timeout."""
    rec = Recorder()
    breaker = make(rec)
    await trio.sleep(2)
    fail(breaker, 3)
    await trio.sleep(9.5)
    for _ in range(3):
        with pytest.raises(BreakerOpen) as info:
            breaker.before_call()
        assert info.value.retry_at == 12.0
        assert info.value.name == "ozone"
        assert "ozone" in str(info.value)
    assert rec.rejections == [(11.5, "ozone")] * 3
    assert breaker.current_state() is OPEN


async def test_half_open_admits_exactly_max_probes(autojump_clock: trio.testing.MockClock) -> None:
    """After the timeout exactly ``half_open_max_calls`` probes pass; the next is refused."""
    rec = Recorder()
    breaker = make(rec, half_open_max_calls=2)
    fail(breaker, 3)
    await trio.sleep(9.5)
    with pytest.raises(BreakerOpen):
        breaker.before_call()
    await trio.sleep(0.5)
    assert trio.current_time() == 10.0
    breaker.before_call()
    breaker.before_call()
    assert breaker.state is HALF_OPEN
    with pytest.raises(BreakerOpen) as info:
        breaker.before_call()
    assert info.value.retry_at == 10.0
    assert [t[3] for t in rec.transitions] == [OPEN, HALF_OPEN]
    assert rec.transitions[1][0] == 10.0
    assert len(rec.rejections) == 2


async def test_probe_success_closes(autojump_clock: trio.testing.MockClock) -> None:
    """A successful probe closes the breaker and calls flow again."""
    rec = Recorder()
    breaker = make(rec)
    fail(breaker, 3)
    await trio.sleep(10)
    breaker.before_call()
    breaker.record_success()
    assert breaker.current_state() is CLOSED
    for _ in range(5):
        breaker.before_call()
        breaker.record_success()
    assert [t[2:] for t in rec.transitions] == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]
    # The count starts afresh: two failures do not reopen a threshold-3 breaker.
    fail(breaker, 2)
    assert breaker.current_state() is CLOSED


async def test_probe_failure_reopens_with_new_retry_at(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A failed probe opens the breaker again for a full timeout from the probe's end."""
    rec = Recorder()
    breaker = make(rec)
    fail(breaker, 3)
    await trio.sleep(10)
    breaker.before_call()
    await trio.sleep(0.5)  # the probe takes a while
    breaker.record_failure()
    assert breaker.state is OPEN
    assert breaker.opened_at == 10.5
    with pytest.raises(BreakerOpen) as info:
        breaker.before_call()
    assert info.value.retry_at == 20.5
    await trio.sleep(10)
    breaker.before_call()
    assert breaker.state is HALF_OPEN
    assert [(t[0], t[3]) for t in rec.transitions] == [
        (0.0, OPEN),
        (10.0, HALF_OPEN),
        (10.5, OPEN),
        (20.5, HALF_OPEN),
    ]


async def test_record_neutral(autojump_clock: trio.testing.MockClock) -> None:
    """A neutral answer resets the failure count when closed and ends a half-open probe."""
    breaker = make()
    fail(breaker, 2)
    breaker.before_call()
    breaker.record_neutral()
    assert breaker.consecutive_failures == 0
    fail(breaker, 2)
    assert breaker.current_state() is CLOSED
    fail(breaker, 1)
    assert breaker.current_state() is OPEN
    await trio.sleep(10)
    breaker.before_call()
    assert breaker.half_open_in_flight == 1
    breaker.record_neutral()
    # The endpoint answered (even if "not found"): it is healthy again.
    assert breaker.state is CLOSED
    assert breaker.half_open_in_flight == 0


async def test_wait_until_admitting_wakes_exactly_at_retry_at(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A waiter on an open breaker wakes at ``retry_at`` exactly, and at once when closed."""
    breaker = make()
    await breaker.wait_until_admitting()
    assert trio.current_time() == 0.0
    await trio.sleep(3)
    fail(breaker, 3)
    await breaker.wait_until_admitting()
    assert trio.current_time() == 13.0
    assert breaker.state is HALF_OPEN


async def test_wait_until_admitting_follows_the_probe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With the probe slot taken, waiters sleep until the probe ends; a failed one means
    another full timeout, a successful one lets them through at that moment."""
    breaker = make()
    fail(breaker, 3)
    woke: list[float] = []

    async def waiter() -> None:
        await breaker.wait_until_admitting()
        woke.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        await trio.sleep(10)
        breaker.before_call()  # the probe
        nursery.start_soon(waiter)
        await trio.sleep(2)
        assert woke == []
        breaker.record_failure()  # probe failed at t=12: open until 22
        await trio.sleep(5)
        assert woke == []
    assert woke == [22.0]

    async with trio.open_nursery() as nursery:
        breaker.before_call()  # probe at 22
        nursery.start_soon(waiter)
        await trio.sleep(1)
        breaker.record_success()
    assert woke == [22.0, 23.0]
    assert breaker.state is CLOSED


async def test_metrics_hooks(autojump_clock: trio.testing.MockClock) -> None:
    """Wired to :class:`Metrics`, transitions and rejections land in their counters."""
    metrics = Metrics()
    breaker = CircuitBreaker(
        "ozone",
        failure_threshold=2,
        reset_timeout=5.0,
        on_transition=metrics.on_breaker_transition,
        on_reject=metrics.on_breaker_reject,
    )
    fail(breaker, 2)
    for _ in range(4):
        with pytest.raises(BreakerOpen):
            breaker.before_call()
    await trio.sleep(5)
    breaker.before_call()
    breaker.record_failure()
    await trio.sleep(5)
    breaker.before_call()
    breaker.record_success()
    snap = metrics.snapshot()
    assert snap["breaker_transitions[breaker=ozone,to=open]"] == 2
    assert snap["breaker_transitions[breaker=ozone,to=half_open]"] == 2
    assert snap["breaker_transitions[breaker=ozone,to=closed]"] == 1
    assert snap["breaker_rejections[breaker=ozone]"] == 4
    assert metrics.total("breaker_transitions") == 5
