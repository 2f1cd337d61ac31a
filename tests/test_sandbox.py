"""The child-process sandbox: each way a child can end is reported, with its cost."""

from __future__ import annotations

import math
import signal
from functools import partial

from phash_trio.testing.sandbox import allocate, die_by_signal, run_limited, sleep_for, spin


def test_returned_value_and_cost() -> None:
    """A normal return comes back with its value, its CPU time and a peak RSS."""
    out = run_limited(math.factorial, 20)
    assert out.status == "returned" and out.value == math.factorial(20)
    assert out.call_cpu_secs is not None and out.call_cpu_secs < 1
    assert 5 << 20 < out.max_rss_bytes < 300 << 20


def test_raised_exception_is_named_with_its_bases() -> None:
    """An exception is reported by class name and MRO, message in one string."""
    out = run_limited(int, "not a number")
    assert out.status == "raised" and out.error_type == "builtins.ValueError"
    assert out.raised("ValueError") and out.raised("Exception")
    assert "not a number" in out.message


def test_memory_limit_turns_a_big_allocation_into_memory_error() -> None:
    """RLIMIT_AS makes a 600 MB allocation fail inside a 300 MB limit; peak stays below it."""
    out = run_limited(allocate, 600, mem_bytes=300 << 20)
    assert out.raised("MemoryError"), out
    assert out.max_rss_bytes < 300 << 20


def test_crash_is_reported_as_a_signal() -> None:
    """A segfaulting child is 'signalled' with SIGSEGV, not an exception in the parent."""
    out = run_limited(die_by_signal, signal.SIGSEGV)
    assert out.status == "signalled" and out.signal == signal.SIGSEGV


def test_cpu_limit_kills_a_spinning_child() -> None:
    """RLIMIT_CPU ends a child that computes past its CPU seconds with SIGXCPU."""
    out = run_limited(spin, 30.0, cpu_secs=1, wall_secs=20)
    assert out.status == "signalled" and out.signal in (signal.SIGXCPU, signal.SIGKILL)
    assert 0.9 < out.cpu_secs < 5


def test_wall_clock_limit_kills_a_sleeping_child() -> None:
    """A child that sleeps past the wall-clock limit is killed and reported as timed out."""
    out = run_limited(partial(sleep_for, 30.0), wall_secs=1.0)
    assert out.status == "timed_out" and 1.0 <= out.wall_secs < 5
