"""Beat codec: the one transform the trainer and the edge must share exactly.

Models never see the wearer's stream. They see *canonical beats*: a fixed window around each
R-peak, resampled to one rate so that the R-peak always sits on canonical index ``spec.pre``, with
the baseline removed and the amplitude scaled to one. The trainer encodes MIT-BIH beats with
``encode``; the generator emits canonical beats; the edge maps them back onto the live stream's
clock with ``decode``. If the two sides disagreed by a sample or a scale factor, every surrogate
would be shifted or distorted, so both import this module, and every parameter that changes the
output is part of ``CodecSpec``, written into each model's ONNX metadata and checked at load time.

Why each step is what it is:

* **Window.** ``[-pre_s, +post_s)`` around the R-peak: 0.256 s before R covers the P wave at
  normal rates, 0.512 s after covers the T wave. Input samples outside the signal are edge-padded
  and the beat is flagged ``padded``; a beat whose window holds a NaN is refused, since a beat
  cannot be half known.
* **Resampling.** One band-limited interpolator, a Kaiser-windowed sinc evaluated at the
  canonical times ``(k - pre) / spec.fs`` relative to the R-peak time. When the output rate is
  lower than the input rate the sinc's cutoff drops to ``spec.lowpass`` of the output Nyquist
  (anti-aliasing and interpolation in one kernel); otherwise the cutoff is the input Nyquist, so
  the interpolator passes input samples through unchanged where the grids coincide (at 250 Hz,
  decoding undoes encoding to rounding). R-peaks are integer samples and the canonical grid is
  fixed relative to R, so for a given rate the map from input window to canonical beat is the same
  linear map for every beat: it is built once per rate and cached, and encoding a batch is a few
  dozen vectorised gathers. The taps are summed in a fixed order, so a beat's canonical form does
  not depend on which other beats share its batch (bit for bit).
* **Baseline.** A straight line through the medians of the first and last ``baseline_n``
  canonical samples (48 ms each, at 250 Hz). At normal heart rates these segments lie in the TP
  segment before the P wave and after the T wave, where the ECG is isoelectric; a median ignores
  the odd spike. Above about 100 bpm they reach the neighbouring beats' T and P waves, and the
  line is then a consistent rather than an isoelectric reference (the same for trainer and edge). Removing a line rather than a constant takes out the slope of respiratory
  baseline wander, which would otherwise be variance the generator has to learn, and it leaves
  both ends of each canonical beat near zero, so decoded beats join a flat synthetic baseline
  without steps. It is computed on the canonical grid, so its definition does not depend on the
  input rate. Its level at R and its slope are returned, so decode can restore the original.
* **Amplitude.** The divisor is the largest ``|deviation|`` within ``amplitude_n`` canonical
  samples (48 ms) of the R-peak: the R (or QS, for many ventricular beats) deflection, whatever
  its polarity. A floor keeps flat beats finite (see ``encode``).

``decode`` runs the same interpolator from the canonical grid to the target rate, with the
canonical R sample mapped exactly onto the given target sample, then multiplies by ``scale`` and
adds ``baseline`` (and optionally ``slope``). For the anonymizer these come from the synthetic
persona, never from the wearer; the round-trip tests pass the encoder's own values back.

numpy only: the edge never imports torch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

log = logging.getLogger(__name__)

#: Input and target sample rates the codec accepts, Hz (wearables run 125..1000 Hz).
MIN_FS = 100.0
MAX_FS = 2000.0
#: Codec versions this module can encode and decode.
SUPPORTED_VERSIONS: tuple[str, ...] = ("1",)
#: Baseline and amplitude methods of version 1 (named in the spec so a model records them).
BASELINE_METHODS: tuple[str, ...] = ("end-medians",)
AMPLITUDE_METHODS: tuple[str, ...] = ("max-abs",)
RESAMPLERS: tuple[str, ...] = ("kaiser-sinc",)
#: Prefix of the codec's keys in ONNX ``metadata_props``.
METADATA_PREFIX = "codec."

# Amplitude floor, part of version 1: the divisor is never below this fraction of the beat's
# largest deviation anywhere in the window (an R region flat next to an artefact), nor below this
# fraction of the largest absolute sample (a flat line at a large offset, whose deviations are
# rounding noise), nor zero.
_FLOOR_OF_DEVIATION = 1e-3
_FLOOR_OF_LEVEL = 1e-9
# Beats per internal block: bounds memory when the trainer encodes a whole database at once.
_BLOCK = 4096


class CodecError(ValueError):
    """Base of the codec's errors."""


class CodecSpecError(CodecError):
    """A codec spec (or a model's codec metadata) that is incomplete, malformed or unsupported."""


class CodecInputError(CodecError):
    """Input the codec refuses: wrong shape, sample rate out of range, R-peak outside the signal,
    non-finite samples in a beat window."""


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass(frozen=True)
class CodecSpec:
    """Everything that determines a canonical beat; a model trained on one spec fits only it.

    Lengths are canonical samples (integers are exact, seconds would need rounding rules).
    """

    version: str = "1"
    fs: float = 250.0  # canonical sample rate, Hz
    pre: int = 64  # canonical samples before the R-peak; R sits at index ``pre``
    post: int = 128  # canonical samples from the R-peak on (R included): length = pre + post
    baseline: str = "end-medians"  # line through the medians of the two end segments
    baseline_n: int = 12  # canonical samples in each end segment
    amplitude: str = "max-abs"  # divisor: largest |deviation| near R
    amplitude_n: int = 12  # ... within this many canonical samples either side of R
    resampler: str = "kaiser-sinc"
    lowpass: float = 0.9  # anti-alias cutoff when decimating, as a fraction of the output Nyquist
    kernel_zeros: int = 8  # sinc zero crossings either side of the centre tap
    kaiser_beta: float = 8.0  # Kaiser window shape (stop-band attenuation vs transition width)

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise CodecSpecError("invalid codec spec: " + "; ".join(problems))

    def _problems(self) -> Iterator[str]:
        if self.version not in SUPPORTED_VERSIONS:
            yield (
                f"codec version {self.version!r} is not supported "
                f"(this build supports {', '.join(SUPPORTED_VERSIONS)})"
            )
        for name in ("fs", "lowpass", "kaiser_beta"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                yield f"{name} must be a finite number, got {value!r}"
        for name in ("pre", "post", "baseline_n", "amplitude_n", "kernel_zeros"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                yield f"{name} must be an integer, got {value!r}"
        for name, allowed in (
            ("baseline", BASELINE_METHODS),
            ("amplitude", AMPLITUDE_METHODS),
            ("resampler", RESAMPLERS),
        ):
            if getattr(self, name) not in allowed:
                yield f"{name} must be one of {allowed}, got {getattr(self, name)!r}"
        try:
            if not MIN_FS <= self.fs <= MAX_FS:
                yield f"fs must be within [{MIN_FS:g}, {MAX_FS:g}] Hz, got {self.fs!r}"
            if self.pre < 1 or self.post < 2:
                yield f"pre must be >= 1 and post >= 2, got pre={self.pre}, post={self.post}"
            if not 1 <= self.baseline_n <= min(self.pre, self.post - 1):
                yield f"baseline_n must be within [1, min(pre, post - 1)], got {self.baseline_n}"
            if not 0 <= self.amplitude_n <= min(self.pre, self.post - 1):
                yield f"amplitude_n must be within [0, min(pre, post - 1)], got {self.amplitude_n}"
            if not 0.0 < self.lowpass <= 1.0:
                yield f"lowpass must be within (0, 1], got {self.lowpass}"
            if self.kernel_zeros < 1:
                yield f"kernel_zeros must be >= 1, got {self.kernel_zeros}"
            if self.kaiser_beta < 0:
                yield f"kaiser_beta must be >= 0, got {self.kaiser_beta}"
        except TypeError:  # a wrongly typed field, reported above
            pass

    @property
    def length(self) -> int:
        """Canonical samples per beat."""
        return self.pre + self.post

    @property
    def pre_s(self) -> float:
        """Seconds of window before the R-peak."""
        return self.pre / self.fs

    @property
    def post_s(self) -> float:
        """Seconds of window from the R-peak on (the window is ``[-pre_s, +post_s)``)."""
        return self.post / self.fs

    def to_metadata(self) -> dict[str, str]:
        """The spec as ONNX ``metadata_props`` entries: ``codec.<field>`` -> string."""
        return {METADATA_PREFIX + f.name: _format(f.type, getattr(self, f.name)) for f in _FIELDS}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> CodecSpec:
        """Read a spec back from ONNX ``metadata_props`` (other keys are ignored).

        Every field must be present: a contract with silent defaults is no contract. Raises
        CodecSpecError naming what is missing, unknown, unparsable or unsupported.
        """
        if not isinstance(metadata, Mapping):
            raise CodecSpecError(f"codec metadata must be a mapping, got {type(metadata).__name__}")
        given = {
            k[len(METADATA_PREFIX) :]: v
            for k, v in metadata.items()
            if isinstance(k, str) and k.startswith(METADATA_PREFIX)
        }
        if "version" not in given:
            raise CodecSpecError(
                f"no {METADATA_PREFIX}version in the metadata: the model carries no codec "
                "contract (was it exported with CodecSpec.to_metadata()?)"
            )
        if given["version"] not in SUPPORTED_VERSIONS:
            raise CodecSpecError(
                f"codec version {given['version']!r} is not supported by this build "
                f"(supported: {', '.join(SUPPORTED_VERSIONS)}); update the edge or re-export "
                "the model with a supported codec"
            )
        names = {f.name for f in _FIELDS}
        missing = sorted(names - given.keys())
        if missing:
            raise CodecSpecError(
                "codec metadata is missing " + ", ".join(METADATA_PREFIX + m for m in missing)
            )
        unknown = sorted(given.keys() - names)
        if unknown:
            raise CodecSpecError(
                "codec metadata has unknown keys " + ", ".join(METADATA_PREFIX + u for u in unknown)
                + f" for version {given['version']!r}; the model was written by another codec"
            )
        values: dict[str, Any] = {}
        for f in _FIELDS:
            values[f.name] = _parse(f.name, f.type, given[f.name])
        return cls(**values)


_FIELDS = dataclasses.fields(CodecSpec)
DEFAULT_SPEC = CodecSpec()


def _format(kind: object, value: object) -> str:
    # repr of a float round-trips exactly; str of an int or str is itself.
    return repr(float(value)) if kind == "float" else str(value)  # type: ignore[arg-type]


def _parse(name: str, kind: object, text: object) -> object:
    key = METADATA_PREFIX + name
    if not isinstance(text, str):
        raise CodecSpecError(f"{key} must be a string, got {type(text).__name__}")
    try:
        if kind == "float":
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
            return value
        if kind == "int":
            return int(text)
    except ValueError:
        raise CodecSpecError(f"{key}={text!r} is not a valid {kind}") from None
    return text


@dataclass(frozen=True)
class EncodedBeats:
    """Canonical beats plus what decode needs to put each one back where it came from."""

    beats: np.ndarray  # float32 (n, spec.length); R at column spec.pre, max |x| near R is 1
    r_peaks: np.ndarray  # int64 (n,): input sample of each R-peak
    fs: float  # input sample rate, Hz
    baseline: np.ndarray  # float64 (n,): removed baseline level at the R-peak, input units
    slope: np.ndarray  # float64 (n,): slope of the removed baseline, input units per second
    scale: np.ndarray  # float64 (n,): amplitude divisor, input units
    padded: np.ndarray  # bool (n,): some input the beat needed lay outside the signal
    flat: np.ndarray  # bool (n,): amplitude was below the floor; the beat is not unit-amplitude
    spec: CodecSpec = DEFAULT_SPEC

    def __len__(self) -> int:
        return len(self.r_peaks)


@dataclass(frozen=True)
class DecodedBeats:
    """Beats on the target clock: row i covers samples ``start[i] .. start[i] + width - 1``."""

    start: np.ndarray  # int64 (n,): target sample of each row's first column (may be < 0)
    samples: np.ndarray  # float64 (n, width)
    r_offset: int  # column of the R-peak in every row: start + r_offset == r_peaks
    fs: float

    def __len__(self) -> int:
        return len(self.start)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_sample, samples)`` per beat."""
        for s, row in zip(self.start, self.samples):
            yield int(s), row

    @property
    def width(self) -> int:
        return self.samples.shape[1]


def encode_span(fs: float, spec: CodecSpec = DEFAULT_SPEC) -> tuple[int, int]:
    """Input samples the encoder reads before and after the R-peak (both inclusive); a live
    stream waits only for :func:`encode_wait` of the ``after`` ones."""
    kernel = _encode_kernel(_check_fs(fs), spec)
    return kernel.before, kernel.after


def encode_wait(fs: float, spec: CodecSpec = DEFAULT_SPEC) -> int:
    """Input samples after the R-peak a live stream waits for before it encodes a beat: those
    inside the canonical window's post-R span (``post_s``). The resampling kernel reaches about
    36 ms further (``encode_span``); a stream repeats its last waited-for sample there (see
    ``cut_windows``) instead of waiting for them, which changes the last few canonical samples
    a little (baseline, past the T wave) and the shipped classifier's label on 2 of the 100,689
    DS1+DS2 beats."""
    return math.ceil(_check_fs(fs) * spec.post_s) - 1


def decode_span(fs: float, spec: CodecSpec = DEFAULT_SPEC) -> tuple[int, int]:
    """Target samples a decoded beat covers before and after its R-peak (both inclusive)."""
    kernel = _decode_kernel(_check_fs(fs), spec)
    return kernel.before, kernel.after


def encode(
    signal: ArrayLike, r_peaks: ArrayLike, fs: float, spec: CodecSpec = DEFAULT_SPEC
) -> EncodedBeats:
    """Canonical beats of ``signal`` (one lead, any units) at the given R-peak samples.

    The amplitude divisor is ``max(a, 1e-3 * d, 1e-9 * m, tiny)``, where ``a`` is the largest
    |deviation| within ``amplitude_n`` of R, ``d`` the largest anywhere in the window and ``m``
    the largest absolute resampled sample: a flat or R-less beat comes out small and finite,
    never NaN or inf, and is flagged ``flat``.

    Raises CodecInputError for a signal that is not 1-D, a rate outside [100, 2000] Hz, R-peaks
    that are not integer samples inside the signal, or a beat window with non-finite samples.
    """
    x = _as_signal(signal)
    fs = _check_fs(fs)
    r = _check_peaks(r_peaks, "r_peaks")
    outside = (r < 0) | (r >= len(x))
    if outside.any():
        raise CodecInputError(
            f"{int(outside.sum())} R-peak(s) outside the signal of {len(x)} samples "
            f"(first: {r[outside][:5].tolist()}); R-peaks are sample indices into this signal"
        )
    kernel = _encode_kernel(fs, spec)
    n = len(r)
    beats = np.empty((n, spec.length), dtype=np.float32)
    baseline, slope, scale = np.empty(n), np.empty(n), np.empty(n)
    flat = np.zeros(n, dtype=bool)
    padded = (r - kernel.before < 0) | (r + kernel.after >= len(x))
    for lo in range(0, n, _BLOCK):
        block = slice(lo, lo + _BLOCK)
        window = _cut(x, r[block], kernel)
        finite = np.isfinite(window).all(axis=1)
        if not finite.all():
            bad = lo + np.flatnonzero(~finite)
            raise CodecInputError(
                f"beat window(s) with non-finite samples at R-peak(s) {r[bad][:5].tolist()} "
                f"(beats {bad[:5].tolist()}); a beat's window spans {kernel.before} samples "
                f"before and {kernel.after} after R: drop those beats or fill the gap first"
            )
        beats[block], baseline[block], slope[block], scale[block], flat[block] = _canonical(window, kernel, spec)
    if flat.any():
        log.debug("%d of %d beats below the amplitude floor", int(flat.sum()), n)
    return EncodedBeats(
        beats=beats,
        r_peaks=r,
        fs=fs,
        baseline=baseline,
        slope=slope,
        scale=scale,
        padded=padded,
        flat=flat,
        spec=spec,
    )


def cut_windows(signal: np.ndarray, r_peaks: np.ndarray, fs: float, spec: CodecSpec = DEFAULT_SPEC,
                after: int | None = None) -> np.ndarray:
    """The input each beat is encoded from: one row per R-peak (indices into ``signal``), the
    :func:`encode_span` samples around it, edge-padded where the signal runs out. ``after``: read
    at most this many samples past each R-peak and repeat the last of them beyond (a live stream
    passes :func:`encode_wait`), so the window does not depend on how much input has arrived."""
    return _cut(np.asarray(signal, dtype=np.float64), np.asarray(r_peaks), _encode_kernel(_check_fs(fs), spec), after)


def window_cutter(fs: float, spec: CodecSpec = DEFAULT_SPEC,
                  after: int | None = None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """:func:`cut_windows` for one rate and ``after``, as a function of a float64 signal and the
    R-peaks: a live stream cuts a beat or two at a time, where finding the kernel again and
    checking the rate cost about half of what the cut does."""
    kernel = _encode_kernel(_check_fs(fs), spec)

    def cut(signal: np.ndarray, r_peaks: np.ndarray) -> np.ndarray:
        return _cut(signal, r_peaks, kernel, after)

    return cut


def _cut(x: np.ndarray, r: np.ndarray, kernel: _Kernel, after: int | None = None) -> np.ndarray:
    before, reach = kernel.before, kernel.after
    if r.size == 1 and before <= (r0 := int(r[0])) < len(x) - reach:
        # A live stream's usual case, one beat with its window inside the signal: the same values
        # from one slice, without building and clipping an index row (most of a call's cost).
        read = reach if after is None else min(after, reach)
        window = np.empty((1, before + reach + 1))
        window[0, : before + read + 1] = x[r0 - before : r0 + read + 1]
        window[0, before + read + 1 :] = x[r0 + read]
        return window
    idx = r[:, None] + np.arange(-kernel.before, kernel.after + 1)
    if after is not None and after < kernel.after:
        idx = np.minimum(idx, (r + after)[:, None])
    return x[clip_index(idx, len(x) - 1)]


def clip_index(i: np.ndarray, last: int) -> np.ndarray:
    """``np.clip(i, 0, last)`` for integer indices: the same values, without np.clip's dispatch
    cost, which is most of a call on the few indices a stream cuts per beat."""
    return np.minimum(np.maximum(i, 0), last)


def encode_windows(windows: np.ndarray, fs: float, spec: CodecSpec = DEFAULT_SPEC) -> np.ndarray:
    """Canonical beats (float32) from input windows already cut around R (:func:`cut_windows`).

    The same numbers as :func:`encode` gives for those beats; the edge cuts each stream's windows
    as its input arrives and encodes every stream's beats of one rate in one call, because the
    codec's fixed cost per call is larger than its cost per beat.
    """
    kernel = _encode_kernel(_check_fs(fs), spec)
    w = np.asarray(windows, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != kernel.before + kernel.after + 1:
        raise CodecInputError(f"windows must have shape (n, {kernel.before + kernel.after + 1}) at {fs:g} Hz, "
                              f"got {w.shape}")
    if not np.isfinite(w).all():
        raise CodecInputError("beat windows contain non-finite samples")
    beats = np.empty((len(w), spec.length), dtype=np.float32)
    for lo in range(0, len(w), _BLOCK):
        beats[lo : lo + _BLOCK] = _canonical(w[lo : lo + _BLOCK], kernel, spec)[0]
    return beats


def _canonical(window: np.ndarray, kernel: _Kernel, spec: CodecSpec) -> tuple[np.ndarray, ...]:
    """Input windows -> (canonical beats, baseline level, slope, scale, flat): the encoder proper."""
    canonical = kernel.apply(window)
    line, baseline, slope = _baseline(canonical, spec)
    deviation = canonical - line
    near_r = deviation[:, spec.pre - spec.amplitude_n : spec.pre + spec.amplitude_n + 1]
    amplitude = np.abs(near_r).max(axis=1)
    floor = np.maximum(
        _FLOOR_OF_DEVIATION * np.abs(deviation).max(axis=1),
        _FLOOR_OF_LEVEL * np.abs(canonical).max(axis=1),
    )
    floor = np.maximum(floor, np.finfo(np.float64).tiny)
    scale = np.maximum(amplitude, floor)
    return deviation / scale[:, None], baseline, slope, scale, amplitude < floor


def decode(
    beats: ArrayLike,
    r_peaks: ArrayLike,
    fs: float,
    scale: ArrayLike,
    baseline: ArrayLike,
    spec: CodecSpec = DEFAULT_SPEC,
    *,
    slope: ArrayLike = 0.0,
) -> DecodedBeats:
    """Put canonical beats onto a target clock: R at the given target samples, in target units.

    Each row covers the target samples whose times lie within the span of the canonical samples,
    ``r - floor(pre_s * fs)`` to ``r + floor((post - 1) / spec.fs * fs)``, so decode never
    extrapolates beyond the canonical beat (at ``fs == spec.fs`` it returns the canonical grid
    itself). The canonical beat is multiplied by ``scale`` and the line ``baseline + slope * t``
    (``t`` in seconds from R) is added; each is a scalar or one value per beat. Target R-peaks
    may lie outside any particular stream: clipping to the stream is the splicer's job.
    """
    b = _as_array(beats, "beats")
    if b.ndim != 2 or b.shape[1] != spec.length:
        raise CodecInputError(
            f"beats must have shape (n, {spec.length}) for this codec spec, got {b.shape}"
        )
    if not np.isfinite(b).all():
        raise CodecInputError("beats contain non-finite values")
    n = b.shape[0]
    r = _check_peaks(r_peaks, "r_peaks")
    if len(r) != n:
        raise CodecInputError(f"{n} beats but {len(r)} R-peaks; give one R-peak per beat")
    fs = _check_fs(fs)
    gain = _per_beat(scale, n, "scale")
    if (gain <= 0).any():
        raise CodecInputError("scale must be positive")
    level = _per_beat(baseline, n, "baseline")
    tilt = _per_beat(slope, n, "slope")
    kernel = _decode_kernel(fs, spec)
    t = np.arange(-kernel.before, kernel.after + 1) / fs
    samples = np.empty((n, kernel.before + kernel.after + 1))
    for lo in range(0, n, _BLOCK):
        block = slice(lo, lo + _BLOCK)
        out = kernel.apply(b[block])
        samples[block] = out * gain[block, None] + level[block, None] + tilt[block, None] * t
    return DecodedBeats(start=r - kernel.before, samples=samples, r_offset=kernel.before, fs=fs)


def median(x: ArrayLike, axis: int = -1) -> np.ndarray:
    """``np.median`` bit for bit (the same partition and mean of the two middle values), without its
    generic overhead: a live stream takes a few medians per frame and per beat."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[axis]
    k = n // 2
    if n % 2:
        return np.partition(x, k, axis=axis).take(k, axis=axis)
    p = np.partition(x, (k - 1, k), axis=axis)
    return (p.take(k - 1, axis=axis) + p.take(k, axis=axis)) / 2.0


def _baseline(canonical: np.ndarray, spec: CodecSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The baseline line per beat, its level at R and its slope per second."""
    nb, length = spec.baseline_n, spec.length
    first = median(canonical[:, :nb], axis=1)
    last = median(canonical[:, length - nb :], axis=1)
    centre = (nb - 1) / 2  # each median stands for the middle of its segment
    per_sample = (last - first) / (length - 1 - 2 * centre)
    level = first + per_sample * (spec.pre - centre)
    line = level[:, None] + per_sample[:, None] * (np.arange(length) - spec.pre)
    return line, level, per_sample * spec.fs


@dataclass(frozen=True)
class _Kernel:
    """A fixed linear map from a source row to outputs: ``out[k] = sum_t w[k, t] x[cols[k, t]]``."""

    cols: np.ndarray  # int (outputs, taps): column of the source row each tap reads
    weights: np.ndarray  # float64 (outputs, taps)
    before: int  # source/target samples before R the map spans
    after: int

    def apply(self, rows: np.ndarray) -> np.ndarray:
        # One tap at a time, in a fixed order: each output's sum is formed the same way whatever
        # the batch, which a BLAS product (blocking by matrix size) would not promise.
        if rows.shape[0] <= 2:
            # A live stream's beat or two: the same left-to-right sums (bit for bit) in one pass,
            # without a Python loop over the taps.
            return np.add.accumulate(rows[:, self.cols] * self.weights, axis=2)[..., -1].copy()
        out = np.zeros((rows.shape[0], self.cols.shape[0]))
        term = np.empty_like(out)
        cols, weights = self._by_tap
        rows = np.ascontiguousarray(rows, dtype=np.float64)
        for t in range(cols.shape[0]):
            # Gathers the same values as rows[:, cols[t]] in about two thirds of np.take's time:
            # the method skips np.take's dispatch, and "clip" (the columns are all in range)
            # writes into ``term`` without the extra buffer that "raise" makes for ``out``.
            rows.take(cols[t], axis=1, out=term, mode="clip")
            term *= weights[t]
            out += term
        return out

    @functools.cached_property
    def _by_tap(self) -> tuple[np.ndarray, np.ndarray]:
        """``cols`` and ``weights`` tap-major: each tap's column and weight of every output in one
        contiguous row."""
        return np.ascontiguousarray(self.cols.T), np.ascontiguousarray(self.weights.T)


def _sinc_taps(
    positions: np.ndarray, cutoff: float, spec: CodecSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Source taps and weights of a Kaiser-windowed sinc low-pass evaluated at ``positions``.

    ``positions`` are in source samples, ``cutoff`` is a fraction of the source Nyquist. Rows are
    normalised to unit sum so a constant passes exactly (the baseline must survive resampling).
    """
    half = spec.kernel_zeros / cutoff  # kernel half-width in source samples
    first = np.floor(positions - half).astype(np.int64) + 1
    taps = first[:, None] + np.arange(int(math.ceil(2 * half)) + 1)
    distance = positions[:, None] - taps
    inside = np.abs(distance) < half
    window = np.where(
        inside,
        np.i0(spec.kaiser_beta * np.sqrt(np.clip(1.0 - (distance / half) ** 2, 0.0, None)))
        / np.i0(spec.kaiser_beta),
        0.0,
    )
    weights = cutoff * np.sinc(cutoff * distance) * window
    weights /= weights.sum(axis=1, keepdims=True)
    return taps, weights


@functools.lru_cache(maxsize=32)
def _encode_kernel(fs: float, spec: CodecSpec) -> _Kernel:
    """Input window (relative to R) -> canonical beat, for one input rate."""
    positions = (np.arange(spec.length) - spec.pre) * (fs / spec.fs)
    cutoff = 1.0 if fs <= spec.fs else spec.lowpass * spec.fs / fs
    taps, weights = _sinc_taps(positions, cutoff, spec)
    used = taps[weights != 0.0]
    before, after = int(-used.min()), int(used.max())
    cols = np.clip(taps + before, 0, before + after)
    log.debug("encode kernel for %g Hz: %d taps, span -%d..+%d", fs, taps.shape[1], before, after)
    return _frozen_kernel(cols, weights, before, after)


@functools.lru_cache(maxsize=32)
def _decode_kernel(fs: float, spec: CodecSpec) -> _Kernel:
    """Canonical beat -> target window (relative to R), for one target rate."""
    before = math.floor(spec.pre * fs / spec.fs + 1e-9)
    after = math.floor((spec.post - 1) * fs / spec.fs + 1e-9)
    positions = spec.pre + np.arange(-before, after + 1) * (spec.fs / fs)
    cutoff = 1.0 if fs >= spec.fs else spec.lowpass * fs / spec.fs
    taps, weights = _sinc_taps(positions, cutoff, spec)
    cols = np.clip(taps, 0, spec.length - 1)  # edge-pad the canonical beat (its ends are ~0)
    log.debug("decode kernel for %g Hz: %d taps, span -%d..+%d", fs, taps.shape[1], before, after)
    return _frozen_kernel(cols, weights, before, after)


def _frozen_kernel(cols: np.ndarray, weights: np.ndarray, before: int, after: int) -> _Kernel:
    cols, weights = np.ascontiguousarray(cols), np.ascontiguousarray(weights)
    cols.flags.writeable = False
    weights.flags.writeable = False
    return _Kernel(cols=cols, weights=weights, before=before, after=after)


def _check_fs(fs: object) -> float:
    if not _is_real(fs) or not math.isfinite(float(fs)):  # type: ignore[arg-type]
        raise CodecInputError(f"sample rate must be a finite number of Hz, got {fs!r}")
    value = float(fs)  # type: ignore[arg-type]
    if not MIN_FS <= value <= MAX_FS:
        raise CodecInputError(
            f"sample rate {value:g} Hz is outside the supported [{MIN_FS:g}, {MAX_FS:g}] Hz"
        )
    return value


def _as_array(values: ArrayLike, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CodecInputError(f"{name} must be numeric: {exc}") from None
    return arr


def _as_signal(signal: ArrayLike) -> np.ndarray:
    x = _as_array(signal, "signal")
    if x.ndim != 1 or len(x) == 0:
        raise CodecInputError(f"signal must be one non-empty lead of shape (n,), got {x.shape}")
    return x


def _check_peaks(r_peaks: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(r_peaks)
    if arr.ndim != 1:
        raise CodecInputError(
            f"{name} must be a 1-D array of sample indices, got shape {arr.shape}"
        )
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all():
        return arr.astype(np.int64)
    if len(arr) == 0:
        return np.empty(0, dtype=np.int64)
    raise CodecInputError(f"{name} must be integer sample indices, got dtype {arr.dtype}")


def _per_beat(values: ArrayLike, n: int, name: str) -> np.ndarray:
    arr = _as_array(values, name)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise CodecInputError(
            f"{name} must be a scalar or one value per beat ({n}), got shape {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise CodecInputError(f"{name} contains non-finite values")
    return arr
