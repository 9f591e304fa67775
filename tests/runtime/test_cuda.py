"""The onnxruntime CUDA execution provider on the trained fixture (marked gpu; skipped with the reason elsewhere):
FP32 and FP16 bundles on the GPU give the CPU FP32 tokens, routed bundles route alike, a stream's final equals the
offline result, and the KV cache stays on the device between decode steps; the fixed-KV decoder of --target cuda
bundles captures a CUDA graph and gives the same tokens, its int4 weights agree with FP32."""

from __future__ import annotations

import numpy as np
import pytest


def _cuda_unavailable() -> str | None:
    """Why the CUDA execution provider cannot run here (None where it can): onnxruntime-gpu lists it even without a
    GPU and silently runs on CPU, so the shipped one-node copy probe is opened to see what it really got."""
    import onnxruntime as ort

    from megaedge.runtime import device_bandwidth, session

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu in its place)"
    probe = ort.InferenceSession(str(device_bandwidth.PROBE_DIR / device_bandwidth.COPY_PROBE),
                                 providers=session.resolve_providers(("cuda",)))  # preloads pip-installed CUDA
    if probe.get_providers()[0] != "CUDAExecutionProvider":
        return "CUDAExecutionProvider could not start (no GPU or CUDA / cuDNN libraries missing)"
    return None


_WHY_NOT = _cuda_unavailable()
# Decided at collection, before any session fixture exports a bundle for nothing.
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")]


@pytest.fixture(scope="module")
def clips():
    """Held-out fixture speech (the trained model's own domain: synthetic noise makes it loop, where near-tied
    logits flip between any two precisions), plus a chain of five crossing several 8 s encoder windows with a
    long prompt, where FP16 attention masks overflow if they are built wrongly."""
    from megaedge import fixture
    from megaedge.runtime import audio as audio_io
    from megaedge.runtime.evaluate import read_set

    heldout = [audio_io.load(item["path"]) for item in read_set(fixture.heldout_manifest())[::6]]
    chain = np.concatenate(heldout[:5])
    assert len(chain) > 2 * 8 * 16000
    return [*heldout[:3], chain]


@pytest.fixture(scope="module")
def fixture_fp16(fixture_bundles, tmp_path_factory):
    from megaedge import fixture
    from megaedge.export.bundle import ExportOptions, export_bundle

    return export_bundle(fixture.model_dir(), tmp_path_factory.mktemp("fp16") / "merged", ExportOptions(precision="fp16"))


def _tokens(tr, clips, **kw):
    return [tr.transcribe(c, segment_seconds=None, **kw).token_ids for c in clips]


def test_fp32_on_cuda_gives_the_cpu_tokens(fixture_bundles, clips):
    from megaedge.runtime.transcriber import Transcriber

    cpu = Transcriber.from_bundle(fixture_bundles["merged"])
    gpu = Transcriber.from_bundle(fixture_bundles["merged"], providers=("cuda",))
    assert gpu.sessions["decoder"].device == "cuda" and gpu.sessions["encoder"].device == "cuda"
    assert _tokens(gpu, clips) == _tokens(cpu, clips)


def test_fp16_on_cuda_gives_the_cpu_fp32_tokens(fixture_bundles, fixture_fp16, clips):
    from megaedge.runtime.transcriber import Transcriber

    cpu = Transcriber.from_bundle(fixture_bundles["merged"])
    gpu = Transcriber.from_bundle(fixture_fp16, providers=("cuda",))
    assert gpu.float_dtype == np.float16
    assert _tokens(gpu, clips) == _tokens(cpu, clips)


def test_routed_on_cuda_routes_and_decodes_like_cpu(fixture_bundles, clips):
    from megaedge.runtime.transcriber import Transcriber

    cpu = Transcriber.from_bundle(fixture_bundles["routed"])
    gpu = Transcriber.from_bundle(fixture_bundles["routed"], providers=("cuda",))
    for clip in clips:
        a, b = cpu.transcribe(clip, segment_seconds=None), gpu.transcribe(clip, segment_seconds=None)
        assert (b.route, b.token_ids) == (a.route, a.token_ids)


def test_stream_final_on_cuda_equals_offline(fixture_bundles, clips):
    from megaedge.runtime.streaming import StreamOptions
    from megaedge.runtime.transcriber import Transcriber

    gpu = Transcriber.from_bundle(fixture_bundles["merged"], providers=("cuda",))
    samples = clips[3]
    stream = gpu.create_stream(StreamOptions.preset("exact"))
    for i in range(0, len(samples), 8000):
        stream.accept_waveform(samples[i : i + 8000], 16000)
    assert list(stream.final().token_ids) == gpu.transcribe(samples, segment_seconds=None).token_ids


def test_kv_cache_stays_on_the_gpu(fixture_bundles, clips, monkeypatch):
    """Decode steps hand the KV OrtValues back to the next step: they must live in GPU memory, not round-trip."""
    from megaedge.runtime.transcriber import Transcriber

    gpu = Transcriber.from_bundle(fixture_bundles["merged"], providers=("cuda",))
    session = gpu.sessions["decoder"]
    devices = []
    original = session.run_bound

    def recording(feed, check=True):
        outs = original(feed, check)
        devices.extend(o.device_name().lower() for o in outs[1:])
        return outs

    monkeypatch.setattr(session, "run_bound", recording)
    gpu.transcribe(clips[1], segment_seconds=None, max_new_tokens=4, ignore_eos=True)
    assert devices and set(devices) == {"cuda"}


def test_gpu_bandwidth_probe_reads_gpu_memory():
    """bench's bound for a CUDA decoder: GPU memory through onnxruntime (Orin Nano ~68 GB/s up to H100 ~3.3 TB/s)."""
    from megaedge.runtime import device_bandwidth

    copy, read = device_bandwidth.device_bandwidths("cuda", mib=256)
    print(f"GPU copy {copy:.0f} GB/s, read {read:.0f} GB/s")
    assert 20 < read < 10_000 and 20 < copy < 10_000


def test_bench_on_cuda_holds_decode_to_the_gpu_bound(fixture_bundles, tmp_path):
    import json

    from tests.conftest import run_cli

    out = tmp_path / "bench.json"
    proc = run_cli("bench", str(fixture_bundles["merged"]), "--providers", "cuda", "--audio", "5", "--repeat", "2",
                   "--tokens", "8", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["bandwidth_of"] == "cuda" and report["device"]["gpu"] and report["gpu_memory_mib"] > 0
    assert "GPU copy bandwidth" in proc.stdout and report["device"]["gpu"] in proc.stdout
    run = report["runs"]["5s"]
    assert 0 < run["decode_percent_of_read_bound"] < 100


# ------------------------------------------------------------------------------------------- fixed-KV decoder
@pytest.fixture(scope="module")
def fixed_fp16(tmp_path_factory):
    """The fixture as a --target cuda bundle: fixed-KV decoder, fp16 (CUDA's GroupQueryAttention is fp16 only),
    float and int4 weights."""
    from megaedge import fixture
    from megaedge.export.bundle import ExportOptions, export_bundle
    from megaedge.export.fixed_kv import bundle_with_weights

    root = tmp_path_factory.mktemp("fixed")
    fp16 = export_bundle(fixture.model_dir(), root / "fp16", ExportOptions(precision="fp16", target="cuda"))
    return {"fp16": fp16, "int4": bundle_with_weights(fp16, root / "int4", "int4")}


def test_fixed_kv_on_cuda_captures_a_graph_and_gives_the_cpu_fp32_tokens(fixture_bundles, fixed_fp16, clips):
    from megaedge.runtime import decoding, fixed_kv
    from megaedge.runtime.transcriber import Transcriber

    cpu = Transcriber.from_bundle(fixture_bundles["merged"])
    gpu = Transcriber.from_bundle(fixed_fp16["fp16"], providers=("cuda",))
    session = gpu.sessions["decoder"]
    assert session.device == "cuda" and session.cuda_graph
    state = decoding.open_state(gpu)
    assert isinstance(state, fixed_kv.FixedKVState) and state.buffers.graph_id > 0
    assert {v.device_name().lower() for v in state.buffers.bank._values} == {"cuda"}
    del state
    # several clips in turn: each call leases the pooled buffers and replays the graph captured on them
    assert _tokens(gpu, clips) == _tokens(cpu, clips)


def test_fixed_kv_int4_on_cuda_agrees_with_fp32(fixture_bundles, fixed_fp16, clips):
    from megaedge.runtime.transcriber import Transcriber
    from tests.export.test_fixed_kv import MIN_AGREEMENT, _agreement

    cpu = _tokens(Transcriber.from_bundle(fixture_bundles["merged"]), clips)
    gpu = _tokens(Transcriber.from_bundle(fixed_fp16["int4"], providers=("cuda",)), clips)
    assert _agreement(cpu, gpu) >= MIN_AGREEMENT["int4"]


def test_fixed_kv_stream_on_cuda_equals_offline(fixed_fp16, clips):
    """Streams extend and roll back through prompt runs (no graph) between replayed steps."""
    from megaedge.runtime.streaming import StreamOptions
    from megaedge.runtime.transcriber import Transcriber

    gpu = Transcriber.from_bundle(fixed_fp16["fp16"], providers=("cuda",))
    samples = clips[3]
    stream = gpu.create_stream(StreamOptions.preset("exact"))
    for i in range(0, len(samples), 8000):
        stream.accept_waveform(samples[i : i + 8000], 16000)
    assert list(stream.final().token_ids) == gpu.transcribe(samples, segment_seconds=None).token_ids


def test_concurrent_calls_on_cuda_graphs_keep_their_own_buffers(fixed_fp16, clips):
    from concurrent.futures import ThreadPoolExecutor

    from megaedge.runtime.transcriber import Transcriber

    gpu = Transcriber.from_bundle(fixed_fp16["fp16"], providers=("cuda",))
    alone = _tokens(gpu, clips)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda c: gpu.transcribe(c, segment_seconds=None).token_ids, clips * 2))
    assert together == alone * 2


def test_batched_steps_on_cuda_follow_the_solo_steps(fixed_fp16):
    """Five states at different lengths in one bank, stepped through the graph's batch axis on the GPU (no CUDA
    graph) against the same prompts in states stepped alone (the runtime's runner: captured graphs for the first
    eight slots): the same greedy tokens, logits to fp16 rounding."""
    from megaedge.runtime import fixed_kv
    from megaedge.runtime.transcriber import Transcriber

    gpu = Transcriber.from_bundle(fixed_fp16["fp16"], providers=("cuda",))
    runner = fixed_kv.runner_for(gpu)
    assert runner.bank_slots == 8 and not runner.full_banks
    session = gpu.sessions["decoder"]
    wide = fixed_kv.FixedKVRunner(session.session, gpu.manifest.decoder, False, gpu.float_dtype, "cuda",
                                  session.cuda_graph, batch_steps=8, full_banks=True)
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(1, 250, size=n)] for n in (4, 19, 9, 27, 6)]
    batched = [fixed_kv.FixedKVState(wide) for _ in prompts]
    assert len({id(s.buffers.bank) for s in batched}) == 1
    solo = [fixed_kv.FixedKVState(runner) for _ in prompts]
    for b, s, ids in zip(batched, solo, prompts):
        b.extend(ids, None, None)
        s.extend(ids, None, None)
    tokens = [11] * 5
    for _ in range(6):
        got = wide.step_batch(batched, tokens, [None] * 5)
        want = np.stack([s.step_alone(t, None) for s, t in zip(solo, tokens)])
        assert list(got.argmax(1)) == list(want.argmax(1))
        np.testing.assert_allclose(got, want, atol=0.05, rtol=0)
        tokens = [int(t) for t in want.argmax(1)]


@pytest.fixture(scope="module")
def tiny_rotary(tmp_path_factory):
    """The tiny geometry (heads of 16: GroupQueryAttention rotates them itself, and onnxruntime may fold the q/k
    norms into it on CUDA) with realistic random weights: growing FP32 for the CPU, fixed-KV FP16 for the GPU."""
    from megaedge.export.bundle import ExportOptions, export_bundle
    from megaedge.export.factory import write_checkpoint

    root = tmp_path_factory.mktemp("tiny_rotary")
    checkpoint = write_checkpoint(root / "ckpt", geometry="tiny", layout_name="mega", seed=0, init="realistic")
    return {"growing": export_bundle(checkpoint, root / "growing", ExportOptions(validate=False, include_router=False)),
            "fixed": export_bundle(checkpoint, root / "fixed", ExportOptions(target="cuda", precision="fp16",
                                                                             validate=False, include_router=False))}


def test_fixed_kv_rotary_on_cuda_follows_cpu_fp32_call_by_call(tiny_rotary):
    """Prompt, continued prompt, steps (captured, then replayed), a rollback and more: the CUDA graph's logits
    (its attention rotating from seqlens_k, the q/k norms wherever onnxruntime puts them) stay within fp16 rounding
    of CPU FP32's at every call, and pick the same token."""
    from megaedge.runtime import decoding, fixed_kv
    from megaedge.runtime.transcriber import Transcriber
    from tests.conftest import speechlike

    cpu = Transcriber.from_bundle(tiny_rotary["growing"])
    gpu = Transcriber.from_bundle(tiny_rotary["fixed"], providers=("cuda",))
    assert gpu.sessions["decoder"].cuda_graph
    audio = cpu.encode(speechlike(3.0, seed=4))
    ids = cpu.prompt(audio.shape[0], None, None)
    want, got = decoding.OrtState(cpu), decoding.open_state(gpu)
    assert isinstance(got, fixed_kv.FixedKVState)
    calls = [("extend", (ids, audio, None, 1)), ("extend", ([11, 12, 13, 14], None, None, 4))]
    calls += [("step", (20 + i, None)) for i in range(8)]
    calls += [("rollback", (len(ids) + 6,)), ("extend", ([31, 32], None, None, 2))]
    calls += [("step", (40 + i, None)) for i in range(4)]
    for name, args in calls:
        a, b = getattr(want, name)(*args), getattr(got, name)(*args)
        if name == "rollback":
            continue
        a, b = np.atleast_2d(a), np.atleast_2d(b).astype(np.float32)
        scale = float(np.abs(a).max())
        assert float(np.abs(a - b).max()) <= 0.02 * scale + 1e-3, f"{name}{args[:1]}"
        assert (a.argmax(-1) == b.argmax(-1)).all(), f"{name}{args[:1]}"
