"""What a manifest must satisfy before anything in megaedge trusts it (manifest.read runs both checks).

``check_document``: the JSON's types and enums: a list where a mapping belongs, a string where an id belongs, a
boolean where a count belongs, a null section, an unknown mode are refused with one line naming the field, not left
to surface as a traceback (or a silently different behaviour) deep in the runtime.

``check_bundle``: the manifest against the bundle it describes: every path inside the bundle, every file the
runtime loads listed (so hashed), and the numbers native code and onnxruntime feeds are built from consistent with
the graphs' tensor specs and with the sizes of the weight files (the native decoder's heads against its projection
widths, every tensor reference inside its file, the stem's arrays against its channel count). The C kernels trust
these numbers for their buffer sizes, so a wrong one must stop here, never reach them. ONNX is not parsed (the
``onnx`` package need not be installed on a device): the manifest's GraphSpec shapes and the files' sizes are what
is checked; onnxruntime checks its own inputs later.
"""

from __future__ import annotations

import math
import string
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from megaedge.errors import BundleError
from megaedge.runtime import features, fixed_kv, manifest

GRAPH_PRECISIONS = ("fp32", "fp16", "int8", "int4")
TENSOR_DTYPES = ("float32", "float16", "int64", "int32", "bool", "uint8", "int8")
KV_DTYPES = ("float32", "float16")
# dtypes the native decoder reads: weights as bytes (value + 128), everything else converted to float32
NATIVE_DTYPES = {"weight": ("uint8",), "float": ("float32", "float16")}
STEM_ARRAYS = ("w1", "b1", "w2", "s2", "b2", "w3", "s3", "b3")
FIX = "re-export the bundle (megaedge export) or copy it again"


def _refuse(where: str, value, want: str) -> BundleError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return BundleError(f"{manifest.MANIFEST_NAME}: {where} is {shown}, {want}; {FIX}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, never a count here


def _int(value, where: str, low: int = 0) -> int:
    if not _is_int(value) or value < low:
        raise _refuse(where, value, f"needs an integer >= {low}")
    return value


def _number(value, where: str, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise _refuse(where, value, "needs a finite number" + (" > 0" if positive else ""))
    return float(value)


def _dict(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise _refuse(where, value, "needs a mapping")
    return value


def _str(value, where: str) -> str:
    if not isinstance(value, str):
        raise _refuse(where, value, "needs a string")
    return value


def _list(value, where: str, item=None) -> list:
    if not isinstance(value, (list, tuple)):  # tuples: exporters pass dataclasses' asdict() before JSON
        raise _refuse(where, value, "needs a list")
    if item is not None:
        for i, entry in enumerate(value):
            item(entry, f"{where}[{i}]")
    return value


def _choice(value, where: str, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise _refuse(where, value, f"needs one of {tuple(allowed)}")
    return value


# ------------------------------------------------------------------------------------------- document types
def _tensor(raw, where: str) -> None:
    _dict(raw, where)
    _str(raw.get("name"), f"{where}.name")
    _choice(raw.get("dtype"), f"{where}.dtype", TENSOR_DTYPES)
    for i, dim in enumerate(_list(raw.get("shape"), f"{where}.shape")):
        if not (isinstance(dim, str) or (_is_int(dim) and dim >= 0)):
            raise _refuse(f"{where}.shape[{i}]", dim, "needs a size >= 0 or an axis name")


def _graph(raw, where: str) -> None:
    _dict(raw, where)
    _str(raw.get("file"), f"{where}.file")
    for side in ("inputs", "outputs"):
        if not _list(raw.get(side), f"{where}.{side}", _tensor):
            raise _refuse(f"{where}.{side}", [], "needs at least one tensor")
    _choice(raw.get("precision"), f"{where}.precision", GRAPH_PRECISIONS)
    _list(raw.get("data_files", []), f"{where}.data_files", _str)


def _ids(value, where: str) -> None:
    _list(value, where, _int)


def check_document(doc) -> None:
    """Types and enums of a manifest document (the parsed JSON); raises a one-line BundleError."""
    _dict(doc, "the document")
    version = doc.get("format_version")
    if not _is_int(version) or version < 1:
        raise _refuse("format_version", version, "needs a format number >= 1")
    _str(doc.get("megaedge_version"), "megaedge_version")
    _choice(doc.get("mode"), "mode", manifest.MODES)
    _choice(doc.get("precision"), "precision", manifest.PRECISIONS)
    graphs = _dict(doc.get("graphs"), "graphs")
    for name, raw in graphs.items():
        _choice(name, "a graph name", manifest.GRAPH_FILES)
        _graph(raw, f"graphs.{name}")
    for name in ("encoder", "decoder"):
        if name not in graphs:
            raise _refuse("graphs", sorted(graphs), f"needs an {name} graph")
    files = _dict(doc.get("files"), "files")
    for rel, digest in files.items():
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise _refuse(f"files[{rel!r}]", digest, "needs a sha256 (64 lowercase hex digits)")
    prompt = _dict(doc.get("prompt"), "prompt")
    for key in ("system_head", "before_audio", "after_audio"):
        _ids(prompt.get(key), f"prompt.{key}")
    _int(prompt.get("audio_pad"), "prompt.audio_pad")
    _int(prompt.get("asr_text"), "prompt.asr_text")
    if not _list(prompt.get("eos"), "prompt.eos", _int):
        raise _refuse("prompt.eos", [], "needs at least one end-of-text id")
    template = _str(prompt.get("language_template", "language {language}"), "prompt.language_template")
    try:  # only plain {language} fields: a format spec or an attribute would run code of the manifest's choosing
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise _refuse("prompt.language_template", template[:80], f"is not a template of {{language}} ({exc})") \
            from None
    if any(f != ("language", "", None) for f in fields) or len(template) > 200:
        raise _refuse("prompt.language_template", template[:80], "may hold only plain {language} fields (no format "
                      "spec, attribute or index) in at most 200 characters")
    frontend = _dict(doc.get("frontend"), "frontend")
    for key in ("sample_rate", "n_fft", "hop", "n_mels"):
        _int(frontend.get(key), f"frontend.{key}", 1)
    encoder = _dict(doc.get("encoder"), "encoder")
    for key in ("chunk_frames", "tokens_per_chunk", "chunks_per_window", "output_dim", "max_windows_per_call"):
        if key in encoder or key in ("chunk_frames", "output_dim"):
            _int(encoder.get(key), f"encoder.{key}", 1)
    if encoder.get("native_stem") is not None:
        stem = _dict(encoder["native_stem"], "encoder.native_stem")
        _str(stem.get("file"), "encoder.native_stem.file")
        _choice(stem.get("graph"), "encoder.native_stem.graph", graphs)
        for key in ("block", "channels", "bins", "chunk_frames"):
            _int(stem.get(key), f"encoder.native_stem.{key}", 1)
    decoder = _dict(doc.get("decoder"), "decoder")
    for key in ("num_layers", "kv_heads", "head_dim", "hidden_size", "vocab_size"):
        _int(decoder.get(key), f"decoder.{key}", 1)
    _choice(decoder.get("kv_dtype"), "decoder.kv_dtype", KV_DTYPES)
    for key in ("past_names", "present_names"):
        names = _list(decoder.get(key), f"decoder.{key}", _str)
        if len(names) != 2 * decoder["num_layers"]:
            raise _refuse(f"decoder.{key}", names, f"needs a key and a value name per layer "
                                                   f"({2 * decoder['num_layers']})")
    if decoder.get("native") is not None:
        _dict(decoder["native"], "decoder.native")  # its numbers: _check_native_decoder
    if _choice(decoder.get("kv_cache", "growing"), "decoder.kv_cache", fixed_kv.KV_CACHE_KINDS) == "fixed":
        low, high = fixed_kv.MAX_KV_RANGE
        length = _int(decoder.get("max_kv_length"), "decoder.max_kv_length", low)
        if length > high:
            raise _refuse("decoder.max_kv_length", length, f"needs {low}-{high} positions")
        if decoder.get("native") is not None or "decoder_prefill" in graphs:
            raise _refuse("decoder.kv_cache", "fixed", "but the bundle also names a native index or a prefill graph "
                                                       "(growing-cache engines)")
    if doc.get("router") is not None:
        router = _dict(doc["router"], "router")
        _int(router.get("position_rows"), "router.position_rows", 1)
        if not 0.0 <= _number(router.get("threshold"), "router.threshold") <= 1.0:
            raise _refuse("router.threshold", router["threshold"], "needs a probability in [0, 1]")
    streaming = _dict(doc.get("streaming"), "streaming")
    for key, value in streaming.items():
        _number(value, f"streaming.{key}")
    _dict(doc.get("versions"), "versions")
    for key in ("source", "quantization", "engines"):
        if doc.get(key) is not None:
            _dict(doc[key], key)
    for name, engine in (doc.get("engines") or {}).items():
        _str(_dict(engine, f"engines.{name}").get("file"), f"engines.{name}.file")
    _list(doc.get("notes", []), "notes", _str)


# ------------------------------------------------------------------------------------------- against the bundle
class _Files:
    """Paths the manifest names: inside the bundle and listed, with their sizes and .npz member headers."""

    def __init__(self, root: Path, info: manifest.Manifest):
        self.root, self.info = root, info
        self._npz: dict[str, dict] = {}

    def listed(self, rel, where: str) -> Path:
        path = manifest.inside(self.root, rel)
        if rel not in self.info.files:
            raise BundleError(f"{manifest.MANIFEST_NAME}: {where} names {rel!r}, which is not in its files (not "
                              f"hashed); the runtime loads only listed files: {FIX}")
        if not path.is_file():
            raise BundleError(f"{self.root}: {rel} is listed in {manifest.MANIFEST_NAME} but missing; copy the whole "
                              f"bundle")
        return path

    def size(self, rel: str, where: str) -> int:
        return self.listed(rel, where).stat().st_size

    def npz_members(self, rel: str, where: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """{array name: (shape, dtype name)} of an .npz, read from the .npy headers only (no array is loaded)."""
        if rel not in self._npz:
            path = self.listed(rel, where)
            members = {}
            try:
                with zipfile.ZipFile(path) as archive:
                    for entry in archive.namelist():
                        with archive.open(entry) as f:
                            version = np.lib.format.read_magic(f)
                            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                    else np.lib.format.read_array_header_2_0)
                            shape, _, dtype = read(f)
                        members[entry.removesuffix(".npy")] = (tuple(shape), np.dtype(dtype).name)
            except (zipfile.BadZipFile, ValueError, OSError) as exc:
                raise BundleError(f"{path}: not a readable .npz ({exc}); {FIX}") from exc
            self._npz[rel] = members
        return self._npz[rel]


def _shape(value, where: str) -> tuple[int, ...]:
    return tuple(_int(d, f"{where}[{i}]") for i, d in enumerate(_list(value, where)))


def _tensor_ref(files: _Files, ref, where: str, kind: str) -> tuple[int, ...]:
    """Shape of a native index tensor reference once it is inside a listed file with the bytes its shape needs."""
    _dict(ref, where)
    dtype = _choice(ref.get("dtype"), f"{where}.dtype", NATIVE_DTYPES[kind])
    shape = _shape(ref.get("shape"), f"{where}.shape")
    rel = _str(ref.get("file"), f"{where}.file")
    if "key" in ref:  # an array of the sidecar .npz
        key = _str(ref["key"], f"{where}.key")
        members = files.npz_members(rel, where)
        if key not in members:
            raise _refuse(f"{where}.key", key, f"names no array of {rel}")
        have_shape, have_dtype = members[key]
        if math.prod(have_shape) != math.prod(shape) or have_dtype != dtype:
            raise _refuse(f"{where}", {"shape": list(shape), "dtype": dtype},
                          f"but {rel}[{key}] is {have_dtype}{list(have_shape)}")
        return shape
    offset, length = _int(ref.get("offset"), f"{where}.offset"), _int(ref.get("length"), f"{where}.length")
    if length != math.prod(shape) * np.dtype(dtype).itemsize:
        raise _refuse(f"{where}.length", length, f"but {dtype}{list(shape)} takes "
                                                 f"{math.prod(shape) * np.dtype(dtype).itemsize} bytes")
    size = files.size(rel, where)
    if offset + length > size:
        raise _refuse(f"{where}.offset", offset, f"but {length} bytes from there end past {rel} ({size} bytes)")
    return shape


def _linear(files: _Files, entry, where: str, k: int, n: int) -> int:
    """Check one 8-bit projection of the native index as the (k inputs, n outputs) the geometry says; its block."""
    _dict(entry, where)
    if _int(entry.get("k"), f"{where}.k", 1) != k:
        raise _refuse(f"{where}.k", entry["k"], f"but the layer geometry gives {k} inputs")
    if _int(entry.get("n"), f"{where}.n", 1) != n:
        raise _refuse(f"{where}.n", entry["n"], f"but the layer geometry gives {n} outputs")
    block = _int(entry.get("block"), f"{where}.block", 1)
    if block < 16 or block > 1024 or block & (block - 1):
        raise _refuse(f"{where}.block", block, "needs a power of two in [16, 1024] (MatMulNBits' block sizes)")
    blocks = -(-k // block)
    weight = _tensor_ref(files, entry.get("weight"), f"{where}.weight", "weight")
    scales = _tensor_ref(files, entry.get("scales"), f"{where}.scales", "float")
    if math.prod(weight) != n * blocks * block:
        raise _refuse(f"{where}.weight.shape", list(weight), f"needs {n} x {blocks} x {block} bytes")
    if math.prod(scales) != n * blocks:
        raise _refuse(f"{where}.scales.shape", list(scales), f"needs {n} x {blocks} scales")
    if entry.get("lora") is not None:  # a routed decoder's gated branch: A [k, rank], B [rank, n]
        branch = _dict(entry["lora"], f"{where}.lora")
        rank = _int(branch.get("rank"), f"{where}.lora.rank", 1)
        if rank > min(k, n):
            raise _refuse(f"{where}.lora.rank", rank, f"needs at most min(k, n) = {min(k, n)}")
        for key, want in (("a", (k, rank)), ("b", (rank, n))):
            shape = _tensor_ref(files, branch.get(key), f"{where}.lora.{key}", "float")
            if tuple(shape) != want:
                raise _refuse(f"{where}.lora.{key}.shape", list(shape), f"needs {list(want)} (rank {rank})")
    return block


def _vector(files: _Files, ref, where: str, size: int) -> None:
    shape = _tensor_ref(files, ref, where, "float")
    if math.prod(shape) != size:
        raise _refuse(f"{where}.shape", list(shape), f"needs {size} values")


def _check_native_decoder(files: _Files, info: manifest.Manifest, index: dict) -> None:
    """The native decode index against the decoder section, the decoder graph and the weight files (runtime
    native_decode.py builds kernels.ModelStruct from exactly these numbers)."""
    if index.get("format") != "matmulnbits-q8":
        return  # native_decode.available() refuses an unknown format; nothing of it reaches the kernels
    w = "decoder.native"
    dec = info.decoder
    geometry = {key: _int(index.get(key), f"{w}.{key}", 1)
                for key in ("hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab")}
    hidden, inter, heads, kv_heads, head_dim, vocab = geometry.values()
    for key, section_key in (("hidden", "hidden_size"), ("kv_heads", "kv_heads"), ("head_dim", "head_dim"),
                             ("vocab", "vocab_size")):
        if geometry[key] != dec[section_key]:
            raise _refuse(f"{w}.{key}", geometry[key], f"but decoder.{section_key} is {dec[section_key]}")
    if heads % kv_heads:
        raise _refuse(f"{w}.heads", heads, f"needs a multiple of kv_heads ({kv_heads})")
    if head_dim % 2:
        raise _refuse(f"{w}.head_dim", head_dim, "needs an even size (rotary halves)")
    eps = _number(index.get("eps"), f"{w}.eps", positive=True)
    if eps >= 1.0:
        raise _refuse(f"{w}.eps", eps, "needs a small positive epsilon (< 1)")
    scaling = _number(index.get("scaling"), f"{w}.scaling", positive=True)
    if not math.isclose(scaling, head_dim ** -0.5, rel_tol=1e-6):
        raise _refuse(f"{w}.scaling", scaling, f"but head_dim {head_dim} gives {head_dim ** -0.5:.6g}")
    layers = _list(index.get("layers"), f"{w}.layers")
    if len(layers) != dec["num_layers"]:
        raise _refuse(f"{w}.layers", f"{len(layers)} layers", f"but decoder.num_layers is {dec['num_layers']}")
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {"q": (hidden, q), "k": (hidden, kv), "v": (hidden, kv), "o": (q, hidden), "gate": (hidden, inter),
              "up": (hidden, inter), "down": (inter, hidden)}
    norms = {"input_norm": hidden, "post_norm": hidden, "q_norm": head_dim, "k_norm": head_dim}
    for i, layer in enumerate(layers):
        where = f"{w}.layers[{i}]"
        _dict(layer, where)
        for name in manifest.NATIVE_PROJECTIONS:
            _linear(files, layer.get(name), f"{where}.{name}", *shapes[name])
        for name, size in norms.items():
            _vector(files, layer.get(name), f"{where}.{name}", size)
    branches = sum(isinstance(layer.get(name), dict) and layer[name].get("lora") is not None
                   for layer in layers for name in manifest.NATIVE_PROJECTIONS)
    if branches and not info.routed:
        raise _refuse(f"{w}.layers", f"{branches} LoRA branches", "but only a routed bundle has them")
    if _dict(index.get("lm_head"), f"{w}.lm_head").get("lora") is not None:
        raise _refuse(f"{w}.lm_head.lora", "a branch", "but the LM head is never adapted")
    _linear(files, index.get("lm_head"), f"{w}.lm_head", hidden, vocab)
    _vector(files, index.get("final_norm"), f"{w}.final_norm", hidden)
    _vector(files, index.get("inv_freq"), f"{w}.inv_freq", head_dim // 2)
    emb = _dict(index.get("embedding"), f"{w}.embedding")
    kind = _choice(emb.get("kind"), f"{w}.embedding.kind", ("q8", "float"))
    table = _tensor_ref(files, emb.get("weight"), f"{w}.embedding.weight", "weight" if kind == "q8" else "float")
    # every prompt id indexes a row; the rows (dequantized) give at least `hidden` values each
    if not table or table[0] < vocab:
        raise _refuse(f"{w}.embedding.weight.shape", list(table), f"needs {vocab} rows (the vocabulary)")
    width = math.prod(table[1:])
    if (width < hidden) if kind == "q8" else (width != hidden):
        raise _refuse(f"{w}.embedding.weight.shape", list(table), f"needs rows of {hidden} values")
    if kind == "q8":
        scales = _tensor_ref(files, emb.get("scales"), f"{w}.embedding.scales", "float")
        block = table[-1] if len(table) == 3 else 0
        if len(table) != 3 or math.prod(scales) != table[0] * table[1] or table[1] * block < hidden:
            raise _refuse(f"{w}.embedding", {"weight": list(table), "scales": list(scales)},
                          "needs rows x blocks x block bytes and rows x blocks scales")


def _check_native_stem(files: _Files, info: manifest.Manifest, stem: dict) -> None:
    """The native stem's arrays (runtime.kernels.StemWeights) and geometry against the encoder graphs."""
    w = "encoder.native_stem"
    channels, block, bins = stem["channels"], stem["block"], stem["bins"]
    if block < 16 or block > 1024 or block & (block - 1):
        raise _refuse(f"{w}.block", block, "needs a power of two in [16, 1024]")
    if stem["chunk_frames"] != info.encoder["chunk_frames"]:
        raise _refuse(f"{w}.chunk_frames", stem["chunk_frames"],
                      f"but encoder.chunk_frames is {info.encoder['chunk_frames']}")
    mel = _input(info.graph("encoder"), "mel")
    if mel is not None and len(mel.shape) == 3 and mel.shape[1] != bins:
        raise _refuse(f"{w}.bins", bins, f"but the encoder graph's mel has {mel.shape[1]} bins")
    blocks = 9 * -(-channels // block)
    want = {"w1": ((9, channels), "float32"), "b1": ((channels,), "float32"), "b2": ((channels,), "float32"),
            "b3": ((channels,), "float32"), "w2": ((channels, blocks, block), "uint8"),
            "w3": ((channels, blocks, block), "uint8"), "s2": ((channels, blocks), "float32"),
            "s3": ((channels, blocks), "float32")}
    members = files.npz_members(stem["file"], f"{w}.file")
    for name, (shape, dtype) in want.items():
        if members.get(name) != (shape, dtype):
            have = members.get(name)
            raise _refuse(f"{w} ({stem['file']}[{name}])", f"{have[1]}{list(have[0])}" if have else None,
                          f"but channels {channels} and block {block} need {dtype}{list(shape)}")
    body = _input(info.graph(stem["graph"]), "stem_features")
    width = channels * features.chunk_token_count(bins)
    if body is None or len(body.shape) != 3 or body.shape[1:] != (features.chunk_token_count(stem["chunk_frames"]),
                                                                     width):
        raise _refuse(f"{w}.channels", channels, f"but graph {stem['graph']}'s stem_features input is "
                                                 f"{None if body is None else list(body.shape)}")


def _input(spec: manifest.GraphSpec, name: str) -> manifest.TensorSpec | None:
    return next((t for t in spec.inputs if t.name == name), None)


def _output(spec: manifest.GraphSpec, name: str) -> manifest.TensorSpec | None:
    return next((t for t in spec.outputs if t.name == name), None)


def _fixed(dim, want: int, where: str, value_name: str, value) -> None:
    """A graph dim that is a number must equal ``want`` (named axes are the graph's to check at run time)."""
    if _is_int(dim) and dim != want:
        raise _refuse(value_name, value, f"but {where} is {dim}")


def _check_graphs(info: manifest.Manifest) -> None:
    """The decoder section's names and sizes against the decoder graphs' tensor specs."""
    dec = info.decoder
    hidden, vocab = dec["hidden_size"], dec["vocab_size"]
    for name in ("decoder", "decoder_prefill"):
        spec = info.graphs.get(name)
        if spec is None:
            continue
        inputs, outputs = {t.name: t for t in spec.inputs}, {t.name: t for t in spec.outputs}
        for key, table, side in (("past_names", inputs, "input"), ("present_names", outputs, "output")):
            for tensor in dec[key]:
                if tensor not in table:
                    raise _refuse(f"decoder.{key}", tensor, f"but graph {name} has no {side} of that name")
                shape = table[tensor].shape
                if len(shape) != 4:
                    raise _refuse(f"graphs.{name} {tensor}.shape", list(shape), "needs [batch, heads, positions, dim]")
                _fixed(shape[1], dec["kv_heads"], f"graph {name}'s {tensor} heads", "decoder.kv_heads",
                       dec["kv_heads"])
                _fixed(shape[3], dec["head_dim"], f"graph {name}'s {tensor} dim", "decoder.head_dim",
                       dec["head_dim"])
        audio, logits = inputs.get("audio_features"), outputs.get("logits")
        if "input_ids" not in inputs or audio is None or logits is None:
            raise _refuse(f"graphs.{name}", sorted(inputs), "needs input_ids and audio_features in, logits out")
        if len(audio.shape) == 2:
            _fixed(audio.shape[1], hidden, f"graph {name}'s audio_features width", "decoder.hidden_size", hidden)
        if logits.shape:
            _fixed(logits.shape[-1], vocab, f"graph {name}'s logits width", "decoder.vocab_size", vocab)
    for name in ("encoder", "encoder_body"):
        spec = info.graphs.get(name)
        out = _output(spec, "audio_features") if spec else None
        if out is not None and out.shape:
            _fixed(out.shape[-1], hidden, f"graph {name}'s audio_features width", "decoder.hidden_size", hidden)
    if fixed_kv.is_fixed(dec):
        _check_fixed_decoder(info)
    elif fixed_kv.SEQLENS_K in info.graph("decoder").input_names:
        raise _refuse("decoder.kv_cache", dec.get("kv_cache", "growing"),
                      f"but the decoder graph takes {fixed_kv.SEQLENS_K} (a fixed-KV graph needs 'fixed')")
    p = info.prompt
    for key in ("system_head", "before_audio", "after_audio", "eos"):
        for token in getattr(p, key):
            if token >= vocab:
                raise _refuse(f"prompt.{key}", token, f"but the vocabulary has {vocab} ids")
    for key in ("audio_pad", "asr_text"):
        if getattr(p, key) >= vocab:
            raise _refuse(f"prompt.{key}", getattr(p, key), f"but the vocabulary has {vocab} ids")


def _check_fixed_decoder(info: manifest.Manifest) -> None:
    """A fixed-KV decoder graph (runtime/fixed_kv.py) against decoder.max_kv_length: its length and total inputs
    (and an older graph's positions), and KV buffers whose positions axis is the manifest's length (the runtime
    allocates exactly that)."""
    dec, spec = info.decoder, info.graph("decoder")
    length = dec["max_kv_length"]
    inputs, outputs = {t.name: t for t in spec.inputs}, {t.name: t for t in spec.outputs}
    want = {fixed_kv.POSITION_IDS: ("int64", 2), fixed_kv.SEQLENS_K: ("int32", 1), fixed_kv.TOTAL_LENGTH: ("int32", 0)}
    for name, (dtype, rank) in want.items():
        tensor = inputs.get(name)
        if tensor is None and name not in fixed_kv.FIXED_INPUTS:  # position_ids: an older graph's, optional
            continue
        if tensor is None or tensor.dtype != dtype or len(tensor.shape) != rank:
            raise _refuse(f"graphs.decoder input {name}", None if tensor is None else asdict(tensor),
                          f"needs {dtype} of rank {rank} for decoder.kv_cache 'fixed'")
    for key, table in (("past_names", inputs), ("present_names", outputs)):
        for name in dec[key]:
            if table[name].shape[2] != length:
                raise _refuse("decoder.max_kv_length", length,
                              f"but the decoder graph's {name} holds {table[name].shape[2]} positions")
    if np.dtype(inputs[dec["past_names"][0]].dtype) != np.dtype(dec["kv_dtype"]):
        raise _refuse("decoder.kv_dtype", dec["kv_dtype"],
                      f"but the decoder graph's caches are {inputs[dec['past_names'][0]].dtype}")


def check_bundle(root: Path, info: manifest.Manifest) -> None:
    """Containment, listing and values of ``info`` against the bundle at ``root``; raises a one-line BundleError."""
    files = _Files(root, info)
    for rel in info.files:  # before anything is hashed: a listed path must not name a file outside the bundle
        manifest.inside(root, rel)
    for name, spec in info.graphs.items():
        files.listed(spec.file, f"graphs.{name}.file")
        for i, rel in enumerate(spec.data_files):
            files.listed(rel, f"graphs.{name}.data_files[{i}]")
    files.listed(manifest.TOKENIZER_FILE, "the tokenizer")
    if info.engines:
        from megaedge.runtime.tensorrt import ENGINE_FILES  # the names the runtime opens engines by

        for name, engine in info.engines.items():
            files.listed(engine["file"], f"engines.{name}.file")
            if name in ENGINE_FILES:
                files.listed(ENGINE_FILES[name], f"engines.{name}")
    _check_graphs(info)
    if info.decoder.get("native") is not None:
        _check_native_decoder(files, info, info.decoder["native"])
    if info.encoder.get("native_stem") is not None:
        _check_native_stem(files, info, info.encoder["native_stem"])
