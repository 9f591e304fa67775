"""The lean transcriber: a bundle + numpy + onnxruntime + tokenizers. No torch, no transformers, no export code.

``Transcriber.from_bundle(path, providers=("cpu",), route="auto")`` then ``transcribe(audio)``. Merged and routed
bundles share this one class and signature; in a routed bundle the router picks the route per segment and the
``lora_gate`` input selects it, so both routes run on one copy of the weights.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megaedge.errors import MegaedgeError
from megaedge.runtime import audio as audio_io
from megaedge.runtime import features, manifest, native_stem, routing, segmenting
from megaedge.runtime.session import open_session
from megaedge.runtime.text import max_new_tokens_for, parse_asr_output

log = logging.getLogger("megaedge.runtime.transcriber")

ROUTES = ("auto", "base", "lora")
LAST = np.zeros(1, np.int64)  # logits_at for one-token steps
# From 4 rows on, per-channel dynamic int8 beats the 8-bit block kernel (benchmarks/gemv_bandwidth.py --rows 2,4,8:
# 2 rows 22.8 vs 16.4 ms, 4 rows 21.2 vs 23.2 ms): the smallest call a prefill graph takes.
PREFILL_MIN_ROWS = 4


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

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


class _Timer:
    def __init__(self):
        self.totals: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds


def _repetition(tokens: list[int], min_repeats: int = 4, max_period: int = 12) -> bool:
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
    def __init__(self, bundle: Path, info: manifest.Manifest, sessions: dict, tokenizer, route: str, native=None,
                 native_prefill: bool = False, stem=None):
        self.bundle, self.manifest, self.sessions, self.tokenizer = bundle, info, sessions, tokenizer
        self.native = native  # runtime.native_decode.NativeDecoder: the decode steps (and the prompt) natively
        self.stem = stem  # runtime.native_stem.NativeStem: the encoder's convolutions natively, the rest its body
        self.native_prefill = native is not None and native_prefill
        if route not in ROUTES:
            raise MegaedgeError(f"route {route!r} is not one of {ROUTES}")
        if route == "base" and not info.routed:  # a merged bundle has the LoRA folded in: no base route left
            raise MegaedgeError("route 'base' needs a routed bundle (export with --mode routed); this one is merged")
        self.route = route
        dec = info.decoder
        if "logits_at" not in info.graph("decoder").input_names:
            raise MegaedgeError(f"{bundle}: made by an older megaedge (decoder has no logits_at input); re-export it")
        self.past_names, self.present_names = list(dec["past_names"]), list(dec["present_names"])
        self.kv_dtype = np.dtype(dec["kv_dtype"])
        self.float_dtype = np.dtype(info.graph("encoder").input("mel").dtype)
        self.kv_shape = (1, dec["kv_heads"], 0, dec["head_dim"])
        self._gate_value = np.array([1.0], self.float_dtype)  # routed bundles: the route of the current segment

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_bundle(cls, path, providers=("cpu",), route: str = "auto", verify: bool = True,
                    threads: int | None = None, use_prepared: bool = True,
                    profile_dir: Path | None = None, decode: str = "auto", prefill: str = "auto",
                    stem: str = "auto") -> Transcriber:
        """Load a bundle. ``verify`` hashes every file against the manifest, unless ``megaedge prepare`` already
        did and no file changed since; on the CPU provider, graphs prepared for this machine load from their
        prepared copy (``use_prepared``). With ``profile_dir``, every onnxruntime session records a per-node trace
        there (``runtime.profiling``). ``decode``: ``native`` runs the decode steps of a weight-only INT8 bundle
        with megaedge's own CPU kernel (runtime.native_decode), ``ort`` with onnxruntime, ``auto`` natively where
        the bundle, the providers (CPU only) and the machine (a C compiler) allow it. ``prefill``: which engine runs
        the prompt when the steps run natively: ``native`` (the same kernels, several rows per weight load), ``ort``
        (the bundle's prefill graph), ``auto`` = the bundle's prefill graph where it has one, else native.
        ``stem``: the encoder's convolution stem in megaedge's kernel (``native``, then the bundle's encoder body
        graph) or the whole encoder graph in onnxruntime (``ort``); ``auto``: native where the bundle has it, the
        providers are the CPU only and the kernels build here (runtime.native_stem)."""
        import functools
        from concurrent.futures import ThreadPoolExecutor

        from tokenizers import Tokenizer

        from megaedge.runtime import native_decode, prepared

        bundle = Path(path).expanduser()
        info = manifest.read(bundle, verify=False)
        if verify and not prepared.verified(bundle, info):
            manifest.check_files(bundle, info)
        if decode not in DECODE_ENGINES:
            raise MegaedgeError(f"decode engine {decode!r} is not one of {DECODE_ENGINES}")
        if prefill not in PREFILL_ENGINES:
            raise MegaedgeError(f"prefill engine {prefill!r} is not one of {PREFILL_ENGINES}")
        cpu_only = tuple(providers) == ("cpu",)
        ort_providers = ("cpu",) if "engine" in providers else providers  # graphs without an engine
        opened = {}

        def one(name: str, spec):
            prefix = str(Path(profile_dir) / name) if profile_dir else None
            copy = prepared.lookup(bundle, info, name) if cpu_only and use_prepared else None
            if copy is not None:
                return open_session(copy, spec, ort_providers, threads, prepared=True, profile_prefix=prefix)
            return open_session(bundle / spec.file, spec, ort_providers, threads, profile_prefix=prefix)

        if "engine" in providers:  # native TensorRT engines written by `megaedge build-engines`
            from megaedge.runtime.tensorrt import ENGINE_FILES, TrtSession

            if not info.engines:
                raise MegaedgeError(f"{bundle}: no TensorRT engines; run megaedge build-engines {bundle} first")
            opened = {name: TrtSession(bundle / ENGINE_FILES[name], spec, info.engines[name])
                      for name, spec in info.graphs.items() if name in ENGINE_FILES}
        # An engine does its own prefill: the CPU prefill graph of a cpu-prefill bundle is left closed there.
        todo = {name: spec for name, spec in info.graphs.items()
                if name not in opened and not (opened and name == "decoder_prefill")}
        native_kernels = _native_kernels(bundle, info, decode, cpu_only)
        if prefill == "native" and native_kernels is None:
            raise MegaedgeError(f"{bundle}: --prefill native needs the native decoder (--decode auto or native, a "
                                f"weight-only INT8 bundle on the CPU); use --prefill ort")
        # auto: a bundle exported with a prefill graph (cpu-prefill, cpu-int4) keeps it for prompts, where it paid a
        # second weight copy to have it: its dynamic int8 is a little faster (1.7B, 30 s, 2-core AVX512-VNNI EPYC:
        # 2.26 vs 2.44 s); everywhere else the native prompt beats MatMulNBits (2.44 vs 3.2 s there).
        native_prefill = native_kernels is not None and (
            prefill == "native" or (prefill == "auto" and "decoder_prefill" not in info.graphs))
        stem_kernels = native_stem.select(bundle, info, stem, cpu_only)
        # One of the two encoder graphs is needed; the other opens only if asked for.
        unused_encoder = "encoder" if stem_kernels is not None else "encoder_body"
        deferred = {}
        if unused_encoder in todo:
            deferred[unused_encoder] = functools.partial(one, unused_encoder, todo.pop(unused_encoder))
        if native_prefill:
            # The whole decoder runs natively: onnxruntime's decoder graphs (another copy of the weights each, ~2 s
            # of a 1.7B cold start) serve only streaming, so they open on first use.
            for name in ("decoder", "decoder_prefill"):
                if name in todo:
                    deferred[name] = functools.partial(one, name, todo.pop(name))
        elif native_kernels is not None and "decoder_prefill" in todo:
            # Prompts run in the prefill graph and steps natively: onnxruntime's decode graph (a second copy of the
            # decoder weights, ~2 s of a 1.7B cold start) serves only streaming and prompts under
            # PREFILL_MIN_ROWS, so it opens on first use.
            deferred["decoder"] = functools.partial(one, "decoder", todo.pop("decoder"))
        loaded: dict = {}

        def run_lane(jobs: list[str]) -> None:
            for job in jobs:
                loaded[job] = (Tokenizer.from_file(str(bundle / manifest.TOKENIZER_FILE)) if job == _TOKENIZER
                               else one(job, todo[job]))

        # Session creation is CPU work (onnxruntime releases the GIL) and the largest graph's is the critical path:
        # more threads than cores only slow it down (1.7B INT8 prepared, 2 cores, 4 alternating runs: median
        # 2.66 s with every graph and the tokenizer at once, 2.04 s with the decoder on a lane of its own).
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
                                                                                 threads or _cores())
        stem_runner = None if stem_kernels is None else native_stem.NativeStem(bundle, info, stem_kernels,
                                                                               threads or _cores())
        return cls(bundle, info, sessions, tokenizer, route, native, native_prefill, stem_runner)

    # ------------------------------------------------------------------------------------------------ stages
    def encode(self, samples: np.ndarray, timer: _Timer | None = None) -> np.ndarray:
        """Audio features [tokens, hidden] for 16 kHz samples (windows batched, partial chunks exact)."""
        t0 = time.perf_counter()
        feats = features.asr_log_mel(samples)
        mel, valid = segmenting.encoder_windows(feats, self.manifest.encoder)
        t1 = time.perf_counter()
        out = self.encode_windows(mel, valid)
        if timer:
            timer.add("frontend", t1 - t0)
            timer.add("encoder", time.perf_counter() - t1)
        return np.concatenate(out)

    def encode_windows(self, mel: np.ndarray, valid: np.ndarray, gate: float | None = None) -> list[np.ndarray]:
        """Valid encoder output rows of each window of ``mel [W, bins, frames]`` (zero-padded), run in calls of
        equal width (``segmenting.encoder_calls``); routed bundles use ``gate``, else the current route's."""
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
        if rows >= PREFILL_MIN_ROWS and "decoder_prefill" in self.sessions:
            return self.sessions["decoder_prefill"]
        return self.sessions["decoder"]

    def prompt(self, audio_tokens: int, context: str | None, language: str | None) -> list[int]:
        enc = lambda s: self.tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
        p = self.manifest.prompt
        language_ids = enc(p.language_template.format(language=language)) if language else []
        return p.build(audio_tokens, enc(context) if context else [], language_ids)

    def gate_input(self, gate: float | None = None) -> np.ndarray:
        """A routed bundle's ``lora_gate`` input: ``gate``, or the current segment's route when None."""
        return self._gate_value if gate is None else np.array([gate], self.float_dtype)

    def decoder_feed(self, ids: list[int], audio: np.ndarray, logits_at, past=None, gate: float | None = None) -> dict:
        """The inputs of one decoder graph call: ``ids`` with ``audio`` rows at the audio placeholders, the logits of
        rows ``logits_at``, after the cache ``past`` (None: an empty one); a routed bundle's ``gate`` (None: the
        current segment's route)."""
        if past is None:
            import onnxruntime as ort

            past = [ort.OrtValue.ortvalue_from_numpy(np.zeros(self.kv_shape, self.kv_dtype))] * len(self.past_names)
        feed = {"input_ids": np.asarray([ids], np.int64), "audio_features": audio,
                "logits_at": np.asarray(logits_at, np.int64), **dict(zip(self.past_names, past))}
        if self.manifest.routed:
            feed["lora_gate"] = self.gate_input(gate)
        return feed

    def decode(self, prompt_ids: list[int], audio: np.ndarray, max_new_tokens: int, timer: _Timer | None = None,
               ignore_eos: bool = False, no_repeat_ngram: int = 0) -> list[int]:
        """Greedy decoding. With a native decoder the steps run there, and the prompt too (``native_prefill``) or
        in onnxruntime, whose cache it takes over; else everything runs in onnxruntime with the KV cache kept in
        its memory between steps (IO binding)."""
        eos = set(self.manifest.prompt.eos)
        generated: list[int] = []
        outs: list = []  # the last onnxruntime outputs: logits, then the KV cache
        if not self.native_prefill:
            session = self.decoder_for(len(prompt_ids))
            feed = self.decoder_feed(prompt_ids, audio, [len(prompt_ids) - 1])
            no_audio = np.zeros((0, audio.shape[1]), audio.dtype)
        t0 = time.perf_counter()
        for step in range(max_new_tokens):
            if self.native_prefill and step == 0:
                logits = self.native.prefill(prompt_ids, audio, self.manifest.prompt.audio_pad, max_new_tokens)
            elif self.native is not None and step > 0:
                if step == 1 and not self.native_prefill:  # not right after the prefill: the first token need not
                    # wait for the weight read
                    self.native.start([value.numpy() for value in outs[1:]], max_new_tokens)
                logits = self.native.step(generated[-1])
            else:
                outs = session.run_bound(feed, check=step < 2)
                logits = outs[0].numpy()[0]
            if no_repeat_ngram and len(generated) >= no_repeat_ngram - 1:
                for banned in _banned_tokens(generated, no_repeat_ngram):
                    logits[banned] = -np.inf
            token = int(np.argmax(logits))
            if step == 0 and timer:
                timer.add("prefill", time.perf_counter() - t0)
                t0 = time.perf_counter()
            if token in eos and not ignore_eos:
                break
            generated.append(token)
            if self.native is not None:
                continue
            session = self.sessions["decoder"]
            feed = self.decoder_feed([token], no_audio, LAST, outs[1:])
        if timer:
            timer.add("decode", time.perf_counter() - t0)
            timer.add("decode_tokens", max(len(generated) - 1, 0))
        return generated

    # ------------------------------------------------------------------------------------------------ API
    def create_stream(self, options=None):
        """A streaming state over this transcriber's weights (any number of streams can share them)."""
        from megaedge.runtime.streaming import Stream, StreamOptions

        if self.native is None:  # streams step in onnxruntime's decode graph: open it now, not at the first hop
            self.sessions["decoder"]
        return Stream(self, options or StreamOptions())

    def transcribe(self, audio, rate: int | None = None, language: str | None = None, context: str | None = None,
                   route: str | None = None, max_new_tokens: int | None = None, ignore_eos: bool = False,
                   segment_seconds: float | None = segmenting.DEFAULT_SEGMENT_SECONDS,
                   loop_guard: bool = True) -> Result:
        """Transcribe a file path or a sample array (any rate with ``rate``; stereo is mixed to mono)."""
        route = route or self.route
        if route not in ROUTES:
            raise MegaedgeError(f"route {route!r} is not one of {ROUTES}")
        timer = _Timer()
        t_start = time.perf_counter()
        samples = audio_io.load(audio, rate)
        if samples.size == 0:
            raise MegaedgeError("audio is empty (0 samples); nothing to transcribe")
        timer.add("load", time.perf_counter() - t_start)
        segments = []
        for start, end in segmenting.segments(samples, segment_seconds):
            segments.append(self._transcribe_segment(samples[start:end], start, end, language, context, route,
                                                     max_new_tokens, ignore_eos, loop_guard, timer))
        text = " ".join(s.text for s in segments if s.text).strip()
        routes = {s.route for s in segments}
        probs = [s.degraded_prob for s in segments if s.degraded_prob is not None]
        tokens = [t for s in segments for t in s.token_ids]
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
        )

    def _transcribe_segment(self, samples, start, end, language, context, route, max_new_tokens, ignore_eos,
                            loop_guard, timer):
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
        if not np.any(samples):  # digital silence: nothing was said, and the decoder would only guess
            return SegmentResult(start / rate, end / rate, "", [], chosen, prob)
        self._gate_value = np.array([1.0 if chosen in ("lora", "merged") else 0.0], self.float_dtype)
        audio = self.encode(samples, timer)
        prompt = self.prompt(audio.shape[0], context, language)
        budget = max_new_tokens or max_new_tokens_for(len(samples) / rate)
        tokens = self.decode(prompt, audio, budget, timer, ignore_eos)
        guard = None
        if loop_guard and not ignore_eos and _repetition(tokens):
            if self.manifest.routed and chosen == "lora":
                self._gate_value = np.array([0.0], self.float_dtype)
                audio = self.encode(samples, timer)
                retry, guard, chosen = self.decode(prompt, audio, budget, timer), "base_route", "base"
            else:
                retry, guard = self.decode(prompt, audio, budget, timer, no_repeat_ngram=4), "no_repeat_ngram"
            log.info("loop guard: degenerate repetition at %.1f-%.1f s, re-decoded (%s)", start / rate,
                     end / rate, guard)
            tokens = retry
        raw = self.tokenizer.decode(tokens, skip_special_tokens=True)
        parsed = parse_asr_output(raw)
        return SegmentResult(start / rate, end / rate, parsed.text, tokens, chosen, prob, guard, parsed.language)


DECODE_ENGINES = ("auto", "native", "ort")
PREFILL_ENGINES = ("auto", "native", "ort")


class Sessions(dict):
    """Graph name -> session. Graphs left closed at load (``deferred``: name -> opener) open on first use."""

    def __init__(self, opened: dict, deferred: dict | None = None):
        super().__init__(opened)
        self._deferred = dict(deferred or {})

    def __missing__(self, name: str):
        if name not in self._deferred:
            raise KeyError(name)
        log.info("opening the %s graph on first use", name)
        session = self[name] = self._deferred.pop(name)()
        return session

    def __contains__(self, name) -> bool:
        return dict.__contains__(self, name) or name in self._deferred

    @property
    def closed(self) -> list[str]:
        return list(self._deferred)


def _native_kernels(bundle: Path, info: manifest.Manifest, decode: str, cpu_only: bool):
    """The kernels that will run the decode steps natively for ``decode`` (see from_bundle), or None for
    onnxruntime's step."""
    if decode == "ort":
        return None
    from megaedge.runtime import kernels, native_decode

    reason = native_decode.available(info) or (None if cpu_only else "it runs on the CPU provider only")
    if reason is None:
        try:
            loaded = kernels.load()
        except RuntimeError as exc:
            reason = f"the native kernel cannot be built here: {exc}"
    if reason is not None:
        if decode == "native":
            raise MegaedgeError(f"{bundle}: --decode native is not possible: {reason}; use --decode ort")
        log.info("decode steps in onnxruntime: %s", reason)
        return None
    return loaded


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _banned_tokens(tokens: list[int], n: int) -> set[int]:
    prefix = tuple(tokens[len(tokens) - (n - 1) :]) if n > 1 else ()
    banned = set()
    for i in range(len(tokens) - n + 1):
        if tuple(tokens[i : i + n - 1]) == prefix:
            banned.add(tokens[i + n - 1])
    return banned
