"""The Polar H10 source against a software strap speaking PMD through bleak, carrying real ECG."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from pathlib import Path

import numpy as np
import pytest
import wfdb
from bleak import BleakClient
from bleak.exc import BleakError
from fake_polar import (
    FRAME_SAMPLES,
    PMD_CONTROL,
    PMD_DATA,
    START_UNIX,
    FakePolarH10,
    Script,
    ecg_notification,
    fake_scanner,
)
from scipy.signal import resample_poly

from edge.ble import (
    Backoff,
    PolarH10Source,
    parse_control_response,
    parse_ecg_notification,
    parse_settings,
    polar_ns_to_unix,
)
from edge.frames import BadInput, Frame, SessionEnd, SourceEvent

DATA = Path(__file__).parent / "data"
SETTINGS_REQUEST = bytes([0x01, 0x00])
START_REQUEST = bytes([0x02, 0x00, 0x00, 0x01, 0x82, 0x00, 0x01, 0x01, 0x0E, 0x00])
STOP_REQUEST = bytes([0x03, 0x00])
FAST = Backoff(initial=0.001, maximum=0.005)


@pytest.fixture(scope="module")
def ecg_130() -> np.ndarray:
    """MIT-BIH 100, channel 0, in mV, resampled 360 -> 130 Hz: what the strap's electrodes carry."""
    return resample_poly(wfdb.rdrecord(str(DATA / "100"), channels=[0]).p_signal[:, 0], 13, 36)


def source_for(strap: FakePolarH10, **kwargs: object) -> PolarH10Source:
    kwargs.setdefault("backoff", FAST)
    return PolarH10Source(strap.address, backend=strap.backend(), **kwargs)  # type: ignore[arg-type]


async def collect(source: PolarH10Source, frames: int, timeout: float = 5.0) -> list[SourceEvent]:
    """Events until ``frames`` frames have come, then close the stream (stop + disconnect)."""
    events: list[SourceEvent] = []
    async with asyncio.timeout(timeout):
        async with contextlib.aclosing(source.events()) as stream:
            async for event in stream:
                events.append(event)
                if sum(isinstance(e, Frame) for e in events) >= frames:
                    break
    return events


def frames_of(events: list[SourceEvent]) -> list[Frame]:
    return [e for e in events if isinstance(e, Frame)]


def assert_is_slice(frame: Frame, ecg_130: np.ndarray, first_sample: int) -> None:
    """The frame holds the resampled ECG from ``first_sample`` on, to microvolt rounding."""
    expected = ecg_130[first_sample : first_sample + FRAME_SAMPLES]
    assert frame.samples.dtype == np.float64 and frame.samples.shape == (FRAME_SAMPLES,)
    assert np.abs(frame.samples - expected).max() <= 0.0005 + 1e-12
    np.testing.assert_array_equal(frame.samples, np.round(expected * 1000) / 1000)


def sample_time(index: int) -> float:
    return START_UNIX + index / 130


# --- streaming real ECG -------------------------------------------------------------------------


async def test_frames_carry_the_real_ecg_in_mv_with_sensor_time(ecg_130: np.ndarray) -> None:
    strap = FakePolarH10()
    events = await collect(source_for(strap), 6)

    assert events == frames_of(events), "a clean stream has nothing but frames"
    for k, frame in enumerate(events):
        assert isinstance(frame, Frame)
        assert frame.device == f"ble:{strap.address}"
        assert frame.fs == 130.0
        assert frame.seq == k * FRAME_SAMPLES
        assert_is_slice(frame, ecg_130, k * FRAME_SAMPLES)
        # the notification stamps its LAST sample; the frame carries the time of its first
        assert strap.sent[k].timestamp_ns == strap.sample_time_ns(frame.seq + FRAME_SAMPLES - 1)
        assert frame.timestamp == pytest.approx(sample_time(frame.seq), abs=1e-6)
    # about 2 mV of QRS amplitude at most in record 100: really mV, not uV or V
    assert 0.5 < max(np.ptp(f.samples) for f in frames_of(events)) < 5


async def test_control_point_bytes_are_the_documented_ones() -> None:
    strap = FakePolarH10()
    await collect(source_for(strap), 1)

    assert strap.writes[0] == SETTINGS_REQUEST
    assert strap.writes[1] == START_REQUEST
    # closing the stream stops the measurement, then disconnects
    assert strap.writes[-1] == STOP_REQUEST and len(strap.writes) == 3
    assert strap.client is not None and not strap.client.is_connected
    assert not strap.streaming


async def test_fake_strap_answers_like_an_h10() -> None:
    """Requests the source never sends, straight through bleak: the strap's answers are the PMD ones."""
    strap = FakePolarH10()
    replies: asyncio.Queue[bytes] = asyncio.Queue()
    async with BleakClient(strap.address, backend=strap.backend()) as client:
        with pytest.raises(BleakError, match="Improperly Configured"):  # indications off
            await client.write_gatt_char(PMD_CONTROL, SETTINGS_REQUEST, response=True)
        await client.start_notify(PMD_CONTROL, lambda _c, data: replies.put_nowait(bytes(data)))

        async def ask(request: bytes) -> bytes:
            await client.write_gatt_char(PMD_CONTROL, request, response=True)
            return await asyncio.wait_for(replies.get(), 1)

        settings = parse_control_response(await ask(SETTINGS_REQUEST))
        assert settings.ok and parse_settings(settings.params) == {0: [130], 1: [14]}
        at_250 = parse_control_response(
            await ask(bytes([0x02, 0x00, 0x00, 0x01, 0xFA, 0x00, 0x01, 0x01, 0x0E, 0x00]))
        )
        assert (at_250.op, at_250.status, at_250.message) == (0x02, 8, "invalid sample rate")
        at_16_bit = parse_control_response(
            await ask(bytes([0x02, 0x00, 0x00, 0x01, 0x82, 0x00, 0x01, 0x01, 0x10, 0x00]))
        )
        assert (at_16_bit.status, at_16_bit.message) == (7, "invalid resolution")
        assert parse_control_response(await ask(bytes([0x07, 0x00]))).message == "invalid op code"
        assert parse_control_response(await ask(bytes([0x01, 0x05]))).message == "invalid measurement type"
        assert parse_control_response(await ask(START_REQUEST[:7])).message == "invalid length"
        assert parse_control_response(await ask(STOP_REQUEST)).message == "already in state"
        assert await client.read_gatt_char(PMD_CONTROL) == bytearray([0x0F, 0x05, 0x00])
        assert not strap.streaming


# --- what the pipeline must not trust -----------------------------------------------------------


async def test_refused_start_gives_bad_input_then_a_retry_that_streams(ecg_130: np.ndarray) -> None:
    strap = FakePolarH10(scripts=[Script(refuse_start=13)])
    stamps: list[float] = []
    source = source_for(strap, backoff=Backoff(initial=0.05, maximum=0.05))
    events: list[SourceEvent] = []
    async with asyncio.timeout(5), contextlib.aclosing(source.events()) as stream:
        async for event in stream:
            events.append(event)
            stamps.append(time.monotonic())
            if isinstance(event, Frame):
                break

    refused, frame = events
    assert isinstance(refused, BadInput) and refused.kind == "pmd"
    assert refused.device == f"ble:{strap.address}"
    assert "device in charger" in refused.detail and "status 13" in refused.detail
    assert isinstance(frame, Frame) and frame.seq == 0
    assert stamps[1] - stamps[0] >= 0.05 * 0.9, "the retry waits out the back-off"
    assert strap.connections == 2 and strap.writes.count(START_REQUEST) == 2


async def test_garbage_and_wrong_type_notifications_are_reported_and_the_stream_goes_on(
    ecg_130: np.ndarray,
) -> None:
    acc = bytes([0x02]) + (123).to_bytes(8, "little") + bytes([0x01]) + bytes(6 * 36)
    compressed = ecg_notification(456, np.zeros(10, dtype=np.int32), frame_type=0x80)
    strap = FakePolarH10(
        scripts=[Script(garbage={1: b"\x00\x01\x02\x03", 2: acc, 3: b"", 4: compressed, 5: bytes(11)})]
    )
    events = await collect(source_for(strap), 6)

    bad = [e for e in events if isinstance(e, BadInput)]
    assert [b.kind for b in bad] == ["garbage", "type", "garbage", "garbage", "garbage"]
    assert all(b.device == f"ble:{strap.address}" for b in bad)
    assert "4 bytes" in bad[0].detail
    assert "measurement type 2" in bad[1].detail
    assert "empty" in bad[2].detail
    assert "0x80" in bad[3].detail
    assert "11 bytes" in bad[4].detail
    # every good frame still arrives, in order, on an unbroken sample count
    frames = frames_of(events)
    assert [f.seq for f in frames] == [k * FRAME_SAMPLES for k in range(6)]
    for f in frames:
        assert_is_slice(f, ecg_130, f.seq)
    assert isinstance(events[0], Frame) and isinstance(events[1], BadInput)


async def test_lost_frame_gives_a_gap_and_the_count_keeps_the_sensor_clock(ecg_130: np.ndarray) -> None:
    strap = FakePolarH10(scripts=[Script(drop={2})])
    events = await collect(source_for(strap), 4)

    kinds = [type(e).__name__ if not isinstance(e, BadInput) else e.kind for e in events]
    assert kinds == ["Frame", "Frame", "gap", "Frame", "Frame"]
    gap = events[2]
    assert isinstance(gap, BadInput) and gap.device == f"ble:{strap.address}"
    assert "73 samples missing" in gap.detail
    after = events[3]
    assert isinstance(after, Frame)
    assert after.seq == 3 * FRAME_SAMPLES  # the lost 73 samples are skipped, not renumbered
    assert_is_slice(after, ecg_130, 3 * FRAME_SAMPLES)
    assert after.timestamp == pytest.approx(sample_time(after.seq), abs=1e-6)


async def test_strap_without_ecg_is_reported_and_max_attempts_ends_the_stream() -> None:
    strap = FakePolarH10(features=bytes([0x0F, 0x04, 0x00]))  # ACC only
    async with asyncio.timeout(5):
        events = [e async for e in source_for(strap, max_attempts=2)]
    assert len(events) == 2
    assert all(isinstance(e, BadInput) and e.kind == "pmd" and "no ECG" in e.detail for e in events)
    assert strap.writes == [] and strap.client is not None and not strap.client.is_connected


# --- connection life ----------------------------------------------------------------------------


async def test_disconnect_ends_the_session_and_a_reconnect_starts_a_new_one(ecg_130: np.ndarray) -> None:
    strap = FakePolarH10(scripts=[Script(disconnect_after=3)])
    source = source_for(strap, backoff=Backoff(initial=0.05, maximum=1.0))
    events: list[SourceEvent] = []
    ended_at = resumed_at = 0.0
    async with asyncio.timeout(5), contextlib.aclosing(source.events()) as stream:
        async for event in stream:
            events.append(event)
            if isinstance(event, SessionEnd):
                ended_at = time.monotonic()
            if isinstance(event, Frame) and ended_at and not resumed_at:
                resumed_at = time.monotonic()
            if len(frames_of(events)) == 5:
                break

    device = f"ble:{strap.address}"
    assert events[3] == SessionEnd(device, "disconnected")
    first, second = events[:3], events[4:]
    assert [f.seq for f in first] == [0, 73, 146]  # type: ignore[union-attr]
    assert [f.seq for f in second] == [0, 73]  # type: ignore[union-attr]
    # the new session carries on with the ECG the strap measures now
    resumed = strap.sent[3]
    assert resumed.connection == 1
    assert_is_slice(second[0], ecg_130, resumed.first_sample)  # type: ignore[arg-type]
    assert second[0].timestamp == pytest.approx(sample_time(resumed.first_sample), abs=1e-6)  # type: ignore[union-attr]
    assert resumed_at - ended_at >= 0.05 * 0.9
    assert strap.connections == 2


async def test_failed_connects_back_off_exponentially(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "edge.ble")
    strap = FakePolarH10(fail_connects=3)
    source = source_for(strap, backoff=Backoff(initial=0.02, factor=2.0, maximum=0.05))
    t0 = time.monotonic()
    events = await collect(source, 1)
    elapsed = time.monotonic() - t0

    assert frames_of(events) == events and len(events) == 1
    assert strap.connect_attempts == 4
    assert elapsed >= (0.02 + 0.04 + 0.05) * 0.9  # 0.02, then doubled, then capped
    # bleak's error text names the strap's address; the log lines do not
    assert sum("connection or ECG start failed" in r.getMessage() for r in caplog.records) == 3
    assert not any(strap.address in r.getMessage() for r in caplog.records)


def test_backoff_policy() -> None:
    b = Backoff(initial=1.0, factor=2.0, maximum=10.0)
    assert [b.delay(k) for k in range(6)] == [1, 2, 4, 8, 10, 10]
    assert b.delay(10_000) == 10
    jittered = Backoff(initial=1.0, factor=2.0, maximum=10.0, jitter=0.25)
    rng = random.Random(7)
    delays = [jittered.delay(2, rng) for _ in range(200)]
    assert 3.0 <= min(delays) < 3.3 and 4.7 < max(delays) <= 5.0
    with pytest.raises(ValueError):
        Backoff(initial=5, maximum=1)


async def test_cancelling_the_consumer_stops_the_stream_and_disconnects() -> None:
    strap = FakePolarH10()
    got: list[SourceEvent] = []
    three = asyncio.Event()

    async def consume() -> None:
        async for event in source_for(strap):
            got.append(event)
            if len(got) == 3:
                three.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(three.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert strap.writes[-1] == STOP_REQUEST
    assert strap.client is not None and not strap.client.is_connected
    assert not strap.streaming
    sent = len(strap.sent)
    await asyncio.sleep(0.02)
    assert len(strap.sent) == sent, "nothing streams after the cancel"


# --- discovery ----------------------------------------------------------------------------------


async def test_discovery_finds_the_strap_by_name_among_other_devices() -> None:
    strap = FakePolarH10(address="C4:7F:51:00:AB:CD", name="Polar H10 9F8E7D6C")
    scanner = strap.scanner(("11:22:33:44:55:66", "Forerunner 265"), ("22:33:44:55:66:77", None))
    source = PolarH10Source(backend=strap.backend(), scanner_backend=scanner, scan_timeout=1.0, backoff=FAST)
    events = await collect(source, 1)
    assert [e.device for e in events] == ["ble:C4:7F:51:00:AB:CD"]


async def test_discovery_by_address_and_nothing_found() -> None:
    strap = FakePolarH10()
    others = fake_scanner([("11:22:33:44:55:66", "Polar OH1 1234")])
    # an address pins the strap even when another Polar advertises first
    scanner = strap.scanner(("C4:7F:51:00:00:01", "Polar H10 11111111"))
    pinned = PolarH10Source(strap.address, backend=strap.backend(), scanner_backend=scanner, backoff=FAST)
    assert [e.device for e in await collect(pinned, 1)] == [f"ble:{strap.address}"]

    lost = PolarH10Source(
        backend=strap.backend(), scanner_backend=others, scan_timeout=0.05, backoff=FAST, max_attempts=2
    )
    async with asyncio.timeout(5):
        assert [e async for e in lost] == []
    assert strap.connect_attempts == 1  # only the pinned source connected


# --- the byte layouts ---------------------------------------------------------------------------


def test_ecg_notification_layout() -> None:
    uv = np.array([0, 1, -1, 1234, -8_388_608, 8_388_607], dtype=np.int32)
    data = ecg_notification(599_616_023_171_427_290, uv)
    assert len(data) == 10 + 3 * len(uv)
    packet = parse_ecg_notification(data)
    np.testing.assert_array_equal(packet.microvolts, uv)
    assert packet.timestamp_ns == 599_616_023_171_427_290
    # the H10's default clock, 2019-01-01T00:00:00Z, in the Polar epoch (Polar's time system note)
    assert polar_ns_to_unix(599_616_000_000_000_000) == 1_546_300_800.0
    assert data[10:13] == b"\x00\x00\x00" and data[16:19] == b"\xff\xff\xff"


def test_pmd_uuids_are_polars() -> None:
    from edge import ble

    assert (ble.PMD_CONTROL, ble.PMD_DATA) == (PMD_CONTROL, PMD_DATA)
    assert ble.PMD_SERVICE == "fb005c80-02e7-f387-1cad-8acd2d8df0c8"


async def test_a_quiet_strap_ends_the_session_and_is_reconnected() -> None:
    strap = FakePolarH10(scripts=[Script(stall_after=2)])
    events = await collect(source_for(strap, stall_timeout=0.1), 3)

    device = f"ble:{strap.address}"
    kinds = [type(e).__name__ if not isinstance(e, BadInput) else e.kind for e in events]
    assert kinds == ["Frame", "Frame", "stall", "SessionEnd", "Frame"]
    assert events[3] == SessionEnd(device, "stalled")
    assert [f.seq for f in frames_of(events)] == [0, 73, 0]
    assert strap.connections == 2
    assert strap.writes[:4] == [SETTINGS_REQUEST, START_REQUEST, STOP_REQUEST, SETTINGS_REQUEST]


async def test_a_strap_still_streaming_from_an_old_link_is_restarted() -> None:
    strap = FakePolarH10(scripts=[Script(streaming_on_connect=True)])
    events = await collect(source_for(strap), 2)

    assert [type(e) for e in events] == [Frame, Frame] and [e.seq for e in events] == [0, 73]  # type: ignore[union-attr]
    assert strap.writes[:4] == [SETTINGS_REQUEST, START_REQUEST, STOP_REQUEST, START_REQUEST]
    assert strap.connections == 1
