"""Export trained models to ONNX with their contract in ``metadata_props``, and prove parity.

The edge loads these files with onnxruntime and checks the contract (edge/models.py). The graph
is rewritten onto onnxruntime's fast CPU kernels (trainer/onnx_kernels.py); the export checks
that it still computes what the torch model computes, on random inputs of two batch sizes (the
batch axis is dynamic), and reports the largest absolute difference. A model that fails the check
is never written: a file at the output path has passed it.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edge.models import (
    CLASSIFIER,
    GENERATOR,
    IO_SPEC,
    ClassifierSession,
    GeneratorSession,
    ModelContract,
)
from trainer.onnx_kernels import for_cpu_kernels

log = logging.getLogger(__name__)

OPSET = 18
#: Parity bound between torch and onnxruntime (float32 arithmetic in a different order), on each
#: output row's difference over its own scale, max(1, max |row|): float32 rounding grows with the
#: values, and a generator's beats end in the codec's amplitude rule, a division by the R
#: deflection, which reaches |x| of several units early in training (a 4-step generator: 2.3e-4
#: absolute, 5e-5 of its row's scale). A wrong graph differs by a whole unit of scale.
PARITY_TOLERANCE = 2e-4


_LEGACY_EXPORT_WARNINGS = (
    r"You are using the legacy TorchScript-based ONNX export",
    r"The feature will be removed\. Please remove usage of this function",
)


class ExportError(RuntimeError):
    """The exported graph does not match the torch model."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_error: float
    contract: ModelContract


def example_inputs(contract: ModelContract, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs in each model input's real range (RR 0.3-2 s, valid labels)."""
    rng = np.random.default_rng(seed)
    if contract.kind == GENERATOR:
        return {
            "persona": rng.standard_normal((n, contract.persona_dim)).astype(np.float32),
            "z": rng.standard_normal((n, contract.beat_dim)).astype(np.float32),
            "label": rng.integers(0, len(contract.classes), n).astype(np.int64),
            "rr": rng.uniform(0.3, 2.0, (n, len(contract.rr_features))).astype(np.float32),
        }
    return {
        "beats": rng.standard_normal((n, contract.codec.length)).astype(np.float32) * 0.3,
        "rr": rng.uniform(0.3, 2.0, (n, len(contract.rr_features))).astype(np.float32),
    }


def export_model(module: nn.Module, contract: ModelContract, path: str | os.PathLike[str]) -> ExportResult:
    """Write ``module`` as ONNX with a dynamic batch axis and ``contract`` as metadata; check parity."""
    data, error = build_model(module, contract)
    return save_model(data, error, contract, Path(path))


def save_model(data: bytes, error: float, contract: ModelContract, path: Path) -> ExportResult:
    """Write a model ``build_model`` made (and checked) to ``path``, and say so."""
    write_model(data, path)
    log.info("exported %s to %s (max abs error vs torch %.2e)", contract.kind, path, error)
    return ExportResult(path, error, contract)


def build_model(module: nn.Module, contract: ModelContract) -> tuple[bytes, float]:
    """The ONNX bytes of ``module`` with ``contract`` as metadata, and their largest absolute
    difference from torch; ``ExportError`` if they fail the parity check (nothing is written)."""
    module = module.eval().cpu()
    # A model may compute the same function faster for inference (BeatGenerator.inference_form);
    # that form is exported, and the parity check below holds it to the trained module.
    graph = module.inference_form() if hasattr(module, "inference_form") else module
    names_in = list(IO_SPEC[contract.kind]["inputs"])
    names_out = list(IO_SPEC[contract.kind]["outputs"])
    example = {k: torch.from_numpy(v) for k, v in example_inputs(contract, 3).items()}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is the stable path for these small conv nets; torch 2.13 says
        # it is deprecated, in these two messages, on every call.
        for message in _LEGACY_EXPORT_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        torch.onnx.export(
            graph,
            tuple(example[k] for k in names_in),
            buf,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes={k: {0: "batch"} for k in names_in + names_out},
            opset_version=OPSET,
            dynamo=False,
        )
    model = for_cpu_kernels(onnx.load_from_string(buf.getvalue()))
    for key, value in contract.to_metadata().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "ecg-trainer"
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    error, scaled = parity(module, data, contract)
    if not scaled <= PARITY_TOLERANCE:  # NaN fails too
        raise ExportError(f"ONNX and torch differ by {error:.2e} ({scaled:.2e} of the output's scale, "
                          f"> {PARITY_TOLERANCE:g}); nothing written")
    return data, error


def write_model(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` whole or not at all (a reader never sees half a model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def parity(module: nn.Module, data: bytes, contract: ModelContract) -> tuple[float, float]:
    """|torch - onnxruntime| over random inputs at batch sizes 1 and 37: the largest difference,
    and the largest over its row's scale, max(1, max |row|) (the tolerance's measure). A NaN in
    both agrees; a NaN in one alone is a NaN difference, which fails the check."""
    session_cls = GeneratorSession if contract.kind == GENERATOR else ClassifierSession
    session = session_cls(data, codec=contract.codec, classes=contract.classes, warm_up=False)
    worst, scaled = [], []
    for n, seed in ((1, 1), (37, 2)):
        inputs = example_inputs(contract, n, seed)
        with torch.no_grad():
            expected = module(*(torch.from_numpy(inputs[k]) for k in IO_SPEC[contract.kind]["inputs"])).numpy()
        got = session.run(**inputs)
        expected, got = expected.reshape(n, -1), got.reshape(n, -1)
        both = np.isnan(expected) & np.isnan(got)
        diff = np.where(both, 0.0, np.abs(expected - got))
        scale = np.maximum(1.0, np.where(np.isnan(expected), 0.0, np.abs(expected)).max(axis=1))
        worst.append(diff.max())
        scaled.append((diff.max(axis=1) / scale).max())
    return float(np.max(worst)), float(np.max(scaled))  # np.max keeps a NaN, the builtin drops it


def read_metadata(path: str | os.PathLike[str]) -> Mapping[str, str]:
    """The ``metadata_props`` of an ONNX file."""
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


__all__ = ["CLASSIFIER", "GENERATOR", "ExportError", "ExportResult", "build_model", "export_model", "parity", "read_metadata",
           "save_model", "write_model"]
