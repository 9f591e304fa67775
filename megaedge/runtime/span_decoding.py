"""The decoder under a stream (runtime/streaming.py): the same three calls over onnxruntime's graphs or megaedge's
native kernels.

A stream keeps the KV cache of what it has committed (prompt prefix, finished windows) and runs each hop's tail
(open window, prompt suffix, committed text) on top of it without keeping it. ``cache`` is what ``extend``
returned, None for an empty one: onnxruntime's present tensors, or the native decoder's committed length.

Why a native one: a hop is a short prompt and a few dozen decode steps, work the native kernels do faster than
onnxruntime's `MatMulNBits` on a CPU (1.7B `cpu` bundle, hop 2 s, 2-core AVX2 EPYC: median hop 7.0 vs 9.0 s,
benchmarks/results/streaming_1.7b_int8_zen3.json), and a weight-only INT8 bundle that decodes natively then never
opens onnxruntime's decoder graphs, which would hold a second copy of the decoder weights.
Each stream's native decoder shares the weights and owns its cache (``NativeDecoder.spawn``).
"""

from __future__ import annotations

import numpy as np


class OrtSpanDecoding:
    """Hops in the bundle's onnxruntime decoder graphs (routed bundles, GPU providers, ``--decode ort``)."""

    def __init__(self, transcriber):
        self.tr = transcriber
        hidden = int(transcriber.manifest.graph("decoder").input("audio_features").shape[1])
        self._no_audio = np.zeros((0, hidden), transcriber.kv_dtype)
        self._outs = None  # the last call's outputs: logits, then the KV cache

    def _run(self, ids: list[int], audio: np.ndarray, logits_at: list[int], past, gate: float | None,
             session=None):
        feed = self.tr.decoder_feed(ids, audio, logits_at, past, gate)
        if session is None:
            return self.tr.decoder_for(len(ids)).run_bound(feed)
        return session.run_bound(feed, check=False)

    def extend(self, cache, ids: list[int], audio: np.ndarray, gate: float | None):
        """``ids`` (with ``audio`` rows at the audio placeholders) appended to ``cache``: the longer cache."""
        return self._run(ids, audio, [len(ids) - 1], cache, gate)[1:]

    def tail(self, cache, ids: list[int], audio: np.ndarray, gate: float | None, logit_rows: int) -> np.ndarray:
        """Logits [logit_rows, vocab] of the last rows of ``ids`` run after ``cache``, which stays as it was;
        ``step`` continues after them."""
        self._outs = self._run(ids, audio, list(range(len(ids) - logit_rows, len(ids))), cache, gate)
        return self._outs[0].numpy()

    def step(self, token: int, gate: float | None) -> np.ndarray:
        """Logits [vocab] after ``token``, appended to the last ``tail`` or ``step``."""
        from megaedge.runtime.transcriber import LAST

        self._outs = self._run([token], self._no_audio, LAST, self._outs[1:], gate, self.tr.sessions["decoder"])
        return self._outs[0].numpy()[-1]


class NativeSpanDecoding:
    """Hops in megaedge's native kernels, on this stream's own cache over the transcriber's shared weights."""

    def __init__(self, transcriber):
        self.decoder = transcriber.native.spawn()
        self.audio_token = transcriber.manifest.prompt.audio_pad

    def _append(self, cache, ids: list[int], audio: np.ndarray, logit_rows: int) -> np.ndarray:
        self.decoder.rewind(0 if cache is None else cache)
        return self.decoder.extend(self.decoder.rows_for(ids, audio, self.audio_token), logit_rows)

    def extend(self, cache, ids: list[int], audio: np.ndarray, gate: float | None) -> int:
        self._append(cache, ids, audio, 0)
        return self.decoder.length

    def tail(self, cache, ids: list[int], audio: np.ndarray, gate: float | None, logit_rows: int) -> np.ndarray:
        return self._append(cache, ids, audio, logit_rows)

    def step(self, token: int, gate: float | None) -> np.ndarray:
        return self.decoder.step(token)


def for_transcriber(transcriber):
    """The native decoding where the transcriber decodes natively, else onnxruntime's."""
    return NativeSpanDecoding(transcriber) if transcriber.native is not None else OrtSpanDecoding(transcriber)
