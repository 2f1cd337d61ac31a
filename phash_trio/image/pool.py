"""Hash images on every core: worker processes, one job each at a time, awaited from Trio.

Threads cannot do it (much of the decoding holds the GIL). :class:`HashPool` keeps
``HASH_PROCESSES`` worker processes and gives each **one job at a time** over its own pipe, so
whatever happens to a worker concerns exactly one blob:

* a job that runs past ``HASH_TIMEOUT_SECS`` (wall clock, measured in Trio) gets its worker
  SIGKILLed and fails alone with :class:`ImageTimeout`;
* a worker that dies under a job (a segfault in a C decoder, ``os.abort``, the OOM killer) fails
  that job only; it runs once more in a fresh worker (the OOM killer may have picked the wrong
  process) and, if that worker dies too, fails with :class:`HashWorkerDied`. Blobs hashed by
  the other workers meanwhile are never touched: a crashing image posted beside a listed one
  cannot hide it;
* a cancelled job (the caller's deadline) kills its worker: its state is unknown.

Both errors are :class:`~phash_trio.image.decode.ImageError` subclasses: the pipeline counts the
blob as bad and moves on. Workers are started and reaped in threads, never on the Trio loop,
from a *forkserver* that imported the hashing code once (a fresh worker is ready in
milliseconds). A worker whose start-up fails raises :class:`HashPoolBroken`, which stops the
service loudly: restarting cannot help a broken install.

Each worker points its fd 2 at a private file, so C libraries (libtiff's "TIFFFillTile: ...")
and Python warnings never write raw text into the service's JSON log stream; after each job
the pool logs what was written there as one structured record (``stderr=...``). The file also
keeps the last words of a worker that crashed (faulthandler's traceback).

``processes=0`` hashes in Trio worker threads instead (small machines, tests): no isolation,
no time limit (a thread cannot be stopped) and no capture of library noise.

Why not ``trio-parallel``: it gives the same one-job-per-worker isolation and kill-on-cancel,
but not the fd-2 capture with crash tails, the forkserver preload or the death watch on the
service process, and it starts workers lazily on first use; the pool here is ~300 lines.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import multiprocessing
import os
import pickle
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import trio
from loguru import logger

from phash_trio.config import Settings
from phash_trio.image.allocator import tune_allocator
from phash_trio.image.meanhash import ImageError, mean_hash
from phash_trio.runtime.metrics import Metrics

__all__ = [
    "HashPool",
    "HashPoolBroken",
    "HashPoolClosed",
    "HashWorkerDied",
    "ImageTimeout",
]

T = TypeVar("T")

#: Tries of one job whose worker dies under it: the first death may be someone else's fault.
_ATTEMPTS = 2
#: How long a fresh worker may take to import, warm up and report ready.
_START_TIMEOUT = 60.0
#: Most characters of captured stderr logged per job.
_STDERR_LOG_CHARS = 2000


class HashWorkerDied(ImageError):
    """The worker process died twice while hashing this blob; treated as a bad blob."""


class ImageTimeout(ImageError):
    """Hashing this blob took longer than the time limit; its worker was killed."""


class HashPoolClosed(RuntimeError):
    """The pool was closed (the service is stopping); no more jobs are taken."""


class HashPoolBroken(RuntimeError):
    """Worker processes die before they are ready (a broken install, no memory): fatal."""


# ----------------------------------------------------------------------------- worker side


def _watch_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()
        os._exit(0)  # the service is gone: nobody will ever read our results


class _Fd2Capture:
    """fd 2 of this process goes to ``path``; :meth:`drain` returns and clears what came."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stderr = io.TextIOWrapper(
            os.fdopen(os.dup(2), "wb", buffering=0), errors="replace", write_through=True
        )

    def drain(self) -> str:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        size = os.lseek(2, 0, os.SEEK_END)
        data = os.pread(2, min(size, 64 << 10), 0) if size else b""
        os.ftruncate(2, 0)
        os.lseek(2, 0, os.SEEK_SET)
        text = data.decode("utf-8", "replace").strip()
        return text + (" [...]" if size > len(data) else "")


def _warm_up() -> None:
    """Hash a tiny JPEG so the first real job does not pay for loading the decoders."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (90, 140, 200)).save(buf, "JPEG")
    mean_hash(buf.getvalue())


def _worker_main(jobs: Connection, results: Connection, capture_path: str) -> None:
    """A worker: report ready, then answer one pickled callable at a time until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the service's to handle
    tune_allocator()
    threading.Thread(target=_watch_parent, name="parent-watch", daemon=True).start()
    capture = _Fd2Capture(capture_path)
    faulthandler.enable()  # a crash leaves its traceback in the capture file
    _warm_up()
    results.send_bytes(pickle.dumps(("ready", os.getpid(), capture.drain())))
    while True:
        try:
            payload = jobs.recv_bytes()
        except (EOFError, OSError):
            return
        reply: tuple[str, Any]
        try:
            reply = ("ok", pickle.loads(payload)())
        except BaseException as exc:  # everything goes back to the caller
            reply = ("error", exc)
        text = capture.drain()
        try:
            message = pickle.dumps((*reply, text))
        except Exception as exc:  # an unpicklable result or exception
            message = pickle.dumps(("error", RuntimeError(f"unpicklable reply: {exc!r}"), text))
        results.send_bytes(message)


# ----------------------------------------------------------------------------- parent side


def _mp_context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # Imported once in the server, inherited by every worker it forks.
        ctx.set_forkserver_preload(["phash_trio.image.pool"])
        return ctx
    return multiprocessing.get_context("spawn")


class _Died(Exception):
    """The worker's pipe closed under a job: it died (the message says how)."""


class _Worker:
    """One worker process and its two pipes. Built in a thread (it blocks until ready)."""

    def __init__(self, ctx: multiprocessing.context.BaseContext) -> None:
        fd, name = tempfile.mkstemp(prefix="phash-hash-worker-", suffix=".stderr")
        os.close(fd)
        self.capture = Path(name)
        child_jobs, self._jobs = ctx.Pipe(duplex=False)
        self._results, child_results = ctx.Pipe(duplex=False)
        process: Any = ctx.Process(  # type: ignore[attr-defined]
            target=_worker_main,
            args=(child_jobs, child_results, name),
            name="phash-hash-worker",
            daemon=True,
        )
        self.process = process
        self.alive = True
        self.startup_stderr = ""
        try:
            process.start()
        except BaseException:
            self.reap()
            raise
        finally:
            child_jobs.close()
            child_results.close()
        self.pid: int = process.pid
        if not self._results.poll(_START_TIMEOUT):
            self.reap()
            raise HashPoolBroken(f"a hash worker did not start within {_START_TIMEOUT:g} s")
        try:
            _, self.pid, self.startup_stderr = pickle.loads(self._results.recv_bytes())
        except (EOFError, OSError):
            how = self.describe()
            self.reap()
            raise HashPoolBroken(f"a hash worker died while starting: {how}") from None

    def _exchange(self, payload: bytes) -> tuple[str, Any, str]:
        """Blocking send + receive (runs in a Trio worker thread, never on the loop)."""
        self._jobs.send_bytes(payload)
        reply: tuple[str, Any, str] = pickle.loads(self._results.recv_bytes())
        return reply

    async def run(self, payload: bytes, limit: float) -> tuple[str, Any, str]:
        """One job: its reply, :class:`_Died`, or ``trio.TooSlowError`` after ``limit`` s."""
        with trio.move_on_after(limit) as scope:
            try:
                return await trio.to_thread.run_sync(
                    self._exchange, payload, abandon_on_cancel=True
                )
            except (EOFError, OSError):
                self.kill()
                raise _Died(await trio.to_thread.run_sync(self.describe)) from None
            except BaseException:  # cancelled: the worker's state is unknown (the thread
                self.kill()  # left blocked in recv gets EOF from the kill and ends)
                raise
        assert scope.cancelled_caught
        raise trio.TooSlowError

    def kill(self) -> None:
        """SIGKILL without waiting (:meth:`reap` collects it, in a thread)."""
        self.alive = False
        with contextlib.suppress(ProcessLookupError, AttributeError, ValueError, OSError):
            self.process.kill()

    def describe(self) -> str:
        """How the process ended, with the tail of what it wrote to fd 2 (blocking)."""
        self.process.join(timeout=1.0)
        code = self.process.exitcode
        if code is None:
            how = "still running"
        elif code < 0:
            how = f"killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with status {code}"
        tail = self.stderr_tail()
        return f"pid {self.pid} {how}" + (f"; stderr: {tail}" if tail else "")

    def stderr_tail(self) -> str:
        try:
            data = self.capture.read_bytes()[-600:]
        except OSError:
            return ""
        return " | ".join(line.strip() for line in data.decode("utf-8", "replace").splitlines())

    def reap(self) -> None:
        """Kill, wait for the process, close the pipes, drop the capture file (blocking)."""
        self.kill()
        with contextlib.suppress(ValueError, AssertionError):
            self.process.join(timeout=5.0)
        for conn in (self._jobs, self._results):
            with contextlib.suppress(OSError):
                conn.close()
        self.capture.unlink(missing_ok=True)


class HashPool:
    """``mean_hash`` in ``processes`` worker processes (one job each), or threads if 0."""

    def __init__(
        self,
        processes: int,
        *,
        threads: int = 1,
        metrics: Metrics | None = None,
        timeout: float = 10.0,
    ) -> None:
        if processes < 0 or threads < 1 or timeout <= 0:
            raise ValueError(
                f"need processes >= 0, threads >= 1, timeout > 0;"
                f" got {processes}, {threads}, {timeout}"
            )
        self.processes = processes
        self.timeout = timeout
        self._metrics = metrics
        self._closed = False
        self._limiter = trio.CapacityLimiter(processes or threads)
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._ctx = _mp_context() if processes else None
        self._start_error: BaseException | None = None
        self._started = threading.Event()
        if processes:
            threading.Thread(target=self._prestart, name="hash-pool-start", daemon=True).start()
        else:
            tune_allocator()  # the images are decoded in this process
            self._started.set()

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> HashPool:
        return cls(
            settings.hash_processes,
            threads=settings.effective_hash_threads,
            metrics=metrics,
            timeout=settings.hash_timeout_secs,
        )

    def _prestart(self) -> None:
        """Start every worker now (in this thread), so the first images do not wait."""
        try:
            for _ in range(self.processes):
                if self._closed:
                    break
                self._idle.append(self._new_worker())
        except BaseException as exc:
            self._start_error = exc
        finally:
            self._started.set()

    def _new_worker(self) -> _Worker:
        assert self._ctx is not None
        worker = _Worker(self._ctx)
        if worker.startup_stderr:
            self._log_stderr(worker, worker.startup_stderr)
        return worker

    async def hash(self, data: bytes, *, max_pixels: int, max_bytes: int) -> int:
        """:func:`~phash_trio.image.meanhash.mean_hash` of ``data``; its :class:`ImageError`
        unchanged, :class:`ImageTimeout` or :class:`HashWorkerDied` when the worker fails."""
        return await self.call(partial(mean_hash, data, max_pixels=max_pixels, max_bytes=max_bytes))

    async def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a worker (it must pickle in process mode); what ``hash`` is built on."""
        if self._closed:
            raise HashPoolClosed("the hash pool is closed")
        if not self.processes:
            return await self._call_in_thread(fn)
        payload = pickle.dumps(fn)
        async with self._limiter:
            for attempt in range(1, _ATTEMPTS + 1):
                worker = await self._take_worker()
                self._busy.add(worker)
                try:
                    status, value, text = await worker.run(payload, self.timeout)
                except _Died as exc:
                    if self._closed:
                        raise HashPoolClosed("the hash pool is closed") from None
                    self._count("hash_worker_died")
                    logger.bind(worker_pid=worker.pid).error(
                        "hash worker died under a job (try {} of {}): {}", attempt, _ATTEMPTS, exc
                    )
                    if attempt == _ATTEMPTS:
                        raise HashWorkerDied(
                            f"the hash worker died {_ATTEMPTS} times on this image ({exc})"
                        ) from None
                    continue
                except trio.TooSlowError:
                    self._count("hash_timeout")
                    raise ImageTimeout(
                        f"hashing took longer than {self.timeout:g} s; worker killed"
                    ) from None
                finally:
                    self._busy.discard(worker)
                    self._release(worker)
                if text:
                    self._log_stderr(worker, text)
                if status == "error":
                    raise value
                result: T = value
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call_in_thread(self, fn: Callable[[], T]) -> T:
        # No time limit here: a thread cannot be stopped, and abandoning it would only pile
        # more CPU work onto the same cores. The limit needs process mode.
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    async def wait_ready(self) -> None:
        """Wait until the first workers are up; :class:`HashPoolBroken` if they cannot start."""
        if not self._started.is_set():
            await trio.to_thread.run_sync(self._started.wait)
        if self._start_error is not None:
            raise HashPoolBroken(f"hash workers cannot start: {self._start_error}")

    async def _take_worker(self) -> _Worker:
        """An idle live worker, or a fresh one started in a thread."""
        await self.wait_ready()
        if self._closed:
            raise HashPoolClosed("the hash pool is closed")
        while self._idle:
            worker = self._idle.pop()
            if worker.alive and worker.process.is_alive():
                return worker
            await trio.to_thread.run_sync(worker.reap)
        worker = await trio.to_thread.run_sync(self._new_worker)
        if self._closed:
            await trio.to_thread.run_sync(worker.reap)
            raise HashPoolClosed("the hash pool is closed")
        return worker

    def _release(self, worker: _Worker) -> None:
        if worker.alive and not self._closed:
            self._idle.append(worker)
        else:
            threading.Thread(target=worker.reap, name="hash-worker-reap", daemon=True).start()

    def _count(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.errors.labels(kind=kind).inc()

    def _log_stderr(self, worker: _Worker, text: str) -> None:
        self._count("hash_worker_stderr")
        logger.bind(worker_pid=worker.pid, stderr=text[:_STDERR_LOG_CHARS]).warning(
            "hash worker wrote to stderr"
        )

    def worker_pids(self) -> list[int]:
        """Pids of the live worker processes (empty in thread mode); for diagnostics and tests."""
        return sorted(w.pid for w in [*self._idle, *self._busy] if w.alive)

    def close(self) -> None:
        """No more jobs; idle workers stop now, busy ones once their current image is done
        (all reaped in threads, never waited for here)."""
        self._closed = True
        workers = list(self._idle)
        self._idle.clear()
        if workers:
            threading.Thread(
                target=_reap_all, args=(workers,), name="hash-pool-close", daemon=True
            ).start()


def _reap_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.reap()
