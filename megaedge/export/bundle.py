"""``megaedge export``: checkpoint -> bundle directory (ONNX graphs + tokenizer + ``megaedge.json``).

The bundle is assembled in a hidden sibling directory and renamed into place only after validation passes, so an
interrupted, failed or disk-full export never leaves a directory that looks like a bundle.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megaedge import __version__
from megaedge.errors import BundleError, CheckpointError, MegaedgeError
from megaedge.export import graphs
from megaedge.progress import track
from megaedge.runtime import features, fixed_kv, manifest, routing, segmenting
from megaedge.runtime.streaming import StreamOptions

log = logging.getLogger("megaedge.export.bundle")

MIN_OPSET = 17  # LayerNormalization (fp16-safe norms) is opset 17
DEFAULT_OPSET = 18
# Validation, bundle vs torch. An absolute tolerance on logits does not scale: fp32 rounding grows with the logits'
# magnitude (a 1.7B checkpoint with unit-variance activations differs by 0.026 on logits of ~±200), so encoder
# output and logits are judged by max|bundle - torch| / max|torch| against ``validate_rtol``, plus agreement of
# the top-1 token at every prompt position and of a short greedy decode; a disagreement only passes where the
# torch logits of the two tokens are within the tolerated error of each other (a tie). The router's output is a
# probability, so it keeps an absolute tolerance.
RTOL_RANGE = (1e-6, 1e-1)
DEFAULT_RTOL = {"fp32": 1e-3, "fp16": 2e-2}  # fp16: half precision's 2^-11 rounding accumulated over the layers
ROUTER_ATOL = 1e-5
GREEDY_STEPS = 8  # tokens of the short decode compared token for token


TARGETS = ("cpu", "cuda")
WEIGHTS = ("int4", "int8")  # export/fixed_kv.py WEIGHTS (that module imports torch)


class ExportValidationError(MegaedgeError):
    """The exported bundle does not reproduce the torch model within tolerance."""


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"  # fp32 | fp16
    mode: str = "merged"  # merged | routed
    opset: int = DEFAULT_OPSET
    validate: bool = True
    force: bool = False
    include_router: bool = True
    # Validation tolerance relative to the torch output's scale (max|bundle - torch| / max|torch|), for encoder output
    # and logits; 1e-6..1e-1; None: the precision's default (fp32 1e-3, fp16 2e-2).
    validate_rtol: float | None = None
    # cpu: the growing-cache decoder; cuda: the fixed-KV decoder (GroupQueryAttention over buffers of max_kv_length
    # positions updated in place: fixed step shapes for CUDA graphs; runtime/fixed_kv.py)
    target: str = "cpu"
    max_kv_length: int = fixed_kv.DEFAULT_MAX_KV  # target cuda: positions per KV buffer, MAX_KV_RANGE (64..32768)
    weights: str | None = None  # target cuda: int4 | int8 weight-only decoder projections (MatMulNBits); None: float

    def __post_init__(self):
        low, high = RTOL_RANGE
        if self.validate_rtol is not None and not (low <= self.validate_rtol <= high):
            raise MegaedgeError(f"--validate-rtol {self.validate_rtol:g} is outside {low:g}..{high:g} (a tolerance "
                                f"relative to the logits' scale; default {DEFAULT_RTOL['fp32']:g} for fp32)")
        if self.precision not in ("fp32", "fp16"):
            raise MegaedgeError(f"--precision {self.precision!r} is not fp32 or fp16 (INT8: use --int8)")
        if self.mode not in manifest.MODES:
            raise MegaedgeError(f"--mode {self.mode!r} is not one of {manifest.MODES}")
        if self.target not in TARGETS:
            raise MegaedgeError(f"--target {self.target!r} is not one of {TARGETS}")
        low, high = fixed_kv.MAX_KV_RANGE
        if isinstance(self.max_kv_length, bool) or not isinstance(self.max_kv_length, int) or \
                not low <= self.max_kv_length <= high:
            raise MegaedgeError(f"--max-kv-length {self.max_kv_length!r} is outside {low}-{high} (positions of the "
                                f"fixed KV buffer; default {fixed_kv.DEFAULT_MAX_KV})")
        if self.weights is not None:
            if self.weights not in WEIGHTS:
                raise MegaedgeError(f"--weights {self.weights!r} is not one of {WEIGHTS}")
            if self.target != "cuda":
                raise MegaedgeError(f"--weights {self.weights} is for --target cuda (CPUs: --int8 --recipe cpu-int4)")
        if self.opset < MIN_OPSET:
            raise MegaedgeError(
                f"--opset {self.opset} is below {MIN_OPSET}: fp32-safe LayerNormalization needs opset >= {MIN_OPSET}; "
                f"use --opset {DEFAULT_OPSET}"
            )

    @classmethod
    def preset(cls, name: str) -> ExportOptions:
        presets = {"cpu": cls(), "gpu": cls(precision="fp16"), "routed": cls(mode="routed")}
        if name not in presets:
            raise MegaedgeError(f"export preset {name!r} is not one of {sorted(presets)}")
        return presets[name]


# ------------------------------------------------------------------------------------------- prompt + tokenizer
def prompt_ids(loaded) -> manifest.PromptIds:
    """Split the processor's own prompt into the pieces the runtime assembles (checked by tests against it)."""
    from megaedge.export.reference import prompt_inputs

    ids = prompt_inputs(loaded, np.zeros(16000, np.float32), None, None)["input_ids"][0].tolist()
    tok = loaded.tokenizer
    cfg = loaded.config
    audio_pad = int(cfg.audio_token_id)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    first_pad = ids.index(audio_pad)
    last_pad = len(ids) - 1 - ids[::-1].index(audio_pad)
    system_end = ids.index(im_end)  # the (empty) context sits right before the first <|im_end|>
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, (list, tuple)) else [cfg.eos_token_id]
    return manifest.PromptIds(
        system_head=tuple(ids[:system_end]), before_audio=tuple(ids[system_end:first_pad]),
        after_audio=tuple(ids[last_pad + 1 :]), audio_pad=audio_pad,
        asr_text=int(tok.convert_tokens_to_ids("<asr_text>")), eos=tuple(int(e) for e in eos),
    )


def write_tokenizer(loaded, out: Path) -> Path:
    """tokenizer.json for the runtime's `tokenizers` (original checkpoints ship only vocab.json + merges.txt)."""
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        loaded.tokenizer.save_pretrained(tmp)
        src = Path(tmp) / manifest.TOKENIZER_FILE
        if not src.is_file():
            raise CheckpointError("the checkpoint's tokenizer cannot be saved as tokenizer.json")
        shutil.copyfile(src, out / manifest.TOKENIZER_FILE)
    check = Tokenizer.from_file(str(out / manifest.TOKENIZER_FILE))
    for token in ("<|audio_pad|>", "<|im_end|>", "<asr_text>"):
        if check.token_to_id(token) != loaded.tokenizer.convert_tokens_to_ids(token):
            raise CheckpointError(f"tokenizer.json maps {token} differently from the checkpoint's tokenizer")
    return out / manifest.TOKENIZER_FILE


# ------------------------------------------------------------------------------------------- graph export
def _tensor_specs(values) -> tuple[manifest.TensorSpec, ...]:
    import onnx

    specs = []
    for value in values:
        t = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        shape = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim)
        specs.append(manifest.TensorSpec(value.name, dtype, shape))
    return tuple(specs)


def _save_program(program, path: Path, external: bool) -> tuple[str, ...]:
    program.save(str(path), external_data=external)
    data = path.with_name(path.name + ".data")
    return (data.name,) if data.exists() else ()


def _graph_spec(path: Path, precision: str, data_files: tuple[str, ...]) -> manifest.GraphSpec:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return manifest.GraphSpec(path.name, _tensor_specs(proto.graph.input), _tensor_specs(proto.graph.output),
                              precision, data_files)


def quiet_exporter_logs() -> None:
    """The exporter narrates every pass in INFO logs; keep the user's terminal for our own progress. Levels only go
    up here: quiet mode (progress.setup_logging) has set torch.onnx to ERROR, and -v leaves it to the user."""
    for name in ("onnxscript", "onnx_ir", "torch.onnx"):
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


def _export(module, args, kwargs, input_names, output_names, dynamic_shapes, opset, path: Path, external: bool,
            translations=None):
    import contextlib
    import io
    import warnings

    import torch

    quiet_exporter_logs()
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, kwargs=kwargs, dynamo=True, input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic_shapes, opset_version=opset, verbose=False, optimize=True,
            custom_translation_table=translations,
        )
    log.debug("torch.onnx: %s", captured.getvalue())
    files = _save_program(program, path, external)
    del program
    return files


def export_encoder(loaded, out: Path, opts: ExportOptions, external: bool) -> tuple[str, ...]:
    import torch

    module = graphs.EncoderGraph(loaded.model, loaded.gate if opts.mode == "routed" else None)
    dtype = next(loaded.model.parameters()).dtype
    windows = torch.export.Dim("windows", min=1, max=4096)
    chunks = torch.export.Dim("chunks", min=1, max=graphs.CHUNKS_PER_WINDOW)
    args = (torch.zeros(2, 128, 300, dtype=dtype), torch.tensor([39, 30]))
    names = ["mel", "valid_tokens"]
    shapes: list = [{0: windows, 2: graphs.CHUNK_FRAMES * chunks}, {0: windows}]
    kwargs = None
    if opts.mode == "routed":
        kwargs = {"lora_gate": torch.ones(1, dtype=dtype)}
        names.append("lora_gate")
        shapes = {"mel": shapes[0], "valid_tokens": shapes[1], "lora_gate": None}
    else:
        shapes = tuple(shapes)
    return _export(module, args, kwargs, names, ["audio_features"], shapes, opts.opset,
                   out / manifest.ENCODER_FILE, external)


def export_decoder(loaded, out: Path, opts: ExportOptions, external: bool) -> tuple[str, ...]:
    import torch

    module = graphs.DecoderGraph(loaded.model, loaded.gate if opts.mode == "routed" else None)
    dtype = next(loaded.model.parameters()).dtype
    cfg = loaded.config
    seq = torch.export.Dim("seq", min=1, max=32768)
    past_len = torch.export.Dim("past", min=0, max=65536)
    audio = torch.export.Dim("audio", min=0, max=65536)
    pad = int(cfg.audio_token_id)
    ids = torch.tensor([[1, 2, pad, pad, 5]])
    hidden = cfg.text_config.hidden_size
    past = [torch.zeros(1, module.kv_heads, 3, module.head_dim, dtype=dtype) for _ in range(2 * module.num_layers)]
    past_names, present_names = graphs.kv_names(module.num_layers)
    rows = torch.export.Dim("logit_rows", min=1, max=32768)
    shapes = {"input_ids": {1: seq}, "audio_features": {0: audio}, "logits_at": {0: rows},
              "past": tuple({2: past_len} for _ in past)}
    kwargs = None
    names = ["input_ids", "audio_features", "logits_at", *past_names]
    if opts.mode == "routed":
        kwargs = {"lora_gate": torch.ones(1, dtype=dtype)}
        shapes["lora_gate"] = None
        names.append("lora_gate")
    # Two logit rows in the example: a size-1 example would be specialised to a constant by torch.export.
    logits_at = torch.tensor([3, 4])
    return _export(module, (ids, torch.zeros(2, hidden, dtype=dtype), logits_at, *past), kwargs, names,
                   ["logits", *present_names], shapes, opts.opset, out / manifest.DECODER_FILE, external)


def export_router(loaded, out: Path, opts: ExportOptions) -> tuple[str, ...]:
    import torch

    module = graphs.RouterGraph(loaded.router)
    frames = torch.export.Dim("frames", min=8, max=loaded.router.config.position_rows * routing.DOWNSAMPLE)
    args = (torch.zeros(1, 401, loaded.router.config.n_mels),)
    return _export(module, args, None, ["mels"], ["degraded_prob"], ({1: frames},), opts.opset,
                   out / manifest.ROUTER_FILE, external=False)


def add_vad(staging: Path, graph_specs: dict) -> None:
    """Copy Silero VAD's ONNX model from the installed silero_vad package in as graph "vad" (hashed like every file),
    so a device needs nothing else to gate non-speech; without the package the bundle has none and the runtime
    falls back to an installed package or the energy VAD (runtime/vad.py)."""
    from megaedge.runtime import vad

    source = vad.installed_silero_model()
    if source is None:
        log.warning("silero_vad is not installed: the bundle gets no VAD graph (devices fall back to the energy VAD); "
                    "pip install --no-deps silero-vad==6.2.3 and export again")
        return
    shutil.copyfile(source, staging / manifest.VAD_FILE)
    graph_specs["vad"] = _graph_spec(staging / manifest.VAD_FILE, "fp32", ())


# ------------------------------------------------------------------------------------------- manifest
def _versions(opset: int) -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"megaedge": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime_validated": onnxruntime.__version__, "opset": opset}


def _decoder_exporter(opts: ExportOptions):
    if opts.target == "cuda":
        from megaedge.export.fixed_kv import export_decoder as fixed

        return fixed
    return export_decoder


def build_manifest(loaded, out: Path, opts: ExportOptions, graph_specs: dict, notes: list[str],
                   quantization: dict | None = None) -> manifest.Manifest:
    cfg = loaded.config
    text = cfg.text_config
    files = manifest.file_hashes(out)
    router = None
    if loaded.router is not None and "router" in graph_specs:
        rc = loaded.router.config
        router = {"n_mels": rc.n_mels, "position_rows": rc.position_rows, "threshold": routing.DEFAULT_THRESHOLD,
                  "window_seconds": routing.WINDOW_SECONDS, "max_single_pass_samples":
                  routing.max_router_samples(rc.position_rows)}
    past_names, present_names = graphs.kv_names(text.num_hidden_layers)
    doc = {
        "megaedge_version": __version__, "mode": opts.mode, "precision": opts.precision,
        "graphs": {k: asdict(v) for k, v in graph_specs.items()}, "files": files,
        "prompt": asdict(prompt_ids(loaded)),
        "frontend": {"sample_rate": features.SAMPLE_RATE, "n_fft": features.N_FFT, "hop": features.HOP,
                     "n_mels": features.ASR_MEL_BINS, "min_samples": features.ASR_MIN_SAMPLES,
                     "log_floor": 8.0, "router_n_mels": features.ROUTER_MEL_BINS},
        "encoder": {"chunk_frames": graphs.CHUNK_FRAMES, "tokens_per_chunk": graphs.TOKENS_PER_CHUNK,
                    "chunks_per_window": graphs.CHUNKS_PER_WINDOW, "output_dim": cfg.audio_config.output_dim,
                    "max_windows_per_call": 16},
        "decoder": {"num_layers": text.num_hidden_layers, "kv_heads": text.num_key_value_heads,
                    "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                    "hidden_size": text.hidden_size, "vocab_size": text.vocab_size, "kv_cache": "growing",
                    "past_names": past_names, "present_names": present_names,
                    "kv_dtype": "float16" if opts.precision == "fp16" else "float32",
                    **({"kv_cache": "fixed", "max_kv_length": opts.max_kv_length} if opts.target == "cuda" else {})},
        "router": router,
        # a record of the default stream preset at export; streams take StreamOptions, never this
        "streaming": {key: getattr(StreamOptions(), key)
                      for key in ("hop_seconds", "unstable_tokens", "endpoint_silence_seconds")},
        "versions": _versions(opts.opset),
        "source": {"checkpoint": loaded.source.base_dir.name, "layout": loaded.source.root_layout.value,
                   "adapter": loaded.adapter.summary() if loaded.adapter else None},
        "notes": notes,
        **({"quantization": quantization} if quantization else {}),
    }
    return manifest.Manifest.from_dict({"format_version": manifest.FORMAT_VERSION, **doc})


# ------------------------------------------------------------------------------------------- validation
def _compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    """(max abs diff, scale = max|ref|, relative = abs / scale)."""
    diff = float(np.abs(got.astype(np.float64) - ref).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return diff, scale, diff / scale if scale > 0 else diff


def _token_agreement(ref: np.ndarray, got: np.ndarray, allowed: float) -> dict:
    """Top-1 / top-5 agreement of logit rows [positions, vocab]; a top-1 disagreement is a tie (and passes) when the
    torch logits of the two tokens differ by no more than ``allowed``."""
    ref_top1, got_top1 = ref.argmax(-1), got.argmax(-1)
    rows = np.arange(len(ref))
    gaps = ref[rows, ref_top1] - ref[rows, got_top1]
    k = min(5, ref.shape[-1])
    ref_top5 = np.argpartition(-ref, k - 1, axis=-1)[:, :k]
    got_top5 = np.argpartition(-got, k - 1, axis=-1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_top5, got_top5)])
    return {"top1_agreement": float(np.mean(ref_top1 == got_top1)), "top5_overlap": float(overlap),
            "top1_non_ties": int(np.sum(gaps > allowed))}


def validate(loaded, bundle: Path, opts: ExportOptions, samples: np.ndarray) -> dict:
    """Run the bundle (onnxruntime CPU) and the torch model on ``samples``; raise ExportValidationError when the
    bundle does not reproduce it. Returns the figures (flat dict, JSON-ready; ``validation_note`` formats it):
    per route ``[g=0]`` / ``[g=1]`` (routed) the encoder's and the prefill logits' max abs diff, scale and relative
    error, top-1 agreement and top-5 overlap over every prompt position, and greedy tokens matched out of
    ``GREEDY_STEPS`` (the bundle's KV-cached decode fed torch's greedy tokens)."""
    import onnxruntime as ort
    import torch

    from megaedge.export.reference import prompt_inputs

    rtol = opts.validate_rtol if opts.validate_rtol is not None else DEFAULT_RTOL[opts.precision]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = {name: ort.InferenceSession(str(bundle / spec_file), so, providers=["CPUExecutionProvider"])
            for name, spec_file in manifest.GRAPH_FILES.items() if (bundle / spec_file).is_file()}
    np_dtype = np.float16 if opts.precision == "fp16" else np.float32
    report: dict = {"precision": opts.precision, "rtol": rtol}
    failures = []
    gates = (0.0, 1.0) if opts.mode == "routed" else (None,)
    inputs = prompt_inputs(loaded, samples, None, None)
    mel, valid = segmenting.encoder_windows(features.asr_log_mel(samples))
    cfg = loaded.config.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    past_names, _ = graphs.kv_names(cfg.num_hidden_layers)
    eos = loaded.config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    ids = inputs["input_ids"].numpy()
    for gate in gates:
        if loaded.gate is not None and gate is not None:
            loaded.gate.set(gate)
        extra = {"lora_gate": np.array([gate], np_dtype)} if gate is not None else {}
        with torch.no_grad():
            ref_audio = loaded.model.model.get_audio_features(
                inputs["input_features"].to(next(loaded.model.parameters()).dtype), inputs["input_features_mask"],
                return_dict=True).pooler_output.float().numpy()
            ref_logits = loaded.model(**inputs).logits[0].float().numpy()
            # torch's own greedy decode (transformers' generate), the tokens the bundle must pick step by step
            generated = loaded.model.generate(**inputs, max_new_tokens=GREEDY_STEPS, do_sample=False,
                                              eos_token_id=eos_ids, pad_token_id=loaded.config.pad_token_id)
            greedy = generated[0, ids.shape[1]:].tolist()
        enc = sess["encoder"].run(None, {"mel": mel.astype(np_dtype), "valid_tokens": valid, **extra})[0]
        audio = np.concatenate([enc[i, :v] for i, v in enumerate(valid)])
        prompt_logits, picks = _decode_for_validation(sess["decoder"], opts, cfg, head_dim, past_names, ids, audio,
                                                      gate, extra, greedy)
        out = [prompt_logits]
        key = "" if gate is None else f"[g={gate:g}]"
        enc_abs, enc_scale, enc_rel = _compare(ref_audio, audio.astype(np.float32))
        log_abs, log_scale, log_rel = _compare(ref_logits, out[0].astype(np.float32))
        agreement = _token_agreement(ref_logits, out[0].astype(np.float32), 2 * rtol * log_scale)
        matched = sum(p == t for p, t in zip(picks, greedy))
        greedy_non_ties = 0
        if matched < len(greedy):  # torch's logits at every step (one more forward) tell ties from real misses
            seq = generated[:, :-1]
            rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            with torch.no_grad():
                steps = loaded.model(input_ids=seq, attention_mask=torch.ones_like(seq), **rest
                                     ).logits[0, ids.shape[1] - 1:].float().numpy()
            greedy_non_ties = sum(1 for i, (p, t) in enumerate(zip(picks, greedy))
                                  if p != t and steps[i, t] - steps[i, p] > 2 * rtol * log_scale)
        report.update({f"encoder{key}_abs": enc_abs, f"encoder{key}_rel": enc_rel,
                       f"logits{key}_abs": log_abs, f"logits{key}_scale": log_scale, f"logits{key}_rel": log_rel,
                       f"top1{key}": agreement["top1_agreement"], f"top5{key}": agreement["top5_overlap"],
                       f"greedy{key}": f"{matched}/{len(greedy)}"})
        log.info("validate%s encoder rel %.3g (abs %.3g); logits rel %.3g (abs %.3g, scale %.3g); top-1 %.1f %%, "
                 "top-5 %.1f %%, greedy %d/%d (rtol %.3g)", key or "", enc_rel, enc_abs, log_rel, log_abs, log_scale,
                 100 * agreement["top1_agreement"], 100 * agreement["top5_overlap"], matched, len(greedy), rtol)
        if enc_rel > rtol:
            failures.append(f"encoder{key} differs by {enc_rel:.3g} relative > {rtol:.3g} (abs {enc_abs:.3g})")
        if log_rel > rtol:
            failures.append(f"prefill logits{key} differ by {log_rel:.3g} relative > {rtol:.3g} (abs {log_abs:.3g}, "
                            f"scale {log_scale:.3g})")
        if agreement["top1_non_ties"]:
            failures.append(f"top-1 token{key} differs at {agreement['top1_non_ties']} prompt positions beyond a tie")
        if greedy_non_ties:
            failures.append(f"greedy decode{key} picks another token at {greedy_non_ties} of {len(greedy)} steps")
    if "router" in sess and loaded.router is not None:
        from megaedge.export.router import router_probabilities

        mel = features.router_log_mel(samples).T[None]
        prob = sess["router"].run(None, {"mels": mel})[0][0]
        report["router_prob_abs"] = float(abs(prob - router_probabilities(loaded.router, samples)[0]))
        if report["router_prob_abs"] > ROUTER_ATOL:
            failures.append(f"router probability differs by {report['router_prob_abs']:.3g} > {ROUTER_ATOL:.3g}")
    if failures:
        raise ExportValidationError(f"exported bundle does not match the torch model: {'; '.join(failures)} "
                                    f"(--validate-rtol sets the relative tolerance)")
    return report


def _decode_for_validation(session, opts: ExportOptions, cfg, head_dim: int, past_names, ids, audio, gate, extra,
                           greedy) -> tuple[np.ndarray, list[int]]:
    """The decoder's logits at every prompt position, and its picks along torch's greedy tokens (KV-cached steps
    fed those tokens; pick 0 is the prompt's last position): through the graph directly for the growing cache,
    through the runtime's own state (runtime/fixed_kv.py) for the fixed one."""
    rows = ids.shape[1]
    if opts.target == "cuda":
        text = cfg
        decoder = {"num_layers": text.num_hidden_layers, "kv_heads": text.num_key_value_heads, "head_dim": head_dim,
                   "hidden_size": text.hidden_size, "vocab_size": text.vocab_size, "max_kv_length": opts.max_kv_length,
                   "kv_dtype": str(audio.dtype), "past_names": past_names,
                   "present_names": graphs.kv_names(text.num_hidden_layers)[1]}
        runner = fixed_kv.FixedKVRunner(session, decoder, gate is not None, audio.dtype)
        state = fixed_kv.FixedKVState(runner)
        logits = state.extend(ids[0].tolist(), audio, gate, logit_rows=rows)
        picks = [int(logits[-1].argmax())]
        for token in greedy[:-1]:
            picks.append(int(state.step(token, gate).argmax()))
        return logits, picks
    # Teacher forcing on the raw graph, not decoding: every step is fed the reference's token, and the graph's own
    # pick is only recorded, so one early disagreement does not hide the steps after it (decoding.greedy would).
    empty = np.zeros((1, cfg.num_key_value_heads, 0, head_dim), audio.dtype)
    out = session.run(None, {"input_ids": ids, "audio_features": audio, "logits_at": np.arange(rows, dtype=np.int64),
                             **dict.fromkeys(past_names, empty), **extra})
    picks, past = [int(out[0][-1].argmax())], out[1:]
    for token in greedy[:-1]:
        step = session.run(None, {"input_ids": np.asarray([[token]], np.int64), "audio_features": audio[:0],
                                  "logits_at": np.zeros(1, np.int64), **dict(zip(past_names, past)), **extra})
        picks.append(int(step[0][0].argmax()))
        past = step[1:]
    return out[0], picks


def validation_note(report: dict) -> str:
    """One line of ``validate``'s figures for the manifest's notes."""
    parts = [f"validation {report['precision']} rtol {report['rtol']:g}:"]
    for key in sorted(k[len("logits"):-len("_rel")] for k in report if k.startswith("logits") and k.endswith("_rel")):
        parts.append(f"{key or 'logits'} rel {report[f'logits{key}_rel']:.2g} (abs {report[f'logits{key}_abs']:.2g}, "
                     f"scale {report[f'logits{key}_scale']:.3g}), encoder rel {report[f'encoder{key}_rel']:.2g}, "
                     f"top-1 {100 * report[f'top1{key}']:.1f} %, top-5 {100 * report[f'top5{key}']:.1f} %, "
                     f"greedy {report[f'greedy{key}']};")
    if "router_prob_abs" in report:
        parts.append(f"router abs {report['router_prob_abs']:.2g}")
    return " ".join(parts).rstrip(";")


# ------------------------------------------------------------------------------------------- entry point
def _check_output(out: Path, force: bool, protected=()) -> None:
    """Refuse, in one line, an --out that cannot or must not become a bundle. ``protected``: the export's inputs
    (checkpoint, adapter, calibration data...), which --force must never delete."""
    from megaedge import staging

    if os.path.lexists(out) and not out.is_dir():
        raise BundleError(f"{out}: exists and is not a directory; choose a directory for the bundle")
    if not out.is_dir():
        return
    try:
        empty = not any(out.iterdir())
    except OSError as exc:
        raise staging.not_writable(out, exc) from exc
    if not empty and not force:
        raise BundleError(f"{out}: directory is not empty; choose a new directory or pass --force to replace it")
    # The bundle is renamed onto ``out``: even an empty working directory would be swapped from under the shell.
    staging.refuse_to_replace(out, "bundle", protected, marker=manifest.MANIFEST_NAME)
    foreign = _not_the_bundles(out)
    if foreign:
        raise BundleError(f"--out {out}: {foreign[0]} is not part of the bundle there and --force would delete it "
                          f"with the bundle; move it out first")


def _not_the_bundles(out: Path) -> list[str]:
    """Entries of the bundle folder ``out`` that neither its manifest lists nor megaedge makes there (prepared
    copies, TensorRT engines): a user's files, which replacing the bundle must not delete. A manifest that cannot
    be read says nothing: then the folder is the damaged bundle --force is for."""
    from megaedge.runtime.tensorrt import ENGINE_FILES

    try:
        info = manifest.read(out, verify=False)
    except MegaedgeError:
        return []
    ours = {manifest.MANIFEST_NAME, manifest.PREPARED_DIR, *ENGINE_FILES.values()}
    ours |= {Path(rel).parts[0] for rel in info.files}
    leftover = f".{manifest.MANIFEST_NAME}."  # manifest.write's temporary file, if a rewrite was killed
    return sorted(entry.name for entry in out.iterdir() if entry.name not in ours and
                  not (entry.name.startswith(leftover) and entry.name.endswith(".tmp")))


def export_bundle(model_path, out_dir, options: ExportOptions = ExportOptions(), adapter=None, router=None,
                  validation_audio: np.ndarray | None = None) -> Path:
    """Export a checkpoint to a bundle directory; returns the bundle path."""
    import torch

    from megaedge import staging as staged
    from megaedge.export.loader import load_checkpoint

    # Absolute: Path(".").name is "" and its parent is itself, which once put the staging folder inside the target.
    out = Path(os.path.abspath(Path(out_dir).expanduser()))
    staged.clear_stale(out.parent, out.name)
    _check_output(out, options.force, protected=(model_path, adapter, router))
    start = time.perf_counter()
    lora = "branches" if options.mode == "routed" else "merge"
    loaded = load_checkpoint(model_path, adapter=adapter, router=router, lora=lora,
                             load_router=options.include_router)
    notes = list(loaded.notes)
    if options.mode == "routed" and loaded.adapter is None:
        raise CheckpointError(f"{model_path}: --mode routed needs a LoRA adapter and this checkpoint has none "
                              f"(pass --adapter DIR or use --mode merged)")
    if options.precision == "fp16":
        loaded.model.half()
    params = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    external = params > 256 * 1024**2  # small graphs stay single-file; big ones mmap-able external data
    staging = staged.make_staging(out.parent, out.name)
    try:
        graph_specs = {}
        steps = [("encoder", lambda: export_encoder(loaded, staging, options, external)),
                 ("decoder", lambda: _decoder_exporter(options)(loaded, staging, options, external))]
        if loaded.router is not None and options.include_router:
            steps.append(("router", lambda: export_router(loaded, staging, options)))
        for name, step in track(steps, desc="export", unit="graph"):
            t0 = time.perf_counter()
            with torch.no_grad():
                data_files = step()
            precision = "fp32" if name == "router" else options.precision
            graph_specs[name] = _graph_spec(staging / manifest.GRAPH_FILES[name], precision, data_files)
            log.info("exported %s in %.1f s", name, time.perf_counter() - t0)
        add_vad(staging, graph_specs)
        write_tokenizer(loaded, staging)
        if options.validate:
            # fp16 graphs are checked against fp32 arithmetic on the same (fp16-rounded) weights.
            loaded.model.float()
            if validation_audio is None:
                validation_audio = _validation_audio()
            notes.append(validation_note(validate(loaded, staging, options, validation_audio)))
        quantization = None
        if options.weights:
            from megaedge.export.fixed_kv import quantize_weights

            graph_specs["decoder"], quantization = quantize_weights(
                staging, graph_specs["decoder"], options.weights, "float16" if options.precision == "fp16" else "float32")
            notes.append(f"decoder weights {options.weights}: MatMulNBits blocks of "
                         f"{quantization['recipe']['block_size']}, tied embedding / LM head 8-bit; validated in "
                         f"{options.precision} before quantization")
        manifest.write(build_manifest(loaded, staging, options, graph_specs, notes, quantization), staging)
        # Checked again: the directory may have changed during the minutes of export.
        _check_output(out, options.force, protected=(model_path, adapter, router))
        staged.replace_dir(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise BundleError(f"{out.parent}: disk full while writing the bundle; nothing was left behind; free "
                              f"space (a bundle needs about {params / 1e9:.1f} GB) or choose another --out") from exc
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise staged.not_writable(out.parent, exc) from exc
        raise
    except BaseException:
        # Ctrl-C, SIGTERM (megaedge.cli.signals) and failures alike: an unfinished bundle never stays on disk.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("bundle %s written in %.1f s", out, time.perf_counter() - start)
    return out


def _validation_audio() -> np.ndarray:
    """A deterministic speech-like signal of 9 s (crosses an encoder window boundary)."""
    rng = np.random.default_rng(0)
    t = np.arange(9 * features.SAMPLE_RATE) / features.SAMPLE_RATE
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voiced = np.sin(2 * np.pi * np.cumsum(pitch) / features.SAMPLE_RATE)
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 3 * t)) * (np.sin(2 * np.pi * 0.25 * t) > -0.3)
    return (0.3 * voiced * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
