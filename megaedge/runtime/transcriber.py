"""The lean transcriber: a bundle + numpy + onnxruntime + tokenizers. No torch, no transformers, no export code.

``Transcriber.from_bundle(path, providers=("cpu",), route="auto")`` then ``transcribe(audio)``. Merged and routed
bundles share this one class and signature; in a routed bundle the router picks the route per segment and the
``lora_gate`` input selects it, so both routes run on one copy of the weights.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megaedge.errors import BundleError, Cancelled, MegaedgeError
from megaedge.runtime import audio as audio_io
from megaedge.runtime import decoding, features, fixed_kv, limits, manifest, native_stem, routing, segmenting
from megaedge.runtime.decoding import LAST, PREFILL_MIN_ROWS  # noqa: F401  (where callers have found them)
from megaedge.runtime.options import RuntimeOptions
from megaedge.runtime.session import open_session
from megaedge.runtime.text import ParsedOutput, max_new_tokens_for, parse_asr_output

log = logging.getLogger("megaedge.runtime.transcriber")

ROUTES = ("auto", "base", "lora")


@dataclass
class SegmentResult:
    start: float
    end: float
    text: str
    token_ids: list[int]
    route: str
    degraded_prob: float | None
    loop_guard: str | None = None  # how a degenerate repetition was handled, when it happened
    language: str | None = None
    # Confidence: the mean and the lowest log-probability of the segment's tokens (None without tokens). A command
    # interface can refuse to act on a low minimum: one unsure word is enough to change a command.
    mean_logprob: float | None = None
    min_logprob: float | None = None
    speech: bool = True  # False when the voice-activity detector heard no speech (no decoding was done)
    logprobs: list[float] = field(default_factory=list)  # of each token in token_ids


@dataclass
class Result:
    text: str
    language: str | None
    route: str  # "base", "lora", "merged" or "mixed" (long-form with different routes per segment)
    degraded_prob: float | None
    token_ids: list[int]
    timings: dict = field(default_factory=dict)
    segments: list[SegmentResult] = field(default_factory=list)
    loop_guard: bool = False
    raw: str = ""
    mean_logprob: float | None = None  # over every token of every segment
    min_logprob: float | None = None

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


class _Timer:
    def __init__(self):
        self.totals: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds


_repetition = decoding.repetition


_TOKENIZER = "tokenizer"  # a load job beside the graphs


def _graph_bytes(bundle: Path, spec) -> int:
    return sum((bundle / f).stat().st_size for f in (spec.file, *spec.data_files) if (bundle / f).exists())


def load_lanes(graph_bytes: dict[str, int], cores: int) -> list[list[str]]:
    """Load jobs per thread: graphs largest first, each onto the lane with the least bytes so far (longest
    processing time first), at most one lane per core; the tokenizer last, onto the lightest lane."""
    lanes: list[list[str]] = [[] for _ in range(max(1, min(cores, len(graph_bytes) + 1)))]
    weight = [0] * len(lanes)
    for name in sorted(graph_bytes, key=lambda n: -graph_bytes[n]):
        k = weight.index(min(weight))
        lanes[k].append(name)
        weight[k] += graph_bytes[name]
    lanes[weight.index(min(weight))].append(_TOKENIZER)
    return [lane for lane in lanes if lane]


class Transcriber:
    """A loaded bundle: sessions, native kernels, tokenizer, all read-only after load.

    Safe to share between threads: ``transcribe`` and every ``Stream`` keep their decoding state (KV caches, the
    route, scratch) per call or per stream (runtime/decoding.py); the shared onnxruntime sessions and native
    weights are only read. Calls run side by side, each with the threads it was given, so on a small CPU two
    concurrent calls share its cores rather than each getting all of them.

    The API shared between threads is ``transcribe``, ``create_stream`` (one stream per thread), ``check_*`` and
    reading attributes. The attributes are the loaded engine's parts, there for megaedge's own modules and the
    benchmarks, and NOT safe to drive from several threads: ``native`` is the root decoder, whose ``prefill`` /
    ``step`` write its one KV cache (``native.spawn()`` gives a private one); assigning any attribute after load
    changes calls already running in other threads.

    There is no ``close()``: what a Transcriber holds is freed when its last reference goes (each of its streams
    holds one); it does not pickle (load one per process)."""

    def __init__(self, bundle: Path, info: manifest.Manifest, sessions: dict, tokenizer, route: str, native=None,
                 native_prefill: bool = False, stem=None, vad=None):
        self.bundle, self.manifest, self.sessions, self.tokenizer = bundle, info, sessions, tokenizer
        self.vad = vad  # runtime.vad: gates segments and utterances on speech (None: only digital silence is gated)
        self.batcher = None  # runtime.batching.StepBatcher: decode steps of concurrent calls and streams together
        self.native = native  # runtime.native_decode.NativeDecoder: the decode steps (and the prompt) natively
        self.stem = stem  # runtime.native_stem.NativeStem: the encoder's convolutions natively, the rest its body
        self.native_prefill = native is not None and native_prefill
        self.route = self.check_route(route)
        dec = info.decoder
        if "logits_at" not in info.graph("decoder").input_names:
            raise MegaedgeError(f"{bundle}: made by an older megaedge (decoder has no logits_at input); re-export it")
        self.past_names, self.present_names = list(dec["past_names"]), list(dec["present_names"])
        self.kv_dtype = np.dtype(dec["kv_dtype"])
        self.float_dtype = np.dtype(info.graph("encoder").input("mel").dtype)
        self.kv_shape = (1, dec["kv_heads"], 0, dec["head_dim"])

    def __reduce__(self):
        raise MegaedgeError("a Transcriber cannot be pickled (multiprocessing sends arguments so): it holds this "
                            "process's onnxruntime sessions and native kernels; load one in each process, e.g. "
                            "Transcriber.from_bundle in a Pool initializer")

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_bundle(cls, path, options: RuntimeOptions | None = None, **overrides) -> Transcriber:
        """Load a bundle with ``options`` (runtime/options.py: providers, threads, engines, route, verification,
        prepared copies, speech gate, a pinned digest), any of whose fields may be given as keywords instead
        (``from_bundle(path, threads=2, decode="ort")``). The engines are chosen by ``options.select``, which logs
        what it chose and why in one INFO line."""
        from concurrent.futures import ThreadPoolExecutor

        from megaedge.runtime import native_decode, prepared
        from megaedge.runtime import options as runtime_options

        if isinstance(path, bytes):  # a path as the OS gives it, as transcribe takes one
            path = os.fsdecode(path)
        if not isinstance(path, (str, os.PathLike)):
            raise MegaedgeError(f"bundle path {path!r} is not a path; pass the bundle's folder")
        if options is not None and not isinstance(options, RuntimeOptions):
            raise MegaedgeError(f"options {options!r} is not a RuntimeOptions; pass RuntimeOptions(...), "
                                "RuntimeOptions.preset(name), or the fields as keywords (threads=2)")
        opts = (options or RuntimeOptions()).with_(**overrides)
        bundle = Path(path).expanduser()
        providers, threads, profile_dir = opts.providers, opts.threads, opts.profile_dir
        info, vad_options = checked_bundle(bundle, opts.verify, opts.expected_digest, opts.vad)
        cpu_only = tuple(providers) == ("cpu",)
        ort_providers = ("cpu",) if "engine" in providers else providers  # graphs without an engine
        opened = {}

        def one(name: str, spec):
            prefix = str(Path(profile_dir) / name) if profile_dir else None
            copy = prepared.lookup(bundle, info, name, pinned=opts.expected_digest is not None) \
                if cpu_only and opts.use_prepared else None
            if copy is not None:
                return open_session(copy, spec, ort_providers, threads, prepared=True, profile_prefix=prefix,
                                    arena=opts.memory_arena)
            return open_session(bundle / spec.file, spec, ort_providers, threads, profile_prefix=prefix,
                                arena=opts.memory_arena)

        if "engine" in providers:  # native TensorRT engines written by `megaedge build-engines`
            from megaedge.runtime.tensorrt import ENGINE_FILES, TrtSession

            if not info.engines:
                raise MegaedgeError(f"{bundle}: no TensorRT engines; run megaedge build-engines {bundle} first")
            opened = {name: TrtSession(bundle / ENGINE_FILES[name], spec, info.engines[name])
                      for name, spec in info.graphs.items() if name in ENGINE_FILES}
        # An engine does its own prefill: the CPU prefill graph of a cpu-prefill bundle is left closed there.
        # The VAD's graph runs in its own small session (runtime/vad.py), not as a bundle graph.
        todo = {name: spec for name, spec in info.graphs.items()
                if name not in opened and name != "vad" and not (opened and name == "decoder_prefill")}
        engines = runtime_options.select(bundle, info, opts)
        native_kernels, native_prefill, stem_kernels = (engines.decode_kernels, engines.native_prefill,
                                                        engines.stem_kernels)
        # One of the two encoder graphs is needed; the other opens only if asked for.
        unused_encoder = "encoder" if stem_kernels is not None else "encoder_body"
        deferred = {}
        if unused_encoder in todo:
            deferred[unused_encoder] = functools.partial(one, unused_encoder, todo.pop(unused_encoder))
        if native_prefill:
            # The whole decoder runs natively: onnxruntime's decoder graphs (another copy of the weights each, and
            # most of a cold start) serve only streaming, so they open on first use.
            for name in ("decoder", "decoder_prefill"):
                if name in todo:
                    deferred[name] = functools.partial(one, name, todo.pop(name))
        elif native_kernels is not None and "decoder_prefill" in todo:
            # Prompts run in the prefill graph and steps natively: onnxruntime's decode graph (a second copy of the
            # decoder weights, and most of a cold start) serves only streaming and prompts under
            # PREFILL_MIN_ROWS, so it opens on first use.
            deferred["decoder"] = functools.partial(one, "decoder", todo.pop("decoder"))
        loaded: dict = {}

        def run_lane(jobs: list[str]) -> None:
            for job in jobs:
                loaded[job] = (limits.load_tokenizer(bundle / manifest.TOKENIZER_FILE) if job == _TOKENIZER
                               else one(job, todo[job]))

        # Session creation is CPU work (onnxruntime releases the GIL) and the largest graph's is the critical path:
        # more threads than cores only slow it down: the largest graph gets a lane of its own and the others share
        # the remaining cores (load_lanes).
        lanes = load_lanes({name: _graph_bytes(bundle, spec) for name, spec in todo.items()}, _cores())
        with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
            for future in [pool.submit(run_lane, lane) for lane in lanes]:
                future.result()
        tokenizer = loaded.pop(_TOKENIZER)
        opened.update(loaded)
        sessions = Sessions({name: opened[name] for name in info.graphs if name in opened}, deferred)
        # After the sessions: its background weight read then overlaps encoding and prefill, not session creation,
        # which is the critical path of a cold start.
        native = None if native_kernels is None else native_decode.NativeDecoder(bundle, info, native_kernels,
                                                                                 threads or _cores(),
                                                                                 kv_cache=opts.kv_cache)
        if native is None and opts.kv_cache != "float32":
            log.warning("kv_cache %s applies to the native decoder; onnxruntime's decoder graphs keep their float "
                        "caches", opts.kv_cache)
        stem_runner = None if stem_kernels is None else native_stem.NativeStem(bundle, info, stem_kernels,
                                                                               threads or _cores())
        detector = None
        if vad_options is not None:
            from megaedge.runtime import vad as vad_module

            detector, reason = vad_module.load(bundle, info, vad_options)
            log.info("voice activity: %s", reason)
        transcriber = cls(bundle, info, sessions, tokenizer, opts.route, native, native_prefill, stem_runner, detector)
        transcriber.options, transcriber.engines = opts, engines
        if (native is not None or fixed_kv.is_fixed(info.decoder)) and opts.batch_steps > 1:
            from megaedge.runtime.batching import StepBatcher

            transcriber.batcher = StepBatcher(opts.batch_steps)
        return transcriber

    # ------------------------------------------------------------------------------------------------ stages
    def encode(self, samples: np.ndarray, timer: _Timer | None = None, gate: float | None = None) -> np.ndarray:
        """Audio features [tokens, hidden] for 16 kHz samples (windows batched, partial chunks exact); ``gate``: a
        routed bundle's LoRA gate (None: the LoRA route)."""
        t0 = time.perf_counter()
        feats = features.asr_log_mel(samples)
        mel, valid = segmenting.encoder_windows(feats, self.manifest.encoder)
        t1 = time.perf_counter()
        out = self.encode_windows(mel, valid, gate)
        if timer:
            timer.add("frontend", t1 - t0)
            timer.add("encoder", time.perf_counter() - t1)
        return np.concatenate(out)

    def encode_windows(self, mel: np.ndarray, valid: np.ndarray, gate: float | None = None) -> list[np.ndarray]:
        """Valid encoder output rows of each window of ``mel [W, bins, frames]`` (zero-padded), run in calls of
        equal width (``segmenting.encoder_calls``); routed bundles use ``gate`` (None: the LoRA route)."""
        out = []
        step = int(self.manifest.encoder.get("max_windows_per_call", 16))
        for mel_call, valid_call in segmenting.encoder_calls(mel, valid, step):
            feed = {"mel": mel_call.astype(self.float_dtype, copy=False), "valid_tokens": valid_call}
            if self.manifest.routed:
                feed["lora_gate"] = self.gate_input(gate)
            if self.stem is not None:  # the body graph reads mel for its window and chunk counts only
                feed[native_stem.STEM_INPUT] = self.stem.run(feed["mel"])
                enc = self.sessions[self.stem.graph].run(feed)[0]
            else:
                enc = self.sessions["encoder"].run(feed)[0]
            out.extend(enc[i, :v].astype(self.kv_dtype, copy=False) for i, v in enumerate(valid_call))
        return out

    def route_probability(self, samples: np.ndarray) -> routing.RouterDecision:
        info = self.manifest.router
        if info is None or "router" not in self.sessions:
            raise MegaedgeError("route 'auto' needs a router and this bundle has none; pass --route base or lora")
        bounds = routing.windows(len(samples), int(info["position_rows"]))
        probs = []
        for start, end in bounds:
            mel = features.router_log_mel(samples[start:end]).T[None]
            probs.append(float(self.sessions["router"].run({"mels": mel})[0][0]))
        return routing.aggregate(probs, bounds, float(info["threshold"]))

    def decoder_for(self, rows: int):
        """The decoder session for a call over ``rows`` new positions: the bundle's prefill graph, when it has one,
        for calls of at least ``PREFILL_MIN_ROWS``; the KV cache either graph writes is what the other reads."""
        if rows >= decoding.PREFILL_MIN_ROWS and "decoder_prefill" in self.sessions:
            return self.sessions["decoder_prefill"]
        return self.sessions["decoder"]

    def token_ids(self, text: str) -> list[int]:
        """``text``'s ids in the prompt, each a row of the decoder's embedding: a bundle whose tokenizer.json has
        ids past the decoder's vocabulary (not the model's tokenizer; its digests re-signed) is named in one line,
        not an IndexError in the embedding lookup."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        vocab = int(self.manifest.decoder["vocab_size"])
        if ids and max(ids) >= vocab:
            raise BundleError(f"{self.bundle / manifest.TOKENIZER_FILE}: token id {max(ids)} is past the decoder's "
                              f"vocabulary of {vocab}: the tokenizer is not this model's; re-export the bundle")
        return ids

    def prompt(self, audio_tokens: int, context: str | None, language: str | None) -> list[int]:
        p = self.manifest.prompt
        language_ids = self.token_ids(p.language_template.format(language=language)) if language else []
        return p.build(audio_tokens, self.token_ids(context) if context else [], language_ids)

    def gate_input(self, gate: float | None = None) -> np.ndarray:
        """A routed bundle's ``lora_gate`` input: ``gate`` (1 = LoRA route, 0 = base), the LoRA route when None."""
        return np.array([1.0 if gate is None else gate], self.float_dtype)

    def decoder_feed(self, ids: list[int], audio: np.ndarray, logits_at, past=None, gate: float | None = None) -> dict:
        """The inputs of one decoder graph call: ``ids`` with ``audio`` rows at the audio placeholders, the logits of
        rows ``logits_at``, after the cache ``past`` (None: an empty one); a routed bundle's ``gate`` (None: the
        LoRA route)."""
        if past is None:
            import onnxruntime as ort

            past = [ort.OrtValue.ortvalue_from_numpy(np.zeros(self.kv_shape, self.kv_dtype))] * len(self.past_names)
        feed = {"input_ids": np.asarray([ids], np.int64), "audio_features": audio,
                "logits_at": np.asarray(logits_at, np.int64), **dict(zip(self.past_names, past))}
        if self.manifest.routed:
            feed["lora_gate"] = self.gate_input(gate)
        return feed

    def decode(self, prompt_ids: list[int], audio: np.ndarray, max_new_tokens: int, timer: _Timer | None = None,
               ignore_eos: bool = False, no_repeat_ngram: int = 0, gate: float | None = None,
               max_text_tokens: int | None = None, cancel=None) -> decoding.Greedy:
        """Greedy decoding of one prompt in a decoder state of its own (runtime/decoding.py): at most
        ``max_new_tokens`` tokens, and at most ``max_text_tokens`` of them after the language prefix."""
        state = decoding.open_state(self, max_new_tokens)
        t0 = time.perf_counter()
        logits = state.extend(prompt_ids, audio, gate)[-1]
        if timer:
            timer.add("prefill", time.perf_counter() - t0)
        t0 = time.perf_counter()
        marker = None if prompt_ids[-1] == self.manifest.prompt.asr_text else self.manifest.prompt.asr_text
        out = decoding.greedy(state, logits, gate, self.manifest.prompt.eos, limit=max_new_tokens,
                              text_budget=max_text_tokens, marker=marker, ignore_eos=ignore_eos,
                              no_repeat_ngram=no_repeat_ngram, cancel=cancel)
        if timer:
            timer.add("decode", time.perf_counter() - t0)
            timer.add("decode_tokens", max(len(out.tokens) - 1, 0))
        return out

    # ------------------------------------------------------------------------------------------------ API
    def create_stream(self, options=None):
        """A streaming state over this transcriber's weights (any number of streams can share them, from any
        threads; one stream is fed by one thread at a time). ``options``: StreamOptions, or a preset's name."""
        from dataclasses import replace

        from megaedge.runtime.streaming import Stream, StreamOptions

        if isinstance(options, str):
            options = StreamOptions.preset(options)
        if options is not None and not isinstance(options, StreamOptions):
            raise MegaedgeError(f"stream options {options!r} are not a StreamOptions; pass StreamOptions(...), "
                                "StreamOptions.preset(name) or a preset's name")
        options = options or StreamOptions()
        language, context = self.check_request(options.language, options.context)
        options = replace(options, language=language, context=context)
        if self.native is None:  # streams step in onnxruntime's decode graph: open it now, not at the first hop
            self.sessions["decoder"]
        return Stream(self, options)

    def text_of(self, tokens: list[int], language_forced: bool, collapse: bool = True) -> ParsedOutput:
        """Language and text of generated tokens: one rule for offline results and stream events (partials pass
        ``collapse=False``, see ``parse_asr_output``)."""
        return parse_asr_output(self.tokenizer.decode(tokens, skip_special_tokens=True), language_forced, collapse)

    def transcribe(self, audio, rate: int = audio_io.TARGET_RATE, language: str | None = None, context: str | None = None,
                   route: str | None = None, max_new_tokens: int | None = None, ignore_eos: bool = False,
                   segment_seconds: float | None = segmenting.DEFAULT_SEGMENT_SECONDS,
                   loop_guard: bool = True, max_text_tokens: int | None = None, cancel=None,
                   on_segment=None) -> Result:
        """Transcribe a file path (at its own rate), or a sample array at ``rate`` Hz (16 kHz unless told; floats in
        [-1, 1], integer PCM scaled by its type's range, scale mistakes refused (``audio.as_float``); channels, as
        (samples, channels) or (channels, samples), are mixed to mono). ``max_new_tokens`` bounds the tokens per segment as
        transformers' generate counts them (language prefix included; default: from the segment's duration),
        ``max_text_tokens`` the text after the language prefix. Safe to call from several threads at once.

        ``cancel`` (a ``threading.Event``, or anything with ``is_set()``): once set, e.g. by another thread when the
        listener gave up, the call raises ``megaedge.errors.Cancelled`` before its next decode step or segment
        instead of finishing; a stage already running (an encode, a prompt) ends first. ``on_segment`` is called
        with each SegmentResult as soon as it is decoded (long audio: text while the rest decodes), in this thread."""
        route = self.check_route(self.route if route is None else route)
        language, context = self.check_request(language, context, max_new_tokens, max_text_tokens)
        for name, flag in (("loop_guard", loop_guard), ("ignore_eos", ignore_eos)):
            if not isinstance(flag, (bool, np.bool_)):
                raise MegaedgeError(f"{name} {flag!r} is not True or False")
        if max_new_tokens is not None:  # checked above; the number it names ('5' from a config file is 5)
            max_new_tokens = limits.check_max_new_tokens(max_new_tokens)
        if max_text_tokens is not None:
            max_text_tokens = limits.check_max_new_tokens(max_text_tokens, "max_text_tokens")
        segment_seconds = segmenting.check_segment_seconds(segment_seconds)
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise MegaedgeError(f"cancel {cancel!r} has no is_set(); pass a threading.Event")
        if on_segment is not None and not callable(on_segment):
            raise MegaedgeError(f"on_segment {on_segment!r} is not callable; pass a function of one SegmentResult")
        timer = _Timer()
        t_start = time.perf_counter()
        samples = audio_io.load(audio, rate)
        if samples.size == 0:
            raise MegaedgeError("audio is empty (0 samples); nothing to transcribe")
        segmenting.check_one_segment(samples.size, segment_seconds)
        timer.add("load", time.perf_counter() - t_start)
        segments = []
        for start, end in segmenting.segments(samples, segment_seconds):
            _check_cancel(cancel, start)
            segments.append(self._transcribe_segment(samples[start:end], start, end, language, context, route,
                                                     max_new_tokens, ignore_eos, loop_guard, timer,
                                                     max_text_tokens, cancel))
            if on_segment is not None:
                on_segment(segments[-1])
        text = " ".join(s.text for s in segments if s.text).strip()
        routes = {s.route for s in segments}
        probs = [s.degraded_prob for s in segments if s.degraded_prob is not None]
        tokens = [t for s in segments for t in s.token_ids]
        logprobs = [lp for s in segments for lp in s.logprobs]
        raw = "\n".join(self.tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in segments)
        detected = next((s.language for s in segments if s.language), None)
        timer.add("total", time.perf_counter() - t_start)
        timings = dict(timer.totals)
        timings["audio_seconds"] = len(samples) / audio_io.TARGET_RATE
        timings["rtf"] = timings["total"] / max(timings["audio_seconds"], 1e-9)
        return Result(
            text=text, language=language or detected,
            route=routes.pop() if len(routes) == 1 else "mixed",
            degraded_prob=float(np.mean(probs)) if probs else None, token_ids=tokens, timings=timings,
            segments=segments, loop_guard=any(s.loop_guard for s in segments), raw=raw,
            mean_logprob=float(np.mean(logprobs)) if logprobs else None,
            min_logprob=float(np.min(logprobs)) if logprobs else None,
        )

    def check_request(self, language, context, max_new_tokens=None, max_text_tokens=None) -> tuple:
        """One line for a request value outside its range (runtime/limits.py): a language the model does not know,
        context too long or holding a control token, budgets out of range. Returns (language, context) as the prompt
        takes them (the language as the model spells it; blank context as None)."""
        language, context, _ = limits.check_decoding(language, context, max_new_tokens, self.tokenizer,
                                                     self.manifest.prompt)
        if max_text_tokens is not None:
            limits.check_max_new_tokens(max_text_tokens, "max_text_tokens")
        return language, context

    def check_route(self, route: str) -> str:
        """``route`` if this bundle can take it, else one line saying why not."""
        if not isinstance(route, str) or route not in ROUTES:
            raise MegaedgeError(f"route {route!r} is not one of {ROUTES}")
        if route != "auto" and not self.manifest.routed:
            # A merged bundle has the LoRA folded into its weights: there is neither a base route nor one to pick.
            raise MegaedgeError(f"route {route!r} needs a routed bundle (export with --mode routed); this one is "
                                f"merged and always applies the LoRA: leave the route at 'auto'")
        return route

    def _transcribe_segment(self, samples, start, end, language, context, route, max_new_tokens, ignore_eos,
                            loop_guard, timer, max_text_tokens=None, cancel=None) -> SegmentResult:
        rate = audio_io.TARGET_RATE
        prob = None
        chosen = route
        if not self.manifest.routed:
            chosen = "merged" if self.manifest.source.get("adapter") else "base"
        elif route == "auto":
            t0 = time.perf_counter()
            decision = self.route_probability(samples)
            timer.add("router", time.perf_counter() - t0)
            prob = decision.degraded_prob
            chosen = decision.route
        if not self.heard_speech(samples, timer):  # nothing was said, and the decoder would only guess
            return SegmentResult(start / rate, end / rate, "", [], chosen, prob, speech=False)
        gate = None if not self.manifest.routed else (1.0 if chosen == "lora" else 0.0)
        audio = self.encode(samples, timer, gate)
        _check_cancel(cancel, start)
        prompt = self.prompt(audio.shape[0], context, language)
        budget = max_new_tokens or max_new_tokens_for(len(samples) / rate)
        decode = functools.partial(self.decode, timer=timer, gate=gate, max_text_tokens=max_text_tokens,
                                   cancel=cancel)
        out = decode(prompt, audio, budget, ignore_eos=ignore_eos)
        guard = None
        if loop_guard and not ignore_eos and _repetition(out.tokens):
            if self.manifest.routed and chosen == "lora":
                gate, chosen, guard = 0.0, "base", "base_route"
                audio = self.encode(samples, timer, gate)
                out = decode(prompt, audio, budget, gate=gate)
            else:
                guard = "no_repeat_ngram"
                out = decode(prompt, audio, budget, no_repeat_ngram=4)
            log.info("loop guard: degenerate repetition at %.1f-%.1f s, re-decoded (%s)", start / rate,
                     end / rate, guard)
        parsed = self.text_of(out.tokens, language is not None)
        mean, least = _confidence(out.logprobs)
        return SegmentResult(start / rate, end / rate, parsed.text, out.tokens, chosen, prob, guard,
                             parsed.language or language, mean, least, logprobs=out.logprobs)

    def heard_speech(self, samples: np.ndarray, timer: _Timer | None = None) -> bool:
        """Whether the voice-activity detector hears speech in ``samples`` (16 kHz)."""
        if not np.any(samples):
            return False
        if self.vad is None:
            return True
        t0 = time.perf_counter()
        heard = self.vad.has_speech(samples)
        if timer:
            timer.add("vad", time.perf_counter() - t0)
        return heard


VAD_ENV = "MEGAEDGE_VAD"  # a deployment-wide default for from_bundle's vad: auto | silero | energy | off


def checked_bundle(bundle: Path, verify: bool, expected_digest: str | None, vad):
    """What loading checks before any graph opens, in one place for every caller (the server checks it before it
    listens): the VAD choice, the pin, the manifest and (``verify``) every file's digest. Returns the manifest and
    the VAD options.

    A pinned digest covers the manifest, and the files only through the manifest's digests of them: with the files
    unchecked an edited graph would run under the pin, so a pin without ``verify`` is refused."""
    from megaedge.runtime import prepared

    vad_options = _vad_options(vad)
    if expected_digest is not None and not verify:
        raise MegaedgeError("expected_digest pins the manifest, and its files only while their digests are checked: "
                            "drop --no-verify (verify=False) to use the pin")
    info = manifest.read(bundle, verify=False, expected_digest=expected_digest)
    if verify:
        prepared.check_files(bundle, info, pinned=expected_digest is not None)
    return info, vad_options


def _vad_options(vad):
    """from_bundle's ``vad`` -> VadOptions, or None for no detector."""
    from megaedge.runtime import vad as vad_module

    if isinstance(vad, vad_module.VadOptions):
        return vad
    name = (os.environ.get(VAD_ENV) or "auto") if vad is None else vad  # set but empty: the default
    if name == "off":
        return None
    if name not in vad_module.ENGINES:
        raise MegaedgeError(f"vad {name!r} is not one of {(*vad_module.ENGINES, 'off')} (from "
                            f"{'$' + VAD_ENV if vad is None else 'the vad argument'})")
    return vad_module.VadOptions(engine=name)


def _check_cancel(cancel, start: int) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"cancelled at {start / audio_io.TARGET_RATE:.1f} s of the audio")


def _confidence(logprobs: list[float]) -> tuple[float | None, float | None]:
    return (float(np.mean(logprobs)), float(np.min(logprobs))) if logprobs else (None, None)


class Sessions(dict):
    """Graph name -> session. Graphs left closed at load (``deferred``: name -> opener) open on first use."""

    def __init__(self, opened: dict, deferred: dict | None = None):
        super().__init__(opened)
        self._deferred = dict(deferred or {})
        self._lock = threading.Lock()  # two threads asking for a closed graph at once open it once

    def __missing__(self, name: str):
        with self._lock:
            if dict.__contains__(self, name):
                return dict.__getitem__(self, name)
            if name not in self._deferred:
                raise KeyError(name)
            log.info("opening the %s graph on first use", name)
            session = self._deferred[name]()
            dict.__setitem__(self, name, session)
            del self._deferred[name]
            return session

    def __contains__(self, name) -> bool:
        return dict.__contains__(self, name) or name in self._deferred

    @property
    def closed(self) -> list[str]:
        with self._lock:
            return list(self._deferred)


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)



