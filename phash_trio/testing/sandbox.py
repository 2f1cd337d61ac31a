"""Run a callable in a child process under memory, CPU and wall-clock limits; report what happened.

The hostile-input and fuzz suites need to know that a decode stays bounded *and* to survive it
when it does not: a 1.6 GB allocation or a segfault must fail a test, not the test runner. The
child is a fresh interpreter (``python -m phash_trio.testing.sandbox``) that sets
``RLIMIT_AS`` and ``RLIMIT_CPU`` on itself, unpickles ``fn`` and ``args`` from a file, runs
them, and pickles the outcome back. The parent reaps it with ``wait4``, so CPU time and peak
RSS are known even when the child was killed. Single-threaded BLAS keeps the address space
small enough for a tight ``RLIMIT_AS``.
"""

from __future__ import annotations

import os
import pickle
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "Outcome",
    "allocate",
    "die_by_signal",
    "peak_rss_bytes",
    "run_limited",
    "sleep_for",
    "spin",
]

_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@attrs.frozen
class Outcome:
    """How the child ended.

    ``status`` is ``returned`` (``value`` holds the result), ``raised`` (``error_type`` is the
    exception's qualified class name, ``bases`` its class names up the MRO), ``signalled``
    (``signal``; SIGXCPU means the CPU limit), ``exited`` (no report: ``exit_code``) or
    ``timed_out`` (killed at the wall-clock limit). ``cpu_secs`` and ``max_rss_bytes`` (peak RSS)
    cover the whole child, interpreter start included; ``call_cpu_secs`` only the call (``None`` if it did not finish).
    """

    status: str
    value: Any = None
    error_type: str | None = None
    bases: tuple[str, ...] = ()
    message: str = ""
    signal: int | None = None
    exit_code: int | None = None
    cpu_secs: float = 0.0
    call_cpu_secs: float | None = None
    max_rss_bytes: int = 0
    wall_secs: float = 0.0
    stderr: str = ""

    def raised(self, name: str) -> bool:
        """True if the call raised ``name`` or a subclass of it (by class name)."""
        return self.status == "raised" and name in self.bases


def run_limited(
    fn: Callable[..., Any],
    *args: Any,
    mem_bytes: int = 1 << 30,
    cpu_secs: int = 10,
    wall_secs: float = 30.0,
) -> Outcome:
    """``fn(*args)`` in a child process limited to ``mem_bytes`` of address space and
    ``cpu_secs`` of CPU, killed after ``wall_secs``. ``fn`` must pickle (a module-level name)."""
    with tempfile.TemporaryDirectory(prefix="phash-sandbox-") as tmp:
        job, result, err = Path(tmp, "job"), Path(tmp, "result"), Path(tmp, "stderr")
        job.write_bytes(pickle.dumps((fn, args, mem_bytes, cpu_secs, str(result))))
        env = {**os.environ, **_ENV}
        start = time.monotonic()
        with err.open("wb") as err_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "phash_trio.testing.sandbox", str(job)],
                stdin=subprocess.DEVNULL,
                stdout=err_file,
                stderr=err_file,
                env=env,
            )
        status, usage, timed_out, peak = _reap(proc, start + wall_secs)
        wall = time.monotonic() - start
        report = pickle.loads(result.read_bytes()) if result.exists() else {}
        common = {
            "cpu_secs": usage.ru_utime + usage.ru_stime,
            "max_rss_bytes": max(peak, report.pop("max_rss_bytes", 0)),
            "wall_secs": wall,
            "stderr": err.read_text(errors="replace")[-4000:],
        }
        if timed_out:
            return Outcome("timed_out", **common)
        if os.WIFSIGNALED(status):
            return Outcome("signalled", signal=os.WTERMSIG(status), **common)
        code = os.WEXITSTATUS(status)
        if not report:
            return Outcome("exited", exit_code=code, **common)
        return Outcome(exit_code=code, **report, **common)


def peak_rss_bytes(pid: int | str = "self") -> int:
    """``VmHWM`` of a process: its peak RSS since its last exec (0 if it is gone).

    Not ``ru_maxrss``: that one keeps the high-water mark of the forked parent across exec.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _reap(proc: subprocess.Popen[bytes], deadline: float) -> tuple[int, Any, bool, int]:
    """Wait for the child with ``wait4`` (its CPU time), polling its peak RSS; SIGKILL it at
    ``deadline``."""
    timed_out = False
    peak = 0
    while True:
        peak = max(peak, peak_rss_bytes(proc.pid))
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = status  # reaped here: keep Popen from waiting again
            return status, usage, timed_out, peak
        if time.monotonic() >= deadline and not timed_out:
            timed_out = True
            proc.kill()
        time.sleep(0.002)


def _child(job_path: str) -> None:
    fn, args, mem_bytes, cpu_secs, result_path = pickle.loads(Path(job_path).read_bytes())
    resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_secs, cpu_secs + 1))
    before = resource.getrusage(resource.RUSAGE_SELF)
    report: dict[str, Any]
    try:
        value = fn(*args)
    except BaseException as exc:  # report everything, MemoryError included
        kind = type(exc)
        report = {
            "status": "raised",
            "error_type": f"{kind.__module__}.{kind.__qualname__}",
            "bases": tuple(c.__name__ for c in kind.__mro__),
            "message": "".join(traceback.format_exception_only(exc)).strip()[:2000],
        }
    else:
        report = {"status": "returned", "value": value}
    after = resource.getrusage(resource.RUSAGE_SELF)
    report["call_cpu_secs"] = (after.ru_utime + after.ru_stime) - (
        before.ru_utime + before.ru_stime
    )
    report["max_rss_bytes"] = peak_rss_bytes()
    Path(result_path).write_bytes(pickle.dumps(report))


def die_by_signal(signum: int) -> None:
    """Kill the calling process with ``signum`` (crash tests submit this to a real worker)."""
    if signum == signal.SIGABRT:
        os.abort()
    os.kill(os.getpid(), signum)
    time.sleep(5)  # pragma: no cover - the signal ends us first


def allocate(megabytes: int) -> int:
    """Allocate and touch ``megabytes`` MB, return the size (memory-limit tests)."""
    block = bytearray(megabytes << 20)
    return len(block)


def spin(cpu_secs: float) -> int:
    """Burn ``cpu_secs`` of CPU time (CPU-limit tests); returns the loop count."""
    end = os.times().user + cpu_secs
    turns = 0
    while os.times().user < end:
        turns += 1
    return turns


def sleep_for(seconds: float) -> float:
    """Sleep, then return ``seconds`` (a job that hangs, for time-limit tests)."""
    time.sleep(seconds)
    return seconds


if __name__ == "__main__":
    _child(sys.argv[1])
