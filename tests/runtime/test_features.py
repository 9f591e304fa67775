import numpy as np
import pytest

from megaedge.runtime import features
from tests.conftest import speechlike


@pytest.mark.parametrize("seconds", [0.1, 0.3, 0.5, 1.0, 7.9, 8.1, 17.0])
def test_asr_log_mel_matches_transformers(seconds):
    from transformers import Qwen3ASRFeatureExtractor

    x = speechlike(seconds, seed=int(seconds * 10))
    ref = Qwen3ASRFeatureExtractor()(x, sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="np")
    ours = features.asr_log_mel(x)
    assert ours.mel.shape == ref["input_features"][0].shape
    assert ours.valid_frames == int(ref["attention_mask"].sum())
    assert np.abs(ours.mel - ref["input_features"][0]).max() < 1e-4  # float32 log10 rounding; a real mismatch is >1e-2


@pytest.mark.parametrize("frames", [1, 7, 50, 99, 100, 101, 250, 800, 801, 4567])
def test_audio_token_count_matches_transformers(frames):
    import torch
    from transformers.models.qwen3_asr.modeling_qwen3_asr import _get_feat_extract_output_lengths

    assert features.audio_token_count(frames) == int(_get_feat_extract_output_lengths(torch.tensor(frames)))


def test_router_log_mel_matches_torch_stft():
    import torch
    from transformers.audio_utils import mel_filter_bank

    x = speechlike(2.3, seed=3)
    filters = mel_filter_bank(num_frequency_bins=201, num_mel_filters=80, min_frequency=0.0, max_frequency=8000.0,
                              sampling_rate=16000, norm="slaney", mel_scale="slaney")
    power = torch.stft(torch.from_numpy(x), 400, 160, window=torch.hann_window(400), return_complex=True).abs() ** 2
    ref = (torch.clamp(torch.from_numpy(filters).T.float() @ power, min=1e-10).log10() + 4) / 4
    ours = features.router_log_mel(x)
    assert ours.shape == tuple(ref.shape) == (80, 1 + len(x) // 160)
    assert np.abs(ours - ref.numpy()).max() < 1e-4  # float32 log10 rounding; a real mismatch is >1e-2


def test_long_input_is_processed_in_blocks_identically():
    x = speechlike(50.0, seed=5)
    whole = features.power_mel(x, 80)
    original = features._STFT_BLOCK_FRAMES
    try:
        features._STFT_BLOCK_FRAMES = 333
        blocked = features.power_mel(x, 80)
    finally:
        features._STFT_BLOCK_FRAMES = original
    np.testing.assert_array_equal(whole, blocked)


@pytest.mark.parametrize("frames", [0, 1, 7, 500])
def test_the_sparse_mel_product_is_the_dense_one_bit_for_bit(frames):
    """The mel bands are summed from the filters' non-zero weights (no BLAS call): the same float32 features as the
    dense float64 product they replace, for the ASR and the router filter banks."""
    from megaedge.runtime import features as f

    rng = np.random.default_rng(frames)
    for n_mels in (f.ASR_MEL_BINS, f.ROUTER_MEL_BINS):
        windowed = rng.standard_normal((frames, f.N_FFT)).astype(np.float32) * f._hann(f.N_FFT)
        spec = np.fft.rfft(windowed, n=f.N_FFT, axis=-1)
        dense = ((spec.real**2 + spec.imag**2) @ f.mel_filters(n_mels).astype(np.float64)).T.astype(np.float32)
        assert np.array_equal(f._mel_power(windowed, n_mels), dense)
