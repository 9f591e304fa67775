"""One entry point for every checkpoint layout: build transformers' native Qwen3ASRForConditionalGeneration.

The model code is transformers' own (never forked). This module resolves the layout, checks every tensor name and
shape against the model BEFORE loading (reading only safetensors headers), maps original names to native ones, and
loads the adapter and router that belong to the checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from megaedge.errors import CheckpointError
from megaedge.export import layout
from megaedge.export.adapter import Adapter, LoraGate, load_adapter
from megaedge.export.tokenizer import build_processor, load_tokenizer

log = logging.getLogger("megaedge.export.loader")

LORA_MODES = ("none", "merge", "branches")
# Regexes for transformers' key_mapping (applied in order): original layout -> native names.
_KEY_MAPPING = {
    r"^thinker\.audio_tower\.proj1\.": "model.multi_modal_projector.linear_1.",
    r"^thinker\.audio_tower\.proj2\.": "model.multi_modal_projector.linear_2.",
    r"^thinker\.model\.": "model.language_model.",
    r"^thinker\.lm_head\.": "lm_head.",
    r"^thinker\.": "model.",
}


@dataclass
class LoadedCheckpoint:
    source: layout.CheckpointSource
    model: object  # Qwen3ASRForConditionalGeneration, eval mode
    processor: object  # Qwen3ASRProcessor
    adapter: Adapter | None = None
    lora_mode: str = "none"
    gate: LoraGate | None = None  # set when lora_mode == "branches"
    router: object = None  # AudioQualityRouter module
    notes: list[str] = field(default_factory=list)

    @property
    def config(self):
        return self.model.config

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def build_config(base_dir: Path, base_layout: layout.Layout):
    from transformers import Qwen3ASRConfig

    raw = layout.read_config(base_dir)
    values = layout.native_config_dict(raw, base_layout)
    # Checkpoints whose vocabulary is not Qwen's state their stop ids in generation_config.json (as HF ships them).
    generation = base_dir / "generation_config.json"
    if generation.is_file():
        try:
            gen = json.loads(generation.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{generation}: not valid JSON ({exc})") from exc
        for key in ("eos_token_id", "pad_token_id"):
            if key in gen and key not in values:
                values[key] = gen[key]
    try:
        return Qwen3ASRConfig(**values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{base_dir / 'config.json'}: not a Qwen3-ASR config ({exc})") from exc


def _expected_shapes(config) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    import torch
    from transformers import Qwen3ASRForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3ASRForConditionalGeneration(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    return shapes, optional


def check_weights(base_dir: Path, base_layout: layout.Layout, config) -> list[Path]:
    """Names and shapes of every stored tensor against the model, from safetensors headers only."""
    from safetensors import safe_open

    files = layout.weight_files(base_dir)
    expected, optional = _expected_shapes(config)
    seen: set[str] = set()
    unexpected: list[str] = []
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
        with handle:
            for stored in handle.keys():
                name = layout.original_to_native(stored) if base_layout is layout.Layout.ORIGINAL else stored
                if name not in expected:
                    unexpected.append(stored)
                    continue
                shape = tuple(handle.get_slice(stored).get_shape())
                if shape != expected[name]:
                    raise CheckpointError(
                        f"{file.name}: tensor {stored} has shape {list(shape)}, expected {list(expected[name])} "
                        f"from config.json; weights and config belong to different models"
                    )
                seen.add(name)
    if unexpected:
        raise CheckpointError(
            f"{base_dir}: {len(unexpected)} stored tensors belong to no Qwen3-ASR module, e.g. {unexpected[:3]}"
        )
    missing = sorted(set(expected) - seen - optional)
    if missing:
        raise CheckpointError(f"{base_dir}: {len(missing)} tensors are missing, e.g. {missing[:3]}")
    return files


def load_checkpoint(
    path: str | Path,
    adapter: str | Path | None = None,
    router: str | Path | None = None,
    lora: str = "merge",
    dtype: str = "float32",
    load_router: bool = True,
) -> LoadedCheckpoint:
    """Load base (+ adapter as ``lora`` says: none | merge | branches) (+ router) from any supported layout."""
    import torch
    from transformers import Qwen3ASRForConditionalGeneration
    from transformers.utils import logging as hf_logging

    if lora not in LORA_MODES:
        raise CheckpointError(f"lora mode {lora!r} is not one of {LORA_MODES}")
    source = layout.resolve(path, adapter=adapter, router=router)
    config = build_config(source.base_dir, source.layout)
    check_weights(source.base_dir, source.layout, config)
    tokenizer = load_tokenizer(source.base_dir, config)
    log.info("loading %s", source.describe())

    kwargs = {"config": config, "dtype": getattr(torch, dtype)}
    if source.layout is layout.Layout.ORIGINAL:
        kwargs["key_mapping"] = dict(_KEY_MAPPING)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the tied lm_head is reported as "missing" although it is tied on purpose
    hf_logging.disable_progress_bar()
    try:
        model = Qwen3ASRForConditionalGeneration.from_pretrained(str(source.base_dir), **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    model.eval()

    loaded = LoadedCheckpoint(source=source, model=model, processor=build_processor(tokenizer, config.audio_config.n_window))
    if source.adapter_dir is not None and lora != "none":
        loaded.adapter = load_adapter(source.adapter_dir)
        if lora == "merge":
            loaded.adapter.merge_into(model)
        else:
            loaded.gate = loaded.adapter.attach_branches(model)
        loaded.lora_mode = lora
        log.info("adapter: %s (%s)", loaded.adapter.summary(), lora)
    elif lora != "none":
        loaded.notes.append("no adapter in this checkpoint: base model only")
    if load_router and source.router_file is not None:
        from megaedge.export.router import load_router as _load_router

        loaded.router, _ = _load_router(source.router_file)
    return loaded


def save_native(loaded: LoadedCheckpoint, out_dir: Path, dtype: str = "float32", shard_bytes: int = 2 * 1024**3) -> None:
    """Write the model as a plain native transformers checkpoint (sharded safetensors + index, config, processor).

    Written by hand because save_pretrained re-applies the load-time key_mapping in reverse, which would give
    back original-layout names.
    """
    import json

    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    target = getattr(torch, dtype)
    state = loaded.model.state_dict()
    if loaded.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards: list[dict] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * torch.finfo(target).bits // 8
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().to(target).contiguous()
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = layout.SINGLE_SAFETENSORS if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        (out_dir / name).chmod(0o644)  # safetensors writes 0600; the checkpoint's other files are 0644
        weight_map.update(dict.fromkeys(shard, name))
    if len(shards) > 1:
        (out_dir / layout.SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    config = loaded.config.to_dict()
    config["dtype"] = dtype
    config.pop("transformers_version", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    loaded.processor.save_pretrained(str(out_dir))
