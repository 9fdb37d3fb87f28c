"""Beat codec: round trips on real MIT-BIH beats at the wearables' rates, canonical form, contract.

The round-trip bounds were set from measured figures (docs/codec.md) with modest headroom: the
residual is the record's content above the codec's band (quantisation noise above 112 Hz at
360 Hz; mains hum near 60 Hz at 128/130 Hz), so a misplaced R-peak, a lost slope or a scale error
shows up at once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import resample_poly

from edge.codec import (
    DEFAULT_SPEC,
    CodecError,
    CodecInputError,
    CodecSpec,
    CodecSpecError,
    DecodedBeats,
    cut_windows,
    EncodedBeats,
    decode,
    decode_span,
    encode,
    encode_span,
    encode_wait,
    encode_windows,
    window_cutter,
)
from edge.records import Record, read_record

DATA = Path(__file__).parent / "data"
RECORDS = ("100", "105", "119", "208", "232")
MITDB_FS = 360
#: rate -> (up, down) for resample_poly from 360 Hz.
RESAMPLE = {128: (16, 45), 130: (13, 36), 1000: (25, 9)}
#: rate -> (bound on the median PRD of a record, bound on any beat's PRD), percent.
PRD_BOUNDS = {360: (2.5, 4.0), 128: (4.0, 6.0), 130: (4.0, 6.0), 1000: (2.5, 4.0)}


@functools.cache
def _record(name: str) -> Record:
    return read_record(str(DATA / name))


@functools.cache
def _at_rate(name: str, fs: int) -> tuple[np.ndarray, np.ndarray]:
    """Channel 0 of a record and its reference R-peaks, resampled to ``fs``."""
    rec = _record(name)
    if fs == MITDB_FS:
        return rec.signal, rec.beat_samples
    up, down = RESAMPLE[fs]
    signal = resample_poly(rec.signal, up, down)
    peaks = np.round(rec.beat_samples * fs / MITDB_FS).astype(np.int64)
    return signal, peaks


def _round_trip(
    signal: np.ndarray, peaks: np.ndarray, fs: float
) -> tuple[EncodedBeats, DecodedBeats]:
    enc = encode(signal, peaks, fs)
    dec = decode(enc.beats, peaks, fs, enc.scale, enc.baseline, slope=enc.slope)
    return enc, dec


def _prd(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Percent root-mean-square difference per row, against the row's own mean (PRDN)."""
    return 100 * np.sqrt(((x - y) ** 2).sum(1) / ((x - x.mean(1, keepdims=True)) ** 2).sum(1))


# --- round trips on real beats -------------------------------------------------------------------


@pytest.mark.parametrize("fs", [360, 128, 130, 1000])
@pytest.mark.parametrize("name", RECORDS)
def test_round_trip_restores_real_beats(name: str, fs: int) -> None:
    signal, peaks = _at_rate(name, fs)
    enc, dec = _round_trip(signal, peaks, fs)

    # The R-peak lands on its input sample by construction of the index.
    np.testing.assert_array_equal(dec.start + dec.r_offset, peaks)
    kept = ~enc.padded
    assert kept.sum() >= len(peaks) - 2  # only beats at the slice ends are padded
    assert (dec.start[kept] >= 0).all() and (dec.start[kept] + dec.width <= len(signal)).all()

    original = signal[dec.start[kept, None] + np.arange(dec.width)]
    restored = dec.samples[kept]
    prd = _prd(original, restored)
    median_bound, max_bound = PRD_BOUNDS[fs]
    assert np.median(prd) < median_bound, f"{name} at {fs} Hz: median PRD {np.median(prd):.2f}%"
    assert prd.max() < max_bound, f"{name} at {fs} Hz: worst beat PRD {prd.max():.2f}%"

    # ... and the waveform's R deflection peaks where the input's does. Band-limiting moves the
    # top of a broad ventricular complex by up to 2 ms, which is 2 samples at 1000 Hz.
    tolerance = max(1, round(0.002 * fs))
    half = round(0.05 * fs)
    cols = dec.r_offset + np.arange(-half, half + 1)
    level = np.median(original, axis=1, keepdims=True)
    peak_in = np.abs(original[:, cols] - level).argmax(1)
    peak_out = np.abs(restored[:, cols] - level).argmax(1)
    assert np.abs(peak_in - peak_out).max() <= tolerance


def test_round_trip_covers_ventricular_beats() -> None:
    """The records above must exercise V beats, or the round trip says nothing about them."""
    classes = np.concatenate([_record(n).aami_classes for n in RECORDS])
    assert (classes == "V").sum() >= 50
    assert (classes == "N").sum() >= 300


def test_round_trip_catches_an_off_by_one_r_peak() -> None:
    """The PRD bound is tight enough to see a one-sample slip of the R-peak."""
    signal, peaks = _at_rate("100", MITDB_FS)
    enc = encode(signal, peaks, MITDB_FS)
    late = decode(enc.beats, peaks + 1, MITDB_FS, enc.scale, enc.baseline, slope=enc.slope)
    kept = ~enc.padded
    original = signal[late.start[kept, None] + np.arange(late.width)]
    assert np.median(_prd(original, late.samples[kept])) > PRD_BOUNDS[MITDB_FS][1]


def test_decode_at_the_canonical_rate_is_the_exact_inverse() -> None:
    signal, peaks = _at_rate("119", MITDB_FS)
    enc = encode(signal, peaks, MITDB_FS)
    fs = DEFAULT_SPEC.fs
    dec = decode(enc.beats, np.arange(len(peaks)) * 1000 + 500, fs, 2.0, 0.5)
    assert dec.width == DEFAULT_SPEC.length and dec.r_offset == DEFAULT_SPEC.pre
    np.testing.assert_allclose(dec.samples, enc.beats.astype(float) * 2.0 + 0.5, rtol=0, atol=1e-12)


def test_encode_then_decode_at_250_hz_is_lossless() -> None:
    signal, peaks = _at_rate("208", MITDB_FS)
    signal = resample_poly(signal, 25, 36)
    peaks = np.round(peaks * 250 / MITDB_FS).astype(np.int64)
    enc, dec = _round_trip(signal, peaks, 250.0)
    kept = ~enc.padded
    original = signal[dec.start[kept, None] + np.arange(dec.width)]
    assert _prd(original, dec.samples[kept]).max() < 1e-3  # float32 storage only


def test_decode_span_stays_inside_the_canonical_span() -> None:
    for fs in (100.0, 128.0, 130.0, 250.0, 360.0, 1000.0, 2000.0):
        before, after = decode_span(fs)
        assert before / fs <= DEFAULT_SPEC.pre_s + 1e-12
        assert after / fs <= (DEFAULT_SPEC.post - 1) / DEFAULT_SPEC.fs + 1e-12
        assert (before + 1) / fs > DEFAULT_SPEC.pre_s  # and misses no sample inside it
        assert (after + 1) / fs > (DEFAULT_SPEC.post - 1) / DEFAULT_SPEC.fs


# --- canonical form ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RECORDS)
def test_canonical_beats_are_unit_amplitude_and_centred(name: str) -> None:
    rec = _record(name)
    enc = encode(rec.signal, rec.beat_samples, rec.fs)
    spec = enc.spec
    assert enc.beats.dtype == np.float32 and enc.beats.shape == (len(rec.beat_samples), 192)
    assert np.isfinite(enc.beats).all() and not enc.flat.any()
    near = np.abs(enc.beats[:, spec.pre - spec.amplitude_n : spec.pre + spec.amplitude_n + 1])
    np.testing.assert_allclose(near.max(1), 1.0, atol=1e-6)
    # Normal beats are annotated at the R apex: it sits on index pre, within one canonical sample.
    normal = rec.aami_classes == "N"
    offset = near[normal].argmax(1) - spec.amplitude_n
    assert np.abs(offset).max() <= 1
    # Baseline removed: both ends of a beat sit near zero.
    assert np.median(np.abs(enc.beats[:, : spec.baseline_n])) < 0.05
    assert np.median(np.abs(enc.beats[:, -spec.baseline_n :])) < 0.05


@pytest.mark.parametrize("fs", [125.0, 128.0, 130.0, 250.0, 360.0, 500.0, 1000.0])
def test_r_peak_lands_exactly_on_index_pre(fs: float) -> None:
    """A symmetric spike centred on its R sample peaks at canonical index pre, at any rate."""
    n = int(10 * fs)
    peaks = np.array([int(1.0 * fs), int(4.3 * fs), int(7.7 * fs)])
    t = np.arange(n) / fs
    signal = 0.3 - 0.08 * t  # a drifting baseline, which the codec's line removes exactly
    for r in peaks:
        signal += 1.5 * np.exp(-0.5 * ((t - r / fs) / 0.012) ** 2)
    enc = encode(signal, peaks, fs)
    assert (np.abs(enc.beats).argmax(1) == DEFAULT_SPEC.pre).all()
    np.testing.assert_allclose(enc.beats[:, DEFAULT_SPEC.pre], 1.0, atol=1e-6)
    np.testing.assert_allclose(enc.scale, 1.5, rtol=1e-3)  # the spike's height above baseline
    np.testing.assert_allclose(enc.baseline, 0.3 - 0.08 * peaks / fs, atol=1e-3)
    np.testing.assert_allclose(enc.slope, -0.08, atol=1e-3)


def test_batch_split_does_not_change_any_beat() -> None:
    signal, peaks = _at_rate("208", MITDB_FS)
    whole = encode(signal, peaks, MITDB_FS)
    half = len(peaks) // 2
    first, second = encode(signal, peaks[:half], MITDB_FS), encode(signal, peaks[half:], MITDB_FS)
    singles = [encode(signal, peaks[i : i + 1], MITDB_FS) for i in range(0, len(peaks), 7)]
    for field in ("beats", "baseline", "slope", "scale", "padded", "flat"):
        joined = np.concatenate([getattr(first, field), getattr(second, field)])
        np.testing.assert_array_equal(getattr(whole, field), joined, err_msg=field)
        one_by_one = np.concatenate([getattr(s, field) for s in singles])
        np.testing.assert_array_equal(getattr(whole, field)[::7], one_by_one, err_msg=field)


@pytest.mark.parametrize(("gain", "offset"), [(1000.0, 0.0), (0.001, -5.0), (3.7, 1024.0)])
@pytest.mark.parametrize("name", ["105", "208"])
def test_canonical_beats_ignore_amplitude_and_offset(name: str, gain: float, offset: float) -> None:
    signal, peaks = _at_rate(name, MITDB_FS)
    rng = np.random.default_rng(int(gain * 1000) + len(name))
    peaks = np.sort(rng.choice(peaks, size=40, replace=False))
    plain = encode(signal, peaks, MITDB_FS)
    moved = encode(gain * signal + offset, peaks, MITDB_FS)
    np.testing.assert_allclose(moved.beats, plain.beats, rtol=0, atol=2e-6)
    np.testing.assert_allclose(moved.scale, gain * plain.scale, rtol=1e-9)
    np.testing.assert_allclose(moved.baseline, gain * plain.baseline + offset, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(moved.slope, gain * plain.slope, rtol=1e-9, atol=1e-9 * gain)


def test_flat_beats_stay_finite() -> None:
    fs, peaks = 360.0, np.array([400, 800, 1200])
    for signal in (np.zeros(2000), np.full(2000, 1024.0)):
        enc = encode(signal, peaks, fs)
        assert np.isfinite(enc.beats).all() and np.isfinite(enc.scale).all()
        assert enc.flat.all() and (enc.scale > 0).all()
        assert np.abs(enc.beats).max() < 1e-3


def test_padding_is_flagged_exactly_where_the_span_ends() -> None:
    fs = 360.0
    before, after = encode_span(fs)
    signal = np.sin(np.arange(3000) / 20.0)
    peaks = np.array([0, before - 1, before, 3000 - 1 - after, 3000 - after, 2999])
    enc = encode(signal, peaks, fs)
    np.testing.assert_array_equal(enc.padded, [True, True, False, False, True, True])
    assert np.isfinite(enc.beats).all()


def test_non_finite_samples_matter_only_inside_a_beat_span() -> None:
    fs, r = 360.0, 1000
    before, after = encode_span(fs)
    signal = np.sin(np.arange(3000) / 20.0)
    for at in (r - before - 1, r + after + 1):
        gappy = signal.copy()
        gappy[at] = np.nan
        assert np.isfinite(encode(gappy, [r], fs).beats).all()
    for at in (r - before, r + after):
        gappy = signal.copy()
        gappy[at] = np.nan
        with pytest.raises(CodecInputError, match=r"non-finite samples at R-peak\(s\) \[1000\]"):
            encode(gappy, [r], fs)


def test_no_beats_encode_to_an_empty_batch() -> None:
    enc = encode(np.zeros(100), np.array([], dtype=np.int64), 360.0)
    assert enc.beats.shape == (0, DEFAULT_SPEC.length) and len(enc) == 0
    dec = decode(enc.beats, enc.r_peaks, 130.0, 1.0, 0.0)
    assert dec.samples.shape[0] == 0


# --- the contract in model metadata --------------------------------------------------------------


def test_metadata_round_trip() -> None:
    custom = CodecSpec(fs=500.0, pre=100, post=300, baseline_n=20, lowpass=0.85, kaiser_beta=7.25)
    for spec in (DEFAULT_SPEC, custom):
        meta = spec.to_metadata()
        assert all(k.startswith("codec.") and isinstance(v, str) for k, v in meta.items())
        assert meta["codec.version"] == "1"
        back = CodecSpec.from_metadata({**meta, "classes": "N,S,V,F,Q", "producer": "x"})
        assert back == spec
    assert custom.length == 400 and custom.pre_s == 0.2 and custom.post_s == 0.6
    assert DEFAULT_SPEC.length == 192
    assert math.isclose(DEFAULT_SPEC.pre_s, 0.256) and math.isclose(DEFAULT_SPEC.post_s, 0.512)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"codec.version": None}, r"no codec\.version"),
        ({"codec.version": "2"}, r"version '2' is not supported"),
        ({"codec.pre": None}, r"missing codec\.pre"),
        ({"codec.pre": "sixty-four"}, r"codec\.pre='sixty-four' is not a valid int"),
        ({"codec.fs": "fast"}, r"codec\.fs='fast' is not a valid float"),
        ({"codec.fs": "nan"}, r"codec\.fs='nan' is not a valid float"),
        ({"codec.post": "0"}, r"post >= 2"),
        ({"codec.fs": "50.0"}, r"fs must be within \[100, 2000\]"),
        ({"codec.baseline": "highpass"}, r"baseline must be one of"),
        ({"codec.window": "hann"}, r"unknown keys codec\.window"),
    ],
)
def test_bad_metadata_is_refused_with_a_reason(change: dict[str, str | None], message: str) -> None:
    meta: dict[str, str] = DEFAULT_SPEC.to_metadata()
    for key, value in change.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    with pytest.raises(CodecSpecError, match=message):
        CodecSpec.from_metadata(meta)


def test_bad_specs_are_refused() -> None:
    with pytest.raises(CodecSpecError, match="pre must be an integer"):
        CodecSpec(pre=64.0)  # type: ignore[arg-type]
    with pytest.raises(CodecSpecError, match="lowpass must be within"):
        CodecSpec(lowpass=1.5)
    with pytest.raises(CodecSpecError, match="must be a mapping"):
        CodecSpec.from_metadata([("codec.version", "1")])  # type: ignore[arg-type]


# --- input the codec refuses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: encode(x, [500], 50.0), r"sample rate 50 Hz is outside"),
        (lambda x: encode(x, [500], 4000.0), r"sample rate 4000 Hz is outside"),
        (lambda x: encode(x, [500], float("nan")), r"sample rate must be a finite number"),
        (lambda x: encode(x, [500, 3000], 360.0), r"outside the signal of 3000 samples .*\[3000\]"),
        (lambda x: encode(x, [-1], 360.0), r"outside the signal"),
        (lambda x: encode(x, [500.5], 360.0), r"integer sample indices"),
        (lambda x: encode(x, [[500]], 360.0), r"1-D array"),
        (lambda x: encode(x[None, :], [500], 360.0), r"signal must be one .* lead"),
        (lambda x: encode(np.array(["a", "b"]), [0], 360.0), r"signal must be numeric"),
        (lambda x: decode(np.zeros((2, 100)), [1, 2], 360.0, 1.0, 0.0), r"shape \(n, 192\)"),
        (lambda x: decode(np.zeros((2, 192)), [1], 360.0, 1.0, 0.0), r"2 beats but 1 R-peaks"),
        (lambda x: decode(np.zeros((2, 192)), [1, 2], 360.0, -1.0, 0.0), r"scale must be positive"),
        (lambda x: decode(np.zeros((2, 192)), [1, 2], 360.0, [1.0] * 3, 0.0), r"one value per"),
        (lambda x: decode(np.full((1, 192), np.nan), [1], 360.0, 1.0, 0.0), r"non-finite"),
        (lambda x: decode(np.zeros((1, 192)), [1], 99.0, 1.0, 0.0), r"sample rate 99 Hz"),
    ],
)
def test_bad_input_is_refused_with_a_reason(
    call: Callable[[np.ndarray], object], message: str
) -> None:
    signal = np.sin(np.arange(3000) / 20.0)
    with pytest.raises(CodecInputError, match=message) as info:
        call(signal)
    assert isinstance(info.value, ValueError) and isinstance(info.value, CodecError)


def test_encode_windows_equals_encode_to_the_bit() -> None:
    """The edge cuts windows per stream and encodes all streams' beats in one call."""
    fs = 360.0
    x = np.sin(np.arange(4000) / 9.0) + 0.1 * np.random.default_rng(3).standard_normal(4000)
    r = np.array([2, 150, 700, 1500, 3990])  # the first and last windows run off the signal: edge-padded
    before, after = encode_span(fs)
    windows = x[np.clip(r[:, None] + np.arange(-before, after + 1), 0, len(x) - 1)]
    assert np.array_equal(cut_windows(x, r, fs), windows)
    assert np.array_equal(encode_windows(windows, fs), encode(x, r, fs).beats)
    for one in range(len(r)):  # one at a time takes the codec's small-batch paths: same bits
        assert np.array_equal(cut_windows(x, r[one : one + 1], fs)[0], windows[one])
        assert np.array_equal(encode_windows(windows[one : one + 1], fs)[0], encode(x, r, fs).beats[one])
    with pytest.raises(CodecInputError, match="shape"):
        encode_windows(windows[:, 1:], fs)
    bad = windows.copy()
    bad[1, 5] = np.nan
    with pytest.raises(CodecInputError, match="non-finite"):
        encode_windows(bad, fs)


@pytest.mark.parametrize("fs", [360, 130, 1000])
def test_a_live_beat_waits_only_for_its_post_r_window(fs: int) -> None:
    """A stream encodes a beat once the samples inside the canonical window's post-R part have
    arrived; what the resampling kernel reads beyond them is the last of them repeated, so later
    input cannot change the beat, and the beats stay close to the fully read ones."""
    wait = encode_wait(fs)
    assert wait / fs < DEFAULT_SPEC.post_s <= (wait + 1) / fs  # every sample inside the window, no more
    _, after = encode_span(fs)
    assert after > wait  # the kernel reaches past the window: that is the wait saved
    x, r = _at_rate("208", fs)
    r = r[(r > 400) & (r < len(x) - 2 * after)]
    cut = cut_windows(x, r, fs, after=wait)
    cutter = window_cutter(fs, after=wait)  # a stream's own: the same windows
    assert np.array_equal(cutter(x, r), cut)
    for k in range(0, len(r), 10):  # input arriving after the wait does not reach the beat
        later = x.copy()
        later[r[k] + wait + 1 :] += 5.0
        assert np.array_equal(cut_windows(later, r[k : k + 1], fs, after=wait)[0], cut[k])
        assert np.array_equal(cutter(later, r[k : k + 1])[0], cut[k])
        assert not np.array_equal(cut_windows(later, r[k : k + 1], fs)[0], cut_windows(x, r[k : k + 1], fs)[0])
    live, full = encode_windows(cut, fs), encode(x, r, fs).beats
    diff = np.abs(live - full).max(axis=1)
    assert np.median(diff) < 0.005 and diff.max() < 0.1  # canonical beats have R at about 1
