import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaedge.errors import CheckpointError
from megaedge.export import layout
from megaedge.export.adapter import load_adapter, native_module_name
from megaedge.export.loader import load_checkpoint
from tests.conftest import speechlike
from tests.export.helpers import prompt_logits


def test_merge_is_exact_against_runtime_branches(tiny_mega):
    audio = speechlike(2.0, seed=1)
    merged = load_checkpoint(tiny_mega, lora="merge")
    branches = load_checkpoint(tiny_mega, lora="branches")
    base = load_checkpoint(tiny_mega, lora="none")
    merged_logits, branch_logits = prompt_logits(merged, audio), prompt_logits(branches, audio)
    diff = (merged_logits - branch_logits).abs().max().item()
    assert diff <= 1e-5, diff
    # and the LoRA really changes the model (the comparison is not vacuous)
    assert (merged_logits - prompt_logits(base, audio)).abs().max().item() > 1e-2
    branches.gate.set(False)
    assert (prompt_logits(branches, audio) - prompt_logits(base, audio)).abs().max().item() == 0.0


def test_merge_math_is_exact_in_float64(tiny_mega):
    """In float64 the fp32 rounding disappears: what remains is the merge itself (and it is exact)."""
    audio = speechlike(1.0, seed=2)
    merged = load_checkpoint(tiny_mega, lora="merge", dtype="float64")
    branches = load_checkpoint(tiny_mega, lora="branches", dtype="float64")
    assert (prompt_logits(merged, audio) - prompt_logits(branches, audio)).abs().max().item() < 1e-10


def test_both_decoder_namespaces_add_and_blocks_scale(tiny_mega):
    adapter = load_adapter(tiny_mega / layout.ADAPTER_DIR_NAME)
    cfg = json.loads((tiny_mega / layout.ADAPTER_DIR_NAME / layout.ADAPTER_CONFIG).read_text())
    blocks = json.loads((tiny_mega / layout.ADAPTER_DIR_NAME / layout.ADAPTER_BLOCKS).read_text())
    tensors = load_file(str(tiny_mega / layout.ADAPTER_DIR_NAME / layout.ADAPTER_WEIGHTS))
    target = "model.language_model.layers.1.self_attn.q_proj"
    expected = torch.zeros_like(adapter.modules[target].delta())
    for raw in ("thinker.layers.1.self_attn.q_proj", "thinker.model.layers.1.self_attn.q_proj"):
        a = tensors[f"base_model.model.{raw}.lora_A.weight"]
        b = tensors[f"base_model.model.{raw}.lora_B.weight"]
        if raw in blocks:
            for blk in blocks[raw]:
                s, e = blk["start"], blk["end"]
                expected += b[:, s:e] @ a[s:e] * (blk["alpha"] / blk["rank"])
        else:
            expected += b @ a * (cfg["alpha_pattern"][raw] / cfg["rank_pattern"][raw])
    assert len(adapter.modules[target].pairs) == 2
    torch.testing.assert_close(adapter.modules[target].delta(), expected, rtol=0, atol=1e-6)
    assert any(name in blocks for name in cfg["rank_pattern"])  # the fixture really exercises blocks


def test_name_mapping_covers_every_namespace():
    assert native_module_name("thinker.layers.3.mlp.up_proj") == "model.language_model.layers.3.mlp.up_proj"
    assert native_module_name("thinker.model.layers.3.mlp.up_proj") == "model.language_model.layers.3.mlp.up_proj"
    assert native_module_name("layers.3.mlp.up_proj") == "model.language_model.layers.3.mlp.up_proj"  # no thinker.
    assert native_module_name("thinker.audio_tower.proj2") == "model.multi_modal_projector.linear_2"
    assert native_module_name("audio_tower.layers.0.fc1") == "model.audio_tower.layers.0.fc1"
    assert native_module_name("visual.blocks.0.attn") is None


def test_adapter_without_thinker_prefix_gives_same_delta(tiny_mega, tmp_path):
    src = tiny_mega / layout.ADAPTER_DIR_NAME
    dst = tmp_path / "noprefix"
    dst.mkdir()
    tensors = {k.replace("base_model.model.thinker.", "base_model.model."): v
               for k, v in load_file(str(src / layout.ADAPTER_WEIGHTS)).items()}
    save_file(tensors, str(dst / layout.ADAPTER_WEIGHTS))
    for name in (layout.ADAPTER_CONFIG, layout.ADAPTER_BLOCKS):
        text = (src / name).read_text().replace('"thinker.', '"')
        (dst / name).write_text(text)
    a, b = load_adapter(src), load_adapter(dst)
    assert a.modules.keys() == b.modules.keys()
    for target in a.modules:
        torch.testing.assert_close(a.modules[target].delta(), b.modules[target].delta(), rtol=0, atol=0)


def _copy_adapter(tiny_mega, tmp_path):
    dst = tmp_path / "adapter"
    shutil.copytree(tiny_mega / layout.ADAPTER_DIR_NAME, dst)
    return dst


def test_keys_matching_no_module_are_listed(tiny_mega, tmp_path):
    dst = _copy_adapter(tiny_mega, tmp_path)
    tensors = load_file(str(dst / layout.ADAPTER_WEIGHTS))
    tensors["base_model.model.visual.blocks.0.qkv.lora_A.weight"] = torch.zeros(4, 8)
    tensors["base_model.model.visual.blocks.0.qkv.lora_B.weight"] = torch.zeros(8, 4)
    save_file(tensors, str(dst / layout.ADAPTER_WEIGHTS))
    with pytest.raises(CheckpointError, match=r"match no Qwen3-ASR module, e.g. \['visual.blocks.0.qkv'\]"):
        load_adapter(dst)


def test_adapter_for_a_different_base_names_the_shapes(tiny_mega, tmp_path):
    dst = _copy_adapter(tiny_mega, tmp_path)
    tensors = load_file(str(dst / layout.ADAPTER_WEIGHTS))
    key = "base_model.model.thinker.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], 2048)
    save_file(tensors, str(dst / layout.ADAPTER_WEIGHTS))
    with pytest.raises(CheckpointError, match=r"adapter for a different base: .*q_proj has lora_A \(\d+, 2048\)"):
        load_checkpoint(tiny_mega, adapter=dst, lora="merge")


def test_blocks_outside_rank_rejected(tiny_mega, tmp_path):
    dst = _copy_adapter(tiny_mega, tmp_path)
    blocks = json.loads((dst / layout.ADAPTER_BLOCKS).read_text())
    name = next(iter(blocks))
    blocks[name] = [{"start": 0, "end": 999, "rank": 999, "alpha": 1}]
    (dst / layout.ADAPTER_BLOCKS).write_text(json.dumps(blocks))
    with pytest.raises(CheckpointError, match="outside rank"):
        load_adapter(dst)


def test_an_adapter_without_its_blocks_file_says_so(tmp_path, caplog):
    """Without mega_lora_blocks.json every module merges with one alpha: a Mega-ASR adapter copied without it
    changed the model silently (a new user's probe: held-out WER 25.68 -> 26.44)."""
    import logging
    import shutil

    from megaedge import fixture
    from megaedge.export import layout
    from megaedge.export.adapter import load_adapter

    src = fixture.model_dir() / layout.ADAPTER_DIR_NAME
    copy = tmp_path / "adapter"
    shutil.copytree(src, copy)
    (copy / layout.ADAPTER_BLOCKS).unlink()
    with caplog.at_level(logging.WARNING, logger="megaedge.export.adapter"):
        load_adapter(copy)
    assert any("no mega_lora_blocks.json" in m for m in caplog.messages)
