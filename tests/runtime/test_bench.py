"""``megaedge bench``: the smoke run on a real bundle, the bandwidth arithmetic, and bad options."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megaedge.runtime import bench, manifest
from tests.conftest import run_cli


def test_bench_smoke_on_the_fixture(fixture_bundles, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", str(fixture_bundles["routed"]), "--audio", "2,5", "--repeat", "2", "--warmup", "1",
                   "--tokens", "6", "--json", str(out), "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    assert "decode tok/s" in proc.stdout and "% of read bound" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"2s", "5s"}
    run = report["runs"]["5s"]
    assert run["generated_tokens"] == 6  # forced: EOS ignored
    for stage in (*bench.STAGES, "first_token", "total"):
        assert run[stage]["median"] >= 0 and run[stage]["p95"] >= run[stage]["median"] - 1e-9
    assert run["encoder"]["median"] > 0 and run["router"]["median"] > 0  # routed bundle: the router ran
    assert 0 < run["decode_percent_of_bound"] < 1000
    assert 0 < run["decode_percent_of_read_bound"] < 1000 and report["read_bandwidth_gbps"] > 0
    assert report["copy_bandwidth_gbps"] > 0 and report["peak_rss_mib"] > 0
    # the bounds are the higher of the figures measured before and after the timed runs
    assert report["copy_bandwidth_gbps"] == max(report["copy_bandwidth_before_after_gbps"])
    assert report["read_bandwidth_gbps"] == max(report["read_bandwidth_before_after_gbps"])
    assert len(report["read_bandwidth_before_after_gbps"]) == 2
    bound = report["read_bandwidth_gbps"] * 1e9 / run["decode_bytes_per_token"]
    assert abs(run["decode_percent_of_read_bound"] - 100 * run["tokens_per_s"]["median"] / bound) < 0.2
    assert report["precision"] == "fp32" and report["versions"]["onnxruntime"]
    device = report["device"]
    assert device["model"] and isinstance(device["int8_features"], list) and device["threads"] == 2
    assert device["model"] in proc.stdout  # the printed table names the CPU that made the figures


def test_bound_arithmetic(fixture_bundles):
    info = manifest.read(fixture_bundles["merged"])
    dec = info.decoder
    per_position = len(dec["past_names"]) * dec["kv_heads"] * dec["head_dim"] * 4
    assert bench.kv_bytes_per_token(info, 10) == 10 * per_position
    weights = bench.decoder_bytes(fixture_bundles["merged"], info)
    assert weights == (fixture_bundles["merged"] / manifest.DECODER_FILE).stat().st_size
    assert bench.copy_bandwidth(mib=16, threads=2, rounds=2) > 0.1
    assert bench.read_bandwidth(mib=16, rounds=2) > 0.1
    audio = bench.speech_like_audio(1.5)
    assert audio.shape == (24000,) and np.abs(audio).max() < 1


def test_shipped_probe_graphs_are_the_built_ones():
    from megaedge.runtime import device_bandwidth
    from tests.runtime.probe_graphs import build

    for name, data in build().items():
        assert (device_bandwidth.PROBE_DIR / name).read_bytes() == data, "rebuild with python -m tests.runtime.probe_graphs"


def test_device_bandwidth_slope_and_cpu_probe():
    from megaedge.runtime import device_bandwidth

    # 1 GB more costs 1 ms more: 1000 GB/s, whatever the fixed cost of a call (here 1 ms)
    assert abs(device_bandwidth._slope((10**9, 2 * 10**9), (0.002, 0.003)) - 1000) < 1e-6
    assert device_bandwidth._slope((10**9, 2 * 10**9), (0.007, 0.007)) == 2 * 10**9 / 0.007 / 1e9  # noise guard
    # a fixed cost of 4 ms in a 7 ms call at the larger size: noise, not a 333 GB/s memory; the plain rate instead
    assert device_bandwidth._slope((10**9, 2 * 10**9), (0.0055, 0.007)) == 2 * 10**9 / 0.007 / 1e9
    assert abs(device_bandwidth._slope((10**9, 2 * 10**9), (0.0045, 0.007)) - 400) < 1e-6  # 2 ms fixed: kept
    copy, read = device_bandwidth.device_bandwidths("cpu", mib=32, rounds=3)
    assert 0.1 < copy < 5000 and 0.1 < read < 5000
    with pytest.raises(ValueError, match="not one of"):
        device_bandwidth.device_bandwidths("tpu")


def test_bounds_fall_back_to_host_memory_when_the_gpu_probe_cannot_run(monkeypatch, caplog):
    from megaedge.runtime import device_bandwidth

    def no_cuda(device, mib):
        raise RuntimeError("CUDA allocator not found")

    monkeypatch.setattr(device_bandwidth, "device_bandwidths", no_cuda)
    with caplog.at_level("WARNING", logger="megaedge.runtime.bench"):
        bounds = bench.BandwidthBounds(mib=16, threads=2, device="cuda")
        bounds.measure()
    assert bounds.device == "cpu" and len(bounds.copies) == len(bounds.reads) == 2 and bounds.read > 0.1
    assert "cannot measure cuda memory" in caplog.text


def test_gpu_facts_come_from_one_nvidia_smi_query(monkeypatch, tmp_path):
    from megaedge.runtime import machine, tensorrt

    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\ncase "$1" in\n'
                    '  --query-gpu=name) echo "NVIDIA H100 80GB HBM3" ;;\n'
                    '  --query-gpu=memory.used) echo "5677" ;;\n'
                    '  --query-gpu=name,compute_cap) echo "NVIDIA H100 80GB HBM3, 9.0" ;;\n'
                    'esac\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert machine.gpu_name() == "NVIDIA H100 80GB HBM3"
    assert bench.gpu_memory_mib() == 5677.0
    assert tensorrt.gpu_identity() == ("NVIDIA H100 80GB HBM3", "9.0")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert machine.nvidia_smi("name") is None and bench.gpu_memory_mib() is None
    assert tensorrt.gpu_identity() == ("unknown", "unknown")


def test_gpu_name_from_a_jetson_device_tree(monkeypatch, tmp_path):
    import shutil

    from megaedge.runtime import machine

    monkeypatch.setattr(shutil, "which", lambda _: None)  # JetPack images have no nvidia-smi
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    assert machine.gpu_name(model) == "NVIDIA Jetson Orin Nano Developer Kit"
    model.write_bytes(b"Raspberry Pi 5 Model B\x00")
    assert machine.gpu_name(model) is None
    assert machine.gpu_name(tmp_path / "missing") is None


def test_bench_bad_options(fixture_bundles):
    for args in (["--audio", "ten"], ["--audio", "0"], ["--repeat", "0"]):
        proc = run_cli("bench", str(fixture_bundles["merged"]), *args)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)


def test_cpu_facts_read_model_and_int8_features(monkeypatch, tmp_path):
    from megaedge.runtime import machine

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse2 avx2 avx512f "
                       "avx512_vnni amx_int8\n\nprocessor\t: 1\nmodel name\t: Example CPU 9000\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path,
                                                                          *a, **k))
    facts = machine.cpu_facts()
    assert facts["model"] == "Example CPU 9000"
    assert facts["int8_features"] == ["avx2", "avx512f", "avx512_vnni", "amx_int8"]
    assert facts["int8_note"].startswith("VNNI present")
    cpuinfo.write_text("model name\t: Old CPU\nflags\t\t: fpu sse2 avx2\n")
    assert machine.cpu_facts()["int8_note"].startswith("no VNNI")
