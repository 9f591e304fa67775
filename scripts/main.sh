#!/usr/bin/env bash
# The main job on the shipped default model. Until the export issues land it exercises the foundation end to end:
# machine report, a Mega-ASR-layout checkpoint (tiny random weights), the exact LoRA merge, and routed reference
# transcription of a generated clip. Output lands in ./out (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
ME=.venv/bin/megaedge
rm -rf out/main && mkdir -p out/main
$ME doctor
$ME make-test-model out/main/checkpoint --geometry tiny --layout mega
$ME merge out/main/checkpoint --out out/main/merged
.venv/bin/python - <<'PY'
import numpy as np, soundfile as sf
t = np.arange(32000) / 16000
sf.write("out/main/clip.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
PY
$ME reference out/main/checkpoint out/main/clip.wav --route auto --max-new-tokens 8
