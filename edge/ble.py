"""Live ECG from Polar H10 chest straps over Bluetooth LE (Polar Measurement Data service).

The Polar H10 is the chest strap the gateway reads (DESIGN.md, BLE row): it streams single-lead
ECG at 130 Hz in microvolts over Polar's PMD service. This module speaks that protocol with bleak, turns each
data notification into a :class:`~edge.frames.Frame` in millivolts with its sensor time, and keeps
the strap streaming across radio drop-outs by reconnecting with exponential back-off. What the
pipeline must not trust (garbage notifications, timestamp gaps, a strap that refuses to start)
comes out as :class:`~edge.frames.BadInput`, never as an exception that stops other streams.

Protocol summary (docs/ble.md has the detail and the sources):

* service ``FB005C80-...``, control point ``FB005C81-...`` (write, indicate; read = features),
  data ``FB005C82-...`` (notify);
* ``[0x01, 0x00]`` asks for the ECG settings, ``[0x02, 0x00, <settings>]`` starts ECG,
  ``[0x03, 0x00]`` stops it; the strap answers on the control point with
  ``[0xF0, op, type, status, more, params...]``;
* a data notification is ``type (0x00 = ECG) | uint64 LE ns timestamp of the LAST sample, Polar
  epoch 2000-01-01 | frame type (0x00) | n x int24 LE microvolts``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edge.frames import BadInput, Frame, SessionEnd, SourceEvent

if TYPE_CHECKING:  # bleak is the optional ``ble`` extra: imported where used
    from bleak.backends.client import BaseBleakClient
    from bleak.backends.device import BLEDevice
    from bleak.backends.scanner import BaseBleakScanner

log = logging.getLogger(__name__)

PMD_SERVICE = "fb005c80-02e7-f387-1cad-8acd2d8df0c8"
PMD_CONTROL = "fb005c81-02e7-f387-1cad-8acd2d8df0c8"
PMD_DATA = "fb005c82-02e7-f387-1cad-8acd2d8df0c8"

#: Op codes written to the control point.
OP_GET_SETTINGS = 0x01
OP_START = 0x02
OP_STOP = 0x03
#: First byte of every control point indication (a response to a write).
CONTROL_RESPONSE = 0xF0
#: First byte of a control point read (the feature bitmap follows; bit n = measurement type n).
CONTROL_FEATURES = 0x0F

#: PMD measurement type of ECG.
MEASUREMENT_ECG = 0x00
#: ECG frame type 0: uncompressed 3-byte signed little-endian microvolt samples.
FRAME_ECG_INT24 = 0x00
#: Bytes before the samples of a data notification.
DATA_HEADER = 10

#: PMD setting types and the width of each value (Polar SDK ``PmdSetting``).
SETTING_SAMPLE_RATE = 0x00
SETTING_RESOLUTION = 0x01
SETTING_WIDTH = {0x00: 2, 0x01: 2, 0x02: 2, 0x03: 4, 0x04: 1, 0x05: 4}
SETTING_NAMES = {
    0x00: "sample rate",
    0x01: "resolution",
    0x02: "range",
    0x03: "range (milliunit)",
    0x04: "channels",
    0x05: "factor",
}

#: The only ECG settings an H10 offers: 130 Hz, 14 bit.
H10_ECG_RATE = 130
H10_ECG_RESOLUTION = 14

#: Control point status codes (Polar SDK ``PmdControlPointResponseCode``).
PMD_ERRORS: dict[int, str] = {
    0: "success",
    1: "invalid op code",
    2: "invalid measurement type",
    3: "not supported",
    4: "invalid length",
    5: "invalid parameter",
    6: "already in state",
    7: "invalid resolution",
    8: "invalid sample rate",
    9: "invalid range",
    10: "invalid MTU",
    11: "invalid number of channels",
    12: "invalid state",
    13: "device in charger",
    14: "disk full",
}

#: Seconds from the Unix epoch to the Polar sensor epoch, 2000-01-01T00:00:00Z.
POLAR_EPOCH_UNIX_S = 946_684_800
_POLAR_EPOCH_UNIX_NS = POLAR_EPOCH_UNIX_S * 1_000_000_000


def polar_ns_to_unix(ns: int) -> float:
    """Sensor time (ns since 2000-01-01) -> Unix seconds."""
    return (ns + _POLAR_EPOCH_UNIX_NS) / 1e9


# --- control point ------------------------------------------------------------------------------


def settings_request(measurement: int = MEASUREMENT_ECG) -> bytes:
    """Control point write that asks for the settings a measurement offers."""
    return bytes([OP_GET_SETTINGS, measurement])


def start_request(
    sample_rate: int = H10_ECG_RATE, resolution: int = H10_ECG_RESOLUTION, measurement: int = MEASUREMENT_ECG
) -> bytes:
    """Control point write that starts a measurement: each setting is ``type, count=1, uint16 LE``."""
    return (
        bytes([OP_START, measurement, SETTING_SAMPLE_RATE, 1])
        + sample_rate.to_bytes(2, "little")
        + bytes([SETTING_RESOLUTION, 1])
        + resolution.to_bytes(2, "little")
    )


def stop_request(measurement: int = MEASUREMENT_ECG) -> bytes:
    """Control point write that stops a measurement."""
    return bytes([OP_STOP, measurement])


class PmdError(Exception):
    """The strap answered a control point request with an error status (or not at all)."""

    def __init__(self, op: int, status: int, message: str | None = None) -> None:
        self.op = op
        self.status = status
        text = message or f"{PMD_ERRORS.get(status, 'unknown error')} (status {status})"
        super().__init__(f"PMD {_OP_NAMES.get(op, f'op 0x{op:02x}')} refused: {text}")


_OP_NAMES = {OP_GET_SETTINGS: "get settings", OP_START: "start", OP_STOP: "stop"}


@dataclass(frozen=True)
class ControlResponse:
    """One control point indication: ``[0xF0, op, measurement, status, more, params...]``."""

    op: int
    measurement: int
    status: int
    more: bool = False
    params: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def message(self) -> str:
        return PMD_ERRORS.get(self.status, "unknown error")


def parse_control_response(data: bytes | bytearray) -> ControlResponse:
    """Parse a control point indication; ``ValueError`` if it is not one."""
    if len(data) < 4 or data[0] != CONTROL_RESPONSE:
        raise ValueError(f"not a PMD control point response: {bytes(data[:8]).hex(' ')}")
    status = data[3]
    if status != 0:  # errors carry no "more" byte or parameters worth reading
        return ControlResponse(data[1], data[2], status)
    return ControlResponse(data[1], data[2], 0, len(data) > 4 and data[4] != 0, bytes(data[5:]))


def parse_settings(params: bytes) -> dict[int, list[int]]:
    """Decode a settings list: repeated ``type, count, count x value`` (value width by type)."""
    settings: dict[int, list[int]] = {}
    i = 0
    while i + 2 <= len(params):
        kind, count = params[i], params[i + 1]
        width = SETTING_WIDTH.get(kind)
        if width is None:
            log.debug("unknown PMD setting type 0x%02x; ignoring the rest", kind)
            break
        i += 2
        end = i + count * width
        if end > len(params):
            raise ValueError(f"PMD settings truncated at setting type 0x{kind:02x}")
        settings[kind] = [int.from_bytes(params[j : j + width], "little") for j in range(i, end, width)]
        i = end
    return settings


# --- data notifications -------------------------------------------------------------------------


class PmdFrameError(ValueError):
    """A data notification that is not a usable ECG frame; ``kind`` labels the counter."""

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        super().__init__(detail)


@dataclass(frozen=True)
class EcgPacket:
    """One decoded ECG data notification."""

    timestamp_ns: int  # sensor time of the LAST sample, ns since 2000-01-01
    microvolts: np.ndarray  # int32 (n,)


def parse_ecg_notification(data: bytes | bytearray) -> EcgPacket:
    """Decode an ECG data notification; :class:`PmdFrameError` says what is wrong with a bad one."""
    n = len(data)
    if n == 0:
        raise PmdFrameError("garbage", "empty PMD data notification")
    if data[0] != MEASUREMENT_ECG:
        raise PmdFrameError("type", f"PMD data notification of measurement type {data[0]}, expected 0 (ECG)")
    if n < DATA_HEADER:
        raise PmdFrameError("garbage", f"PMD data notification of {n} bytes, shorter than its 10-byte header")
    if data[9] != FRAME_ECG_INT24:
        kind = "compressed" if data[9] & 0x80 else "unknown"
        raise PmdFrameError("garbage", f"ECG frame type 0x{data[9]:02x} ({kind}) not handled, expected 0x00")
    if (n - DATA_HEADER) % 3 or n == DATA_HEADER:
        raise PmdFrameError("garbage", f"ECG notification of {n} bytes; expected 10 + 3k bytes with k >= 1")
    raw = np.frombuffer(bytes(data[DATA_HEADER:]), dtype=np.uint8).reshape(-1, 3).astype(np.int32)
    uv = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
    uv = np.where(uv & 0x800000, uv - (1 << 24), uv).astype(np.int32)
    return EcgPacket(int.from_bytes(data[1:9], "little"), uv)


# --- reconnect policy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off between connection attempts.

    Attempt ``k`` (0 after a session that streamed, counting up while attempts fail) waits
    ``min(maximum, initial * factor**k)``, spread by ``+-jitter`` (a fraction) when jitter is set,
    so that several straps dropped by one gateway do not all come back at the same instant.
    """

    initial: float = 1.0
    maximum: float = 60.0
    factor: float = 2.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.initial < 0 or self.maximum < self.initial or self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(f"bad back-off policy: {self}")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        base = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        if self.jitter:
            base *= 1 + (rng or random).uniform(-self.jitter, self.jitter)
        return min(self.maximum, max(0.0, base))


# --- the source ---------------------------------------------------------------------------------


def is_polar_h10(name: str | None, prefix: str = "Polar H10") -> bool:
    """Whether an advertised name belongs to an H10 (``"Polar H10 1A2B3C4D"``)."""
    return name is not None and name.startswith(prefix)


@dataclass
class _Link:
    """What the bleak callbacks of one connection hand to the source's generator."""

    max_pending: int
    inbox: collections.deque[bytes] = field(default_factory=collections.deque)
    responses: asyncio.Queue[ControlResponse | None] = field(default_factory=asyncio.Queue)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: bool = False
    stalled: bool = False
    overflow: int = 0

    def on_data(self, _char: Any, data: bytearray) -> None:
        if len(self.inbox) >= self.max_pending:
            self.overflow += 1
        else:
            self.inbox.append(bytes(data))
        self.wake.set()

    def on_control(self, _char: Any, data: bytearray) -> None:
        try:
            self.responses.put_nowait(parse_control_response(data))
        except ValueError as exc:
            log.warning("ignoring PMD control point indication: %s", exc)

    def on_disconnect(self, _client: Any) -> None:
        self.disconnected = True
        self.responses.put_nowait(None)
        self.wake.set()


class PolarH10Source:
    """Async iterator of :class:`Frame`, :class:`SessionEnd` and :class:`BadInput` from one H10.

    ``address`` pins a strap; without it the first advertiser whose name starts with
    ``name_prefix`` is used. ``backend`` and ``scanner_backend`` are handed to
    :class:`bleak.BleakClient` and :class:`bleak.BleakScanner` (``None``: the platform's own).
    The iterator runs until cancelled (or closed with ``aclose()``), reconnecting with
    ``backoff`` after every drop-out; ``max_attempts`` failed attempts in a row end it instead.
    Cancelling stops the ECG measurement and disconnects.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        name_prefix: str = "Polar H10",
        backend: type[BaseBleakClient] | None = None,
        scanner_backend: type[BaseBleakScanner] | None = None,
        scan_timeout: float = 10.0,
        connect_timeout: float = 30.0,
        response_timeout: float = 10.0,
        backoff: Backoff = Backoff(),
        max_attempts: int | None = None,
        gap_tolerance: float = 1.5,
        stall_timeout: float | None = 5.0,
        max_pending: int = 512,
        rng: random.Random | None = None,
        label: str = "Polar H10",
    ) -> None:
        if address is None and not name_prefix:
            raise ValueError("give the strap's address or a name prefix to scan for")
        self.address = address
        self.name_prefix = name_prefix
        self.backend = backend
        self.scanner_backend = scanner_backend
        self.scan_timeout = scan_timeout
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.backoff = backoff
        self.max_attempts = max_attempts
        self.gap_tolerance = gap_tolerance
        self.stall_timeout = stall_timeout
        self.max_pending = max_pending
        self.rng = rng or random.Random()
        self.label = label  # names the strap in logs; its address stays out of them
        self.fs = float(H10_ECG_RATE)

    def __aiter__(self) -> AsyncIterator[SourceEvent]:
        return self.events()

    async def find(self) -> BLEDevice | str | None:
        """The strap to connect to: a ``BLEDevice`` from a scan, or the configured address.

        With an address and no scanner backend, bleak resolves the address itself on connect.
        """
        from bleak import BleakScanner

        kwargs: dict[str, Any] = {} if self.scanner_backend is None else {"backend": self.scanner_backend}
        if self.address is not None:
            if self.scanner_backend is None:
                return self.address
            return await BleakScanner.find_device_by_address(
                self.address, timeout=self.scan_timeout, **kwargs
            )
        prefix = self.name_prefix

        def is_h10(device: Any, adv: Any) -> bool:
            return is_polar_h10(adv.local_name or device.name, prefix)

        return await BleakScanner.find_device_by_filter(is_h10, timeout=self.scan_timeout, **kwargs)

    async def events(self) -> AsyncIterator[SourceEvent]:
        """Connect, stream, reconnect: the event stream of one strap (see the class doc)."""
        from bleak import BleakClient
        from bleak.exc import BleakError

        failures = 0  # failed attempts in a row; a session that streamed resets it
        while True:
            if self.max_attempts is not None and failures >= self.max_attempts:
                log.error("%s: giving up after %d failed attempts", self.label, failures)
                return
            try:
                target = await self.find()
            except (BleakError, OSError) as exc:
                log.warning("%s: BLE scan failed (%s)", self.label, type(exc).__name__)
                log.debug("%s: BLE scan failed: %s", self.label, exc)
                target = None
            if target is None:
                log.info("%s: %s", self.label, self._not_found())
                failures += 1
                await self._wait(failures)
                continue

            address = target if isinstance(target, str) else target.address
            device = f"ble:{address}"
            link = _Link(self.max_pending)
            client = BleakClient(
                target, link.on_disconnect, timeout=self.connect_timeout, backend=self.backend
            )
            streamed = False
            try:
                started = False
                try:
                    log.info("%s: connecting", self.label)
                    await client.connect()
                    await self._start_ecg(client, link)
                    started = True
                except PmdError as exc:
                    log.warning("%s: %s", self.label, exc)
                    yield BadInput("pmd", f"Polar H10 {exc}", device)
                except (TimeoutError, BleakError, OSError, ConnectionError) as exc:
                    # bleak's messages often carry the address: the reason's type at warning level only
                    log.warning("%s: connection or ECG start failed (%s)", self.label, type(exc).__name__)
                    log.debug("%s: connection or ECG start failed: %s", self.label, exc)
                if started:
                    log.info("%s: ECG streaming at %g Hz", self.label, self.fs)
                    async with contextlib.aclosing(self._session(link, device)) as session:
                        async for event in session:
                            if isinstance(event, Frame):
                                streamed = True
                            yield event
                    reason = "stalled" if link.stalled else "disconnected"
                    log.warning("%s: %s", self.label, reason)
                    if streamed:
                        yield SessionEnd(device, reason)
            finally:
                await self._close(client, link)
            failures = 0 if streamed else failures + 1
            await self._wait(failures)

    # -- internals --

    def _not_found(self) -> str:
        if self.address is not None:
            return "the strap at the configured address is not advertising"
        return f"no device advertising a name starting {self.name_prefix!r}"

    async def _wait(self, failures: int) -> None:
        # the first retry, after a drop-out or a first failure, waits backoff.initial
        delay = self.backoff.delay(max(0, failures - 1), self.rng)
        log.info("%s: reconnecting in %.3g s", self.label, delay)
        await asyncio.sleep(delay)

    async def _request(self, client: Any, link: _Link, payload: bytes) -> ControlResponse:
        op = payload[0]
        await client.write_gatt_char(PMD_CONTROL, payload, response=True)
        async with asyncio.timeout(self.response_timeout):
            while True:
                response = await link.responses.get()
                if response is None:
                    raise ConnectionError("disconnected while waiting for a PMD response")
                if response.op == op and response.measurement == payload[1]:
                    return response
                log.debug("unexpected PMD response %s while waiting for op 0x%02x", response, op)

    async def _start_ecg(self, client: Any, link: _Link) -> None:
        # Features first, where the strap lets us read them: a strap without ECG fails clearly.
        try:
            features = await client.read_gatt_char(PMD_CONTROL)
        except Exception as exc:  # noqa: BLE001 - the read is optional; the start request decides
            log.debug("PMD feature read failed: %s", exc)
        else:
            if (
                len(features) >= 2
                and features[0] == CONTROL_FEATURES
                and not features[1] & 1 << MEASUREMENT_ECG
            ):
                raise PmdError(OP_GET_SETTINGS, 3, "the device offers no ECG measurement")
        await client.start_notify(PMD_CONTROL, link.on_control)
        await client.start_notify(PMD_DATA, link.on_data)

        response = await self._request(client, link, settings_request())
        if not response.ok:
            raise PmdError(OP_GET_SETTINGS, response.status)
        try:
            settings = parse_settings(response.params)
        except ValueError as exc:
            raise PmdError(OP_GET_SETTINGS, 0, str(exc)) from None
        rates = settings.get(SETTING_SAMPLE_RATE, [])
        resolutions = settings.get(SETTING_RESOLUTION, [])
        log.debug("ECG settings offered: rates %s, resolutions %s", rates, resolutions)
        if rates and H10_ECG_RATE not in rates:
            raise PmdError(OP_GET_SETTINGS, 8, f"the device offers ECG at {rates} Hz, not {H10_ECG_RATE}")
        if resolutions and H10_ECG_RESOLUTION not in resolutions:
            raise PmdError(
                OP_GET_SETTINGS, 7, f"the device offers {resolutions}-bit ECG, not {H10_ECG_RESOLUTION}"
            )

        response = await self._request(client, link, start_request())
        if response.status == 6:
            # "already in state": the strap still streams to a link an earlier run left open (BlueZ
            # keeps connections when a process dies). Stop that stream and start ours.
            log.info("%s: ECG already running on the strap; restarting it", self.label)
            await self._request(client, link, stop_request())
            link.inbox.clear()  # frames of the old stream belong to no session of ours
            response = await self._request(client, link, start_request())
        if not response.ok:
            raise PmdError(OP_START, response.status)

    async def _session(self, link: _Link, device: str) -> AsyncIterator[SourceEvent]:
        """Turn one connection's notifications into events, until it disconnects."""
        period_ns = 1e9 / self.fs
        seq = 0
        last_ns: int | None = None
        while True:
            if link.overflow:
                yield BadInput(
                    "overflow", f"{link.overflow} ECG notifications dropped: the pipeline fell behind", device
                )
                link.overflow = 0
            if not link.inbox:
                if link.disconnected:
                    return
                link.wake.clear()
                try:
                    async with asyncio.timeout(self.stall_timeout):
                        await link.wake.wait()
                except TimeoutError:
                    link.stalled = True
                    detail = f"no ECG notification for {self.stall_timeout:g} s on a live link; reconnecting"
                    log.warning("%s: %s", self.label, detail)
                    yield BadInput("stall", detail, device)
                    return
                continue
            data = link.inbox.popleft()
            try:
                packet = parse_ecg_notification(data)
            except PmdFrameError as exc:
                log.warning("%s: %s", self.label, exc)
                yield BadInput(exc.kind, str(exc), device)
                continue
            n = len(packet.microvolts)
            if last_ns is not None:
                step = packet.timestamp_ns - last_ns
                expected = n * period_ns
                if step > self.gap_tolerance * expected:
                    missing = max(1, round(step / period_ns) - n)
                    detail = (
                        f"sensor time jumped {step / 1e9:.3f} s over a {n}-sample frame: "
                        f"about {missing} samples missing before seq {seq + missing}"
                    )
                    log.warning("%s: %s", self.label, detail)
                    yield BadInput("gap", detail, device)
                    seq += missing  # seq stays on the sensor's sample clock
                elif step <= 0:
                    detail = f"sensor time went back {-step / 1e9:.3f} s; continuing the sample count"
                    log.warning("%s: %s", self.label, detail)
                    yield BadInput("clock", detail, device)
            last_ns = packet.timestamp_ns
            first_ns = packet.timestamp_ns - round((n - 1) * period_ns)
            yield Frame(device, packet.microvolts / 1000.0, self.fs, seq, polar_ns_to_unix(first_ns))
            seq += n

    async def _close(self, client: Any, link: _Link) -> None:
        """Stop the measurement and disconnect; best effort, bounded in time."""
        try:
            async with asyncio.timeout(self.response_timeout):
                if client.is_connected:
                    try:
                        await client.write_gatt_char(PMD_CONTROL, stop_request(), response=True)
                    except Exception as exc:  # noqa: BLE001 - disconnecting matters more
                        log.debug("%s: PMD stop failed: %s", self.label, exc)
                    await client.disconnect()
                    log.info("%s: disconnected", self.label)
        except Exception as exc:  # noqa: BLE001 - never let cleanup mask the reason we are closing
            log.warning("%s: disconnect failed (%s)", self.label, type(exc).__name__)


__all__ = [
    "PMD_CONTROL",
    "PMD_DATA",
    "PMD_ERRORS",
    "PMD_SERVICE",
    "POLAR_EPOCH_UNIX_S",
    "Backoff",
    "ControlResponse",
    "EcgPacket",
    "PmdError",
    "PmdFrameError",
    "PolarH10Source",
    "is_polar_h10",
    "parse_control_response",
    "parse_ecg_notification",
    "parse_settings",
    "polar_ns_to_unix",
    "settings_request",
    "start_request",
    "stop_request",
]
