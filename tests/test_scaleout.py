"""Several edge workers sharing one broker's raw streams (edge/cluster.py, docs/scale-out.md).

The shard protocol runs first as pure logic, its announcements delivered to every worker's table
in one order as a broker would; then three real ``ecg-edge run`` processes with the shipped ONNX
models share twelve wearables through a real mosquitto, and one of them stops: gracefully
(SIGTERM, what Docker and systemd send), frozen with its sockets left open (SIGSTOP, found out by the broker's keepalive), or
killed (SIGKILL). A subscriber counts every anonymized sample per device and per worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import IO

import aiomqtt
import numpy as np
import pytest

from edge.cluster import (
    LEAVING,
    OFFLINE,
    ONLINE,
    Announcement,
    Change,
    ShardTable,
    announcement_topic,
    assignment,
    owner,
)
from edge.config import ConfigError, load_config
from edge.frames import Frame
from edge.mqtt import BrokerConfig, MqttSource, publish_record, shard_of
from edge.replay import read_wfdb

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent


# --------------------------------------------------------------------------------------------
# Shards and assignment


def test_shard_of_is_the_documented_stable_hash() -> None:
    # Pinned values (docs/mqtt.md): wearables in any language must compute the same.
    assert shard_of("strap-7", 16) == 2
    assert shard_of("wearable-0000", 16) == 11
    assert shard_of("strap-7", 1) == 0
    counts = np.bincount([shard_of(f"device-{i}", 16) for i in range(3200)], minlength=16)
    assert counts.min() > 140 and counts.max() < 260  # 200 expected per shard
    with pytest.raises(ValueError, match="shard_count"):
        shard_of("strap-7", 0)


def test_rendezvous_moves_only_the_shards_it_must() -> None:
    n = 64
    three = assignment(["a", "b", "c"], n)
    assert sorted(s for shards in three.values() for s in shards) == list(range(n))  # one owner each
    assert all(12 <= len(shards) <= 32 for shards in three.values())
    two = assignment(["a", "c"], n)
    for s in range(n):  # b leaves: only b's shards move, the others stay where they were
        before, after = owner(s, ["a", "b", "c"]), owner(s, ["a", "c"])
        assert after == before or before == "b"
    assert two["a"] >= three["a"] and two["c"] >= three["c"]
    four = assignment(["a", "b", "c", "d"], n)
    for m in "abc":  # d joins: it only takes shards, nobody else's change hands
        assert four[m] <= three[m]
    assert four["d"] and owner(0, []) is None


# --------------------------------------------------------------------------------------------
# The handover protocol, delivered in one broker order


PREFIX = "ecg/raw"


class Cluster:
    """Tables of several workers and the one order in which the broker delivers announcements."""

    def __init__(self, shard_count: int = 32) -> None:
        self.n = shard_count
        self.tables: dict[str, ShardTable] = {}
        self.log: list[tuple[str, dict[str, Change]]] = []

    def add(self, edge_id: str) -> ShardTable:
        table = ShardTable(edge_id, PREFIX, self.n, uuid.uuid4().hex[:8])
        # A newcomer first gets every retained announcement (the latest of each worker)...
        for other in self.tables.values():
            if other.edge_id in other.members:
                table.receive(other.members[other.edge_id])
        self.tables[edge_id] = table
        return table

    def publish(self, ann: Announcement) -> dict[str, Change]:
        changes = {e: t.receive(ann) for e, t in self.tables.items()}
        self.log.append((ann.edge_id, changes))
        return changes

    def join(self, edge_id: str) -> dict[str, Change]:
        """Announce, then (once subscribed) claim; return what the claim changed."""
        table = self.add(edge_id)
        assert self.publish(table.announcement())[edge_id].joined
        return self.claim(edge_id)

    def claim(self, edge_id: str) -> dict[str, Change]:
        table = self.tables[edge_id]
        table.claimed |= table.to_claim()
        return self.publish(table.announcement())

    def held(self) -> dict[str, set[int]]:
        return {e: set(t.held) for e, t in self.tables.items()}


def test_a_joining_worker_takes_its_shards_at_its_claim_and_nothing_is_held_twice() -> None:
    c = Cluster()
    c.join("a")
    assert c.held() == {"a": set(range(32))}
    announced = c.publish(c.add("b").announcement())  # b is live now: a still holds b's shards
    assert announced["b"].joined and not announced["a"].released
    assert c.tables["a"].held == set(range(32)) and c.tables["b"].to_claim() == assignment("ab", 32)["b"]
    claim = c.claim("b")  # the claim is the cut: a lets go of exactly what b takes, at the same message
    assert claim["a"].released == claim["b"].activated == assignment("ab", 32)["b"]
    c.join("c")
    held = c.held()
    assert held == assignment("abc", 32)
    assert set().union(*held.values()) == set(range(32)) and sum(map(len, held.values())) == 32


def test_a_leaving_worker_keeps_its_shards_until_each_new_owner_claims_them() -> None:
    c = Cluster()
    for e in "abc":
        c.join(e)
    b_shards = set(c.tables["b"].held)
    c.tables["b"].leave()
    c.publish(c.tables["b"].announcement())  # "leaving": not live, but still processing
    assert c.tables["b"].held == b_shards and c.tables["b"].announcement().state == LEAVING
    to_a = c.tables["a"].to_claim()
    assert to_a and to_a | c.tables["c"].to_claim() == b_shards
    assert c.claim("a")["b"].released == to_a
    assert c.claim("c")["b"].released == b_shards - to_a
    assert c.held() == {**assignment("ac", 32), "b": set()}


def test_a_crashed_worker_s_shards_are_claimed_after_its_will() -> None:
    c = Cluster()
    for e in "abc":
        c.join(e)
    c.publish(c.tables["b"].offline())  # the will, as the broker publishes it
    del c.tables["b"]  # a dead worker receives nothing
    c.claim("a")
    c.claim("c")
    assert c.held() == assignment("ac", 32)


def test_a_claim_that_is_no_longer_rightful_is_void_for_everyone() -> None:
    c = Cluster()
    c.join("a")
    b = c.add("b")
    c.publish(b.announcement())
    b.claimed |= b.to_claim()  # b claims from its view of {a, b} ...
    stale = b.announcement()
    c.join("d")  # ... but d joins before the broker handles b's claim
    changes = c.publish(stale)
    lost = {s for s in stale.shards if owner(s, "abd") != "b"}
    assert lost  # shards d now wins: b does not take them, nobody lets go of them for b
    assert not changes["b"].activated & lost and not (changes["a"].released | changes["d"].released) & lost
    assert not b.claimed & lost
    c.claim("b")
    held = c.held()
    assert held == assignment("abd", 32) and sum(map(len, held.values())) == 32


def test_the_last_worker_leaving_lets_go_at_once() -> None:
    c = Cluster(8)
    c.join("a")
    assert c.tables["a"].leave().released == set(range(8))
    assert c.tables["a"].wanted() == set()
    # Leaving while the only other worker's retained announcement is cleared: nobody will claim.
    c = Cluster(8)
    c.join("a")
    c.join("b")
    c.tables["a"].leave()
    c.publish(c.tables["a"].announcement())
    assert c.tables["a"].held and c.tables["a"].forget("b").released == assignment("ab", 8)["a"]


def test_other_clusters_are_ignored_and_a_different_shard_count_is_reported() -> None:
    c = Cluster(8)
    c.join("a")
    other = Announcement("x", ONLINE, "elsewhere/raw", 8, frozenset(range(8)), "i")
    assert c.publish(other)["a"] == Change() and c.tables["a"].live() == ["a"]
    with pytest.raises(ValueError, match="shard_count 16"):
        c.tables["a"].receive(Announcement("y", ONLINE, PREFIX, 16, frozenset(), "i"))
    # Another process announcing under a's id (an earlier run not yet timed out): a re-announces.
    assert c.tables["a"].receive(Announcement("a", OFFLINE, PREFIX, 8, frozenset(), "old")).reannounce


def test_announcements_round_trip_and_bad_ones_are_refused() -> None:
    ann = Announcement("w-1", ONLINE, PREFIX, 16, frozenset({3, 1}), "abcd")
    assert Announcement.decode("w-1", ann.encode()) == ann
    assert json.loads(ann.encode())["shards"] == [1, 3]
    assert announcement_topic("w-1") == "ecg/edge/w-1/shards"
    for payload, message in [(b"nope", "not JSON"), (b'{"v": 2}', "v1"),
                             (b'{"v":1,"state":"gone","prefix":"p","shard_count":4,"shards":[],"instance":""}', "state"),
                             (b'{"v":1,"state":"online","prefix":"p","shard_count":4,"shards":[4],"instance":""}',
                              "shards")]:
        with pytest.raises(ValueError, match=message):
            Announcement.decode("w-1", payload)
    with pytest.raises(ValueError, match="edge_id"):
        announcement_topic("a/b")


def test_cluster_config_errors_name_the_key(tmp_path: Path) -> None:
    sink = "[sinks.mqtt]\n"
    cases = {
        '[[sources.mqtt]]\nshards = "auto"\n': 'sources.mqtt.0.shard_count: required with shards = "auto"',
        '[[sources.mqtt]]\nshards = "all"\n': 'sources.mqtt.0.shards: must be "auto" or a list',
        "[[sources.mqtt]]\nshard_count = 8\n": 'sources.mqtt.0.shard_count: only with shards = "auto"',
        '[[sources.mqtt]]\nshards = "auto"\nshard_count = 0\n': "sources.mqtt.0.shard_count: Input should be greater",
        '[[sources.mqtt]]\nshards = "auto"\nshard_count = 8\nhandover_timeout_s = 0\n':
            "sources.mqtt.0.handover_timeout_s",
        '[[sources.mqtt]]\nshards = "auto"\nshard_count = 8\n[[sources.mqtt]]\nshards = "auto"\nshard_count = 8\n':
            'only one MQTT source may have shards = "auto"',
        '[broker]\nkeepalive = 2\n[[sources.mqtt]]\n': "broker.keepalive",
        '[[sources.mqtt]]\nshared_group = "a/b"\n': "sources.mqtt.0.shared_group",
        '[[sources.mqtt]]\nshared_group = "edge"\nshards = ["1"]\n': "sources.mqtt.0: shared_group and shards",
    }
    path = tmp_path / "edge.toml"
    for body, message in cases.items():
        path.write_text(body + sink)
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    path.write_text('[[sources.mqtt]]\nshards = "auto"\nshard_count = 16\n' + sink)
    m = load_config(path).sources.mqtt[0]
    assert (m.shards, m.shard_count, m.handover_timeout_s) == ("auto", 16, 10.0)


async def test_a_round_robin_shared_subscription_splits_one_device_s_stream(mosquitto: tuple[str, int]) -> None:
    """Why the workers shard by topic: mosquitto's ``$share`` (round robin, like EMQX's default)
    deals one device's consecutive frames to different members, each of which would see a stream
    full of gaps. EMQX's ``hash_topic`` strategy is what keeps a topic on one member."""
    host, port = mosquitto
    broker = BrokerConfig(host, port)
    prefix = f"share-{uuid.uuid4().hex[:8]}/raw"
    sources = [MqttSource(broker, prefix, subscriptions=[f"$share/edge/{prefix}/#"]) for _ in range(2)]
    seqs: list[list[int]] = [[], []]

    async def collect(k: int) -> None:
        async for event in sources[k]:
            if isinstance(event, Frame):
                seqs[k].append(event.seq or 0)

    tasks = [asyncio.create_task(collect(k)) for k in range(2)]
    try:
        for s in sources:
            await asyncio.wait_for(s.ready.wait(), 10)
        await publish_record(broker, "strap-7", np.zeros(20 * 90), 360.0, 0.25, realtime=False, topic_prefix=prefix)
        await until(lambda: len(seqs[0]) + len(seqs[1]) == 20, 10, "every frame")
    finally:
        for t in tasks:
            while not t.done():  # Python 3.11's wait_for (in aiomqtt) can swallow a cancellation
                t.cancel()
                await asyncio.wait((t,), timeout=0.5)
        for s in sources:
            await s.aclose()
    assert seqs[0] and seqs[1]  # one device, two workers: neither has the whole stream
    assert sorted(seqs[0] + seqs[1]) == [90 * k for k in range(20)]


# --------------------------------------------------------------------------------------------
# Three worker processes, twelve wearables, one real broker

SHARDS = 16
SPEED = 4.0  # wearables play their records four times faster than real time
FRAME_S = 0.25
# Wearable i stamps its samples from T0 + i * SPAN (Unix seconds): the output's t0 names the device
# and the input sample each output frame stands for (subscribers never see a device name).
T0, SPAN = 1_000_000.0, 10_000.0


@dataclass
class Worker:
    edge_id: str
    proc: subprocess.Popen[bytes]
    log: IO[str]
    path: Path


@contextmanager
def workers(tmp_path: Path, broker: tuple[str, int], prefix: str, names: list[str],
            keepalive: int = 30) -> Iterator[dict[str, Worker]]:
    """``ecg-edge run`` processes, each a member of the cluster on ``<prefix>/raw``; each publishes
    under its own ``<prefix>/anon/<edge_id>`` so the subscriber can tell which worker sent what."""
    host, port = broker
    started: dict[str, Worker] = {}
    try:
        for i, name in enumerate(names):
            config = tmp_path / f"{name}.toml"
            config.write_text(f"""
[broker]
host = "{host}"
port = {port}
keepalive = {keepalive}

[pipeline]
seed = {i}

[[sources.mqtt]]
topic_prefix = "{prefix}/raw"
shards = "auto"
shard_count = {SHARDS}

[sinks.mqtt]
topic_prefix = "{prefix}/anon/{name}"
edge_id = "{name}"

[metrics]
port = 0
""")
            path = tmp_path / f"{name}.log"
            log = path.open("w")
            proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "--log-level", "INFO", "run", "--config",
                                     str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            started[name] = Worker(name, proc, log, path)
        yield started
    finally:
        for w in started.values():
            if w.proc.poll() is None:
                w.proc.kill()
            w.proc.wait()
            w.log.close()


@dataclass
class Session:
    worker: str
    pseudonym: str
    device: int = -1
    frames: list[tuple[int, int]] = field(default_factory=list)  # (input sample index, samples)
    beats: int = 0
    ended: bool = False

    @property
    def start(self) -> int:
        return min(s for s, _ in self.frames)

    @property
    def stop(self) -> int:
        return max(s + n for s, n in self.frames)

    @property
    def samples(self) -> int:
        return sum(n for _, n in self.frames)


class Observer:
    """Subscribes to the cluster's announcements and every worker's anonymized output."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.announcements: list[tuple[float, Announcement]] = []
        self.latest: dict[str, Announcement] = {}
        self.sessions: dict[tuple[str, str], Session] = {}

    def on_message(self, topic: str, payload: bytes, now: float) -> None:
        parts = topic.split("/")
        if parts[-1] == "shards" and topic.startswith("ecg/edge/"):
            try:
                ann = Announcement.decode(parts[2], payload)
            except ValueError:  # another test's, or a cleared retained message
                return
            if ann.prefix == f"{self.prefix}/raw":
                self.announcements.append((now, ann))
                self.latest[ann.edge_id] = ann
            return
        worker, pseudonym, kind = parts[-3:]
        body = json.loads(payload)
        session = self.sessions.setdefault((worker, pseudonym), Session(worker, pseudonym))
        if kind == "ecg":
            session.device = int((body["t0"] - T0) // SPAN)
            position = round((body["t0"] - T0 - session.device * SPAN) * body["fs"])
            session.frames.append((position, len(body["samples"])))
        elif kind == "beats":
            session.beats += len(body["beats"])
        elif kind == "status" and body["state"] == "ended":
            session.ended = True

    def held(self) -> dict[str, set[int]]:
        """Shards each online worker announces now."""
        return {e: set(a.shards) for e, a in self.latest.items() if a.state == ONLINE}

    def covered(self, members: list[str]) -> bool:
        """Each of ``members`` announces exactly its rendezvous shards, and nobody else does."""
        held = self.held()
        return set(held) == set(members) and held == assignment(members, SHARDS)

    def by_device(self) -> dict[int, list[Session]]:
        out: dict[int, list[Session]] = defaultdict(list)
        for s in self.sessions.values():
            if s.frames:
                out[s.device].append(s)
        return {d: sorted(ss, key=lambda s: s.start) for d, ss in out.items()}


async def until(predicate, timeout: float, what: str, workers: dict[str, Worker] | None = None) -> float:
    """Wait for ``predicate()``; returns the loop time it became true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            logs = "\n".join(f"--- {w.edge_id}\n{w.path.read_text()[-3000:]}" for w in (workers or {}).values())
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{logs}")
        await asyncio.sleep(0.01)
    return loop.time()


def wearables(n: int) -> list[tuple[str, np.ndarray, float]]:
    """Twelve wearables playing the bundled MIT-BIH slices, each from its own offset."""
    records = [read_wfdb(DATA / r) for r in ("100", "105", "119", "208", "232")]
    out = []
    for i in range(n):
        x, fs, _ = records[i % len(records)]
        start = int((i // len(records)) * 20 * fs)
        out.append((f"strap-{i:02d}", x[start:], fs))
    return out


async def run_fleet(broker: BrokerConfig, prefix: str, devices: list[tuple[str, np.ndarray, float]],
                    seconds: float) -> tuple[float, list[int]]:
    """Play every wearable for ``seconds`` of wall time at SPEED; returns (start time, samples sent)."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    sizes = [int(seconds * SPEED * fs) for _, _, fs in devices]
    plays = [publish_record(broker, name, x[:n], fs, FRAME_S, SPEED, topic_prefix=f"{prefix}/raw",
                            t0=T0 + i * SPAN, shard_count=SHARDS)
             for i, ((name, x, fs), n) in enumerate(zip(devices, sizes))]
    await asyncio.gather(*plays)
    return began, sizes


async def subscribe(host: str, port: int, obs: Observer) -> tuple[aiomqtt.Client, asyncio.Task[None]]:
    client = aiomqtt.Client(host, port, max_queued_incoming_messages=0)
    await client.__aenter__()
    await client.subscribe([("ecg/edge/+/shards", 1), (f"{obs.prefix}/anon/#", 1)])
    loop = asyncio.get_running_loop()

    async def listen() -> None:
        async for message in client.messages:
            obs.on_message(str(message.topic), bytes(message.payload), loop.time())

    return client, asyncio.create_task(listen())


async def unsubscribe(client: aiomqtt.Client, task: asyncio.Task[None]) -> None:
    while not task.done():
        task.cancel()
        await asyncio.wait((task,), timeout=0.5)
    await client.__aexit__(None, None, None)


def device_shard(devices: list[tuple[str, np.ndarray, float]], i: int) -> int:
    return shard_of(devices[i][0], SHARDS)


def assert_contiguous(session: Session) -> None:
    """A session's output frames follow each other sample for sample: none missing, none twice."""
    frames = sorted(session.frames)
    assert all(a + n == b for (a, n), (b, _) in pairwise(frames)), session.pseudonym
    assert session.samples == session.stop - session.start


async def test_three_workers_share_the_fleet_and_a_graceful_stop_hands_over_without_loss(
        mosquitto: tuple[str, int], tmp_path: Path) -> None:
    host, port = mosquitto
    prefix = f"scale-{uuid.uuid4().hex[:8]}"
    names = ["scale-g0", "scale-g1", "scale-g2"]
    devices = wearables(12)
    leaving = names[0]
    # Fixed names, so a fixed assignment: the stopping worker has devices to hand over, to both others.
    mine = [i for i in range(12) if owner(device_shard(devices, i), names) == leaving]
    assert len(mine) >= 2
    obs = Observer(prefix)
    client, listener = await subscribe(host, port, obs)
    loop = asyncio.get_running_loop()
    try:
        with workers(tmp_path, mosquitto, prefix, names) as procs:
            await until(lambda: obs.covered(names), 60, "three workers holding their shards", procs)
            fleet = asyncio.create_task(run_fleet(BrokerConfig(host, port), prefix, devices, 8.0))
            await asyncio.sleep(3.5)
            t_stop = loop.time()
            procs[leaving].proc.send_signal(signal.SIGTERM)
            rest = [n for n in names if n != leaving]
            t_done = await until(lambda: obs.covered(rest), 10, "the others to take the shards over", procs)
            t_leaving = next(t for t, a in obs.announcements if a.edge_id == leaving and a.state == LEAVING)
            assert procs[leaving].proc.wait(timeout=30) == 0
            _, sizes = await fleet
            await until(lambda: sum(s.ended for s in obs.sessions.values()) >= 12 + len(mine), 30,
                        "every session to end", procs)
            assert obs.latest[leaving].state == OFFLINE
    finally:
        await unsubscribe(client, listener)

    sessions = obs.by_device()
    assert sorted(sessions) == list(range(12))
    for i, ss in sessions.items():
        shard = device_shard(devices, i)
        for s in ss:
            assert_contiguous(s)
            assert s.ended and s.beats > 0
        # Every sample the wearable sent came out anonymized exactly once, by one worker at a time.
        assert ss[0].start == 0
        assert all(a.stop == b.start for a, b in pairwise(ss)), [(s.worker, s.start, s.stop) for s in ss]
        assert ss[-1].stop == sizes[i] and sum(s.samples for s in ss) == sizes[i]
        if i in mine:  # moved at the cut: the old worker's session, then a new one on the new owner
            assert [s.worker for s in ss] == [leaving, owner(shard, rest)]
            assert ss[0].pseudonym != ss[1].pseudonym
        else:
            assert [s.worker for s in ss] == [owner(shard, names)]
    takeover = t_done - t_stop
    print(f"\ngraceful stop: shards taken over {takeover * 1000:.0f} ms after SIGTERM, "
          f"{(t_done - t_leaving) * 1000:.0f} ms after the 'leaving' announcement; "
          f"{len(mine)} devices moved without losing a sample")
    assert takeover < 2.0


async def test_a_crashed_worker_s_shards_are_taken_over_within_the_keepalive_bound(
        mosquitto: tuple[str, int], tmp_path: Path) -> None:
    host, port = mosquitto
    keepalive = 3
    prefix = f"scale-{uuid.uuid4().hex[:8]}"
    names = ["scale-c0", "scale-c1", "scale-c2"]
    devices = wearables(12)
    frozen, killed, survivor = names
    assert len([i for i in range(12) if owner(device_shard(devices, i), names) == frozen]) >= 2
    assert len([i for i in range(12) if owner(device_shard(devices, i), [survivor, killed]) == killed]) >= 2
    obs = Observer(prefix)
    client, listener = await subscribe(host, port, obs)
    loop = asyncio.get_running_loop()
    try:
        with workers(tmp_path, mosquitto, prefix, names, keepalive=keepalive) as procs:
            await until(lambda: obs.covered(names), 60, "three workers holding their shards", procs)
            fleet = asyncio.create_task(run_fleet(BrokerConfig(host, port), prefix, devices, 14.0))
            await asyncio.sleep(2.5)
            # Frozen: its sockets stay open, so only the broker's keepalive check finds it gone.
            t_freeze = loop.time()
            os.kill(procs[frozen].proc.pid, signal.SIGSTOP)
            t_frozen_done = await until(lambda: obs.covered([survivor, killed]), 3 * keepalive + 5,
                                        "the frozen worker's shards to move", procs)
            await asyncio.sleep(1.5)
            # Killed: the kernel closes its sockets and the broker sends its will at once.
            t_kill = loop.time()
            procs[killed].proc.kill()
            t_killed_done = await until(lambda: obs.covered([survivor]), 10, "the killed worker's shards to move",
                                        procs)
            began, sizes = await fleet
            await until(lambda: sum(s.ended for s in obs.sessions.values() if s.worker == survivor) >= 12, 30,
                        "every device's last session to end", procs)
    finally:
        await unsubscribe(client, listener)

    def published_by(t: float, i: int) -> int:
        """The first sample of the first frame device i publishes at or after loop time t."""
        fs = devices[i][2]
        frame = round(FRAME_S * fs)
        k = max(0, int(np.ceil((t - began) * SPEED * fs / frame)) - 1)
        return k * frame

    sessions = obs.by_device()
    assert sorted(sessions) == list(range(12))
    for i, ss in sessions.items():
        shard = device_shard(devices, i)
        path = [owner(shard, names), owner(shard, [survivor, killed]), survivor]
        expected = [w for k, w in enumerate(path) if k == 0 or w != path[k - 1]]
        assert [s.worker for s in ss] == expected, (i, [(s.worker, s.start, s.stop) for s in ss])
        for a, b in pairwise(ss):  # never a sample out of two workers
            assert a.stop <= b.start
        for s in ss:
            assert_contiguous(s)
        assert ss[-1].ended and ss[-1].stop == sizes[i]
        for prev, s in pairwise(ss):  # what was published once a takeover came through is all in the new session
            done = t_frozen_done if prev.worker == frozen else t_killed_done
            assert s.start <= published_by(done + 0.3, i), (i, s.worker)
        if len(ss) == 1:  # never moved: every sample, one session
            assert ss[0].samples == sizes[i]
    frozen_s, killed_s = t_frozen_done - t_freeze, t_killed_done - t_kill
    print(f"\nfrozen worker (keepalive {keepalive} s): shards taken over after {frozen_s:.2f} s; "
          f"killed worker: after {killed_s * 1000:.0f} ms")
    # Not before the keepalive can have expired; the upper bound is the stated one (docs/scale-out.md):
    # mosquitto drops a silent client after 1.5-2x keepalive (it checks in whole seconds), then the
    # survivors subscribe and claim, which takes a few seconds more on a loaded 2-core machine.
    assert keepalive - 1.0 <= frozen_s <= 2 * keepalive + 5.0
    assert killed_s < 1.5
