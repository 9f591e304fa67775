#!/usr/bin/env bash
# The GPU checks of issue 32 in one run on a lent GPU machine (installs nothing; 8 minutes at most, TOTAL_S=480):
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # $OUT: where the JSON goes (default out/gpu_check)
#   bash benchmarks/gpu_check.sh prepare                 # an earlier call: keep its carry, export the bundles
#
# The device image has CPU onnxruntime only and a call carries at most 64 MiB: `python benchmarks/gpu_carry.py
# pack` makes onnxruntime-gpu cut to the H100 / H200's code in parts (.gpu-carry/1..N, one per call, back to back
# on the warm machine). Every call but the last runs `prepare`: it stashes its part and starts the 1.7B bundles'
# export in the background (the last call waits for it). The last call carries the last part; this script joins
# the parts and puts that onnxruntime first on PYTHONPATH (carry.json says what it found).
#
# 1. env.json: python, which packages import, nvidia-smi.
# 2. ort_cuda.json: whether onnxruntime's CUDA execution provider can run here at all, and exactly what was checked:
#    the provider listed; a session on the shipped one-node probe really on CUDA (onnxruntime silently falls back to
#    the CPU); one fp16 GroupQueryAttention node with a shared buffer on CUDA; the same session with enable_cuda_graph
#    and a replay that follows a changed seqlens_k.
# 3. pytest.json: the gpu-marked tests (tests/runtime/test_cuda.py), which skip with the reason when (2) fails.
# 4. gpu_decode.json: benchmarks/gpu_decode.py at the 1.7B geometry: fixed-KV + CUDA graph FP16 (with q/k/v and
#    gate/up packed into one MatMul each, and an earlier revision's graph given PREVIOUS), INT4 and INT8 weights
#    (each also on onnxruntime's fpA_intB kernels: -fpaintb), tok/s and % of the measured read bound, each
#    variant's op census, a kernel profile of the FP16 steps, transformers FP16 (static cache + torch.compile)
#    beside them; then 1 / 2 / 4 / 8 states stepping together through the graph's batch axis (BATCHES, aggregate
#    tok/s, for BATCH_VARIANTS; BATCHES= skips it).
#    Without the CUDA provider only the contender and the bandwidth run.
# Every stage has its own time limit and writes its JSON whether it passed or not.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
WORK="${WORK:-/tmp/megaedge-gpu-check}"
GEOMETRY="${GEOMETRY:-1.7b}"  # a dry run elsewhere: GEOMETRY=tiny DEVICE=cpu
DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MEGAEDGE_NO_PROGRESS=1 MEGAEDGE_VAD=off
VARIANTS="${VARIANTS:-fixed-fp16,fixed-fp16-packed,fixed-int4,fixed-int4-fpaintb,fixed-int8,fixed-int8-fpaintb${PREVIOUS:+,fixed-fp16-prev}}"
if [ "${1:-}" = prepare ]; then
  if [ -d .gpu-carry ]; then "$PY" benchmarks/gpu_carry.py stash || exit 1; fi
  if [ -s "$WORK/bundles.pid" ] && kill -0 "$(cat "$WORK/bundles.pid")" 2>/dev/null; then
    echo "bundles: the export $(cat "$WORK/bundles.pid") is still running"; exit 0
  fi
  nohup setsid "$PY" benchmarks/gpu_decode.py --work "$WORK" --geometry "$GEOMETRY" --bundles-only \
    --variants "$VARIANTS" ${PREVIOUS:+--previous-exporter "$PREVIOUS"} > "$WORK/bundles.log" 2>&1 < /dev/null &
  echo $! > "$WORK/bundles.pid"
  echo "bundles: exporting in the background (pid $!, log $WORK/bundles.log); the next call waits for it"
  exit 0
fi
if [ -d .gpu-carry ] || [ -s "${MEGAEDGE_CARRY_STASH:-/tmp/megaedge-carry}/manifest.json" ]; then
  if "$PY" benchmarks/gpu_carry.py unpack --into "$WORK/carried" --report "$OUT/carry.json"; then
    export PYTHONPATH="$WORK/carried:$PYTHONPATH"
    # the provider links CUDA / cuDNN by name; the image has them as pip packages (CUDA torch's nvidia-*)
    libs=$("$PY" benchmarks/gpu_carry.py libpath)
    [ -n "$libs" ] && export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  else
    echo "carry: onnxruntime-gpu not unpacked (carry.json says why); the image's onnxruntime is used"
  fi
fi
# the export `prepare` started, if that process is still the export (a pid can be reused after it ends)
if [ -z "${WAIT_FOR:-}" ] && [ -s "$WORK/bundles.pid" ]; then
  pid=$(cat "$WORK/bundles.pid"); rm -f "$WORK/bundles.pid"
  if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "gpu_decode.py"; then WAIT_FOR=$pid; fi
fi
START=$(date +%s)
TOTAL_S="${TOTAL_S:-480}"  # the whole script's budget; PYTEST_S: the gpu tests' share of it
PYTEST_S="${PYTEST_S:-150}"
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
budget() { local want=$1 have; have=$(left); [ "$have" -lt "$want" ] && want=$have; [ "$want" -lt 1 ] && want=1; echo "$want"; }

# ---------------------------------------------------------------------------------------------- 1. environment
timeout 60 "$PY" - "$OUT/env.json" <<'EOF'
import importlib, json, platform, subprocess, sys
mods = {}
for name in ("numpy", "torch", "onnxruntime", "onnx", "onnxscript", "transformers", "tokenizers", "soundfile",
             "soxr", "pytest", "triton", "cupy"):
    try:
        mod = importlib.import_module(name)
        mods[name] = getattr(mod, "__version__", "?")
    except Exception as exc:
        mods[name] = f"missing: {type(exc).__name__}: {exc}"
info = {"python": sys.version, "executable": sys.executable, "platform": platform.platform(), "modules": mods}
try:
    import torch
    info["torch_cuda"] = {"available": torch.cuda.is_available(), "cuda": torch.version.cuda,
                          "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
except Exception as exc:
    info["torch_cuda"] = {"error": str(exc)}
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        timeout=20).stdout.strip()
except Exception as exc:
    info["nvidia_smi"] = f"unavailable: {exc}"
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info["modules"]))
EOF
echo "env: rc $?"

# ---------------------------------------------------------------------------------------------- 2. onnxruntime CUDA
timeout 90 "$PY" - "$OUT/ort_cuda.json" <<'EOF'
import json, sys, traceback
import numpy as np
checks = []
result = {"runs": False, "cuda_graph": False, "checks": checks}

def check(what, fn):
    try:
        detail = fn()
        checks.append({"check": what, "ok": True, "detail": detail})
        return True
    except Exception as exc:
        checks.append({"check": what, "ok": False, "detail": f"{type(exc).__name__}: {str(exc)[:400]}"})
        return False

def listed():
    import onnxruntime as ort
    result["onnxruntime"] = ort.__version__
    providers = ort.get_available_providers()
    assert "CUDAExecutionProvider" in providers, f"providers {providers}: CPU onnxruntime, or onnxruntime-gpu missing"
    return providers

def probe():
    import onnxruntime as ort
    from megaedge.runtime import device_bandwidth, session
    s = ort.InferenceSession(str(device_bandwidth.PROBE_DIR / device_bandwidth.COPY_PROBE),
                             providers=session.resolve_providers(("cuda",)))
    got = s.get_providers()
    assert got[0] == "CUDAExecutionProvider", f"session fell back to {got} (no GPU, or CUDA/cuDNN libraries missing)"
    y = s.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0]
    assert y.tolist() == [0.0, 2.0]
    return got

def gqa_graph(path):
    import onnx
    from onnx import TensorProto as T, helper
    io = helper.make_tensor_value_info
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens_k", "total"],
                            ["o", "ok", "ov"], domain="com.microsoft", num_heads=4, kv_num_heads=2, scale=0.125)
    f = T.FLOAT16
    g = helper.make_graph([node], "g", [io("q", f, [1, "S", 256]), io("k", f, [1, "S", 128]), io("v", f, [1, "S", 128]),
        io("pk", f, [1, 2, 64, 64]), io("pv", f, [1, 2, 64, 64]), io("seqlens_k", T.INT32, [1]),
        io("total", T.INT32, [])], [io("o", f, [1, "S", 256]), io("ok", f, [1, 2, 64, 64]), io("ov", f, [1, 2, 64, 64])])
    # IR 10: what onnxruntime >= 1.18 reads (a newer onnx writes a newer IR by default, which it refuses)
    onnx.save(helper.make_model(g, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                 helper.make_opsetid("com.microsoft", 1)]), path)

def gqa(cuda_graph):
    import onnxruntime as ort
    path = "/tmp/megaedge-gqa-check.onnx"
    gqa_graph(path)
    options = {"enable_cuda_graph": "1"} if cuda_graph else {}
    s = ort.InferenceSession(path, providers=[("CUDAExecutionProvider", options), "CPUExecutionProvider"])
    assert s.get_providers()[0] == "CUDAExecutionProvider"
    rng = np.random.default_rng(0)
    put = lambda a: ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0)
    q, k, v = put(rng.standard_normal((1, 1, 256)).astype(np.float16)), put(rng.standard_normal((1, 1, 128)).astype(np.float16)), put(rng.standard_normal((1, 1, 128)).astype(np.float16))
    pk, pv = put(np.zeros((1, 2, 64, 64), np.float16)), put(np.zeros((1, 2, 64, 64), np.float16))
    seq, total, out = put(np.zeros(1, np.int32)), ort.OrtValue.ortvalue_from_numpy(np.array(64, np.int32)), put(np.zeros((1, 1, 256), np.float16))
    b = s.io_binding()
    for name, value in (("q", q), ("k", k), ("v", v), ("pk", pk), ("pv", pv), ("seqlens_k", seq), ("total", total)):
        b.bind_ortvalue_input(name, value)
    b.bind_ortvalue_output("o", out); b.bind_ortvalue_output("ok", pk); b.bind_ortvalue_output("ov", pv)
    ro = ort.RunOptions()
    if cuda_graph:
        ro.add_run_config_entry("gpu_graph_id", "1")
    written = []
    for step in range(5):  # warm-up runs, the capture, replays
        seq.update_inplace(np.array([step], np.int32))
        s.run_with_iobinding(b, ro)
        written.append(int((np.abs(pk.numpy()[0, :, :8]).sum(axis=(0, 2)) > 0).sum()))
    assert written == [1, 2, 3, 4, 5], f"cache positions written per run {written}: a replay ignored seqlens_k"
    return {"positions_written": written}

ok = check("onnxruntime lists CUDAExecutionProvider", listed)
ok = ok and check("a session on the shipped probe runs on CUDA", probe)
ok = ok and check("fp16 GroupQueryAttention with a shared KV buffer on CUDA", lambda: gqa(False))
result["runs"] = bool(ok)
if ok:
    result["cuda_graph"] = check("the same with enable_cuda_graph: capture, then replays follow seqlens_k",
                                 lambda: gqa(True))
json.dump(result, open(sys.argv[1], "w"), indent=2)
print(json.dumps(result)[:2000])
EOF
echo "ort_cuda: rc $?"

# ---------------------------------------------------------------------------------------------- 3. gpu tests
timeout "$(budget "$PYTEST_S")" "$PY" -m pytest tests/runtime/test_cuda.py -m gpu -q -rs -p no:cacheprovider \
  --junitxml="$OUT/pytest.xml" > "$OUT/pytest.txt" 2>&1
rc=$?
"$PY" - "$OUT/pytest.txt" "$rc" "$OUT/pytest.json" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
json.dump({"rc": int(sys.argv[2]), "tail": text[-3000:]}, open(sys.argv[3], "w"), indent=2)
EOF
echo "pytest gpu: rc $rc"

# ---------------------------------------------------------------------------------------------- 4. decode benchmark
if [ "${DECODE:-1}" = 0 ]; then  # DECODE=0: the checks and tests alone (a short lease)
  echo "gpu_decode: skipped (DECODE=0)"; echo "done in $(( $(date +%s) - START )) s; results in $OUT"; exit 0
fi
# WAIT_FOR: the pid of a `gpu_decode.py --bundles-only` run started earlier into $WORK; its bundles are reused
if [ -n "${WAIT_FOR:-}" ]; then
  while kill -0 "$WAIT_FOR" 2>/dev/null && [ "$(left)" -gt 90 ]; do sleep 5; done
  if kill -0 "$WAIT_FOR" 2>/dev/null; then  # never two writers in one folder: gpu_decode finishes what is missing
    echo "the bundles run $WAIT_FOR is still going: stopped; gpu_decode makes what is missing"
    kill -- "-$WAIT_FOR" 2>/dev/null || kill "$WAIT_FOR"; sleep 2  # its process group (setsid), children too
  fi
fi
# PREVIOUS: an earlier revision's export/fixed_kv.py (git show REV:megaedge/export/fixed_kv.py), timed as
# fixed-fp16-prev beside today's graph in the same run
BATCHES="${BATCHES-1,2,4,8}"  # set but empty: no batch-axis stage
timeout "$(budget "$TOTAL_S")" "$PY" benchmarks/gpu_decode.py --work "$WORK" --geometry "$GEOMETRY" --device "$DEVICE" \
  --variants "$VARIANTS" ${PREVIOUS:+--previous-exporter "$PREVIOUS"} --kernels "${KERNELS:-fixed-fp16}" \
  ${BATCHES:+--batches "$BATCHES" --batch-variants "${BATCH_VARIANTS:-fixed-fp16,fixed-int4}"} \
  --out "$OUT/gpu_decode.json" > "$OUT/gpu_decode.txt" 2>&1
echo "gpu_decode: rc $? (timeouts leave the stages done so far in gpu_decode.json)"
echo "done in $(( $(date +%s) - START )) s; results in $OUT"
