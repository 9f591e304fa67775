import numpy as np
import pytest

from megaedge.calibration import conditions, rooms
from megaedge.calibration.conditions import ATOMIC, NOISE_TYPES
from megaedge.errors import MegaedgeError
from tests.conftest import speechlike

SR = 16000
SEVERITIES = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("kind", NOISE_TYPES)
def test_measured_snr_within_half_a_db(kind):
    speech = speechlike(4.0, seed=1)
    for severity in SEVERITIES:
        out = conditions.additive_noise(speech, SR, severity, np.random.default_rng(7), noise_type=kind)
        noise = conditions.make_noise(kind, speech, SR, np.random.default_rng(7))
        # out = g*s + h*n: recover both gains from the output by least squares, then measure the SNR.
        (g, h), *_ = np.linalg.lstsq(np.stack([speech, noise], 1).astype(np.float64), out.astype(np.float64), rcond=None)
        measured = 10 * np.log10(np.mean((g * speech) ** 2) / np.mean((h * noise) ** 2))
        target = 30.0 - 35.0 * severity
        assert abs(measured - target) <= 0.5, (kind, severity, measured)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reverberation_rt60_from_the_impulse_response(seed):
    from pyroomacoustics.experimental.rt60 import measure_rt60

    for severity in SEVERITIES:
        info = {}
        conditions.reverberation(speechlike(1.0), SR, severity, np.random.default_rng(seed), info)
        target = 0.2 + 1.3 * severity
        assert info["rt60_s"] == pytest.approx(target)
        assert abs(info["rt60_measured_s"] - target) <= 0.2 * target, info
        room = rooms.room_impulse(np.random.default_rng(seed), SR, target, distance=2.0)
        independent = measure_rt60(room.rir, fs=SR, decay_db=20)  # pyroomacoustics' own Schroeder T20
        assert abs(independent - target) <= 0.2 * target


def test_far_field_drr_falls_with_distance():
    drr = []
    for severity in (0.0, 0.5, 1.0):
        info = {}
        conditions.far_field(speechlike(1.0), SR, severity, np.random.default_rng(3), info)
        drr.append(info["drr_db"])
        assert info["distance_m"] == pytest.approx(0.5 * 16**severity, rel=0.15)
    assert drr[0] > drr[1] > drr[2]


@pytest.mark.parametrize("severity", SEVERITIES)
def test_dropout_fraction_measured_on_the_output(severity):
    speech = speechlike(10.0, seed=4)
    out = conditions.transmission_dropout(speech, SR, severity, np.random.default_rng(5))
    frame = SR // 50
    frames = out[: out.size // frame * frame].reshape(-1, frame)
    zeroed = np.all(frames == 0, axis=1)
    repeated = np.r_[False, np.all(frames[1:] == frames[:-1], axis=1)]
    measured = float(np.mean(zeroed | repeated))
    assert abs(measured - 0.4 * severity) <= 0.02, measured


@pytest.mark.parametrize("name", list(ATOMIC))
def test_outputs_finite_bounded_and_deterministic(name):
    speech = speechlike(3.0, seed=6)
    for severity in SEVERITIES:
        a = ATOMIC[name](speech, SR, severity, np.random.default_rng(11))
        b = ATOMIC[name](speech, SR, severity, np.random.default_rng(11))
        c = ATOMIC[name](speech, SR, severity, np.random.default_rng(12))
        assert a.dtype == np.float32 and a.shape == speech.shape
        assert np.isfinite(a).all() and np.max(np.abs(a)) <= 1.0
        assert a.tobytes() == b.tobytes()
        if severity > 0 or name in ("noise", "far_field", "reverberation", "recording", "distortion"):
            assert a.tobytes() != c.tobytes(), (name, severity)


def test_severity_out_of_range_is_refused():
    for bad in (-0.1, 1.5):
        with pytest.raises(MegaedgeError, match=r"outside \[0, 1\]"):
            conditions.obstruction(speechlike(0.5), SR, bad, np.random.default_rng(0))
