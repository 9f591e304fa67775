"""Mega-ASR LoRA adapters: parsing, exact fp32 merge, and gated low-rank branches.

What the real adapter has (mega-asr.md) and this module handles:
* per-module rank and alpha from ``rank_pattern`` / ``alpha_pattern`` (exact module names, or peft-style
  suffix patterns), ``target_modules: ".*"``, optional ``use_rslora``;
* keys ``base_model.model.thinker.<module>.lora_A.weight`` and the same without ``thinker.`` (upstream training
  script), with or without a peft adapter name before ``.weight``;
* two decoder namespaces, ``thinker.layers.N`` and ``thinker.model.layers.N``: both add to the same module;
* ``mega_lora_blocks.json``: per module, rank slices ``{start, end, rank, alpha}`` each with its own scale;
* upstream's name lookup: a module's blocks / rank / alpha are looked up under its saved name, then under the
  normalised name (``thinker.layers.`` -> ``thinker.model.layers.``), so an entry stored only under the second
  decoder namespace also serves the first namespace's pair.

Every (A, B) pair of a module and every block folds into ONE (A, B) per module with the scales inside B, so
``delta_W = B @ A`` exactly; routed bundles use that as a gated branch ``y = W x + g * B (A x)``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from megaedge.errors import CheckpointError
from megaedge.export import layout

log = logging.getLogger("megaedge.export.adapter")

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Block:
    start: int
    end: int
    rank: float
    alpha: float

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)


@dataclass
class LoraPair:
    """One saved (A, B) pair: ``raw_name`` is the module name as saved (peft prefix removed)."""

    raw_name: str
    a: object = None  # torch.Tensor [r, in]
    b: object = None  # torch.Tensor [out, r]
    blocks: tuple[Block, ...] = ()


@dataclass
class ModuleLora:
    """All pairs that adapt one native module, e.g. ``model.language_model.layers.3.self_attn.q_proj``."""

    target: str
    pairs: list[LoraPair] = field(default_factory=list)

    def folded(self, dtype=None):
        """(A [R, in], B [out, R]) in fp32 (or ``dtype``) with every block's scale folded into B: delta = B @ A."""
        import torch

        dtype = dtype or torch.float32
        a_parts, b_parts = [], []
        for pair in self.pairs:
            a32, b32 = pair.a.to(dtype), pair.b.to(dtype)
            for block in pair.blocks:
                a_parts.append(a32[block.start : block.end])
                b_parts.append(b32[:, block.start : block.end] * block.scale)
        return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)

    def delta(self, dtype=None):
        a, b = self.folded(dtype)
        return b @ a

    @property
    def rank(self) -> int:
        return sum(blk.end - blk.start for pair in self.pairs for blk in pair.blocks)


def native_module_name(raw: str) -> str | None:
    """Native transformers module for a saved LoRA module name, or None when it names no Qwen3-ASR module."""
    name = raw[len("thinker.") :] if raw.startswith("thinker.") else raw
    if name.startswith(("model.language_model.", "model.audio_tower.", "model.multi_modal_projector.")):
        return name  # adapter trained on the native model
    if name.startswith("audio_tower.proj1"):
        return "model.multi_modal_projector.linear_1" + name[len("audio_tower.proj1") :]
    if name.startswith("audio_tower.proj2"):
        return "model.multi_modal_projector.linear_2" + name[len("audio_tower.proj2") :]
    if name.startswith("audio_tower."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    if name.startswith("layers."):  # the second decoder namespace, thinker.layers.N
        return "model.language_model." + name
    if name == "lm_head":
        return name
    return None


def normalised_name(raw: str) -> str:
    """Upstream's second lookup name: ``thinker.layers.`` -> ``thinker.model.layers.`` (mega-asr.md, LoRA semantics).

    Adapters saved without the ``thinker.`` prefix get the same rule on their bare names (``layers.N`` ->
    ``model.layers.N``), so both spellings of one adapter resolve alike.
    """
    if raw.startswith("thinker."):
        return raw.replace("thinker.layers.", "thinker.model.layers.")
    return "model." + raw if raw.startswith("layers.") else raw


def _spellings(name: str) -> tuple[str, ...]:
    bare = name[len("thinker.") :] if name.startswith("thinker.") else name
    return (name, _PEFT_PREFIX + name, bare, "thinker." + bare)


def _pattern_value(patterns: dict, raw: str, target: str, saved_names: frozenset[str] = frozenset(),
                   skip_empty: bool = False):
    """Exact lookup under the saved name, then under upstream's normalised name (each with/without the thinker. /
    peft prefix), then the native name; then peft-style suffix patterns.

    The saved name wins over the normalised one, as upstream's ``get(raw, get(normalised, default))``;
    ``skip_empty`` follows upstream's ``blocks[raw] or blocks[normalised]`` for the blocks file, where an empty
    entry under the saved name falls through to the normalised one. A key that is itself the exact name of a saved
    module is never used as a suffix pattern: without the ``thinker.`` prefix, ``layers.1.q_proj`` (one decoder
    namespace) would otherwise also match ``model.layers.1.q_proj`` (the other).
    """
    if not patterns:
        return None
    candidates = _spellings(raw)
    normalised = normalised_name(raw)
    if normalised != raw:
        candidates += _spellings(normalised)
    for candidate in (*candidates, target):
        if candidate in patterns and not (skip_empty and not patterns[candidate]):
            return patterns[candidate]
    for pattern, value in patterns.items():
        if pattern in saved_names:
            continue
        try:
            if re.match(rf"(.*\.)?({pattern})$", raw):
                return value
        except re.error:
            continue
    return None


def _parse_blocks(raw_blocks, rank: int, name: str) -> tuple[Block, ...]:
    blocks = []
    for item in raw_blocks:
        try:
            start, end = int(item["start"]), int(item["end"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{layout.ADAPTER_BLOCKS}: block {item!r} of {name} lacks integer start/end") from exc
        try:  # int(), as upstream reads them: a rank or alpha of 2.5 in the file scales as 2
            blk_rank = int(item.get("rank", end - start))
            blk_alpha = int(item.get("alpha", blk_rank))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{layout.ADAPTER_BLOCKS}: block {item!r} of {name} has a non-numeric rank or "
                                  f"alpha") from exc
        if not (0 <= start < end <= rank) or blk_rank <= 0:
            raise CheckpointError(
                f"{layout.ADAPTER_BLOCKS}: block [{start}, {end}) of {name} is outside rank {rank} or has rank <= 0"
            )
        blocks.append(Block(start, end, blk_rank, blk_alpha))
    blocks.sort(key=lambda b: b.start)
    for left, right in zip(blocks, blocks[1:]):
        if right.start < left.end:
            raise CheckpointError(f"{layout.ADAPTER_BLOCKS}: blocks of {name} overlap at [{right.start}, {left.end})")
    return tuple(blocks)


@dataclass
class Adapter:
    directory: Path
    config: dict
    modules: dict[str, ModuleLora]

    @property
    def num_pairs(self) -> int:
        return sum(len(m.pairs) for m in self.modules.values())

    def num_parameters(self) -> int:
        return sum(p.a.numel() + p.b.numel() for m in self.modules.values() for p in m.pairs)

    def summary(self) -> str:
        ranks = sorted({m.rank for m in self.modules.values()})
        return (
            f"{len(self.modules)} modules, {self.num_pairs} A/B pairs, {self.num_parameters() / 1e6:.2f}M params, "
            f"folded ranks {ranks[0]}..{ranks[-1]}"
        )

    # ----------------------------------------------------------------------------------------- application
    def check_against(self, model) -> None:
        """Every target must be an nn.Linear of the model with matching shapes (names the first mismatch)."""
        import torch

        named = dict(model.named_modules())
        absent = sorted(m.pairs[0].raw_name for t, m in self.modules.items() if not isinstance(named.get(t), torch.nn.Linear))
        if absent:
            raise CheckpointError(
                f"{len(absent)} adapter modules match no linear layer of this model, e.g. {absent[:3]}; "
                f"is the adapter for another architecture?"
            )
        for target, mod in self.modules.items():
            linear = named[target]
            out_f, in_f = linear.weight.shape
            for pair in mod.pairs:
                if pair.a.shape[1] != in_f or pair.b.shape[0] != out_f:
                    raise CheckpointError(
                        f"adapter for a different base: {pair.raw_name} has lora_A {tuple(pair.a.shape)} / lora_B "
                        f"{tuple(pair.b.shape)} but {target} is {out_f}x{in_f} (expected lora_A [r, {in_f}], "
                        f"lora_B [{out_f}, r])"
                    )

    def merge_into(self, model) -> None:
        """W += B @ A in fp32 (exact up to fp32 rounding), in place; the model must be fp32 for an exact merge."""
        import torch

        self.check_against(model)
        named = dict(model.named_modules())
        with torch.no_grad():
            for target, mod in self.modules.items():
                weight = named[target].weight
                acc = torch.promote_types(weight.dtype, torch.float32)  # never merge in bf16/fp16
                merged = weight.to(acc) + mod.delta(acc)
                weight.copy_(merged.to(weight.dtype))

    def attach_branches(self, model, gate=None) -> LoraGate:
        """Replace each target Linear by a GatedLoraLinear sharing one gate; returns the gate."""
        import torch

        self.check_against(model)
        gate = gate or LoraGate(torch.ones(()))
        for target, mod in self.modules.items():
            linear = model.get_submodule(target)
            a, b = mod.folded(torch.promote_types(linear.weight.dtype, torch.float32))
            model.set_submodule(target, GatedLoraLinear(linear, a, b, gate))
        return gate


class LoraGate:
    """Shared gate for every branch: g=0 is the base model, g=1 the LoRA model. Export code may set ``value`` to
    a graph input so one ONNX graph serves both routes."""

    def __init__(self, value):
        self.value = value

    def set(self, on: bool | float) -> None:
        import torch

        self.value = torch.tensor(float(on))


def _gated_linear_class():
    import torch

    class _GatedLoraLinear(torch.nn.Module):
        """y = base(x) + g * (x A^T) B^T; base weights untouched so both routes share one copy."""

        def __init__(self, base: torch.nn.Linear, a, b, gate: LoraGate):
            super().__init__()
            self.base = base
            self.lora_a = torch.nn.Parameter(a.to(base.weight.dtype), requires_grad=False)
            self.lora_b = torch.nn.Parameter(b.to(base.weight.dtype), requires_grad=False)
            self._gate = gate

        @property
        def weight(self):  # code that inspects .weight (e.g. dtype checks) sees the base weight
            return self.base.weight

        def forward(self, x):
            low = torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_a), self.lora_b)
            return self.base(x) + self._gate.value.to(x.dtype) * low

    return _GatedLoraLinear


def GatedLoraLinear(base, a, b, gate):  # noqa: N802 - factory that keeps torch out of import time
    return _gated_linear_class()(base, a, b, gate)


def load_adapter(directory: str | Path) -> Adapter:
    """Read a Mega-ASR / peft LoRA adapter directory; raise CheckpointError with the offending names."""
    import torch  # noqa: F401  (safetensors 'pt' framework)

    folder = Path(directory)
    cfg_path = folder / layout.ADAPTER_CONFIG
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{cfg_path}: missing") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({exc.msg})") from exc
    if config.get("peft_type", "LORA").upper() != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {config.get('peft_type')} is not LORA")
    if config.get("fan_in_fan_out"):
        raise CheckpointError(f"{cfg_path}: fan_in_fan_out=true is not a Qwen3-ASR (nn.Linear) adapter")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{cfg_path}: bias={config.get('bias')!r} adapters are not supported (expected 'none')")

    blocks_path = folder / layout.ADAPTER_BLOCKS
    blocks_cfg = {}
    if blocks_path.is_file():
        try:
            blocks_cfg = json.loads(blocks_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{blocks_path}: not valid JSON ({exc.msg})") from exc
        if not isinstance(blocks_cfg, dict):
            raise CheckpointError(f"{blocks_path}: expected an object of module name -> list of blocks")
    else:  # a plain peft adapter has none; a Mega-ASR adapter copied without it merges with other scales
        log.warning("%s: no %s: every module takes one rank and alpha from %s (a Mega-ASR adapter has per-block "
                    "scales there; copy the file along if this one had it)", folder, layout.ADAPTER_BLOCKS,
                    cfg_path.name)

    pairs: dict[str, LoraPair] = {}
    unmatched: list[str] = []
    for key, tensor in layout.iter_tensors([folder / layout.ADAPTER_WEIGHTS]):
        found = _KEY.match(key)
        if not found:
            unmatched.append(key)
            continue
        raw = found["module"]
        raw = raw[len(_PEFT_PREFIX) :] if raw.startswith(_PEFT_PREFIX) else raw
        pair = pairs.setdefault(raw, LoraPair(raw))
        setattr(pair, found["kind"].lower(), tensor)
    if unmatched:
        raise CheckpointError(
            f"{folder / layout.ADAPTER_WEIGHTS}: {len(unmatched)} tensors are not lora_A/lora_B weights, "
            f"e.g. {unmatched[:3]}"
        )
    if not pairs:
        raise CheckpointError(f"{folder / layout.ADAPTER_WEIGHTS}: no LoRA tensors")

    default_r = config.get("r", 8)
    default_alpha = config.get("lora_alpha", default_r)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    modules: dict[str, ModuleLora] = {}
    no_target: list[str] = []
    saved_names = frozenset(pairs) | frozenset(_PEFT_PREFIX + name for name in pairs)
    for raw, pair in pairs.items():
        if pair.a is None or pair.b is None:
            raise CheckpointError(f"adapter module {raw} has only lora_{'B' if pair.a is None else 'A'}")
        if pair.a.ndim != 2 or pair.b.ndim != 2 or pair.a.shape[0] != pair.b.shape[1]:
            raise CheckpointError(
                f"adapter module {raw}: lora_A {tuple(pair.a.shape)} and lora_B {tuple(pair.b.shape)} disagree on rank"
            )
        target = native_module_name(raw)
        if target is None:
            no_target.append(raw)
            continue
        rank = int(pair.a.shape[0])
        # The blocks file is keyed by exact module names (as upstream reads it): no suffix patterns there.
        block_list = _pattern_value(blocks_cfg, raw, target, saved_names=frozenset(blocks_cfg), skip_empty=True)
        if block_list:
            pair.blocks = _parse_blocks(block_list, rank, raw)
        else:
            r = _pattern_value(rank_pattern, raw, target, saved_names) or default_r
            alpha = _pattern_value(alpha_pattern, raw, target, saved_names)
            alpha = default_alpha if alpha is None else alpha
            if int(r) != rank:
                log.warning("%s: rank_pattern says r=%s but lora_A has rank %d; scaling uses r=%s", raw, r, rank, r)
            scale_rank = math.sqrt(float(r)) if rslora else float(r)
            pair.blocks = (Block(0, rank, scale_rank, float(alpha)),)
        modules.setdefault(target, ModuleLora(target)).pairs.append(pair)
    if no_target:
        raise CheckpointError(
            f"{len(no_target)} adapter modules match no Qwen3-ASR module, e.g. {sorted(no_target)[:3]}"
        )
    return Adapter(folder, config, modules)
