"""GPU decode at batch 1: the growing-cache decoder graph against the fixed-KV one with CUDA graphs, FP16 and INT4
weights, on onnxruntime's CUDA provider, against the memory read bound and transformers FP16 (static cache +
torch.compile) as the contender.

    python benchmarks/gpu_decode.py --work DIR [--geometry 1.7b] [--past 420] [--tokens 64] [--out JSON]
    python benchmarks/gpu_decode.py --work DIR --device cpu --geometry tiny --tokens 8      # dry run of the code
    python benchmarks/gpu_decode.py --work DIR --bundles-only      # only the checkpoint and bundles, reused later

Random weights at the real geometry (``make-test-model --init realistic``). Each variant: a prompt of ``past``
positions (audio rows + the prompt's tokens), then ``tokens`` decode steps fed a fixed token, timed after warm-up
steps (the fixed-KV variant captures its CUDA graph there). The read bound: the decoder's weight bytes plus the
KV bytes a step attends, over the device's measured read bandwidth (runtime/device_bandwidth.py through
onnxruntime; with torch where onnxruntime has no CUDA). Stages that cannot run (no CUDA provider, no transformers,
no torch GPU) are recorded with the reason, never fatal: the JSON always says what ran.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _stage(results: dict, name: str, fn, *args):
    """Run one stage; its result or its error (type and message) under ``results[name]``."""
    t0 = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as exc:  # a benchmark stage that fails must not hide the others
        results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         "trace": traceback.format_exc(limit=3)}
    results.setdefault("stage_seconds", {})[name] = round(time.perf_counter() - t0, 1)
    return results[name]


def ort_cuda_reason() -> str | None:
    """None where onnxruntime's CUDA provider really runs a graph here, else why not."""
    import onnxruntime as ort

    from megaedge.runtime import device_bandwidth

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} lists no CUDAExecutionProvider ({ort.get_available_providers()})"
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # pragma: no cover - machine dependent
            return f"onnxruntime.preload_dlls() failed: {exc}"
    session = ort.InferenceSession(str(device_bandwidth.PROBE_DIR / device_bandwidth.COPY_PROBE),
                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return f"CUDAExecutionProvider listed but could not start (session providers {session.get_providers()})"
    return None


# ------------------------------------------------------------------------------------------- bundles
def make_bundles(work: Path, geometry: str, variants: list[str]) -> dict:
    """The checkpoint and the bundles the variants need, in ``work`` (reused when already there)."""
    from megaedge.export.bundle import ExportOptions, export_bundle
    from megaedge.export.factory import write_checkpoint
    from megaedge.export.fixed_kv import bundle_with_weights

    checkpoint = work / f"ckpt-{geometry}"
    if not checkpoint.exists():
        write_checkpoint(checkpoint, geometry=geometry, layout_name="mega", seed=0, init="realistic")
    paths = {}
    wanted = {"growing-fp16": ("growing-fp16", ExportOptions(precision="fp16", validate=False,
                                                             include_router=False)),
              "fixed-fp16": ("fixed-fp16", ExportOptions(precision="fp16", target="cuda", validate=False,
                                                         include_router=False))}
    for variant in variants:
        base = "fixed-fp16" if variant.startswith("fixed") else "growing-fp16"
        name, options = wanted[base]
        if not (work / name / "megaedge.json").is_file():
            shutil.rmtree(work / name, ignore_errors=True)
            export_bundle(checkpoint, work / name, options)
        paths[variant] = work / name
        if variant == "fixed-int4":
            if not (work / "fixed-int4" / "megaedge.json").is_file():
                shutil.rmtree(work / "fixed-int4", ignore_errors=True)
                bundle_with_weights(work / name, work / "fixed-int4", "int4")
            paths[variant] = work / "fixed-int4"
    return {"checkpoint": str(checkpoint), "bundles": {k: str(v) for k, v in paths.items()}}


def decoder_read_bytes(bundle: Path, past: int) -> tuple[int, int]:
    """(weight bytes a step reads: the decoder graph's files; KV bytes it attends at ``past`` positions)."""
    from megaedge.runtime import manifest

    info = manifest.read(bundle, verify=False)
    spec = info.graph("decoder")
    weights = sum((bundle / f).stat().st_size for f in (spec.file, *spec.data_files))
    dec = info.decoder
    kv = len(dec["past_names"]) * dec["kv_heads"] * dec["head_dim"] * past * np.dtype(dec["kv_dtype"]).itemsize
    return weights, kv


# ------------------------------------------------------------------------------------------- onnxruntime
def ort_decode(bundle: Path, device: str, past: int, tokens: int, warmup: int) -> dict:
    from megaedge.runtime import decoding
    from megaedge.runtime.transcriber import Transcriber

    tr = Transcriber.from_bundle(bundle, providers=(device,), vad="off", verify=False)
    hidden = tr.manifest.decoder["hidden_size"]
    prompt = tr.prompt(0, None, None)
    audio_rows = max(past - len(prompt), 0)
    ids = tr.prompt(audio_rows, None, None)
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((audio_rows, hidden)).astype(tr.kv_dtype)
    state = decoding.open_state(tr, tokens + warmup)
    t0 = time.perf_counter()
    logits = state.extend(ids, audio, None)[-1]
    prefill = time.perf_counter() - t0
    token = int(tr.manifest.prompt.asr_text)
    for _ in range(warmup):
        logits = state.step(token, None)
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = state.step(token, None)
    seconds = time.perf_counter() - t0
    session = tr.sessions["decoder"]
    return {"bundle": str(bundle), "state": type(state).__name__, "providers": session.providers,
            "cuda_graph": bool(getattr(session, "cuda_graph", False)), "prompt_rows": len(ids),
            "prefill_s": round(prefill, 4), "tokens": tokens, "decode_s": round(seconds, 4),
            "tok_per_s": round(tokens / seconds, 2), "logits_finite": bool(np.isfinite(logits).all())}


# ------------------------------------------------------------------------------------------- bandwidth
def read_bandwidth(device: str, use_ort: bool) -> dict:
    """Read GB/s of ``device``'s memory: onnxruntime's gemv probe where it runs there, else a torch fp16 gemv."""
    if use_ort:
        from megaedge.runtime import device_bandwidth

        copy, read = device_bandwidth.device_bandwidths(device, mib=256 if device == "cuda" else 64)
        return {"read_gbps": round(read, 1), "copy_gbps": round(copy, 1), "via": "onnxruntime"}
    import torch

    dev = "cuda" if device == "cuda" else "cpu"
    seconds = []
    sizes = (256 * 2**20, 512 * 2**20) if dev == "cuda" else (32 * 2**20, 64 * 2**20)
    for size in sizes:
        matrix = torch.ones(size // (2 * 4096), 4096, dtype=torch.float16 if dev == "cuda" else torch.float32,
                            device=dev)
        vector = torch.ones(1, matrix.shape[0], dtype=matrix.dtype, device=dev)
        best = float("inf")
        for _ in range(12):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            vector @ matrix
            if dev == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        seconds.append((matrix.numel() * matrix.element_size(), best))
        del matrix, vector
    (b0, s0), (b1, s1) = seconds
    read = (b1 - b0) / (s1 - s0) / 1e9 if s1 > s0 else b1 / s1 / 1e9
    return {"read_gbps": round(read, 1), "via": "torch gemv"}


# ------------------------------------------------------------------------------------------- the contender
def transformers_decode(checkpoint: Path, device: str, past: int, tokens: int, compile_: bool) -> dict:
    """The checkpoint's LLM as transformers' Qwen3ForCausalLM in fp16 (fp32 on CPU) with a static cache, the step
    compiled by generate() (CUDA graphs) on a GPU unless told not to; decode tok/s = the extra tokens over the extra time
    of a long generate against a one-token one (the prefill cancels)."""
    import torch
    from transformers import Qwen3ForCausalLM

    from megaedge.export.loader import load_checkpoint

    loaded = load_checkpoint(checkpoint, load_router=False)
    text = loaded.model.model.language_model
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    model = Qwen3ForCausalLM(text.config)
    model.model.load_state_dict(text.state_dict())
    model.lm_head.load_state_dict(loaded.model.lm_head.state_dict())
    del loaded
    model = model.to(dev, dtype).eval()
    model.generation_config.cache_implementation = "static"
    model.generation_config.pad_token_id = 0
    # generate() compiles the decode step itself on a GPU with a static cache (fullgraph, CUDA graphs, the step
    # boundaries marked): compiling forward by hand instead breaks on its CUDA-graph outputs being reused.
    model.generation_config.disable_compile = not compile_
    ids = torch.randint(10, 1000, (1, past), device=dev)

    def run(n: int) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(tokens + 1)  # compiles (prefill and step shapes) and warms
    short, long = min(run(1) for _ in range(2)), min(run(tokens + 1) for _ in range(2))
    # a step reads the layers and the LM head (the embedding table only for one row) and the KV at ``past``
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "embed_tokens" not in name)
    cfg = model.config
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * past * (2 if dtype == torch.float16 else 4)
    return {"dtype": str(dtype), "compiled": compile_ and dev.type == "cuda", "tokens": tokens, "decode_s": round(long - short, 4),
            "tok_per_s": round(tokens / max(long - short, 1e-9), 2), "read_bytes_per_token": weights + kv,
            "torch": torch.__version__}


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the checkpoint and bundles (reused)")
    parser.add_argument("--geometry", choices=("tiny", "0.6b", "1.7b"), default="1.7b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--past", type=int, default=420, help="prompt positions before decoding (default 420)")
    parser.add_argument("--tokens", type=int, default=64, help="timed decode steps (default 64)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (CUDA graph capture)")
    parser.add_argument("--variants", default="growing-fp16,fixed-fp16,fixed-int4")
    parser.add_argument("--no-contender", action="store_true", help="skip transformers")
    parser.add_argument("--no-compile", action="store_true", help="transformers without torch.compile")
    parser.add_argument("--out", default=None, help="JSON path (default WORK/gpu_decode.json)")
    parser.add_argument("--bundles-only", action="store_true",
                        help="only write the checkpoint and bundles into WORK (on the CPU, e.g. while other work runs)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    variants = [v for v in args.variants.split(",") if v]
    if args.bundles_only:
        t0 = time.perf_counter()
        print(json.dumps(make_bundles(work, args.geometry, variants)), f"{time.perf_counter() - t0:.0f} s", flush=True)
        return 0
    out = Path(args.out or work / "gpu_decode.json")
    import provenance  # beside this script

    from megaedge.runtime import machine

    gpu = machine.gpu_name() if args.device == "cuda" else None
    results: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": provenance.commit(),
                     "command": f"python benchmarks/gpu_decode.py --work DIR --geometry {args.geometry} --device "
                                f"{args.device} --past {args.past} --tokens {args.tokens} --variants {args.variants}",
                     "machine": gpu or platform.processor() or platform.machine(), "python": sys.version.split()[0],
                     "geometry": args.geometry, "device": args.device, "past": args.past, "tokens": args.tokens}

    def save():
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")

    reason = None
    if args.device == "cuda":
        try:
            reason = ort_cuda_reason()
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
    results["onnxruntime_cuda"] = {"runs": reason is None, "reason": reason}
    save()
    bandwidth = _stage(results, "bandwidth", read_bandwidth, args.device, reason is None)
    save()
    built = _stage(results, "bundles", make_bundles, work, args.geometry, variants) if reason is None else \
        {"skipped": reason}
    results["bundles"] = built
    save()
    runs = results.setdefault("runs", {})
    for variant in variants:
        if reason is not None or "bundles" not in built:
            runs[variant] = {"skipped": reason or "no bundle"}
            continue
        bundle = Path(built["bundles"][variant])
        run = _stage(runs, variant, ort_decode, bundle, args.device, args.past, args.tokens, args.warmup)
        if "tok_per_s" in run and "read_gbps" in bandwidth:
            weights, kv = decoder_read_bytes(bundle, args.past)
            bound = bandwidth["read_gbps"] * 1e9 / (weights + kv)
            run.update(read_bytes_per_token=weights + kv, bound_tok_per_s=round(bound, 1),
                       percent_of_read_bound=round(100 * run["tok_per_s"] / bound, 1))
        save()
    results.setdefault("stage_seconds", {}).update(
        {f"run {k}": v for k, v in runs.pop("stage_seconds", {}).items()})
    if not args.no_contender:
        checkpoint = work / f"ckpt-{args.geometry}"
        if not checkpoint.exists():
            from megaedge.export.factory import write_checkpoint

            write_checkpoint(checkpoint, geometry=args.geometry, layout_name="mega", seed=0, init="realistic")
        run = _stage(results, "transformers", transformers_decode, checkpoint, args.device, args.past, args.tokens,
                     not args.no_compile)
        if "tok_per_s" in run and "read_gbps" in bandwidth:
            bound = bandwidth["read_gbps"] * 1e9 / run["read_bytes_per_token"]
            run.update(bound_tok_per_s=round(bound, 1), percent_of_read_bound=round(100 * run["tok_per_s"] / bound, 1))
        save()
    print(json.dumps({k: v for k, v in results.items() if k != "stage_seconds"}, indent=1, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
