"""Prepared copies of a bundle's graphs for THIS machine: onnxruntime's optimized graph with its pre-packed weights.

Creating an onnxruntime CPU session spends most of its time re-arranging weights for the kernels (pre-packing: a
2.3 s of the 1.7B INT8 decoder's 2.8 s) and optimizing the graph, every time a process starts. ``prepare`` runs
that once and saves the result (``session.save_external_prepacked_constant_initializers``); later sessions load the
saved graph with optimizations off and memory-map the pre-packed weights. The packed layout depends on the CPU's
instruction set and on the onnxruntime version, so copies live under a key of both and a copy made elsewhere is
never used. They also record the verified state of the bundle files (size + mtime), so a load after ``prepare``
skips re-hashing gigabytes unless a file changed.

Costs disk: the saved data holds the original weights and the packed ones (about 2x the graph's data).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

from megaedge.errors import MegaedgeError
from megaedge.runtime import machine, manifest

log = logging.getLogger("megaedge.runtime.prepared")

INDEX_FILE = "prepared.json"
PREPARED_GRAPHS = ("encoder", "encoder_body", "decoder", "decoder_prefill")  # the router is small: nothing to gain


def machine_key() -> str:
    import onnxruntime as ort

    flags = machine.cpu_flags()
    digest = hashlib.sha256((" ".join(sorted(flags)) if flags else platform.processor()).encode()).hexdigest()[:10]
    return f"ort{ort.__version__}-{platform.machine()}-{digest}"


def directory(bundle: Path) -> Path:
    return Path(bundle) / manifest.PREPARED_DIR / machine_key()


def _stamps(bundle: Path, info: manifest.Manifest) -> dict:
    out = {}
    for rel in sorted(info.files):
        st = (Path(bundle) / rel).stat()
        out[rel] = [st.st_size, st.st_mtime_ns]
    return out


def _index(bundle: Path) -> dict | None:
    path = directory(bundle) / INDEX_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def verified(bundle: Path, info: manifest.Manifest) -> bool:
    """True when ``prepare`` hashed every bundle file and none changed since (same size and mtime)."""
    index = _index(bundle)
    return bool(index) and index.get("verified") == _stamps(bundle, info)


def _source_key(info: manifest.Manifest, spec: manifest.GraphSpec) -> str:
    """The sha256 of the graph file and its weight files, as the manifest lists them."""
    return "+".join(str(info.files.get(rel)) for rel in (spec.file, *spec.data_files))


def lookup(bundle: Path, info: manifest.Manifest, name: str) -> Path | None:
    """The prepared copy of graph ``name`` made on this machine from the same graph files, if there is one."""
    index = _index(bundle)
    entry = (index or {}).get("graphs", {}).get(name)
    spec = info.graphs.get(name)
    if not entry or spec is None or entry.get("source") != _source_key(info, spec):
        return None
    path = directory(bundle) / entry["file"]
    return path if path.is_file() else None


def prepare(bundle: str | Path, threads: int | None = None) -> dict:
    """Verify the bundle, then save each graph's optimized, pre-packed form for this machine. Returns the index."""
    import onnxruntime as ort

    bundle = Path(bundle).expanduser()
    info = manifest.read(bundle, verify=True)
    target = directory(bundle)
    staging = target.with_name(target.name + ".tmp")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    except OSError as exc:
        raise MegaedgeError(f"{bundle}: cannot write {manifest.PREPARED_DIR}/ there ({exc.strerror}); copy the "
                            f"bundle to a writable directory first") from exc
    index = {"machine_key": machine_key(), "onnxruntime": ort.__version__, "graphs": {}}
    from megaedge.runtime import kernels, native_decode, native_stem

    # A bundle with a native stem has two encoder graphs on one weight file; the runtime here opens one of them.
    skip = set()
    if native_stem.available(info) is None:
        stem_kernels = native_stem.select(bundle, info, "auto", cpu_only=True)
        skip.add("encoder" if stem_kernels is not None else info.encoder["native_stem"]["graph"])
    for name in PREPARED_GRAPHS:
        spec = info.graphs.get(name)
        if spec is None or name in skip:
            continue
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(staging / spec.file)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         f"{spec.file}.data")
        # onnxruntime 1.31 loses the pre-packed form of initializers it keeps inline (the tiny test model's decoder
        # then computes NaN with the default 1024-byte threshold), yet shape constants must stay inline for its
        # shape inference: 64 bytes (8 int64) separates the two. _disagreement() guards against what this misses.
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "64")
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        t0 = time.perf_counter()
        original = ort.InferenceSession(str(bundle / spec.file), options, providers=["CPUExecutionProvider"])
        files = [p for p in staging.iterdir() if p.name.startswith(spec.file)]
        problem = _disagreement(original, staging / spec.file, spec, _probe_feed(info, name), threads)
        if problem:
            log.warning("prepared copy of the %s disagrees with the bundle's graph (%s); not used", name, problem)
            for path in files:
                path.unlink()
            continue
        index["graphs"][name] = {"file": spec.file, "source": _source_key(info, spec),
                                 "bytes": sum(p.stat().st_size for p in files),
                                 "seconds": round(time.perf_counter() - t0, 2)}
        log.info("prepared %s in %.1f s", name, time.perf_counter() - t0)
    if native_decode.available(info) is None:  # the decode-step kernel is per machine too: build it now
        try:
            index["native_kernel"] = kernels.load().isa
        except RuntimeError as exc:
            log.warning("native decode kernel not built (%s): decode steps stay in onnxruntime", exc)
    index["verified"] = _stamps(bundle, info)
    (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return index


def _probe_feed(info: manifest.Manifest, name: str) -> dict:
    """A small valid input for graph ``name``: random mel / token ids, empty KV cache."""
    import numpy as np

    rng = np.random.default_rng(0)
    spec = info.graphs[name]
    feed = {}
    for tensor in spec.inputs:
        dtype = np.dtype(tensor.dtype)
        if tensor.name == "mel":
            feed["mel"] = rng.standard_normal((1, tensor.shape[1], 200)).astype(dtype)
        elif tensor.name == "stem_features":  # what the stem makes of two chunks
            feed["stem_features"] = rng.standard_normal((2, *tensor.shape[1:])).astype(dtype)
        elif tensor.name == "valid_tokens":
            feed["valid_tokens"] = np.array([26], dtype)
        elif tensor.name == "lora_gate":
            feed["lora_gate"] = np.array([1.0], dtype)
        elif tensor.name == "input_ids":
            pad = info.prompt.audio_pad
            feed["input_ids"] = np.array([[t + (t >= pad) for t in rng.integers(0, 1000, 6)]], dtype)
        elif tensor.name == "audio_features":
            feed["audio_features"] = np.zeros((0, tensor.shape[1]), dtype)
        elif tensor.name == "logits_at":
            feed["logits_at"] = np.array([5], dtype)
        else:  # past keys / values: an empty cache
            feed[tensor.name] = np.zeros((1, tensor.shape[1], 0, tensor.shape[3]), dtype)
    return feed


def _disagreement(original, copy: Path, spec: manifest.GraphSpec, feed: dict, threads: int | None) -> str:
    """'' when the prepared copy computes what the original session computes on ``feed``, else what differs."""
    import numpy as np

    from megaedge.runtime.session import OrtSession

    try:
        got = OrtSession(copy, spec, ("cpu",), threads, prepared=True).run(feed, check=False)[0]
    except Exception as exc:  # a copy onnxruntime cannot load is a disagreement, whatever the exception type
        return f"it does not run: {str(exc).splitlines()[0]}"
    want = original.run(None, feed)[0]
    if not np.all(np.isfinite(got)):
        return "non-finite outputs"
    err = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return "" if err <= 1e-4 * max(scale, 1.0) else f"max abs difference {err:.3g} at output scale {scale:.3g}"


def remove(bundle: str | Path) -> bool:
    """Delete this machine's prepared copies (True if there were any)."""
    target = directory(Path(bundle).expanduser())
    if not target.exists():
        return False
    shutil.rmtree(target)
    return True
