"""`ecg-trainer keygen` and `ecg-trainer publish`: sign a model and announce it to running edges.

An edge swaps in a new model only if a key its operator trusts signed it (edge/refresh.py), so
publishing is two steps: ``keygen`` once, keeping the private key with whoever releases models
and handing the public key to gateway operators; then ``publish`` per release, which checks the
model as the edge will (it loads, its contract parses), signs it and leaves it as a retained
MQTT message on ``ecg/models/<kind>``, where every edge, running or started later, finds it.
The format is edge/announce.py's, the one definition both sides use (docs/model-refresh.md).
Neither command needs torch.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import aiomqtt

from edge import announce
from edge.models import (
    GENERATOR,
    ClassifierSession,
    GeneratorSession,
    ModelContract,
    ModelContractError,
)
from edge.mqtt import BrokerConfig
from edge.refresh import MODELS_PREFIX, models_topic


class PublishError(ValueError):
    """The announcement could not be delivered (broker unreachable, refused, not acknowledged)."""


@dataclass(frozen=True)
class Published:
    """What went out: enough to find it on the broker and to recognise it in the edge's status."""

    topic: str
    kind: str
    version: str
    sha256: str
    model_bytes: int
    payload_bytes: int
    key_id: str


def key_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``OUT.key`` (private) and ``OUT.pub`` (public) for a key pair named OUT."""
    return Path(f"{os.fspath(out)}.key"), Path(f"{os.fspath(out)}.pub")


def keygen(out: str | os.PathLike[str], force: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``OUT.key`` (PEM, mode 0600) and ``OUT.pub`` (PEM).

    Refuses to overwrite an existing key unless ``force``: a lost signing key means every edge
    must be given a new public key.
    """
    private_path, public_path = key_paths(out)
    existing = [str(p) for p in (private_path, public_path) if p.exists()]
    if existing and not force:
        raise ValueError(f"{' and '.join(existing)} already exist (--force replaces them)")
    private_pem, public_pem = announce.generate_key_pair()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    private_path.unlink(missing_ok=True)
    # Created with 0600 from the start: the key is never readable by others, not even briefly.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def read_contract(data: bytes, source: str) -> ModelContract:
    """The model's contract, after loading the model as an edge would (ValueError says why not).

    The model is checked against its own codec and classes (as ``ecg-trainer export`` does); each
    edge then checks it against what it runs.
    """
    import onnxruntime as ort

    try:
        meta = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for bad bytes
        raise ValueError(f"{source} is not a loadable ONNX model: {exc}") from None
    try:
        contract = ModelContract.from_metadata(meta)
        session = GeneratorSession if contract.kind == GENERATOR else ClassifierSession
        session(data, codec=contract.codec, classes=contract.classes, warm_up=False)
    except ModelContractError as exc:
        raise ValueError(str(exc).replace("<bytes>", source)) from None
    return contract


def build(model_path: str | os.PathLike[str], key_path: str | os.PathLike[str],
          max_model_bytes: int = announce.DEFAULT_MAX_MODEL_BYTES) -> tuple[bytes, announce.Announcement]:
    """The signed announcement of one model file, and what it announces (verified as an edge would)."""
    path = Path(model_path)
    size = path.stat().st_size
    if size > max_model_bytes:  # before reading it: the refusal should not cost the memory
        raise ValueError(
            f"{path} is {size:,} bytes; one announcement carries at most {max_model_bytes:,} (--max-bytes; "
            "every edge's refresh.max_model_bytes and the broker's packet size limit must allow it too)")
    data = path.read_bytes()
    key = announce.load_private_key(key_path)
    contract = read_contract(data, str(path))
    payload = announce.encode(data, contract.kind, contract.version, key, max_model_bytes=max_model_bytes)
    return payload, announce.decode(payload, [key.public_key()], max_model_bytes)


async def publish(
    model_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    broker: BrokerConfig,
    *,
    topic_prefix: str = MODELS_PREFIX,
    max_model_bytes: int = announce.DEFAULT_MAX_MODEL_BYTES,
    timeout_s: float = 30.0,
) -> Published:
    """Sign the model and leave it retained on ``<topic_prefix>/<kind>`` (QoS 1, acknowledged)."""
    payload, ann = build(model_path, key_path, max_model_bytes)
    topic = models_topic(ann.kind, topic_prefix)
    try:
        async with asyncio.timeout(timeout_s):
            async with broker.client("publisher") as client:
                await client.publish(topic, payload, qos=1, retain=True, timeout=timeout_s)
    except (aiomqtt.MqttError, TimeoutError, OSError) as exc:
        raise PublishError(f"could not publish to {broker} within {timeout_s:g} s: {exc or type(exc).__name__}") from None
    return Published(topic, ann.kind, ann.version, ann.sha256, ann.size, len(payload), ann.key_id)


def parse_broker(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6); ValueError for anything else."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--broker must be HOST:PORT, not {address!r}")
    return host, int(port)

