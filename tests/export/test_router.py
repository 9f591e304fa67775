import pickle

import numpy as np
import pytest
import torch

from megaedge.errors import CheckpointError
from megaedge.export import layout
from megaedge.export.router import RouterConfig, build_router, load_router, router_probabilities, save_router, score
from megaedge.runtime import features, routing
from tests.conftest import speechlike


@pytest.fixture(scope="module")
def router(tiny_mega):
    model, _ = load_router(tiny_mega / layout.ROUTER_DIR_NAME / layout.ROUTER_FILE_NAME)
    return model


@pytest.mark.parametrize("seconds", [0.5, 33.9, 34.0, 40.0, 600.0])
def test_any_length_gives_a_probability(router, seconds):
    decision = score(router, speechlike(seconds, seed=2))
    assert 0.0 <= decision.degraded_prob <= 1.0
    assert all(0.0 <= p <= 1.0 for p in decision.window_probs)
    assert decision.window_bounds[0][0] == 0 and decision.window_bounds[-1][1] == int(seconds * 16000)


def test_single_pass_up_to_the_position_table_and_windows_beyond(router):
    rows = router.config.position_rows
    assert routing.windows(routing.max_router_samples(rows), rows) == [(0, routing.max_router_samples(rows))]
    assert len(routing.windows(34 * 16000, rows)) == 2
    assert all(end - start <= 30 * 16000 for start, end in routing.windows(600 * 16000, rows))
    # one window = exactly the plain forward pass (what upstream computes for < 34 s)
    x = speechlike(33.9, seed=4)
    with torch.no_grad():
        logits = router(torch.from_numpy(features.router_log_mel(x).T[None].copy()))
    assert router_probabilities(router, x) == [pytest.approx(float(torch.softmax(logits, -1)[0, 1]), abs=1e-7)]


def test_files_and_arrays_give_the_same_decision(router, tmp_path):
    import soundfile as sf

    x = speechlike(36.0, seed=12)
    sf.write(tmp_path / "clip.flac", x, 16000, subtype="PCM_24")
    from_file, from_array = score(router, tmp_path / "clip.flac"), score(router, x)
    assert from_file.window_bounds == from_array.window_bounds and len(from_file.window_bounds) == 2
    assert abs(from_file.degraded_prob - from_array.degraded_prob) < 1e-4


def test_release_geometry_has_the_published_size():
    model = build_router(RouterConfig())
    assert 0.9e6 < sum(p.numel() for p in model.parameters()) < 1.0e6
    assert model.pos_encoder.pe.shape == (1, 850, 256)


def test_save_load_roundtrip_keeps_config_and_outputs(router, tmp_path):
    path = tmp_path / "r.safetensors"
    save_router(router, path)
    again, config = load_router(path)
    assert config == router.config
    x = speechlike(3.0, seed=9)
    assert router_probabilities(again, x) == router_probabilities(router, x)


def test_pickle_router_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "best_acc_model.safetensors"
    path.write_bytes(pickle.dumps({"model_state_dict": {}}))
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_router(path)
    zipped = tmp_path / "best_acc_model.pt"
    torch.save({"x": torch.zeros(1)}, zipped)
    with pytest.raises(CheckpointError, match="pickle"):
        load_router(zipped)


def test_wrong_architecture_router_is_named(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": np.zeros((2, 2), dtype=np.float32)}, str(path))
    with pytest.raises(CheckpointError, match="not an AudioQualityRouter checkpoint"):
        load_router(path)
