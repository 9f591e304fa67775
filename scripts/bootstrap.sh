#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root and install megaedge with the extras named in $EXTRAS.
# torch is installed first as the pinned CPU build (constraints/cpu-torch.txt): an unpinned torch on Linux pulls
# several GB of CUDA wheels; where the configured indexes lack the CPU build, the PyTorch CPU index ($TORCH_CPU_INDEX)
# is added for torch alone. Re-running is cheap: pip skips what is already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN=${PYTHON:-python3}
EXTRAS=${EXTRAS:-export,calib,eval,mic,serve,dev}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON_BIN" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip >/dev/null
if [[ ",$EXTRAS," == *",export,"* ]] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    TORCH=$(sed -n 's/^torch==\([0-9.]*\)$/torch==\1/p' constraints/cpu-torch.txt)
    if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
        TORCH="$TORCH+cpu"  # PyPI's plain build here is the CUDA one
    fi
    # The configured indexes first (a local mirror may hold the CPU build); then the PyTorch CPU index.
    if ! "${PIP[@]}" install "$TORCH" 2>/dev/null; then
        TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
        echo "bootstrap: $TORCH not on the configured indexes; trying $TORCH_CPU_INDEX"
        "${PIP[@]}" install --extra-index-url "$TORCH_CPU_INDEX" "$TORCH"
    fi
fi
"${PIP[@]}" install -c constraints/cpu-torch.txt -e ".[${EXTRAS}]"
# Silero VAD's ONNX model (MIT; megaedge/runtime/vad.py, copied into bundles by `megaedge export`). --no-deps: the
# package declares torch and torchaudio, which the model does not need (megaedge locates its file, never imports it).
"${PIP[@]}" install --no-deps "silero-vad==${SILERO_VAD_VERSION:-6.2.3}"
