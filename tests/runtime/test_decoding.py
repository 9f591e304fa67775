"""The one decoder interface (runtime/decoding.py): greedy budgets, rollback that equals never having gone on, and
the three state kinds giving the tokens the engines gave before."""

from __future__ import annotations

import numpy as np
import pytest

from megaedge.errors import MegaedgeError
from megaedge.runtime import decoding, kernels
from tests.conftest import int8_bundle_from, speechlike

needs_kernel = pytest.mark.skipif(kernels.compiler() is None, reason="no C compiler for the native kernels")
VOCAB = 50
EOS = (49,)
MARKER = 40


class Scripted:
    """A decoder state that emits a fixed token sequence (logits peaked at the next one) and counts steps."""

    def __init__(self, script):
        self.script, self.steps = list(script), 0

    def logits(self, i):
        out = np.zeros(VOCAB, np.float32)
        out[self.script[i] if i < len(self.script) else EOS[0]] = 5.0
        return out

    def step(self, token, gate):
        self.steps += 1
        return self.logits(self.steps)


def test_greedy_stops_at_eos_and_never_steps_past_its_limit():
    state = Scripted([3, 4, 5, 49, 7])
    out = decoding.greedy(state, state.logits(0), None, EOS, limit=10)
    assert out.tokens == [3, 4, 5] and out.stop == "eos" and state.steps == 3
    state = Scripted([3, 4, 5, 6])
    out = decoding.greedy(state, state.logits(0), None, EOS, limit=2)
    assert out.tokens == [3, 4] and out.stop == "limit" and state.steps == 1  # no step whose logits go unread
    state = Scripted([3, 4, 5, 6])
    assert decoding.greedy(state, state.logits(0), None, EOS, limit=5, prefix=[1, 2, 9]).tokens == [3, 4]
    assert decoding.greedy(state, state.logits(0), None, EOS, limit=3, prefix=[1, 2, 9]).tokens == []
    state = Scripted([3, 4, 5, 6])
    assert decoding.greedy(state, state.logits(0), None, EOS, limit=9, new_limit=3).tokens == [3, 4, 5]
    state = Scripted([3, 49])
    assert decoding.greedy(state, state.logits(0), None, EOS, limit=4, ignore_eos=True).tokens == [3, 49, 49, 49]


def test_text_budget_counts_tokens_after_the_marker():
    """--max-new-tokens 1 gives one word of text, not the 'language' of the prefix."""
    script = [10, 11, MARKER, 20, 21, 22]  # "language English<asr_text>" then text
    state = Scripted(script)
    out = decoding.greedy(state, state.logits(0), None, EOS, limit=100, text_budget=1, marker=MARKER)
    assert out.tokens == [10, 11, MARKER, 20] and out.stop == "budget"
    state = Scripted(script)
    assert decoding.greedy(state, state.logits(0), None, EOS, limit=100, text_budget=2,
                           marker=None).tokens == [10, 11]  # forced language: every token is text
    state = Scripted([7] * 40)  # no marker ever: counted as text after MAX_PREFIX_TOKENS
    out = decoding.greedy(state, state.logits(0), None, EOS, limit=100, text_budget=3, marker=MARKER)
    assert len(out.tokens) == decoding.MAX_PREFIX_TOKENS + 3
    assert decoding.text_tokens([1, MARKER, 2, 3], MARKER) == 2 and decoding.text_tokens([1, 2], MARKER) == 0


def test_logprobs_are_the_chosen_tokens_log_softmax():
    state = Scripted([3, 4])
    out = decoding.greedy(state, state.logits(0), None, EOS, limit=5)
    x = state.logits(0).astype(np.float64)
    want = x[3] - np.log(np.exp(x).sum())
    assert out.logprobs[0] == pytest.approx(want, abs=1e-9) and len(out.logprobs) == len(out.tokens)


def test_no_repeat_ngram_bans_the_repeating_token():
    state = Scripted([1, 2, 1, 2, 1, 2, 1, 2])
    out = decoding.greedy(state, state.logits(0), None, EOS, limit=8, no_repeat_ngram=2)
    pairs = list(zip(out.tokens, out.tokens[1:]))
    assert len(pairs) == len(set(pairs))
    # a banned repeat's replacement is scored by the model's own distribution, where the repeat was likelier
    forced = next(i for i, t in enumerate(out.tokens) if i >= 2 and t != [1, 2][i % 2])
    x = state.logits(forced).astype(np.float64)
    assert out.logprobs[forced] == pytest.approx(x[out.tokens[forced]] - np.log(np.exp(x).sum()), abs=1e-9)


@pytest.fixture(scope="module")
def merged(fixture_bundles):
    from megaedge.runtime.transcriber import Transcriber

    return Transcriber.from_bundle(fixture_bundles["merged"])


def _rollback_case(tr, state_factory):
    """Tokens after prompt + a tail that is stepped and rolled back equal tokens without the tail."""
    audio = tr.encode(speechlike(3.0, seed=2))
    ids = tr.prompt(audio.shape[0], None, None)
    head, rest = ids[:-3], ids[-3:]
    a, b = state_factory(), state_factory()
    a.extend(head, audio, None, 0)
    b.extend(head, audio, None, 0)
    mark = a.length
    a.extend(rest + [11, 12], None, None, 1)  # a tail, then steps, then forgotten
    a.step(13, None)
    a.rollback(mark)
    la, lb = a.extend(rest, None, None, 2), b.extend(rest, None, None, 2)
    np.testing.assert_allclose(la, lb, rtol=0, atol=1e-5 * float(np.abs(lb).max()))
    a.step(int(np.argmax(la[-1])), None)
    a.rollback(mark + 1)  # not a mark: a sliced copy of the cache
    b.rollback(mark + 1)
    np.testing.assert_allclose(a.step(7, None), b.step(7, None), rtol=0, atol=1e-5 * float(np.abs(lb).max()))
    with pytest.raises(MegaedgeError, match="roll back|rewind"):
        a.rollback(a.length + 1)


def test_onnxruntime_state_rolls_back_exactly(merged):
    _rollback_case(merged, lambda: decoding.OrtState(merged))


@needs_kernel
def test_native_state_rolls_back_exactly(fixture_bundles, tmp_path_factory):
    from megaedge.runtime.transcriber import Transcriber

    tr = Transcriber.from_bundle(int8_bundle_from(fixture_bundles["merged"], tmp_path_factory.mktemp("dec")),
                                 decode="native", prefill="native")
    _rollback_case(tr, lambda: decoding.NativeState(tr))
    assert isinstance(decoding.open_state(tr, 8), decoding.NativeState)
    assert isinstance(decoding.open_state(Transcriber.from_bundle(tr.bundle, decode="ort"), 8), decoding.OrtState)


def test_offline_and_streaming_share_one_greedy_loop():
    """One definition: neither the transcriber nor the stream carries a loop of its own."""
    import inspect

    from megaedge.runtime import streaming, transcriber

    for module in (streaming, transcriber):
        source = inspect.getsource(module)
        assert "np.argmax(logits)" not in source and "decoding.greedy(" in source


@pytest.fixture(scope="module")
def tiny_fixed(tiny_mega, tmp_path_factory):
    """The tiny checkpoint's fixed-KV decoder (export --target cuda), fp32: runs on the CPU provider."""
    from megaedge.export.bundle import ExportOptions, export_bundle
    from megaedge.runtime.transcriber import Transcriber

    bundle = export_bundle(tiny_mega, tmp_path_factory.mktemp("fixed") / "b", ExportOptions(target="cuda"))
    return Transcriber.from_bundle(bundle)


def test_fixed_kv_state_rolls_back_exactly(tiny_fixed):
    from megaedge.runtime import fixed_kv

    _rollback_case(tiny_fixed, lambda: fixed_kv.FixedKVState.of(tiny_fixed))
    assert isinstance(decoding.open_state(tiny_fixed, 8), fixed_kv.FixedKVState)
    assert isinstance(decoding.open_state(tiny_fixed, stream=True), fixed_kv.FixedKVState)


def test_fixed_kv_state_gives_the_onnxruntime_states_logits(tiny_fixed, transcribers):
    """Same weights, growing cache vs fixed buffers: the same prompt and steps give the same logits."""
    growing = transcribers["merged"]
    audio = growing.encode(speechlike(3.0, seed=4))
    ids = growing.prompt(audio.shape[0], None, None)
    a, b = decoding.OrtState(growing), decoding.open_state(tiny_fixed)
    la, lb = a.extend(ids, audio, None, 3), b.extend(ids, audio, None, 3)
    scale = float(np.abs(la).max())
    np.testing.assert_allclose(lb, la, rtol=0, atol=1e-5 * scale)
    for token in (5, 9, 7):
        np.testing.assert_allclose(b.step(token, None), a.step(token, None), rtol=0, atol=1e-5 * scale)
