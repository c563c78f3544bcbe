#!/usr/bin/env bash
# Build bnfast's extension with AddressSanitizer and UndefinedBehaviorSanitizer, outside the
# source tree, and run the kernel-focused tests against that build.  Any sanitizer report
# fails the run (ASan and UBSan halt on the first error; the exit status is non-zero).
#
#   tools/sanitize.sh                 (from anywhere; uses $PYTHON or python3)
#   KEEP=1 tools/sanitize.sh          keep the temporary folder for inspection
#   tools/sanitize.sh tests/api/test_errors.py -k axis     run other tests (pytest arguments)
#   SANITIZE_EXTRA_FLAGS=-fno-sanitize=alignment tools/sanitize.sh
#                                     add compiler flags (e.g. to set a known report aside)
#   BNFAST_FUZZ_EXAMPLES=n            examples per fuzz test under the sanitizers (default 60)
#
# Needs: gcc with its sanitizer runtimes (libasan, libubsan: they come with Debian/Ubuntu's
# gcc package), and in the Python that runs it numpy, pytest and hypothesis (the test
# extra) -- Cython and setuptools are installed if missing.  Nothing in the checkout is
# built or written: the sources and tests are copied to a temporary folder, the extension is
# built in place THERE, and the tests run from there (so `import bnfast` can only find the
# sanitized copy; the script checks that it did, and that the extension links libasan).
#
# How the flags get in: the sanitizer options are part of $CC, which setuptools uses for
# compiling, for linking the extension (LDSHARED starts with the compiler) and for linking
# setup.py's OpenMP probe program (with them only in $CFLAGS/$LDFLAGS the probe would not
# link and the extension would silently be built without OpenMP, so the script also checks
# that the build found OpenMP).  setup.py's own flags (-O3 -ffp-contract=off ... -fopenmp)
# follow them.
# CPython itself is not instrumented, so libasan is preloaded; leak detection is off
# because CPython keeps objects alive until exit by design.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
PY=$(command -v "$PY")
CC=${CC:-gcc}

if [ "$#" -gt 0 ]; then
    TESTS=("$@")
else
    # The kernels on every shape/layout/dtype/ISA/thread count of the grid, bit-identity
    # across threads and ISAs, every forced strategy (walks, layouts, the fused passes),
    # every error path, gradients, argument handling (layouts, out=, in place, byte order),
    # the fast paths and the hardening tests, the adversarial inputs and a short fuzz (the
    # files this checkout has).
    TESTS=()
    for t in test_reference_grid test_determinism test_plan test_errors test_gradcheck \
             test_inputs_outputs test_numerics test_fastpath test_hardening \
             test_adversarial test_fuzz; do
        for f in "$REPO"/tests/*/"$t".py; do
            [ -f "$f" ] && TESTS+=("${f#"$REPO"/}")
        done
    done
fi

ASAN_RT=$("$CC" -print-file-name=libasan.so)
UBSAN_RT=$("$CC" -print-file-name=libubsan.so)
for rt in "$ASAN_RT" "$UBSAN_RT"; do
    if [ ! -e "$rt" ]; then
        echo "sanitize: $CC has no sanitizer runtime ($rt); install gcc's libasan/libubsan" >&2
        exit 2
    fi
done
ASAN_RT=$(readlink -f "$ASAN_RT")

for mod in Cython setuptools; do
    "$PY" -c "import $mod" 2>/dev/null || "$PY" -m pip install -q "Cython>=3.0" "setuptools>=77" wheel
done
for mod in numpy pytest hypothesis; do
    "$PY" -c "import $mod" 2>/dev/null || {
        echo "sanitize: '$PY' lacks '$mod' (pip install '.[test]' first)" >&2; exit 2; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bnfast-sanitize-XXXXXX")
if [ "${KEEP:-0}" = "1" ]; then
    echo "sanitize: keeping $WORK"
else
    trap 'rm -rf "$WORK"' EXIT
fi
T0=$SECONDS

# ------------------------------------------------------------------ copy the sources
SRC="$WORK/src"
mkdir -p "$SRC"
(cd "$REPO" && cp -r setup.py pyproject.toml README.md LICENSE MANIFEST.in build_backend csrc \
     bnfast tests "$SRC/")
# Without the kept translation bnfast/_core.c, setup.py runs Cython on bnfast/_core.pyx: this
# build is CI's check that the translation path works (the other builds use the kept file).
rm -rf "$SRC"/bnfast/*.so "$SRC/bnfast/_core.c" "$SRC"/bnfast/*.html
find "$SRC" -name __pycache__ -prune -exec rm -rf {} +

# ------------------------------------------------------------------ build
SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
SAN="$SAN${SANITIZE_EXTRA_FLAGS:+ $SANITIZE_EXTRA_FLAGS}"
echo "sanitize: building with $CC $SAN"
(cd "$SRC" && CC="$CC $SAN" CFLAGS="-g" "$PY" setup.py build_ext --inplace \
     --build-temp "$WORK/build-temp") > "$WORK/build.log" 2>&1 || {
    tail -n 60 "$WORK/build.log"; echo "sanitize: build failed" >&2; exit 1; }
grep -E '^bnfast: (OpenMP|BNFAST)' "$WORK/build.log" || true
if ! grep -q '^bnfast: OpenMP works' "$WORK/build.log" \
        && [ "${BNFAST_NO_OPENMP:-0}" = "0" ]; then
    grep -i openmp "$WORK/build.log" >&2 || true
    echo "sanitize: the sanitized build found no OpenMP (the threaded kernels would go" \
         "untested); set BNFAST_NO_OPENMP=1 to test a serial build on purpose" >&2
    exit 1
fi
SO=$(ls "$SRC"/bnfast/_core*.so)
grep -E -- '-fsanitize=address,undefined' "$WORK/build.log" > /dev/null || {
    echo "sanitize: the compile commands did not carry the sanitizer flags" >&2; exit 1; }
# (no grep -q in these pipelines: with pipefail, grep -q exiting early fails the producer)
LIBS=$(ldd "$SO")
if ! grep libasan <<< "$LIBS" > /dev/null || ! grep libubsan <<< "$LIBS" > /dev/null; then
    echo "$LIBS"; echo "sanitize: $SO does not link libasan and libubsan" >&2; exit 1
fi
SYMS=$(nm -D "$SO")
grep '__asan_report' <<< "$SYMS" > /dev/null && grep '__ubsan_handle' <<< "$SYMS" > /dev/null || {
    echo "sanitize: $SO has no ASan/UBSan instrumentation" >&2; exit 1; }
echo "sanitize: built $SO in $((SECONDS - T0)) s"

# ------------------------------------------------------------------ run
export LD_PRELOAD="$ASAN_RT${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=99:detect_odr_violation=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=98${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONDONTWRITEBYTECODE=1
export BNFAST_FUZZ_EXAMPLES=${BNFAST_FUZZ_EXAMPLES:-60}
unset PYTHONPATH

cd "$SRC"
# The working directory is first on sys.path with `python -m`: bnfast is the sanitized copy.
"$PY" - "$SRC" <<'EOF'
import os, sys
import bnfast, bnfast._core
src = os.path.realpath(sys.argv[1])
f = os.path.realpath(bnfast._core.__file__)
print("sanitize: testing", f)
assert f.startswith(src + os.sep), f"imported {f}, not the sanitized build under {src}"
maps = open("/proc/self/maps").read()
assert "libasan" in maps and "libubsan" in maps, "sanitizer runtimes are not loaded"
bnfast.show_config()
EOF

status=0
# --capture=sys: a sanitizer report goes to the real stderr (with fd capture it would be lost
# with the process); -x: stop at the first failure.
"$PY" -m pytest -q -p no:cacheprovider --capture=sys -x "${TESTS[@]}" || status=$?
echo "sanitize: tests finished with status $status in $((SECONDS - T0)) s total"
case $status in
    98) echo "sanitize: UndefinedBehaviorSanitizer reported an error" >&2 ;;
    99) echo "sanitize: AddressSanitizer reported an error" >&2 ;;
esac
exit "$status"
