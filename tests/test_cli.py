"""The command lines as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
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


# ---------------------------------------------------------------------------------------------
# `ecg-edge simulate`: the wearable of docker/compose.yaml, against a real mosquitto


async def _simulate_and_listen(host: str, port: int, prefix: str, *args: str,
                               username: str | None = None, password: str | None = None,
                               ends: int = 2) -> tuple[list, int, str, str]:
    """Run ``ecg-edge simulate`` while a subscriber on ``prefix/#`` decodes what it publishes."""
    import asyncio

    import aiomqtt

    from edge.mqtt import RawStreams

    streams = RawStreams(prefix)
    events: list = []
    async with aiomqtt.Client(host, port, username=username, password=password) as sub:
        await sub.subscribe(f"{prefix}/#", qos=1)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge.cli", "simulate", "--broker", f"{host}:{port}", "--topic-prefix", prefix,
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            async for msg in sub.messages:
                events += streams.feed(str(msg.topic), bytes(msg.payload), 0.0)
                if sum(type(e).__name__ == "SessionEnd" for e in events) == ends:
                    break
            out, err = await proc.communicate()
    return events, proc.returncode or 0, out.decode(), err.decode()


async def test_simulate_plays_the_bundled_record_pass_after_pass(mosquitto: tuple[str, int]) -> None:
    from edge.cli import bundled_record
    from edge.frames import Frame, SessionEnd
    from edge.replay import read_wfdb

    host, port = mosquitto
    events, rc, out, err = await _simulate_and_listen(
        host, port, "simulate-test/ecg/raw", "--device", "strap-1", "--passes", "2", "--duration", "3",
        "--speed", "0")
    assert rc == 0, err
    assert "played 208 2 time(s) on simulate-test/ecg/raw/strap-1" in out
    assert [type(e) for e in events if not isinstance(e, Frame)] == [SessionEnd, SessionEnd]
    assert all(e.device == "mqtt:strap-1" for e in events)
    signal, fs, _ = read_wfdb(bundled_record())
    passes = [[], []]
    n = 0
    for e in events:
        if isinstance(e, SessionEnd):
            n += 1
        else:
            passes[n].append(e)
    for frames in passes:  # each pass is its own session from sample 0: 3 s at 360 Hz in 0.25 s frames
        assert [f.seq for f in frames] == list(range(0, 1080, 90)) and frames[0].fs == fs == 360.0
        np.testing.assert_allclose(np.concatenate([f.samples for f in frames]), signal[:1080], atol=5e-4)


async def test_simulate_logs_in_with_a_password_file(tmp_path: Path) -> None:
    from conftest import run_mosquitto

    from edge.frames import SessionEnd

    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "wearable", "s3cret-pass"], check=True)
    (tmp_path / "wearable.password").write_text("s3cret-pass\n")
    with run_mosquitto(tmp_path / "broker", f"allow_anonymous false\npassword_file {passwords}\n") as (host, port):
        events, rc, _, err = await _simulate_and_listen(
            host, port, "ecg/raw", "--passes", "1", "--duration", "1", "--speed", "0", "--username", "wearable",
            "--password-file", str(tmp_path / "wearable.password"),
            username="wearable", password="s3cret-pass", ends=1)
        assert rc == 0, err
        assert isinstance(events[-1], SessionEnd) and len(events) == 5  # 4 frames of 0.25 s, then the end
        (tmp_path / "wrong.password").write_text("not-it\n")
        refused = _run("edge.cli", "simulate", "--broker", f"{host}:{port}", "--passes", "1", "--duration", "1",
                       "--username", "wearable", "--password-file", str(tmp_path / "wrong.password"))
    assert refused.returncode == 1 and "ecg-edge simulate: error: broker mqtt://" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_simulate_rejects_bad_options(tmp_path: Path) -> None:
    out = _run("edge.cli", "simulate", "--broker", "no-port-here")
    assert out.returncode == 2 and "expected HOST:PORT" in out.stderr
    out = _run("edge.cli", "simulate", "--password-file", str(tmp_path / "missing"), "--username", "u")
    assert out.returncode == 2 and "Traceback" not in out.stderr
