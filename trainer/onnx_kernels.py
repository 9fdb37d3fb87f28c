"""Rewrite an exported graph onto onnxruntime's fast CPU kernels; same function, same weights.

The edge runs every beat through the classifier and the generator on one CPU thread, so their
kernels are most of its cost per beat. Two ops of these 1-D conv nets take slow paths in
onnxruntime's CPU provider (measured with its profiler on the shipped models):

- **1-D Conv and MaxPool.** onnxruntime's blocked-layout (NCHWc) convolution and pooling kernels
  are used only for 2-D ops; a 1-D op falls back to im2col and a plain GEMM. Each 1-D Conv and
  MaxPool becomes the same op over a height-1 image (``Unsqueeze`` - 2-D op - ``Squeeze``), and
  squeezes that an unsqueeze undoes right away are removed, so a chain of conv, activation and
  pool stays 2-D and onnxruntime can fuse it. The classifier runs about 1.3x faster per beat.
- **Edge padding written as slices, expands and a concat** (``torch.cat`` of repeated end
  samples, with the shape arithmetic the exporter adds for ``expand(-1, -1, n)``): one ``Pad``
  in ``edge`` mode does the same copy.

Both keep the function (the export's parity check against torch holds them to it); the floating
point order differs, by about 1e-6. Written here because neither torch's exporter nor
onnxruntime's graph optimizer makes these rewrites, and onnx itself has no such pass. (The
generator's linear x2 upsampling, the third slow op, never reaches the graph: it is folded into
the convolution after it before export, ``BeatGenerator.inference_form``.)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

_ELEMENTWISE = frozenset({"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh"})  # one input, shape-preserving


def for_cpu_kernels(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with 1-D Conv/MaxPool as 2-D ops and torch's edge padding as one Pad."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    for n in g.node:  # torch's exporter writes small constants as Constant nodes
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            inits.setdefault(n.output[0], n.attribute[0].t)
    axis = _const(g, "_cpu_axis2", np.array([2], dtype=np.int64))
    producers = {o: n for n in g.node for o in n.output}
    nodes: list[onnx.NodeProto] = []
    for k, node in enumerate(g.node):
        if node.op_type in ("Conv", "MaxPool") and _is_1d(node, inits):
            nodes += _as_2d(g, node, inits, axis, f"_cpu{k}")
        elif node.op_type == "Concat" and (n := _edge_pad_width(node, producers, inits)):
            pads = _const(g, f"_cpu{k}_pads", np.array([0, 0, n, 0, 0, n], dtype=np.int64))
            nodes.append(helper.make_node("Pad", [node.input[1], pads], list(node.output), mode="edge"))
        else:
            nodes.append(node)
    nodes = _cancel_squeezes(_sink_squeezes(nodes, axis, g), axis, g)
    del g.node[:]
    g.node.extend(_live(nodes, g))
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    onnx.checker.check_model(model)
    return model


def _const(g: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    if any(i.name == name for i in g.initializer):  # a graph rewritten before: it holds this one
        return name
    g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _is_1d(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    attrs = _attrs(node)
    if node.op_type == "Conv":
        return node.input[1] in inits and len(inits[node.input[1]].dims) == 3 and "auto_pad" not in attrs
    return len(attrs.get("kernel_shape", [])) == 1 and "auto_pad" not in attrs and len(node.output) == 1


def _as_2d(g: onnx.GraphProto, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], axis: str,
           p: str) -> list[onnx.NodeProto]:
    """``node`` over (N, C, L) as the same 2-D op over (N, C, 1, L)."""
    inputs = [p + "_in", *node.input[1:]]
    if node.op_type == "Conv":
        weight = numpy_helper.to_array(inits[node.input[1]])
        inputs[1] = _const(g, p + "_weight", weight[:, :, None, :])
    attrs = {}
    for name, value in _attrs(node).items():
        if name in ("kernel_shape", "strides", "dilations"):
            value = [1, *value]
        elif name == "pads":
            value = [0, value[0], 0, value[1]]
        attrs[name] = value
    return [helper.make_node("Unsqueeze", [node.input[0], axis], [p + "_in"]),
            helper.make_node(node.op_type, inputs, [p + "_out"], **attrs),
            helper.make_node("Squeeze", [p + "_out", axis], list(node.output))]


def _edge_pad_width(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto],
                    inits: dict[str, onnx.TensorProto]) -> int:
    """``n`` when ``node`` is ``cat([x[..., :1].expand(-1, -1, n), x, x[..., -1:].expand(-1, -1, n)], -1)``
    as torch exports it, else 0."""
    if len(node.input) != 3 or _attrs(node).get("axis") not in (-1, 2):
        return 0
    x = node.input[1]
    widths = []
    for name, (start, stop) in ((node.input[0], (0, 1)), (node.input[2], (-1, 2**63 - 1))):
        expand = producers.get(name)
        if expand is None or expand.op_type != "Expand":
            return 0
        cut, shape = producers.get(expand.input[0]), producers.get(expand.input[1])
        if cut is None or cut.op_type != "Slice" or cut.input[0] != x or len(cut.input) < 4:
            return 0
        bounds = [numpy_helper.to_array(inits[i]).tolist() if i in inits else None for i in cut.input[1:4]]
        if bounds[0] != [start] or bounds[1] != [stop] or bounds[2] not in ([2], [-1]):
            return 0
        if shape is None or shape.op_type != "Where" or shape.input[2] not in inits:
            return 0  # torch writes expand(-1, -1, n) as Where(shape == -1, input shape, [-1, -1, n])
        target = numpy_helper.to_array(inits[shape.input[2]]).tolist()
        if len(target) != 3 or target[:2] != [-1, -1] or target[2] < 1:
            return 0
        widths.append(int(target[2]))
    return widths[0] if widths[0] == widths[1] else 0


def _live(nodes: list[onnx.NodeProto], g: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes the graph's outputs depend on (rewrites leave their old subgraphs dangling)."""
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    return keep[::-1]


def _consumers(nodes: list[onnx.NodeProto], g: onnx.GraphProto) -> dict[str, int]:
    count: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            count[i] = count.get(i, 0) + 1
    for o in g.output:
        count[o.name] = count.get(o.name, 0) + 1
    return count


def _sink_squeezes(nodes: list[onnx.NodeProto], axis: str, g: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Move a Squeeze(axis 2) below the elementwise op that is its only consumer, so the next
    Unsqueeze can cancel it (conv - activation - pool stays 2-D)."""
    changed = True
    while changed:
        changed = False
        uses = _consumers(nodes, g)
        for i, sq in enumerate(nodes):
            if sq.op_type != "Squeeze" or list(sq.input)[1:] != [axis] or uses.get(sq.output[0]) != 1:
                continue
            j = next((j for j, n in enumerate(nodes) if sq.output[0] in n.input), None)
            op = nodes[j] if j is not None else None
            if op is None or op.op_type not in _ELEMENTWISE or op.input[0] != sq.output[0] or j < i:
                continue
            moved = helper.make_node(op.op_type, [sq.input[0], *op.input[1:]], [sq.output[0] + "_4d"])
            moved.attribute.extend(op.attribute)
            squeeze = helper.make_node("Squeeze", [moved.output[0], axis], list(op.output))
            nodes = [*nodes[:i], *nodes[i + 1 : j], moved, squeeze, *nodes[j + 1 :]]
            changed = True
            break
    return nodes


def _cancel_squeezes(nodes: list[onnx.NodeProto], axis: str, g: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Drop Squeeze(axis 2) - Unsqueeze(axis 2) pairs: the unsqueeze's consumers read the 4-D tensor."""
    uses = _consumers(nodes, g)
    by_output = {o: n for n in nodes for o in n.output}
    rename: dict[str, str] = {}
    drop: set[int] = set()
    for n in nodes:
        if n.op_type == "Unsqueeze" and list(n.input)[1:] == [axis]:
            sq = by_output.get(n.input[0])
            if sq is not None and sq.op_type == "Squeeze" and list(sq.input)[1:] == [axis]:
                rename[n.output[0]] = sq.input[0]
                drop.add(id(n))
                if uses.get(n.input[0]) == 1:
                    drop.add(id(sq))
    out = []
    for n in nodes:
        if id(n) in drop:
            continue
        for k, name in enumerate(n.input):
            if name in rename:
                n.input[k] = rename[name]
        out.append(n)
    return out
