"""MIT-BIH Arrhythmia Database access: where the data lives, which records are which, AAMI classes.

This is the one place that knows the database's conventions (the de Chazal DS1/DS2 inter-patient
split, the AAMI EC57 mapping from MIT-BIH beat symbols to the five classes), so the detector
benchmark, the trainer and the evaluation cannot disagree about them. Reading records needs the
``wfdb`` extra; the constants do not.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Environment variable naming the MIT-BIH data directory (overridden by ``--data-dir``).
DATA_DIR_ENV = "MITDB_DIR"
#: Places looked at, in order, when neither the flag nor the environment names a directory.
DEFAULT_DATA_DIRS = (Path("data/mitdb"), Path("../shared/data/mitdb"))

#: All 48 records of the MIT-BIH Arrhythmia Database.
ALL_RECORDS: tuple[str, ...] = ("100", "101", "102", "103", "104", "105", "106", "107", "108", "109", "111", "112", "113", "114", "115", "116", "117", "118", "119", "121", "122", "123", "124", "200", "201", "202", "203", "205", "207", "208", "209", "210", "212", "213", "214", "215", "217", "219", "220", "221", "222", "223", "228", "230", "231", "232", "233", "234")
#: de Chazal et al. 2004 inter-patient split: train and tune on DS1, measure on DS2.
DS1: tuple[str, ...] = ("101", "106", "108", "109", "112", "114", "115", "116", "118", "119", "122", "124", "201", "203", "205", "207", "208", "209", "215", "220", "223", "230")
DS2: tuple[str, ...] = ("100", "103", "105", "111", "113", "117", "121", "123", "200", "202", "210", "212", "213", "214", "219", "221", "222", "228", "231", "232", "233", "234")
#: Records with paced beats; they stay out of classifier training.
PACED: tuple[str, ...] = ("102", "104", "107", "217")

#: AAMI EC57 classes, in the order models use them.
AAMI_CLASSES: tuple[str, ...] = ("N", "S", "V", "F", "Q")
#: MIT-BIH beat annotation symbol -> AAMI class.
AAMI_OF_SYMBOL: dict[str, str] = {
    **dict.fromkeys("NLRej", "N"),
    **dict.fromkeys("AaJS", "S"),
    **dict.fromkeys("VE", "V"),
    "F": "F",
    **dict.fromkeys("/fQ", "Q"),
}
#: Every MIT-BIH annotation symbol that marks a beat (EC57 scores detectors against these).
BEAT_SYMBOLS = frozenset("NLRBAaJSVrFejnE/fQ?")


class DataDirError(FileNotFoundError):
    """The MIT-BIH data directory is missing or incomplete."""


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the MIT-BIH directory: the flag, else ``$MITDB_DIR``, else the default places.

    Raises DataDirError naming what was tried and how to download the database.
    """
    tried: list[Path] = []
    if data_dir is not None:
        candidates = [Path(data_dir)]
    elif os.environ.get(DATA_DIR_ENV):
        candidates = [Path(os.environ[DATA_DIR_ENV])]
    else:
        candidates = list(DEFAULT_DATA_DIRS)
    for path in candidates:
        tried.append(path)
        if (path / "100.hea").is_file():
            return path
    raise DataDirError(
        "MIT-BIH Arrhythmia Database not found (looked in: "
        + ", ".join(str(p) for p in tried)
        + f"). Pass --data-dir, set {DATA_DIR_ENV}, or download it with "
        "`ecg-trainer data download DIR`."
    )


def download(data_dir: str | os.PathLike[str]) -> Path:
    """Download the whole database from PhysioNet into ``data_dir`` (about 100 MB)."""
    wfdb = _wfdb()
    path = Path(data_dir)
    path.mkdir(parents=True, exist_ok=True)
    log.info("downloading mitdb into %s", path)
    wfdb.dl_database("mitdb", str(path))
    return path


@dataclass(frozen=True)
class Record:
    """One ECG channel of a WFDB record with its reference beats."""

    name: str
    signal: np.ndarray  # physical units (mV), shape (n,)
    fs: float
    units: str
    lead: str
    beat_samples: np.ndarray  # reference R-peak sample of every beat annotation
    beat_symbols: np.ndarray  # MIT-BIH symbol of each beat
    #: (start, end) sample spans of ventricular flutter/fibrillation episodes ('[' ... ']'),
    #: where the database annotates no beats (EC57 excludes them from detector scoring).
    flutter_spans: tuple[tuple[int, int], ...] = ()

    @property
    def aami_classes(self) -> np.ndarray:
        """AAMI class of each reference beat; '' where the symbol has none (e.g. 'B', 'r', '?')."""
        return np.array([AAMI_OF_SYMBOL.get(s, "") for s in self.beat_symbols])


def read_record(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    channel: int = 0,
    *,
    sampfrom: int = 0,
    sampto: int | None = None,
    annotator: str | None = "atr",
) -> Record:
    """Read one channel of a WFDB record (by name inside ``data_dir``, or a path without suffix).

    ``annotator=None`` reads no annotations (for records without reference beats).
    """
    wfdb = _wfdb()
    path = record_path(name, data_dir)
    rec = wfdb.rdrecord(str(path), channels=[channel], sampfrom=sampfrom, sampto=sampto)
    beat_samples = np.empty(0, dtype=np.int64)
    beat_symbols = np.empty(0, dtype="<U1")
    flutter: list[tuple[int, int]] = []
    if annotator is not None and Path(f"{path}.{annotator}").is_file():
        ann = wfdb.rdann(str(path), annotator, sampfrom=sampfrom, sampto=sampto, shift_samps=True)
        symbols = np.asarray(ann.symbol)
        samples = np.asarray(ann.sample, dtype=np.int64)
        is_beat = np.isin(symbols, list(BEAT_SYMBOLS))
        beat_samples, beat_symbols = samples[is_beat], symbols[is_beat]
        start = None
        for s, sym in zip(samples, symbols):
            if sym == "[":
                start = int(s)
            elif sym == "]" and start is not None:
                flutter.append((start, int(s)))
                start = None
        if start is not None:
            flutter.append((start, int(rec.sig_len)))
    signal = np.asarray(rec.p_signal[:, 0], dtype=np.float64)
    return Record(
        name=Path(name).name,
        signal=signal,
        fs=float(rec.fs),
        units=str(rec.units[0]),
        lead=str(rec.sig_name[0]),
        beat_samples=beat_samples,
        beat_symbols=beat_symbols,
        flutter_spans=tuple(flutter),
    )


def record_path(name: str, data_dir: str | os.PathLike[str] | None) -> Path:
    """A record given as an existing path (``dir/100`` or ``dir/100.hea``) is read from there;
    a bare name (``100``) is looked up in the data directory."""
    given = Path(name)
    if given.suffix in {".hea", ".dat", ".atr"}:
        given = given.with_suffix("")
    is_path = len(given.parts) > 1 or data_dir is None
    if is_path and Path(f"{given}.hea").is_file():
        return given
    return resolve_data_dir(data_dir) / given.name


def _wfdb():
    try:
        import wfdb
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "reading WFDB records needs the 'wfdb' extra: pip install 'ecg-anonymizer[wfdb]'"
        ) from exc
    return wfdb
