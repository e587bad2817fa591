"""Prometheus metrics of the daemon: a textfile (`metrics.prom`, for node_exporter) always, HTTP on request."""

from __future__ import annotations

import logging
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, write_to_textfile

logger = logging.getLogger(__name__)

MERGE_BUCKETS = (0.5, 1, 2, 5, 15, 60, 300, 900, 3600, 4 * 3600, float("inf"))


class Metrics:
    """Counters and gauges of one daemon process, in their own registry (several daemons may share a process)."""

    def __init__(self, textfile: Path):
        self.textfile = Path(textfile)
        self.registry = r = CollectorRegistry()
        self.ingested = Counter("recall_daemon_drops_ingested", "Drops merged and published.", registry=r)
        self.quarantined = Counter("recall_daemon_drops_quarantined", "Drops rejected, by the check that failed.",
                                   ["reason"], registry=r)
        self.duplicates = Counter("recall_daemon_drops_duplicate", "Drops whose content was already merged (no-op).",
                                  registry=r)
        self.deferred = Counter("recall_daemon_drops_deferred", "Drops postponed to be retried, by reason.",
                                ["reason"], registry=r)
        self.merge_seconds = Histogram("recall_daemon_merge_seconds", "Seconds from taking a drop to it going live.",
                                       buckets=MERGE_BUCKETS, registry=r)
        self.current_version = Gauge("recall_daemon_current_version", "Number of the live version (vNNNN).",
                                     registry=r)
        self.last_success = Gauge("recall_daemon_last_success_timestamp_seconds",
                                  "Unix time the last drop went live.", registry=r)
        self.queue = Gauge("recall_daemon_queue_length", "Complete drops waiting to be processed.", registry=r)
        self.waiting = Gauge("recall_daemon_incomplete_drops", "Drops still being written (no READY, not quiet).",
                             registry=r)
        self.gate_checks = Counter("recall_daemon_gate_checks", "Promotion gate outcomes: gate (fingerprint, "
                                   "command) and result (passed, failed); a failure quarantines the drop.",
                                   ["gate", "result"], registry=r)
        self.task_divergence = Gauge("recall_daemon_task_divergence", "The live version's fingerprint divergence "
                                     "per folded task (calibrate on; lower = closer to the task's own model).",
                                     ["task"], registry=r)
        self._server = None

    def set_divergence(self, divergence: dict[str, float]) -> None:
        """Show exactly the live version's per-task divergence (tasks of an older live version disappear)."""
        self.task_divergence.clear()
        for task, value in divergence.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.task_divergence.labels(str(task)).set(value)

    def write_textfile(self) -> None:
        """Replace `metrics.prom` atomically (a scraper never reads half a file; prometheus_client writes a temp
        file and renames it)."""
        write_to_textfile(str(self.textfile), self.registry)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve `/metrics` over HTTP from a background thread; returns the bound port (0 picks a free one)."""
        self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        bound = self._server.server_address[1]
        logger.info("Prometheus metrics on http://%s:%d/metrics", addr, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
