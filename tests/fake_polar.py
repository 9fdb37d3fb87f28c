"""A Polar H10 in software, for tests: no radio exists where the suite runs.

:class:`FakePolarH10` is the strap. :meth:`FakePolarH10.backend` gives a bleak client backend (a
:class:`bleak.backends.client.BaseBleakClient` subclass, handed to ``BleakClient(...,
backend=...)``) that exposes the Polar Measurement Data service, answers control point writes with
the indications an H10 sends (errors included: a start at 250 Hz gets "invalid sample rate"), and
after a successful start streams data notifications in the H10's byte layout (73 samples of int24
microvolts, the sensor timestamp of the last sample). The ECG is real: MIT-BIH record 100 from the
committed slice, channel 0, resampled 360 -> 130 Hz. :func:`fake_scanner` gives a scanner backend
that advertises straps and other devices.

Faults are scripted per connection with :class:`Script`: drop the link after N frames (calling the
disconnected callback as bleak's BlueZ backend does), send garbage notifications, lose frames (their
time still passes on the sensor clock, so the next frame's timestamp jumps), refuse the start, go
quiet on a live link, or still be streaming when a client connects.

The UUIDs and byte layouts here are written out from the Polar documentation, not imported from
``edge.ble``, so that the tests check the source against the protocol rather than against itself.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import wfdb
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakDeviceNotFoundError, BleakError
from bleak.uuids import normalize_uuid_16, normalize_uuid_str
from scipy.signal import resample_poly

DATA = Path(__file__).parent / "data"

PMD_SERVICE = normalize_uuid_str("FB005C80-02E7-F387-1CAD-8ACD2D8DF0C8")
PMD_CONTROL = normalize_uuid_str("FB005C81-02E7-F387-1CAD-8ACD2D8DF0C8")
PMD_DATA = normalize_uuid_str("FB005C82-02E7-F387-1CAD-8ACD2D8DF0C8")
HEART_RATE_SERVICE = normalize_uuid_16(0x180D)
HEART_RATE_MEASUREMENT = normalize_uuid_16(0x2A37)

FS = 130
#: Samples per ECG notification: 10 + 73 * 3 = 229 bytes, the H10's notification at its MTU of 232.
FRAME_SAMPLES = 73
#: Polar's sensor epoch, 2000-01-01T00:00:00Z, in Unix seconds.
POLAR_EPOCH_UNIX = 946_684_800
#: Sensor time of the strap's first sample: 2024-05-01T08:00:00Z.
START_UNIX = 1_714_550_400
#: What a control point read answers: 0x0F, then the measurement bitmap (ECG = bit 0, ACC = bit 2).
FEATURES = bytes([0x0F, 0x05, 0x00])
#: The settings an H10 lists for ECG (130 Hz, 14 bit) and ACC (25-200 Hz, 16 bit, 2-8 G).
ECG_SETTINGS = bytes([0x00, 0x01, 0x82, 0x00, 0x01, 0x01, 0x0E, 0x00])
ACC_SETTINGS = bytes(
    [0x00, 0x04, 0x19, 0x00, 0x32, 0x00, 0x64, 0x00, 0xC8, 0x00, 0x01, 0x01, 0x10, 0x00]
    + [0x02, 0x03, 0x02, 0x00, 0x04, 0x00, 0x08, 0x00]
)


@functools.lru_cache(maxsize=4)
def mitbih_ecg_uv(record: str = "100") -> np.ndarray:
    """Channel 0 of a committed MIT-BIH slice, resampled to 130 Hz, as integer microvolts."""
    signal = wfdb.rdrecord(str(DATA / record), channels=[0]).p_signal[:, 0]
    at_130 = resample_poly(signal, 13, 36)  # 360 Hz * 13 / 36 = 130 Hz
    uv = np.round(at_130 * 1000.0).astype(np.int32)
    uv.setflags(write=False)
    return uv


def ecg_notification(
    timestamp_ns: int, microvolts: np.ndarray, *, measurement: int = 0, frame_type: int = 0
) -> bytes:
    """An ECG data notification: type, uint64 LE time of the last sample, frame type, int24 LE samples."""
    body = b"".join(int(v).to_bytes(3, "little", signed=True) for v in microvolts)
    return bytes([measurement]) + timestamp_ns.to_bytes(8, "little") + bytes([frame_type]) + body


@dataclass
class Script:
    """What goes wrong on one connection."""

    disconnect_after: int | None = None  # the link drops after this many frames
    garbage: dict[int, bytes] = field(default_factory=dict)  # notification sent just before frame k
    drop: set[int] = field(default_factory=set)  # frames the radio loses
    refuse_start: int | None = None  # status code answered to the start request
    stall_after: int | None = None  # the strap goes quiet after this many frames; the link stays up
    streaming_on_connect: bool = False  # ECG still runs from a link an earlier client left open


@dataclass(frozen=True)
class Sent:
    """A data frame the strap put on the air."""

    connection: int
    first_sample: int  # index into mitbih_ecg_uv()
    n: int
    timestamp_ns: int  # sensor time of the last sample


class FakePolarH10:
    """The strap. Its clock, ECG position and logs survive reconnects; faults are per connection."""

    def __init__(
        self,
        address: str = "A0:9E:1A:C0:FF:EE",
        name: str = "Polar H10 0A1B2C3D",
        *,
        record: str = "100",
        interval: float = 0.001,
        scripts: list[Script] | None = None,
        fail_connects: int = 0,
        features: bytes = FEATURES,
    ) -> None:
        self.address = address
        self.name = name
        self.ecg_uv = mitbih_ecg_uv(record)
        self.interval = interval  # seconds between notifications (a real H10: 73 / 130 = 0.56 s)
        self.scripts = scripts or []
        self.fail_connects = fail_connects
        self.features = features
        self.cursor = 0  # index of the next sample to send
        self.connections = 0  # successful connects so far
        self.connect_attempts = 0
        self.writes: list[bytes] = []  # every control point write, in order
        self.sent: list[Sent] = []
        self.dropped: list[Sent] = []
        self.streaming = False
        self.client: FakePolarClient | None = None

    def script(self, connection: int) -> Script:
        return self.scripts[connection] if connection < len(self.scripts) else Script()

    def sample_time_ns(self, index: int) -> int:
        """Sensor time of sample ``index``: ns since 2000-01-01 (the strap's clock runs at exactly 130 Hz)."""
        return (START_UNIX - POLAR_EPOCH_UNIX) * 1_000_000_000 + round(index * 1e9 / FS)

    def backend(self) -> type[BaseBleakClient]:
        """A bleak client backend class bound to this strap, for ``BleakClient(..., backend=...)``."""
        return type("FakePolarClient", (FakePolarClient,), {"strap": self})

    def scanner(self, *others: tuple[str, str | None]) -> type[BaseBleakScanner]:
        """A scanner backend that hears this strap after ``others`` (address, name) advertise."""
        return fake_scanner([*others, (self.address, self.name)])

    # -- the control point, as the strap's firmware answers it --

    def control(self, request: bytes, client: FakePolarClient) -> bytes:
        if len(request) < 2:
            return bytes([0xF0, request[0] if request else 0x00, 0x00, 4])  # invalid length
        op, kind = request[0], request[1]
        if op not in (0x01, 0x02, 0x03):
            return bytes([0xF0, op, kind, 1])  # invalid op code
        if kind not in (0x00, 0x02):  # an H10 measures ECG and ACC only
            return bytes([0xF0, op, kind, 2])  # invalid measurement type
        if op == 0x01:
            if len(request) != 2:
                return bytes([0xF0, op, kind, 4])
            return bytes([0xF0, op, kind, 0, 0]) + (ECG_SETTINGS if kind == 0 else ACC_SETTINGS)
        if op == 0x03:
            if len(request) != 2:
                return bytes([0xF0, op, kind, 4])
            if not self.streaming:
                return bytes([0xF0, op, kind, 6])  # already in state
            client.stop_stream()
            return bytes([0xF0, op, kind, 0])
        # start
        if kind != 0x00:
            return bytes([0xF0, op, kind, 3])  # this fake streams ECG only
        if self.streaming:
            return bytes([0xF0, op, kind, 6])
        refusal = self.script(client.connection).refuse_start
        if refusal is not None:
            return bytes([0xF0, op, kind, refusal])
        settings: dict[int, int] = {}
        i = 2
        while i < len(request):
            if i + 2 > len(request):
                return bytes([0xF0, op, kind, 4])
            setting, count = request[i], request[i + 1]
            if setting not in (0x00, 0x01) or count != 1:
                return bytes([0xF0, op, kind, 5])  # invalid parameter
            if i + 4 > len(request):
                return bytes([0xF0, op, kind, 4])
            settings[setting] = int.from_bytes(request[i + 2 : i + 4], "little")
            i += 4
        if 0x00 not in settings or 0x01 not in settings:
            return bytes([0xF0, op, kind, 5])
        if settings[0x00] != FS:
            return bytes([0xF0, op, kind, 8])  # invalid sample rate
        if settings[0x01] != 14:
            return bytes([0xF0, op, kind, 7])  # invalid resolution
        client.start_stream()
        return bytes([0xF0, op, kind, 0, 0])


def _gatt() -> BleakGATTServiceCollection:
    services = BleakGATTServiceCollection()
    hr = BleakGATTService(None, 0x000E, HEART_RATE_SERVICE)
    pmd = BleakGATTService(None, 0x0030, PMD_SERVICE)
    services.add_service(hr)
    services.add_service(pmd)

    def mtu() -> int:
        return 229

    services.add_characteristic(
        BleakGATTCharacteristic(None, 0x0010, HEART_RATE_MEASUREMENT, ["notify"], mtu, hr)
    )
    services.add_characteristic(
        BleakGATTCharacteristic(None, 0x0032, PMD_CONTROL, ["read", "write", "indicate"], mtu, pmd)
    )
    services.add_characteristic(BleakGATTCharacteristic(None, 0x0035, PMD_DATA, ["notify", "read"], mtu, pmd))
    return services


class FakePolarClient(BaseBleakClient):
    """The connection to a :class:`FakePolarH10`; bleak builds one per ``BleakClient``."""

    strap: FakePolarH10

    def __init__(self, address_or_ble_device: BLEDevice | str, **kwargs: Any) -> None:
        super().__init__(address_or_ble_device, **kwargs)
        self._connected = False
        self._subscribed: dict[str, Any] = {}
        self._stream: asyncio.Task[None] | None = None
        self.connection = -1

    @property
    def name(self) -> str:
        return self.strap.name

    @property
    def mtu_size(self) -> int:
        return 232

    @property
    def is_connected(self) -> bool:
        return self._connected

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        strap = self.strap
        strap.connect_attempts += 1
        await asyncio.sleep(0)
        if self.address.lower() != strap.address.lower():
            raise BleakDeviceNotFoundError(self.address, f"Device with address {self.address} was not found.")
        if strap.fail_connects > 0:
            strap.fail_connects -= 1
            raise BleakError(f"failed to connect to {self.address}: le-connection-abort-by-local")
        self.connection = strap.connections
        strap.connections += 1
        strap.client = self
        self.services = _gatt()
        self._connected = True
        if strap.script(self.connection).streaming_on_connect:
            self.start_stream()

    async def disconnect(self) -> None:
        if self._connected:
            await self._lose_link()

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("the H10 streams ECG without pairing")

    async def unpair(self) -> None:
        raise NotImplementedError("the H10 streams ECG without pairing")

    async def read_gatt_char(self, characteristic: BleakGATTCharacteristic, **kwargs: Any) -> bytearray:
        self._check()
        if characteristic.uuid == PMD_CONTROL:
            return bytearray(self.strap.features)
        raise BleakError(f"read of {characteristic.uuid} not permitted")

    async def read_gatt_descriptor(self, descriptor: BleakGATTDescriptor, **kwargs: Any) -> bytearray:
        raise BleakError("the fake H10 has no descriptors")

    async def write_gatt_char(
        self, characteristic: BleakGATTCharacteristic, data: Any, response: bool
    ) -> None:
        self._check()
        if characteristic.uuid != PMD_CONTROL:
            raise BleakError(f"write to {characteristic.uuid} not permitted")
        if PMD_CONTROL not in self._subscribed:
            # the strap answers on the control point only once its indications are on
            raise BleakError(
                "GATT Protocol Error: Client Characteristic Configuration Descriptor Improperly Configured"
            )
        request = bytes(data)
        self.strap.writes.append(request)
        reply = self.strap.control(request, self)
        callback = self._subscribed[PMD_CONTROL]
        asyncio.get_running_loop().call_soon(lambda: self._connected and callback(bytearray(reply)))

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: Any) -> None:
        raise BleakError("the fake H10 has no descriptors")

    async def start_notify(
        self, characteristic: BleakGATTCharacteristic, callback: Any, **kwargs: Any
    ) -> None:
        self._check()
        self._subscribed[characteristic.uuid] = callback

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        self._subscribed.pop(characteristic.uuid, None)

    # -- the strap's side --

    def _check(self) -> None:
        if not self._connected:
            raise BleakError("Not connected")

    def start_stream(self) -> None:
        self.strap.streaming = True
        self._stream = asyncio.get_running_loop().create_task(self._run_stream())

    def stop_stream(self) -> None:
        self.strap.streaming = False
        if self._stream is not None and self._stream is not asyncio.current_task():
            self._stream.cancel()
        self._stream = None

    async def _lose_link(self) -> None:
        """The link is gone (either side ended it): stop, and tell bleak's client as BlueZ does."""
        stream = self._stream
        self.stop_stream()
        self._connected = False
        self._subscribed.clear()
        if stream is not None and stream is not asyncio.current_task():
            await asyncio.wait([stream])
        if self._disconnected_callback is not None:
            self._disconnected_callback()

    def _notify(self, data: bytes) -> None:
        callback = self._subscribed.get(PMD_DATA)
        if callback is not None:  # without notifications on, the data is lost, as on the air
            callback(bytearray(data))

    async def _run_stream(self) -> None:
        strap, script = self.strap, self.strap.script(self.connection)
        k = 0
        while True:
            await asyncio.sleep(strap.interval)
            if script.disconnect_after is not None and k >= script.disconnect_after:
                await self._lose_link()
                return
            if script.stall_after is not None and k >= script.stall_after:
                return  # still "streaming", never sending
            if k in script.garbage:
                self._notify(script.garbage[k])
            first = strap.cursor
            samples = np.take(strap.ecg_uv, np.arange(first, first + FRAME_SAMPLES), mode="wrap")
            sent = Sent(
                self.connection, first, FRAME_SAMPLES, strap.sample_time_ns(first + FRAME_SAMPLES - 1)
            )
            strap.cursor += FRAME_SAMPLES
            if k in script.drop:
                strap.dropped.append(sent)
            else:
                strap.sent.append(sent)
                self._notify(ecg_notification(sent.timestamp_ns, samples))
            k += 1


def fake_scanner(adverts: list[tuple[str, str | None]], period: float = 0.005) -> type[BaseBleakScanner]:
    """A scanner backend hearing ``adverts`` ((address, local name) pairs) every ``period`` seconds."""

    class FakeScanner(BaseBleakScanner):
        def __init__(
            self, detection_callback: Any, service_uuids: Any, scanning_mode: str = "active", **kwargs: Any
        ):
            super().__init__(detection_callback, service_uuids)
            self._task: asyncio.Task[None] | None = None

        async def start(self) -> None:
            self.seen_devices = {}
            self._task = asyncio.get_running_loop().create_task(self._advertise())

        async def stop(self) -> None:
            if self._task is not None:
                self._task.cancel()
                await asyncio.wait([self._task])
                self._task = None

        async def _advertise(self) -> None:
            while True:
                for address, name in adverts:
                    await asyncio.sleep(period)
                    polar = name is not None and name.startswith("Polar")
                    adv = AdvertisementData(
                        local_name=name,
                        manufacturer_data={0x006B: b"\x33\x1e\x33\x33"} if polar else {},
                        service_data={},
                        service_uuids=[HEART_RATE_SERVICE] if polar else [],
                        tx_power=None,
                        rssi=-58,
                        platform_data=(),
                    )
                    device = self.create_or_update_device(address, address, name, None, adv)
                    self.call_detection_callbacks(device, adv)

    return FakeScanner
