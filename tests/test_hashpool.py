"""HashPool: real worker processes (and the thread mode), bundled images, real crashes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
from loguru import logger

from phash_trio.config import ConfigError, Settings, load_settings
from phash_trio.image.meanhash import (
    CorruptImage,
    ImageError,
    ImageTooLarge,
    UnsupportedImage,
    mean_hash,
)
from phash_trio.image.pool import HashPool, HashPoolClosed, HashWorkerDied, ImageTimeout
from phash_trio.runtime.metrics import Metrics
from phash_trio.testing import hostile
from phash_trio.testing.capture import IMAGES_DIR
from phash_trio.testing.sandbox import die_by_signal, sleep_for

LIMITS = {"max_pixels": 25_000_000, "max_bytes": 2_000_000}
GOOD = sorted(p for p in Path(IMAGES_DIR).iterdir() if p.stem not in ("truncated", "not-an-image"))
BAD = {
    "truncated.jpg": CorruptImage,
    "not-an-image.jpg": UnsupportedImage,
}


def worker_deaths(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("phash_errors_total", {"kind": "hash_worker_died"})
    return value or 0.0


@pytest.fixture
def pool(metrics: Metrics) -> Iterator[HashPool]:
    hash_pool = HashPool(2, metrics=metrics)
    yield hash_pool
    hash_pool.close()


async def hash_all(hash_pool: HashPool, blobs: list[bytes]) -> list[int]:
    """Hash every blob from its own Trio task; results in input order."""
    results: list[int] = [0] * len(blobs)

    async def one(i: int) -> None:
        results[i] = await hash_pool.hash(blobs[i], **LIMITS)

    async with trio.open_nursery() as nursery:
        for i in range(len(blobs)):
            nursery.start_soon(one, i)
    return results


async def test_process_hashes_equal_in_process_hashes(pool: HashPool) -> None:
    """Every bundled image hashes in a worker process to exactly the in-process mean_hash."""
    blobs = [p.read_bytes() for p in GOOD]
    assert len(blobs) >= 9
    assert await hash_all(pool, blobs) == [mean_hash(b) for b in blobs]
    assert len(pool.worker_pids()) == 2
    assert os.getpid() not in pool.worker_pids()


@pytest.mark.parametrize("processes", [2, 0])
async def test_typed_errors_keep_class_and_message(processes: int) -> None:
    """Bad images raise the same ImageError subclass and message as in-process, in both modes."""
    hash_pool = HashPool(processes, threads=2)
    try:
        for name, kind in BAD.items():
            data = (Path(IMAGES_DIR) / name).read_bytes()
            with pytest.raises(kind) as local:
                mean_hash(data, **LIMITS)
            with pytest.raises(kind) as remote:
                await hash_pool.hash(data, **LIMITS)
            assert type(remote.value) is kind
            assert str(remote.value) == str(local.value)
        big = GOOD[0].read_bytes()
        with pytest.raises(ImageTooLarge, match=f"input is {len(big)} bytes, limit 100"):
            await hash_pool.hash(big, max_pixels=25_000_000, max_bytes=100)
    finally:
        hash_pool.close()


async def test_many_concurrent_hashes_complete(pool: HashPool) -> None:
    """Sixty hashes awaited from sixty Trio tasks all finish with the right values."""
    blobs = [GOOD[i % len(GOOD)].read_bytes() for i in range(60)]
    expected = {b: mean_hash(b) for b in set(blobs)}
    assert await hash_all(pool, blobs) == [expected[b] for b in blobs]


async def test_sigkilled_workers_are_replaced_and_jobs_rerun(
    pool: HashPool, metrics: Metrics
) -> None:
    """SIGKILLed workers cost one restart: the jobs in flight run again and the pool keeps going."""
    data = (Path(IMAGES_DIR) / "chelsea.jpg").read_bytes()
    expected = mean_hash(data)
    await pool.wait_ready()
    before = pool.worker_pids()
    assert len(before) == 2
    results: list[int] = []
    first_done = trio.Event()

    async def one() -> None:
        results.append(await pool.hash(data, **LIMITS))
        first_done.set()

    async with trio.open_nursery() as nursery:
        for _ in range(16):
            nursery.start_soon(one)
        await first_done.wait()  # the workers are busy with the next jobs now
        for pid in before:
            os.kill(pid, signal.SIGKILL)
    assert results == [expected] * 16
    # Each death under a job is counted once; with the compiled core a photo takes a few ms, so
    # a worker may be between two jobs when it is killed (replaced, no job died with it).
    assert worker_deaths(metrics) <= 2  # exact counting: test_job_that_kills_its_worker_twice
    after = pool.worker_pids()
    assert len(after) == 2 and not set(after) & set(before)
    assert await pool.hash(data, **LIMITS) == expected


async def test_job_that_kills_its_worker_twice_is_a_bad_image(
    pool: HashPool, metrics: Metrics
) -> None:
    """A job whose worker dies on both tries raises HashWorkerDied, an ImageError; hashing goes on."""
    with pytest.raises(HashWorkerDied, match="died 2 times") as info:
        await pool.call(partial(os._exit, 1))
    assert isinstance(info.value, ImageError)
    assert worker_deaths(metrics) == 2
    data = GOOD[0].read_bytes()
    assert await pool.hash(data, **LIMITS) == mean_hash(data)


async def test_thread_mode_hashes_in_this_process() -> None:
    """HASH_PROCESSES=0 hashes in threads of this process, with the same results."""
    settings = load_settings({"HASH_PROCESSES": "0", "HASH_THREADS": "3"}, env_file=None)
    hash_pool = HashPool.from_settings(settings)
    try:
        assert hash_pool.processes == 0 and hash_pool.worker_pids() == []
        assert await hash_pool.call(os.getpid) == os.getpid()
        blobs = [p.read_bytes() for p in GOOD] * 2
        assert await hash_all(hash_pool, blobs) == [mean_hash(b) for b in blobs]
    finally:
        hash_pool.close()


async def test_closed_pool_refuses_jobs(pool: HashPool) -> None:
    """After close() a hash raises HashPoolClosed instead of hanging."""
    pool.close()
    with pytest.raises(HashPoolClosed):
        await pool.hash(GOOD[0].read_bytes(), **LIMITS)


async def test_close_lets_the_running_image_finish(pool: HashPool) -> None:
    """close() refuses new jobs but the job in flight finishes; then every worker exits."""
    await pool.wait_ready()
    pids = pool.worker_pids()
    results: list[float] = []

    async def slow() -> None:
        results.append(await pool.call(partial(sleep_for, 0.6)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow)
        await trio.sleep(0.2)
        pool.close()
        with pytest.raises(HashPoolClosed):
            await pool.call(partial(sleep_for, 0.0))
    assert results == [0.6]
    deadline = trio.current_time() + 10
    while [pid for pid in pids if await trio.Path(f"/proc/{pid}").exists()]:
        assert trio.current_time() < deadline, "workers still running after close()"
        await trio.sleep(0.05)


def test_hash_processes_defaults_to_one_per_core() -> None:
    """HASH_PROCESSES defaults to the number of cores and accepts 0 but nothing negative."""
    assert Settings().hash_processes == (os.cpu_count() or 1)
    assert (
        load_settings({"HASH_PROCESSES": ""}, env_file=None).hash_processes
        == Settings().hash_processes
    )
    with pytest.raises(ConfigError, match="HASH_PROCESSES: -1 is below the minimum 0"):
        load_settings({"HASH_PROCESSES": "-1"}, env_file=None)


def error_count(metrics: Metrics, kind: str) -> float:
    return metrics.registry.get_sample_value("phash_errors_total", {"kind": kind}) or 0.0


@pytest.mark.parametrize("signum", [signal.SIGSEGV, signal.SIGABRT, signal.SIGKILL])
async def test_crashing_job_fails_alone_beside_good_ones(
    pool: HashPool, metrics: Metrics, signum: int
) -> None:
    """A job that crashes its worker (segfault, abort, kill) fails alone with HashWorkerDied
    after one retry; the twelve images hashed beside it all get their right hashes."""
    blobs = [GOOD[i % len(GOOD)].read_bytes() for i in range(12)]
    expected = [mean_hash(b) for b in blobs]
    got: list[int | None] = [None] * len(blobs)
    crash: list[BaseException] = []

    async def good(i: int) -> None:
        got[i] = await pool.hash(blobs[i], **LIMITS)

    async def bad() -> None:
        try:
            await pool.call(partial(die_by_signal, signum))
        except HashWorkerDied as exc:
            crash.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bad)
        for i in range(len(blobs)):
            nursery.start_soon(good, i)
    assert got == expected
    assert len(crash) == 1 and signal.Signals(signum).name in str(crash[0])
    assert worker_deaths(metrics) == 2
    assert len(pool.worker_pids()) <= 2
    assert await pool.hash(blobs[0], **LIMITS) == expected[0]


async def test_slow_job_times_out_alone(metrics: Metrics) -> None:
    """A job past HASH_TIMEOUT_SECS fails with ImageTimeout (an ImageError) and its worker is
    killed; images hashed meanwhile are fine and the pool keeps working."""
    hash_pool = HashPool(2, metrics=metrics, timeout=1.0)
    try:
        data = GOOD[0].read_bytes()
        assert await hash_pool.hash(data, **LIMITS) == mean_hash(data)  # workers are up
        slow_pids = set(hash_pool.worker_pids())
        outcome: list[BaseException] = []
        hashes: list[int] = []

        async def slow() -> None:
            start = trio.current_time()
            with pytest.raises(ImageTimeout, match="longer than 1 s") as info:
                await hash_pool.call(partial(sleep_for, 30.0))
            assert 1.0 <= trio.current_time() - start < 5.0
            outcome.append(info.value)

        async def good() -> None:
            for _ in range(5):
                hashes.append(await hash_pool.hash(data, **LIMITS))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            nursery.start_soon(good)
        assert isinstance(outcome[0], ImageError)
        assert hashes == [mean_hash(data)] * 5
        assert error_count(metrics, "hash_timeout") == 1
        assert await hash_pool.hash(data, **LIMITS) == mean_hash(data)
        assert slow_pids - set(hash_pool.worker_pids())  # the slow job's worker is gone
    finally:
        hash_pool.close()


async def test_cancelled_job_kills_its_worker(pool: HashPool) -> None:
    """Cancelling a job (a caller's deadline) kills its worker; the next job still runs."""
    data = GOOD[0].read_bytes()
    assert await pool.hash(data, **LIMITS) == mean_hash(data)
    before = set(pool.worker_pids())
    with trio.move_on_after(0.5):
        await pool.call(partial(sleep_for, 30.0))
    assert len(before - set(pool.worker_pids())) == 1
    assert await pool.hash(data, **LIMITS) == mean_hash(data)


async def test_library_noise_on_fd2_is_logged_as_a_record(
    pool: HashPool, metrics: Metrics, capfd: pytest.CaptureFixture[str]
) -> None:
    """libtiff's raw fd-2 text from a worker becomes one structured log record, never raw
    output on the service's stderr."""
    records: list[dict[str, object]] = []
    sink = logger.add(lambda m: records.append(dict(m.record["extra"])), level="WARNING")
    try:
        with pytest.raises(CorruptImage):
            await pool.hash(hostile.tiff_strip(), **LIMITS)
    finally:
        logger.remove(sink)
    noisy = [r for r in records if "stderr" in r]
    assert len(noisy) == 1
    assert "Using code not yet in table" in str(noisy[0]["stderr"])
    assert noisy[0]["worker_pid"] in pool.worker_pids()
    assert error_count(metrics, "hash_worker_stderr") == 1
    assert "Using code" not in capfd.readouterr().err


def test_hash_timeout_setting() -> None:
    """HASH_TIMEOUT_SECS defaults to 10 s, is read as a float and reaches the pool."""
    assert Settings().hash_timeout_secs == 10.0
    settings = load_settings({"HASH_TIMEOUT_SECS": "2.5", "HASH_PROCESSES": "0"}, env_file=None)
    assert HashPool.from_settings(settings).timeout == 2.5
    with pytest.raises(ConfigError, match="HASH_TIMEOUT_SECS"):
        load_settings({"HASH_TIMEOUT_SECS": "0"}, env_file=None)
