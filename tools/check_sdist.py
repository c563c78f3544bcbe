"""Check a bnfast source distribution: everything needed to build, nothing that is built.

Usage: python tools/check_sdist.py DIST.tar.gz [SOURCE_TREE]

Fails (exit status 1) when

- a build input is missing: setup.py, pyproject.toml, README.md, MANIFEST.in, every C
  source and header under csrc/ (and the CUDA kernels, csrc/cuda/*.cu and *.cuh), the
  Cython bindings bnfast/_core.pyx (with bnfast/_npy.pxd and bnfast/_npy_abi.h, the NumPy
  C ABI it uses) and their kept translation bnfast/_core.c, which must record the SHA-256
  of the sdist's own .pyx and .pxd (else building from the sdist needs Cython), the build
  backend (build_backend/*.py), every Python file of the bnfast package,
  bnfast/py.typed, and the tests.  With SOURCE_TREE (a git checkout), every file git
  knows under csrc/, bnfast/ and tests/ (tracked, or untracked and not ignored) must be in
  the sdist too, except generated files;
- a build output or other unwanted file is present: compiled objects and libraries (.so,
  .o, .pyd, .dll, .dylib, .a), Python bytecode,
  .git, build/ or dist/ trees, virtual environments, caches, built documentation.

Prints a summary of the contents by top-level folder.
"""
import collections
import fnmatch
import os
import subprocess
import sys
import tarfile
import tempfile

REQUIRED = ["setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "PKG-INFO",
            "bnfast/__init__.py", "bnfast/_core.pyx", "bnfast/_npy.pxd", "bnfast/_npy_abi.h",
            "bnfast/py.typed", "bnfast/_core.c", "build_backend/bnfast_backend.py",
            "build_backend/bnfast_cython.py",
            "csrc/bnfast.h", "csrc/bn_plan.h", "csrc/plan.c", "csrc/dispatch.c",
            "csrc/running_stats.c", "csrc/bench_copy.c", "csrc/vectors.c", "csrc/bn_vectors.h",
            "csrc/bn_kernels.h",
            "csrc/bn_common.h", "csrc/bn_isa.h", "csrc/bn_stats.h", "csrc/bn_elementwise.h",
            "csrc/bn_train.h", "csrc/bn_entry.h", "csrc/kernel_tables.c", "tests/conftest.py"]
# The translation units setup.py compiles in parallel: each (variant, dtype) pair, and the
# per-variant files they include.
REQUIRED += [f"csrc/kernels_{isa}{part}.c" for isa in ("baseline", "avx2", "avx512")
             for part in ("", "_f32", "_f64")]
# The CUDA kernels (package data of the wheel, compiled at run time by NVRTC).
REQUIRED += ["csrc/cuda/bnfast.cu", "csrc/cuda/bn_common.cuh"]
REQUIRED_GLOBS = ["csrc/*.c", "csrc/*.h", "bnfast/*.py", "bnfast/nn/*.py", "tests/*/test_*.py"]
FORBIDDEN = ["*.so", "*.so.*", "*.o", "*.obj", "*.pyd", "*.dll", "*.dylib", "*.a", "*.lib",
             "*.pyc", "*.pyo", "*/__pycache__/*", "bnfast/*.html",
             ".git/*", ".git", ".gitignore", "build/*", "dist/*", "wheelhouse/*",
             ".ci-venv/*", ".ci-np1/*", "*/.venv/*", ".venv/*", "*/site-packages/*",
             ".pytest_cache/*", ".hypothesis/*", ".benchmarks/*", "results/*",
             "docs/_build/*", "docs/auto_tutorials/*", "docs/api/generated/*",
             "docs/sg_execution_times.rst", "*.whl", "*.tar.gz", "*/.gitignore"]
# Files that SOURCE_TREE may hold but that are generated, so must NOT be in the sdist.
GENERATED = ["*.so", "*.o", "*.pyc", "*/__pycache__/*", "bnfast/*.html"]


def members(path):
    with tarfile.open(path) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    top = os.path.commonpath(names)
    return sorted(os.path.relpath(n, top) for n in names)


def translation_problem(path):
    """Why the sdist's bnfast/_core.c does not match its .pyx and .pxd, or None."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(path) as tar:
            files = [m for m in tar.getmembers() if m.isfile()]
            top = os.path.commonpath([m.name for m in files])
            for m in files:
                rel = os.path.relpath(m.name, top)
                if rel.startswith(("bnfast/", "build_backend/")) and rel.endswith(
                        (".pyx", ".pxd", ".c", ".py")):
                    dest = os.path.join(tmp, rel)
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    with tar.extractfile(m) as src, open(dest, "wb") as out:
                        out.write(src.read())
        sys.path.insert(0, os.path.join(tmp, "build_backend"))
        try:
            import bnfast_cython
            if bnfast_cython.recorded(tmp) != bnfast_cython.stamp(tmp):
                return ("bnfast/_core.c does not record the sdist's bnfast/_core.pyx and "
                        "_npy.pxd (regenerate: BNFAST_CYTHONIZE=1 python setup.py build_ext "
                        "--inplace)")
        finally:
            sys.path.pop(0)
            sys.modules.pop("bnfast_cython", None)
    return None


def git_files(tree):
    try:
        out = subprocess.run(["git", "-C", tree, "ls-files", "-co", "--exclude-standard"],
                             check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [f for f in out.splitlines() if os.path.isfile(os.path.join(tree, f))]


def match(name, patterns):
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def main(argv):
    if not argv:
        sys.exit(__doc__)
    names = members(argv[0])
    have = set(names)
    problems = []
    for req in REQUIRED:
        if req not in have:
            problems.append(f"missing: {req}")
    if "bnfast/_core.c" in have and "build_backend/bnfast_cython.py" in have:
        why = translation_problem(argv[0])
        if why:
            problems.append(why)
    for pat in REQUIRED_GLOBS:
        if not any(fnmatch.fnmatch(n, pat) for n in names):
            problems.append(f"missing: nothing matches {pat}")
    if len(argv) > 1:
        tracked = git_files(argv[1])
        if tracked is None:
            print(f"note: {argv[1]} is not a git checkout; compared with the fixed list only")
        else:
            for f in tracked:
                if (f.startswith(("csrc/", "bnfast/", "tests/")) and not match(f, GENERATED)
                        and f not in have):
                    problems.append(f"missing: {f} (in the source tree)")
    for n in names:
        if match(n, FORBIDDEN):
            problems.append(f"must not be in the sdist: {n}")

    by_top = collections.Counter(n.split("/")[0] if "/" in n else "." for n in names)
    print(f"sdist {os.path.basename(argv[0])}: {len(names)} files, "
          f"{os.path.getsize(argv[0]) / 1024:.0f} KiB")
    for top, count in sorted(by_top.items()):
        exts = collections.Counter(os.path.splitext(n)[1] or n.rsplit("/", 1)[-1]
                                   for n in names if (n.split("/")[0] if "/" in n else ".") == top)
        print(f"  {top + '/' if top != '.' else '(top level)':<18} {count:>3} files  "
              + ", ".join(f"{c} {e}" for e, c in sorted(exts.items())))
    if problems:
        print("FAIL:")
        for p in problems:
            print(f"  {p}")
        return 1
    print("ok   sdist has every build input (C sources, headers, .pyx, package, tests) "
          "and no build outputs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
