"""RedisStore against a real redis-server: cache, claims, caps, dead letters, health monitor."""

from __future__ import annotations

import socket

import pytest
import redis
import trio
from trio.testing import MockClock

from phash_trio.image.pdq import PdqHash
from phash_trio.image.signals import BlobSignals
from phash_trio.runtime.metrics import Metrics
from phash_trio.state.store import (
    DEAD_LETTER_KEY,
    CorruptDeadLetter,
    RedisCommandError,
    RedisStore,
    RedisUnavailable,
    backoff_delays,
    run_health_monitor,
)
from phash_trio.testing.redis_server import RedisProcess, free_port


@pytest.fixture
def thread_clock() -> MockClock:
    """Autojump clock that waits 0.1 s of real idleness before jumping.

    With threshold 0 the clock jumps while a Redis call is still in its worker thread (Trio
    sees every task blocked), so timing tests of thread-backed calls need a small cushion.
    """
    return MockClock(autojump_threshold=0.1)


def dead_url() -> str:
    """A loopback port where nothing listens: connection refused at once."""
    return f"redis://127.0.0.1:{free_port()}/0"


async def wait_until_unhealthy(store: RedisStore) -> None:
    with trio.fail_after(5):
        while store.healthy:  # noqa: ASYNC110 - the store offers no event for going down
            await trio.sleep(0.01)


# -- pure pieces ------------------------------------------------------------------------------


def test_backoff_delays_double_up_to_the_cap() -> None:
    """The reconnect schedule is 100 ms doubling, then the cap forever."""
    gen = backoff_delays(initial=0.1, maximum=10)
    assert [next(gen) for _ in range(10)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10, 10, 10]
    gen = backoff_delays(initial=0.1, maximum=0.05)
    assert [next(gen) for _ in range(2)] == [0.05, 0.05]
    with pytest.raises(ValueError, match="> 0"):
        next(backoff_delays(initial=0, maximum=1))


def test_constructor_rejects_bad_settings(metrics: Metrics) -> None:
    """A bad URL or thread count is a clear ValueError that does not echo the password."""
    with pytest.raises(ValueError, match="invalid Redis URL") as info:
        RedisStore("http://user:s3cret@host:1/0", metrics)
    assert "s3cret" not in str(info.value)
    with pytest.raises(ValueError, match="threads"):
        RedisStore("redis://127.0.0.1:1/0", metrics, threads=8, max_connections=4)


# -- hash cache -------------------------------------------------------------------------------


async def test_cache_roundtrip_stores_hex_with_ttl(store: RedisStore, raw: redis.Redis) -> None:
    """A cached hash comes back as the same int and sits in Redis as 16 hex digits with a TTL."""
    assert await store.cache_get("bafyone") is None
    await store.cache_set("bafyone", 0xFF, ttl=600)
    await store.cache_set("bafytwo", (1 << 64) - 1, ttl=600)
    assert await store.cache_get("bafyone") == 0xFF
    assert await store.cache_get("bafytwo") == (1 << 64) - 1
    assert raw.get("phash:bafyone") == "00000000000000ff"
    assert raw.get("phash:bafytwo") == "ffffffffffffffff"
    assert 599 <= raw.ttl("phash:bafyone") <= 600


async def test_cache_rejects_bad_values(store: RedisStore, raw: redis.Redis) -> None:
    """Out-of-range hashes and TTLs are refused; a malformed cached value reads as a miss."""
    with pytest.raises(ValueError, match="64-bit"):
        await store.cache_set("c", 1 << 64, ttl=10)
    with pytest.raises(ValueError, match="ttl"):
        await store.cache_set("c", 1, ttl=0)
    raw.set("phash:junk", "not-a-hash")
    assert await store.cache_get("junk") is None
    assert raw.get("phash:junk") == "not-a-hash"


async def test_cache_fails_open_when_redis_is_down(
    redis_proc: RedisProcess, store: RedisStore, metrics: Metrics
) -> None:
    """With Redis stopped, get is a quick miss and set a no-op; both count as failures."""
    await store.cache_set("warm", 1, ttl=60)  # a pooled connection that will go stale
    redis_proc.stop()
    with trio.fail_after(2):
        assert await store.cache_get("warm") is None
        await store.cache_set("warm", 2, ttl=60)
    assert metrics.total("redis_failures") == 2
    assert not store.healthy


async def test_calls_are_bounded_by_the_socket_timeout(metrics: Metrics) -> None:
    """Against a server that never answers, a call fails after the socket timeout, not later."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        store = RedisStore(f"redis://127.0.0.1:{port}/0", metrics, socket_timeout=0.2)
        try:
            with trio.fail_after(2):
                assert await store.cache_get("x") is None
                with pytest.raises(RedisUnavailable, match="claim k"):
                    await store.claim("k")
            assert metrics.total("redis_failures") == 2
            slow = RedisStore(f"redis://127.0.0.1:{port}/0", metrics, socket_timeout=30)
            try:
                with trio.fail_after(2), trio.move_on_after(0.05) as scope:
                    await slow.cache_get("x")
                assert scope.cancelled_caught
            finally:
                slow.close()
        finally:
            store.close()


# -- claims and daily counters ----------------------------------------------------------------


async def test_claim_is_set_nx_with_ttl_and_release(store: RedisStore, raw: redis.Redis) -> None:
    """The first claim wins, a second is refused until released; the default TTL is 7 days."""
    key = "claim:post:label:at://did:plc:abc/app.bsky.feed.post/1:spam"
    assert await store.claim(key) is True
    assert await store.claim(key) is False
    assert raw.get(key) == "1"
    assert 604790 <= raw.ttl(key) <= 604800
    await store.release(key)
    assert raw.exists(key) == 0
    assert await store.claim(key, ttl=30) is True
    assert 29 <= raw.ttl(key) <= 30


async def test_daily_counter_counts_expires_and_never_goes_negative(
    store: RedisStore, raw: redis.Redis
) -> None:
    """INCR per rule and day with a 2-day expiry; DECR stops at zero and creates nothing."""
    assert await store.incr_daily("0:spam", "2025-01-02") == 1
    assert await store.incr_daily("0:spam", "2025-01-02") == 2
    assert await store.incr_daily("0:spam", "2025-01-03") == 1
    assert await store.incr_daily("1:nsfw", "2025-01-02") == 1
    assert 172790 <= raw.ttl("actions:0:spam:2025-01-02") <= 172800
    await store.decr_daily("0:spam", "2025-01-02")
    assert raw.get("actions:0:spam:2025-01-02") == "1"
    await store.decr_daily("0:spam", "2025-01-02")
    await store.decr_daily("0:spam", "2025-01-02")
    assert raw.get("actions:0:spam:2025-01-02") == "0"
    await store.decr_daily("2:none", "2025-01-02")
    assert raw.exists("actions:2:none:2025-01-02") == 0
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        await store.incr_daily("0:spam", "2025/01/02")


async def test_command_error_is_not_an_outage(
    store: RedisStore, raw: redis.Redis, metrics: Metrics
) -> None:
    """A command Redis refuses raises RedisCommandError at once, even through until_healthy."""
    raw.rpush("actions:0:spam:2025-01-02", "x")
    with trio.fail_after(2), pytest.raises(RedisCommandError, match="WRONGTYPE"):
        await store.until_healthy(lambda: store.incr_daily("0:spam", "2025-01-02"), "cap")
    assert store.healthy
    assert metrics.total("redis_failures") == 1


# -- dead letters -----------------------------------------------------------------------------


async def test_dead_letters_push_list_pop_purge_count(store: RedisStore) -> None:
    """Dead letters keep order and content through push, list, pop, count and purge."""
    letters = [
        {"uri": f"at://did:plc:x/app.bsky.feed.post/{i}", "n": i, "é": [i]} for i in range(3)
    ]
    for letter in letters:
        await store.push_dead_letter(letter)
    assert await store.count_dead_letters() == 3
    assert await store.list_dead_letters() == letters
    assert await store.list_dead_letters(1, 1) == [letters[1]]
    assert await store.pop_dead_letter() == letters[0]
    assert await store.count_dead_letters() == 2
    assert await store.purge_dead_letters() == 2
    assert await store.count_dead_letters() == 0
    assert await store.pop_dead_letter() is None
    assert await store.purge_dead_letters() == 0


async def test_bad_dead_letters_are_reported_and_kept(store: RedisStore, raw: redis.Redis) -> None:
    """A non-JSON entry is a clear error naming its index and stays; bad payloads push nothing."""
    await store.push_dead_letter({"ok": 1})
    raw.rpush(DEAD_LETTER_KEY, "not json")
    with pytest.raises(CorruptDeadLetter, match="index 1"):
        await store.list_dead_letters()
    assert await store.pop_dead_letter() == {"ok": 1}
    with pytest.raises(CorruptDeadLetter, match="index 0") as info:
        await store.pop_dead_letter()
    assert info.value.raw == "not json"
    assert raw.lrange(DEAD_LETTER_KEY, 0, -1) == ["not json"]
    with pytest.raises(TypeError, match="JSON-serialisable"):
        await store.push_dead_letter({"when": object()})
    assert await store.count_dead_letters() == 1


# -- health -----------------------------------------------------------------------------------


async def test_wait_healthy_returns_at_once_when_healthy(store: RedisStore) -> None:
    """A healthy store does not wait."""
    with trio.fail_after(1):
        await store.wait_healthy()
        await store.ping()


async def test_until_healthy_waits_out_an_outage(
    redis_proc: RedisProcess, store: RedisStore, raw: redis.Redis, metrics: Metrics
) -> None:
    """A claim made while Redis is down completes once Redis is back, not before."""
    restarted = False

    async def restart_later() -> None:
        nonlocal restarted
        await trio.sleep(0.3)
        # Set before start() returns: the claim may complete as soon as Redis answers.
        restarted = True
        await trio.to_thread.run_sync(redis_proc.start)

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_health_monitor(
                store, interval=0.05, max_backoff=0.1, task_status=task_status
            )
        )
        redis_proc.stop()
        nursery.start_soon(restart_later)
        with trio.fail_after(10):
            taken = await store.until_healthy(lambda: store.claim("claim:x"), "claim claim:x")
        assert restarted
        assert taken is True
        assert raw.get("claim:x") == "1"
        assert metrics.total("redis_reconnects") == 1
        nursery.cancel_scope.cancel()


async def test_monitor_flips_health_and_metrics(
    redis_proc: RedisProcess, store: RedisStore, metrics: Metrics, log_lines: list[str]
) -> None:
    """The monitor notices an outage and the recovery, with gauge, counter and one line each."""
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_health_monitor(
                store, interval=0.05, max_backoff=0.1, task_status=task_status
            )
        )
        with trio.fail_after(5):
            while metrics.snapshot()["redis_healthy"] != 1:  # noqa: ASYNC110 - a gauge
                await trio.sleep(0.01)
        assert store.healthy
        redis_proc.stop()
        await wait_until_unhealthy(store)
        assert metrics.snapshot()["redis_healthy"] == 0
        redis_proc.start()
        with trio.fail_after(5):
            await store.wait_healthy()
        assert metrics.snapshot()["redis_healthy"] == 1
        assert metrics.total("redis_reconnects") == 1
        assert metrics.total("redis_failures") >= 1
        nursery.cancel_scope.cancel()
    assert sum("unavailable during PING" in line for line in log_lines) == 1
    assert sum(" is back after " in line for line in log_lines) == 1


async def test_startup_with_redis_down_then_up(
    redis_proc: RedisProcess, store: RedisStore, metrics: Metrics, log_lines: list[str]
) -> None:
    """The monitor starts at once with Redis down, says so, and sees Redis come up."""
    redis_proc.stop()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(1):
            await nursery.start(
                lambda task_status: run_health_monitor(
                    store, interval=0.05, max_backoff=0.1, task_status=task_status
                )
            )
        await wait_until_unhealthy(store)
        assert any("WARNING" in line and "PING at start-up" in line for line in log_lines)
        redis_proc.start()
        with trio.fail_after(5):
            await store.wait_healthy()
        assert await store.claim("claim:after-startup") is True
        assert metrics.total("redis_reconnects") == 1
        nursery.cancel_scope.cancel()


async def test_monitor_backoff_schedule_and_one_degraded_line(
    thread_clock: MockClock, metrics: Metrics, log_lines: list[str]
) -> None:
    """Against a dead port PINGs go at 0, 0.1, 0.3, 0.7, 1.5, 2.5 and 'degraded' is said once."""
    store = RedisStore(dead_url(), metrics)
    counts: list[float] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_health_monitor(
                    store, interval=30, max_backoff=1.0, degraded_after=5, task_status=task_status
                )
            )
            for t in (0.05, 0.15, 0.35, 0.75, 1.45, 1.55, 2.45, 2.55):
                await trio.sleep_until(t)
                counts.append(metrics.total("redis_failures"))
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    assert counts == [1, 2, 3, 4, 4, 5, 5, 6]
    assert sum("DEGRADED" in line for line in log_lines) == 1
    assert not store.healthy


async def test_monitor_pings_every_interval_while_healthy(
    thread_clock: MockClock, store: RedisStore, raw: redis.Redis
) -> None:
    """While Redis answers, the monitor PINGs once at start and then once per interval."""
    raw.config_resetstat()

    def pings() -> int:
        stats = raw.info("commandstats").get("cmdstat_ping", {"calls": 0})
        return int(stats["calls"])

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_health_monitor(
                store, interval=30, max_backoff=1.0, task_status=task_status
            )
        )
        counts = []
        for t in (29.9, 30.1, 59.9, 60.1, 90.1):
            await trio.sleep_until(t)
            counts.append(pings())
        nursery.cancel_scope.cancel()
    assert counts == [1, 2, 2, 3, 4]


async def test_failing_call_wakes_monitor_to_backoff_speed(
    thread_clock: MockClock, redis_proc: RedisProcess, store: RedisStore, metrics: Metrics
) -> None:
    """A failed call wakes the monitor to probe at backoff speed; the cache skips Redis."""
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_health_monitor(
                store, interval=30, max_backoff=1.0, task_status=task_status
            )
        )
        await trio.sleep(1)
        redis_proc.stop()
        with pytest.raises(RedisUnavailable, match="release"):
            await store.release("claim:y")
        await trio.sleep(0.05)  # the monitor's immediate probe fails meanwhile
        assert metrics.total("redis_failures") == 2
        assert await store.cache_get("skipped") is None  # not even tried while down
        assert metrics.total("redis_failures") == 2
        redis_proc.start()
        await store.wait_healthy()
        assert trio.current_time() == 1.1
        assert metrics.total("redis_reconnects") == 1
        nursery.cancel_scope.cancel()


async def test_signals_round_trip_and_junk_is_a_miss(store: RedisStore, raw: redis.Redis) -> None:
    signals = BlobSignals(
        mean=0xFF,
        pdq=PdqHash(hex="ab" * 32, quality=87),
        md5="0" * 32,
        sha256="f" * 64,
    )
    assert await store.signals_get("bafyone") is None
    await store.signals_set("bafyone", signals, ttl=600)
    assert await store.signals_get("bafyone") == signals
    with pytest.raises(ValueError, match="complete"):
        await store.signals_set("c", BlobSignals(mean=1), ttl=10)
    with pytest.raises(ValueError, match="ttl"):
        await store.signals_set("c", signals, ttl=0)
    for junk in ["", "00ff", f"{0xFF:016x} {'ab' * 32} 101 {'0' * 32} {'f' * 64}"]:
        raw.set("signals:junk", junk)
        assert await store.signals_get("junk") is None
