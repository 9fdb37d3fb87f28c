"""``ecg-edge bench-fleet``: many simulated wearables through a real mosquitto, every frame counted.

A throwaway mosquitto starts on a free loopback port; the edge runs as its own process
(``ecg-edge run`` with an MQTT source and sink); this process plays N wearables in real time
(Polar-H10-like: 130 Hz, 73 samples per frame, integer µV; each wearable plays the bundled MIT-BIH
record, resampled, from its own offset) and subscribes to ``ecg/anon/#``. At the end every
wearable sends its end message; the run passes when every session's anonymized samples arrived,
each exactly once, in order, and every session reported ``ended``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal as signal_module
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SECTION = "fleet"


@dataclass
class Tally:
    """What the subscriber saw, per pseudonym."""

    samples: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    next_seq: dict[str, int] = field(default_factory=dict)
    out_of_order: int = 0
    frames: int = 0
    masked: int = 0
    beats: int = 0
    ended: set[str] = field(default_factory=set)
    online: set[str] = field(default_factory=set)

    def on_message(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) != 4:
            return
        name, kind = parts[2], parts[3]
        body = json.loads(payload)
        if kind == "ecg":
            self.frames += 1
            if body["seq"] != self.next_seq.get(name, 0):
                self.out_of_order += 1
            self.next_seq[name] = body["seq"] + len(body["samples"])
            self.samples[name] += len(body["samples"])
            self.masked += sum(v is None for v in body["samples"])
        elif kind == "beats":
            self.beats += len(body["beats"])
        elif kind == "status":
            (self.ended if body["state"] == "ended" else self.online).add(name)


def _topic(i: int, workers: int, shard_count: int = 0) -> str:
    """Wearable i's raw topic: sharded when several edge workers share the fleet, by i mod workers
    (static shards) or, with ``shard_count``, by ``shard_of(device, shard_count)`` (shared shards)."""
    device = f"wearable-{i:04d}"
    if workers <= 1:
        return f"ecg/raw/{device}"
    if shard_count:
        from edge.mqtt import shard_of

        return f"ecg/raw/{shard_of(device, shard_count)}/{device}"
    return f"ecg/raw/{i % workers}/{device}"


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _fleet(host: str, port: int, wearables: int, seconds: float, signal_uv: np.ndarray, fs: float,
                 frame: int, tally: Tally, workers: int, shard_count: int = 0) -> dict[str, float]:
    import logging

    import aiomqtt

    from edge.mqtt import encode_end, encode_raw

    logging.getLogger("mqtt").setLevel(logging.ERROR)  # paho warns of every pending QoS 1 publish

    rng = np.random.default_rng(0)
    offsets = rng.integers(0, len(signal_uv), wearables)
    doubled = np.concatenate([signal_uv, signal_uv])
    n_frames = int(seconds * fs / frame)
    topics = [_topic(i, workers, shard_count) for i in range(wearables)]
    sent_frames = 0
    lag = []
    async with aiomqtt.Client(host, port, max_queued_outgoing_messages=0) as sub, \
            aiomqtt.Client(host, port, max_inflight_messages=1000) as pub:
        await sub.subscribe("ecg/anon/#", qos=1)

        async def listen() -> None:
            async for message in sub.messages:
                tally.on_message(str(message.topic), bytes(message.payload))

        listener = asyncio.create_task(listen())
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        phase = rng.uniform(0, frame / fs, wearables)  # wearables are not in lock-step
        order = np.argsort(phase)
        for k in range(n_frames):
            batch = []
            for i in order:
                due = t0 + (k + 1) * frame / fs + phase[i]
                delay = due - time.monotonic()
                if delay > 0.005:
                    await asyncio.gather(*batch)
                    batch = []
                    await asyncio.sleep(delay)
                lag.append(max(0.0, time.monotonic() - due))
                start = (offsets[i] + k * frame) % len(signal_uv)
                payload = encode_raw(doubled[start : start + frame] / 1000.0, fs, k * frame, units="uV")
                batch.append(pub.publish(topics[i], payload, qos=1))
                sent_frames += 1
            await asyncio.gather(*batch)
        await asyncio.gather(*(pub.publish(topics[i], encode_end(), qos=1) for i in range(wearables)))
        deadline = time.monotonic() + 60
        while len(tally.ended) < wearables and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    return {"sent_frames": sent_frames, "publish_lag_p99": float(np.percentile(lag, 99)) if lag else 0.0}


def main(args: argparse.Namespace) -> int:
    from scipy.signal import resample_poly

    from edge.cli import bundled_record
    from edge.mosquitto import free_port, run_mosquitto
    from edge.replay import read_wfdb

    signal, fs_in, _ = read_wfdb(bundled_record())
    fs = 130.0
    signal_uv = np.round(resample_poly(signal, 13, 36) * 1000.0)
    frame = args.frame
    workers = max(1, args.workers)
    shard_count = getattr(args, "shard_count", 0) or 0
    with tempfile.TemporaryDirectory() as tmp, run_mosquitto(Path(tmp) / "broker") as (host, port):
        edges, metrics_ports, logs = [], [], []
        profile = ["-m", "cProfile", "-o", os.environ["ECG_EDGE_PROFILE"]] if os.environ.get("ECG_EDGE_PROFILE") else []
        for w in range(workers):
            config = Path(tmp) / f"edge{w}.toml"
            metrics_ports.append(free_port())
            shards = f"shards = {json.dumps([str(w)])}" if workers > 1 else ""
            if workers > 1 and shard_count:
                shards = f'shards = "auto"\nshard_count = {shard_count}'
            config.write_text(f"""
[broker]
host = "{host}"
port = {port}

[[sources.mqtt]]
{shards}

[sinks.mqtt]
edge_id = "bench-{w}"

[metrics]
port = {metrics_ports[-1]}
""")
            log_path = Path(f"{args.edge_log}.{w}") if args.edge_log and workers > 1 else args.edge_log
            edge_log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
            if log_path:
                logs.append(edge_log)
            # The edge's log goes to a file, never to an unread pipe: a full pipe would block its loop.
            edges.append(subprocess.Popen([sys.executable, *profile, "-m", "edge.cli", "--log-level", "WARNING",
                                           "run", "--config", str(config)], stdout=edge_log, stderr=subprocess.STDOUT))
        time.sleep(4.0)  # models load and warm up, sources subscribe
        if any(e.poll() is not None for e in edges):
            raise RuntimeError(f"an edge worker exited at start (log: {args.edge_log or 'pass --edge-log'})")
        tally = Tally()
        cpu0, wall0 = sum(_cpu_seconds(e.pid) for e in edges), time.monotonic()
        stats = asyncio.run(_fleet(host, port, args.wearables, args.seconds, signal_uv, fs, frame, tally, workers,
                                   shard_count))
        cpu = sum(_cpu_seconds(e.pid) for e in edges) - cpu0
        wall = time.monotonic() - wall0
        import urllib.request

        metrics_text = "\n".join(
            urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=5).read().decode() for p in metrics_ports)
        for edge in edges:
            edge.send_signal(signal_module.SIGINT)  # a clean shutdown: sessions close, the sink says offline
        for edge in edges:
            try:
                edge.wait(timeout=60)
            except subprocess.TimeoutExpired:
                edge.kill()
                edge.wait()
        for fh in logs:
            fh.close()
    expected = int(args.seconds * fs / frame) * frame
    complete = sum(1 for n in tally.samples.values() if n == expected)
    lat = _quantiles(metrics_text)
    result = {
        "wearables": args.wearables, "seconds": args.seconds, "fs": fs, "frame_samples": frame,
        "raw_frames_sent": stats["sent_frames"], "anonymized_frames_received": tally.frames,
        "sessions_online": len(tally.online), "sessions_ended": len(tally.ended),
        "sessions_complete": complete, "samples_expected_per_session": expected,
        "samples_received": int(sum(tally.samples.values())), "samples_sent": expected * args.wearables,
        "out_of_order_frames": tally.out_of_order, "masked_samples": tally.masked, "beats": tally.beats,
        "edge_workers": workers, "edge_cpu_fraction_of_one_core": round(cpu / wall, 3), "publisher_lag_p99_s": round(stats["publish_lag_p99"], 3),
        "edge_added_latency_histogram": lat,
    }
    ok = complete == args.wearables and tally.out_of_order == 0 and len(tally.ended) == args.wearables
    print(json.dumps(result, indent=2))
    print("every anonymized frame delivered" if ok else "FRAMES MISSING: see the counts above")
    if str(args.output) != "-":
        from edge.bench_detector import write_section

        command = "ecg-edge " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        sharding = (
            f"With several workers, wearable i publishes on `ecg/raw/<shard_of(device, {shard_count})>/<device>` and "
            f'the workers share the shards (`shards = "auto"`, docs/scale-out.md).' if workers > 1 and shard_count else
            "With several workers, wearable i publishes on `ecg/raw/<i mod W>/<device>` and worker w subscribes to "
            'its shard only (`shards = ["w"]`).')
        body = f"""## Fleet through mosquitto: {args.wearables} wearables at 130 Hz for {args.seconds:g} s, {workers} edge worker(s)

Command: `{command}` ({platform.machine()}, {os.cpu_count()} cores shared by mosquitto, the edge
process and the process playing the wearables and subscribing). Each wearable publishes
{frame}-sample frames of integer µV (like a Polar H10) on `ecg/raw/<device>` with QoS 1, in real
time; the edge (`ecg-edge run`, MQTT source and sink) publishes `ecg/anon/<pseudonym>/...`; a
subscriber counts every anonymized sample per session. {sharding}

| measure | value |
|---|---|
| raw frames sent | {result['raw_frames_sent']:,} |
| anonymized frames received | {result['anonymized_frames_received']:,} |
| sessions online / ended / complete | {len(tally.online)} / {len(tally.ended)} / {complete} of {args.wearables} |
| samples sent / received | {result['samples_sent']:,} / {result['samples_received']:,} |
| frames out of order or duplicated | {tally.out_of_order} |
| masked samples | {tally.masked:,} |
| surrogate beats | {tally.beats:,} |
| edge CPU, all workers (fraction of one core) | {result['edge_cpu_fraction_of_one_core']} |
| edge added latency (histogram buckets, s) | {lat} |

Result: **{"every anonymized frame delivered" if ok else "frames missing"}**.
"""
        write_section(args.output, f"{SECTION}-{workers}" + ("-auto" if workers > 1 and shard_count else ""), body)
        print(f"wrote {args.output}")
    return 0 if ok else 1


def _quantiles(metrics_text: str) -> str:
    """p50/p99 bounds of the edge's added-latency histogram, from its Prometheus text."""
    buckets = []
    for line in metrics_text.splitlines():
        if line.startswith("ecg_edge_added_latency_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return "no beats"
    total = buckets[-1][1]
    p50 = next(le for le, c in buckets if c >= 0.5 * total)
    p99 = next(le for le, c in buckets if c >= 0.99 * total)
    return f"p50 <= {p50:g}, p99 <= {p99:g}"
