"""Memory plan of a fixed-KV bundle (``--target cuda``) on onnxruntime's CUDA provider: weights + one fixed KV
buffer per concurrent stream + activations + the CUDA context, against a Jetson's or a card's usable memory.

Unlike TensorRT engines (runtime/tensorrt.py), nothing here grows with the input: every stream holds KV buffers of
``decoder.max_kv_length`` positions from its first call, so the plan is exact in the KV term and says how many
streams fit; the longest input is the buffer's length in positions, not a memory question. A decoder graph with a
batch axis keeps the buffers in banks of streams side by side (runtime/fixed_kv.py: that is what lets concurrent
streams step in one run), and a GPU allocates a bank whole, doubling what it holds up to banks of ``batch_steps``:
the KV term counts whole banks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megaedge.runtime import features, fixed_kv, manifest

# Usable memory (GiB) for the model process: the board's RAM (shared by CPU and GPU on a Jetson) less what a
# headless JetPack 6 and its services hold (~1.2 GiB on an 8 GB board; assumed ~1.0 GiB on a 4 GB one, ~1.5 GiB on
# the larger boards). Assumptions, not measurements: megaedge has not run on a Jetson.
DEVICES = {
    "orin-nano-4gb": {"total_gib": 3.4, "usable_gib": 2.4},
    "orin-nano-8gb": {"total_gib": 7.4, "usable_gib": 6.0},
    "orin-nx-8gb": {"total_gib": 7.4, "usable_gib": 6.0},
    "orin-nx-16gb": {"total_gib": 15.3, "usable_gib": 13.8},
    "orin-agx-32gb": {"total_gib": 30.0, "usable_gib": 28.5},
    "orin-agx-64gb": {"total_gib": 61.0, "usable_gib": 59.5},
    "gpu-8gb": {"total_gib": 8.0, "usable_gib": 7.4},
}
# CUDA context, cuBLAS / cuDNN handles and onnxruntime's CUDA provider (the TensorRT plan's figure less TensorRT's
# runtime) plus the graph pools the captured step graphs keep.
CUDA_CONTEXT_MIB = 400
GRAPH_MIB = 16  # per captured step graph: its kernel nodes and scratch (the step's activations are counted apart)


@dataclass(frozen=True)
class GpuPlan:
    budget_mib: float
    weights_mib: float
    kv_mib_per_stream: float
    streams: int
    activations_mib: float
    context_mib: float
    total_mib: float
    fits: bool
    max_streams: int  # streams that fit the budget beside weights, activations and context
    max_kv_length: int
    bank_slots: int = 1  # streams whose KV buffers are allocated together (batched steps)
    kv_slots: int = 1  # KV buffer sets allocated for ``streams``: whole banks
    assumptions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _graph_bytes(bundle: Path, spec) -> int:
    return sum((bundle / f).stat().st_size for f in (spec.file, *spec.data_files))


def _max_streams(room: float, kv: int, bank: int) -> int:
    """The most streams whose whole banks fit ``room`` bytes: every slot of the banks that fit."""
    held = 0
    while True:
        grown = held + fixed_kv.next_bank(held, bank, full=False)
        if grown * kv > room:
            return held
        held = grown


def plan(bundle: Path, memory_gib: float, streams: int = 1, max_audio_seconds: float = 30.0,
         info: manifest.Manifest | None = None, batch_steps: int = 8) -> GpuPlan:
    """The memory a fixed-KV bundle needs with ``streams`` concurrent calls or streams, each encoding up to
    ``max_audio_seconds`` at a time, against ``memory_gib``; ``batch_steps``: the runtime option of that name."""
    info = info or manifest.read(bundle, verify=False)
    dec = info.decoder
    if not fixed_kv.is_fixed(dec):
        raise ValueError(f"{bundle}: not a fixed-KV bundle (export with --target cuda)")
    mib = 2**20
    # Every graph the GPU session loads holds its weights there; the VAD runs on the CPU.
    weights = sum(_graph_bytes(bundle, spec) for name, spec in info.graphs.items() if name != "vad")
    kv = fixed_kv.kv_bytes(dec)
    bank = fixed_kv.bank_slots(info.graph("decoder").input(dec["past_names"][0]).shape, batch_steps)
    slots = fixed_kv.slots_for(streams, bank, "cuda")
    item = 2 if dec["kv_dtype"] == "float16" else 4
    # The encoder's live buffers: windows of a call x tokens x the widest layer (4 x hidden in its MLP), x4 for
    # input, output and two residual / attention buffers; attention scores per window and head in fp32.
    windows = min(int(info.encoder.get("max_windows_per_call", 16)), math.ceil(max_audio_seconds / 8))
    tokens = features.audio_token_count(int(info.encoder.get("chunk_frames", 100))
                                        * int(info.encoder.get("chunks_per_window", 8)))
    width = int(info.encoder.get("output_dim", dec["hidden_size"]))
    encoder = windows * tokens * 4 * width * item * 4 + windows * 16 * tokens * tokens * 4
    # The prompt: every prompt row through the decoder's widest layer (its MLP, ~3 x hidden in Qwen3) and one
    # fp32 logits row; a step is one row of the same.
    prompt_rows = math.ceil(max_audio_seconds * 13 / 2) + 64
    decoder = prompt_rows * 3 * dec["hidden_size"] * item * 4 + dec["vocab_size"] * 4 * 2
    activations = max(encoder, decoder) + min(streams, fixed_kv.MAX_GRAPHS) * GRAPH_MIB * mib
    context = CUDA_CONTEXT_MIB * mib
    budget = memory_gib * 2**30
    total = weights + slots * kv + activations + context
    room = budget - weights - activations - context
    return GpuPlan(budget_mib=round(budget / mib, 1), weights_mib=round(weights / mib, 1),
                   kv_mib_per_stream=round(kv / mib, 1), streams=streams,
                   activations_mib=round(activations / mib, 1), context_mib=float(CUDA_CONTEXT_MIB),
                   total_mib=round(total / mib, 1), fits=total <= budget,
                   max_streams=_max_streams(room, kv, bank), max_kv_length=int(dec["max_kv_length"]),
                   bank_slots=bank, kv_slots=slots,
                   assumptions={"kv_dtype": dec["kv_dtype"], "cuda_context_mib": CUDA_CONTEXT_MIB,
                                "max_audio_seconds": max_audio_seconds,
                                "weights": (info.quantization or {}).get("weights") or info.precision})
