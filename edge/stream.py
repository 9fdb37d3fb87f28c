"""One wearable session: raw samples in, R-peaks with their encoded beats out, synthetic samples back.

The stream owns everything per session that the models do not: the streaming detector (whose
row of raw input is also the buffer each beat is encoded from once its post-R samples arrive),
the causal RR context, the persona and the splicer. The pipeline batches the models across
streams; a stream only hands over beats that are ready and takes back rendered rows.

Raw samples never leave this object except as canonical beats handed to the classifier, and the
classifier's output is a class index: the surrogate is made from the class, the RR context and the
persona alone (DESIGN.md, promise 4).
"""

from __future__ import annotations

import bisect
import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge import codec
from edge.codec import CodecSpec
from edge.detector import NO_FLOOR, DetectorBank, DetectorConfig, RPeak, StreamingQRSDetector
from edge.persona import BaselineTrack, Persona
from edge.splicer import Splicer

log = logging.getLogger(__name__)

#: np.sum without its wrapper (the same sum, same bits), for the RR means of every beat.
_add = np.add.reduce

#: RR context the stream keeps for each beat, in seconds (same definitions as the trainer's).
RR_FEATURES = ("pre_rr", "local_rr", "long_rr")
LOCAL_BEATS, LONG_BEATS = 10, 300
#: A stream's first beat has no previous RR yet: it gets this (75 bpm).
DEFAULT_RR_S = 0.8
#: Raw input kept beyond what encoding the newest beat needs: the detector decides beats up to
#: about 0.3 s after their R-peak (later only for a searchback), and output waits for them.
KEEP_EXTRA_S = 1.5
#: ``BeatStream.wake`` when no beat waits for its post-R input.
NEVER = 2**62


@dataclass
class ReadyBeats:
    """Beats of one stream whose post-R samples have all arrived: model input, never output.
    Python lists but for the windows: a stream hands over a beat or two per step, and the batch
    makes one array of each from every stream's lists (an array per stream costs more)."""

    r: list[int]  # R-peak samples
    windows: np.ndarray  # float64 (k, W) input around each R (codec.encode_span), encoded for the classifier in the batch
    rr: list[tuple[float, float, float]]  # RR_FEATURES
    ok: Sequence[bool]  # window free of bad input; False beats are masked, not rendered
    arrived: list[float]  # clock time the R-peak sample arrived


@dataclass
class Emitted:
    """Output of one ``emit``: synthetic samples from ``start`` and the surrogates now emitted."""

    start: int
    samples: np.ndarray  # float64 mV, NaN where masked
    beats: list[tuple[int, int, str | None]]  # (R sample, class index, version of the generator that rendered it)
    latency: list[float]  # clock seconds from each emitted beat's R arrival to this emit
    masked: int  # samples that are NaN


class BeatStream:
    """Per-session state; see the module docstring. ``fs`` must be within the codec's range."""

    def __init__(
        self,
        fs: float,
        pseudonym: str,
        persona: Persona,
        rng: np.random.Generator,
        spec: CodecSpec = codec.DEFAULT_SPEC,
        detector: DetectorConfig | None = None,
        lost_s: float = 3.0,
        bank: DetectorBank | None = None,
    ) -> None:
        self.fs = float(fs)
        self.pseudonym = pseudonym
        self.persona = persona
        self._baseline = BaselineTrack(persona, self.fs, rng)  # the only reader of ``rng``
        self.spec = spec
        self._detector_config = detector
        self.detector = StreamingQRSDetector(self.fs, detector, bank)
        self._detector_offset = 0  # input sample of the detector's sample 0 (moves when it restarts)
        # The detector's ``settled`` and ``searchback_floor`` after the last frame through it (read
        # by every ``horizon``): set by whoever runs the detector, for every frame.
        self.settled = 0
        self.floor = NO_FLOOR
        # Frames received but not yet through the detector: the pipeline runs the detector of every
        # stream at once, at the next step (DetectorBank), and calls ``detected`` only for a frame
        # that returned beats or that a waiting beat's post-R input ends in (``wake``); ``ready``
        # and ``flush_detector`` run what is left one frame at a time.
        self.queue: deque[tuple[np.ndarray, bool]] = deque()  # (samples, a gap's fill)
        self.wake = NEVER  # the detector's sample count from which the first pending beat can be encoded
        self.enc_before, self.enc_after = codec.encode_span(self.fs, spec)
        self.enc_wait = codec.encode_wait(self.fs, spec)  # post-R samples a beat waits for
        self._cut_windows = codec.window_cutter(self.fs, spec, after=self.enc_wait)
        self.dec_before, _ = codec.decode_span(self.fs, spec)
        self.splicer = Splicer(self.fs, lost_s=lost_s)
        self.head = 0  # input samples received
        self.timestamp0: float | None = None  # time of sample 0, when the source carries time
        self.seq0 = 0  # the device's own index of sample 0
        # Raw input a beat may be encoded from: the detector's bank holds it (``history``), the
        # stream only tracks where it starts (``_buf_start``).
        self._keep = self.enc_before + self.enc_after + round(KEEP_EXTRA_S * self.fs)
        self.detector.bank.keep_history(self._keep)
        self._buf_start = 0
        self._bad: list[tuple[int, int]] = []  # [a, b) input spans that were NaN, gaps or rejected
        self._hold = 0.0  # last sample through a restarted detector that has seen none yet
        self._pending: deque[tuple[int, tuple[float, float, float], float]] = deque()  # (r, rr, arrived) awaiting post-R input
        self._ready: list[ReadyBeats] = []  # encoded, awaiting the models
        self._arrivals: deque[tuple[int, float]] = deque()  # (input head after a frame, clock), from the buffer's start
        self._last_r: int | None = None
        self._rr = _Recent(LONG_BEATS)  # RR intervals of the last LONG_BEATS beats, s
        self._labels: dict[int, tuple[int, float, str | None]] = {}  # R -> (class, arrival, generator) until emitted

    # ------------------------------------------------------------------------------------------
    def feed(self, samples: np.ndarray, now: float) -> None:
        """Take the next input samples (mV; NaN marks bad ones) into the queue for the detector.
        They are checked when they leave it (``clean``): the pipeline tests a whole step's frames
        at once, where a test per frame would cost more than the rest of feeding it."""
        x = np.asarray(samples, dtype=np.float64)
        self.queue.append((x, False))
        self.head += x.size
        self._arrivals.append((self.head, now))
        if len(self._arrivals) > _MAX_ARRIVALS:  # a stream with no beat for a long time
            self._advance_buffer(self._done)

    def feed_gap(self, n: int, now: float) -> None:
        """``n`` samples are missing (a dropped frame): masked, and the clock moves on."""
        self.queue.append((np.full(n, np.nan), True))
        self.head += n
        self._arrivals.append((self.head, now))

    @property
    def _done(self) -> int:
        """Input samples through the detector: all received but those still queued for it (a frame
        the detector is working on has left the queue)."""
        if not self.queue:
            return self.head
        return self.head - sum(x.size for x, _ in self.queue)

    def _advance_buffer(self, done: int) -> None:
        """The raw input buffer (in the detector's bank) now starts at ``done - _keep``: forget
        the frame arrival times and bad spans before it."""
        if done - self._keep > self._buf_start:
            self._buf_start = done - self._keep
            while len(self._arrivals) > 1 and self._arrivals[1][0] <= self._buf_start:
                self._arrivals.popleft()
            if self._bad:
                self._bad = [(a, b) for a, b in self._bad if b > self._buf_start]

    def _last_sample(self) -> float:
        """The last sample through the detector: what it sees where a frame starts bad."""
        _, buf = self.detector.bank.history(self.detector.row)
        return float(buf[-1]) if len(buf) else self._hold

    def clean(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """The next frame as the detector sees it (just taken from the queue): each run of bad
        samples is masked and holds the last good sample before it. Returns it and how many
        samples were bad."""
        bad = ~np.isfinite(x)
        n_bad = int(bad.sum())
        if n_bad:
            done = self._done - x.size  # input sample of x[0]
            x = x.copy()
            for a, b in _runs(bad):
                self._bad.append((done + a, done + b))
                self.splicer.mask(done + a, done + b)
                x[a:b] = x[a - 1] if a > 0 else self._last_sample()
        return x, n_bad

    def reset_detector(self, done: int) -> None:
        """Start the detector afresh (after it failed) at input sample ``done``; beats already
        found are kept."""
        self.detector.close()
        self.detector = StreamingQRSDetector(self.fs, self._detector_config, self.detector.bank)
        # The new detector counts from zero: offset its output by the samples it has not seen.
        self._detector_offset = done
        self.settled = 0
        self.floor = NO_FLOOR
        self._set_wake()

    def _set_wake(self) -> None:
        """``wake``: a beat can be encoded once its post-R input has all passed the detector."""
        self.wake = (self._pending[0][0] + self.enc_wait + 1 - self._detector_offset) if self._pending else NEVER

    def close(self) -> None:
        """The session ended: give the detector's row back to its bank."""
        self.detector.close()

    def detected(self, x: np.ndarray, peaks: Sequence[RPeak] | None) -> bool:
        """The detector's beats for frame ``x`` (just through it; ``settled`` and ``floor`` already
        say where it is), or None when the detector failed on it: then the frame is masked and
        the detector starts afresh on a masked stretch of its length, as if the frame had been
        dropped. Needed only for a frame that returned beats, failed, or reached ``wake``: for
        any other frame it changes nothing but what ``_done`` already says. True when beats now
        wait for the models (``ready``)."""
        done = self._done  # after this frame
        n = x.size
        if peaks is None:
            self.reset_detector(done - n)
            self._bad.append((done - n, done))
            self.splicer.mask(done - n, done)
            self._hold = x[-1]
            x = np.full(n, x[-1])  # what the detector sees inside a gap: the last good sample
            try:
                peaks = self.detector.feed(x)
            except Exception:  # noqa: BLE001 - failed again: it starts after this stretch instead
                self.reset_detector(done)
                peaks = []
            self.settled, self.floor = self.detector.settled, self.detector.searchback_floor
        for peak in peaks:
            self._add_peak(peak.sample + self._detector_offset)
        if self._pending and self._pending[0][0] + self.enc_wait < done:  # (most frames: not yet)
            self._advance_buffer(done - n)  # where it started before this frame
            self._encode_ready(done)
        self._advance_buffer(done)
        return bool(self._ready)

    def _detect_queued(self) -> None:
        """Run the detector over queued frames one at a time (the pipeline batches them instead)."""
        while self.queue:
            x, gap = self.queue.popleft()
            x, n_bad = self.clean(x)
            if n_bad and not gap:
                log.warning("%s: %d of %d samples are not finite; masked", self.pseudonym, n_bad, x.size)
            try:
                peaks = self.detector.feed(x)
                self.settled, self.floor = self.detector.settled, self.detector.searchback_floor
            except Exception as exc:  # noqa: BLE001 - mask the frame, start the detector afresh
                log.error("detector failed on a frame of %s (%s); frame masked, detector restarted", self.pseudonym, exc)
                peaks = None
            self.detected(x, peaks)

    def flush_detector(self) -> None:
        """End of input: let the detector decide what its look-ahead was waiting for."""
        self._detect_queued()
        for peak in self.detector.flush():
            self._add_peak(peak.sample + self._detector_offset)

    def _add_peak(self, r: int) -> None:
        if self._last_r is not None and r <= self._last_r:
            return
        pre = DEFAULT_RR_S if self._last_r is None else (r - self._last_r) / self.fs
        self._last_r = r
        self._rr.append(pre)
        rr = (pre, float(self._rr.mean(LOCAL_BEATS)), float(self._rr.mean(LONG_BEATS)))
        self._pending.append((r, rr, self._arrival(r)))
        if len(self._pending) == 1:
            self._set_wake()

    def _arrival(self, sample: int) -> float:
        i = bisect.bisect_right(self._arrivals, sample, key=_head)
        return self._arrivals[min(i, len(self._arrivals) - 1)][1]

    # ------------------------------------------------------------------------------------------
    def _encode_ready(self, done: int, final: bool = False) -> None:
        """Encode pending beats whose post-R input has passed the detector (``done`` samples have),
        while it is still buffered (a burst of frames between two model batches must not push a
        beat's window out of the buffer)."""
        out = []
        while self._pending and (final or self._pending[0][0] + self.enc_wait < done):
            out.append(self._pending.popleft())
        self._set_wake()
        if not out:
            return
        # In Python integers: a stream encodes a beat or two at a time, where each numpy call on a
        # one-element array costs more than the arithmetic.
        r = [b[0] for b in out]
        start, before, wait = self._buf_start, self.enc_before, self.enc_wait
        first, buf = self.detector.bank.history(self.detector.row)
        first += self._detector_offset  # input sample of buf[0]
        if not len(buf):  # a detector restarted after this stretch; its beats are masked below
            buf = np.zeros(1)
        last = len(buf) - 1
        windows = self._cut_windows(buf, np.array([min(max(k - first, 0), last) for k in r]))
        # A beat is rendered only if its window was still buffered when it was decided (or the
        # session's start, which the codec pads) and holds no bad input. (The bank holds at least
        # what the buffer's start says; input from before a detector restart it does not, but a
        # window reaching back there always holds the masked frame that restarted it.)
        ok = [(k - before >= start or start == 0) and (k - before >= first or first == 0)
              and not any(k + wait >= a and k - before < b for a, b in self._bad) for k in r]
        self._ready.append(ReadyBeats(r, windows, [b[1] for b in out], ok, [b[2] for b in out]))

    def ready(self, final: bool = False) -> ReadyBeats | None:
        """Encoded beats waiting for the models (at the end of input, all of them)."""
        if not (self._ready or self.queue or final):  # most streams in most steps
            return None
        self._detect_queued()
        if final:
            done = self._done
            self._advance_buffer(done)
            self._encode_ready(done, final=True)
        if not self._ready:
            return None
        parts, self._ready = self._ready, []
        if len(parts) == 1:
            return parts[0]
        return ReadyBeats([k for p in parts for k in p.r], np.concatenate([p.windows for p in parts]),
                          [v for p in parts for v in p.rr], [v for p in parts for v in p.ok],
                          [v for p in parts for v in p.arrived])

    def render(self, ready: ReadyBeats, labels: np.ndarray, rows: codec.DecodedBeats | None,
               model: str | None = None) -> tuple[int, int]:
        """Place rendered surrogates (one row per ``ready.ok`` beat, in order; ``rows`` None when
        the models failed; ``model`` the generator version that rendered them) or masks.
        Returns (beats masked, beats dropped as too late)."""
        masked = dropped = 0
        k = 0
        for i, sample in enumerate(ready.r):
            if ready.ok[i] and rows is not None:
                placed = self.splicer.place(sample, int(rows.start[k]), rows.samples[k])
                k += 1
                if placed:
                    self._labels[sample] = (int(labels[i]), ready.arrived[i], model)
            else:
                placed = self.splicer.place(sample, sample - self.dec_before, None, 2 * self.dec_before + 1)
                masked += placed
            dropped += not placed
        return masked, dropped

    def horizon(self, final: bool = False) -> int:
        """Output before this sample is final: no beat still to come can reach it, including one
        that a searchback may still find among the peaks the detector judged too small."""
        if final:
            return self.head
        # Every beat still to come has its R-peak at or after this: past what the detector has
        # settled, or a peak it judged too small that a searchback may yet take.
        r = self._detector_offset + min(self.settled, self.floor)
        h = self.splicer.reach(r, r - self.dec_before)
        first = self._ready[0].r[0] if self._ready else self._pending[0][0] if self._pending else None
        if first is not None:  # detected, not placed yet: held at its row's start (its mask, if it fails)
            h = min(h, first - self.dec_before, self.splicer.reach(first, first - self.dec_before))
        return max(h, self.splicer.cursor)

    def due(self, min_samples: int) -> int | None:
        """The horizon, if it is worth emitting up to now: a surrogate's R-peak can go out, or
        ``min_samples`` of output can; else None. (Emitting every stream on every tick costs more
        than the models do.)"""
        # The horizon never passes the earliest R-peak still to come (``Splicer.reach`` stops
        # before it) unless the cursor already has: where that bound says no, so does the horizon,
        # and most calls (about 6 in 10) end here without computing it.
        # ``_labels`` holds R-peaks in increasing order (beats are placed in order), so the first is the earliest.
        first = next(iter(self._labels)) if self._labels else None
        bound = self._detector_offset + min(self.settled, self.floor)
        cursor = self.splicer.cursor
        if bound - cursor < min_samples and not (first is not None and first < bound):
            return None
        h = self.horizon()
        if h - cursor >= min_samples or (first is not None and first < h):
            return h
        return None

    def emit(self, now: float, final: bool = False, until: int | None = None) -> Emitted:
        """Final synthetic output up to the horizon (or ``until``, a horizon ``due`` just gave):
        surrogates, persona baseline, NaN where masked."""
        start = self.splicer.cursor
        if until is None:
            until = self.horizon(final)
        beats_part = self.splicer.emit(until)
        samples = beats_part + self._baseline.take(start, len(beats_part))
        emitted, latency = [], []
        for r in sorted(s for s in self._labels if s < until):
            label, arrived, model = self._labels.pop(r)
            emitted.append((r, label, model))
            latency.append(now - arrived)
        # Counted only where the splicer wrote NaN: a count per emit costs about as much as the emit's own arithmetic.
        masked = int(np.count_nonzero(np.isnan(samples))) if self.splicer.masked else 0
        return Emitted(start, samples, emitted, latency, masked)

    def memory_bytes(self) -> int:
        """Bytes held in this stream's arrays (buffers, splicer rows, detector ring, baseline block)."""
        rows = sum(b.row.nbytes for b in self.splicer._beats if b.row is not None)
        return (self.detector.memory_bytes + rows + self._rr.nbytes + self._baseline.nbytes
                + 8 * 3 * len(self._pending))


#: Frame arrival times a stream keeps at most before it trims them to its buffer (it trims at every
#: beat; this bounds a stream with none).
_MAX_ARRIVALS = 256


def _head(arrival: tuple[int, float]) -> int:
    return arrival[0]


class _Recent:
    """The last ``n`` values in arrival order, as one array: the RR means are ``np.mean`` over the
    same values in the same order (same bits) without building a list and an array per beat."""

    def __init__(self, n: int) -> None:
        self._data = np.empty(2 * n)
        self._n = n
        self._lo = self._hi = 0

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes)

    def append(self, value: float) -> None:
        if self._hi == self._data.size:  # move the last n - 1 to the front
            keep = self._n - 1
            self._data[:keep] = self._data[self._hi - keep : self._hi].copy()
            self._lo, self._hi = 0, keep
        self._data[self._hi] = value
        self._hi += 1
        self._lo = max(self._lo, self._hi - self._n)

    def mean(self, last: int) -> float:
        """Mean of the last ``last`` values: the same sum and division as ``np.mean`` (same bits),
        without its argument handling, which costs more than the sum of a few values."""
        x = self._data[max(self._lo, self._hi - last) : self._hi]
        return float(_add(x)) / x.size


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of True in a boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.view(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))
