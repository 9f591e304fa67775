#!/usr/bin/env bash
# The main job on the shipped default model (the trained fixture in megaedge/assets/fixture): export it as an INT8
# bundle calibrated on the shipped wild-audio clips (with its per-condition accuracy report), then transcribe a
# held-out clip with the lean runtime and evaluate the bundle on the held-out set. Output lands in ./out (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
ME=.venv/bin/megaedge
mkdir -p out/main
$ME doctor
$ME export --int8 --out out/main/bundle --force
CLIP=$(ls megaedge/assets/fixture/heldout/clips/*.flac | head -n 1)
$ME transcribe out/main/bundle "$CLIP"
$ME eval out/main/bundle --json out/main/eval.json
