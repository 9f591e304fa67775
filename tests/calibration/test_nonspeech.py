import numpy as np
import pytest

from megaedge.calibration import nonspeech
from megaedge.errors import MegaedgeError


@pytest.fixture(scope="module")
def clips():
    return nonspeech.corpus(seed=3, durations=(0.5, 2.0))


def _dbfs(x):
    return 10 * np.log10(np.mean(np.asarray(x, np.float64) ** 2))


def test_same_seed_same_clips_bit_for_bit(clips):
    again = nonspeech.corpus(seed=3, durations=(0.5, 2.0))
    assert [c.name for c in again] == [c.name for c in clips]
    assert all(np.array_equal(a.samples, b.samples) for a, b in zip(again, clips))
    other = {c.name: c.samples for c in nonspeech.corpus(seed=4, durations=(0.5, 2.0))}
    assert not np.array_equal(other["machinery -30 dBFS 2s"], {c.name: c.samples for c in clips}["machinery -30 dBFS 2s"])


def test_every_kind_at_every_duration(clips):
    assert {c.kind for c in clips} == set(nonspeech.KINDS)
    assert len({c.name for c in clips}) == len(clips)  # names are unique
    for kind in set(nonspeech.KINDS) - {"one_sample"}:
        assert {round(c.seconds, 2) for c in clips if c.kind == kind and "alone" not in c.name} == {0.5, 2.0}, kind
    assert all(c.samples.dtype == np.float32 and np.all(np.isfinite(c.samples)) and np.abs(c.samples).max() <= 1.0
               for c in clips)


def test_levels_and_shapes_are_what_the_names_say(clips):
    by = {c.name: c.samples for c in clips}
    assert not np.any(by["digital_silence 2s"])
    assert set(np.unique(by["lsb_noise 2s"] * 32768).tolist()) == {-1.0, 0.0, 1.0}
    assert abs(_dbfs(by["noise_60dbfs 2s"]) + 60) < 0.01
    assert abs(_dbfs(by["hum 50 Hz -30 dBFS 2s"]) + 30) < 0.01
    assert abs(_dbfs(by["vehicle -10 dBFS 2s"]) + 10) < 0.01
    assert abs(_dbfs(by["tone 1 kHz -3 dBFS 2s"]) + 3) < 0.01
    assert abs(float(np.median(by["dc -0.5 2s"])) + 0.5) < 1e-4
    assert set(np.unique(by["square 100 Hz 2s"]).tolist()) == {-0.25, 0.25}
    assert by["one_sample -1"].tolist() == [-1.0]
    blips = [c for c in clips if c.name.startswith("blip") and c.name.endswith("alone")]
    assert len(blips) == len(nonspeech.BLIP_SOURCES) and all(b.samples.size == 800 for b in blips)
    placed = by["blip from clean-000 in silence 2s"]
    assert np.count_nonzero(placed) <= 800 and placed.size == 32000


def test_bad_durations_are_one_line_errors():
    with pytest.raises(MegaedgeError, match="0.05-600 s"):
        nonspeech.corpus(durations=(0.01,))
    with pytest.raises(MegaedgeError, match="0.05-600 s"):
        nonspeech.corpus(durations=())
