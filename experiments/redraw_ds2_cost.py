"""What the redraw costs over DS2 as the evaluation runs it: every DS2 record (first MINUTES min,
file mode, one persona each), per K: beats, surrogates regenerated per beat, and CPU time spent
in the redraw (classifier re-read + regeneration) per beat, against the whole pipeline's.

usage: redraw_ds2_cost.py DATA_DIR MINUTES K [K ...]"""
import os
import sys
import time

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, "1")
from edge import pipeline
from edge.anonymize import anonymize_signal, load_models
from edge.records import DS2, read_record

data, minutes, ks = sys.argv[1], float(sys.argv[2]), [int(k) for k in sys.argv[3:]]
gen, cls = load_models()
inner = pipeline.redraw
spent = {"s": 0.0}


def timed_redraw(*args, **kwargs):
    t = time.process_time()
    try:
        return inner(*args, **kwargs)
    finally:
        spent["s"] += time.process_time() - t


pipeline.redraw = timed_redraw
signals = []
for name in DS2:
    rec = read_record(name, data, 0, sampto=None)
    signals.append((rec.signal[: round(minutes * 60 * rec.fs)], rec.fs))
for k in ks:
    spent["s"] = 0.0
    beats = rows = screened = 0
    t = time.process_time()
    for i, (x, fs) in enumerate(signals):
        an = pipeline.Anonymizer(gen, cls, pipeline.PipelineSettings(seed=i, redraw=k))
        out = anonymize_signal(x, fs, an)
        beats += len(out.beat_samples)
        rows += an.metrics.redraw_rows._value.get()
        screened += sum(label in an.settings.redraw_classes for label in out.beat_labels) if k else 0
    total = time.process_time() - t
    print(f"K={k:2d}: {beats} beats, whole file-mode pipeline {1e6 * total / beats:.0f} us/beat CPU, "
          f"in redraw {1e6 * spent['s'] / beats:.0f} us/beat; per beat: {screened / beats:.3f} surrogates re-read, "
          f"{rows / beats:.3f} regenerated (and re-read)", flush=True)
