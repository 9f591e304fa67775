"""The bundle manifest, ``megaedge.json``: everything a runtime needs to know about a bundle, and nothing else.

Export writes it; the runtime reads only it (plus the files it lists). File names of a bundle live here and
nowhere else. Reading checks, before anything else trusts a value (runtime/bundle_check.py):

* the manifest's own digest (``manifest_sha256``: sha256 of the canonical JSON of the rest), so an edit of
  ``megaedge.json`` is refused like an edit of any listed file. A digest anyone can recompute stops accidents and
  naive edits, not a forger: pin a bundle with ``expected_digest`` (``bundle_digest``) to stop those too; the
  digest covers every file through the sha256 list in ``files``;
* the types and enums of every field;
* that every path stays inside the bundle and every file the runtime loads is listed (hashed);
* that the numbers agree with the graphs and weight files they describe, before native code sees them;
* unless told not to, every file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from megaedge.errors import BundleError

MANIFEST_NAME = "megaedge.json"
# 2: the manifest carries its own digest (DIGEST_FIELD). Format 1 had none, so a reader cannot tell an
# edited format-1 manifest from a clean one: those are refused with a re-export message.
FORMAT_VERSION = 2
DIGEST_FIELD = "manifest_sha256"
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
        """The manifest of a JSON document; wrong types, unknown enums or null sections raise a one-line
        BundleError (bundle_check.check_document) instead of surfacing later as a traceback."""
        from megaedge.runtime import bundle_check

        bundle_check.check_document(doc)

        def graph(raw: dict) -> GraphSpec:
            specs = lambda items: tuple(TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in items)  # noqa: E731
            return GraphSpec(raw["file"], specs(raw["inputs"]), specs(raw["outputs"]), raw["precision"],
                             tuple(raw.get("data_files", ())))

        prompt = doc["prompt"]
        return cls(
            megaedge_version=doc["megaedge_version"], mode=doc["mode"], precision=doc["precision"],
            graphs={k: graph(v) for k, v in doc["graphs"].items()}, files=dict(doc["files"]),
            prompt=PromptIds(tuple(prompt["system_head"]), tuple(prompt["before_audio"]),
                             tuple(prompt["after_audio"]), prompt["audio_pad"], prompt["asr_text"],
                             tuple(prompt["eos"]), prompt.get("language_template", "language {language}<asr_text>")),
            frontend=doc["frontend"], encoder=doc["encoder"], decoder=doc["decoder"], router=doc.get("router"),
            streaming=doc["streaming"], versions=doc["versions"], source=doc.get("source") or {},
            quantization=doc.get("quantization"), format_version=doc["format_version"],
            notes=tuple(doc.get("notes") or ()), engines=doc.get("engines"),
        )


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(bundle_dir: Path) -> dict[str, str]:
    """sha256 of every file directly in ``bundle_dir`` but the manifest: the manifest's ``files``."""
    return {p.name: sha256_file(p) for p in sorted(bundle_dir.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}


def canonical_digest(doc: dict) -> str:
    """sha256 of ``doc`` without its DIGEST_FIELD as canonical JSON (sorted keys, no whitespace, ASCII): the same
    for every spelling of one document, so re-indenting megaedge.json keeps its digest and any value change does not."""
    body = {k: v for k, v in doc.items() if k != DIGEST_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def inside(bundle: str | Path, rel) -> Path:
    """``bundle / rel`` when ``rel`` is a relative path that stays inside the bundle, symlinks followed; else a
    one-line BundleError. Every path a manifest names goes through here, so no value can make the runtime load or
    hash a file outside the bundle (and outside its hash list)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise BundleError(f"{MANIFEST_NAME}: file path {rel!r} is not a relative path; re-export the bundle")
    parts = Path(rel).parts
    if Path(rel).is_absolute() or rel.startswith(("/", "\\")) or ".." in parts or ".." in rel.split("\\"):
        raise BundleError(f"{MANIFEST_NAME}: file path {rel!r} points outside the bundle (absolute or '..'); "
                          f"a bundle names only files inside its directory: re-export it or copy it again")
    root = Path(bundle).resolve()
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise BundleError(f"{MANIFEST_NAME}: {rel} resolves to {target}, outside the bundle {root} (a symlink out); "
                          f"replace the link with the file itself")
    return root / rel


def write(manifest: Manifest, bundle_dir: Path) -> Path:
    """Write ``megaedge.json`` in the current format with its digest, atomically (a reader sees the old manifest or
    the new one, never half of one)."""
    doc = json.loads(json.dumps(manifest.to_dict()))  # plain JSON values: exactly what read() will digest
    doc["format_version"] = FORMAT_VERSION
    doc[DIGEST_FIELD] = canonical_digest(doc)
    path = Path(bundle_dir) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _document(root: Path) -> dict:
    """The manifest document of bundle ``root`` once its format and its own digest check out."""
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory; pass the bundle directory that `megaedge export` wrote")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{root}: no {MANIFEST_NAME}; this is not a megaedge bundle (run `megaedge export`)")
    inside(root, MANIFEST_NAME)
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # ValueError: JSON's, or an integer of thousands of digits
        raise BundleError(f"{path}: not valid JSON ({' '.join(str(exc).split())[:200]})") from None
    except RecursionError:  # nested deeper than any manifest megaedge writes
        doc = None
    if doc is None or _nesting(doc) > MAX_NESTING:  # the digest's encoder recurses deeper than the parser did
        raise BundleError(f"{path}: nested too deeply to be a megaedge manifest; re-export the bundle or copy it "
                          "again") from None
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if version is None:
        raise BundleError(f"{path}: no format_version; not a megaedge manifest")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{path}: format_version {version!r} is not a format number (1, 2, ...); the manifest is "
                          f"damaged: re-export the bundle or copy it again")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{path}: manifest format {version} (written by megaedge {doc.get('megaedge_version', '?')}) is newer "
            f"than this megaedge reads (format {FORMAT_VERSION}); upgrade: pip install -U megaedge"
        )
    if version < FORMAT_VERSION:
        raise BundleError(f"{path}: manifest format {version} has no integrity digest (format {FORMAT_VERSION} "
                          f"has); re-export the bundle with this megaedge (megaedge export)")
    stored, actual = doc.get(DIGEST_FIELD), canonical_digest(doc)
    if stored != actual:
        raise BundleError(f"{path}: megaedge.json was edited after export (its digest is {actual[:12]}..., it records "
                          f"{str(stored)[:12]}...); re-export the bundle or copy it again")
    return doc


def bundle_digest(bundle_dir: str | Path) -> str:
    """The bundle's digest (its manifest's, which covers every file through their sha256): pin a bundle with it
    (``read(..., expected_digest=...)``)."""
    return _document(Path(bundle_dir).expanduser())[DIGEST_FIELD]


def pinned_digest(value, name: str = "expected digest") -> str:
    """A pinned bundle digest as the manifest spells its own (64 lowercase hex digits), or one line."""
    pinned = str(value).strip().lower()
    if len(pinned) != 64 or any(c not in "0123456789abcdef" for c in pinned):
        raise BundleError(f"{name} {value!r} is not 64 hex digits; use the one `megaedge doctor --bundle BUNDLE` "
                          "prints for the bundle you trust")
    return pinned


def read(bundle_dir: str | Path, verify: bool = True, expected_digest: str | None = None) -> Manifest:
    """Read and check ``megaedge.json`` (see the module docstring); ``verify`` hashes every listed file,
    ``expected_digest`` refuses any bundle but the pinned one."""
    root = Path(bundle_dir).expanduser()
    doc = _document(root)
    if expected_digest is not None:
        pinned = pinned_digest(expected_digest)
        if doc[DIGEST_FIELD] != pinned:
            raise BundleError(f"{root}: bundle digest {doc[DIGEST_FIELD]} is not the pinned {pinned}; this is "
                              "another bundle or an edited one: copy the pinned one")
    manifest = Manifest.from_dict(doc)
    from megaedge.runtime import bundle_check

    bundle_check.check_bundle(root, manifest)
    check_files(root, manifest, verify)
    return manifest


def check_files(root: Path, manifest: Manifest, verify: bool = True) -> None:
    """Every file the manifest lists is present and (``verify``) has its sha256."""
    for rel, expected in manifest.files.items():
        file = inside(root, rel)
        if not file.is_file():
            raise BundleError(f"{root}: {rel} is listed in {MANIFEST_NAME} but missing; copy the whole bundle")
        if verify:
            actual = sha256_file(file)
            if actual != expected:
                raise BundleError(
                    f"{file}: sha256 {actual[:12]}... does not match the manifest ({expected[:12]}...); the file "
                    f"was modified or truncated; copy the bundle again (or skip the check: --no-verify, verify=False)"
                )


MAX_NESTING = 32  # megaedge writes manifests under 10 levels deep


def _nesting(doc) -> int:
    """How deeply lists and mappings nest in ``doc``, without recursion."""
    deepest, todo = 0, [(doc, 1)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_NESTING:
                todo.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def load_npz(path, names=None) -> dict:
    """The arrays ``names`` (default: every one) of an .npz the bundle holds. Each member's header is read first and
    must describe a plain array no larger than the member holds, so a forged header cannot make numpy allocate
    what the file never had; members not asked for are never read. A damaged file is one line."""
    import zipfile

    import numpy as np

    def damaged(reason: str) -> BundleError:
        return BundleError(f"{path}: cannot be read ({reason}); the bundle is damaged: copy it again, or check it "
                           "with megaedge doctor --bundle")

    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename[:-4]: info for info in archive.infolist() if info.filename.endswith(".npy")}
            wanted = list(members) if names is None else list(names)
            out = {}
            for name in wanted:
                if name not in members:
                    raise damaged(f"no array {str(name)[:60]!r}")
                info = members[name]
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version not in ((1, 0), (2, 0)):
                        raise damaged(f"array {name!r}: .npy format {version}")
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    try:
                        shape, fortran, dtype = read_header(f, max_header_size=10000)
                    except ValueError:  # numpy's own words suggest allow_pickle=True: never the fix here
                        raise damaged(f"array {name!r}: its header is damaged or over 10000 bytes") from None
                    if dtype.hasobject:
                        raise damaged(f"array {name!r} holds Python objects, which megaedge never unpickles")
                    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
                    if need > info.file_size:
                        raise damaged(f"array {name!r} declares {need} bytes and holds {info.file_size}")
            with np.load(path) as data:
                for name in wanted:
                    out[name] = data[name]
            return out
    except PermissionError as exc:
        raise BundleError(f"{path}: cannot be read ({exc.strerror}); give this user read access to the bundle") \
            from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, TypeError) as exc:  # TypeError: a bare .npy
        reason = " ".join(str(exc).split()) if str(exc).strip() else type(exc).__name__
        raise damaged(reason[:200]) from None
