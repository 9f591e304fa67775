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


def test_plan_counts_one_kv_buffer_per_stream_in_whole_banks(tiny_fixed):
    """One KV buffer set per stream; a graph with a batch axis allocates them a bank of ``batch_steps`` at a time
    (runtime/fixed_kv.py), which the plan counts whole."""
    info = manifest.read(tiny_fixed)
    dec = info.decoder
    one, four = (gpu_plan.plan(tiny_fixed, 6.0, streams, batch_steps=1) for streams in (1, 4))
    per_stream = len(dec["past_names"]) * dec["kv_heads"] * dec["head_dim"] * 512 * 2
    assert fixed_kv.kv_bytes(dec) == per_stream
    assert one.kv_mib_per_stream == round(per_stream / 2**20, 1) and one.max_kv_length == 512
    mib = 2**20
    assert (one.bank_slots, one.kv_slots, four.kv_slots) == (1, 1, 4)
    kv_term = lambda p: p.total_mib - p.activations_mib  # noqa: E731 - activations grow with captured graphs
    assert abs((kv_term(four) - kv_term(one)) - 3 * per_stream / mib) < 0.2
    banked = {n: gpu_plan.plan(tiny_fixed, 6.0, n) for n in (1, 2, 3, 8, 9)}  # default batch_steps 8
    assert [(p.bank_slots, p.kv_slots) for p in banked.values()] == [(8, 1), (8, 2), (8, 4), (8, 8), (8, 16)]
    assert abs((kv_term(banked[9]) - kv_term(banked[8])) - 8 * per_stream / mib) < 0.2
    # a GPU's banks double what is held (one stream: one buffer set), the CPU's are all batch_steps wide
    assert [fixed_kv.slots_for(n, 8, "cuda") for n in (1, 2, 3, 5, 8, 9, 16, 17, 25)] == [1, 2, 4, 8, 8, 16, 16,
                                                                                        24, 32]
    assert [fixed_kv.slots_for(n, 8, "cpu") for n in (1, 8, 9)] == [8, 8, 16]
    assert [fixed_kv.slots_for(n, 1, "cuda") for n in (1, 5)] == [1, 5]
    # graphs exported before the batch axis hold one state per buffer; the option's range is capped
    assert fixed_kv.bank_slots((1, 2, 512, 16), 8) == 1 and fixed_kv.bank_slots(("batch", 2, 512, 16), 32) == 16
    small = gpu_plan.plan(tiny_fixed, (one.total_mib + 2.5 * per_stream / mib) / 1024, 1)
    assert small.max_streams == 2  # three streams would hold four buffer sets
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
