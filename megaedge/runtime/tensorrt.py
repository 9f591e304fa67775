"""TensorRT: readiness checks, optimization profiles, memory planning, engine facts, and the engine session.

Everything here except ``TrtSession`` and ``build_engine`` runs without TensorRT: the checks read the ONNX graphs
(protobuf only, no weights), the profiles and the plan are arithmetic on the manifest. TensorRT itself cannot be
installed on this project's machines (its PyPI wheels fetch from NVIDIA's index), so the parts that need it lean on
NVIDIA's polygraphy (loaders, profiles, runner) and are tested where a GPU with TensorRT exists (marker ``trt``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megaedge.errors import BundleError, MegaedgeError, require
from megaedge.runtime import features, gpu_plan, manifest

# onnx-tensorrt's published operator support matrix (TensorRT 10.x, docs/operators.md), restricted to the ops a
# Qwen3-ASR bundle can contain, plus the ones our CPU recipes add that TensorRT rejects.
TRT_OPSET_RANGE = (9, 24)
SUPPORTED_OPS = frozenset("""
Add Cast Clip Concat Constant ConstantOfShape Conv Cos CumSum DequantizeLinear Div Equal Erf Exp Expand Gather
GatherElements GatherND Gelu Gemm Greater GreaterOrEqual Identity LayerNormalization Less LessOrEqual MatMul Max Min
Mul Neg Not Or Pad Pow QuantizeLinear Range Reciprocal ReduceMax ReduceMean ReduceSum Relu Reshape RMSNormalization
Shape Sigmoid Sin Slice Softmax Split Sqrt Squeeze Sub Tanh Tile Transpose Trilu Unsqueeze Where
""".split())
UNSUPPORTED_NOTES = {
    "MatMulInteger": "dynamic INT8 (the cpu-dynamic / naive recipes); export the TensorRT flavour: --target tensorrt",
    "DynamicQuantizeLinear": "dynamic INT8 is not supported; export the TensorRT flavour: --target tensorrt",
    "MatMulNBits": "onnxruntime contrib op (the cpu recipe); export the TensorRT flavour: --target tensorrt",
}
ENGINE_FILES = {"encoder": "encoder.plan", "decoder": "decoder.plan"}


@dataclass(frozen=True)
class Finding:
    graph: str
    level: str  # "error" | "warning"
    message: str


def check_graph(path: Path, name: str) -> list[Finding]:
    """What TensorRT's ONNX parser would reject (errors) or handle at a cost (warnings) in one graph."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    found = []
    default = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if default is None or not TRT_OPSET_RANGE[0] <= default <= TRT_OPSET_RANGE[1]:
        found.append(Finding(name, "error", f"opset {default} is outside TensorRT's {TRT_OPSET_RANGE[0]}-"
                                            f"{TRT_OPSET_RANGE[1]}; re-export with --opset 18"))
    ops: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"
        ops[key] = ops.get(key, 0) + 1
    for op, count in sorted(ops.items()):
        bare = op.split(":")[-1]
        if op != bare or bare not in SUPPORTED_OPS:
            note = UNSUPPORTED_NOTES.get(bare, "not in TensorRT's ONNX operator support matrix")
            found.append(Finding(name, "error", f"{count} x {op}: {note}"))
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2] in inits:
            zero = numpy_helper.to_array(inits[node.input[2]])
            if zero.dtype != np.int8 or zero.any():
                found.append(Finding(name, "error", f"{node.op_type} {node.name}: zero point {zero.dtype} "
                                                    f"{'non-zero' if zero.any() else ''} — TensorRT needs signed "
                                                    "symmetric Q/DQ (export with --target tensorrt)"))
                break
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.UINT8:
            found.append(Finding(name, "error", f"initializer {init.name} is uint8: TensorRT takes uint8 only as "
                                                "network input/output (export with --target tensorrt)"))
            break
    for tensor in model.graph.input:
        if tensor.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            found.append(Finding(name, "warning", f"input {tensor.name} is int64: TensorRT 10 takes it natively; "
                                                  "older versions cast to int32 (ids < 2^31, harmless here)"))
    return found


INT8_TARGETS = ("tensorrt", "cuda")  # quantization targets whose Q/DQ graphs TensorRT builds INT8 engines from


def quantization_target(info: manifest.Manifest) -> str | None:
    return (info.quantization or {}).get("target")


def int8_not_for_engines(info: manifest.Manifest) -> bool:
    """An INT8 bundle quantized for another target (cpu): TensorRT cannot build engines from its graphs."""
    return info.precision == "int8" and quantization_target(info) not in INT8_TARGETS


def check_bundle(bundle: Path, info: manifest.Manifest | None = None) -> list[Finding]:
    info = info or manifest.read(bundle, verify=False)
    found = []
    for name in ("encoder", "decoder"):
        found += check_graph(bundle / info.graph(name).file, name)
    if info.precision == "fp16":
        found.append(Finding("bundle", "warning", "fp16 bundle: build engines from the fp32 bundle with --fp16 so "
                                                  "TensorRT keeps its own fp32 islands (softmax, norms)"))
    engines = (info.to_dict().get("engines") or {})
    for name, facts in engines.items():
        for problem in profile_problems(info, facts.get("profiles", [])):
            found.append(Finding(name, "error", problem))
    return found


# ---------------------------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class EngineOptions:
    precision: str = "fp16"  # fp16 | int8 (explicit Q/DQ from the TensorRT-flavour INT8 bundle)
    max_audio_seconds: float = 30.0
    opt_audio_seconds: float = 10.0
    max_new_tokens: int = 256
    max_context_tokens: int = 64
    workspace_mib: int = 1024
    timing_cache: str | None = None

    def __post_init__(self):
        if self.precision not in ("fp16", "int8"):
            raise MegaedgeError(f"engine precision {self.precision!r} is not fp16 or int8")
        if not 1 <= self.max_audio_seconds <= 1200:
            raise MegaedgeError(f"--max-audio-seconds {self.max_audio_seconds} is outside 1-1200; long files are "
                                "decoded in 30 s segments, so 30 is enough for files of any length")
        if self.max_new_tokens < 1 or self.workspace_mib < 64:
            raise MegaedgeError(f"--max-new-tokens {self.max_new_tokens} must be >= 1 and --workspace "
                                f"{self.workspace_mib} MiB >= 64")


def audio_tokens(seconds: float) -> int:
    return features.audio_token_count(int(seconds * features.SAMPLE_RATE) // features.HOP)


def prompt_overhead(info: manifest.Manifest, context_tokens: int) -> int:
    p = info.prompt
    return len(p.system_head) + len(p.before_audio) + len(p.after_audio) + 8 + context_tokens  # 8: a language tag


def profiles(info: manifest.Manifest, options: EngineOptions) -> dict[str, list[dict]]:
    """Per graph, TensorRT optimization profiles: {input name: (min, opt, max) shape} for each profile.

    The decoder gets two: prefill (many new positions, short past) and decode (one new position, long past); the
    runtime picks the profile by the step it runs."""
    enc = info.encoder
    frames = int(enc.get("chunk_frames", 100)) * int(enc.get("chunks_per_window", 8))
    windows_max = min(int(enc.get("max_windows_per_call", 16)), math.ceil(options.max_audio_seconds / 8))
    windows_opt = max(1, min(windows_max, math.ceil(options.opt_audio_seconds / 8)))
    mels = features.ASR_MEL_BINS
    encoder = [{"mel": ((1, mels, features.CHUNK_FRAMES), (windows_opt, mels, frames), (windows_max, mels, frames)),
                "valid_tokens": ((1,), (windows_opt,), (windows_max,))}]
    if info.routed:
        encoder[0]["lora_gate"] = ((1,), (1,), (1,))
    dec = info.decoder
    hidden = int(info.graph("decoder").input("audio_features").shape[1])
    overhead = prompt_overhead(info, options.max_context_tokens)
    audio_max, audio_opt = audio_tokens(options.max_audio_seconds), audio_tokens(options.opt_audio_seconds)
    prefill_max = audio_max + overhead + options.max_new_tokens  # streaming prefills committed text too
    kv_max = audio_max + overhead + options.max_new_tokens
    kv = (1, dec["kv_heads"])
    hd = dec["head_dim"]

    def decoder_profile(seq, audio, rows, past):
        profile = {"input_ids": tuple((1, s) for s in seq), "audio_features": tuple((a, hidden) for a in audio),
                   "logits_at": tuple((r,) for r in rows)}
        for name in dec["past_names"]:
            profile[name] = tuple((*kv, p, hd) for p in past)
        if info.routed:
            profile["lora_gate"] = ((1,), (1,), (1,))
        return profile

    prefill = decoder_profile((1, audio_opt + overhead, prefill_max), (0, audio_opt, audio_max),
                              (1, 1, options.max_new_tokens + 1), (0, 0, kv_max - 1))
    decode = decoder_profile((1, 1, 1), (0, 0, 0), (1, 1, 1), (0, audio_opt + overhead + 32, kv_max - 1))
    return {"encoder": encoder, "decoder": [prefill, decode]}


def profile_problems(info: manifest.Manifest, graph_profiles: list[dict]) -> list[str]:
    """Profiles that do not fit the manifest's inputs: unknown or missing names, rank or fixed-size mismatches."""
    problems = []
    if not graph_profiles:
        return ["engine has no optimization profile"]
    for index, profile in enumerate(graph_profiles):
        for graph in ("encoder", "decoder"):
            spec = info.graph(graph)
            if set(profile) <= set(spec.input_names) and set(profile) != set():
                break
        else:
            problems.append(f"profile {index}: inputs {sorted(profile)} match no graph of the bundle")
            continue
        missing = set(spec.input_names) - set(profile)
        if missing:
            problems.append(f"profile {index} ({graph}): no shapes for {sorted(missing)}")
        for name, shapes in profile.items():
            want = spec.input(name).shape
            lo, opt, hi = (tuple(s) for s in shapes)
            if not len(lo) == len(opt) == len(hi) == len(want):
                problems.append(f"profile {index} ({graph}) {name}: rank {len(lo)} but the graph has {len(want)}")
                continue
            for axis, fixed in enumerate(want):
                if isinstance(fixed, int) and fixed > 0 and not lo[axis] == opt[axis] == hi[axis] == fixed:
                    problems.append(f"profile {index} ({graph}) {name}: axis {axis} is fixed at {fixed}")
                if not lo[axis] <= opt[axis] <= hi[axis]:
                    problems.append(f"profile {index} ({graph}) {name}: axis {axis} min/opt/max not ordered")
    return problems


# ---------------------------------------------------------------------------------------------------- memory plan
DEVICES = gpu_plan.DEVICES  # the boards and their usable memory: one table for both plans (assumptions there)
# CUDA context + TensorRT runtime + cuBLAS/cuDNN handles: an assumption, not a measurement (megaedge has not run on
# a Jetson), the onnxruntime plan's CUDA_CONTEXT_MIB plus TensorRT's own runtime.
CUDA_CONTEXT_MIB = 450


@dataclass(frozen=True)
class Plan:
    budget_mib: float
    weights_mib: float
    kv_mib: float
    activations_mib: float
    workspace_mib: float
    context_mib: float
    total_mib: float
    fits: bool
    kv_bytes_per_token: int
    max_kv_tokens: int
    max_audio_seconds: float
    assumptions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _widest_output(path: Path) -> int:
    """Widest MatMul output width from the graph's 2-D weights, without loading them."""
    from megaedge.runtime import onnx_meta

    # onnx_meta, not onnx: `plan` must run on a runtime-only install, which has no onnx package.
    dims = [d for d in onnx_meta.initializer_dims(path) if len(d) == 2]
    if not dims:
        return 1
    vocab = max(d[0] for d in dims)  # the embedding / LM head matrix: its rows are never a live activation
    widths = [max(d) for d in dims if max(d) != vocab]
    return max(widths) if widths else 1


def weight_bytes(bundle: Path, info: manifest.Manifest, precision: str) -> int:
    total = 0
    for name in ("encoder", "decoder"):
        spec = info.graph(name)
        size = sum((bundle / f).stat().st_size for f in (spec.file, *spec.data_files))
        # fp32 ONNX -> fp16 engine halves the weights; int8 (explicit Q/DQ) bundles already hold int8 weights.
        total += size // 2 if (precision == "fp16" and info.precision == "fp32") else size
    return total


def plan(bundle: Path, memory_gib: float, options: EngineOptions = EngineOptions(),
         info: manifest.Manifest | None = None) -> Plan:
    info = info or manifest.read(bundle, verify=False)
    dec = info.decoder
    kv_item = 2  # fp16 KV in engines
    per_token = len(dec["past_names"]) * dec["kv_heads"] * dec["head_dim"] * kv_item
    weights = weight_bytes(bundle, info, options.precision)
    enc_wide = _widest_output(bundle / info.graph("encoder").file)
    dec_wide = _widest_output(bundle / info.graph("decoder").file)
    windows = min(int(info.encoder.get("max_windows_per_call", 16)), math.ceil(options.max_audio_seconds / 8))
    tokens_per_window = features.audio_token_count(int(info.encoder.get("chunk_frames", 100))
                                                   * int(info.encoder.get("chunks_per_window", 8)))
    overhead = prompt_overhead(info, options.max_context_tokens)

    def activations(audio_s: float) -> int:
        # Four live fp16 buffers of the widest layer output: input, output and two residual/attention buffers.
        encoder = windows * tokens_per_window * enc_wide * 2 * 4
        decoder = (audio_tokens(audio_s) + overhead + options.max_new_tokens) * dec_wide * 2 * 4
        return max(encoder, decoder)

    def kv_tokens(audio_s: float) -> int:
        return audio_tokens(audio_s) + overhead + options.max_new_tokens

    fixed = weights + options.workspace_mib * 2**20 + CUDA_CONTEXT_MIB * 2**20
    budget = memory_gib * 2**30
    need = fixed + kv_tokens(options.max_audio_seconds) * per_token + activations(options.max_audio_seconds)
    # The largest KV length: everything else at the chosen audio length, the rest of the budget for KV.
    spare = budget - fixed - activations(options.max_audio_seconds)
    max_kv = max(0, int(spare // per_token))
    longest, low, high = 0.0, 0.0, 3600.0
    for _ in range(40):  # bisection on seconds: the KV and prefill activations grow with audio
        mid = (low + high) / 2
        if fixed + kv_tokens(mid) * per_token + activations(mid) <= budget:
            longest, low = mid, mid
        else:
            high = mid
    mib = 2**20
    return Plan(budget_mib=round(budget / mib, 1), weights_mib=round(weights / mib, 1),
                kv_mib=round(kv_tokens(options.max_audio_seconds) * per_token / mib, 1),
                activations_mib=round(activations(options.max_audio_seconds) / mib, 1),
                workspace_mib=float(options.workspace_mib), context_mib=float(CUDA_CONTEXT_MIB),
                total_mib=round(need / mib, 1), fits=need <= budget, kv_bytes_per_token=per_token,
                max_kv_tokens=max_kv, max_audio_seconds=round(longest, 1),
                assumptions={"kv_dtype": "fp16", "precision": options.precision,
                             "max_new_tokens": options.max_new_tokens, "workspace_mib": options.workspace_mib,
                             "cuda_context_mib": CUDA_CONTEXT_MIB})


# ---------------------------------------------------------------------------------------------------- engines
def engine_facts_problem(facts: dict, trt_version: str, gpu_name: str, compute_capability: str) -> str | None:
    """One line when an engine cannot run here (TensorRT engines are tied to the version and the GPU)."""
    if facts.get("tensorrt_version") != trt_version:
        return (f"engine built with TensorRT {facts.get('tensorrt_version')}, this machine has {trt_version}: "
                "rebuild with megaedge build-engines")
    if facts.get("compute_capability") != compute_capability:
        return (f"engine built for {facts.get('gpu_name')} (sm {facts.get('compute_capability')}), this GPU is "
                f"{gpu_name} (sm {compute_capability}): rebuild with megaedge build-engines")
    return None


def build_engine(onnx_path: Path, out: Path, graph_profiles: list[dict], options: EngineOptions) -> None:
    """Build and save one engine with polygraphy (TensorRT's own tooling); int8 engines take the Q/DQ as given."""
    require("tensorrt", "trt")
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    trt_profiles = []
    for spec in graph_profiles:
        profile = Profile()
        for name, (lo, opt, hi) in spec.items():
            profile.add(name, min=lo, opt=opt, max=hi)
        trt_profiles.append(profile)
    config = CreateConfig(fp16=options.precision == "fp16", int8=options.precision == "int8",
                          profiles=trt_profiles, memory_pool_limits={"workspace": options.workspace_mib * 2**20},
                          load_timing_cache=options.timing_cache)
    SaveEngine(EngineFromNetwork(NetworkFromOnnxPath(str(onnx_path)), config=config,
                                 save_timing_cache=options.timing_cache), path=str(out))()


def gpu_identity() -> tuple[str, str]:
    """(GPU name, compute capability like '8.7') of GPU 0, from nvidia-smi; ('unknown', 'unknown') without one."""
    from megaedge.runtime.machine import nvidia_smi

    out = nvidia_smi("name,compute_cap")
    if out and "," in out:
        name, capability = (part.strip() for part in out.rsplit(",", 1))
        return name, capability
    return "unknown", "unknown"


class TrtSession:
    """A TensorRT engine behind the same interface as OrtSession (feeds checked against the graph spec)."""

    backend = "tensorrt"
    device = "cuda"

    def __init__(self, path: Path, spec: manifest.GraphSpec, facts: dict):
        trt = require("tensorrt", "trt")
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        name, capability = gpu_identity()
        problem = engine_facts_problem(facts, trt.__version__, name, capability)
        if problem:
            raise BundleError(f"{path}: {problem}")
        self.spec = spec
        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(path))))
        self.runner.activate()
        self.output_names = [o.name for o in spec.outputs]
        self.providers = ["TensorRT"]

    def run(self, feed: dict, check: bool = True) -> list[np.ndarray]:
        from megaedge.runtime.session import check_feed

        if check:
            check_feed(self.spec, feed)
        outputs = self.runner.infer(feed)
        return [np.asarray(outputs[name]) for name in self.output_names]

    def run_bound(self, feed: dict, check: bool = True) -> list:
        host = {k: v.numpy() if hasattr(v, "numpy") else v for k, v in feed.items()}
        return [_HostValue(v) for v in self.run(host, check)]


class _HostValue:
    """Wraps a host array like an OrtValue (``.numpy()``), so the transcriber's bound-run loop works unchanged."""

    def __init__(self, value: np.ndarray):
        self.value = value

    def numpy(self) -> np.ndarray:
        return self.value
