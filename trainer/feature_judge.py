"""A classic feature-based beat classifier, used only as an independent *judge* of emitted beats.

The edge's classifier (a CNN) also picks and, with ``redraw``, screens the surrogates, so its
reading of the emitted beats is not an independent measure of whether their class survived. This
judge shares nothing with it but the training beats: in the spirit of de Chazal et al. (2004),
linear discriminants (or balanced boosted trees) over RR-interval features (the
following RR too: it reads finished recordings) and a handful of
morphology samples of the canonical beat (P-wave region, QRS, T wave). The variant is chosen by
its out-of-fold macro F1 (N, S, V, F) on DS1 record folds, like the shipped classifier.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.classifier import DS1_FOLDS
from trainer.dataset import BeatSet

#: Canonical beat: 250 Hz, R at sample 64. Morphology sample positions (relative ms to R).
_P_MS = np.linspace(-250, -60, 8)
_QRS_MS = np.linspace(-50, 100, 10)
_T_MS = np.linspace(150, 500, 9)


def post_rr(r_peaks: np.ndarray, fs: float) -> np.ndarray:
    """(n,) seconds from each beat to the next (the last beat repeats its previous interval).
    Not causal: the judge reads finished recordings, the edge never needs it."""
    r = np.asarray(r_peaks, dtype=np.float64)
    if r.size < 2:
        return np.full(r.size, 0.8)
    d = np.diff(r) / fs
    return np.append(d, d[-1])


def post_rr_of(ds: BeatSet, fs: float) -> np.ndarray:
    """``post_rr`` of every beat of a beat set, record by record (``fs``: the records' rate)."""
    out = np.zeros(len(ds), dtype=np.float64)
    for rec in np.unique(ds.record):
        m = np.flatnonzero(ds.record == rec)
        out[m] = post_rr(ds.sample[m], fs)
    return out


def judge_features(beats: np.ndarray, rr: np.ndarray, post: np.ndarray, fs: float = 250.0,
                   r_at: int = 64) -> np.ndarray:
    """(n, 8 + 27) features: log RR (pre, local, long, post) and the log ratios pre/local,
    pre/long, post/pre, post/local; the beat (codec-normalised amplitude) sampled in the P, QRS
    and T regions."""
    beats = np.asarray(beats, dtype=np.float64)
    rr = np.log(np.clip(np.asarray(rr, dtype=np.float64)[:, :3], 0.2, 3.0))
    lp = np.log(np.clip(np.asarray(post, dtype=np.float64), 0.2, 3.0))[:, None]
    rhythm = np.concatenate([rr, lp, rr[:, :1] - rr[:, 1:2], rr[:, :1] - rr[:, 2:3], lp - rr[:, :1],
                             lp - rr[:, 1:2]], axis=1)
    pos = np.concatenate([_P_MS, _QRS_MS, _T_MS]) / 1000 * fs + r_at
    idx = np.clip(np.round(pos).astype(int), 0, beats.shape[1] - 1)
    return np.concatenate([rhythm, beats[:, idx]], axis=1)


def _variants() -> dict[str, Callable[[], Any]]:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.ensemble import HistGradientBoostingClassifier

    def lda(power: float) -> Callable[[np.ndarray], Any]:
        return lambda counts: LinearDiscriminantAnalysis(priors=_priors(counts, power))

    return {
        "lda, equal priors": lda(0.0),
        "lda, sqrt priors": lda(0.5),
        "boosted trees, balanced": lambda counts: HistGradientBoostingClassifier(
            class_weight="balanced", max_iter=150, random_state=0),
    }


def _priors(counts: np.ndarray, power: float) -> np.ndarray:
    """Class priors ~ count ** power over the classes present (the discriminant's own classes)."""
    p = counts[counts > 0].astype(np.float64) ** power
    return p / p.sum()


def _macro_f1(ref: np.ndarray, pred: np.ndarray, classes: tuple[int, ...] = (0, 1, 2, 3)) -> float:
    f1 = []
    for c in classes:
        tp = np.sum((ref == c) & (pred == c))
        fp = np.sum((ref != c) & (pred == c))
        fn = np.sum((ref == c) & (pred != c))
        if tp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


@dataclass
class FeatureJudge:
    """``judge(beats, rr) -> class indices`` (AAMI_CLASSES order), and how it was chosen."""

    name: str
    model: Any
    classes: np.ndarray
    out_of_fold: dict[str, float]

    def __call__(self, beats: np.ndarray, rr: np.ndarray, post: np.ndarray) -> np.ndarray:
        return self.classes[self.model.predict(judge_features(beats, rr, post))]


def fit_feature_judge(ds1: BeatSet, fs: float = 360.0,
                      folds: tuple[tuple[str, ...], ...] = DS1_FOLDS) -> FeatureJudge:
    """Each variant scored out of fold on DS1 record folds; the best refitted on all of DS1."""
    x = judge_features(ds1.beats, ds1.rr, post_rr_of(ds1, fs))
    keep = ds1.labels < 4  # Q (a handful of DS1 beats) is not a class the judge can learn
    x, y, rec = x[keep], ds1.labels[keep], ds1.record[keep]
    scores = {}
    for name, make in _variants().items():
        pred = np.zeros_like(y)
        for fold in folds:
            test = np.isin(rec, fold)
            if not test.any() or len(np.unique(y[~test])) < 2:
                continue
            counts = np.bincount(y[~test], minlength=4)
            model = make(counts).fit(x[~test], y[~test])
            pred[test] = model.predict(x[test])
        scores[name] = _macro_f1(y, pred)
    best = max(scores, key=scores.get)
    model = _variants()[best](np.bincount(y, minlength=4)).fit(x, y)
    return FeatureJudge(best, model, np.arange(5), scores)
