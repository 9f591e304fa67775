"""The fixed-KV decoder graph (``megaedge export --target cuda``) and its weight-only low-bit weights.

The graph is exported from the same torch model as the growing-cache decoder (graphs.DecoderGraph): the same
embedding and audio merge, norms, projections, rotary embedding and LM head; only the attention differs. It is a
torch custom op, ``megaedge::group_query_attention``, whose ONNX translation is onnxruntime's
``com.microsoft.GroupQueryAttention`` node and whose torch implementation is the reference the tests hold that node
to. Emitting the contrib op at export, rather than pattern-matching the exported attention subgraph afterwards,
keeps the graph independent of how the exporter happens to spell matmuls, masks and softmax.

Qwen3 normalises q and k per head (q_norm, k_norm) before the rotary embedding; the graph applies both itself, from
``position_ids``, and hands GroupQueryAttention rotated q and k (``do_rotary`` off): the same arithmetic as the
growing graph, element for element, and no rotary cache sized by the buffer. Runtime contract:
runtime/fixed_kv.py.

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
WEIGHT_BLOCKS = {"int4": 32, "int8": 128}  # int4 blocks of 32: the block the cpu-int4 study kept (quantize.py)


# ------------------------------------------------------------------------------------------- the attention op
@torch.library.custom_op("megaedge::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor,
                          num_heads: int, kv_num_heads: int, scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupQueryAttention with a shared past/present buffer, in torch: ``query`` [1, S, H*D], ``key`` / ``value``
    [1, S, KV*D] written into copies of the caches [1, KV, M, D] at positions seqlens_k + 1 - S .. seqlens_k; each
    new row attends causally over the cache up to its own position (scores and softmax in fp32). Returns (output
    [1, S, H*D], present_key, present_value)."""
    batch, seq, _ = query.shape
    head_dim = past_key.shape[-1]
    end = int(seqlens_k[0]) + 1
    start = end - seq
    present_key, present_value = past_key.clone(), past_value.clone()
    present_key[:, :, start:end] = key.view(batch, seq, kv_num_heads, head_dim).transpose(1, 2).to(past_key.dtype)
    present_value[:, :, start:end] = value.view(batch, seq, kv_num_heads, head_dim).transpose(1, 2).to(
        past_value.dtype)
    group = num_heads // kv_num_heads
    # query head h reads KV head h // group, as in graphs.DecoderGraph
    q = query.view(batch, seq, kv_num_heads, group, head_dim).permute(0, 2, 3, 1, 4)  # [B, KV, G, S, D]
    keys, values = present_key[:, :, None, :end], present_value[:, :, None, :end]
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale
    keep = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    out = torch.matmul(probs.to(values.dtype), values)  # [B, KV, G, S, D]
    return (out.permute(0, 3, 1, 2, 4).reshape(batch, seq, num_heads * head_dim).to(query.dtype), present_key,
            present_value)


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, num_heads, kv_num_heads, scale):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def _onnx_translation():
    """{the custom op: a function emitting com.microsoft.GroupQueryAttention} for torch.onnx.export. The contrib op
    has no schema in the onnx package, so one is declared here with the inputs and attributes the node uses."""
    from onnx.defs import OpSchema
    from onnxscript._internal.values import Op, Opset

    param = OpSchema.FormalParameter
    schema = OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[param("query", "T"), param("key", "T"), param("value", "T"), param("past_key", "T"),
                param("past_value", "T"), param("seqlens_k", "M"), param("total_sequence_length", "M")],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float types"), ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "query heads", required=True),
                    OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "key/value heads", required=True),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "score scale", required=False)])
    op = Op(Opset("com.microsoft", 1), "GroupQueryAttention", schema)

    def translate(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, num_heads: int,
                  kv_num_heads: int, scale: float):
        return op(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, num_heads=num_heads,
                  kv_num_heads=kv_num_heads, scale=scale)

    return {torch.ops.megaedge.group_query_attention.default: translate}


# ------------------------------------------------------------------------------------------- the graph
class FixedKVDecoderGraph(graphs.DecoderGraph):
    """graphs.DecoderGraph with the KV cache in fixed buffers updated in place.

    Inputs: input_ids [1, S], audio_features [A, H], logits_at [L], position_ids [1, S] int64, seqlens_k [1] int32,
    total_sequence_length [] int32, past_key_i / past_value_i [1, kv_heads, max_kv_length, head_dim] (and
    lora_gate in a routed bundle). Outputs: logits [L, vocab], present_key_i / present_value_i (the past buffers,
    updated: the runtime binds each present to its past)."""

    def forward(self, input_ids, audio_features, logits_at, position_ids, seqlens_k, total_sequence_length, *past,
                lora_gate=None):
        from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

        if self.gate is not None:
            self.gate.value = lora_gate
        x = self.embed(input_ids, audio_features)
        seq = input_ids.shape[1]
        cos, sin = self.lm.rotary_emb(x, position_ids)
        presents = []
        for i, layer in enumerate(self.lm.layers):
            attn = layer.self_attn
            residual = x
            h = graphs._rms_norm(layer.input_layernorm, x)
            q = graphs._rms_norm(attn.q_norm, attn.q_proj(h).view(1, seq, self.heads, self.head_dim))
            k = graphs._rms_norm(attn.k_norm, attn.k_proj(h).view(1, seq, self.kv_heads, self.head_dim))
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # [1, S, heads, D]: no transposes
            o, key, value = torch.ops.megaedge.group_query_attention(
                q.reshape(1, seq, -1), k.reshape(1, seq, -1), attn.v_proj(h), past[2 * i], past[2 * i + 1],
                seqlens_k, total_sequence_length, self.heads, self.kv_heads, float(attn.scaling))
            presents += [key, value]
            x = residual + attn.o_proj(o)
            x = x + layer.mlp(graphs._rms_norm(layer.post_attention_layernorm, x))
        return (self.logits(x, logits_at), *presents)


def export_decoder(loaded, out: Path, opts, external: bool) -> tuple[str, ...]:
    """decoder.onnx as the fixed-KV graph, buffers of ``opts.max_kv_length`` positions (a fixed dim of the graph)."""
    from megaedge.export.bundle import _export

    module = FixedKVDecoderGraph(loaded.model, loaded.gate if opts.mode == "routed" else None)
    dtype = next(loaded.model.parameters()).dtype
    cfg = loaded.config
    seq = torch.export.Dim("seq", min=1, max=32768)
    audio = torch.export.Dim("audio", min=0, max=65536)
    rows = torch.export.Dim("logit_rows", min=1, max=32768)
    pad = int(cfg.audio_token_id)
    ids = torch.tensor([[1, 2, pad, pad, 5]])
    positions = torch.arange(3, 8)[None]
    past = [torch.zeros(1, module.kv_heads, opts.max_kv_length, module.head_dim, dtype=dtype)
            for _ in range(2 * module.num_layers)]
    past_names, present_names = graphs.kv_names(module.num_layers)
    shapes = {"input_ids": {1: seq}, "audio_features": {0: audio}, "logits_at": {0: rows}, "position_ids": {1: seq},
              "seqlens_k": {}, "total_sequence_length": {}, "past": tuple({} for _ in past)}
    names = ["input_ids", "audio_features", "logits_at", *fixed_kv.FIXED_INPUTS, *past_names]
    kwargs = None
    if opts.mode == "routed":
        kwargs = {"lora_gate": torch.ones(1, dtype=dtype)}
        shapes["lora_gate"] = None
        names.append("lora_gate")
    args = (ids, torch.zeros(2, cfg.text_config.hidden_size, dtype=dtype), torch.tensor([3, 4]), positions,
            torch.tensor([7], dtype=torch.int32), torch.tensor(8, dtype=torch.int32), *past)
    return _export(module, args, kwargs, names, ["logits", *present_names], shapes, opts.opset,
                   out / manifest.DECODER_FILE, external, translations=_onnx_translation())


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
