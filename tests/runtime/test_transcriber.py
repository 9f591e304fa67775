"""Lean runtime: no torch, bad input (one line, exit 1), loop guard, long-form segmentation, one signature."""

from __future__ import annotations

import inspect
import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from megaedge.errors import AudioError, BundleError, MegaedgeError
from megaedge.runtime import manifest, segmenting
from tests.conftest import BLOCK_TORCH, run_cli, speechlike


def _wav(path, samples, rate=16000, subtype="PCM_16"):
    sf.write(str(path), samples, rate, subtype=subtype)
    return str(path)


def test_transcribe_cli_without_torch(tiny_bundles, tmp_path):
    wav = _wav(tmp_path / "a.wav", speechlike(2.0))
    stereo = _wav(tmp_path / "s.flac", np.stack([speechlike(1.5, 1), speechlike(1.5, 2)], 1), rate=44100)
    proc = run_cli("transcribe", str(tiny_bundles["routed"]), wav, stereo, "--json", "--max-new-tokens", "6",
                   python_prelude=BLOCK_TORCH)
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]  # JSON Lines: one object per file
    assert len(docs) == 2 and all(d["route"] in ("base", "lora") for d in docs)
    assert 0.0 <= docs[0]["degraded_prob"] <= 1.0 and docs[0]["timings"]["encoder"] > 0


def test_runtime_imports_nothing_heavy():
    code = BLOCK_TORCH + "import megaedge.runtime.transcriber, megaedge.runtime.evaluate, megaedge.cli.main\nprint('ok')"
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def _one_line_error(proc, *fragments):
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_audio_inputs(tiny_bundles, tmp_path):
    bundle = str(tiny_bundles["merged"])
    full = _wav(tmp_path / "full.wav", speechlike(1.0))
    data = open(full, "rb").read()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.wav").write_bytes(b"not audio at all" * 10)
    _wav(tmp_path / "empty.wav", np.zeros(0, np.float32))
    nan = speechlike(1.0)
    nan[100] = np.nan
    _wav(tmp_path / "nan.wav", nan, subtype="FLOAT")
    cases = {"missing.wav": "no such file", "cut.wav": "truncated WAV", "junk.wav": "cannot read audio",
             "empty.wav": "empty", "nan.wav": "NaN or Inf"}
    for name, fragment in cases.items():
        _one_line_error(run_cli("transcribe", bundle, str(tmp_path / name)), name, fragment)


def test_all_zero_audio_gives_empty_text(tiny_bundles, tmp_path):
    from megaedge.runtime.transcriber import Transcriber

    result = Transcriber.from_bundle(tiny_bundles["routed"]).transcribe(np.zeros(32000, np.float32))
    assert result.text == "" and result.token_ids == []
    proc = run_cli("transcribe", str(tiny_bundles["merged"]), _wav(tmp_path / "z.wav", np.zeros(16000)))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("]")


def test_bad_bundles(tiny_bundles, tmp_path):
    wav = _wav(tmp_path / "a.wav", speechlike(1.0))
    _one_line_error(run_cli("transcribe", str(tmp_path), wav), "not a megaedge bundle")
    _one_line_error(run_cli("transcribe", str(tmp_path / "nope"), wav), "not a directory")
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundles["merged"], tampered)
    graph = tampered / manifest.ENCODER_FILE
    raw = bytearray(graph.read_bytes())
    raw[-10] ^= 0xFF
    graph.write_bytes(bytes(raw))
    _one_line_error(run_cli("transcribe", str(tampered), wav), "sha256", "--no-verify")
    newer = tmp_path / "newer"
    shutil.copytree(tiny_bundles["merged"], newer)
    doc = json.loads((newer / manifest.MANIFEST_NAME).read_text())
    doc["format_version"] = manifest.FORMAT_VERSION + 1
    (newer / manifest.MANIFEST_NAME).write_text(json.dumps(doc))
    _one_line_error(run_cli("transcribe", str(newer), wav), "newer", "pip install -U megaedge")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_bundles["merged"], partial)
    (partial / manifest.ROUTER_FILE).unlink()
    with pytest.raises(BundleError, match="listed .* but missing"):
        manifest.read(partial)


def test_merged_and_routed_share_one_signature(tiny_bundles):
    from megaedge.runtime.transcriber import Transcriber

    merged = Transcriber.from_bundle(tiny_bundles["merged"])
    routed = Transcriber.from_bundle(tiny_bundles["routed"])
    assert inspect.signature(merged.transcribe) == inspect.signature(routed.transcribe)
    audio = speechlike(1.2, seed=4)
    for tr, route in ((merged, "merged"), (routed, None)):
        result = tr.transcribe(audio, max_new_tokens=4, loop_guard=False)
        assert len(result.token_ids) == 4 and (route is None or result.route == route)
    with pytest.raises(MegaedgeError, match="routed bundle"):
        Transcriber.from_bundle(tiny_bundles["merged"], route="base")


def test_session_checks_feeds(tiny_bundles):
    from megaedge.runtime.transcriber import Transcriber

    tr = Transcriber.from_bundle(tiny_bundles["merged"])
    enc = tr.sessions["encoder"]
    with pytest.raises(BundleError, match="missing"):
        enc.run({"mel": np.zeros((1, 128, 100), np.float32)})
    with pytest.raises(BundleError, match="dtype"):
        enc.run({"mel": np.zeros((1, 128, 100), np.float64), "valid_tokens": np.array([13])})
    with pytest.raises(BundleError, match="shape"):
        enc.run({"mel": np.zeros((1, 80, 100), np.float32), "valid_tokens": np.array([13])})


def test_loop_guard_redecodes_repetition(tiny_bundles):
    from megaedge.runtime.transcriber import Transcriber, _repetition

    assert _repetition([5, 6, 7, 8, 8, 8, 8]) and _repetition([1, 2, 3] * 4) and not _repetition([1, 2, 3, 4, 5])
    tr = Transcriber.from_bundle(tiny_bundles["merged"])
    audio = speechlike(2.0, seed=10)
    plain = tr.transcribe(audio, max_new_tokens=40, loop_guard=False)
    assert _repetition(plain.token_ids), "random tiny weights loop; this clip must show it"
    guarded = tr.transcribe(audio, max_new_tokens=40)
    assert guarded.loop_guard and guarded.segments[0].loop_guard == "no_repeat_ngram"
    assert not _repetition(guarded.token_ids)
    routed = Transcriber.from_bundle(tiny_bundles["routed"]).transcribe(audio, route="lora", max_new_tokens=40)
    assert routed.segments[0].loop_guard == "base_route" and routed.route == "base"


def test_long_form_segments_cut_in_silence():
    rate = 16000
    audio = speechlike(95, seed=1)
    gaps = [(27.0, 27.6), (55.0, 55.5), (83.0, 83.4)]
    for a, b in gaps:
        audio[int(a * rate) : int(b * rate)] = 0.0
    bounds = segmenting.segments(audio, 30.0)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(audio)
    assert all(0 < (e - s) <= 30 * rate for s, e in bounds)
    for (_, cut), (a, b) in zip(bounds[:-1], gaps):
        assert a * rate <= cut <= b * rate
    assert segmenting.segments(audio, None) == [(0, len(audio))]


def test_short_last_window_is_encoded_unpadded_with_the_same_output(tiny_bundles):
    from megaedge.runtime import features
    from megaedge.runtime.transcriber import Transcriber

    tr = Transcriber.from_bundle(tiny_bundles["merged"])
    audio = speechlike(19.3, seed=5)  # 2 full 8 s windows + 3.3 s (4 chunks, the last one partial)
    mel, valid = segmenting.encoder_windows(features.asr_log_mel(audio), tr.manifest.encoder)
    calls = segmenting.encoder_calls(mel, valid, 16)
    assert [(m.shape[2], len(v)) for m, v in calls] == [(800, 2), (400, 1)]
    assert [len(v) for _, v in segmenting.encoder_calls(mel, valid, 1)] == [1, 1, 1]
    padded = tr.sessions["encoder"].run({"mel": mel, "valid_tokens": valid})[0]
    whole = np.concatenate([padded[i, :v] for i, v in enumerate(valid)])
    np.testing.assert_allclose(tr.encode(audio), whole, rtol=1e-5, atol=1e-5)


def test_long_form_transcription_joins_segments(tiny_bundles):
    from megaedge.runtime.transcriber import Transcriber

    tr = Transcriber.from_bundle(tiny_bundles["merged"])
    result = tr.transcribe(speechlike(25, seed=2), segment_seconds=10, max_new_tokens=3, loop_guard=False)
    assert len(result.segments) == 3
    assert result.token_ids == [t for s in result.segments for t in s.token_ids]
    assert result.segments[-1].end == pytest.approx(25.0)


def test_audio_errors_in_api():
    from megaedge.runtime import audio

    with pytest.raises(AudioError, match="empty"):
        audio.load(np.zeros(0, np.float32))


def test_load_lanes_keep_the_largest_graph_alone():
    from megaedge.runtime.transcriber import load_lanes

    sizes = {"decoder": 1800, "encoder": 660, "router": 5}
    # 2 cores: the decoder's session creation (the critical path) gets a core of its own
    assert load_lanes(sizes, 2) == [["decoder"], ["encoder", "router", "tokenizer"]]
    # a cpu-prefill bundle: two decoders of equal size go to different lanes, the rest balances behind them
    lanes = load_lanes({**sizes, "decoder_prefill": 1800}, 2)
    assert sorted(map(sorted, lanes)) == [["decoder", "encoder"], ["decoder_prefill", "router", "tokenizer"]]
    # one core: everything in turn; many cores: at most one lane per job
    assert load_lanes(sizes, 1) == [["decoder", "encoder", "router", "tokenizer"]]
    assert sorted(map(tuple, load_lanes(sizes, 16))) == [("decoder",), ("encoder",), ("router",), ("tokenizer",)]


def test_a_pinned_digest_admits_only_that_bundle(tiny_bundles):
    from megaedge.runtime import manifest
    from megaedge.runtime.transcriber import Transcriber
    from tests.conftest import run_cli

    merged, routed = tiny_bundles["merged"], tiny_bundles["routed"]
    digest = manifest.bundle_digest(merged)
    assert Transcriber.from_bundle(merged, expected_digest=digest).manifest.mode == "merged"
    with pytest.raises(MegaedgeError, match="digest"):
        Transcriber.from_bundle(routed, expected_digest=digest)
    with pytest.raises(MegaedgeError, match="not 64 hex digits; use the one `megaedge doctor --bundle BUNDLE`"):
        Transcriber.from_bundle(merged, expected_digest="abc")
    doctor = run_cli("doctor", "--bundle", str(merged))
    assert doctor.returncode == 0 and f"bundle digest {digest}" in doctor.stdout
    clip = speechlike(1.0, seed=3)
    import soundfile as sf

    path = merged.parent / "pin.wav"
    sf.write(str(path), clip, 16000)
    wrong = run_cli("transcribe", str(routed), str(path), "--expect-digest", digest)
    assert wrong.returncode == 1 and len(wrong.stderr.strip().splitlines()) == 1 and "digest" in wrong.stderr


def test_doctor_verifies_a_bundles_files(tiny_bundles, tmp_path):
    """The digest doctor prints covers the manifest; a file changed after export showed nowhere (exit 0)."""
    import shutil

    from tests.conftest import run_cli

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundles["merged"], copy)
    good = run_cli("doctor", "--bundle", str(copy))
    assert good.returncode == 0 and "bundle files  all" in good.stdout
    data = bytearray((copy / "decoder.onnx").read_bytes())
    data[-10] ^= 1
    (copy / "decoder.onnx").write_bytes(bytes(data))
    bad = run_cli("doctor", "--bundle", str(copy))
    assert bad.returncode == 1
    assert "ERROR        bundle files: " in bad.stdout and "decoder.onnx: sha256" in bad.stdout


def test_segment_seconds_outside_its_range_is_one_line(tiny_bundles):
    """-1 raised numpy's 'argmin of an empty sequence'; 0 silently meant never cut."""
    from megaedge.runtime.transcriber import Transcriber

    tr = Transcriber.from_bundle(tiny_bundles["merged"])
    for bad in (-1, 0, 7.9, 301):
        with pytest.raises(MegaedgeError, match=r"segment_seconds .* is outside 8-300 s"):
            tr.transcribe(speechlike(1.0, seed=4), segment_seconds=bad)
    for bad in ("30", True, float("nan")):
        with pytest.raises(MegaedgeError, match=r"segment_seconds .* is not a number of seconds; pass a number in 8-300"):
            tr.transcribe(speechlike(1.0, seed=4), segment_seconds=bad)
    assert tr.transcribe(speechlike(1.0, seed=4), segment_seconds=8).segments
    assert tr.transcribe(speechlike(1.0, seed=4), segment_seconds=np.float32(30)).segments  # a numpy number
    # None (never cut) is still one prompt: an hour of it ran minutes and came out garbled, past any tested budget
    long = np.zeros(int(300.5 * 16000), np.float32)
    with pytest.raises(MegaedgeError, match=r"audio of 300.5 s with segment_seconds=None: one segment is at most 300"):
        tr.transcribe(long, segment_seconds=None)
    for name in ("loop_guard", "ignore_eos"):  # "no" once left the loop guard on, silently
        with pytest.raises(MegaedgeError, match=f"{name} 'no' is not True or False"):
            tr.transcribe(speechlike(1.0, seed=4), **{name: "no"})


def test_a_forced_language_is_each_segments_language(tiny_bundles):
    """--language en gave "English" at the top and null in every segment."""
    from megaedge.runtime.transcriber import Transcriber

    result = Transcriber.from_bundle(tiny_bundles["merged"]).transcribe(speechlike(1.0, seed=5), language="en")
    assert result.language == "English" and [s.language for s in result.segments] == ["English"]


def test_wrong_types_at_the_python_api_are_one_line(tiny_bundles):
    """Each of these raised AttributeError / TypeError from inside (a new user's probe)."""
    from megaedge.runtime.options import RuntimeOptions
    from megaedge.runtime.streaming import StreamOptions
    from megaedge.runtime.transcriber import Transcriber

    bundle = tiny_bundles["merged"]
    for bad, message in (((123,), "bundle path 123 is not a path"), ((None,), "bundle path None is not a path"),
                         ((bundle, {"threads": 1}), "is not a RuntimeOptions"),
                         ((bundle, "cuda"), "is not a RuntimeOptions")):
        with pytest.raises(MegaedgeError, match=message):
            Transcriber.from_bundle(*bad)
    for bad, message in ((dict(providers=5), "providers 5 is not a list of names"),
                         (dict(verify="no"), "verify 'no' must be True or False"),
                         (dict(use_prepared=1), "use_prepared 1 must be True or False"),
                         (dict(profile_dir=5), "profile_dir 5 is not a folder path")):
        with pytest.raises(MegaedgeError, match=message):
            RuntimeOptions(**bad)
    with pytest.raises(MegaedgeError, match=r"unknown runtime option\(s\) \['foo'\]"):
        RuntimeOptions.preset("onnxruntime", foo=1)
    with pytest.raises(MegaedgeError, match="runtime preset"):
        RuntimeOptions.preset(["default"])
    tr = Transcriber.from_bundle(bundle)
    assert tr.create_stream("interactive").opts == StreamOptions.preset("interactive")
    with pytest.raises(MegaedgeError, match="are not a StreamOptions"):
        tr.create_stream({"hop_seconds": 1})
    result = tr.transcribe(speechlike(1.0, seed=6), max_new_tokens="5", max_text_tokens="3")
    assert len(result.token_ids) <= 5


def test_values_an_embedder_got_wrong_are_one_line_not_a_default(tiny_bundles):
    """An embedder's probe: an empty route ran the default route, a truthy string turned partials on, a number or
    a path given as samples was judged as audio, a pickled Transcriber failed deep in onnxruntime."""
    import pickle

    from megaedge.runtime.streaming import StreamOptions
    from megaedge.runtime.transcriber import Transcriber

    tr = Transcriber.from_bundle(os.fsencode(tiny_bundles["merged"]))  # a bytes path, as transcribe takes one
    audio = speechlike(1.0, seed=6)
    for route in ("", [], 0):
        with pytest.raises(MegaedgeError, match=r"route .* is not one of"):
            tr.transcribe(audio, route=route)
    with pytest.raises(MegaedgeError, match="route '' is not one of"):
        tr.create_stream(StreamOptions(route=""))
    stream = tr.create_stream()
    with pytest.raises(MegaedgeError, match="partials 'no' is not True or False"):
        stream.accept_waveform(audio, 16000, partials="no")
    with pytest.raises(MegaedgeError, match="'clip.flac' is a path; a stream takes samples"):
        stream.accept_waveform("clip.flac", 16000)
    for number in (5, 0.5, np.int16(3)):
        with pytest.raises(MegaedgeError, match="is one number, not audio"):
            tr.transcribe(number)
    with pytest.raises(MegaedgeError, match="^audio: the array has 3 dimensions"):
        tr.transcribe(np.zeros((2, 2, 1600), np.float32))
    with pytest.raises(MegaedgeError, match="cannot be pickled .* load one in each process"):
        pickle.dumps(tr)


class _TripsAfter:
    """A cancel event that becomes set on its ``n``-th question (after n - 1 decode steps or segments)."""

    def __init__(self, n: int):
        self.n, self.asked = n, 0

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked >= self.n


def test_a_set_cancel_event_stops_a_call_and_leaves_the_transcriber_as_it_was(transcribers):
    """A call whose cancel event is set mid-decode raises Cancelled after the steps before it (not at the end of
    the 40-token budget); already set, before any segment; the next call on the same Transcriber gives what it
    gave before; a value with no is_set() is one line."""
    import threading

    from megaedge.errors import Cancelled

    tr = transcribers["merged"]
    audio = speechlike(25, seed=2)
    kw = dict(max_new_tokens=40, ignore_eos=True, loop_guard=False, segment_seconds=10)
    before = tr.transcribe(audio, **kw)
    assert len(before.segments) == 3 and all(len(s.token_ids) == 40 for s in before.segments)
    trip = _TripsAfter(48)  # segment 1: 1 + 1 + 39 questions (one per step); segment 2: 1 + 1, 4 steps, set at 5
    with pytest.raises(Cancelled, match="after 5 tokens"):
        tr.transcribe(audio, cancel=trip, **kw)
    assert trip.asked == 48
    done = threading.Event()
    done.set()
    with pytest.raises(Cancelled, match="at 0.0 s"):
        tr.transcribe(audio, cancel=done, **kw)
    assert tr.transcribe(audio, cancel=threading.Event(), **kw).token_ids == before.token_ids
    with pytest.raises(MegaedgeError, match="cancel True has no is_set"):
        tr.transcribe(audio, cancel=True, **kw)
