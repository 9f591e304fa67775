"""Torch-side helpers for export tests: logits of a loaded checkpoint on a fixed prompt."""

from __future__ import annotations

import numpy as np

from megaedge.export.reference import prompt_inputs


def prompt_logits(loaded, samples: np.ndarray):
    import torch

    inputs = prompt_inputs(loaded, samples, language=None, context=None)
    inputs["input_features"] = inputs["input_features"].to(loaded.model.dtype)
    with torch.no_grad():
        return loaded.model(**inputs).logits[0]
