"""The last few seconds of a stream's signals, indexed by absolute sample number.

The detector and each stream keep a window of recent samples. Growing it with ``np.concatenate``
and slicing the front off copies every kept sample again on every frame: at 100 ms frames that is
about 20 KB per signal per frame, per stream, ten times a second. Here the storage is allocated
once with some slack; appending copies only the new frame, and the kept samples move to the front
only when the slack is used up (about every ``keep / 2`` samples).
"""

from __future__ import annotations

import numpy as np


class SampleWindow:
    """Aligned rows (e.g. raw, derivative, integrator) holding at least the last ``keep`` samples.

    ``start`` is the absolute sample number of column 0 of :meth:`rows`; :meth:`trim` moves it so
    that at most ``keep`` samples stay visible, exactly as slicing an array's front would.
    """

    def __init__(self, rows: int, keep: int) -> None:
        self.keep = int(keep)
        self.start = 0  # absolute sample number of the first visible sample
        self._origin = 0  # absolute sample number of storage column 0
        self._end = 0  # storage columns in use
        self._data = np.empty((rows, self.keep + max(self.keep // 2, 1)))

    def __len__(self) -> int:
        return self._end - (self.start - self._origin)

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes)

    def rows(self) -> np.ndarray:
        """A view (rows, visible samples) of the visible samples, valid until the next append;
        unpack it for one view per row."""
        return self._data[:, self.start - self._origin : self._end]

    def append(self, *columns: np.ndarray) -> None:
        """Add one frame to every row (each of ``columns`` has the frame's length)."""
        k = columns[0].size
        if self._end + k > self._data.shape[1]:
            lo = self.start - self._origin
            n = self._end - lo
            if n + k > self._data.shape[1]:  # a frame larger than the slack: grow
                grown = np.empty((self._data.shape[0], n + k + max(self.keep // 2, 1)))
                grown[:, :n] = self._data[:, lo : self._end]
                self._data = grown
            else:
                self._data[:, :n] = self._data[:, lo : self._end].copy()
            self._origin, self._end = self.start, n
        if len(columns) == 1:  # a stream's one row: one slice assignment, no loop (once per frame per stream)
            self._data[0, self._end : self._end + k] = columns[0]
        else:
            for i, col in enumerate(columns):
                self._data[i, self._end : self._end + k] = col
        self._end += k

    def trim(self) -> int:
        """Hide all but the last ``keep`` samples; returns how many were hidden."""
        drop = self._end - (self.start - self._origin) - self.keep  # len(self) - keep, without the call
        if drop > 0:
            self.start += drop
            return drop
        return 0
