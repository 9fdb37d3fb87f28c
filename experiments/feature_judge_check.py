"""Fit the feature judge on DS1 and score it on the real DS2 beats (reference R-peaks), per class;
also with every beat's morphology replaced by the DS1 mean N beat (RR kept), to show how much of
its reading rests on morphology rather than rhythm."""
import sys
import time

import numpy as np

from edge.records import AAMI_CLASSES, DS1, DS2
from trainer.dataset import load_records
from trainer.feature_judge import fit_feature_judge, post_rr_of

data, cache = sys.argv[1], sys.argv[2]
t = time.time()
ds1 = load_records(DS1, data, cache); ds2 = load_records(DS2, data, cache)
judge = fit_feature_judge(ds1)
print("out of fold DS1 macro F1:", judge.out_of_fold, "chosen:", judge.name, f"({time.time()-t:.0f} s)")

def f1(ref, pred):
    out = {}
    for c in range(4):
        tp = np.sum((ref == c) & (pred == c)); fp = np.sum((ref != c) & (pred == c)); fn = np.sum((ref == c) & (pred != c))
        out[AAMI_CLASSES[c]] = round(2 * tp / (2 * tp + fp + fn), 3)
    out["macro"] = round(float(np.mean(list(out.values()))), 3)
    return out

post = post_rr_of(ds2, 360.0)
print("DS2 real beats:", f1(ds2.labels, judge(ds2.beats, ds2.rr, post)))
n_mean = ds1.beats[ds1.labels == 0].mean(axis=0)
print("DS2, morphology replaced by mean N beat:", f1(ds2.labels, judge(np.broadcast_to(n_mean, ds2.beats.shape), ds2.rr, post)))
print("DS2, S beats' morphology replaced by mean N beat:",
      f1(ds2.labels, judge(np.where((ds2.labels == 1)[:, None], n_mean, ds2.beats), ds2.rr, post)))
from edge.anonymize import load_models

gen, cls = load_models()
print("shipped classifier, DS2 real beats:", f1(ds2.labels, cls.classify(ds2.beats, ds2.rr)))
print("shipped, morphology replaced by mean N beat:", f1(ds2.labels, cls.classify(np.broadcast_to(n_mean, ds2.beats.shape).copy(), ds2.rr)))
