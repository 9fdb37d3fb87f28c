"""How far the shipped models are from what onnxruntime can do with them: each graph rewrite that
keeps the models' function, timed against the shipped graph in pairs (one thread, batch 35, the
sessions taking turns, thread CPU summed), and what a generator block's time goes to.

    PYTHONPATH=. python experiments/model_graph_variants.py     (pin it with taskset)

1. A generator block as exported (edge pad, 2-D conv with both output phases, interleave, FiLM,
   leaky ReLU) cut after the conv and after the interleave: the conv's share of the block.
2. The same block with a 4-tap conv (the polyphase conv's two phases each have a zero tap at
   opposite ends: shift one phase by a sample and cut it off after the interleave) and in
   channels-last layout (im2col as slices and a concat, one GEMM; the phases then interleave
   for free).
3. The shipped generator with every shape computation that does not depend on the batch folded
   into constants (the exporter writes the interleave's reshape and FiLM's chunk as Shape -
   Gather - arithmetic chains).
4. The shipped classifier's four ensemble members as one graph: the first conv with all members'
   filters, the others grouped (group = 4), one ReLU and pool per layer.
"""

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.anonymize import load_models  # noqa: E402
from trainer.export import example_inputs  # noqa: E402
from trainer.onnx_kernels import _live  # noqa: E402

BATCH = 35
rng = np.random.default_rng(0)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def paired(models: dict[str, onnx.ModelProto], feeds: dict[str, dict[str, np.ndarray]], rounds: int = 20,
           calls: int = 40) -> dict[str, float]:
    """µs per call of each model, the models taking turns (the first one's order reversed each round)."""
    sessions = {k: session(m) for k, m in models.items()}
    spent = dict.fromkeys(sessions, 0.0)
    for r in range(rounds):
        for k in (list(sessions) if r % 2 else list(sessions)[::-1]):
            s, f = sessions[k], feeds[k]
            t = time.thread_time()
            for _ in range(calls):
                s.run(None, f)
            spent[k] += time.thread_time() - t
    return {k: 1e6 * v / (rounds * calls) for k, v in spent.items()}


def _graph(nodes, inputs, output, inits) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "block", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    keep = _live(list(m.graph.node), m.graph)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def _i64(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def block(c_in: int, c_out: int, length: int, taps: int = 5, upto: str = "out") -> onnx.ModelProto:
    """A generator block as exported, channels first; ``taps=4``: the shifted 4-tap form."""
    w = (0.1 * rng.standard_normal((2 * c_out, c_in, 1, taps))).astype(np.float32)
    n = length + 5 - taps  # conv outputs per phase
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(2 * c_out, np.float32), "b"),
             _i64("pads", [0, 0, 2, 0, 0, 2]), _i64("ax", [2]), _i64("s1", [0, c_out, 2, n]), _i64("s2", [0, c_out, 2 * n]),
             _i64("lo", [1]), _i64("hi", [2 * length + 1]), _i64("last", [2])]
    nodes = [helper.make_node("Pad", ["x", "pads"], ["xp"], mode="edge"),
             helper.make_node("Unsqueeze", ["xp", "ax"], ["x4"]),
             helper.make_node("Conv", ["x4", "w", "b"], ["y4"], kernel_shape=[1, taps]),
             helper.make_node("Squeeze", ["y4", "ax"], ["conv"]),
             helper.make_node("Reshape", ["conv", "s1"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 1, 3, 2]),
             helper.make_node("Reshape", ["t", "s2"], ["interleaved" if taps == 5 else "long"])]
    if taps == 4:
        nodes.append(helper.make_node("Slice", ["long", "lo", "hi", "last"], ["interleaved"]))
    nodes += [helper.make_node("Mul", ["interleaved", "g"], ["m"]), helper.make_node("Add", ["m", "beta"], ["a"]),
              helper.make_node("LeakyRelu", ["a"], ["out"], alpha=0.2)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", c_in, length])]
    if upto == "out":
        inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, ["B", c_out, 1]) for k in ("g", "beta")]
    return _graph(nodes, inputs, upto, inits)


def channels_last_block(c_in: int, c_out: int, length: int) -> onnx.ModelProto:
    """The same block on (B, L, C): five shifted slices concatenated, one GEMM, phases free."""
    inits = [numpy_helper.from_array((0.1 * rng.standard_normal((5 * c_in, 2 * c_out))).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(2 * c_out, np.float32), "b"), _i64("pads", [0, 2, 0, 0, 2, 0]),
             _i64("flat", [-1, 5 * c_in]), _i64("s1", [-1, 2 * length, c_out]), _i64("ax", [1])]
    nodes = [helper.make_node("Pad", ["x", "pads"], ["xp"], mode="edge")]
    for j in range(5):
        inits += [_i64(f"lo{j}", [j]), _i64(f"hi{j}", [j + length])]
        nodes.append(helper.make_node("Slice", ["xp", f"lo{j}", f"hi{j}", "ax"], [f"tap{j}"]))
    nodes += [helper.make_node("Concat", [f"tap{j}" for j in range(5)], ["col"], axis=2),
              helper.make_node("Reshape", ["col", "flat"], ["col2"]),
              helper.make_node("Gemm", ["col2", "w", "b"], ["y"]),
              helper.make_node("Reshape", ["y", "s1"], ["interleaved"]),
              helper.make_node("Mul", ["interleaved", "g"], ["m"]), helper.make_node("Add", ["m", "beta"], ["a"]),
              helper.make_node("LeakyRelu", ["a"], ["out"], alpha=0.2)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", length, c_in])]
    inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, ["B", 1, c_out]) for k in ("g", "beta")]
    return _graph(nodes, inputs, "out", inits)


def fold_static_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape computations whose values are the same at two batch sizes become constants (a
    reshape target that only carries the batch becomes 0 there)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    derived: set[str] = set()
    for n in g.node:
        ins = [i for i in n.input if i]
        if n.op_type == "Shape" or (n.op_type != "Constant" and any(i in derived for i in ins)
                                    and all(i in derived or i in consts for i in ins)):
            derived.update(n.output)
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.output]}
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    names = sorted(derived)
    probe.graph.output.extend(helper.make_tensor_value_info(t, types[t], None) for t in names)
    values = []
    for batch in (2, 5):
        feeds = {}
        for i in g.input:
            shape = [d.dim_value if d.HasField("dim_value") else batch for d in i.type.tensor_type.shape.dim]
            feeds[i.name] = np.ones(shape, dtype=helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
        values.append(dict(zip(names, session(probe).run(names, feeds))))
    for n in g.node:
        if set(n.output) & derived or n.op_type == "Constant":
            continue
        for k, name in enumerate(n.input):
            if name not in derived:
                continue
            a, b = values[0][name], values[1][name]
            if a.shape == b.shape and np.array_equal(a, b):
                const = a
            elif n.op_type == "Reshape" and k == 1 and a[0] == 2 and b[0] == 5 and np.array_equal(a[1:], b[1:]):
                const = np.concatenate([[0], a[1:]]).astype(np.int64)
            else:
                continue
            n.input[k] = f"{name}_folded{k}"
            g.initializer.append(numpy_helper.from_array(const, n.input[k]))
    nodes = _live(list(g.node), g)
    del g.node[:]
    g.node.extend(nodes)
    return model


def merged_ensemble(model: onnx.ModelProto, members: int = 4, layers: int = 4) -> onnx.ModelProto:
    """The classifier's member conv chains as one chain of (grouped) convs, split after the flatten."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    weights = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    convs = [n for n in g.node if n.op_type == "Conv"]
    pools = [n for n in g.node if n.op_type == "MaxPool"]
    flats = [n for n in g.node if n.op_type == "Flatten"]
    assert len(convs) == len(pools) == members * layers and len(flats) == members

    def attrs(n):
        return {a.name: helper.get_attribute_value(a) for a in n.attribute}

    new, x = [], convs[0].input[0]
    for layer in range(layers):
        chain = [convs[m * layers + layer] for m in range(members)]
        g.initializer.extend([
            numpy_helper.from_array(np.concatenate([weights[c.input[1]] for c in chain]), f"_ens{layer}_w"),
            numpy_helper.from_array(np.concatenate([weights[c.input[2]] for c in chain]), f"_ens{layer}_b")])
        new += [helper.make_node("Conv", [x, f"_ens{layer}_w", f"_ens{layer}_b"], [f"_ens{layer}_c"],
                                 **{**attrs(chain[0]), "group": 1 if layer == 0 else members}),
                helper.make_node("Relu", [f"_ens{layer}_c"], [f"_ens{layer}_r"]),
                helper.make_node("MaxPool", [f"_ens{layer}_r"], [f"_ens{layer}_p"], **attrs(pools[layer]))]
        x = f"_ens{layer}_p"
    g.initializer.extend([_i64("_ens_axis", [2]), _i64("_ens_split", [_flat_width(g, weights, flats[0])] * members)])
    new += [helper.make_node("Squeeze", [x, "_ens_axis"], ["_ens_sq"]),
            helper.make_node("Flatten", ["_ens_sq"], ["_ens_flat"], axis=1)]
    new.append(helper.make_node("Split", ["_ens_flat", "_ens_split"], [f.output[0] for f in flats], axis=1))
    nodes = [n for n in g.node if n not in flats]
    first = min(i for i, n in enumerate(nodes) if any(f.output[0] in n.input for f in flats))
    nodes = _live(nodes[:first] + new + nodes[first:], g)
    del g.node[:]
    g.node.extend(nodes)
    return model


def _flat_width(g: onnx.GraphProto, weights: dict[str, np.ndarray], flatten: onnx.NodeProto) -> int:
    """Features one member's flatten yields (from the head's first Gemm: its inputs less the RR units)."""
    concat = next(n for n in g.node if flatten.output[0] in n.input)
    head = next(n for n in g.node if concat.output[0] in n.input)
    rr = next(n for n in g.node if concat.input[1] in n.output)  # the RR embedding's activation
    rr_gemm = next(n for n in g.node if rr.input[0] in n.output)
    return weights[head.input[1]].shape[1] - weights[rr_gemm.input[1]].shape[0]


def main() -> None:
    print(f"onnxruntime {ort.__version__}, one thread, batch {BATCH}; µs per call")
    print("\n1-2. generator blocks (c_in, c_out, length): conv only / + interleave / whole block; 4-tap; channels-last")
    for c_in, c_out, length in [(64, 48, 12), (48, 32, 24), (32, 24, 48), (24, 16, 96)]:
        x = rng.standard_normal((BATCH, c_in, length)).astype(np.float32)
        film = {k: rng.standard_normal((BATCH, c_out, 1)).astype(np.float32) for k in ("g", "beta")}
        models = {"conv": block(c_in, c_out, length, upto="conv"), "interleave": block(c_in, c_out, length, upto="interleaved"),
                  "block": block(c_in, c_out, length), "4-tap": block(c_in, c_out, length, taps=4),
                  "channels-last": channels_last_block(c_in, c_out, length)}
        feeds = {"conv": {"x": x}, "interleave": {"x": x}, "block": {"x": x, **film}, "4-tap": {"x": x, **film},
                 "channels-last": {"x": x.transpose(0, 2, 1).copy(), **{k: v.transpose(0, 2, 1).copy() for k, v in film.items()}}}
        t = paired(models, feeds)
        print(f"  ({c_in}, {c_out}, {length}): conv {t['conv']:.0f} ({t['conv'] / t['block']:.0%} of the block), "
              f"+ interleave {t['interleave']:.0f}, block {t['block']:.0f}; 4-tap {t['4-tap'] / t['block']:.3f}x, "
              f"channels-last {t['channels-last'] / t['block']:.3f}x")

    generator, classifier = load_models()
    gen, cls = onnx.load(generator.source), onnx.load(classifier.source)
    gen_feeds, cls_feeds = example_inputs(generator.contract, BATCH), example_inputs(classifier.contract, BATCH)
    for name, shipped, variant, feeds in (("3. generator, shapes folded", gen, fold_static_shapes(gen), gen_feeds),
                                          ("4. classifier, members merged", cls, merged_ensemble(cls), cls_feeds)):
        a, b = session(shipped).run(None, feeds)[0], session(variant).run(None, feeds)[0]
        t = paired({"shipped": shipped, "variant": variant}, {"shipped": feeds, "variant": feeds})
        print(f"\n{name}: {len(shipped.graph.node)} -> {len(variant.graph.node)} nodes, largest difference "
              f"{float(np.abs(a - b).max()):.1e}; shipped {t['shipped']:.0f}, variant {t['variant']:.0f} "
              f"({t['variant'] / t['shipped']:.3f}x)")


if __name__ == "__main__":
    main()
