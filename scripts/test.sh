#!/usr/bin/env bash
# The test command: set up .venv (CPU torch) and run the default suite (no slow, GPU or TensorRT tests).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/bootstrap.sh
echo "environment ready in $(( $(date +%s) - start )) s"
# The suite builds tiny bundles under the temp directory (~0.4 GiB at its peak); a full disk fails it in odd places.
tmp=${TMPDIR:-/tmp}
free_mib=$(df -Pm "$tmp" | awk 'NR==2 {print $4}')
echo "free space in $tmp: ${free_mib} MiB"
if [ "${free_mib:-0}" -lt 1024 ]; then
    echo "error: ${free_mib} MiB free in $tmp, the test suite needs at least 1024 MiB; free space there or point TMPDIR elsewhere" >&2
    exit 1
fi
suite_start=$(date +%s)
set +e
.venv/bin/python -m pytest -m "not slow and not gpu and not trt" --durations=10 "$@"
status=$?
set -e
echo "test suite time: $(( $(date +%s) - suite_start )) s (total with set-up: $(( $(date +%s) - start )) s)"
exit $status
