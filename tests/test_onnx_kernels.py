"""The export's graph rewrite (trainer/onnx_kernels.py) keeps the function and leaves no slow op."""

from __future__ import annotations

import io
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from trainer.export import _LEGACY_EXPORT_WARNINGS, OPSET
from trainer.generator import _edge_pad
from trainer.onnx_kernels import for_cpu_kernels

MODELS = Path(__file__).resolve().parents[1] / "edge" / "assets" / "models"


class _ConvNet(nn.Module):
    """The shapes of the shipped nets: conv-BN-ReLU-pool chains, the generator's edge padding
    and its 5-tap convolutions, leaky ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv1d(1, 6, 7, padding=3), nn.BatchNorm1d(6), nn.ReLU(), nn.MaxPool1d(2),
                                   nn.Conv1d(6, 8, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2))
        self.up = nn.Conv1d(8, 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x[:, None, :])  # (N, 8, 25) from 101 samples: the odd length drops one in the pool
        h = F.leaky_relu(self.up(_edge_pad(h, 2)), 0.2)
        return h.flatten(1)


def _export(module: nn.Module) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        for message in _LEGACY_EXPORT_WARNINGS:  # the exporter the trainer uses, and its warnings
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        torch.onnx.export(module.eval(), (torch.zeros(2, 101),), buf, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=OPSET, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def _one_d_ops(model: onnx.ModelProto) -> list[str]:
    """Conv/MaxPool nodes still 1-D, and Resize nodes: what must not reach the edge."""
    weights = {i.name: i for i in model.graph.initializer}
    left = []
    for n in model.graph.node:
        if n.op_type == "Resize":
            left.append(n.name or "Resize")
        elif n.op_type == "Conv" and len(weights[n.input[1]].dims) != 4:
            left.append(n.name or "Conv")
        elif n.op_type == "MaxPool" and len(next(a.ints for a in n.attribute if a.name == "kernel_shape")) != 2:
            left.append(n.name or "MaxPool")
    return left


def test_rewrite_keeps_the_function_and_removes_every_slow_op() -> None:
    torch.manual_seed(0)
    net = _ConvNet()
    with torch.no_grad():  # a trained-looking BatchNorm, so folding it matters
        net.trunk[1].running_mean.uniform_(-0.5, 0.5)
        net.trunk[1].running_var.uniform_(0.5, 2.0)
    before = _export(net)
    after = for_cpu_kernels(before)
    assert len(_one_d_ops(before)) == 5  # 2 conv + 2 pool in the trunk, the last conv
    assert _one_d_ops(after) == []
    # The conv - ReLU - pool chain stays 2-D: one squeeze for the trunk and one for the up conv.
    ops = Counter(n.op_type for n in after.graph.node)
    assert ops["Squeeze"] == 2, ops
    assert Counter(n.op_type for n in before.graph.node)["Expand"] == 2
    assert ops["Expand"] == 0 and ops["Where"] == 0, ops  # the edge padding is one Pad, its shape arithmetic gone
    rng = np.random.default_rng(0)
    for batch in (1, 37):
        x = rng.standard_normal((batch, 101)).astype(np.float32)
        with torch.no_grad():
            expected = net(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(_run(after, x), _run(before, x), atol=1e-5)
        np.testing.assert_allclose(_run(after, x), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["classifier", "generator"])
def test_shipped_models_are_on_the_fast_kernels(name: str) -> None:
    model = onnx.load(str(MODELS / f"{name}.onnx"))
    assert _one_d_ops(model) == []
    assert "Expand" not in {n.op_type for n in model.graph.node}
    again = for_cpu_kernels(model)  # nothing left to rewrite
    assert [n.op_type for n in again.graph.node] == [n.op_type for n in model.graph.node]
    assert all(numpy_helper.to_array(i).size for i in model.graph.initializer)
