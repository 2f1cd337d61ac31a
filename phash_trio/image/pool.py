"""Hash images on every core: a pool of worker processes, awaited from Trio without blocking.

Threads cannot do it: libjpeg is called under a global lock (jpeglib's build is not
thread-safe) and much of the numpy work holds the GIL, so two hash threads get ~1.2x of one.
:class:`HashPool` runs :func:`~phash_trio.image.meanhash.mean_hash` in a
:class:`~concurrent.futures.ProcessPoolExecutor` instead (``HASH_PROCESSES`` workers), or in
Trio worker threads as before when ``processes`` is 0 (small machines, tests).

Workers come from a *forkserver*, never a plain fork (the service has threads by then): the
server is a fresh interpreter that imports the hashing code once, so a worker forked from it
starts in milliseconds, also when the pool is rebuilt. Each worker ignores SIGINT (Ctrl-C reaches
the whole process group; the service drains and closes the pool itself), exits when the service
process is gone, and hashes a tiny JPEG before its first job so that job is not slowed by
loading libjpeg.

A worker that dies (killed, e.g. by the OOM killer) breaks the whole executor and fails every job
in it. The pool logs one line, counts ``errors{kind="hash_worker_died"}``, starts a fresh
executor and runs the failed jobs once more, so blobs that were only in the wrong place at the
wrong time still get hashed. A job that meets a broken pool twice raises
:class:`HashWorkerDied`, an :class:`~phash_trio.image.meanhash.ImageError`: the pipeline counts that
blob as bad and moves on instead of retrying the post (a poison blob would kill the pool on
every attempt). If the workers of a fresh executor die before running one job, restarting cannot
help: :class:`HashPoolBroken` stops the service loudly instead of marking every blob bad.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import TypeVar

import trio
from loguru import logger

from phash_trio.config import Settings
from phash_trio.image.meanhash import ImageError, mean_hash
from phash_trio.metrics import Metrics

__all__ = ["HashPool", "HashPoolBroken", "HashPoolClosed", "HashWorkerDied"]

T = TypeVar("T")

#: Tries of one job when the pool breaks under it: the first break may be a neighbour's fault.
_ATTEMPTS = 2


class HashWorkerDied(ImageError):
    """The worker process died twice while hashing this blob; treated as a bad blob."""


class HashPoolClosed(RuntimeError):
    """The pool was closed (the service is stopping); no more jobs are taken."""


class HashPoolBroken(RuntimeError):
    """Worker processes die before running a single job (a broken install, no memory): fatal."""


def _watch_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()
        os._exit(0)  # the service is gone: nobody will ever read our results


def _init_worker() -> None:
    """Worker start-up: ignore Ctrl-C, die with the service, warm the JPEG path."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, name="parent-watch", daemon=True).start()
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (90, 140, 200)).save(buf, "JPEG")
    try:
        mean_hash(buf.getvalue())
    except Exception as exc:  # pragma: no cover - a warm-up is never worth a dead worker
        logger.warning("hash worker warm-up failed: {!r}", exc)


def _mp_context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # Imported once in the server, inherited by every worker it forks.
        ctx.set_forkserver_preload(["phash_trio.image.pool"])
        return ctx
    return multiprocessing.get_context("spawn")


async def _wait(future: Future[T]) -> T:
    """The future's result, waking Trio from the executor's thread instead of blocking one."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: Future[T]) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)
    try:
        await done.wait()
    finally:
        future.cancel()  # no-op once a worker has it; drops a job still queued
    return future.result()


class HashPool:
    """``mean_hash`` in ``processes`` worker processes, or in up to ``threads`` threads if 0."""

    def __init__(self, processes: int, *, threads: int = 1, metrics: Metrics | None = None) -> None:
        if processes < 0 or threads < 1:
            raise ValueError(f"need processes >= 0 and threads >= 1, got {processes}, {threads}")
        self.processes = processes
        self._metrics = metrics
        self._closed = False
        # Two jobs in flight per worker: one running, one queued, so a worker never idles
        # waiting for Trio to hand it the next job.
        self._limiter = trio.CapacityLimiter(2 * processes if processes else threads)
        self._executor: ProcessPoolExecutor | None = None
        #: Set once a worker of the current executor has run a job: it can start at all.
        self._started = threading.Event()
        if processes:
            self._start_executor()

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> HashPool:
        return cls(
            settings.hash_processes, threads=settings.effective_hash_threads, metrics=metrics
        )

    def _start_executor(self) -> None:
        executor = ProcessPoolExecutor(
            self.processes, mp_context=_mp_context(), initializer=_init_worker
        )
        started = threading.Event()

        def check(future: Future[int]) -> None:
            if not future.cancelled() and future.exception() is None:
                started.set()

        # Start every worker now (the executor spawns them on demand), so the first images
        # do not wait for start-up.
        for _ in range(self.processes):
            executor.submit(os.getpid).add_done_callback(check)
        self._executor, self._started = executor, started

    async def hash(self, data: bytes, *, max_pixels: int, max_bytes: int) -> int:
        """:func:`~phash_trio.image.meanhash.mean_hash` of ``data``; its :class:`ImageError` unchanged."""
        return await self.call(partial(mean_hash, data, max_pixels=max_pixels, max_bytes=max_bytes))

    async def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a worker (it must pickle in process mode); what ``hash`` is built on."""
        if self._closed:
            raise HashPoolClosed("the hash pool is closed")
        if self._executor is None:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter)
        async with self._limiter:
            for attempt in range(1, _ATTEMPTS + 1):
                executor = self._executor
                try:
                    return await _wait(executor.submit(fn))
                except BrokenProcessPool as exc:
                    self._replace(executor, exc)
                    if attempt == _ATTEMPTS:
                        raise HashWorkerDied(
                            f"the hash worker died {_ATTEMPTS} times on this image ({exc})"
                        ) from None
                except (CancelledError, RuntimeError):
                    if self._closed:  # closed while this job was queued
                        raise HashPoolClosed("the hash pool is closed") from None
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _replace(self, broken: ProcessPoolExecutor, exc: BaseException) -> None:
        """Swap in a fresh executor, once per break however many jobs saw it."""
        if self._closed or broken is not self._executor:
            return
        broken.shutdown(wait=False, cancel_futures=True)
        if not self._started.is_set():
            # Not one job ever ran: restarting would fail the same way for every image.
            raise HashPoolBroken(f"hash worker processes cannot start: {exc} (see the log above)")
        logger.error(
            "hash worker process died ({}); starting {} fresh workers", exc, self.processes
        )
        if self._metrics is not None:
            self._metrics.errors.labels(kind="hash_worker_died").inc()
        self._start_executor()

    def worker_pids(self) -> list[int]:
        """Pids of the live worker processes (empty in thread mode); for diagnostics and tests."""
        if self._executor is None:
            return []
        return sorted(self._executor._processes or ())

    def close(self) -> None:
        """Stop the workers without waiting; jobs still queued are cancelled."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
