"""What a fixed-size KV buffer would save per decode step: the decoder's growing-KV attention vs onnxruntime's
GroupQueryAttention writing into a shared buffer.

    python benchmarks/kv_attention.py [--positions 420] [--layers 28] [--threads 2]

Only the attention part of a 1.7B decode step at ``positions`` cached positions (16 query heads, 8 KV heads, head
size 128, fp32 cache), no projections:
* ``growing``: what decoder.onnx does per layer: Concat(past, new) for keys and values (the copy that makes the cache
  grow), query groups broadcast over each KV head, MatMul, Softmax, MatMul;
* ``gqa_shared_buffer``: com.microsoft GroupQueryAttention with past and present bound to the same preallocated
  [1, 8, max, 128] buffers (IO binding), rotary inside the op (the growing graph's rotary costs are not counted).
Writes benchmarks/results/kv_attention.json. It decides whether the graph and runtime rewrite a shared buffer needs
is worth it on CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, KV_HEADS, HEAD = 16, 8, 128


def growing_model(layers: int):
    from onnx import TensorProto, helper, numpy_helper

    f = TensorProto.FLOAT
    group = HEADS // KV_HEADS
    inputs = [helper.make_tensor_value_info("q", f, [1, KV_HEADS, group, 1, HEAD]),
              helper.make_tensor_value_info("k", f, [1, KV_HEADS, 1, HEAD]),
              helper.make_tensor_value_info("v", f, [1, KV_HEADS, 1, HEAD])]
    nodes, outputs = [], []
    for i in range(layers):
        inputs += [helper.make_tensor_value_info(f"past_k{i}", f, [1, KV_HEADS, "past", HEAD]),
                   helper.make_tensor_value_info(f"past_v{i}", f, [1, KV_HEADS, "past", HEAD])]
        nodes += [
            helper.make_node("Concat", [f"past_k{i}", "k"], [f"k{i}"], axis=2),
            helper.make_node("Concat", [f"past_v{i}", "v"], [f"v{i}"], axis=2),
            helper.make_node("Unsqueeze", [f"k{i}", "axis2"], [f"kg{i}"]),
            helper.make_node("Unsqueeze", [f"v{i}", "axis2"], [f"vg{i}"]),
            helper.make_node("Transpose", [f"kg{i}"], [f"kt{i}"], perm=[0, 1, 2, 4, 3]),
            helper.make_node("MatMul", ["q", f"kt{i}"], [f"s{i}"]),
            helper.make_node("Mul", [f"s{i}", "scale"], [f"ss{i}"]),
            helper.make_node("Softmax", [f"ss{i}"], [f"p{i}"], axis=-1),
            helper.make_node("MatMul", [f"p{i}", f"vg{i}"], [f"o{i}"]),
        ]
        outputs += [helper.make_tensor_value_info(n, f, None) for n in (f"o{i}", f"k{i}", f"v{i}")]
    inits = [numpy_helper.from_array(np.array([2], np.int64), "axis2"),
             numpy_helper.from_array(np.array(HEAD**-0.5, np.float32), "scale")]
    graph = helper.make_graph(nodes, "growing", inputs, outputs, inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])


def gqa_model(layers: int, max_positions: int):
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("q", f, [1, 1, HEADS * HEAD]),
              helper.make_tensor_value_info("k", f, [1, 1, KV_HEADS * HEAD]),
              helper.make_tensor_value_info("v", f, [1, 1, KV_HEADS * HEAD]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
              helper.make_tensor_value_info("cos_cache", f, [max_positions, HEAD // 2]),
              helper.make_tensor_value_info("sin_cache", f, [max_positions, HEAD // 2])]
    nodes, outputs = [], []
    cache = [1, KV_HEADS, max_positions, HEAD]
    for i in range(layers):
        inputs += [helper.make_tensor_value_info(f"past_k{i}", f, cache),
                   helper.make_tensor_value_info(f"past_v{i}", f, cache)]
        nodes.append(helper.make_node(
            "GroupQueryAttention", ["q", "k", "v", f"past_k{i}", f"past_v{i}", "seqlens_k", "total_sequence_length",
                                    "cos_cache", "sin_cache"],
            [f"o{i}", f"k{i}", f"v{i}"], domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1))
        outputs += [helper.make_tensor_value_info(f"o{i}", f, None),
                    helper.make_tensor_value_info(f"k{i}", f, cache), helper.make_tensor_value_info(f"v{i}", f, cache)]
    graph = helper.make_graph(nodes, "gqa", inputs, outputs)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17),
                                                                  helper.make_opsetid("com.microsoft", 1)])


def median_ms(run, repeat: int) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=420)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.log_severity_level = 3
    cpu = ["CPUExecutionProvider"]
    rand = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731

    growing = ort.InferenceSession(growing_model(args.layers).SerializeToString(), opts, providers=cpu)
    feed = {"q": rand(1, KV_HEADS, HEADS // KV_HEADS, 1, HEAD), "k": rand(1, KV_HEADS, 1, HEAD),
            "v": rand(1, KV_HEADS, 1, HEAD)}
    for i in range(args.layers):
        feed[f"past_k{i}"], feed[f"past_v{i}"] = rand(1, KV_HEADS, args.positions, HEAD), rand(1, KV_HEADS,
                                                                                             args.positions, HEAD)
    growing_ms = median_ms(lambda: growing.run(None, feed), args.repeat)

    max_positions = 1 << (args.positions + 1).bit_length()
    gqa = ort.InferenceSession(gqa_model(args.layers, max_positions).SerializeToString(), opts, providers=cpu)
    binding = gqa.io_binding()
    angles = np.arange(max_positions)[:, None] / (1e6 ** (np.arange(HEAD // 2) / (HEAD // 2)))
    for name, value in {"q": rand(1, 1, HEADS * HEAD), "k": rand(1, 1, KV_HEADS * HEAD),
                        "v": rand(1, 1, KV_HEADS * HEAD), "seqlens_k": np.array([args.positions], np.int32),
                        "total_sequence_length": np.array(args.positions + 1, np.int32),
                        "cos_cache": np.cos(angles).astype(np.float32),
                        "sin_cache": np.sin(angles).astype(np.float32)}.items():
        binding.bind_cpu_input(name, value)
    for i in range(args.layers):
        for kind in ("k", "v"):
            buffer = ort.OrtValue.ortvalue_from_numpy(rand(1, KV_HEADS, max_positions, HEAD))
            binding.bind_ortvalue_input(f"past_{kind}{i}", buffer)
            binding.bind_ortvalue_output(f"{kind}{i}", buffer)  # the same memory: written in place
        binding.bind_output(f"o{i}")
    gqa_ms = median_ms(lambda: gqa.run_with_iobinding(binding), args.repeat)

    result = {"positions": args.positions, "layers": args.layers, "threads": args.threads,
              "onnxruntime": ort.__version__, "growing_ms": round(growing_ms, 2),
              "gqa_shared_buffer_ms": round(gqa_ms, 2), "saved_ms_per_step": round(growing_ms - gqa_ms, 2)}
    from megaedge.runtime.machine import cpu_facts

    result["cpu"] = cpu_facts()["model"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kv_attention.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
