"""Counters, gauges and the latency histogram, in a prometheus-client registry of our own.

One :class:`Metrics` per service instance (tests create several). Names follow
skywatch-phash-rs's counters with a ``phash_`` prefix; :meth:`Metrics.snapshot` gives the plain
numbers for the periodic log line, the shutdown summary and the demo.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """Every metric the service exposes; attributes are prometheus-client objects."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "phash_"
        # Jetstream
        self.events_received = Counter(p + "events_received", "Jetstream events read", registry=r)
        self.events_skipped = Counter(
            p + "events_skipped", "Events that carry no image post", ["reason"], registry=r
        )
        self.frames_malformed = Counter(p + "frames_malformed", "Unparseable frames", registry=r)
        self.jetstream_reconnects = Counter(
            p + "jetstream_reconnects", "Jetstream reconnects", registry=r
        )
        self.jetstream_failovers = Counter(
            p + "jetstream_failovers",
            "Moves to another Jetstream URL (to=fallback after failures, to=primary)",
            ["to"],
            registry=r,
        )
        self.jetstream_replay_gaps = Counter(
            p + "jetstream_replay_gaps",
            "Reconnects where the server could not replay back to where we resumed",
            registry=r,
        )
        self.jetstream_connected = Gauge(
            p + "jetstream_connected", "1 while the reader is connected", registry=r
        )
        # Jobs
        self.jobs_received = Counter(p + "jobs_received", "Image posts queued", registry=r)
        self.jobs_processed = Counter(p + "jobs_processed", "Image posts finished", registry=r)
        self.jobs_failed = Counter(p + "jobs_failed", "Job attempts that failed", registry=r)
        self.jobs_retried = Counter(p + "jobs_retried", "Job retries", registry=r)
        self.jobs_dead_lettered = Counter(
            p + "jobs_dead_lettered", "Jobs stored in jobs:dead", registry=r
        )
        self.job_crashes = Counter(
            p + "job_crashes",
            "Jobs ended by an unexpected error (a bug or hostile input), by stage and kind",
            ["stage", "kind"],
            registry=r,
        )
        self.jobs_timed_out = Counter(
            p + "jobs_timed_out", "Jobs stopped at JOB_DEADLINE_SECS", registry=r
        )
        self.dead_letters_lost = Counter(
            p + "dead_letters_lost",
            "Dead letters Redis would not store in time (the job is only in the log)",
            registry=r,
        )
        # Blobs
        self.blobs_processed = Counter(p + "blobs_processed", "Blobs hashed", registry=r)
        self.blobs_downloaded = Counter(p + "blobs_downloaded", "Blobs downloaded", registry=r)
        self.blob_errors = Counter(
            p + "blob_errors", "Blobs that could not be hashed", ["kind"], registry=r
        )
        self.cache_hits = Counter(p + "cache_hits", "Hash cache hits", registry=r)
        self.cache_misses = Counter(p + "cache_misses", "Hash cache misses", registry=r)
        self.matches_found = Counter(p + "matches_found", "Blobs matching a rule", registry=r)
        # Actions
        self.posts_labeled = Counter(p + "posts_labeled", "Post labels sent", registry=r)
        self.posts_reported = Counter(p + "posts_reported", "Post reports sent", registry=r)
        self.posts_taken_down = Counter(p + "posts_taken_down", "Post takedowns sent", registry=r)
        self.accounts_labeled = Counter(p + "accounts_labeled", "Account labels sent", registry=r)
        self.accounts_reported = Counter(
            p + "accounts_reported", "Account reports sent", registry=r
        )
        self.accounts_taken_down = Counter(
            p + "accounts_taken_down", "Account takedowns sent", registry=r
        )
        self.actions_skipped = Counter(
            p + "actions_skipped",
            "Actions not sent (already_done, daily_cap, dry_run)",
            ["reason"],
            registry=r,
        )
        self.ozone_events = Counter(
            p + "ozone_events", "emitEvent calls that succeeded", ["event"], registry=r
        )
        self.ozone_errors = Counter(
            p + "ozone_errors", "emitEvent calls that failed", ["kind"], registry=r
        )
        # Redis
        self.redis_failures = Counter(p + "redis_failures", "Failed Redis calls", registry=r)
        self.redis_reconnects = Counter(p + "redis_reconnects", "Redis recoveries", registry=r)
        self.redis_healthy = Gauge(p + "redis_healthy", "1 while Redis answers", registry=r)
        # Breakers
        self.breaker_transitions = Counter(
            p + "breaker_transitions", "Breaker state changes", ["breaker", "to"], registry=r
        )
        self.breaker_rejections = Counter(
            p + "breaker_rejections", "Calls refused by an open breaker", ["breaker"], registry=r
        )
        # Pipeline
        self.queue_depth = Gauge(p + "queue_depth", "Jobs waiting in the channel", registry=r)
        self.cursor_lag_seconds = Gauge(
            p + "cursor_lag_seconds", "Now minus the saved cursor", registry=r
        )
        self.decision_latency = Histogram(
            p + "decision_latency_seconds",
            "From reading an image post to its decision",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(p + "errors", "Errors by kind", ["kind"], registry=r)

    def on_breaker_transition(self, name: str, old: object, new: object) -> None:
        """Hook for :class:`phash_trio.net.breaker.CircuitBreaker`."""
        self.breaker_transitions.labels(breaker=name, to=getattr(new, "value", str(new))).inc()

    def on_breaker_reject(self, name: str) -> None:
        self.breaker_rejections.labels(breaker=name).inc()

    def snapshot(self) -> dict[str, float]:
        """Plain totals: ``{name[label=value,...]: value}``; histograms as count and sum."""
        out: dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith(("_created", "_bucket")):
                    continue
                name = sample.name.removeprefix("phash_").removesuffix("_total")
                if sample.labels:
                    inner = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    name = f"{name}[{inner}]"
                out[name] = sample.value
        return out

    def total(self, prefix: str) -> float:
        """Sum of every sample whose snapshot name starts with ``prefix`` (labels summed)."""
        return sum(v for k, v in self.snapshot().items() if k.split("[")[0] == prefix)
