#!/usr/bin/env bash
# Compile every CUDA source of bnfast (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90, device
# code only (-cubin: nothing to link, no GPU needed), with the options bnfast.cuda gives
# NVRTC at run time (-fmad=false, C++17), every warning an error (-Werror all-warnings;
# ptxas's too, with spills and local-memory use as warnings) and ptxas's report
# (-Xptxas -v), summarised as registers, spills and shared memory per kernel.
#
# Exit status: 0 when every file compiles cleanly for both architectures, 1 otherwise.
# Without nvcc (NVCC=path to choose one) it prints why and exits 0: CI machines without the
# CUDA toolkit skip this check.
set -u
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
ARCHS=${BNFAST_CUDA_ARCHS:-"80 90"}
if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "cuda_compile: skipped: nvcc not found (install the CUDA toolkit or set NVCC)"
    exit 0
fi
"$NVCC" --version | tail -n 2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
pids=()
for src in csrc/cuda/*.cu; do
    for arch in $ARCHS; do
        name=$(basename "$src" .cu)_sm$arch
        "$NVCC" -cubin -arch="sm_$arch" -std=c++17 --fmad=false -Werror all-warnings \
            -Xptxas -v,-warn-spills,-warn-lmem-usage,-Werror \
            -o "$tmp/$name.cubin" "$src" >"$tmp/$name.log" 2>&1 &
        pids+=("$!:$src:$arch:$name")
    done
done
for entry in "${pids[@]}"; do
    IFS=: read -r pid src arch name <<<"$entry"
    if wait "$pid"; then
        echo "== $src, sm_$arch: OK"
    else
        echo "== $src, sm_$arch: FAILED"
        status=1
    fi
    # One line per kernel: name, registers, spills, shared memory (portable awk; names
    # demangled with c++filt where it exists).
    { command -v c++filt >/dev/null 2>&1 && c++filt <"$tmp/$name.log" || cat "$tmp/$name.log"; } |
    awk '
        /Compiling entry function/ { fn = $0; sub(/.*function \047/, "", fn);
            sub(/\047 for .*/, "", fn); sub(/^void /, "", fn); sub(/\(.*/, "", fn) }
        /spill stores/ { n = split($0, a, ","); st = a[2] + 0; ld = a[3] + 0 }
        /Used [0-9]+ registers/ { regs = "?"; smem = 0
            for (i = 2; i <= NF; i++) { if ($i ~ /^registers/) regs = $(i - 1);
                                        if ($i ~ /^smem/) smem = $(i - 2) }
            printf "   %-34s %3s registers, spills %s/%s bytes (stores/loads), smem %s bytes\n",
                   fn, regs, st, ld, smem }
        /error|warning/ { print "   " $0 }'
done
if [ "$status" -ne 0 ]; then
    echo "cuda_compile: FAILED (full logs above for the failing files):"
    for f in "$tmp"/*.log; do grep -E "error|warning" "$f" | head -n 40; done
else
    echo "cuda_compile: every CUDA source compiles for sm_${ARCHS// /, sm_} without warnings"
fi
exit "$status"
