"""Edge workers sharing one broker's raw streams: each device on one worker, shards moving when
workers come and go.

Per-device state (detector thresholds, RR context, persona, the splicer's tail) lives in one
worker's memory, so all of a device's frames must reach one worker, in order. MQTT shared
subscriptions in their usual round-robin form hand consecutive messages of one topic to different
members, which would split a device's stream (DESIGN.md, "Scale"). Here the fleet is split by
topic instead, and the workers agree among themselves who takes which part.

Shards
    A wearable (or the bridge in front of it) publishes on ``<prefix>/<shard>/<device>`` with
    ``shard = shard_of(device, shard_count)`` (:func:`edge.mqtt.shard_of`: SHA-256 of the device
    name modulo a fixed shard count). The shard count is fixed for a deployment and shared by the
    fleet and the workers; it bounds how finely load can be spread (a few times the most workers
    ever run). Wearables know nothing about workers.

Membership
    Each worker announces itself, retained, on ``ecg/edge/<edge_id>/shards`` from the connection
    that receives its raw frames, with a retained last will saying ``offline``::

        {"v": 1, "state": "online", "prefix": "ecg/raw", "shard_count": 16, "shards": [1, 4, 9],
         "instance": "5f0c1a2b3c4d5e6f"}

    ``state`` is ``online``, ``leaving`` (a graceful stop in progress) or ``offline`` (stopped, or
    the will); ``shards`` are the shards the worker processes or has just claimed; ``instance``
    tells two processes with the same edge id apart. The source connection carries this rather
    than the sink's edge status (``ecg/edge/<edge_id>/status``) for three reasons: the member is
    the connection that takes the frames, so when it goes its shards must move whatever the sink
    does; claims must travel on that connection, in the broker's order with the frames, for the
    handover below to be exact; and the edge status stays what subscribers already read.

Assignment
    Rendezvous (highest random weight) hashing: shard ``s`` belongs to the live (``online``)
    member with the largest ``weight(edge_id, s)``. Every worker computes it from the same
    announcements, with no leader and no extra agreement round, and a membership change moves
    only the shards it must: a newcomer takes the shards it now wins, a leaver's shards spread
    over the others, nothing else moves.

Handover
    The broker hands every subscriber the announcements in one order, so all workers see the same
    membership at each announcement. A worker that now owns a shard subscribes to it, waits for
    the broker's SUBACK, then announces its claim. The previous holder keeps processing the shard
    until that claim reaches it, then ends the shard's sessions and unsubscribes; the new owner
    drops the shard's frames until its own claim comes back to it, and processes them from then
    on. The claim is thus a cut in the broker's order: every frame the broker handled before it
    went to the old holder, every frame after it to the new owner, so a rebalance or a graceful
    stop loses no frame and processes none twice (mosquitto serves each client in the order it
    handled the messages; raw frames at QoS 1). A claim that is not the rightful owner's in that
    shared view is void for everyone, so two workers never both keep a shard. A moved device's
    session ends on the old worker (reason ``shard moved``) and a new session starts on the new
    one: a new persona and pseudonym, as for any new session (DESIGN.md, promise 4).

Takeover time
    Graceful stop (SIGINT, :meth:`ShardedSource.leave`): ``leaving``, the others' SUBACK and
    claims, the holder's release: about one announcement round trip plus a subscription. A crash
    whose socket the kernel closes (process killed): the broker sends the will at once, the
    same again. A crash that leaves the socket open (power loss, network cut, frozen process): the
    broker notices after 1.5 x keepalive (``[broker] keepalive``), then the same again. Figures
    measured by tests/test_scaleout.py are in docs/scale-out.md. Frames the broker delivered to a
    crashed worker and frames published while nobody held the shard are lost: the new session
    starts with the first frame after the takeover.

:class:`ShardTable` is the protocol as pure, synchronous logic; :class:`ShardedSource` is an
:class:`edge.mqtt.MqttSource` that runs it on the source's connection; :func:`hand_over_on_stop`
runs the edge so that a stop hands the shards over before the sources close.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from edge.frames import SCHEMA_VERSION, BadInput, SourceEvent
from edge.mqtt import (
    DEVICE_SCHEME,
    EDGE_PREFIX,
    RAW_PREFIX,
    MqttSource,
    shard_subscriptions,
)

log = logging.getLogger(__name__)

ONLINE, LEAVING, OFFLINE = "online", "leaving", "offline"
STATES = (ONLINE, LEAVING, OFFLINE)
ANNOUNCEMENT_SUFFIX = "shards"
MAX_SHARDS = 4096
_EDGE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DUMPS = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


# --------------------------------------------------------------------------------------------
# Assignment (pure)


def weight(edge_id: str, shard: int) -> int:
    """Rendezvous weight of a worker for a shard: the first 8 bytes of SHA-256 of ``<edge_id>/<shard>``."""
    return int.from_bytes(hashlib.sha256(f"{edge_id}/{shard}".encode()).digest()[:8], "big")


def owner(shard: int, members: Iterable[str]) -> str | None:
    """The member that wins the shard (highest weight; the larger id on a tie), or None if no members."""
    return max(members, key=lambda m: (weight(m, shard), m), default=None)


def assignment(members: Iterable[str], shard_count: int) -> dict[str, set[int]]:
    """Every member's shards."""
    members = sorted(set(members))
    out: dict[str, set[int]] = {m: set() for m in members}
    for s in range(shard_count):
        if (m := owner(s, members)) is not None:
            out[m].add(s)
    return out


# --------------------------------------------------------------------------------------------
# Announcements (pure)


def announcement_topic(edge_id: str, prefix: str = EDGE_PREFIX) -> str:
    """``<prefix>/<edge_id>/shards``; ``edge_id`` may be ``+`` for the subscription to all of them."""
    if edge_id != "+" and not _EDGE_ID.fullmatch(edge_id):
        raise ValueError(f"edge_id must be 1-64 characters of [A-Za-z0-9._-], got {edge_id!r}")
    return f"{prefix.rstrip('/')}/{edge_id}/{ANNOUNCEMENT_SUFFIX}"


@dataclass(frozen=True)
class Announcement:
    """One worker's retained announcement (see the module docstring for the payload)."""

    edge_id: str
    state: str
    prefix: str
    shard_count: int
    shards: frozenset[int] = frozenset()
    instance: str = ""

    def encode(self) -> bytes:
        return _DUMPS({
            "v": SCHEMA_VERSION, "state": self.state, "prefix": self.prefix, "shard_count": self.shard_count,
            "shards": sorted(self.shards), "instance": self.instance,
        }).encode()

    @classmethod
    def decode(cls, edge_id: str, payload: bytes | bytearray | str) -> Announcement:
        """Parse an announcement; ValueError says what is wrong with it."""
        try:
            obj = json.loads(payload)
        except (ValueError, RecursionError):
            raise ValueError("not JSON") from None
        if not isinstance(obj, dict) or obj.get("v") != SCHEMA_VERSION:
            raise ValueError(f"not a v{SCHEMA_VERSION} announcement object")
        state, prefix, count, shards, instance = (obj.get(k) for k in ("state", "prefix", "shard_count", "shards",
                                                                          "instance"))
        if state not in STATES:
            raise ValueError(f"'state' must be one of {', '.join(STATES)}, got {state!r}")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError("'prefix' must be a non-empty string")
        if type(count) is not int or not 1 <= count <= MAX_SHARDS:
            raise ValueError(f"'shard_count' must be an integer from 1 to {MAX_SHARDS}, got {count!r}")
        if not isinstance(shards, list) or any(type(s) is not int or not 0 <= s < count for s in shards):
            raise ValueError(f"'shards' must be a list of integers from 0 to {count - 1}")
        if type(instance) is not str:
            raise ValueError("'instance' must be a string")
        return cls(edge_id, state, prefix, count, frozenset(shards), instance)


# --------------------------------------------------------------------------------------------
# The protocol (pure)


@dataclass
class Change:
    """What one announcement changed for this worker."""

    released: set[int] = field(default_factory=set)  # shards to stop processing: end their sessions
    activated: set[int] = field(default_factory=set)  # claimed shards whose frames are processed from now on
    joined: bool = False  # this worker's first own announcement came back: its view is complete
    reannounce: bool = False  # another process announced under this edge id: put our state back


class ShardTable:
    """One worker's view of the cluster and its shards, driven by announcements in broker order.

    ``held`` shards have their frames processed here; ``claimed`` shards are subscribed and
    announced, waiting for the claim to come back. Feed every announcement (this worker's own
    included) to :meth:`receive` in the order the broker delivered them; see the module docstring.
    """

    def __init__(self, edge_id: str, prefix: str, shard_count: int, instance: str) -> None:
        if not _EDGE_ID.fullmatch(edge_id):
            raise ValueError(f"edge_id must be 1-64 characters of [A-Za-z0-9._-], got {edge_id!r}")
        if type(shard_count) is not int or not 1 <= shard_count <= MAX_SHARDS:
            raise ValueError(f"shard_count must be an integer from 1 to {MAX_SHARDS}, got {shard_count!r}")
        self.edge_id = edge_id
        self.prefix = prefix
        self.shard_count = shard_count
        self.instance = instance
        self.members: dict[str, Announcement] = {}
        self.held: set[int] = set()
        self.claimed: set[int] = set()
        self.joined = False
        self.leaving = False

    def live(self) -> list[str]:
        """Members that take shards: those whose latest announcement says ``online``."""
        return sorted(e for e, a in self.members.items() if a.state == ONLINE)

    def owner(self, shard: int) -> str | None:
        return owner(shard, self.live())

    def wanted(self) -> set[int]:
        """Shards this worker owns in the current view (none before it joined or once it leaves)."""
        live = self.live()
        if not self.joined or self.leaving or self.edge_id not in live:
            return set()
        return {s for s in range(self.shard_count) if owner(s, live) == self.edge_id}

    def to_claim(self) -> set[int]:
        return self.wanted() - self.held - self.claimed

    def subscriptions(self) -> set[int]:
        """Shards to be subscribed to: held (until handed over), claimed and wanted."""
        return self.held | self.claimed | self.wanted()

    def announcement(self) -> Announcement:
        """This worker's announcement now: ``online`` with its claims, or ``leaving`` with what it still holds."""
        if self.leaving:
            return Announcement(self.edge_id, LEAVING, self.prefix, self.shard_count, frozenset(self.held),
                                self.instance)
        return Announcement(self.edge_id, ONLINE, self.prefix, self.shard_count,
                            frozenset(self.held | self.claimed), self.instance)

    def offline(self) -> Announcement:
        """The announcement of a stopped worker (and its last will)."""
        return Announcement(self.edge_id, OFFLINE, self.prefix, self.shard_count, frozenset(), self.instance)

    def receive(self, ann: Announcement) -> Change:
        """Apply one announcement. Another cluster's (another raw prefix) is ignored; ValueError
        for one of this cluster with a different shard count (a configuration error)."""
        change = Change()
        if ann.prefix != self.prefix:
            return change
        if ann.shard_count != self.shard_count:
            raise ValueError(f"worker {ann.edge_id!r} shares {ann.prefix}/ with shard_count {ann.shard_count}, "
                             f"this one with {self.shard_count}: its announcements are ignored")
        mine = ann.edge_id == self.edge_id and ann.instance == self.instance
        if ann.edge_id == self.edge_id and not mine and self.joined and not self.leaving:
            change.reannounce = True
        self.members[ann.edge_id] = ann
        if mine and ann.state == ONLINE and not self.joined:
            self.joined = change.joined = True
        if ann.state == ONLINE:
            live = self.live()
            for s in ann.shards:
                if owner(s, live) != ann.edge_id:  # void: not the rightful owner in the shared view
                    if mine:
                        self.claimed.discard(s)
                    continue
                if mine:
                    if s in self.claimed:
                        self.claimed.discard(s)
                        self.held.add(s)
                        change.activated.add(s)
                else:
                    self.claimed.discard(s)
                    if s in self.held:
                        self.held.discard(s)
                        change.released.add(s)
        change.released |= self._no_one_to_hand_to()
        return change

    def forget(self, edge_id: str) -> Change:
        """A worker's retained announcement was cleared: it is no member any more."""
        self.members.pop(edge_id, None)
        return Change(released=self._no_one_to_hand_to())

    def leave(self) -> Change:
        """Start a graceful stop: stop claiming; held shards go as their new owners claim them."""
        self.leaving = True
        self.claimed.clear()
        return Change(released=self._no_one_to_hand_to())

    def reset(self) -> set[int]:
        """The connection is gone (its will hands the shards on): forget everything; returns what was held."""
        released = set(self.held)
        self.members.clear()
        self.held.clear()
        self.claimed.clear()
        self.joined = False
        return released

    def _no_one_to_hand_to(self) -> set[int]:
        if not self.leaving or not self.held or any(e != self.edge_id for e in self.live()):
            return set()
        released, self.held = self.held, set()
        return released


# --------------------------------------------------------------------------------------------
# The source


class ShardedSource(MqttSource):
    """An :class:`MqttSource` that takes the shards of ``<prefix>/<shard>/<device>`` this worker
    owns among the live workers, and follows membership changes (see the module docstring).

    ``edge_id`` names the worker (its announcement topic; keep it stable across restarts so a
    worker gets its shards back); ``shard_count`` must be the fleet's. Other keyword arguments go
    to :class:`MqttSource`. :attr:`not_held` counts frames dropped because their shard is not (or
    not yet) this worker's.
    """

    def __init__(
        self,
        broker: Any,
        topic_prefix: str = RAW_PREFIX,
        *,
        edge_id: str,
        shard_count: int,
        status_prefix: str = EDGE_PREFIX,
        handover_timeout_s: float = 10.0,
        resync_s: float = 60.0,
        **kwargs: Any,
    ) -> None:
        prefix = topic_prefix.rstrip("/")
        self.table = ShardTable(edge_id, prefix, shard_count, secrets.token_hex(8))
        self.announce_topic = announcement_topic(edge_id, status_prefix)
        self.control = announcement_topic("+", status_prefix)
        self._control_head = status_prefix.rstrip("/") + "/"
        will = aiomqtt.Will(self.announce_topic, self.table.offline().encode(), qos=1, retain=True)
        super().__init__(broker, prefix, will=will, **kwargs)
        self.subscriptions = []
        self.handover_timeout_s = handover_timeout_s
        self.resync_s = resync_s
        self.not_held = 0
        #: Set once this worker's own first announcement came back (its view is complete).
        self.joined = asyncio.Event()
        self._outbox: list[SourceEvent] = []
        self._dirty = asyncio.Event()
        self._handed_over = asyncio.Event()
        self._reannounce = False
        self._announced: Announcement | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self._warned: set[str] = set()

    @property
    def edge_id(self) -> str:
        return self.table.edge_id

    @property
    def held(self) -> set[int]:
        """The shards whose frames this worker processes now."""
        return set(self.table.held)

    async def leave(self) -> bool:
        """Hand this worker's shards to the others before it stops: announce ``leaving``, keep
        processing each shard until its new owner's claim comes through, then announce ``offline``.
        True if every shard was handed over within ``handover_timeout_s``."""
        self._release(self.table.leave())
        client = self._client
        if client is None:
            return not self.table.held
        self._handed_over.clear()
        if not self.table.held:
            self._handed_over.set()
        ok = False
        try:
            await self._announce(client)
            async with asyncio.timeout(self.handover_timeout_s):
                await self._handed_over.wait()
            ok = True
        except TimeoutError:
            log.warning("cluster: shards %s not taken over within %g s; stopping anyway",
                        _ranges(self.table.held), self.handover_timeout_s)
        except aiomqtt.MqttError as exc:
            log.warning("cluster: connection lost while handing over (%s)", exc)
        await self._stop_reconciler()  # nothing may announce after "offline"
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(self.announce_topic, self.table.offline().encode(), qos=1, retain=True)
        if ok:
            log.info("cluster: %s handed its shards over and left", self.edge_id)
        return ok

    async def aclose(self) -> None:
        await super().aclose()
        await self._stop_reconciler()

    async def _stop_reconciler(self) -> None:
        task = self._reconciler
        while task is not None and not task.done():  # Python 3.11's wait_for (in aiomqtt) can swallow a cancellation
            task.cancel()
            await asyncio.wait((task,), timeout=0.5)

    # MqttSource hooks -------------------------------------------------------------------------

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        self._outbox += self._end_shards(self.table.reset())  # normally none: _on_disconnect released them
        await client.subscribe(self.control, qos=1)  # every worker's retained announcement, then live ones
        await self._announce(client)  # it comes back after all of them: the view is complete then
        self._reconciler = asyncio.create_task(self._reconcile(client), name=f"cluster-{self.edge_id}")

    def _receive(self, topic: str, payload: bytes | bytearray | str, now: float) -> list[SourceEvent]:
        if topic.startswith(self._control_head) and topic.endswith("/" + ANNOUNCEMENT_SUFFIX):
            return self._on_announcement(topic[len(self._control_head):-len(ANNOUNCEMENT_SUFFIX) - 1], payload)
        shard = self._shard(topic)
        if shard is None:
            return [BadInput("topic", f"MQTT {topic!r}: not a sharded raw topic {self.topic_prefix}/<shard>/<device> "
                                      f"with a shard below {self.table.shard_count}")]
        if shard not in self.table.held:
            self.not_held += 1  # not ours (yet, or any more): its holder processes it
            return []
        return self.streams.feed(topic, payload, now)

    def _expire(self, now: float) -> list[SourceEvent]:
        out, self._outbox = self._outbox, []
        return out + super()._expire(now)

    def _on_disconnect(self) -> None:
        if self._reconciler is not None:
            self._reconciler.cancel()
        self.joined.clear()
        released = self.table.reset()
        self.subscriptions = []
        if released:
            log.warning("cluster: %s disconnected; its will hands shards %s to the other workers",
                        self.edge_id, _ranges(released))
        self._outbox += self._end_shards(released)
        if self.table.leaving:
            self._handed_over.set()

    # Internals --------------------------------------------------------------------------------

    def _shard(self, topic: str) -> int | None:
        level, sep, device = topic[len(self.topic_prefix) + 1:].partition("/")
        if not sep or not device or not level.isascii() or not level.isdigit() or str(int(level)) != level:
            return None
        shard = int(level)
        return shard if shard < self.table.shard_count else None

    def _end_shards(self, shards: set[int]) -> list[SourceEvent]:
        if not shards:
            return []
        head = len(DEVICE_SCHEME)
        devices = [d for d in self.streams.live if d.startswith(DEVICE_SCHEME)
                   and d[head:].partition("/")[0].isdigit() and int(d[head:].partition("/")[0]) in shards]
        return list(self.streams.end(devices, "shard moved"))

    def _release(self, change: Change) -> None:
        """Releases outside a received message reach the pipeline at the next tick."""
        if change.released:
            log.info("cluster: %s released shards %s", self.edge_id, _ranges(change.released))
            self._outbox += self._end_shards(change.released)
        if self.table.leaving and not self.table.held:
            self._handed_over.set()

    def _on_announcement(self, edge_id: str, payload: bytes | bytearray | str) -> list[SourceEvent]:
        try:
            change = self.table.forget(edge_id) if not payload else self.table.receive(
                Announcement.decode(edge_id, payload))
        except ValueError as exc:
            if edge_id not in self._warned:  # once per worker, not once per announcement
                self._warned.add(edge_id)
                log.warning("cluster: announcement of %r ignored: %s", edge_id, exc)
            return []
        if change.joined:
            self.joined.set()
            log.info("cluster: %s joined; live workers: %s", self.edge_id, ", ".join(self.table.live()))
        if change.reannounce:
            log.warning("cluster: another process announced itself as %r (an earlier run whose connection the "
                        "broker has not timed out yet, or a duplicate edge_id); announcing this one again",
                        self.edge_id)
            self._reannounce = True
        if change.activated:
            log.info("cluster: %s took shards %s", self.edge_id, _ranges(change.activated))
        events: list[SourceEvent] = []
        if change.released:
            log.info("cluster: %s handed shards %s over", self.edge_id, _ranges(change.released))
            events = self._end_shards(change.released)
        if self.table.leaving and not self.table.held:
            self._handed_over.set()
        self._dirty.set()
        return events

    async def _announce(self, client: aiomqtt.Client) -> None:
        self._announced = ann = self.table.announcement()
        await client.publish(self.announce_topic, ann.encode(), qos=1, retain=True)

    async def _reconcile(self, client: aiomqtt.Client) -> None:
        """Subscribe to what this worker should hold, claim it once subscribed, drop the rest."""
        table = self.table
        while True:
            try:
                try:
                    async with asyncio.timeout(self.resync_s):
                        await self._dirty.wait()
                except TimeoutError:  # anti-entropy: the broker re-sends every retained announcement
                    await client.subscribe(self.control, qos=1)
                    continue
                self._dirty.clear()
                if not table.joined:
                    continue
                await self.update_subscriptions(shard_subscriptions(sorted(table.subscriptions()), self.topic_prefix))
                subscribed = set(self.subscriptions)
                new = {s for s in table.to_claim() if shard_subscriptions([s], self.topic_prefix)[0] in subscribed}
                table.claimed |= new
                # Claims, and what was released or void since: the retained announcement says what this
                # worker holds now.
                if self._reannounce or table.announcement() != self._announced:
                    self._reannounce = False
                    await self._announce(client)
            except aiomqtt.MqttError as exc:
                if self._client is not client:
                    return  # the connection is gone; the next one starts its own
                log.warning("cluster: %s; retrying in 1 s", exc)
                await asyncio.sleep(1.0)
                self._dirty.set()
            except Exception:  # a bug here must not leave shards unclaimed without a trace
                log.exception("cluster: reconciling shards failed; retrying in 1 s")
                await asyncio.sleep(1.0)
                self._dirty.set()


def _ranges(shards: Iterable[int]) -> str:
    """``[0-3, 7, 9-10]``: a shard set for the log."""
    runs: list[list[int]] = []
    for s in sorted(shards):
        if runs and runs[-1][1] == s - 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return "[" + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) + "]"


async def hand_over_on_stop(run: Coroutine[Any, Any, None], members: Sequence[ShardedSource]) -> None:
    """Run the edge (``EdgeService.run``); when cancelled (Ctrl-C), first hand every member's
    shards over while the edge keeps processing them, then stop it."""
    task = asyncio.ensure_future(run)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            for outcome in await asyncio.gather(*(m.leave() for m in members), return_exceptions=True):
                if isinstance(outcome, Exception):
                    log.error("cluster: handing shards over failed", exc_info=outcome)
            while not task.done():  # Python 3.11's wait_for (in aiomqtt) can swallow a cancellation
                task.cancel()
                await asyncio.wait((task,), timeout=1.0)
        if not task.cancelled() and task.exception() is not None:
            log.error("the edge failed while stopping", exc_info=task.exception())
        raise
