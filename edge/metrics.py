"""Prometheus metrics of the edge: what an operator watches (streams, beats, masking, bad input).

Each pipeline gets its own registry, so several pipelines (tests, the benchmark) never share
counters; ``serve`` exposes one on an HTTP port for Prometheus to scrape.
"""

from __future__ import annotations

from collections import deque

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)


class EdgeMetrics:
    """The edge's counters, gauges and histograms, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.streams = Gauge("ecg_edge_streams", "Live stream sessions", registry=r)
        self.sessions = Counter("ecg_edge_sessions", "Stream sessions started", registry=r)
        self.frames = Counter("ecg_edge_frames", "Input frames accepted", registry=r)
        self.samples = Counter("ecg_edge_samples", "Input samples accepted", registry=r)
        self.output_samples = Counter("ecg_edge_output_samples", "Synthetic samples emitted", registry=r)
        self.beats = Counter("ecg_edge_beats", "Surrogate beats emitted, by AAMI class", ["label"], registry=r)
        self.masked_samples = Counter(
            "ecg_edge_masked_samples", "Output samples masked (fail closed)", registry=r)
        self.masked_beats = Counter(
            "ecg_edge_masked_beats", "Beats masked instead of rendered, by reason", ["reason"], registry=r)
        self.late_beats = Counter(
            "ecg_edge_late_beats", "Beats dropped because their R-peak was already emitted", registry=r)
        self.bad_input = Counter("ecg_edge_bad_input", "Rejected or repaired input, by kind", ["kind"], registry=r)
        self.model_info = Gauge(
            "ecg_edge_model_info", "Loaded model (value 1), by kind and version", ["kind", "version", "sha256"],
            registry=r)
        self.redraws = Counter(
            "ecg_edge_redraws", "Surrogates drawn again because the classifier read another class, by outcome "
            "(hit: a later draw was read as intended; miss: every draw was read otherwise, the best one kept)",
            ["outcome"], registry=r)
        self.redraw_rows = Counter("ecg_edge_redraw_rows", "Surrogates generated again by the redraw", registry=r)
        self.model_errors = Counter("ecg_edge_model_errors", "Model calls that failed, by kind", ["kind"], registry=r)
        self.model_refresh = Counter(
            "ecg_edge_model_refresh", "Model announcements, by kind and result (accepted, current, or why refused)",
            ["kind", "result"], registry=r)
        self.batch_beats = Histogram(
            "ecg_edge_batch_beats", "Beats per model batch", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048))
        self.latency = Histogram(
            "ecg_edge_added_latency_seconds", "R-peak arrival to surrogate emitted", registry=r,
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 1.0, 1.5, 2.0, 5.0))

        #: The last added latencies (seconds), for exact quantiles in summaries and benchmarks.
        self.recent_latency: deque[float] = deque(maxlen=100_000)

    def observe_latency(self, seconds: float) -> None:
        self.latency.observe(seconds)
        self.recent_latency.append(seconds)

    def set_model(self, kind: str, version: str, sha256: str) -> None:
        """Record the loaded model of a kind (the previous one of that kind drops out)."""
        for labels in list(self.model_info._metrics):
            if labels[0] == kind:
                self.model_info.remove(*labels)
        self.model_info.labels(kind, version, sha256[:12]).set(1)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose /metrics on ``addr:port`` (a background thread)."""
        start_http_server(port, addr=addr, registry=self.registry)
