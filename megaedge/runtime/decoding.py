"""One decoder interface and one greedy loop, for offline transcription and for streams.

A ``DecoderState`` is the mutable part of decoding: a KV cache and its length, over weights that stay shared and
read-only in the ``Transcriber``. Every transcription call and every stream opens its own state, which is what
makes a Transcriber safe to share between threads. The calls:

* ``extend(ids, audio, gate, logit_rows)``: append ``ids`` (the i-th audio placeholder taking row i of ``audio``)
  at the next positions; the logits of the last ``logit_rows`` rows. A prompt is an ``extend`` of an empty state.
* ``step(token, gate)``: append one token; its logits.
* ``rollback(length)``: forget the positions from ``length`` on (a stream drops a hop's uncommitted tail).

Four implementations: onnxruntime's decoder graphs (``OrtState``; the prefill graph for calls of several rows
where the bundle has one), megaedge's native kernels (``NativeState``), the hand-off of an onnxruntime prompt
to native steps (``HandoffState``, for bundles that paid for a prefill graph), and the fixed-KV decoder of
``--target cuda`` bundles (``fixed_kv.FixedKVState``: buffers updated in place, CUDA graphs on the GPU). ``gate`` is the LoRA gate of a
routed bundle (1 = LoRA route, 0 = base), an argument of every call: the route belongs to the segment or stream,
never to the shared transcriber (native states pass it to the kernels per call; merged bundles ignore it).

``greedy`` is the one greedy loop: EOS, budgets counted in text tokens, the no-repeat ban of the loop guard, and
each token's log-probability (the confidence results carry).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from megaedge.errors import Cancelled, MegaedgeError
from megaedge.runtime import fixed_kv
from megaedge.runtime.session import gpu_gate

LAST = np.zeros(1, np.int64)  # logits_at for one-row calls
# From 4 rows on, per-channel dynamic int8 beats the 8-bit block kernel (benchmarks/gemv_bandwidth.py --rows 2,4,8):
# the smallest call the prefill graph of a cpu-prefill bundle takes.
PREFILL_MIN_ROWS = 4
# A language prefix ("language English<asr_text>") is a few tokens; a model that has not emitted the marker after
# this many is not going to, and the text budget must not wait for it forever.
MAX_PREFIX_TOKENS = 12


class OrtState:
    """A KV cache in onnxruntime's memory (IO binding), run through the bundle's decoder graphs.

    onnxruntime returns a new cache from every call, so the cache an ``extend`` left behind stays valid after later
    calls: ``rollback`` to such a length swaps it back in without a copy (a stream's every hop); any other length
    is sliced out of the current cache (a copy)."""

    def __init__(self, transcriber):
        self.tr = transcriber
        self.cache = None  # present tensors of the last call (OrtValues), None for an empty cache
        self.length = 0
        self._marks: dict[int, list] = {}  # length -> the cache an extend left at that length
        hidden = int(transcriber.manifest.graph("decoder").input("audio_features").shape[1])
        self._no_audio = np.zeros((0, hidden), transcriber.kv_dtype)

    def _run(self, session, ids: list[int], audio, logits_at, gate, check: bool):
        feed = self.tr.decoder_feed(ids, self._no_audio if audio is None else audio, logits_at, self.cache, gate)
        outs = session.run_bound(feed, check=check)
        self.cache, self.length = outs[1:], self.length + len(ids)
        return outs[0].numpy()

    def extend(self, ids: list[int], audio, gate: float | None, logit_rows: int = 1) -> np.ndarray:
        if not 0 <= logit_rows <= len(ids) or not ids:
            raise MegaedgeError(f"decoder: logits of {logit_rows} rows asked of {len(ids)} rows")
        rows = range(len(ids) - max(logit_rows, 1), len(ids))  # the graph returns at least one row
        start = self.length
        logits = self._run(self.tr.decoder_for(len(ids)), ids, audio, list(rows), gate, check=True)
        # Marks kept: where this call started (a stream returns there after a tail) and where it ended.
        self._marks = {n: c for n, c in self._marks.items() if n == start}
        self._marks[self.length] = self.cache
        return logits[len(logits) - logit_rows:]

    def step(self, token: int, gate: float | None) -> np.ndarray:
        return self._run(self.tr.sessions["decoder"], [token], None, LAST, gate, check=False)[-1]

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise MegaedgeError(f"decoder: cannot roll back to {length} of {self.length} positions")
        self._marks = {n: c for n, c in self._marks.items() if n <= length}
        if length == self.length:
            return
        if length == 0:
            self.cache = None
        elif length in self._marks:
            self.cache = self._marks[length]
        else:
            import onnxruntime as ort

            with gpu_gate.shared(self._cache_on_gpu()):  # a device-to-host copy
                self.cache = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :length]))
                              for v in self.cache]
        self.length = length

    def presents(self) -> list[np.ndarray]:
        """The cache as arrays [1, kv_heads, length, head_dim], key then value per layer (the native hand-off)."""
        with gpu_gate.shared(self._cache_on_gpu()):
            return [value.numpy() for value in self.cache]

    def _cache_on_gpu(self) -> bool:
        return bool(self.cache) and self.cache[0].device_name().lower() == "cuda"


class NativeState:
    """A KV cache of megaedge's native decoder (runtime/native_decode.py), its own over the shared weights."""

    def __init__(self, transcriber, budget: int = 0):
        self.decoder = transcriber.native.spawn()
        self.audio_token = transcriber.manifest.prompt.audio_pad
        self.budget = budget  # steps expected after the first extend: its cache is sized for them at once
        self.batcher = getattr(transcriber, "batcher", None)  # runtime/batching.py: steps of concurrent states

    @property
    def length(self) -> int:
        return self.decoder.length

    def extend(self, ids: list[int], audio, gate: float | None, logit_rows: int = 1) -> np.ndarray:
        audio = np.zeros((0, self.decoder.hidden), np.float32) if audio is None else audio
        if self.decoder.length == 0 and self.budget:
            return self.decoder.prefill(ids, audio, self.audio_token, self.budget, gate)[None]
        return self.decoder.extend(self.decoder.rows_for(ids, audio, self.audio_token), logit_rows, gate)

    def step(self, token: int, gate: float | None) -> np.ndarray:
        if self.batcher is None:
            return self.decoder.step(token, gate)
        return self.batcher.step(self.decoder, token, gate)

    def stepping(self):
        """Around a run of steps: lets the batcher wait for this state's next step (runtime/batching.py)."""
        return self.batcher.stepping() if self.batcher is not None else contextlib.nullcontext()

    def rollback(self, length: int) -> None:
        self.decoder.rewind(length)


class HandoffState:
    """The prompt in onnxruntime's prefill graph, the steps natively: a bundle that paid a second weight copy for a
    prefill graph keeps using it for prompts; its cache is handed to the native decoder at the first step."""

    def __init__(self, transcriber, budget: int):
        self.ort = OrtState(transcriber)
        self.native = NativeState(transcriber)
        self.budget = budget
        self._native = False

    @property
    def length(self) -> int:
        return self.native.length if self._native else self.ort.length

    def extend(self, ids: list[int], audio, gate: float | None, logit_rows: int = 1) -> np.ndarray:
        if self._native:
            return self.native.extend(ids, audio, gate, logit_rows)
        return self.ort.extend(ids, audio, gate, logit_rows)

    def step(self, token: int, gate: float | None) -> np.ndarray:
        if not self._native:  # not right after the prompt: the first token need not wait for the weight read
            self.native.decoder.start(self.ort.presents(), self.budget)
            self._native, self.ort = True, None
        return self.native.step(token, gate)

    def rollback(self, length: int) -> None:
        (self.native if self._native else self.ort).rollback(length)

    def stepping(self):
        return self.native.stepping()


def open_state(transcriber, budget: int = 0, stream: bool = False):
    """A fresh decoder state for one call (``budget``: the steps it expects) or one stream."""
    if fixed_kv.is_fixed(transcriber.manifest.decoder):
        return fixed_kv.FixedKVState.of(transcriber)
    if transcriber.native is None:
        return OrtState(transcriber)
    if stream or transcriber.native_prefill:
        return NativeState(transcriber, 0 if stream else budget)
    return HandoffState(transcriber, budget)


@dataclass
class Greedy:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each token in ``tokens``
    stop: str = ""  # "eos" | "budget" | "limit"


def log_softmax_at(logits: np.ndarray, token: int) -> float:
    """log p(token) under ``logits`` (float64: a 150k-entry sum in float32 loses the small terms)."""
    top = float(logits[token])
    x = logits.astype(np.float64) - top
    return float(-np.log(np.exp(x).sum()))


def text_tokens(tokens, marker: int | None) -> int:
    """How many of ``tokens`` are text: those after the ``<asr_text>`` marker (all of them when ``marker`` is None,
    i.e. when the prompt forced the language and so already holds the marker)."""
    if marker is None:
        return len(tokens)
    for i, token in enumerate(tokens):
        if token == marker:
            return len(tokens) - i - 1
    return 0


def greedy(state, logits: np.ndarray, gate: float | None, eos, *, limit: int, new_limit: int | None = None,
           text_budget: int | None = None, marker: int | None = None, prefix=(), ignore_eos: bool = False,
           no_repeat_ngram: int = 0, cancel=None) -> Greedy:
    """Greedy decoding from ``logits`` (those after the last row in ``state``), continuing ``prefix`` (tokens
    already decoded: a stream's committed ones).

    Stops at EOS (unless ``ignore_eos``); when prefix + tokens reach ``limit`` tokens (the count transformers'
    ``max_new_tokens`` makes); after ``new_limit`` new tokens; or once ``text_budget`` of them are text
    (``text_tokens`` with ``marker``; a model that emits no marker within MAX_PREFIX_TOKENS has its tokens counted as
    text from there on). A budget is never spent on a step whose logits nobody reads. ``no_repeat_ngram`` bans every
    token that would repeat an n-gram of prefix + tokens (the loop guard's second resort). Raises ``Cancelled``
    before a step once ``cancel`` (an event: ``is_set()``) is set, so a caller can stop a long decode."""
    out = Greedy()
    history = list(prefix)
    eos = set(eos)
    if len(history) >= limit or new_limit == 0 or text_budget == 0:
        out.stop = "limit"
        return out
    stepping = getattr(state, "stepping", None)
    with stepping() if stepping is not None else contextlib.nullcontext():
        return _greedy(state, logits, gate, eos, out, history, limit, new_limit, text_budget, marker, ignore_eos,
                       no_repeat_ngram, cancel)


def _greedy(state, logits, gate, eos, out, history, limit, new_limit, text_budget, marker, ignore_eos,
            no_repeat_ngram, cancel) -> Greedy:
    while True:
        model = logits  # the confidence is the model's own: a token the guard forced on it is an unsure one
        if no_repeat_ngram and len(history) >= no_repeat_ngram - 1:
            banned = _banned_tokens(history, no_repeat_ngram)
            if banned:
                logits = logits.copy()
                logits[list(banned)] = -np.inf
        token = int(np.argmax(logits))
        if token in eos and not ignore_eos:
            out.stop = "eos"
            return out
        out.tokens.append(token)
        out.logprobs.append(log_softmax_at(model, token))
        history.append(token)
        if len(history) >= limit or (new_limit is not None and len(out.tokens) >= new_limit):
            out.stop = "limit"
            return out
        if text_budget is not None:
            counted = text_tokens(history, marker)
            if counted == 0 and marker is not None and marker not in history:
                counted = max(0, len(history) - MAX_PREFIX_TOKENS)
            if counted >= text_budget:
                out.stop = "budget"
                return out
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled after {len(out.tokens)} tokens")
        logits = state.step(token, gate)


def _banned_tokens(tokens: list[int], n: int) -> set[int]:
    prefix = tuple(tokens[len(tokens) - (n - 1):]) if n > 1 else ()
    banned = set()
    for i in range(len(tokens) - n + 1):
        if tuple(tokens[i: i + n - 1]) == prefix:
            banned.add(tokens[i + n - 1])
    return banned


def repetition(tokens: list[int], min_repeats: int = 4, max_period: int = 12) -> bool:
    """True when the tail is one n-gram (n <= max_period) repeated >= min_repeats times: a decoding loop."""
    for period in range(1, max_period + 1):
        need = period * min_repeats
        if len(tokens) < need:
            break
        tail = tokens[-need:]
        unit = tail[:period]
        if all(tail[i] == unit[i % period] for i in range(need)):
            return True
    return False
