"""The fixed-KV decoder graph (``megaedge export --target cuda``) and its weight-only low-bit weights.

The graph is exported from the same torch model as the growing-cache decoder (graphs.DecoderGraph): the same
embedding and audio merge, weights and LM head. The attention is a torch custom op,
``megaedge::group_query_attention``, whose ONNX translation is onnxruntime's ``com.microsoft.GroupQueryAttention``
node and whose torch implementation is the reference the tests hold that node to; the norms are custom ops in the
same way. Emitting the contrib ops at export, rather than pattern-matching the exported subgraphs afterwards,
keeps the graph independent of how the exporter happens to spell matmuls, masks, softmax and norms.

Every step of the graph is meant to run as few kernels as the CUDA provider allows, because at batch 1 a GPU
step is bound by its kernels, not by bytes (a 1.7B step with the norms, casts and rotary as separate nodes ran
~30 kernels a layer). So the graph is written in the form onnxruntime fuses, with the fusable parts emitted as
the contrib nodes themselves rather than left to pattern matching over whatever the exporter writes:

* every RMSNorm is one ``SimplifiedLayerNormalization`` node in the graph's float type (fp32 statistics inside
  the kernel, no casts around it), and each residual add is one ``SkipSimplifiedLayerNormalization`` with the
  norm that follows it (onnxruntime's own fusion of the two wants static sequence lengths);
* the rotary embedding is GroupQueryAttention's own (``do_rotary`` with cos/sin caches of ``max_kv_length``
  rows): positions are the cache slots, which is what the runtime always uses (runtime/fixed_kv.py). The node
  rotates only heads of a multiple of 16 (Qwen3's are 128); other geometries rotate in the graph from a
  ``position_ids`` input, as earlier fixed-KV graphs all did;
* Qwen3's per-head q/k norms are written as ``Reshape -> SimplifiedLayerNormalization -> Reshape`` straight
  into the attention's query and key, the pattern onnxruntime's CUDA optimizer folds into the attention kernel
  (``GroupQueryAttentionPreNormFusion``: ``q_norm_weight`` / ``k_norm_weight``); on the CPU the three nodes run
  as written.

Runtime contract: runtime/fixed_kv.py.

``--weights int4|int8`` then rewrites the decoder's projections as ``MatMulNBits`` (symmetric blocks; 4 bits in
blocks of 32, 8 bits in blocks of 128) with the quantizer the CPU recipes use (export/quantize.py), the tied
embedding / LM head as one 8-bit copy serving both, in the graph's float type.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from megaedge.errors import MegaedgeError
from megaedge.export import graphs
from megaedge.runtime import fixed_kv, manifest

log = logging.getLogger("megaedge.export.fixed_kv")

WEIGHTS = ("int4", "int8")
ROTARY_HEAD_MULTIPLE = 16  # GroupQueryAttention's own rotary embedding needs head_size % 16 == 0
WEIGHT_BLOCKS = {"int4": 32, "int8": 128}  # int4 blocks of 32: the block the cpu-int4 study kept (quantize.py)


# ------------------------------------------------------------------------------------------- the attention op
@torch.library.custom_op("megaedge::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    """RMSNorm over the last axis as onnxruntime's SimplifiedLayerNormalization computes it: statistics and the
    product by ``weight`` in fp32, one rounding to the input's type at the end."""
    h = x.float()
    h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + epsilon)
    return (h * weight.float()).to(x.dtype)


@rms_norm.register_fake
def _(x, weight, epsilon):
    return torch.empty_like(x)


@torch.library.custom_op("megaedge::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, epsilon: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm of x + skip, x + skip): a residual add and the next norm as onnxruntime's
    SkipSimplifiedLayerNormalization computes them (the sum in the input's type, as the plain add rounds it)."""
    total = x + skip
    return rms_norm(total, weight, epsilon), total


@skip_rms_norm.register_fake
def _(x, skip, weight, epsilon):
    return torch.empty_like(x), torch.empty_like(x)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of ``x`` [B, S, N, D] (halves rotated, not interleaved) with ``cos`` / ``sin``
    [S, D/2], in fp32."""
    half = x.shape[-1] // 2
    a, b = x[..., :half].float(), x[..., half:].float()
    c, s = cos[None, :, None].float(), sin[None, :, None].float()
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


@torch.library.custom_op("megaedge::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor,
                          cos_cache: torch.Tensor | None, sin_cache: torch.Tensor | None, num_heads: int,
                          kv_num_heads: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupQueryAttention with a shared past/present buffer and its own rotary embedding, in torch: row b of
    ``query`` [B, S, H*D] and ``key`` [B, S, KV*D] is rotated at positions seqlens_k[b] + 1 - S .. seqlens_k[b]
    (rows of ``cos_cache`` / ``sin_cache`` [M, D/2]); keys and ``value`` [B, S, KV*D] are written into copies of
    the caches [B, KV, M, D] at those positions; each new row attends causally over its own cache up to its own
    position (scores and softmax in fp32). Every batch row has its own length, as in the contrib op (a batch of
    decode steps of streams at different lengths). Returns (output [B, S, H*D], present_key, present_value)."""
    batch, seq, _ = query.shape
    head_dim = past_key.shape[-1]
    present_key, present_value = past_key.clone(), past_value.clone()
    out = []
    for b in range(batch):
        out.append(_attend_row(query[b:b + 1], key[b:b + 1], value[b:b + 1], present_key[b:b + 1],
                               present_value[b:b + 1], int(seqlens_k[b]) + 1, cos_cache, sin_cache, num_heads,
                               kv_num_heads, head_dim, scale))
    return torch.cat(out), present_key, present_value


def _attend_row(query, key, value, present_key, present_value, end: int, cos_cache, sin_cache, num_heads: int,
                kv_num_heads: int, head_dim: int, scale: float) -> torch.Tensor:
    """group_query_attention for one batch row ([1, ...] views; the caches are written in place)."""
    seq = query.shape[1]
    start = end - seq
    key = key.view(1, seq, kv_num_heads, head_dim)
    if cos_cache is not None:  # else the caller rotated q and k
        cos, sin = cos_cache[start:end], sin_cache[start:end]
        query = _rotate(query.view(1, seq, num_heads, head_dim), cos, sin).to(query.dtype)
        key = _rotate(key, cos, sin).to(key.dtype)
    present_key[:, :, start:end] = key.transpose(1, 2).to(present_key.dtype)
    present_value[:, :, start:end] = value.view(1, seq, kv_num_heads, head_dim).transpose(1, 2).to(
        present_value.dtype)
    group = num_heads // kv_num_heads
    # query head h reads KV head h // group, as in graphs.DecoderGraph
    q = query.view(1, seq, kv_num_heads, group, head_dim).permute(0, 2, 3, 1, 4)  # [1, KV, G, S, D]
    keys, values = present_key[:, :, None, :end], present_value[:, :, None, :end]
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale
    keep = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    out = torch.matmul(probs.to(values.dtype), values)  # [1, KV, G, S, D]
    return out.permute(0, 3, 1, 2, 4).reshape(1, seq, num_heads * head_dim).to(query.dtype)


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache, num_heads,
      kv_num_heads, scale):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def _onnx_translation():
    """{the custom ops: functions emitting com.microsoft.GroupQueryAttention and SimplifiedLayerNormalization} for
    torch.onnx.export. Neither has a schema in the onnx package, so each is declared here with the inputs and
    attributes the node uses."""
    from onnx.defs import OpSchema
    from onnxscript._internal.values import Op, Opset

    param = OpSchema.FormalParameter
    floats = ("T", ["tensor(float)", "tensor(float16)"], "float types")
    gqa_schema = OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[param("query", "T"), param("key", "T"), param("value", "T"), param("past_key", "T"),
                param("past_value", "T"), param("seqlens_k", "M"), param("total_sequence_length", "M"),
                param("cos_cache", "T", param_option=OpSchema.FormalParameterOption.Optional),
                param("sin_cache", "T", param_option=OpSchema.FormalParameterOption.Optional)],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[floats, ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "query heads", required=True),
                    OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "key/value heads", required=True),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "score scale", required=False),
                    OpSchema.Attribute("do_rotary", OpSchema.AttrType.INT, "rotary inside", required=False)])
    gqa = Op(Opset("com.microsoft", 1), "GroupQueryAttention", gqa_schema)
    # onnxruntime registers SimplifiedLayerNormalization in the ONNX domain at version 1
    norm_schema = OpSchema(
        "SimplifiedLayerNormalization", "", 1, inputs=[param("X", "T"), param("scale", "T")],
        outputs=[param("Y", "T")], type_constraints=[floats],
        attributes=[OpSchema.Attribute("axis", OpSchema.AttrType.INT, "normalized axis", required=False),
                    OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "epsilon", required=False),
                    OpSchema.Attribute("stash_type", OpSchema.AttrType.INT, "statistics type", required=False)])
    norm = Op(Opset("", 1), "SimplifiedLayerNormalization", norm_schema)
    skip_schema = OpSchema(
        "SkipSimplifiedLayerNormalization", "com.microsoft", 1,
        inputs=[param("input", "T"), param("skip", "T"), param("gamma", "T")],
        outputs=[param("output", "T"), param("mean", "U"), param("inv_std_var", "U"),
                 param("input_skip_bias_sum", "T")],
        type_constraints=[floats, ("U", ["tensor(float)"], "statistics")],
        attributes=[OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "epsilon", required=False)])
    skip_norm = Op(Opset("com.microsoft", 1), "SkipSimplifiedLayerNormalization", skip_schema)

    def translate_gqa(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache,
                      sin_cache, num_heads: int, kv_num_heads: int, scale: float):
        if cos_cache is None:
            return gqa(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                       num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale)
        return gqa(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
                   num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, do_rotary=1)

    def translate_norm(x, weight, epsilon: float):
        return norm(x, weight, axis=-1, epsilon=epsilon, stash_type=1)

    def translate_skip_norm(x, skip, weight, epsilon: float):
        out, _mean, _inv_std, total = skip_norm(x, skip, weight, epsilon=epsilon)  # statistics: dropped on save
        return out, total

    return {torch.ops.megaedge.group_query_attention.default: translate_gqa,
            torch.ops.megaedge.rms_norm.default: translate_norm,
            torch.ops.megaedge.skip_rms_norm.default: translate_skip_norm}


def _drop_unused_outputs(path: Path) -> None:
    """Blank the names of the skip norms' optional outputs nothing reads (their statistics; the last one's sum), so
    no provider computes or allocates them; the weights (external data) are untouched."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    read = {name for node in model.graph.node for name in node.input}
    read |= {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "SkipSimplifiedLayerNormalization":
            for i in range(1, len(node.output)):
                if node.output[i] not in read:
                    node.output[i] = ""
    onnx.save(model, str(path))


# ------------------------------------------------------------------------------------------- the graph
def _norm(module, x: torch.Tensor) -> torch.Tensor:
    """transformers' Qwen3RMSNorm ``module`` (its weight and epsilon) as one SimplifiedLayerNormalization node."""
    return torch.ops.megaedge.rms_norm(x, module.weight, float(module.variance_epsilon))


def _skip_norm(module, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``module``'s RMSNorm of residual + x, residual + x) as one SkipSimplifiedLayerNormalization node."""
    return torch.ops.megaedge.skip_rms_norm(x, residual, module.weight, float(module.variance_epsilon))


class FixedKVDecoderGraph(graphs.DecoderGraph):
    """graphs.DecoderGraph with the KV cache in fixed buffers updated in place (module docstring).

    Inputs: input_ids [B, S], audio_features [A, H], logits_at [L], seqlens_k [B] int32, total_sequence_length []
    int32, past_key_i / past_value_i [B, kv_heads, max_kv_length, head_dim] (and lora_gate in a routed bundle).
    Outputs: logits [L, vocab] of the rows ``logits_at`` of the B * S rows in row-major order, present_key_i /
    present_value_i (the past buffers, updated: the runtime binds each present to its past).

    The batch axis is for decode steps of several states at once (runtime/fixed_kv.py ``step_batch``): each row
    its own cache and length. Audio placeholders are filled in row-major order, so a batch may carry prompts too,
    but the runtime runs prompts one state at a time."""

    def __init__(self, model, gate, max_kv_length: int):
        super().__init__(model, gate)
        # GroupQueryAttention rotates heads whose size is a multiple of 16 (Qwen3's 128); other geometries (the
        # shipped fixture's 40) rotate in the graph from a position_ids input: positions computed in the graph
        # from seqlens_k need an int64 range that onnxruntime places on the CPU, which rules out CUDA graphs
        self.graph_rotary = self.head_dim % ROTARY_HEAD_MULTIPLE != 0
        caches = (None, None)  # the node's cos/sin rows [M, D/2]; None where the graph rotates
        if not self.graph_rotary:
            dtype = next(model.parameters()).dtype
            with torch.no_grad():  # [1, M, D]: halves repeated
                cos, sin = self.lm.rotary_emb(torch.zeros(1, dtype=dtype), torch.arange(max_kv_length)[None])
            half = self.head_dim // 2
            if not (torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])):
                raise NotImplementedError("a rotary embedding whose halves differ (partial or interleaved rotary)")
            caches = tuple(c[0, :, :half].to(dtype).contiguous() for c in (cos, sin))
        self.register_buffer("cos_cache", caches[0], persistent=False)
        self.register_buffer("sin_cache", caches[1], persistent=False)

    def forward(self, input_ids, audio_features, logits_at, seqlens_k, total_sequence_length, *past,
                position_ids=None, lora_gate=None):
        if self.gate is not None:
            self.gate.value = lora_gate
        batch, seq = input_ids.shape
        x = self.embed(input_ids.reshape(1, -1), audio_features).reshape(batch, seq, -1)
        layers = self.lm.layers
        if self.graph_rotary:
            from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

            cos, sin = self.lm.rotary_emb(x, position_ids)
        h = _norm(layers[0].input_layernorm, x)
        presents = []
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            # [1, S, H*D] -> [1, S, H, D] -> norm -> [1, S, H*D]: the chain onnxruntime folds into the attention
            q = _norm(attn.q_norm, attn.q_proj(h).view(batch, seq, self.heads, self.head_dim))
            k = _norm(attn.k_norm, attn.k_proj(h).view(batch, seq, self.kv_heads, self.head_dim))
            if self.graph_rotary:
                q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
            o, key, value = torch.ops.megaedge.group_query_attention(
                q.view(batch, seq, -1), k.view(batch, seq, -1), attn.v_proj(h), past[2 * i], past[2 * i + 1], seqlens_k,
                total_sequence_length, self.cos_cache, self.sin_cache, self.heads, self.kv_heads,
                float(attn.scaling))
            presents += [key, value]
            h, x = _skip_norm(layer.post_attention_layernorm, attn.o_proj(o), x)
            # each residual add travels with the norm after it: the next layer's, after the last the final norm
            after = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.lm.norm
            h, x = _skip_norm(after, layer.mlp(h), x)
        # the final norm ran over every row (a row's norm is its own): keep the rows whose logits are wanted
        return (self.lm_head(h.reshape(batch * seq, -1).index_select(0, logits_at)).float(), *presents)


def export_decoder(loaded, out: Path, opts, external: bool) -> tuple[str, ...]:
    """decoder.onnx as the fixed-KV graph, buffers of ``opts.max_kv_length`` positions (a fixed dim of the graph)
    and a batch axis of 1-MAX_BATCH states."""
    from megaedge.export.bundle import _export

    module = FixedKVDecoderGraph(loaded.model, loaded.gate if opts.mode == "routed" else None, opts.max_kv_length)
    dtype = next(loaded.model.parameters()).dtype
    cfg = loaded.config
    batch = torch.export.Dim("batch", min=1, max=fixed_kv.MAX_BATCH)
    seq = torch.export.Dim("seq", min=1, max=32768)
    audio = torch.export.Dim("audio", min=0, max=65536)
    rows = torch.export.Dim("logit_rows", min=1, max=32768)
    pad = int(cfg.audio_token_id)
    # two rows: an example of size 1 would fix the batch axis at 1
    ids = torch.tensor([[1, 2, pad, pad, 5], [6, pad, 7, 8, 9]])
    past = [torch.zeros(2, module.kv_heads, opts.max_kv_length, module.head_dim, dtype=dtype)
            for _ in range(2 * module.num_layers)]
    past_names, present_names = graphs.kv_names(module.num_layers)
    shapes = {"input_ids": {0: batch, 1: seq}, "audio_features": {0: audio}, "logits_at": {0: rows},
              "seqlens_k": {0: batch}, "total_sequence_length": {}, "past": tuple({0: batch} for _ in past)}
    names = ["input_ids", "audio_features", "logits_at", *fixed_kv.FIXED_INPUTS, *past_names]
    kwargs = {}
    if module.graph_rotary:
        kwargs["position_ids"] = torch.stack([torch.arange(3, 8), torch.arange(5, 10)])
        shapes["position_ids"] = {0: batch, 1: seq}
        names.append(fixed_kv.POSITION_IDS)
    if opts.mode == "routed":
        kwargs["lora_gate"] = torch.ones(1, dtype=dtype)
        shapes["lora_gate"] = None
        names.append("lora_gate")
    args = (ids, torch.zeros(3, cfg.text_config.hidden_size, dtype=dtype), torch.tensor([4, 9]),
            torch.tensor([7, 9], dtype=torch.int32), torch.tensor(opts.max_kv_length, dtype=torch.int32), *past)
    files = _export(module, args, kwargs, names, ["logits", *present_names], shapes, opts.opset,
                    out / manifest.DECODER_FILE, external, translations=_onnx_translation())
    _drop_unused_outputs(out / manifest.DECODER_FILE)
    return files


# ------------------------------------------------------------------------------------------- low-bit weights
def weight_recipe(weights: str):
    """The weight-only recipe (export/quantize.py's Int8Recipe) for ``--weights``: decoder projections at 4 or 8
    bits, the tied embedding / LM head one 8-bit copy, the LoRA branch of a routed bundle float."""
    from megaedge.export import quantize

    if weights not in WEIGHTS:
        raise MegaedgeError(f"--weights {weights!r} is not one of {WEIGHTS}")
    return quantize.Int8Recipe(f"cuda-{weights}", encoder="float", decoder="weight-only", tied_embedding_int8=True,
                               block_size=WEIGHT_BLOCKS[weights], decoder_bits=4 if weights == "int4" else 8,
                               description=f"weight-only {weights} MatMulNBits decoder, float activations")


def _float16_tied_embedding(model) -> bool:
    """quantize.quantize_tied_embedding writes its dequantization in fp32; in an fp16 graph the scales, the zero
    point and the cast become fp16 so the embedding rows and the LM head's activations keep the graph's type."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    if "tied_embedding_q8" not in inits:
        return False
    for name in ("tied_embedding_scale", "tied_embedding_scale_flat", "te_zero"):
        array = numpy_helper.to_array(inits[name]).astype(np.float16)
        inits[name].CopyFrom(numpy_helper.from_array(array, name))
    for node in model.graph.node:
        if node.op_type == "Cast" and node.input[0] == "te_rows_q":
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = TensorProto.FLOAT16
    return True


def quantize_weights(bundle: Path, spec: manifest.GraphSpec, weights: str, float_dtype: str) -> tuple[
                     manifest.GraphSpec, dict]:
    """Rewrite ``bundle``'s decoder graph (``spec``) with ``weights``-bit MatMulNBits projections in place; returns
    its new spec and the quantization facts for the manifest."""
    import onnx

    from megaedge.export import quantize
    from megaedge.export.bundle import _graph_spec

    recipe = weight_recipe(weights)
    original = bundle / ".float-decoder"
    original.mkdir()
    try:
        for rel in (spec.file, *spec.data_files):  # same names in a subfolder: external-data references hold
            shutil.move(str(bundle / rel), str(original / rel))
        external = bool(spec.data_files)
        details = quantize._quantize_graph(original / spec.file, bundle / spec.file, "weight-only", recipe, None,
                                           None, external)
        if float_dtype == "float16":
            model = onnx.load(str(bundle / spec.file))
            if _float16_tied_embedding(model):
                data = f"{spec.file}.data"
                if external:
                    (bundle / data).unlink()
                onnx.save(model, str(bundle / spec.file), save_as_external_data=external,
                          location=data if external else None)
    finally:
        shutil.rmtree(original, ignore_errors=True)
    data = bundle / f"{spec.file}.data"
    new_spec = _graph_spec(bundle / spec.file, weights, (data.name,) if data.exists() else ())
    facts = {"weights": weights, "method": "weight-only MatMulNBits", "recipe": asdict(recipe), "target": "cuda",
             "graphs": {"decoder": details}}
    log.info("decoder weights %s: %s", weights, details)
    return new_spec, facts


def bundle_with_weights(src: Path, out: Path, weights: str) -> Path:
    """A copy of the float fixed-KV bundle ``src`` at ``out`` with ``weights``-bit decoder projections (what
    ``export --weights`` makes in one go, for bundles already exported: benchmarks compare the two)."""
    info = manifest.read(src, verify=False)
    if not fixed_kv.is_fixed(info.decoder) or info.quantization:
        raise MegaedgeError(f"{src}: --weights applies to a float fixed-KV bundle (export --target cuda)")
    out.mkdir(parents=True)
    for rel in info.files:
        shutil.copyfile(src / rel, out / rel)
    doc = info.to_dict()
    spec, facts = quantize_weights(out, info.graph("decoder"), weights, info.decoder["kv_dtype"])
    doc["graphs"]["decoder"] = asdict(spec)
    doc["quantization"] = facts
    doc["files"] = manifest.file_hashes(out)
    frozen = manifest.Manifest.from_dict(doc)
    manifest.write(frozen, out)
    return out
