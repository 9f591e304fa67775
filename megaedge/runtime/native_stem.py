"""The encoder's convolution stem on the CPU without onnxruntime (kernels/conv_stem.h), then the rest of the
encoder in onnxruntime (``encoder_body.onnx``, the same graph from conv_out on, on the same weight file).

Why: in an INT8 bundle for the CPU the stem stays float in onnxruntime (static per-tensor int8 there cost accuracy:
recipe cpu-fast), and it is half of the encoder's time (1.7B, 30 s, 2-core AVX512 Xeon: ~0.7 of ~1.5 s). The native
form runs its two C -> C convolutions as int8 products with a scale per position and block of 128 channels,
fine enough to stay close to the float stem (tests/runtime/test_native_stem.py measures it), on the prompt
kernels (AMX tiles where the CPU has them).

Used where the bundle has the stem (export/native_stem.py; recipes with ``native_stem``), the providers are the
CPU only and a C compiler builds the kernels; elsewhere the whole ``encoder.onnx`` runs as before.
"""

from __future__ import annotations

import logging

import numpy as np

from megaedge.errors import MegaedgeError
from megaedge.runtime import kernels, manifest

log = logging.getLogger("megaedge.runtime.native_stem")

STEM_INPUT = "stem_features"
STEM_ENGINES = ("auto", "native", "ort")
# Where ``auto`` runs the stem natively: instruction sets with int8 dot products. Without them (AVX2's two-step
# multiply-add, portable C) the int8 stem is slower than onnxruntime's float one; with them several times faster
# (docs/device.md has the timings).
FAST_ISAS = ("avx512-vnni+amx", "avx512-vnni", "arm-dotprod")


def available(info: manifest.Manifest) -> str | None:
    """None when the bundle carries a native stem and its body graph, else why not."""
    stem = info.encoder.get("native_stem")
    if not stem:
        return "the bundle has no native stem (export it with an INT8 recipe for the CPU)"
    if stem.get("graph") not in info.graphs:
        return f"the bundle lists no {stem.get('graph')} graph"
    return None


def select(bundle, info: manifest.Manifest, stem: str, cpu_only: bool) -> kernels.Q8Kernels | None:
    """The kernels that will run the encoder's stem for ``stem`` (auto, native or ort; Transcriber.from_bundle), or
    None for the whole encoder graph in onnxruntime. ``native`` raises when it is not possible."""
    if stem not in STEM_ENGINES:
        raise MegaedgeError(f"stem engine {stem!r} is not one of {STEM_ENGINES}")
    if stem == "ort":
        return None
    reason = available(info) or (None if cpu_only else "it runs on the CPU provider only")
    if reason is None:
        try:
            loaded = kernels.load()
        except RuntimeError as exc:
            reason = f"the native kernel cannot be built here: {exc}"
        else:
            if stem == "native" or loaded.isa in FAST_ISAS:
                return loaded
            reason = f"the kernels here are {loaded.isa}, without int8 dot products (use --stem native to force)"
    if stem == "native":
        raise MegaedgeError(f"{bundle}: --stem native is not possible: {reason}; use --stem ort")
    log.info("encoder stem in onnxruntime: %s", reason)
    return None


class NativeStem:
    """The bundle's stem weights and the kernels that run them; ``run(mel)`` gives what conv_out reads."""

    def __init__(self, bundle, info: manifest.Manifest, kernel: kernels.Q8Kernels, threads: int):
        stem = info.encoder["native_stem"]
        names = ("w1", "b1", "w2", "s2", "b2", "w3", "s3", "b3")
        arrays = manifest.load_npz(bundle / stem["file"], names)
        fields = {name: np.ascontiguousarray(arrays[name]) for name in names}
        self.weights = kernels.StemWeights(**fields, block=int(stem["block"]), bins=int(stem["bins"]),
                                           chunk_frames=int(stem["chunk_frames"]))
        self.graph = stem["graph"]
        self.kernel, self.threads = kernel, threads

    def run(self, mel: np.ndarray) -> np.ndarray:
        """mel [windows, bins, chunks * frames] -> stem features [windows * chunks, steps, channels * bins / 8]."""
        return self.kernel.conv_stem(mel, self.weights, self.threads)
