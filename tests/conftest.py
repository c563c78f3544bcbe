"""Shared fixtures and helpers for the bnfast test suite.

Test modules import the helpers with ``from conftest import ...``; the alias registered
below makes that name refer to this very module under pytest's ``--import-mode=importlib``
(where pytest imports it as ``tests.conftest``), so it is not imported twice.
"""
import os
import sys
import tempfile

import numpy as np
import pytest

import bnfast

sys.modules.setdefault("conftest", sys.modules.get(__name__))

# keep hypothesis's files (failing-example patches) out of the source tree
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY",
                      os.path.join(tempfile.gettempdir(), "bnfast-tests-hypothesis"))

try:  # hypothesis is a test dependency, but keep the non-property tests importable
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "bnfast", deadline=None, derandomize=True, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    settings.load_profile("bnfast")
except ImportError:  # pragma: no cover
    pass

ISAS = bnfast.available_isas()
THREADS = (1, 2, 3)
DTYPES = (np.float32, np.float64)

# relative tolerance per dtype (the kernels work in float64 and round once to the storage type)
RTOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-10}

# largest normwise error seen against the float64 twin, per dtype and quantity kind
MAX_ERR = {}


# ------------------------------------------------------------------ fixtures

@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test with each kernel variant this CPU supports."""
    with bnfast.use_isa(request.param):
        assert bnfast.get_isa() == request.param
        yield request.param


@pytest.fixture(params=THREADS, ids=lambda n: f"t{n}")
def nthreads(request):
    with bnfast.num_threads(request.param):
        assert bnfast.get_num_threads() == request.param
        yield request.param


@pytest.fixture
def threshold_16mib():
    """The streaming threshold at 16 MiB (the default where the last-level cache's size is
    unknown; the default is the LLC's size, 32 MiB on the development machine), for tests
    that assert the paths of that threshold: (4096, 512) float32's x and dy (16 MiB) are
    then not cache-resident, and its backward sums take the memory walk.  Modules use it
    with ``pytestmark = pytest.mark.usefixtures("threshold_16mib")``."""
    from bnfast import _config

    with _config._stream_min_bytes(16 << 20):
        yield


@pytest.fixture(autouse=True)
def _restore_global_state():
    """No test may leak a thread-count override or a forced kernel variant."""
    isa_before = bnfast.get_isa()
    yield
    bnfast.set_num_threads(None)
    bnfast.set_isa(isa_before)


def pytest_terminal_summary(terminalreporter):
    if not MAX_ERR:
        return
    terminalreporter.section("bnfast: largest error vs. the float64 twin (bnfast.reference)")
    terminalreporter.write_line("input    quantity   max |got - ref| / max(|ref|, scale)")
    for (dt, kind), (err, where) in sorted(MAX_ERR.items()):
        terminalreporter.write_line(f"{dt:8s} {kind:10s} {err:.3e}   ({where})")


# ------------------------------------------------------------------ data

def rng_for(*key):
    """A deterministic generator for a test, seeded from a tuple of ints/strings."""
    # (not hash(): it is salted per process)
    seed = [int.from_bytes(str(k).encode(), "little") % (2 ** 61) for k in key]
    return np.random.default_rng(seed)


def make_x(rng, shape, dtype, axis=1, loc=0.5, scale=1.5, spread=True):
    """Random batch; with `spread`, each channel gets its own offset and scale."""
    x = rng.standard_normal(shape)
    if spread and len(shape) >= 2:
        C = shape[axis]
        bshape = [1] * len(shape)
        bshape[axis] = C
        x = x * rng.uniform(0.5, 2.0, C).reshape(bshape) + rng.uniform(-2, 2, C).reshape(bshape)
    return (loc + scale * x).astype(dtype)


def make_params(rng, C, dtype=np.float64):
    """weight (nonzero, both signs), bias."""
    w = rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)
    b = rng.standard_normal(C)
    return w.astype(dtype), b.astype(dtype)


def make_stats(rng, C, dtype=np.float64):
    """A plausible (mean, var) pair of running statistics."""
    return rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2.0, C).astype(dtype)


def channel_last(x, axis):
    """x with the channel axis moved last, as a C-contiguous array."""
    return np.ascontiguousarray(np.moveaxis(x, axis, -1))


def reduce_axes(ndim, axis):
    axis %= ndim
    return tuple(i for i in range(ndim) if i != axis)


# ------------------------------------------------------------------ comparisons

def _record(dtype, kind, err, where):
    key = (np.dtype(dtype).name, kind)
    if err > MAX_ERR.get(key, (-1.0, ""))[0]:
        MAX_ERR[key] = (float(err), where)


def assert_close(actual, expected, dtype=None, scale=None, rtol=None, what="", kind=None,
                 src=None):
    """Compare a bnfast result with the float64 twin.

    The bound is ``|a - e| <= rtol * (|e| + scale)``: `scale` (scalar or broadcastable array)
    is the magnitude the result was computed from, e.g. ``max |y|`` for an element-wise
    output or ``sum |terms|`` for a reduction, so that cancellation is judged fairly.
    With `kind`, the normwise error is recorded for the end-of-run summary under the dtype
    of the input data `src` (default: the result's dtype).
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    dtype = np.dtype(dtype if dtype is not None else actual.dtype)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if rtol is None:
        rtol = RTOL[dtype]
    a = actual.astype(np.float64)
    if scale is None:
        scale = np.max(np.abs(expected), initial=0.0)
    scale = np.asarray(scale, dtype=np.float64)
    if scale.ndim == 0:
        scale = np.maximum(scale, np.finfo(np.float64).tiny)
    nan_a, nan_e = np.isnan(a), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), f"{what}: NaN pattern differs"
    a, e = np.where(nan_a, 0.0, a), np.where(nan_e, 0.0, expected)
    diff = np.abs(a - e)
    bound = rtol * (np.abs(e) + scale)
    if kind is not None and diff.size:
        # normwise: largest |error| over the magnitude of the result or of what it was
        # computed from (a training-mode dx can be ~0 by cancellation)
        norm = max(np.max(np.abs(e)), np.max(scale))
        _record(src if src is not None else dtype, kind,
                np.max(diff) / norm if norm > 0 else np.max(diff), what)
    bad = diff > bound
    if bad.any():
        i = np.unravel_index(np.argmax(diff - bound), diff.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {diff.size} values differ beyond "
            f"rtol={rtol:g} (scaled); worst at {i}: got {a[i]!r}, expected {e[i]!r}, "
            f"|diff|={diff[i]:.3e} > bound {bound[i]:.3e}")


def channel_abs_sum(terms, axis):
    """Per-channel sum of |terms| (the scale of a reduction's rounding error)."""
    return np.abs(np.asarray(terms, dtype=np.float64)).sum(axis=reduce_axes(terms.ndim, axis))


def same_bits(a, b):
    """True when two arrays have the same dtype, shape and bytes (NaN-safe)."""
    a, b = np.asarray(a), np.asarray(b)
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                               np.ascontiguousarray(b).view(np.uint8)))


def assert_same_bits(a, b, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    if not same_bits(a, b):
        ua = np.ascontiguousarray(a).view(np.uint8).reshape(a.size, -1) if a.size else a
        ub = np.ascontiguousarray(b).view(np.uint8).reshape(b.size, -1) if b.size else b
        nbad = int((ua != ub).any(axis=1).sum()) if a.size else 0
        raise AssertionError(f"{what}: {nbad} of {a.size} values are not bit-identical")


# ---- the float32 element-wise formulas in NumPy, bit for bit (NumPy's float32 loops round
# each operation once, as the kernels do): csrc/bn_elementwise.h (ew_f32) and the CUDA
# kernels (bn_norm<float>, bn_dx<float> in csrc/cuda/bn_common.cuh); used by
# tests/kernels/test_f32_arith.py and tests/gpu/test_cuda_launch.py.

def f32_scale(d):
    """(float32)d, NaN where float32 holds a nonzero d only as a subnormal or as zero (the
    kernels' f32_scale: such a channel takes the float64 formula)."""
    d = np.asarray(d, np.float64)
    f = d.astype(np.float32)
    ok = ((f == 0) & (d == 0)) | (np.abs(f) >= np.finfo(np.float32).tiny)
    return np.where(ok, f, np.float32(np.nan)).astype(np.float32)


def _canonical_f32(y):
    return np.where(np.isnan(y), np.float32(np.nan), y).astype(np.float32)


def norm_f32(x, m, a, b, relu, v):
    """The normalisation of float32 x in float32: per channel mh = f32(m), af = f32(a),
    bf = f32(b - (m - mh) a) (m, a, b float64, broadcast against x); per element
    t = (x - mh) * af + bf, the ReLU after the finiteness test; v (the float64 formula's
    value) where t is not finite or a parameter does not fit float32; NaN canonical."""
    f32 = np.float32
    m, a, b = (np.asarray(p, np.float64) for p in (m, a, b))
    with np.errstate(all="ignore"):
        mh, af = m.astype(f32), f32_scale(a)
        bf = (b - (m - mh.astype(np.float64)) * a).astype(f32)
        ok = np.isfinite(mh) & np.isfinite(af) & np.isfinite(bf)
        mh, af, bf = np.where(ok, mh, f32(0)), np.where(ok, af, f32(np.nan)), \
            np.where(ok, bf, f32(0))
        t = (x - mh) * af + bf                     # three float32 operations
        fin = np.isfinite(t)
        if relu:
            t = np.where(t <= 0, f32(0), t)
        y = np.where(fin, t, np.asarray(v).astype(f32))
    return _canonical_f32(y)


def dx_f32(dy, x, m, kd, kx, k0, training, v):
    """dx of float32 data without the ReLU in float32: kdf = f32(kd), kxf = f32(kx),
    k0f = f32(k0 + kx (mh - m)), per element (dy * kdf + k0f) + (x - mh) * kxf (eval mode:
    dy * kdf); v (the float64 formula's value) where that is not finite or a scale does not
    fit float32; NaN canonical.  m, kd, kx, k0 float64, broadcast against x."""
    f32 = np.float32
    with np.errstate(all="ignore"):
        m = np.asarray(m, np.float64)
        kdf = f32_scale(kd)
        if training:
            mh, kxf = m.astype(f32), f32_scale(kx)
            k0f = (np.asarray(k0, np.float64) + np.asarray(kx, np.float64)
                   * (mh.astype(np.float64) - m)).astype(f32)
            t = (dy * kdf + k0f) + (x - mh) * kxf
        else:
            t = dy * kdf
        y = np.where(np.isfinite(t), t, np.asarray(v).astype(f32))
    return _canonical_f32(y)


def package_env(**extra):
    """Environment for a subprocess that must import the same bnfast as this process."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(bnfast.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env
