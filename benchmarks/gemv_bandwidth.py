"""How fast onnxruntime's matmul kernels read weights on this machine, at decoder-like shapes far beyond the cache.

    python benchmarks/gemv_bandwidth.py [--layers 24] [--rows 1,128] [--work DIR]

A chain of ``layers`` x (2048x6144, 6144x2048) projections (the 1.7B decoder's MLP shapes) in fp32, per-channel
dynamic int8 (``MatMulInteger``) and weight-only blocks (``MatMulNBits``, accuracy level 4: 8-bit blocks of 128 as
the cpu INT8 recipe uses, 4-bit blocks of 32 as cpu-int4 uses), each timed at M rows (1 = a decode step, 128 = a
prefill). Weight bytes read per second are compared with the copy and read-only bandwidths ``megaedge bench``
measures: it shows what fraction of the bandwidth bound a decode step can reach with these kernels at all. Writes benchmarks/results/gemv_bandwidth.json.
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


def variants(work: Path, layers: int) -> dict[str, tuple[Path, float]]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    params = 2 * layers * HIDDEN * FFN
    fp32 = work / "fp32.onnx"
    onnx.save(chain_model(layers), fp32, save_as_external_data=True, location="fp32.data")
    dynamic = work / "dynamic.onnx"
    quantize_dynamic(str(fp32), str(dynamic), weight_type=QuantType.QInt8, per_channel=True,
                     use_external_data_format=True)
    out = {"fp32": (fp32, 4.0 * params), "int8_per_channel_dynamic": (dynamic, 1.0 * params)}
    # The weight-only kernels of the cpu (8-bit, blocks of 128) and cpu-int4 (4-bit, blocks of 32) recipes.
    for name, bits, block in (("int8_blocks_matmulnbits", 8, 128), ("int4_blocks32_matmulnbits", 4, 32)):
        config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4, bits=bits)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=bits, block_size=block, is_symmetric=True,
                                         accuracy_level=4, algo_config=config)
        quantizer.process()
        path = work / f"{name}.onnx"
        onnx.save(quantizer.model.model, path, save_as_external_data=True, location=f"{name}.data")
        out[name] = (path, (bits / 8 + 4 / block) * params)
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


def main() -> None:
    from megaedge.runtime.bench import copy_bandwidth, read_bandwidth

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--rows", default="1,128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    bandwidth = copy_bandwidth(threads=args.threads)
    reads = read_bandwidth()
    out = {"threads": args.threads, "layers": args.layers, "copy_bandwidth_gb_s": round(bandwidth, 2),
           "read_bandwidth_gb_s": round(reads, 2), "runs": []}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for name, (path, weight_bytes) in variants(Path(tmp), args.layers).items():
            for rows in (int(r) for r in args.rows.split(",")):
                seconds = time_rows(path, rows, args.threads)
                rate = weight_bytes / seconds / 1e9
                out["runs"].append({"kernel": name, "rows": rows, "ms": round(seconds * 1e3, 2),
                                    "weight_gb_s": round(rate, 2),
                                    "percent_of_copy_bandwidth": round(100 * rate / bandwidth, 1),
                                    "percent_of_read_bandwidth": round(100 * rate / reads, 1)})
                print(f"{name:26s} M={rows:4d} {seconds * 1e3:8.2f} ms  weights read at {rate:5.1f} GB/s "
                      f"({100 * rate / bandwidth:4.1f} % of the {bandwidth:.1f} GB/s copy bandwidth, "
                      f"{100 * rate / reads:4.1f} % of the {reads:.1f} GB/s read bandwidth)", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gemv_bandwidth.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
