"""The encoder's convolution stem for the runtime's own CPU kernel (runtime/native_stem.py, kernels/conv_stem.h).

An INT8 bundle for the CPU keeps its encoder graph whole (``encoder.onnx``: what runs where no C compiler is) and
gains two files:

* ``encoder_stem.npz``: the three stem convolutions, the first in float, the two C -> C ones quantized to int8
  per output channel and block of inputs (symmetric, value + 128 as the decoder's MatMulNBits weights), inputs
  ordered (tap, channel) with the channels padded to a whole number of blocks;
* ``encoder_body.onnx``: the same graph from conv_out's input on (conv_out, positions, transformer layers,
  projector), cut out of ``encoder.onnx`` and reading its weights from ``encoder.onnx.data``, so nothing is stored
  twice. It keeps the ``mel`` input for its shape only (window and chunk counts); the stem's output enters as
  ``stem_features``.

Conv nodes are found by the module path the exporter records on each node (conv2d1..3, conv_out), never by
generated node names.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from megaedge.runtime import features, manifest

log = logging.getLogger("megaedge.export.native_stem")

STEM_INPUT = "stem_features"
CONVS = ("conv2d1", "conv2d2", "conv2d3")


def stem_block(channels: int) -> int:
    """Block of inputs per scale: 128 (the decoder's), 64 for narrow stems; a multiple of 64 feeds AMX tiles."""
    return 128 if channels > 64 else 64


def quantize_conv(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """A [C, C_in, 3, 3] convolution as uint8 [C, 9 * Cp / block, block] (value + 128) and float32 scales [C, blocks]:
    inputs in (tap, channel) order, channels zero-padded to Cp, one symmetric scale per output channel and block."""
    c, cin = weight.shape[:2]
    cp = -(-cin // block) * block
    taps = np.zeros((c, 3, 3, cp), np.float32)
    taps[..., :cin] = weight.transpose(0, 2, 3, 1)
    blocks = taps.reshape(c, 9 * cp // block, block)
    scale = np.abs(blocks).max(axis=2) / 127.0
    safe = np.where(scale > 0, scale, 1.0)
    values = np.clip(np.rint(blocks / safe[:, :, None]), -127, 127)
    return (values + 128).astype(np.uint8), scale.astype(np.float32)


def stem_arrays(conv1_w, conv1_b, conv2_w, conv2_b, conv3_w, conv3_b) -> dict[str, np.ndarray]:
    """The sidecar's arrays (runtime.kernels.StemWeights' fields) from the three convolutions' float weights."""
    channels = conv1_w.shape[0]
    if conv1_w.shape != (channels, 1, 3, 3) or any(w.shape != (channels, channels, 3, 3) for w in (conv2_w, conv3_w)):
        raise ValueError(f"stem convolutions {conv1_w.shape}, {conv2_w.shape}, {conv3_w.shape} are not "
                         f"1 -> C -> C -> C with 3x3 kernels")
    block = stem_block(channels)
    w2, s2 = quantize_conv(conv2_w, block)
    w3, s3 = quantize_conv(conv3_w, block)
    as32 = lambda a: np.ascontiguousarray(a, np.float32)  # noqa: E731
    return {"w1": as32(conv1_w.reshape(channels, 9).T), "b1": as32(conv1_b), "w2": w2, "s2": s2, "b2": as32(conv2_b),
            "w3": w3, "s3": s3, "b3": as32(conv3_b), "block": np.array(block, np.int32)}


def _stem_nodes(model) -> tuple[list, object]:
    """(the three stem Conv nodes in order, conv_out's MatMul node), or raises ValueError naming what is missing."""
    from megaedge.export.quantize import module_path

    convs = {module_path(n).removeprefix("enc."): n for n in model.graph.node if n.op_type == "Conv"}
    missing = [name for name in CONVS if name not in convs]
    if missing:
        raise ValueError(f"no Conv node of {missing} (float stem convolutions with module paths are needed)")
    # routed bundles: the base product runs under enc.conv_out.base, the gated LoRA branch under enc.conv_out
    conv_out = [n for n in model.graph.node if n.op_type == "MatMul" and module_path(n).startswith("enc.conv_out")]
    if not conv_out:
        raise ValueError("no float conv_out MatMul found")
    return [convs[name] for name in CONVS], conv_out[0]


def _body(model, cut: str, steps: int, width: int):
    """The graph from tensor ``cut`` on: nodes the outputs need once ``cut`` is an input, their initializers
    (external references unchanged), the inputs still read, and ``cut`` renamed to STEM_INPUT."""
    from onnx import TensorProto, helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    needed, todo, seen = set(), [o.name for o in graph.output], set()
    while todo:
        name = todo.pop()
        if name in seen or name == cut:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            todo.extend(i for i in node.input if i)
    nodes = [n for n in graph.node if id(n) in needed]
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    if cut not in used:
        raise ValueError(f"the encoder's outputs do not depend on {cut!r}")
    body = helper.make_graph([], graph.name + "_body", [], list(graph.output))
    for node in nodes:
        copy = body.node.add()
        copy.CopyFrom(node)
        for k, name in enumerate(copy.input):
            if name == cut:
                copy.input[k] = STEM_INPUT
    body.initializer.extend(i for i in graph.initializer if i.name in used)
    inputs = [i for i in graph.input if i.name in used]
    stem = helper.make_tensor_value_info(STEM_INPUT, TensorProto.FLOAT, ["stem_rows", steps, width])
    body.input.extend([*inputs, stem])
    body.value_info.extend(v for v in graph.value_info if v.name in used and v.name != cut)
    out = helper.make_model(body, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.producer_name = model.producer_name
    return out


def write_native_stem(bundle: Path, encoder: dict) -> dict:
    """Write the stem sidecar and the body graph next to the bundle's encoder graph; returns ``encoder`` (a
    manifest's encoder section) with ``native_stem`` describing them, or unchanged (reason logged) when the
    encoder's stem is not float convolutions the kernel can take."""
    import onnx
    from onnx import numpy_helper

    encoder = {k: v for k, v in encoder.items() if k != "native_stem"}
    path = bundle / manifest.ENCODER_FILE
    model = onnx.load(str(path), load_external_data=False)
    try:
        convs, conv_out = _stem_nodes(model)
        inits = {i.name: i for i in model.graph.initializer}

        def value(name: str) -> np.ndarray:
            if name not in inits:
                raise ValueError(f"{name} is not a constant")
            return numpy_helper.to_array(inits[name], base_dir=str(bundle)).astype(np.float32)

        params = []
        for n in convs:  # a bias of zeros may have been dropped by the exporter (a freshly initialized model's)
            weight = value(n.input[1])
            bias = value(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros(weight.shape[0], np.float32)
            params += [weight, bias]
        arrays = stem_arrays(*params)
        mel = next((i for i in model.graph.input if i.name == "mel"), None)
        bins = mel.type.tensor_type.shape.dim[1].dim_value if mel is not None else 0
        if not bins:
            raise ValueError("no mel input with a fixed number of bins")
        frames = int(encoder.get("chunk_frames", features.CHUNK_FRAMES))
        channels = arrays["b1"].shape[0]
        body = _body(model, conv_out.input[0], features.chunk_token_count(frames),
                     channels * features.chunk_token_count(bins))
    except ValueError as exc:
        log.info("%s: no native stem (%s)", path.name, exc)
        return encoder
    np.savez(bundle / manifest.NATIVE_STEM_FILE, **arrays)
    onnx.save(body, str(bundle / manifest.ENCODER_BODY_FILE))
    return {**encoder, "native_stem": {"file": manifest.NATIVE_STEM_FILE, "graph": "encoder_body",
                                       "block": int(arrays["block"]), "channels": channels, "bins": bins,
                                       "chunk_frames": frames, "weights": "int8 per output channel and block"}}


def add_native_stem(bundle: Path, doc: dict) -> dict:
    """``doc`` (a manifest document of the INT8 bundle at ``bundle``, graphs as dicts) with the native stem written
    and listed: ``encoder.native_stem`` and the ``encoder_body`` graph, or unchanged when the encoder has none."""
    from megaedge.export.bundle import _graph_spec

    doc = {**doc, "encoder": write_native_stem(bundle, doc["encoder"])}
    if "native_stem" in doc["encoder"]:
        encoder = doc["graphs"]["encoder"]
        body = _graph_spec(bundle / manifest.ENCODER_BODY_FILE, encoder["precision"], tuple(encoder["data_files"]))
        doc["graphs"] = {**doc["graphs"], "encoder_body": asdict(body)}
    return doc
