"""GPU decode at batch 1: the growing-cache decoder graph against the fixed-KV one with CUDA graphs, FP16 and INT4
weights, on onnxruntime's CUDA provider, against the memory read bound and transformers FP16 (static cache +
torch.compile) as the contender.

    python benchmarks/gpu_decode.py --work DIR [--geometry 1.7b] [--past 420] [--tokens 64] [--out JSON]
    python benchmarks/gpu_decode.py --work DIR --device cpu --geometry tiny --tokens 8      # dry run of the code
    python benchmarks/gpu_decode.py --work DIR --bundles-only      # only the checkpoint and bundles, reused later
    python benchmarks/gpu_decode.py --work DIR --batches 1,2,4,8   # + steps of B states through the batch axis
    git show REV:megaedge/export/fixed_kv.py > prev.py             # an earlier fixed-KV graph as a contender:
    python benchmarks/gpu_decode.py --work DIR --previous-exporter prev.py --variants fixed-fp16-prev,fixed-fp16

Random weights at the real geometry (``make-test-model --init realistic``). Each variant: a prompt of ``past``
positions (audio rows + the prompt's tokens), then ``tokens`` decode steps fed a fixed token, timed after warm-up
steps (the fixed-KV variant captures its CUDA graph there). The read bound: the decoder's weight bytes plus the
KV bytes a step attends, over the device's measured read bandwidth (runtime/device_bandwidth.py through
onnxruntime; with torch where onnxruntime has no CUDA). Stages that cannot run (no CUDA provider, no transformers,
no torch GPU) are recorded with the reason, never fatal: the JSON always says what ran.

Each onnxruntime variant also gets an op census: the nodes one decode step runs after the provider's graph
optimizations (from onnxruntime's profile of an ordinary, uncaptured run), and whether onnxruntime folded the
q/k norms into the attention. ``--kernels`` adds where the GPU time of the CUDA-graph steps goes, kernel by
kernel (torch's CUPTI profiler, which sees every kernel in the process).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import time
import traceback
from collections import Counter
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
def previous_exporter(path: Path):
    """export_decoder of an earlier revision's export/fixed_kv.py (``path``), loaded beside today's: its torch
    ops renamed into their own namespace (the names are global), its graph inputs as that revision named them
    (position_ids first; today's runtime still binds it where a graph has it)."""
    import types

    source = path.read_text().replace("megaedge::", "megaedge_prev::").replace("torch.ops.megaedge.",
                                                                              "torch.ops.megaedge_prev.")
    source = source.replace("*fixed_kv.FIXED_INPUTS", '"position_ids", "seqlens_k", "total_sequence_length"')
    module = types.ModuleType("megaedge_prev_fixed_kv")
    module.__file__ = str(path)
    exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - a file the user named
    return module.export_decoder


def _bundle_beside(src: Path, out: Path, keep) -> None:
    """``out`` with hard links to the files of bundle ``src`` for which ``keep(name)`` holds (the decoder graph a
    rewrite replaces is left out; weights are linked, never copied)."""
    import os

    out.mkdir(parents=True)
    for f in src.iterdir():
        if keep(f.name):
            os.link(f, out / f.name)


def with_qk_norm_in_attention(src: Path, out: Path) -> Path:
    """A copy of the fixed-KV bundle ``src`` whose attention nodes take the q/k norms themselves (``q_norm_weight``
    / ``k_norm_weight``, inputs 14 and 15 of GroupQueryAttention, CUDA only): the rewrite onnxruntime's
    GroupQueryAttentionPreNormFusion makes, made here so its speed is measured whether or not the installed
    onnxruntime makes it. The weights file is hard-linked, not copied; the manifest's digests no longer hold
    (the benchmark reads bundles unverified)."""
    import onnx
    from onnx import helper

    _bundle_beside(src, out, lambda name: name != "decoder.onnx")
    model = onnx.load(str(src / "decoder.onnx"), load_external_data=False)
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    drop = set()
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        weights, eps = [], None
        for slot in (0, 1):
            outer = producer[node.input[slot]]
            norm = producer[outer.input[0]]
            inner = producer[norm.input[0]]
            assert (outer.op_type, norm.op_type, inner.op_type) == ("Reshape", "SimplifiedLayerNormalization",
                                                                    "Reshape"), "not the pre-norm chain"
            node.input[slot] = inner.input[0]
            weights.append(norm.input[1])
            eps = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
            drop.update(id(n) for n in (outer, norm, inner))
        inputs = list(node.input) + [""] * (14 - len(node.input))
        del node.input[:]
        node.input.extend(inputs[:14] + weights)
        node.attribute.append(helper.make_attribute("qk_norm_epsilon", eps))
    kept = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    onnx.save(model, str(out / "decoder.onnx"))
    return out


def with_packed_projections(src: Path, out: Path) -> Path:
    """A copy of the float fixed-KV bundle ``src`` whose projections that read the same activations (q, k and v;
    gate and up) are one MatMul over their weights side by side, split after: fewer, larger GEMVs a step. Made
    here to measure before the export writes it; digests no longer hold (the benchmark reads bundles
    unverified)."""
    import onnx
    from onnx import helper, numpy_helper

    _bundle_beside(src, out, lambda name: not name.startswith("decoder.onnx"))  # the weights are rewritten
    model = onnx.load(str(src / "decoder.onnx"))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    groups: dict = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            groups.setdefault(node.input[0], []).append(node)
    replace, drop = {}, set()
    for source, nodes in groups.items():
        if len(nodes) < 2:
            continue
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        name = f"{nodes[0].input[1]}_packed"
        graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), name))
        sizes = numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), f"{name}_split")
        graph.initializer.append(sizes)
        packed = f"{nodes[0].output[0]}_packed"
        replace[id(nodes[0])] = [helper.make_node("MatMul", [source, name], [packed], name=f"{nodes[0].name}_packed"),
                                 helper.make_node("Split", [packed, sizes.name], [n.output[0] for n in nodes], axis=-1,
                                                  name=f"{nodes[0].name}_split")]
        drop.update(id(n) for n in nodes[1:])
        for n in nodes:
            inits.pop(n.input[1])
    kept = []
    for node in graph.node:
        if id(node) in replace:
            kept += replace[id(node)]
        elif id(node) not in drop:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    names = set(inits) | {i.name for i in graph.initializer if i.name.endswith(("_packed", "_packed_split"))}
    keep = [i for i in graph.initializer if i.name in names]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.save(model, str(out / "decoder.onnx"), save_as_external_data=True, location="decoder.onnx.data")
    return out


def make_bundles(work: Path, geometry: str, variants: list[str], previous: Path | None = None) -> dict:
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
                                                         include_router=False)),
              "fixed-fp32": ("fixed-fp32", ExportOptions(precision="fp32", target="cuda", validate=False,
                                                         include_router=False))}
    for variant in variants:
        if variant.endswith(FPA_INTB):  # the same bundle, another kernel for its MatMulNBits
            key = variant.removesuffix(FPA_INTB)
            paths[variant] = Path(make_bundles(work, geometry, [key], previous)["bundles"][key])
            continue
        if variant == "fixed-fp16-prev":
            if previous is None:
                raise ValueError("variant fixed-fp16-prev needs --previous-exporter")
            if not (work / variant / "megaedge.json").is_file():
                from unittest import mock

                shutil.rmtree(work / variant, ignore_errors=True)
                with mock.patch("megaedge.export.bundle._decoder_exporter",
                                return_value=previous_exporter(previous)):
                    export_bundle(checkpoint, work / variant, wanted["fixed-fp16"][1])
            paths[variant] = work / variant
            continue
        base = ("fixed-fp32" if variant.startswith("fixed-fp32") else "fixed-fp16" if variant.startswith("fixed")
                else "growing-fp16")
        name, options = wanted[base]
        if not (work / name / "megaedge.json").is_file():
            shutil.rmtree(work / name, ignore_errors=True)
            export_bundle(checkpoint, work / name, options)
        paths[variant] = work / name
        if variant in ("fixed-fp16-qknorm", "fixed-fp16-packed"):
            if not (work / variant / "megaedge.json").is_file():
                shutil.rmtree(work / variant, ignore_errors=True)
                make = with_qk_norm_in_attention if variant.endswith("qknorm") else with_packed_projections
                make(work / name, work / variant)
            paths[variant] = work / variant
        if variant in ("fixed-int4", "fixed-int8", "fixed-fp32-int8"):
            if not (work / variant / "megaedge.json").is_file():
                shutil.rmtree(work / variant, ignore_errors=True)
                bundle_with_weights(work / name, work / variant, variant.split("-")[-1])
            paths[variant] = work / variant
    return {"checkpoint": str(checkpoint), "bundles": {k: str(v) for k, v in paths.items()}}


FPA_INTB = "-fpaintb"


@contextlib.contextmanager
def weight_only_kernels(variant: str):
    """A ``-fpaintb`` variant's sessions are made with onnxruntime's fpA_intB weight-only GEMV / GEMM for
    MatMulNBits (ORT_FPA_INTB_GEMM, read when a session makes its kernels; fp16 activations, 4 or 8 bits, blocks
    of 32-128); every other variant's with it off, whatever the environment says."""
    before = os.environ.get("ORT_FPA_INTB_GEMM")
    os.environ["ORT_FPA_INTB_GEMM"] = "1" if variant.endswith(FPA_INTB) else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("ORT_FPA_INTB_GEMM", None)
        else:
            os.environ["ORT_FPA_INTB_GEMM"] = before


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


def ort_batched_decode(bundle: Path, device: str, past: int, tokens: int, warmup: int, batches: list[int],
                       rounds: int) -> dict:
    """Aggregate decode tokens/s of B states stepping together through the fixed-KV graph's batch axis (one run
    of B states side by side in one bank: a runner with full banks, as the CPU's are; a GPU's runtime banks grow
    1, 1, 2, 4, 8), for each B in ``batches``, the sizes interleaved round by round; every state holds ``past``
    positions. Every size runs without a CUDA graph, batch 1 too, so the sizes compare the batch axis alone;
    ``runs`` has the CUDA-graph solo step."""
    from megaedge.runtime import fixed_kv
    from megaedge.runtime.options import RuntimeOptions
    from megaedge.runtime.transcriber import Transcriber

    most = max(batches)
    tr = Transcriber.from_bundle(bundle, RuntimeOptions(providers=(device,), verify=False,
                                                        batch_steps=max(most, 1)), vad="off")
    session = tr.sessions["decoder"]
    runner = fixed_kv.FixedKVRunner(session.session, tr.manifest.decoder, tr.manifest.routed, tr.float_dtype,
                                    session.device, getattr(session, "cuda_graph", False), batch_steps=most,
                                    full_banks=True)
    if runner.bank_slots < most:
        return {"skipped": f"the decoder graph takes batches of {runner.bank_slots} (exported before the batch axis?)"}
    hidden = tr.manifest.decoder["hidden_size"]
    ids = tr.prompt(max(past - len(tr.prompt(0, None, None)), 0), None, None)
    rows = ids.count(int(tr.manifest.prompt.audio_pad))
    audio = np.random.default_rng(0).standard_normal((rows, hidden)).astype(tr.kv_dtype)
    states = [fixed_kv.FixedKVState(runner) for _ in range(most)]
    for state in states:
        state.extend(ids, audio, None)
    token = int(tr.manifest.prompt.asr_text)
    seconds: dict[int, list[float]] = {b: [] for b in batches}
    for round_ in range(rounds + 1):  # round 0 warms every size
        for b in batches:
            group = states[:b]
            steps = warmup if round_ == 0 else tokens
            t0 = time.perf_counter()
            for _ in range(steps):
                logits = runner._run_batch(group, [token] * b, None)
            if round_:
                seconds[b].append((time.perf_counter() - t0) / steps)
            for state in group:
                state.rollback(len(ids))
    out = {"rounds": rounds, "steps_per_round": tokens, "logits_finite": bool(np.isfinite(logits).all())}
    one = float(np.median(seconds[batches[0]]))
    for b in batches:
        step = float(np.median(seconds[b]))
        out[str(b)] = {"step_ms": round(step * 1e3, 2), "tok_per_s": round(b / step, 2),
                       "vs_first": round((b / step) / (batches[0] / one), 2)}
    return out


def op_census(bundle: Path, device: str, past: int) -> dict:
    """The nodes one decode step runs after onnxruntime's optimizations for ``device``: op type counts from the
    profile of an ordinary run (no CUDA graph, whose replays the profiler cannot see), and how many attention
    nodes onnxruntime gave the q/k norms (GroupQueryAttentionPreNormFusion names them ``*_qknorm``)."""
    import onnxruntime as ort

    from megaedge.runtime import fixed_kv, manifest
    from megaedge.runtime import session as me_session

    info = manifest.read(bundle, verify=False)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(bundle.parent / f"profile-{bundle.name}")
    sess = ort.InferenceSession(str(bundle / info.graph("decoder").file), options,
                                providers=me_session.resolve_providers((device,)))
    runner = fixed_kv.FixedKVRunner(sess, info.decoder, info.routed, np.dtype(info.decoder["kv_dtype"]), device)
    state = fixed_kv.FixedKVState(runner)
    state.extend(list(range(10, 10 + past)), None, None)
    for _ in range(3):
        state.step(11, None)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = runs[-1]
    nodes = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
             and last["ts"] <= e["ts"] <= last["ts"] + last["dur"]]
    ops = Counter(e["args"]["op_name"] for e in nodes)
    providers = Counter(e["args"].get("provider", "?") for e in nodes)
    return {"nodes_per_step": len(nodes), "ops": dict(ops.most_common()), "providers": dict(providers), "attention_nodes_with_qk_norm": sum(
                e["args"]["op_name"] == "GroupQueryAttention" and "_qknorm" in e["name"] for e in nodes),
            "step_host_ms": round(last["dur"] / 1000, 3)}


def kernel_profile(bundle: Path, past: int, steps: int = 16) -> dict:
    """GPU time per kernel over ``steps`` CUDA-graph decode steps (torch.profiler's CUPTI trace of the process)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from megaedge.runtime import decoding
    from megaedge.runtime.transcriber import Transcriber

    tr = Transcriber.from_bundle(bundle, providers=("cuda",), vad="off", verify=False)
    ids = tr.prompt(max(past - len(tr.prompt(0, None, None)), 0), None, None)
    rows = ids.count(int(tr.manifest.prompt.audio_pad))
    audio = np.zeros((rows, tr.manifest.decoder["hidden_size"]), tr.kv_dtype)
    state = decoding.open_state(tr, steps + 8)
    state.extend(ids, audio, None)
    token = int(tr.manifest.prompt.asr_text)
    for _ in range(6):  # capture and warm
        state.step(token, None)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            state.step(token, None)
        torch.cuda.synchronize()
    kernels: dict = {}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        k = kernels.setdefault(e.name[:120], [0, 0.0])
        k[0] += 1
        k[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    total = sum(v[1] for v in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]
    return {"steps": steps, "kernels_per_step": round(sum(v[0] for v in kernels.values()) / steps, 1),
            "gpu_ms_per_step": round(total / steps / 1000, 4),
            "top": [{"kernel": name, "per_step": round(n / steps, 2), "us_per_step": round(t / steps, 1),
                     "share": round(t / total, 3) if total else None} for name, (n, t) in top]}


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
    parser.add_argument("--variants", default="growing-fp16,fixed-fp16,fixed-int4",
                        help="of growing-fp16, fixed-fp16, fixed-int4, fixed-fp32, fixed-fp32-int8 (the last two "
                             "for CPU runs), fixed-fp16-qknorm (q/k norms in the attention node, CUDA only), "
                             "fixed-fp16-packed (q/k/v and gate/up as one MatMul each), fixed-fp16-prev "
                             "(--previous-exporter), fixed-int8; a weight-only variant + '-fpaintb' (e.g. "
                             "fixed-int4-fpaintb): its MatMulNBits on onnxruntime's fpA_intB kernels")
    parser.add_argument("--previous-exporter", type=Path, default=None,
                        help="an earlier revision's export/fixed_kv.py: its graph is the variant fixed-fp16-prev")
    parser.add_argument("--kernels", default="", help="variants whose CUDA-graph steps get a kernel profile")
    parser.add_argument("--batches", default="",
                        help="e.g. 1,2,4,8: fixed-KV variants also step this many states at once through the "
                             "graph's batch axis (aggregate tokens/s, sizes interleaved)")
    parser.add_argument("--batch-variants", default="", help="the variants --batches steps (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --batches (default 3)")
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
        print(json.dumps(make_bundles(work, args.geometry, variants, args.previous_exporter)),
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        return 0
    out = Path(args.out or work / "gpu_decode.json")
    import provenance  # beside this script

    from megaedge.runtime import machine

    gpu = machine.gpu_name() if args.device == "cuda" else None
    results: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": provenance.commit(),
                     "command": f"python benchmarks/gpu_decode.py --work DIR --geometry {args.geometry} --device "
                                f"{args.device} --past {args.past} --tokens {args.tokens} --variants {args.variants}"
                                + (" --previous-exporter PREV" if args.previous_exporter else "")
                                + (f" --kernels {args.kernels}" if args.kernels else "")
                                + (f" --batches {args.batches} --rounds {args.rounds}" if args.batches else "")
                                + (f" --batch-variants {args.batch_variants}" if args.batch_variants else ""),
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
    built = _stage(results, "bundles", make_bundles, work, args.geometry, variants, args.previous_exporter) \
        if reason is None else \
        {"skipped": reason}
    results["bundles"] = built
    save()
    runs = results.setdefault("runs", {})
    for variant in variants:
        if reason is not None or "bundles" not in built:
            runs[variant] = {"skipped": reason or "no bundle"}
            continue
        bundle = Path(built["bundles"][variant])
        with weight_only_kernels(variant):
            run = _stage(runs, variant, ort_decode, bundle, args.device, args.past, args.tokens, args.warmup)
        run["fpa_intb_gemm"] = variant.endswith(FPA_INTB)
        if "tok_per_s" in run and "read_gbps" in bandwidth:
            weights, kv = decoder_read_bytes(bundle, args.past)
            bound = bandwidth["read_gbps"] * 1e9 / (weights + kv)
            run.update(read_bytes_per_token=weights + kv, bound_tok_per_s=round(bound, 1),
                       percent_of_read_bound=round(100 * run["tok_per_s"] / bound, 1))
        save()
    batches = [int(b) for b in args.batches.split(",") if b]
    batched = results.setdefault("batched", {})
    batch_variants = [v for v in args.batch_variants.split(",") if v] or variants
    for variant in batch_variants:
        if batches and reason is None and variant.startswith("fixed") and variant in built.get("bundles", {}):
            with weight_only_kernels(variant):
                _stage(batched, variant, ort_batched_decode, Path(built["bundles"][variant]), args.device,
                       args.past, args.tokens, args.warmup, batches, args.rounds)
            save()
    census = results.setdefault("op_census", {})
    for variant in variants:
        if reason is None and variant.startswith("fixed") and variant in built.get("bundles", {}):
            with weight_only_kernels(variant):
                _stage(census, variant, op_census, Path(built["bundles"][variant]), args.device, args.past)
            save()
    kernels = results.setdefault("kernels", {})
    for variant in (v for v in args.kernels.split(",") if v):
        if reason is None and args.device == "cuda" and variant in built.get("bundles", {}):
            with weight_only_kernels(variant):
                _stage(kernels, variant, kernel_profile, Path(built["bundles"][variant]), args.past)
            save()
    for prefix, table in (("run", runs), ("batched", batched), ("census", census), ("kernels", kernels)):
        results.setdefault("stage_seconds", {}).update(
            {f"{prefix} {k}": v for k, v in table.pop("stage_seconds", {}).items()})
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
    save()
    print(json.dumps({k: v for k, v in results.items() if k != "stage_seconds"}, indent=1, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
