"""Quick probe of classifier-guided redraw: DS2 records through the real edge pipeline (file mode)
for several K; the emitted beats (re-encoded from the output) read by the shipped classifier and by
the feature judge, paired with the reference annotations; wall time of the anonymization.

Record i runs under seed i, as the evaluation's first draw does (``ecg-trainer evaluate --seed 0``),
so the shipped-classifier and feature-judge rows repeat the evaluation's. JUDGE_RUN=<classifier
run directory> adds that classifier as a third reader.

usage: redraw_probe.py DATA_DIR CACHE_DIR MINUTES K [K ...] -- [RECORD ...]   (default: DS2)"""
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

from edge import codec
from edge.anonymize import anonymize_signal, load_models
from edge.pipeline import Anonymizer, PipelineSettings
from edge.records import AAMI_CLASSES, AAMI_OF_SYMBOL, DS1, DS2, read_record
from edge.scoring import match_beats
from trainer.dataset import load_records, rr_features
from trainer.feature_judge import fit_feature_judge, post_rr

data, cache, minutes = sys.argv[1], sys.argv[2], float(sys.argv[3])
sep = sys.argv.index("--")
ks, records = [int(k) for k in sys.argv[4:sep]], sys.argv[sep + 1:] or list(DS2)
jp = Path("/tmp/feature_judge.pkl")
if jp.exists():
    judge = pickle.loads(jp.read_bytes())
else:
    judge = fit_feature_judge(load_records(DS1, data, cache))
    jp.write_bytes(pickle.dumps(judge))
gen, cls = load_models()
readers = {"shipped": lambda beats, r, fs: cls.classify(beats, rr_features(r, fs)),
           "judge": lambda beats, r, fs: judge(beats, rr_features(r, fs), post_rr(r, fs))}
if os.environ.get("JUDGE_RUN"):
    from trainer.classifier import predict_proba
    from trainer.pipeline import load_run

    cnn = load_run(os.environ["JUDGE_RUN"])["module"]
    readers["cnn judge"] = lambda beats, r, fs: predict_proba(cnn, beats, rr_features(r, fs)).argmax(axis=1)

def f1(ref, pred):
    out = {}
    for c in "NSVF":
        tp = sum(r == c and p == c for r, p in zip(ref, pred)); fp = sum(r != c and p == c for r, p in zip(ref, pred))
        fn = sum(r == c and p != c for r, p in zip(ref, pred))
        out[c] = 2 * tp / (2 * tp + fp + fn) if tp + fn else float("nan")
    out["macro"] = float(np.nanmean([out[c] for c in "NSVF"]))
    return out

def fmt(d):
    return " ".join(f"{k} {v:.3f}" for k, v in d.items())

rows = {}
recs = {}
for name in records:
    rec = read_record(name, data, 0, sampto=None)
    n = min(len(rec.signal), round(minutes * 60 * rec.fs))
    keep = rec.beat_samples < n
    recs[name] = (rec.signal[:n], rec.fs, rec.beat_samples[keep], [AAMI_OF_SYMBOL[s] for s in rec.beat_symbols[keep]])
real = {k: ([], []) for k in readers}
for name, (x, fs, ref_r, ref_cls) in recs.items():
    enc = codec.encode(x, ref_r, fs)
    for key, read in readers.items():
        real[key][0].extend(ref_cls); real[key][1].extend(AAMI_CLASSES[int(k)] for k in read(enc.beats, ref_r, fs))
for key, (a, b) in real.items():
    print(f"real beats, {key:7s}: {fmt(f1(a, b))}")
for k in ks:
    acc = {k: ([], []) for k in ("edge", *readers)}
    intended = {k: [] for k in readers}  # (edge label, reader label) for every emitted beat
    secs = nbeats = 0
    for i, (name, (x, fs, ref_r, ref_cls)) in enumerate(recs.items()):
        an = Anonymizer(gen, cls, PipelineSettings(seed=i, redraw=k))
        t = time.perf_counter()
        out = anonymize_signal(x, fs, an)
        secs += time.perf_counter() - t
        r, labels = out.beat_samples, out.beat_labels
        nbeats += len(r)
        enc = codec.encode(np.nan_to_num(out.signal), r, fs)
        reads = {key: read(enc.beats, r, fs) for key, read in readers.items()}
        for key in intended:
            intended[key] += [(l, AAMI_CLASSES[int(p)]) for l, p in zip(labels, reads[key])]
        paired = match_beats(ref_r, r, round(0.15 * fs))
        for j, p in enumerate(paired):
            if p >= 0:
                acc["edge"][0].append(ref_cls[p]); acc["edge"][1].append(labels[j])
                for key in readers:
                    acc[key][0].append(ref_cls[p]); acc[key][1].append(AAMI_CLASSES[int(reads[key][j])])
    print(f"K={k}: {nbeats} beats, {1e6 * secs / nbeats:.0f} us/beat (whole file-mode pipeline)")
    for key, (a, b) in acc.items():
        print(f"  emitted, {key:7s}: {fmt(f1(a, b))}")
    for key, pairs in intended.items():
        rate = {c: np.mean([p == c for l, p in pairs if l == c]) for c in "NSV" if any(l == c for l, _ in pairs)}
        print(f"  surrogates read as their class by {key:7s}: " + " ".join(f"{c} {v:.2f}" for c, v in rate.items()))
    sys.stdout.flush()
