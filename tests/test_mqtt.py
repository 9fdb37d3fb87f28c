"""MQTT paths of the edge against a real mosquitto (and the embedded amqtt broker).

Each test uses its own topic prefix on the shared broker, so retained messages of one test never
reach another.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiomqtt
import numpy as np
import pytest

from edge.broker import EmbeddedBroker, free_port
from edge.frames import (
    AnonBeat,
    AnonFrame,
    BadInput,
    Frame,
    SessionEnd,
    SessionInfo,
    SourceEvent,
)
from edge.mqtt import (
    BrokerConfig,
    MqttSink,
    MqttSource,
    RawLimits,
    RawStreams,
    anon_topic,
    check_pseudonym,
    decode_raw,
    encode_anon_frame,
    encode_beats,
    encode_end,
    encode_raw,
    parse_raw,
    publish_record,
    raw_topic,
    shard_subscriptions,
)

FS = 130.0


@pytest.fixture
def broker(mosquitto: tuple[str, int]) -> BrokerConfig:
    host, port = mosquitto
    return BrokerConfig(host=host, port=port)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@asynccontextmanager
async def collecting(source: MqttSource) -> AsyncIterator[asyncio.Queue[SourceEvent]]:
    """Run the source in a task; yield the queue of its events once it is subscribed."""
    queue: asyncio.Queue[SourceEvent] = asyncio.Queue()

    async def run() -> None:
        async for event in source:
            queue.put_nowait(event)

    task = asyncio.create_task(run())
    try:
        async with asyncio.timeout(5):
            await source.ready.wait()
        yield queue
    finally:
        while not task.done():  # Python 3.11's wait_for (in aiomqtt) can swallow one cancellation
            task.cancel()
            await asyncio.wait((task,), timeout=0.5)
        if not task.cancelled():
            task.result()


async def take(queue: asyncio.Queue[SourceEvent], n: int, timeout: float = 5.0) -> list[SourceEvent]:
    async with asyncio.timeout(timeout):
        return [await queue.get() for _ in range(n)]


async def messages_until(
    client: aiomqtt.Client, done: Callable[[str, dict], bool], timeout: float = 5.0
) -> list[tuple[str, dict, bool]]:
    """(topic, payload, retain) of each message until ``done(topic, payload)`` is true."""
    out = []
    async with asyncio.timeout(timeout):
        async for m in client.messages:
            payload = json.loads(m.payload)
            out.append((m.topic.value, payload, m.retain))
            if done(m.topic.value, payload):
                return out
    raise AssertionError("message stream ended")


async def next_messages(client: aiomqtt.Client, n: int, timeout: float = 5.0) -> list[tuple[str, dict, bool]]:
    out: list[tuple[str, dict, bool]] = []
    while len(out) < n:
        out += await messages_until(client, lambda t, p: True, timeout)
    return out


def uv_signal(n: int, seed: int = 0) -> np.ndarray:
    """mV values on a whole-uV grid, as a uV wearable would report them."""
    return np.round(np.random.default_rng(seed).normal(0.0, 0.6, n), 3)


# ---------------------------------------------------------------------------------------------
# Raw payloads: pure decoding


BAD_PAYLOADS = [
    ("not-json", b"\xff\xfe\x00 not json", "garbage", "not JSON"),
    ("array", b"[1, 2, 3]", "garbage", "JSON array"),
    ("no-version", b'{"fs": 130, "units": "uV", "seq": 0, "samples": [1]}', "schema", "'v'"),
    ("version-2", b'{"v": 2, "fs": 130, "units": "uV", "seq": 0, "samples": [1]}', "version", "version 2"),
    ("fs-low", b'{"v": 1, "fs": 50, "units": "uV", "seq": 0, "samples": [1]}', "rate", "50 Hz"),
    ("fs-string", b'{"v": 1, "fs": "130", "units": "uV", "seq": 0, "samples": [1]}', "schema", "'fs'"),
    ("units", b'{"v": 1, "fs": 130, "units": "V", "seq": 0, "samples": [1]}', "schema", "'units'"),
    ("no-samples", b'{"v": 1, "fs": 130, "units": "uV", "seq": 0}', "schema", "missing field(s): samples"),
    ("empty", b'{"v": 1, "fs": 130, "units": "uV", "seq": 0, "samples": []}', "schema", "empty"),
    ("string-sample", b'{"v": 1, "fs": 130, "units": "uV", "seq": 0, "samples": [1, "2"]}', "schema", "samples[1] is a string"),
    ("bool-sample", b'{"v": 1, "fs": 130, "units": "uV", "seq": 0, "samples": [true]}', "schema", "samples[0] is a boolean"),
    ("seq", b'{"v": 1, "fs": 130, "units": "uV", "seq": -4, "samples": [1]}', "schema", "'seq'"),
    ("extra", b'{"v": 1, "fs": 130, "units": "uV", "seq": 0, "samples": [1], "mac": "C0:FF:EE"}', "schema", "unknown field(s): mac"),
    ("end-false", b'{"v": 1, "end": false}', "schema", "'end' must be true"),
    ("many-samples", encode_raw(np.zeros(101), FS, 0), "oversize", "101 samples"),
    ("many-bytes", encode_raw(np.full(99, 1.234567), FS, 0, units="mV") + b" " * 3000, "oversize", "bytes"),
]
SMALL = RawLimits(max_bytes=2000, max_samples=100)


@pytest.mark.parametrize("name,payload,kind,fragment", BAD_PAYLOADS, ids=[c[0] for c in BAD_PAYLOADS])
def test_bad_payload_is_bad_input_naming_topic(name: str, payload: bytes, kind: str, fragment: str) -> None:
    event = parse_raw("ecg/raw/strap-9", payload, limits=SMALL)
    assert isinstance(event, BadInput), event
    assert event.kind == kind
    assert fragment in event.detail
    assert "ecg/raw/strap-9" in event.detail
    assert event.device == "mqtt:strap-9"


def test_decode_raw_units_nulls_and_topics() -> None:
    event, session = decode_raw("ecg/raw/3/strap-9", b'{"v":1,"fs":130,"units":"uV","seq":7,"t0":1.5,"session":"a","samples":[1000,null,-2500,NaN,1e999]}')
    assert isinstance(event, Frame) and session == "a"
    assert event.device == "mqtt:3/strap-9" and event.seq == 7 and event.timestamp == 1.5 and event.fs == 130.0
    np.testing.assert_array_equal(event.samples, [1.0, np.nan, -2.5, np.nan, np.nan])
    assert event.samples.dtype == np.float64

    assert parse_raw("ecg/raw/strap-9", encode_end()) == SessionEnd("mqtt:strap-9", "end")
    for topic in ("ecg/other/strap-9", "ecg/raw/", "ecg/raw"):
        bad = parse_raw(topic, encode_end())
        assert isinstance(bad, BadInput) and bad.kind == "topic" and topic in bad.detail


def test_raw_streams_idle_and_capacity() -> None:
    streams = RawStreams(idle_timeout_s=30.0, max_devices=1)
    [frame] = streams.feed("ecg/raw/a", encode_raw(np.zeros(10), FS, 0), now=0.0)
    assert isinstance(frame, Frame)
    [full] = streams.feed("ecg/raw/b", encode_raw(np.zeros(10), FS, 0), now=1.0)
    assert isinstance(full, BadInput) and full.kind == "capacity"
    assert streams.expire(now=29.0) == []
    assert streams.expire(now=31.0) == [SessionEnd("mqtt:a", "idle")]
    assert streams.live == []


def test_anonymized_payload_encoding() -> None:
    frame = AnonFrame("p-1", 360.0, 720, np.array([0.123456, np.nan, -1.0, np.inf, 2e-5]), timestamp=1700000000.25)
    assert json.loads(encode_anon_frame(frame)) == {
        "v": 1, "fs": 360.0, "units": "mV", "seq": 720, "t0": 1700000000.25, "masked": True,
        "samples": [0.1235, None, -1.0, None, 0.0],
    }  # fmt: skip
    clean = json.loads(encode_anon_frame(AnonFrame("p-1", 360.0, 0, np.array([0.5]))))
    assert clean["masked"] is False and "t0" not in clean
    beats = [AnonBeat("p-1", 800, "N", 360.0, 1700000001.0), AnonBeat("p-1", 1100, "V", 360.0)]
    assert json.loads(encode_beats(beats)) == {
        "v": 1, "fs": 360.0, "beats": [{"sample": 800, "t": 1700000001.0, "class": "N"}, {"sample": 1100, "class": "V"}],
    }  # fmt: skip
    with pytest.raises(ValueError):
        encode_beats([beats[0], AnonBeat("p-2", 900, "N", 360.0)])
    for bad in ("", "a/b", "a+", "#", "x" * 65, "mqtt:strap"):
        with pytest.raises(ValueError):
            check_pseudonym(bad)
    assert anon_topic("p-1", "ecg") == "ecg/anon/p-1/ecg"


# ---------------------------------------------------------------------------------------------
# Source, against mosquitto


async def test_raw_round_trip(broker: BrokerConfig, prefix: str) -> None:
    raw = f"{prefix}/ecg/raw"
    source = MqttSource(broker, raw)
    mv = uv_signal(130)
    mv[5] = np.nan
    async with collecting(source) as events, broker.client("wearable") as pub:
        await pub.publish(raw_topic("strap-1", raw), encode_raw(mv, FS, 0, t0=1700000000.5), qos=1)
        await pub.publish(raw_topic("strap-2", raw), encode_raw(mv[:50], 250.0, 4, units="mV", session="s1"), qos=1)
        a, b = await take(events, 2)
    assert isinstance(a, Frame) and isinstance(b, Frame)
    assert (a.device, a.fs, a.seq, a.timestamp) == ("mqtt:strap-1", FS, 0, 1700000000.5)
    np.testing.assert_array_equal(a.samples, mv)  # NaN where the wearable sent null
    assert (b.device, b.fs, b.seq, b.timestamp) == ("mqtt:strap-2", 250.0, 4, None)
    np.testing.assert_array_equal(b.samples, mv[:50])


async def test_shard_subscriptions_keep_device_key(broker: BrokerConfig, prefix: str) -> None:
    raw = f"{prefix}/ecg/raw"
    source = MqttSource(broker, raw, subscriptions=shard_subscriptions([3], raw))
    async with collecting(source) as events, broker.client("wearable") as pub:
        await pub.publish(raw_topic("4/strap-x", raw), encode_raw(np.zeros(4), FS, 0), qos=1)  # not our shard
        await pub.publish(raw_topic("3/strap-y", raw), encode_raw(np.zeros(4), FS, 0), qos=1)
        [frame] = await take(events, 1)
    assert isinstance(frame, Frame) and frame.device == "mqtt:3/strap-y"
    with pytest.raises(ValueError):
        MqttSource(broker, raw, subscriptions=["elsewhere/#"])


async def test_bad_payloads_do_not_stop_the_stream(broker: BrokerConfig, prefix: str) -> None:
    raw = f"{prefix}/ecg/raw"
    source = MqttSource(broker, raw, limits=SMALL)
    topic = raw_topic("strap-9", raw)
    mv = uv_signal(10 * len(BAD_PAYLOADS))
    async with collecting(source) as events, broker.client("wearable") as pub:
        for i, (_, payload, _, _) in enumerate(BAD_PAYLOADS):
            await pub.publish(topic, payload, qos=1)
            await pub.publish(topic, encode_raw(mv[10 * i : 10 * i + 10], FS, 10 * i), qos=1)
        got = await take(events, 2 * len(BAD_PAYLOADS))
    for i, (name, _, kind, fragment) in enumerate(BAD_PAYLOADS):
        bad, frame = got[2 * i], got[2 * i + 1]
        assert isinstance(bad, BadInput) and bad.kind == kind and fragment in bad.detail and topic in bad.detail, name
        assert isinstance(frame, Frame) and frame.seq == 10 * i
    assert events.empty()
    np.testing.assert_array_equal(np.concatenate([f.samples for f in got[1::2]]), mv)


async def test_gaps_replays_and_session_ends(broker: BrokerConfig, prefix: str) -> None:
    raw = f"{prefix}/ecg/raw"
    source = MqttSource(broker, raw, max_gap_s=60.0)
    topic = raw_topic("strap-3", raw)
    z = np.zeros(10)
    big = 60 + 61 * 250
    steps = [
        (encode_raw(z, FS, 0), ["Frame 0"]),
        (encode_raw(z, FS, 10), ["Frame 10"]),
        (encode_raw(z, FS, 30), ["gap", "Frame 30"]),  # 10 samples missing: reported, passed on
        (encode_raw(z, FS, 20), ["order"]),  # behind: a duplicate or a replay, dropped
        (encode_raw(z, FS, 40, session="b"), ["end:new session", "Frame 40"]),
        (encode_raw(z, 250.0, 50, session="b"), ["end:sample rate changed from 130 to 250 Hz", "Frame 50"]),
        (encode_raw(z, 250.0, big, session="b"), ["gap", "end:gap", f"Frame {big}"]),  # > max_gap_s
        (encode_end("b"), ["end:end"]),
        (encode_end("b"), []),  # nothing left to end
        (encode_raw(z, FS, 5), ["Frame 5"]),  # a fresh session may start anywhere
    ]

    def label(e: SourceEvent) -> str:
        if isinstance(e, Frame):
            return f"Frame {e.seq}"
        if isinstance(e, SessionEnd):
            return f"end:{e.reason}"
        return e.kind

    async with collecting(source) as events, broker.client("wearable") as pub:
        for payload, _ in steps:
            await pub.publish(topic, payload, qos=1)
        expected = [x for _, labels in steps for x in labels]
        got = await take(events, len(expected))
        await asyncio.sleep(0.2)
    assert [label(e) for e in got] == expected
    assert events.empty()
    gap = got[2]
    assert isinstance(gap, BadInput) and "10 samples" in gap.detail and topic in gap.detail
    assert all(e.device == "mqtt:strap-3" for e in got)


async def test_idle_device_ends_its_session(broker: BrokerConfig, prefix: str) -> None:
    raw = f"{prefix}/ecg/raw"
    source = MqttSource(broker, raw, idle_timeout_s=0.4)
    async with collecting(source) as events, broker.client("wearable") as pub:
        await pub.publish(raw_topic("strap-4", raw), encode_raw(np.zeros(10), FS, 0), qos=1)
        frame, end = await take(events, 2, timeout=3)
    assert isinstance(frame, Frame) and end == SessionEnd("mqtt:strap-4", "idle")


async def test_source_reconnects_and_keeps_sessions(broker: BrokerConfig, prefix: str) -> None:
    raw = f"{prefix}/ecg/raw"
    source = MqttSource(broker, raw, reconnect_min_s=0.1)
    topic = raw_topic("strap-5", raw)
    async with collecting(source) as events, broker.client("wearable") as pub:
        await pub.publish(topic, encode_raw(np.zeros(10), FS, 0), qos=1)
        await take(events, 1)
        assert source.client is not None
        source.client._client.socket().shutdown(socket.SHUT_RDWR)  # the broker vanishes under us
        async with asyncio.timeout(5):
            while source.ready.is_set():
                await asyncio.sleep(0.01)
            await source.ready.wait()
        assert source.reconnects == 1
        await pub.publish(topic, encode_raw(np.zeros(10), FS, 10), qos=1)  # same session, no gap
        await pub.publish(topic, encode_raw(np.zeros(10), FS, 30), qos=1)
        got = await take(events, 3)
    assert [type(e).__name__ for e in got] == ["Frame", "BadInput", "Frame"]
    assert got[1].kind == "gap"


async def test_publish_record_paces_and_round_trips(broker: BrokerConfig, prefix: str) -> None:
    raw = f"{prefix}/ecg/raw"
    source = MqttSource(broker, raw)
    mv = uv_signal(130, seed=3)  # 1 s
    async with collecting(source) as events:
        began = time.monotonic()
        sent = await publish_record(broker, "strap-6", mv, FS, frame_s=0.25, realtime=4.0, topic_prefix=raw, t0=1700000000.0)
        elapsed = time.monotonic() - began
        got = await take(events, sent + 1)
    assert sent == 5  # 32-sample frames, the last one short
    assert 0.2 < elapsed < 2.0  # 1 s of signal at 4x
    frames = got[:-1]
    assert all(isinstance(f, Frame) for f in frames) and got[-1] == SessionEnd("mqtt:strap-6", "end")
    assert [f.seq for f in frames] == [0, 32, 64, 96, 128]
    assert frames[1].timestamp == pytest.approx(1700000000.0 + 32 / FS)
    np.testing.assert_array_equal(np.concatenate([f.samples for f in frames]), mv)


# ---------------------------------------------------------------------------------------------
# Sink, against mosquitto


async def test_sink_publishes_documented_payloads(broker: BrokerConfig, prefix: str) -> None:
    anon, edge = f"{prefix}/ecg/anon", f"{prefix}/ecg/edge"
    info = SessionInfo("p-3f2a", FS, models={"generator": "gen-1", "classifier": "cls-1"}, started=1700000000.0)
    samples = np.array([0.1, np.nan, -0.123456, 1.0])
    async with broker.client("subscriber") as sub:
        await sub.subscribe(f"{prefix}/#", qos=1)
        async with MqttSink(broker, anon, edge_id="gw-1", status_prefix=edge) as sink:
            await sink.session_started(info)
            await sink.emit(
                [AnonFrame("p-3f2a", FS, 260, samples, timestamp=1700000002.0)],
                [AnonBeat("p-3f2a", 261, "N", FS, 1700000002.0077), AnonBeat("p-3f2a", 263, "V", FS)],
            )
            await sink.session_ended(info)
            assert (sink.stats.frames, sink.stats.beats, sink.stats.failed, sink.stats.dropped) == (1, 2, 0, 0)
        got = await messages_until(sub, lambda t, p: t.endswith("gw-1/status") and p["state"] == "offline")
    by_topic = {}
    for topic, payload, _ in got:
        by_topic.setdefault(topic, []).append(payload)
    assert by_topic[f"{edge}/gw-1/status"] == [
        {"v": 1, "state": "online", "started": pytest.approx(time.time(), abs=30)},
        {"v": 1, "state": "offline", "started": pytest.approx(time.time(), abs=30)},
    ]
    status = {"v": 1, "fs": FS, "models": {"generator": "gen-1", "classifier": "cls-1"}, "started": 1700000000.0}
    assert by_topic[f"{anon}/p-3f2a/status"] == [{**status, "state": "online"}, {**status, "state": "ended"}]
    assert by_topic[f"{anon}/p-3f2a/ecg"] == [
        {"v": 1, "fs": FS, "units": "mV", "seq": 260, "t0": 1700000002.0, "masked": True, "samples": [0.1, None, -0.1235, 1.0]}
    ]
    assert by_topic[f"{anon}/p-3f2a/beats"] == [
        {"v": 1, "fs": FS, "beats": [{"sample": 261, "t": 1700000002.0077, "class": "N"}, {"sample": 263, "class": "V"}]}
    ]

    # Statuses are retained: a subscriber arriving later learns the last state of each.
    async with broker.client("late") as late:
        await late.subscribe([(f"{anon}/+/status", 1), (f"{edge}/+/status", 1)])
        retained = await next_messages(late, 2)
    assert {(t, p["state"], r) for t, p, r in retained} == {
        (f"{anon}/p-3f2a/status", "ended", True),
        (f"{edge}/gw-1/status", "offline", True),
    }


async def test_last_will_and_sink_reconnect(broker: BrokerConfig, prefix: str) -> None:
    anon, edge = f"{prefix}/ecg/anon", f"{prefix}/ecg/edge"
    edge_topic = f"{edge}/gw-2/status"
    frame = AnonFrame("p-9", FS, 0, np.zeros(13))
    async with broker.client("watcher") as watch:
        await watch.subscribe(edge_topic, qos=1)
        sink = MqttSink(broker, anon, edge_id="gw-2", status_prefix=edge, reconnect_min_s=1.0)
        await sink.start()
        try:
            [(_, online, _)] = await next_messages(watch, 1)
            assert online["state"] == "online"
            # The edge dies without a DISCONNECT: the broker publishes its will.
            sink.client._client.socket().shutdown(socket.SHUT_RDWR)
            [(_, will, _)] = await next_messages(watch, 1)
            assert will["state"] == "offline"
            async with broker.client("late") as late:  # retained, for whoever looks next
                await late.subscribe(edge_topic, qos=1)
                [(_, retained, flag)] = await next_messages(late, 1)
            assert retained["state"] == "offline" and flag
            async with asyncio.timeout(5):
                while sink.connected:
                    await asyncio.sleep(0.01)
            await sink.emit([frame], [])  # nowhere to go: dropped and counted
            assert sink.stats.dropped == 1
            [(_, back, _)] = await next_messages(watch, 1)  # it reconnects by itself
            assert back["state"] == "online" and sink.connected and sink.stats.connects == 2
            await sink.emit([frame], [])
            assert sink.stats.frames == 1
        finally:
            await sink.aclose()
        [(_, bye, _)] = await next_messages(watch, 1)
        assert bye["state"] == "offline"


async def test_sink_start_fails_clearly_without_broker() -> None:
    sink = MqttSink(BrokerConfig(port=free_port()), connect_timeout_s=0.5)
    with pytest.raises(ConnectionError, match="cannot reach broker"):
        await sink.start()


async def test_no_device_key_leaves_the_edge(broker: BrokerConfig, prefix: str) -> None:
    """Raw in, a stand-in pipeline, anonymized out: the device key appears in no topic or payload."""
    raw, anon, edge = f"{prefix}/ecg/raw", f"{prefix}/ecg/anon", f"{prefix}/ecg/edge"
    device = "strap-C0FFEE42"
    source = MqttSource(broker, raw)
    sessions: dict[str, SessionInfo] = {}
    async with broker.client("subscriber") as sub, MqttSink(broker, anon, edge_id="gw-3", status_prefix=edge) as sink:
        await sub.subscribe([(f"{anon}/#", 1), (f"{edge}/#", 1)])
        async with collecting(source) as events:
            await publish_record(broker, device, uv_signal(390), FS, frame_s=1.0, realtime=False, topic_prefix=raw, session="C0FFEE42-1")
            while True:
                [event] = await take(events, 1)
                if isinstance(event, Frame):
                    if event.device not in sessions:
                        sessions[event.device] = SessionInfo(f"p-{uuid.uuid4().hex[:12]}", event.fs, started=time.time())
                        await sink.session_started(sessions[event.device])
                    p = sessions[event.device].pseudonym
                    synthetic = np.where(np.isnan(event.samples), np.nan, 0.05)
                    await sink.emit([AnonFrame(p, event.fs, event.seq, synthetic)], [AnonBeat(p, event.seq + 40, "N", event.fs)])
                elif isinstance(event, SessionEnd):
                    await sink.session_ended(sessions.pop(event.device))
                    break
        got = await messages_until(sub, lambda t, p: t.endswith("/status") and p["state"] == "ended")
    assert sum(t.endswith("/ecg") for t, _, _ in got) == 3
    for topic, payload, _ in got:
        text = topic + json.dumps(payload)
        assert "C0FFEE" not in text and "strap" not in text and "mqtt:" not in text, text


# ---------------------------------------------------------------------------------------------
# Embedded broker (ecg-edge demo)


async def test_embedded_broker_carries_mqtt(prefix: str) -> None:
    async with EmbeddedBroker() as embedded:
        config = embedded.config
        async with config.client("sub") as sub, config.client("pub") as pub:
            await sub.subscribe(f"{prefix}/hello", qos=1)
            await pub.publish(f"{prefix}/hello", b'{"v":1}', qos=1)
            [(topic, payload, _)] = await next_messages(sub, 1)
        assert (topic, payload) == (f"{prefix}/hello", {"v": 1})

        raw = f"{prefix}/ecg/raw"
        source = MqttSource(config, raw)
        async with collecting(source) as events:
            await publish_record(config, "strap-7", uv_signal(65), FS, frame_s=0.25, realtime=False, topic_prefix=raw)
            got = await take(events, 4)
        assert [type(e).__name__ for e in got] == ["Frame", "Frame", "Frame", "SessionEnd"]
    with pytest.raises(RuntimeError):
        _ = embedded.config
