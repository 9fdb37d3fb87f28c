"""`ecg-edge`: the edge agent's command line."""

from __future__ import annotations

import argparse
import logging
import platform
import secrets
import shlex
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np

from edge import __version__
from edge.console import run_command
from edge.detector import StreamingQRSDetector
from edge.records import DATA_DIR_ENV, read_record

log = logging.getLogger("edge")

BUNDLED_RECORD = "208"

DESCRIPTION = """\
Anonymize wearable ECG at the edge: find every heartbeat in a live stream and replace it with a
synthetic beat of the same class at the same instant, so heart rate, rhythm and beat classes are
kept and the wearer's waveform is not.

commands:
  demo            the whole product in one command: wearable -> MQTT -> edge -> subscriber
  run             the edge as configured in edge.toml (BLE and MQTT sources, MQTT and WFDB sinks)
  anonymize       a WFDB record through the same streaming pipeline, written as a WFDB record
  detect          find the R-peaks of a WFDB record with the streaming QRS detector
  simulate        a simulated wearable: play a WFDB record on ecg/raw/<device> over MQTT, pass after pass
  bench           throughput, latency and memory of the pipeline with many simulated wearables
  bench-fleet     simulated wearables through a real mosquitto, every anonymized frame counted
  bench-detector  score the detector and published peers on the whole MIT-BIH database
"""

EPILOG = f"""\
examples:
  ecg-edge demo                        # embedded broker, bundled record, results in ./out/demo
  ecg-edge anonymize 100 out/100_anon --data-dir ../shared/data/mitdb
  ecg-edge run --config edge.toml
  ecg-edge simulate --broker 127.0.0.1:1883 --speed 1   # the bundled record as a wearable, forever
  ecg-edge detect                      # the bundled five minutes of MIT-BIH record {BUNDLED_RECORD}
  ecg-edge detect 100 --data-dir ../shared/data/mitdb --output-dir out
  ecg-edge bench-detector --data-dir ../shared/data/mitdb

The MIT-BIH directory comes from --data-dir, else ${DATA_DIR_ENV}, else ./data/mitdb.
"""


def bundled_record() -> Path:
    """Path (without suffix) of the MIT-BIH slice that ships inside the package."""
    return Path(str(resources.files("edge") / "assets" / BUNDLED_RECORD))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecg-edge",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "detect",
        help="detect R-peaks in a WFDB record and write them as a .qrs annotation file",
        description="Feed a WFDB record through the streaming QRS detector in frames, as a live "
        "stream would arrive, and write one 'N' annotation per detected beat at its R-peak sample to "
        "DIR/<record>.qrs. If the record has reference beats (.atr), the summary scores against them.",
    )
    p.add_argument(
        "record",
        nargs="?",
        help="record name in the data directory (e.g. 100) or a path without suffix "
        f"(default: the bundled slice of MIT-BIH record {BUNDLED_RECORD})",
    )
    p.add_argument("--channel", type=int, default=0, help="signal channel to use (default 0)")
    p.add_argument("--output-dir", type=Path, default=Path("out"), help="where <record>.qrs goes (default ./out)")
    p.add_argument("--data-dir", help=f"MIT-BIH directory for record names (default ${DATA_DIR_ENV} or ./data/mitdb)")
    p.add_argument("--frame-ms", type=float, default=100.0, help="stream frame length in ms (default 100; the result does not depend on it)")

    d = sub.add_parser(
        "demo", help="wearable -> MQTT -> edge -> subscriber, on the bundled record (no set-up)",
        description="Start an embedded MQTT broker (unless --broker is given), play the bundled MIT-BIH "
        "record as a wearable on ecg/raw/<device>, anonymize it, subscribe to ecg/anon/#, and write what the "
        "subscriber received as a WFDB record, a PNG (raw vs anonymized with beat classes) and summary.json.",
    )
    d.add_argument("--broker", help="HOST:PORT of an MQTT broker to use instead of the embedded one")
    d.add_argument("--output-dir", type=Path, default=Path("out/demo"), help="default ./out/demo")
    d.add_argument("--record", help=f"a WFDB record path without suffix (default: bundled {BUNDLED_RECORD})")
    d.add_argument("--channel", type=int, default=0)
    d.add_argument("--duration", type=float, default=30.0, help="seconds of the record to play (default 30; 0 = all)")
    d.add_argument("--speed", type=float, default=1.0, help="replay speed, 1 = real time (default), 0 = as fast as possible")
    d.add_argument("--seed", type=int, help="persona and latent seed (default: random)")

    a = sub.add_parser(
        "anonymize", help="anonymize a WFDB record into a new WFDB record (file mode)",
        description="Stream INPUT_RECORD through the live pipeline (detector, classifier, generator, "
        "splicer) and write OUTPUT_RECORD.hea/.dat (one channel, same rate and length, mV; masked samples "
        "are WFDB invalid samples) and OUTPUT_RECORD.atr (one N/S/V/F/Q label per surrogate at its R-peak).",
    )
    a.add_argument("input", help="record name in the data directory (e.g. 100) or a path without suffix")
    a.add_argument("output", type=Path, help="output record path without suffix")
    a.add_argument("--channel", type=int, default=0)
    a.add_argument("--model", type=Path, help="generator ONNX (default: the shipped one)")
    a.add_argument("--classifier", type=Path, help="classifier ONNX (default: the shipped one)")
    a.add_argument("--seed", type=int, help="persona and latent seed (default: random)")
    a.add_argument("--data-dir", help=f"MIT-BIH directory for record names (default ${DATA_DIR_ENV} or ./data/mitdb)")

    r = sub.add_parser(
        "run", help="run the edge from a config file",
        description="Run sources (MQTT raw, Polar H10 over BLE, WFDB replay), the pipeline and sinks "
        "(MQTT anonymized topics, WFDB files) as configured; see docs/edge-config.md.",
    )
    r.add_argument("--config", type=Path, required=True, help="edge.toml")
    r.add_argument("--validate-config", action="store_true", help="check the config and exit")

    sm = sub.add_parser(
        "simulate", help="play a WFDB record as a wearable on ecg/raw/<device> over MQTT, pass after pass",
        description="Publish a WFDB record (default: the bundled MIT-BIH slice) as raw frames on "
        "<topic-prefix>/<device>, paced like a wearable, ending each pass with an end message; each pass is a "
        "new session. For trying an edge against a real broker (docker/compose.yaml runs one).",
    )
    sm.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT of the MQTT broker (default 127.0.0.1:1883)")
    sm.add_argument("--tls", action="store_true", help="connect with TLS")
    sm.add_argument("--ca-file", type=Path, help="CA that signed the broker's certificate (default: the system's)")
    sm.add_argument("--username", help="MQTT user name")
    sm.add_argument("--password-file", type=Path, help="file whose first line is the password (needs --username)")
    sm.add_argument("--device", default="sim-strap", help="device name in the topic (default sim-strap)")
    sm.add_argument("--topic-prefix", default="ecg/raw", help="default ecg/raw")
    sm.add_argument("--record", help=f"a WFDB record path without suffix (default: bundled {BUNDLED_RECORD})")
    sm.add_argument("--channel", type=int, default=0)
    sm.add_argument("--duration", type=float, default=0.0, help="seconds of the record per pass (default 0 = all)")
    sm.add_argument("--speed", type=float, default=1.0, help="1 = real time (default), 0 = as fast as possible")
    sm.add_argument("--frame-s", type=float, default=0.25, help="seconds per raw frame (default 0.25)")
    sm.add_argument("--passes", type=int, default=0, help="how many times to play the record (default 0 = forever)")

    be = sub.add_parser(
        "bench", help="simulated wearables through the full pipeline on one core (writes docs/benchmarks.md)",
        description="Run N simulated 360 Hz wearables (MIT-BIH slices) through the in-process pipeline on "
        "one thread, with the ONNX models and with the torch generator as the peer row; print streams sustained "
        "in real time, per-beat cost, added latency and memory per stream.",
    )
    be.add_argument("--streams", type=int, nargs="+", default=[100, 500, 1000])
    be.add_argument("--seconds", type=float, default=20.0, help="simulated seconds per run (default 20)")
    be.add_argument("--frame-ms", type=float, nargs="+", default=[100.0, 250.0], help="frame lengths to run (default 100 250)")
    be.add_argument("--arrivals", nargs="+", choices=("staggered", "lockstep"), default=["staggered", "lockstep"],
                    help="staggered: each wearable's frames on its own phase, stepped on the service's tick; "
                    "lockstep: every frame at once, one step per frame (the latency worst case); default both")
    be.add_argument("--repeats", type=int, default=1,
                    help="runs of each configuration; more than one adds a table of their spread and of how many "
                    "met both targets (default 1)")
    be.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True, help="also run the torch generator row")
    be.add_argument("--clock", choices=("cpu", "fixed"), default="cpu",
                    help="cpu: simulated time advances by the edge's CPU time, so a slow core falls behind (default); "
                    "fixed: the same ticks whatever the compute takes, the same work on any machine, for comparing "
                    "two versions by instruction counts (valgrind --tool=callgrind); its latency figures are the pipeline's "
                    "own waits (whole frames of post-R input, the tick, the detector) without the compute")
    be.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"), help="'-' for none")

    bf = sub.add_parser(
        "bench-fleet", help="simulated wearables through a real mosquitto, every anonymized frame counted",
        description="Start mosquitto, run the edge as its own process, play N Polar-H10-like wearables "
        "(130 Hz) in real time and count every anonymized sample a subscriber receives (docs/benchmarks.md).",
    )
    bf.add_argument("--wearables", type=int, default=500)
    bf.add_argument("--seconds", type=float, default=300.0)
    bf.add_argument("--frame", type=int, default=73, help="samples per raw frame (default 73, as a Polar H10)")
    bf.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"), help="'-' for none")
    bf.add_argument("--edge-log", type=Path, help="write the edge process's log here")
    bf.add_argument("--workers", type=int, default=1, help="edge worker processes sharing the fleet by topic shard")
    bf.add_argument("--shard-count", type=int, default=0,
                    help="with several workers: wearables publish on shard_of(device, N) and the workers share the "
                    "shards (shards = \"auto\"); 0 (default): worker w takes shard w, wearable i publishes on i mod W")

    b = sub.add_parser(
        "bench-detector",
        help="score the detector and its peers on all 48 MIT-BIH records (writes docs/benchmarks.md)",
        description="Run our streaming detector, wfdb's xqrs and NeuroKit2's detectors on every "
        "MIT-BIH record, score them against the reference beats (150 ms window), print the gross "
        "table and write it to a section of the output page.",
    )
    b.add_argument("--data-dir", help=f"MIT-BIH directory (default ${DATA_DIR_ENV} or ./data/mitdb)")
    b.add_argument("--records", nargs="+", help="subset of records (default: all 48)")
    b.add_argument("--channel", type=int, default=0)
    b.add_argument("--peers", default="xqrs,neurokit,pantompkins", help="comma-separated peers, or '' for none")
    b.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    b.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"), help="page to write (default docs/benchmarks.md); '-' for none")
    return parser


def cmd_detect(args: argparse.Namespace) -> int:
    from edge.scoring import score_beats

    record = args.record or str(bundled_record())
    if args.record is None:
        log.info("no record given: using the bundled slice of MIT-BIH record %s", BUNDLED_RECORD)
    rec = read_record(record, args.data_dir, args.channel)
    det = StreamingQRSDetector(rec.fs)
    frame = max(1, round(args.frame_ms * rec.fs / 1000.0))
    peaks = []
    for i in range(0, rec.signal.size, frame):
        peaks.extend(det.feed(rec.signal[i : i + frame]))
    peaks.extend(det.flush())
    samples = np.array([p.sample for p in peaks], dtype=np.int64)
    delays = np.array([(p.decided_at - p.sample) / rec.fs for p in peaks])

    import wfdb

    args.output_dir.mkdir(parents=True, exist_ok=True)
    if samples.size:
        wfdb.wrann(rec.name, "qrs", samples, ["N"] * samples.size, fs=rec.fs, write_dir=str(args.output_dir))
    else:
        log.warning("no beats detected: no annotation file written")
    duration = rec.signal.size / rec.fs
    rr = np.diff(samples) / rec.fs
    summary = (
        f"{rec.name}: {rec.lead} @ {rec.fs:g} Hz, {duration:.1f} s: {samples.size} beats"
        + (f" (mean HR {60.0 / np.mean(rr):.0f} bpm)" if rr.size else "")
        + (f", delay median {1000 * np.median(delays):.0f} ms p99 {1000 * np.percentile(delays, 99):.0f} ms" if delays.size else "")
    )
    if rec.beat_samples.size:
        s = score_beats(rec.beat_samples, samples, rec.fs, rec.flutter_spans)
        summary += f"; vs {rec.beat_samples.size} reference beats: Se {s.sensitivity:.2f}% +P {s.positive_predictivity:.2f}%"
    if samples.size:
        summary += f"; wrote {args.output_dir / (rec.name + '.qrs')}"
    print(summary)
    return 0


def cmd_bench_detector(args: argparse.Namespace) -> int:
    from edge import bench_detector as bench
    from edge.records import ALL_RECORDS, resolve_data_dir

    data_dir = str(resolve_data_dir(args.data_dir))
    peers = [p for p in args.peers.split(",") if p]
    results = bench.run_benchmark(data_dir, args.records or ALL_RECORDS, args.channel, peers, args.jobs)
    print(bench.gross_table(results))
    if str(args.output) != "-":
        command = "ecg-edge " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        machine = f"{platform.machine()}, Python {platform.python_version()}"
        bench.write_section(args.output, bench.SECTION, bench.report(results, command, machine))
        print(f"wrote {args.output}")
    return 0


def cmd_anonymize(args: argparse.Namespace) -> int:
    from edge.anonymize import anonymize_record
    from edge.records import record_path

    source = record_path(args.input, args.data_dir)
    result = anonymize_record(source, args.output, args.channel, args.model, args.classifier, args.seed)
    classes = {c: result.beat_labels.count(c) for c in sorted(set(result.beat_labels))}
    print(f"{args.output}: {len(result.signal)} samples at {result.fs:g} Hz, {len(result.beat_samples)} surrogate "
          f"beats {classes}, {100 * result.masked_fraction:.2f}% masked; wrote {args.output}.hea/.dat/.atr")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from edge import app
    from edge.config import load_config

    cfg = load_config(args.config)
    if args.validate_config:
        sinks = [name for name in ("mqtt", "wfdb") if getattr(cfg.sinks, name) is not None]
        refresh = f"{len(cfg.refresh.public_keys)} trusted key(s)" if cfg.refresh.public_keys else "off"
        print(f"{args.config}: valid ({len(cfg.sources.mqtt)} MQTT, {len(cfg.sources.ble)} BLE, "
              f"{len(cfg.sources.replay)} replay source(s); sinks: {', '.join(sinks)}; model refresh: {refresh})")
        return 0
    return app.main(cfg)


def cmd_demo(args: argparse.Namespace) -> int:
    from edge.demo import run_demo

    record = Path(args.record) if args.record else bundled_record()
    summary = run_demo(args.output_dir, record, args.channel, args.duration or None, args.speed, args.broker, args.seed)
    for key, value in summary.items():
        print(f"{key:>32}: {value}")
    print(f"wrote {args.output_dir}/demo.hea/.dat/.atr, demo.png and summary.json")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    import asyncio

    import aiomqtt

    from edge.mqtt import BrokerConfig, publish_record
    from edge.replay import read_wfdb

    host, _, port = args.broker.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--broker {args.broker!r}: expected HOST:PORT")
    if args.password_file is not None and args.username is None:
        raise ValueError("--password-file needs --username")
    if args.passes < 0 or args.speed < 0 or args.duration < 0:
        raise ValueError("--passes, --speed and --duration cannot be negative")
    password = args.password_file.read_text().splitlines()[0].strip() if args.password_file else None
    broker = BrokerConfig(host=host, port=int(port), tls=args.tls or args.ca_file is not None,
                          ca_file=str(args.ca_file) if args.ca_file else None, username=args.username,
                          password=password)
    record = Path(args.record) if args.record else bundled_record()
    signal, fs, _ = read_wfdb(record, args.channel)
    if args.duration:
        signal = signal[: round(args.duration * fs)]

    async def play() -> int:
        n = 0
        while args.passes == 0 or n < args.passes:
            n += 1
            # A fresh session token per pass: a pass whose end message was lost cannot run into the next.
            frames = await publish_record(broker, args.device, signal, fs, args.frame_s,
                                          args.speed if args.speed > 0 else False, topic_prefix=args.topic_prefix,
                                          t0=time.time(), session=secrets.token_hex(8))
            log.info("pass %d: %d frames of %s (%.0f s) on %s/%s via %s", n, frames, record.name, signal.size / fs,
                     args.topic_prefix, args.device, broker)
        return n

    try:
        passes = asyncio.run(play())
    except aiomqtt.MqttError as exc:
        print(f"ecg-edge simulate: error: broker {broker}: {exc}", file=sys.stderr)
        return 1
    print(f"played {record.name} {passes} time(s) on {args.topic_prefix}/{args.device} via {broker}")
    return 0


def cmd_bench_fleet(args: argparse.Namespace) -> int:
    from edge import bench_fleet

    return bench_fleet.main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from edge import bench

    return bench.main(args)


COMMANDS = {"demo": cmd_demo, "run": cmd_run, "anonymize": cmd_anonymize, "detect": cmd_detect,
            "simulate": cmd_simulate, "bench": cmd_bench, "bench-fleet": cmd_bench_fleet,
            "bench-detector": cmd_bench_detector}


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), COMMANDS, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
