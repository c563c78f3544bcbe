"""Build script for bnfast's compiled extension.

Everything declarative lives in pyproject.toml; this file exists because the extension needs
an OpenMP probe: a tiny program is compiled, linked and run with each candidate flag set.
Without a working OpenMP the extension is built serially (with a warning).
``BNFAST_NO_OPENMP=1`` forces the serial build.

No fast-math style flags are used: the kernels rely on IEEE semantics (NaN propagation,
no reassociation).  ``-ffp-contract=off`` keeps every instruction-set variant bit-identical.

Build time: each (instruction-set variant, dtype) pair of kernels is its own translation unit
(csrc/kernels_<isa>_f32.c, _f64.c; csrc/bn_entry.h) and the sources compile in parallel,
one job per CPU (``BNFAST_BUILD_JOBS=N`` or ``build_ext -j N`` to change; 1 is serial), the
longest first.  The Cython bindings' C, bnfast/_core.c, is kept in the tree with the
SHA-256 of its sources on its second line (build_backend/bnfast_cython.py): an unchanged
checkout builds without Cython; an edited bnfast/_core.pyx or ``BNFAST_CYTHONIZE=1`` makes
the build backend require Cython and this script translate again, in the job that then
compiles it, while the kernels compile.  With gcc or clang, no debug information is
generated (``-g0``) unless ``CFLAGS`` asks for it with ``-g``, and the Cython bindings
(bnfast/_core.c, argument handling only) are compiled with ``-O1``; the kernels keep
``-O3``.  No NumPy is needed to build: bnfast/_npy_abi.h declares the part of NumPy's C ABI
the bindings use.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "build_backend"))
import bnfast_cython  # noqa: E402  (the kept translation of the bindings and its record)

OPENMP_PROBE = r"""
#include <omp.h>
#include <stdio.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    printf("%d\n", n > 0 && omp_get_max_threads() > 0);
    return 0;
}
"""

ISAS = ["avx512", "avx2", "baseline"]
# The largest units first (longest-processing-time order), so that with one job per CPU
# the jobs finish together.  CPU seconds per unit with gcc 12 on the 2-core AMD EPYC
# (measured under load, so the order matters more than the values): kernels baseline_f32
# 2.0, avx2_f32 2.1, avx2_f64 2.0, avx512_f32 1.9, avx512_f64 1.8, baseline_f64 1.7, _core
# (gcc -O1) 1.6, each of the rest under 0.1.  When the bindings must be translated first
# (Cython, 1 s more), _core goes first (_FIRST).
SOURCES = ([f"csrc/kernels_{unit}.c" for unit in ("baseline_f32", "avx2_f32", "avx2_f64",
                                                  "avx512_f32", "avx512_f64", "baseline_f64")]
           + ["bnfast/_core.pyx"]
           + ["csrc/kernel_tables.c", "csrc/dispatch.c", "csrc/plan.c", "csrc/running_stats.c",
              "csrc/bench_copy.c", "csrc/vectors.c"])
DEPENDS = (["bnfast/_npy_abi.h", "csrc/bn_vectors.h", "csrc/bnfast.h", "csrc/bn_plan.h", "csrc/bn_kernels.h", "csrc/bn_common.h",
            "csrc/bn_isa.h", "csrc/bn_stats.h", "csrc/bn_elementwise.h", "csrc/bn_train.h",
            "csrc/bn_entry.h"]
           + [f"csrc/kernels_{isa}.c" for isa in ISAS])


def _candidate_flags(compiler_type):
    if compiler_type == "msvc":
        return [(["/openmp"], [])]
    if sys.platform == "darwin":
        return [
            (["-Xpreprocessor", "-fopenmp"], ["-lomp"]),
            (["-fopenmp"], ["-fopenmp"]),
        ]
    return [(["-fopenmp"], ["-fopenmp"])]


def _probe_openmp(compiler):
    """Return (compile_flags, link_flags) for a working OpenMP, or None."""
    if os.environ.get("BNFAST_NO_OPENMP", "0") not in ("", "0"):
        print("bnfast: BNFAST_NO_OPENMP is set; building without OpenMP")
        return None
    for cflags, lflags in _candidate_flags(compiler.compiler_type):
        tmp = tempfile.mkdtemp(prefix="bnfast-omp-")
        try:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(OPENMP_PROBE)
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
            exe = os.path.join(tmp, "probe")
            compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=lflags)
            out = subprocess.run([exe], capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and out.stdout.strip() == "1":
                print(f"bnfast: OpenMP works with {' '.join(cflags)}")
                return cflags, lflags
        except Exception as exc:  # compile, link or run failed: try the next flag set
            print(f"bnfast: OpenMP probe with {' '.join(cflags)} failed: {exc}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    warnings.warn(
        "bnfast: no working OpenMP found; the extension is built WITHOUT threads. "
        "Install an OpenMP runtime (libgomp with gcc, libomp with clang) to enable them."
    )
    return None


def _accepts_flag(compiler, flag):
    """Whether the compiler compiles a small C file with `flag` (and -Werror)."""
    tmp = tempfile.mkdtemp(prefix="bnfast-flag-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("int bn_probe(int n) { int s = 0; for (int i = 0; i < n; i++) s += i; "
                    "return s; }\n")
        compiler.compile([src], output_dir=tmp, extra_postargs=[flag, "-Werror"])
        return True
    except Exception:  # noqa: BLE001 -- any failure means: do not use the flag
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _use_clang_cl(compiler):
    """On Windows, compile with LLVM's clang-cl (BNFAST_CLANG_CL names it).

    The kernels use GCC/Clang vector extensions, which MSVC's cl.exe does not accept;
    clang-cl takes MSVC-style options and links with the MSVC toolchain.  Untested: no
    Windows build has been run.  Its sources compile one after another.
    """
    exe = os.environ.get("BNFAST_CLANG_CL", "").strip()
    if compiler.compiler_type != "msvc" or not exe:
        return False
    if not getattr(compiler, "initialized", True):
        compiler.initialize()
    compiler.cc = exe
    return True


def _build_jobs(requested):
    """Parallel compile jobs: BNFAST_BUILD_JOBS, else ``build_ext -j N``, else one per CPU."""
    env = os.environ.get("BNFAST_BUILD_JOBS", "").strip()
    if env:
        return max(1, int(env))
    if requested not in (None, False, True):
        return max(1, int(requested))
    return os.cpu_count() or 1


# Compile order: the position of a source (its .pyx as .c) in SOURCES; others last.
ORDER = [s[:-4] + ".c" if s.endswith(".pyx") else s for s in SOURCES]


_FIRST = set()      # sources to compile before all others (set by BuildExt)


def _order(src):
    src = os.path.normpath(src)
    if any(src.endswith(os.path.normpath(s)) for s in _FIRST):
        return -1
    for i, s in enumerate(ORDER):
        if src.endswith(os.path.normpath(s)):
            return i
    return len(ORDER)


def _parallel_compile(compiler, jobs, per_source_args, before):
    """Make ``compiler.compile`` compile its sources on ``jobs`` threads (each runs the
    compiler as a subprocess), in SOURCES order, with ``per_source_args(src)`` appended to
    each source's command line; ``before[src]()``, where given, runs first in the same job
    (Cython's translation of a .pyx into that .c).  Returns False, changing nothing, for
    compilers that override ``compile`` itself (MSVC and clang-cl)."""
    if not hasattr(compiler, "_compile") or compiler.compiler_type == "msvc":
        return False

    def compile(sources, output_dir=None, macros=None, include_dirs=None, debug=False,
                extra_preargs=None, extra_postargs=None, depends=None):
        macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
        todo = sorted(((obj,) + tuple(build[obj]) for obj in objects if obj in build),
                      key=lambda item: _order(item[1]))

        def one(item):
            obj, src, ext = item
            if src in before:
                before[src]()
            compiler._compile(obj, src, ext, cc_args,
                              list(extra_postargs or []) + per_source_args(src), pp_opts)

        if jobs <= 1 or len(todo) <= 1:
            for item in todo:
                one(item)
        else:
            with ThreadPoolExecutor(max_workers=min(jobs, len(todo))) as pool:
                for fut in [pool.submit(one, item) for item in todo]:
                    fut.result()   # the first failure is raised after the rest finish
        return objects

    compiler.compile = compile
    return True


def _build_key(compiler, cflags, lflags):
    """What an existing build must match to be reused: flags, compiler, Python."""
    return json.dumps({"cflags": cflags, "lflags": lflags, "python": sys.version,
                       "compiler": list(getattr(compiler, "compiler_so", None)
                                        or [str(getattr(compiler, "cc", ""))])},
                      sort_keys=True)


class BuildExt(build_ext):
    def build_extensions(self):
        ctype = self.compiler.compiler_type
        clang_cl = _use_clang_cl(self.compiler)
        if ctype == "msvc" and not clang_cl:
            raise RuntimeError(
                "bnfast's kernels need GCC or Clang (they use vector extensions); on "
                "Windows install LLVM and set BNFAST_CLANG_CL=clang-cl")
        omp = _probe_openmp(self.compiler)
        if clang_cl:
            cflags = ["/O2", "/clang:-ffp-contract=off", "/clang:-fno-strict-aliasing",
                      "-Wno-unknown-pragmas"]
            lflags = []
        else:
            cflags = ["-O3", "-ffp-contract=off", "-fno-strict-aliasing", "-Wno-psabi",
                      "-Wno-unknown-pragmas"]
            lflags = []
        if omp is not None:
            cflags += omp[0]
            lflags += omp[1]
        if not clang_cl and ctype != "msvc":
            if not any(f.startswith("-g") and f != "-g0"
                       for f in os.environ.get("CFLAGS", "").split()):
                cflags.append("-g0")   # debug information is most of the compile time
        jobs = _build_jobs(self.parallel)
        print(f"bnfast: compiling with {jobs} parallel job{'s' if jobs > 1 else ''}")

        # The kernels' loops start on a 64-byte boundary: a short hot loop that crosses
        # one ran up to 16 % slower on Zen 3 (the float32 rows walk of the inference of
        # (1, 64, 112, 112): 84 us aligned, 98 us when an unrelated change moved it across
        # a boundary; benchmarks/README.md item 76), so a change elsewhere no longer moves
        # the kernels' speed.  The binary grows by about 4 %.
        align = (["-falign-loops=64"]
                 if not clang_cl and _accepts_flag(self.compiler, "-falign-loops=64")
                 else [])

        def per_source_args(src):
            # The Cython bindings (argument handling; their per-channel loops are in
            # csrc/vectors.c): -O1 compiles in 1.5 s of CPU against 2.5-2.7 s at -O2 and
            # measured the same per call (2.7-23 us calls and C = 8192 backward, within 1 %).
            if not clang_cl and os.path.basename(src) == "_core.c":
                return ["-O1"]
            if os.path.basename(src).startswith("kernels_"):
                return align
            return []

        self._before = {}
        self._parallel = _parallel_compile(self.compiler, jobs, per_source_args, self._before)
        for ext in self.extensions:
            ext.extra_compile_args = cflags + list(ext.extra_compile_args or [])
            ext.extra_link_args = lflags + list(ext.extra_link_args or [])
        # A build left in build/ (pip builds in the source tree) is reused only when its
        # sources, headers and .pyx are older than it (setuptools' check) and it was made
        # with this configuration; otherwise everything is rebuilt.
        key = _build_key(self.compiler, cflags + align, lflags)
        stamp = os.path.join(self.build_temp, "bnfast-build-config.json")
        try:
            with open(stamp, encoding="utf-8") as f:
                reuse = f.read() == key
        except OSError:
            reuse = False
        if not reuse:
            self.force = True
        super().build_extensions()
        os.makedirs(self.build_temp, exist_ok=True)
        with open(stamp, "w", encoding="utf-8") as f:
            f.write(key)

    def build_extension(self, ext):
        # The bindings are compiled from the kept bnfast/_core.c; Cython runs only when that
        # file does not match its sources (bnfast_cython), here rather than when setup.py
        # is loaded (pip loads it three times), and with the parallel compile, in the job
        # that compiles its output.
        pyx = [s for s in ext.sources if s.endswith(".pyx")]
        if pyx:
            assert pyx == [bnfast_cython.PYX], pyx
            ext.sources = [s[:-4] + ".c" if s.endswith(".pyx") else s for s in ext.sources]
            # an edited .pyx or .pxd recompiles (its new translation is newer than the .o)
            ext.depends = list(ext.depends or []) + list(bnfast_cython.INPUTS)
            if bnfast_cython.needs_translation():
                self.force = True      # rebuild even when the .pyx is older than the build
                print(f"bnfast: translating {bnfast_cython.PYX} with Cython "
                      f"({bnfast_cython.OUTPUT} does not match its sources, or "
                      f"{bnfast_cython.FORCE_ENV} is set)")

                def translate():
                    bnfast_cython.translate()

                if getattr(self, "_parallel", False):
                    self._before[bnfast_cython.OUTPUT] = translate
                    _FIRST.add(bnfast_cython.OUTPUT)
                else:
                    translate()
        super().build_extension(ext)


EXTENSION = Extension(
    "bnfast._core",
    sources=SOURCES,
    include_dirs=bnfast_cython.INCLUDE_DIRS,   # bnfast/_npy_abi.h: no NumPy needed to build
    depends=DEPENDS,
)

setup(ext_modules=[EXTENSION], cmdclass={"build_ext": BuildExt})
