"""Signed model refresh: keys, the announcement format, the edge's checks, and a swap under load.

Everything runs for real: Ed25519 from ``cryptography``, a real mosquitto, onnxruntime sessions of
the shipped models and of variants made with ``onnx`` (metadata edited, or the generator's output
scaled so that its surrogates can be told from the old ones by amplitude alone).
"""

from __future__ import annotations

import asyncio
import json
import stat
import uuid
from pathlib import Path

import aiomqtt
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from edge import announce
from edge.announce import AnnouncementError
from edge.anonymize import load_models
from edge.config import ConfigError, load_config
from edge.metrics import EdgeMetrics
from edge.models import default_model_path
from edge.mqtt import BrokerConfig, MqttSink
from edge.pipeline import Anonymizer, PipelineSettings
from edge.refresh import ModelRefresher, models_topic, version_key
from edge.replay import read_wfdb
from trainer import cli as trainer_cli
from trainer.publish import keygen

DATA = Path(__file__).parent / "data"
GENERATOR = default_model_path("generator").read_bytes()
CLASSIFIER = default_model_path("classifier").read_bytes()


def variant(data: bytes, *, scale: float | None = None, **meta: str) -> bytes:
    """The model with metadata entries replaced (``model_version="..."`` sets ``model.version``),
    and for a generator optionally every output beat multiplied by ``scale``."""
    model = onnx.load_from_string(data)
    props = {p.key: p.value for p in model.metadata_props}
    props.update({k.replace("_", ".", 1): v for k, v in meta.items()})
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    if scale is not None:
        for node in model.graph.node:
            for i, name in enumerate(node.output):
                if name == "beats":
                    node.output[i] = "beats_unscaled"
        model.graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), "beats_scale"))
        model.graph.node.append(helper.make_node("Mul", ["beats_unscaled", "beats_scale"], ["beats"]))
    return model.SerializeToString()


def version_of(data: bytes) -> str:
    return {p.key: p.value for p in onnx.load_from_string(data).metadata_props}["model.version"]


SHIPPED_VERSION = version_of(GENERATOR)
NEWER = "2099.01.01.000000"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    trusted, trusted_pub = keygen(root / "site")
    other, other_pub = keygen(root / "other")
    return {"key": trusted, "pub": trusted_pub, "other": other, "other_pub": other_pub}


@pytest.fixture(scope="module")
def sessions():
    return load_models()


def _sign(data: bytes, kind: str, version: str, key_path: Path, **kw) -> bytes:
    return announce.encode(data, kind, version, announce.load_private_key(key_path), **kw)


def _parts(payload: bytes) -> tuple[bytes, bytes, bytes]:
    n = int.from_bytes(payload[8:12], "big")
    return payload[12:12 + n], payload[12 + n:12 + n + 64], payload[12 + n + 64:]


# ---------------------------------------------------------------------------------------------
# Keys and the format


def test_keygen_writes_a_private_key_only_its_owner_reads_and_refuses_to_overwrite(tmp_path: Path) -> None:
    assert trainer_cli.main(["keygen", str(tmp_path / "k" / "release")]) == 0
    private, public = tmp_path / "k" / "release.key", tmp_path / "k" / "release.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert announce.key_id(announce.load_private_key(private)) == announce.key_id(announce.load_public_key(public))
    before = private.read_bytes()
    assert trainer_cli.main(["keygen", str(tmp_path / "k" / "release")]) == 2  # an existing key stays
    assert private.read_bytes() == before
    assert trainer_cli.main(["keygen", str(tmp_path / "k" / "release"), "--force"]) == 0
    assert private.read_bytes() != before and stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="not an Ed25519 public key|not a PEM public key"):
        announce.load_public_key(private)


def test_sign_and_verify_round_trip_and_any_flipped_byte_is_refused(keys) -> None:
    payload = _sign(GENERATOR, "generator", SHIPPED_VERSION, keys["key"], created=1764081000.0)
    got = announce.decode(payload, [announce.load_public_key(keys["pub"])])
    assert (got.kind, got.version, got.size, got.created) == ("generator", SHIPPED_VERSION, len(GENERATOR), 1764081000.0)
    assert got.model == GENERATOR and got.key_id == announce.key_id(announce.load_public_key(keys["pub"]))
    header, _, _ = _parts(payload)
    assert header == announce.canonical_header(json.loads(header))  # the bytes sent are the canonical ones
    trusted = [announce.load_public_key(keys["pub"])]
    rng = np.random.default_rng(0)
    # Every region: magic, length, header, signature, model (start, middle, end).
    positions = [0, 9, 20, 12 + len(header) - 2, 12 + len(header) + 10, 12 + len(header) + 64,
                 *rng.integers(12 + len(header) + 64, len(payload), 20).tolist(), len(payload) - 1]
    for i in positions:
        damaged = bytearray(payload)
        damaged[i] ^= 0x01
        with pytest.raises(AnnouncementError) as err:
            announce.decode(bytes(damaged), trusted)
        assert err.value.reason in announce.REASONS, err.value.reason
    with pytest.raises(AnnouncementError) as err:
        announce.decode(payload, [announce.load_public_key(keys["other_pub"])])
    assert err.value.reason == "key" and "not among" in err.value.detail


def test_version_order() -> None:
    assert version_key("2026.11.25.164711") < version_key("2026.11.26.000000") < version_key(NEWER)
    assert version_key("1.9") < version_key("1.10") and version_key("gen-2025.11-1") < version_key("gen-2025.11-2")
    assert not version_key(SHIPPED_VERSION) < version_key(SHIPPED_VERSION)


def test_publish_refuses_what_no_edge_would_take(tmp_path: Path, keys, capsys) -> None:
    model = tmp_path / "generator.onnx"
    model.write_bytes(GENERATOR)
    rc = trainer_cli.main(["publish", str(model), "--key", str(keys["key"]), "--max-bytes", "100000",
                           "--broker", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{len(GENERATOR):,} bytes" in err and "at most 100,000" in err
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model" * 10)
    assert trainer_cli.main(["publish", str(garbage), "--key", str(keys["key"]), "--broker", "127.0.0.1:1"]) == 2
    assert "not a loadable ONNX model" in capsys.readouterr().err
    assert trainer_cli.main(["publish", str(model), "--key", str(keys["pub"]), "--broker", "127.0.0.1:1"]) == 2
    assert "private key" in capsys.readouterr().err
    assert trainer_cli.main(["publish", str(model), "--key", str(keys["key"]), "--broker", "nowhere"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_refresh_config_keys(tmp_path: Path, keys) -> None:
    (tmp_path / "trusted.pub").write_bytes(keys["pub"].read_bytes())
    body = f"""
[refresh]
public_keys = ["trusted.pub"]
topic_prefix = "site-a/ecg/models"

[[sources.replay]]
record = "{DATA / '100'}"

[sinks.wfdb]
directory = "out"
"""
    (tmp_path / "edge.toml").write_text(body)
    cfg = load_config(tmp_path / "edge.toml")
    assert cfg.refresh.enabled and cfg.refresh.public_keys == [tmp_path / "trusted.pub"]
    (tmp_path / "edge.toml").write_text(body.replace("trusted.pub", "edge.toml"))
    with pytest.raises(ConfigError, match=r"refresh\.public_keys: .*edge\.toml: not a PEM public key"):
        load_config(tmp_path / "edge.toml")
    (tmp_path / "edge.toml").write_text(body.replace("topic_prefix", "topic_prefx"))
    with pytest.raises(ConfigError, match="refresh.topic_prefx: unknown key"):
        load_config(tmp_path / "edge.toml")


# ---------------------------------------------------------------------------------------------
# The edge's checks, through mosquitto


async def _retained(broker: BrokerConfig, topic: str) -> dict:
    async with broker.client(f"reader-{uuid.uuid4().hex[:6]}") as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                return json.loads(message.payload)
    raise AssertionError("unreachable")


async def _outcomes(refresher: ModelRefresher, n: int) -> list:
    async with asyncio.timeout(20):
        while len(refresher.history) < n:
            await asyncio.sleep(0.01)
    return list(refresher.history)


async def _clear(broker: BrokerConfig, prefix: str, edge_id: str) -> None:
    """Leave the shared test broker without this test's retained messages."""
    async with broker.client("cleaner") as client:
        for topic in (*(f"{prefix}/{kind}" for kind in ("generator", "classifier", "bogus")),
                      f"ecg/edge/{edge_id}/status"):
            await client.publish(topic, b"", qos=1, retain=True)


def _refusal_cases() -> dict[str, tuple]:
    """name -> (topic kind, payload builder(keys), expected reason, fragment of the detail)."""
    newer = variant(GENERATOR, model_version=NEWER)

    def tampered_model(k):
        p = bytearray(_sign(newer, "generator", NEWER, k["key"]))
        p[-100] ^= 0xFF
        return bytes(p)

    def tampered_header(k):
        header, signature, model = _parts(_sign(newer, "generator", NEWER, k["key"]))
        forged = announce.canonical_header({**json.loads(header), "version": "2099.12.31.235959"})
        return announce.frame(forged, signature, model)

    def impostor(k):  # the trusted key's id, another key's signature
        header, _, model = _parts(_sign(newer, "generator", NEWER, k["key"]))
        return announce.frame(header, announce.sign(header, announce.load_private_key(k["other"])), model)

    return {
        "tampered model bytes": ("generator", tampered_model, "digest", "altered"),
        "tampered header": ("generator", tampered_header, "signature", "does not verify"),
        "untrusted key": ("generator", lambda k: _sign(newer, "generator", NEWER, k["other"]), "key", "not among"),
        "trusted key id, other key's signature": ("generator", impostor, "signature", "does not verify"),
        "classifier published as a generator": (
            "generator", lambda k: _sign(variant(CLASSIFIER, model_version=NEWER), "generator", NEWER, k["key"]),
            "contract", "is a classifier model, expected a generator"),
        "other codec": (
            "generator", lambda k: _sign(variant(GENERATOR, model_version=NEWER, codec_pre="80"),
                                         "generator", NEWER, k["key"]),
            "contract", "another beat codec"),
        "metadata and header disagree on the version": (
            "generator", lambda k: _sign(newer, "generator", "2099.02.02.000000", k["key"]),
            "contract", "metadata says version 2099.01.01.000000"),
        "generator announced on the classifier topic": (
            "classifier", lambda k: _sign(newer, "generator", NEWER, k["key"]), "contract", "on the classifier topic"),
        "truncated": ("generator", lambda k: _sign(newer, "generator", NEWER, k["key"])[:300_000], "truncated",
                      "arrived"),
        "truncated in the header": ("generator", lambda k: _sign(newer, "generator", NEWER, k["key"])[:40],
                                    "truncated", "inside the header"),
        "garbage": ("generator", lambda k: np.random.default_rng(1).bytes(5000), "garbage", "not a model announcement"),
        "older version (replay)": (
            "generator", lambda k: _sign(variant(GENERATOR, model_version="2025.01.01.000000"), "generator",
                                         "2025.01.01.000000", k["key"]),
            "replay", "an older version"),
        "same version, other bytes": (
            "generator", lambda k: _sign(variant(GENERATOR, producer="someone else"), "generator", SHIPPED_VERSION,
                                         k["key"]),
            "replay", "the same version with other bytes"),
        "larger than the edge takes": (
            "generator", lambda k: _sign(newer, "generator", NEWER, k["key"]), "oversize", "at most 400,000"),
        "no model kind in the topic": ("bogus", lambda k: _sign(newer, "generator", NEWER, k["key"]), "topic",
                                       "is not"),
    }


REFUSALS = _refusal_cases()


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refused_announcement_keeps_the_running_model(case: str, mosquitto, sessions, keys) -> None:
    kind, build, reason, fragment = REFUSALS[case]
    host, port = mosquitto
    broker = BrokerConfig(host=host, port=port)
    prefix = f"t{uuid.uuid4().hex[:8]}/ecg/models"
    edge_id = f"refresh-{uuid.uuid4().hex[:8]}"
    anonymizer = Anonymizer(*sessions, PipelineSettings(seed=1), EdgeMetrics())
    limit = 400_000 if reason == "oversize" else announce.DEFAULT_MAX_MODEL_BYTES
    payload = build(keys)
    try:
        async with MqttSink(broker, f"{prefix}/anon", edge_id=edge_id) as sink:
            await sink.update_status(models=anonymizer.models())
            async with ModelRefresher(broker, anonymizer, [announce.load_public_key(keys["pub"])],
                                      topic_prefix=prefix, max_model_bytes=limit,
                                      report=sink.update_status) as refresher:
                async with broker.client("release") as client:
                    await client.publish(f"{prefix}/{kind}", payload, qos=1, retain=True)
                [outcome] = await _outcomes(refresher, 1)
                status = await _retained(broker, f"ecg/edge/{edge_id}/status")
    finally:
        await _clear(broker, prefix, edge_id)
    counted = "unknown" if kind == "bogus" else kind
    assert (outcome.kind, outcome.result) == (counted, reason), outcome
    assert fragment in outcome.detail, outcome.detail
    assert anonymizer.metrics.model_refresh.labels(counted, reason)._value.get() == 1
    assert anonymizer.metrics.model_refresh.labels(counted, "accepted")._value.get() == 0
    # Nothing changed: the same sessions run, the version gauge says so, and the status tells why.
    assert anonymizer.generator is sessions[0] and anonymizer.classifier is sessions[1]
    assert anonymizer.models() == {"generator": SHIPPED_VERSION, "classifier": version_of(CLASSIFIER)}
    assert [s.labels["version"] for s in anonymizer.metrics.model_info.collect()[0].samples
            if s.labels["kind"] == "generator"] == [SHIPPED_VERSION]
    assert status["state"] == "online" and status["models"]["generator"] == SHIPPED_VERSION
    assert status["refresh"]["last_refusal"]["result"] == reason and fragment in status["refresh"]["last_refusal"]["detail"]
    assert "last_accepted" not in status["refresh"]


async def test_retained_announcement_is_taken_then_recognised_and_older_ones_refused(mosquitto, sessions, keys,
                                                                                     tmp_path: Path) -> None:
    """An edge that starts after the release still gets it (retained); the same announcement seen
    again (reconnect) changes nothing; a release older than the new model is a replay."""
    host, port = mosquitto
    broker = BrokerConfig(host=host, port=port)
    prefix = f"t{uuid.uuid4().hex[:8]}/ecg/models"
    edge_id = f"refresh-{uuid.uuid4().hex[:8]}"
    new_gen, new_cls = tmp_path / "generator.onnx", tmp_path / "classifier.onnx"
    new_gen.write_bytes(variant(GENERATOR, model_version=NEWER))
    new_cls.write_bytes(variant(CLASSIFIER, model_version=NEWER))
    for path in (new_gen, new_cls):
        rc = await asyncio.to_thread(trainer_cli.main, ["publish", str(path), "--key", str(keys["key"]),
                                                        "--broker", f"{host}:{port}", "--topic-prefix", prefix])
        assert rc == 0
    anonymizer = Anonymizer(*sessions, PipelineSettings(seed=1), EdgeMetrics())
    metrics = anonymizer.metrics.model_refresh
    try:
        async with (MqttSink(broker, f"{prefix}/anon", edge_id=edge_id) as sink,
                    ModelRefresher(broker, anonymizer, [announce.load_public_key(keys["pub"])], topic_prefix=prefix,
                                   report=sink.update_status) as refresher):
            first = await _outcomes(refresher, 2)
            assert sorted((o.kind, o.result) for o in first) == [("classifier", "accepted"),
                                                                  ("generator", "accepted")]
            assert anonymizer.models() == {"generator": NEWER, "classifier": NEWER}
            status = await _retained(broker, f"ecg/edge/{edge_id}/status")
            assert status["models"] == {"generator": NEWER, "classifier": NEWER}
            assert status["refresh"]["last_accepted"]["version"] == NEWER
            swap = max(o.seconds["swap"] for o in first)
            assert swap < 0.01  # the swap itself is a few attribute writes on the loop
            running = anonymizer.generator

            # The running model announced again (a re-release; the retained message after a reconnect).
            async with broker.client("release") as client:
                payload = _sign(new_gen.read_bytes(), "generator", NEWER, keys["key"])
                await client.publish(models_topic("generator", prefix), payload, qos=1, retain=True)
                [*_, again] = await _outcomes(refresher, 3)
                assert again.result == "current" and not again.refused
                between = variant(GENERATOR, model_version="2050.01.01.000000")  # newer than shipped, older than NEWER
                await client.publish(models_topic("generator", prefix),
                                     _sign(between, "generator", "2050.01.01.000000", keys["key"]), qos=1,
                                     retain=True)
                [*_, older] = await _outcomes(refresher, 4)
            status = await _retained(broker, f"ecg/edge/{edge_id}/status")
    finally:
        await _clear(broker, prefix, edge_id)
    assert older.result == "replay" and "not newer than the running v2099.01.01.000000" in older.detail
    assert anonymizer.generator is running and anonymizer.models()["generator"] == NEWER
    assert metrics.labels("generator", "accepted")._value.get() == 1
    assert metrics.labels("generator", "current")._value.get() == 1
    assert metrics.labels("generator", "replay")._value.get() == 1
    assert status["refresh"]["last_refusal"]["result"] == "replay" and status["models"]["generator"] == NEWER
    gauge = {s.labels["kind"]: s.labels["version"] for s in anonymizer.metrics.model_info.collect()[0].samples}
    assert gauge == {"generator": NEWER, "classifier": NEWER}


# ---------------------------------------------------------------------------------------------
# A release reaches a running edge under load


RECORDS = ("100", "119", "208", "232")


async def test_published_generator_is_swapped_in_under_load_without_a_gap(mosquitto, keys, tmp_path: Path) -> None:
    """`ecg-edge run` (edge.app.run) replays four MIT-BIH slices at 8x into the MQTT sink; meanwhile
    `ecg-trainer publish` announces a generator whose surrogates are five times smaller. Every
    stream's output stays contiguous and unmasked across the switch, every beat before it comes
    from the old generator and every beat after it from the new one, by its tag and by its size."""
    from edge import app

    host, port = mosquitto
    tag = uuid.uuid4().hex[:8]
    prefix, edge_id = f"t{tag}", f"refresh-edge-{tag}"
    replays = "\n".join(f'[[sources.replay]]\nrecord = "{DATA / r}"\nspeed = 8\ndevice = "wfdb:{r}"\n' for r in RECORDS)
    (tmp_path / "edge.toml").write_text(f"""
[broker]
host = "{host}"
port = {port}

[pipeline]
seed = 5

[refresh]
public_keys = ["{keys['pub']}"]
topic_prefix = "{prefix}/ecg/models"

{replays}
[sinks.mqtt]
topic_prefix = "{prefix}/ecg/anon"
edge_id = "{edge_id}"

[metrics]
port = 0
""")
    cfg = load_config(tmp_path / "edge.toml")
    release = tmp_path / "generator-smaller.onnx"
    release.write_bytes(variant(GENERATOR, scale=0.2, model_version=NEWER))
    ecg: dict[str, list[dict]] = {}
    beats: dict[str, list[dict]] = {}
    statuses: list[dict] = []
    broker = BrokerConfig(host=host, port=port)
    try:
        async with aiomqtt.Client(host, port) as sub:
            await sub.subscribe([(f"{prefix}/ecg/anon/#", 1), (f"ecg/edge/{edge_id}/status", 1)])

            async def listen() -> None:
                async for message in sub.messages:
                    topic, body = str(message.topic), json.loads(message.payload)
                    if topic.startswith("ecg/edge/"):
                        statuses.append(body)
                        if body["state"] == "offline":
                            return
                    elif topic.endswith("/ecg"):
                        ecg.setdefault(topic.split("/")[-2], []).append(body)
                    elif topic.endswith("/beats"):
                        beats.setdefault(topic.split("/")[-2], []).append(body)

            listener = asyncio.create_task(listen())
            edge = asyncio.create_task(app.run(cfg, stop_when_sources_end=True))
            async with asyncio.timeout(60):  # the old generator is at work in every stream
                while sum(sum(len(m["beats"]) for m in v) >= 5 for v in beats.values()) < len(RECORDS):
                    await asyncio.sleep(0.05)
            rc = await asyncio.to_thread(trainer_cli.main, [
                "publish", str(release), "--key", str(keys["key"]), "--broker", f"{host}:{port}",
                "--topic-prefix", f"{prefix}/ecg/models"])
            assert rc == 0
            await asyncio.wait_for(edge, 120)
            await asyncio.wait_for(listener, 20)
    finally:
        await _clear(broker, f"{prefix}/ecg/models", edge_id)

    inputs = [read_wfdb(DATA / r)[0] for r in RECORDS]
    assert len(ecg) == len(RECORDS)
    for pseudonym, frames in ecg.items():
        frames.sort(key=lambda f: f["seq"])
        starts = [f["seq"] for f in frames]
        assert starts == list(np.cumsum([0] + [len(f["samples"]) for f in frames[:-1]]))  # contiguous, none twice
        out = np.array([v for f in frames for v in f["samples"]], dtype=float)
        assert len(out) == len(inputs[0]) and not any(f["masked"] for f in frames) and np.isfinite(out).all()
        assert all(np.mean(np.isclose(out, x, atol=1e-6, rtol=0)) < 0.01 for x in inputs)  # no raw samples
        tagged = sorted((b["sample"], b["model"]) for m in beats[pseudonym] for b in m["beats"])
        models = [m for _, m in tagged]
        switch = models.index(NEWER)
        assert switch >= 5 and set(models[:switch]) == {SHIPPED_VERSION} and set(models[switch:]) == {NEWER}
        assert len(models) - switch >= 20  # most of the record after the switch
        w = round(0.05 * 360)
        size = {m: [np.ptp(out[s - w:s + w]) for s, mm in tagged if mm == m and s >= w] for m in set(models)}
        assert max(size[NEWER]) < min(size[SHIPPED_VERSION]) / 1.5, (max(size[NEWER]), min(size[SHIPPED_VERSION]))
    online = [s for s in statuses if s["state"] == "online"]
    assert online[0]["models"]["generator"] == SHIPPED_VERSION
    assert online[-1]["models"]["generator"] == NEWER and online[-1]["refresh"]["last_accepted"]["version"] == NEWER
    assert "last_refusal" not in online[-1]["refresh"] and statuses[-1]["state"] == "offline"
