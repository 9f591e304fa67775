"""Checkpoint factory for tests and benchmarks: complete directories with random weights in any layout.

Geometries: ``tiny`` (seconds to build), ``0.6b`` and ``1.7b`` (the real configs). Layouts: ``mega`` (Mega-ASR root:
original-layout base in 2 shards + adapter + router), ``original``, ``native``. Tokenizer: the real Qwen3 vocabulary
with the ASR tokens at their real ids, so prompt ids are the real ones. Tensors are generated and written shard by
shard, so a 1.7B checkpoint never sits in memory twice.

Weights are scaled by 1/sqrt(fan_in) (not transformers' 0.02 init) so activations keep unit scale through every
layer and greedy tokens are decided by real margins, not by numerical near-ties; embeddings (tied with the LM head)
use std 0.125 so random logits span about +-5, the range where fp32 comparisons at 1e-5 are meaningful.
``init="realistic"`` keeps the 1/sqrt(fan_in) weights but makes embeddings unit-variance, norms exactly 1 and biases
0: hidden states enter every layer at unit scale and logits spread like a trained model's (std about
sqrt(hidden_size): ±40 at tiny, ±200 at 1.7B), the scale at which an absolute fp32 tolerance stops fitting.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from megaedge.errors import MegaedgeError
from megaedge.export import layout
from megaedge.export.tokenizer import (
    AUDIO_END,
    AUDIO_PAD,
    AUDIO_START,
    ENDOFTEXT,
    IM_END,
    TIMESTAMP,
    build_qwen3_asr_tokenizer,
    tokenizer_config_dict,
)
from megaedge.progress import track

log = logging.getLogger("megaedge.export.factory")

_REAL_TEXT = {"num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128}
GEOMETRIES = {
    "tiny": {
        "audio": {"d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 128,
                  "downsample_hidden_size": 32, "output_dim": 64},
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 16},
        "router": {"d_model": 64, "nhead": 4, "dim_feedforward": 128},
    },
    # tiny's audio side with a wider, deeper decoder: under init="realistic" its logits reach ±130 and fp32
    # rounding alone differs by ~1.8e-4 (> the old absolute 1e-4; the validation test's case); ~100M parameters,
    # mostly the tied embedding.
    "small": {
        "audio": {"d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 128,
                  "downsample_hidden_size": 32, "output_dim": 512},
        "text": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
                 "num_key_value_heads": 4, "head_dim": 64},
        "router": {"d_model": 64, "nhead": 4, "dim_feedforward": 128},
    },
    "0.6b": {
        "audio": {"d_model": 896, "encoder_layers": 18, "encoder_attention_heads": 14, "encoder_ffn_dim": 3584,
                  "downsample_hidden_size": 480, "output_dim": 1024},
        "text": {"hidden_size": 1024, "intermediate_size": 3072, **_REAL_TEXT},
        "router": {},
    },
    "1.7b": {
        "audio": {"d_model": 1024, "encoder_layers": 24, "encoder_attention_heads": 16, "encoder_ffn_dim": 4096,
                  "downsample_hidden_size": 480, "output_dim": 2048},
        "text": {"hidden_size": 2048, "intermediate_size": 6144, **_REAL_TEXT},
        "router": {},
    },
}
LAYOUTS = ("mega", "original", "native")
ENCODER_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")
DECODER_NAMESPACES = ("layers", "model.layers")  # thinker.layers.N and thinker.model.layers.N
DECODER_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_SHARD_BYTES = 2 * 1024**3
EMBEDDING_STD = 0.125
INITS = ("default", "realistic")


def text_config_dict(geometry: str, vocab_size: int = 151936) -> dict:
    return {
        "vocab_size": vocab_size, "max_position_embeddings": 65536, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": True, "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        **GEOMETRIES[geometry]["text"],
    }


def make_config(geometry: str = "tiny", vocab_size: int = 151936, special_ids: dict | None = None):
    """transformers' native Qwen3ASRConfig at a named geometry."""
    from transformers import Qwen3ASRConfig

    if geometry not in GEOMETRIES:
        raise MegaedgeError(f"geometry {geometry!r} is not one of {sorted(GEOMETRIES)}")
    ids = {"audio_token_id": AUDIO_PAD, "pad_token_id": IM_END, "eos_token_id": [ENDOFTEXT, IM_END],
           "timestamp_token_id": TIMESTAMP, **(special_ids or {})}
    return Qwen3ASRConfig(
        audio_config={"num_mel_bins": 128, "n_window": 50, "n_window_infer": 800, **GEOMETRIES[geometry]["audio"]},
        text_config=text_config_dict(geometry, vocab_size),
        tie_word_embeddings=True,
        **ids,
    )


def count_parameters(config) -> dict[str, int]:
    """Parameter counts by part, computed on the meta device (no weights allocated)."""
    import torch
    from transformers import Qwen3ASRForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3ASRForConditionalGeneration(config)
    parts = {"encoder": model.model.audio_tower, "projector": model.model.multi_modal_projector,
             "llm": model.model.language_model}
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def _random_tensor(name: str, shape: tuple[int, ...], gen, dtype, init: str = "default"):
    import torch

    realistic = init == "realistic"
    if name.endswith("norm.weight") or name.endswith("layer_norm.weight") or "ln_post.weight" in name:
        return torch.ones(shape, dtype=dtype) if realistic else (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype) if realistic else (0.02 * torch.randn(shape, generator=gen)).to(dtype)
    if "embed_tokens" in name:
        return ((1.0 if realistic else EMBEDDING_STD) * torch.randn(shape, generator=gen)).to(dtype)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return (torch.randn(shape, generator=gen) / math.sqrt(fan_in)).to(dtype)


def _original_config_dict(config) -> dict:
    """config.json as Qwen ships it: everything under thinker_config, MRoPE in the text config."""
    audio = {k: v for k, v in config.audio_config.to_dict().items() if k in layout._AUDIO_KEEP}
    audio.update({"model_type": "qwen3_asr_audio_encoder", "max_source_positions": 1500, "conv_chunksize": 500})
    text = config.text_config.to_dict()
    rope = text.pop("rope_parameters")
    text = {k: v for k, v in text.items() if k in text_config_dict("tiny")}
    text.update({"model_type": "qwen3_asr_text", "rope_theta": rope["rope_theta"],
                 "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "interleaved": True}})
    return {
        "architectures": ["Qwen3ASRForConditionalGeneration"],
        "model_type": "qwen3_asr",
        "thinker_config": {"audio_config": audio, "text_config": text, "audio_token_id": config.audio_token_id,
                           "audio_start_token_id": AUDIO_START, "audio_end_token_id": AUDIO_END,
                           "initializer_range": 0.02},
        "support_languages": ["English", "Chinese"],
    }


def write_weights(config, out_dir: Path, base_layout: layout.Layout, seed: int, dtype: str, shards: int,
                  init: str = "default") -> int:
    """Random weights in ``shards`` safetensors files (+ index when > 1). Returns the number of parameters written."""
    import torch
    from safetensors.torch import save_file

    from megaedge.export.loader import _expected_shapes

    expected, optional = _expected_shapes(config)
    names = [n for n in expected if n not in optional and "rotary_emb" not in n and "positional_embedding" not in n]
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    total_bytes = sum(math.prod(expected[n]) for n in names) * torch.finfo(torch_dtype).bits // 8
    per_shard = max(total_bytes // max(shards, 1) + 1, 1) if shards > 1 else None
    weight_map: dict[str, str] = {}
    written = 0

    def stored_name(name: str) -> str:
        return layout.native_to_original(name) if base_layout is layout.Layout.ORIGINAL else name

    # Assign tensors to shards first (sizes are known), then generate and write one shard at a time.
    plan: list[list[str]] = [[]]
    sizes = [0]
    for name in names:
        nbytes = math.prod(expected[name]) * torch.finfo(torch_dtype).bits // 8
        limit = per_shard or _SHARD_BYTES
        if sizes[-1] and sizes[-1] + nbytes > limit:
            plan.append([])
            sizes.append(0)
        plan[-1].append(name)
        sizes[-1] += nbytes
    count = len(plan)
    for index, shard_names in enumerate(plan):
        shard = {}
        for name in track(shard_names, desc=f"shard {index + 1}/{count}", unit="tensor"):
            shard[stored_name(name)] = _random_tensor(name, expected[name], gen, torch_dtype, init)
            written += shard[stored_name(name)].numel()
        file_name = layout.SINGLE_SAFETENSORS if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        save_file(shard, str(out_dir / file_name), metadata={"format": "pt"})
        Path(out_dir / file_name).chmod(0o644)  # safetensors writes 0600
        weight_map.update(dict.fromkeys(shard, file_name))
    if count > 1:
        index_doc = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / layout.SAFETENSORS_INDEX).write_text(json.dumps(index_doc, indent=2))
    return written


def write_tokenizer(out_dir: Path, base_layout: layout.Layout) -> None:
    """ORIGINAL: vocab.json + merges.txt + tokenizer_config.json (no tokenizer.json, as Qwen ships it);
    NATIVE: tokenizer.json + tokenizer_config.json."""
    import shutil

    from megaedge.export.tokenizer import qwen3_tokenizer_files

    tok = build_qwen3_asr_tokenizer()
    if base_layout is layout.Layout.ORIGINAL:
        src = qwen3_tokenizer_files()
        shutil.copyfile(src / "vocab.json", out_dir / "vocab.json")
        shutil.copyfile(src / "merges.txt", out_dir / "merges.txt")
    else:
        tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config_dict(tok), indent=2))


@dataclass(frozen=True)
class AdapterSpec:
    """Shape of a generated adapter: ranks drawn per module, both decoder namespaces, blocks on some modules."""

    ranks: tuple[int, ...] = (4, 8)
    alphas: tuple[int, ...] = (4, 8, 16)
    thinker_prefix: bool = True
    blocks_every: int = 3  # every Nth module gets a rank-slice blocks entry
    delta_scale: float = 0.3  # ||B A|| relative to 1/sqrt(fan_in)
    # Decoder namespaces the A/B tensors are saved under (the real adapter: both, and they add).
    decoder_namespaces: tuple[str, ...] = DECODER_NAMESPACES
    # Key blocks / rank_pattern / alpha_pattern by upstream's normalised name (``thinker.layers.N...`` ->
    # ``thinker.model.layers.N...``) instead of the saved name: the held-out layout where the entries of pairs saved
    # as ``thinker.layers.N...`` exist only under ``thinker.model.layers.N...`` (upstream's second lookup finds them).
    # Needs decoder_namespaces=("layers",): with both saved, two pairs would share one entry.
    normalised_names: bool = False

    def __post_init__(self):
        unknown = sorted(set(self.decoder_namespaces) - set(DECODER_NAMESPACES))
        if unknown or not self.decoder_namespaces:
            raise MegaedgeError(f"decoder_namespaces {self.decoder_namespaces!r}: expected a non-empty subset of "
                                f"{DECODER_NAMESPACES}")
        if self.normalised_names and "model.layers" in self.decoder_namespaces:
            raise MegaedgeError("normalised_names needs decoder_namespaces=('layers',): pairs saved under both "
                                "namespaces would share one blocks/pattern entry")


def adapter_module_names(config, decoder_namespaces: tuple[str, ...] = DECODER_NAMESPACES) -> list[str]:
    """Saved (original-layout) module names the real Mega-ASR adapter covers, both decoder namespaces by default."""
    names = [f"audio_tower.layers.{i}.{t}" for i in range(config.audio_config.encoder_layers) for t in ENCODER_TARGETS]
    names += ["audio_tower.conv_out", "audio_tower.proj1", "audio_tower.proj2"]
    for namespace in decoder_namespaces:
        names += [f"{namespace}.{i}.{t}" for i in range(config.text_config.num_hidden_layers) for t in DECODER_TARGETS]
    return names


def write_adapter(config, out_dir: Path, seed: int, spec: AdapterSpec = AdapterSpec()) -> None:
    import torch
    from safetensors.torch import save_file

    from megaedge.export.adapter import native_module_name, normalised_name

    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.device("meta"):
        from transformers import Qwen3ASRForConditionalGeneration

        meta = Qwen3ASRForConditionalGeneration(config)
    shapes = {n: tuple(m.weight.shape) for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear)}
    prefix = "thinker." if spec.thinker_prefix else ""
    tensors, rank_pattern, alpha_pattern, blocks = {}, {}, {}, {}
    slots: dict[str, int] = {}
    for short in adapter_module_names(config, spec.decoder_namespaces):
        raw = prefix + short
        entry = normalised_name(raw) if spec.normalised_names else raw  # the name blocks / patterns are keyed by
        native = native_module_name("thinker." + short)
        # One blocks decision per native module, so both decoder namespaces of a module have blocks or neither:
        # upstream's lookup hands a thinker.layers.N pair without blocks of its own the thinker.model.layers.N
        # pair's blocks (mega-asr.md), which would not fit its rank.
        slot = slots.setdefault(native, len(slots))
        out_f, in_f = shapes[native]
        rank = spec.ranks[int(torch.randint(len(spec.ranks), (1,), generator=gen))]
        alpha = spec.alphas[int(torch.randint(len(spec.alphas), (1,), generator=gen))]
        a = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
        b = torch.randn(out_f, rank, generator=gen) * spec.delta_scale / math.sqrt(rank) * rank / alpha
        tensors[f"base_model.model.{raw}.lora_A.weight"] = a
        tensors[f"base_model.model.{raw}.lora_B.weight"] = b
        rank_pattern[entry], alpha_pattern[entry] = rank, alpha
        if spec.blocks_every and slot % spec.blocks_every == 0:
            cut = rank // 2
            blocks[entry] = ([{"start": 0, "end": cut, "rank": cut, "alpha": alpha},
                              {"start": cut, "end": rank, "rank": rank - cut, "alpha": 2 * alpha}] if cut else
                             [{"start": 0, "end": rank, "rank": rank, "alpha": alpha}])
    save_file(tensors, str(out_dir / layout.ADAPTER_WEIGHTS), metadata={"format": "pt"})
    Path(out_dir / layout.ADAPTER_WEIGHTS).chmod(0o644)  # safetensors writes 0600
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": max(spec.ranks), "lora_alpha": max(spec.alphas),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": ".*", "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": "Qwen3-ASR-1.7B",
    }
    (out_dir / layout.ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
    (out_dir / layout.ADAPTER_BLOCKS).write_text(json.dumps(blocks, indent=2))


def write_router(out_file: Path, geometry: str, seed: int) -> None:
    import torch

    from megaedge.export.router import RouterConfig, build_router, save_router

    torch.manual_seed(seed + 2)
    model = build_router(RouterConfig(**GEOMETRIES[geometry]["router"])).eval()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_router(model, out_file)


def write_checkpoint(
    out_dir: str | Path,
    geometry: str = "tiny",
    layout_name: str = "mega",
    seed: int = 0,
    dtype: str | None = None,
    with_adapter: bool = True,
    with_router: bool = True,
    adapter_spec: AdapterSpec = AdapterSpec(),
    init: str = "default",
) -> Path:
    """Write a complete checkpoint directory and return the path to pass to the loader (``init``: see INITS and
    the module docstring)."""
    if layout_name not in LAYOUTS:
        raise MegaedgeError(f"layout {layout_name!r} is not one of {LAYOUTS}")
    if init not in INITS:
        raise MegaedgeError(f"init {init!r} is not one of {INITS}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise MegaedgeError(f"{out}: directory is not empty; choose a new output directory")
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or ("float32" if geometry in ("tiny", "small") else "bfloat16")
    config = make_config(geometry)
    base_layout = layout.Layout.NATIVE if layout_name == "native" else layout.Layout.ORIGINAL
    base = out / "Qwen3-ASR-1.7B" if layout_name == "mega" else out
    base.mkdir(parents=True, exist_ok=True)
    if base_layout is layout.Layout.ORIGINAL:
        (base / "config.json").write_text(json.dumps(_original_config_dict(config), indent=2))
    else:
        config.save_pretrained(str(base))
    write_weights(config, base, base_layout, seed, dtype, shards=2 if layout_name != "native" else 1, init=init)
    write_tokenizer(base, base_layout)
    if layout_name == "mega":
        if with_adapter:
            write_adapter(config, out / layout.ADAPTER_DIR_NAME, seed, adapter_spec)
        if with_router:
            write_router(out / layout.ROUTER_DIR_NAME / layout.ROUTER_FILE_NAME, geometry, seed)
    log.info("wrote %s checkpoint (%s layout) to %s", geometry, layout_name, out)
    return out
