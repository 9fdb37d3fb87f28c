"""Streaming QRS detector: finds each R-peak of a live ECG once, causally, in bounded time and memory.

The design follows Pan & Tompkins (1985) as refined by Hamilton & Tompkins (1986) and Hamilton's
OSEA: band-pass, differentiate, square, integrate over a moving window, then classify the
integrator's peaks with adaptive thresholds set from the medians of recent QRS and noise peaks,
reject T waves by slope, and search back with a halved threshold when a beat is overdue. Nothing in
scipy or wfdb does this incrementally (``wfdb.processing.xqrs`` and NeuroKit need the whole record),
so the decision logic is written here; the band-pass is scipy's, run with carried state, and the
integrator sums each window in a fixed order, so that any split of the input into frames gives
bit-identical results.

Every decision depends only on samples up to a fixed look-ahead after the peak, so the detector can
say at which input sample it decided (``RPeak.decided_at``): ``decided_at - sample`` is the
algorithmic detection delay, which is what a 1-sample-frame stream would see.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import signal

from edge.codec import median

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
#: ``searchback_floor`` of a detector that holds no peak a searchback could still return.
NO_FLOOR = 2**62


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


@dataclass(frozen=True)
class _Spans:
    """The configuration's durations in samples at one rate."""

    n_int: int  # integrator taps
    look: int  # look-ahead
    look_back: int
    refractory: int
    t_wave: int
    learn: int
    relearn: int
    locate: tuple[int, int]
    baseline: int  # the R-peak deviates most from the median of this span
    keep: int  # samples each stream keeps: the learning phase and the searchback look

    @classmethod
    def of(cls, fs: float, cfg: DetectorConfig) -> _Spans:
        learn, relearn = round(cfg.learn_s * fs), round(cfg.relearn_s * fs)
        look, look_back, baseline = max(1, round(cfg.lookahead_s * fs)), max(1, round(cfg.lookback_s * fs)), round(0.3 * fs)
        return cls(
            n_int=max(1, round(cfg.integration_s * fs)), look=look, look_back=look_back,
            refractory=round(cfg.refractory_s * fs), t_wave=round(cfg.t_wave_s * fs), learn=learn, relearn=relearn,
            locate=(round(cfg.locate_s[0] * fs), round(cfg.locate_s[1] * fs)), baseline=baseline,
            keep=max(learn, relearn) + look_back + look + baseline + 8,
        )


class DetectorBank:
    """The detectors of many streams at one sample rate, one row per stream.

    A stream's frame costs a few dozen small numpy calls in a per-stream detector, and at 100 ms
    frames that call overhead, not the arithmetic, is most of the detector's time. The bank keeps
    every row's filter state and sample window in shared arrays, so the frames of one tick that
    have the same length go through the band-pass, derivative, storage and the integrator-peak
    screen as one array each. Only rows with something to decide (an integrator peak, an overdue
    beat, the learning phase) run the per-stream decision code (``_Row``), on views of their
    window. Each row gives exactly the beats a detector of its own would give, in any grouping.
    """

    def __init__(self, fs: float, config: DetectorConfig | None = None) -> None:
        if not (MIN_FS <= fs <= MAX_FS):
            raise DetectorInputError(f"sample rate {fs} Hz is outside {MIN_FS:g}-{MAX_FS:g} Hz")
        self.fs = float(fs)
        self.config = cfg = config or DetectorConfig()
        low, high = cfg.band_hz
        high = min(high, 0.45 * fs)
        self._sos = signal.butter(2, [low, high], btype="bandpass", fs=fs, output="sos")
        self.spans = sp = _Spans.of(self.fs, cfg)
        self._slack = max(sp.keep // 2, 1)  # storage columns beyond the kept samples: a move every slack samples
        self._width = sp.keep + self._slack
        self._history = sp.keep  # raw samples every row holds at least (``keep_history``)
        self._rows: list[_Row | None] = []
        self._free: list[int] = []
        # Per row: band-pass state (the kernel's (rows, sections, 2)), the last two band-passed
        # samples (derivative state), the integrator's last n_int - 1 inputs, and the window of raw,
        # derivative and integrator samples. Column c of a row's storage holds absolute sample
        # origin + c; samples from start to n_seen are visible; end is the first free column.
        self._zi = np.zeros((0, self._sos.shape[0], 2))
        self._prev = np.zeros((0, 2))
        self._int_in = np.zeros((0, sp.n_int - 1))
        self._data = np.empty((0, 3, self._width))
        self._origin = np.zeros(0, dtype=np.int64)
        self._end = np.zeros(0, dtype=np.int64)
        self._start = np.zeros(0, dtype=np.int64)
        self._n_seen = np.zeros(0, dtype=np.int64)
        self._next_check = np.zeros(0, dtype=np.int64)  # first sample not yet tested as an integrator peak
        self._deadline = np.zeros(0, dtype=np.int64)  # next overdue-beat deadline
        self._learned = np.zeros(0, dtype=bool)
        self._floor = np.zeros(0, dtype=np.int64)  # searchback_floor: earliest R of a peak held for searchback

    # ----------------------------------------------------------------------------------------
    def add(self) -> int:
        """A fresh row (a new stream, or a detector started afresh); returns its index."""
        if not self._free:
            self._grow()
        i = self._free.pop()
        for a in (self._zi, self._prev, self._int_in, self._origin, self._end, self._start, self._n_seen,
                  self._next_check, self._deadline, self._learned):
            a[i] = 0
        self._floor[i] = NO_FLOOR
        self._rows[i] = _Row(self)
        return i

    def release(self, i: int) -> None:
        """The row's stream ended: its storage goes to the next stream."""
        if self._rows[i] is not None:
            self._rows[i] = None
            self._free.append(i)

    def __len__(self) -> int:
        return len(self._rows) - len(self._free)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row's window and filter state."""
        return int(self._data[0].nbytes + self._zi[0].nbytes + self._prev[0].nbytes + self._int_in[0].nbytes)

    def n_seen(self, i: int) -> int:
        return int(self._n_seen[i])

    def window(self, i: int) -> np.ndarray:
        """Row ``i``'s visible (raw, derivative, integrator) samples, a (3, n) view."""
        return self._data[i, :, int(self._start[i] - self._origin[i]) : int(self._end[i])]

    def keep_history(self, n: int) -> None:
        """Hold at least the last ``n`` raw samples of every row in storage (``history``), where
        the detector itself needs fewer: a stream cuts its beats' encoder windows from them
        instead of keeping a copy of its own input."""
        if n <= self._history:
            return
        self._history = n
        if n + self._slack > self._width:
            self._widen(n + self._slack)

    def history(self, i: int) -> tuple[int, np.ndarray]:
        """Row ``i``'s raw samples as stored: the sample number of the first, and a view up to the
        last sample seen. At least the last ``keep_history`` samples and all of the last frame,
        however long (more than ``window`` shows); valid until the row's next frame."""
        return int(self._origin[i]), self._data[i, 0, : int(self._end[i])]

    def settled(self, i: int) -> int:
        """See :attr:`StreamingQRSDetector.settled`."""
        if not self._learned[i]:
            return 0
        return max(0, int(self._n_seen[i]) - self._settle_lag)

    def searchback_floor(self, i: int) -> int:
        """See :attr:`StreamingQRSDetector.searchback_floor`."""
        return int(self._floor[i])

    def progress(self, rows: list[int]) -> tuple[list[int], list[int], list[int]]:
        """``settled``, ``searchback_floor`` and samples seen of many rows at once: the pipeline
        asks for every stream it fed in a step, and one vector operation costs less than a call
        per row."""
        idx = np.array(rows, dtype=np.intp)
        n_seen = self._n_seen[idx]
        settled = np.where(self._learned[idx], np.maximum(n_seen - self._settle_lag, 0), 0)
        return settled.tolist(), self._floor[idx].tolist(), n_seen.tolist()

    @property
    def _settle_lag(self) -> int:
        """Samples ``settled`` stays behind the last sample seen: the look-ahead, and the R-peak's
        reach before its integrator peak."""
        return self.spans.look + 1 + self.spans.locate[0]

    def _grow(self) -> None:
        old = len(self._rows)
        new = max(8, 2 * old)
        for name in ("_zi", "_prev", "_int_in", "_data", "_origin", "_end", "_start", "_n_seen", "_next_check",
                     "_deadline", "_learned", "_floor"):
            a = getattr(self, name)
            grown = np.zeros((new, *a.shape[1:]), dtype=a.dtype)
            grown[:old] = a
            setattr(self, name, grown)
        self._rows += [None] * (new - old)
        self._free += range(new - 1, old - 1, -1)  # pop() hands out the lowest first

    # ----------------------------------------------------------------------------------------
    def feed(self, rows: list[int], frames: list[np.ndarray]) -> list[Sequence[RPeak]]:
        """One frame for each of ``rows`` (all of one length, physical units, finite); returns each
        row's beats decided by it (most rows: one shared empty tuple, not a new list each). On
        DetectorInputError no row has changed."""
        try:
            x = np.asarray(frames, dtype=np.float64)  # read, never written
        except ValueError:
            x = np.empty(0)
        if x.ndim != 2 or x.shape[0] != len(rows):
            raise DetectorInputError(f"expected one 1-D frame per row, all of one length, got shape {x.shape}")
        if not np.isfinite(x).all():
            bad = int(np.count_nonzero(~np.isfinite(x)))
            raise DetectorInputError(f"frame has {bad} non-finite sample(s) of {x.size}")
        n = x.shape[1]
        idx = np.array(rows, dtype=np.intp)
        if n == 0:
            return [()] * len(rows)
        band = _bandpass(self._sos, x, self._zi, idx)
        # Central difference over the band-passed signal (one sample late), scaled to units/s.
        ext = np.concatenate([self._prev[idx], band], axis=1)
        deriv = (ext[:, 2:] - ext[:, :-2]) * (self.fs / 2.0)
        self._prev[idx] = ext[:, -2:]
        rect = deriv * deriv if self.config.rectify == "square" else np.abs(deriv)
        # Moving-window integrator: the mean of the last n_int rectified samples, the carried ones first.
        ext = np.concatenate([self._int_in[idx], rect], axis=1)
        feature = _window_sum(ext, self.spans.n_int) * (1.0 / self.spans.n_int)
        self._int_in[idx] = ext[:, n:]
        self._store(idx, n, x, deriv, feature)
        n_seen = self._n_seen[idx]
        beats: list[Sequence[RPeak]] = [()] * len(rows)
        decide, screened = self._to_decide(idx, n, n_seen)
        for j in np.flatnonzero(decide).tolist():
            beats[j] = self._decide(rows[j], final=False, peaks=screened.get(j))
        self._start[idx] = np.maximum(self._start[idx], n_seen - self.spans.keep)  # hide all but `keep`
        return beats

    def flush(self, i: int) -> list[RPeak]:
        """End of row ``i``'s input: decide what the missing look-ahead still allows."""
        beats = self._decide(i, final=True)
        self._start[i] = max(int(self._start[i]), int(self._n_seen[i]) - self.spans.keep)
        return beats

    def _store(self, idx: np.ndarray, n: int, *signals: np.ndarray) -> None:
        """Append ``n`` samples of each signal to the rows' windows."""
        end = self._end[idx]
        full = end + n > self._width
        if full.any():  # the slack is used up: move the visible samples to the front (every keep/2 samples)
            for i in idx[full].tolist():
                # Keep the raw history (it reaches at least as far back as the visible samples).
                lo = max(int(self._n_seen[i] - self._history - self._origin[i]), 0)
                hi = int(self._end[i])
                if hi - lo + n > self._width:  # a frame longer than the slack: widen every row
                    self._widen(hi - lo + n + self._slack)
                self._data[i, :, : hi - lo] = self._data[i, :, lo:hi].copy()
                self._origin[i] += lo
                self._end[i] = hi - lo
            end = self._end[idx]
        at = self._at(idx, 0, end)[:, None] + np.arange(n)
        flat = self._data.reshape(-1)
        for k, s in enumerate(signals):
            flat[at + k * self._width] = s
        self._end[idx] = end + n
        self._n_seen[idx] += n

    def _at(self, rows: np.ndarray, k: int, cols: np.ndarray) -> np.ndarray:
        """Positions in ``_data.reshape(-1)`` of signal ``k``, storage column ``cols``, of each of
        ``rows``: one index array instead of three broadcast ones, which numpy gathers and
        scatters in about half the time. (``_grow`` and ``_widen`` make ``_data`` afresh, so it is
        always C-contiguous and ``reshape(-1)`` is a view of it.)"""
        return (rows * 3 + k) * self._width + cols

    def _widen(self, width: int) -> None:
        self._width = width
        grown = np.empty((self._data.shape[0], 3, width))
        grown[:, :, : self._data.shape[2]] = self._data
        self._data = grown

    def _to_decide(self, idx: np.ndarray, n: int, n_seen: np.ndarray
                   ) -> tuple[np.ndarray, dict[int, list[_Candidate | int]]]:
        """Which rows have something to decide after a frame of ``n`` samples: the vectorised form of
        the checks at the top of ``_Row.process``. A row whose samples up to the look-ahead hold no
        integrator peak and no overdue-beat deadline, and that has finished learning, has nothing.
        Also returns, for screened rows sent to decide, the integrator peaks the screen found (the
        same samples ``_Row._find_peaks`` would, in order; none, for a row sent only by its
        deadline), so that the row does not search again; see ``_candidates`` for their form."""
        sp = self.spans
        learned = self._learned[idx]
        check = self._next_check[idx]
        horizon = n_seen - sp.look
        # Screened rows: the last frame was screened too, so the samples to test are this frame's
        # n, shifted back by the look-ahead, and their look-back lies inside the window.
        screen = learned & (check + n == horizon) & (check >= self._start[idx] + sp.look_back)
        # An overdue-beat deadline sends a row to decide, but its samples are screened all the same
        # (at 0.56 s frames, as a Polar H10 sends, about half of all frames pass a deadline).
        overdue = screen & (self._deadline[idx] <= horizon)
        regular = screen & ~overdue
        decide = (~learned & (n_seen >= sp.learn)) | (learned & ~regular)
        at = np.flatnonzero(screen)
        screened: dict[int, list[_Candidate | int]] = {j: [] for j in np.flatnonzero(overdue).tolist()}
        if at.size:
            # A peak is above the previous sample and not below the next (tested first, on all
            # rows at once), larger than the last look_back and not smaller than the next look.
            rows = idx[at]
            first = check[at] - 1 - self._origin[rows]  # storage column of sample check - 1
            flat = self._data.reshape(-1)
            f = flat[self._at(rows, 2, first)[:, None] + np.arange(n + 2)]
            value = f[:, 1:-1]
            local = (value > f[:, :-2]) & (value >= f[:, 2:]) & (value > 0)
            r, c = np.nonzero(local)
            if r.size:
                col = first[r] + 1 + c  # storage column of each local maximum
                pos = self._at(rows[r], 2, col)
                peak = flat[pos]
                before = flat[pos[:, None] + np.arange(-sp.look_back, 0)].max(axis=1)
                after = flat[pos[:, None] + np.arange(1, sp.look + 1)].max(axis=1)
                is_peak = (peak > before) & (peak >= after)
                found = r[is_peak]
                decide[at[found]] = True
                regular[at[found]] = False
                peaks = self._candidates(rows[found], col[is_peak], check[at][found] + c[is_peak])
                for j, peak in zip(at[found].tolist(), peaks):
                    screened.setdefault(j, []).append(peak)
            self._next_check[idx[regular]] = horizon[regular]
        return decide, screened

    def _candidates(self, rows: np.ndarray, cols: np.ndarray, samples: np.ndarray) -> list[_Candidate | int]:
        """``_Row._candidate`` of many integrator peaks at once (row ``rows[k]``'s peak at storage
        column ``cols[k]``, sample ``samples[k]``): the same selections, medians and maxima over the
        same samples, so the same values. A peak whose spans reach past its row's visible samples
        (only just after a start) stays a sample number for the row to measure itself."""
        sp = self.spans
        reach = max(sp.n_int + 2, sp.baseline, sp.locate[0])
        out: list[_Candidate | int] = samples.tolist()
        k = np.flatnonzero(samples - reach >= self._start[rows])
        if not k.size:
            return out
        raw = self._at(rows[k], 0, cols[k])  # each peak's column of the raw signal; + width: derivative
        flat, width = self._data.reshape(-1), self._width
        slope = np.abs(flat[(raw + width)[:, None] + np.arange(-(sp.n_int + 2), 1)]).max(axis=1)
        base = median(flat[raw[:, None] + np.arange(-sp.baseline, 1)], axis=1)
        seg = flat[raw[:, None] + np.arange(-sp.locate[0], 1 - min(sp.locate))]  # the R-peak's span
        dev = np.abs(seg - base[:, None])
        at = dev.argmax(axis=1)
        for j, peak, height, s, r, amplitude in zip(
                k.tolist(), samples[k].tolist(), flat[raw + 2 * width].tolist(), slope.tolist(),
                (samples[k] - sp.locate[0] + at).tolist(), dev[np.arange(k.size), at].tolist()):
            out[j] = _Candidate(peak, height, s, r, amplitude)
        return out

    def _decide(self, i: int, final: bool, peaks: list[_Candidate | int] | None = None) -> list[RPeak]:
        """Run row ``i``'s decision code on views of its window (``peaks``: what the screen found
        in the samples the row would search next)."""
        row = self._rows[i]
        row.n_seen = int(self._n_seen[i])
        row.buf_start = int(self._start[i])
        row.x, row.d, row.f = self.window(i)
        row.next_check = int(self._next_check[i])
        beats = row.process(final, peaks)
        self._next_check[i] = row.next_check
        self._learned[i] = row.learned
        self._deadline[i] = row.deadline()
        self._floor[i] = row.searchback_floor()
        return beats


class _Row:
    """One stream's decisions: Pan-Tompkins/Hamilton thresholds, candidate peaks, T-wave and
    searchback rules. The bank sets ``n_seen``, ``buf_start`` (absolute sample of column 0 of
    the views) and the views ``x``, ``d``, ``f`` (raw, derivative, integrator) before each call."""

    def __init__(self, bank: DetectorBank) -> None:
        self.fs = bank.fs
        self.config = cfg = bank.config
        self.s = bank.spans
        self.n_seen = 0
        self.buf_start = 0
        self.x = self.d = self.f = np.empty(0)
        self.next_check = 0
        self.learned = False
        self._qrs_peaks: deque[float] = deque(maxlen=cfg.history)
        self._noise_peaks: deque[float] = deque(maxlen=cfg.history)
        self._rr: deque[int] = deque(maxlen=cfg.history)
        self._amplitudes: deque[float] = deque(maxlen=cfg.history)
        self._last_qrs: _Candidate | None = None
        self._sb_anchor = 0  # overdue-beat deadlines count from here (last beat or last deadline)
        self._pending: list[_Candidate] = []  # peaks below threshold since the last beat
        self._candidates: deque[_Candidate] = deque()  # found but not yet classified

    def searchback_floor(self) -> int:
        """Earliest R-peak among the peaks a searchback may still take (``NO_FLOOR``: none)."""
        return min(c.r_sample for c in self._pending) if self._pending else NO_FLOOR

    def deadline(self) -> int:
        """Sample at which a beat is overdue (searchback)."""
        return self._sb_anchor + round(self.config.searchback_rr * (self._mean_rr() or self.fs))

    def _find_peaks(self, final: bool, screened: list[_Candidate | int] | None = None) -> None:
        """Queue integrator peaks: larger than the last ``lookback_s`` and not smaller than the next
        ``lookahead_s``. The long look back (free: it adds no delay) merges the two energy humps of
        a wide ventricular beat; the short look ahead bounds the delay. ``screened``: the bank's
        screen already found the peaks up to the look-ahead (measured, or as sample numbers)."""
        back, ahead = self.s.look_back, self.s.look
        end = self.n_seen if final else self.n_seen - ahead
        start = max(self.next_check, self.buf_start + back)
        if end <= start:
            return
        if screened is not None:
            self._candidates.extend(p if isinstance(p, _Candidate) else self._candidate(p) for p in screened)
            self.next_check = end
            return
        b = self.buf_start
        seg = self.f[start - back - b : min(end + ahead, self.n_seen) - b]
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
        self.next_check = end

    def _candidate(self, peak: int) -> _Candidate:
        b = self.buf_start
        lo = max(b, peak - self.s.n_int - 2)
        slope = float(np.max(np.abs(self.d[lo - b : peak - b + 1])))
        # The R-peak: the largest deviation of the raw signal from its local median.
        base = float(median(self.x[max(b, peak - self.s.baseline) - b : peak - b + 1]))
        lo = max(b, peak - self.s.locate[0])
        seg = self.x[lo - b : max(lo, peak - self.s.locate[1]) - b + 1]
        dev = np.abs(seg - base)
        r = lo + int(np.argmax(dev))
        return _Candidate(peak, float(self.f[peak - b]), slope, r, float(dev.max()))

    def process(self, final: bool, screened: list[_Candidate | int] | None = None) -> list[RPeak]:
        """Classify queued peaks and overdue-beat deadlines strictly in sample order (``screened``:
        see ``_find_peaks``)."""
        out: list[RPeak] = []
        if not self.learned:
            if self.n_seen < self.s.learn and not final:
                return out
            self._learn_thresholds(min(self.s.learn, self.n_seen))
            self.learned = True
        self._find_peaks(final, screened)
        horizon = self.n_seen if final else self.n_seen - self.s.look
        while True:
            deadline = self.deadline()
            nxt = self._candidates[0] if self._candidates else None
            if deadline <= horizon and (nxt is None or deadline <= nxt.sample):
                decided = min(max(deadline + self.s.look, self.s.learn), self.n_seen)
                found = self._search_back(deadline, decided)
                if found is not None:
                    out.append(RPeak(found.r_sample, decided))
                continue
            if nxt is None:
                break
            self._candidates.popleft()
            if self._classify(nxt):
                decided = min(max(nxt.sample + self.s.look + 1, nxt.rejudged_at, self.s.learn), self.n_seen)
                out.append(RPeak(nxt.r_sample, decided))
        return out

    def _learn_thresholds(self, stop: int) -> None:
        """Levels from the last ``learn_s`` before ``stop``: QRS from per-second maxima, noise from the mean."""
        b = self.buf_start
        f = self.f[max(stop - self.s.learn, b) - b : stop - b]
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
            if deadline - last >= self.s.relearn:
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
        if last is not None and c.sample - last.sample < self.s.refractory:
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
                and c.sample - last.sample < self.s.t_wave
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


class StreamingQRSDetector:
    """Feed frames of any size with :meth:`feed`; each R-peak is returned exactly once.

    One stream's detector: a row of a :class:`DetectorBank`, its own unless ``bank`` is given (the
    pipeline shares one bank per rate and feeds the bank directly). Memory is bounded by a few
    seconds of buffered signal regardless of how long the stream runs.
    """

    def __init__(self, fs: float, config: DetectorConfig | None = None, bank: DetectorBank | None = None) -> None:
        if bank is None:
            bank = DetectorBank(fs, config)
        elif bank.fs != float(fs) or (config is not None and bank.config != config):
            raise ValueError("the bank runs another rate or configuration")
        self.bank = bank
        self.row = bank.add()
        self.fs = bank.fs
        self.config = bank.config

    def feed(self, frame: np.ndarray) -> list[RPeak]:
        """Take the next samples (any length, physical units) and return beats decided by them."""
        x = np.asarray(frame, dtype=np.float64)
        if x.ndim != 1:
            raise DetectorInputError(f"expected a 1-D frame of samples, got shape {x.shape}")
        if x.size == 0:
            return []
        return list(self.bank.feed([self.row], [x])[0])

    def flush(self) -> list[RPeak]:
        """End of input: decide what the missing look-ahead still allows (file mode)."""
        return self.bank.flush(self.row)

    def close(self) -> None:
        """Give the row back to a shared bank (the stream ended or restarts its detector)."""
        self.bank.release(self.row)

    @property
    def n_seen(self) -> int:
        return self.bank.n_seen(self.row)

    @property
    def window_samples(self) -> int:
        """Samples held in the window (raw, derivative and integrator each)."""
        return self.bank.window(self.row).shape[1]

    @property
    def memory_bytes(self) -> int:
        """Bytes of the sample window (raw, derivative, integrator) and filter state."""
        return self.bank.row_bytes

    @property
    def settled(self) -> int:
        """Every beat with its R-peak before this sample has been returned, bar one a searchback
        may still find (see ``searchback_floor``): an integrator peak is judged ``lookahead_s``
        after it, and the R-peak lies at most ``locate_s[0]`` before the peak. Zero while the
        thresholds are being learnt."""
        return self.bank.settled(self.row)

    @property
    def searchback_floor(self) -> int:
        """No searchback can return a beat with its R-peak before this sample (``NO_FLOOR`` when it
        holds no peak to search back to). A searchback takes one of the peaks judged too small since
        the last beat, up to 1.5 RR later; a stream that must never have emitted a beat's R-peak
        before it is decided keeps its output behind this as well as behind ``settled``."""
        return self.bank.searchback_floor(self.row)


def _window_sum(x: np.ndarray, n: int) -> np.ndarray:
    """Sums of ``n`` consecutive columns of ``x`` (k, m): column t of the result sums columns
    t .. t + n - 1, for every t up to m - n.

    Each sum is built from power-of-two partial sums (pairs, pairs of pairs, ...) joined in a
    fixed order, so it takes about 2 log2(n) array operations for all rows at once, and every
    output is rounded the same way wherever the frames split (a running sum would not be;
    ``lfilter``'s carried state is not either). Rows are independent: any grouping of streams
    gives each one the same bits.
    """
    out_len = x.shape[1] - n + 1
    total: np.ndarray | None = None
    at = 0  # columns already summed into ``total``, from each window's start
    part, width = x, 1  # part[:, t] sums columns t .. t + width - 1
    while True:
        if n & width:
            piece = part[:, at : at + out_len]
            total = piece.copy() if total is None else total + piece
            at += width
        if 2 * width > n:
            return total
        part = part[:, width:] + part[:, :-width]
        width *= 2


def _bandpass(sos: np.ndarray, x: np.ndarray, zi: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``sosfilt(sos, x, axis=1)`` of a (k, n) frame matrix, continuing from ``zi[rows]`` (the
    kernel's (rows, sections, 2) state, updated)."""
    state = zi[rows]
    if _sosfilt is None:  # pragma: no cover
        y, state = signal.sosfilt(sos, x, axis=1, zi=state.transpose(1, 0, 2))
        zi[rows] = state.transpose(1, 0, 2)
        return y
    y = x.copy()  # filtered in place
    _sosfilt(sos, y, state)
    zi[rows] = state
    return y


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
