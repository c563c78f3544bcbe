"""Build script for bnfast's compiled extension.

Everything declarative lives in pyproject.toml; this file exists because the extension needs
an OpenMP probe: a tiny program is compiled, linked and run with each candidate flag set.
Without a working OpenMP the extension is built serially (with a warning).
``BNFAST_NO_OPENMP=1`` forces the serial build.

No fast-math style flags are used: the kernels rely on IEEE semantics (NaN propagation,
no reassociation).  ``-ffp-contract=off`` keeps every instruction-set variant bit-identical.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

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

SOURCES = [
    "bnfast/_core.pyx",
    "csrc/dispatch.c",
    "csrc/kernels_baseline.c",
    "csrc/kernels_avx2.c",
    "csrc/kernels_avx512.c",
]


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


def _use_clang_cl(compiler):
    """On Windows, compile with LLVM's clang-cl (BNFAST_CLANG_CL names it).

    The kernels use GCC/Clang vector extensions, which MSVC's cl.exe does not accept;
    clang-cl takes MSVC-style options and links with the MSVC toolchain.
    """
    exe = os.environ.get("BNFAST_CLANG_CL", "").strip()
    if compiler.compiler_type != "msvc" or not exe:
        return False
    if not getattr(compiler, "initialized", True):
        compiler.initialize()
    compiler.cc = exe
    return True


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
        for ext in self.extensions:
            ext.extra_compile_args = cflags + list(ext.extra_compile_args or [])
            ext.extra_link_args = lflags + list(ext.extra_link_args or [])
        super().build_extensions()


def _extensions():
    from Cython.Build import cythonize

    ext = Extension(
        "bnfast._core",
        sources=SOURCES,
        include_dirs=["csrc", np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
        depends=["csrc/bnfast.h", "csrc/bn_impl.h", "csrc/bn_impl_dtype.h"],
    )
    return cythonize([ext], compiler_directives={"language_level": "3"})


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
