"""INT8 recipes on the tiny model: which nodes each recipe touches, Q/DQ form and symmetry, the calibration cache,
the manifest of an INT8 bundle, and bad options."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from megaedge.errors import MegaedgeError
from megaedge.export import quantize
from megaedge.runtime import manifest
from tests.conftest import speechlike


@pytest.fixture(scope="module")
def calib_items(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    items = []
    for i in range(4):
        path = root / f"c{i}.wav"
        sf.write(str(path), speechlike(2.0 + i, seed=i), 16000)
        items.append({"path": str(path), "text": "", "scenario": "clean" if i % 2 else "noise"})
    return items


def _ops(path):
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_recipes_keep_conv_stem_and_lora_float(tiny_bundles):
    keep, skip = quantize.select_nodes(tiny_bundles["routed"] / manifest.ENCODER_FILE, quantize.RECIPES["cpu"])
    assert len(skip) >= 4 + 2 * 6  # 3 convs + conv_out, and A/B of every LoRA branch of 2 layers x 6 linears
    naive_keep, naive_skip = quantize.select_nodes(tiny_bundles["routed"] / manifest.ENCODER_FILE,
                                                   quantize.RECIPES["naive"])
    assert naive_skip == [] and len(naive_keep) == len(keep) + len(skip)
    import dataclasses

    sensitive = dataclasses.replace(quantize.RECIPES["cpu"], float_scopes=(".fc2",))
    keep2, skip2 = quantize.select_nodes(tiny_bundles["routed"] / manifest.ENCODER_FILE, sensitive)
    assert len(skip2) == len(skip) + 2 and len(keep2) == len(keep) - 2  # the base fc2 of both encoder layers


@pytest.mark.parametrize("recipe", ["cpu", "tensorrt"])
def test_int8_bundle_runs_and_is_described(recipe, tiny_bundles, calib_items, tmp_path):
    from megaedge.runtime.transcriber import Transcriber

    out = tmp_path / recipe
    info = quantize.quantize_bundle(tiny_bundles["routed"], out, quantize.RECIPES[recipe], calib_items, "cpu",
                                    cache_dir=tmp_path / "cache")
    assert info.precision == "int8" and info.quantization["recipe"]["name"] == recipe
    assert manifest.read(out).files == info.files  # every hash checks out
    enc_ops, dec_ops = _ops(out / manifest.ENCODER_FILE), _ops(out / manifest.DECODER_FILE)
    assert enc_ops["QuantizeLinear"] > 0 and enc_ops["Conv"] == 3
    if recipe == "cpu":
        assert dec_ops["MatMulInteger"] > 0 and dec_ops["DynamicQuantizeLinear"] > 0
    else:
        assert dec_ops["QuantizeLinear"] > 0
    audio = speechlike(3.0, seed=11)
    tokens = Transcriber.from_bundle(out).transcribe(audio, route="lora", max_new_tokens=6, loop_guard=False).token_ids
    assert len(tokens) == 6


def test_tensorrt_flavour_is_signed_and_symmetric(tiny_bundles, calib_items, tmp_path):
    import onnx
    from onnx import numpy_helper

    quantize.quantize_bundle(tiny_bundles["merged"], tmp_path / "trt", quantize.RECIPES["tensorrt"], calib_items, "tensorrt")
    for graph in (manifest.ENCODER_FILE, manifest.DECODER_FILE):
        model = onnx.load(str(tmp_path / "trt" / graph))
        inits = {i.name: i for i in model.graph.initializer}
        zero_points = [n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
        assert zero_points
        for name in zero_points:
            zp = numpy_helper.to_array(inits[name])
            assert zp.dtype == np.int8 and not zp.any(), (graph, name)


def test_calibration_cache_is_reused(tiny_bundles, calib_items, tmp_path):
    cache = tmp_path / "cache"
    quantize.quantize_bundle(tiny_bundles["merged"], tmp_path / "a", quantize.RECIPES["cpu"], calib_items, "cpu", cache)
    assert len(list(cache.glob("encoder-*.json"))) == 1
    # A second run with the cache never reads the clips: make them unreadable to prove it.
    moved = []
    for item in calib_items:
        src = item["path"]
        moved.append((src, src + ".hidden"))
        __import__("os").rename(src, src + ".hidden")
    try:
        quantize.quantize_bundle(tiny_bundles["merged"], tmp_path / "b", quantize.RECIPES["cpu"], calib_items, "cpu",
                                 cache)
    finally:
        for src, hidden in moved:
            __import__("os").rename(hidden, src)
    a = (tmp_path / "a" / manifest.ENCODER_FILE).read_bytes()
    b = (tmp_path / "b" / manifest.ENCODER_FILE).read_bytes()
    assert a == b


def test_bad_int8_options(tiny_bundles, tmp_path):
    with pytest.raises(MegaedgeError, match="--recipe 'int4'"):
        quantize.Int8Recipe.named("int4")
    with pytest.raises(MegaedgeError, match="--target 'npu'"):
        quantize.Int8Recipe.for_target("npu")
    fp16 = json.loads((tiny_bundles["merged"] / manifest.MANIFEST_NAME).read_text())
    assert fp16["precision"] == "fp32"
