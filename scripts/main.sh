#!/usr/bin/env bash
# The main job on the shipped default model (the trained fixture in megaedge/assets/fixture): export it as an INT8
# bundle (with its per-condition accuracy report on the shipped wild-audio clips), then transcribe a
# held-out clip with the lean runtime, stream it as a microphone would (partials, then the exact final), evaluate the
# bundle on the held-out set and measure it on this machine. Output lands in ./out (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
ME=.venv/bin/megaedge
mkdir -p out/main
$ME doctor
$ME export --int8 --out out/main/bundle --force
CLIP=$(ls megaedge/assets/fixture/heldout/clips/*.flac | head -n 1)
$ME transcribe out/main/bundle "$CLIP"
$ME stream out/main/bundle --file "$CLIP" --preset exact --json > out/main/stream.jsonl
tail -n 1 out/main/stream.jsonl
$ME eval out/main/bundle --json out/main/eval.json
$ME bench out/main/bundle --audio 5,10 --repeat 2 --tokens 16 --json out/main/bench.json
