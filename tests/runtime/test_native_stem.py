"""The native convolution stem (runtime/native_stem.py, kernels/conv_stem.h, export/native_stem.py): the kernel
against a float64 emulation of its int8 arithmetic and against the float stem, on every build; the export's body
graph and sidecar; the runtime's choice of encoder graphs; encoder outputs and tokens against onnxruntime's float
stem on the trained fixture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megaedge.errors import MegaedgeError
from megaedge.export.native_stem import quantize_conv, stem_arrays
from megaedge.runtime import features, kernels, manifest, native_stem, prepared, segmenting
from megaedge.runtime.transcriber import Transcriber
from tests.conftest import heldout_clips, int8_bundle_from, speechlike
from tests.runtime.kernel_builds import VARIANTS, needs_kernel

FIELDS = ("w1", "b1", "w2", "s2", "b2", "w3", "s3", "b3")


def _stem(channels: int, seed: int = 0):
    torch.manual_seed(seed)
    convs = [torch.nn.Conv2d(1, channels, 3, 2, 1), torch.nn.Conv2d(channels, channels, 3, 2, 1),
             torch.nn.Conv2d(channels, channels, 3, 2, 1)]
    arrays = stem_arrays(*[p.detach().numpy() for conv in convs for p in (conv.weight, conv.bias)])
    return convs, arrays


def _chunks(mel: np.ndarray, frames: int) -> torch.Tensor:
    windows, bins, width = mel.shape
    x = torch.from_numpy(mel).reshape(windows, bins, width // frames, frames).permute(0, 2, 1, 3)
    return x.reshape(-1, 1, bins, frames).double()


def _as_conv_out_rows(x: torch.Tensor) -> np.ndarray:
    n, c, f, t = x.shape
    return x.permute(0, 3, 1, 2).reshape(n, t, c * f).float().numpy()


def _float_stem(convs, mel, frames):
    gelu = torch.nn.functional.gelu
    with torch.no_grad():
        x = _chunks(mel, frames)
        for conv in convs:
            x = gelu(torch.nn.functional.conv2d(x, conv.weight.double(), conv.bias.double(), 2, 1))
    return _as_conv_out_rows(x)


def _fake_quantize(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., C] quantized per block of channels as me_quantize does (symmetric int8), then dequantized."""
    c = x.shape[-1]
    cp = -(-c // block) * block
    xb = torch.nn.functional.pad(x, (0, cp - c)).reshape(*x.shape[:-1], cp // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.where(amax > 0, torch.clamp(torch.round(xb * 127 / amax), -127, 127), torch.zeros_like(xb))
    return (q * amax / 127).reshape(*x.shape[:-1], cp)[..., :c]


def _dequantized(weight: np.ndarray, scales: np.ndarray, channels: int) -> torch.Tensor:
    w = (weight.astype(np.float64) - 128) * scales[:, :, None]
    return torch.from_numpy(w.reshape(channels, 3, 3, -1)[..., :channels].transpose(0, 3, 1, 2).copy())


def _emulated_stem(convs, arrays, mel, frames):
    """The kernel's arithmetic in float64: float first convolution, then per (position, block) int8 inputs times the
    int8 weights for the other two."""
    gelu, block, channels = torch.nn.functional.gelu, int(arrays["block"]), arrays["b1"].shape[0]
    with torch.no_grad():
        first = convs[0]
        x = gelu(torch.nn.functional.conv2d(_chunks(mel, frames), first.weight.double(), first.bias.double(), 2, 1))
        for w, s, b in (("w2", "s2", "b2"), ("w3", "s3", "b3")):
            x = _fake_quantize(x.permute(0, 2, 3, 1), block).permute(0, 3, 1, 2)
            x = gelu(torch.nn.functional.conv2d(x, _dequantized(arrays[w], arrays[s], channels),
                                                torch.from_numpy(arrays[b]).double(), 2, 1))
    return _as_conv_out_rows(x)


def _weights(arrays, bins, frames) -> kernels.StemWeights:
    return kernels.StemWeights(**{k: arrays[k] for k in FIELDS}, block=int(arrays["block"]), bins=bins,
                               chunk_frames=frames)


def _rel_rms(a, b) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2) / np.mean(b.astype(np.float64) ** 2)))


def test_conv_weights_are_blocks_of_tap_channels_padded_with_zeros():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((5, 40, 3, 3)).astype(np.float32)
    q, scales = quantize_conv(weight, 64)
    assert q.shape == (5, 9, 64) and scales.shape == (5, 9)  # one block of 64 (40 channels + 24 zeros) per tap
    values = (q.astype(np.float64) - 128) * scales[:, :, None]
    assert np.all(q[:, :, 40:] == 128)
    taps = weight.transpose(0, 2, 3, 1).reshape(5, 9, 40)
    assert np.all(np.abs(values[:, :, :40] - taps) <= scales[:, :, None] / 2 + 1e-7)
    assert np.all(np.abs(q.astype(int) - 128).max(axis=2) == 127)  # each block's largest weight takes the full range


@needs_kernel
@pytest.mark.parametrize("built", VARIANTS)
@pytest.mark.parametrize("channels,bins,frames,windows,chunks", [(48, 128, 100, 2, 3), (130, 32, 100, 1, 2),
                                                                 (64, 40, 36, 3, 1)])
def test_stem_is_the_int8_arithmetic_on_every_build(built, channels, bins, frames, windows, chunks):
    """Blocks of 64 (48 channels: one padded block; 64: exact) and 128 (130: two blocks, the second nearly empty),
    odd map sizes (bins 40, 36 frames) and several windows of several chunks."""
    convs, arrays = _stem(channels)
    mel = np.random.default_rng(1).standard_normal((windows, bins, chunks * frames)).astype(np.float32)
    got = built.conv_stem(mel, _weights(arrays, bins, frames), threads=2)
    emulated, exact = _emulated_stem(convs, arrays, mel, frames), _float_stem(convs, mel, frames)
    assert got.shape == exact.shape
    # Rounding differs from float64 only at quantization boundaries, where one step flips.
    assert _rel_rms(got, emulated) < 2e-3
    assert _rel_rms(got, exact) < 3e-2
    assert _rel_rms(emulated, exact) < 3e-2


@needs_kernel
def test_stem_gives_the_same_bits_on_every_build():
    """Products sum each block's integers exactly and scale them in block order, and the float parts round once per
    operation (-ffp-contract=off), so vector builds equal the portable C build bit for bit (ARM: the crosscheck)."""
    portable = next((p.values[0] for p in VARIANTS if p.values[0].isa == "portable-c"), None)
    if portable is None:
        pytest.skip("the portable build does not build here")
    _, arrays = _stem(130)
    mel = np.random.default_rng(4).standard_normal((1, 32, 200)).astype(np.float32)
    want = portable.conv_stem(mel, _weights(arrays, 32, 100), threads=2)
    for param in VARIANTS:
        assert np.array_equal(param.values[0].conv_stem(mel, _weights(arrays, 32, 100), threads=2), want), param.id


@needs_kernel
def test_stem_does_not_depend_on_the_thread_count():
    _, arrays = _stem(48)
    mel = np.random.default_rng(2).standard_normal((2, 128, 300)).astype(np.float32)
    built = VARIANTS[0].values[0]
    one = built.conv_stem(mel, _weights(arrays, 128, 100), threads=1)
    assert np.array_equal(one, built.conv_stem(mel, _weights(arrays, 128, 100), threads=3))


def test_stem_weights_are_checked():
    _, arrays = _stem(48)
    bad = {**{k: arrays[k] for k in FIELDS}, "w2": arrays["w2"][:, :-1]}
    with pytest.raises(ValueError, match="w2"):
        kernels.StemWeights(**bad, block=64, bins=128, chunk_frames=100)


# ------------------------------------------------------------------------------------------ bundles
@pytest.fixture(scope="module")
def fixture_int8(fixture_bundles, tmp_path_factory):
    return int8_bundle_from(fixture_bundles["merged"], tmp_path_factory.mktemp("stem"))


def test_cpu_recipe_writes_the_stem_and_a_body_graph_on_the_same_weights(fixture_int8):
    info = manifest.read(fixture_int8)  # the sidecar and body graph are listed with their sha256
    stem = info.encoder["native_stem"]
    assert stem["channels"] == 48 and stem["block"] == 64 and (fixture_int8 / stem["file"]).is_file()
    body, whole = info.graph("encoder_body"), info.graph("encoder")
    assert body.data_files == whole.data_files  # no second copy of the encoder's weights
    assert body.input("stem_features").shape == ("stem_rows", 13, 48 * 16)
    assert {"mel", "valid_tokens"} <= set(body.input_names)
    assert native_stem.available(info) is None


def test_float_and_trt_bundles_have_no_native_stem(fixture_bundles, tmp_path_factory):
    assert native_stem.available(manifest.read(fixture_bundles["merged"], verify=False)) is not None
    trt = int8_bundle_from(fixture_bundles["merged"], tmp_path_factory.mktemp("trt"), recipe="tensorrt")
    info = manifest.read(trt, verify=False)
    assert "encoder_body" not in info.graphs and "native_stem" not in info.encoder


@needs_kernel
def test_native_stem_keeps_the_encoder_and_the_tokens_on_heldout_speech(fixture_bundles, fixture_int8):
    """Both stems are int8 approximations of the float one, so neither is the other's oracle: FP32 is. A greedy
    transcript that flips on one near-tie diverges for the rest of the clip, so whole transcripts are counted: the
    native stem must give FP32's transcript about as often as onnxruntime's stem does (near-ties flip either
    way: two clips of twelve); a broken stem gives almost none."""
    native = Transcriber.from_bundle(fixture_int8, stem="native")
    ort = Transcriber.from_bundle(fixture_int8, stem="ort")
    fp32 = Transcriber.from_bundle(fixture_bundles["merged"])
    assert native.stem is not None and ort.stem is None
    assert "encoder" in native.sessions.closed and "encoder_body" in ort.sessions.closed
    clips = heldout_clips(4, 8)
    same_native = same_ort = 0
    for item in clips:
        want = fp32.transcribe(item["path"]).token_ids
        same_native += native.transcribe(item["path"]).token_ids == want
        same_ort += ort.transcribe(item["path"]).token_ids == want
    feats = features.asr_log_mel(speechlike(12.0, seed=3))
    mel, valid = segmenting.encoder_windows(feats)
    got, want = np.concatenate(native.encode_windows(mel, valid)), np.concatenate(ort.encode_windows(mel, valid))
    cosine = float(np.sum(got * want) / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine > 0.999, cosine
    assert same_native >= same_ort - 2 and same_native >= 0.75 * len(clips), (same_native, same_ort, len(clips))


@needs_kernel
def test_routed_bundle_runs_its_gate_through_the_body_graph(fixture_bundles, tmp_path_factory):
    """The conv stem is never adapted (mega-asr.md), conv_out is: the body graph takes lora_gate, and both routes'
    encoder outputs follow onnxruntime's float stem."""
    routed = int8_bundle_from(fixture_bundles["routed"], tmp_path_factory.mktemp("routed_stem"))
    native = Transcriber.from_bundle(routed, stem="native")
    ort = Transcriber.from_bundle(routed, stem="ort")
    assert "lora_gate" in native.manifest.graph("encoder_body").input_names
    mel, valid = segmenting.encoder_windows(features.asr_log_mel(speechlike(9.0, seed=6)))
    outputs = {}
    for gate in (0.0, 1.0):
        got = np.concatenate(native.encode_windows(mel, valid, gate))
        want = np.concatenate(ort.encode_windows(mel, valid, gate))
        outputs[gate] = got
        assert float(np.sum(got * want) / np.linalg.norm(got) / np.linalg.norm(want)) > 0.999
    assert not np.allclose(outputs[0.0], outputs[1.0])  # the gate reaches the body's LoRA branches


@needs_kernel
def test_stem_engine_choice_is_checked(fixture_bundles, fixture_int8):
    with pytest.raises(MegaedgeError, match="stem engine"):
        Transcriber.from_bundle(fixture_int8, stem="fast")
    with pytest.raises(MegaedgeError, match="no native stem"):
        Transcriber.from_bundle(fixture_bundles["merged"], stem="native")
    assert Transcriber.from_bundle(fixture_bundles["merged"]).stem is None  # auto: the float bundle's encoder


@needs_kernel
def test_prepare_prepares_the_encoder_graph_this_machine_runs(fixture_int8, monkeypatch):
    monkeypatch.setattr(native_stem, "FAST_ISAS", (kernels.load().isa,))
    index = prepared.prepare(fixture_int8)
    assert "encoder_body" in index["graphs"] and "encoder" not in index["graphs"]
    monkeypatch.setattr(native_stem, "FAST_ISAS", ())
    index = prepared.prepare(fixture_int8)
    assert "encoder" in index["graphs"] and "encoder_body" not in index["graphs"]
    prepared.remove(fixture_int8)
