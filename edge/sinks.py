"""Sinks besides MQTT: WFDB files per session, and memory (demo, tests).

The WFDB sink streams each session's samples straight to its ``.dat`` file (format 16, 1 µV per
unit, WFDB's invalid value where masked), so a day-long session costs no memory; the header and
the beat annotations are written when the session ends. wfdb-python writes whole records only,
hence the hand-written append of the signal file; the header and annotations go through wfdb.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.frames import AnonBeat, AnonFrame, SessionInfo

log = logging.getLogger(__name__)

ADC_GAIN = 1000.0  # units per mV: 1 µV resolution, +-32 mV range in 16 bits
INVALID = -32768  # WFDB format 16's invalid sample


@dataclass
class MemorySink:
    """Keeps everything it is given, per pseudonym."""

    started: list[SessionInfo] = field(default_factory=list)
    ended: list[SessionInfo] = field(default_factory=list)
    frames: dict[str, list[AnonFrame]] = field(default_factory=lambda: defaultdict(list))
    beats: dict[str, list[AnonBeat]] = field(default_factory=lambda: defaultdict(list))

    async def session_started(self, info: SessionInfo) -> None:
        self.started.append(info)

    async def emit(self, frames: list[AnonFrame], beats: list[AnonBeat]) -> None:
        for f in frames:
            self.frames[f.pseudonym].append(f)
        for b in beats:
            self.beats[b.pseudonym].append(b)

    async def session_ended(self, info: SessionInfo) -> None:
        self.ended.append(info)

    def signal(self, pseudonym: str) -> np.ndarray:
        """The session's output samples in order (NaN where masked)."""
        parts = sorted(self.frames[pseudonym], key=lambda f: f.start)
        return np.concatenate([f.samples for f in parts]) if parts else np.empty(0)


class WfdbSink:
    """One WFDB record per session in ``directory``, named by the session's pseudonym."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._n: dict[str, int] = {}
        self._beats: dict[str, list[AnonBeat]] = defaultdict(list)
        self._info: dict[str, SessionInfo] = {}

    async def session_started(self, info: SessionInfo) -> None:
        self._info[info.pseudonym] = info
        self._n[info.pseudonym] = 0
        (self.directory / f"{info.pseudonym}.dat").write_bytes(b"")

    async def emit(self, frames: list[AnonFrame], beats: list[AnonBeat]) -> None:
        for f in frames:
            if f.pseudonym not in self._n:
                continue
            digital = np.where(np.isnan(f.samples), INVALID,
                               np.clip(np.round(np.nan_to_num(f.samples) * ADC_GAIN), -32767, 32767))
            with open(self.directory / f"{f.pseudonym}.dat", "ab") as fh:
                fh.write(digital.astype("<i2").tobytes())
            self._n[f.pseudonym] += len(f.samples)
        for b in beats:
            self._beats[b.pseudonym].append(b)

    async def session_ended(self, info: SessionInfo) -> None:
        import wfdb

        name = info.pseudonym
        n = self._n.pop(name, 0)
        record = wfdb.Record(
            record_name=name, n_sig=1, fs=info.fs, sig_len=n, file_name=[f"{name}.dat"], fmt=["16"],
            adc_gain=[ADC_GAIN], baseline=[0], units=["mV"], sig_name=["ECG"], adc_res=[16], adc_zero=[0],
            init_value=[0], checksum=[0], block_size=[0],
            comments=["anonymized ECG: every sample synthetic; invalid samples are masked output",
                      *[f"{k} model version {v}" for k, v in sorted(info.models.items())]],
        )
        record.wrheader(write_dir=str(self.directory))
        beats = self._beats.pop(name, [])
        if beats:
            wfdb.wrann(name, "atr", np.array([b.sample for b in beats]), symbol=[b.label for b in beats],
                       write_dir=str(self.directory))
        log.info("wrote %s: %d samples, %d beats", self.directory / name, n, len(beats))
