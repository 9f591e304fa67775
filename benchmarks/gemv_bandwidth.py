"""How fast onnxruntime's matmul kernels read weights on this machine, at decoder-like shapes far beyond the cache.

    python benchmarks/gemv_bandwidth.py [--layers 24] [--rows 1,128] [--accuracy-levels] [--work DIR]

A chain of ``layers`` x (2048x6144, 6144x2048) projections (the 1.7B decoder's MLP shapes) in fp32, per-channel
dynamic int8 (``MatMulInteger``) and weight-only blocks (``MatMulNBits``, accuracy level 4: 8-bit blocks of 128 as
the cpu INT8 recipe uses, 4-bit blocks of 32 as cpu-int4 uses), each timed at M rows (1 = a decode step, 128 = a
prefill). Weight bytes read per second are compared with the copy and read-only bandwidths ``megaedge bench``
measures: it shows what fraction of the bandwidth bound a decode step can reach with these kernels at all.
``--accuracy-levels`` times the block kernels at the other accuracy levels too (float compute instead of int8), in a
run of its own without the peers.
Where OpenVINO is installed (``pip install 'megaedge[peers]'``) its CPU plugin runs the same 8-bit block graph and a
per-channel int8 graph (DequantizeLinear -> MatMul, which it fuses into one weight-compressed matmul) at f32 and bf16
inference precision, so the figures say whether another runtime reads int8 weights faster on this machine.
Writes benchmarks/results/gemv_bandwidth.json (with ``--accuracy-levels``: gemv_bandwidth_accuracy_levels.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, FFN = 2048, 6144


def chain_model(layers: int, seed: int = 0):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, weights, x = [], [], "x"
    for i in range(layers):
        for name, shape in ((f"up{i}", (HIDDEN, FFN)), (f"down{i}", (FFN, HIDDEN))):
            weights.append(numpy_helper.from_array((0.02 * rng.standard_normal(shape)).astype(np.float32), name))
            nodes.append(helper.make_node("MatMul", [x, name], [f"{name}_out"]))
            x = f"{name}_out"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", HIDDEN])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", HIDDEN])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what onnxruntime 1.31 reads
    return model


def per_channel_qdq_chain(layers: int, seed: int = 0):
    """The chain with int8 weights and one scale per output column behind DequantizeLinear (weight-only QDQ)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, weights, x = [], [], "x"
    for i in range(layers):
        for name, (k, n) in ((f"up{i}", (HIDDEN, FFN)), (f"down{i}", (FFN, HIDDEN))):
            weights.append(numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), f"{name}_q"))
            weights.append(numpy_helper.from_array((1e-3 * (1 + rng.random(n))).astype(np.float32), f"{name}_s"))
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s"], [f"{name}_w"], axis=1))
            nodes.append(helper.make_node("MatMul", [x, f"{name}_w"], [f"{name}_out"]))
            x = f"{name}_out"
    graph = helper.make_graph(nodes, "qdq_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", HIDDEN])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", HIDDEN])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def block_quantized(fp32: Path, work: Path, name: str, bits: int, block: int, accuracy_level: int) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=accuracy_level, bits=bits)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=bits, block_size=block, is_symmetric=True,
                                     accuracy_level=accuracy_level, algo_config=config)
    quantizer.process()
    path = work / f"{name}.onnx"
    onnx.save(quantizer.model.model, path, save_as_external_data=True, location=f"{name}.data")
    return path


def variants(work: Path, layers: int, accuracy_levels: bool) -> dict[str, tuple[Path, float]]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    params = 2 * layers * HIDDEN * FFN
    fp32 = work / "fp32.onnx"
    onnx.save(chain_model(layers), fp32, save_as_external_data=True, location="fp32.data")
    dynamic = work / "dynamic.onnx"
    quantize_dynamic(str(fp32), str(dynamic), weight_type=QuantType.QInt8, per_channel=True,
                     use_external_data_format=True)
    out = {"fp32": (fp32, 4.0 * params), "int8_per_channel_dynamic": (dynamic, 1.0 * params)}
    # The weight-only kernels of the cpu (8-bit, blocks of 128) and cpu-int4 (4-bit, blocks of 32) recipes.
    grid = [("int8_blocks_matmulnbits", 8, 128, 4), ("int4_blocks32_matmulnbits", 4, 32, 4)]
    if accuracy_levels:
        grid += [(f"int8_blocks_matmulnbits_level{level}", 8, 128, level) for level in (0, 1, 2, 3)]
        grid += [("int4_blocks128_matmulnbits", 4, 128, 4), ("int4_blocks32_matmulnbits_level1", 4, 32, 1)]
    for name, bits, block, level in grid:
        out[name] = (block_quantized(fp32, work, name, bits, block, level), (bits / 8 + 4 / block) * params)
    return out


def time_rows(path: Path, rows: int, threads: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((rows, HIDDEN)).astype(np.float32)
    for _ in range(3):
        session.run(None, {"x": x})
    n = 30 if rows == 1 else 5
    t0 = time.perf_counter()
    for _ in range(n):
        session.run(None, {"x": x})
    return (time.perf_counter() - t0) / n


def time_rows_openvino(path: Path, rows: int, threads: int, precision: str) -> float:
    import openvino

    core = openvino.Core()
    config = {"INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": precision}
    request = core.compile_model(core.read_model(str(path)), "CPU", config).create_infer_request()
    x = np.random.default_rng(1).standard_normal((rows, HIDDEN)).astype(np.float32)
    for _ in range(3):
        request.infer({0: x})
    n = 30 if rows == 1 else 5
    t0 = time.perf_counter()
    for _ in range(n):
        request.infer({0: x})
    return (time.perf_counter() - t0) / n


def openvino_variants(work: Path, layers: int, onnxruntime_graphs: dict) -> dict[str, tuple[Path, float]]:
    import onnx

    params = 2 * layers * HIDDEN * FFN
    qdq = work / "qdq_per_channel.onnx"
    onnx.save(per_channel_qdq_chain(layers), qdq, save_as_external_data=True, location="qdq_per_channel.data")
    return {"int8_per_channel_qdq": (qdq, 1.0 * params),
            "int8_blocks_matmulnbits": onnxruntime_graphs["int8_blocks_matmulnbits"]}


def main() -> None:
    from megaedge.runtime.bench import BandwidthBounds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--rows", default="1,128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accuracy-levels", action="store_true",
                        help="also time the block kernels at accuracy levels 0-3 and 4-bit blocks of 128")
    parser.add_argument("--work", help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    try:
        import openvino
    except ImportError:
        openvino = None
    # Measured before and after the kernels: a bound taken in one of this VM's slow spells once put every kernel at
    # 120 % of a 12.2 GB/s "read bandwidth".
    bounds = BandwidthBounds(threads=args.threads)
    reads = bounds.reads[0]
    out = {"threads": args.threads, "layers": args.layers, "runs": [],
           "openvino": openvino.__version__ if openvino else "not installed (pip install 'megaedge[peers]')"}
    def record(runtime: str, name: str, rows: int, seconds: float, weight_bytes: float) -> None:
        rate = weight_bytes / seconds / 1e9
        out["runs"].append({"runtime": runtime, "kernel": name, "rows": rows, "ms": round(seconds * 1e3, 2),
                            "weight_gb_s": round(rate, 2)})
        print(f"{runtime:14s} {name:34s} M={rows:4d} {seconds * 1e3:8.2f} ms  weights read at {rate:5.1f} GB/s "
              f"({100 * rate / reads:4.1f} % of the {reads:.1f} GB/s read bandwidth measured before)", flush=True)

    rows_grid = [int(r) for r in args.rows.split(",")]
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        graphs = variants(Path(tmp), args.layers, args.accuracy_levels)
        for name, (path, weight_bytes) in graphs.items():
            for rows in rows_grid:
                record("onnxruntime", name, rows, time_rows(path, rows, args.threads), weight_bytes)
        if openvino is not None and not args.accuracy_levels:  # the peers belong to the default run
            for name, (path, weight_bytes) in openvino_variants(Path(tmp), args.layers, graphs).items():
                for precision in ("f32", "bf16"):
                    for rows in rows_grid:
                        seconds = time_rows_openvino(path, rows, args.threads, precision)
                        record(f"openvino-{precision}", name, rows, seconds, weight_bytes)
    bounds.measure()
    bandwidth, reads = bounds.copy, bounds.read
    out.update(copy_bandwidth_gb_s=round(bandwidth, 2), read_bandwidth_gb_s=round(reads, 2),
               copy_bandwidth_before_after_gb_s=[round(c, 2) for c in bounds.copies],
               read_bandwidth_before_after_gb_s=[round(r, 2) for r in bounds.reads])
    print(f"bounds: copy {bounds.copies[0]:.1f} / {bounds.copies[1]:.1f} GB/s, read {bounds.reads[0]:.1f} / "
          f"{bounds.reads[1]:.1f} GB/s (before / after); the higher is the bound")
    for run in out["runs"]:
        run["percent_of_copy_bandwidth"] = round(100 * run["weight_gb_s"] / bandwidth, 1)
        run["percent_of_read_bandwidth"] = round(100 * run["weight_gb_s"] / reads, 1)
        print(f"{run['runtime']:14s} {run['kernel']:34s} M={run['rows']:4d} {run['percent_of_read_bandwidth']:5.1f} % "
              f"of the read bound, {run['percent_of_copy_bandwidth']:5.1f} % of the copy bound")
    RESULTS.mkdir(exist_ok=True)
    name = "gemv_bandwidth_accuracy_levels.json" if args.accuracy_levels else "gemv_bandwidth.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
