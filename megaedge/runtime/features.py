"""Log-mel front-ends in numpy, bit-for-bit in spirit with the torch references.

* ``asr_log_mel``: Qwen3-ASR's 128-bin front-end (transformers' Qwen3ASRFeatureExtractor): centred reflect-padded
  STFT (n_fft 400, hop 160, periodic Hann), power spectrum, Slaney mel 0-8000 Hz, last frame dropped,
  log10(clamp 1e-10), floor at (max - 8), (x + 4) / 4. Clips shorter than 0.5 s are zero-padded to 0.5 s first.
* ``router_log_mel``: the audio-quality router's 80-bin front-end (torchaudio MelSpectrogram, Slaney scale and norm):
  same STFT, all frames kept, log10(clamp 1e-10), (x + 4) / 4, no floor.

Tests compare both against transformers / torch on the same audio.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
ASR_MEL_BINS = 128
ROUTER_MEL_BINS = 80
ASR_MIN_SAMPLES = 8000
CHUNK_FRAMES = 100  # encoder conv chunk: n_window * 2
TOKENS_PER_FULL_CHUNK = 13
# Frames are computed in blocks so a long file never materialises a (frames x n_fft) matrix at once.
_STFT_BLOCK_FRAMES = 4096


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3.0
    mels = hz / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_region = hz >= min_log_hz
    mels = np.where(log_region, min_log_mel + np.log(np.maximum(hz, 1e-12) / min_log_hz) / logstep, mels)
    return mels


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3.0
    freqs = f_sp * mels
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), freqs)


@lru_cache(maxsize=8)
def mel_filters(n_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE, f_max: float = 8000.0) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters, shape (n_fft // 2 + 1, n_mels)."""
    n_freqs = n_fft // 2 + 1
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_freqs)
    mel_points = np.linspace(_hz_to_mel_slaney(0.0), _hz_to_mel_slaney(f_max), n_mels + 2)
    hz_points = _mel_to_hz_slaney(mel_points)
    widths = np.diff(hz_points)
    rising = (fft_freqs[:, None] - hz_points[None, :-2]) / widths[None, :-1]
    falling = (hz_points[None, 2:] - fft_freqs[:, None]) / widths[None, 1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    filters *= 2.0 / (hz_points[2:] - hz_points[:-2])[None, :]
    return filters.astype(np.float32)


@lru_cache(maxsize=2)
def _hann(n: int) -> np.ndarray:
    # Periodic Hann, as torch.hann_window(n) (the STFT convention), not numpy's symmetric np.hanning.
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)


def power_mel(samples: np.ndarray, n_mels: int) -> np.ndarray:
    """Mel power spectrogram (n_mels, 1 + len // hop) of a centred, reflect-padded STFT."""
    x = np.asarray(samples, dtype=np.float32)
    pad = N_FFT // 2
    if x.size <= pad:
        # Reflect padding needs more samples than the pad; extend with zeros as the references effectively do
        # after their minimum-length padding.
        x = np.pad(x, (0, pad + 1 - x.size))
    padded = np.pad(x, (pad, pad), mode="reflect")
    n_frames = 1 + (padded.size - N_FFT) // HOP
    window = _hann(N_FFT)
    out = np.empty((n_mels, n_frames), dtype=np.float32)
    frames_view = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    for start in range(0, n_frames, _STFT_BLOCK_FRAMES):
        block = frames_view[start : start + _STFT_BLOCK_FRAMES] * window
        out[:, start : start + block.shape[0]] = _mel_power(block, n_mels)
    return out


def _mel_power(frames: np.ndarray, n_mels: int) -> np.ndarray:
    """Mel power (n_mels, frames) of windowed frames, in float64 and frame by frame: a frame's features must not
    depend on how many frames share the call (blocks of a long file, frames of a stream), and in float32 OpenBLAS
    on an AMD Zen 3 rounded a frame differently with the batch. The filters are sparse (about 400 of 201 x 128
    weights are non-zero), so the product is a gather and a sum per mel band: no BLAS call, whose worker threads
    would spin for tens of milliseconds after every call on a device that has no core to spare."""
    spec = np.fft.rfft(frames, n=N_FFT, axis=-1)
    power = (spec.real**2 + spec.imag**2).astype(np.float64)
    bins, weights, starts, bands = _sparse_filters(n_mels)
    out = np.zeros((n_mels, power.shape[0]), np.float32)
    if bins.size:
        out[bands] = np.add.reduceat(power[:, bins] * weights, starts, axis=1).T
    return out


@lru_cache(maxsize=4)
def _sparse_filters(n_mels: int):
    """The non-zero weights of ``mel_filters(n_mels)`` grouped by mel band: (fft bins, float64 weights, where each
    band's run starts, the bands that have any)."""
    filters = mel_filters(n_mels)
    bands, bins = np.nonzero(filters.T)  # band-major: each band's weights are one contiguous run
    bands_with_weights, starts = np.unique(bands, return_index=True)
    return bins, filters[bins, bands].astype(np.float64), starts, bands_with_weights


@dataclass(frozen=True)
class AsrFeatures:
    """Encoder input: mel (128, frames padded to a multiple of 100) and the number of valid frames."""

    mel: np.ndarray
    valid_frames: int

    @property
    def num_audio_tokens(self) -> int:
        return audio_token_count(self.valid_frames)


def asr_log_mel(samples: np.ndarray, pad_to_chunk: bool = True) -> AsrFeatures:
    x = np.asarray(samples, dtype=np.float32)
    if x.size < ASR_MIN_SAMPLES:
        x = np.pad(x, (0, ASR_MIN_SAMPLES - x.size))
    mel = power_mel(x, ASR_MEL_BINS)[:, :-1]
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = floor_and_scale(log_spec, float(log_spec.max()))
    valid = log_spec.shape[1]
    if pad_to_chunk and valid % CHUNK_FRAMES:
        log_spec = np.pad(log_spec, ((0, 0), (0, CHUNK_FRAMES - valid % CHUNK_FRAMES)))
    return AsrFeatures(mel=log_spec, valid_frames=valid)


def raw_log_mel_frames(samples: np.ndarray, first: int, last: int, n_mels: int = ASR_MEL_BINS) -> np.ndarray:
    """log10 mel power (n_mels, last - first) of frames [first, last) of the centred, reflect-padded STFT of
    ``samples``, before any floor: what ``asr_log_mel`` computes for those frames, so a stream can extend its
    features frame by frame. Reflection is applied by index at both ends, so any frame range can be asked for."""
    x = np.asarray(samples, dtype=np.float32)
    n = x.size
    pad = N_FFT // 2
    index = np.abs(np.arange(first * HOP - pad, (last - 1) * HOP + pad))
    index = np.where(index >= n, 2 * (n - 1) - index, index)
    frames = np.lib.stride_tricks.sliding_window_view(x[index], N_FFT)[::HOP] * _hann(N_FFT)
    return np.log10(np.maximum(_mel_power(frames, n_mels), 1e-10))


def floor_and_scale(raw_log: np.ndarray, global_max: float) -> np.ndarray:
    """The ASR front-end's last step: floor at (max - 8) over the whole clip, then (x + 4) / 4."""
    return ((np.maximum(raw_log, global_max - 8.0) + 4.0) / 4.0).astype(np.float32)


def router_log_mel(samples: np.ndarray) -> np.ndarray:
    """(80, 1 + len // 160) router features."""
    mel = power_mel(np.asarray(samples, dtype=np.float32), ROUTER_MEL_BINS)
    return ((np.log10(np.maximum(mel, 1e-10)) + 4.0) / 4.0).astype(np.float32)


def _conv_out_len(n: int) -> int:
    return (n - 1) // 2 + 1 if n > 0 else 0


def chunk_token_count(frames_in_chunk: int) -> int:
    """Encoder tokens produced by one conv chunk of ``frames_in_chunk`` (<= 100) mel frames."""
    n = frames_in_chunk
    for _ in range(3):
        n = _conv_out_len(n)
    return n


def audio_token_count(valid_frames: int) -> int:
    """Number of <|audio_pad|> placeholders for ``valid_frames`` mel frames (13 per full 100-frame chunk)."""
    full, rest = divmod(int(valid_frames), CHUNK_FRAMES)
    return full * TOKENS_PER_FULL_CHUNK + chunk_token_count(rest)
