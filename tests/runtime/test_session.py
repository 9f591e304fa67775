"""The session interface's provider handling: CUDA asked for but not started is an error, never silent CPU timings."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from megaedge.errors import MegaedgeError
from megaedge.runtime import manifest, session


class _FallbackSession:
    """What onnxruntime-gpu gives where the CUDA libraries cannot load: a session that runs on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def get_outputs(self):
        return []

    def get_providers(self):
        return ["CPUExecutionProvider"]


def test_cuda_that_falls_back_to_cpu_is_an_error(fixture_bundles, monkeypatch):
    preloads = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: preloads.append(1), raising=False)
    monkeypatch.setattr(ort, "InferenceSession", _FallbackSession)
    monkeypatch.setattr(session, "_preloaded", False)
    info = manifest.read(fixture_bundles["merged"])
    with pytest.raises(MegaedgeError, match="CUDAExecutionProvider was requested but onnxruntime could not start it"):
        session.open_session(fixture_bundles["merged"] / info.graph("router").file, info.graph("router"), ("cuda",))
    assert preloads == [1]  # pip-installed CUDA libraries were offered to onnxruntime first
    assert session.resolve_providers(("cuda",)) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert preloads == [1]  # once per process


def test_unknown_provider_names_the_fix():
    with pytest.raises(MegaedgeError, match="not available in this onnxruntime.*install onnxruntime-gpu"):
        session.resolve_providers(("ROCMExecutionProvider",))


def test_memory_arena_option_reaches_every_session(tiny_bundles):
    # megaedge serve opens its sessions without onnxruntime's CPU pool (it only grows); results must not change.
    import numpy as np

    from megaedge.runtime.options import RuntimeOptions
    from megaedge.runtime.transcriber import Transcriber

    audio = (0.1 * np.random.default_rng(0).standard_normal(32000)).astype(np.float32)
    texts = {}
    for arena in (True, False):
        tr = Transcriber.from_bundle(tiny_bundles["merged"], memory_arena=arena, vad="off")
        sessions = [s for s in tr.sessions.values() if hasattr(s, "session")]
        assert sessions and all(s.session.get_session_options().enable_cpu_mem_arena is arena for s in sessions)
        texts[arena] = tr.transcribe(audio, max_new_tokens=8).token_ids
    assert texts[True] == texts[False]
    with pytest.raises(MegaedgeError, match="memory_arena 'no' must be True or False"):
        RuntimeOptions(memory_arena="no")


def test_a_provider_name_megaedge_does_not_know_is_named_as_such():
    from megaedge.runtime.session import resolve_providers

    for name in ("gpu", ""):
        with pytest.raises(MegaedgeError, match=f"execution provider {name!r} is not one of cpu, cuda, tensorrt"):
            resolve_providers([name])
