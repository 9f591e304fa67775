"""Export-shaped torch modules around transformers' own Qwen3-ASR submodules (weights and layers are theirs).

Only the wiring is ours, because the shapes an edge runtime needs differ from the training-shaped forward:

* ``EncoderGraph``: windows as a batch. transformers packs all valid post-conv tokens and splits attention by
  ``cu_seqlens`` into 104-token windows (8 conv chunks of 100 mel frames -> 13 tokens each). Here each window is one
  batch row ``mel[W, 128, 100 * chunks]`` and a key mask from ``valid_tokens[W]`` hides the padded tail of the last
  chunk, so valid outputs are identical and windows run in parallel.
* ``DecoderGraph``: one graph for prefill AND decode (one copy of the weights): ``input_ids`` + ``audio_features``
  (merged where ``input_ids == audio_token_id``), growing KV cache in/out, logits of the last position only.
* ``RouterGraph``: mels -> degraded probability.

Attention scores, masks and softmax run in fp32 whatever the weights' dtype: an fp32-min mask constant would
overflow in fp16 (field-lessons.md).

Two decoder details are written for the runtime rather than copied from the training forward (same math, measured
on the 1.7B INT8 decoder at 420 cached positions, 2 threads): grouped-query attention broadcasts each KV head over
its query group instead of materializing ``repeat_interleave`` copies (33 ms of a 237 ms step were those copies),
and RMSNorm is written as ``x / sqrt(mean(x^2) + eps)``, the form onnxruntime fuses into one
SimplifiedLayerNormalization node (the ``rsqrt`` form stays five nodes, 113 norms per step). The encoder's GELU is
written as ``(x * (1 + erf(x / sqrt 2))) * 0.5``, the order onnxruntime fuses into one Gelu node; torch's own
``gelu`` exports ``x * (0.5 * (...))``, which it leaves as five (same values: a product by 0.5 is exact; 1.7B, 30 s
of audio, 2-core Xeon: ~0.2 s of a 1.2 s encode were those five, 4x slower than the fused node).
"""

from __future__ import annotations

import math

import torch
from torch import nn

CHUNK_FRAMES = 100
TOKENS_PER_CHUNK = 13
CHUNKS_PER_WINDOW = 8


def _masked_softmax_attention(q, k, v, scale: float, keep):
    """softmax(q k^T * scale) v with ``keep`` (bool, broadcastable to the scores) selecting visible keys."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU in the node order onnxruntime's GeluFusion matches (see the module docstring)."""
    return (x * (1.0 + torch.erf(x / math.sqrt(2.0)))) * 0.5


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' Qwen3RMSNorm (its weight and epsilon) in the division form onnxruntime fuses."""
    h = x.float()
    h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


class EncoderGraph(nn.Module):
    """mel [W, 128, 100*C] (zero-padded), valid_tokens [W] -> audio_features [W, 13*C, output_dim]."""

    def __init__(self, model, gate=None):
        super().__init__()
        self.enc = model.model.audio_tower
        self.proj = model.model.multi_modal_projector
        self.gate = gate
        cfg = self.enc.config
        self.heads = cfg.encoder_attention_heads
        self.head_dim = cfg.d_model // self.heads
        self.exact_gelu = getattr(cfg, "activation_function", "gelu") == "gelu"
        if getattr(self.enc, "embed_scale", 1.0) != 1.0:
            raise NotImplementedError("scale_embedding is not used by Qwen3-ASR")

    def forward(self, mel: torch.Tensor, valid_tokens: torch.Tensor, lora_gate: torch.Tensor | None = None):
        if self.gate is not None:
            self.gate.value = lora_gate
        enc = self.enc
        windows, bins, frames = mel.shape
        chunks = frames // CHUNK_FRAMES
        x = mel.reshape(windows, bins, chunks, CHUNK_FRAMES).permute(0, 2, 1, 3)
        x = x.reshape(windows * chunks, 1, bins, CHUNK_FRAMES)
        x = _gelu(enc.conv2d1(x))
        x = _gelu(enc.conv2d2(x))
        x = _gelu(enc.conv2d3(x))
        n, channels, freq, steps = x.shape
        x = enc.conv_out(x.permute(0, 3, 1, 2).reshape(n, steps, channels * freq))
        x = x + enc.positional_embedding.positional_embedding[:steps].to(x.dtype)
        tokens = chunks * steps
        x = x.reshape(windows, tokens, -1)
        keep = torch.arange(tokens, device=mel.device)[None, :] < valid_tokens[:, None]
        keep = keep[:, None, None, :]  # [W, 1, 1, T]: padded keys are invisible to every query
        for layer in enc.layers:
            residual = x
            h = layer.self_attn_layer_norm(x)
            attn = layer.self_attn
            q = attn.q_proj(h).reshape(windows, tokens, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).reshape(windows, tokens, self.heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).reshape(windows, tokens, self.heads, self.head_dim).transpose(1, 2)
            o = _masked_softmax_attention(q, k, v, attn.scaling, keep)
            x = residual + attn.out_proj(o.transpose(1, 2).reshape(windows, tokens, -1))
            residual = x
            h = layer.fc1(layer.final_layer_norm(x))
            h = layer.fc2(_gelu(h) if self.exact_gelu else layer.activation_fn(h))
            x = residual + h
        x = enc.ln_post(x)
        if self.exact_gelu:  # the projector's forward, with the fusable GELU
            return self.proj.linear_2(_gelu(self.proj.linear_1(x)))
        return self.proj(x)


class DecoderGraph(nn.Module):
    """Qwen3 LLM step: prefill (S = prompt length, empty past) and decode (S = 1) through the same weights.

    Inputs: input_ids [1, S] int64, audio_features [A, H], logits_at [L] int64 (positions within this step whose
    logits are wanted: [S - 1] for greedy decoding; several to check a drafted continuation in one call, as
    streaming's final does), past_key_i / past_value_i [1, kv_heads, P, head_dim].
    Outputs: logits [L, vocab], present_key_i / present_value_i [1, kv_heads, P + S, head_dim].
    """

    def __init__(self, model, gate=None):
        super().__init__()
        self.lm = model.model.language_model
        self.lm_head = model.lm_head
        self.audio_token_id = int(model.config.audio_token_id)
        self.gate = gate
        cfg = self.lm.config
        self.num_layers = cfg.num_hidden_layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
            raise NotImplementedError("sliding-window attention is not used by Qwen3-ASR")

    def forward(self, input_ids, audio_features, logits_at, *past, lora_gate=None):
        from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

        if self.gate is not None:
            self.gate.value = lora_gate
        lm = self.lm
        x = self.embed(input_ids, audio_features)
        seq = input_ids.shape[1]
        past_len = past[0].shape[2]
        positions = (torch.arange(seq, device=input_ids.device) + past_len)[None, :]
        cos, sin = lm.rotary_emb(x, positions)
        total = torch.arange(past_len + seq, device=input_ids.device)
        keep = (total[None, :] <= positions[0][:, None])[None, None]  # [1, 1, S, P+S] causal over past + new
        presents = []
        for i, layer in enumerate(lm.layers):
            attn = layer.self_attn
            residual = x
            h = _rms_norm(layer.input_layernorm, x)
            q = _rms_norm(attn.q_norm, attn.q_proj(h).view(1, seq, self.heads, self.head_dim)).transpose(1, 2)
            k = _rms_norm(attn.k_norm, attn.k_proj(h).view(1, seq, self.kv_heads, self.head_dim)).transpose(1, 2)
            v = attn.v_proj(h).view(1, seq, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = torch.cat([past[2 * i].to(k.dtype), k], dim=2)
            v = torch.cat([past[2 * i + 1].to(v.dtype), v], dim=2)
            presents += [k, v]
            # Query head h reads KV head h // group (transformers' repeat_interleave pairing): queries are grouped
            # per KV head and each KV head broadcasts over its group.
            group = self.heads // self.kv_heads
            grouped = q.reshape(1, self.kv_heads, group, seq, self.head_dim)
            o = _masked_softmax_attention(grouped, k[:, :, None], v[:, :, None], attn.scaling, keep[:, :, None])
            o = o.reshape(1, self.heads, seq, self.head_dim)
            x = residual + attn.o_proj(o.transpose(1, 2).reshape(1, seq, -1))
            x = x + layer.mlp(_rms_norm(layer.post_attention_layernorm, x))
        return (self.logits(x, logits_at), *presents)

    def embed(self, input_ids, audio_features):
        """Token embeddings with the i-th audio placeholder replaced by the i-th audio feature row. A zero row is
        appended so the gather stays valid when there is no audio in this call (decode)."""
        embeds = self.lm.embed_tokens(input_ids)
        is_audio = input_ids == self.audio_token_id
        index = (torch.cumsum(is_audio.to(torch.int64), dim=-1) - 1).clamp(min=0)
        padded = torch.cat([audio_features.to(embeds.dtype), embeds.new_zeros(1, embeds.shape[-1])], dim=0)
        return torch.where(is_audio[..., None], padded[index], embeds)

    def logits(self, x, logits_at):
        """fp32 logits of the rows ``logits_at`` of the last hidden states ``x`` [1, S, hidden]."""
        picked = _rms_norm(self.lm.norm, x[0].index_select(0, logits_at))
        return self.lm_head(picked).float()


class RouterGraph(nn.Module):
    """mels [1, frames, 80] -> degraded probability [1]."""

    def __init__(self, router):
        super().__init__()
        self.router = router

    def forward(self, mels):
        return torch.softmax(self.router(mels).float(), dim=-1)[:, 1]


def kv_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
    return past, present
