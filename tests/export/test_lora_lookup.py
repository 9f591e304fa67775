"""Upstream's LoRA name lookup (issue 28, class 7): blocks / rank / alpha stored only under the normalised name
``thinker.model.layers.N...`` serve pairs saved as ``thinker.layers.N...``.

The oracle is transformers' native model (megaedge's loader with ``lora="none"``, i.e. no megaedge LoRA code) with
dense deltas added the way upstream's reader does, written out here from mega-asr.md's rules rather than calling
megaedge's adapter parser; the bundles must reproduce its greedy tokens.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from megaedge.errors import MegaedgeError
from megaedge.export import layout
from megaedge.export.factory import AdapterSpec
from tests.conftest import speechlike

CLIPS = ((2.0, 11), (8.1, 12), (17.0, 13))  # one window, a window boundary, several windows
SPEC = AdapterSpec(decoder_namespaces=("layers",), normalised_names=True)


def _native_name(raw: str) -> str:
    """Original-layout module name -> transformers' native module name (written out for the oracle only)."""
    name = raw.removeprefix("thinker.")
    for old, new in (("audio_tower.proj1", "model.multi_modal_projector.linear_1"),
                     ("audio_tower.proj2", "model.multi_modal_projector.linear_2"),
                     ("audio_tower.", "model.audio_tower."), ("model.layers.", "model.language_model.layers."),
                     ("layers.", "model.language_model.layers.")):
        if name.startswith(old):
            return new + name[len(old):]
    raise AssertionError(raw)


def upstream_deltas(adapter_dir) -> dict[str, torch.Tensor]:
    """Dense fp32 delta per native module, following upstream's lookup literally (mega-asr.md, LoRA semantics)."""
    cfg = json.loads((adapter_dir / layout.ADAPTER_CONFIG).read_text())
    blocks = json.loads((adapter_dir / layout.ADAPTER_BLOCKS).read_text())
    tensors = load_file(str(adapter_dir / layout.ADAPTER_WEIGHTS))
    r, lora_alpha = cfg["r"], cfg["lora_alpha"]
    rank_pattern, alpha_pattern = cfg.get("rank_pattern", {}), cfg.get("alpha_pattern", {})
    deltas: dict[str, torch.Tensor] = {}
    for key in tensors:
        found = re.fullmatch(r"base_model\.model\.(.+)\.lora_A\.weight", key)
        if not found:
            continue
        raw = found[1]
        normalised = raw.replace("thinker.layers.", "thinker.model.layers.")
        a = tensors[key].float()
        b = tensors[f"base_model.model.{raw}.lora_B.weight"].float()
        module_blocks = blocks.get(raw) or blocks.get(normalised)
        if module_blocks:
            delta = torch.zeros(b.shape[0], a.shape[1])
            for blk in module_blocks:
                s, e = int(blk["start"]), int(blk["end"])
                rank = int(blk.get("rank", e - s))
                alpha = int(blk.get("alpha", rank))
                delta += (b[:, s:e] @ a[s:e]) * (alpha / rank)
        else:
            rank = rank_pattern.get(raw, rank_pattern.get(normalised, r))
            alpha = alpha_pattern.get(raw, alpha_pattern.get(normalised, lora_alpha))
            delta = (b @ a) * (alpha / rank)
        target = _native_name(raw)
        deltas[target] = deltas.get(target, 0) + delta
    return deltas


@pytest.fixture(scope="module")
def normalised_ckpt(tmp_path_factory):
    from megaedge.export.factory import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("normalised") / "mega", "tiny", "mega", seed=3,
                            with_router=False, adapter_spec=SPEC)


@pytest.fixture(scope="module")
def oracle(normalised_ckpt):
    from megaedge.export.loader import load_checkpoint

    loaded = load_checkpoint(normalised_ckpt, lora="none", load_router=False)
    with torch.no_grad():
        for target, delta in upstream_deltas(normalised_ckpt / layout.ADAPTER_DIR_NAME).items():
            loaded.model.get_submodule(target).weight += delta
    return loaded


def test_factory_stores_entries_only_under_the_normalised_name(normalised_ckpt):
    adapter_dir = normalised_ckpt / layout.ADAPTER_DIR_NAME
    cfg = json.loads((adapter_dir / layout.ADAPTER_CONFIG).read_text())
    blocks = json.loads((adapter_dir / layout.ADAPTER_BLOCKS).read_text())
    keys = load_file(str(adapter_dir / layout.ADAPTER_WEIGHTS)).keys()
    decoder_keys = [k for k in keys if ".layers." in k and "audio_tower" not in k]
    assert decoder_keys and all(k.startswith("base_model.model.thinker.layers.") for k in decoder_keys)
    for table in (cfg["rank_pattern"], cfg["alpha_pattern"], blocks):
        decoder_entries = [k for k in table if "audio_tower" not in k]
        assert decoder_entries and all(k.startswith("thinker.model.layers.") for k in decoder_entries)
    # the lookup matters: the config's defaults give another scale than the normalised entries on most modules
    scales = {name: cfg["alpha_pattern"][name] / cfg["rank_pattern"][name] for name in cfg["rank_pattern"]}
    default = cfg["lora_alpha"] / cfg["r"]
    assert sum(s != default for n, s in scales.items() if n.startswith("thinker.model.layers.")) >= 5


def test_parsed_deltas_equal_upstream_lookup(normalised_ckpt):
    from megaedge.export.adapter import load_adapter

    adapter_dir = normalised_ckpt / layout.ADAPTER_DIR_NAME
    expected = upstream_deltas(adapter_dir)
    parsed = load_adapter(adapter_dir)
    assert parsed.modules.keys() == expected.keys()
    for target, delta in expected.items():
        torch.testing.assert_close(parsed.modules[target].delta(), delta, rtol=0, atol=1e-6, msg=target)


@pytest.mark.parametrize("mode", ["merged", "routed"])
def test_bundle_tokens_match_upstream_lookup_oracle(mode, normalised_ckpt, oracle, tmp_path):
    from megaedge.export.bundle import ExportOptions, export_bundle
    from megaedge.export.reference import transcribe
    from megaedge.runtime.transcriber import Transcriber

    bundle = export_bundle(normalised_ckpt, tmp_path / mode, ExportOptions(mode=mode, include_router=False))
    tr = Transcriber.from_bundle(bundle)
    kw = {"max_new_tokens": 24, "segment_seconds": None, "loop_guard": False}
    route = {"route": "lora"} if mode == "routed" else {}
    for seconds, seed in CLIPS:
        audio = speechlike(seconds, seed=seed)
        want = transcribe(oracle, audio, route="base", max_new_tokens=24).token_ids  # base = oracle's merged weights
        got = tr.transcribe(audio, **route, **kw).token_ids
        assert len(want) == 24 and got == want, (seconds, got, want)
        if mode == "routed":  # the base route stays the base model
            base = tr.transcribe(audio, route="base", **kw).token_ids
            assert base != want


def test_saved_name_wins_over_normalised_and_empty_blocks_fall_through(tmp_path):
    """``get(raw, get(normalised, r))`` for patterns, ``blocks[raw] or blocks[normalised]`` for blocks."""
    from safetensors.torch import save_file

    from megaedge.export.adapter import load_adapter

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 64, generator=gen), torch.randn(64, 4, generator=gen)
    raw = "thinker.layers.0.self_attn.q_proj"
    other = "thinker.layers.1.self_attn.q_proj"
    save_file({f"base_model.model.{n}.lora_{k}.weight": t.clone() for n in (raw, other) for k, t in (("A", a), ("B", b))},
              str(tmp_path / layout.ADAPTER_WEIGHTS))
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "bias": "none",
           "rank_pattern": {raw: 4, "thinker.model.layers.0.self_attn.q_proj": 2},
           "alpha_pattern": {raw: 12, "thinker.model.layers.0.self_attn.q_proj": 2}}
    (tmp_path / layout.ADAPTER_CONFIG).write_text(json.dumps(cfg))
    (tmp_path / layout.ADAPTER_BLOCKS).write_text(json.dumps({
        other: [], "thinker.model.layers.1.self_attn.q_proj": [{"start": 0, "end": 4, "rank": 2.9, "alpha": 5}]}))
    modules = load_adapter(tmp_path).modules
    q0 = modules["model.language_model.layers.0.self_attn.q_proj"].pairs[0]
    q1 = modules["model.language_model.layers.1.self_attn.q_proj"].pairs[0]
    assert [(blk.rank, blk.alpha) for blk in q0.blocks] == [(4, 12)]  # the saved name's entry, scale 3
    assert [(blk.rank, blk.alpha, blk.scale) for blk in q1.blocks] == [(2, 5, 2.5)]  # int(2.9) = 2, as upstream


def test_normalised_names_need_one_namespace():
    with pytest.raises(MegaedgeError, match="normalised_names needs decoder_namespaces"):
        AdapterSpec(normalised_names=True)
    with pytest.raises(MegaedgeError, match="expected a non-empty subset"):
        AdapterSpec(decoder_namespaces=("decoder",))
