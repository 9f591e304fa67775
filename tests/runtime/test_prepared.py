"""Prepared copies (``megaedge prepare``): same tokens as the bundle's own graphs, used only when they match the
bundle and this machine, verification skipped only while no file changed."""

from __future__ import annotations

import json
import shutil

import pytest

from megaedge.errors import BundleError
from megaedge.runtime import manifest, prepared
from megaedge.runtime.transcriber import Transcriber
from tests.conftest import int8_bundle_from, run_cli, speechlike


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundles, tmp_path_factory):
    return int8_bundle_from(tiny_bundles["merged"], tmp_path_factory.mktemp("prepared"))


def _tokens(tr):
    return tr.transcribe(speechlike(3.0, seed=5), max_new_tokens=8, ignore_eos=True, loop_guard=False).token_ids


def test_prepared_copy_gives_the_same_tokens(int8_bundle):
    before = _tokens(Transcriber.from_bundle(int8_bundle))
    index = prepared.prepare(int8_bundle)
    tr = Transcriber.from_bundle(int8_bundle)
    encoder = tr.stem.graph if tr.stem is not None else "encoder"  # the one this machine runs (native stem or not)
    assert set(index["graphs"]) == {encoder, "decoder"}
    assert tr.sessions["decoder"].prepared and tr.sessions[encoder].prepared
    assert not tr.sessions["router"].prepared
    assert _tokens(tr) == before
    plain = Transcriber.from_bundle(int8_bundle, use_prepared=False)
    assert not plain.sessions["decoder"].prepared
    assert prepared.verified(int8_bundle, manifest.read(int8_bundle, verify=False))


def test_copies_of_another_machine_or_graph_are_ignored(tiny_bundles, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundles["merged"], bundle)
    prepared.prepare(bundle)
    info = manifest.read(bundle, verify=False)
    assert prepared.lookup(bundle, info, "decoder") is not None
    # another CPU or onnxruntime version: a different key, so nothing matches here
    target = prepared.directory(bundle)
    target.rename(target.with_name("ort0.0-other-cpu"))
    assert prepared.lookup(bundle, info, "decoder") is None
    assert not Transcriber.from_bundle(bundle).sessions["decoder"].prepared
    target.with_name("ort0.0-other-cpu").rename(target)
    # a re-exported graph (different sha256 in the manifest): its old prepared copy is not used
    doc = json.loads((bundle / manifest.MANIFEST_NAME).read_text())
    doc["files"][manifest.DECODER_FILE] = "0" * 64
    (bundle / manifest.MANIFEST_NAME).write_text(json.dumps(doc))
    changed = manifest.read(bundle, verify=False)
    assert prepared.lookup(bundle, changed, "decoder") is None
    assert prepared.lookup(bundle, changed, "encoder") is not None


def test_a_changed_file_is_verified_again(tiny_bundles, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundles["merged"], bundle)
    prepared.prepare(bundle)
    Transcriber.from_bundle(bundle)  # verified by prepare: no hashing, loads
    tokenizer = bundle / manifest.TOKENIZER_FILE
    tokenizer.write_text(tokenizer.read_text().replace("\"", "\"", 1) + " ")  # same JSON, different bytes
    assert not prepared.verified(bundle, manifest.read(bundle, verify=False))
    with pytest.raises(BundleError, match="sha256"):
        Transcriber.from_bundle(bundle)


def test_prepare_cli(tiny_bundles, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundles["merged"], bundle)
    out = run_cli("prepare", str(bundle))
    assert out.returncode == 0, out.stderr
    assert "decoder" in out.stdout and "verified" in out.stdout
    assert prepared.directory(bundle).is_dir()
    out = run_cli("prepare", str(bundle), "--remove")
    assert out.returncode == 0 and "removed" in out.stdout
    assert not prepared.directory(bundle).exists()
    missing = run_cli("prepare", str(tmp_path / "nope"))
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1


def test_a_copy_that_computes_differently_is_caught(tiny_bundles, int8_bundle):
    import onnxruntime as ort

    info = manifest.read(tiny_bundles["merged"], verify=False)
    feed = prepared._probe_feed(info, "encoder")
    original = ort.InferenceSession(str(tiny_bundles["merged"] / manifest.ENCODER_FILE))
    spec = info.graph("encoder")
    same = prepared._disagreement(original, tiny_bundles["merged"] / manifest.ENCODER_FILE, spec, feed, None)
    assert same == ""
    other = prepared._disagreement(original, int8_bundle / manifest.ENCODER_FILE, spec, feed, None)  # int8 weights
    assert other.startswith("max abs difference")
