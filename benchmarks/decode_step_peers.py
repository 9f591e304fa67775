"""One decode step of a bundle's decoder in onnxruntime and, where installed, OpenVINO, on the same feed.

    python benchmarks/decode_step_peers.py BUNDLE [--past 420] [--threads 2] [--repeat 10]

The feed is what the runtime sends per generated token: one token id, no audio rows, one logits row and a KV cache
of ``past`` positions per layer (random values; a step's cost does not depend on them). Each runtime compiles the
bundle's decoder.onnx as it is (the INT8 graph's MatMulNBits blocks become OpenVINO's weight-compressed matmuls), is
timed over ``repeat`` steps after warm-up, and its logits are compared with onnxruntime's. OpenVINO runs at f32 and
at bf16 inference precision (its default on CPUs with AMX). Writes benchmarks/results/decode_step_peers.json. It
answers whether another CPU runtime would make decode faster than the onnxruntime session megaedge uses.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def step_feed(info, past: int) -> dict:
    rng = np.random.default_rng(0)
    feed = {}
    for tensor in info.graph("decoder").inputs:
        dtype = np.dtype(tensor.dtype)
        if tensor.name == "input_ids":
            feed[tensor.name] = np.array([[info.prompt.asr_text]], dtype)
        elif tensor.name == "audio_features":
            feed[tensor.name] = np.zeros((0, tensor.shape[1]), dtype)
        elif tensor.name == "logits_at":
            feed[tensor.name] = np.array([0], dtype)
        else:  # past keys / values
            feed[tensor.name] = rng.standard_normal((1, tensor.shape[1], past, tensor.shape[3])).astype(dtype)
    return feed


def timed(run, repeat: int) -> tuple[list[float], np.ndarray]:
    for _ in range(3):
        logits = run()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        logits = run()
        times.append(time.perf_counter() - t0)
    return times, logits


def openvino_profile(core, decoder: Path, config: dict, feed: dict, top: int = 6) -> dict[str, float]:
    """Milliseconds per executed node type in one step, from a separate compile with OpenVINO's profiler on (so the
    timed runs carry no profiling overhead)."""
    compiled = core.compile_model(core.read_model(str(decoder)), "CPU", {**config, "PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    for _ in range(3):
        request.infer(feed)
    per_type: dict[str, float] = {}
    for node in request.profiling_info:
        key = f"{node.node_type} ({node.exec_type})"
        per_type[key] = per_type.get(key, 0.0) + node.real_time.total_seconds() * 1e3
    ranked = sorted(per_type.items(), key=lambda kv: -kv[1])
    return {"total_ms": round(sum(per_type.values()), 1), **{k: round(v, 1) for k, v in ranked[:top]}}


def main() -> None:
    import onnxruntime as ort

    from megaedge.runtime import manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--past", type=int, default=420, help="cached positions per layer (default 420)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    bundle = Path(args.bundle)
    info = manifest.read(bundle, verify=False)
    decoder = bundle / info.graph("decoder").file
    feed = step_feed(info, args.past)
    out = {"bundle": bundle.name, "precision": info.precision, "past": args.past, "threads": args.threads,
           "machine": platform.processor() or platform.machine(), "onnxruntime": ort.__version__, "runs": []}

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(decoder), options, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - t0
    times, reference = timed(lambda: session.run(["logits"], feed)[0], args.repeat)
    contenders = [("onnxruntime", load, times, reference)]
    # The scale the differences are read against; onnxruntime's 8-bit kernel quantizes activations too (accuracy
    # level 4), OpenVINO's does not, so the two differ by more than rounding.
    out["max_abs_logit_onnxruntime"] = round(float(np.abs(reference).max()), 3)
    session = None  # one decoder's weights in memory at a time

    try:
        import openvino
    except ImportError:
        out["openvino"] = "not installed (pip install 'megaedge[peers]')"
    else:
        out["openvino"] = openvino.__version__
        core = openvino.Core()
        for precision in ("f32", "bf16"):
            config = {"INFERENCE_NUM_THREADS": str(args.threads), "PERFORMANCE_HINT": "LATENCY",
                      "INFERENCE_PRECISION_HINT": precision}
            t0 = time.perf_counter()
            compiled = core.compile_model(core.read_model(str(decoder)), "CPU", config)
            load = time.perf_counter() - t0
            request = compiled.create_infer_request()
            logits_port = compiled.output("logits")
            times, logits = timed(lambda r=request, p=logits_port: r.infer(feed)[p], args.repeat)
            contenders.append((f"openvino-{precision}", load, times, logits))
            request = compiled = None
            out[f"openvino_{precision}_profile_ms"] = openvino_profile(core, decoder, config, feed)
            print(f"openvino-{precision} profile (ms per step by node type): {out[f'openvino_{precision}_profile_ms']}")

    for name, load, times, logits in contenders:
        logits = np.asarray(logits, np.float32).reshape(reference.shape)
        run = {"runtime": name, "load_s": round(load, 2), "step_ms_median": round(1e3 * float(np.median(times)), 1),
               "step_ms_min": round(1e3 * min(times), 1),
               "max_abs_logit_diff_vs_onnxruntime": round(float(np.abs(logits - reference).max()), 5),
               "same_argmax_as_onnxruntime": bool(logits.argmax(-1).tolist() == reference.argmax(-1).tolist())}
        out["runs"].append(run)
        print(f"{name:14s} load {run['load_s']:5.2f} s  step {run['step_ms_median']:6.1f} ms median "
              f"({run['step_ms_min']:.1f} min)  max |logit diff| {run['max_abs_logit_diff_vs_onnxruntime']:.4g}  "
              f"same argmax: {run['same_argmax_as_onnxruntime']}", flush=True)
    print(f"largest |logit| in onnxruntime's step: {out['max_abs_logit_onnxruntime']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode_step_peers.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
