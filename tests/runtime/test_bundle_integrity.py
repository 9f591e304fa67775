"""Integrity and containment of bundles (issue 28, class 3): the manifest's own digest and pinning, paths that stay
inside the bundle, wrong-typed fields and numbers that disagree with the graphs and weight files refused with one
line before anything (native code above all) uses them."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from megaedge.errors import BundleError
from megaedge.runtime import manifest
from tests.conftest import int8_bundle_from, run_cli, speechlike


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundles, tmp_path_factory):
    """A weight-only INT8 bundle with a native decode index and a native stem (recipe cpu)."""
    return int8_bundle_from(tiny_bundles["merged"], tmp_path_factory.mktemp("integrity"))


def _clone(src, dst):
    """A bundle at ``dst`` sharing ``src``'s files by hard links (no copy), with its own manifest to edit."""
    dst.mkdir()
    for path in src.iterdir():
        if path.is_file():
            (shutil.copyfile if path.name == manifest.MANIFEST_NAME else os.link)(path, dst / path.name)
    return dst


def _edit(bundle, change, restamp=True):
    """Apply ``change`` to the manifest document; ``restamp``: recompute its digest, as a forger would."""
    path = bundle / manifest.MANIFEST_NAME
    doc = json.loads(path.read_text())
    change(doc)
    if restamp:
        doc[manifest.DIGEST_FIELD] = manifest.canonical_digest(doc)
    path.write_text(json.dumps(doc))
    return bundle


def _refused(bundle, match, verify=False):
    with pytest.raises(BundleError, match=match) as caught:
        manifest.read(bundle, verify=verify)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def _set(path, value):
    """A change that sets doc[path[0]][path[1]]... to ``value``."""
    def change(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


# ------------------------------------------------------------------------------------------- the manifest's digest
def test_one_edit_of_the_manifest_is_refused_with_verification_on_or_off(int8_bundle, tmp_path):
    bundle = _clone(int8_bundle, tmp_path / "b")
    manifest.read(bundle)
    _edit(bundle, _set(["decoder", "native", "heads"], 5), restamp=False)  # the 4 -> 5
    for verify in (True, False):
        message = _refused(bundle, "megaedge.json was edited after export", verify)
        assert "re-export" in message


def test_the_digest_is_of_the_content_not_its_spelling(tiny_bundles, tmp_path):
    bundle = _clone(tiny_bundles["merged"], tmp_path / "b")
    digest = manifest.bundle_digest(bundle)
    path = bundle / manifest.MANIFEST_NAME
    path.write_text(json.dumps(json.loads(path.read_text()), indent=4, sort_keys=True))  # re-indented, reordered
    assert manifest.read(bundle).files == manifest.read(tiny_bundles["merged"]).files
    assert manifest.bundle_digest(bundle) == digest
    manifest.write(manifest.read(bundle), bundle)  # a rewrite of the same content keeps the digest
    assert manifest.bundle_digest(bundle) == digest


def test_a_pinned_digest_admits_only_that_bundle(tiny_bundles, tmp_path):
    merged, routed = tiny_bundles["merged"], tiny_bundles["routed"]
    pin = manifest.bundle_digest(merged)
    assert len(pin) == 64 and pin != manifest.bundle_digest(routed)
    assert manifest.read(merged, expected_digest=pin.upper()).mode == "merged"
    with pytest.raises(BundleError, match="is not the pinned") as caught:
        manifest.read(routed, expected_digest=pin)
    assert "\n" not in str(caught.value)
    assert pin in str(caught.value) and manifest.bundle_digest(routed) in str(caught.value)  # whole: tell them apart
    # a forger can recompute the self-digest of an edited manifest, not match a pin taken from the clean one
    forged = _edit(_clone(merged, tmp_path / "b"), _set(["prompt", "eos"], [151643]))
    assert manifest.read(forged).prompt.eos == (151643,)
    with pytest.raises(BundleError, match="is not the pinned"):
        manifest.read(forged, expected_digest=pin)
    with pytest.raises(BundleError, match="not 64 hex digits"):
        manifest.read(merged, expected_digest=pin[:12])


def test_an_older_format_without_a_digest_is_refused(tiny_bundles, tmp_path):
    def older(doc):
        doc["format_version"] = 1
        del doc[manifest.DIGEST_FIELD]

    bundle = _edit(_clone(tiny_bundles["merged"], tmp_path / "b"), older, restamp=False)
    assert "re-export the bundle with this megaedge" in _refused(bundle, "format 1 has no integrity digest")


# ------------------------------------------------------------------------------------------- types
@pytest.mark.parametrize("path,value,match", [
    (["graphs"], [], "graphs is \\[\\], needs a mapping"),
    (["prompt", "eos"], "151645", "prompt.eos is '151645', needs a list"),
    (["prompt", "eos"], [True], "prompt.eos\\[0\\] is True, needs an integer"),
    (["prompt", "audio_pad"], 1.5, "prompt.audio_pad is 1.5, needs an integer"),
    (["mode"], "bogus", "mode is 'bogus', needs one of \\('merged', 'routed'\\)"),
    (["precision"], "int3", "precision is 'int3', needs one of"),
    (["frontend"], None, "frontend is None, needs a mapping"),
    (["decoder"], None, "decoder is None, needs a mapping"),
    (["prompt"], None, "prompt is None, needs a mapping"),
    (["files"], ["tokenizer.json"], "files is \\['tokenizer.json'\\], needs a mapping"),
    (["decoder", "num_layers"], True, "decoder.num_layers is True, needs an integer >= 1"),
    (["decoder", "kv_dtype"], "float64", "decoder.kv_dtype is 'float64', needs one of"),
    (["graphs", "decoder", "inputs", 0, "shape"], [True, "seq"], "shape\\[0\\] is True"),
    (["graphs", "bogus"], {}, "a graph name is 'bogus'"),
    (["router", "threshold"], 7, "router.threshold is 7, needs a probability"),
    (["prompt", "language_template"], "language {lang}", "may hold only plain \\{language\\} fields"),
    (["prompt", "language_template"], "{language:>3000000000}", "may hold only plain"),  # a 3 GB string per load
    (["prompt", "language_template"], "{language.nope}", "may hold only plain"),
    (["prompt", "language_template"], "language {", "is not a template of \\{language\\}"),
])
def test_wrong_types_are_refused_with_one_line(tiny_bundles, tmp_path, path, value, match):
    bundle = _edit(_clone(tiny_bundles["routed"], tmp_path / "b"), _set(path, value))
    _refused(bundle, match)


@pytest.mark.parametrize("value", [0, -5, True, "2", 2.0])
def test_a_format_version_that_is_not_a_format_number_is_refused(tiny_bundles, tmp_path, value):
    bundle = _edit(_clone(tiny_bundles["merged"], tmp_path / "b"), _set(["format_version"], value))
    _refused(bundle, "format_version .* is not a format number")


# ------------------------------------------------------------------------------------------- containment
@pytest.mark.parametrize("path,value", [
    (["graphs", "decoder", "file"], "../../merged/decoder.onnx"),
    (["graphs", "decoder", "file"], "/etc/passwd"),
    (["graphs", "encoder", "data_files"], ["../encoder.onnx.data"]),
    (["encoder", "native_stem", "file"], "/tmp/encoder_stem.npz"),
    (["decoder", "native", "final_norm", "file"], "sub/../../decoder_native.npz"),
])
def test_paths_that_leave_the_bundle_are_refused(int8_bundle, tmp_path, path, value):
    bundle = _edit(_clone(int8_bundle, tmp_path / "b"), _set(path, value))
    message = _refused(bundle, "points outside the bundle", verify=True)
    assert repr(value[0] if isinstance(value, list) else value) in message


def test_files_cannot_make_the_verifier_hash_a_system_file(tiny_bundles, tmp_path):
    bundle = _edit(_clone(tiny_bundles["merged"], tmp_path / "b"), _set(["files", "/etc/hostname"], "0" * 64))
    message = _refused(bundle, "'/etc/hostname' points outside the bundle", verify=True)
    assert "sha256" not in message  # refused before anything was hashed


def test_a_symlink_out_of_the_bundle_is_refused(tiny_bundles, tmp_path):
    bundle = shutil.copytree(tiny_bundles["merged"], tmp_path / "b")
    outside = tmp_path / "elsewhere.json"
    (bundle / manifest.TOKENIZER_FILE).rename(outside)
    (bundle / manifest.TOKENIZER_FILE).symlink_to(outside)  # same bytes, so its sha256 still matches
    _refused(bundle, "tokenizer.json resolves to .*elsewhere.json, outside the bundle", verify=True)


def test_a_file_the_runtime_loads_must_be_listed(int8_bundle, tmp_path):
    bundle = _edit(_clone(int8_bundle, tmp_path / "b"), lambda doc: doc["files"].pop(manifest.NATIVE_DECODER_FILE))
    _refused(bundle, "decoder.native.* names 'decoder_native.npz', which is not in its files")
    bundle = _edit(_clone(int8_bundle, tmp_path / "c"), lambda doc: doc["files"].pop(manifest.TOKENIZER_FILE))
    _refused(bundle, "the tokenizer names 'tokenizer.json', which is not in its files")


# ------------------------------------------------------------------------------------------- values vs weights
def _ref_to_decoder_graph(offset, length):
    def change(doc):
        doc["decoder"]["native"]["final_norm"] = {"file": "decoder.onnx", "offset": offset, "length": length,
                                                  "dtype": "float32", "shape": [64]}
    return change


@pytest.mark.parametrize("change,match", [
    (_set(["decoder", "native", "heads"], 5), "native\\.heads is 5, needs a multiple of kv_heads \\(2\\)"),
    (_set(["decoder", "native", "heads"], 6), "layers\\[0\\]\\.q\\.n is 64, but the layer geometry gives 96"),
    (_set(["decoder", "native", "lm_head", "n"], 100000), "lm_head\\.n is 100000, but .* gives 151936"),
    (_set(["decoder", "native", "intermediate"], 100000), "layers\\[0\\]\\.gate\\.n is 128, but .* gives 100000"),
    (_set(["decoder", "native", "hidden"], 100000), "native\\.hidden is 100000, but decoder\\.hidden_size is 64"),
    (_set(["decoder", "native", "kv_heads"], 3), "native\\.kv_heads is 3, but decoder\\.kv_heads is 2"),
    (_set(["decoder", "native", "scaling"], 0.5), "native\\.scaling is 0\\.5, but head_dim 16 gives 0\\.25"),
    (_set(["decoder", "native", "layers", 1, "down", "block"], 100), "down\\.block is 100, needs a power of two"),
    (_set(["decoder", "native", "layers", 0, "q", "weight", "shape"], [640, 1, 128]),
     "q\\.weight is .* but decoder_native\\.npz\\[t0\\] is uint8\\[64, 1, 128\\]"),
    (_set(["decoder", "native", "layers", 0, "q", "weight", "key"], "nope"), "names no array of decoder_native"),
    (_set(["decoder", "native", "embedding", "weight", "shape"], [1000, 1, 64]),
     "embedding\\.weight is .* but decoder_native\\.npz\\[t38\\] is uint8\\[151936"),
    (_set(["decoder", "native", "layers"], []), "native\\.layers is '0 layers', but decoder\\.num_layers is 2"),
    (_ref_to_decoder_graph(10 ** 9, 256), "final_norm\\.offset is 1000000000, but 256 bytes from there end past"),
    (_ref_to_decoder_graph(0, 100000), "final_norm\\.length is 100000, but float32\\[64\\] takes 256 bytes"),
    (_set(["decoder", "kv_heads"], 3), "decoder\\.kv_heads is 3, but graph decoder's past_key_0 heads is 2"),
    (_set(["decoder", "vocab_size"], 321), "decoder\\.vocab_size is 321, but graph decoder's logits width is 151936"),
    (_set(["decoder", "past_names", 0], "past_key_9"), "decoder\\.past_names is 'past_key_9', but graph decoder has no"),
    (_set(["prompt", "eos"], [151643, 999999]), "prompt\\.eos is 999999, but the vocabulary has 151936 ids"),
    (_set(["encoder", "native_stem", "channels"], 100000), "native_stem \\(encoder_stem\\.npz\\[w1\\]\\) is 'float32\\[9, 32\\]'"),
    (_set(["encoder", "native_stem", "bins"], 100000), "native_stem\\.bins is 100000, but the encoder graph's mel has 128"),
    (_set(["encoder", "native_stem", "block"], 128), "encoder_stem\\.npz\\[w2\\]"),
    (_set(["encoder", "native_stem", "chunk_frames"], 99), "chunk_frames is 99, but encoder\\.chunk_frames is 100"),
])
def test_numbers_that_disagree_with_the_weights_are_refused(int8_bundle, tmp_path, change, match):
    bundle = _edit(_clone(int8_bundle, tmp_path / "b"), change)  # digest recomputed: only the values are wrong
    _refused(bundle, match)


@pytest.fixture(scope="module")
def routed_int8_bundle(tiny_bundles, tmp_path_factory):
    """A routed INT8 bundle: its native index carries the gated low-rank branches (A, B and their rank)."""
    return int8_bundle_from(tiny_bundles["routed"], tmp_path_factory.mktemp("integrity_routed"))


def _branch(layer, name):
    return ["decoder", "native", "layers", layer, name, "lora"]


@pytest.mark.parametrize("change, match", [
    (_set([*_branch(1, "v"), "rank"], 3), "layers\\[1\\]\\.v\\.lora\\.a\\.shape is \\[64, 16\\], needs \\[64, 3\\]"),
    (_set([*_branch(0, "down"), "rank"], 10 ** 6), "down\\.lora\\.rank is 1000000, needs at most min\\(k, n\\)"),
    (_set([*_branch(0, "q"), "b", "shape"], [8, 1]), "q\\.lora\\.b is .* but decoder_native\\.npz"),
    (lambda doc: doc["decoder"]["native"]["lm_head"].update(lora=doc["decoder"]["native"]["layers"][0]["q"]["lora"]),
     "lm_head\\.lora is 'a branch', but the LM head is never adapted"),
    (_set(["mode"], "merged"), "LoRA branches', but only a routed bundle has them"),
])
def test_branches_that_disagree_with_the_weights_are_refused(routed_int8_bundle, tmp_path, change, match):
    bundle = _edit(_clone(routed_int8_bundle, tmp_path / "b"), change)
    _refused(bundle, match)


def test_the_clean_int8_bundle_passes_and_decodes(int8_bundle):
    from megaedge.runtime.transcriber import Transcriber

    info = manifest.read(int8_bundle)
    assert info.decoder["native"]["heads"] == 4 and info.encoder["native_stem"]["channels"] == 32
    tr = Transcriber.from_bundle(int8_bundle)
    assert len(tr.transcribe(speechlike(2.0), max_new_tokens=4, ignore_eos=True, loop_guard=False).token_ids) == 4


# ------------------------------------------------------------------------------------------- the CLI
def test_transcribe_refuses_a_tampered_manifest_with_one_line(tiny_bundles, tmp_path):
    import soundfile as sf

    wav = tmp_path / "a.wav"
    sf.write(str(wav), speechlike(1.0), 16000)
    edited = _edit(_clone(tiny_bundles["merged"], tmp_path / "edited"), _set(["prompt", "eos"], [1]), restamp=False)
    forged = _edit(_clone(tiny_bundles["merged"], tmp_path / "forged"), _set(["graphs", "decoder", "file"],
                                                                               "/etc/passwd"))
    for bundle, expected in ((edited, "was edited after export"), (forged, "points outside the bundle")):
        out = run_cli("transcribe", str(bundle), str(wav))
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1 and expected in lines[0], out.stderr
        assert "Traceback" not in out.stderr and out.stdout == ""


def test_a_manifest_nested_too_deeply_is_one_line(tiny_bundles, tmp_path):
    bundle = _clone(tiny_bundles["merged"], tmp_path / "deep")
    for depth in (100000, 985, 40):  # past the parser's recursion; past the digest encoder's only; merely deep
        (bundle / manifest.MANIFEST_NAME).write_text('{"format_version": 2, "x": ' + "[" * depth + "]" * depth + "}")
        _refused(bundle, "nested too deeply")


def test_a_damaged_npz_read_with_the_checks_off_is_one_line(int8_bundle, tmp_path):
    """--no-verify skips the digests; a byte flipped inside an .npz's array data then raised zipfile's BadZipFile
    (CRC-32) as a traceback where the load reads the arrays."""
    import numpy as np

    from megaedge.runtime.transcriber import Transcriber

    npz = tmp_path / "w.npz"
    np.savez(npz, w=np.arange(4096, dtype=np.float32))
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the array's bytes: only the CRC check on reading them sees it
    npz.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="w.npz: cannot be read .*CRC.*the bundle is damaged"):
        manifest.load_npz(npz)
    info = manifest.read(int8_bundle)
    for rel in {info.encoder["native_stem"]["file"], info.decoder["native"]["final_norm"]["file"]}:
        bundle = tmp_path / rel.replace(".", "_")
        shutil.copytree(int8_bundle, bundle)
        data = bytearray((bundle / rel).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (bundle / rel).write_bytes(bytes(data))
        with pytest.raises(BundleError, match=f"{rel}: (cannot be read|not a readable .npz)") as caught:
            tr = Transcriber.from_bundle(bundle, verify=False)
            tr.transcribe(speechlike(1.0), max_new_tokens=2, ignore_eos=True, loop_guard=False)
        assert "\n" not in str(caught.value)


def test_forged_npz_members_are_one_line_and_never_allocated(tmp_path):
    """An .npz member whose header declares more than it holds (2**45 floats), a pickled member, numpy's multi-line
    header refusal: each one line, before numpy allocates; members not asked for are never read (a forged bundle
    put a 3 GB zip bomb beside the arrays the index names); arrays come from the file each reference names."""
    import io
    import resource
    import zipfile

    import numpy as np

    good = tmp_path / "good.npz"
    np.savez(good, a=np.arange(4, dtype=np.float32))
    with zipfile.ZipFile(good, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb.npy", np.lib.format.magic(1, 0) + b"\0" * (400 << 20))  # never read: 400 MB of zeros
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert manifest.load_npz(good, ["a"])["a"].tolist() == [0, 1, 2, 3]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: the bomb stayed packed
    cases = {"giant": None, "pickle": None, "header": None}
    for name in cases:
        path = tmp_path / f"{name}.npz"
        buf = io.BytesIO()
        if name == "giant":
            np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (2**45,)})
            member = np.lib.format.magic(1, 0) + buf.getvalue()[8:] + b"\0" * 64
        elif name == "pickle":
            np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (1,)})
            member = np.lib.format.magic(1, 0) + buf.getvalue()[8:] + b"\x80\x04N."
        else:
            member = np.lib.format.magic(1, 0) + b"\xff\xff" + b" " * 70000
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("w.npy", member)
        with pytest.raises(BundleError) as caught:
            manifest.load_npz(path, ["w"])
        cases[name] = str(caught.value)
        assert "\n" not in cases[name] and "allow_pickle" not in cases[name], cases[name]
    assert "declares 140737488355328 bytes and holds" in cases["giant"]
    assert "Python objects" in cases["pickle"]
    with pytest.raises(BundleError, match="no array 'zz'"):
        manifest.load_npz(good, ["zz"])


def test_sidecar_references_read_the_file_they_name(tmp_path):
    import numpy as np

    from megaedge.runtime.native_decode import _Tensors

    np.savez(tmp_path / "one.npz", x=np.ones(3, np.float32))
    np.savez(tmp_path / "two.npz", x=np.full(3, 2, np.float32), y=np.zeros(2, np.float32))
    tensors = _Tensors(tmp_path)
    ref = {"dtype": "float32", "shape": [3], "key": "x"}
    assert tensors({**ref, "file": "one.npz"}).tolist() == [1, 1, 1]
    assert tensors({**ref, "file": "two.npz"}).tolist() == [2, 2, 2]


def test_a_manifest_with_a_huge_integer_is_one_line(tiny_bundles, tmp_path):
    bundle = _clone(tiny_bundles["merged"], tmp_path / "bigint")
    (bundle / manifest.MANIFEST_NAME).write_text('{"format_version": 2, "x": ' + "9" * 5000 + "}")
    _refused(bundle, r"not valid JSON \(Exceeds the limit")


@pytest.mark.parametrize("change", ["dtype", "fixed_dim", "name"])
def test_a_manifest_that_does_not_describe_its_graphs_is_one_line_at_load(tiny_bundles, tmp_path, change):
    """A forger who re-signs a manifest whose graph inputs agree with its other values but not with the graphs (a
    helper's probe: a float16 mel, 4 KV heads for 2, other stem bins) got onnxruntime's or a kernel's error with a
    traceback mid-call; the load compares each input's name, dtype and fixed dimensions with the graph's."""
    from megaedge.runtime.transcriber import Transcriber

    def forge(doc):
        past = next(t for t in doc["graphs"]["decoder"]["inputs"] if t["name"].startswith("past_key"))
        if change == "dtype":
            past["dtype"] = "float16"
        elif change == "fixed_dim":  # every value that names the KV heads, consistently
            doc["decoder"]["kv_heads"] *= 2
            for kind in ("inputs", "outputs"):
                for tensor in doc["graphs"]["decoder"][kind]:
                    if tensor["name"].startswith(("past_", "present_")):
                        tensor["shape"][1] *= 2
        else:  # the input and the decoder's list of past names, consistently
            doc["decoder"]["past_names"] = ["past_key_zz" if n == past["name"] else n
                                            for n in doc["decoder"]["past_names"]]
            past["name"] = "past_key_zz"

    bundle = _edit(_clone(tiny_bundles["merged"], tmp_path / "b"), forge)
    with pytest.raises(BundleError, match="decoder.onnx: the manifest (says input|lists inputs) .* does not describe "
                                          "this graph") as caught:
        Transcriber.from_bundle(bundle, decode="ort")
    assert "\n" not in str(caught.value)


def test_a_tokenizer_with_ids_past_the_vocabulary_is_named_in_one_line(tiny_bundles, tmp_path):
    """A forger who swaps tokenizer.json and re-signs every digest gets one line when a context or a stream's
    language uses an id the decoder has no row for, not an IndexError from the embedding lookup."""
    import hashlib

    from megaedge.runtime.streaming import StreamOptions
    from megaedge.runtime.transcriber import Transcriber

    bundle = _clone(tiny_bundles["merged"], tmp_path / "b")
    vocab = manifest.read(bundle).decoder["vocab_size"]
    tok = json.loads((bundle / manifest.TOKENIZER_FILE).read_text())
    tok["model"]["vocab"]["Z"] = vocab + 7
    (bundle / manifest.TOKENIZER_FILE).unlink()  # a hard link to the shared bundle's file
    (bundle / manifest.TOKENIZER_FILE).write_text(json.dumps(tok))
    digest = hashlib.sha256((bundle / manifest.TOKENIZER_FILE).read_bytes()).hexdigest()
    _edit(bundle, _set(["files", manifest.TOKENIZER_FILE], digest))
    tr = Transcriber.from_bundle(bundle, verify=True)
    assert tr.transcribe(speechlike(1.0), context="abc", max_new_tokens=2).text is not None  # unaffected ids
    for call in (lambda: tr.transcribe(speechlike(1.0), context="Z Z", max_new_tokens=2),
                 lambda: tr.create_stream(StreamOptions(context="Z Z")).accept_waveform(speechlike(3.0), 16000)):
        with pytest.raises(BundleError, match=f"token id {vocab + 7} is past the decoder's vocabulary") as err:
            call()
        assert "\n" not in str(err.value) and "tokenizer.json" in str(err.value)
