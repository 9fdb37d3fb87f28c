"""Splicer: lays decoded surrogate beats on the output clock, one synthetic sample per input sample.

Each surrogate's R-peak sits on its input beat's R-peak sample (the decoder already aligns the
row; the splicer never shifts it). Neighbouring beats share the overlap of their windows (fast
rates): the earlier beat owns the output up to a boundary ``boundary_fraction`` of the RR interval
after its R (past its T wave, before the next P wave) and the two cross-fade with a raised-cosine
ramp there, so the later beat's head never stacks on the earlier beat's tail. A beat's far ends
taper to zero, and the stretches no beat covers are synthetic baseline (zero here; the pipeline
adds the persona's wander and noise), so joins have no steps.

Output is final up to a horizon the caller gives: the stream knows which beats may still come,
and ``reach`` says from which sample such a beat would change the output. A beat that arrives
after output it changes went out is clipped at the cursor (tapered in from zero) and counted as
late; one whose R-peak already went out is dropped and counted.

Masked spans (fail closed) come out as NaN: bad input, a beat the models could not render, and
any beat-less stretch longer than ``lost_s`` (the detector has lost the rhythm: a flat line would
claim asystole).

Hand-written: this is the product's own placement rule; no library splices beats.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class _Placed:
    r: int
    start: int  # first sample of the row
    row: np.ndarray | None  # None: the beat could not be rendered; its span is masked
    floor: int = 0  # first sample it may contribute to (the cursor when it arrived late)
    # Its weight's ramps (``Splicer._ramps``), and the beat after it they were computed with (the
    # only neighbour that can still change: a beat placed later).
    ramps: tuple[int, int, int, int] | None = None
    ramps_next: _Placed | None = None


class Splicer:
    """Output assembly for one stream. ``place`` beats in R order, ``mask`` spans, ``emit`` output."""

    def __init__(
        self,
        fs: float,
        ramp_s: float = 0.02,
        boundary_fraction: float = 0.6,
        lost_s: float = 3.0,
    ) -> None:
        self.fs = fs
        self.ramp = max(1, round(ramp_s * fs))
        self.boundary_fraction = boundary_fraction
        self.lost = round(lost_s * fs)
        self.cursor = 0  # next output sample to emit
        self._beats: list[_Placed] = []  # beats whose span is not fully emitted, plus the last one before
        self._masks: list[tuple[int, int]] = []  # [start, end) spans to mask, not yet fully emitted
        self._last_r = 0  # R of the last beat before the cursor (session start counts as one)
        self.late = 0  # beats clipped because part of their span was already emitted
        self.masked = False  # the last ``emit`` wrote NaN (a mask or a lost stretch reached it)
        self.dropped = 0  # beats whose R-peak was already emitted

    # ------------------------------------------------------------------------------------------
    def place(self, r: int, start: int, row: np.ndarray | None, width: int | None = None) -> bool:
        """Add a decoded beat (``row`` covers ``start .. start+len(row)-1``, R at ``r``), or a beat
        that must be masked (``row=None``, span ``start .. start+width-1``). False if dropped."""
        if self._beats and r <= self._beats[-1].r:
            self.dropped += 1
            return False
        if r < self.cursor + self.ramp:
            self.dropped += 1
            return False
        if row is None:
            self._beats.append(_Placed(r, start, None, max(start, self.cursor)))
            self.mask(start, start + int(width or 0))
        else:
            if self.reach(r, start) < self.cursor:  # output it would have changed already went out
                self.late += 1
            self._beats.append(_Placed(r, start, np.asarray(row, dtype=np.float64), max(start, self.cursor)))
        return True

    def reach(self, r: int, start: int) -> int:
        """The first output sample that placing a rendered beat (R at ``r``, row from ``start``)
        after every beat placed so far would change. Its own row's start, unless the row overlaps
        the last beat's: then their cross-fade, where it starts to count and the last beat's
        weights start to fall, or the last beat's free tail, which stops fading out to zero once a
        beat follows, whichever is first. Output before this is the same bits whether that beat
        comes or not, so a stream emits up to here while such a beat may still be detected. It
        grows with ``r``: the earliest beat that may come bounds them all. (A beat that comes but
        cannot be rendered is masked from the cursor on: the samples before belonged to the last
        beat, where it would have had no weight.)"""
        if not self._beats:
            return start
        prev = self._beats[-1]
        if prev.row is None or r <= prev.r:
            return start
        a_end = prev.start + len(prev.row) - 1
        b, w = self._boundary(prev.r, a_end, r, start if start > self.cursor else self.cursor)
        if not w:
            return start
        return min(b - w, a_end + 1 - 2 * self.ramp)

    def mask(self, start: int, end: int) -> None:
        """Mask output samples ``start .. end-1`` (they have not been emitted yet, or are clipped)."""
        start = max(start, self.cursor)
        if end > start:
            self._masks.append((start, end))

    # ------------------------------------------------------------------------------------------
    def emit(self, until: int) -> np.ndarray:
        """Final output samples ``cursor .. until-1``; NaN where masked. Advances the cursor."""
        lo = self.cursor
        n = until - lo
        self.masked = False
        if n <= 0:
            return np.empty(0)
        out = np.zeros(n)
        for i, beat, seg_lo, seg_hi in self._live(lo, until):
            row, s = beat.row, beat.start
            up_lo, up_hi, down_lo, down_hi = self._ramps(i)
            if not s <= up_lo <= up_hi <= down_lo <= down_hi <= s + len(row):  # not the usual beat: weigh it whole
                w = self._row_weights(i)[seg_lo - s : seg_hi - s]
                out[seg_lo - lo : seg_hi - lo] += w * row[seg_lo - s : seg_hi - s]
                continue
            # The usual beat, weight 0, ramp up, 1, ramp down, 0 (``_weight``): each part of the
            # segment by itself, the same bits as weighing it whole (1 * x is x; the zeros add
            # nothing, and ``out`` is never -0), without building the weights.
            a, b = max(seg_lo, up_lo), min(seg_hi, up_hi)
            if a < b:
                out[a - lo : b - lo] += _full_ramp(up_hi - up_lo)[a - up_lo : b - up_lo] * row[a - s : b - s]
            a, b = max(seg_lo, up_hi), min(seg_hi, down_lo)
            if a < b:
                out[a - lo : b - lo] += row[a - s : b - s]
            a, b = max(seg_lo, down_lo), min(seg_hi, down_hi)
            if a < b:
                out[a - lo : b - lo] += _full_fall(down_hi - down_lo)[a - down_lo : b - down_lo] * row[a - s : b - s]
        lost = self._lost(lo, until)
        if lost:  # rare (a pause in the rhythm): only then is it worth summing the beats' weights
            weight = np.zeros(n)
            for i, beat, seg_lo, seg_hi in self._live(lo, until):
                weight[seg_lo - lo : seg_hi - lo] += self._row_weights(i)[seg_lo - beat.start : seg_hi - beat.start]
            for a, b in lost:
                seg = out[a - lo : b - lo]
                seg[weight[a - lo : b - lo] == 0] = np.nan
            self.masked = True
        for a, b in self._masks:
            a, b = max(a, lo), min(b, until)
            if b > a:
                out[a - lo : b - lo] = np.nan
                self.masked = True
        self.cursor = until
        self._forget()
        return out

    def _row_weights(self, i: int) -> np.ndarray:
        """Beat ``i``'s weight over its whole row: 1 inside its own part, raised-cosine ramps at the
        boundaries it shares with neighbours and at its free ends (``_ramps``)."""
        beat = self._beats[i]
        return _weight(beat.start, beat.start + len(beat.row), *self._ramps(i))

    def _ramps(self, i: int) -> tuple[int, int, int, int]:
        """Beat ``i``'s weight ramps: up over [up_lo, up_hi), down over [down_lo, down_hi) (an empty
        ramp is a step at its start). Kept with the beat and computed again only when a beat was
        placed after it since: a beat spans several emits, and a sample's weight does not depend
        on which emit asks."""
        beat = self._beats[i]
        nxt = self._beats[i + 1] if i + 1 < len(self._beats) else None
        if beat.ramps is not None and beat.ramps_next is nxt:
            return beat.ramps
        end = beat.start + len(beat.row)
        first = beat.floor
        head_lo, head_hi = first, first + 2 * self.ramp  # free end: fade in from zero
        tail_lo, tail_hi = end - 2 * self.ramp, end  # free end: fade out to zero
        prev = self._beats[i - 1] if i > 0 else None
        if prev is not None and prev.row is not None:
            b, w = self._boundary(prev.r, prev.start + len(prev.row) - 1, beat.r, first)
            if w:
                head_lo, head_hi = max(b - w, first), b + w
        if nxt is not None and nxt.row is not None:
            b, w = self._boundary(beat.r, end - 1, nxt.r, nxt.floor)
            if w:
                tail_lo, tail_hi = b - w, b + w
        beat.ramps, beat.ramps_next = (head_lo, max(head_hi, head_lo), tail_lo, max(tail_hi, tail_lo)), nxt
        return beat.ramps

    def _boundary(self, a_r: int, a_end: int, b_r: int, b_start: int) -> tuple[int, int]:
        """Cross-fade centre and half-width between consecutive rendered beats (R-peaks ``a_r`` <
        ``b_r``; the first's row ends at ``a_end`` inclusive, the second counts from ``b_start``, its
        floor); (0, 0) when their rows do not overlap (each then fades to zero on its own)."""
        w = (a_end - b_start) // 2
        if w <= 0:
            return 0, 0
        if w > self.ramp:
            w = self.ramp
        # np.clip's rule on Python ints, without min/max calls (this runs for every stream and step)
        centre = a_r + round(self.boundary_fraction * (b_r - a_r))
        if centre < b_start + w:
            centre = b_start + w
        return (centre if centre < a_end - w else a_end - w), w

    def _live(self, lo: int, hi: int) -> Iterator[tuple[int, _Placed, int, int]]:
        """Rendered beats whose rows reach into [lo, hi): index, beat and the samples it covers there."""
        for i, beat in enumerate(self._beats):
            if beat.row is None:
                continue
            end = beat.start + len(beat.row)  # exclusive
            if end > lo and beat.start < hi:
                yield i, beat, max(beat.start, lo), min(end, hi)

    def _lost(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Stretches of [lo, hi) more than ``lost`` samples after the last R-peak: there, output no
        beat covers is masked. Walks the stretches between R-peaks (a few per emit) instead of
        testing every sample."""
        if hi - 1 <= self._last_r + self.lost:  # every R-peak kept is later than _last_r: nothing is lost
            return []
        rs = [b.r for b in self._beats]
        j = bisect.bisect_right(rs, lo)  # rs[j] is the first R-peak after lo
        last = rs[j - 1] if j > 0 else self._last_r
        t = lo
        out = []
        while t < hi:
            nxt = min(rs[j], hi) if j < len(rs) else hi  # [t, nxt) has ``last`` as its last R-peak
            a = max(t, last + self.lost + 1)
            if a < nxt:
                out.append((a, nxt))
            if j >= len(rs):
                break
            t, last, j = nxt, rs[j], j + 1
        return out

    def _forget(self) -> None:
        """Drop beats and masks wholly behind the cursor, keeping the one just before the first
        live beat: its boundary with that beat shapes the live beat's fade-in."""
        cursor, beats = self.cursor, self._beats
        live = len(beats)
        for i, beat in enumerate(beats):  # a loop, not next(genexpr): once per emit, on two or three beats
            if beat.start + (0 if beat.row is None else len(beat.row)) > cursor:
                live = i
                break
        if live > 1:
            self._last_r = beats[live - 2].r
            del beats[: live - 1]
        if self._masks:
            self._masks = [(a, b) for a, b in self._masks if b > cursor]


def _weight(a: int, b: int, up_lo: int, up_hi: int, down_lo: int, down_hi: int) -> np.ndarray:
    """Weights of samples ``a .. b-1``: the smaller of a raised-cosine ramp up over
    [up_lo, up_hi) and one down over [down_lo, down_hi). Outside its ramp a ramp is exactly 0 or
    1, so only the ramps' own samples (a few dozen of a beat's hundreds) are computed."""
    up_hi, down_hi = max(up_hi, up_lo), max(down_hi, down_lo)  # an empty ramp is a step at its start
    if a <= up_lo <= up_hi <= down_lo <= down_hi <= b:
        # The usual beat: 0, ramp up, 1, ramp down, 0, one after the other inside the row. Joined
        # from cached pieces in one call: the same values as the assignments below, in less time
        # (this runs for every beat, and each numpy call costs more than its few hundred samples).
        zeros, ones = _constants(b - a)
        return np.concatenate((zeros[: up_lo - a], _full_ramp(up_hi - up_lo), ones[: down_lo - up_hi],
                               _full_fall(down_hi - down_lo), zeros[: b - down_hi]))
    w = np.ones(b - a)
    if up_lo > a:
        w[: min(up_lo, b) - a] = 0.0
    lo, hi = max(up_lo, a), min(up_hi, b)
    if hi > lo:
        w[lo - a : hi - a] = _full_ramp(up_hi - up_lo)[lo - up_lo : hi - up_lo]
    if down_hi < b:
        w[max(down_hi, a) - a :] = 0.0
    lo, hi = max(down_lo, a), min(down_hi, b)
    if hi > lo:
        down = 1.0 - _full_ramp(down_hi - down_lo)[lo - down_lo : hi - down_lo]
        np.minimum(w[lo - a : hi - a], down, out=w[lo - a : hi - a])
    return w


def _ramp(t: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """0 before ``lo``, raised cosine up to 1 at ``hi``, 1 after."""
    if hi <= lo:
        return (t >= lo).astype(np.float64)
    x = (t - lo + 0.5) / (hi - lo)
    np.minimum(np.maximum(x, 0.0, out=x), 1.0, out=x)  # np.clip's result without its dispatch cost
    return 0.5 - 0.5 * np.cos(np.pi * x)


@functools.lru_cache(maxsize=256)
def _full_fall(width: int) -> np.ndarray:
    """``1 - _full_ramp(width)``: a ramp down, cached the same way."""
    r = 1.0 - _full_ramp(width)
    r.flags.writeable = False
    return r


def _constants(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only runs of at least ``n`` zeros and ``n`` ones, cached (grown as rows get longer)."""
    global _ZEROS, _ONES
    if n > _ONES.size:
        _ZEROS, _ONES = np.zeros(2 * n), np.ones(2 * n)
        _ZEROS.flags.writeable = _ONES.flags.writeable = False
    return _ZEROS, _ONES


_ZEROS, _ONES = np.zeros(0), np.ones(0)


@functools.lru_cache(maxsize=256)
def _full_ramp(width: int) -> np.ndarray:
    """``_ramp`` over its whole ramp ``[lo, lo + width)``: the same values for any ``lo`` (they depend
    on ``t - lo`` only), so a stream's ramps are slices of a few cached arrays instead of a cosine
    per beat. Read-only: callers copy what they take."""
    r = _ramp(np.arange(width), 0, width)
    r.flags.writeable = False
    return r
