"""Latency of a bundle on the machine it runs on: per stage, decode against the memory-bandwidth bound, memory.

Used by ``megaedge bench``. Lean like the rest of the runtime: numpy + onnxruntime (+ psutil / matplotlib when
present). Decode is memory-bound: every generated token streams the decoder's weights once, so the ceiling is the
machine's bandwidth divided by the decoder's bytes per token; the report says how close the bundle gets, against two
measured bandwidths: the STREAM-style copy figure (bytes read + written) and a read-only figure (a matrix-vector
product over a matrix far beyond the caches, the access pattern of a decode step). A decode step only reads, and on
some machines reads alone stream well below the copy figure (a 2-core VM: ~23 GB/s read vs ~28 GB/s copied), so the
read bound is the one a kernel can actually approach. A decoder on the GPU is held to the GPU's memory, measured
through onnxruntime on the same provider (``device_bandwidth``).
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megaedge.runtime import limits, machine

log = logging.getLogger("megaedge.runtime.bench")

STAGES = ("frontend", "router", "encoder", "prefill", "decode")


@dataclass(frozen=True)
class BenchOptions:
    audio_seconds: tuple[float, ...] = (10.0, 30.0)
    repeat: int = 3
    warmup: int = 1
    new_tokens: int | None = 32  # forced (EOS ignored) so runs compare; None: stop at EOS
    route: str = "auto"
    threads: int | None = None
    providers: tuple[str, ...] = ("cpu",)
    bandwidth_mib: int = 256
    profile_dir: str | None = None  # after the timed runs, one profiled run per length; traces land here
    decode: str = "auto"  # decode-step engine (runtime.options.ENGINES)
    prefill: str = "auto"  # prompt engine when the steps run natively (runtime.options.ENGINES)
    stem: str = "auto"  # the encoder's convolution stem (native_stem.STEM_ENGINES)
    kv_cache: str = "float32"  # the native decoder's cache type (runtime.options.KV_CACHES)

    def __post_init__(self):
        # The same ranges as `megaedge bench` (limits.py), so API callers get the one-line error too.
        if not self.audio_seconds:
            raise limits.LimitError("audio_seconds", "is empty; give at least one length, e.g. (10.0, 30.0)")
        object.__setattr__(self, "audio_seconds",
                           tuple(limits.check_audio_seconds(s, "audio_seconds") for s in self.audio_seconds))
        limits.check_int(self.repeat, "repeat", *limits.BENCH_REPEAT)
        limits.check_int(self.warmup, "warmup", *limits.BENCH_WARMUP)
        if self.new_tokens is not None:
            limits.check_max_new_tokens(self.new_tokens, "new_tokens")
        if self.threads is not None:
            limits.check_threads(self.threads)


def speech_like_audio(seconds: float, seed: int = 0, rate: int = 16000) -> np.ndarray:
    """Deterministic speech-like signal (harmonics with a moving pitch, a syllable envelope, noise): exercises
    every stage; benchmarks and tests share it."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(120 + 40 * np.sin(2 * np.pi * 0.7 * t)) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t) ** 2
    return (0.2 * voiced * envelope + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def copy_bandwidth(mib: int = 256, threads: int | None = None, rounds: int = 5) -> float:
    """STREAM-style copy bandwidth in GB/s (bytes read + written), best of ``rounds``, over ``threads`` threads
    (numpy releases the GIL while copying)."""
    threads = threads or os.cpu_count() or 1
    n = mib * 2**20 // 4
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    bounds = np.linspace(0, n, threads + 1).astype(int)

    def part(i: int) -> None:
        np.copyto(dst[bounds[i] : bounds[i + 1]], src[bounds[i] : bounds[i + 1]])

    best = float("inf")
    for _ in range(rounds + 1):  # the first round faults the pages in
        workers = [threading.Thread(target=part, args=(i,)) for i in range(threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def read_bandwidth(mib: int = 256, rounds: int = 5) -> float:
    """Read-only bandwidth in GB/s: a float32 matrix of ``mib`` MiB times a vector (numpy's BLAS, its own threads,
    normally all cores), best of ``rounds``. Several rows are read at once, as a decode step's GEMV does: one
    sequential stream per core reads far less on some machines."""
    cols = 2048
    matrix = np.ones((max(1, mib * 2**20 // (4 * cols)), cols), np.float32)
    vector = np.ones(cols, np.float32)
    best = float("inf")
    for _ in range(rounds + 1):  # the first round warms the BLAS threads
        t0 = time.perf_counter()
        matrix @ vector
        best = min(best, time.perf_counter() - t0)
    return matrix.nbytes / best / 1e9


def decoder_bytes(bundle: Path, info) -> int:
    spec = info.graph("decoder")
    return sum((bundle / f).stat().st_size for f in (spec.file, *spec.data_files))


def kv_bytes_per_token(info, positions: int) -> int:
    """Bytes of KV cache one decode step reads at ``positions`` cached positions (keys and values, all layers)."""
    dec = info.decoder
    return len(dec["past_names"]) * dec["kv_heads"] * dec["head_dim"] * positions * np.dtype(dec["kv_dtype"]).itemsize


def peak_rss_mib() -> float:
    """Peak resident memory of this process: VmHWM (own address space) where Linux has it, else ru_maxrss."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 if platform.system() != "Darwin" else peak / 2**20
    except ImportError:  # pragma: no cover - Windows
        return float("nan")


def gpu_memory_mib() -> float | None:
    """Device memory in use on GPU 0 (None without a CUDA GPU and nvidia-smi)."""
    used = machine.nvidia_smi("memory.used")
    try:
        return float(used) if used else None
    except ValueError:
        return None


class BandwidthBounds:
    """The copy and read bandwidths of the memory the decoder reads (host memory, or the GPU's for ``device="cuda"``),
    measured at several points (before and after the timed work). The bound is the highest figure of each: a VM's
    slow spell during one measurement would otherwise lower the bound and flatter every percentage of it."""

    def __init__(self, mib: int = 256, threads: int | None = None, device: str = "cpu") -> None:
        self.mib, self.threads, self.device = mib, threads, device
        self.copies: list[float] = []
        self.reads: list[float] = []
        self.measure()

    def measure(self) -> None:
        if self.device != "cpu":
            from megaedge.runtime.device_bandwidth import device_bandwidths

            try:
                copy, read = device_bandwidths(self.device, self.mib)
            except Exception as exc:  # a TensorRT-engine machine whose onnxruntime has no CUDA provider
                log.warning("cannot measure %s memory through onnxruntime (%s): decode is held to host memory",
                            self.device, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self.device = "cpu"
                self.copies.clear()
                self.reads.clear()
            else:
                self.copies.append(copy)
                self.reads.append(read)
                return
        self.copies.append(copy_bandwidth(self.mib, self.threads))
        self.reads.append(read_bandwidth(self.mib))

    @property
    def copy(self) -> float:
        return max(self.copies)

    @property
    def read(self) -> float:
        return max(self.reads)


def _percent(part: float, whole: float) -> float:
    """100 * part / whole to one decimal, or two significant digits below 1 % (a small model on a large GPU runs
    at a fraction of a percent of the read bound: 0.0 would say nothing)."""
    value = 100 * part / whole
    return round(value, 1) if value >= 1 else float(f"{value:.2g}")


def _summary(values: list[float]) -> dict:
    return {"median": round(float(np.median(values)), 4), "p95": round(float(np.percentile(values, 95)), 4)}


def run(bundle, options: BenchOptions = BenchOptions(), progress=None) -> dict:
    """Cold load, then per audio length: warm-up runs, ``repeat`` measured runs; returns the report dict."""
    import onnxruntime

    from megaedge import __version__
    from megaedge.runtime.session import spin_enabled
    from megaedge.runtime.transcriber import PREFILL_MIN_ROWS, Transcriber

    bundle = Path(bundle).expanduser()
    t0 = time.perf_counter()
    tr = Transcriber.from_bundle(bundle, providers=options.providers, route=options.route, threads=options.threads,
                                 verify=False, decode=options.decode, prefill=options.prefill, stem=options.stem,
                                 kv_cache=options.kv_cache, vad="off")  # synthetic audio
    load_seconds = time.perf_counter() - t0
    if tr.native is not None:
        tr.native.wait_loaded()  # its background read would otherwise lower the bandwidth measured next
    info = tr.manifest
    prompts = tr.decoder_for(PREFILL_MIN_ROWS)  # the graph prompts run in; steps too, unless they run natively
    on = prompts.device  # "cpu" or "cuda": whose memory the decode steps stream from
    bounds = BandwidthBounds(options.bandwidth_mib, options.threads, on)  # measured again after the timed runs
    cpu = machine.cpu_facts()
    weights = decoder_bytes(bundle, info)
    report = {
        "bundle": bundle.name, "precision": info.precision, "mode": info.mode,
        "quantization": (info.quantization or {}).get("recipe", {}).get("name") if info.quantization else None,
        "device": {**{k: v for k, v in cpu.items() if k != "int8_note"},
                   "threads": options.threads or os.cpu_count(), "memory_gib": machine.memory_facts()["total_gib"],
                   # sessions no longer spin-wait by default (runtime/session.py): say which way a run was timed
                   "ort_spinning": spin_enabled(),
                   "providers": list(prompts.providers),
                   "decode_engine": f"native ({tr.native.kernels.isa})" if tr.native else "onnxruntime",
                   "kv_cache": tr.native.kv_cache if tr.native else "float32",
                   "prefill_engine": f"native ({tr.native.kernels.isa})" if tr.native_prefill else "onnxruntime",
                   "stem_engine": f"native ({tr.stem.kernel.isa})" if tr.stem else "onnxruntime",
                   **({"gpu": machine.gpu_name()} if on == "cuda" else {})},
        "versions": {"megaedge": __version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "load_seconds": round(load_seconds, 3),
        "decoder_weight_bytes": weights,
        # cpu-prefill bundles: prompts run through a second decoder graph (not read by decode steps)
        "prefill_graph": "decoder_prefill" in tr.sessions and not tr.native_prefill,
        "runs": {},
    }
    for seconds in options.audio_seconds:
        audio = speech_like_audio(seconds)
        samples: dict[str, list[float]] = {k: [] for k in (*STAGES, "first_token", "total", "rtf", "tokens_per_s")}
        tokens = 0
        for i in range(options.warmup + options.repeat):
            result = tr.transcribe(audio, max_new_tokens=options.new_tokens, ignore_eos=options.new_tokens is not None,
                                   segment_seconds=None, loop_guard=False)
            if progress:
                progress(seconds, i)
            if i < options.warmup:
                continue
            t = result.timings
            for stage in STAGES:
                samples[stage].append(t.get(stage, 0.0))
            samples["first_token"].append(sum(t.get(s, 0.0) for s in ("frontend", "router", "encoder", "prefill")))
            samples["total"].append(t["total"])
            samples["rtf"].append(t["rtf"])
            tokens = len(result.token_ids)
            samples["tokens_per_s"].append(t.get("decode_tokens", 0) / t["decode"] if t.get("decode") else 0.0)
        prompt = len(tr.prompt(features_tokens(audio), None, None))
        report["runs"][f"{seconds:g}s"] = {
            "audio_seconds": seconds, "generated_tokens": tokens,
            **{k: _summary(v) for k, v in samples.items()},
            "decode_bytes_per_token": weights + kv_bytes_per_token(info, prompt + tokens // 2),
        }
    bounds.measure()
    bandwidth, reads = bounds.copy, bounds.read
    report.update(bandwidth_of=bounds.device, copy_bandwidth_gbps=round(bandwidth, 2), read_bandwidth_gbps=round(reads, 2),
                  copy_bandwidth_before_after_gbps=[round(c, 2) for c in bounds.copies],
                  read_bandwidth_before_after_gbps=[round(r, 2) for r in bounds.reads])
    for run in report["runs"].values():
        bound = bandwidth * 1e9 / run["decode_bytes_per_token"]
        read_bound = reads * 1e9 / run["decode_bytes_per_token"]
        decode = run["tokens_per_s"]["median"]
        run.update(decode_bound_tokens_per_s=round(bound, 3), decode_percent_of_bound=_percent(decode, bound),
                   decode_read_bound_tokens_per_s=round(read_bound, 3),
                   decode_percent_of_read_bound=_percent(decode, read_bound))
    report["peak_rss_mib"] = round(peak_rss_mib(), 1)
    report["gpu_memory_mib"] = gpu_memory_mib() if on == "cuda" else None
    if options.profile_dir:
        del tr  # one copy of the weights at a time: 8 GB devices hold one, not two
        report["profile"] = profile_runs(bundle, options)
    return report


def profile_runs(bundle: Path, options: BenchOptions) -> dict:
    """One run per audio length with onnxruntime's per-node profiler on (a fresh load: profiling is a session
    option), kept apart from the timed runs so its overhead is not in their figures."""
    from megaedge.runtime import profiling
    from megaedge.runtime.transcriber import Transcriber

    out = Path(options.profile_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tr = Transcriber.from_bundle(bundle, providers=options.providers, route=options.route, threads=options.threads,
                                 verify=False, profile_dir=out.resolve(), decode=options.decode,
                                 prefill=options.prefill, stem=options.stem, kv_cache=options.kv_cache, vad="off")
    for seconds in options.audio_seconds:
        tr.transcribe(speech_like_audio(seconds), max_new_tokens=options.new_tokens,
                      ignore_eos=options.new_tokens is not None, segment_seconds=None, loop_guard=False)
    return profiling.collect(tr.sessions)


def features_tokens(audio: np.ndarray) -> int:
    from megaedge.runtime import features

    return features.asr_log_mel(audio).num_audio_tokens


def format_table(report: dict) -> str:
    head = ["audio", "tokens", *[f"{s} ms" for s in STAGES], "first token ms", "decode tok/s", "% of copy bound",
            "% of read bound", "RTF"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in report["runs"].values():
        cells = [f"{run['audio_seconds']:g} s", str(run["generated_tokens"])]
        cells += [f"{1e3 * run[s]['median']:.0f} (p95 {1e3 * run[s]['p95']:.0f})" for s in STAGES]
        cells += [f"{1e3 * run['first_token']['median']:.0f}", f"{run['tokens_per_s']['median']:.2f}",
                  f"{run['decode_percent_of_bound']:g}",
                  f"{run['decode_percent_of_read_bound']:g}" if "decode_percent_of_read_bound" in run else "-",
                  f"{run['rtf']['median']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    memory = "GPU" if report.get("bandwidth_of") == "cuda" else "memory"
    lines.append(f"{report['bundle']}: {report['precision']} {report['mode']}, load {report['load_seconds']} s, "
                 f"{memory} copy bandwidth {report['copy_bandwidth_gbps']} GB/s, read "
                 f"{report.get('read_bandwidth_gbps', '-')} GB/s, decoder {report['decoder_weight_bytes'] / 2**20:.0f} MiB/token, "
                 f"peak RSS {report['peak_rss_mib']:.0f} MiB, {report['device']['threads']} threads")
    device = report["device"]
    if "model" in device:  # reports written before the CPU facts were recorded lack them
        lines.append(f"{device['model']} ({device['machine']}; int8: {', '.join(device['int8_features']) or 'none'})"
                     + (f"; GPU {device['gpu']}" if device.get("gpu") else ""))
    if report.get("profile"):
        from megaedge.runtime.profiling import format_profile

        lines += ["", "profiled (one run per length, apart from the timed runs):", format_profile(report["profile"])]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(report["runs"].values())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = np.zeros(len(runs))
    labels = [f"{r['audio_seconds']:g} s" for r in runs]
    for stage in STAGES:
        values = np.array([r[stage]["median"] for r in runs])
        ax.bar(labels, values, bottom=bottom, label=stage)
        bottom += values
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"{report['bundle']} ({report['precision']}, {report['device']['threads']} threads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
