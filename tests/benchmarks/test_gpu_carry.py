"""benchmarks/gpu_carry.py: onnxruntime-gpu cut to one GPU architecture and carried to a lent machine in parts.

The fatbin cut is checked on a small ELF file built here with the layout the real library has (containers of
entries for several architectures); the real onnxruntime-gpu 1.31.1 library was checked by hand with cuobjdump
(the module's docstring)."""

import hashlib
import importlib.util
import json
import struct
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def carry():
    spec = importlib.util.spec_from_file_location("gpu_carry", ROOT / "benchmarks" / "gpu_carry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry(arch: int, payload: bytes, kind: int = 2) -> bytes:
    header = bytearray(64)
    struct.pack_into("<HHIQI", header, 0, kind, 0x101, 64, len(payload), len(payload))
    struct.pack_into("<I", header, 28, arch)
    return bytes(header) + payload


def _container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def _elf(fatbin: bytes, text: bytes = b"\x90" * 40) -> bytes:
    """A little-endian ELF64 file: a .text section, a .nv_fatbin section, the section names, section headers."""
    names = b"\0.text\0.nv_fatbin\0.shstrtab\0"
    text_at = 64
    fat_at = text_at + len(text)
    names_at = fat_at + len(fatbin)
    shoff = names_at + len(names)
    shoff += -shoff % 8
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 4, 3)

    def section(name_off, offset, size):
        return struct.pack("<IIQQQQIIQQ", name_off, 1, 0, 0, offset, size, 0, 0, 8, 0)

    sections = (bytes(64) + section(1, text_at, len(text)) + section(7, fat_at, len(fatbin))
                + section(18, names_at, len(names)))
    body = bytes(header) + text + fatbin + names
    return body + bytes(shoff - len(body)) + sections


def _payload(rng, n: int) -> bytes:
    return rng.integers(1, 256, n, dtype=np.uint8).tobytes()


def test_cut_keeps_each_container_in_place_with_only_its_entries_for_the_arch(carry):
    rng = np.random.default_rng(0)
    p80, p90, p90b, p120, p75 = (_payload(rng, n) for n in (96, 80, 48, 64, 40))
    fatbin = (_container(_entry(80, p80), _entry(90, p90), _entry(120, p120))   # several: cut to sm_90
              + _container(_entry(90, p90b))                                  # sm_90 only: as it was
              + _container(_entry(75, p75), _entry(120, p120)))              # no sm_90: left whole
    original = _elf(fatbin)
    data = bytearray(original)
    before = carry.fatbin_containers(data)
    report = carry.keep_arches(data, {90})

    assert len(data) == len(original)
    fat_at, fat_size = carry.elf_sections(original)[".nv_fatbin"]
    assert data[:fat_at] == original[:fat_at] and data[fat_at + fat_size:] == original[fat_at + fat_size:]
    after = carry.fatbin_containers(data)
    assert [c[0] for c in after] == [c[0] for c in before]  # every container where its records point
    archs = [[e[4] for e in c[3]] for c in after]
    assert archs == [[90], [90], [75, 120]]
    payload = lambda e: bytes(data[e[0] + e[1]:e[0] + e[1] + e[2]])  # noqa: E731
    assert payload(after[0][3][0]) == p90 and payload(after[1][3][0]) == p90b
    assert payload(after[2][3][0]) == p75 and payload(after[2][3][1]) == p120
    start, header_size, body, _ = after[0]
    freed = before[0][2] - body
    assert freed == 2 * 64 + len(p80) + len(p120)
    assert not any(data[start + header_size + body:start + header_size + body + freed])  # zeros, no stale code
    assert data[after[1][0]:] == original[after[1][0]:]
    assert report["left_whole"] == 1 and report["kept_bytes"] == {90: len(p90) + len(p90b)}
    assert report["cut_bytes"] == {80: len(p80), 120: len(p120)}


def test_a_layout_it_does_not_know_is_refused_and_left_alone(carry):
    rng = np.random.default_rng(1)
    bad = bytearray(_container(_entry(90, _payload(rng, 32))))
    struct.pack_into("<Q", bad, 8, 64 + 32 - 8)  # the container's size ends inside its entry
    data = bytearray(_elf(bytes(bad) + bytes(8)))
    copy = bytes(data)
    with pytest.raises(ValueError, match="entries end at"):
        carry.keep_arches(data, {90})
    assert bytes(data) == copy
    junk = bytearray(_elf(_container(_entry(90, b"x" * 8)) + b"\1" * 8))
    with pytest.raises(ValueError, match="not a fatbin container"):
        carry.fatbin_containers(junk)
    nothing = bytearray(_elf(_container(_entry(80, b"y" * 8))))
    with pytest.raises(ValueError, match="no fatbin entry for arch"):
        carry.keep_arches(nothing, {90})


def _wheel(path: Path, rng) -> dict[str, bytes]:
    library = _elf(_container(_entry(80, _payload(rng, 3000)), _entry(90, _payload(rng, 2500))))
    files = {"onnxruntime/__init__.py": b"__version__ = 'test'\n",
             "onnxruntime/capi/libonnxruntime.so.1.31.1": _payload(rng, 500),
             "onnxruntime/capi/libonnxruntime_providers_cuda.so": library,
             "onnxruntime/capi/onnxruntime_pybind11_state.so": _payload(rng, 2000),
             "onnxruntime_gpu-1.31.1.dist-info/METADATA": b"Name: onnxruntime-gpu\n"}
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return files


def _point_at(carry, monkeypatch, tmp_path):
    monkeypatch.setattr(carry, "CARRY", tmp_path / ".gpu-carry")
    monkeypatch.setattr(carry, "STASH", tmp_path / "stash")
    monkeypatch.setattr(carry, "tree_bytes", lambda: 20 * 2**20)


def _pack(carry, wheel, python):
    return carry.pack(SimpleNamespace(arch="90", wheel=str(wheel), version="x", python=python, margin_mib=2,
                                      part_mib=1.5 / 1024))


def test_parts_carried_call_by_call_unpack_to_the_cut_package(carry, monkeypatch, tmp_path, capsys):
    _point_at(carry, monkeypatch, tmp_path)
    files = _wheel(tmp_path / "ort.whl", np.random.default_rng(2))
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert _pack(carry, tmp_path / "ort.whl", here) == 0
    parts = sorted(p.name for p in carry.CARRY.iterdir())
    assert len(parts) >= 3 and all((carry.CARRY / p / "part").stat().st_size <= 1536 for p in parts)
    manifest = json.loads((carry.CARRY / "1" / "manifest.json").read_text())
    assert manifest["dropped"] == ["onnxruntime/capi/libonnxruntime.so.1.31.1"]
    assert [c["carry"] for c in manifest["calls"]] == [[f".gpu-carry/{p}"] for p in parts]

    # the device: each call brings one part; all but the last are stashed
    kept = tmp_path / "all-parts"
    (carry.CARRY).rename(kept)
    for p in parts[:-1]:
        (carry.CARRY / p).mkdir(parents=True)
        for f in ("part", "manifest.json"):
            (carry.CARRY / p / f).write_bytes((kept / p / f).read_bytes())
        assert carry.stash(None) == 0
        (carry.CARRY / p / "part").unlink()
        (carry.CARRY / p / "manifest.json").unlink()
        (carry.CARRY / p).rmdir()
    assert "still to carry: [" in capsys.readouterr().out
    into = tmp_path / "site"
    report_path = tmp_path / "carry.json"
    assert carry.unpack(SimpleNamespace(into=str(into), report=str(report_path))) == 3  # the last part is missing
    assert f"parts [{len(parts)}]" in json.loads(report_path.read_text())["error"]

    last = parts[-1]
    (carry.CARRY / last).mkdir(parents=True)
    for f in ("part", "manifest.json"):
        (carry.CARRY / last / f).write_bytes((kept / last / f).read_bytes())
    assert carry.unpack(SimpleNamespace(into=str(into), report=str(report_path))) == 0
    assert json.loads(report_path.read_text())["ok"] is True
    got = {str(p.relative_to(into)): p.read_bytes() for p in into.rglob("*") if p.is_file()}
    assert set(got) == {".gpu-carry-unpacked", "onnxruntime/__init__.py",
                        "onnxruntime/capi/libonnxruntime_providers_cuda.so",
                        "onnxruntime/capi/onnxruntime_pybind11_state.so"}
    pybind = "onnxruntime/capi/onnxruntime_pybind11_state.so"
    assert got[pybind] == files[pybind]
    assert carry.unpack(SimpleNamespace(into=str(into), report=None)) == 0  # again: replaces its own unpack
    mine = tmp_path / "mine"
    (mine / "onnxruntime").mkdir(parents=True)
    assert carry.unpack(SimpleNamespace(into=str(mine), report=str(report_path))) == 3
    assert "was not unpacked by gpu_carry.py" in json.loads(report_path.read_text())["error"]
    assert list((mine / "onnxruntime").iterdir()) == []
    cut = bytearray(files["onnxruntime/capi/libonnxruntime_providers_cuda.so"])
    carry.keep_arches(cut, {90})
    assert got["onnxruntime/capi/libonnxruntime_providers_cuda.so"] == bytes(cut)


def test_a_damaged_part_or_another_python_is_named_and_nothing_is_unpacked(carry, monkeypatch, tmp_path):
    _point_at(carry, monkeypatch, tmp_path)
    _wheel(tmp_path / "ort.whl", np.random.default_rng(3))
    into = tmp_path / "site"
    _pack(carry, tmp_path / "ort.whl", "2.7")
    report = tmp_path / "r.json"
    assert carry.unpack(SimpleNamespace(into=str(into), report=str(report))) == 3
    assert "packed for Python 2.7" in json.loads(report.read_text())["error"] and not into.exists()

    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    _pack(carry, tmp_path / "ort.whl", here)
    part = carry.CARRY / "2" / "part"
    data = bytearray(part.read_bytes())
    data[10] ^= 1
    part.write_bytes(bytes(data))
    assert carry.unpack(SimpleNamespace(into=str(into), report=str(report))) == 3
    assert "parts [2]" in json.loads(report.read_text())["error"] and not into.exists()
    manifest = json.loads((carry.CARRY / "1" / "manifest.json").read_text())
    assert hashlib.sha256(bytes(data)).hexdigest() not in manifest["parts"]


def test_a_wheel_without_cuda_code_is_refused(carry, monkeypatch, tmp_path):
    _point_at(carry, monkeypatch, tmp_path)
    with zipfile.ZipFile(tmp_path / "cpu.whl", "w") as zf:
        zf.writestr("onnxruntime/__init__.py", b"")
    with pytest.raises(SystemExit, match="not an onnxruntime-gpu wheel"):
        _pack(carry, tmp_path / "cpu.whl", "3.12")
    assert not carry.CARRY.exists()


def test_pack_replaces_only_what_an_earlier_pack_wrote(carry, monkeypatch, tmp_path):
    _point_at(carry, monkeypatch, tmp_path)
    _wheel(tmp_path / "ort.whl", np.random.default_rng(4))
    _pack(carry, tmp_path / "ort.whl", "3.12")
    first = {p.name for p in carry.CARRY.iterdir()}
    _pack(carry, tmp_path / "ort.whl", "3.12")
    assert {p.name for p in carry.CARRY.iterdir()} == first
    notes = carry.CARRY / "2" / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(SystemExit, match="notes.txt is not a file gpu_carry.py wrote"):
        _pack(carry, tmp_path / "ort.whl", "3.12")
    assert notes.read_text() == "mine" and (carry.CARRY / "1" / "part").is_file()


def test_a_cut_leaves_gaps_of_any_length_the_parser_still_walks(carry):
    """Entries whose payloads are not multiples of 8 free gaps of odd length; the next container still parses."""
    rng = np.random.default_rng(5)
    p80, p90, p90b = _payload(rng, 13), _payload(rng, 8), _payload(rng, 21)
    data = bytearray(_elf(_container(_entry(80, p80), _entry(90, p90)) + _container(_entry(90, p90b))))
    carry.keep_arches(data, {90})
    after = carry.fatbin_containers(data)
    assert [[e[4] for e in c[3]] for c in after] == [[90], [90]]
    assert bytes(data[after[1][3][0][0] + 64:][:21]) == p90b
