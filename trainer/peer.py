"""The trainer's torch generator behind the edge's generator interface: the peer row of
``ecg-edge bench`` (the edge itself runs ONNX and never imports torch)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from edge.models import ModelContract
from trainer.pipeline import MODEL_FILE, load_run


def latest_run(task: str, runs_dir: str | Path = "runs") -> Path:
    """The newest finished run of a task (``runs/<task>/NNN`` with a model file)."""
    runs = sorted(p.parent for p in Path(runs_dir).glob(f"{task}/*/{MODEL_FILE}"))
    if not runs:
        raise FileNotFoundError(f"no finished {task} run under {runs_dir}/ (train one: ecg-trainer fit {task})")
    return runs[-1]


class TorchGeneratorSession:
    """``generate`` with the same inputs and outputs as ``edge.models.GeneratorSession``."""

    def __init__(self, run_dir: str | Path, contract: ModelContract) -> None:
        self.module = load_run(run_dir)["module"].eval()
        self.contract = contract
        self.sha256 = hashlib.sha256(str(run_dir).encode()).hexdigest()

    def generate(self, persona: np.ndarray, z: np.ndarray, label: np.ndarray, rr: np.ndarray) -> np.ndarray:
        return torch_generate(self.module, persona, z, label, rr)


@torch.inference_mode()
def torch_generate(module: torch.nn.Module, persona: np.ndarray, z: np.ndarray, label: np.ndarray,
                   rr: np.ndarray) -> np.ndarray:
    """A torch generator called with the edge's numpy inputs (``GeneratorSession.generate``)."""
    return module(
        torch.from_numpy(np.ascontiguousarray(persona, np.float32)),
        torch.from_numpy(np.ascontiguousarray(z, np.float32)),
        torch.from_numpy(np.ascontiguousarray(label, np.int64)),
        torch.from_numpy(np.ascontiguousarray(rr, np.float32)),
    ).numpy()
