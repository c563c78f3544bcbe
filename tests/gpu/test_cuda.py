"""The CuPy GPU backend (bnfast.cuda).

Two groups:

- tests that run everywhere: importing bnfast needs no CuPy, show_config says why the GPU
  backend is unavailable, the CUDA sources are package data, ``bnfast bench --device cuda``
  exits with status 2 without a GPU, the NumPy path refuses CuPy arguments, and (with
  nvcc) every .cu compiles for sm_80 and sm_90 without a warning;
- tests on a GPU (skipped, with the reason, without CuPy or a CUDA device): the kernels'
  grid against the float64 twin and the CPU kernels, bit-identical repeated runs, the
  numerical edge cases, every documented error with the NumPy path's message, mixing
  errors, streams, and an nn training step against the CPU's.

``BNFAST_TEST_FAKE_CUPY=1 pytest tests/gpu/test_cuda.py`` runs the GPU tests without a GPU,
against the kernels' CUDA source compiled for the CPU behind a CuPy stand-in (see
test_cuda_launch.py): a check of these tests and of the kernels' code, not of a GPU.
"""
import importlib.resources
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import bnfast
import bnfast.cuda
from bnfast import reference as ref
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_cases import ERRORS, _message  # noqa: E402

from conftest import (assert_close, assert_same_bits, channel_abs_sum, channel_last,
                      make_params, make_stats, make_x, package_env, reduce_axes, rng_for)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CU_FILES = sorted(f for f in os.listdir(os.path.join(ROOT, "csrc", "cuda"))
                  if f.endswith(".cu")) if os.path.isdir(os.path.join(ROOT, "csrc", "cuda")) \
    else []

if os.environ.get("BNFAST_TEST_FAKE_CUPY"):
    # no GPU: the CUDA source on CPU threads behind a CuPy stand-in (test_cuda_launch.py)
    import test_cuda_launch  # noqa: E402

    test_cuda_launch.install_fake_cupy()
try:
    import cupy as cp
except Exception as exc:  # ImportError, or a broken CUDA installation
    cp = None
    _REASON = f"CuPy is not importable ({type(exc).__name__}: {exc})"
else:
    _REASON = bnfast.cuda.why_unavailable()
gpu = pytest.mark.skipif(_REASON is not None, reason=f"no GPU backend: {_REASON}")

# Run a snippet in a fresh interpreter where `import cupy` fails (as without CuPy).
NO_CUPY = "import sys; sys.modules['cupy'] = None\n"


def _run(code, *args, timeout=120):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=tempfile.gettempdir(), env=package_env(), timeout=timeout)


# ================================================================== everywhere

def test_import_bnfast_does_not_import_cupy():
    r = _run("import sys, bnfast, numpy as np\n"
             "x = np.ones((4, 3), np.float32)\n"
             "bnfast.batch_norm_train(x); bnfast.batch_norm_train(np.asfortranarray(x))\n"
             "print('cupy' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"


def test_without_cupy_bnfast_works_and_says_why():
    r = _run(NO_CUPY + "import bnfast, bnfast.cuda, numpy as np\n"
             "y, m, s = bnfast.batch_norm_train(np.arange(8.0).reshape(4, 2))\n"
             "assert not bnfast.cuda.available()\n"
             "print(bnfast.cuda.why_unavailable())\n"
             "print(bnfast.cuda.info())\n"
             "bnfast.show_config()")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("CuPy is not installed") and "bnfast[gpu]" in lines[0]
    gpu_lines = [ln for ln in lines if ln.strip().startswith("GPU")]
    assert len(gpu_lines) == 1, r.stdout
    assert "unavailable" in gpu_lines[0] and "CuPy is not installed" in gpu_lines[0]


def test_show_config_has_a_gpu_line():
    import io

    buf = io.StringIO()
    bnfast.show_config(file=buf)
    line = [ln for ln in buf.getvalue().splitlines() if ln.strip().startswith("GPU")]
    assert len(line) == 1
    if _REASON is None:
        assert "CuPy" in line[0] and "driver" in line[0]
    else:
        assert "unavailable" in line[0]


def test_kernel_sources_are_package_data():
    res = importlib.resources.files("bnfast.cuda").joinpath("kernels")
    names = {p.name for p in res.iterdir()}
    assert "bnfast.cu" in names and "bn_common.cuh" in names, names
    assert set(CU_FILES) <= names
    src = bnfast.cuda.kernel_source()
    assert "#include \"" not in src and "bn_stats_merge" in src and "BN_COMMON_CUH" in src
    assert "__global__" in src and "atomic" not in src.replace("atomics", "")
    if not os.path.isfile(os.path.join(ROOT, "pyproject.toml")):
        return                          # an installed wheel's tests: no source tree
    # declared for the wheel and the sdist
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        pyproject = f.read()
    assert '"cuda/kernels/*.cu"' in pyproject and '"cuda/kernels/*.cuh"' in pyproject
    assert 'gpu = ["cupy-cuda13x' in pyproject
    with open(os.path.join(ROOT, "MANIFEST.in"), encoding="utf-8") as f:
        assert "csrc/cuda" in f.read()


@pytest.mark.skipif(not CU_FILES, reason="needs the source checkout (csrc/cuda)")
@pytest.mark.skipif(
    not os.path.isdir(os.path.join(os.path.dirname(os.path.dirname(bnfast.__file__)),
                                   "csrc", "cuda")),
    reason="bnfast is not imported from a source checkout (an installed copy has no csrc/)")
def test_kernel_source_falls_back_to_the_checkout(monkeypatch):
    """Where the package data is missing (a checkout without the kernels link), the
    sources come from csrc/cuda."""
    real = importlib.resources.files

    class _Missing:
        def joinpath(self, *a):
            return self

        def is_file(self):
            return False

    monkeypatch.setattr(importlib.resources, "files",
                        lambda name: _Missing() if name == "bnfast.cuda" else real(name))
    assert "bn_stats_merge" in bnfast.cuda.kernel_source()


def test_bench_device_cuda_without_gpu_exits_2():
    r = _run(NO_CUPY + "import sys\nfrom bnfast.__main__ import main\n"
             "sys.exit(main(['bench', '--device', 'cuda', '--quick']))")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "cuda" in err[0] and "CuPy" in err[0], r.stderr
    assert "Traceback" not in r.stderr


def test_paper_device_option_without_gpu_exits_2():
    r = _run(NO_CUPY + "import sys\nfrom bnfast.paper.cli import main\n"
             "sys.exit(main(['mnist', '--device', 'cuda', '--steps', '1'], prog='bnfast paper'))")
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "CuPy" in r.stderr and "Traceback" not in r.stderr


class _FakeCupy:
    """An object whose type CuPy defined, as far as bnfast can tell without CuPy."""


_FakeCupy.__module__ = "cupy._core.core"


@pytest.mark.parametrize("where", ["weight", "dy", "out", "running_mean", "mean"])
def test_numpy_path_refuses_cupy_arguments(where):
    x = np.ones((4, 3))
    fake = _FakeCupy()
    with pytest.raises(TypeError, match=f"^{where} is a CuPy array .*x is a NumPy array"):
        if where == "weight":
            bnfast.batch_norm_train(x, fake)
        elif where == "dy":
            bnfast.batch_norm_backward(fake, x, np.zeros(3), np.ones(3))
        elif where == "out":
            bnfast.batch_norm_train(x, out=fake)
        elif where == "running_mean":
            bnfast.batch_norm_train(x, running_mean=fake, running_var=np.ones(3))
        else:
            bnfast.batch_norm_infer(x, fake, np.ones(3))


def _nvcc():
    return shutil.which(os.environ.get("NVCC", "nvcc"))


NVCC_FLAGS = ["-cubin", "-std=c++17", "--fmad=false", "-Werror", "all-warnings",
              "-Xptxas", "-v,-warn-spills,-warn-lmem-usage,-Werror"]


def _compile(path, arch, tmp):
    return subprocess.run([_nvcc(), f"-arch=sm_{arch}", *NVCC_FLAGS, "-o",
                           os.path.join(tmp, f"out_{arch}.cubin"), path],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("name", CU_FILES + ["<inlined for NVRTC>"])
def test_nvcc_compiles_without_warnings(name, arch, tmp_path):
    if name.startswith("<"):                       # the text NVRTC compiles at run time
        path = tmp_path / "inlined.cu"
        path.write_text(bnfast.cuda.kernel_source(), encoding="utf-8")
        path = str(path)
    else:
        path = os.path.join(ROOT, "csrc", "cuda", name)
    r = _compile(path, arch, str(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "warning" not in out.lower() and "error" not in out.lower(), out
    assert "Used" in out and "registers" in out          # ptxas reported
    reports = [ln for ln in out.splitlines() if "bytes spill stores" in ln]
    assert reports, out                                    # one per kernel
    spills = [ln for ln in reports if "0 bytes spill stores, 0 bytes spill loads" not in ln]
    assert not spills, spills


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("ftz", ["true", "false"])
def test_no_float32_instruction_flushes_subnormals(ftz, tmp_path):
    """CuPy appends -ftz=true to every NVRTC compile, after bnfast's -ftz=false (cupy/cuda/
    compiler.py; seen on an H200: float32 outputs of about 5e-39 stored as 0).  The kernels'
    float32 operations are PTX without .ftz, so the code NVRTC gets keeps IEEE subnormals
    under either flag: no .ftz instruction in its PTX.  (Without those helpers this source
    gave 530 .ftz instructions under -ftz=true, for sm_90.)"""
    src = tmp_path / "inlined.cu"
    src.write_text(bnfast.cuda.kernel_source(), encoding="utf-8")
    ptx = tmp_path / "out.ptx"
    opts = [o for o in bnfast.cuda.NVRTC_OPTIONS if not o.startswith("-ftz")]
    r = subprocess.run([_nvcc(), "-ptx", "-arch=sm_90", *opts, f"-ftz={ftz}", "-o", str(ptx),
                        str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    text = ptx.read_text()
    assert "cvt.f64.f32" in text and "add.rn.f32" in text     # the float32 helpers are used
    flushing = sorted({ln.split()[0] for ln in text.splitlines() if ".ftz" in ln})
    assert not flushing, flushing


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_nvcc_flags_turn_a_warning_into_an_error(tmp_path):
    """The compile check can fail: an unused variable is a warning, hence an error."""
    path = tmp_path / "bad.cu"
    path.write_text("__global__ void k(float *p) { int unused = 3; p[0] = 1.0f; }\n")
    r = _compile(str(path), "80", str(tmp_path))
    assert r.returncode != 0, r.stdout + r.stderr


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.skipif(not CU_FILES, reason="needs the source checkout (tools/)")
def test_cuda_compile_script():
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "cuda_compile.sh")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "registers" in r.stdout and "FAILED" not in r.stdout


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "tools", "gpu_check.sh")),
                    reason="needs the source checkout (tools/)")
def test_gpu_check_script_syntax():
    path = os.path.join(ROOT, "tools", "gpu_check.sh")
    assert os.access(path, os.X_OK), "tools/gpu_check.sh must be executable"
    r = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ================================================================== on a GPU

def D(a):
    """To the current GPU."""
    return None if a is None else cp.asarray(a)


def H(a):
    """To the host."""
    return cp.asnumpy(a) if cp is not None and isinstance(a, cp.ndarray) else np.asarray(a)


# shapes: the CPU grid's, plus ones that use several blocks and both GPU layouts
# (S >= 256: row layout; several row blocks; several column tiles and row blocks)
GPU_SHAPES = [(5, 3), (2, 1), (2, 17), (7, 65), (2, 7, 9), (3, 9, 1), (3, 4, 65),
              (4, 1, 129), (2, 3, 5, 7), (2, 5, 3, 3, 8), (16, 3, 300), (3, 2, 5000),
              (20000, 3), (300, 40), (8, 16, 20, 20), (64, 5, 30, 30)]


def _cases():
    out = []
    for shape in GPU_SHAPES:
        for ax in ([1] if len(shape) == 2 else [1, -1]):
            out.append(pytest.param(shape, ax, id=f"{'x'.join(map(str, shape))}-ax{ax}"))
    return out


grid = pytest.mark.parametrize("shape,axis", _cases())
dtypes = pytest.mark.parametrize("dtype", [np.float32, np.float64],
                                 ids=["float32", "float64"])


def _data(shape, axis, dtype):
    """Channel-axis-1 data of `shape`; for axis=-1 the same values channels-last."""
    rng = rng_for("gpu", shape, axis, np.dtype(dtype).name)
    x = make_x(rng, shape, dtype, axis=1)
    dy = rng.standard_normal(shape).astype(dtype)
    if axis == -1:
        x, dy = channel_last(x, 1), channel_last(dy, 1)
    C = shape[1]
    w, b = make_params(rng, C)
    rm, rv = make_stats(rng, C)
    return x, dy, w, b, rm, rv


@gpu
@grid
@dtypes
def test_moments(shape, axis, dtype):
    x, *_ = _data(shape, axis, dtype)
    mean, var = bnfast.moments(D(x), axis=axis)
    assert isinstance(mean, cp.ndarray) and mean.dtype == np.float64
    rmean, rvar = ref.moments(x, axis=axis)
    xmax = np.abs(x.astype(np.float64)).max(axis=reduce_axes(x.ndim, axis))
    assert_close(H(mean), rmean, scale=xmax, what="mean", rtol=1e-10)
    assert_close(H(var), rvar, scale=0.0, what="var", rtol=1e-10)
    cm, cv = bnfast.moments(x, axis=axis)          # the CPU kernels
    assert_close(H(mean), cm, scale=xmax, rtol=1e-12, what="mean vs CPU")
    assert_close(H(var), cv, scale=0.0, rtol=1e-12, what="var vs CPU")


@gpu
@grid
@dtypes
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_train(shape, axis, dtype, relu):
    x, _, w, b, rm0, rv0 = _data(shape, axis, dtype)
    rm, rv = D(rm0.astype(dtype)), D(rv0.astype(dtype))
    rm_ref, rv_ref = rm0.astype(dtype).astype(np.float64), rv0.astype(dtype).astype(np.float64)
    y, mean, invstd = bnfast.batch_norm_train(D(x), D(w), D(b), axis=axis, running_mean=rm,
                                              running_var=rv, momentum=0.3, relu=relu)
    ry, rmean, rinv = ref.batch_norm_train(x, w, b, axis=axis, running_mean=rm_ref,
                                           running_var=rv_ref, momentum=0.3, relu=relu)
    assert isinstance(y, cp.ndarray) and y.dtype == dtype and y.shape == x.shape
    assert y.device.id == cp.cuda.Device().id
    assert_close(H(y), ry, what="y")
    xmax = np.abs(x.astype(np.float64)).max(axis=reduce_axes(x.ndim, axis))
    assert_close(H(mean), rmean, dtype=np.float64, scale=xmax, what="mean")
    assert_close(H(invstd), rinv, dtype=np.float64, scale=0.0, what="invstd")
    assert_close(H(rm), rm_ref, scale=np.abs(rm_ref) + xmax, what="running_mean")
    assert_close(H(rv), rv_ref, scale=0.0, what="running_var")
    # against the CPU kernels: the statistics to float64 rounding, y to one ulp of dtype
    crm, crv = rm0.astype(dtype), rv0.astype(dtype)
    cy, cmean, cinv = bnfast.batch_norm_train(x, w, b, axis=axis, running_mean=crm,
                                              running_var=crv, momentum=0.3, relu=relu)
    assert_close(H(mean), cmean, dtype=np.float64, scale=xmax, rtol=1e-12, what="mean/CPU")
    assert_close(H(invstd), cinv, dtype=np.float64, scale=0.0, rtol=1e-12, what="inv/CPU")
    assert_close(H(y), cy, what="y vs CPU")


@gpu
@grid
@dtypes
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_infer_is_bit_identical_to_the_cpu(shape, axis, dtype, relu):
    """No reduction: the same IEEE operations as the CPU kernels (no FMA), same bits."""
    x, _, w, b, m, v = _data(shape, axis, dtype)
    y = bnfast.batch_norm_infer(D(x), D(m), D(v), D(w), D(b), eps=1e-3, axis=axis, relu=relu)
    ry = ref.batch_norm_infer(x, m, v, w, b, eps=1e-3, axis=axis, relu=relu)
    assert_close(H(y), ry, what="y")
    cy = bnfast.batch_norm_infer(x, m, v, w, b, eps=1e-3, axis=axis, relu=relu)
    assert_same_bits(H(y), cy, "infer GPU vs CPU")


@gpu
@grid
@dtypes
@pytest.mark.parametrize("training,relu", [(True, False), (False, False), (True, True),
                                           (False, True)],
                         ids=["train", "eval", "train-relu", "eval-relu"])
def test_backward(shape, axis, dtype, training, relu):
    x, dy, w, b, rm, rv = _data(shape, axis, dtype)
    if training:
        _, mean, invstd = ref.batch_norm_train(x, w, b, axis=axis)
    else:
        mean, invstd = rm, 1.0 / np.sqrt(rv + 1e-5)
    dx, dw, db = bnfast.batch_norm_backward(D(dy), D(x), D(mean), D(invstd), D(w), bias=D(b),
                                            relu=relu, training=training, axis=axis)
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, mean, invstd, w, bias=b, relu=relu,
                                            training=training, axis=axis)
    assert dx.dtype == dtype and dw.dtype == dtype and db.dtype == dtype
    C = x.shape[axis]
    bs = [1] * x.ndim
    bs[axis] = C
    xhat = (x.astype(np.float64) - mean.reshape(bs)) * invstd.reshape(bs)
    g = dy.astype(np.float64)
    if relu:
        g = np.where(xhat * w.reshape(bs) + b.reshape(bs) > 0, g, 0.0)
    assert_close(H(db), rdb, scale=channel_abs_sum(g, axis), what="dbias")
    assert_close(H(dw), rdw, scale=channel_abs_sum(g * xhat, axis), what="dweight")
    m = x.size // C
    k = np.abs(w * invstd)
    scale = np.max(k * (np.abs(g).max() + np.abs(xhat).max() * np.abs(rdw) / m
                        + np.abs(rdb) / m))
    assert_close(H(dx), rdx, scale=scale, what="dx")
    cdx, cdw, cdb = bnfast.batch_norm_backward(dy, x, mean, invstd, w, bias=b, relu=relu,
                                               training=training, axis=axis)
    if not training:          # dx = weight * invstd * dy: no reduction, the CPU's bits
        assert_same_bits(H(dx), cdx, "eval dx GPU vs CPU")
    assert_close(H(dx), cdx, scale=scale, what="dx vs CPU")


@gpu
@pytest.mark.parametrize("N,C,S", [(16, 3, 300), (4, 5, 600), (64, 20, 1), (8, 24, 25)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float32_dx_from_the_same_coefficients_is_the_cpus(N, C, S, training):
    """dx of float32 data without the ReLU from the same float64 coefficients: the GPU's
    float32 formula (bn_dx<float>, row and column kernels) gives the CPU kernels' bits,
    with NaN, infinite and huge inputs, a mean beyond float32, a kd flushed to zero and a
    subnormal kx taking the float64 value.  (batch_norm_backward's own dx differs from the
    CPU's through the order of the GPU's sums, which moves kx and k0.)"""
    from bnfast import _core
    from bnfast.cuda import _backend
    rng = rng_for("gpu-dx-bits", N, C, S)
    x = (rng.standard_normal((N, C, S)) * 3 + 0.5).astype(np.float32)
    dy = (rng.standard_normal((N, C, S)) + 0.2).astype(np.float32)
    x.flat[::97], x.flat[5::101], dy.flat[7::89] = np.nan, np.inf, np.float32(3e38)
    m = rng.standard_normal(C)
    inv = 1 / np.sqrt(rng.random(C) + 0.1)
    w = rng.standard_normal(C)
    kx, k0 = rng.standard_normal(C) * 0.3, rng.standard_normal(C) * 0.3
    m[0], w[-1], kx[C // 2] = 1e39, 1e-46, 1e-41
    want = np.empty_like(x)
    _core.backward_dx(dy, x, want, N, C, S, m, inv, w, None, kx, k0, False, training, 1)
    gx = D(x)
    got = cp.empty(x.shape, np.float32)
    _backend.backend_for(gx).backward_dx(D(dy), gx, got, N, C, S, D(m), D(inv), D(w), None,
                                         D(kx), D(k0), False, training)
    assert_same_bits(H(got), want, "dx GPU vs CPU")


@gpu
@pytest.mark.parametrize("shape,axis", [((64, 32, 28, 28), 1), ((64, 28, 28, 32), -1),
                                        ((4096, 256), 1), ((8, 3, 70000), 1)])
@dtypes
def test_two_runs_are_bit_identical(shape, axis, dtype):
    rng = rng_for("det", shape, axis)
    x = D(rng.standard_normal(shape).astype(dtype) * 3 + 1)
    dy = D(rng.standard_normal(shape).astype(dtype))
    C = shape[axis]
    w, b = D(rng.uniform(0.5, 2, C)), D(rng.standard_normal(C))

    def run():
        rm, rv = cp.zeros(C, dtype), cp.ones(C, dtype)
        y, m, s = bnfast.batch_norm_train(x, w, b, axis=axis, running_mean=rm,
                                          running_var=rv, relu=True)
        dx, dw, db = bnfast.batch_norm_backward(dy, x, m, s, w, bias=b, relu=True,
                                                axis=axis)
        mom = bnfast.moments(x, axis=axis)
        return [H(a) for a in (y, m, s, rm, rv, dx, dw, db) + mom]

    first, second = run(), run()
    for i, (a, c) in enumerate(zip(first, second)):
        assert_same_bits(a, c, f"output {i}")


@gpu
@pytest.mark.parametrize("shape", [(16, 3, 300), (64, 3, 30, 30), (4000, 3), (16, 3, 5)])
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("value", [1e7, -1e7, 123456.75])
def test_constant_float32_channel_normalises_to_exactly_beta(shape, layout, value):
    x = rng_for("const", shape, value).standard_normal(shape).astype(np.float32)
    x[:, 1] = np.float32(value)
    axis = 1
    if layout == "last":
        x, axis = channel_last(x, 1), -1
    w, b = np.array([2.0, 3.0, 4.0]), np.array([0.5, 0.25, -3.0])
    y, mean, invstd = bnfast.batch_norm_train(D(x), D(w), D(b), axis=axis)
    yc = np.take(H(y), 1, axis=axis)
    assert np.array_equal(yc, np.full(yc.shape, np.float32(0.25))), np.unique(yc)
    m, v = bnfast.moments(D(x), axis=axis)
    assert H(m)[1] == np.float32(value) and H(v)[1] == 0.0
    assert H(invstd)[1] == 1.0 / np.sqrt(1e-5)
    dx, dw, db = bnfast.batch_norm_backward(D(np.ones_like(x)), D(x), mean, invstd,
                                            axis=axis)
    assert np.array_equal(np.take(H(dx), 1, axis=axis), np.zeros(yc.shape, np.float32))


@gpu
@pytest.mark.parametrize("shape", [(16, 3, 300), (20000, 3), (64, 3, 30, 30)])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_float32_large_mean_tiny_std(shape, layout):
    """mean 1e6, std 1e-2 (float32 spacing there is 0.0625): the variance to 1e-3."""
    rng = rng_for("1e6", shape, layout)
    p = 0.0256
    k = rng.choice([-1.0, 0.0, 1.0], size=shape, p=[p / 2, 1 - p, p / 2])
    k[0, :], k[1, :] = 1.0, -1.0
    x = (np.float32(1e6) + np.float32(0.0625) * k).astype(np.float32)
    axis = 1
    if layout == "last":
        x, axis = channel_last(x, 1), -1
    rvar = np.var(x.astype(np.float64), axis=reduce_axes(x.ndim, axis))
    _, var = bnfast.moments(D(x), axis=axis)
    assert np.all(np.abs(H(var) - rvar) <= 1e-3 * rvar), (H(var), rvar)


@gpu
@pytest.mark.parametrize("shape", [(50, 3, 300), (5000, 3)])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_float32_magnitude_1e30_is_finite(shape, layout):
    x = (1e30 * rng_for("1e30", shape).standard_normal(shape)).astype(np.float32)
    axis = 1
    if layout == "last":
        x, axis = channel_last(x, 1), -1
    rvar = np.var(x.astype(np.float64), axis=reduce_axes(x.ndim, axis))
    rm, rv = cp.zeros(3), cp.ones(3)
    y, mean, invstd = bnfast.batch_norm_train(D(x), axis=axis, running_mean=rm,
                                              running_var=rv)
    assert np.all(np.isfinite(H(y))) and np.all(np.isfinite(H(invstd)))
    assert np.allclose(1.0 / H(invstd) ** 2, rvar, rtol=1e-12)
    assert np.all(np.isfinite(H(rv)))
    dx, dw, db = bnfast.batch_norm_backward(D(np.ones_like(x)), D(x), mean, invstd, axis=axis)
    assert all(np.all(np.isfinite(H(a))) for a in (dx, dw, db))


@gpu
def test_float64_near_the_largest_double_uses_the_fixup():
    x = np.array([[1.7e308, 1.0], [-1.7e308, 2.0], [1.6e308, 3.0]])
    gm, gv = bnfast.moments(D(x))
    cm, cv = bnfast.moments(x)
    assert np.isfinite(H(gm)).all() and np.isclose(H(gm)[0], cm[0], rtol=1e-14)
    assert np.isinf(H(gv)[0]) == np.isinf(cv[0])
    xi = np.array([[np.inf, 1.0], [1.0, 2.0]])
    gm, gv = bnfast.moments(D(xi))
    assert H(gm)[0] == np.inf and np.isnan(H(gv)[0])


@gpu
@pytest.mark.parametrize("layout", ["first", "last"])
def test_nan_in_one_channel_leaves_the_others_and_is_canonical(layout):
    x = rng_for("nan", layout).standard_normal((8, 4, 300))
    clean = x.copy()
    x[3, 2, 7] = np.nan
    axis = 1
    if layout == "last":
        x, clean, axis = channel_last(x, 1), channel_last(clean, 1), -1
    y, m, s = bnfast.batch_norm_train(D(x), axis=axis)
    yc, mc, sc = bnfast.batch_norm_train(D(clean), axis=axis)
    for c in (0, 1, 3):
        assert_same_bits(np.take(H(y), c, axis=axis), np.take(H(yc), c, axis=axis))
    nan_bits = np.take(H(y), 2, axis=axis).view(np.uint64)
    assert (nan_bits == np.float64(np.nan).view(np.uint64)).all()
    # float32 gradients: the per-channel results are cast from float64 with NumPy's NaN
    x32 = x.astype(np.float32)
    _, m32, s32 = bnfast.batch_norm_train(x32, axis=axis)
    dx, dw, db = bnfast.batch_norm_backward(D(x32), D(x32), D(m32), D(s32), axis=axis)
    cdx, cdw, cdb = bnfast.batch_norm_backward(x32, x32, m32, s32, axis=axis)
    assert_same_bits(H(dw), cdw, "dweight float32")
    assert_same_bits(H(db), cdb, "dbias float32")


def _f32_fallback_case(shape):
    """float32 data (channel axis 1) and statistics whose float32 normalisation cannot
    carry some elements or whole channels, with the channels that must take the double
    formula throughout."""
    rng = rng_for("f32-fallback", shape)
    C = 7
    x = rng.standard_normal(shape)
    mean, var = rng.uniform(-0.5, 0.5, C), rng.uniform(0.5, 2.0, C)
    w, b = rng.uniform(0.5, 2.0, C), rng.uniform(-0.5, 0.5, C)
    # 0: values near +-3.4e38, mean ~0, scale 10: (x - mh) * af overflows float32 (and the
    #    double value is out of float32's range too: +-inf, or 0 with the ReLU)
    x[:, 0] = rng.uniform(-3.4e38, 3.4e38, x[:, 0].shape)
    w[0], b[0] = 10.0, 0.0
    # 1: x - mh = 3e38 - (-3e38) overflows float32 where the double result (<= 3.2e38)
    #    does not; other elements of the channel stay in float32
    x[:, 1] = rng.uniform(-3.4e38, 3.4e38, x[:, 1].shape)
    mean[1], var[1], w[1], b[1] = -3.0e38, 1.0, 0.5, 0.0
    # 2: infinite and NaN elements among ordinary ones
    flat = x[:, 2].reshape(-1)
    flat[::7], flat[3::11], flat[5::13] = np.inf, -np.inf, np.nan
    x[:, 2] = flat.reshape(x[:, 2].shape)
    # 3: a scale subnormal in float32 (1e-39): the whole channel in double
    w[3], var[3], b[3], x[:, 3] = 1e-39, 1.0, 0.0, 5.0 * x[:, 3]
    # 4: a mean beyond float32 (1e39): the whole channel in double
    mean[4], w[4] = 1e39, 1e-3
    # 5: values near 3e38, scale 10 and a shift (-3e39, beyond float32) that brings the
    #    double result back into range: the whole channel in double
    x[:, 5] = rng.uniform(2.9e38, 3.4e38, x[:, 5].shape)
    mean[5], var[5], w[5], b[5] = 0.0, 1.0, 10.0, -3.1e39
    # 6: an ordinary channel, half of it below zero; x = -0.0 gives y = -0.0 (mean 0, bias
    #    -0.0: (-0 - 0) * af + -0), which the ReLU stores as +0.0
    mean[6], w[6], b[6] = 0.0, 1.0, -0.0
    flat = x[:, 6].reshape(-1)
    flat[::5] = -0.0
    x[:, 6] = flat.reshape(x[:, 6].shape)
    return x.astype(np.float32), mean, var, w, b, (3, 4, 5)


@gpu
@pytest.mark.parametrize("shape,layout", [((4, 7, 300), "first"), ((4, 7, 300), "last"),
                                          ((600, 7), "first"), ((3, 7, 5), "first")],
                         ids=["rows", "columns-last", "2d", "small"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_float32_elements_float32_cannot_carry_take_the_double_formula(shape, layout, relu):
    """The float32 normalisation's fallback (csrc/bn_elementwise.h, normalize_f32): where
    t = (x - mh) * af + bf is not finite, and in channels whose float32 parameters are not
    finite or whose scale is subnormal, float32((x - m) * a + b) in double -- the CPU's
    bits, canonical NaNs included."""
    x, mean, var, w, b, whole = _f32_fallback_case(shape)
    axis = 1
    if layout == "last":
        x, axis = channel_last(x, 1), -1
    eps = 1e-3
    with np.errstate(all="ignore"):
        y = H(bnfast.batch_norm_infer(D(x), D(mean), D(var), D(w), D(b), eps=eps, axis=axis,
                                      relu=relu))
        cy = bnfast.batch_norm_infer(x, mean, var, w, b, eps=eps, axis=axis, relu=relu)
        assert_same_bits(y, cy, "infer GPU vs CPU")
        yc = lambda c: np.take(y, c, axis=axis)          # noqa: E731
        a = (1.0 / np.sqrt(var + eps)) * w              # the scale as the kernels compute it
        for c in whole:                                  # the double formula throughout
            v = (np.take(x, c, axis=axis).astype(np.float64) - mean[c]) * a[c] + b[c]
            if relu:
                v = np.where(v <= 0.0, 0.0, v)
            assert_same_bits(yc(c), v.astype(np.float32), f"channel {c}")
    assert np.isfinite(yc(1)).all() and np.isfinite(yc(5)).all()
    assert np.isinf(yc(0)).any() and (not relu or (yc(0) == 0).any())
    nan2 = np.isnan(yc(2))
    assert nan2.any() and (yc(2)[nan2].view(np.uint32) == 0x7fc00000).all()
    assert (yc(3) != 0).any() and (np.abs(yc(3)) < 1e-36).all()   # ~1e-39 x: subnormals
    assert ((yc(6) == 0) & np.signbit(yc(6))).any() != relu
    # the training forward runs the same kernels (its statistics may differ from the
    # CPU's in the last bits: the CPU's output to float32 rounding, its NaNs bit for bit)
    xt = np.take(x, [2, 6], axis=axis)
    yt = H(bnfast.batch_norm_train(D(xt), axis=axis, relu=relu)[0])
    ct = bnfast.batch_norm_train(xt, axis=axis, relu=relu)[0]
    assert_close(yt, ct, what="train vs CPU")
    assert np.isnan(yt).any()
    assert_same_bits(yt[np.isnan(yt)], ct[np.isnan(ct)], "train NaNs")


@gpu
def test_float32_subnormals_are_kept_as_on_the_cpu():
    """Subnormal float32 inputs, parameters and outputs: the GPU keeps them (CuPy compiles
    with -ftz=true, which would flush them) and gives the CPU's results."""
    rng = rng_for("f32-subnormal")
    tiny = np.float32(1e-40)
    x = rng.standard_normal((8, 3, 20)).astype(np.float32)
    x[:, 0] *= tiny                                  # a channel of subnormal data
    # training forward: the statistics of the subnormal channel are not zero
    yg, mg, ig = bnfast.batch_norm_train(D(x))
    yc, mc, ic = bnfast.batch_norm_train(x)
    assert H(mg)[0] != 0 and np.isfinite(H(ig)[0])
    assert_close(H(mg), mc, rtol=1e-12, what="mean")
    assert_close(H(yg), yc, what="train y")
    # inference with float32 parameters holding subnormals, and subnormal outputs
    mean = np.array([0.0, 0.0, 1e-39], np.float32)
    var = np.ones(3, np.float32)
    w = np.array([1.0, 1e-39, 1.0], np.float32)
    b = np.array([1e-41, 0.0, -1e-39], np.float32)
    for relu in (False, True):
        g = H(bnfast.batch_norm_infer(D(x), D(mean), D(var), D(w), D(b), relu=relu))
        c = bnfast.batch_norm_infer(x, mean, var, w, b, relu=relu)
        assert_same_bits(g, c, f"infer relu={relu}")
        assert (g[:, 1] != 0).any() and (np.abs(g[:, 1]) < 1e-37).all()
    # backward: float32 dweight and dbias of subnormal size
    dy = (rng.standard_normal(x.shape) * 1e-41).astype(np.float32)
    dxg, dwg, dbg = bnfast.batch_norm_backward(D(dy), D(x), mg, ig, D(w))
    dxc, dwc, dbc = bnfast.batch_norm_backward(dy, x, mc, ic, w)
    assert dwg.dtype == np.float32 and np.abs(H(dbg)).max() < 1.2e-38 and (H(dbg) != 0).all()
    assert_same_bits(H(dbg), dbc, "dbias")
    assert_close(H(dwg), dwc, what="dweight")
    assert_close(H(dxg), dxc, what="dx")


@gpu
def test_out_in_place_and_non_contiguous_inputs():
    rng = rng_for("inplace")
    x = rng.standard_normal((6, 5, 40)).astype(np.float32)
    want, _, _ = bnfast.batch_norm_train(x)
    xg = D(x)
    y, _, _ = bnfast.batch_norm_train(xg, out=xg)
    assert y is xg
    assert_close(H(y), want, rtol=1e-6, what="in place")
    # a transposed view and a strided slice
    xt = D(x).transpose(0, 2, 1)
    yt, _, _ = bnfast.batch_norm_train(xt, axis=-1)
    assert_close(H(yt), np.ascontiguousarray(want.transpose(0, 2, 1)), rtol=1e-6,
                 what="transposed")
    wide = np.concatenate([x, x], axis=2)
    ys, _, _ = bnfast.batch_norm_train(D(wide)[:, :, ::2])
    ws, _, _ = bnfast.batch_norm_train(wide[:, :, ::2])
    assert_close(H(ys), ws, rtol=1e-6, what="strided")


@gpu
def test_runs_on_the_current_stream():
    x = D(rng_for("stream").standard_normal((32, 8, 300)))
    want = H(bnfast.batch_norm_train(x)[0])
    with cp.cuda.Stream(non_blocking=True) as s:
        y = bnfast.batch_norm_train(x)[0]
        s.synchronize()
    assert_same_bits(H(y), want)


@gpu
def test_momentum_none_with_a_cupy_counter():
    x = D(np.arange(12.0).reshape(6, 2))
    rm, rv = cp.zeros(2), cp.ones(2)
    bnfast.batch_norm(x, rm, rv, training=True, momentum=None,
                      num_batches_tracked=cp.asarray(1))
    crm, crv = np.zeros(2), np.ones(2)
    bnfast.batch_norm(H(x), crm, crv, training=True, momentum=None, num_batches_tracked=1)
    assert_close(H(rm), crm, rtol=1e-15, what="running_mean")
    assert_close(H(rv), crv, rtol=1e-15, what="running_var")


# ------------------------------------------------------------------ errors: same messages



@gpu
@pytest.mark.parametrize("case", list(ERRORS))
def test_every_documented_error_has_the_cpu_message(case):
    fn, args, kw = ERRORS[case]
    want = _message(fn, *args, **kw)
    assert want is not None, "the NumPy call must fail"

    def dev(a):
        return D(a) if isinstance(a, np.ndarray) else a

    got = _message(fn, *(dev(a) for a in args), **{k: dev(v) for k, v in kw.items()})
    assert got == want


@gpu
def test_mixing_numpy_and_cupy_names_the_argument():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match=r"^weight must be a cupy.ndarray on device \d+ like x, "
                                        r"got numpy.ndarray"):
        bnfast.batch_norm_train(D(x), np.ones(3))
    with pytest.raises(TypeError, match=r"^out must be a cupy.ndarray, got numpy.ndarray"):
        bnfast.batch_norm_train(D(x), out=x)
    with pytest.raises(TypeError, match=r"^running_mean must be a cupy.ndarray \(it is updated"):
        bnfast.batch_norm_train(D(x), running_mean=np.zeros(3), running_var=cp.ones(3))
    with pytest.raises(TypeError, match=r"^dy must be a cupy.ndarray"):
        bnfast.batch_norm_backward(x, D(x), cp.zeros(3), cp.ones(3))
    if not isinstance(D(x), np.ndarray):    # (the stand-in's arrays are NumPy arrays)
        with pytest.raises(TypeError, match=r"^out is a CuPy array .* x is a NumPy array"):
            bnfast.batch_norm_train(x, out=D(x))
    with pytest.raises(TypeError, match=r"^weight must be a cupy.ndarray .*got list"):
        bnfast.batch_norm_train(D(x), [1.0, 1.0, 1.0])


@gpu
@pytest.mark.skipif(cp is None or cp.cuda.runtime.getDeviceCount() < 2,
                    reason="needs two CUDA devices")
def test_arrays_on_two_devices_are_refused():
    with cp.cuda.Device(0):
        x = cp.ones((4, 3), cp.float32)
    with cp.cuda.Device(1):
        w = cp.ones(3)
    with pytest.raises(ValueError, match=r"^weight is on CUDA device 1 but x is on device 0"):
        bnfast.batch_norm_train(x, w)
    with cp.cuda.Device(1):                  # computed on x's device whatever is current
        y, _, _ = bnfast.batch_norm_train(x)
    assert y.device.id == 0


# ------------------------------------------------------------------ nn on the GPU

@gpu
def test_nn_training_step_on_gpu_matches_cpu():
    """One SGD step of Linear -> BatchNorm1d -> ReLU -> Linear, on the GPU (model.to) and
    on the CPU from the same initial parameters: equal within float32 rounding."""
    from bnfast import nn, optim
    from bnfast.train import Trainer

    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 20), dtype=np.float32)
    y = (X[:, :3].sum(axis=1) > 0).astype(np.int64)

    def make():
        r = np.random.default_rng(1)
        return nn.Sequential(nn.Linear(20, 16, rng=r), nn.BatchNorm1d(16), nn.ReLU(),
                             nn.Linear(16, 2, rng=r))

    cpu_model, gpu_model = make(), make()
    if not hasattr(gpu_model, "to"):
        pytest.skip("bnfast.nn has no Module.to yet")
    gpu_model.to("cuda")
    states = []
    for model, move in ((cpu_model, lambda a: a), (gpu_model, D)):
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        trainer = Trainer(model, nn.CrossEntropyLoss(), opt)
        loss, _ = trainer.train_step(move(X), move(y))
        states.append((float(loss), {k: H(v) for k, v in model.state_dict().items()}))
    (lc, sc), (lg, sg) = states
    assert abs(lc - lg) <= 1e-5 * max(1.0, abs(lc))
    assert sc.keys() == sg.keys()
    for k in sc:
        np.testing.assert_allclose(sg[k], sc[k], rtol=2e-5, atol=2e-6, err_msg=k)
