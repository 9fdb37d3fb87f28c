"""Model refresh while the edge runs: signed announcements in, checked, warmed up, swapped in.

The refresher subscribes ``<prefix>/+`` (``ecg/models/+``; retained messages included, so an edge
that starts or reconnects learns the newest announced model at once) and takes every
announcement through these steps, in order, keeping the running model on any failure:

1. signature, size and SHA-256 (:func:`edge.announce.decode`);
2. the topic and the signed header name the same kind;
3. newer than the running model of that kind: an older or equal version is a replay and is
   refused; the very model that runs, announced again (a retained message seen after a
   reconnect), is ``current`` and changes nothing;
4. loaded with onnxruntime on a worker thread, its contract checked against what runs now (the
   codec, the classes, the RR features, and for a generator the persona size, so that live
   sessions' personas still fit) and its version against the header's;
5. warmed up on that thread, off the event loop, so streams keep flowing meanwhile;
6. swapped in with :meth:`Anonymizer.swap_models` on the event loop. The pipeline runs each
   tick's model batch synchronously on that loop, so the swap lands between two batches: no
   batch mixes two models, no stream has a gap, and no sample goes out unrendered.

Every outcome is a log line and ``ecg_edge_model_refresh_total{kind,result}`` (``accepted``,
``current`` or the refusal reason); refusals and swaps also go to ``report`` (the MQTT sink's
retained edge status: models in use, last accepted, last refusal). docs/model-refresh.md.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge import announce
from edge.announce import DEFAULT_MAX_MODEL_BYTES, KINDS, AnnouncementError
from edge.codec import CodecSpec
from edge.models import (
    GENERATOR,
    ClassifierSession,
    GeneratorSession,
    ModelContractError,
    ModelSession,
)
from edge.mqtt import BrokerConfig
from edge.pipeline import Anonymizer
from edge.stream import RR_FEATURES

log = logging.getLogger(__name__)

MODELS_PREFIX = "ecg/models"
ACCEPTED, CURRENT = "accepted", "current"
#: Refusal reasons besides the envelope's own (edge.announce.REASONS).
REFUSALS = {
    **announce.REASONS,
    "topic": "a topic that names no model kind",
    "contract": "a model that does not fit what this edge runs",
    "replay": "a version not newer than the running one",
    "error": "an unexpected failure while loading",
}


def models_topic(kind: str, prefix: str = MODELS_PREFIX) -> str:
    """Where announcements of one model kind are retained: ``<prefix>/<kind>``."""
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {', '.join(KINDS)}, not {kind!r}")
    return f"{prefix.rstrip('/')}/{kind}"


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Order of model versions: parts split at ``. - _ +``, digits compared as numbers, digits
    before letters (``2026.11.25.164711`` < ``2026.11.26.000000``; ``1.10`` > ``1.9``)."""
    return tuple((0, int(p), "") if p.isascii() and p.isdigit() else (1, 0, p) for p in re.split(r"[._+-]", version))


@dataclass(frozen=True)
class RefreshOutcome:
    """What became of one announcement."""

    kind: str  # generator, classifier, or "unknown" for a topic that names neither
    result: str  # accepted, current, or a refusal reason (REFUSALS)
    detail: str
    version: str | None = None  # the announced version, once the header is verified
    sha256: str | None = None
    at: float = field(default_factory=time.time)
    seconds: dict[str, float] = field(default_factory=dict)  # verify / load_warm_up / swap, when accepted

    @property
    def refused(self) -> bool:
        return self.result not in (ACCEPTED, CURRENT)

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "result": self.result}
        if self.version is not None:
            out["version"] = self.version
        if self.refused:
            out["detail"] = self.detail
        out["at"] = round(self.at, 3)
        return out


class ModelRefresher:
    """Takes signed model announcements from MQTT into a running Anonymizer; see the module docstring.

    Use as ``async with ModelRefresher(...)``: it subscribes in the background, reconnecting with
    back-off, and ``ready`` is set while subscribed. :meth:`handle` runs the checks and the swap
    for one message (what the subscription calls).
    """

    def __init__(
        self,
        broker: BrokerConfig,
        anonymizer: Anonymizer,
        public_keys: Sequence[Ed25519PublicKey],
        *,
        topic_prefix: str = MODELS_PREFIX,
        max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
        report: Callable[..., Awaitable[None]] | None = None,
        threads: int = 1,
        qos: int = 1,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
    ) -> None:
        if not public_keys:
            raise ValueError("model refresh needs at least one trusted public key (refresh.public_keys)")
        self.broker = broker
        self.anonymizer = anonymizer
        self.keys = list(public_keys)
        self.prefix = topic_prefix.rstrip("/")
        self.max_model_bytes = max_model_bytes
        self.report = report
        self.threads = threads
        self.qos = qos
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.ready = asyncio.Event()
        self.history: deque[RefreshOutcome] = deque(maxlen=100)
        self.last_accepted: RefreshOutcome | None = None
        self.last_refusal: RefreshOutcome | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def subscription(self) -> str:
        return f"{self.prefix}/+"

    # Lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="model-refresh")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        # Cancel until it takes: on Python 3.11, asyncio.wait_for inside aiomqtt can swallow a
        # cancellation that arrives together with its result.
        while not task.done():
            task.cancel()
            await asyncio.wait((task,), timeout=0.5)
        if not task.cancelled() and task.exception() is not None:
            log.error("model refresh: subscription task failed", exc_info=task.exception())

    async def _run(self) -> None:
        delay = self.reconnect_min_s
        while True:
            client = self.broker.client("refresh")
            try:
                async with client:
                    granted = await client.subscribe(self.subscription, qos=self.qos)
                    code = granted[0] if granted else 0x80
                    failure = getattr(code, "is_failure", None)
                    if (bool(failure) if failure is not None else int(code) >= 0x80):
                        raise aiomqtt.MqttError(f"broker refused the subscription to {self.subscription}")
                    self.ready.set()
                    delay = self.reconnect_min_s
                    log.info("model refresh: subscribed to %s on %s (%d trusted key(s))", self.subscription,
                             self.broker, len(self.keys))
                    async for message in client.messages:
                        payload = message.payload
                        if not isinstance(payload, (bytes, bytearray)):
                            payload = b"" if payload is None else str(payload).encode()
                        await self.handle(str(message.topic), bytes(payload))
            except aiomqtt.MqttError as exc:
                log.warning("model refresh: broker %s unreachable or lost (%s); retrying in %.1f s",
                            self.broker, exc, delay)
            finally:
                self.ready.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max_s)

    # One announcement ---------------------------------------------------------------------

    async def handle(self, topic: str, payload: bytes) -> RefreshOutcome | None:
        """Check one announcement and swap its model in, or refuse it; None for a cleared topic."""
        async with self._lock:  # one at a time: each compares against what the last one left running
            outcome = await self._handle(topic, payload)
        if outcome is not None:
            self.history.append(outcome)  # last: whoever watches this sees the status already out
        return outcome

    async def _handle(self, topic: str, payload: bytes) -> RefreshOutcome | None:
        kind = topic[len(self.prefix) + 1:] if topic.startswith(self.prefix + "/") else ""
        if kind not in KINDS:
            return await self._refuse("unknown", "topic", f"{topic!r} is not {self.prefix}/<{'|'.join(KINDS)}>")
        if not payload:  # how MQTT deletes a retained message: nothing to load, nothing refused
            log.info("model refresh: the announcement on %s was cleared; the running %s stays", topic, kind)
            return None
        began = time.perf_counter()
        try:
            ann = announce.decode(payload, self.keys, self.max_model_bytes)
        except AnnouncementError as exc:
            return await self._refuse(kind, exc.reason, exc.detail)
        if ann.kind != kind:
            return await self._refuse(kind, "contract", f"a {ann.kind} announced on the {kind} topic {topic}", ann)
        running = self._running(kind)
        if running is not None:
            now = running.contract.version
            if ann.version == now and ann.sha256 == running.sha256:
                log.info("model refresh: the %s announcement is the model already running (v%s)", kind, now)
                return self._record(RefreshOutcome(kind, CURRENT, f"{kind} v{now} is the one running", ann.version,
                                                   ann.sha256))
            if version_key(ann.version) <= version_key(now):
                what = "the same version with other bytes" if ann.version == now else "an older version"
                return await self._refuse(kind, "replay", f"v{ann.version} is not newer than the running v{now} "
                                                          f"({what})", ann)
        verified = time.perf_counter()
        spec, classes = self.anonymizer.spec, self.anonymizer.spec_classes()
        persona_dim = self.anonymizer.generator.contract.persona_dim if self.anonymizer.generator else None
        try:
            session = await asyncio.to_thread(self._load, ann, spec, classes, persona_dim)
        except ModelContractError as exc:
            return await self._refuse(kind, "contract", str(exc).replace("<bytes>", "the announced model"), ann)
        except Exception as exc:  # noqa: BLE001 - whatever onnxruntime raises, the running model stays
            return await self._refuse(kind, "error", f"loading failed: {type(exc).__name__}: {exc}", ann)
        loaded = time.perf_counter()
        old = self._running(kind)
        self.anonymizer.swap_models(**{kind: session})  # on the loop, between two ticks' batches
        swapped = time.perf_counter()
        seconds = {"verify": verified - began, "load_warm_up": loaded - verified, "swap": swapped - loaded}
        outcome = RefreshOutcome(kind, ACCEPTED, f"{kind} v{old.contract.version if old else '-'} -> v{ann.version}",
                                 ann.version, ann.sha256, seconds=seconds)
        self.last_accepted = self._record(outcome)
        log.info("model refresh: %s v%s (sha256 %s…, key %s) in use: verified in %.1f ms, loaded and warmed up in "
                 "%.1f ms off the event loop, swapped in %.1f µs", kind, ann.version, ann.sha256[:12], ann.key_id,
                 1e3 * seconds["verify"], 1e3 * seconds["load_warm_up"], 1e6 * seconds["swap"])
        await self._report()
        return outcome

    def _load(self, ann: announce.Announcement, spec: CodecSpec, classes: tuple[str, ...],
              persona_dim: int | None) -> ModelSession:
        """Build, check and warm up a session (worker thread: nothing here touches the pipeline)."""
        cls = GeneratorSession if ann.kind == GENERATOR else ClassifierSession
        session = cls(ann.model, codec=spec, classes=classes, threads=self.threads, warm_up=False)
        c = session.contract
        if c.version != ann.version:
            raise ModelContractError(f"the model's metadata says version {c.version}, its announcement {ann.version}")
        unknown = [f for f in c.rr_features if f not in RR_FEATURES]
        if unknown:
            raise ModelContractError(f"the model asks for RR features {unknown}; the edge computes {RR_FEATURES}")
        if ann.kind == GENERATOR and persona_dim is not None and c.persona_dim != persona_dim:
            raise ModelContractError(f"the model takes personas of {c.persona_dim} values, the running generator "
                                     f"{persona_dim}: live sessions' personas would not fit")
        session.warm_up()
        return session

    def _running(self, kind: str) -> ModelSession | None:
        return self.anonymizer.generator if kind == GENERATOR else self.anonymizer.classifier

    def _record(self, outcome: RefreshOutcome) -> RefreshOutcome:
        self.anonymizer.metrics.model_refresh.labels(outcome.kind, outcome.result).inc()
        return outcome

    async def _refuse(self, kind: str, reason: str, detail: str,
                      ann: announce.Announcement | None = None) -> RefreshOutcome:
        running = self._running(kind) if kind in KINDS else None
        outcome = RefreshOutcome(kind, reason, detail, ann.version if ann else None, ann.sha256 if ann else None)
        self.last_refusal = self._record(outcome)
        log.warning("model refresh: %s announcement refused (%s): %s; keeping %s", kind, reason, detail,
                    f"v{running.contract.version}" if running else "the running models")
        await self._report()
        return outcome

    # Reporting ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Fields for the edge's retained status: models in use and the last refresh outcomes."""
        refresh: dict[str, Any] = {}
        if self.last_accepted is not None:
            refresh["last_accepted"] = self.last_accepted.to_status()
        if self.last_refusal is not None:
            refresh["last_refusal"] = self.last_refusal.to_status()
        return {"models": self.anonymizer.models(), "refresh": refresh}

    async def _report(self) -> None:
        if self.report is None:
            return
        try:
            await self.report(**self.status())
        except Exception:  # a status that cannot go out must not undo a swap
            log.exception("model refresh: could not publish the edge status")
