"""The decoder of a weight-only INT8 bundle on the CPU without onnxruntime: one call per token into megaedge's own C
kernels (runtime/kernels.py, assets/kernels/decoder.c), which run every layer's products, norms, rotary embedding,
attention and SwiGLU and the LM head with one thread team, and one call per prompt chunk (``prefill``).

Why: one decode step reads every decoder weight once, so its speed is the speed of reading ~1.8 GB (1.7B). The
int8 kernels of onnxruntime (MatMulNBits, MatMulInteger) and OpenVINO read at most ~60 % of a 2-core machine's
bandwidth at one row (benchmarks/results/gemv_bandwidth*.json); the native kernel keeps several read streams in
flight per core, and doing the small per-layer work in C too keeps it from costing a quarter of the step, as it did
as numpy calls. A prompt is a matrix product instead, compute-bound: the kernel runs it several rows per weight load,
which beats onnxruntime's MatMulNBits there too (benchmarks/prompt_rows.py). ``start`` still takes over a KV cache
onnxruntime prefilled (``--prefill ort``).

The weights are the bundle's own MatMulNBits bytes (export's native index, ``manifest.decoder["native"]``), so
nothing is converted or duplicated on disk. The arithmetic is the graph's: RMS norms, q/k norms, rotary embedding
from the graph's own inverse frequencies, grouped-query attention over an fp32 cache (or an fp16 one,
``kv_cache``), SwiGLU; activations are quantized per block as MatMulNBits does at accuracy level 4, so tokens agree
with onnxruntime's (tests/runtime/test_native_decode.py holds them to it). A routed bundle's gated low-rank
branches run too (assets/kernels/lora.h), the route a per-call argument, so one set of weights serves both routes
and streams on either route step in one batch.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from megaedge.errors import MegaedgeError
from megaedge.runtime import kernels, manifest, options
from megaedge.runtime.batching import step_ready

log = logging.getLogger("megaedge.runtime.native_decode")
PROJECTIONS = manifest.NATIVE_PROJECTIONS
# Rows per prefill call: its scratch (activations of every row, ~110 KiB a row at 1.7B) stays near 60 MiB, and a
# chunk is long enough that reading the weights once per chunk costs little next to its products.
PREFILL_CHUNK = 512
KV_CACHES = {name: np.dtype(name).type for name in options.KV_CACHES}  # float16: attention.h's kv_half


class _Arena:
    """One anonymous mapping carved into the in-memory copies of the weights (or a decoder's caches), advised to Linux
    as one that may be backed by 2 MiB pages (``MADV_HUGEPAGE``; most kernels, Jetson's included, grant transparent
    huge pages only where asked).

    Why: a decode step streams every weight once, 1.8 GB at 1.7B. In 4 KiB pages that is ~430,000 pages a step,
    each a TLB miss and a page walk, and the hardware prefetchers stop at every page boundary; in 2 MiB pages the
    same read crosses ~900. One mapping for all of them, not one per tensor, because only the whole 2 MiB ranges
    inside a mapping can be huge pages (so per-tensor maps would lose a page at each end of every tensor) and a
    huge page is never shared by two mappings. Where the platform has no such advice this is plain memory."""

    ALIGN = 64  # every tensor starts on a cache line
    HUGE_PAGES = True  # benchmarks/batched_decode.py --compare-small-pages times the same memory without the advice

    def __init__(self, nbytes: int):
        self.size = max(nbytes, 1)
        if not hasattr(mmap, "MAP_PRIVATE"):  # Windows
            self.memory = np.empty(self.size, np.uint8)
        else:  # private: a shared anonymous map is shmem, whose huge pages are a separate, mostly disabled, setting
            region = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if self.HUGE_PAGES and hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    region.madvise(mmap.MADV_HUGEPAGE)
                except OSError:  # a kernel built without transparent huge pages
                    pass
            self.memory = np.frombuffer(region, np.uint8)  # its views keep the map alive
        self.used = 0

    @classmethod
    def room(cls, nbytes: int) -> int:
        return -(-nbytes // cls.ALIGN) * cls.ALIGN

    def take(self, nbytes: int) -> np.ndarray:
        if self.used + nbytes > self.size:
            raise MegaedgeError(f"native decoder: {nbytes} more bytes do not fit the {self.size} counted")
        part = self.memory[self.used : self.used + nbytes]
        self.used += self.room(nbytes)
        return part


@dataclass(frozen=True)
class Linear:
    weight: np.ndarray  # uint8 [N, blocks, block] (value + 128); packed: the kernels' layout of whole groups
    scales: np.ndarray  # float32 [N, blocks]; packed: as the kernels' layout orders them
    k: int
    lora_a: np.ndarray | None = None  # a routed decoder's branch: float32 [k, rank] and [rank, N]
    lora_b: np.ndarray | None = None
    packed: int = 0  # rows per group of the kernels' packed layout (Q8Kernels.pack), 0: the row layout
    shape: tuple[int, int, int] | None = None  # (N, blocks, block) where ``weight`` is packed

    @property
    def n(self) -> int:
        return (self.shape or self.weight.shape)[0]

    @property
    def blocks(self) -> int:
        return (self.shape or self.weight.shape)[1]

    @property
    def block(self) -> int:
        return (self.shape or self.weight.shape)[2]


@dataclass(frozen=True)
class Layer:
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    gate: Linear
    up: Linear
    down: Linear
    input_norm: np.ndarray
    post_norm: np.ndarray
    q_norm: np.ndarray
    k_norm: np.ndarray


class _Tensors:
    """Tensor references of the index -> arrays: memory-mapped slices of data files, or sidecar arrays."""

    def __init__(self, bundle: Path):
        self.bundle = bundle
        self._maps: dict[str, np.memmap] = {}
        self._sidecars: dict[str, dict] = {}

    def read(self, ref: dict, arena: _Arena) -> np.ndarray:
        """A private in-memory copy in ``arena``, read with plain file reads: the file's pages stay in the page
        cache instead of also counting in this process's resident memory, as touched pages of a map would."""
        if "key" in ref:
            return self(ref).copy()
        data = arena.take(ref["length"])
        self.read_into(ref["file"], ref["offset"], data)
        return data.view(ref["dtype"]).reshape(ref["shape"])

    def read_into(self, file: str, offset: int, out: np.ndarray) -> None:
        """``out.nbytes`` bytes of the bundle's ``file`` from ``offset`` into ``out``, with plain reads."""
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        with open(self.bundle / file, "rb", buffering=0) as f:
            f.seek(offset)
            while done < len(view):  # one read returns at most ~2 GiB on Linux
                got = f.readinto(view[done:])
                if not got:
                    raise MegaedgeError(f"{file}: ends before byte {offset + len(view)}; the bundle is truncated: "
                                        "export it again")
                done += got

    def __call__(self, ref: dict) -> np.ndarray:
        dtype, shape = np.dtype(ref["dtype"]), tuple(ref["shape"])
        if "key" in ref:
            file = ref["file"]
            if ref["key"] not in self._sidecars.setdefault(file, {}):  # only the arrays the index names are read
                self._sidecars[file].update(manifest.load_npz(self.bundle / file, [ref["key"]]))
            return np.ascontiguousarray(self._sidecars[file][ref["key"]], dtype).reshape(shape)
        if ref["file"] not in self._maps:
            self._maps[ref["file"]] = np.memmap(self.bundle / ref["file"], np.uint8, mode="r")
        start = ref["offset"]
        return self._maps[ref["file"]][start : start + ref["length"]].view(dtype).reshape(shape)


def _linear(tensors: _Tensors, entry: dict, arena: _Arena | None = None) -> Linear:
    """One projection: copied into ``arena`` when given, else slices of the file map."""
    get = tensors if arena is None else (lambda ref: tensors.read(ref, arena))
    n = entry["n"]
    weight = get(entry["weight"]).reshape(n, -1, entry["block"])
    scales = get(entry["scales"]).reshape(n, weight.shape[1])
    if scales.dtype != np.float32:
        scales = scales.astype(np.float32)
    return Linear(weight, scales, entry["k"], **_branch(get, entry))


def _branch(get, entry: dict) -> dict:
    """A routed projection's LoRA factors as Linear's fields (none where it has no branch), read with ``get``."""
    branch = entry.get("lora")
    if branch is None:
        return {}
    rank = branch["rank"]
    a, b = (np.ascontiguousarray(get(branch[key]), np.float32) for key in ("a", "b"))
    return {"lora_a": a.reshape(entry["k"], rank), "lora_b": b.reshape(rank, entry["n"])}


PACK_CHUNK = 16 << 20  # bytes of rows read at a time where the kernels repack them


def _packed_bytes(entry: dict, lanes: int) -> int:
    """Arena bytes of one projection packed in groups of ``lanes`` rows: weights, scales, a branch's factors."""
    rows = -(-entry["n"] // lanes) * lanes
    blocks = -(-entry["k"] // entry["block"])
    refs = [entry["lora"][key] for key in ("a", "b") if entry.get("lora") and "key" not in entry["lora"][key]]
    return (_Arena.room(rows * blocks * entry["block"]) + _Arena.room(rows * blocks * 4)
            + sum(_Arena.room(ref["length"]) for ref in refs))


def _packed_linear(tensors: _Tensors, entry: dict, arena: _Arena, lanes: int, kernels) -> Linear:
    """One projection in ``arena`` in the kernels' packed layout: rows read from the file a chunk at a time and
    repacked by the kernels into their place."""
    n, block, wref, sref = entry["n"], entry["block"], entry["weight"], entry["scales"]
    blocks = -(-entry["k"] // block)
    row_bytes, groups = blocks * block, -(-n // lanes)
    weight = arena.take(groups * lanes * row_bytes)
    scales = arena.take(groups * lanes * blocks * 4).view(np.float32)
    whole = "key" in wref or "key" in sref  # a test bundle's sidecar arrays: in memory already
    rows = n if whole else max(lanes, PACK_CHUNK // row_bytes // lanes * lanes)
    chunk_w = np.empty((rows, blocks, block), np.uint8)
    chunk_s = np.empty((rows, blocks), sref["dtype"])
    for first in range(0, n, rows):
        count = min(rows, n - first)
        if whole:
            chunk_w[:], chunk_s[:] = tensors(wref).reshape(n, blocks, block), tensors(sref).reshape(n, blocks)
        else:
            tensors.read_into(wref["file"], wref["offset"] + first * row_bytes, chunk_w[:count])
            tensors.read_into(sref["file"], sref["offset"] + first * chunk_s[0].nbytes, chunk_s[:count])
        at = first // lanes * lanes  # a chunk is whole groups
        kernels.pack(chunk_w[:count], np.ascontiguousarray(chunk_s[:count], np.float32), weight[at * row_bytes :],
                     scales[at * blocks :])
    return Linear(weight, scales, entry["k"], packed=lanes, shape=(n, blocks, block),
                  **_branch(lambda ref: tensors.read(ref, arena), entry))


def _refs(entry: dict) -> list[dict]:
    """The file tensors of one projection's index entry (weights, scales, a branch's factors)."""
    refs = [entry["weight"], entry["scales"]] + [entry["lora"][key] for key in ("a", "b") if entry.get("lora")]
    return [ref for ref in refs if "key" not in ref]


def available(info: manifest.Manifest) -> str | None:
    """None when the bundle's decode step can run natively, else why not."""
    index = info.decoder.get("native")
    if index is None:
        return "the bundle has no native decode index (only weight-only INT8 bundles, megaedge export --int8, have one)"
    if index.get("format") != "matmulnbits-q8":
        return f"native index format {index.get('format')!r} is not known to this megaedge"
    if info.routed and not any(layer[name].get("lora") is not None for layer in index["layers"]
                               for name in PROJECTIONS):
        return "the routed bundle's index has no LoRA branches"
    for layer in index["layers"]:  # products of one input share one quantized activation
        if len({layer[name]["block"] for name in ("q", "k", "v")}) > 1 or layer["gate"]["block"] != layer["up"]["block"]:
            return "projections of one input are quantized with different block sizes"
    return None


class _Weights:
    """The decoder's weights, shared by every NativeDecoder spawned from one load and never written after it, but
    for the one change-over from the file map to the in-memory copy (``NativeDecoder`` docstring), which replaces
    whole lists: a reader sees either the old or the new list, both valid for as long as it holds them."""

    def __init__(self, bundle: Path, info: manifest.Manifest, in_memory: bool, kernels=None):
        index = self.index = info.decoder["native"]
        # the layout each block size is kept in: packed where the kernels read packed weights (Q8Kernels.pack)
        blocks = {layer[name]["block"] for layer in index["layers"] for name in PROJECTIONS}
        blocks.add(index["lm_head"]["block"])
        self.lanes = {block: kernels.pack_lanes(block) if kernels is not None and in_memory else 0
                      for block in blocks}
        self._kernels = kernels
        tensors = self.tensors = _Tensors(bundle)
        self.layers = [Layer(**{name: _linear(tensors, entry[name]) for name in PROJECTIONS},
                             **{name: tensors(entry[name]).astype(np.float32)
                                for name in ("input_norm", "post_norm", "q_norm", "k_norm")})
                       for entry in index["layers"]]
        self.lm_head = _linear(tensors, index["lm_head"])
        self.final_norm = tensors(index["final_norm"]).astype(np.float32)
        self.inv_freq = tensors(index["inv_freq"]).astype(np.float32).reshape(-1)
        emb = index["embedding"]
        self.embedding = tensors(emb["weight"])
        self.embedding_scales = tensors(emb["scales"]) if emb["kind"] == "q8" else None
        if self.embedding_scales is not None:
            rows = self.embedding.shape[0]
            self.embedding = self.embedding.reshape(rows, -1, self.embedding.shape[-1])
            self.embedding_scales = self.embedding_scales.reshape(rows, -1).astype(np.float32)
        self.load_seconds = 0.0
        self.loader = threading.Thread(target=self._load_in_memory, name="megaedge-native-load", daemon=True)
        if in_memory:
            self.loader.start()

    def _load_in_memory(self) -> None:
        t0 = time.perf_counter()
        entries = [entry[name] for entry in self.index["layers"] for name in PROJECTIONS] + [self.index["lm_head"]]
        lanes = lambda entry: self.lanes[entry["block"]]  # noqa: E731
        arena = _Arena(sum(_packed_bytes(entry, lanes(entry)) if lanes(entry) else
                           sum(_Arena.room(ref["length"]) for ref in _refs(entry)) for entry in entries))

        def read(entry: dict) -> Linear:
            if lanes(entry):
                return _packed_linear(self.tensors, entry, arena, lanes(entry), self._kernels)
            return _linear(self.tensors, entry, arena)

        layers = [replace(layer, **{name: read(entry[name]) for name in PROJECTIONS})
                  for layer, entry in zip(self.layers, self.index["layers"])]
        self.lm_head, self.layers = read(self.index["lm_head"]), layers
        self.load_seconds = time.perf_counter() - t0
        log.info("decoder weights in memory in %.2f s", self.load_seconds)

    def suits(self, kernels) -> bool:
        """Whether ``kernels`` read these weights in the layout they are kept in."""
        return all(lanes in (0, kernels.pack_lanes(block)) for block, lanes in self.lanes.items())

    @property
    def loading(self) -> bool:
        return self.loader.is_alive()

    def wait_loaded(self) -> None:
        if self.loader.is_alive():
            self.loader.join()


class NativeDecoder:
    """One decoder state (KV cache, its length, the C view of weights and cache) over weights shared with every
    decoder ``spawn``-ed from it. A NativeDecoder is used by one thread at a time; a shared Transcriber spawns one
    per call and per stream, so concurrent calls never share a cache.

    With ``in_memory`` the projection weights are copied from the memory map into anonymous memory by a background
    thread started here, while the caller encodes and prefills; the first ``step`` waits for it. Why: a file map
    is read through 4 KiB pages, anonymous memory through 2 MiB pages (numpy asks for transparent huge pages), and
    a decode step reads every projection weight once per token.

    ``kv_cache``: the type of the keys and values kept (``float32``, the graphs' own; ``float16``: half the memory
    a position holds and half the bytes a step's attention reads, values rounded to nearest and clamped to the
    half range; the logits move by about the rounding of the values, attention.h)."""

    def __init__(self, bundle: Path, info: manifest.Manifest, kernels, threads: int | None = None,
                 in_memory: bool = True, kv_cache: str = "float32", _weights: _Weights | None = None):
        reason = available(info)
        if reason:
            raise MegaedgeError(f"{bundle}: cannot decode natively: {reason}")
        if kv_cache not in KV_CACHES:
            raise MegaedgeError(f"kv_cache {kv_cache!r} is not one of {sorted(KV_CACHES)}; e.g. float16 to halve "
                                "the cache")
        self.kv_cache, self._kv_dtype = kv_cache, KV_CACHES[kv_cache]
        self.bundle, self.info = bundle, info
        if _weights is not None and not _weights.suits(kernels):
            raise MegaedgeError(f"{kernels.path.name} reads its weights in another layout than the shared ones; "
                                "load them for it")
        self._w = _weights or _Weights(bundle, info, in_memory, kernels)
        index = self._w.index
        self.kernels, self.threads = kernels, threads or 1
        self.heads, self.kv_heads, self.head_dim = index["heads"], index["kv_heads"], index["head_dim"]
        self.hidden, self.eps, self.scaling = index["hidden"], float(index["eps"]), float(index["scaling"])
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.length = 0
        self._model: kernels.ModelStruct | None = None
        self._model_in_memory = False

    @property
    def layers(self) -> list[Layer]:
        return self._w.layers

    @property
    def lm_head(self) -> Linear:
        return self._w.lm_head

    @property
    def load_seconds(self) -> float:
        return self._w.load_seconds

    def wait_loaded(self) -> None:
        self._w.wait_loaded()

    # ------------------------------------------------------------------------------------------- cache
    def start(self, presents: list[np.ndarray], max_new_tokens: int) -> None:
        """Take over the cache of a prefill: ``presents`` alternate key, value per layer, [1, kv_heads, P, dim]."""
        self.wait_loaded()
        positions = presents[0].shape[2]
        capacity = positions + max_new_tokens + 1
        self.keys, self.values = self._caches(capacity)
        for i in range(len(self.layers)):
            self.keys[i][:, :positions] = self._cache_values(presents[2 * i][0])
            self.values[i][:, :positions] = self._cache_values(presents[2 * i + 1][0])
        self.length = positions
        self._model, self._model_in_memory = self._model_struct(), True

    def _caches(self, capacity: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Zeroed keys and values of every layer for ``capacity`` positions, in one mapping that may be backed by
        huge pages (``_Arena``): every step reads all of them, as it reads the weights."""
        shape = (self.kv_heads, capacity, self.head_dim)
        nbytes = int(np.prod(shape)) * np.dtype(self._kv_dtype).itemsize
        arena = _Arena(2 * len(self.layers) * _Arena.room(nbytes))
        buffers = [arena.take(nbytes).view(self._kv_dtype).reshape(shape) for _ in range(2 * len(self.layers))]
        return buffers[0::2], buffers[1::2]

    def _cache_values(self, present: np.ndarray) -> np.ndarray:
        """Values of an onnxruntime cache as this decoder keeps them: a float16 cache rounds them to nearest and
        clamps them to +-65504, as the kernels store their own (attention.h: me_half)."""
        if self._kv_dtype is np.float32:
            return present
        limit = float(np.finfo(np.float16).max)
        return np.clip(present, -limit, limit).astype(np.float16)

    # ------------------------------------------------------------------------------------------- step
    def _model_struct(self) -> kernels.ModelStruct:
        """The C view of the weights and caches; pointers into arrays this object keeps alive."""
        structs = self.kernels.structs  # this library's revision of them

        def linear(item: Linear):
            fields = (item.weight.ctypes.data, item.scales.ctypes.data, item.n, item.k, item.blocks, item.block)
            return structs.Linear(*fields, item.packed) if self.kernels.abi >= 10 else structs.Linear(*fields)

        weights, head = self._w.layers, self._w.lm_head  # one consistent set (see _Weights)
        layers = (structs.Layer * len(weights))()
        for layer, struct, keys, values in zip(weights, layers, self.keys, self.values):
            for name in PROJECTIONS:
                setattr(struct, name, linear(getattr(layer, name)))
            for name in ("input_norm", "post_norm", "q_norm", "k_norm"):
                setattr(struct, name, getattr(layer, name).ctypes.data)
            struct.keys, struct.values = keys.ctypes.data, values.ctypes.data
        first = weights[0]
        branches = None
        if any(getattr(layer, name).lora_a is not None for layer in weights for name in PROJECTIONS):
            branches = (structs.Lora * (len(weights) * len(PROJECTIONS)))()
            slots = iter(branches)
            for layer in weights:
                for name in PROJECTIONS:
                    item, slot = getattr(layer, name), next(slots)
                    if item.lora_a is not None:
                        slot.a, slot.b = item.lora_a.ctypes.data, item.lora_b.ctypes.data
                        slot.rank = item.lora_a.shape[1]
        model = structs.Model(len(weights), self.hidden, self.heads, self.kv_heads, self.head_dim,
                              first.gate.n, self.keys[0].shape[1], head.n, self.eps, self.scaling,
                              layers, linear(head), self._w.final_norm.ctypes.data, branches, 0.0,
                              int(self._kv_dtype is np.float16))
        # What the struct points at must live as long as it: the C arrays, and the weights and caches they name.
        model._keep = (layers, branches, weights, head, list(self.keys), list(self.values))
        return model

    def _routed(self, gate: float | None) -> None:
        """This decoder's next call on ``gate``'s route (a routed bundle: None or 1 the LoRA, 0 the base)."""
        self._model.lora_gate = 1.0 if gate is None else float(gate)

    def embed(self, token: int) -> np.ndarray:
        return self.embed_rows(np.array([token]))[0]

    def embed_rows(self, ids: np.ndarray) -> np.ndarray:
        """Embeddings of ``ids``: float32 [len(ids), hidden] (the 8-bit table dequantized row by row)."""
        table, scales = self._w.embedding, self._w.embedding_scales
        if scales is None:
            return np.array(table[ids], np.float32)
        rows = (table[ids].astype(np.float32) - 128.0) * scales[ids][:, :, None]
        return np.ascontiguousarray(rows.reshape(len(ids), -1)[:, : self.hidden])

    def spawn(self) -> NativeDecoder:
        """Another decoder over the same weights with a cache of its own (a call's or a stream's)."""
        return NativeDecoder(self.bundle, self.info, self.kernels, self.threads, kv_cache=self.kv_cache,
                             _weights=self._w)

    def rows_for(self, ids: list[int], audio: np.ndarray, audio_token: int) -> np.ndarray:
        """Embeddings of ``ids`` with the i-th ``audio_token`` taking row i of ``audio`` [A, hidden] (the decoder
        graph's merge): float32 [len(ids), hidden]."""
        ids_array = np.asarray(ids, np.int64)
        is_audio = ids_array == audio_token
        if int(is_audio.sum()) != len(audio):
            raise MegaedgeError(f"native prefill: {int(is_audio.sum())} audio placeholders for {len(audio)} audio rows")
        x = self.embed_rows(ids_array)
        x[is_audio] = audio
        return x

    def prefill(self, prompt_ids: list[int], audio: np.ndarray, audio_token: int, max_new_tokens: int,
                gate: float | None = None) -> np.ndarray:
        """Logits [vocab] after the whole prompt, run natively from an empty cache: the i-th ``audio_token`` of the
        prompt takes row i of ``audio`` [A, hidden] (the decoder graph's merge). Leaves the cache ready for
        ``max_new_tokens`` steps. Prompts run in chunks of PREFILL_CHUNK rows, which bounds the scratch memory.
        ``gate``: a routed bundle's route (None or 1: the LoRA, 0: the base); merged bundles ignore it."""
        x = self.rows_for(prompt_ids, audio, audio_token)
        self.keys, self.values, self.length = [], [], 0
        # The weights there are now: the file map while the background read runs, so the prompt need not wait for
        # it; the first step changes over to the copy in memory.
        self._model_in_memory = not self._w.loading
        self._reserve(len(prompt_ids) + max_new_tokens + 1)
        return self.extend(x, gate=gate)[0]

    def rewind(self, length: int) -> None:
        """Forget the positions from ``length`` on (the next rows are written there): a stream drops a hop's
        uncommitted tail this way, without copying any cache."""
        if not 0 <= length <= self.length:
            raise MegaedgeError(f"native decoder: cannot rewind to {length} of {self.length} positions")
        self.length = length

    def _reserve(self, positions: int) -> None:
        """Caches for at least ``positions`` positions, keeping the ones held (grown by doubling: a stream's span
        grows a hop at a time)."""
        have = self.keys[0].shape[1] if self.keys else 0
        if positions <= have:
            return
        capacity = max(positions, 2 * have, 64)
        grown = self._caches(capacity)
        for new, old in zip(grown, (self.keys, self.values)):
            for buffer, kept in zip(new, old):
                buffer[:, : self.length] = kept[:, : self.length]
        self.keys, self.values = grown
        self._model = self._model_struct()

    def extend(self, x: np.ndarray, logit_rows: int = 1, gate: float | None = None) -> np.ndarray:
        """Rows x [rows, hidden] (embeddings, see ``rows_for``) appended at the next positions; returns the logits
        [logit_rows, vocab] of the last ``logit_rows`` rows (0: none). Runs in chunks of PREFILL_CHUNK rows."""
        rows = len(x)
        if not 0 <= logit_rows <= rows:
            raise MegaedgeError(f"native prefill: logits of {logit_rows} rows asked of {rows} rows")
        self._reserve(self.length + rows + 1)
        start = self.length
        angles = np.arange(start, start + rows, dtype=np.float32)[:, None] * self._w.inv_freq[None, :]  # as step()
        angles = np.concatenate([angles, angles], axis=1)
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        logits = np.empty((logit_rows, self.lm_head.n), np.float32)
        first_logit = rows - logit_rows  # row of logits[0]
        self._routed(gate)
        for lo in range(0, rows, PREFILL_CHUNK):
            hi = min(lo + PREFILL_CHUNK, rows)
            wanted = max(0, hi - max(lo, first_logit))  # the chunk's last rows whose logits were asked for
            out = logits[hi - wanted - first_logit : hi - first_logit] if wanted else logits[:0]
            self.kernels.prefill(self._model, np.array(x[lo:hi], np.float32), start + lo,  # a copy: overwritten
                                 np.ascontiguousarray(cos[lo:hi]), np.ascontiguousarray(sin[lo:hi]), out,
                                 self.threads, wanted)
            self.length = start + hi
        return logits

    def step(self, token: int, gate: float | None = None) -> np.ndarray:
        """Logits [vocab] after appending ``token`` at the next position (``gate``: as for ``prefill``)."""
        pos = self._ready_for_step()
        cos, sin = self._rotary(pos)
        logits = np.empty(self.lm_head.n, np.float32)
        self._routed(gate)
        self.kernels.decode_step(self._model, self.embed(token), pos, cos, sin, logits, self.threads)
        self.length = pos + 1
        return logits

    @property
    def batch_key(self):
        """Decoders whose steps may share a kernel call (runtime/batching.py): those over one set of weights."""
        return self._w

    @staticmethod
    def step_many(decoders: list[NativeDecoder], tokens: list[int], gates: list[float | None]) -> tuple[list, list]:
        """runtime/batching.py's call: (each decoder's logits, or the error of one that cannot step, which then
        fails alone; [steps of the one kernel call made])."""
        def one_call(ready, tokens, gates, calls):
            calls.append(len(ready))
            return step_batch(ready, tokens, gates)

        return step_ready(decoders, tokens, gates, lambda d: d._ready_for_step(), one_call)

    def _ready_for_step(self) -> int:
        """The position the next step writes, with the in-memory weights and a cache that has room for it."""
        if self._model is None:
            raise MegaedgeError("native decoder: start() with a prefill's cache before step()")
        if not self._model_in_memory:
            self.wait_loaded()
            self._model, self._model_in_memory = self._model_struct(), True
        self._reserve(self.length + 1)
        return self.length

    def _rotary(self, pos: int) -> tuple[np.ndarray, np.ndarray]:
        angles = np.concatenate([pos * self._w.inv_freq] * 2)
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def step_batch(decoders: list[NativeDecoder], tokens: list[int], gates: list[float | None] | None = None
               ) -> np.ndarray:
    """One step of each decoder in one kernel call (decode_batch.h): the decoders share their weights (``spawn``)
    and keep their own caches; logits [len(decoders), vocab]. Each decoder gets the bits its own ``step`` gives.
    ``gates``: each decoder's route in a routed bundle (as ``step``'s gate; None: all on the LoRA route), so
    streams on both routes share one read of the base weights."""
    gates = [None] * len(decoders) if gates is None else list(gates)
    if len(decoders) != len(tokens) or len(gates) != len(tokens) or not 1 <= len(decoders) <= kernels.MAX_BATCH:
        raise MegaedgeError(f"native decode batch: {len(decoders)} decoders for {len(tokens)} tokens and "
                            f"{len(gates)} gates (1-{kernels.MAX_BATCH} per call)")
    if len(decoders) == 1:
        return decoders[0].step(tokens[0], gates[0])[None]
    first = decoders[0]
    if any(d._w is not first._w for d in decoders) or len({id(d) for d in decoders}) != len(decoders):
        raise MegaedgeError("native decode batch: decoders must be distinct and share one set of weights (spawn)")
    positions = np.array([d._ready_for_step() for d in decoders], np.int32)
    rotary = [d._rotary(int(pos)) for d, pos in zip(decoders, positions)]
    cos = np.ascontiguousarray(np.stack([c for c, _ in rotary]))
    sin = np.ascontiguousarray(np.stack([s for _, s in rotary]))
    x = np.ascontiguousarray(np.stack([d.embed(t) for d, t in zip(decoders, tokens)]))
    logits = np.empty((len(decoders), first.lm_head.n), np.float32)
    for d, gate in zip(decoders, gates):
        d._routed(gate)
    first.kernels.decode_batch([d._model for d in decoders], x, positions, cos, sin, logits, first.threads)
    for d in decoders:
        d.length += 1
    return logits

