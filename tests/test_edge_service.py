"""The edge as a user runs it: sources into the live service, config files, the command line.

BLE runs through the real bleak API against the software Polar H10 (no radio here); MQTT runs
against a real mosquitto; models are the shipped ONNX files.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiomqtt
import numpy as np
import pytest
import wfdb
from fake_polar import FakePolarH10, Script
from leak import assert_no_raw_sample

from edge.anonymize import load_models
from edge.ble import Backoff, PolarH10Source
from edge.config import ConfigError, load_config
from edge.frames import Frame
from edge.metrics import EdgeMetrics
from edge.pipeline import Anonymizer, PipelineSettings
from edge.replay import read_wfdb
from edge.service import EdgeService
from edge.sinks import MemorySink

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def sessions():
    return load_models()


async def test_polar_h10_over_ble_is_anonymized_live_with_a_new_persona_after_a_reconnect(sessions) -> None:
    """130 Hz µV frames from the strap, a dropped link, a reconnect: two sessions, two pseudonyms,
    all output synthetic and aligned with what the strap sent."""
    strap = FakePolarH10(interval=0.0005, scripts=[Script(disconnect_after=150, drop={60}), Script()])
    source = PolarH10Source(strap.address, backend=strap.backend(), backoff=Backoff(0.001, 0.005))
    sink = MemorySink()
    anonymizer = Anonymizer(*sessions, PipelineSettings(seed=2), EdgeMetrics())
    service = EdgeService(anonymizer, [sink], tick_s=0.005)

    async def limited():
        frames = 0
        async for event in source:
            yield event
            frames += isinstance(event, Frame)
            if frames >= 150 + 120:
                break

    async with asyncio.timeout(60):
        await service.run([limited()])
    assert len(sink.started) == 2 and len(sink.ended) == 2
    first, second = (s.pseudonym for s in sink.started)
    assert first != second and "A0:9E" not in first + second
    assert all(s.fs == 130.0 for s in sink.started)
    sent = np.concatenate([strap.ecg_uv[s.first_sample : s.first_sample + s.n] for s in strap.sent]) / 1000.0
    out = np.concatenate([sink.signal(first), sink.signal(second)])
    # Every sample the strap measured has an output sample (the dropped frame's are masked): the
    # first link carried 150 frames of which the radio lost one, the second the other 121 read.
    assert len(sink.signal(first)) == 150 * 73 and len(sink.signal(second)) == (270 - 149) * 73
    assert np.isnan(sink.signal(first)[60 * 73 : 61 * 73]).all()
    forwarded = ~np.isnan(out)
    assert not np.isin(np.round(out[forwarded], 3), np.round(sent, 3)).all()
    beats = sink.beats[first] + sink.beats[second]
    assert len(beats) > 80  # MIT-BIH 100 at ~75 bpm over ~150 s
    assert anonymizer.metrics.bad_input.labels("gap")._value.get() == 1  # counted once, by the source


def _write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(body)
    return path


async def test_run_from_config_replays_a_record_into_wfdb_files(tmp_path: Path) -> None:
    from edge import app

    cfg = load_config(_write_config(tmp_path, f"""
[pipeline]
seed = 4

[[sources.replay]]
record = "{DATA / '105'}"
speed = 0

[sinks.wfdb]
directory = "out"

[metrics]
port = 0
"""))
    await app.run(cfg, stop_when_sources_end=True)
    heads = list((tmp_path / "out").glob("*.hea"))
    assert len(heads) == 1
    rec = wfdb.rdrecord(str(heads[0].with_suffix("")))
    ann = wfdb.rdann(str(heads[0].with_suffix("")), "atr")
    x, fs, _ = read_wfdb(DATA / "105")
    assert rec.fs == fs and rec.sig_len == len(x) and rec.units == ["mV"]
    assert len(ann.sample) > 150 and set(ann.symbol) <= {"N", "S", "V", "F", "Q"}
    # Both are quantised (1 µV out, 5 µV in), so a few samples coincide by chance; a copy would not.
    y = rec.p_signal[:, 0]
    assert np.mean(np.isclose(y, x, atol=1e-6, rtol=0)) < 0.01
    assert abs(np.corrcoef(np.nan_to_num(y), x)[0, 1]) < 0.9


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    cases = {
        "[sinks.wfdb]\ndirectory='o'\n[[sources.mqtt]]\ntopic_prefx='x'\n": "sources.mqtt.0.topic_prefx: unknown key",
        "[sinks.wfdb]\ndirectory='o'\n": "no sources",
        "[[sources.mqtt]]\n": "no sinks",
        "[broker]\nport=70000\n[[sources.mqtt]]\n[sinks.wfdb]\ndirectory='o'\n": "broker.port",
        "[pipeline]\npseudonym='keyed'\n[[sources.mqtt]]\n[sinks.wfdb]\ndirectory='o'\n": "pseudonym_secret_file",
        "[models]\ngenerator='missing.onnx'\n[[sources.mqtt]]\n[sinks.wfdb]\ndirectory='o'\n": "models.generator",
        "not toml [": "not valid TOML",
        "[broker]\nusername='edge'\npassword_file='empty.pw'\n[[sources.mqtt]]\n[sinks.wfdb]\ndirectory='o'\n":
            "broker.password_file: .*is empty",
    }
    (tmp_path / "empty.pw").write_text("\n")
    for body, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(_write_config(tmp_path, body))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_validate_config_command(tmp_path: Path) -> None:
    good = _write_config(tmp_path, "[[sources.mqtt]]\n[sinks.mqtt]\n")
    run = _cli("run", "--config", str(good), "--validate-config", cwd=tmp_path)
    assert run.returncode == 0 and "valid (1 MQTT" in run.stdout and "sinks: mqtt; model refresh: off" in run.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[[sources.mqtt]]\n[sinks.mqtt]\nedge = 1\n")
    run = _cli("run", "--config", str(bad), "--validate-config", cwd=tmp_path)
    assert run.returncode == 2 and "sinks.mqtt.edge: unknown key" in run.stderr


def test_anonymize_command_writes_a_wfdb_record(tmp_path: Path) -> None:
    run = _cli("--log-format", "json", "anonymize", str(DATA / "208"), str(tmp_path / "208_anon"), "--seed", "1",
               cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    logs = [json.loads(line) for line in run.stderr.splitlines()]  # structured logs: one object per line
    assert any("wrote" in entry["message"] for entry in logs) and all("level" in entry for entry in logs)
    rec = wfdb.rdrecord(str(tmp_path / "208_anon"))
    ann = wfdb.rdann(str(tmp_path / "208_anon"), "atr")
    x, fs, _ = read_wfdb(DATA / "208")
    assert rec.n_sig == 1 and rec.fs == fs and rec.sig_len == len(x) and rec.units == ["mV"]
    assert "V" in ann.symbol and "N" in ann.symbol
    # Same seed, same output; the command is reproducible.
    again = _cli("anonymize", str(DATA / "208"), str(tmp_path / "again"), "--seed", "1", cwd=tmp_path)
    assert again.returncode == 0
    assert np.array_equal(wfdb.rdrecord(str(tmp_path / "again")).p_signal, rec.p_signal)
    missing = _cli("anonymize", str(tmp_path / "nope"), str(tmp_path / "x"), cwd=tmp_path)
    assert missing.returncode == 2 and "error" in missing.stderr


async def test_mqtt_wearable_to_anonymized_topics_through_mosquitto(mosquitto, sessions) -> None:
    """A wearable publishes raw frames, the edge publishes anonymized ones, a subscriber counts
    every sample and finds no device name on the wire."""
    from edge.mqtt import BrokerConfig, MqttSink, MqttSource, publish_record

    host, port = mosquitto
    config = BrokerConfig(host=host, port=port)
    x, fs, _ = read_wfdb(DATA / "119")
    x = x[: int(40 * fs)]
    received: dict[str, list] = {"ecg": [], "beats": [], "status": []}
    topics: list[str] = []
    anonymizer = Anonymizer(*sessions, PipelineSettings(seed=8), EdgeMetrics())
    async with aiomqtt.Client(host, port) as subscriber:
        await subscriber.subscribe("ecg/#", qos=1)

        async def listen() -> None:
            async for message in subscriber.messages:
                topics.append(str(message.topic))
                if str(message.topic).startswith("ecg/anon/"):
                    body = json.loads(message.payload)
                    received[str(message.topic).rsplit("/", 1)[1]].append(body)
                    if body.get("state") == "ended":
                        return

        listener = asyncio.create_task(listen())
        async with MqttSink(config, edge_id="test-edge") as sink, MqttSource(config) as source:
            service = EdgeService(anonymizer, [sink])
            edge = asyncio.create_task(service.run([aiter(source)], stop_when_sources_end=False))
            await asyncio.wait_for(source.ready.wait(), 10)
            await publish_record(config, "strap-SN12345", x, fs, 0.25, realtime=False)
            await asyncio.wait_for(listener, 30)
            edge.cancel()
            await asyncio.gather(edge, return_exceptions=True)
    anon_topics = [t for t in topics if t.startswith("ecg/anon/")]
    assert anon_topics and not any("SN12345" in t for t in anon_topics)
    assert not any("SN12345" in json.dumps(b) for kind in received.values() for b in kind)
    samples = sorted((b["seq"], b["samples"]) for b in received["ecg"])
    assert sum(len(s) for _, s in samples) == len(x)  # every sample accounted for, none twice
    assert [seq for seq, _ in samples] == list(np.cumsum([0] + [len(s) for _, s in samples[:-1]]))
    out = np.array([v for _, s in samples for v in s], dtype=float)
    assert_no_raw_sample(out, x)
    assert sum(len(b["beats"]) for b in received["beats"]) > 40


def test_demo_runs_end_to_end_on_the_embedded_broker(tmp_path: Path) -> None:
    from edge.cli import bundled_record
    from edge.demo import run_demo

    summary = run_demo(tmp_path, bundled_record(), duration_s=20.0, speed=0, seed=1)
    assert summary["samples_received"] == summary["samples_sent"] == 7200
    assert summary["status_seen"] == ["online", "ended"]
    assert summary["beats_emitted"] >= summary["beats_reference"] - 2
    assert summary["r_offset_vs_reference_samples"]["within_150ms"] == 1.0
    assert {"N", "V"} <= set(summary["classes_emitted"])
    for name in ("demo.hea", "demo.dat", "demo.atr", "demo.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert wfdb.rdrecord(str(tmp_path / "demo")).sig_len == 7200


def test_metrics_endpoint_serves_the_edge_counters(sessions) -> None:
    import urllib.request

    from edge.mosquitto import free_port

    metrics = EdgeMetrics()
    anonymizer = Anonymizer(*sessions, PipelineSettings(seed=1), metrics)
    x, fs, _ = read_wfdb(DATA / "100")
    for start in range(0, int(20 * fs), 360):
        anonymizer.feed(Frame("strap", x[start : start + 360], fs, seq=start))
        anonymizer.step()
    anonymizer.feed(Frame("strap", x[:10], fs, seq=10))  # overlaps what came: counted as bad input
    anonymizer.close()
    port = free_port()
    metrics.serve(port)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'ecg_edge_beats_total{label="N"}' in text
    assert 'ecg_edge_bad_input_total{kind="order"} 1.0' in text
    assert "ecg_edge_added_latency_seconds_bucket" in text
    assert 'ecg_edge_model_info{kind="generator"' in text


def test_pipeline_benchmark_runs_and_writes_its_table(tmp_path: Path) -> None:
    import argparse

    from edge import bench

    out = tmp_path / "benchmarks.md"
    assert bench.main(argparse.Namespace(streams=[4], seconds=3.0, frame_ms=[100.0], arrivals=["staggered", "lockstep"],
                                         peer=False, clock="cpu", repeats=2, output=out)) == 0
    text = out.read_text()
    runs = [line for line in text.splitlines() if line.startswith("| GeneratorSession | staggered | 100 ms | 4 | ")]
    assert len(runs) == 3  # two runs, and the repeats' summary row
    assert sum(line.count("|") == 11 for line in runs) == 2
    summary = next(line for line in runs if line.count("|") == 9).split("|")
    assert summary[5].strip() == "2"  # runs
    sustained = [float(v) for v in summary[6].split("/")]
    assert 0 < sustained[0] <= sustained[1] <= sustained[2]
    assert summary[8].strip() in ("0 of 2", "1 of 2", "2 of 2")
    assert "| GeneratorSession | lockstep | 100 ms | 4 |" in text
    assert bench.main(argparse.Namespace(streams=[4], seconds=3.0, frame_ms=[100.0], arrivals=["staggered"],
                                         peer=False, clock="cpu", repeats=0, output=out)) == 2


def test_simulated_wearables_send_each_frame_once_on_their_own_phase() -> None:
    """The bench's wearables (also the paired CPU comparison's): every frame arrives once, at
    its phase plus whole frames, and each wearable's frames continue its record without a gap."""
    from edge import bench

    signal = np.arange(1000, dtype=np.float64)
    w = bench.Wearables(5, signal, 360.0, 100, seed=3)
    got: dict[str, list] = {}
    for clock in np.arange(0.02, 5.0, 0.02):
        for device, x, seq, at in w.arrived(float(clock)):
            assert at <= clock + 1e-9
            got.setdefault(device, []).append((x, seq, at))
    assert sorted(got) == [f"w{i}" for i in range(5)]
    assert w.frames_sent == sum(len(v) for v in got.values())
    for frames in got.values():
        assert [seq for _, seq, _ in frames] == [36 * k for k in range(len(frames))]
        assert np.allclose(np.diff([at for _, _, at in frames]), 0.1)
        assert frames[0][2] <= bench.JOIN_S + 0.1
        played = np.concatenate([x for x, _, _ in frames])
        assert np.array_equal(played, signal[(played[0] + np.arange(played.size)).astype(int) % signal.size])
    lockstep = bench.Wearables(5, signal, 360.0, 100, seed=3, staggered=False)
    assert [at for *_, at in lockstep.arrived(0.1)] == [0.1] * 5


@pytest.mark.parametrize("arrivals", ["staggered", "lockstep"])
def test_pipeline_benchmark_latency_is_the_post_r_wait_plus_frame_and_tick(arrivals: str) -> None:
    """A surrogate can go out once the codec's post-R input has arrived: the latency the bench
    reports must sit between that wait less one frame (the R-peak's own frame arrives late
    too) and the wait plus one frame, one tick and the compute; and every fed second counts."""
    from edge import bench, codec
    from edge.anonymize import load_models
    from edge.cli import bundled_record
    from edge.replay import read_wfdb

    signal, fs, _ = read_wfdb(bundled_record())
    gen, cls = load_models()
    r = bench.run_once(gen, cls, 6, 4.0, 100.0, signal, fs, arrivals=arrivals)
    wait = codec.encode_span(fs)[1] / fs
    frame_s = round(0.1 * fs) / fs
    assert r.beats > 6 * 4 * 0.8  # record 208 runs at about 1.5 beats per second
    assert wait - frame_s <= r.latency_p50 <= r.latency_max <= wait + frame_s + 0.02 + 0.25
    assert r.simulated_s == pytest.approx(4.0, abs=0.1)
    assert r.realtime_factor > 1


def test_pipeline_benchmark_on_a_fixed_clock_does_the_same_work_every_time() -> None:
    """The fixed clock is for comparing versions by instruction counts: the frames, steps and
    beats must not depend on how long the compute took."""
    from edge import bench
    from edge.anonymize import load_models
    from edge.cli import bundled_record
    from edge.replay import read_wfdb

    signal, fs, _ = read_wfdb(bundled_record())
    gen, cls = load_models()
    runs = [bench.run_once(gen, cls, 5, 3.0, 100.0, signal, fs, clock="fixed") for _ in range(2)]
    assert runs[0].beats == runs[1].beats > 5 * 3 * 0.8
    assert runs[0].simulated_s == runs[1].simulated_s == pytest.approx(3.0, abs=0.1)
    # Its latency is the pipeline's own waiting, the same whatever the compute took: at 100 ms
    # frames at least the 500 ms of post-R input, and no backlog on top.
    assert runs[0].latency_p99 == runs[1].latency_p99 and runs[0].latency_max == runs[1].latency_max
    assert 0.5 <= runs[0].latency_p50 <= runs[0].latency_p99 < 0.7
    assert "(waits only: fixed clock)" in bench.table(runs)


def test_fleet_benchmark_counts_every_frame_through_mosquitto(tmp_path: Path) -> None:
    import argparse

    from edge import bench_fleet

    out = tmp_path / "benchmarks.md"
    args = argparse.Namespace(wearables=5, seconds=6.0, frame=73, output=out, edge_log=tmp_path / "edge.log", workers=2)
    assert bench_fleet.main(args) == 0
    text = out.read_text()
    assert "every anonymized frame delivered" in text and "| sessions online / ended / complete | 5 / 5 / 5 of 5 |" in text


def test_a_pass_through_is_caught() -> None:
    """The leak check itself: a chance-level output passes; 1 % of the input in one piece fails,
    and so does a splice of three input samples."""
    rng = np.random.default_rng(0)
    raw = np.round(rng.normal(0, 0.5, 10_000), 3)
    out = np.round(rng.normal(0, 0.5, 10_000), 4)
    assert_no_raw_sample(out, raw)
    for start, n in [(5_000, 100), (200, 3)]:
        leaky = out.copy()
        leaky[start : start + n] = raw[start : start + n]
        with pytest.raises(AssertionError, match="equal the input"):
            assert_no_raw_sample(leaky, raw)
