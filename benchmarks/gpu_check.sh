#!/usr/bin/env bash
# One command that verifies kxkernels on a machine with an NVIDIA GPU and this repository:
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# 1. checks that a GPU is there (nvidia-smi and torch.cuda), and stops at once (exit 2) if not;
# 2. builds the extension in place with its CUDA sources for the local GPU's architecture
#    (python3 setup.py build_ext --inplace, KX_CUDA_ARCHS from torch.cuda.get_device_capability());
# 3. runs pytest tests/gpu (tests that need POT or another missing package skip);
# 4. runs python3 -m benchmarks.run --device cuda --quick with a short per-case cap.
#
# Every log and result goes into OUT_DIR: summary.txt (one line per step, the exit status of
# each), nvidia-smi.txt, env.txt, build.log, build_info.json, pytest-gpu.log, pytest-gpu.xml
# (junit), bench.log and bench/ (results.json, results.md, speedups.png). Exit status 0 when every
# step passed, 1 when a step failed, 2 when there is no GPU (or no OUT_DIR).
#
# Time: on an H200 with 16 cores the build takes about 2-3 minutes and the tests and benchmarks
# are capped (GPU_CHECK_TEST_SECONDS, GPU_CHECK_BENCH_SECONDS) so the whole run stays within
# 8 minutes. Knobs: PYTHON (default python3), KX_CUDA_ARCHS (overrides the detected arch),
# GPU_CHECK_SKIP_BUILD=1 (reuse an in-place build), GPU_CHECK_BENCH_ARGS (extra benchmark flags).
set -u

if [ $# -lt 1 ] || [ -z "$1" ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUT_DIR" >&2
  exit 2
fi
OUT=$1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
BUILD_SECONDS=${GPU_CHECK_BUILD_SECONDS:-300}
TEST_SECONDS=${GPU_CHECK_TEST_SECONDS:-150}
BENCH_SECONDS=${GPU_CHECK_BENCH_SECONDS:-150}
mkdir -p "$OUT" || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
START=$(date +%s)

note() {  # a line to the summary and to stdout
  echo "$*" | tee -a "$SUMMARY"
}

# ---- 1. is there a GPU? (seconds, before any build) ------------------------------------------------
if ! command -v nvidia-smi > /dev/null 2>&1; then
  note "gpu_check: no GPU: nvidia-smi is not on PATH (this machine has no NVIDIA driver). Nothing was built."
  exit 2
fi
if ! nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; then
  note "gpu_check: no GPU: nvidia-smi failed ($(head -n 1 "$OUT/nvidia-smi.txt")). Nothing was built."
  exit 2
fi
ARCH=$(cd "$ROOT" && "$PY" - 2> "$OUT/torch-cuda.err" <<'EOF'
import sys
import torch
if torch.version.cuda is None:
    sys.exit(f"torch {torch.__version__} is a CPU build")
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False")
major, minor = torch.cuda.get_device_capability()
print(f"{major}.{minor}")
EOF
)
if [ -z "$ARCH" ]; then
  note "gpu_check: no usable GPU for torch: $(tail -n 1 "$OUT/torch-cuda.err"). Nothing was built."
  exit 2
fi
ARCH=${KX_CUDA_ARCHS:-$ARCH}
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "repo: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'))"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())'
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1 || echo "triton: not installed"
  "$PY" -c 'import ot; print("POT", ot.__version__)' 2>&1 | tail -n 1
  (command -v nvcc > /dev/null && nvcc --version | tail -n 2) || echo "nvcc: not on PATH"
  echo "KX_CUDA_ARCHS=$ARCH"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
FAILED=0
step() {  # step NAME STATUS
  local t=$(( $(date +%s) - START ))
  if [ "$2" -eq 0 ]; then note "$1: ok (t=${t}s)"; else note "$1: FAILED, exit $2 (t=${t}s; see $OUT)"; FAILED=1; fi
}

# ---- 2. build the extension with CUDA for this GPU --------------------------------------------------
cd "$ROOT" || exit 2
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = "1" ]; then
  note "build: skipped (GPU_CHECK_SKIP_BUILD=1)"
else
  echo "building the extension for sm_${ARCH/./} (log: $OUT/build.log) ..."
  KX_CUDA_ARCHS="$ARCH" timeout "$BUILD_SECONDS" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  step build $?
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import json, kxkernels; print(json.dumps(kxkernels.build_info(), indent=1, default=str))' \
  > "$OUT/build_info.json" 2>&1
rc=$?
if [ $rc -eq 0 ] && ! grep -q '"cuda": true' "$OUT/build_info.json"; then
  note "build_info: the extension loaded but was built WITHOUT its CUDA sources (see build.log)"
  rc=1
fi
step build_info $rc
if [ $rc -ne 0 ]; then
  note "gpu_check: the extension is not usable with CUDA; tests and benchmarks not run."
  exit 1
fi

# ---- 3. the GPU tests --------------------------------------------------------------------------------
echo "pytest tests/gpu (log: $OUT/pytest-gpu.log) ..."
timeout "$TEST_SECONDS" "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" \
  > "$OUT/pytest-gpu.log" 2>&1
rc=$?
note "pytest: $(grep -E '^(=+ )?[0-9]+ (passed|failed)|no tests ran|error' "$OUT/pytest-gpu.log" | tail -n 1)"
step pytest_gpu $rc

# ---- 4. the benchmarks on CUDA ---------------------------------------------------------------------------
echo "benchmarks --device cuda --quick (log: $OUT/bench.log) ..."
# shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of flags
timeout "$BENCH_SECONDS" "$PY" -m benchmarks.run --device cuda --quick --rounds 3 --max-case-seconds 5 \
  --out "$OUT/bench" ${GPU_CHECK_BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
step benchmarks $?

note "gpu_check: done in $(( $(date +%s) - START ))s, $( [ $FAILED -eq 0 ] && echo 'every step passed' || echo 'a step FAILED' ); results in $OUT"
exit $FAILED
