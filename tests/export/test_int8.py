"""INT8 recipes on the tiny model: which nodes each recipe touches, Q/DQ form and symmetry, the calibration cache,
the manifest of an INT8 bundle, and bad options."""

from __future__ import annotations

import dataclasses
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

    encoder = tiny_bundles["routed"] / manifest.ENCODER_FILE
    plain = dataclasses.replace(quantize.RECIPES["cpu"], float_scopes=())
    keep, skip = quantize.select_nodes(encoder, plain)
    assert len(skip) >= 4 + 2 * 6  # 3 convs + conv_out, and A/B of every LoRA branch of 2 layers x 6 linears
    naive_keep, naive_skip = quantize.select_nodes(encoder, quantize.RECIPES["naive"])
    assert naive_skip == [] and len(naive_keep) == len(keep) + len(skip)
    # the default keeps the encoder's fc2 and its projector float (docs/int8.md: the large-set measurement)
    assert quantize.RECIPES["cpu"].float_scopes == quantize.SENSITIVE_ENCODER_SCOPES == (".fc2", "proj.linear_")
    keep2, skip2 = quantize.select_nodes(encoder, quantize.RECIPES["cpu"])
    # the base fc2 of both encoder layers and the projector's two linears
    assert len(skip2) == len(skip) + 4 and len(keep2) == len(keep) - 4
    assert quantize.select_nodes(encoder, quantize.RECIPES["cpu-int8-fc2"]) == (keep, skip)
    # no decoder module matches the encoder's fragments
    decoder = tiny_bundles["routed"] / "decoder.onnx"
    assert (quantize.select_nodes(decoder, quantize.RECIPES["cpu"])
            == quantize.select_nodes(decoder, dataclasses.replace(quantize.RECIPES["cpu"], float_scopes=())))


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
        # weight-only 8-bit blocks (LoRA branches excluded), the tied LM head included; no fp32 [V, H] left
        assert dec_ops["MatMulNBits"] > 0 and dec_ops["MatMulInteger"] == 0 and dec_ops["QuantizeLinear"] == 0
        import onnx

        model = onnx.load(str(out / manifest.DECODER_FILE))
        assert all(a.i == 8 for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                   if a.name == "bits")
        inits = {i.name: i for i in model.graph.initializer}
        assert "tied_embedding_q8" in inits and inits["tied_embedding_q8"].data_type == onnx.TensorProto.UINT8
        original = onnx.load(str(tiny_bundles["routed"] / manifest.DECODER_FILE))
        embedding = max(original.graph.initializer, key=lambda i: int(np.prod(i.dims)))
        assert embedding.name not in inits and inits["tied_embedding_q8"].dims[0] == embedding.dims[0]
    else:
        assert dec_ops["QuantizeLinear"] > 0
    audio = speechlike(3.0, seed=11)
    tokens = Transcriber.from_bundle(out).transcribe(audio, route="lora", max_new_tokens=6, loop_guard=False).token_ids
    assert len(tokens) == 6


def test_int4_recipe_quantizes_decoder_layers_to_4_bits_and_keeps_lm_head_and_prefill_8_bit(
        tiny_bundles, calib_items, tmp_path):
    import onnx

    from megaedge.runtime.transcriber import Transcriber

    out = tmp_path / "int4"
    recipe = quantize.RECIPES["cpu-int4"]
    info = quantize.quantize_bundle(tiny_bundles["merged"], out, recipe, calib_items, "cpu")
    assert info.precision == "int8" and info.graph("decoder").precision == "int4"
    assert info.graph("decoder_prefill").precision == "int8" and info.graph("encoder").precision == "int8"
    bits = Counter()
    for node in onnx.load(str(out / manifest.DECODER_FILE), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            bits["lm_head" if node.input[1] == "tied_embedding_q8" else "layers", attrs["bits"]] += 1
    layers = quantize.select_nodes(tiny_bundles["merged"] / manifest.DECODER_FILE, recipe)[0]
    assert bits == {("lm_head", 8): 1, ("layers", 4): len(layers)}
    assert recipe.block_size == 32
    assert _ops(out / manifest.PREFILL_FILE)["MatMulInteger"] > 0

    # Judged by agreement with FP32: one decode-graph call over the whole prompt, logits of every position.
    fp32, int4 = Transcriber.from_bundle(tiny_bundles["merged"]), Transcriber.from_bundle(out)
    audio = fp32.encode(speechlike(3.0, seed=11))
    prompt = fp32.prompt(audio.shape[0], None, None)
    feed = {"input_ids": np.asarray([prompt], np.int64), "audio_features": audio,
            "logits_at": np.arange(len(prompt), dtype=np.int64),
            **dict.fromkeys(fp32.past_names, np.zeros(fp32.kv_shape, np.float32))}
    a, b = fp32.sessions["decoder"].run(feed)[0], int4.sessions["decoder"].run(feed)[0]
    cosine = float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    # close, and not the fp32 graph by mistake. Random weights have no structure 4 bits keep: the bound depends on
    # the draw (0.94 since the tiny adapter gained upstream's name lookup), so it only rules out a broken graph.
    assert 0.9 < cosine < 0.99999, cosine
    assert len(int4.transcribe(speechlike(3.0, seed=11), max_new_tokens=6, ignore_eos=True,
                               loop_guard=False).token_ids) == 6


def test_four_bit_scopes_put_only_those_modules_at_4_bits(tiny_bundles, calib_items, tmp_path):
    import onnx

    recipe = dataclasses.replace(quantize.RECIPES["cpu-int4"], prefill="shared",
                                 four_bit_scopes=("mlp.gate_proj", "mlp.up_proj"))
    out = tmp_path / "mixed"
    quantize.quantize_bundle(tiny_bundles["merged"], out, recipe, calib_items, "cpu")
    model = onnx.load(str(out / manifest.DECODER_FILE), load_external_data=False)
    source = onnx.load(str(tiny_bundles["merged"] / manifest.DECODER_FILE), load_external_data=False)
    scope = {n.output[0]: quantize.module_path(n) for n in source.graph.node}  # quantized nodes keep their outputs
    bits = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.input[1] != "tied_embedding_q8":
            bits[scope[node.output[0]]] = next(a.i for a in node.attribute if a.name == "bits")
    assert bits and all((b == 4) == any(f in m for f in recipe.four_bit_scopes) for m, b in bits.items()), bits
    assert {4, 8} == set(bits.values())


def test_recipe_rejects_sub_8_bit_outside_weight_only():
    with pytest.raises(MegaedgeError, match="decoder_bits 3 is not 4 or 8"):
        dataclasses.replace(quantize.RECIPES["cpu"], decoder_bits=3)
    with pytest.raises(MegaedgeError, match="needs decoder 'weight-only'"):
        dataclasses.replace(quantize.RECIPES["cpu-dynamic"], decoder_bits=4)


def test_prefill_graph_serves_prompts_and_hands_its_cache_to_the_decode_graph(tiny_bundles, calib_items, tmp_path):
    from megaedge.runtime.transcriber import PREFILL_MIN_ROWS, Transcriber

    out = tmp_path / "prefill"
    info = quantize.quantize_bundle(tiny_bundles["merged"], out, quantize.RECIPES["cpu-prefill"], calib_items, "cpu")
    assert set(info.graphs) >= {"encoder", "decoder", "decoder_prefill"}
    assert info.graph("decoder_prefill").file == manifest.PREFILL_FILE
    assert info.graph("decoder_prefill").input_names == info.graph("decoder").input_names
    assert manifest.read(out).files == info.files
    decode_ops, prefill_ops = _ops(out / manifest.DECODER_FILE), _ops(out / manifest.PREFILL_FILE)
    assert decode_ops["MatMulNBits"] > 0 and decode_ops["MatMulInteger"] == 0
    assert prefill_ops["MatMulInteger"] > 0  # per-channel dynamic int8 for the projections

    tr = Transcriber.from_bundle(out, decode="ort")  # the hand-over between the two onnxruntime graphs
    calls = Counter()
    for name, session in tr.sessions.items():
        original = session.run_bound

        def counted(feed, check=True, _name=name, _run=original):
            calls[_name, feed["input_ids"].shape[1]] += 1
            return _run(feed, check=check)

        session.run_bound = counted
    audio = speechlike(3.0, seed=11)
    tokens = tr.transcribe(audio, max_new_tokens=6, ignore_eos=True, loop_guard=False).token_ids
    assert len(tokens) == 6
    assert {(n, rows) for n, rows in calls if rows >= PREFILL_MIN_ROWS} == {(n, rows) for n, rows in calls
                                                                           if n == "decoder_prefill"}
    assert calls["decoder", 1] == 5 and sum(v for (n, _), v in calls.items() if n == "decoder_prefill") == 1

    # A stream sends its hops' prompt-sized calls to the prefill graph too, and its decode steps read that cache.
    from megaedge.runtime.streaming import StreamOptions

    calls.clear()
    stream = tr.create_stream(StreamOptions(endpointing=False, hop_seconds=0.64))
    for start in range(0, audio.size, 3200):
        stream.accept_waveform(audio[start : start + 3200], 16000)
    final = stream.final()
    assert final.kind == "final" and final.token_ids
    assert sum(v for (n, _), v in calls.items() if n == "decoder_prefill") >= 4  # 3 s at 0.64 s hops
    assert all(rows >= PREFILL_MIN_ROWS for n, rows in calls if n == "decoder_prefill")
    assert sum(v for (n, rows), v in calls.items() if n == "decoder" and rows == 1) > 0

    # Both graphs compute the same step: the prefill graph's logits and cache agree with the decode graph's.
    audio_features = tr.encode(audio)
    prompt = tr.prompt(audio_features.shape[0], None, None)
    feed = {"input_ids": np.asarray([prompt], np.int64), "audio_features": audio_features,
            "logits_at": np.arange(len(prompt), dtype=np.int64),
            **dict.fromkeys(tr.past_names, np.zeros(tr.kv_shape, np.float32))}
    wide, narrow = tr.sessions["decoder_prefill"].run(feed), tr.sessions["decoder"].run(feed)
    for a, b in zip(wide, narrow):
        cosine = float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert cosine > 0.99, cosine


def test_tensorrt_flavour_is_signed_and_symmetric(tiny_bundles, calib_items, tmp_path):
    import onnx
    from onnx import numpy_helper

    from megaedge.cli.build_engines import check_int8_source

    quantize.quantize_bundle(tiny_bundles["merged"], tmp_path / "trt", quantize.RECIPES["tensorrt"], calib_items, "tensorrt")
    info = manifest.read(tmp_path / "trt")
    # the device, not a graph file name (quantize_bundle once reused the variable): build-engines --int8 accepts it
    assert info.quantization["target"] == "tensorrt"
    check_int8_source(tmp_path / "trt", info)
    cpu = dataclasses.replace(info, quantization={**info.quantization, "target": "cpu"})
    with pytest.raises(MegaedgeError, match=r"--int8 needs a bundle exported with --int8 --target tensorrt "
                                            r"\(this one: int8, target cpu\)"):
        check_int8_source(tmp_path / "trt", cpu)
    with pytest.raises(MegaedgeError, match=r"\(this one: fp32, target None\)"):
        check_int8_source(tiny_bundles["merged"], manifest.read(tiny_bundles["merged"]))
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


def _tied_toy(vocab=50, hidden=64, seed=0, gemm=False):
    """Gather(W, ids) -> hidden; logits = h @ W^T: the tied embedding / LM-head patterns the exporter emits
    (Transpose + MatMul on 3-D hidden states, Gemm transB=1 on the 2-D rows logits_at selects)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(seed).standard_normal((vocab, hidden)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["W", "ids"], ["emb"], axis=0)]
    if gemm:
        nodes += [helper.make_node("Reshape", ["x", "rows"], ["x2"]),
                  helper.make_node("Gemm", ["x2", "W"], ["logits"], transB=1)]
    else:
        nodes += [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
                  helper.make_node("MatMul", ["x", "Wt"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "s"]),
                        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", hidden])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.array([-1, hidden], np.int64), "rows")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model, weight


@pytest.mark.parametrize("hidden,gemm", [(64, False), (160, False), (128, True)])
def test_tied_embedding_one_int8_copy_serves_lookup_and_lm_head(hidden, gemm):
    import onnxruntime as ort

    model, weight = _tied_toy(hidden=hidden, gemm=gemm)
    quantized, changed = quantize.quantize_tied_embedding(model, block_size=128)
    assert changed
    inits = {i.name: i for i in quantized.graph.initializer}
    assert "W" not in inits and list(inits["tied_embedding_q8"].dims)[0] == 50
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, (1, 7))
    x = rng.standard_normal((1, 7, hidden)).astype(np.float32)
    emb, logits = session.run(None, {"ids": ids, "x": x})
    # 8-bit blocks: each weight off by at most half a step of its block's scale (absmax / 127)
    assert np.abs(emb - weight[ids]).max() <= np.abs(weight).max() / 254 + 1e-6
    exact = (x @ weight.T).reshape(logits.shape)
    assert np.corrcoef(logits.ravel(), exact.ravel())[0, 1] > 0.9995
    assert (logits.argmax(-1) == exact.argmax(-1)).mean() >= 6 / 7
    assert not [n for n in quantized.graph.node if n.op_type in ("Gemm", "MatMul", "Transpose")]


def test_smoothing_is_exact_in_float_and_tames_outlier_channels():
    """SmoothQuant's scaling must not change the float graph; it must shrink the activation channel spread."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from megaedge.export.smoothing import channel_absmax, smooth

    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((32, 16)).astype(np.float32) for _ in range(2))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="q"),
             helper.make_node("MatMul", ["x", "w2"], ["b"], name="k")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", 32])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("a", "b")],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    x = rng.standard_normal((1, 9, 32)).astype(np.float32)
    x[..., 3] *= 60.0  # one outlier channel, as decoder activations have
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    smoothed, groups = smooth(onnx.load_from_string(model.SerializeToString()), ["q", "k"], [{"x": x}], alpha=0.5)
    assert groups == 1  # q and k read the same tensor: one Mul, both weights scaled by the same factors
    after = ort.InferenceSession(smoothed.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for b, a in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    spread = channel_absmax(smoothed, ["smooth_x_0"], [{"x": x}])["smooth_x_0"]
    raw = np.abs(x).reshape(-1, 32).max(0)
    assert spread.max() / spread.min() < raw.max() / raw.min() / 4


def test_smoothquant_recipe_quantizes_decoder_statically(tiny_bundles, calib_items, tmp_path):
    from megaedge.runtime.transcriber import Transcriber

    out = tmp_path / "sq"
    quantize.quantize_bundle(tiny_bundles["merged"], out, quantize.RECIPES["smoothquant"], calib_items, "cpu")
    dec_ops = _ops(out / manifest.DECODER_FILE)
    assert dec_ops["QuantizeLinear"] > 0 and dec_ops["Mul"] > _ops(tiny_bundles["merged"] / manifest.DECODER_FILE)["Mul"]
    tokens = Transcriber.from_bundle(out).transcribe(speechlike(3.0, seed=5), max_new_tokens=5,
                                                    loop_guard=False).token_ids
    assert len(tokens) == 5


def test_a_graph_kept_float_keeps_its_weight_file(tmp_path):
    """A graph a recipe keeps float (encoder=float) is copied with the weight files it names: at 1.7B the weights
    live beside the graph, and a copy of the graph alone could not load (nor feed the native stem)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(weight, "w")])
    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    dst_dir.mkdir()
    onnx.save(helper.make_model(graph), str(src_dir / "encoder.onnx"), save_as_external_data=True,
              location="encoder.onnx.data", size_threshold=0)
    details = quantize._quantize_graph(src_dir / "encoder.onnx", dst_dir / "encoder.onnx", "float",
                                       quantize.RECIPES["cpu"], None, None, True)
    assert details["method"] == "float" and (dst_dir / "encoder.onnx.data").is_file()
    x = np.ones((1, 3), np.float32)
    got = ort.InferenceSession(str(dst_dir / "encoder.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(got[0], x @ weight)


def test_float_encoder_recipe_keeps_the_encoder_and_blocks_the_decoder_by_32(tiny_bundles, calib_items, tmp_path):
    """cpu-float-encoder: the encoder graph exactly the FP32 one, the decoder's weights in 8-bit blocks of 32 with a
    native index (routed: its branches too), and the bundle decodes both routes natively."""
    from megaedge.runtime.transcriber import Transcriber

    out = tmp_path / "fe"
    info = quantize.quantize_bundle(tiny_bundles["routed"], out, quantize.RECIPES["cpu-float-encoder"], calib_items,
                                    "cpu", cache_dir=tmp_path / "cache")
    assert (out / manifest.ENCODER_FILE).read_bytes() == (tiny_bundles["routed"] / manifest.ENCODER_FILE).read_bytes()
    assert _ops(out / manifest.ENCODER_FILE)["QuantizeLinear"] == 0
    # weights only: no clip shaped it, and the manifest does not claim one did (nor a cache of ranges)
    assert info.quantization["calibration"] == {"clips": 0, "source": "none (weights only)"}
    assert not list((tmp_path / "cache").glob("*.json"))
    index = info.decoder["native"]
    assert {layer[p]["block"] for layer in index["layers"] for p in manifest.NATIVE_PROJECTIONS} == {32}
    assert all("lora" in layer["q"] for layer in index["layers"])
    tr = Transcriber.from_bundle(out)
    for route in ("lora", "base"):
        assert len(tr.transcribe(speechlike(2.0, seed=3), route=route, max_new_tokens=5, loop_guard=False,
                                 ignore_eos=True).token_ids) == 5


def test_native_stem_takes_convolutions_whose_zero_bias_was_dropped(tiny_bundles, tmp_path):
    """A freshly initialized model's stem biases are zeros and the exporter may leave them out of the Conv nodes;
    the native stem then uses zeros instead of refusing (1.7B realistic-init bundles had no native stem)."""
    import onnx

    from megaedge.export import native_stem

    model = onnx.load(str(tiny_bundles["merged"] / manifest.ENCODER_FILE))
    convs, _ = native_stem._stem_nodes(model)
    for node in convs:
        del node.input[2]
    onnx.save(model, str(tmp_path / manifest.ENCODER_FILE))
    encoder = native_stem.write_native_stem(tmp_path, {"chunk_frames": 100})
    assert "native_stem" in encoder
    with np.load(tmp_path / manifest.NATIVE_STEM_FILE) as arrays:
        assert not arrays["b1"].any() and not arrays["b2"].any() and not arrays["b3"].any()
