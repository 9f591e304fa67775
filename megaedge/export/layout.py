"""Checkpoint layouts megaedge accepts, how to tell them apart, and how their names map to transformers' native model.

Layouts
* ``mega``: a Mega-ASR root: ``Qwen3-ASR-*/`` (base, original layout), ``mega-asr-merged/`` (LoRA adapter) and
  ``audio_quality_router/`` (router safetensors).
* ``original``: Qwen3-ASR as released by Qwen (``thinker.*`` weights, ``thinker_config`` in config.json).
* ``native``: transformers' own layout (``model.audio_tower.*``, ``model.language_model.*``), e.g. ``*-hf`` repos.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from megaedge.errors import CheckpointError

ADAPTER_DIR_NAME = "mega-asr-merged"
ROUTER_DIR_NAME = "audio_quality_router"
ROUTER_FILE_NAME = "best_acc_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BLOCKS = "mega_lora_blocks.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"


class Layout(str, Enum):
    MEGA = "mega"
    ORIGINAL = "original"
    NATIVE = "native"


# Original -> native prefixes, most specific first. The projector lives under audio_tower in the original layout.
_ORIGINAL_TO_NATIVE = (
    ("thinker.audio_tower.proj1.", "model.multi_modal_projector.linear_1."),
    ("thinker.audio_tower.proj2.", "model.multi_modal_projector.linear_2."),
    ("thinker.model.", "model.language_model."),
    ("thinker.lm_head.", "lm_head."),
    ("thinker.", "model."),
)


def original_to_native(key: str) -> str:
    for old, new in _ORIGINAL_TO_NATIVE:
        if key.startswith(old):
            return new + key[len(old) :]
    raise CheckpointError(f"tensor '{key}' is not under 'thinker.': not an original-layout Qwen3-ASR checkpoint")


def native_to_original(key: str) -> str:
    for old, new in _ORIGINAL_TO_NATIVE:
        if key.startswith(new):
            return old + key[len(new) :]
    raise CheckpointError(f"tensor '{key}' has no original-layout name")


@dataclass(frozen=True)
class CheckpointSource:
    """Where each part of a checkpoint lives once the layout is resolved."""

    base_dir: Path
    layout: Layout  # layout of the base weights: ORIGINAL or NATIVE
    adapter_dir: Path | None
    router_file: Path | None
    root_layout: Layout  # MEGA when the user pointed at a Mega-ASR root

    def describe(self) -> str:
        parts = [f"base={self.base_dir} ({self.layout.value})"]
        parts.append(f"adapter={self.adapter_dir}" if self.adapter_dir else "adapter=none")
        parts.append(f"router={self.router_file}" if self.router_file else "router=none")
        return ", ".join(parts)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def read_config(base_dir: Path) -> dict:
    return _read_json(base_dir / "config.json")


def _base_layout(base_dir: Path) -> Layout | None:
    cfg_path = base_dir / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = read_config(base_dir)
    if "thinker_config" in cfg:
        return Layout.ORIGINAL
    if "audio_config" in cfg and "text_config" in cfg:
        return Layout.NATIVE
    return None


def _find_mega_base(root: Path) -> Path | None:
    candidates = sorted(p for p in root.iterdir() if p.is_dir() and _base_layout(p) is not None)
    preferred = [p for p in candidates if p.name.lower().startswith("qwen3-asr")]
    if preferred:
        return preferred[0]
    return candidates[0] if len(candidates) == 1 else None


def resolve(
    path: str | Path, adapter: str | Path | None = None, router: str | Path | None = None
) -> CheckpointSource:
    """Detect the layout of ``path`` and locate base, adapter and router (explicit paths win)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"{root}: no such checkpoint directory")
    if not root.is_dir():
        raise CheckpointError(f"{root}: is a file; pass the checkpoint directory")

    adapter_dir = Path(adapter).expanduser() if adapter else None
    router_file = Path(router).expanduser() if router else None
    layout = _base_layout(root)
    if layout is not None:
        base, root_layout = root, layout
        # `megaedge merge` writes the router beside a native checkpoint in the Mega-ASR folder name.
        if router_file is None and (root / ROUTER_DIR_NAME).is_dir():
            router_file = _router_in_dir(root / ROUTER_DIR_NAME)
    else:
        base = _find_mega_base(root)
        has_mega_parts = (root / ADAPTER_DIR_NAME).is_dir() or (root / ROUTER_DIR_NAME).is_dir()
        if base is None or not has_mega_parts:
            found = sorted(p.name for p in root.iterdir())[:8]
            raise CheckpointError(
                f"{root}: unknown checkpoint layout (found {found or 'nothing'}); expected a Mega-ASR root "
                f"(Qwen3-ASR-*/, {ADAPTER_DIR_NAME}/, {ROUTER_DIR_NAME}/), a Qwen3-ASR directory with config.json "
                f"and safetensors, or a transformers '-hf' directory"
            )
        layout, root_layout = _base_layout(base), Layout.MEGA
        if adapter_dir is None and (root / ADAPTER_DIR_NAME).is_dir():
            adapter_dir = root / ADAPTER_DIR_NAME
        if router_file is None and (root / ROUTER_DIR_NAME).is_dir():
            router_file = _router_in_dir(root / ROUTER_DIR_NAME)

    if adapter_dir is not None:
        if not adapter_dir.is_dir():
            raise CheckpointError(f"{adapter_dir}: adapter directory not found")
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (adapter_dir / name).is_file():
                raise CheckpointError(f"{adapter_dir}: missing {name} (a Mega-ASR/peft LoRA adapter needs it)")
    if router_file is not None:
        if router_file.is_dir():
            router_file = _router_in_dir(router_file)
        if not router_file.is_file():
            raise CheckpointError(f"{router_file}: router file not found")
    return CheckpointSource(base, layout, adapter_dir, router_file, root_layout)


def _router_in_dir(folder: Path) -> Path:
    preferred = folder / ROUTER_FILE_NAME
    if preferred.is_file():
        return preferred
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    others = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(f"{folder}: expected one router .safetensors file, found {others or 'nothing'}")


def weight_files(base_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint; every shard the index lists must exist."""
    index = base_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no weight_map")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (base_dir / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{base_dir}: shard {missing[0]} is listed in {SAFETENSORS_INDEX} but absent "
                f"({len(missing)} of {len(shards)} missing); download the complete checkpoint"
            )
        return [base_dir / s for s in shards]
    single = base_dir / SINGLE_SAFETENSORS
    if single.is_file():
        return [single]
    loose = sorted(base_dir.glob("*.safetensors"))
    if loose:
        return loose
    if list(base_dir.glob("*.bin")) or list(base_dir.glob("*.pt")):
        raise CheckpointError(f"{base_dir}: only pickle weights (.bin/.pt) found; megaedge reads safetensors only")
    raise CheckpointError(f"{base_dir}: no safetensors weights found")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, object]]:
    """Yield (name, torch tensor) from safetensors files one tensor at a time (bounded memory)."""
    from safetensors import safe_open

    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
        with handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


# Fields of the original configs that transformers' native config classes do not take.
_TEXT_DROP = {
    "_name_or_path", "architectures", "dtype", "torch_dtype", "model_type", "use_bfloat16", "transformers_version",
    "decoder_sparse_step", "moe_intermediate_size", "num_experts_per_tok", "num_experts", "norm_topk_prob",
    "output_router_logits", "router_aux_loss_coef", "mlp_only_layers", "tokenizer_class",
}
_AUDIO_KEEP = {
    "num_mel_bins", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "d_model", "dropout",
    "attention_dropout", "activation_function", "activation_dropout", "scale_embedding", "initializer_range",
    "n_window", "output_dim", "n_window_infer", "downsample_hidden_size",
}


def native_config_dict(cfg: dict, layout: Layout) -> dict:
    """A dict Qwen3ASRConfig accepts, from either layout's config.json."""
    if layout is Layout.NATIVE:
        out = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "dtype")}
        return out
    thinker = cfg.get("thinker_config")
    if not isinstance(thinker, dict) or "audio_config" not in thinker or "text_config" not in thinker:
        raise CheckpointError("config.json: thinker_config lacks audio_config/text_config")
    audio = {k: v for k, v in thinker["audio_config"].items() if k in _AUDIO_KEEP}
    # Positions restart in every 100-frame chunk (13 post-conv positions); the original stores a Whisper-sized table.
    audio["max_position_embeddings"] = 13
    text = {k: v for k, v in thinker["text_config"].items() if k not in _TEXT_DROP}
    # For ASR the three MRoPE position streams are equal: plain 1-D RoPE with the checkpoint's theta.
    rope = dict(text.pop("rope_parameters", None) or {})
    legacy = text.pop("rope_scaling", None) or {}
    theta = text.pop("rope_theta", None)
    rope.update({k: v for k, v in legacy.items() if k not in ("mrope_section", "mrope_interleaved", "interleaved", "type")})
    if theta is not None:
        rope["rope_theta"] = theta
    rope.setdefault("rope_type", "default")
    text["rope_parameters"] = rope
    out = {"model_type": "qwen3_asr", "audio_config": audio, "text_config": text}
    for key in ("audio_token_id", "initializer_range", "eos_token_id", "pad_token_id", "timestamp_token_id"):
        if key in thinker:
            out[key] = thinker[key]
    if "tie_word_embeddings" in thinker["text_config"]:
        out["tie_word_embeddings"] = thinker["text_config"]["tie_word_embeddings"]
    return out
