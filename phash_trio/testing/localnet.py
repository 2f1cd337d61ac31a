"""The whole outside world on loopback: Jetstream replay, CDN, PDS, PLC directory, Ozone.

The demo and the end-to-end tests start this in-process and run the real service
(``phash-trio run``) as a subprocess pointed at it with :meth:`LocalNetwork.service_env`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from phash_trio.firehose.events import MalformedFrame, parse_event
from phash_trio.testing.blobhost import BlobHost, PlcDirectory, cid_for
from phash_trio.testing.fake_ozone import FakeOzone, run_fake_ozone
from phash_trio.testing.jetstream_replay import ReplayServer, run_replay_server

__all__ = [
    "LocalNetwork",
    "ServiceProcess",
    "image_posts",
    "run_local_network",
    "scrape_metrics",
]

REPO_ROOT = Path(__file__).resolve().parents[2]


def image_posts(events: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """``{post uri: number of blobs}`` of every event the service must turn into a job."""
    posts: dict[str, int] = {}
    for event in events:
        try:
            parsed = parse_event(_dumps(event))
        except MalformedFrame:
            continue
        if parsed.job is not None:
            posts[parsed.job.uri] = len(parsed.job.blobs)
    return posts


def _dumps(event: Mapping[str, Any]) -> str:
    import json

    return json.dumps(event)


@attrs.define
class LocalNetwork:
    """The running fakes and what they serve."""

    replay: ReplayServer
    cdn: BlobHost
    pds: BlobHost
    plc: PlcDirectory
    ozone: FakeOzone
    events: list[dict[str, Any]]

    def service_env(
        self,
        *,
        redis_url: str,
        state_dir: Path,
        metrics_port: int,
        rules_file: Path = REPO_ROOT / "rules" / "blobs.json",
        dry_run: bool = False,
        **extra: str,
    ) -> dict[str, str]:
        """Environment for ``phash-trio run`` against this network."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PHASH_", "AUTOMOD_", "OZONE_", "JETSTREAM_", "NOTIFY_"))
        }
        env.update(
            {
                "JETSTREAM_URL": self.replay.url,
                "JETSTREAM_FALLBACK_URLS": "",
                "CDN_URL": self.cdn.url,
                "PLC_ENDPOINT": self.plc.url,
                "REDIS_URL": redis_url,
                "ALLOW_PRIVATE_NETWORKS": "true",
                "STATE_DIR": str(state_dir),
                "RULES_FILE": str(rules_file),
                "METRICS_ADDR": f"127.0.0.1:{metrics_port}",
                "AUTOMOD_HANDLE": self.ozone.handle,
                "AUTOMOD_PASSWORD": self.ozone.password,
                "OZONE_PDS": self.ozone.url,
                "OZONE_URL": self.ozone.url,
                "LABELER_DID": self.ozone.labeler_did,
                "DRY_RUN": "true" if dry_run else "false",
                "CURSOR_UPDATE_INTERVAL_MS": "200",
                "RATE_LIMIT_MS": "0",
                "RETRY_DELAY_MS": "200",
                "SHUTDOWN_GRACE_SECS": "10",
                "REDIS_HEALTH_CHECK_INTERVAL_SECS": "1",
                "REDIS_MAX_BACKOFF_SECS": "0.5",
                "PROCESSING_CONCURRENCY": "4",
                "LOG_FORMAT": "text",
                "LOG_LEVEL": "INFO",
            }
        )
        env.update(extra)
        return env


async def run_local_network(
    events: list[dict[str, Any]],
    images: Mapping[str, bytes],
    *,
    pds_only: Iterable[str] = (),
    pace: float = 0.0,
    task_status: trio.TaskStatus[LocalNetwork] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start every fake, load the blobs the events name, serve until cancelled.

    Every blob is on the authors' PDS; the CDN has all but the ``pds_only`` images, so those
    posts exercise the PDS fallback through the PLC directory.
    """
    by_cid = {cid_for(data): (name, data) for name, data in images.items()}
    pds_only_set = set(pds_only)
    async with trio.open_nursery() as nursery:
        replay: ReplayServer = await nursery.start(
            lambda task_status: run_replay_server(events, pace=pace, task_status=task_status)
        )
        cdn: BlobHost = await nursery.start(BlobHost.run)
        pds: BlobHost = await nursery.start(BlobHost.run)
        plc: PlcDirectory = await nursery.start(PlcDirectory.run)
        ozone = FakeOzone()
        await nursery.start(run_fake_ozone, ozone)
        for event in events:
            did = event.get("did")
            if isinstance(did, str) and did.startswith("did:"):
                plc.add(did, pds.url)
            try:
                parsed = parse_event(_dumps(event))
            except MalformedFrame:
                continue
            if parsed.job is None:
                continue
            for blob in parsed.job.blobs:
                found = by_cid.get(blob.cid)
                if found is None:
                    continue  # a blob nobody hosts: BlobNotFound in the service
                name, data = found
                pds.add(parsed.job.did, blob.cid, data)
                if name not in pds_only_set:
                    cdn.add(parsed.job.did, blob.cid, data)
        task_status.started(LocalNetwork(replay, cdn, pds, plc, ozone, events))


def scrape_metrics(text: str) -> dict[str, float]:
    """``{sample name[label=value,...]: value}`` from a Prometheus exposition."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if sample.labels:
                name += "[" + ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())) + "]"
            out[name] = sample.value
    return out


@attrs.define
class ServiceProcess:
    """``phash-trio run`` in a subprocess, its output in a log file."""

    env: dict[str, str]
    log_path: Path
    metrics_port: int
    process: trio.Process | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        log = self.log_path.open("ab")
        self.process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-m", "phash_trio", "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        )
        log.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self) -> int:
        assert self.process is not None
        return await self.process.wait()

    async def metrics(self, client: httpx.AsyncClient) -> dict[str, float] | None:
        """Current metrics, or None while the endpoint is not up."""
        try:
            response = await client.get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        except httpx.HTTPError:
            return None
        return scrape_metrics(response.text) if response.status_code == 200 else None

    async def wait_for(
        self,
        client: httpx.AsyncClient,
        done: Any,
        *,
        within: float = 120.0,
        poll: float = 0.1,
    ) -> dict[str, float]:
        """Poll /metrics until ``done(metrics)`` is true; raise with the log tail on timeout."""
        with trio.move_on_after(within):
            while True:
                assert self.process is not None
                if self.process.returncode is not None:
                    raise RuntimeError(
                        f"service exited with {self.process.returncode}:\n{self.log_tail()}"
                    )
                metrics = await self.metrics(client)
                if metrics is not None and done(metrics):
                    return metrics
                await trio.sleep(poll)
        raise TimeoutError(f"service did not reach the expected state:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
