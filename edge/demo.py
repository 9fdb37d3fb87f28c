"""``ecg-edge demo``: the whole product in one command, with nothing to set up.

An embedded MQTT broker (amqtt) starts unless ``--broker`` names one; the bundled five minutes of
MIT-BIH record 208 play as a wearable on ``ecg/raw/<device>``; the edge anonymizes the stream to
``ecg/anon/<pseudonym>/...``; a subscriber on ``ecg/anon/#`` receives it. What the subscriber got
(not what the edge meant to send) becomes a WFDB record, a PNG of raw against anonymized with
the beat classes, and a summary: beats and classes, R-peak timing against the input's reference
annotations, and end-to-end latency from the wearable sending a beat's R-peak to the subscriber
receiving its surrogate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.anonymize import AnonymizedRecord, load_models, write_record
from edge.metrics import EdgeMetrics
from edge.pipeline import Anonymizer, PipelineSettings
from edge.replay import read_wfdb

log = logging.getLogger(__name__)

DEVICE = "demo-strap"


@dataclass
class Received:
    """What the subscriber received on ``ecg/anon/#``."""

    pseudonym: str | None = None
    fs: float | None = None
    chunks: dict[int, list[float | None]] = field(default_factory=dict)  # seq -> samples
    beats: list[tuple[int, str, float]] = field(default_factory=list)  # (sample, class, receive time)
    status: list[str] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def on_message(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != "ecg" or parts[1] != "anon":
            return
        body = json.loads(payload)
        self.pseudonym = parts[2]
        if parts[3] == "ecg":
            self.fs = body["fs"]
            self.chunks[body["seq"]] = body["samples"]
        elif parts[3] == "beats":
            now = time.time()
            self.beats += [(b["sample"], b["class"], now) for b in body["beats"]]
        elif parts[3] == "status":
            self.status.append(body["state"])
            if body["state"] == "ended":
                self.ended.set()

    def signal(self, n: int) -> np.ndarray:
        out = np.full(n, np.nan)
        for seq, samples in self.chunks.items():
            values = np.array([np.nan if v is None else v for v in samples], dtype=np.float64)
            out[seq : seq + len(values)] = values[: max(0, n - seq)]
        return out


async def _run(record: Path, channel: int, duration_s: float | None, speed: float, broker: str | None,
               seed: int | None, frame_s: float) -> tuple[np.ndarray, float, Received, float, EdgeMetrics]:
    import aiomqtt

    from edge.broker import EmbeddedBroker
    from edge.mqtt import BrokerConfig, MqttSink, MqttSource, publish_record
    from edge.service import EdgeService

    for noisy in ("amqtt", "transitions"):  # the embedded broker logs every state change at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal, fs, _ = read_wfdb(record, channel)
    if duration_s:
        signal = signal[: round(duration_s * fs)]
    gen, cls = load_models()
    metrics = EdgeMetrics()
    anonymizer = Anonymizer(gen, cls, PipelineSettings(seed=seed), metrics)
    embedded = None
    if broker:
        host, _, port = broker.rpartition(":")
        config = BrokerConfig(host=host or "127.0.0.1", port=int(port))
    else:
        embedded = EmbeddedBroker()
        config = await embedded.start()
    received = Received()
    try:
        async with aiomqtt.Client(config.host, config.port) as subscriber:
            await subscriber.subscribe("ecg/anon/#", qos=1)

            async def listen() -> None:
                with contextlib.suppress(aiomqtt.MqttError):  # the broker going away ends the demo
                    async for message in subscriber.messages:
                        received.on_message(str(message.topic), bytes(message.payload))

            listener = asyncio.create_task(listen())
            async with MqttSink(config, edge_id="demo-edge") as sink, MqttSource(config) as source:
                service = EdgeService(anonymizer, [sink])
                edge = asyncio.create_task(service.run([aiter(source)], stop_when_sources_end=False))
                try:
                    await asyncio.wait_for(source.ready.wait(), timeout=10)
                    t0 = time.time()
                    log.info("playing %.0f s of %s as a wearable at %s", len(signal) / fs, record.name,
                             f"{speed:g}x real time" if speed else "full speed")
                    await publish_record(config, DEVICE, signal, fs, frame_s, realtime=speed if speed > 0 else False,
                                         t0=t0)
                    await asyncio.wait_for(received.ended.wait(), timeout=30 + len(signal) / fs)
                finally:
                    edge.cancel()
                    await asyncio.gather(edge, return_exceptions=True)
            await asyncio.sleep(0.2)
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
    finally:
        if embedded is not None:
            await embedded.stop()
    return signal, fs, received, t0, metrics


def run_demo(output_dir: Path, record: Path, channel: int = 0, duration_s: float | None = 30.0,
             speed: float = 1.0, broker: str | None = None, seed: int | None = None,
             frame_s: float = 0.25) -> dict[str, object]:
    """Run the demo; write OUTPUT/demo.{hea,dat,atr,png} and OUTPUT/summary.json; return the summary."""
    signal, fs, received, t0, metrics = asyncio.run(_run(record, channel, duration_s, speed, broker, seed, frame_s))
    anon = received.signal(len(signal))
    beats = sorted(received.beats)
    result = AnonymizedRecord(anon, fs, np.array([b[0] for b in beats], dtype=np.int64), [b[1] for b in beats])
    output_dir.mkdir(parents=True, exist_ok=True)
    write_record(output_dir / "demo", result)
    summary = summarize(record, channel, signal, fs, received, beats, t0, speed, frame_s, metrics)
    plot(output_dir / "demo.png", signal, anon, fs, beats, record.name)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarize(record: Path, channel: int, signal: np.ndarray, fs: float, received: Received,
              beats: list[tuple[int, str, float]], t0: float, speed: float, frame_s: float,
              metrics: EdgeMetrics) -> dict[str, object]:
    from edge.records import AAMI_OF_SYMBOL, read_record

    ref = read_record(str(record), None, channel)
    ref_samples = ref.beat_samples
    emitted = np.array([b[0] for b in beats], dtype=np.int64)
    # Timing: each emitted R-peak against the nearest reference R-peak (the annotators' marks
    # sit a few samples from any detector's, so the edge's own input R-peaks are the ±1 target).
    offsets = np.array([int(ref_samples[np.argmin(np.abs(ref_samples - s))] - s) for s in emitted]) if len(ref_samples) else np.array([])
    ref_classes = Counter(AAMI_OF_SYMBOL[s] for s in ref.beat_symbols[ref_samples < len(signal)])
    # End to end: the wearable sent the frame holding sample r at t0 + (frame end)/fs/speed.
    n = max(1, round(frame_s * fs))
    sent = np.array([t0 + ((s // n + 1) * n) / fs / max(speed, 1e-9) for s in emitted])
    latency = np.array([b[2] for b in beats]) - sent if speed > 0 else np.array([])
    masked = float(np.isnan(received.signal(len(signal))).mean())
    edge_latency = np.array(metrics.recent_latency)
    return {
        "record": f"MIT-BIH {record.name}, channel {channel}, {len(signal) / fs:.1f} s at {fs:g} Hz",
        "pseudonym": received.pseudonym,
        "samples_received": int(sum(len(c) for c in received.chunks.values())),
        "samples_sent": len(signal),
        "masked_fraction": round(masked, 4),
        "beats_reference": int((ref_samples < len(signal)).sum()),
        "beats_emitted": len(emitted),
        "classes_emitted": dict(Counter(b[1] for b in beats)),
        "classes_reference": dict(ref_classes),
        "r_offset_vs_reference_samples": {
            "median_abs": float(np.median(np.abs(offsets))) if len(offsets) else None,
            "within_150ms": float(np.mean(np.abs(offsets) <= 0.15 * fs)) if len(offsets) else None,
        },
        "edge_added_latency_s": {
            "p50": round(float(np.percentile(edge_latency, 50)), 3) if len(edge_latency) else None,
            "p99": round(float(np.percentile(edge_latency, 99)), 3) if len(edge_latency) else None,
        },
        "end_to_end_latency_s": {
            "p50": round(float(np.percentile(latency, 50)), 3) if len(latency) else None,
            "p99": round(float(np.percentile(latency, 99)), 3) if len(latency) else None,
            "note": "wearable sends the frame holding the R-peak -> subscriber receives the beat annotation"
            + ("" if speed == 1 else f"; replay at {speed:g}x real time"),
        },
        "status_seen": received.status,
    }


def plot(path: Path, raw: np.ndarray, anon: np.ndarray, fs: float, beats: list[tuple[int, str, float]],
         name: str, seconds: float = 10.0) -> None:
    """Raw over anonymized, 10 s from the middle of the run, each surrogate labelled with its class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo = max(0, len(raw) // 2 - round(seconds * fs / 2))
    hi = min(len(raw), lo + round(seconds * fs))
    t = np.arange(lo, hi) / fs
    fig, axes = plt.subplots(2, 1, figsize=(12, 5), sharex=True)
    axes[0].plot(t, raw[lo:hi], lw=0.8, color="0.3")
    axes[0].set_title(f"input: MIT-BIH {name} (never leaves the edge)", fontsize=10, loc="left")
    axes[1].plot(t, anon[lo:hi], lw=0.8, color="C0")
    axes[1].set_title("anonymized, as received by a subscriber (surrogate class above each beat)",
                      fontsize=10, loc="left")
    top = np.nanmax(anon[lo:hi]) if np.isfinite(anon[lo:hi]).any() else 1.0
    bottom = np.nanmin(anon[lo:hi]) if np.isfinite(anon[lo:hi]).any() else -1.0
    axes[1].set_ylim(bottom - 0.05 * (top - bottom), top + 0.2 * (top - bottom))  # room for the labels
    for s, label, _ in beats:
        if lo <= s < hi:
            axes[1].annotate(label, (s / fs, top), ha="center", fontsize=8, color="C3" if label != "N" else "0.2")
            for ax in axes:
                ax.axvline(s / fs, color="C3", lw=0.3, alpha=0.4)
    for ax in axes:
        ax.set_ylabel("mV")
        ax.grid(alpha=0.2)
    axes[1].set_xlabel("s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
