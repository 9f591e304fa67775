"""How audio is cut for the encoder (windows) and for long-form decoding (segments).

Encoder windows: 8 conv chunks of 100 mel frames = 104 tokens, as Qwen3-ASR's encoder attends; the last chunk
may be partial and its padded tail is hidden by ``valid_tokens``.

Long-form segments: files longer than ``segment_seconds`` are cut at the quietest 20 ms frame inside the last
few seconds before each limit, so words are rarely split and memory (prompt length, KV cache) stays bounded.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from megaedge.runtime import features

DEFAULT_SEGMENT_SECONDS = 30.0
SEGMENT_RANGE = (8.0, 300.0)  # a cut needs a few seconds to search; past 300 s a prompt outgrows what was tested


def check_one_segment(samples: int, segment_seconds: float | None) -> None:
    """Audio transcribed uncut (``segment_seconds`` None) is one prompt: at most SEGMENT_RANGE's top, where the
    prompt and its token budget stay inside what was tested (an hour of it took minutes and came out garbled)."""
    from megaedge.errors import MegaedgeError

    high = SEGMENT_RANGE[1]
    if segment_seconds is None and samples > high * RATE:
        raise MegaedgeError(f"audio of {samples / RATE:.1f} s with segment_seconds=None: one segment is at most "
                            f"{high:g} s; pass segment_seconds (e.g. {DEFAULT_SEGMENT_SECONDS:g}) to cut it")


def check_segment_seconds(value) -> float | None:
    """None (never cut) or seconds in SEGMENT_RANGE; anything else one line."""
    from megaedge.errors import MegaedgeError

    if value is None:
        return None
    low, high = SEGMENT_RANGE
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise MegaedgeError(f"segment_seconds {value!r} is not a number of seconds; pass a number in "
                            f"{low:g}-{high:g}, or None to never cut")
    if not low <= value <= high:
        raise MegaedgeError(f"segment_seconds {value!r} is outside {low:g}-{high:g} s; pass seconds in that range, "
                            "or None to never cut")
    return float(value)
SEARCH_SECONDS = 4.0
FRAME = 320  # 20 ms at 16 kHz
RATE = features.SAMPLE_RATE


def encoder_windows(feats: features.AsrFeatures, encoder: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """mel [W, n_mels, 100*C] (C = chunks of the largest window, zero-padded) and valid_tokens [W]."""
    chunk = int((encoder or {}).get("chunk_frames", features.CHUNK_FRAMES))
    per_window = chunk * int((encoder or {}).get("chunks_per_window", 8))
    total = feats.mel.shape[1]
    wins, valid = [], []
    for start in range(0, total, per_window):
        frames_valid = max(0, min(feats.valid_frames - start, per_window))
        wins.append(feats.mel[:, start : start + per_window])
        valid.append(sum(features.chunk_token_count(min(chunk, frames_valid - c)) for c in range(0, frames_valid, chunk)))
    width = max(w.shape[1] for w in wins)
    mel = np.stack([np.pad(w, ((0, 0), (0, width - w.shape[1]))) for w in wins])
    return mel, np.asarray(valid, np.int64)


def encoder_calls(mel: np.ndarray, valid: np.ndarray, max_windows: int,
                  chunk_frames: int = features.CHUNK_FRAMES) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mel, valid_tokens) per encoder call, in window order: consecutive windows that need the same number of chunks
    share a call of at most ``max_windows``, cut to that many chunks. A short last window is not padded to the
    width of a full one (10 s of audio: 10 chunks computed, not 16); outputs are the same, chunks and windows being
    independent of their padding."""
    per_chunk = features.chunk_token_count(chunk_frames)
    chunks = np.maximum(-(-valid // per_chunk), 1)
    calls, start = [], 0
    while start < len(valid):
        end = start + 1
        while end < len(valid) and end - start < max_windows and chunks[end] == chunks[start]:
            end += 1
        calls.append((mel[start:end, :, : int(chunks[start]) * chunk_frames], valid[start:end]))
        start = end
    return calls


def segments(samples: np.ndarray, segment_seconds: float | None = DEFAULT_SEGMENT_SECONDS) -> list[tuple[int, int]]:
    """Sample ranges covering ``samples``; one range when it fits ``segment_seconds`` (None: never cut)."""
    n = len(samples)
    if not segment_seconds or n <= segment_seconds * RATE:
        return [(0, n)]
    limit = int(segment_seconds * RATE)
    search = int(min(SEARCH_SECONDS, segment_seconds / 2) * RATE)
    bounds, start = [], 0
    while n - start > limit:
        lo, hi = start + limit - search, start + limit
        frames = samples[lo:hi][: (hi - lo) // FRAME * FRAME].reshape(-1, FRAME)
        energy = np.einsum("ij,ij->i", frames.astype(np.float64), frames.astype(np.float64))
        cut = lo + int(np.argmin(energy)) * FRAME + FRAME // 2
        bounds.append((start, cut))
        start = cut
    bounds.append((start, n))
    return bounds
