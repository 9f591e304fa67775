"""The native CPU decode step (runtime/native_decode.py + assets/kernels/decoder.c): the kernel against numpy, the
export's weight index, and tokens against onnxruntime's decode step on the trained fixture."""

from __future__ import annotations

import numpy as np
import pytest

from megaedge.errors import MegaedgeError
from megaedge.runtime import decoding, kernels, manifest
from megaedge.runtime.transcriber import Transcriber
from tests.conftest import heldout_clips, int8_bundle_from, native_and_onnxruntime, speechlike
from tests.runtime.kernel_builds import KERNELS, VARIANTS, needs_kernel


def _reference(weight, scales, x, block, blocks):
    """MatMulNBits arithmetic with the activation quantized the kernel's way, in float64."""
    padded = np.zeros(block * blocks)
    padded[: x.size] = x
    xb = padded.reshape(blocks, block)
    amax = np.abs(xb).max(axis=1)
    sa = amax / 127
    q = np.clip(np.rint(np.divide(xb, sa[:, None], out=np.zeros_like(xb), where=sa[:, None] > 0)), -127, 127)
    w = (weight.astype(np.float64) - 128) * scales[:, :, None]
    return np.einsum("nbk,bk->n", w, q * sa[:, None])


@needs_kernel
@pytest.mark.parametrize("built", VARIANTS)
@pytest.mark.parametrize("n,k,block", [(2048, 2048, 128), (37, 160, 128), (321, 160, 32), (50, 64, 16),
                                       (1003, 384, 64)])
def test_kernel_matches_matmulnbits_arithmetic(n, k, block, built):
    rng = np.random.default_rng(n)
    blocks = -(-k // block)
    weight = rng.integers(0, 256, (n, blocks, block), dtype=np.uint8)
    weight[0, 0, :] = 0  # value -128, the one whose magnitude does not fit a signed byte
    scales = rng.uniform(0.001, 0.02, (n, blocks)).astype(np.float32)
    x = rng.standard_normal(k).astype(np.float32)
    for threads in (1, 2, 3):
        got = built.gemv(weight, scales, built.quantize(x, block, blocks), np.empty(n, np.float32), threads)
        want = _reference(weight, scales, x, block, blocks)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def _emulated_gemm(weight, scales, x):
    """The prompt products' arithmetic in numpy float32: each block's integer dot product exactly, then
    y += (weight scale * activation scale) * dot, block after block, one rounding per operation."""
    rows, (n, blocks, block) = x.q.shape[0], weight.shape
    dots = np.einsum("rbk,nbk->rnb", x.q.reshape(rows, blocks, block).astype(np.int64),
                     weight.astype(np.int64) - 128)
    y = np.zeros((rows, n), np.float32)
    for b in range(blocks):
        scale = scales[None, :, b] * x.scales[:, b : b + 1]
        y = y + scale * dots[:, :, b].astype(np.float32)
    return y


@needs_kernel
@pytest.mark.parametrize("built", VARIANTS)
@pytest.mark.parametrize("n,k,block,rows", [(2048, 2048, 128, 9), (37, 160, 128, 5), (321, 160, 32, 7),
                                            (50, 64, 16, 3), (1003, 384, 64, 13), (70, 6144, 128, 6),
                                            (100, 2048, 128, 1), (1003, 384, 64, 70), (300, 2048, 128, 37),
                                            (300, 2048, 128, 50), (50, 64, 16, 40)])
def test_prompt_product_is_the_same_arithmetic_on_every_build(n, k, block, rows, built):
    """Several rows per weight load (packed tiles on AVX2/AVX512, AMX tiles from 32 rows, partial groups and row
    groups included) give, bit for bit, the float32 emulation, with any number of threads."""
    rng = np.random.default_rng(n)
    blocks = -(-k // block)
    weight = rng.integers(0, 256, (n, blocks, block), dtype=np.uint8)
    weight[0, 0, :] = 0
    scales = rng.uniform(0.001, 0.02, (n, blocks)).astype(np.float32)
    x = built.quantize_rows(rng.standard_normal((rows, k)).astype(np.float32), block, blocks)
    want = _emulated_gemm(weight, scales, x)
    for threads in (1, 2, 3):
        got = built.gemm(weight, scales, x, np.full((rows, n), np.nan, np.float32), threads)
        np.testing.assert_array_equal(got, want)


@needs_kernel
@pytest.mark.parametrize("built", VARIANTS)
@pytest.mark.parametrize("n,k,block", [(2048, 2048, 128), (37, 160, 128), (321, 160, 32), (1003, 384, 64),
                                       (50, 64, 16), (6, 96, 32)])
def test_packed_weights_are_read_to_the_prompt_arithmetic(n, k, block, built):
    """AVX512 builds keep decoder weights packed (groups of 16 rows, me_pack_q8; partial last groups included): the
    decode product over them is the prompt's arithmetic, bit for bit its float32 emulation, as over the row layout,
    and the prompt product reads them in place to the same bits. Other builds decline to pack."""
    rng = np.random.default_rng(n + block)
    blocks = -(-k // block)
    weight = rng.integers(0, 256, (n, blocks, block), dtype=np.uint8)
    weight[0, 0, :] = 0
    scales = rng.uniform(0.001, 0.02, (n, blocks)).astype(np.float32)
    packed, packed_scales, lanes = built.pack_matrix(weight, scales)
    avx512 = built.isa.startswith("avx512")
    assert lanes == (16 if avx512 and block % 32 == 0 else 0)
    if lanes:
        assert packed.shape == (-(-n // 16) * 16, blocks, block) and packed.ctypes.data % 64 == 0
    x = built.quantize_rows(rng.standard_normal((5, k)).astype(np.float32), block, blocks)
    want = _emulated_gemm(weight, scales, x)
    for threads in (1, 2, 3):
        one = kernels.Quantized(x.q[0], x.scales[0], x.sums[0])
        rows = built.gemv(weight, scales, one, np.full(n, np.nan, np.float32), threads)
        got = built.gemv(packed, packed_scales, one, np.full(n, np.nan, np.float32), threads, packed=lanes)
        np.testing.assert_array_equal(got, rows)
        if avx512 or built.isa in ("portable-c", "arm-dotprod"):
            np.testing.assert_array_equal(got, want[0])
        prompt = built.gemm(packed, packed_scales, x, np.full((5, n), np.nan, np.float32), threads, packed=lanes)
        np.testing.assert_array_equal(prompt, want)


@needs_kernel
def test_quantize_with_norm_is_rms_norm_then_quantize():
    rng = np.random.default_rng(1)
    x, norm = rng.standard_normal(300).astype(np.float32), rng.uniform(0.5, 2, 300).astype(np.float32)
    fused = KERNELS.quantize(x, 128, 3, norm, 1e-6)
    normed = x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-6) * norm
    plain = KERNELS.quantize(normed.astype(np.float32), 128, 3)
    assert np.abs(fused.q.astype(int) - plain.q).max() <= 1
    np.testing.assert_allclose(fused.scales, plain.scales, rtol=1e-5)


def test_a_native_bundle_without_kernels_warns_that_decoding_is_slower(monkeypatch, caplog, fixture_int8):
    """Steps fall back to onnxruntime (several times slower) when no kernel can be had: a warning, not an info line
    only -v shows."""
    from megaedge.runtime import manifest, options

    def unavailable():
        raise RuntimeError("no prebuilt kernel for this CPU, and no C compiler found")

    monkeypatch.setattr(kernels, "load", unavailable)
    with caplog.at_level("WARNING", logger="megaedge"):
        found, reason = options._decode_kernels(fixture_int8, manifest.read(fixture_int8), "auto", True)
    assert found is None and "no native kernel here" in reason
    assert any(r.levelname == "WARNING" and "native INT8 kernels unavailable" in r.getMessage() for r in caplog.records)


def test_kernel_build_failure_is_reported_not_raised_at_import(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="no C compiler"):
        kernels.build()


@needs_kernel
def test_kernel_cache_key_covers_every_included_source(monkeypatch, tmp_path):
    """A build is reused only for the same sources: editing the included prompt_tiles.h must rebuild too."""
    included = {line.split('"')[1] for line in kernels.SOURCE.read_text().splitlines() if line.startswith('#include "')}
    assert included and {kernels.SOURCE.parent / name for name in included} <= set(kernels.SOURCES)
    cc = kernels.compiler()
    before = kernels._key(cc)
    for path in kernels.SOURCES:
        copy = tmp_path / path.name
        copy.write_bytes(path.read_bytes() + b"\n/* edited */\n")
        monkeypatch.setattr(kernels, "SOURCES", tuple(copy if p == path else p for p in kernels.SOURCES))
        assert kernels._key(cc) != before, path.name
        monkeypatch.undo()


@pytest.fixture(scope="module")
def fixture_int8(fixture_bundles, tmp_path_factory):
    return int8_bundle_from(fixture_bundles["merged"], tmp_path_factory.mktemp("native"))


def test_int8_export_indexes_the_decoder_weights(fixture_int8):
    info = manifest.read(fixture_int8)  # the sidecar is listed with its sha256 like every other file
    index = info.decoder["native"]
    assert index["format"] == "matmulnbits-q8" and len(index["layers"]) == info.decoder["num_layers"]
    assert index["heads"] * index["head_dim"] == index["layers"][0]["q"]["n"]
    assert manifest.NATIVE_DECODER_FILE in info.files
    assert index["embedding"]["kind"] == "q8" and index["lm_head"]["n"] == info.decoder["vocab_size"]


@needs_kernel
def test_norm_weights_are_found_where_the_exporter_merged_equal_ones(tmp_path):
    """A freshly initialized model's norms are all ones and the exporter keeps one initializer for all of them, so
    the index finds each norm's weight by its place in the graph (export/native_index.py); the native step then
    follows onnxruntime's as on any bundle."""
    from megaedge.export.bundle import ExportOptions, export_bundle
    from megaedge.export.factory import write_checkpoint
    from megaedge.runtime.native_decode import NativeDecoder

    ckpt = write_checkpoint(tmp_path / "ckpt", "tiny", "mega", seed=1, init="realistic")
    bundle = int8_bundle_from(export_bundle(ckpt, tmp_path / "fp32", ExportOptions(mode="merged")), tmp_path)
    import onnx

    info = manifest.read(bundle)
    assert info.decoder.get("native") is not None

    graph = onnx.load(str(bundle / manifest.DECODER_FILE), load_external_data=False).graph
    names = {t.name for t in graph.initializer}
    assert "lm.layers.1.self_attn.k_norm.weight" not in names, "norms not merged: the test would not test the lookup"
    tr = Transcriber.from_bundle(bundle, decode="ort")
    audio = tr.encode(speechlike(2.0, seed=2))
    ids = tr.prompt(audio.shape[0], None, None)
    native = NativeDecoder(bundle, info, KERNELS, threads=2)
    got = native.prefill(ids, audio, info.prompt.audio_pad, 2)
    state = decoding.OrtState(tr)
    want = state.extend(ids, audio, None)[0]
    assert np.corrcoef(want, got)[0, 1] > 0.999


def test_float_bundles_have_no_native_index(fixture_bundles):
    """FP32 bundles, merged and routed: the native decoder reads 8-bit weights only."""
    from megaedge.runtime import native_decode

    for path in fixture_bundles.values():
        assert native_decode.available(manifest.read(path, verify=False)) is not None


@needs_kernel
def test_native_decode_gives_onnxruntime_tokens_on_heldout_speech(fixture_int8):
    native, ort = native_and_onnxruntime(fixture_int8)
    clips = heldout_clips(3, 3)
    agree = total = 0
    for item in clips:
        a = native.transcribe(item["path"]).token_ids
        b = ort.transcribe(item["path"]).token_ids
        assert len(a) > 3
        agree += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
    # Both quantize activations per block; rounding may differ in the last bit, so near-ties could flip. The
    # trained fixture's clips have none: every token agrees.
    assert agree == total, f"{agree}/{total} tokens agree"


@needs_kernel
@pytest.mark.parametrize("built", VARIANTS)
def test_native_logits_track_onnxruntime_step_by_step(fixture_int8, built):
    import onnxruntime

    from megaedge.runtime.native_decode import NativeDecoder
    from megaedge.runtime.transcriber import LAST

    tr = Transcriber.from_bundle(fixture_int8, decode="ort")
    audio = tr.encode(speechlike(4.0, seed=3))
    ids = tr.prompt(audio.shape[0], None, None)
    empty = onnxruntime.OrtValue.ortvalue_from_numpy(np.zeros(tr.kv_shape, tr.kv_dtype))
    feed = {"input_ids": np.asarray([ids], np.int64), "audio_features": audio,
            "logits_at": np.asarray([len(ids) - 1], np.int64), **dict.fromkeys(tr.past_names, empty)}
    outs = tr.sessions["decoder"].run_bound(feed)
    native = NativeDecoder(fixture_int8, tr.manifest, built, threads=2)
    with pytest.raises(MegaedgeError, match="start"):
        native.step(1)
    native.start([v.numpy() for v in outs[1:]], 6)
    token = int(np.argmax(outs[0].numpy()[0]))
    for _ in range(6):
        outs = tr.sessions["decoder"].run_bound({"input_ids": np.asarray([[token]], np.int64),
                                                 "audio_features": audio[:0], "logits_at": LAST,
                                                 **dict(zip(tr.past_names, outs[1:]))})
        want, got = outs[0].numpy()[0], native.step(token)
        assert np.corrcoef(want, got)[0, 1] > 0.999
        assert np.abs(want - got).max() < 0.05 * np.abs(want).max()
        token = int(np.argmax(want))
    assert native.length == len(ids) + 6
    capacity = native.keys[0].shape[1]
    native.step(token)  # start() leaves room for the step after the last one asked for (the EOS check's)
    assert native.keys[0].shape[1] == capacity
    native.step(token)  # past it the cache grows (a stream's does), keeping what it holds
    assert native.keys[0].shape[1] > capacity and native.length == len(ids) + 8


@needs_kernel
def test_decode_step_does_not_depend_on_the_thread_count(fixture_int8):
    """Rows and heads are split between threads, never sums: any team size must give the same bits."""
    from megaedge.runtime.native_decode import NativeDecoder

    info = manifest.read(fixture_int8, verify=False)
    rng = np.random.default_rng(0)
    index = info.decoder["native"]
    shape = (1, index["kv_heads"], 9, index["head_dim"])
    presents = [rng.standard_normal(shape).astype(np.float32) for _ in range(2 * len(index["layers"]))]
    runs = []
    for threads in (1, 2, 3):
        native = NativeDecoder(fixture_int8, info, KERNELS, threads=threads)
        native.start(presents, 4)
        runs.append([native.step(token) for token in (5, 17, 3, 11)])
    for other in runs[1:]:
        for want, got in zip(runs[0], other):
            np.testing.assert_array_equal(want, got)


def test_decode_engine_choice_is_checked(fixture_bundles):
    with pytest.raises(MegaedgeError, match="not one of"):
        Transcriber.from_bundle(fixture_bundles["merged"], decode="fast")
    with pytest.raises(MegaedgeError, match="--decode native is not possible"):
        Transcriber.from_bundle(fixture_bundles["merged"], decode="native")
    assert Transcriber.from_bundle(fixture_bundles["merged"]).native is None  # auto: onnxruntime for fp32
    with pytest.raises(MegaedgeError, match="not one of"):
        Transcriber.from_bundle(fixture_bundles["merged"], prefill="fast")
    with pytest.raises(MegaedgeError, match="--prefill native needs the native decoder"):
        Transcriber.from_bundle(fixture_bundles["merged"], prefill="native")
    tr = Transcriber.from_bundle(fixture_bundles["merged"], prefill="ort")
    assert not tr.native_prefill and tr.sessions.closed == []


@needs_kernel
def test_native_decoder_leaves_onnxruntime_decoder_graphs_closed(fixture_bundles, tmp_path_factory):
    """Prompt and steps native: neither onnxruntime decoder graph (another copy of the decoder weights each) is
    needed to transcribe, nor to stream (streams decode natively too), so they stay closed. With the prompt in the
    prefill graph (the default for a bundle that has one) only the decode graph stays closed."""
    from megaedge import fixture
    from megaedge.runtime.evaluate import read_set

    bundle = int8_bundle_from(fixture_bundles["merged"], tmp_path_factory.mktemp("prefill"), recipe="cpu-prefill")
    clip = read_set(fixture.heldout_manifest())[0]["path"]
    def closed_decoders(tr) -> set[str]:  # one of the two encoder graphs stays closed too (test_native_stem.py)
        return set(tr.sessions.closed) - {"encoder", "encoder_body"}

    tr = Transcriber.from_bundle(bundle, prefill="native")
    assert tr.native_prefill and closed_decoders(tr) == {"decoder", "decoder_prefill"}
    native = tr.transcribe(clip).token_ids
    assert closed_decoders(tr) == {"decoder", "decoder_prefill"}
    hybrid = Transcriber.from_bundle(bundle)
    assert not hybrid.native_prefill and closed_decoders(hybrid) == {"decoder"}
    ort = Transcriber.from_bundle(bundle, decode="ort")
    assert closed_decoders(ort) == set()
    want = ort.transcribe(clip).token_ids
    assert len(native) > 3 and native == want and hybrid.transcribe(clip).token_ids == want
    tr.create_stream()
    hybrid.create_stream()
    assert closed_decoders(tr) == {"decoder", "decoder_prefill"} and closed_decoders(hybrid) == {"decoder"}


@needs_kernel
@pytest.mark.parametrize("built", VARIANTS)
def test_native_prefill_tracks_onnxruntime_prefill(fixture_int8, built):
    """The prompt with its audio rows, natively, against the decoder graph: last logits and every layer's cache."""
    import onnxruntime

    from megaedge.runtime.native_decode import NativeDecoder

    tr = Transcriber.from_bundle(fixture_int8, decode="ort")
    audio = tr.encode(speechlike(4.0, seed=3))
    ids = tr.prompt(audio.shape[0], "pump room", None)
    empty = onnxruntime.OrtValue.ortvalue_from_numpy(np.zeros(tr.kv_shape, tr.kv_dtype))
    feed = {"input_ids": np.asarray([ids], np.int64), "audio_features": audio,
            "logits_at": np.asarray([len(ids) - 1], np.int64), **dict.fromkeys(tr.past_names, empty)}
    outs = [v.numpy() for v in tr.sessions["decoder"].run_bound(feed)]
    native = NativeDecoder(fixture_int8, tr.manifest, built, threads=2)
    got = native.prefill(ids, audio, tr.manifest.prompt.audio_pad, 4)
    want = outs[0][0]
    assert int(np.argmax(got)) == int(np.argmax(want)) and np.corrcoef(want, got)[0, 1] > 0.999
    assert native.length == len(ids)
    for i, (keys, values) in enumerate(zip(native.keys, native.values)):
        for mine, theirs in ((keys, outs[1 + 2 * i][0]), (values, outs[2 + 2 * i][0])):
            scale = np.abs(theirs).max()
            assert np.abs(mine[:, : len(ids)] - theirs).max() < 0.02 * scale, f"layer {i}"
    with pytest.raises(MegaedgeError, match="audio placeholders"):
        native.prefill(ids, audio[1:], tr.manifest.prompt.audio_pad, 4)


@needs_kernel
@pytest.mark.parametrize("built", VARIANTS)
def test_native_prefill_equals_stepping_the_prompt(fixture_int8, built, monkeypatch):
    """A prompt prefilled (in one call or in chunks, by any number of threads) and the same prompt stepped token by
    token give the same cache and logits: exactly, where the step's products share the prompt's arithmetic (the
    portable build). Elsewhere the step sums in vector lanes: a last-bit difference can move one activation to
    the next int8 step (AVX2 build, this prompt: one at position 8 of layer 0, logits then within 2 %)."""
    from megaedge.runtime import native_decode

    info = manifest.read(fixture_int8, verify=False)
    ids = list(np.random.default_rng(4).integers(0, info.decoder["vocab_size"], 23))
    runs = []
    for chunk, threads in ((native_decode.PREFILL_CHUNK, 2), (5, 1), (7, 3)):
        monkeypatch.setattr(native_decode, "PREFILL_CHUNK", chunk)
        native = native_decode.NativeDecoder(fixture_int8, info, built, threads=threads)
        runs.append((native.prefill(ids, np.zeros((0, native.hidden), np.float32), -1, 2), native.keys[-1]))
    for logits, keys in runs[1:]:
        np.testing.assert_array_equal(logits, runs[0][0])
        np.testing.assert_array_equal(keys, runs[0][1])
    stepper = native_decode.NativeDecoder(fixture_int8, info, built, threads=2)
    shape = (1, stepper.kv_heads, 0, stepper.head_dim)
    stepper.start([np.zeros(shape, np.float32)] * (2 * len(stepper.layers)), len(ids))
    for token in ids:
        stepped = stepper.step(int(token))
    if built.isa == "portable-c":
        np.testing.assert_array_equal(stepped, runs[0][0])
    else:
        assert np.corrcoef(stepped, runs[0][0])[0, 1] > 0.999
        assert np.abs(stepped - runs[0][0]).max() < 0.05 * np.abs(stepped).max()
    keys = stepper.keys[-1][:, : len(ids)]
    assert np.abs(keys - runs[0][1][:, : len(ids)]).max() < 0.05 * np.abs(keys).max()


@needs_kernel
@pytest.mark.parametrize("built", VARIANTS)
def test_extend_gives_the_asked_rows_logits_rewinds_and_spawns(fixture_int8, built, monkeypatch):
    """What a stream does with a native decoder: a committed prefix, then tails run and forgotten. Logits of several
    rows (one LM-head product, chunks crossing the asked rows) agree with each prefix's own last logits (those take
    the step's product: float rounding apart); a tail run, stepped and rewound leaves the cache as it was, so what
    follows gives the same bits as without it; spawned decoders share the weights and keep their own caches."""
    from megaedge.runtime import native_decode

    info = manifest.read(fixture_int8, verify=False)
    ids = [int(t) for t in np.random.default_rng(5).integers(0, info.decoder["vocab_size"], 19)]
    base = native_decode.NativeDecoder(fixture_int8, info, built, threads=2)
    x = base.rows_for(ids, np.zeros((0, base.hidden), np.float32), -1)
    x_before = x.copy()
    monkeypatch.setattr(native_decode, "PREFILL_CHUNK", 4)  # asked rows 13..18 span the chunks [12, 16), [16, 19)
    many = base.spawn()
    got = many.extend(x, 6)
    np.testing.assert_array_equal(x, x_before)  # the caller's rows are not overwritten
    assert got.shape == (6, info.decoder["vocab_size"]) and many.length == 19
    for j, row in zip(range(13, 19), got):
        alone = base.spawn()
        want = alone.extend(x[: j + 1], 1)[0]
        assert int(np.argmax(row)) == int(np.argmax(want)) and np.corrcoef(row, want)[0, 1] > 0.9999
    committed, fresh = base.spawn(), base.spawn()
    committed.extend(x[:10], 0)
    fresh.extend(x[:10], 0)
    committed.extend(x[12:18], 2)  # a tail, stepped, then forgotten
    committed.step(7)
    committed.rewind(10)
    np.testing.assert_array_equal(committed.extend(x[10:], 1), fresh.extend(x[10:], 1))
    for mine, theirs in zip(committed.keys + committed.values, fresh.keys + fresh.values):
        np.testing.assert_array_equal(mine[:, :19], theirs[:, :19])
        assert not np.shares_memory(mine, theirs)
    assert committed.layers[0].q.weight is fresh.layers[0].q.weight  # one copy of the weights
    with pytest.raises(MegaedgeError, match="rewind"):
        committed.rewind(committed.length + 1)
    with pytest.raises(MegaedgeError, match="logits of 3 rows"):
        committed.extend(x[:2], 3)
