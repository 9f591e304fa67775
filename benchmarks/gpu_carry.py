"""onnxruntime-gpu for a lent GPU machine that has no registry and takes at most 64 MiB per call.

The device image ships CPU onnxruntime only, and the onnxruntime-gpu wheel is ~250 MB: its CUDA provider library
holds the kernels' machine code for six GPU generations (sm_75 ... sm_120). A lent H100 / H200 runs only the sm_90
code, so ``pack`` cuts every fatbin container of that library to its entries for the kept architectures (each
container stays at its offset, so the library's registration records still point at it), drops the C API
library the Python module does not load, compresses the package (xz) and splits it into parts that each fit one
call beside the working tree. ``stash`` (on the device) copies the part a call carried to a folder that outlives
the call; ``unpack`` checks every part's digest, joins them and extracts the package, which then goes first on
PYTHONPATH (benchmarks/gpu_check.sh does this when ``.gpu-carry`` is there, and puts the image's nvidia-* pip
libraries on LD_LIBRARY_PATH). Checked here on onnxruntime-gpu 1.31.1: cuobjdump reads the cut library and the
600 sm_90a images it extracts are byte for byte those of the original.

    python benchmarks/gpu_carry.py pack [--version 1.31.1] [--python 3.12] [--arch 90]     # here: .gpu-carry/1..N
    python3 benchmarks/gpu_carry.py stash                                                   # device, call k
    python3 benchmarks/gpu_carry.py unpack --into DIR [--report JSON]                       # device, last call

Standard library only: the device runs it with whatever python3 its image has.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu-carry"
STASH = Path(os.environ.get("MEGAEDGE_CARRY_STASH", "/tmp/megaedge-carry"))
CALL_LIMIT = 64 * 2**20  # what one device call carries: working tree + carried paths
FATBIN_MAGIC = 0xBA55ED50
ARCHIVE = "onnxruntime-gpu.tar.xz"


# ------------------------------------------------------------------------------------------------- fatbins
def elf_sections(data: bytes | bytearray) -> dict[str, tuple[int, int]]:
    """Section name -> (file offset, size) of a little-endian ELF64 file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    out = {}
    for name_off, _, _, _, offset, size, *_ in headers:
        start = names_at + name_off
        out[bytes(data[start:data.index(b"\0", start)]).decode()] = (offset, size)
    return out


def fatbin_containers(data: bytes | bytearray):
    """(offset, header size, body size, entries) of every fatbin container in ``.nv_fatbin``; an entry is
    (offset, header size, payload size, kind, arch).

    A container: a 16-byte header (magic, version, header size, size of the entries that follow), then entries,
    each a header (kind at 0: 1 PTX, 2 ELF; its own size at 4; payload size at 8; arch at 28, e.g. 90 for sm_90
    and sm_90a) and its payload. The walk must end exactly at each container's end, else the layout is not the
    one this reads (ValueError, nothing changed). Zero bytes between containers (what ``keep_arches`` leaves)
    are skipped."""
    sections = elf_sections(data)
    if ".nv_fatbin" not in sections:
        return []
    offset, size = sections[".nv_fatbin"]
    pos, end, containers = offset, offset + size, []
    while pos < end:
        magic, _version, header_size, body = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            if data[pos]:
                raise ValueError(f"unexpected bytes at {pos:#x} in .nv_fatbin: not a fatbin container")
            pos += 1  # zeros: alignment, or what a cut container freed (any length)
            continue
        entry, container_end, entries = pos + header_size, pos + header_size + body, []
        while entry < container_end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch, = struct.unpack_from("<I", data, entry + 28)
            if entry_header < 32:
                raise ValueError(f"fatbin entry at {entry:#x} has a {entry_header}-byte header")
            entries.append((entry, entry_header, payload, kind, arch))
            entry += entry_header + payload
        if entry != container_end:
            raise ValueError(f"fatbin container at {pos:#x}: entries end at {entry:#x}, not {container_end:#x}")
        containers.append((pos, header_size, body, entries))
        pos = container_end
    return containers


def keep_arches(data: bytearray, keep: set[int]) -> dict:
    """Cut every fatbin container of ``data`` to its entries for ``keep``, in place; what was kept and cut.

    A container keeps its offset (the library's registration records point at it): its kept entries move up
    behind its header, its size field shrinks to them, and the bytes freed after it become zeros (which compress
    to nothing). The driver reads a container from its header alone, so it sees a fatbin of the kept entries;
    one with no entry for ``keep`` (code for other GPUs only) stays whole, as unusable on this GPU as before."""
    containers = fatbin_containers(data)
    kept, cut, whole = Counter(), Counter(), 0
    for pos, header_size, body, entries in containers:
        keeping = [e for e in entries if e[4] in keep]
        if not keeping:
            whole += 1
            continue
        blob = b"".join(bytes(data[e[0]:e[0] + e[1] + e[2]]) for e in keeping)
        start = pos + header_size
        data[start:start + body] = blob + bytes(body - len(blob))
        struct.pack_into("<Q", data, pos + 8, len(blob))
        for e in entries:
            (kept if e in keeping else cut)[e[4]] += e[2]
    if containers and not kept:
        raise ValueError(f"no fatbin entry for arch {sorted(keep)} in any container")
    return {"containers": len(containers), "left_whole": whole, "kept_bytes": dict(kept), "cut_bytes": dict(cut)}


# ------------------------------------------------------------------------------------------------- pack
def tree_bytes() -> int:
    """Bytes of what every device call sends besides the carried paths: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    return sum((REPO / p).stat().st_size for p in out.decode().split("\0") if p and (REPO / p).is_file())


def download(version: str, python: str, dest: Path) -> Path:
    tag = python.replace(".", "")
    subprocess.run([sys.executable, "-m", "pip", "download", f"onnxruntime-gpu=={version}", "--no-deps",
                    "--only-binary=:all:", "--python-version", tag, "--platform", "manylinux_2_28_x86_64",
                    "-d", str(dest)], check=True)
    wheels = sorted(dest.glob(f"onnxruntime_gpu-{version}-cp{tag}-*.whl"))
    if not wheels:
        raise SystemExit(f"error: pip saved no onnxruntime-gpu {version} wheel for Python {python} in {dest}")
    return wheels[0]


def package_tar(wheel: Path, keep: set[int]) -> tuple[bytes, dict]:
    """The wheel's ``onnxruntime/`` package as a tar, its CUDA code cut to ``keep``; and what was done."""
    done = {"wheel": wheel.name, "dropped": [], "libraries": {}}
    buffer = io.BytesIO()
    with zipfile.ZipFile(wheel) as zf, tarfile.open(fileobj=buffer, mode="w") as tar:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            name = info.filename
            if not name.startswith("onnxruntime/") or name.endswith("/"):
                continue
            if Path(name).name.startswith("libonnxruntime.so"):  # the C API library: the Python module is whole
                done["dropped"].append(name)
                continue
            data = bytearray(zf.read(info))
            if data[:4] == b"\x7fELF" and fatbin_containers(data):
                done["libraries"][name] = keep_arches(data, keep)
            member = tarfile.TarInfo(name)
            member.size, member.mode = len(data), (info.external_attr >> 16) & 0o777 or 0o644
            tar.addfile(member, io.BytesIO(bytes(data)))
    if not done["libraries"]:
        raise SystemExit(f"error: {wheel.name} has no library with CUDA code: not an onnxruntime-gpu wheel")
    return buffer.getvalue(), done


def _clear_earlier_pack() -> None:
    """Remove what an earlier ``pack`` wrote (K/part, K/manifest.json); anything else there stops the pack."""
    if not CARRY.exists():
        return
    ours = [p for p in CARRY.glob("*/*") if p.parent.name.isdigit() and p.name in ("part", "manifest.json")]
    others = sorted(set(CARRY.rglob("*")) - set(ours) - {p.parent for p in ours})
    if others:
        raise SystemExit(f"error: {others[0]} is not a file gpu_carry.py wrote; move it out of {CARRY} first")
    for path in ours:
        path.unlink()
    for folder in {p.parent for p in ours}:
        folder.rmdir()


def pack(args) -> int:
    keep = {int(a) for a in args.arch.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(args.wheel) if args.wheel else download(args.version, args.python, Path(tmp))
        print(f"packing {wheel.name}, keeping the code of sm_{'/'.join(map(str, sorted(keep)))}")
        raw, done = package_tar(wheel, keep)
    archive = lzma.compress(raw, preset=9)
    tree = tree_bytes()
    room = CALL_LIMIT - tree - args.margin_mib * 2**20
    if args.part_mib:
        room = min(room, int(args.part_mib * 2**20))
    if room < 2**10:
        raise SystemExit(f"error: the working tree is {tree / 2**20:.1f} MiB, leaving {room / 2**20:.1f} MiB of a "
                         f"call's 64 MiB for the carry; make the tree smaller")
    parts = -(-len(archive) // room)
    size = -(-len(archive) // parts)
    _clear_earlier_pack()
    digests = []
    for k in range(parts):
        chunk = archive[k * size:(k + 1) * size]
        (CARRY / str(k + 1)).mkdir(parents=True)
        (CARRY / str(k + 1) / "part").write_bytes(chunk)
        digests.append(hashlib.sha256(chunk).hexdigest())
    manifest = {"archive": ARCHIVE, "sha256": hashlib.sha256(archive).hexdigest(), "bytes": len(archive),
                "tar_bytes": len(raw), "parts": digests, "python": args.python, "arch": sorted(keep),
                "tree_bytes_at_pack": tree, **done,
                "calls": [{"carry": [f".gpu-carry/{k + 1}"],
                           "command": "bash benchmarks/gpu_check.sh prepare" if k + 1 < parts else
                           "OUT=$OUT bash benchmarks/gpu_check.sh"} for k in range(parts)]}
    for k in range(parts):
        (CARRY / str(k + 1) / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(json.dumps({key: manifest[key] for key in ("bytes", "tar_bytes", "parts", "libraries", "dropped")},
                     indent=1))
    print(f"{parts} part(s) of <= {size / 2**20:.1f} MiB beside a {tree / 2**20:.1f} MiB tree; device calls, "
          "back to back (a machine goes back after its idle wait):")
    for call in manifest["calls"]:
        print(f"  carry {call['carry']}: {call['command']}")
    return 0


# ------------------------------------------------------------------------------------------------- device side
def _manifest(where: list[Path]) -> dict | None:
    for folder in where:
        for path in sorted(folder.glob("*/manifest.json")) + sorted(folder.glob("manifest.json")):
            return json.loads(path.read_text())
    return None


def _part_file(k: int, where: list[Path]) -> Path | None:
    for folder in where:
        for path in (folder / str(k) / "part", folder / f"part-{k}"):
            if path.is_file():
                return path
    return None


def nvidia_lib_dirs() -> list[str]:
    """Folders of the CUDA / cuDNN libraries that pip packages (``nvidia-*``, brought by CUDA torch) put under
    ``site-packages/nvidia``: onnxruntime-gpu's CUDA provider links against them by name."""
    found = []
    for entry in sys.path:
        root = Path(entry or ".") / "nvidia"
        if root.is_dir():
            found += sorted({str(p.parent) for p in root.glob("**/lib/lib*.so*")})
    return list(dict.fromkeys(found))


def libpath(args) -> int:
    print(":".join(nvidia_lib_dirs()))
    return 0


def stash(args) -> int:
    manifest = _manifest([CARRY])
    if manifest is None:
        raise SystemExit("error: no .gpu-carry/*/manifest.json here: carry a part made by `gpu_carry.py pack`")
    STASH.mkdir(parents=True, exist_ok=True)
    (STASH / "manifest.json").write_text(json.dumps(manifest))
    have = []
    for k, digest in enumerate(manifest["parts"], 1):
        src = _part_file(k, [CARRY])
        if src is not None and hashlib.sha256(src.read_bytes()).hexdigest() == digest:
            shutil.copyfile(src, STASH / f"part-{k}")
        kept = _part_file(k, [STASH])
        if kept is not None and hashlib.sha256(kept.read_bytes()).hexdigest() == digest:  # not an earlier pack's
            have.append(k)
    missing = [k for k in range(1, len(manifest["parts"]) + 1) if k not in have]
    print(f"stash {STASH}: parts {have} of {len(manifest['parts'])}; still to carry: {missing or 'none'}")
    return 0


def unpack(args) -> int:
    where = [CARRY, STASH]
    manifest = _manifest(where)
    report = {"ok": False, "into": str(args.into)}
    try:
        if manifest is None:
            raise RuntimeError("no manifest in .gpu-carry or the stash: nothing was carried")
        report.update(python=manifest["python"], arch=manifest["arch"], wheel=manifest["wheel"])
        chunks, bad = [], []
        for k, digest in enumerate(manifest["parts"], 1):
            path = _part_file(k, where)
            data = path.read_bytes() if path else b""
            if hashlib.sha256(data).hexdigest() != digest:
                bad.append(k)
            chunks.append(data)
        if bad:
            raise RuntimeError(f"parts {bad} of {len(manifest['parts'])} missing or damaged: carry them "
                               "(.gpu-carry/K), with `bash benchmarks/gpu_check.sh prepare` in every call but the last")
        archive = b"".join(chunks)
        if hashlib.sha256(archive).hexdigest() != manifest["sha256"]:
            raise RuntimeError("the joined parts do not give the packed archive")
        if sys.version_info[:2] != tuple(int(x) for x in manifest["python"].split(".")):
            raise RuntimeError(f"packed for Python {manifest['python']}, this is {sys.version.split()[0]}: pack "
                               f"again with --python {sys.version_info[0]}.{sys.version_info[1]}")
        into = Path(args.into)
        mark = into / ".gpu-carry-unpacked"
        if (into / "onnxruntime").exists():
            if not mark.is_file():
                raise RuntimeError(f"{into / 'onnxruntime'} is there and was not unpacked by gpu_carry.py: "
                                   "unpack into another folder")
            shutil.rmtree(into / "onnxruntime")  # an earlier unpack into this folder
        into.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(lzma.decompress(archive))) as tar:
            tar.extractall(into, filter="data")
        mark.write_text(manifest["sha256"] + "\n")
        report["ok"] = True
        report["nvidia_lib_dirs"] = nvidia_lib_dirs()
    except RuntimeError as exc:
        report["error"] = str(exc)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0 if report["ok"] else 3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: download, cut to one GPU architecture, split into .gpu-carry/1..N")
    p.add_argument("--version", default="1.31.1", help="onnxruntime-gpu version (a CUDA 13 build for the image)")
    p.add_argument("--python", default="3.12", help="the device's Python, MAJOR.MINOR")
    p.add_argument("--arch", default="90", help="GPU architectures to keep, comma-separated (90: H100, H200)")
    p.add_argument("--wheel", help="a downloaded onnxruntime-gpu wheel instead of pip download")
    p.add_argument("--margin-mib", type=int, default=2, help="room left in each call beside tree and part")
    p.add_argument("--part-mib", type=float, help="parts at most this large (default: what fits beside the tree)")
    sub.add_parser("stash", help=f"device: keep this call's part in {STASH} (MEGAEDGE_CARRY_STASH)")
    u = sub.add_parser("unpack", help="device: check, join and extract the parts into DIR")
    u.add_argument("--into", required=True)
    u.add_argument("--report", help="write what was done (or why not) as JSON here")
    sub.add_parser("libpath", help="device: the nvidia-* pip packages' library folders, for LD_LIBRARY_PATH")
    args = parser.parse_args(argv)
    return {"pack": pack, "stash": stash, "unpack": unpack, "libpath": libpath}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
