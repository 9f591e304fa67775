"""SmoothQuant-style scaling of a graph's MatMul inputs before static W8A8 quantization.

Decoder activations carry a few channels with outliers far above the rest; one per-tensor activation scale then
wastes most of the int8 range on them. SmoothQuant divides each input channel j by s_j = amax_j^a / wmax_j^(1-a)
and multiplies the matching weight row by s_j, an exact identity in float that moves the difficulty from the
activations to the (per-channel quantized) weights. onnxruntime only offers this through Intel Neural Compressor, a
second framework we would otherwise not need; the arithmetic is small, so it is done here on the ONNX graph.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

log = logging.getLogger("megaedge.export.smoothing")

_SCALE_LIMITS = (1e-4, 1e4)


def channel_absmax(model, tensor_names: list[str], feeds: list[dict]) -> dict[str, np.ndarray]:
    """Per-last-axis-channel max |x| of the named intermediate tensors over the calibration feeds."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in tensor_names:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    accepted = {i.name for i in session.get_inputs()}
    amax: dict[str, np.ndarray] = {}
    for feed in feeds:
        values = session.run(tensor_names, {k: v for k, v in feed.items() if k in accepted})
        for name, value in zip(tensor_names, values):
            if value.size == 0:
                continue
            current = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            amax[name] = current if name not in amax else np.maximum(amax[name], current)
    return amax


def smooth(model, node_names: list[str], feeds: list[dict], alpha: float):
    """Scale the inputs of the named MatMul nodes (constant weights [K, N]) in place; returns (model, groups)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    wanted = set(node_names)
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        if node.name in wanted and node.op_type == "MatMul" and node.input[1] in inits:
            consumers[node.input[0]].append(node)
    amax = channel_absmax(model, list(consumers), feeds)
    position = {id(n): i for i, n in enumerate(graph.node)}
    insertions = []
    for index, (x, nodes) in enumerate(consumers.items()):
        if x not in amax:
            continue
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        a = amax[x].astype(np.float64)
        scale = np.where((a > 0) & (wmax > 0), a ** alpha / np.maximum(wmax, 1e-12) ** (1.0 - alpha), 1.0)
        scale = np.clip(scale, *_SCALE_LIMITS).astype(np.float32)
        inverse_name, scaled_name = f"smooth_inv_{index}", f"smooth_x_{index}"
        graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inverse_name))
        for node, weight in zip(nodes, weights):
            # A weight shared with another consumer would be scaled twice; give this node its own copy.
            new_name = f"{node.input[1]}_smooth_{index}"
            graph.initializer.append(numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), new_name))
            node.input[0], node.input[1] = scaled_name, new_name
        first = min(position[id(n)] for n in nodes)
        insertions.append((first, helper.make_node("Mul", [x, inverse_name], [scaled_name], name=f"smooth_{index}")))
    for first, mul in sorted(insertions, key=lambda item: -item[0]):
        graph.node.insert(first, mul)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    log.info("smoothquant: %d input tensors scaled (alpha %.2f)", len(insertions), alpha)
    return model, len(insertions)
