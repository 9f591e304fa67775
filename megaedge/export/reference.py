"""The reference path: transcribe with the torch model through transformers' own processor and generate.

Every backend is tested against this. Routes: ``merged`` (LoRA on), ``base`` (LoRA off), ``auto`` (the router
decides per file). ``lora`` is an alias of ``merged``. With a checkpoint loaded in ``branches`` mode one model serves
both routes by switching the gate; with ``merge`` mode only the merged route exists (and ``none`` only base).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from megaedge.errors import MegaedgeError
from megaedge.export.loader import LoadedCheckpoint
from megaedge.runtime import audio as audio_io
from megaedge.runtime import routing
from megaedge.runtime.text import max_new_tokens_for, parse_asr_output

ROUTES = ("auto", "merged", "lora", "base")


@dataclass
class ReferenceResult:
    text: str
    language: str | None
    token_ids: list[int]  # generated ids only, EOS excluded
    route: str
    degraded_prob: float | None
    raw: str
    prompt_ids: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _select_route(loaded: LoadedCheckpoint, route: str, samples: np.ndarray, threshold: float):
    if route not in ROUTES:
        raise MegaedgeError(f"route {route!r} is not one of {ROUTES}")
    route = "merged" if route == "lora" else route
    prob = None
    if route == "auto":
        if loaded.router is None:
            raise MegaedgeError("route 'auto' needs a router; this checkpoint has none (pass --router or a route)")
        from megaedge.export.router import score

        decision = score(loaded.router, samples, threshold)
        prob = decision.degraded_prob
        route = "merged" if decision.use_lora else "base"
    available = {"none": ("base",), "merge": ("merged",), "branches": ("base", "merged")}[loaded.lora_mode]
    if route not in available:
        raise MegaedgeError(
            f"route {route!r} is not available: checkpoint loaded with lora={loaded.lora_mode!r}; "
            f"load with lora='branches' to switch routes"
        )
    if loaded.gate is not None:
        loaded.gate.set(route == "merged")
    return route, prob


def prompt_inputs(loaded: LoadedCheckpoint, samples: np.ndarray, language: str | None, context: str | None):
    return loaded.processor.apply_transcription_request(
        audio=[samples], language=language, prompt=context,
        processor_kwargs={"audio_kwargs": {"sampling_rate": audio_io.TARGET_RATE}},
    )


def transcribe(
    loaded: LoadedCheckpoint,
    audio,
    route: str = "merged",
    language: str | None = None,
    context: str | None = None,
    max_new_tokens: int | None = None,
    threshold: float = routing.DEFAULT_THRESHOLD,
) -> ReferenceResult:
    import torch

    samples = audio_io.load(audio)
    start = time.perf_counter()
    route, prob = _select_route(loaded, route, samples, threshold)
    inputs = prompt_inputs(loaded, samples, language, context)
    budget = max_new_tokens or max_new_tokens_for(len(samples) / audio_io.TARGET_RATE)
    eos = loaded.config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    with torch.no_grad():
        out = loaded.model.generate(
            **inputs, max_new_tokens=budget, do_sample=False, eos_token_id=eos_ids,
            pad_token_id=loaded.config.pad_token_id,
        )
    prompt = inputs["input_ids"][0].tolist()
    generated = out[0, len(prompt) :].tolist()
    while generated and generated[-1] in eos_ids:
        generated.pop()
    raw = loaded.tokenizer.decode(generated, skip_special_tokens=True)
    parsed = parse_asr_output(raw)
    if language:
        parsed = type(parsed)(language, parsed.text)
    return ReferenceResult(
        text=parsed.text, language=parsed.language, token_ids=generated, route=route, degraded_prob=prob, raw=raw,
        prompt_ids=prompt, seconds=time.perf_counter() - start,
    )
