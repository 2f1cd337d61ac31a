"""Set-up shared by the pipeline end-to-end tests: the local network, the service subprocess,
and readers for what it did (its DEBUG ``decided`` log lines, its /metrics, its RSS)."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from phash_trio.firehose.events import MalformedFrame, parse_event
from phash_trio.pipeline.jobs import POST_COLLECTION, ImageJob
from phash_trio.testing.capture import PDS_ONLY_IMAGES, demo_images
from phash_trio.testing.localnet import LocalNetwork, ServiceProcess, run_local_network
from phash_trio.testing.redis_server import free_port

Metrics = dict[str, float]

_DECIDED_RE = re.compile(r" decided (\S+) time_us=(\d+) blobs=(\d+)")
#: Failure guard for anything the tests wait on (never an expected duration).
GUARD = 60.0


# --------------------------------------------------------------------------------------------
# What the capture holds


def delivered(events: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The events the replay server sends to a reader that wants only posts."""
    return [
        e
        for e in events
        if e.get("kind") != "commit" or e.get("commit", {}).get("collection") == POST_COLLECTION
    ]


def post_times(events: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """``{uri: time_us}`` of every image post (what must be decided)."""
    return {job.uri: job.time_us for job in jobs_of(events)}


def post_blobs(events: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, ...]]:
    """``{uri: blob CIDs}`` of every image post."""
    return {job.uri: tuple(b.cid for b in job.blobs) for job in jobs_of(events)}


def jobs_of(events: Iterable[Mapping[str, Any]]) -> list[ImageJob]:
    """The image-post jobs of ``events``, in order (other and malformed events skipped)."""
    jobs = []
    for event in events:
        try:
            parsed = parse_event(json.dumps(event))
        except MalformedFrame:
            continue
        if parsed.job is not None:
            jobs.append(parsed.job)
    return jobs


def host_blobs(
    net: LocalNetwork, events: Iterable[Mapping[str, Any]], images: Mapping[str, bytes]
) -> None:
    """Serve the blobs of events appended after start-up (CDN and PDS), as the network does."""
    by_cid = {net.cdn.cid_for(data): data for data in images.values()}
    for job in jobs_of(events):
        net.plc.add(job.did, net.pds.url)
        for blob in job.blobs:
            if blob.cid in by_cid:
                net.cdn.add(job.did, blob.cid, by_cid[blob.cid])
                net.pds.add(job.did, blob.cid, by_cid[blob.cid])


# --------------------------------------------------------------------------------------------
# What the service did


def decided(log_path: Path) -> list[str]:
    """URIs of the ``decided`` DEBUG lines of one run, in order (duplicates kept)."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return [m.group(1) for m in _DECIDED_RE.finditer(text)]


def total(metrics: Metrics, name: str) -> float:
    """A metric summed over its labels (0 when absent)."""
    return sum(v for k, v in metrics.items() if k.split("[")[0] == name)


def by_label(metrics: Metrics, name: str, label: str) -> dict[str, float]:
    """``{label value: sample}`` of one labelled metric."""
    out = {}
    for key, value in metrics.items():
        base, _, inner = key.partition("[")
        if base != name:
            continue
        labels = dict(pair.split("=", 1) for pair in inner.rstrip("]").split(",") if pair)
        out[labels[label]] = value
    return out


def vm_rss_mb(pid: int) -> float:
    """Resident set size of a live process, from /proc (MiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def finished(n_events: int, n_posts: int) -> Callable[[Metrics], bool]:
    """Predicate: at least ``n_events`` read and ``n_posts`` decided or dead-lettered."""

    def done(m: Metrics) -> bool:
        settled = total(m, "phash_jobs_processed_total") + total(
            m, "phash_jobs_dead_lettered_total"
        )
        return total(m, "phash_events_received_total") >= n_events and settled >= n_posts

    return done


# --------------------------------------------------------------------------------------------
# The harness


@attrs.define
class Harness:
    """A running local network plus what a test needs to start the service against it."""

    net: LocalNetwork
    redis_url: str
    workdir: Path
    nursery: trio.Nursery
    client: httpx.AsyncClient
    runs: int = 0

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def cursor_file(self) -> Path:
        return self.state_dir / "cursor"

    def saved_cursor(self) -> int:
        return int(self.cursor_file.read_text().strip())

    def env(self, metrics_port: int, **extra: str) -> dict[str, str]:
        """The service environment: DEBUG logs (``decided`` lines), fast checkpoints."""
        env = self.net.service_env(
            redis_url=self.redis_url, state_dir=self.state_dir, metrics_port=metrics_port
        )
        env.update({"LOG_LEVEL": "DEBUG", "CURSOR_UPDATE_INTERVAL_MS": "100"})
        env.update(extra)
        return env

    async def start(self, **extra: str) -> ServiceProcess:
        """Start ``phash-trio run`` (log ``run{N}.log``) and wait until /metrics answers."""
        self.runs += 1
        port = free_port()
        service = ServiceProcess(
            self.env(port, **extra), self.workdir / f"run{self.runs}.log", port
        )
        await service.start(self.nursery)
        await service.wait_for(self.client, lambda m: True, within=GUARD)
        return service

    async def stop(
        self, service: ServiceProcess, signum: int = signal.SIGTERM, *, within: float = GUARD
    ) -> int:
        """Send ``signum`` and return the exit code (fails if it takes longer than ``within``)."""
        service.signal(signum)
        with trio.fail_after(within):
            return await service.wait()

    async def metrics(self, service: ServiceProcess) -> Metrics:
        metrics = await service.metrics(self.client)
        assert metrics is not None, service.log_tail()
        return metrics


@asynccontextmanager
async def harness(
    redis_url: str,
    workdir: Path,
    events: list[dict[str, Any]],
    *,
    images: Mapping[str, bytes] | None = None,
    pds_only: Iterable[str] = PDS_ONLY_IMAGES,
    pace: float = 0.0,
) -> AsyncIterator[Harness]:
    """The local network serving ``events`` (and the demo images) for the duration."""
    images = demo_images() if images is None else images
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=5) as client:
        net: LocalNetwork = await nursery.start(
            lambda task_status: run_local_network(
                events, images, pds_only=pds_only, pace=pace, task_status=task_status
            )
        )
        try:
            yield Harness(net, redis_url, workdir, nursery, client)
        finally:
            nursery.cancel_scope.cancel()
