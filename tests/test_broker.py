"""broker/: the production security settings, enforced by a real mosquitto started with broker/run-dev.

One broker serves the module. Its config is derived from broker/mosquitto.conf and it uses the
production ACL (broker/acl) unchanged, so these tests are about what deployments enforce: no
anonymous clients, passwords, TLS, and the four roles. MQTT 3.1.1 drops a denied publish without
telling the publisher, so every "denied" below is shown by a reader that would have received the
message and did not, beside a control message that did arrive through the same reader.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from leak import assert_no_raw_sample

from edge.mosquitto import free_port
from edge.mqtt import BrokerConfig, encode_end, encode_raw, publish_record

ROOT = Path(__file__).resolve().parent.parent
RUN_DEV = ROOT / "broker" / "run-dev"
DATA = Path(__file__).resolve().parent / "data"
ROLES = ("wearable", "edge", "subscriber", "trainer")


@dataclass(frozen=True)
class DevBroker:
    """A running development broker and the accounts run-dev made for it."""

    dir: Path
    host: str
    port: int
    tls_port: int
    ca_file: str
    credentials: dict[str, Any]

    def account(self, role: str, index: int = 0) -> tuple[str, str]:
        entry = self.credentials["roles"][role][index]
        return entry["username"], Path(entry["password_file"]).read_text().strip()

    def config(self, role: str | None, *, index: int = 0, tls: bool = False, password: str | None = None,
               ca_file: str | None = None) -> BrokerConfig:
        """Connection settings for one account (``role=None``: anonymous) on either listener."""
        username, real = self.account(role, index) if role else (None, None)
        return BrokerConfig(
            host=self.host, port=self.tls_port if tls else self.port, tls=tls,
            ca_file=(ca_file or self.ca_file) if tls else None,
            username=username, password=password if password is not None else real,
        )  # fmt: skip


def run_dev(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(RUN_DEV), *map(str, args)],
                          check=False, capture_output=True, text=True, timeout=60)


def two_free_ports() -> tuple[int, int]:
    """Two distinct ports nobody listens on (run-dev refuses PORT == TLS_PORT)."""
    first, second = free_port(), free_port()
    while second == first:
        second = free_port()
    return first, second


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def dev_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevBroker]:
    """broker/run-dev in the foreground, as a developer runs it; stopped with SIGTERM, which must exit 0."""
    work = tmp_path_factory.mktemp("broker")
    root = work / "dev"
    port, tls_port = two_free_ports()
    log_path = work / "run-dev.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, str(RUN_DEV), str(root), str(port), str(tls_port)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not (listening(port) and listening(tls_port)):
            if proc.poll() is not None:
                pytest.fail(f"the broker tests need mosquitto; broker/run-dev exited with {proc.returncode}:\n"
                            f"{log_path.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                pytest.fail(f"broker/run-dev did not open ports {port} and {tls_port} within 20 s:\n"
                            f"{log_path.read_text(errors='replace')}")
            time.sleep(0.05)
        printed = log_path.read_text().splitlines()[0]
        assert printed == str(root / "credentials.json")
        credentials = json.loads(Path(printed).read_text())
        yield DevBroker(root, credentials["host"], port, tls_port, credentials["ca_file"], credentials)
    finally:
        proc.terminate()
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
    assert code == 0, f"mosquitto did not stop cleanly ({code}):\n{log_path.read_text(errors='replace')}"


async def connect_error(config: BrokerConfig) -> aiomqtt.MqttError:
    """The error a connection attempt ends with (the test fails if it connects)."""
    try:
        async with config.client("probe"):
            pass
    except aiomqtt.MqttError as exc:
        _close_abandoned_sockets(exc)
        return exc
    raise AssertionError(f"{config} accepted {config.username or 'an anonymous client'}")


def _close_abandoned_sockets(exc: BaseException) -> None:
    """paho leaves the socket of a failed TLS handshake open in its frame; close it, or the
    interpreter reports it unclosed whenever the exception happens to be collected."""
    chained: BaseException | None = exc
    while chained is not None:
        tb = chained.__traceback__
        while tb is not None:
            for value in tb.tb_frame.f_locals.values():
                if isinstance(value, socket.socket):
                    value.close()
            tb = tb.tb_next
        chained = chained.__cause__ or chained.__context__


async def queued(client: aiomqtt.Client) -> list[tuple[str, bytes]]:
    """Everything the broker routed to ``client`` before this call.

    The UNSUBACK round trip is the barrier: the broker routes a message while it handles the
    PUBLISH (before it acknowledges it), and answers UNSUBSCRIBE on the same connection after
    whatever it routed there before.
    """
    await client.unsubscribe(f"barrier/{uuid.uuid4().hex}")
    return [(m.topic.value, bytes(m.payload)) for m in [await anext(client.messages) for _ in range(len(client.messages))]]


# ---------------------------------------------------------------------------------------------
# Who may connect


@pytest.mark.parametrize("tls", [False, True], ids=["loopback", "tls"])
async def test_anonymous_unknown_and_wrong_passwords_are_refused(dev_broker: DevBroker, tls: bool) -> None:
    for refused in (
        dev_broker.config(None, tls=tls),
        dev_broker.config("edge", tls=tls, password="not-the-password"),
        dev_broker.config("wearable", tls=tls, password=""),
        BrokerConfig(dev_broker.host, dev_broker.tls_port if tls else dev_broker.port, tls, dev_broker.ca_file if tls else None,
                     username="strap-99", password="guess"),
    ):
        exc = await connect_error(refused)
        assert isinstance(exc, aiomqtt.MqttCodeError) and str(exc.rc) == "Not authorized", exc
    for role in ROLES:  # the control: each account's own password gets in
        async with dev_broker.config(role, tls=tls).client("probe"):
            pass


async def test_tls_needs_the_broker_ca(dev_broker: DevBroker, tmp_path: Path) -> None:
    other = run_dev(tmp_path / "other", 1883, 8883, "--generate-only")  # ports unused: nothing starts
    assert other.returncode == 0, other.stderr
    wrong_ca = json.loads((tmp_path / "other" / "credentials.json").read_text())["ca_file"]
    refused = await connect_error(dev_broker.config("edge", tls=True, ca_file=wrong_ca))
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused)

    token = uuid.uuid4().hex.encode()
    async with dev_broker.config("edge", tls=True).client("reader") as edge, \
            dev_broker.config("wearable", tls=True).client("wearable") as wearable:
        await edge.subscribe("ecg/raw/#", qos=1)
        await wearable.publish("ecg/raw/strap-1", token, qos=1)
        assert ("ecg/raw/strap-1", token) in await queued(edge)


# ---------------------------------------------------------------------------------------------
# What each role may read and publish


async def test_each_role_reads_only_its_topics(dev_broker: DevBroker) -> None:
    token = uuid.uuid4().hex
    raw, sharded = "ecg/raw/strap-1", "ecg/raw/7/strap-1"
    anon, status, model = f"ecg/anon/{token}/ecg", f"ecg/edge/{token}/status", f"ecg/models/{token}"
    readers = {"strap-1": ("wearable", 0), "strap-2": ("wearable", 1), "edge": ("edge", 0),
               "subscriber": ("subscriber", 0), "trainer": ("trainer", 0)}
    clients = {name: dev_broker.config(role, index=i).client(f"reader-{name}") for name, (role, i) in readers.items()}
    for client in clients.values():
        await client.__aenter__()
    try:
        for client in clients.values():
            await client.subscribe("#", qos=1)
        publishers = {"wearable": [raw, sharded], "edge": [anon, status], "trainer": [model]}
        for role, topics in publishers.items():
            async with dev_broker.config(role).client("publisher") as publisher:
                for topic in topics:
                    await publisher.publish(topic, token.encode(), qos=1)
        seen = {name: {t for t, p in await queued(c) if p == token.encode()} for name, c in clients.items()}
    finally:
        for client in clients.values():
            await client.__aexit__(None, None, None)
    assert seen == {
        "strap-1": set(),  # not even its own stream
        "strap-2": set(),
        "edge": {raw, sharded, model, status},  # status: the shard claims of other workers
        "subscriber": {anon, status},  # never raw
        "trainer": set(),
    }


# (publisher, denied topic, reader, its subscription, control publisher, control topic)
DENIED = [
    ("wearable", "ecg/raw/strap-2", "edge", "ecg/raw/#", "wearable", "ecg/raw/strap-1"),
    ("wearable", "ecg/raw/3/strap-2", "edge", "ecg/raw/#", "wearable", "ecg/raw/3/strap-1"),
    ("wearable", "ecg/anon/{token}/ecg", "subscriber", "ecg/anon/#", "edge", "ecg/anon/{token}/ecg"),
    ("wearable", "ecg/edge/{token}/status", "subscriber", "ecg/edge/#", "edge", "ecg/edge/{token}/status"),
    ("wearable", "ecg/models/{token}", "edge", "ecg/models/#", "trainer", "ecg/models/{token}"),
    ("subscriber", "ecg/raw/subscriber", "edge", "ecg/raw/#", "wearable", "ecg/raw/strap-1"),
    ("subscriber", "ecg/raw/2/subscriber", "edge", "ecg/raw/#", "wearable", "ecg/raw/2/strap-1"),
    ("subscriber", "ecg/anon/{token}/ecg", "subscriber", "ecg/anon/#", "edge", "ecg/anon/{token}/ecg"),
    ("trainer", "ecg/raw/trainer", "edge", "ecg/raw/#", "wearable", "ecg/raw/strap-1"),
    ("trainer", "ecg/anon/{token}/ecg", "subscriber", "ecg/anon/#", "edge", "ecg/anon/{token}/ecg"),
    ("edge", "ecg/models/{token}", "edge", "ecg/models/#", "trainer", "ecg/models/{token}"),
]


@pytest.mark.parametrize("publisher,topic,reader,subscription,control,control_topic", DENIED,
                         ids=[f"{c[0]}->{c[1].replace('{token}', 'x')}" for c in DENIED])
async def test_denied_publish_is_dropped(dev_broker: DevBroker, publisher: str, topic: str, reader: str,
                                         subscription: str, control: str, control_topic: str) -> None:
    token = uuid.uuid4().hex
    denied, allowed = f"{token}:denied".encode(), f"{token}:control".encode()
    async with dev_broker.config(reader).client("reader") as client:
        await client.subscribe(subscription, qos=1)
        async with dev_broker.config(publisher).client("publisher") as sender:
            await sender.publish(topic.format(token=token), denied, qos=1)  # acknowledged all the same
        async with dev_broker.config(control).client("control") as sender:
            await sender.publish(control_topic.format(token=token), allowed, qos=1)
        got = [p for _, p in await queued(client) if p.startswith(token.encode())]
    assert got == [allowed]


# ---------------------------------------------------------------------------------------------
# The edge end to end, through TLS, with its own account


async def test_edge_runs_end_to_end_over_tls_with_its_account(dev_broker: DevBroker) -> None:
    from edge import app
    from edge.config import load_config
    from edge.replay import read_wfdb

    cfg = load_config(dev_broker.credentials["edge_config"])  # what run-dev wrote for the edge
    assert (cfg.broker.port, cfg.broker.tls, cfg.broker.username) == (dev_broker.tls_port, True, "edge")
    edge_status = f"ecg/edge/{cfg.sinks.mqtt.edge_id}/status"
    x, fs, _ = read_wfdb(DATA / "119")
    x = x[: int(20 * fs)]
    received: list[tuple[str, dict[str, Any]]] = []
    arrived = asyncio.Event()

    async def until(match: Callable[[str, dict[str, Any]], bool], timeout: float = 20.0) -> tuple[str, dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while True:
                hit = next(((t, p) for t, p in received if match(t, p)), None)
                if hit is not None:
                    return hit
                arrived.clear()
                await arrived.wait()

    async with dev_broker.config("subscriber", tls=True).client("subscriber") as subscriber:
        await subscriber.subscribe([("ecg/anon/#", 1), (edge_status, 1), ("ecg/raw/#", 1)])

        async def listen() -> None:
            async for m in subscriber.messages:
                received.append((m.topic.value, json.loads(m.payload)))
                arrived.set()

        listener = asyncio.create_task(listen())
        edge = asyncio.create_task(app.run(cfg))
        try:
            await until(lambda t, p: t == edge_status and p["state"] == "online")
            # The source subscribes after the sink is online: a probe wearable streams until a
            # session of its own shows up, so the recording below is read from its first frame.
            async with dev_broker.config("wearable", index=1).client("probe") as probe:
                seq = 0
                while not any(t.endswith("/status") and t.startswith("ecg/anon/") for t, _ in received):
                    await probe.publish("ecg/raw/strap-2", encode_raw(np.zeros(36), fs, seq), qos=1)
                    seq += 36
                    await asyncio.sleep(0.05)
                await probe.publish("ecg/raw/strap-2", encode_end(), qos=1)
            probe_pseudonym = next(t for t, _ in received if t.startswith("ecg/anon/")).split("/")[2]
            # The wearable on the gateway's loopback listener, the edge and the subscriber on TLS.
            await publish_record(dev_broker.config("wearable"), "strap-1", x, fs, 0.25, realtime=False)
            topic, _ = await until(lambda t, p: t.startswith("ecg/anon/") and t.endswith("/status")
                                   and p["state"] == "ended" and t.split("/")[2] != probe_pseudonym)
            pseudonym = topic.split("/")[2]
        finally:
            while not edge.done():  # Python 3.11's wait_for (inside aiomqtt) can swallow a cancellation
                edge.cancel()
                await asyncio.wait({edge}, timeout=1.0)
        await until(lambda t, p: t == edge_status and p["state"] == "offline")
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)

    assert not [t for t, _ in received if t.startswith("ecg/raw/")]
    mine = [(t.rsplit("/", 1)[1], p) for t, p in received if t.startswith(f"ecg/anon/{pseudonym}/")]
    statuses = [p["state"] for kind, p in mine if kind == "status"]
    assert statuses == ["online", "ended"]
    frames = sorted((p["seq"], p["samples"]) for kind, p in mine if kind == "ecg")
    assert sum(len(s) for _, s in frames) == len(x)  # every sample, once
    assert [seq for seq, _ in frames] == list(np.cumsum([0] + [len(s) for _, s in frames[:-1]]))
    out = np.array([v for _, s in frames for v in s], dtype=float)
    assert_no_raw_sample(out, x)
    beats = [b for kind, p in mine if kind == "beats" for b in p["beats"]]
    reference = _reference_beats(DATA / "119", len(x))
    assert len(reference) - 3 <= len(beats) <= len(reference) + 1
    assert {b["class"] for b in beats} >= {"N", "V"}
    edge_states = [p["state"] for t, p in received if t == edge_status]
    assert edge_states[0] == "online" and edge_states[-1] == "offline"


def _reference_beats(record: Path, n: int) -> list[int]:
    import wfdb

    ann = wfdb.rdann(str(record), "atr", sampto=n)
    return [s for s, sym in zip(ann.sample, ann.symbol) if sym in "NLRejAaJSVEFQ/f"]


# ---------------------------------------------------------------------------------------------
# run-dev itself


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_only_writes_private_secrets_and_keeps_them(tmp_path: Path) -> None:
    from cryptography import x509

    from edge.config import load_config

    root = tmp_path / "secrets"
    port, tls_port = two_free_ports()
    done = run_dev(root, port, tls_port, "--generate-only", "--wearable", "ward-3", "--hostname", "broker")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(root / "credentials.json")
    assert not listening(port) and not listening(tls_port)  # nothing started
    creds = json.loads((root / "credentials.json").read_text())
    assert {r: [a["username"] for a in accounts] for r, accounts in creds["roles"].items()} == {
        "edge": ["edge"], "subscriber": ["subscriber"], "trainer": ["trainer"], "wearable": ["ward-3"],
    }
    secret_files = [root / "broker" / "passwd", root / "broker" / "certs" / "server.key", root / "ca" / "ca.key",
                    *(root / "clients").glob("*.password")]
    assert len(secret_files) == 7
    assert {_mode(p) for p in secret_files} == {0o600}
    assert {_mode(d) for d in (root, root / "ca", root / "clients", root / "broker")} == {0o700}
    passwd = dict(line.split(":", 1) for line in (root / "broker" / "passwd").read_text().splitlines())
    assert sorted(passwd) == ["edge", "subscriber", "trainer", "ward-3"]
    assert all(h.startswith("$7$101$") for h in passwd.values())
    # DIR/broker/ is a complete /mosquitto/config for the production config.
    assert (root / "broker" / "mosquitto.conf").read_text() == (ROOT / "broker" / "mosquitto.conf").read_text()
    assert (root / "broker" / "acl").read_text() == (ROOT / "broker" / "acl").read_text()
    cert = x509.load_pem_x509_certificate((root / "broker" / "certs" / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "broker"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    edge_cfg = load_config(root / "edge.toml")
    assert edge_cfg.broker.password() == (root / "clients" / "edge.password").read_text().strip()

    # Again: passwords and certificates are kept; a deleted password alone is replaced.
    passwords = {p.name: p.read_text() for p in (root / "clients").glob("*.password")}
    ca, server = (root / "ca" / "ca.crt").read_bytes(), (root / "broker" / "certs" / "server.crt").read_bytes()
    (root / "clients" / "trainer.password").unlink()
    again = run_dev(root, port, tls_port, "--generate-only", "--wearable", "ward-3", "--hostname", "broker")
    assert again.returncode == 0, again.stderr
    now = {p.name: p.read_text() for p in (root / "clients").glob("*.password")}
    assert {k for k in now if now[k] != passwords[k]} == {"trainer.password"}
    assert (root / "ca" / "ca.crt").read_bytes() == ca
    assert (root / "broker" / "certs" / "server.crt").read_bytes() == server


def test_dev_config_is_the_production_config_on_loopback(dev_broker: DevBroker) -> None:
    """Only listeners and paths differ: what the tests above enforce is what production enforces."""
    def directives(text: str) -> list[str]:
        return [" ".join(line.split()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]

    production = directives((ROOT / "broker" / "mosquitto.conf").read_text())
    assert {"allow_anonymous false", "per_listener_settings false", "listener 8883", "listener 1883 127.0.0.1",
            "require_certificate false", "max_queued_messages 100000"} <= set(production)
    expected = [
        d.replace("/mosquitto/config/", f"{dev_broker.dir}/broker/").replace("/mosquitto/data/", f"{dev_broker.dir}/data/")
        .replace("listener 8883", f"listener {dev_broker.tls_port} 127.0.0.1")
        .replace("listener 1883 127.0.0.1", f"listener {dev_broker.port} 127.0.0.1")
        for d in production
    ]
    dev = directives(Path(dev_broker.credentials["config"]).read_text())
    if os.geteuid() == 0:
        expected.append("user root")
    assert dev == expected


def test_run_dev_says_what_is_wrong(dev_broker: DevBroker, tmp_path: Path) -> None:
    free, other = two_free_ports()
    busy = run_dev(tmp_path / "busy", dev_broker.port, free)
    assert busy.returncode == 1 and f"port {dev_broker.port} on 127.0.0.1 is in use" in busy.stderr
    assert not (tmp_path / "busy").exists()  # nothing half-written

    (tmp_path / "file").write_text("")
    blocked = run_dev(tmp_path / "file" / "dir", other, free, "--generate-only")
    assert blocked.returncode == 1 and "cannot create directory" in blocked.stderr and "file" in blocked.stderr

    missing = run_dev(tmp_path / "m", other, free, "--mosquitto", tmp_path / "no-mosquitto")
    assert missing.returncode == 1 and "mosquitto not found at" in missing.stderr

    for bad, why in ((["--wearable", "a/b"], "a device id is"), (["--wearable", "edge"], "is the edge account"),
                     (["--hostname", "bad name"], "neither a DNS name nor an IP")):
        out = run_dev(tmp_path / "bad", other, free, "--generate-only", *bad)
        assert out.returncode == 1 and why in out.stderr, out.stderr

    same = run_dev(tmp_path / "same", free, free)
    assert same.returncode == 2 and "need two ports" in same.stderr
    word = run_dev(tmp_path / "word", "mqtt", free)
    assert word.returncode == 2 and "'mqtt' is not a port number" in word.stderr
