"""The native decoder's half-float KV cache (``kv_cache="float16"``, assets/kernels/attention.h): what it stores is
numpy's rounding of the float cache's values on every kernel build, a prompt, its steps and a batch agree as they
do over float caches, and greedy transcripts stay those of the float cache."""

from __future__ import annotations

import numpy as np
import pytest

from megaedge.errors import MegaedgeError
from megaedge.runtime import manifest, native_decode
from megaedge.runtime.options import RuntimeOptions
from megaedge.runtime.transcriber import Transcriber
from tests.conftest import heldout_clips, int8_bundle_from
from tests.runtime.kernel_builds import VARIANTS, needs_kernel


@pytest.fixture(scope="module")
def fixture_int8(fixture_bundles, tmp_path_factory):
    return int8_bundle_from(fixture_bundles["merged"], tmp_path_factory.mktemp("kv16_int8"))


def _prompt(info, n, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(0, info.decoder["vocab_size"], n)]


def _half(values):
    limit = float(np.finfo(np.float16).max)
    return np.clip(values, -limit, limit).astype(np.float16)


@needs_kernel
@pytest.mark.parametrize("built", VARIANTS)
def test_half_cache_holds_the_rounded_float_values(fixture_int8, built):
    """Layer 0's keys and values do not depend on the cache (they come from the embeddings), so a half cache's are
    exactly numpy's round-to-nearest-even of a float cache's: the kernels' conversion (F16C, or the portable one)
    is IEEE's. Later layers differ by the rounding only, and the arrays are half the bytes."""
    info = manifest.read(fixture_int8, verify=False)
    ids = _prompt(info, 37, 1)
    runs = {}
    for cache in ("float32", "float16"):
        d = native_decode.NativeDecoder(fixture_int8, info, built, threads=2, kv_cache=cache)
        d.prefill(ids[:30], np.zeros((0, d.hidden), np.float32), -1, 8)
        for token in ids[30:]:
            d.step(token)
        runs[cache] = d
    full, half = runs["float32"], runs["float16"]
    assert half.keys[0].dtype == np.float16 and half.keys[0].nbytes * 2 == full.keys[0].nbytes
    n = len(ids)
    np.testing.assert_array_equal(half.keys[0][:, :n], _half(full.keys[0][:, :n]))
    np.testing.assert_array_equal(half.values[0][:, :n], _half(full.values[0][:, :n]))
    last = full.values[-1][:, :n]
    assert np.abs(half.values[-1][:, :n].astype(np.float32) - last).max() < 0.02 * np.abs(last).max()


@needs_kernel
@pytest.mark.parametrize("built", VARIANTS)
def test_half_cache_prompt_steps_and_batches_agree(fixture_int8, built):
    """Over half caches as over float ones: a prompt prefilled equals it stepped (exactly on the portable build,
    whose step shares the prompt's arithmetic), and a batch mixing half- and float-cache sequences gives each the
    bits it gets alone."""
    info = manifest.read(fixture_int8, verify=False)
    ids = _prompt(info, 21, 2)
    prompt = native_decode.NativeDecoder(fixture_int8, info, built, threads=2, kv_cache="float16")
    want = prompt.prefill(ids, np.zeros((0, prompt.hidden), np.float32), -1, 2)
    stepper = prompt.spawn()
    assert stepper.kv_cache == "float16"
    shape = (1, stepper.kv_heads, 0, stepper.head_dim)
    stepper.start([np.zeros(shape, np.float32)] * (2 * len(stepper.layers)), len(ids))
    for token in ids:
        got = stepper.step(token)
    if built.isa == "portable-c":
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(stepper.keys[-1][:, : len(ids)], prompt.keys[-1][:, : len(ids)])
    else:
        assert np.corrcoef(got, want)[0, 1] > 0.999

    base = native_decode.NativeDecoder(fixture_int8, info, built, threads=3)
    lengths, caches = (5, 17, 2, 11, 8), ("float16", "float32", "float16", "float16", "float32")

    def decoders():
        out = []
        for n, cache in zip(lengths, caches):
            d = native_decode.NativeDecoder(fixture_int8, info, built, threads=3, kv_cache=cache, _weights=base._w)
            d.prefill(_prompt(info, n, n), np.zeros((0, d.hidden), np.float32), -1, 4)
            out.append(d)
        return out

    batched, alone = decoders(), decoders()
    for step in range(3):
        tokens = [7 + 5 * i + step for i in range(len(lengths))]
        rows = native_decode.step_batch(batched, tokens)
        for row, d, token in zip(rows, alone, tokens):
            np.testing.assert_array_equal(row, d.step(token))
    for a, b in zip(batched, alone):
        np.testing.assert_array_equal(a.values[-1][:, : a.length], b.values[-1][:, : b.length])


def test_half_cache_takes_over_an_onnxruntime_cache_rounded_and_clamped(fixture_int8):
    """``start`` converts a prefill's float cache as the kernels store values: nearest even, clamped to the half
    range (a value past it would turn into infinity and every score after it into NaN)."""
    info = manifest.read(fixture_int8, verify=False)
    from megaedge.runtime import kernels

    built = kernels.load()
    d = native_decode.NativeDecoder(fixture_int8, info, built, threads=1, kv_cache="float16")
    rng = np.random.default_rng(3)
    presents = [rng.standard_normal((1, d.kv_heads, 6, d.head_dim)).astype(np.float32)
                for _ in range(2 * len(d.layers))]
    presents[1][0, 0, 2, :3] = (1e6, -1e6, 1.0 + 2.0 ** -11)  # past the range, and a tie between two halves
    d.start(presents, 4)
    assert d.values[0][0, 2, :3].tolist() == [65504.0, -65504.0, 1.0]
    np.testing.assert_array_equal(d.keys[1][:, :6], presents[2][0].astype(np.float16))
    assert np.isfinite(d.step(3)).all()


def test_kv_cache_option_is_checked(fixture_int8):
    with pytest.raises(MegaedgeError, match="kv_cache 'bfloat16' is not one of"):
        RuntimeOptions(kv_cache="bfloat16")
    info = manifest.read(fixture_int8, verify=False)
    with pytest.raises(MegaedgeError, match="kv_cache 'half'"):
        native_decode.NativeDecoder(fixture_int8, info, None, kv_cache="half")


@needs_kernel
def test_half_cache_transcripts_equal_float_cache_ones(fixture_int8, caplog):
    """Greedy transcripts of held-out clips, clean and degraded, with the cache in half floats: the same tokens as
    with float caches (the trained fixture has no near-tie the rounding could flip). Where onnxruntime decodes,
    the option cannot apply, and the load says so."""
    with caplog.at_level("WARNING", logger="megaedge"):
        assert Transcriber.from_bundle(fixture_int8, decode="ort", kv_cache="float16").native is None
    assert "kv_cache float16 applies to the native decoder" in caplog.text
    full = Transcriber.from_bundle(fixture_int8, decode="native")
    half = Transcriber.from_bundle(fixture_int8, decode="native", kv_cache="float16")
    assert half.native.kv_cache == "float16"
    for item in heldout_clips(3, 3):
        a, b = full.transcribe(item["path"]), half.transcribe(item["path"])
        assert len(a.token_ids) > 3 and a.token_ids == b.token_ids
