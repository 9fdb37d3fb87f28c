"""The command lines as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import wfdb

from edge.records import read_record
from edge.scoring import score_beats

DATA = Path(__file__).parent / "data"


def _run(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_console_scripts_are_installed() -> None:
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts["ecg-edge"] == "edge.cli:main"
    assert scripts["ecg-trainer"] == "trainer.cli:main"


def test_help_explains_the_product() -> None:
    out = _run("edge.cli", "--help")
    assert out.returncode == 0
    assert "synthetic beat of the same class" in out.stdout and "detect" in out.stdout
    out = _run("trainer.cli", "--help")
    assert out.returncode == 0 and "data download" in out.stdout


def test_detect_writes_a_wfdb_annotation_file(tmp_path: Path) -> None:
    out = _run("edge.cli", "detect", str(DATA / "119"), "--output-dir", str(tmp_path), "--frame-ms", "40")
    assert out.returncode == 0, out.stderr
    assert "119:" in out.stdout and "Se 100.00%" in out.stdout
    ann = wfdb.rdann(str(tmp_path / "119"), "qrs")
    assert set(ann.symbol) == {"N"}
    ref = read_record(str(DATA / "119"))
    s = score_beats(ref.beat_samples, ann.sample, ref.fs)
    assert s.fn == 0 and s.fp == 0
    assert f"{len(ann.sample)} beats" in out.stdout


def test_detect_runs_on_the_bundled_record(tmp_path: Path) -> None:
    out = _run("edge.cli", "detect", "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "208: MLII @ 360 Hz, 300.0 s" in out.stdout
    ann = wfdb.rdann(str(tmp_path / "208"), "qrs")
    assert 500 < len(ann.sample) < 540


def test_detect_second_channel(tmp_path: Path) -> None:
    out = _run("edge.cli", "detect", str(DATA / "100"), "--channel", "1", "--output-dir", str(tmp_path))
    assert out.returncode == 0 and "V5 @ 360 Hz" in out.stdout


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    out = _run("edge.cli", "detect", "100", "--data-dir", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert "MIT-BIH Arrhythmia Database not found" in out.stderr and "Traceback" not in out.stderr
    garbage = tmp_path / "junk"
    garbage.with_suffix(".hea").write_text("this is not a header\n")
    out = _run("edge.cli", "detect", str(garbage))
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_trainer_summary_without_data_says_where_it_looked(tmp_path: Path) -> None:
    out = _run("trainer.cli", "data", "summary", "--data-dir", str(tmp_path))
    assert out.returncode == 2 and "not found" in out.stderr and str(tmp_path) in out.stderr


def test_bench_detector_on_a_subset(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nkept text\n")
    out = _run(
        "edge.cli", "bench-detector", "--data-dir", str(DATA), "--records", "100", "119",
        "--peers", "xqrs", "--jobs", "1", "--output", str(page),
    )
    assert out.returncode == 0, out.stderr
    text = page.read_text()
    assert "kept text" in text and "<!-- detector:begin -->" in text
    row = next(line for line in text.splitlines() if line.startswith("| ours (streaming) |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    beats, tp = int(cells[1]), int(cells[2])
    expected = sum(read_record(str(DATA / n)).beat_samples.size for n in ("100", "119"))
    assert beats == expected and tp >= beats - 1
    assert "wfdb xqrs" in text
    again = _run(
        "edge.cli", "bench-detector", "--data-dir", str(DATA), "--records", "100",
        "--peers", "", "--jobs", "1", "--output", str(page),
    )
    assert again.returncode == 0 and page.read_text().count("<!-- detector:begin -->") == 1
