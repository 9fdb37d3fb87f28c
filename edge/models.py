"""ONNX model sessions with their contract checked at load time.

A model is only useful to the edge if it was trained for exactly the beats the edge produces: the
same codec (window, rate, normalisation), the same class list, the same latent and RR inputs. Every
exported model carries that contract in its ONNX ``metadata_props``; a session refuses a model
whose contract is missing or does not match, before it sees a single beat, and warms up so the
first real batch does not pay onnxruntime's one-time costs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge.codec import DEFAULT_SPEC, CodecSpec, CodecSpecError
from edge.records import AAMI_CLASSES

log = logging.getLogger(__name__)

CONTRACT_VERSION = "1"
GENERATOR = "generator"
CLASSIFIER = "classifier"

#: Inputs and outputs of each model kind: name -> (dtype, trailing shape). Batch is axis 0.
#: ``None`` in a trailing shape is filled from the contract (latent sizes, RR features).
IO_SPEC: dict[str, dict[str, dict[str, tuple[str, tuple[str, ...]]]]] = {
    GENERATOR: {
        "inputs": {
            "persona": ("tensor(float)", ("persona_dim",)),
            "z": ("tensor(float)", ("beat_dim",)),
            "label": ("tensor(int64)", ()),
            "rr": ("tensor(float)", ("rr_features",)),
        },
        "outputs": {"beats": ("tensor(float)", ("length",))},
    },
    CLASSIFIER: {
        "inputs": {
            "beats": ("tensor(float)", ("length",)),
            "rr": ("tensor(float)", ("rr_features",)),
        },
        "outputs": {"logits": ("tensor(float)", ("classes",))},
    },
}


class ModelContractError(ValueError):
    """A model whose contract is missing, malformed or does not match what this edge runs."""


@dataclass(frozen=True)
class ModelContract:
    """What a model promises about its inputs and outputs, and where it came from."""

    kind: str
    version: str  # the model's own version (monotonic: later releases compare greater)
    codec: CodecSpec
    classes: tuple[str, ...]
    rr_features: tuple[str, ...]
    data_hash: str  # SHA-256 of the training records and codec spec
    persona_dim: int = 0  # generators only
    beat_dim: int = 0
    extra: Mapping[str, str] = field(default_factory=dict)  # metrics, producer: informative

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "contract.version": CONTRACT_VERSION,
            "model.kind": self.kind,
            "model.version": self.version,
            "model.classes": ",".join(self.classes),
            "model.rr_features": ",".join(self.rr_features),
            "training.data_hash": self.data_hash,
            **self.codec.to_metadata(),
        }
        if self.kind == GENERATOR:
            meta["latent.persona_dim"] = str(self.persona_dim)
            meta["latent.beat_dim"] = str(self.beat_dim)
        meta.update({k: v for k, v in self.extra.items() if k not in meta})
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> ModelContract:
        """Parse a model's metadata; raises ModelContractError saying what is wrong."""
        if meta.get("contract.version") != CONTRACT_VERSION:
            raise ModelContractError(
                f"model has contract version {meta.get('contract.version')!r}, this edge reads "
                f"{CONTRACT_VERSION!r} (was it exported by ecg-trainer export?)"
            )
        try:
            kind = meta["model.kind"]
            if kind not in IO_SPEC:
                raise ModelContractError(f"unknown model kind {kind!r}")
            codec = CodecSpec.from_metadata(meta)
            dims = {}
            if kind == GENERATOR:
                dims = {"persona_dim": int(meta["latent.persona_dim"]), "beat_dim": int(meta["latent.beat_dim"])}
                if min(dims.values()) < 1:
                    raise ModelContractError(f"latent sizes must be positive, got {dims}")
            known = {"contract.version", "model.kind", "model.version", "model.classes", "model.rr_features",
                     "training.data_hash", "latent.persona_dim", "latent.beat_dim"}
            return cls(
                kind=kind,
                version=meta["model.version"],
                codec=codec,
                classes=tuple(c for c in meta["model.classes"].split(",") if c),
                rr_features=tuple(c for c in meta["model.rr_features"].split(",") if c),
                data_hash=meta["training.data_hash"],
                extra={k: v for k, v in meta.items() if k not in known and not k.startswith("codec.")},
                **dims,
            )
        except KeyError as exc:
            raise ModelContractError(f"model metadata lacks {exc.args[0]!r}") from None
        except CodecSpecError as exc:
            raise ModelContractError(f"model codec contract: {exc}") from None
        except ValueError as exc:
            if isinstance(exc, ModelContractError):
                raise
            raise ModelContractError(f"model metadata is malformed: {exc}") from None


class ModelSession:
    """An onnxruntime session (CPU) for one model, checked against the edge's expectations."""

    kind: str = ""

    def __init__(
        self,
        model: str | os.PathLike[str] | bytes,
        codec: CodecSpec = DEFAULT_SPEC,
        classes: tuple[str, ...] = AAMI_CLASSES,
        threads: int = 1,
        warm_up: bool = True,
    ) -> None:
        data = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.source = "<bytes>" if isinstance(model, bytes) else str(model)
        self.sha256 = hashlib.sha256(data).hexdigest()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad bytes
            raise ModelContractError(f"{self.source} is not a loadable ONNX model: {exc}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.contract = ModelContract.from_metadata(meta)
        self._check(codec, classes)
        if warm_up:
            self.warm_up()
        log.info("loaded %s %s v%s (sha256 %s…)", self.contract.kind, self.source, self.contract.version, self.sha256[:12])

    def _check(self, codec: CodecSpec, classes: tuple[str, ...]) -> None:
        c = self.contract
        if c.kind != self.kind:
            raise ModelContractError(f"{self.source} is a {c.kind} model, expected a {self.kind}")
        if c.codec != codec:
            diff = {k: (v, codec.to_metadata().get(k)) for k, v in c.codec.to_metadata().items()
                    if codec.to_metadata().get(k) != v}
            raise ModelContractError(f"{self.source} was trained for another beat codec: {diff} (model, edge)")
        if c.classes != tuple(classes):
            raise ModelContractError(f"{self.source} has classes {c.classes}, the edge uses {tuple(classes)}")
        sizes = {"length": codec.length, "classes": len(classes), "rr_features": len(c.rr_features),
                 "persona_dim": c.persona_dim, "beat_dim": c.beat_dim}
        spec = IO_SPEC[self.kind]
        for where, nodes in (("input", self.session.get_inputs()), ("output", self.session.get_outputs())):
            expected = spec[where + "s"]
            got = {n.name: n for n in nodes}
            if set(got) != set(expected):
                raise ModelContractError(f"{self.source} has {where}s {sorted(got)}, expected {sorted(expected)}")
            for name, (dtype, trailing) in expected.items():
                node = got[name]
                want = tuple(sizes[t] for t in trailing)
                shape = tuple(node.shape[1:])
                if node.type != dtype or len(node.shape) != 1 + len(want) or shape != want:
                    raise ModelContractError(
                        f"{self.source} {where} {name!r} is {node.type}{list(node.shape)}, "
                        f"expected {dtype}[batch, {', '.join(map(str, want))}]"
                    )
                if isinstance(node.shape[0], int) and node.shape[0] != 1:
                    raise ModelContractError(f"{self.source} {where} {name!r} has a fixed batch of {node.shape[0]}")

    def warm_up(self) -> None:
        """Run one small batch now: onnxruntime allocates and plans on the first call."""
        self.run(**self._example(4))

    def _example(self, n: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def run(self, **inputs: np.ndarray) -> np.ndarray:
        return self.session.run(None, inputs)[0]


class GeneratorSession(ModelSession):
    """Surrogate beats: persona and per-beat latents, class and RR context in, canonical beats out."""

    kind = GENERATOR

    def _example(self, n: int) -> dict[str, np.ndarray]:
        c = self.contract
        return {
            "persona": np.zeros((n, c.persona_dim), np.float32),
            "z": np.zeros((n, c.beat_dim), np.float32),
            "label": np.arange(n, dtype=np.int64) % len(c.classes),
            "rr": np.full((n, len(c.rr_features)), 0.8, np.float32),
        }

    def generate(self, persona: np.ndarray, z: np.ndarray, label: np.ndarray, rr: np.ndarray) -> np.ndarray:
        return self.run(
            persona=np.ascontiguousarray(persona, np.float32),
            z=np.ascontiguousarray(z, np.float32),
            label=np.ascontiguousarray(label, np.int64),
            rr=np.ascontiguousarray(rr, np.float32),
        )


class ClassifierSession(ModelSession):
    """AAMI class of each beat: canonical beat and RR context in, class logits out."""

    kind = CLASSIFIER

    def _example(self, n: int) -> dict[str, np.ndarray]:
        return {
            "beats": np.zeros((n, self.contract.codec.length), np.float32),
            "rr": np.full((n, len(self.contract.rr_features)), 0.8, np.float32),
        }

    def logits(self, beats: np.ndarray, rr: np.ndarray) -> np.ndarray:
        """Class logits per beat, (n, classes) in ``contract.classes`` order."""
        return self.run(beats=np.ascontiguousarray(beats, np.float32), rr=np.ascontiguousarray(rr, np.float32))

    def classify(self, beats: np.ndarray, rr: np.ndarray) -> np.ndarray:
        """Class index per beat (into ``contract.classes``)."""
        return np.argmax(self.logits(beats, rr), axis=1)


def default_model_path(kind: str) -> Path:
    """The model of this kind that ships inside the package."""
    return Path(str(resources.files("edge") / "assets" / "models" / f"{kind}.onnx"))
