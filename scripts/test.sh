#!/usr/bin/env bash
# The test command: set up .venv (CPU torch) and run the default suite (no slow, GPU or TensorRT tests).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/bootstrap.sh
echo "environment ready in $(( $(date +%s) - start )) s"
suite_start=$(date +%s)
set +e
.venv/bin/python -m pytest -m "not slow and not gpu and not trt" --durations=10 "$@"
status=$?
set -e
echo "test suite time: $(( $(date +%s) - suite_start )) s (total with set-up: $(( $(date +%s) - start )) s)"
exit $status
