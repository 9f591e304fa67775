import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaedge.errors import CheckpointError
from megaedge.export import layout
from megaedge.export.factory import count_parameters, make_config
from megaedge.export.loader import load_checkpoint
from megaedge.export.reference import transcribe
from tests.conftest import speechlike
from tests.export.helpers import prompt_logits


def test_layouts_are_detected(tiny_checkpoints):
    mega = layout.resolve(tiny_checkpoints["mega"])
    assert (mega.root_layout, mega.layout) == (layout.Layout.MEGA, layout.Layout.ORIGINAL)
    assert mega.adapter_dir.name == layout.ADAPTER_DIR_NAME and mega.router_file.name == layout.ROUTER_FILE_NAME
    assert layout.resolve(tiny_checkpoints["original"]).layout is layout.Layout.ORIGINAL
    assert layout.resolve(tiny_checkpoints["native"]).layout is layout.Layout.NATIVE


def test_original_and_native_layouts_give_identical_logits(tiny_checkpoints):
    audio = speechlike(1.5, seed=7)
    original = load_checkpoint(tiny_checkpoints["original"], lora="none")
    native = load_checkpoint(tiny_checkpoints["native"], lora="none")
    assert original.tokenizer.get_vocab() == native.tokenizer.get_vocab()
    assert torch.equal(prompt_logits(original, audio), prompt_logits(native, audio))


def test_explicit_adapter_and_router_beside_a_plain_base(tiny_checkpoints):
    mega = tiny_checkpoints["mega"]
    loaded = load_checkpoint(tiny_checkpoints["native"], adapter=mega / layout.ADAPTER_DIR_NAME,
                             router=mega / layout.ROUTER_DIR_NAME, lora="branches")
    assert loaded.adapter is not None and loaded.router is not None
    from_root = load_checkpoint(mega, lora="branches")
    audio = speechlike(1.0, seed=8)
    assert torch.equal(prompt_logits(loaded, audio), prompt_logits(from_root, audio))


def test_reference_routes(tiny_mega):
    loaded = load_checkpoint(tiny_mega, lora="branches")
    audio = speechlike(2.0, seed=3)
    base = transcribe(loaded, audio, route="base", max_new_tokens=6)
    merged = transcribe(loaded, audio, route="merged", max_new_tokens=6)
    auto = transcribe(loaded, audio, route="auto", max_new_tokens=6)
    assert base.route == "base" and merged.route == "merged" and 0.0 <= auto.degraded_prob <= 1.0
    assert auto.token_ids == (merged.token_ids if auto.route == "merged" else base.token_ids)
    assert base.token_ids != merged.token_ids  # the LoRA matters in this fixture
    assert base.prompt_ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n: real Qwen3 ids
    forced = transcribe(loaded, audio, route="base", language="English", context="press valve", max_new_tokens=3)
    text = loaded.tokenizer.decode(forced.prompt_ids)
    assert text.startswith("<|im_start|>system\npress valve<|im_end|>")
    assert text.endswith("<|im_start|>assistant\nlanguage English<asr_text>")


def test_parameter_counts_at_real_geometry_without_allocating():
    big = count_parameters(make_config("1.7b"))
    assert abs(big["total"] - 2.04e9) / 2.04e9 < 0.01
    assert abs(big["encoder"] - 314e6) / 314e6 < 0.01 and abs(big["llm"] - 1721e6) / 1721e6 < 0.01
    small = count_parameters(make_config("0.6b"))
    assert abs(small["total"] - 0.78e9) / 0.78e9 < 0.01


# ----------------------------------------------------------------------------------------------- bad input
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_and_unknown_layout(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "absent")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_checkpoint(tmp_path / "junk")


def test_shard_listed_in_index_but_absent(tiny_checkpoints, tmp_path):
    ckpt = _copy(tiny_checkpoints["original"], tmp_path / "c")
    index = json.loads((ckpt / layout.SAFETENSORS_INDEX).read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (ckpt / shard).unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard} is listed in model.safetensors.index.json but absent"):
        load_checkpoint(ckpt)


def test_tensor_with_wrong_shape_is_named(tiny_checkpoints, tmp_path):
    ckpt = _copy(tiny_checkpoints["native"], tmp_path / "c")
    tensors = load_file(str(ckpt / "model.safetensors"))
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    tensors[name] = torch.zeros(7, 64)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor {name} has shape \[7, 64\], expected \[128, 64\]"):
        load_checkpoint(ckpt)


def test_missing_and_foreign_tensors(tiny_checkpoints, tmp_path):
    ckpt = _copy(tiny_checkpoints["native"], tmp_path / "c")
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors.pop("model.audio_tower.ln_post.weight")
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="tensors are missing, e.g. \\['model.audio_tower.ln_post.weight'\\]"):
        load_checkpoint(ckpt)
    tensors["model.audio_tower.ln_post.weight"] = torch.ones(64)
    tensors["vision.patch_embed.weight"] = torch.ones(3)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="belong to no Qwen3-ASR module"):
        load_checkpoint(ckpt)


def test_router_pickle_inside_a_mega_root_is_refused(tiny_mega, tmp_path):
    import pickle

    root = _copy(tiny_mega, tmp_path / "root")
    (root / layout.ROUTER_DIR_NAME / layout.ROUTER_FILE_NAME).write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(root)
