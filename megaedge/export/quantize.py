"""INT8 bundles with onnxruntime.quantization, calibrated on wild audio.

Recipes (field-lessons.md decides the shape of each):
* encoder: static INT8 in Q/DQ form, per-channel weights, activation ranges from wild-audio calibration clips; the
  conv stem (Conv + conv_out) stays float;
* decoder: per-channel weight INT8 with dynamic activations (per-tensor INT8 broke the 1.7B decoder in the field);
* ``tensorrt`` flavour: signed, symmetric Q/DQ everywhere (explicit quantization TensorRT builds from), which
  onnxruntime also runs, so it is testable here;
* ``naive``: per-tensor dynamic INT8 of every MatMul — the baseline the report compares against.

Which graph nodes a recipe touches is decided from the module path the exporter records on every node
(``pkg.torch.onnx.name_scopes``), not from generated node names.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megaedge.errors import MegaedgeError
from megaedge.progress import track
from megaedge.runtime import audio as audio_io
from megaedge.runtime import features, manifest, segmenting

log = logging.getLogger("megaedge.export.quantize")

TARGETS = ("cpu", "cuda", "tensorrt")


@dataclass(frozen=True)
class Int8Recipe:
    name: str
    encoder: str  # static | dynamic | float
    decoder: str  # dynamic | static | float
    per_channel: bool = True
    activation: str = "uint8"  # uint8 | int8 (static graphs)
    symmetric_activations: bool = False
    conv_stem_float: bool = True
    lora_float: bool = True  # routed bundles: keep the gated low-rank branch in float
    tied_embedding_int8: bool = False  # one int8 copy (per-row scales) serves embedding lookup AND LM head
    float_scopes: tuple[str, ...] = ()  # module-path fragments kept float (chosen by sensitivity measurement)
    description: str = ""

    @classmethod
    def named(cls, name: str) -> Int8Recipe:
        if name not in RECIPES:
            raise MegaedgeError(f"--recipe {name!r} is not one of {sorted(RECIPES)}")
        return RECIPES[name]

    @classmethod
    def for_target(cls, target: str) -> Int8Recipe:
        if target not in TARGETS:
            raise MegaedgeError(f"--target {target!r} is not one of {TARGETS}")
        return RECIPES[DEFAULT_FOR_TARGET[target]]


RECIPES = {
    "cpu": Int8Recipe("cpu", encoder="static", decoder="dynamic", tied_embedding_int8=True,
                      description="encoder static Q/DQ (u8 activations, per-channel s8 weights, conv stem float); "
                                  "decoder per-channel s8 weights with dynamic activations; tied embedding / LM "
                                  "head one int8 copy with per-row scales"),
    "cpu-weights": Int8Recipe("cpu-weights", encoder="dynamic", decoder="dynamic",
                              description="per-channel dynamic INT8 everywhere (no calibration needed)"),
    "tensorrt": Int8Recipe("tensorrt", encoder="static", decoder="static", activation="int8",
                           symmetric_activations=True,
                           description="signed symmetric Q/DQ everywhere (TensorRT explicit quantization)"),
    "naive": Int8Recipe("naive", encoder="dynamic", decoder="dynamic", per_channel=False, conv_stem_float=False,
                        lora_float=False, description="per-tensor dynamic INT8 of every MatMul (baseline)"),
}
DEFAULT_FOR_TARGET = {"cpu": "cpu", "cuda": "tensorrt", "tensorrt": "tensorrt"}


def _scopes(node) -> str:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return prop.value
    return ""


def quantize_tied_embedding(model):
    """Replace the fp32 tied embedding / LM-head matrix W [V, H] by ONE int8 copy Wq^T [H, V] with per-row scales.

    Embedding: Gather(Wq^T, ids, axis=1) -> transpose -> * scale[ids]. LM head: DynamicQuantizeLinear(x) ->
    MatMulInteger(x_q, Wq^T) -> * x_scale * scale. The transposed layout lets one copy serve both, so the biggest
    matrix of a small-vocabulary-heavy model shrinks 4x instead of being duplicated.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    gathers = [n for n in graph.node if n.op_type == "Gather"]
    inits = {i.name: i for i in graph.initializer}
    gather = next((n for n in gathers if n.input[0] in inits and len(inits[n.input[0]].dims) == 2), None)
    if gather is None:
        return model, False
    name = gather.input[0]
    transpose = next((n for n in graph.node if n.op_type == "Transpose" and n.input[0] == name), None)
    matmul = next((n for n in graph.node if transpose is not None and n.op_type == "MatMul"
                   and n.input[1] == transpose.output[0]), None)
    if transpose is None or matmul is None:
        return model, False
    weight = numpy_helper.to_array(inits[name]).astype(np.float32)
    scale = np.maximum(np.abs(weight).max(axis=1), 1e-12) / 127.0
    quantized = np.clip(np.round(weight / scale[:, None]), -127, 127).astype(np.int8)
    graph.initializer.remove(inits[name])
    graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(quantized.T), "tied_embedding_int8_t"),
                              numpy_helper.from_array(scale.astype(np.float32), "tied_embedding_scale")])
    ids, emb_out = gather.input[1], gather.output[0]
    x, logits = matmul.input[0], matmul.output[0]
    new = [
        helper.make_node("Gather", ["tied_embedding_int8_t", ids], ["te_cols"], axis=1),
        helper.make_node("Transpose", ["te_cols"], ["te_rows"], perm=[1, 2, 0]),
        helper.make_node("Cast", ["te_rows"], ["te_rows_f"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["tied_embedding_scale", ids], ["te_row_scale"], axis=0),
        helper.make_node("Unsqueeze", ["te_row_scale", "te_axis_last"], ["te_row_scale_u"]),
        helper.make_node("Mul", ["te_rows_f", "te_row_scale_u"], [emb_out]),
        helper.make_node("DynamicQuantizeLinear", [x], ["te_xq", "te_xs", "te_xz"]),
        helper.make_node("MatMulInteger", ["te_xq", "tied_embedding_int8_t", "te_xz"], ["te_acc"]),
        helper.make_node("Cast", ["te_acc"], ["te_acc_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["te_acc_f", "te_xs"], ["te_acc_x"]),
        helper.make_node("Mul", ["te_acc_x", "tied_embedding_scale"], [logits]),
    ]
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "te_axis_last"))
    position = list(graph.node).index(gather)
    for node in (gather, transpose, matmul):
        graph.node.remove(node)
    for offset, node in enumerate(new):
        graph.node.insert(position + offset, node)
    return model, True


def _module(node) -> str:
    """Deepest torch module path recorded on an exported node ('' when none)."""
    import ast

    raw = _scopes(node)
    try:
        scopes = ast.literal_eval(raw) if raw else []
    except (ValueError, SyntaxError):
        return ""
    modules = [s for s in scopes[:-1] if s]  # the last entry names the op itself
    return modules[-1] if modules else ""


def select_nodes(path: Path, recipe: Int8Recipe) -> tuple[list[str], list[str]]:
    """(nodes to quantize, nodes kept float) among MatMul/Conv/Gemm nodes with a constant weight."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    weighted = [n for n in model.graph.node
                if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) >= 2 and n.input[1] in constants]
    # A gated LoRA module M runs its base Linear under scope "M.base" and its A/B products directly under "M".
    module_of = {n.name: _module(n) for n in weighted}
    gated = {m[: -len(".base")] for m in module_of.values() if m.endswith(".base")}
    keep, skip = [], []
    for node in weighted:
        scope = module_of[node.name]
        float_reasons = []
        if recipe.conv_stem_float and any(s in scope for s in ("conv2d1", "conv2d2", "conv2d3", "conv_out")):
            float_reasons.append("conv stem")
        if recipe.lora_float and scope in gated:
            float_reasons.append("lora branch")
        if any(fragment in scope for fragment in recipe.float_scopes):
            float_reasons.append("sensitive")
        (skip if float_reasons else keep).append(node.name)
    return keep, skip


class _Reader:
    """onnxruntime CalibrationDataReader over precomputed feeds."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds
        self.index = 0

    def get_next(self):
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def rewind(self):
        self.index = 0


def encoder_feeds(info: manifest.Manifest, items: list[dict]) -> list[dict]:
    feeds = []
    for i, item in enumerate(track(items, desc="calibration (encoder)", unit="clip")):
        samples = audio_io.load(item["path"])
        mel, valid = segmenting.encoder_windows(features.asr_log_mel(samples), info.encoder)
        feed = {"mel": mel.astype(np.float32), "valid_tokens": valid}
        if info.routed:
            feed["lora_gate"] = np.array([float(i % 2)], np.float32)  # both routes' activation ranges
        feeds.append(feed)
    return feeds


def decoder_feeds(fp32_bundle: Path, items: list[dict], max_steps: int = 8) -> list[dict]:
    """Prefill and a few decode-step feeds per clip, recorded from greedy decoding of the FP32 bundle."""
    from megaedge.runtime.transcriber import Transcriber

    tr = Transcriber.from_bundle(fp32_bundle, verify=False, route="lora" if manifest.read(
        fp32_bundle, verify=False).routed else "auto")
    feeds = []
    session = tr.sessions["decoder"]
    for i, item in enumerate(track(items, desc="calibration (decoder)", unit="clip")):
        samples = audio_io.load(item["path"])
        tr._gate_value = np.array([float(i % 2)], np.float32)
        audio = tr.encode(samples)
        feed = {"input_ids": np.asarray([tr.prompt(audio.shape[0], None, None)], np.int64), "audio_features": audio,
                **dict.fromkeys(tr.past_names, np.zeros(tr.kv_shape, np.float32))}
        if tr.manifest.routed:
            feed["lora_gate"] = tr._gate_value
        for _ in range(max_steps):
            feeds.append(feed)
            outs = session.run(feed)
            token = int(np.argmax(outs[0][0]))
            if token in tr.manifest.prompt.eos:
                break
            feed = {**feed, "input_ids": np.asarray([[token]], np.int64), "audio_features": audio[:0],
                    **dict(zip(tr.past_names, outs[1:]))}
    return feeds


def _quantize_graph(src: Path, dst: Path, how: str, recipe: Int8Recipe, feeds: list[dict] | None,
                    cache: Path | None, external: bool) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    nodes, floats = select_nodes(src, recipe)
    if how == "float":
        shutil.copyfile(src, dst)
        return {"method": "float", "quantized_nodes": 0}
    if how == "dynamic":
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"], per_channel=recipe.per_channel,
                         weight_type=QuantType.QInt8, nodes_to_quantize=nodes, use_external_data_format=external,
                         extra_options={"MatMulConstBOnly": True})
        if recipe.tied_embedding_int8 and "decoder" in dst.name:
            _rewrite(dst, quantize_tied_embedding, external)
    else:
        activation = QuantType.QInt8 if recipe.activation == "int8" else QuantType.QUInt8
        quantize_static(
            str(src), str(dst), _Reader(feeds) if feeds is not None else None, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"], per_channel=recipe.per_channel,
            activation_type=activation, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
            use_external_data_format=external, calibrate_method=CalibrationMethod.MinMax,
            calibration_cache_path=str(cache) if cache else None,
            extra_options={"ActivationSymmetric": recipe.symmetric_activations, "WeightSymmetric": True,
                           "MatMulConstBOnly": True},
        )
    return {"method": how, "quantized_nodes": len(nodes), "float_nodes": len(floats)}


def manifest_sha(items: list[dict]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for item in items:
        digest.update(str(item["path"]).encode())
    return digest.hexdigest()[:8]


def _rewrite(path: Path, transform, external: bool) -> None:
    import onnx

    model = onnx.load(str(path))
    model, changed = transform(model)
    if not changed:
        log.warning("%s: no tied embedding / LM head pattern found; left in float", path.name)
        return
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save(model, str(path), save_as_external_data=external, location=data.name if external else None)


def quantize_bundle(fp32_bundle: Path, out: Path, recipe: Int8Recipe, calib_items: list[dict], target: str,
                    cache_dir: Path | None = None, calibration_source: str = "") -> manifest.Manifest:
    """Write an INT8 bundle at ``out`` from an FP32 bundle; ``cache_dir`` keeps activation ranges for re-runs."""
    from megaedge.export.bundle import _graph_spec

    info = manifest.read(fp32_bundle, verify=False)
    if info.precision != "fp32":
        raise MegaedgeError(f"{fp32_bundle}: INT8 starts from an fp32 bundle, this one is {info.precision}")
    out.mkdir(parents=True, exist_ok=True)
    for rel in info.files:
        if not rel.startswith(("encoder.onnx", "decoder.onnx")):
            shutil.copyfile(fp32_bundle / rel, out / rel)
    details = {}
    graphs = dict(info.graphs)
    for name, how in (("encoder", recipe.encoder), ("decoder", recipe.decoder)):
        spec = info.graph(name)
        external = bool(spec.data_files)
        feeds = None
        # Ranges depend on the graph, the activation flavour and the clips: all three key the cache file.
        clips_key = manifest_sha(calib_items)
        flavour = f"{recipe.activation}{'-sym' if recipe.symmetric_activations else ''}"
        cache = (cache_dir / f"{name}-{info.files[spec.file][:12]}-{flavour}-{clips_key}.json") if cache_dir else None
        if how == "static" and not (cache and cache.is_file()):
            feeds = (encoder_feeds(info, calib_items) if name == "encoder"
                     else decoder_feeds(fp32_bundle, calib_items))
        elif cache and cache.is_file():
            log.info("%s: activation ranges from cache %s", name, cache.name)
        details[name] = _quantize_graph(fp32_bundle / spec.file, out / spec.file, how, recipe, feeds, cache, external)
        data = (out / spec.file).with_name(spec.file + ".data")
        graphs[name] = _graph_spec(out / spec.file, "int8" if how != "float" else "fp32",
                                   (data.name,) if data.exists() else ())
        log.info("%s: %s", name, details[name])
    doc = info.to_dict()
    doc["precision"] = "int8"
    doc["graphs"] = {k: asdict(v) for k, v in graphs.items()}
    doc["quantization"] = {"recipe": asdict(recipe), "target": target, "graphs": details,
                           "calibration": {"clips": len(calib_items), "source": calibration_source}}
    doc["files"] = {p.name: manifest.sha256_file(p) for p in sorted(out.iterdir())
                    if p.is_file() and p.name != manifest.MANIFEST_NAME}
    frozen = manifest.Manifest.from_dict(doc)
    manifest.write(frozen, out)
    return frozen
