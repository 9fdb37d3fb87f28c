"""The edge refuses models whose contract does not match; the trainer's export proves parity.

The networks here are deliberately tiny, but everything else is real: torch export, ONNX files,
onnxruntime sessions and the edge's checks.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edge.codec import DEFAULT_SPEC
from edge.models import (
    CLASSIFIER,
    GENERATOR,
    ClassifierSession,
    GeneratorSession,
    ModelContract,
    ModelContractError,
)
from edge.records import AAMI_CLASSES
from trainer.export import ExportError, build_model, export_model, parity, read_metadata


class TinyGenerator(nn.Module):
    def __init__(self, persona_dim: int = 16, beat_dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(AAMI_CLASSES), 8)
        self.out = nn.Linear(persona_dim + beat_dim + 8 + 2, DEFAULT_SPEC.length)

    def forward(self, persona, z, label, rr):
        return self.out(torch.cat([persona, z, self.embed(label), torch.log(rr)], dim=1))


class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 8, stride=8)
        self.out = nn.Linear(4 * 24 + 3, len(AAMI_CLASSES))

    def forward(self, beats, rr):
        h = torch.relu(self.conv(beats[:, None, :])).flatten(1)
        return self.out(torch.cat([h, torch.log(rr)], dim=1))


GEN_CONTRACT = ModelContract(
    kind=GENERATOR, version="1.0.0", codec=DEFAULT_SPEC, classes=AAMI_CLASSES,
    rr_features=("pre_rr", "local_rr"), data_hash="ab" * 32, persona_dim=16, beat_dim=4,
    extra={"metrics.note": "test"},
)
CLS_CONTRACT = ModelContract(
    kind=CLASSIFIER, version="1.0.0", codec=DEFAULT_SPEC, classes=AAMI_CLASSES,
    rr_features=("pre_rr", "local_rr", "long_rr"), data_hash="cd" * 32,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    gen = export_model(TinyGenerator(), GEN_CONTRACT, root / "generator.onnx")
    cls = export_model(TinyClassifier(), CLS_CONTRACT, root / "classifier.onnx")
    assert gen.max_abs_error < 1e-5 and cls.max_abs_error < 1e-5
    return {GENERATOR: gen.path, CLASSIFIER: cls.path}


def _rewrite(src: Path, dst: Path, **changes: str | None) -> Path:
    model = onnx.load(str(src))
    meta = {p.key: p.value for p in model.metadata_props}
    for k, v in changes.items():
        key = k.replace("__", ".")
        if v is None:
            meta.pop(key, None)
        else:
            meta[key] = v
    del model.metadata_props[:]
    for k, v in meta.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(model, str(dst))
    return dst


def test_export_writes_the_contract(models: dict[str, Path]) -> None:
    meta = read_metadata(models[GENERATOR])
    assert meta["model.kind"] == "generator" and meta["latent.persona_dim"] == "16"
    assert meta["codec.fs"] == "250.0" and meta["model.classes"] == "N,S,V,F,Q"
    assert meta["training.data_hash"] == "ab" * 32 and meta["metrics.note"] == "test"
    assert ModelContract.from_metadata(meta) == GEN_CONTRACT


class _Drifting(TinyGenerator):
    """Exports a form that computes something else than the trained module (a wrong rewrite)."""

    def __init__(self, drift: float, gain: float = 1.0) -> None:
        super().__init__()
        self.drift, self.gain = drift, gain

    def forward(self, persona, z, label, rr):
        return self.gain * super().forward(persona, z, label, rr)

    def inference_form(self) -> nn.Module:
        other = copy.deepcopy(self)
        with torch.no_grad():
            other.out.bias += self.drift
        return other


def test_an_export_that_fails_parity_writes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.raises(ExportError, match="differ by 1.00e-02 .*nothing written"):
        export_model(_Drifting(0.01), GEN_CONTRACT, tmp_path / "generator.onnx")
    assert list(tmp_path.iterdir()) == []


def test_parity_is_measured_on_each_beat_s_scale() -> None:
    # float32 rounding grows with the values: a difference of 0.05 on beats of 1,000 units is
    # 5e-5 of their scale and passes; the same on beats of about one unit fails.
    torch.manual_seed(0)
    big = _Drifting(0.05 / 1000, gain=1000.0)
    data, error = build_model(big, GEN_CONTRACT)
    assert error == pytest.approx(0.05, rel=1e-2)
    absolute, scaled = parity(big, data, GEN_CONTRACT)
    assert absolute == pytest.approx(0.05, rel=1e-2) and 1e-5 < scaled < 1e-4
    with pytest.raises(ExportError):
        build_model(_Drifting(0.05), GEN_CONTRACT)


def test_sessions_load_run_and_batch(models: dict[str, Path]) -> None:
    gen = GeneratorSession(models[GENERATOR])
    rng = np.random.default_rng(0)
    for n in (1, 64):
        beats = gen.generate(rng.standard_normal((n, 16)), rng.standard_normal((n, 4)),
                             rng.integers(0, 5, n), np.full((n, 2), 0.8))
        assert beats.shape == (n, DEFAULT_SPEC.length) and beats.dtype == np.float32
    cls = ClassifierSession(models[CLASSIFIER])
    assert cls.classify(beats, np.full((64, 3), 0.8)).shape == (64,)


def test_wrong_kind_is_refused(models: dict[str, Path]) -> None:
    with pytest.raises(ModelContractError, match="is a classifier model, expected a generator"):
        GeneratorSession(models[CLASSIFIER])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"codec__fs": "360.0"}, "another beat codec"),
        ({"codec__pre": "60"}, "another beat codec"),
        ({"codec__version": "9"}, "not supported"),
        ({"model__classes": "N,S,V,F"}, "has classes"),
        ({"contract__version": None}, "contract version"),
        ({"training__data_hash": None}, "lacks 'training.data_hash'"),
        ({"latent__persona_dim": "8"}, "'persona' is tensor"),
        ({"latent__beat_dim": "x"}, "malformed"),
        ({"model__rr_features": "pre_rr,local_rr,long_rr"}, "'rr' is tensor"),
    ],
)
def test_mismatched_contracts_are_refused(models: dict[str, Path], tmp_path: Path, changes: dict, message: str) -> None:
    bad = _rewrite(models[GENERATOR], tmp_path / "bad.onnx", **changes)
    with pytest.raises(ModelContractError, match=message):
        GeneratorSession(bad)


def test_edge_with_another_codec_refuses_the_model(models: dict[str, Path]) -> None:
    other = dataclasses.replace(DEFAULT_SPEC, post=120)
    with pytest.raises(ModelContractError, match="another beat codec"):
        ClassifierSession(models[CLASSIFIER], codec=other)


def test_garbage_and_truncated_files_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(ModelContractError, match="not a loadable ONNX model"):
        GeneratorSession(junk)
    data = models[GENERATOR].read_bytes()
    with pytest.raises(ModelContractError, match="not a loadable ONNX model"):
        GeneratorSession(data[: len(data) // 2])
