"""A routed INT8 bundle on the native decoder (assets/kernels/lora.h): the index carries the gated low-rank branches,
each route gives onnxruntime's tokens and logits, and sequences on both routes stepped in one batch get the bits
each gets alone, on every kernel build."""

from __future__ import annotations

import numpy as np
import pytest

from megaedge.errors import MegaedgeError
from megaedge.runtime import manifest, native_decode
from megaedge.runtime.transcriber import Transcriber
from tests.conftest import heldout_clips, int8_bundle_from, native_and_onnxruntime, speechlike
from tests.runtime.kernel_builds import VARIANTS, needs_kernel


@pytest.fixture(scope="module")
def routed_int8(fixture_bundles, tmp_path_factory):
    return int8_bundle_from(fixture_bundles["routed"], tmp_path_factory.mktemp("routed_int8"))


def test_the_index_carries_every_gated_branch(routed_int8):
    info = manifest.read(routed_int8)
    index = info.decoder["native"]
    branches = [layer[name]["lora"] for layer in index["layers"] for name in manifest.NATIVE_PROJECTIONS]
    assert len(branches) == 7 * info.decoder["num_layers"]  # the fixture's adapter covers every projection
    first = index["layers"][0]["q"]
    assert first["lora"]["a"]["shape"] == [first["k"], first["lora"]["rank"]]
    assert first["lora"]["b"]["shape"] == [first["lora"]["rank"], first["n"]]
    assert "lora" not in index["lm_head"] and native_decode.available(info) is None


@needs_kernel
def test_each_route_gives_onnxruntime_tokens_on_heldout_speech(routed_int8):
    native, ort = native_and_onnxruntime(routed_int8)
    clips = heldout_clips(2, 2)
    differ = 0
    for item in clips:
        for route in ("lora", "base"):
            want = ort.transcribe(item["path"], route=route).token_ids
            assert len(want) > 3 and native.transcribe(item["path"], route=route).token_ids == want, route
        differ += native.transcribe(item["path"], route="lora").token_ids != want
    assert differ, "the two routes gave the same tokens on every clip: the branches would go unseen"


@needs_kernel
@pytest.mark.parametrize("built", VARIANTS)
def test_each_route_tracks_onnxruntime_prompt_and_steps(routed_int8, built):
    """The prompt (native prefill) and six steps on each route against the decoder graph with that gate; the
    routes' logits differ by far more than either differs from onnxruntime's."""
    import onnxruntime

    from megaedge.runtime.transcriber import LAST

    tr = Transcriber.from_bundle(routed_int8, decode="ort")
    audio = tr.encode(speechlike(4.0, seed=3))
    ids = tr.prompt(audio.shape[0], None, None)
    empty = onnxruntime.OrtValue.ortvalue_from_numpy(np.zeros(tr.kv_shape, tr.kv_dtype))
    final = {}
    for gate in (1.0, 0.0):
        feed = {"input_ids": np.asarray([ids], np.int64), "audio_features": audio, "lora_gate": tr.gate_input(gate),
                "logits_at": np.asarray([len(ids) - 1], np.int64), **dict.fromkeys(tr.past_names, empty)}
        outs = tr.sessions["decoder"].run_bound(feed)
        native = native_decode.NativeDecoder(routed_int8, tr.manifest, built, threads=2)
        got = native.prefill(ids, audio, tr.manifest.prompt.audio_pad, 6, gate)
        want = outs[0].numpy()[0]
        for _ in range(6):
            assert np.corrcoef(want, got)[0, 1] > 0.999
            assert np.abs(want - got).max() < 0.05 * np.abs(want).max()
            token = int(np.argmax(want))
            outs = tr.sessions["decoder"].run_bound({"input_ids": np.asarray([[token]], np.int64),
                                                     "audio_features": audio[:0], "logits_at": LAST,
                                                     "lora_gate": tr.gate_input(gate),
                                                     **dict(zip(tr.past_names, outs[1:]))})
            want, got = outs[0].numpy()[0], native.step(token, gate)
        final[gate] = got
    apart = np.abs(final[1.0] - final[0.0]).max()
    assert apart > 0.1 * np.abs(final[0.0]).max(), "gate 0 and gate 1 gave the same logits"


def _decoders(bundle, built, lengths, gates, threads=2):
    info = manifest.read(bundle, verify=False)
    base = native_decode.NativeDecoder(bundle, info, built, threads=threads)
    rng = np.random.default_rng(11)
    out = []
    for n, gate in zip(lengths, gates):
        d = base.spawn()
        ids = [int(t) for t in rng.integers(0, info.decoder["vocab_size"], n)]
        d.prefill(ids, np.zeros((0, d.hidden), np.float32), -1, 8, gate)
        out.append(d)
    return out


@needs_kernel
@pytest.mark.parametrize("built", VARIANTS)
def test_a_batch_of_both_routes_gives_each_sequence_its_solo_bits(routed_int8, built):
    """Eleven sequences, LoRA and base routes interleaved, stepped in batches of every size the products treat apart
    (and batches of one route only): logits and caches equal to each stepped alone on its route."""
    lengths = (5, 17, 11, 2, 23, 8, 14, 3, 9, 20, 6)
    gates = [1.0 if i % 3 else 0.0 for i in range(len(lengths))]
    batched = _decoders(routed_int8, built, lengths, gates)
    alone = _decoders(routed_int8, built, lengths, gates)
    for size, pick in ((11, range(11)), (8, range(8)), (5, range(5)), (3, (0, 3, 6)), (2, (1, 2))):
        step = [3 + 7 * i + size for i in pick]
        got = native_decode.step_batch([batched[i] for i in pick], step, [gates[i] for i in pick])
        for row, i, token in zip(got, pick, step):
            np.testing.assert_array_equal(row, alone[i].step(token, gates[i]))
    for a, b in zip(batched, alone):
        assert a.length == b.length
        for mine, theirs in zip(a.keys + a.values, b.keys + b.values):
            np.testing.assert_array_equal(mine[:, : a.length], theirs[:, : b.length])
    with pytest.raises(MegaedgeError, match="2 gates"):
        native_decode.step_batch(batched[:3], [1, 2, 3], [1.0, 0.0])


@needs_kernel
@pytest.mark.parametrize("built", VARIANTS)
def test_a_lora_prompt_equals_stepping_it(routed_int8, built, monkeypatch):
    """The branches' sums are sequential in every build, so on the portable build a prompt prefilled in any chunks
    by any team equals the same prompt stepped, on the LoRA route too; vector builds agree to rounding."""
    info = manifest.read(routed_int8, verify=False)
    ids = [int(t) for t in np.random.default_rng(4).integers(0, info.decoder["vocab_size"], 23)]
    runs = []
    for chunk, threads in ((native_decode.PREFILL_CHUNK, 2), (5, 1), (7, 3)):
        monkeypatch.setattr(native_decode, "PREFILL_CHUNK", chunk)
        native = native_decode.NativeDecoder(routed_int8, info, built, threads=threads)
        runs.append(native.prefill(ids, np.zeros((0, native.hidden), np.float32), -1, 2, 1.0))
    for logits in runs[1:]:
        np.testing.assert_array_equal(logits, runs[0])
    stepper = native_decode.NativeDecoder(routed_int8, info, built, threads=3)
    shape = (1, stepper.kv_heads, 0, stepper.head_dim)
    stepper.start([np.zeros(shape, np.float32)] * (2 * len(stepper.layers)), len(ids))
    for token in ids:
        stepped = stepper.step(token, 1.0)
    if built.isa == "portable-c":
        np.testing.assert_array_equal(stepped, runs[0])
    else:
        assert np.corrcoef(stepped, runs[0])[0, 1] > 0.999


@needs_kernel
def test_streams_on_both_routes_batch_and_keep_their_finals(routed_int8):
    """Concurrent calls of a shared routed Transcriber on the two routes meet in batched steps (one weight read
    for both routes) and each gets its own route's transcript."""
    import threading

    from megaedge import fixture
    from megaedge.runtime.evaluate import read_set

    tr = Transcriber.from_bundle(routed_int8, decode="native")
    clip = read_set(fixture.heldout_manifest())[0]["path"]
    want = {route: tr.transcribe(clip, route=route).token_ids for route in ("lora", "base")}
    tr.batcher.batches.clear()
    got, errors = {}, []

    def run(key, route):
        try:
            got[key] = tr.transcribe(clip, route=route).token_ids
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, ("lora", "base")[i % 2])) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(got[i] == want[("lora", "base")[i % 2]] for i in range(4))
    assert any(size > 1 for size in tr.batcher.batches), tr.batcher.batches


def test_a_branch_in_another_form_refuses_the_index(routed_int8, tmp_path):
    """A gated branch whose weight reaches its MatMul through another node (a Cast, a Transpose) is not one the
    index can describe: the whole index is refused rather than that projection running as base on the LoRA route."""
    import onnx
    from onnx import helper

    from megaedge.export.native_index import build_index

    model = onnx.load(str(routed_int8 / manifest.DECODER_FILE))
    inits = {t.name for t in model.graph.initializer}
    gate_mul = next(n for n in model.graph.node if "lora_gate" in n.input)
    producer = {o: n for n in model.graph.node for o in n.output}
    up = producer[[i for i in gate_mul.input if i != "lora_gate"][0]]
    assert up.op_type == "MatMul" and up.input[1] in inits
    weight = up.input[1]
    up.input[1] = weight + "_through"
    model.graph.node.insert(0, helper.make_node("Identity", [weight], [weight + "_through"]))
    onnx.save(model, str(tmp_path / manifest.DECODER_FILE))
    decoder = manifest.read(routed_int8, verify=False).decoder
    assert build_index(routed_int8 / manifest.DECODER_FILE, decoder) is not None
    assert build_index(tmp_path / manifest.DECODER_FILE, decoder) is None
