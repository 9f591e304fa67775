"""The audio-quality router in torch: our implementation of upstream's AudioQualityRouter architecture.

Architecture (mega-asr.md): 80-bin log-mel -> Conv1d(k3, s2) + BatchNorm + GELU, twice (40 ms frames) ->
sinusoidal positions (a table of ``max_len // 4 + 100`` rows, 850 for the release) -> one pre-norm GELU
TransformerEncoderLayer + final LayerNorm -> attention pooling -> MLP d -> d/2 -> 2. ``softmax(logits)[1]`` is the
degraded probability. Parameter names follow the released checkpoint so its safetensors file loads strictly;
hyperparameters come from the safetensors metadata ``config`` (JSON with a ``model`` object).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from megaedge.errors import CheckpointError
from megaedge.runtime import features, routing

_SAFETENSORS_MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class RouterConfig:
    n_mels: int = 80
    d_model: int = 256
    nhead: int = 4
    dim_feedforward: int = 1024
    dropout: float = 0.1
    max_len: int = 3000
    num_classes: int = 2

    @property
    def position_rows(self) -> int:
        return self.max_len // 4 + 100

    @classmethod
    def from_metadata(cls, metadata: dict | None) -> RouterConfig:
        raw = (metadata or {}).get("config")
        if raw is None:
            return cls()
        try:
            model_cfg = json.loads(raw).get("model", {})
        except (json.JSONDecodeError, AttributeError) as exc:
            raise CheckpointError(f"router metadata 'config' is not a JSON object ({exc})") from exc
        known = {k: model_cfg[k] for k in cls.__dataclass_fields__ if k in model_cfg}
        return cls(**known)


def _sinusoid_table(rows: int, dim: int):
    import torch

    position = torch.arange(rows, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(rows, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table[None]


def build_router(config: RouterConfig):
    import torch
    from torch import nn

    class _Frontend(nn.Module):
        def __init__(self):
            super().__init__()
            half = config.d_model // 2
            self.conv = nn.Sequential(
                nn.Conv1d(config.n_mels, half, kernel_size=3, stride=2, padding=1),
                nn.BatchNorm1d(half),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Conv1d(half, config.d_model, kernel_size=3, stride=2, padding=1),
                nn.BatchNorm1d(config.d_model),
                nn.GELU(),
                nn.Dropout(config.dropout),
            )

    class _Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("pe", _sinusoid_table(config.position_rows, config.d_model))

    class _Pooling(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Linear(config.d_model, 1)

    class AudioQualityRouter(nn.Module):
        """forward(mels [batch, frames, n_mels]) -> logits [batch, num_classes]."""

        def __init__(self):
            super().__init__()
            self.config = config
            self.frontend = _Frontend()
            self.pos_encoder = _Positions()
            layer = nn.TransformerEncoderLayer(
                config.d_model,
                config.nhead,
                config.dim_feedforward,
                config.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.transformer = nn.TransformerEncoder(
                layer, num_layers=1, norm=nn.LayerNorm(config.d_model), enable_nested_tensor=False
            )
            self.pooling = _Pooling()
            self.classifier = nn.Sequential(
                nn.Linear(config.d_model, config.d_model // 2),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Linear(config.d_model // 2, config.num_classes),
            )

        def forward(self, mels):
            x = self.frontend.conv(mels.transpose(1, 2)).transpose(1, 2)
            x = x + self.pos_encoder.pe[:, : x.shape[1]]
            x = self.transformer(x)
            weights = torch.softmax(self.pooling.query(x).squeeze(-1), dim=-1)
            pooled = torch.bmm(weights.unsqueeze(1), x).squeeze(1)
            return self.classifier(pooled)

    return AudioQualityRouter()


def _check_safetensors(path: Path) -> None:
    """Refuse anything that is not a safetensors file before any parser sees it: we never unpickle."""
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) >= 2 and head[0] == 0x80 and head[1] <= 5:
        raise CheckpointError(
            f"{path}: is a Python pickle (torch.save); megaedge never unpickles files, convert the router to safetensors"
        )
    if head[:2] == b"PK":
        raise CheckpointError(f"{path}: is a zip/torch.save archive (pickle inside); convert the router to safetensors")
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if len(head) < 9 or not 0 < header_len < _SAFETENSORS_MAX_HEADER or head[8:9] != b"{":
        raise CheckpointError(f"{path}: not a safetensors file")


def load_router(path: str | Path):
    """(router module in eval mode, RouterConfig) from a safetensors file with a ``config`` metadata entry."""
    from safetensors import safe_open

    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: router file not found")
    _check_safetensors(file)
    with safe_open(str(file), framework="pt", device="cpu") as handle:
        config = RouterConfig.from_metadata(handle.metadata())
        state = {name: handle.get_tensor(name) for name in handle.keys()}
    model = build_router(config)
    expected = model.state_dict()
    def counters(names):
        return {n for n in names if n.endswith("num_batches_tracked")}

    unexpected = sorted(set(state) - set(expected) - counters(state))
    missing = sorted(set(expected) - set(state) - counters(expected))
    if unexpected or missing:
        raise CheckpointError(
            f"{file}: not an AudioQualityRouter checkpoint (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, tensor in state.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{file}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)} "
                f"for config {asdict(config)}"
            )
    model.load_state_dict(state, strict=False)
    model.eval()
    return model, config


def save_router(model, path: str | Path, extra_metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    config: RouterConfig = model.config
    metadata = {"config": json.dumps({"model": asdict(config)}), "format": "pt"}
    metadata.update(extra_metadata or {})
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)
    Path(path).chmod(0o644)  # safetensors writes 0600


def router_probabilities(model, audio) -> list[float]:
    """Degraded probability for each window of ``routing.windows``; ``audio`` is a file path or a 16 kHz array."""
    import torch

    from megaedge.runtime import audio as audio_io

    samples = audio_io.load(audio)
    bounds = routing.windows(len(samples), model.config.position_rows)
    probs = []
    with torch.no_grad():
        for start, end in bounds:
            mel = features.router_log_mel(samples[start:end])
            logits = model(torch.from_numpy(mel.T[None].copy()))
            probs.append(float(torch.softmax(logits, dim=-1)[0, 1]))
    return probs


def score(model, audio, threshold: float = routing.DEFAULT_THRESHOLD) -> routing.RouterDecision:
    """File-level decision for a path or a 16 kHz array of any length (windows beyond the position table)."""
    from megaedge.runtime import audio as audio_io

    samples = audio_io.load(audio)
    bounds = routing.windows(len(samples), model.config.position_rows)
    return routing.aggregate(router_probabilities(model, samples), bounds, threshold)
