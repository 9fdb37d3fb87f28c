"""`ecg-edge`: the edge agent's command line."""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import sys
from importlib import resources
from pathlib import Path

import numpy as np

from edge import __version__
from edge.detector import StreamingQRSDetector
from edge.console import run_command
from edge.records import DATA_DIR_ENV, read_record

log = logging.getLogger("edge")

BUNDLED_RECORD = "208"

DESCRIPTION = """\
Anonymize wearable ECG at the edge: find every heartbeat in a live stream and replace it with a
synthetic beat of the same class at the same instant, so heart rate, rhythm and beat classes are
kept and the wearer's waveform is not.

Commands available now:
  detect          find the R-peaks of a WFDB record with the streaming QRS detector
  bench-detector  score the detector and published peers on the whole MIT-BIH database
"""

EPILOG = f"""\
examples:
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


COMMANDS = {"detect": cmd_detect, "bench-detector": cmd_bench_detector}


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), COMMANDS, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
