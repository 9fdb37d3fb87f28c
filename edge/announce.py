"""Signed model announcements: the one format the trainer publishes and the edge verifies.

A new model reaches running edges as a retained MQTT message on ``ecg/models/<kind>``. Whoever
can publish on that topic would otherwise decide which generator renders every surrogate that
leaves the edge, so an announcement carries an Ed25519 signature by a key the gateway operator
trusts, over a header that holds the model's SHA-256 and size: one signature covers the header
and, through the digest, the model bytes. The layout (schema 1, docs/model-refresh.md)::

    "ECGMODEL" | header length (u32, big-endian) | header (canonical JSON) | signature (64) | model

The header is canonical JSON (sorted keys, no spaces, ASCII), so the publisher's bytes are the
bytes that are signed; the edge verifies the header exactly as it arrived, then parses nothing
it has not verified except the schema number. :func:`decode` is pure and total: any payload
either gives an :class:`Announcement` or raises :class:`AnnouncementError` with a short
``reason`` (for the counter) and a sentence saying what is wrong (for the log and the status).
The edge imports this module; the trainer imports it too, never the reverse.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

SCHEMA = 1
MAGIC = b"ECGMODEL"
#: Signed bytes are this context followed by the header: a signature made for anything else
#: (another protocol using the same key) never verifies as an announcement.
SIGNING_CONTEXT = b"ecg-model-announcement\x00"
SIGNATURE_BYTES = 64
MAX_HEADER_BYTES = 16 * 1024
#: Largest model one announcement carries by default. The shipped models are about 0.6 MB;
#: brokers cap packets too (mosquitto: unlimited up to MQTT's 256 MiB unless
#: ``message_size_limit`` / ``max_packet_size`` say less; EMQX: 1 MB by default).
DEFAULT_MAX_MODEL_BYTES = 16 * 1024 * 1024
#: Bytes an announcement adds around its model, at most.
OVERHEAD_BYTES = len(MAGIC) + 4 + MAX_HEADER_BYTES + SIGNATURE_BYTES
KINDS = ("generator", "classifier")

_HEADER_FIELDS = {"schema": int, "kind": str, "version": str, "sha256": str, "size": int, "key_id": str,
                  "created": (int, float)}
_VERSION = re.compile(r"[A-Za-z0-9._+-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")

#: Why an announcement is refused (the ``result`` label of ``ecg_edge_model_refresh_total``).
REASONS = {
    "garbage": "not an announcement at all",
    "truncated": "shorter than its own framing or header says",
    "oversize": "larger than this edge accepts",
    "schema": "a header this edge cannot read",
    "key": "signed by a key this edge does not trust",
    "signature": "the signature does not verify",
    "size": "model bytes longer than the header says",
    "digest": "model bytes whose SHA-256 differs from the header's",
}


class AnnouncementError(ValueError):
    """An announcement that cannot be trusted or used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Announcement:
    """A verified announcement: the signed header's fields and the model bytes they describe."""

    kind: str
    version: str
    sha256: str
    size: int
    key_id: str
    created: float
    model: bytes

    def header(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "kind": self.kind, "version": self.version, "sha256": self.sha256,
                "size": self.size, "key_id": self.key_id, "created": self.created}


# --------------------------------------------------------------------------------------------
# Keys


def generate_key_pair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as PEM: (private key, PKCS#8 unencrypted; public key, SPKI)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Short fingerprint of a key: the first 16 hex digits of SHA-256 of its raw public bytes."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (``ecg-trainer keygen``); ValueError says why not."""
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: a {type(key).__name__}, not an Ed25519 private key")  # noqa: TRY004 - bad input
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file; ValueError says why not."""
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")  # noqa: TRY004 - bad input
    return key


# --------------------------------------------------------------------------------------------
# Encoding


def canonical_header(header: Mapping[str, Any]) -> bytes:
    """The one byte encoding of a header that is signed and sent."""
    return json.dumps(dict(header), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def sign(header: bytes, key: Ed25519PrivateKey) -> bytes:
    return key.sign(SIGNING_CONTEXT + header)


def frame(header: bytes, signature: bytes, model: bytes) -> bytes:
    """Assemble an announcement from its parts (tests use it to build damaged ones too)."""
    return MAGIC + struct.pack(">I", len(header)) + header + signature + model


def encode(model: bytes, kind: str, version: str, key: Ed25519PrivateKey, *, created: float | None = None,
           max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES) -> bytes:
    """Sign and frame one model. Raises ValueError for what no edge would accept."""
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not _VERSION.fullmatch(version):
        raise ValueError(f"model version {version!r} must be 1-64 characters of [A-Za-z0-9._+-]")
    if not model:
        raise ValueError("the model is empty")
    if len(model) > max_model_bytes:
        raise ValueError(
            f"the model is {len(model):,} bytes; one announcement carries at most {max_model_bytes:,} "
            "(raise the limit on the publisher and on every edge, refresh.max_model_bytes, and check "
            "the broker's packet size limit)")
    header = canonical_header({
        "schema": SCHEMA, "kind": kind, "version": version, "sha256": hashlib.sha256(model).hexdigest(),
        "size": len(model), "key_id": key_id(key), "created": round(time.time() if created is None else created, 3),
    })
    return frame(header, sign(header, key), model)


# --------------------------------------------------------------------------------------------
# Decoding and verification


def decode(payload: bytes | bytearray, trusted: Iterable[Ed25519PublicKey],
           max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES) -> Announcement:
    """Verify one announcement against the trusted keys; raises AnnouncementError saying why not."""
    data = bytes(payload)
    if len(data) > max_model_bytes + OVERHEAD_BYTES:
        raise AnnouncementError("oversize", f"announcement of {len(data):,} bytes; this edge takes models of "
                                            f"at most {max_model_bytes:,} bytes (refresh.max_model_bytes)")
    if not data.startswith(MAGIC[: len(data)]):
        raise AnnouncementError("garbage", f"{len(data):,} bytes that do not start with {MAGIC.decode()!r}: "
                                           "not a model announcement")
    head = len(MAGIC) + 4
    if len(data) < head:
        raise AnnouncementError("truncated", f"{len(data)} bytes end inside the framing")
    (n,) = struct.unpack(">I", data[len(MAGIC):head])
    if n > MAX_HEADER_BYTES:
        raise AnnouncementError("garbage", f"header length {n:,} exceeds {MAX_HEADER_BYTES:,} bytes")
    if len(data) < head + n + SIGNATURE_BYTES:
        raise AnnouncementError("truncated", f"{len(data):,} bytes end inside the header or signature "
                                             f"(header of {n} bytes)")
    raw = data[head:head + n]
    signature = data[head + n:head + n + SIGNATURE_BYTES]
    model = data[head + n + SIGNATURE_BYTES:]
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise AnnouncementError("garbage", "the header is not JSON") from None
    if not isinstance(header, dict):
        raise AnnouncementError("garbage", f"the header is a JSON {type(header).__name__}, not an object")
    if header.get("schema") != SCHEMA or type(header.get("schema")) is not int:
        raise AnnouncementError("schema", f"header schema {header.get('schema')!r}; this edge reads schema {SCHEMA}")
    signer = header.get("key_id")
    keys = {key_id(k): k for k in trusted}
    if signer not in keys:
        raise AnnouncementError("key", f"signed by key {str(signer)[:32]!r}, which is not among this edge's "
                                       f"{len(keys)} trusted key(s) (refresh.public_keys)")
    try:
        keys[signer].verify(signature, SIGNING_CONTEXT + raw)
    except InvalidSignature:
        raise AnnouncementError("signature", f"the signature does not verify against trusted key {signer}: "
                                             "the header was altered or signed by another key") from None
    problems = [f"{k!r} must be {t.__name__ if isinstance(t, type) else 'a number'}"
                for k, t in _HEADER_FIELDS.items()
                if type(header.get(k)) not in (t if isinstance(t, tuple) else (t,))]
    unknown = sorted(set(header) - set(_HEADER_FIELDS))
    if unknown:
        problems.append(f"unknown field(s) {', '.join(unknown)}")
    if not problems:
        if header["kind"] not in KINDS:
            problems.append(f"kind {header['kind']!r} is not one of {', '.join(KINDS)}")
        if not _VERSION.fullmatch(header["version"]):
            problems.append(f"version {header['version'][:80]!r} is not 1-64 characters of [A-Za-z0-9._+-]")
        if not _SHA256.fullmatch(header["sha256"]):
            problems.append("sha256 is not 64 lowercase hex digits")
        if header["size"] < 1:
            problems.append(f"size {header['size']} is not positive")
    if problems:
        raise AnnouncementError("schema", "signed header is malformed: " + "; ".join(problems))
    size = header["size"]
    if size > max_model_bytes:
        raise AnnouncementError("oversize", f"model of {size:,} bytes; this edge takes at most {max_model_bytes:,} "
                                            "(refresh.max_model_bytes)")
    if len(model) < size:
        raise AnnouncementError("truncated", f"{len(model):,} of the model's {size:,} bytes arrived")
    if len(model) > size:
        raise AnnouncementError("size", f"{len(model):,} model bytes where the signed header says {size:,}")
    digest = hashlib.sha256(model).hexdigest()
    if digest != header["sha256"]:
        raise AnnouncementError("digest", f"model bytes hash to {digest[:16]}…, the signed header says "
                                          f"{header['sha256'][:16]}…: the model was altered")
    return Announcement(kind=header["kind"], version=header["version"], sha256=digest, size=size, key_id=signer,
                        created=float(header["created"]), model=model)
