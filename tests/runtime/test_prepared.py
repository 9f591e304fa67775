"""Prepared copies (``megaedge prepare``): same tokens as the bundle's own graphs, used only when they match the
bundle and this machine, verification skipped only while no file changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from megaedge.errors import BundleError
from megaedge.runtime import manifest, prepared
from megaedge.runtime.transcriber import Transcriber
from tests.conftest import REPO, int8_bundle_from, run_cli, speechlike


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
    manifest.write(manifest.Manifest.from_dict(doc), bundle)  # with its digest, as a re-export writes it
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
    assert not (bundle / manifest.PREPARED_DIR).exists()
    missing = run_cli("prepare", str(tmp_path / "nope"))
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1


def test_remove_deletes_only_what_prepare_wrote(tiny_bundles, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundles["merged"], bundle)
    prepared.prepare(bundle)
    key_dir = prepared.directory(bundle)
    generation = prepared._current(bundle)
    mine = [key_dir / "notes.txt", generation / "results.csv", key_dir / "mine" / "data.bin",
            generation / "my-export.onnx"]  # an .onnx the generation's index does not list is not megaedge's
    for path in mine:
        path.parent.mkdir(exist_ok=True)
        path.write_text("a user's file")
    prepared.prepare(bundle)  # a second prepare collects the old generation: the user's file in it stays
    assert not (generation / prepared.READERS_LOCK).exists() and mine[1].exists() and mine[3].exists()
    out = run_cli("prepare", str(bundle), "--remove")
    assert out.returncode == 0 and "left in place" in out.stdout and "notes.txt" in out.stdout
    assert all(path.read_text() == "a user's file" for path in mine)
    left = {str(p.relative_to(key_dir)) for p in key_dir.rglob("*")}
    assert left == {str(p.relative_to(key_dir)) for p in mine} | {"mine", generation.name, prepared.PREPARE_LOCK,
                                                                   f"{generation.name}/{prepared.INDEX_FILE}"}
    assert prepared._current(bundle) is None


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


def _same_size_edit(path, offset=-10):
    """Flip one byte of ``path`` in place and restore its mtime, as an attacker hiding an edit would."""
    st = os.stat(path)
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_a_same_size_edit_with_the_mtime_restored_is_verified_again(tiny_bundles, tmp_path):
    bundle = shutil.copytree(tiny_bundles["merged"], tmp_path / "b")
    prepared.prepare(bundle)
    assert prepared.verified(bundle, manifest.read(bundle, verify=False))
    _same_size_edit(bundle / manifest.ROUTER_FILE)  # ctime moved: the stamp differs, so the file is hashed
    info = manifest.read(bundle, verify=False)
    assert not prepared.verified(bundle, info)
    assert prepared.lookup(bundle, info, "decoder") is None  # copies are used only for the files prepare verified
    with pytest.raises(BundleError, match="router.onnx: sha256 .* does not match the manifest"):
        Transcriber.from_bundle(bundle)


def test_an_edited_prepared_copy_is_not_used(tiny_bundles, tmp_path):
    bundle = shutil.copytree(tiny_bundles["merged"], tmp_path / "b")
    before = _tokens(Transcriber.from_bundle(bundle, use_prepared=False))
    prepared.prepare(bundle)
    info = manifest.read(bundle, verify=False)
    copy = prepared.lookup(bundle, info, "encoder")
    assert copy is not None
    data = copy.with_name(copy.name + ".data")
    _same_size_edit(data, offset=len(data.read_bytes()) // 2)
    assert prepared.lookup(bundle, info, "encoder") is None  # its sha256 no longer matches the recorded one
    tr = Transcriber.from_bundle(bundle)
    assert not tr.sessions["encoder"].prepared and _tokens(tr) == before
    _same_size_edit(data, offset=len(data.read_bytes()) // 2)  # undone: a new stamp, the recorded content again
    assert prepared.lookup(bundle, info, "encoder") == copy


def test_prepared_copies_that_came_with_a_copied_bundle_are_not_used(tiny_bundles, tmp_path):
    bundle = shutil.copytree(tiny_bundles["merged"], tmp_path / "b")
    prepared.prepare(bundle)
    copied = shutil.copytree(bundle, tmp_path / "copy")  # new inodes: prepare did not verify these files
    info = manifest.read(copied, verify=False)
    assert not prepared.verified(copied, info)
    assert prepared.lookup(copied, info, "decoder") is None
    assert prepared.lookup(bundle, info, "decoder") is not None


def test_the_probe_feed_stays_inside_the_vocabulary(tiny_bundles):
    from dataclasses import replace

    info = manifest.read(tiny_bundles["merged"], verify=False)
    spec = info.graph("decoder")
    logits = next(t for t in spec.outputs if t.name == "logits")
    small = replace(spec, outputs=tuple(replace(t, shape=(*t.shape[:-1], 321)) if t is logits else t
                                        for t in spec.outputs))
    for pad in (5, 151676):  # the fixture's placeholder inside the vocabulary, the tiny model's beyond it
        shrunk = replace(info, graphs={**info.graphs, "decoder": small}, prompt=replace(info.prompt, audio_pad=pad))
        ids = prepared._probe_feed(shrunk, "decoder")["input_ids"]
        assert ids.shape == (1, 6) and 0 <= ids.min() and ids.max() < 321 and pad not in ids


def test_concurrent_prepares_and_a_transcribe_during_them(tiny_bundles, tmp_path):
    bundle = shutil.copytree(tiny_bundles["merged"], tmp_path / "b")
    expected = _tokens(Transcriber.from_bundle(bundle, use_prepared=False))
    code = "import sys\nfrom megaedge.cli.main import main\nsys.exit(main(sys.argv[1:]))"
    runs = [subprocess.Popen([sys.executable, "-c", code, "prepare", str(bundle), "--threads", "1"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = threading.Event()
    threading.Thread(target=lambda: ([r.wait() for r in runs], done.set()), daemon=True).start()
    loads = []
    while not done.is_set() or not loads:  # transcribe while both prepare; every load must give the same tokens
        tr = Transcriber.from_bundle(bundle)
        loads.append(tr.sessions["decoder"].prepared)
        assert _tokens(tr) == expected
    for run in runs:
        out, err = run.communicate()
        assert run.returncode == 0 and "prepared b" in out, err
    names = os.listdir(prepared.directory(bundle))
    assert not [n for n in names if n.startswith(prepared.STAGING_PREFIX)]
    info = manifest.read(bundle, verify=False)
    assert prepared.verified(bundle, info) and prepared.lookup(bundle, info, "decoder") is not None
    tr = Transcriber.from_bundle(bundle)
    assert tr.sessions["decoder"].prepared and _tokens(tr) == expected


def test_copies_made_stale_by_a_chmod_are_reported_not_silently_dropped(tiny_bundles, tmp_path, caplog):
    """A chmod (or chown, or a copy) changes the files' ctime, and only the stamps prove the copies were made here
    for these files: they are not used, and the load says so once as a warning; doctor names the state."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundles["merged"], bundle)
    info = manifest.read(bundle, verify=False)
    assert prepared.status(bundle, info)[0] == "none"
    prepared.prepare(bundle)
    assert prepared.status(bundle, info)[0] == "ready"
    for path in bundle.iterdir():
        if path.is_file():
            path.chmod(path.stat().st_mode)  # the same mode: only the ctime moves, as chmod -R a-w moves it
    assert prepared.status(bundle, info)[0] == "stale"
    with caplog.at_level("WARNING", logger="megaedge"):
        assert prepared.lookup(bundle, info, "decoder") is None and prepared.lookup(bundle, info, "encoder") is None
    stale = [r for r in caplog.records if "prepared copies are not used" in r.getMessage()]
    assert len(stale) == 1 and stale[0].levelname == "WARNING"
    out = run_cli("doctor", "--bundle", str(bundle))
    assert "prepared      stale: the bundle files changed" in out.stdout
    import json

    assert json.loads(run_cli("doctor", "--json", "--bundle", str(bundle)).stdout)["bundle_prepared"]["state"] == "stale"


def _forge_stamps(bundle):
    """What anyone who can write the bundle can do after editing its files: record their new stamps in the
    prepared index, as if prepare had verified them."""
    generation = prepared._current(bundle)
    index = json.loads((generation / prepared.INDEX_FILE).read_text())
    index["verified"] = prepared._stamps(bundle, index["files"])
    (generation / prepared.INDEX_FILE).write_text(json.dumps(index))
    return generation, index


def test_a_pinned_load_trusts_only_prepared_records_sealed_under_its_users_key(tiny_bundles, tmp_path, monkeypatch,
                                                                                caplog):
    """prepared/ is outside the bundle's digest: under a pin, an edited file with forged stamps is hashed and
    refused, a forged prepared copy is not used, copies sealed by another user's key are not trusted (one
    warning), and a generation linked out of the bundle is not read. Unpinned, the stamps stay the fast path."""
    bundle = shutil.copytree(tiny_bundles["merged"], tmp_path / "b")
    pin = manifest.bundle_digest(bundle)
    prepared.prepare(bundle)
    info = manifest.read(bundle, verify=False)
    assert prepared.verified(bundle, info, pinned=True)
    tr = Transcriber.from_bundle(bundle, expected_digest=pin)
    assert tr.sessions["decoder"].prepared
    # a prepared copy edited, its record rewritten to match: the seal breaks
    generation, index = _forge_stamps(bundle)
    data = generation / (index["graphs"]["encoder"]["file"] + ".data")
    _same_size_edit(data, offset=len(data.read_bytes()) // 2)
    record = index["graphs"]["encoder"]["files"][data.name]
    record.update(sha256=manifest.sha256_file(data), stamp=prepared._stamp(data))
    (generation / prepared.INDEX_FILE).write_text(json.dumps(index))
    assert prepared.lookup(bundle, info, "encoder") is not None  # unpinned: the bundle's writer is trusted
    assert prepared.lookup(bundle, info, "encoder", pinned=True) is None
    # a bundle file edited, its stamps forged: unpinned the fast path holds, pinned it is hashed and refused
    _same_size_edit(bundle / manifest.ROUTER_FILE)
    _forge_stamps(bundle)
    assert prepared.verified(bundle, info) and not prepared.verified(bundle, info, pinned=True)
    with pytest.raises(BundleError, match="router.onnx: sha256 .* does not match the manifest"):
        Transcriber.from_bundle(bundle, expected_digest=pin)
    _same_size_edit(bundle / manifest.ROUTER_FILE)  # undone; prepared again by this user, then another's key
    prepared.prepare(bundle)
    monkeypatch.setenv("MEGAEDGE_STATE_DIR", str(tmp_path / "another-user"))
    with caplog.at_level("WARNING", logger="megaedge.runtime.prepared"):
        tr = Transcriber.from_bundle(bundle, expected_digest=pin)
    assert not tr.sessions["decoder"].prepared and "not sealed under this user's key" in caplog.text
    assert Transcriber.from_bundle(bundle).sessions["decoder"].prepared
    monkeypatch.undo()
    # a generation linked out of the bundle
    generation = prepared._current(bundle)
    outside = shutil.move(str(generation), str(tmp_path / "outside"))
    os.symlink(outside, generation)
    assert prepared._current(bundle) is None and prepared.lookup(bundle, info, "decoder") is None
