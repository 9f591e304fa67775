"""TensorRT parts that run without TensorRT: readiness checks (passing and made to fail), optimization profiles,
the memory plan, engine facts, and the CLI error paths. Engine building and running are marked ``trt``."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from megaedge.errors import MegaedgeError
from megaedge.runtime import manifest
from megaedge.runtime import tensorrt as rt
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def trt_bundle(tiny_bundles, tmp_path_factory):
    """The tiny routed bundle quantized with the TensorRT flavour (signed symmetric Q/DQ)."""
    import soundfile as sf

    from megaedge.export import quantize
    from tests.conftest import speechlike

    root = tmp_path_factory.mktemp("trt")
    items = []
    for i in range(2):
        sf.write(str(root / f"c{i}.wav"), speechlike(2.0, seed=i), 16000)
        items.append({"path": str(root / f"c{i}.wav"), "text": "", "scenario": "noise"})
    out = root / "int8-trt"
    quantize.quantize_bundle(tiny_bundles["routed"], out, quantize.RECIPES["tensorrt"], items, "tensorrt")
    cpu = root / "int8-cpu"
    quantize.quantize_bundle(tiny_bundles["routed"], cpu, quantize.RECIPES["cpu"], items, "cpu")
    return {"tensorrt": out, "cpu": cpu}


def test_fp32_and_tensorrt_flavour_bundles_are_ready(tiny_bundles, trt_bundle):
    for bundle in (tiny_bundles["merged"], tiny_bundles["routed"], trt_bundle["tensorrt"]):
        errors = [f for f in rt.check_bundle(bundle) if f.level == "error"]
        assert errors == [], errors
    warnings = rt.check_bundle(tiny_bundles["merged"])
    assert any("int64" in f.message for f in warnings)  # input_ids: noted, not an error


def test_cpu_recipe_is_reported_not_ready(trt_bundle):
    messages = [f.message for f in rt.check_bundle(trt_bundle["cpu"]) if f.level == "error"]
    assert any("MatMulNBits" in m and "--target tensorrt" in m for m in messages)
    assert any("uint8" in m for m in messages)


def _toy(path, op="Relu", domain="", opset=18, zero_point=None):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [helper.make_node(op, ["x"], ["y"], domain=domain)], []
    if zero_point is not None:
        inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(zero_point, "z")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], inits)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=imports), str(path))
    return path


@pytest.mark.parametrize("kwargs,expected", [
    ({"op": "MatMulInteger"}, "MatMulInteger"),
    ({"op": "Hardmax"}, "support matrix"),
    ({"op": "Foo", "domain": "com.example"}, "com.example:Foo"),
    ({"opset": 25}, "opset 25"),
    ({"zero_point": np.array(3, np.uint8)}, "signed symmetric"),
    ({"zero_point": np.array(2, np.int8)}, "signed symmetric"),
])
def test_graphs_made_to_fail_are_caught(tmp_path, kwargs, expected):
    findings = rt.check_graph(_toy(tmp_path / "g.onnx", **kwargs), "toy")
    assert any(f.level == "error" and expected in f.message for f in findings), findings
    assert rt.check_graph(_toy(tmp_path / "ok.onnx"), "toy") == []
    assert rt.check_graph(_toy(tmp_path / "qdq.onnx", zero_point=np.array(0, np.int8)), "toy") == []


def test_profiles_follow_the_options_and_match_the_manifest(tiny_bundles):
    info = manifest.read(tiny_bundles["routed"])
    options = rt.EngineOptions(max_audio_seconds=30, opt_audio_seconds=10, max_new_tokens=100)
    shapes = rt.profiles(info, options)
    enc = shapes["encoder"][0]
    assert enc["mel"] == ((1, 128, 100), (2, 128, 800), (4, 128, 800))  # 30 s = 4 windows of 8 s
    prefill, decode = shapes["decoder"]
    audio_max = rt.audio_tokens(30)
    assert audio_max == 390  # 30 full 1 s chunks of 13 tokens
    assert prefill["audio_features"][2][0] == audio_max
    kv_max = prefill[info.decoder["past_names"][0]][2][2] + 1
    assert kv_max == audio_max + rt.prompt_overhead(info, options.max_context_tokens) + 100
    assert decode["input_ids"] == ((1, 1), (1, 1), (1, 1))
    assert rt.profile_problems(info, shapes["encoder"]) == []
    assert rt.profile_problems(info, shapes["decoder"]) == []
    broken = [{**shapes["encoder"][0], "mel": ((1, 80, 100), (1, 80, 100), (1, 80, 100))}]
    assert any("fixed at 128" in p for p in rt.profile_problems(info, broken))
    missing = [{k: v for k, v in shapes["decoder"][0].items() if k != "logits_at"}]
    assert any("logits_at" in p for p in rt.profile_problems(info, missing))


def test_plan_arithmetic(tiny_bundles):
    info = manifest.read(tiny_bundles["merged"])
    dec = info.decoder
    small = rt.plan(tiny_bundles["merged"], 8.0, rt.EngineOptions(workspace_mib=256))
    assert small.kv_bytes_per_token == len(dec["past_names"]) * dec["kv_heads"] * dec["head_dim"] * 2
    weights = sum((tiny_bundles["merged"] / info.graph(g).file).stat().st_size for g in ("encoder", "decoder"))
    assert abs(small.weights_mib - weights / 2 / 2**20) < 0.2  # fp32 bundle -> fp16 engine
    parts = small.weights_mib + small.kv_mib + small.activations_mib + small.workspace_mib + small.context_mib
    assert abs(small.total_mib - parts) < 0.5 and small.fits
    # A budget below the fixed costs fits nothing; a bigger budget fits longer audio and more KV.
    assert not rt.plan(tiny_bundles["merged"], 0.5, rt.EngineOptions(workspace_mib=256)).fits
    more = rt.plan(tiny_bundles["merged"], 16.0, rt.EngineOptions(workspace_mib=256))
    assert more.max_kv_tokens > small.max_kv_tokens and more.max_audio_seconds >= small.max_audio_seconds
    with pytest.raises(MegaedgeError, match="max-audio-seconds"):
        rt.EngineOptions(max_audio_seconds=0)


def test_engine_facts_mismatch_says_rebuild():
    facts = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7"}
    assert rt.engine_facts_problem(facts, "10.3.0", "Orin", "8.7") is None
    assert "rebuild" in rt.engine_facts_problem(facts, "10.7.0", "Orin", "8.7")
    assert "sm 8.7" in rt.engine_facts_problem(facts, "10.3.0", "NVIDIA H100", "9.0")


def test_plan_and_doctor_cli(tiny_bundles, trt_bundle):
    proc = run_cli("plan", str(tiny_bundles["merged"]), "--device", "orin-nano-8gb", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["fits"] is True
    bad = run_cli("plan", str(tiny_bundles["merged"]), "--memory", "lots")
    assert bad.returncode == 1 and "8GB" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    ignored = run_cli("plan", str(tiny_bundles["merged"]), "--streams", "4")  # was ignored without a word
    assert ignored.returncode == 1 and "--streams is for --target cuda bundles" in ignored.stderr
    doctor = run_cli("doctor", "--json", "--bundle", str(trt_bundle["cpu"]))
    assert doctor.returncode == 0
    assert json.loads(doctor.stdout)["tensorrt_readiness"]["ready"] is False
    cpu_plan = run_cli("plan", str(trt_bundle["cpu"]))  # planned, with a note that these graphs cannot be engines
    assert cpu_plan.returncode == 0 and "INT8 bundle made for cpu" in cpu_plan.stderr and "fits" in cpu_plan.stdout
    assert "made for" not in run_cli("plan", str(trt_bundle["tensorrt"])).stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_engines_without_tensorrt_names_the_fix(tiny_bundles):
    proc = run_cli("build-engines", str(tiny_bundles["merged"]), "--fp16")
    assert proc.returncode == 1 and "megaedge[trt]" in proc.stderr
    int8 = run_cli("build-engines", str(tiny_bundles["merged"]), "--int8")
    assert int8.returncode == 1 and "--target tensorrt" in int8.stderr


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="TensorRT is not installable on this project's machines (NVIDIA-index wheels only)")
def test_fp16_engine_tokens_equal_ort_fp32(fixture_bundles, tmp_path):
    import shutil

    from megaedge.runtime.transcriber import Transcriber
    from tests.conftest import speechlike

    bundle = tmp_path / "engines"
    shutil.copytree(fixture_bundles["merged"], bundle)
    assert run_cli("build-engines", str(bundle), "--fp16", "--max-audio-seconds", "30").returncode == 0
    audio = speechlike(6.0, seed=3)
    ort = Transcriber.from_bundle(fixture_bundles["merged"]).transcribe(audio).token_ids
    assert Transcriber.from_bundle(bundle, providers=("engine",)).transcribe(audio).token_ids == ort
