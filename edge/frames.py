"""What flows between the edge's sources, its pipeline and its sinks.

Sources (BLE, MQTT raw, WFDB replay) yield :class:`Frame`, :class:`SessionEnd` and
:class:`BadInput` events; the pipeline turns frames into :class:`AnonFrame` and :class:`AnonBeat`
and hands them to sinks (MQTT anonymized topics, WFDB files, memory) under a pseudonym.

A ``Frame`` holds the wearer's raw samples and its device key: neither ever reaches a sink. Sinks
only see pseudonyms, synthetic samples and beat classes (DESIGN.md, promises 1 and 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Union

import numpy as np

#: Schema version of every payload the edge publishes or accepts (docs/mqtt.md).
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Frame:
    """Raw samples of one wearable, in millivolts. Stays inside the edge."""

    device: str  # source-qualified key, e.g. "ble:C0:FF:EE:..", "mqtt:strap-7", "wfdb:208"
    samples: np.ndarray  # float64 (n,), mV; NaN marks a sample the device flagged invalid
    fs: float  # Hz
    seq: int | None = None  # index of samples[0] in the device's session, when the source counts samples
    timestamp: float | None = None  # time of samples[0] (Unix seconds, sensor clock), when known


@dataclass(frozen=True)
class SessionEnd:
    """The device disconnected or stopped; its next frame starts a new session (new persona)."""

    device: str
    reason: str = "disconnected"


@dataclass(frozen=True)
class BadInput:
    """Input a source could not turn into a frame (garbage bytes, a bad payload...).

    ``kind`` is a short label for the counter (``garbage``, ``schema``, ``rate``, ``oversize``,
    ``nan``, ``gap``, ...); ``detail`` says what was wrong, for the log. Never carries samples.
    """

    kind: str
    detail: str
    device: str | None = None


SourceEvent = Union[Frame, SessionEnd, BadInput]


@dataclass(frozen=True)
class AnonFrame:
    """Synthetic output samples of one session, aligned sample for sample with its input."""

    pseudonym: str
    fs: float
    start: int  # index of samples[0] in the session's output (== input) sample clock
    samples: np.ndarray  # float64 (n,), mV; NaN where the output is masked (fail closed)
    timestamp: float | None = None  # time of samples[0] when the input carried time

    @property
    def masked(self) -> np.ndarray:
        return np.isnan(self.samples)


@dataclass(frozen=True)
class AnonBeat:
    """One emitted surrogate: its R-peak sample (the input beat's) and the AAMI class it carries."""

    pseudonym: str
    sample: int
    label: str
    fs: float
    timestamp: float | None = None
    model: str | None = None  # version of the generator that rendered it (models change while running)


@dataclass
class SessionInfo:
    """What a subscriber may know about a session: nothing about the wearer."""

    pseudonym: str
    fs: float
    state: str = "online"  # online | ended
    models: dict[str, str] = field(default_factory=dict)  # kind -> model version
    started: float | None = None  # Unix seconds


class Sink(Protocol):
    """Where anonymized output goes. Calls come from the edge's event loop, in stream order."""

    async def session_started(self, info: SessionInfo) -> None: ...

    async def emit(self, frames: list[AnonFrame], beats: list[AnonBeat]) -> None: ...

    async def session_ended(self, info: SessionInfo) -> None: ...
