"""edge.window.SampleWindow against what it replaces: concatenate each frame, slice the front off."""

from __future__ import annotations

import numpy as np

from edge.window import SampleWindow


def test_window_matches_concatenate_and_slice() -> None:
    rng = np.random.default_rng(0)
    keep = 100
    window = SampleWindow(2, keep)
    ref, start = np.empty((2, 0)), 0
    for _ in range(400):
        k = int(rng.choice([0, 1, 7, 36, 49, 90, 250]))  # 250: larger than keep plus the slack
        frame = rng.standard_normal((2, k))
        window.append(frame[0], frame[1])
        ref = np.concatenate([ref, frame], axis=1)
        a, b = window.rows()
        assert np.array_equal(a, ref[0]) and np.array_equal(b, ref[1]) and len(window) == ref.shape[1]
        drop = ref.shape[1] - keep
        assert window.trim() == max(drop, 0)
        if drop > 0:
            ref, start = ref[:, drop:], start + drop
        assert window.start == start and np.array_equal(window.rows()[0], ref[0])
    assert window.nbytes < 2 * 8 * (250 + keep + keep)  # storage stays bounded by the largest frame
