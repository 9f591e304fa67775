"""The bundle manifest, ``megaedge.json``: everything a runtime needs to know about a bundle, and nothing else.

Export writes it; the runtime reads only it (plus the files it lists). File names of a bundle live here and
nowhere else. Reading verifies the format version and, unless told not to, every file's sha256.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from megaedge.errors import BundleError

MANIFEST_NAME = "megaedge.json"
FORMAT_VERSION = 1
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
ROUTER_FILE = "router.onnx"
PREFILL_FILE = "decoder_prefill.onnx"  # optional second decoder graph, quantized for prompt-sized calls
TOKENIZER_FILE = "tokenizer.json"
VAD_FILE = "vad.onnx"  # Silero VAD (runtime/vad.py), copied in by export
NATIVE_DECODER_FILE = "decoder_native.npz"  # small tensors the native decode step needs that the graph holds inline
ENCODER_BODY_FILE = "encoder_body.onnx"  # the encoder from conv_out on, for a native stem (same weight file)
NATIVE_STEM_FILE = "encoder_stem.npz"  # the stem convolutions for the native kernel (int8 blocks)
NATIVE_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")  # per layer in decoder["native"], in graph order
QUANT_REPORT_JSON = "quant_report.json"
QUANT_REPORT_MD = "quant_report.md"
PREPARED_DIR = "prepared"  # machine-local copies made by `megaedge prepare`; not listed in the manifest
GRAPH_FILES = {"encoder": ENCODER_FILE, "decoder": DECODER_FILE, "router": ROUTER_FILE, "decoder_prefill": PREFILL_FILE,
               "encoder_body": ENCODER_BODY_FILE, "vad": VAD_FILE}
PRECISIONS = ("fp32", "fp16", "int8")
MODES = ("merged", "routed")



@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple  # ints for fixed dims, strings for named dynamic axes


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str
    data_files: tuple[str, ...] = ()

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise BundleError(f"{self.file}: no input named {name!r} (has {[s.name for s in self.inputs]})")

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)


@dataclass(frozen=True)
class PromptIds:
    """Token ids of the Qwen3-ASR prompt, split where runtime text goes:
    system_head + context + before_audio + audio_pad * N + after_audio [+ language prefix]."""

    system_head: tuple[int, ...]
    before_audio: tuple[int, ...]
    after_audio: tuple[int, ...]
    audio_pad: int
    asr_text: int
    eos: tuple[int, ...]
    language_template: str = "language {language}<asr_text>"

    def build(self, audio_tokens: int, context_ids=(), language_ids=()) -> list[int]:
        return [*self.system_head, *context_ids, *self.before_audio, *([self.audio_pad] * audio_tokens),
                *self.after_audio, *language_ids]


@dataclass(frozen=True)
class Manifest:
    megaedge_version: str
    mode: str
    precision: str
    graphs: dict  # name -> GraphSpec
    files: dict  # relative path -> sha256
    prompt: PromptIds
    frontend: dict
    encoder: dict
    decoder: dict
    router: dict | None
    streaming: dict
    versions: dict
    source: dict
    quantization: dict | None = None
    format_version: int = FORMAT_VERSION
    notes: tuple[str, ...] = ()
    engines: dict | None = None

    @property
    def routed(self) -> bool:
        return self.mode == "routed"

    def graph(self, name: str) -> GraphSpec:
        if name not in self.graphs:
            raise BundleError(f"bundle has no {name} graph (has {sorted(self.graphs)})")
        return self.graphs[name]

    def to_dict(self) -> dict:
        doc = asdict(self)
        doc["graphs"] = {k: asdict(v) for k, v in self.graphs.items()}
        return doc

    @classmethod
    def from_dict(cls, doc: dict) -> Manifest:
        def graph(raw: dict) -> GraphSpec:
            specs = lambda items: tuple(TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in items)  # noqa: E731
            return GraphSpec(raw["file"], specs(raw["inputs"]), specs(raw["outputs"]), raw["precision"],
                             tuple(raw.get("data_files", ())))

        try:
            prompt = doc["prompt"]
            return cls(
                megaedge_version=doc["megaedge_version"], mode=doc["mode"], precision=doc["precision"],
                graphs={k: graph(v) for k, v in doc["graphs"].items()}, files=dict(doc["files"]),
                prompt=PromptIds(tuple(prompt["system_head"]), tuple(prompt["before_audio"]),
                                 tuple(prompt["after_audio"]), int(prompt["audio_pad"]), int(prompt["asr_text"]),
                                 tuple(prompt["eos"]), prompt.get("language_template", "language {language}<asr_text>")),
                frontend=doc["frontend"], encoder=doc["encoder"], decoder=doc["decoder"], router=doc.get("router"),
                streaming=doc["streaming"], versions=doc["versions"], source=doc.get("source", {}),
                quantization=doc.get("quantization"), format_version=int(doc["format_version"]),
                notes=tuple(doc.get("notes", ())), engines=doc.get("engines"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{MANIFEST_NAME}: malformed manifest ({type(exc).__name__}: {exc})") from exc


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(bundle_dir: Path) -> dict[str, str]:
    """sha256 of every file directly in ``bundle_dir`` but the manifest: the manifest's ``files``."""
    return {p.name: sha256_file(p) for p in sorted(bundle_dir.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}


def write(manifest: Manifest, bundle_dir: Path) -> Path:
    path = Path(bundle_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


def read(bundle_dir: str | Path, verify: bool = True) -> Manifest:
    """Read and check ``megaedge.json``: format version, listed files present and (``verify``) their sha256."""
    root = Path(bundle_dir).expanduser()
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory; pass the bundle directory that `megaedge export` wrote")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{root}: no {MANIFEST_NAME}; this is not a megaedge bundle (run `megaedge export`)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if not isinstance(version, int):
        raise BundleError(f"{path}: no format_version; not a megaedge manifest")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{path}: manifest format {version} (written by megaedge {doc.get('megaedge_version', '?')}) is newer "
            f"than this megaedge reads (format {FORMAT_VERSION}); upgrade: pip install -U megaedge"
        )
    manifest = Manifest.from_dict(doc)
    check_files(root, manifest, verify)
    return manifest


def check_files(root: Path, manifest: Manifest, verify: bool = True) -> None:
    """Every file the manifest lists is present and (``verify``) has its sha256."""
    for rel, expected in manifest.files.items():
        file = root / rel
        if not file.is_file():
            raise BundleError(f"{root}: {rel} is listed in {MANIFEST_NAME} but missing; copy the whole bundle")
        if verify:
            actual = sha256_file(file)
            if actual != expected:
                raise BundleError(
                    f"{file}: sha256 {actual[:12]}... does not match the manifest ({expected[:12]}...); the file "
                    f"was modified or truncated; copy the bundle again (or pass --no-verify to skip the check)"
                )
