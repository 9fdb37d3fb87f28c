"""Edge cost of classifier-guided redraw: ``edge.bench.run_once`` (N simulated 360 Hz wearables,
one thread, in-process pipeline, ONNX models) with ``PipelineSettings.redraw`` = K, on record
100 (the bench's bundled slice, almost all N) and on the first 5 min of record 232 (many S beats).

usage: redraw_cost.py DATA_DIR STREAMS SECONDS FRAME_MS K [K ...]"""
import functools
import logging
import os
import sys
import time

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, "1")
from edge import pipeline
from edge.anonymize import load_models
from edge.bench import run_once
from edge.records import read_record

logging.getLogger("edge.pipeline").setLevel(logging.WARNING)
data, streams, seconds, frame_ms = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
ks = [int(k) for k in sys.argv[5:]]
gen, cls = load_models()
base = pipeline.PipelineSettings
inner = pipeline.redraw
spent = {"s": 0.0, "rows": 0, "beats": 0}
render = pipeline.Anonymizer._render


def counted_render(self, ready):  # every rendered beat, warm-up included, like the redraw time
    spent["beats"] += sum(len(r.r) for _, _, r in ready)
    return render(self, ready)


pipeline.Anonymizer._render = counted_render


def timed_redraw(*args, **kwargs):  # the time spent in the redraw itself (classifier + generator calls)
    t = time.process_time()
    out = inner(*args, **kwargs)
    spent["s"] += time.process_time() - t
    spent["rows"] += out.rows
    return out


pipeline.redraw = timed_redraw
for name in ("100", "232"):
    rec = read_record(name, data, 0, sampto=None)
    x = rec.signal[: round(300 * rec.fs)]
    for k in ks:
        pipeline.PipelineSettings = functools.partial(base, redraw=k)
        spent.update(s=0.0, rows=0, beats=0)
        r = run_once(gen, cls, streams, seconds, frame_ms, x, rec.fs)
        print(f"record {name} K={k:2d}: {r.beats} beats, {r.us_per_beat:.0f} us/beat CPU, "
              f"in redraw {1e6 * spent['s'] / spent['beats']:.0f} us/beat, "
              f"{spent['rows'] / spent['beats']:.3f} regenerated rows/beat, "
              f"p99 latency {1000 * r.latency_p99:.0f} ms, realtime x{r.realtime_factor:.1f}", flush=True)
pipeline.PipelineSettings = base
