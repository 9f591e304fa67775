"""Index of an INT8 decoder's weights for the runtime's own CPU decode step (megaedge/runtime/native_decode.py).

The weight-only INT8 decoder keeps every projection in onnxruntime's ``MatMulNBits`` 8-bit layout. The native
decode step reads those same bytes, so a bundle carries its decoder weights once: the index records where each
tensor lies in the graph's external data file (offset, length, dtype, shape), and the few tensors stored inside
the graph itself (norm weights of small models) are copied into a small sidecar ``.npz``. The runtime reads only
the manifest, the data file and the sidecar; it never parses ONNX.

Projections are found in graph order, seven per layer (q, k, v, o, gate, up, down), each checked against the
layer geometry; the parity tests hold the native step's logits to onnxruntime's, so a mismatch cannot pass.

A routed decoder adds a gated low-rank branch to a projection: ``Add(MatMulNBits(x), Mul(lora_gate,
MatMul(MatMul(x, A), B)))`` with A [k, rank] and B [rank, n] float initializers. The index records A and B (the
graph's bytes again, nothing copied) under the projection's ``lora``; any other float MatMul refuses the index.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from megaedge.runtime import manifest

log = logging.getLogger("megaedge.export.native_index")

PROJECTIONS = manifest.NATIVE_PROJECTIONS


def _rms_eps(model, tensors) -> float | None:
    """The epsilon of the graph's RMS norms: the constant added to the first mean of squares."""
    from onnx import numpy_helper

    means = [n.output[0] for n in model.graph.node if n.op_type == "ReduceMean"]
    for node in model.graph.node:
        if node.op_type == "Add" and means and means[0] in node.input:
            other = [i for i in node.input if i != means[0]]
            if other and other[0] in tensors.by_name:
                return float(numpy_helper.to_array(tensors.by_name[other[0]]).reshape(-1)[0])
    return None


def _geometry(decoder: dict, nbits, eps: float) -> dict:
    """Layer geometry from the manifest; heads and MLP width read off the first layer's projections."""
    head_dim = decoder["head_dim"]
    first = [_attrs(n) for n in nbits[: len(PROJECTIONS)]]
    return {"layers": decoder["num_layers"], "hidden": decoder["hidden_size"], "intermediate": first[4]["N"],
            "heads": first[0]["N"] // head_dim, "kv_heads": decoder["kv_heads"], "head_dim": head_dim,
            "vocab": decoder["vocab_size"], "eps": eps, "scaling": head_dim ** -0.5}


def _expected_shapes(g: dict) -> dict[str, tuple[int, int]]:
    """(K, N) of each projection."""
    h, q, kv, i = g["hidden"], g["heads"] * g["head_dim"], g["kv_heads"] * g["head_dim"], g["intermediate"]
    return {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, i), "up": (h, i), "down": (i, h)}


class _Tensors:
    """Initializer -> reference: bytes in the external data file, or a copy in the sidecar."""

    def __init__(self, model):
        from onnx import numpy_helper

        self._numpy = numpy_helper.to_array
        self.by_name = {t.name: t for t in model.graph.initializer}
        self.sidecar: dict[str, np.ndarray] = {}

    def ref(self, name: str) -> dict:
        from onnx import helper

        tensor = self.by_name[name]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).name
        external = {e.key: e.value for e in tensor.external_data}
        if external:
            return {"file": external["location"], "offset": int(external.get("offset", 0)),
                    "length": int(external["length"]), "dtype": dtype, "shape": list(tensor.dims)}
        key = f"t{len(self.sidecar)}"
        self.sidecar[key] = self._numpy(tensor)
        return {"file": manifest.NATIVE_DECODER_FILE, "key": key, "dtype": dtype, "shape": list(tensor.dims)}


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Graph:
    """Producers and consumers of the graph's values, read once: the gated branches are found by their shape in
    the graph, and a norm's weight by where it sits rather than by its name: the exporter merges initializers with equal values (a freshly initialized model's norms are all ones), so
    layer 5's k_norm may be read from an initializer named after layer 0's q_norm."""

    def __init__(self, model, tensors):
        self.tensors = tensors
        self.producer = {out: n for n in model.graph.node for out in n.output}
        self.consumers: dict[str, list] = {}
        for n in model.graph.node:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)

    def scale_of(self, node, size: int) -> str | None:
        """The 1-D initializer of ``size`` values that ``node`` (a Mul) multiplies by, if it is one."""
        if node is None or node.op_type != "Mul":
            return None
        for name in node.input:
            tensor = self.tensors.by_name.get(name)
            if tensor is not None and list(tensor.dims) == [size]:
                return name
        return None

    def norm_before(self, value: str, size: int) -> str | None:
        """The weight of the RMS norm whose output is ``value`` (a projection's input)."""
        return self.scale_of(self.producer.get(value), size)

    def norm_after(self, value: str, size: int, depth: int = 12) -> str | None:
        """The weight of the first RMS norm downstream of ``value`` (a q or k projection's output: reshape, norm)."""
        frontier, seen = [value], set()
        for _ in range(depth):
            following = []
            for name in frontier:
                for node in self.consumers.get(name, []):
                    found = self.scale_of(node, size)
                    if found:
                        return found
                    if id(node) not in seen:
                        seen.add(id(node))
                        following.extend(node.output)
            frontier = following
        return None


def _lora_branches(model, graph: _Graph) -> tuple[dict[str, dict], set[str]]:
    """{MatMulNBits output: {"a": name, "b": name, "rank": R}} for every projection with a gated branch, and the
    outputs of the MatMul nodes those branches are made of."""
    producer, tensors = graph.producer, graph.tensors
    gate = "lora_gate"
    found, used = {}, set()
    for add in (n for n in model.graph.node if n.op_type == "Add" and len(n.input) == 2):
        pair = [producer.get(i) for i in add.input]
        for nbits, mul in (pair, pair[::-1]):
            if nbits and nbits.op_type == "MatMulNBits" and mul and mul.op_type == "Mul" and gate in mul.input:
                break
        else:
            continue
        others = [i for i in mul.input if i != gate]
        up = producer.get(others[0]) if others else None
        if not up or up.op_type != "MatMul" or up.input[1] not in tensors.by_name:
            continue
        down = producer.get(up.input[0])
        if (not down or down.op_type != "MatMul" or down.input[1] not in tensors.by_name
                or down.input[0] != nbits.input[0]):
            continue
        a, b = tensors.by_name[down.input[1]], tensors.by_name[up.input[1]]
        if len(a.dims) != 2 or len(b.dims) != 2 or a.dims[1] != b.dims[0]:
            continue
        found[nbits.output[0]] = {"a": down.input[1], "b": up.input[1], "rank": int(a.dims[1]),
                                  "gate_use": mul.output[0]}
        used.update((down.output[0], up.output[0]))
    return found, used


def build_index(decoder_path: Path, decoder: dict) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(index, sidecar arrays) for a weight-only 8-bit decoder graph, or None (with the reason logged) for any
    other graph: float or 4-bit projections, float MatMuls other than gated branches, zero points, an unexpected
    layout."""
    import onnx

    model = onnx.load(str(decoder_path), load_external_data=False)
    tensors = _Tensors(model)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    layers = decoder["num_layers"]

    def why_not(reason: str) -> None:
        log.info("%s: no native decode index (%s)", decoder_path.name, reason)

    eps = _rms_eps(model, tensors)
    if eps is None:
        return why_not("no RMS-norm epsilon found")
    per_layer = len(PROJECTIONS)
    if len(nbits) != per_layer * layers + 1:
        return why_not(f"{len(nbits)} MatMulNBits nodes, a weight-only 8-bit decoder of {layers} layers has "
                       f"{per_layer * layers + 1}")
    graph = _Graph(model, tensors)
    branches, branch_nodes = _lora_branches(model, graph)
    # every use of the gate must be one of those branches: a branch in another form (a Cast or Transpose on its
    # weights, a Gemm) would otherwise run as the base projection on the LoRA route
    gated = {b["gate_use"] for b in branches.values()}
    if any(n.output[0] not in gated for n in graph.consumers.get("lora_gate", [])):
        return why_not("the LoRA gate feeds a branch not in the gated form")
    if any(n.op_type == "MatMul" and n.input[1] in tensors.by_name and n.output[0] not in branch_nodes
           for n in model.graph.node):
        return why_not("float projections remain (excluded layers, or LoRA branches not in the gated form)")
    # The LM head can sit anywhere in node order (the tied-embedding rewrite inserts it first); the projections
    # keep the order the layers were traced in.
    heads = [n for n in nbits if _attrs(n).get("N") == decoder["vocab_size"]]
    if len(heads) != 1:
        return why_not(f"{len(heads)} MatMulNBits nodes of the vocabulary's width, expected one LM head")
    nbits = [n for n in nbits if n is not heads[0]] + heads
    g = _geometry(decoder, nbits, eps)
    expected = _expected_shapes(g)

    def linear(node, want: tuple[int, int] | None) -> dict | None:
        a = _attrs(node)
        if a.get("bits") != 8 or len(node.input) > 3 or (want and (a["K"], a["N"]) != want):
            return None
        entry = {"k": a["K"], "n": a["N"], "block": a["block_size"],
                 "weight": tensors.ref(node.input[1]), "scales": tensors.ref(node.input[2])}
        branch = branches.get(node.output[0])
        if branch is not None:
            shapes = (list(tensors.by_name[branch["a"]].dims), list(tensors.by_name[branch["b"]].dims))
            if shapes != ([a["K"], branch["rank"]], [branch["rank"], a["N"]]):
                return None
            entry["lora"] = {"rank": branch["rank"], "a": tensors.ref(branch["a"]), "b": tensors.ref(branch["b"])}
        return entry

    index_layers = []
    for i in range(layers):
        entry = {}
        nodes = nbits[per_layer * i: per_layer * (i + 1)]
        for j, name in enumerate(PROJECTIONS):
            found = linear(nodes[j], expected[name])
            if found is None:
                return why_not(f"layer {i} {name}: not an 8-bit {expected[name]} projection")
            entry[name] = found
        q, k, gate = nodes[0], nodes[1], nodes[4]
        norms = {"input_norm": graph.norm_before(q.input[0], g["hidden"]),
                 "post_norm": graph.norm_before(gate.input[0], g["hidden"]),
                 "q_norm": graph.norm_after(q.output[0], g["head_dim"]),
                 "k_norm": graph.norm_after(k.output[0], g["head_dim"])}
        for key, found in norms.items():
            if found is None:
                return why_not(f"layer {i}: no {key} weight found")
            entry[key] = tensors.ref(found)
        index_layers.append(entry)
    head = linear(nbits[-1], (g["hidden"], g["vocab"]))
    if head is None or "lora" in head:
        return why_not("the LM head is not an 8-bit MatMulNBits without a branch")
    indexed = sum("lora" in layer[name] for layer in index_layers for name in PROJECTIONS)
    if indexed != len(branches):
        return why_not(f"{len(branches)} gated branches, {indexed} of them on the layers' projections")
    if "tied_embedding_q8" in tensors.by_name:
        embedding = {"kind": "q8", "weight": tensors.ref("tied_embedding_q8"),
                     "scales": tensors.ref("tied_embedding_scale")}
    else:
        gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tensors.by_name
                   and len(tensors.by_name[n.input[0]].dims) == 2]
        if not gathers:
            return why_not("no embedding table found")
        embedding = {"kind": "float", "weight": tensors.ref(gathers[0].input[0])}
    final_norm = graph.norm_before(nbits[-1].input[0], g["hidden"])
    if final_norm is None:
        return why_not("no final norm weight found before the LM head")
    if "lm.rotary_emb.inv_freq" not in tensors.by_name:
        return why_not("no initializer lm.rotary_emb.inv_freq")
    index = {"format": "matmulnbits-q8", "zero_point": 128, **g, "layers": index_layers, "lm_head": head,
             "embedding": embedding, "final_norm": tensors.ref(final_norm),
             "inv_freq": tensors.ref("lm.rotary_emb.inv_freq")}
    return index, tensors.sidecar


def with_native_index(bundle: Path, decoder: dict) -> dict:
    """``decoder`` (a manifest's decoder section) with the index of the bundle's decoder graph as ``native``, or
    without one when the graph cannot be run natively; writes the sidecar next to the graph when one is needed."""
    decoder = {k: v for k, v in decoder.items() if k != "native"}
    built = build_index(bundle / manifest.DECODER_FILE, decoder)
    path = bundle / manifest.NATIVE_DECODER_FILE
    if built is None or not built[1]:
        path.unlink(missing_ok=True)
    if built is None:
        return decoder
    index, sidecar = built
    if sidecar:
        with open(path, "wb") as f:
            np.savez(f, **sidecar)
    return {**decoder, "native": index}
