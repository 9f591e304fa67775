"""``megaedge plan`` for fixed-KV bundles (runtime/gpu_plan.py): weights + one fixed KV buffer per stream +
activations + the CUDA context against a board's usable memory."""

from __future__ import annotations

import json

import pytest

from megaedge.runtime import fixed_kv, gpu_plan, manifest
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def tiny_fixed(tiny_mega, tmp_path_factory):
    from megaedge.export.bundle import ExportOptions, export_bundle

    return export_bundle(tiny_mega, tmp_path_factory.mktemp("plan") / "fixed",
                         ExportOptions(target="cuda", precision="fp16", max_kv_length=512, validate=False))


def test_plan_counts_one_kv_buffer_per_stream(tiny_fixed):
    info = manifest.read(tiny_fixed)
    dec = info.decoder
    one, four = (gpu_plan.plan(tiny_fixed, 6.0, streams) for streams in (1, 4))
    per_stream = len(dec["past_names"]) * dec["kv_heads"] * dec["head_dim"] * 512 * 2
    assert fixed_kv.kv_bytes(dec) == per_stream
    assert one.kv_mib_per_stream == round(per_stream / 2**20, 1) and one.max_kv_length == 512
    assert four.total_mib - one.total_mib >= 3 * per_stream / 2**20 - 0.2
    weights = sum((tiny_fixed / f).stat().st_size for name, spec in info.graphs.items() if name != "vad"
                  for f in (spec.file, *spec.data_files))
    assert one.weights_mib == round(weights / 2**20, 1) and one.fits
    tight = gpu_plan.plan(tiny_fixed, (one.total_mib - 1) / 1024, 1)
    assert not tight.fits and tight.max_streams == 0


def test_plan_cli_names_the_jetson_boards(tiny_fixed):
    from megaedge.cli import plan as cli_plan

    assert set(cli_plan.DEVICE_NAMES) == set(gpu_plan.DEVICES)
    proc = run_cli("plan", str(tiny_fixed), "--device", "orin-nano-4gb", "--streams", "2")
    assert proc.returncode == 0, proc.stderr
    assert "fixed KV of 512 positions" in proc.stdout and "2 stream(s)" in proc.stdout and "fits" in proc.stdout
    proc = run_cli("plan", str(tiny_fixed), "--memory", "3GB", "--json")
    assert json.loads(proc.stdout)["budget_mib"] == 3072
    proc = run_cli("plan", str(tiny_fixed), "--device", "orin-nano-2gb")
    assert proc.returncode == 1 and "orin-agx-64gb" in proc.stderr and proc.stderr.count("\n") == 1
    proc = run_cli("plan", str(tiny_fixed), "--streams", "0")
    assert proc.returncode != 0 and "streams" in proc.stderr
