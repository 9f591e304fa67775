"""Prepared copies of a bundle's graphs for THIS machine: onnxruntime's optimized graph with its pre-packed weights.

Creating an onnxruntime CPU session spends most of its time re-arranging weights for the kernels (pre-packing: a
2.3 s of the 1.7B INT8 decoder's 2.8 s) and optimizing the graph, every time a process starts. ``prepare`` runs
that once and saves the result (``session.save_external_prepacked_constant_initializers``); later sessions load the
saved graph with optimizations off and memory-map the pre-packed weights. The packed layout depends on the CPU's
instruction set and on the onnxruntime version, so copies live under a key of both and a copy made elsewhere is
never used.

Integrity. ``prepare`` hashes every bundle file, then records each one's stamp: size, mtime, ctime and inode. A load
skips re-hashing only while every stamp is unchanged and the manifest lists the same sha256s. mtime alone is not
enough (``os.utime`` restores it after a same-size edit), but any write or utime also sets ctime to the current
time, which only a clock change can undo, and a copied bundle has new inodes: the copy is hashed again. The same
stamps tie the prepared copies to their content (recorded with their sha256; a changed one is re-hashed and used
only if it still matches) and to the bundle: copies are used only while the bundle files are the ones ``prepare``
verified, so a ``prepared/`` that came with a copied bundle is never used here. (Filesystems without a real ctime,
e.g. FAT, weaken the fast path: run with ``use_prepared=False`` and verification there.)

Under a pinned digest (``expected_digest``) the stamps alone prove nothing: whoever can write the bundle can write
``prepared.json`` too, stamps and sha256s of a tampered file included. ``prepare`` therefore seals the index with an
HMAC under a key of this user's, kept outside every bundle (``$MEGAEDGE_STATE_DIR``, else
``$XDG_STATE_HOME/megaedge``, else ``~/.local/state/megaedge``: ``prepared.key``, mode 0600). A pinned load uses the
stamps and the prepared copies only when the seal holds under its own user's key; otherwise it hashes every file and
optimizes the graphs again (prepare as the user that runs the bundle to keep the fast path under a pin).

Concurrency. Each prepare builds a new generation directory under a per-process staging name and publishes it by
atomically replacing the ``current`` pointer; one prepare per bundle and machine runs at a time (a second waits for
the first, then prepares again). A process that uses a generation holds a shared lock on it for its life, and a
generation is deleted (by a later prepare or ``remove``) only under an exclusive lock, so a transcribe that started
on the old copies never sees them vanish while its sessions load them.

Costs disk: the saved data holds the original weights and the packed ones (about 2x the graph's data).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from megaedge.errors import BundleError, MegaedgeError
from megaedge.runtime import machine, manifest

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; generations are still published atomically
    fcntl = None

log = logging.getLogger("megaedge.runtime.prepared")

INDEX_FILE = "prepared.json"
CURRENT_FILE = "current"  # names the generation in use; replaced atomically
READERS_LOCK = ".readers"  # in each generation: shared by processes using it, exclusive while deleting it
PREPARE_LOCK = ".prepare.lock"  # in the machine's directory: one prepare (or remove) at a time
STAGING_PREFIX = ".staging-"
PREPARED_GRAPHS = ("encoder", "encoder_body", "decoder", "decoder_prefill")  # the router is small: nothing to gain
_held: dict[str, int] = {}  # generation -> descriptor holding its shared lock (for this process's life)
_stale_warned: set = set()  # bundles whose stale (or, pinned, unsealed) copies this process has warned about


KEY_FILE = "prepared.key"
SEAL_FIELD = "seal"


def _key_path() -> Path:
    root = os.environ.get("MEGAEDGE_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state"), "megaedge")
    return Path(root) / KEY_FILE


def _key(create: bool = False) -> bytes | None:
    """This user's sealing key (32 random bytes), made on first use by ``prepare``; None if there is none."""
    path = _key_path()
    try:
        key = path.read_bytes()
        return key if len(key) == 32 else None
    except FileNotFoundError:
        if not create:
            return None
    except OSError:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another prepare made it just now
        return _key()
    except OSError as exc:
        log.warning("cannot keep a sealing key at %s (%s): pinned loads will not use these prepared copies", path,
                    exc.strerror)
        return None
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    return _key()


def _seal(index: dict, key: bytes) -> str:
    body = json.dumps({k: v for k, v in index.items() if k != SEAL_FIELD}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def _sealed(index: dict | None) -> bool:
    """Whether ``index`` was sealed by ``prepare`` under this user's key (see the module docstring)."""
    key = _key()
    seal = (index or {}).get(SEAL_FIELD)
    return key is not None and isinstance(seal, str) and hmac.compare_digest(seal, _seal(index, key))


def machine_key() -> str:
    import onnxruntime as ort

    flags = machine.cpu_flags()
    digest = hashlib.sha256((" ".join(sorted(flags)) if flags else platform.processor()).encode()).hexdigest()[:10]
    return f"ort{ort.__version__}-{platform.machine()}-{digest}"


def directory(bundle: Path) -> Path:
    return Path(bundle) / manifest.PREPARED_DIR / machine_key()


def _stamp(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _stamps(bundle: Path, rels) -> dict | None:
    """Stamps of the bundle files ``rels``, or None when one cannot be read (missing: never verified)."""
    try:
        return {rel: _stamp(Path(bundle) / rel) for rel in sorted(rels)}
    except OSError:
        return None


def _current(bundle: Path) -> Path | None:
    """This machine's generation in use, or None."""
    rel = f"{manifest.PREPARED_DIR}/{machine_key()}"
    try:
        name = (manifest.inside(bundle, rel) / CURRENT_FILE).read_text().strip()
    except (OSError, BundleError):  # none, or prepared/ links out of the bundle: not ours to use
        return None
    if not name or name != Path(name).name or name.startswith("."):
        return None
    try:  # a generation linked out of the bundle is not ours either
        return manifest.inside(bundle, f"{rel}/{name}")
    except BundleError:
        return None


def _read_index(generation: Path | None) -> dict | None:
    if generation is None:
        return None
    try:
        index = json.loads((generation / INDEX_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return index if isinstance(index, dict) else None


def status(bundle: Path, info: manifest.Manifest) -> tuple[str, str]:
    """This machine's prepared copies of ``bundle``: (none | stale | ready, a few words), for ``megaedge doctor``."""
    index = _read_index(_current(Path(bundle)))
    if not index:
        return "none", "none on this machine (megaedge prepare makes them: faster loads)"
    if index.get("files") != info.files or index.get("verified") != _stamps(Path(bundle), info.files):
        return "stale", ("the bundle files changed since prepare (an edit, chmod, chown or copy); not used: run "
                         "megaedge prepare again")
    graphs = ", ".join(sorted(index.get("graphs") or {})) or "no graphs"
    return "ready", f"{graphs}; later loads skip the sha256 check"


def check_files(bundle: Path, info: manifest.Manifest, pinned: bool = False) -> None:
    """Every file of the bundle against its digest (manifest.check_files), skipped while ``prepare``'s
    verification still holds: what loading a bundle with verification on costs, wherever it is loaded. ``pinned``:
    the verification counts only if sealed under this user's key."""
    if not verified(bundle, info, pinned):
        manifest.check_files(bundle, info)


def verified(bundle: Path, info: manifest.Manifest, pinned: bool = False) -> bool:
    """True when ``prepare`` hashed every file this manifest lists against the same sha256s and no file changed
    since (same size, mtime, ctime and inode: see the module docstring); ``pinned``: and sealed it."""
    index = _read_index(_current(bundle))
    stamps = _stamps(bundle, info.files)
    return bool(index) and stamps is not None and index.get("files") == info.files and \
        index.get("verified") == stamps and (not pinned or _sealed(index))


def _source_key(info: manifest.Manifest, spec: manifest.GraphSpec) -> str:
    """The sha256 of the graph file and its weight files, as the manifest lists them."""
    return "+".join(str(info.files.get(rel)) for rel in (spec.file, *spec.data_files))


def _acquire(bundle: Path) -> Path | None:
    """The current generation, with a shared lock held for this process's life (so no prepare or remove deletes
    it while sessions load from it); None when there is none."""
    for _ in range(3):  # a prepare may replace the generation between reading `current` and locking it
        generation = _current(bundle)
        if generation is None or str(generation) in _held or fcntl is None:
            return generation
        try:
            fd = os.open(generation / READERS_LOCK, os.O_RDONLY)
        except OSError:
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a collector deletes this generation
        if os.fstat(fd).st_nlink == 0:  # it did: the generation is gone
            os.close(fd)
            continue
        _held[str(generation)] = fd
        return generation
    return None


def lookup(bundle: Path, info: manifest.Manifest, name: str, pinned: bool = False) -> Path | None:
    """The prepared copy of graph ``name`` made on this machine from the same graph files, if there is one that is
    intact and was made for these very bundle files (``pinned``: and sealed under this user's key)."""
    bundle = Path(bundle)
    generation = _acquire(bundle)
    index = _read_index(generation)
    spec = info.graphs.get(name)
    entry = (index or {}).get("graphs", {}).get(name) if index else None
    if not isinstance(entry, dict) or spec is None or entry.get("source") != _source_key(info, spec):
        return None
    if pinned and not _sealed(index):
        if ("seal", str(bundle)) not in _stale_warned:
            _stale_warned.add(("seal", str(bundle)))
            log.warning("%s: its prepared copies are not sealed under this user's key (%s), so a pinned load does "
                        "not trust them and optimizes the graphs again; run megaedge prepare as this user",
                        bundle, _key_path())
        return None
    if index.get("verified") != _stamps(bundle, info.files):
        # Only the stamps prove the copies were made here for these files (prepared/ is outside the bundle's
        # digest): after a chmod, chown or copy they do not, and a load re-optimizes every graph. Say so once.
        if str(bundle) not in _stale_warned:
            _stale_warned.add(str(bundle))
            log.warning("%s: bundle files changed since `megaedge prepare` (an edit, chmod, chown or copy changes "
                        "their ctime): its prepared copies are not used and loading optimizes the graphs again; run "
                        "megaedge prepare again (before making the bundle read-only)", bundle)
        return None
    files = entry.get("files")
    if not isinstance(files, dict) or entry.get("file") not in files:
        return None
    for rel, record in files.items():
        path = generation / str(rel)
        if Path(str(rel)).name != rel or not isinstance(record, dict) or not path.is_file() or path.is_symlink():
            return None
        if _stamp(path) != record.get("stamp") and manifest.sha256_file(path) != record.get("sha256"):
            log.warning("prepared copy %s was modified after `megaedge prepare`: not used; run megaedge prepare "
                        "again", path)
            return None
    return generation / entry["file"]


@contextmanager
def _exclusive(key_dir: Path):
    """One prepare or remove of this bundle on this machine at a time (a second one waits)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    while True:
        key_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_dir / PREPARE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:  # not deleted by a remove we waited for
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def _ours(name: str) -> bool:
    """A file name megaedge writes under prepared/: its index and locks, and onnxruntime's saved graphs and data."""
    return name in (INDEX_FILE, READERS_LOCK, CURRENT_FILE, PREPARE_LOCK) or name.endswith(".onnx") or \
        ".onnx." in name or (name.startswith(STAGING_PREFIX) and name.endswith(f"-{CURRENT_FILE}"))


def _generation_name(name: str) -> bool:
    stem, _, pid = name[1:].partition("-")
    return name.startswith("g") and stem.isdigit() and pid.isdigit()


def _delete(directory: Path, foreign: list[str]) -> None:
    """Delete the files megaedge wrote in ``directory`` and the directory once it is empty; anything else (a file
    a user put there) is left in place and named in ``foreign``. A generation's index lists its files: with one,
    only those are megaedge's (a user's own .onnx beside them stays)."""
    index = _read_index(directory)
    listed = None
    if index is not None:
        listed = {INDEX_FILE, READERS_LOCK}
        for entry in (index.get("graphs") or {}).values():
            listed |= {str(name) for name in ((entry or {}).get("files") or {})}
    others = []
    for child in sorted(directory.iterdir()):
        ours = _ours(child.name) if listed is None else child.name in listed
        if child.is_file() and not child.is_symlink() and ours:
            if child.name != INDEX_FILE:
                child.unlink(missing_ok=True)
        else:
            others.append(str(child))
    foreign += others
    if not others:  # the index goes last, and stays while a user's file does: it says what else is megaedge's
        (directory / INDEX_FILE).unlink(missing_ok=True)
        try:
            directory.rmdir()
        except OSError:
            pass


def _collect(key_dir: Path, foreign: list[str] | None = None) -> list[str]:
    """Delete every generation but the current one that no process uses, staging left by interrupted prepares and
    files of the old flat layout; returns the names kept because a running process uses them. Only files megaedge
    writes are deleted: anything else is kept, named in ``foreign`` and logged. Call under ``_exclusive``."""
    foreign = [] if foreign is None else foreign
    try:
        current = (key_dir / CURRENT_FILE).read_text().strip()
    except OSError:
        current = None
    kept = []
    for child in sorted(key_dir.iterdir()):
        if child.name in (current, CURRENT_FILE, PREPARE_LOCK):
            continue
        if child.is_symlink() or not child.is_dir():
            if child.is_file() and not child.is_symlink() and _ours(child.name):
                child.unlink(missing_ok=True)
            else:
                foreign.append(str(child))
            continue
        if not (child.name.startswith(STAGING_PREFIX) or _generation_name(child.name)):
            foreign.append(str(child))
            continue
        if child.name.startswith(STAGING_PREFIX) or fcntl is None:  # no prepare runs: we hold the prepare lock
            _delete(child, foreign)
            continue
        try:
            fd = os.open(child / READERS_LOCK, os.O_RDONLY)
        except OSError:  # no readers' lock: a damaged generation; nobody can be using it
            _delete(child, foreign)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            kept.append(child.name)
            log.info("prepared copies %s are in use by a running process: kept until it exits", child.name)
        else:
            _delete(child, foreign)
        finally:
            os.close(fd)
    for path in foreign:
        log.warning("%s: not written by megaedge prepare; left in place", path)
    return kept


def prepare(bundle: str | Path, threads: int | None = None) -> dict:
    """Verify the bundle, then save each graph's optimized, pre-packed form for this machine. Returns the index."""
    bundle = Path(bundle).expanduser()
    info = manifest.read(bundle, verify=False)
    before = _stamps(bundle, info.files)
    manifest.check_files(bundle, info, verify=True)
    key_dir = directory(bundle)
    try:
        manifest.inside(bundle, str(key_dir.relative_to(bundle)))
        key_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MegaedgeError(f"{bundle}: cannot write {manifest.PREPARED_DIR}/ there ({exc.strerror}); copy the "
                            f"bundle to a writable directory first") from exc
    with _exclusive(key_dir):
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=key_dir))
        staging.chmod(0o755)  # mkdtemp makes 0700: the bundle's other readers (a service user) need it too
        try:
            index = _build(bundle, info, staging, threads)
            if _stamps(bundle, info.files) != before:
                raise MegaedgeError(f"{bundle}: bundle files changed while `megaedge prepare` ran; run it again")
            index.update(bundle_digest=manifest.bundle_digest(bundle), files=info.files, verified=before)
            key = _key(create=True)
            if key is not None:
                index[SEAL_FIELD] = _seal(index, key)
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            (staging / READERS_LOCK).touch()
            generation = key_dir / f"g{time.time_ns()}-{os.getpid()}"
            os.rename(staging, generation)  # files keep their inodes and ctimes: the recorded stamps stay valid
            pointer = key_dir / f"{STAGING_PREFIX}{os.getpid()}-{CURRENT_FILE}"
            pointer.write_text(generation.name + "\n")
            os.replace(pointer, key_dir / CURRENT_FILE)  # readers see the old generation or the new one
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _collect(key_dir)
    return index


def _build(bundle: Path, info: manifest.Manifest, staging: Path, threads: int | None) -> dict:
    """Save the prepared graphs into ``staging``; the index of what was kept (each file with sha256 and stamp)."""
    import onnxruntime as ort

    index = {"machine_key": machine_key(), "onnxruntime": ort.__version__, "graphs": {}}
    from megaedge.runtime import kernels, native_decode, native_stem

    # A bundle with a native stem has two encoder graphs on one weight file; the runtime here opens one of them.
    skip = set()
    if native_stem.available(info) is None:
        stem_kernels = native_stem.select(bundle, info, "auto", cpu_only=True)
        skip.add("encoder" if stem_kernels is not None else info.encoder["native_stem"]["graph"])
    for name in PREPARED_GRAPHS:
        spec = info.graphs.get(name)
        if spec is None or name in skip:
            continue
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # never spin-wait
        if threads:
            options.intra_op_num_threads = int(threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(staging / spec.file)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         f"{spec.file}.data")
        # onnxruntime 1.31 loses the pre-packed form of initializers it keeps inline (the tiny test model's decoder
        # then computes NaN with the default 1024-byte threshold), yet shape constants must stay inline for its
        # shape inference: 64 bytes (8 int64) separates the two. _disagreement() guards against what this misses.
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "64")
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        t0 = time.perf_counter()
        original = ort.InferenceSession(str(bundle / spec.file), options, providers=["CPUExecutionProvider"])
        files = [p for p in staging.iterdir() if p.name.startswith(spec.file)]
        problem = _disagreement(original, staging / spec.file, spec, _probe_feed(info, name), threads)
        if problem:
            log.warning("prepared copy of the %s disagrees with the bundle's graph (%s); not used", name, problem)
            for path in files:
                path.unlink()
            continue
        index["graphs"][name] = {"file": spec.file, "source": _source_key(info, spec),
                                 "files": {p.name: {"sha256": manifest.sha256_file(p), "stamp": _stamp(p)}
                                           for p in files},
                                 "bytes": sum(p.stat().st_size for p in files),
                                 "seconds": round(time.perf_counter() - t0, 2)}
        log.info("prepared %s in %.1f s", name, time.perf_counter() - t0)
    if native_decode.available(info) is None:  # the decode-step kernel is per machine too: build it now
        try:
            index["native_kernel"] = kernels.load().isa
        except RuntimeError as exc:
            log.warning("native decode kernel not built (%s): decode steps stay in onnxruntime", exc)
    return index


def _probe_feed(info: manifest.Manifest, name: str) -> dict:
    """A small valid input for graph ``name``: random mel / token ids, empty KV cache."""
    import numpy as np

    rng = np.random.default_rng(0)
    spec = info.graphs[name]
    feed = {}
    for tensor in spec.inputs:
        dtype = np.dtype(tensor.dtype)
        if tensor.name == "mel":
            feed["mel"] = rng.standard_normal((1, tensor.shape[1], 200)).astype(dtype)
        elif tensor.name == "stem_features":  # what the stem makes of two chunks
            feed["stem_features"] = rng.standard_normal((2, *tensor.shape[1:])).astype(dtype)
        elif tensor.name == "valid_tokens":
            feed["valid_tokens"] = np.array([26], dtype)
        elif tensor.name == "lora_gate":
            feed["lora_gate"] = np.array([1.0], dtype)
        elif tensor.name == "input_ids":  # ids of the vocabulary (the logits' width), never the audio placeholder
            logits = next((t for t in spec.outputs if t.name == "logits"), None)
            vocab = logits.shape[-1] if logits is not None and isinstance(logits.shape[-1], int) else \
                info.decoder["vocab_size"]
            pad = info.prompt.audio_pad
            feed["input_ids"] = np.array([[t + (t >= pad) for t in rng.integers(0, max(vocab - 1, 1), 6)]], dtype)
        elif tensor.name == "audio_features":
            feed["audio_features"] = np.zeros((0, tensor.shape[1]), dtype)
        elif tensor.name == "logits_at":
            feed["logits_at"] = np.array([5], dtype)
        else:  # past keys / values: an empty cache
            feed[tensor.name] = np.zeros((1, tensor.shape[1], 0, tensor.shape[3]), dtype)
    return feed


def _disagreement(original, copy: Path, spec: manifest.GraphSpec, feed: dict, threads: int | None) -> str:
    """'' when the prepared copy computes what the original session computes on ``feed``, else what differs."""
    import numpy as np

    from megaedge.runtime.session import OrtSession

    try:
        got = OrtSession(copy, spec, ("cpu",), threads, prepared=True).run(feed, check=False)[0]
    except Exception as exc:  # a copy onnxruntime cannot load is a disagreement, whatever the exception type
        return f"it does not run: {str(exc).splitlines()[0]}"
    want = original.run(None, feed)[0]
    if not np.all(np.isfinite(got)):
        return "non-finite outputs"
    err = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return "" if err <= 1e-4 * max(scale, 1.0) else f"max abs difference {err:.3g} at output scale {scale:.3g}"


def in_use(bundle: str | Path) -> bool:
    """Whether generations of this machine's copies are still there after a remove: a running process uses them."""
    key_dir = directory(Path(bundle).expanduser())
    try:
        return any(_generation_name(child.name) and (child / READERS_LOCK).exists() for child in key_dir.iterdir())
    except OSError:
        return False


def remove(bundle: str | Path) -> tuple[bool, list[str]]:
    """Delete this machine's prepared copies: (whether there were any, the paths left in place because megaedge
    did not write them). Copies a running process still uses stay until it exits (a later prepare or remove
    deletes them); the bundle no longer uses them either way."""
    key_dir = directory(Path(bundle).expanduser())
    if not key_dir.exists():
        return False, []
    foreign: list[str] = []
    with _exclusive(key_dir):
        (key_dir / CURRENT_FILE).unlink(missing_ok=True)
        kept = _collect(key_dir, foreign)
        if not kept and not foreign:
            (key_dir / PREPARE_LOCK).unlink(missing_ok=True)  # a prepare waiting for the lock sees its file unlinked
            for folder in (key_dir, key_dir.parent):  # prepared/ too, when no other machine's copies are in it
                try:
                    folder.rmdir()
                except OSError:  # not empty: a prepare that started this instant made its lock, or other copies
                    break
    return True, foreign
