#!/usr/bin/env bash
# The GPU check: run on a machine with an NVIDIA GPU (no internet needed), from the
# checkout:  bash tools/gpu_check.sh
#
# Expects Python 3.10+ with CuPy (cupy-cuda13x, or cupy-cuda12x), NumPy, Cython and pytest,
# and PyTorch with CUDA for the benchmark's comparison (optional).  It downloads nothing:
#   1. detects the GPU (nvidia-smi, CuPy) -- without one it says so and exits with status 2;
#   2. builds bnfast's CPU extension in place (setup.py build_ext --inplace) and uses the
#      checkout through PYTHONPATH (no pip);
#   3. prints bnfast's configuration and compiles the CUDA kernels (NVRTC), timed;
#   4. runs the GPU tests (tests/gpu) and the CPU API tests they lean on;
#   5. runs the GPU benchmark's quick variant (bnfast bench --device cuda --quick).
# Every step's log, the pytest JUnit XML, the benchmark's JSON and summary.json go to $OUT
# (default ./gpu-results).  A failing step is recorded and the next one runs; the exit status
# is 0 only when every step passed.  About 2-4 minutes on an H100/H200 (budget: 6).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu-results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
names=()
results=()
T0=$(date +%s)

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, record the status
    local name=$1 limit=$2
    shift 2
    local t=$(date +%s)
    local cmd="$*"
    cmd=${cmd//$'\n'/ }
    echo "=== $name: ${cmd:0:110}"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    [ "$rc" -eq 124 ] && echo "(timed out after $limit s)"
    echo "=== $name: exit status $rc, $(( $(date +%s) - t )) s"
    names+=("$name")
    results+=("$rc")
    return 0
}

summary() {
    echo
    echo "=== summary ($(( $(date +%s) - T0 )) s; logs in $OUT)"
    local ok=0 json="{" sep=""
    for i in "${!names[@]}"; do
        local r=${results[$i]} word=passed
        [ "$r" -ne 0 ] && { word="FAILED ($r)"; ok=1; }
        printf '  %-14s %s\n' "${names[$i]}" "$word"
        json="$json$sep\"${names[$i]}\": $r"
        sep=", "
    done
    echo "$json}" >"$OUT/summary.json"
    return $ok
}

# 1. the GPU
step detect 60 "$PY" -c '
import sys
try:
    import cupy
except Exception as exc:
    sys.exit(f"no GPU backend: CuPy is not importable ({type(exc).__name__}: {exc})")
try:
    n = cupy.cuda.runtime.getDeviceCount()
except Exception as exc:
    sys.exit(f"no GPU: CUDA reports {type(exc).__name__}: {exc}")
if n < 1:
    sys.exit("no GPU: CuPy sees no CUDA device")
p = cupy.cuda.runtime.getDeviceProperties(0)
name, cc = p["name"].decode(), (p["major"], p["minor"])
rt = cupy.cuda.runtime
print(f"CuPy {cupy.__version__}, {n} device(s); device 0: {name}, compute capability "
      f"{cc[0]}.{cc[1]}, driver {rt.driverGetVersion()}, runtime {rt.runtimeGetVersion()}")
try:
    import torch
    print(f"PyTorch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
except ImportError:
    print("PyTorch not installed: the benchmark runs without it")
'
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >"$OUT/nvidia-smi.log" 2>&1
if [ "${results[0]}" -ne 0 ]; then
    echo "gpu_check: no usable NVIDIA GPU here (see above); nothing else to check"
    summary
    exit 2
fi

# 2. build the CPU extension in place (the GPU kernels are compiled at run time)
step build 300 "$PY" setup.py build_ext --inplace

# 3. configuration and the NVRTC compile of the kernels
step config 120 "$PY" -c '
import time, cupy, bnfast
from bnfast.cuda import _backend
bnfast.show_config()
t = time.perf_counter()
_backend._module(cupy, cupy.cuda.Device().id)
print(f"NVRTC compile of csrc/cuda: {time.perf_counter() - t:.2f} s (CuPy caches it on disk)")
'

# 4. the tests: the GPU ones, then the CPU API tests (the shared validation layer)
step gpu_tests 240 "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu \
    --junitxml="$OUT/gpu_tests.xml"
step api_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/api/test_errors.py \
    tests/api/test_inputs_outputs.py --junitxml="$OUT/api_tests.xml"

# 5. the benchmark, quick variant (JSON in $OUT/bench_cuda.json)
step bench 150 "$PY" -m bnfast bench --device cuda --quick --out "$OUT"

summary
