"""Beat matching as EC57 does it: one-to-one, nearest within 150 ms."""

from __future__ import annotations

import numpy as np

from edge.scoring import BeatScore, match_beats, score_beats


def test_perfect_and_shifted_detections() -> None:
    ref = np.arange(100, 10_000, 300)
    assert score_beats(ref, ref, 360) == BeatScore(tp=len(ref), fn=0, fp=0)
    assert score_beats(ref, ref + 54, 360).fn == 0  # exactly 150 ms late still matches
    s = score_beats(ref, ref + 55, 360)
    assert s.tp == 0 and s.fn == s.fp == len(ref)


def test_a_detection_pairs_with_one_reference_only() -> None:
    ref = np.array([1000, 1040])  # two beats 111 ms apart
    paired = match_beats(ref, np.array([1020]), 54)
    assert paired.tolist() == [0]
    assert score_beats(ref, [1020], 360) == BeatScore(tp=1, fn=1, fp=0)


def test_nearest_unpaired_detection_wins() -> None:
    paired = match_beats(np.array([1000]), np.array([960, 990, 1030]), 54)
    assert paired.tolist() == [-1, 0, -1]


def test_excluded_spans_do_not_count_false_detections() -> None:
    ref = np.array([100, 400])
    det = np.array([100, 250, 400, 900])
    assert score_beats(ref, det, 360).fp == 2
    assert score_beats(ref, det, 360, excluded_spans=((200, 300),)).fp == 1
    s = BeatScore(tp=997, fn=3, fp=1)
    assert round(s.sensitivity, 1) == 99.7 and round(s.positive_predictivity, 1) == 99.9
