"""The fixed-KV decoder at the 0.6B geometry (random weights): the same greedy tokens as the growing-cache graph.
Slow: two 0.6B exports on a small CPU take minutes (measured on 2 cores: see docs/device.md)."""

from __future__ import annotations

import pytest

from tests.conftest import speechlike

pytestmark = pytest.mark.slow


def test_fixed_kv_equals_growing_at_0_6b(tmp_path_factory):
    from megaedge.export.bundle import ExportOptions, export_bundle
    from megaedge.export.factory import write_checkpoint
    from megaedge.runtime.transcriber import Transcriber

    root = tmp_path_factory.mktemp("geometry")
    checkpoint = write_checkpoint(root / "ckpt", geometry="0.6b", layout_name="mega", seed=0)
    growing = export_bundle(checkpoint, root / "growing", ExportOptions(validate=False, include_router=False))
    fixed = export_bundle(checkpoint, root / "fixed", ExportOptions(target="cuda", include_router=False))
    a, b = Transcriber.from_bundle(growing), Transcriber.from_bundle(fixed)
    for seed, seconds in ((0, 3.0), (1, 9.0)):
        samples = speechlike(seconds, seed=seed)
        want = a.transcribe(samples, segment_seconds=None, max_new_tokens=24, ignore_eos=True).token_ids
        got = b.transcribe(samples, segment_seconds=None, max_new_tokens=24, ignore_eos=True).token_ids
        assert len(want) == 24 and got == want
