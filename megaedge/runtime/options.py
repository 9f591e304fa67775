"""How a bundle runs here: ``RuntimeOptions`` (what the user asks) and ``select`` (what this bundle, these providers
and this machine make of it), with one INFO line saying what was chosen and why.

Every choice has an ``auto`` that picks the fastest engine known to give the bundle's tokens on this machine; the
other values force one engine and fail in one line where it cannot run (``--decode native`` without kernels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from megaedge.errors import MegaedgeError
from megaedge.runtime import limits

log = logging.getLogger("megaedge.runtime.options")

ENGINES = ("auto", "native", "ort")
ROUTES = ("auto", "base", "lora")
VAD_CHOICES = ("auto", "silero", "energy", "off")
PROVIDERS = ("cpu", "cuda", "tensorrt", "engine")
KV_CACHES = ("float32", "float16")  # runtime/native_decode.py's KV_CACHES (this module imports nothing heavy)


@dataclass(frozen=True)
class RuntimeOptions:
    """``providers``: onnxruntime execution providers in order of preference (``cpu``, ``cuda``, ``tensorrt``; or
    ``engine`` for engines built by ``megaedge build-engines``). ``threads``: threads per call, 1 to 4x the cores
    this process may use (None: all of them). ``decode`` / ``prefill`` / ``stem``: which engine runs the decode
    steps, the prompt and the encoder's convolution stem (``auto``, ``native``, ``ort``; see ``select``).
    ``route``: a routed bundle's default route (``auto``: the router decides per segment). ``verify``: hash every
    file against the manifest (skipped after ``megaedge prepare`` while no file changed). ``use_prepared``: load
    graphs from this machine's prepared copies. ``vad``: the speech gate (``auto``, ``silero``, ``energy``,
    ``off``, a ``runtime.vad.VadOptions``; None: ``$MEGAEDGE_VAD``, else ``auto``). ``expected_digest``: refuse
    any bundle but the one with this manifest digest. ``profile_dir``: onnxruntime per-node traces go there.
    ``batch_steps``: decode steps of concurrent streams and calls run together, up to this many per call of the
    native kernels or of a fixed-KV decoder graph (1-16; 1: each alone; runtime/batching.py). ``memory_arena``: onnxruntime's CPU memory pool; it grows
    with every new input shape and never gives memory back, which a long-lived service sees as RSS that only
    rises (``megaedge serve`` turns it off; a single transcription is a little faster with it). ``kv_cache``: the
    native decoder's keys and values, ``float32`` (the graphs' own) or ``float16`` (half the memory per position
    and half of what a step's attention reads; logits move by the values' rounding; runtime/native_decode.py)."""

    providers: tuple[str, ...] = ("cpu",)
    threads: int | None = None
    decode: str = "auto"
    prefill: str = "auto"
    stem: str = "auto"
    route: str = "auto"
    verify: bool = True
    use_prepared: bool = True
    vad: object = None
    expected_digest: str | None = None
    profile_dir: str | Path | None = None
    batch_steps: int = 8
    memory_arena: bool = True
    kv_cache: str = "float32"

    def __post_init__(self):
        providers = (self.providers,) if isinstance(self.providers, str) else self.providers
        if not isinstance(providers, (tuple, list)) or not all(isinstance(p, str) for p in providers):
            raise MegaedgeError(f"providers {self.providers!r} is not a list of names; e.g. ('cpu',) or ('cuda',)")
        object.__setattr__(self, "providers", tuple(providers or ("cpu",)))
        for name in ("verify", "use_prepared", "memory_arena"):
            if not isinstance(getattr(self, name), bool):
                raise MegaedgeError(f"{name} {getattr(self, name)!r} must be True or False")
        if self.profile_dir is not None and not isinstance(self.profile_dir, (str, Path)):
            raise MegaedgeError(f"profile_dir {self.profile_dir!r} is not a folder path")
        if self.threads is not None:
            object.__setattr__(self, "threads", limits.check_threads(self.threads))
        for name, allowed in (("decode", ENGINES), ("prefill", ENGINES), ("stem", ENGINES), ("route", ROUTES)):
            value = getattr(self, name)
            if value not in allowed:
                raise MegaedgeError(f"{name} engine {value!r} is not one of {allowed}" if name != "route"
                                    else f"route {value!r} is not one of {allowed}")
        if isinstance(self.batch_steps, bool) or not isinstance(self.batch_steps, int) or \
                not 1 <= self.batch_steps <= 16:
            raise MegaedgeError(f"batch_steps {self.batch_steps!r} is outside 1-16; e.g. 8 (1: no batching)")
        if self.kv_cache not in KV_CACHES:
            raise MegaedgeError(f"kv_cache {self.kv_cache!r} is not one of {KV_CACHES}; e.g. float16 to halve the "
                                "native decoder's cache")
        if isinstance(self.vad, str) and self.vad not in VAD_CHOICES:
            raise MegaedgeError(f"vad {self.vad!r} is not one of {VAD_CHOICES}")

    @classmethod
    def preset(cls, name: str, **overrides) -> RuntimeOptions:
        if not isinstance(name, str) or name not in PRESETS:
            raise MegaedgeError(f"runtime preset {name!r} is not one of {sorted(PRESETS)}")
        return PRESETS[name].with_(**overrides)

    def with_(self, **overrides) -> RuntimeOptions:
        """These options with some fields replaced (unknown names fail in one line)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise MegaedgeError(f"unknown runtime option(s) {unknown}; known: {sorted(known)}")
        return replace(self, **overrides)


PRESETS = {
    "default": RuntimeOptions(),
    # Everything in onnxruntime: the reference the native engines are held to, and what runs where no kernel does.
    "onnxruntime": RuntimeOptions(decode="ort", prefill="ort", stem="ort"),
    "cuda": RuntimeOptions(providers=("cuda",)),
    "tensorrt-engines": RuntimeOptions(providers=("engine",)),
    # A fleet that pins bundles by digest still hashes them at every start (a prepared copy could be swapped).
    "locked-down": RuntimeOptions(use_prepared=False),
}


@dataclass
class Engines:
    """What ``select`` chose: kernels for the native decoder (None: onnxruntime), whether the prompt runs there too,
    kernels for the native stem (None: the whole encoder graph in onnxruntime), and why, one phrase per choice."""

    decode_kernels: object = None
    native_prefill: bool = False
    stem_kernels: object = None
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return "; ".join(self.reasons)


def select(bundle: Path, info, options: RuntimeOptions, advise: bool = True) -> Engines:
    """The engines for ``info`` (a manifest) under ``options`` on this machine. Raises in one line where a forced
    engine cannot run; logs one INFO line with every choice and its reason, and (``advise``) the recipe advice."""
    from megaedge.runtime import native_stem

    cpu_only = tuple(options.providers) == ("cpu",)
    engines = Engines()
    engines.decode_kernels, why = _decode_kernels(bundle, info, options.decode, cpu_only)
    engines.reasons.append(why)
    if options.prefill == "native" and engines.decode_kernels is None:
        raise MegaedgeError(f"{bundle}: --prefill native needs the native decoder (--decode auto or native, a "
                            f"weight-only INT8 bundle on the CPU); use --prefill ort")
    if engines.decode_kernels is not None:
        # auto: a bundle exported with a prefill graph (cpu-prefill, cpu-int4) keeps it for prompts: it paid a
        # second weight copy to have it, and its dynamic int8 is a little faster on VNNI CPUs; everywhere else the
        # native prompt beats onnxruntime's MatMulNBits.
        engines.native_prefill = options.prefill == "native" or (
            options.prefill == "auto" and "decoder_prefill" not in info.graphs)
        engines.reasons.append("prompt native" if engines.native_prefill
                               else "prompt in the bundle's onnxruntime prefill graph")
    engines.stem_kernels = native_stem.select(bundle, info, options.stem, cpu_only)
    if native_stem.available(info) is None:
        engines.reasons.append("encoder stem native" if engines.stem_kernels is not None
                               else "encoder stem in onnxruntime")
    if not advise:  # a check before the load that will say all this
        return engines
    log.info("engines: %s", engines.summary())
    from megaedge.runtime.recipe_advice import warn_if_unsuited

    warn_if_unsuited(info, tuple(options.providers))
    return engines


def _decode_kernels(bundle: Path, info, decode: str, cpu_only: bool):
    """(kernels, reason) for the decode steps: kernels None means onnxruntime's step."""
    if decode == "ort":
        return None, "decode steps in onnxruntime (asked)"
    from megaedge.runtime import kernels, native_decode

    reason = native_decode.available(info) or (None if cpu_only else "it runs on the CPU provider only")
    if reason is None:
        try:
            loaded = kernels.load()
        except RuntimeError as exc:
            reason = f"no native kernel here: {exc}"
            if decode == "auto":
                # a bundle made for the native kernels, on a machine that cannot have them: slower steps
                log.warning("native INT8 kernels unavailable (%s): decode steps run in onnxruntime, slower; install "
                            "the wheel built for this architecture (prebuilt kernels) or a C compiler", exc)
        else:
            return loaded, f"decode steps native ({loaded.isa} kernels, {loaded.origin})"
    if decode == "native":
        raise MegaedgeError(f"{bundle}: --decode native is not possible: {reason}; use --decode ort")
    return None, f"decode steps in onnxruntime: {reason}"
