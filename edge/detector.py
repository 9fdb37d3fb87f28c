"""Streaming QRS detector: finds each R-peak of a live ECG once, causally, in bounded time and memory.

The design follows Pan & Tompkins (1985) as refined by Hamilton & Tompkins (1986) and Hamilton's
OSEA: band-pass, differentiate, square, integrate over a moving window, then classify the
integrator's peaks with adaptive thresholds set from the medians of recent QRS and noise peaks,
reject T waves by slope, and search back with a halved threshold when a beat is overdue. Nothing in
scipy or wfdb does this incrementally (``wfdb.processing.xqrs`` and NeuroKit need the whole record),
so the decision logic is written here; the filtering is scipy's, run with carried state so that any
split of the input into frames gives bit-identical results.

Every decision depends only on samples up to a fixed look-ahead after the peak, so the detector can
say at which input sample it decided (``RPeak.decided_at``): ``decided_at - sample`` is the
algorithmic detection delay, which is what a 1-sample-frame stream would see.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import signal

from edge.codec import median
from edge.window import SampleWindow

try:
    # The kernel behind scipy.signal.sosfilt. The public function wraps it in array-API dispatch,
    # axis moves and copies that cost several times the filtering itself on a 100 ms frame, and
    # the edge runs this once per frame per stream; the kernel gives the identical result.
    from scipy.signal._sosfilt import _sosfilt
except ImportError:  # pragma: no cover - a scipy that moved it: fall back to the public function
    _sosfilt = None

log = logging.getLogger(__name__)

MIN_FS = 100.0
MAX_FS = 2000.0


class DetectorInputError(ValueError):
    """A frame the detector cannot take (non-finite samples, wrong shape); its state is unchanged."""


@dataclass(frozen=True)
class DetectorConfig:
    """Tuning of the streaming detector; every duration is in seconds so any sample rate works.

    Defaults were tuned on the MIT-BIH records (see docs/benchmarks.md for the scores).
    """

    band_hz: tuple[float, float] = (5.0, 15.0)  # QRS energy band (Pan-Tompkins)
    integration_s: float = 0.12  # moving-window integrator: about one wide QRS
    lookahead_s: float = 0.09  # an integrator peak is not smaller than the next this many seconds
    lookback_s: float = 0.25  # ... and larger than the previous this many seconds
    refractory_s: float = 0.18  # no two beats closer than this (333 bpm)
    t_wave_s: float = 0.36  # a peak this soon after a beat may be its T wave: check the slope
    t_wave_slope_ratio: float = 0.5  # ... and call it a T wave below this fraction of the QRS slope
    # "abs" (Hamilton) keeps the dynamic range between large ectopic and small normal beats
    # manageable; "square" (Pan-Tompkins) misses small beats in bigeminy (MIT-BIH 228).
    rectify: str = "abs"
    threshold: float = 0.4  # detection threshold between noise and QRS levels
    searchback_rr: float = 1.5  # search back when no beat within this many mean RR intervals
    # A wide, slow beat (ventricular) has little slope energy but a large R amplitude: a peak
    # above the searchback threshold whose amplitude passes this fraction of recent beats' is a beat.
    amplitude_ratio: float = 0.8
    searchback_threshold: float = 0.5  # fraction of the threshold a searched-back peak must pass
    learn_s: float = 2.0  # initial thresholds come from this much signal
    history: int = 8  # peaks and RR intervals the medians and means run over
    relearn_s: float = 4.0  # no beat for this long: thresholds are learnt again
    # The integrator peaks 90-150 ms after the R-peak (measured on MIT-BIH with the default
    # integration window), so the R-peak is sought in this span before it: late enough to miss
    # the S wave of a wide ventricular beat, early enough to reach its R.
    locate_s: tuple[float, float] = (0.18, 0.07)
    max_rr_s: float = 2.0  # RR intervals longer than this do not enter the mean
    min_rr_s: float = 0.2


class RPeak(NamedTuple):
    """One detected beat: its R-peak sample, and how many input samples had arrived when the
    detector decided it (``decided_at - sample`` samples of delay)."""

    sample: int
    decided_at: int


@dataclass
class _Candidate:
    sample: int  # integrator peak sample
    height: float  # integrator value there
    slope: float  # max |derivative| over the preceding QRS window
    r_sample: int  # located R-peak sample
    amplitude: float  # |R-peak - local median| in input units
    rejudged_at: int = 0  # input sample at which a searchback sent it to be judged again


class StreamingQRSDetector:
    """Feed frames of any size with :meth:`feed`; each R-peak is returned exactly once.

    Memory is bounded by a few seconds of buffered signal regardless of how long the stream runs.
    """

    def __init__(self, fs: float, config: DetectorConfig | None = None) -> None:
        if not (MIN_FS <= fs <= MAX_FS):
            raise DetectorInputError(f"sample rate {fs} Hz is outside {MIN_FS:g}-{MAX_FS:g} Hz")
        self.fs = float(fs)
        self.config = cfg = config or DetectorConfig()
        low, high = cfg.band_hz
        high = min(high, 0.45 * fs)
        self._sos = signal.butter(2, [low, high], btype="bandpass", fs=fs, output="sos")
        self._sos_zi = np.zeros((1, self._sos.shape[0], 2))  # one row: the kernel's (rows, sections, 2)
        self._n_int = max(1, round(cfg.integration_s * fs))
        self._look = max(1, round(cfg.lookahead_s * fs))
        self._look_back = max(1, round(cfg.lookback_s * fs))
        self._refractory = round(cfg.refractory_s * fs)
        self._t_wave = round(cfg.t_wave_s * fs)
        self._learn = round(cfg.learn_s * fs)
        self._relearn = round(cfg.relearn_s * fs)
        self._locate = (round(cfg.locate_s[0] * fs), round(cfg.locate_s[1] * fs))
        self._baseline = round(0.3 * fs)  # the R-peak deviates most from the median of this span
        # Ring of recent samples: raw, derivative and integrator output, all indexed by absolute
        # sample number. Long enough for the learning phase and the searchback look.
        self._keep = max(self._learn, self._relearn) + self._look_back + self._look + self._baseline + 8
        self._window = SampleWindow(3, self._keep)
        self._x, self._d, self._f = self._window.rows()
        self._buf_start = 0  # absolute index of _x[0]
        self._prev_band = np.zeros(2)  # last two band-passed samples (derivative state)
        self._int_taps = np.full(self._n_int, 1.0 / self._n_int)
        self._int_zi = np.zeros(self._n_int - 1)
        self.n_seen = 0
        self._next_peak_check = 0  # first sample not yet tested as an integrator peak
        self._learned = False
        self._qrs_peaks: deque[float] = deque(maxlen=cfg.history)
        self._noise_peaks: deque[float] = deque(maxlen=cfg.history)
        self._rr: deque[int] = deque(maxlen=cfg.history)
        self._amplitudes: deque[float] = deque(maxlen=cfg.history)
        self._last_qrs: _Candidate | None = None
        self._sb_anchor = 0  # overdue-beat deadlines count from here (last beat or last deadline)
        self._pending: list[_Candidate] = []  # peaks below threshold since the last beat
        self._candidates: deque[_Candidate] = deque()  # found but not yet classified

    # ----------------------------------------------------------------------------------------
    def feed(self, frame: np.ndarray) -> list[RPeak]:
        """Take the next samples (any length, physical units) and return beats decided by them."""
        x = np.asarray(frame, dtype=np.float64)
        if x.ndim != 1:
            raise DetectorInputError(f"expected a 1-D frame of samples, got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            bad = int(np.count_nonzero(~np.isfinite(x)))
            raise DetectorInputError(f"frame has {bad} non-finite sample(s) of {x.size}")
        if x.size == 0:
            return []
        band = _bandpass(self._sos, x, self._sos_zi)
        # Central difference over the band-passed signal (one sample late), scaled to units/s.
        ext = np.concatenate([self._prev_band, band])
        deriv = (ext[2:] - ext[:-2]) * (self.fs / 2.0)
        self._prev_band = ext[-2:]
        rect = deriv * deriv if self.config.rectify == "square" else np.abs(deriv)
        # Moving-window integrator as an FIR with carried state: a running sum would round
        # differently depending on where frames split.
        feature, self._int_zi = _fir(self._int_taps, rect, self._int_zi)
        self._window.append(x, deriv, feature)
        self._x, self._d, self._f = self._window.rows()
        self.n_seen += x.size
        beats = self._process(final=False)
        self._trim()
        return beats

    @property
    def memory_bytes(self) -> int:
        """Bytes of the sample window (raw, derivative, integrator)."""
        return self._window.nbytes

    @property
    def settled(self) -> int:
        """Every beat with its R-peak before this sample has been returned, bar one a searchback
        may still find: an integrator peak is judged ``lookahead_s`` after it, and the R-peak lies
        at most ``locate_s[0]`` before the peak. Zero while the thresholds are being learnt."""
        if not self._learned:
            return 0
        return max(0, self.n_seen - self._look - 1 - self._locate[0])

    def flush(self) -> list[RPeak]:
        """End of input: decide what the missing look-ahead still allows (file mode)."""
        beats = self._process(final=True)
        self._trim()
        return beats

    # ----------------------------------------------------------------------------------------
    def _trim(self) -> None:
        if self._window.trim():
            self._buf_start = self._window.start
            self._x, self._d, self._f = self._window.rows()

    def _find_peaks(self, final: bool) -> None:
        """Queue integrator peaks: larger than the last ``lookback_s`` and not smaller than the next
        ``lookahead_s``. The long look back (free: it adds no delay) merges the two energy humps of
        a wide ventricular beat; the short look ahead bounds the delay."""
        back, ahead = self._look_back, self._look
        end = self.n_seen if final else self.n_seen - ahead
        start = max(self._next_peak_check, self._buf_start + back)
        if end <= start:
            return
        b = self._buf_start
        seg = self._f[start - back - b : min(end + ahead, self.n_seen) - b]
        if end + ahead > self.n_seen:  # only at the end of input: the look-ahead sees nothing more
            seg = np.concatenate([seg, np.full(end + ahead - self.n_seen, -np.inf)])
        # A peak is above the previous sample and not below the next, so only those local maxima
        # (a few per second of a smooth integrator output) get the full look-back/look-ahead test.
        value = seg[back : back + (end - start)]
        local = (value > seg[back - 1 : back - 1 + value.size]) & (value >= seg[back + 1 : back + 1 + value.size])
        for k in np.flatnonzero(local & (value > 0)).tolist():
            i = back + k
            if seg[i] > seg[i - back : i].max() and seg[i] >= seg[i + 1 : i + ahead + 1].max():
                self._candidates.append(self._candidate(start + k))
        self._next_peak_check = end

    def _candidate(self, peak: int) -> _Candidate:
        b = self._buf_start
        lo = max(b, peak - self._n_int - 2)
        slope = float(np.max(np.abs(self._d[lo - b : peak - b + 1])))
        # The R-peak: the largest deviation of the raw signal from its local median.
        base = float(median(self._x[max(b, peak - self._baseline) - b : peak - b + 1]))
        lo = max(b, peak - self._locate[0])
        seg = self._x[lo - b : max(lo, peak - self._locate[1]) - b + 1]
        dev = np.abs(seg - base)
        r = lo + int(np.argmax(dev))
        return _Candidate(peak, float(self._f[peak - b]), slope, r, float(dev.max()))

    def _process(self, final: bool) -> list[RPeak]:
        """Classify queued peaks and overdue-beat deadlines strictly in sample order."""
        out: list[RPeak] = []
        if not self._learned:
            if self.n_seen < self._learn and not final:
                return out
            self._learn_thresholds(min(self._learn, self.n_seen))
            self._learned = True
        self._find_peaks(final)
        horizon = self.n_seen if final else self.n_seen - self._look
        while True:
            deadline = self._sb_anchor + round(self.config.searchback_rr * (self._mean_rr() or self.fs))
            nxt = self._candidates[0] if self._candidates else None
            if deadline <= horizon and (nxt is None or deadline <= nxt.sample):
                decided = min(max(deadline + self._look, self._learn), self.n_seen)
                found = self._search_back(deadline, decided)
                if found is not None:
                    out.append(RPeak(found.r_sample, decided))
                continue
            if nxt is None:
                break
            self._candidates.popleft()
            if self._classify(nxt):
                decided = min(max(nxt.sample + self._look + 1, nxt.rejudged_at, self._learn), self.n_seen)
                out.append(RPeak(nxt.r_sample, decided))
        return out

    def _learn_thresholds(self, stop: int) -> None:
        """Levels from the last ``learn_s`` before ``stop``: QRS from per-second maxima, noise from the mean."""
        b = self._buf_start
        f = self._f[max(stop - self._learn, b) - b : stop - b]
        sec = max(1, round(self.fs))
        maxima = [float(np.max(f[i : i + sec])) for i in range(0, f.size, sec)] or [0.0]
        self._qrs_peaks.clear()
        self._noise_peaks.clear()
        self._rr.clear()
        self._qrs_peaks.append(float(np.median(maxima)))
        self._noise_peaks.append(0.5 * float(np.mean(f)) if f.size else 0.0)
        self._pending = []
        self._sb_anchor = stop

    def _threshold(self) -> float:
        qrs = statistics.median(self._qrs_peaks)  # same value as np.median, without its overhead
        noise = statistics.median(self._noise_peaks)
        return noise + self.config.threshold * (qrs - noise)

    def _mean_rr(self) -> float | None:
        # Integer sample counts: the sum is exact, so this equals np.mean to the bit, at a tenth of the cost.
        return sum(self._rr) / len(self._rr) if self._rr else None

    def _search_back(self, deadline: int, decided: int) -> _Candidate | None:
        """Overdue beat: take the largest peak since the last beat that passes half the threshold."""
        level = self.config.searchback_threshold * self._threshold()
        best = max((c for c in self._pending if c.sample < deadline), key=lambda c: c.height, default=None)
        if best is None or best.height <= level:
            # Nothing there: the next deadline counts from this one; after a long silence the
            # levels are stale (electrode off, gain change), so learn them again.
            self._pending = [c for c in self._pending if c.sample >= deadline]
            self._sb_anchor = deadline
            last = self._last_qrs.sample if self._last_qrs is not None else 0
            if deadline - last >= self._relearn:
                log.debug("no beat for %.1f s at sample %d: learning levels again",
                          (deadline - last) / self.fs, deadline)
                self._learn_thresholds(deadline)
            return None
        later = [c for c in self._pending if c.sample > best.sample]
        self._accept(best)
        # Peaks after the searched-back beat were judged against the wrong last beat: judge again.
        for c in reversed(later):
            c.rejudged_at = decided
            self._candidates.appendleft(c)
        return best

    def _classify(self, c: _Candidate) -> bool:
        """Decide one integrator peak: beat, T wave or noise."""
        last = self._last_qrs
        if last is not None and c.sample - last.sample < self._refractory:
            return False
        threshold = self._threshold()
        big = (
            len(self._amplitudes) > 0
            and c.height > self.config.searchback_threshold * threshold
            and c.amplitude > self.config.amplitude_ratio * statistics.median(self._amplitudes)
        )
        if c.height > threshold or big:
            if (
                last is not None
                and c.sample - last.sample < self._t_wave
                and c.slope < self.config.t_wave_slope_ratio * last.slope
            ):
                self._noise_peaks.append(c.height)
                return False
            self._accept(c)
            return True
        self._noise_peaks.append(c.height)
        self._pending.append(c)
        if len(self._pending) > 64:  # bounded: the smallest can never win a searchback
            self._pending.remove(min(self._pending, key=lambda p: p.height))
        return False

    def _accept(self, c: _Candidate) -> None:
        last = self._last_qrs
        if last is not None:
            rr = c.sample - last.sample
            if self.config.min_rr_s * self.fs <= rr <= self.config.max_rr_s * self.fs:
                self._rr.append(rr)
        self._qrs_peaks.append(c.height)
        self._amplitudes.append(c.amplitude)
        self._last_qrs = c
        self._sb_anchor = c.sample
        self._pending = []


def _fir(taps: np.ndarray, x: np.ndarray, zi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``scipy.signal.lfilter(taps, 1.0, x, zi=zi)``, computed the way lfilter computes an FIR
    with state (full convolution, state added to its head, the tail carried on), without the
    per-call overhead that costs more than the convolution on a 100 ms frame; same bits."""
    full = np.convolve(taps, x)
    full[: taps.size - 1] += zi
    return full[: x.size], full[x.size :]


def _bandpass(sos: np.ndarray, x: np.ndarray, zi: np.ndarray) -> np.ndarray:
    """``sosfilt(sos, x)`` continuing from ``zi`` (shape (1, sections, 2), updated in place)."""
    if _sosfilt is None:  # pragma: no cover
        y, zi[0] = signal.sosfilt(sos, x, zi=zi[0])
        return y
    y = np.array(x, dtype=np.float64, order="C").reshape(1, -1)  # a copy: filtered in place
    _sosfilt(sos, y, zi)
    return y[0]


def detect(signal_: np.ndarray, fs: float, frame: int = 0, config: DetectorConfig | None = None) -> list[RPeak]:
    """Run the streaming detector over a whole signal in frames of ``frame`` samples (0: one frame)."""
    det = StreamingQRSDetector(fs, config)
    x = np.asarray(signal_, dtype=np.float64)
    step = x.size if frame <= 0 else frame
    out: list[RPeak] = []
    for i in range(0, x.size, max(step, 1)):
        out.extend(det.feed(x[i : i + step]))
    out.extend(det.flush())
    return out
