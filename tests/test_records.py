"""MIT-BIH conventions (splits, AAMI classes) and record access, on the committed slices."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import wfdb

from edge.records import (
    AAMI_OF_SYMBOL,
    ALL_RECORDS,
    DATA_DIR_ENV,
    DS1,
    DS2,
    PACED,
    DataDirError,
    read_record,
    resolve_data_dir,
)

DATA = Path(__file__).parent / "data"


def test_splits_partition_the_database() -> None:
    assert len(ALL_RECORDS) == 48 and len(set(ALL_RECORDS)) == 48
    assert len(DS1) == len(DS2) == 22
    assert not set(DS1) & set(DS2)
    assert set(DS1) | set(DS2) | set(PACED) == set(ALL_RECORDS)
    # 201 and 202 are one person: the inter-patient split keeps them apart only by design
    assert "201" in DS1 and "202" in DS2


def test_aami_mapping_follows_ec57() -> None:
    expected = {"N": "NLRej", "S": "AaJS", "V": "VE", "F": "F", "Q": "/fQ"}
    for cls, symbols in expected.items():
        for s in symbols:
            assert AAMI_OF_SYMBOL[s] == cls
    assert set(AAMI_OF_SYMBOL) == set("".join(expected.values()))
    for not_a_class in ["B", "r", "n", "?", "+", "~", "|"]:
        assert not_a_class not in AAMI_OF_SYMBOL


def test_read_record_matches_wfdb() -> None:
    rec = read_record(str(DATA / "208"))
    raw = wfdb.rdrecord(str(DATA / "208"), channels=[0])
    ann = wfdb.rdann(str(DATA / "208"), "atr")
    assert rec.fs == 360 and rec.lead == "MLII" and rec.units == "mV"
    np.testing.assert_array_equal(rec.signal, raw.p_signal[:, 0])
    beats = [s for s in ann.symbol if s in "NLRBAaJSVrFejnE/fQ?"]
    assert len(rec.beat_samples) == len(beats) < len(ann.symbol)  # rhythm notes are not beats
    counts = Counter(rec.aami_classes)
    assert counts["V"] == beats.count("V") > 0 and counts["F"] == beats.count("F") > 0


def test_second_channel_and_windows() -> None:
    rec = read_record(str(DATA / "100"), channel=1, sampfrom=3600, sampto=7200)
    assert rec.lead == "V5" and rec.signal.size == 3600
    assert rec.beat_samples.min() >= 0 and rec.beat_samples.max() < 3600


def test_record_by_name_in_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rec = read_record("119", DATA)
    assert rec.name == "119" and rec.beat_samples.size > 100
    monkeypatch.setenv(DATA_DIR_ENV, str(DATA))
    assert resolve_data_dir() == DATA
    assert read_record("232").name == "232"


def test_missing_data_dir_says_how_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DataDirError, match="ecg-trainer data download"):
        resolve_data_dir(None)
    with pytest.raises(DataDirError, match=str(tmp_path / "nowhere")):
        resolve_data_dir(tmp_path / "nowhere")
