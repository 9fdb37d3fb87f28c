"""MQTT for the edge: raw ECG in from wearables, anonymized ECG out to subscribers.

Raw frames arrive as small JSON objects on ``ecg/raw/<device>``; what leaves goes to
``ecg/anon/<pseudonym>/{ecg,beats,status}`` and never names the device (DESIGN.md, promise 4). The
payloads are version 1 of the schema in docs/mqtt.md. Encoding and decoding are pure functions
(:func:`decode_raw`, :func:`encode_anon_frame`, ...) and the per-device bookkeeping (sessions,
gaps, replays, idle devices) is a pure class, :class:`RawStreams`; only :class:`MqttSource`,
:class:`MqttSink` and :func:`publish_record` touch the network, through aiomqtt on the edge's
asyncio loop.

Bad input never raises out of the source: every rejected payload becomes a :class:`BadInput` whose
detail names the topic, so one broken wearable cannot stop the others (promise 5).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Self

import aiomqtt
import numpy as np

from edge.frames import (
    SCHEMA_VERSION,
    AnonBeat,
    AnonFrame,
    BadInput,
    Frame,
    SessionEnd,
    SessionInfo,
    SourceEvent,
)

log = logging.getLogger(__name__)

RAW_PREFIX = "ecg/raw"
ANON_PREFIX = "ecg/anon"
EDGE_PREFIX = "ecg/edge"
#: Key prefix of the devices this source reports (frames.py: source-qualified device keys).
DEVICE_SCHEME = "mqtt:"

UNITS_TO_MV = {"uV": 1e-3, "mV": 1.0}
FS_MIN, FS_MAX = 100.0, 2000.0

_RAW_FIELDS = frozenset({"v", "fs", "units", "seq", "t0", "session", "samples"})
_RAW_REQUIRED = ("fs", "units", "seq", "samples")
_END_FIELDS = frozenset({"v", "end", "session"})
_SAMPLE_TYPES = frozenset({int, float, type(None)})
_MAX_SESSION_LEN = 128
_MAX_DEVICE_LEN = 256
_PSEUDONYM = re.compile(r"[A-Za-z0-9._-]{1,64}")
_EDGE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DUMPS = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


# --------------------------------------------------------------------------------------------
# Connection settings


@dataclass(frozen=True)
class BrokerConfig:
    """Where the broker is and how to log in. The edge config embeds one of these."""

    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: str | None = None  # None with tls=True: the system's CA store
    cert_file: str | None = None  # client certificate, for brokers that require one
    key_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str | None = None  # base id; the source and sink append "-source" / "-sink"
    keepalive: int = 30

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def client(self, role: str, *, will: aiomqtt.Will | None = None, **kwargs: Any) -> aiomqtt.Client:
        """A new (not yet connected) aiomqtt client for one role of the edge."""
        tls = None
        if self.tls:
            tls = aiomqtt.TLSParameters(ca_certs=self.ca_file, certfile=self.cert_file, keyfile=self.key_file)
        return aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=f"{self.client_id}-{role}" if self.client_id else None,
            keepalive=self.keepalive,
            tls_params=tls,
            will=will,
            **kwargs,
        )


@dataclass(frozen=True)
class RawLimits:
    """What a raw payload may be before it is rejected as oversize."""

    max_bytes: int = 512 * 1024
    max_samples: int = 20_000  # 10 s at 2 kHz, 150 s at the Polar H10's 130 Hz


DEFAULT_LIMITS = RawLimits()


# --------------------------------------------------------------------------------------------
# Raw payloads (wearable -> edge)


def raw_topic(device: str, prefix: str = RAW_PREFIX) -> str:
    """The topic a wearable publishes on; ``device`` may hold a shard, e.g. ``"3/strap-7"``."""
    return f"{prefix.rstrip('/')}/{device}"


def device_key(topic: str, prefix: str = RAW_PREFIX) -> str | None:
    """``mqtt:<remainder after the prefix>``, or None if the topic is not a raw device topic."""
    head = prefix.rstrip("/") + "/"
    if not topic.startswith(head):
        return None
    rest = topic[len(head):]
    if not rest or len(rest) > _MAX_DEVICE_LEN or rest.endswith("/"):
        return None
    return DEVICE_SCHEME + rest


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def decode_raw(
    topic: str,
    payload: bytes | bytearray | str,
    *,
    prefix: str = RAW_PREFIX,
    limits: RawLimits = DEFAULT_LIMITS,
) -> tuple[Frame | SessionEnd | BadInput, str | None]:
    """Decode one raw message into an event and its ``session`` token (None when absent).

    Pure and total: any payload gives an event, never an exception. Samples come back in mV,
    float64, with NaN for ``null`` (or non-finite) samples.
    """
    device = device_key(topic, prefix)
    if device is None:
        return BadInput("topic", f"MQTT {topic!r}: not a raw device topic under {prefix.rstrip('/')}/<device>"), None

    def bad(kind: str, what: str) -> tuple[BadInput, None]:
        return BadInput(kind, f"MQTT {topic}: {what}", device), None

    if len(payload) > limits.max_bytes:
        return bad("oversize", f"payload of {len(payload)} bytes exceeds the limit of {limits.max_bytes} bytes")
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):  # bad UTF-8 and bad JSON are both ValueError
        return bad("garbage", f"payload of {len(payload)} bytes is not JSON (expected a v1 ECG object, docs/mqtt.md)")
    if not isinstance(obj, dict):
        return bad("garbage", f"payload is a JSON {_json_type(obj)}, expected an object")
    if "v" not in obj:
        return bad("schema", "missing field 'v' (schema version)")
    if type(obj["v"]) is not int or obj["v"] != SCHEMA_VERSION:
        return bad("version", f"unsupported schema version {obj['v']!r}; this edge reads v{SCHEMA_VERSION}")

    session = obj.get("session")
    if session is not None and (type(session) is not str or not 0 < len(session) <= _MAX_SESSION_LEN):
        return bad("schema", f"'session' must be a string of 1 to {_MAX_SESSION_LEN} characters")

    if "end" in obj:
        unknown = sorted(set(obj) - _END_FIELDS)
        if unknown:
            return bad("schema", f"unknown field(s) in an end message: {', '.join(unknown)}")
        if obj["end"] is not True:
            return bad("schema", f"'end' must be true, got {obj['end']!r}")
        return SessionEnd(device, "end"), session

    unknown = sorted(set(obj) - _RAW_FIELDS)
    if unknown:
        return bad("schema", f"unknown field(s): {', '.join(unknown)}")
    missing = [k for k in _RAW_REQUIRED if k not in obj]
    if missing:
        return bad("schema", f"missing field(s): {', '.join(missing)}")

    fs = obj["fs"]
    if not _is_number(fs):
        return bad("schema", f"'fs' must be a number in Hz, got {_json_type(fs)} {fs!r}")
    if not FS_MIN <= fs <= FS_MAX:
        return bad("rate", f"sample rate {fs:g} Hz is outside {FS_MIN:g}-{FS_MAX:g} Hz")
    units = obj["units"]
    if units not in UNITS_TO_MV:
        return bad("schema", f"'units' must be 'uV' or 'mV', got {units!r}")
    seq = obj["seq"]
    if type(seq) is not int or seq < 0:
        return bad("schema", f"'seq' must be a non-negative integer sample index, got {seq!r}")
    t0 = obj.get("t0")
    if t0 is not None and not _is_number(t0):
        return bad("schema", f"'t0' must be Unix seconds (a number), got {_json_type(t0)} {t0!r}")

    samples = obj["samples"]
    if type(samples) is not list:
        return bad("schema", f"'samples' must be an array, got {_json_type(samples)}")
    if not samples:
        return bad("schema", "'samples' is empty")
    if len(samples) > limits.max_samples:
        return bad("oversize", f"{len(samples)} samples in one frame exceed the limit of {limits.max_samples}")
    if not set(map(type, samples)) <= _SAMPLE_TYPES:
        i = next(i for i, x in enumerate(samples) if type(x) not in _SAMPLE_TYPES)
        return bad("schema", f"samples[{i}] is a {_json_type(samples[i])}, expected a number or null")
    try:
        values = np.array(samples, dtype=np.float64)  # None -> NaN
    except OverflowError:
        return bad("schema", "a sample is too large to be a number")
    values[~np.isfinite(values)] = np.nan
    if units != "mV":
        values /= 1000.0  # uV -> mV; division keeps integer uV exact to the last bit
    frame = Frame(device=device, samples=values, fs=float(fs), seq=seq, timestamp=None if t0 is None else float(t0))
    return frame, session


def parse_raw(
    topic: str,
    payload: bytes | bytearray | str,
    *,
    prefix: str = RAW_PREFIX,
    limits: RawLimits = DEFAULT_LIMITS,
) -> Frame | SessionEnd | BadInput:
    """One raw message as a source event, without its session token (see :func:`decode_raw`)."""
    return decode_raw(topic, payload, prefix=prefix, limits=limits)[0]


def _samples_json(values: np.ndarray, scale: float, decimals: int) -> tuple[list[float | int | None], bool]:
    """Samples as JSON-ready numbers at a fixed resolution, ``None`` where not finite; and whether any is."""
    x = np.asarray(values, dtype=np.float64) * scale
    bad = ~np.isfinite(x)
    x = np.where(bad, 0.0, x)
    out: list[Any] = np.rint(x).astype(np.int64).tolist() if decimals == 0 else np.round(x, decimals).tolist()
    holes = np.flatnonzero(bad).tolist()
    for i in holes:
        out[i] = None
    return out, bool(holes)


def encode_raw(
    samples_mV: np.ndarray | Sequence[float],
    fs: float,
    seq: int,
    *,
    units: str = "uV",
    t0: float | None = None,
    session: str | None = None,
) -> bytes:
    """A raw payload as a wearable would send it: integer uV (``units="uV"``) or mV at 1 uV."""
    if units not in UNITS_TO_MV:
        raise ValueError(f"units must be 'uV' or 'mV', not {units!r}")
    if units == "uV":
        samples, _ = _samples_json(np.asarray(samples_mV), 1000.0, 0)
    else:
        samples, _ = _samples_json(np.asarray(samples_mV), 1.0, 4)
    obj: dict[str, Any] = {"v": SCHEMA_VERSION, "fs": fs, "units": units, "seq": int(seq)}
    if t0 is not None:
        obj["t0"] = round(float(t0), 6)
    if session is not None:
        obj["session"] = session
    obj["samples"] = samples
    return _DUMPS(obj).encode()


def encode_end(session: str | None = None) -> bytes:
    """The message a wearable sends on its raw topic when it stops streaming."""
    obj: dict[str, Any] = {"v": SCHEMA_VERSION, "end": True}
    if session is not None:
        obj["session"] = session
    return _DUMPS(obj).encode()


# --------------------------------------------------------------------------------------------
# Anonymized payloads (edge -> subscribers)


def check_pseudonym(pseudonym: str) -> str:
    """A pseudonym is one safe topic level; anything else is a bug upstream, not bad input."""
    if not isinstance(pseudonym, str) or not _PSEUDONYM.fullmatch(pseudonym):
        raise ValueError(f"pseudonym must be 1-64 characters of [A-Za-z0-9._-], got {pseudonym!r}")
    return pseudonym


def anon_topic(pseudonym: str, kind: str, prefix: str = ANON_PREFIX) -> str:
    """``<prefix>/<pseudonym>/<kind>`` with kind one of ``ecg``, ``beats``, ``status``."""
    return f"{prefix.rstrip('/')}/{check_pseudonym(pseudonym)}/{kind}"


def edge_status_topic(edge_id: str, prefix: str = EDGE_PREFIX) -> str:
    if not _EDGE_ID.fullmatch(edge_id):
        raise ValueError(f"edge_id must be 1-64 characters of [A-Za-z0-9._-], got {edge_id!r}")
    return f"{prefix.rstrip('/')}/{edge_id}/status"


def encode_anon_frame(frame: AnonFrame) -> bytes:
    """Synthetic samples in mV at 1 uV resolution, ``null`` where masked."""
    samples, masked = _samples_json(frame.samples, 1.0, 4)
    obj: dict[str, Any] = {"v": SCHEMA_VERSION, "fs": float(frame.fs), "units": "mV", "seq": int(frame.start)}
    if frame.timestamp is not None:
        obj["t0"] = round(float(frame.timestamp), 6)
    obj["masked"] = masked
    obj["samples"] = samples
    return _DUMPS(obj).encode()


def encode_beats(beats: Sequence[AnonBeat]) -> bytes:
    """The beats of one session (one pseudonym, one rate) as one annotation message."""
    if not beats:
        raise ValueError("no beats to encode")
    fs = beats[0].fs
    if any(b.pseudonym != beats[0].pseudonym or b.fs != fs for b in beats):
        raise ValueError("encode_beats takes the beats of one session")
    items = []
    for b in beats:
        item: dict[str, Any] = {"sample": int(b.sample)}
        if b.timestamp is not None:
            item["t"] = round(float(b.timestamp), 6)
        item["class"] = b.label
        if b.model is not None:
            item["model"] = b.model
        items.append(item)
    return _DUMPS({"v": SCHEMA_VERSION, "fs": float(fs), "beats": items}).encode()


def encode_status(info: SessionInfo) -> bytes:
    """A session's retained status: online or ended, its rate and the model versions it runs."""
    obj: dict[str, Any] = {"v": SCHEMA_VERSION, "state": info.state, "fs": float(info.fs), "models": dict(info.models)}
    if info.started is not None:
        obj["started"] = round(float(info.started), 3)
    return _DUMPS(obj).encode()


def encode_edge_status(state: str, started: float | None = None, extra: dict[str, Any] | None = None) -> bytes:
    """The edge's own retained status: ``online``, or ``offline`` (its last will); ``extra`` adds
    fields such as the models in use and the last model refresh (edge/refresh.py)."""
    obj: dict[str, Any] = {"v": SCHEMA_VERSION, "state": state}
    if started is not None:
        obj["started"] = round(float(started), 3)
    obj.update({k: v for k, v in (extra or {}).items() if k not in ("v", "state", "started")})
    return _DUMPS(obj).encode()


# --------------------------------------------------------------------------------------------
# Per-device bookkeeping (pure)


@dataclass
class _Device:
    session: str | None
    fs: float
    next_seq: int
    last_seen: float


class RawStreams:
    """Turns raw messages into source events, one device session at a time.

    Rules (docs/mqtt.md, "Sessions"): a new ``session`` token, a new sample rate, an end message, a
    device silent for ``idle_timeout_s``, or a forward jump of more than ``max_gap_s`` ends the
    session (:class:`SessionEnd`); a smaller forward jump is reported as ``BadInput(gap)`` and the
    frame passes with its seq (the pipeline masks the gap); a frame that goes backwards is a
    duplicate or a replay: ``BadInput(order)``, dropped.
    """

    def __init__(
        self,
        prefix: str = RAW_PREFIX,
        *,
        limits: RawLimits = DEFAULT_LIMITS,
        idle_timeout_s: float = 30.0,
        max_gap_s: float = 60.0,
        max_devices: int = 10_000,
    ) -> None:
        self.prefix = prefix.rstrip("/")
        self.limits = limits
        self.idle_timeout_s = idle_timeout_s
        self.max_gap_s = max_gap_s
        self.max_devices = max_devices
        self._devices: dict[str, _Device] = {}

    @property
    def live(self) -> list[str]:
        """Device keys with a session in progress."""
        return list(self._devices)

    def feed(self, topic: str, payload: bytes | bytearray | str, now: float) -> list[SourceEvent]:
        event, session = decode_raw(topic, payload, prefix=self.prefix, limits=self.limits)
        if isinstance(event, BadInput):
            return [event]
        device = event.device
        state = self._devices.get(device)
        if isinstance(event, SessionEnd):
            if state is None:
                log.debug("end message from %s, which has no session: ignored", device)
                return []
            del self._devices[device]
            return [event]

        frame = event
        assert frame.seq is not None
        out: list[SourceEvent] = []
        if state is not None:
            reason = None
            if session != state.session:
                reason = "new session"
            elif frame.fs != state.fs:
                reason = f"sample rate changed from {state.fs:g} to {frame.fs:g} Hz"
            if reason is not None:
                out.append(SessionEnd(device, reason))
                del self._devices[device]
                state = None
        if state is not None:
            if frame.seq < state.next_seq:
                return [
                    BadInput(
                        "order",
                        f"MQTT {topic}: seq {frame.seq} is behind the expected {state.next_seq} "
                        "(duplicate or replay); frame dropped",
                        device,
                    )
                ]
            gap = frame.seq - state.next_seq
            if gap > self.max_gap_s * frame.fs:
                out.append(
                    BadInput(
                        "gap",
                        f"MQTT {topic}: {gap} samples ({gap / frame.fs:.1f} s) missing before seq {frame.seq}, "
                        f"more than {self.max_gap_s:g} s; a new session starts",
                        device,
                    )
                )
                out.append(SessionEnd(device, "gap"))
                del self._devices[device]
                state = None
            elif gap > 0:
                out.append(
                    BadInput(
                        "gap",
                        f"MQTT {topic}: {gap} samples ({gap / frame.fs:.2f} s) missing before seq {frame.seq}; "
                        "frame passed on, the gap is masked",
                        device,
                    )
                )
        if state is None:
            if len(self._devices) >= self.max_devices:
                out.append(
                    BadInput(
                        "capacity",
                        f"MQTT {topic}: {len(self._devices)} devices already streaming (max_devices); frame dropped",
                        device,
                    )
                )
                return out
            state = self._devices[device] = _Device(session, frame.fs, frame.seq, now)
        state.next_seq = frame.seq + len(frame.samples)
        state.last_seen = now
        out.append(frame)
        return out

    def expire(self, now: float) -> list[SessionEnd]:
        """End the sessions of devices silent for longer than ``idle_timeout_s``."""
        stale = [d for d, s in self._devices.items() if now - s.last_seen > self.idle_timeout_s]
        for d in stale:
            del self._devices[d]
        return [SessionEnd(d, "idle") for d in stale]

    def end(self, devices: Iterable[str], reason: str) -> list[SessionEnd]:
        """End these devices' sessions now (e.g. their shard moved to another worker, edge/cluster.py)."""
        ended = [d for d in devices if self._devices.pop(d, None) is not None]
        return [SessionEnd(d, reason) for d in ended]


# --------------------------------------------------------------------------------------------
# Source


def _discard(fut: asyncio.Future[Any] | None) -> None:
    """Cancel a read nobody will wait for, and consume its outcome if it already has one."""
    if fut is None:
        return
    if fut.done():
        if not fut.cancelled():
            fut.exception()
    else:
        fut.cancel()


def _refused(code: Any) -> bool:
    """Whether a SUBACK code refuses the subscription (0x80 in MQTT 3.1.1, >= 0x80 in 5)."""
    failure = getattr(code, "is_failure", None)
    return bool(failure) if failure is not None else int(code) >= 0x80


class MqttSource:
    """Raw ECG from a broker as an async iterator of :class:`Frame`, :class:`SessionEnd`, :class:`BadInput`.

    Subscribes ``<topic_prefix>/#`` (or the given ``subscriptions``, e.g. one ``ecg/raw/<shard>/#``
    per shard this worker owns). When the broker goes away it logs, reconnects with exponential
    back-off and keeps each device's session: a short outage shows up as ``BadInput(gap)`` on the
    next frame, and sessions silent for ``idle_timeout_s`` (outage or not) end with
    ``SessionEnd(reason="idle")``.

    :meth:`update_subscriptions` changes what it subscribes to while it runs. ``will`` is the
    connection's last will. A subclass can add to each connection through the ``_on_connect``,
    ``_receive``, ``_expire`` and ``_on_disconnect`` hooks (edge/cluster.py shares shards this way).
    """

    def __init__(
        self,
        broker: BrokerConfig,
        topic_prefix: str = RAW_PREFIX,
        *,
        subscriptions: Sequence[str] | None = None,
        qos: int = 1,
        limits: RawLimits = DEFAULT_LIMITS,
        idle_timeout_s: float = 30.0,
        max_gap_s: float = 60.0,
        max_devices: int = 10_000,
        max_queued: int = 10_000,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        will: aiomqtt.Will | None = None,
    ) -> None:
        prefix = topic_prefix.rstrip("/")
        self.broker = broker
        self.topic_prefix = prefix
        self.subscriptions = self._checked(subscriptions) if subscriptions else [f"{prefix}/#"]
        self.will = will
        self.qos = qos
        self.streams = RawStreams(
            prefix, limits=limits, idle_timeout_s=idle_timeout_s, max_gap_s=max_gap_s, max_devices=max_devices
        )
        self.max_queued = max_queued
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.tick_s = min(1.0, idle_timeout_s / 4)
        #: Set while connected and subscribed.
        self.ready = asyncio.Event()
        self.reconnects = 0
        self._client: aiomqtt.Client | None = None
        self._gen: AsyncIterator[SourceEvent] | None = None

    @property
    def client(self) -> aiomqtt.Client | None:
        """The connected client, if any (for status and tests)."""
        return self._client

    def _checked(self, subscriptions: Iterable[str]) -> list[str]:
        subs = list(dict.fromkeys(subscriptions))
        for s in subs:
            # A shared subscription ($share/<group>/<filter>, docs/scale-out.md) delivers the real topics.
            shared = re.fullmatch(r"\$share/[^/+#]+/(.+)", s)
            if not (shared.group(1) if shared else s).startswith(self.topic_prefix + "/"):
                raise ValueError(f"subscription {s!r} is not under the raw prefix {self.topic_prefix!r}")
        return subs

    async def update_subscriptions(self, subscriptions: Sequence[str]) -> None:
        """Subscribe to what is new and unsubscribe from what is gone, now if connected and on
        every reconnect. Returns once the broker has granted the new subscriptions; raises
        ``aiomqtt.MqttError`` if it refused one or the connection is lost. Messages already on
        their way from a dropped subscription still arrive."""
        subs = self._checked(subscriptions)
        added = [s for s in subs if s not in self.subscriptions]
        removed = [s for s in self.subscriptions if s not in subs]
        self.subscriptions = subs
        client = self._client
        if client is None:
            return
        if added:
            granted = await client.subscribe([(s, self.qos) for s in added])
            refused = [s for s, rc in zip(added, granted) if _refused(rc)]
            if refused:
                self.subscriptions = [s for s in self.subscriptions if s not in refused]
                raise aiomqtt.MqttError(f"broker refused the subscription to {', '.join(refused)}")
        if removed:
            await client.unsubscribe(removed)

    # Hooks for subclasses (the defaults are the plain source) ------------------------------

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        """Called once a connection is up and subscribed, before ``ready`` is set."""

    def _receive(self, topic: str, payload: bytes | bytearray | str, now: float) -> list[SourceEvent]:
        """The events of one received message."""
        return self.streams.feed(topic, payload, now)

    def _expire(self, now: float) -> list[SourceEvent]:
        """Called about every ``tick_s``, connected or not."""
        return list(self.streams.expire(now))

    def _on_disconnect(self) -> None:
        """Called when a connection ends (lost, or the source closed)."""

    def __aiter__(self) -> AsyncIterator[SourceEvent]:
        if self._gen is None:
            self._gen = self._events()
        return self._gen

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Disconnect; iteration ends."""
        if self._gen is not None:
            await self._gen.aclose()  # type: ignore[attr-defined]

    async def _events(self) -> AsyncIterator[SourceEvent]:
        delay = self.reconnect_min_s
        next_expiry = time.monotonic() + self.tick_s
        while True:
            client = self.broker.client("source", will=self.will, max_queued_incoming_messages=self.max_queued)
            pending: asyncio.Future[aiomqtt.Message] | None = None
            try:
                async with client:
                    subscriptions = list(self.subscriptions)
                    granted = await client.subscribe([(s, self.qos) for s in subscriptions]) if subscriptions else []
                    refused = [s for s, rc in zip(subscriptions, granted) if _refused(rc)]
                    if refused:  # e.g. an ACL without read access: nothing would ever arrive
                        raise aiomqtt.MqttError(f"broker refused the subscription to {', '.join(refused)}")
                    self._client = client
                    await self._on_connect(client)
                    self.ready.set()
                    delay = self.reconnect_min_s
                    log.info("MQTT source: subscribed to %s on %s", ", ".join(subscriptions) or "nothing yet", self.broker)
                    messages = client.messages
                    try:
                        while True:
                            if pending is None:
                                pending = asyncio.ensure_future(anext(messages))
                            done, _ = await asyncio.wait((pending,), timeout=self.tick_s)
                            now = time.monotonic()
                            if done:
                                msg = pending.result()  # MqttError when the connection is lost
                                pending = None
                                for event in self._receive(msg.topic.value, msg.payload, now):
                                    yield event
                            if now >= next_expiry:
                                next_expiry = now + self.tick_s
                                for end in self._expire(now):
                                    yield end
                    finally:  # before the client disconnects, which would fail the pending read
                        _discard(pending)
                        pending = None
            except aiomqtt.MqttError as exc:
                log.warning(
                    "MQTT source: broker %s unreachable or lost (%s); %d live sessions kept, retrying in %.1f s",
                    self.broker,
                    exc,
                    len(self.streams.live),
                    delay,
                )
            finally:
                self._client = None
                self.ready.clear()
                self._on_disconnect()
            self.reconnects += 1
            until = time.monotonic() + delay
            while (left := until - time.monotonic()) > 0:
                await asyncio.sleep(min(left, self.tick_s))
                for end in self._expire(time.monotonic()):
                    yield end
            delay = min(delay * 2, self.reconnect_max_s)


# --------------------------------------------------------------------------------------------
# Sink


@dataclass
class SinkStats:
    """What the sink published, and what it could not."""

    frames: int = 0  # anonymized frames acknowledged by the broker (QoS 1) or written (QoS 0)
    beats: int = 0  # beats in acknowledged beat messages
    dropped: int = 0  # messages not sent because the broker was unreachable
    failed: int = 0  # messages sent but not acknowledged (connection lost, timeout)
    connects: int = 0


class MqttSink:
    """Anonymized output to ``<topic_prefix>/<pseudonym>/{ecg,beats,status}`` (the ``Sink`` protocol).

    Its connection is the edge's presence: on connect it publishes a retained ``online`` on
    ``ecg/edge/<edge_id>/status`` and registers a retained ``offline`` as its last will, so
    subscribers learn of a crash. ``emit`` returns once the broker has acknowledged every message
    (QoS 1 by default), which bounds what is in flight and makes loss visible in :attr:`stats`.
    While the broker is unreachable the sink reconnects with back-off and drops (and counts) what
    it is given; subscribers see the hole as a jump in ``seq``.
    """

    def __init__(
        self,
        broker: BrokerConfig,
        topic_prefix: str = ANON_PREFIX,
        *,
        edge_id: str = "edge",
        status_prefix: str = EDGE_PREFIX,
        qos: int = 1,
        status_qos: int = 1,
        retain_ended: bool = True,
        max_inflight: int = 1000,
        publish_timeout_s: float = 10.0,
        connect_timeout_s: float = 10.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
    ) -> None:
        self.broker = broker
        self.topic_prefix = topic_prefix.rstrip("/")
        self.edge_id = edge_id
        self.edge_topic = edge_status_topic(edge_id, status_prefix)
        self.qos = qos
        self.status_qos = status_qos
        self.retain_ended = retain_ended
        self.max_inflight = max_inflight
        self.publish_timeout_s = publish_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.stats = SinkStats()
        self.started = time.time()
        self._live: dict[str, SessionInfo] = {}
        #: Extra fields of the edge's online status (``models``, ``refresh``); see update_status.
        self.status: dict[str, Any] = {}
        self._client: aiomqtt.Client | None = None
        self._lost = asyncio.Event()
        self._online = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_error: BaseException | None = None
        self._dropped_since_online = 0
        self._closing = False

    @property
    def connected(self) -> bool:
        """Whether the sink has a connection to publish on now."""
        return self._online.is_set()

    @property
    def client(self) -> aiomqtt.Client | None:
        """The connected client, if any (for status and tests)."""
        return self._client if self._online.is_set() else None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Connect; raises ConnectionError if the broker cannot be reached within connect_timeout_s."""
        if self._task is not None:
            return
        self._closing = False
        self._task = asyncio.create_task(self._supervise(), name="mqtt-sink")
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await self._online.wait()
        except TimeoutError:
            await self._stop_task()
            raise ConnectionError(
                f"MQTT sink: cannot reach broker {self.broker} within {self.connect_timeout_s:g} s: {self._last_error}"
            ) from None

    async def aclose(self) -> None:
        """End live sessions, say ``offline`` (a clean disconnect sends no will) and disconnect."""
        if self._task is None:
            return
        if self._online.is_set():
            msgs = [self._status_msg(replace(i, state="ended")) for i in self._live.values()]
            msgs.append((self.edge_topic, encode_edge_status("offline", self.started), self.status_qos, True))
            await self._publish(msgs)
        self._live.clear()
        await self._stop_task()

    async def _stop_task(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._closing = True
        # Cancel until it takes: on Python 3.11, asyncio.wait_for (inside aiomqtt's publish and
        # subscribe) swallows a cancellation that arrives together with the awaited result.
        while not task.done():
            task.cancel()
            await asyncio.wait((task,), timeout=0.5)
        if not task.cancelled() and task.exception() is not None:
            log.error("MQTT sink: connection task failed", exc_info=task.exception())

    # The Sink protocol --------------------------------------------------------------------

    async def update_status(self, **fields: Any) -> None:
        """Set fields of the edge's retained online status and republish it now (when connected)."""
        self.status.update(fields)
        if self.connected:
            await self._publish([(self.edge_topic, encode_edge_status("online", self.started, self.status),
                                   self.status_qos, True)])

    async def session_started(self, info: SessionInfo) -> None:
        check_pseudonym(info.pseudonym)
        self._live[info.pseudonym] = info
        await self._publish([self._status_msg(info)])

    async def emit(self, frames: list[AnonFrame], beats: list[AnonBeat]) -> None:
        msgs = [(anon_topic(f.pseudonym, "ecg", self.topic_prefix), encode_anon_frame(f), self.qos, False) for f in frames]
        by_session: dict[str, list[AnonBeat]] = {}
        for b in beats:
            by_session.setdefault(b.pseudonym, []).append(b)
        msgs += [
            (anon_topic(p, "beats", self.topic_prefix), encode_beats(bs), self.qos, False) for p, bs in by_session.items()
        ]
        ok = await self._publish(msgs)
        self.stats.frames += sum(ok[: len(frames)])
        self.stats.beats += sum(len(bs) for bs, sent in zip(by_session.values(), ok[len(frames):]) if sent)

    async def session_ended(self, info: SessionInfo) -> None:
        self._live.pop(info.pseudonym, None)
        await self._publish([self._status_msg(replace(info, state="ended"))])

    # Internals ----------------------------------------------------------------------------

    def _status_msg(self, info: SessionInfo) -> tuple[str, bytes, int, bool]:
        retain = info.state != "ended" or self.retain_ended
        return anon_topic(info.pseudonym, "status", self.topic_prefix), encode_status(info), self.status_qos, retain

    async def _publish(self, msgs: list[tuple[str, bytes, int, bool]]) -> list[bool]:
        """Publish concurrently; True for each message the broker took."""
        if not msgs:
            return []
        client = self.client
        if client is None:
            if self._dropped_since_online == 0:
                log.warning("MQTT sink: broker %s unreachable; dropping output until it is back", self.broker)
            self._dropped_since_online += len(msgs)
            self.stats.dropped += len(msgs)
            return [False] * len(msgs)
        lost = self._lost
        sends = [
            asyncio.ensure_future(client.publish(t, p, qos=q, retain=r, timeout=self.publish_timeout_s))
            for t, p, q, r in msgs
        ]
        everything = asyncio.gather(*sends, return_exceptions=True)
        waiter = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait((everything, waiter), return_when=asyncio.FIRST_COMPLETED)
        finally:  # on cancellation too: nothing keeps running behind the caller's back
            waiter.cancel()
            everything.cancel()  # no-op when all are done; else the connection went, and they with it
        ok = []
        for task in sends:
            if not task.done() or task.cancelled() or isinstance(exc := task.exception(), aiomqtt.MqttError):
                ok.append(False)
            elif exc is not None:
                raise exc
            else:
                ok.append(True)
        if not all(ok):
            self.stats.failed += ok.count(False)
            log.warning("MQTT sink: %d of %d messages not acknowledged by %s", ok.count(False), len(ok), self.broker)
        return ok

    async def _supervise(self) -> None:
        delay = self.reconnect_min_s
        will = aiomqtt.Will(self.edge_topic, encode_edge_status("offline", self.started), qos=self.status_qos, retain=True)
        while not self._closing:
            client = self.broker.client("sink", will=will, max_inflight_messages=self.max_inflight)
            client.pending_calls_threshold = self.max_inflight + 100  # concurrent publishes are the design
            self._lost = asyncio.Event()
            try:
                async with client:
                    self._client = client
                    self._online.set()
                    self.stats.connects += 1
                    delay = self.reconnect_min_s
                    if self._dropped_since_online:
                        log.warning("MQTT sink: back on %s after dropping %d messages", self.broker, self._dropped_since_online)
                    else:
                        log.info("MQTT sink: online on %s as edge %r", self.broker, self.edge_id)
                    self._dropped_since_online = 0
                    online = [(self.edge_topic, encode_edge_status("online", self.started, self.status),
                               self.status_qos, True)]
                    await self._publish(online + [self._status_msg(i) for i in self._live.values()])
                    # Nothing is subscribed: this only returns, by raising, when the connection drops.
                    async for _ in client.messages:
                        pass
            except aiomqtt.MqttError as exc:
                self._last_error = exc
                if not self._closing:
                    log.warning("MQTT sink: broker %s unreachable or lost (%s); retrying in %.1f s", self.broker, exc, delay)
            except Exception as exc:  # a bug here must not leave the edge silently offline
                self._last_error = exc
                log.exception("MQTT sink: connection failed unexpectedly; retrying in %.1f s", delay)
            finally:
                self._online.clear()
                self._lost.set()
                self._client = None
            if not self._closing:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max_s)


# --------------------------------------------------------------------------------------------
# Simulated wearables


async def publish_record(
    client_or_broker: aiomqtt.Client | BrokerConfig,
    device: str,
    samples_mV: np.ndarray,
    fs: float,
    frame_s: float = 0.25,
    realtime: bool | float = True,
    units: str = "uV",
    *,
    topic_prefix: str = RAW_PREFIX,
    qos: int = 1,
    t0: float | None = None,
    session: str | None = None,
    start_seq: int = 0,
    end: bool = True,
    shard_count: int | None = None,
) -> int:
    """Play a recording as a wearable would: raw frames of ``frame_s`` on ``<prefix>/<device>``.

    With ``shard_count`` the topic is ``<prefix>/<shard_of(device, shard_count)>/<device>``, what
    a wearable of a fleet shared by several edge workers publishes on (docs/scale-out.md).

    ``realtime``: True paces frames at the recording's own speed (each frame is sent once its last
    sample "was measured"), a number is a speed factor (10 = ten times faster), False sends as fast
    as the broker takes them. ``t0`` (Unix seconds of the first sample) stamps every frame. Ends
    with an end message unless ``end=False``. Returns the number of frames sent.
    """
    if isinstance(client_or_broker, BrokerConfig):
        async with client_or_broker.client("wearable") as client:
            return await publish_record(
                client, device, samples_mV, fs, frame_s, realtime, units,
                topic_prefix=topic_prefix, qos=qos, t0=t0, session=session, start_seq=start_seq, end=end,
                shard_count=shard_count,
            )  # fmt: skip
    client = client_or_broker
    speed = 1.0 if realtime is True else (math.inf if realtime is False else float(realtime))
    if not speed > 0:
        raise ValueError(f"realtime must be True, False or a positive speed factor, not {realtime!r}")
    x = np.asarray(samples_mV, dtype=np.float64)
    n = max(1, round(frame_s * fs))
    topic = raw_topic(device if shard_count is None else f"{shard_of(device, shard_count)}/{device}", topic_prefix)
    loop = asyncio.get_running_loop()
    began = loop.time()
    sent = 0
    for start in range(0, len(x), n):
        chunk = x[start:start + n]
        if math.isfinite(speed):
            delay = began + (start + len(chunk)) / fs / speed - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        seq = start_seq + start
        stamp = None if t0 is None else t0 + start / fs
        await client.publish(topic, encode_raw(chunk, fs, seq, units=units, t0=stamp, session=session), qos=qos)
        sent += 1
    if end:
        await client.publish(topic, encode_end(session), qos=qos)
    return sent


def shard_subscriptions(shards: Iterable[str | int], prefix: str = RAW_PREFIX) -> list[str]:
    """Subscriptions for a worker that owns these shards of ``<prefix>/<shard>/<device>``."""
    return [f"{prefix.rstrip('/')}/{s}/#" for s in shards]


def shard_of(device: str, shard_count: int) -> int:
    """The shard a device publishes under: the first 8 bytes of SHA-256 of its UTF-8 name, read as
    a big-endian unsigned integer, modulo ``shard_count`` (docs/mqtt.md, "Shards"). Stable across
    runs, processes and languages, so wearables and every edge worker agree without talking."""
    if type(shard_count) is not int or shard_count < 1:
        raise ValueError(f"shard_count must be a positive integer, not {shard_count!r}")
    return int.from_bytes(hashlib.sha256(device.encode()).digest()[:8], "big") % shard_count
