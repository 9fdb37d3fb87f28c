"""Training beats built with the shared codec from real MIT-BIH slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.codec import DEFAULT_SPEC
from edge.records import AAMI_CLASSES, read_record
from trainer.dataset import BeatSet, build_beatset, rr_features

DATA = Path(__file__).parent / "data"


def test_rr_features_are_causal_running_means() -> None:
    r = np.array([0, 360, 720, 900, 1440])  # 1 s, 1 s, 0.5 s (premature), 1.5 s (pause)
    rr = rr_features(r, 360)
    np.testing.assert_allclose(rr[:, 0], [1.0, 1.0, 1.0, 0.5, 1.5])
    np.testing.assert_allclose(rr[3, 1], np.mean([1.0, 1.0, 1.0, 0.5]))
    # changing a later beat must not change earlier features
    later = rr_features(np.array([0, 360, 720, 900, 1000]), 360)
    np.testing.assert_array_equal(later[:4], rr[:4])


def test_beatset_from_slices(tmp_path: Path) -> None:
    beats = build_beatset(["119", "208"], DATA)
    refs = [read_record(str(DATA / n)) for n in ("119", "208")]
    labelled = sum(int(np.count_nonzero(r.aami_classes != "")) for r in refs)
    assert labelled - 4 <= len(beats) <= labelled  # only beats at the slice edges are dropped
    assert beats.beats.shape == (len(beats), DEFAULT_SPEC.length) and beats.beats.dtype == np.float32
    counts = beats.class_counts()
    assert counts["V"] > 50 and counts["N"] > 100 and set(counts) == set(AAMI_CLASSES)
    assert np.all(np.abs(beats.beats[:, DEFAULT_SPEC.pre - 12 : DEFAULT_SPEC.pre + 13]).max(axis=1) > 0.99)
    assert 0.3 < float(np.median(beats.rr[:, 0])) < 1.5
    assert len(beats.data_hash) == 64
    path = tmp_path / "set.npz"
    beats.save(path)
    again = BeatSet.load(path)
    np.testing.assert_array_equal(again.beats, beats.beats)
    assert again.data_hash == beats.data_hash and again.spec == beats.spec
    assert build_beatset(["208", "119"], DATA).data_hash == beats.data_hash  # order-free
    assert build_beatset(["119"], DATA).data_hash != beats.data_hash
