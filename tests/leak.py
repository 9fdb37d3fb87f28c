"""The no-raw-sample check for outputs that arrive over MQTT, rounded to the payload's resolution.

At 0.1 µV a synthetic sample equals the input sample at the same instant by chance about once in
twenty thousand samples (measured: 48 of 864,000 over the five test slices and four seeds), so
"no sample equal" fails at random on a long enough stream. Two in a row happen too (once in those
864,000), on R upstrokes: the surrogate's R-peak sits on the input's, so the slopes there match.
A leak (pass-through, a splice of the input) forwards runs of input samples, or the input's shape
under a gain: those are what this checks, on every forwarded sample.
"""

from __future__ import annotations

import numpy as np

# Chance coincidences at 4 decimals run at about 6e-5 per sample; a leak of even 1 % is over 100x this.
MAX_EQUAL_SHARE = 1e-3
# Three input samples in a row (8 ms at 360 Hz) is a splice, not a coincidence.
MAX_RUN = 2


def assert_no_raw_sample(out: np.ndarray, raw: np.ndarray, decimals: int = 4) -> None:
    """``out`` (as forwarded, NaN where masked) carries no run, share or shape of ``raw``."""
    assert out.shape == raw.shape
    forwarded = np.isfinite(out)
    assert forwarded.mean() > 0.9
    equal = forwarded & (out == np.round(raw, decimals))
    assert equal.mean() <= MAX_EQUAL_SHARE, f"{equal.sum()} of {len(out)} forwarded samples equal the input"
    runs = np.lib.stride_tricks.sliding_window_view(equal, MAX_RUN + 1).all(axis=1)
    assert not runs.any(), f"{MAX_RUN + 1} consecutive forwarded samples equal the input"
    assert abs(np.corrcoef(out[forwarded], raw[forwarded])[0, 1]) < 0.9

