"""WFDB replay: a recorded ECG played as a live wearable, in real time or faster.

The demo, the tests and the benchmark use it as a source; file mode uses the same frames without
the clock. Frames carry their sample index (``seq``) and a timestamp, as a wearable's would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np

from edge.frames import Frame, SessionEnd, SourceEvent

_UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "v": 1e3}


def to_millivolts(signal: np.ndarray, units: str) -> np.ndarray:
    """A physical signal in millivolts; ValueError for units that are not a voltage."""
    factor = _UNIT_TO_MV.get(units.strip().lower())
    if factor is None:
        raise ValueError(f"signal units {units!r} are not a voltage (mV, uV or V)")
    return np.asarray(signal, dtype=np.float64) * factor


def frames(device: str, signal_mv: np.ndarray, fs: float, frame_s: float = 0.25,
           timestamp0: float | None = None) -> Iterator[Frame]:
    """Cut a signal into consecutive frames of ``frame_s`` seconds (the last may be shorter)."""
    n = max(1, round(frame_s * fs))
    for start in range(0, len(signal_mv), n):
        t = None if timestamp0 is None else timestamp0 + start / fs
        yield Frame(device, signal_mv[start : start + n], fs, seq=start, timestamp=t)


def read_wfdb(path: str | Path, channel: int = 0) -> tuple[np.ndarray, float, str]:
    """One channel of a WFDB record in mV (NaN where the record marks samples invalid)."""
    import wfdb  # the wfdb extra: file mode and replay only

    path = Path(path)
    header = wfdb.rdheader(str(path))
    if not 0 <= channel < header.n_sig:
        raise ValueError(f"record {path} has {header.n_sig} channel(s); channel {channel} does not exist")
    rec = wfdb.rdrecord(str(path), channels=[channel])
    return to_millivolts(rec.p_signal[:, 0], rec.units[0]), float(rec.fs), rec.sig_name[0]


async def replay(device: str, signal_mv: np.ndarray, fs: float, frame_s: float = 0.25, speed: float = 1.0,
                 timestamp0: float | None = None) -> AsyncIterator[SourceEvent]:
    """Yield frames paced like a wearable (``speed`` times real time; 0 = as fast as possible),
    then a SessionEnd."""
    t0 = time.monotonic()
    ts = time.time() if timestamp0 is None else timestamp0
    for frame in frames(device, signal_mv, fs, frame_s, ts):
        if speed > 0:
            due = t0 + (frame.seq + len(frame.samples)) / fs / speed
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        else:
            await asyncio.sleep(0)
        yield frame
    yield SessionEnd(device, "end of record")
