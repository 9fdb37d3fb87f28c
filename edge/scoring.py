"""Beat-by-beat comparison of detected R-peaks with reference annotations (ANSI/AAMI EC57 style).

Used by `ecg-edge detect` for its summary and by the detector benchmark, so both score the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Match window used throughout the QRS-detection literature on MIT-BIH.
MATCH_WINDOW_S = 0.150


@dataclass(frozen=True)
class BeatScore:
    """True positives, misses and false detections, with the derived rates (in percent)."""

    tp: int
    fn: int
    fp: int

    @property
    def sensitivity(self) -> float:
        return 100.0 * self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def positive_predictivity(self) -> float:
        return 100.0 * self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    def __add__(self, other: BeatScore) -> BeatScore:
        return BeatScore(self.tp + other.tp, self.fn + other.fn, self.fp + other.fp)


def match_beats(reference: np.ndarray, detected: np.ndarray, window: int) -> np.ndarray:
    """Pair each reference beat with the nearest unpaired detection within ``window`` samples.

    Returns, for each detection, the index of its reference beat or -1 (a false detection).
    Both inputs must be sorted. Greedy in reference order, as EC57's bxb does.
    """
    ref = np.asarray(reference, dtype=np.int64)
    det = np.asarray(detected, dtype=np.int64)
    paired = np.full(det.size, -1, dtype=np.int64)
    lo_idx = np.searchsorted(det, ref - window, side="left")
    hi_idx = np.searchsorted(det, ref + window, side="right")
    for i, (lo, hi) in enumerate(zip(lo_idx, hi_idx)):
        best, best_dist = -1, window + 1
        for k in range(lo, hi):
            dist = abs(int(det[k]) - int(ref[i]))
            if paired[k] < 0 and dist < best_dist:
                best, best_dist = k, dist
        if best >= 0:
            paired[best] = i
    return paired


def score_beats(
    reference: np.ndarray,
    detected: np.ndarray,
    fs: float,
    excluded_spans: tuple[tuple[int, int], ...] = (),
) -> BeatScore:
    """Score detections against reference beats with the 150 ms window.

    Detections inside ``excluded_spans`` (ventricular flutter episodes, where MIT-BIH annotates no
    beats) are not counted as false, as EC57 prescribes; pass no spans to count every detection.
    """
    det = np.sort(np.asarray(detected, dtype=np.int64))
    paired = match_beats(np.sort(reference), det, round(MATCH_WINDOW_S * fs))
    tp = int(np.count_nonzero(paired >= 0))
    false = paired < 0
    for start, end in excluded_spans:
        false &= ~((det >= start) & (det <= end))
    return BeatScore(tp=tp, fn=int(len(reference) - tp), fp=int(np.count_nonzero(false)))
