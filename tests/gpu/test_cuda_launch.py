"""The GPU path's Python side, without a GPU: CuPy replaced by a NumPy-backed stand-in.

The stand-in's arrays are NumPy arrays whose type says it comes from CuPy.  Its kernels
check each launch against the kernel as nvcc compiled it -- the argument count, each
argument's kind against the parameter list in the PTX and, through the demangled names
and the source's extern "C" prototypes, the C type of every parameter (element type of
every pointer) -- and the launch shape the kernel's shared-memory reductions assume; then
a NumPy emulation of the kernel runs, block by block with the kernel's index arithmetic
(only the order of the additions inside a block differs).  So every operation runs
through bnfast._api and bnfast.cuda's launch code here, and the results are compared with
the CPU kernels: a wrong argument order, a partition that misses or repeats elements, or
a merge that reads the wrong partials fails here.

The last tests run the CUDA source itself instead of the NumPy emulation: compiled for
the CPU with tests/gpu/cuda_host_emu.h (g++, C++20), every block as 256 OS threads,
__shared__ arrays static, __syncthreads a barrier.  The kernels' shared-memory trees,
barriers, two-pass decisions, merges and fixup then run as written, and must give the CPU
kernels' results, the same bits on every run whatever order the threads run in, and the
numerical edge cases.  What neither shows is the GPU itself (nvcc's and NVRTC's code, the
memory system, speed): tests/gpu/test_cuda.py and tools/gpu_check.sh on a GPU.  Skipped
without nvcc and c++filt (the kernels' signatures come from them).
"""
import ctypes
import json
import time
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import bnfast
import bnfast.cuda
from bnfast import _api
from bnfast.cuda import _backend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import _canonical_f32, dx_f32, norm_f32  # noqa: E402
from gpu_cases import ERRORS, _message  # noqa: E402

NVCC = shutil.which(os.environ.get("NVCC", "nvcc"))
CXXFILT = shutil.which("c++filt")
pytestmark = pytest.mark.skipif(NVCC is None or CXXFILT is None,
                                reason="needs nvcc and c++filt (the kernels' signatures)")

# kernels whose reductions use all BN_THREADS (256) threads of a block; merges take a power
# of two from 32 to 256; the element-wise kernels any block up to 256
FULL_BLOCK = ("bn_stats_row", "bn_stats_col", "bn_bwd_reduce_row", "bn_bwd_reduce_col",
              "bn_stats_fixup")
MERGES = ("bn_stats_merge", "bn_bwd_merge")


@pytest.fixture(scope="module")
def signatures(tmp_path_factory):
    """name expression -> list of parameter descriptions, from nvcc's PTX of the source
    NVRTC compiles: ('ptr', element C type or None), ('i64',), ('f64',) or ('i32',)."""
    tmp = tmp_path_factory.mktemp("ptx")
    src = tmp / "k.cu"
    src.write_text(bnfast.cuda.kernel_source(), encoding="utf-8")
    r = subprocess.run([NVCC, "-ptx", "-arch=sm_80", "-std=c++17", "--fmad=false", "-o",
                        str(tmp / "k.ptx"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ptx = (tmp / "k.ptx").read_text()
    # extern "C" kernels are not mangled: their C parameter types from the source
    plain = {}
    for m in re.finditer(r'extern "C" __global__ void[^\n]*\n(\w+)\(([^)]*)\)',
                         bnfast.cuda.kernel_source()):
        plain[m.group(1)] = [re.sub(r"__restrict__|\w+$", "", p.strip()).strip()
                             for p in m.group(2).split(",")]
    sigs = {}
    for m in re.finditer(r"\.entry\s+(\S+)\(([^)]*)\)", ptx):
        mangled, params = m.group(1), m.group(2)
        kinds = re.findall(r"\.param\s+\.(\w+)", params)
        demangled = subprocess.run([CXXFILT, mangled], capture_output=True,
                                   text=True).stdout.strip()
        ctys = None
        if "(" in demangled:                      # a template instance: C types known
            name = demangled.split("(")[0].replace("void ", "").strip()
            ctys = [t.strip() for t in demangled.split("(", 1)[1].rsplit(")", 1)[0]
                      .split(",")]
        else:
            name = mangled
            ctys = plain[name]
        desc = []                                  # (kind, pointer element, C type)
        for i, k in enumerate(kinds):
            c = ctys[i]
            if c.endswith("*"):
                desc.append(("ptr", c.replace("const", "").replace("*", "").strip(), c))
            elif c in ("long long", "bn_i64"):
                desc.append(("i64", None, c))
            elif k == "f64":
                desc.append(("f64", None, c))
            else:
                assert k in ("u32", "s32"), (name, k, c)
                desc.append(("i32", None, c))
        sigs[name] = desc
    assert "bn_stats_row<float>" in sigs and "bn_coeffs" in sigs, sorted(sigs)
    return sigs


_CTYPE = {"float": np.float32, "double": np.float64, "int": np.int32}


class FakeArray(np.ndarray):
    """A NumPy array that bnfast takes for a CuPy array on device 0."""

    @property
    def device(self):
        return _Device(0)

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    def get(self):
        return np.array(self)


FakeArray.__module__ = "cupy"
FakeArray.__name__ = FakeArray.__qualname__ = "ndarray"


class _Device:
    def __init__(self, dev=0):
        self.id = dev

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _to_fake(a, dtype=None, order="K"):
    return np.array(a, dtype=dtype, order=order).view(FakeArray)


class FakeKernel:
    def __init__(self, name, sig, log):
        self.name, self.sig, self.log = name, sig, log

    def __call__(self, grid, block, args):
        base = self.name.split("<")[0]
        assert isinstance(grid, tuple) and len(grid) == 1 and 0 < grid[0] < 2 ** 31, grid
        assert isinstance(block, tuple) and len(block) == 3, block
        threads = block[0] * block[1] * block[2]
        if base in FULL_BLOCK:
            assert threads == 256 and block[0] & (block[0] - 1) == 0, (self.name, block)
        elif base in MERGES:
            assert block[1:] == (1, 1) and block[0] in (32, 64, 128, 256), (self.name, block)
        else:
            assert 0 < threads <= 256, (self.name, block)
        assert len(args) == len(self.sig), (self.name, len(args), len(self.sig))
        for i, (a, want) in enumerate(zip(args, self.sig)):
            where = f"{self.name} argument {i}"
            if want[0] in ("ptr", "u64"):
                if isinstance(a, np.uint64):
                    assert a == 0, where               # the null pointer
                    continue
                assert isinstance(a, FakeArray), (where, type(a))
                if want[0] == "ptr":
                    assert a.dtype == _CTYPE[want[1]], (where, a.dtype, want)
                    assert a.flags.c_contiguous or a.ndim == 1, where
            elif want[0] == "i64":
                assert type(a) is np.int64, (where, type(a))
            elif want[0] == "f64":
                assert type(a) is np.float64, (where, type(a))
            else:
                assert type(a) is np.int32, (where, type(a))
        self.log.append(self.name)
        if FakeKernel.host is not None:               # the CUDA code on CPU threads
            _host_launch(FakeKernel.host, self.name, grid[0], block, args, self.sig)
        else:
            EMULATE[base](grid[0], block, *args)
        if base == "bn_bwd_merge" and FakeKernel.degenerate:
            args[-1][0] = 1                           # as a GPU with a non-finite channel


FakeKernel.degenerate = False
FakeKernel.host = None          # (ctypes library, {name: symbol}) of host_kernels


def _host_launch(host, name, grid, block, args, sig):
    lib, symbols = host
    holders = []
    for a, (kind, _, _) in zip(args, sig):
        if kind == "ptr":
            holders.append(ctypes.c_void_p(0 if isinstance(a, np.uint64)
                                           else a.__array_interface__["data"][0]))
        elif kind == "i64":
            holders.append(ctypes.c_longlong(int(a)))
        elif kind == "f64":
            holders.append(ctypes.c_double(float(a)))
        else:
            holders.append(ctypes.c_int(int(a)))
    argv = (ctypes.c_void_p * max(1, len(holders)))(
        *[ctypes.addressof(h) for h in holders])
    getattr(lib, symbols[name])(ctypes.c_uint(grid), *(ctypes.c_uint(b) for b in block), argv)


# ------------------------------------------------------------------ the kernels in NumPy
#
# What each kernel computes, block by block, with the kernel's own index arithmetic
# (partition, partial indices, pointers plus element offsets, null pointers), in float64;
# only the order of the additions inside a block differs from the GPU's.  The results
# then show whether the launches' partitions cover every element once and whether the
# merges and element-wise passes read what the first kernels wrote.

def _poisoned(shape, dtype=float):
    """np.empty, but NaN-filled where the type has a NaN: a kernel that leaves part of a
    buffer from cupy.empty unwritten then shows in the results instead of passing by
    chance."""
    a = np.empty(shape, dtype)
    if a.dtype.kind == "f":
        a.fill(np.nan)
    return a


def _flat(a):
    return np.asarray(a).reshape(-1)


def _opt(a):
    return None if isinstance(a, np.uint64) else np.asarray(a)


def _shift(x, S, c):
    k = float(x[c * S])
    return k if np.isfinite(k) else 0.0


def _block_stats(d):
    cnt = d.size
    s1, s2 = d.sum(), (d * d).sum()
    m = s1 / cnt
    r = s2 - s1 * m
    if not (m * m <= 16.0 * (r / cnt)):
        e = d - m
        r = (e * e).sum() - e.sum() ** 2 / cnt
    return cnt, m, max(r, 0.0) if r == r else r


def _stats_row(grid, block, x, N, C, S, RB, G, pn, pm, pq):
    xf = _flat(x)
    X = xf.reshape(N, C, S)
    for blk in range(grid):
        c, g = divmod(blk, int(G))
        n0, n1 = g * RB, min(N, g * RB + RB)
        d = X[n0:n1, c, :].astype(np.float64) - _shift(xf, S, c)
        pn[blk], pm[blk], pq[blk] = _block_stats(d)


def _stats_col(grid, block, x, R, Cp, S, RB, G, pn, pm, pq):
    xf = _flat(x)
    X = xf.reshape(R, Cp)
    for blk in range(grid):
        tile, g = divmod(blk, int(G))
        r0, r1 = g * RB, min(R, g * RB + RB)
        for j in range(tile * block[0], min(Cp, (tile + 1) * block[0])):
            d = X[r0:r1, j].astype(np.float64) - _shift(xf, S, j // S)
            o = j * G + g
            pn[o], pm[o], pq[o] = _block_stats(d)


def _chan(n, m, q, nb, mb, qb):
    if nb == 0:
        return n, m, q
    if n == 0:
        return nb, mb, qb
    nn = n + nb
    delta = mb - m
    return nn, m + delta * (nb / nn), q + qb + delta * delta * (n * nb / nn)


def _stats_merge(grid, block, pn, pm, pq, M, x, S, mean, var):
    xf = _flat(x)
    for c in range(grid):
        n = m = q = 0.0
        for k in range(c * M, c * M + M):
            n, m, q = _chan(n, m, q, pn[k], pm[k], pq[k])
        mean[c] = _shift(xf, S, c) + m
        var[c] = q / n


def _stats_fixup(grid, block, x, N, C, S, mean, var):
    assert np.isfinite(np.asarray(mean)).all() and np.isfinite(np.asarray(var)).all(), \
        "the emulation has no overflow fixup: use finite, moderate test data"


def _coeffs(grid, block, var, w, b, eps, C, invstd, scale, shift):
    var, w, b, invstd = np.asarray(var), _opt(w), _opt(b), _opt(invstd)
    inv = 1.0 / np.sqrt(var[:C] + eps)
    if invstd is not None:
        invstd[:C] = inv
    scale[:C] = inv * w[:C] if w is not None else inv
    shift[:C] = b[:C] if b is not None else 0.0


def _running(grid, block, rm, rv, sm, sv, mean, var, C, count, momentum):
    # raw pointer arithmetic: element c at pointer + c * stride (rm may be a strided view)
    pm = np.lib.stride_tricks.as_strided(rm, shape=(C,), strides=(sm * rm.itemsize,))
    pv = np.lib.stride_tricks.as_strided(rv, shape=(C,), strides=(sv * rv.itemsize,))
    unb = var[:C] * (count / (count - 1.0)) if count > 1.0 else var[:C]
    pm[...] = (1.0 - momentum) * pm.astype(np.float64) + momentum * mean[:C]
    pv[...] = (1.0 - momentum) * pv.astype(np.float64) + momentum * unb


def _rows(grid, C, S, chunks):
    for blk in range(grid):
        row, ch = divmod(blk, int(chunks))
        s0 = ch * _backend.CHUNK
        yield row % C, slice(row * S + s0, row * S + min(S, s0 + _backend.CHUNK))


def _cols(grid, block, R, Cp, S, RB, G):
    for blk in range(grid):
        tile, g = divmod(blk, int(G))
        j = np.arange(tile * block[0], min(Cp, (tile + 1) * block[0]))
        yield slice(g * RB, min(R, g * RB + RB)), g, j, j // S


def _norm(xv, m, a, b, relu, f64):
    v = (xv.astype(np.float64) - m) * a + b
    v = np.where(v <= 0.0, 0.0, v) if relu else v
    if xv.dtype != np.float32:
        return v
    return _canonical_f32(v.astype(np.float32)) if f64 else norm_f32(xv, m, a, b, relu, v)


def _normalize_row(grid, block, x, y, C, S, chunks, mean, scale, shift, relu, f64):
    xf, yf = _flat(x), _flat(y)
    for c, sl in _rows(grid, C, S, chunks):
        yf[sl] = _norm(xf[sl], mean[c], scale[c], shift[c], relu, f64)


def _normalize_col(grid, block, x, y, R, Cp, S, RB, G, mean, scale, shift, relu, f64):
    X, Y = _flat(x).reshape(R, Cp), _flat(y).reshape(R, Cp)
    for rs, _, j, c in _cols(grid, block, R, Cp, S, RB, G):
        Y[rs, j] = _norm(X[rs, j], mean[c], scale[c], shift[c], relu, f64)


def _pick(v, c):
    return None if v is None else v[c]


def _bwd_terms(dyv, xv, m, inv, w, b, relu):
    a = inv * w if w is not None else inv
    bb = b if b is not None else 0.0
    xm = xv.astype(np.float64) - m
    g = dyv.astype(np.float64)
    if relu:
        g = np.where(xm * a + bb > 0.0, g, 0.0)
    return a, xm, g


def _bwd_reduce_row(grid, block, dy, x, N, C, S, RB, G, mean, invstd, weight, bias, relu,
                    pd, px):
    D, X = _flat(dy).reshape(N, C, S), _flat(x).reshape(N, C, S)
    w, b = _opt(weight), _opt(bias)
    for blk in range(grid):
        c, g = divmod(blk, int(G))
        n0, n1 = g * RB, min(N, g * RB + RB)
        _, xm, gv = _bwd_terms(D[n0:n1, c], X[n0:n1, c], mean[c], invstd[c], _pick(w, c),
                               _pick(b, c), relu)
        pd[blk], px[blk] = gv.sum(), (gv * xm).sum()


def _bwd_reduce_col(grid, block, dy, x, R, Cp, S, RB, G, mean, invstd, weight, bias, relu,
                    pd, px):
    D, X = _flat(dy).reshape(R, Cp), _flat(x).reshape(R, Cp)
    w, b = _opt(weight), _opt(bias)
    for rs, g, j, c in _cols(grid, block, R, Cp, S, RB, G):
        _, xm, gv = _bwd_terms(D[rs][:, j], X[rs][:, j], mean[c], invstd[c], _pick(w, c),
                               _pick(b, c), relu)
        pd[j * G + g], px[j * G + g] = gv.sum(axis=0), (gv * xm).sum(axis=0)


def _bwd_merge(grid, block, pd, px, M, invstd, weight, cnt, training, sum_dy, sum_dyxmu,
               dweight, kx, k0, degenerate):
    w = _opt(weight)
    for c in range(grid):
        sd, sx = float(np.sum(pd[c * M:c * M + M])), float(np.sum(px[c * M:c * M + M]))
        inv = invstd[c]
        a = inv * w[c] if w is not None else inv
        dw = sx * inv
        sum_dy[c], sum_dyxmu[c], dweight[c] = sd, sx, dw
        kx[c] = -(a * inv) * (dw / cnt) if training and cnt > 0 else 0.0
        k0[c] = -a * (sd / cnt) if training and cnt > 0 else 0.0


def _dx(dyv, xv, m, inv, w, b, relu, kxc, k0c, ev, f64):
    a, xm, g = _bwd_terms(dyv, xv, m, inv, w, b, relu)
    with np.errstate(invalid="ignore"):     # inf - inf of a degenerate channel: NaN
        v = a * g if ev else (a * g + kxc * xm) + k0c
    return dx_f32(dyv, xv, m, a, kxc, k0c, not ev, v) \
        if xv.dtype == np.float32 and not relu and not f64 else v


def _bwd_dx_row(grid, block, dy, x, dx, C, S, chunks, mean, invstd, weight, bias, relu, kx,
                k0, ev, f64):
    df, xf, of = _flat(dy), _flat(x), _flat(dx)
    w, b = _opt(weight), _opt(bias)
    for c, sl in _rows(grid, C, S, chunks):
        of[sl] = _dx(df[sl], xf[sl], mean[c], invstd[c], _pick(w, c), _pick(b, c), relu,
                     kx[c], k0[c], ev, f64)


def _bwd_dx_col(grid, block, dy, x, dx, R, Cp, S, RB, G, mean, invstd, weight, bias, relu,
                kx, k0, ev, f64):
    D, X, O = (_flat(a).reshape(R, Cp) for a in (dy, x, dx))
    w, b = _opt(weight), _opt(bias)
    for rs, _, j, c in _cols(grid, block, R, Cp, S, RB, G):
        O[rs, j] = _dx(D[rs][:, j], X[rs][:, j], mean[c], invstd[c], _pick(w, c),
                       _pick(b, c), relu, kx[c], k0[c], ev, f64)


def _widen_f32(grid, block, src, dst, n):
    _flat(dst)[:n] = _flat(src)[:n].astype(np.float64)


def _narrow_f32(grid, block, src, dst, n):
    _flat(dst)[:n] = _canonical_f32(_flat(src)[:n].astype(np.float32))


EMULATE = {"bn_widen_f32": _widen_f32, "bn_narrow_f32": _narrow_f32,
           "bn_stats_row": _stats_row, "bn_stats_col": _stats_col,
           "bn_stats_merge": _stats_merge, "bn_stats_fixup": _stats_fixup,
           "bn_coeffs": _coeffs, "bn_update_running": _running,
           "bn_normalize_row": _normalize_row, "bn_normalize_col": _normalize_col,
           "bn_bwd_reduce_row": _bwd_reduce_row, "bn_bwd_reduce_col": _bwd_reduce_col,
           "bn_bwd_merge": _bwd_merge, "bn_bwd_dx_row": _bwd_dx_row,
           "bn_bwd_dx_col": _bwd_dx_col}


@pytest.fixture
def fake_cupy(signatures, monkeypatch):
    """Install the stand-in; yields the list of launched kernel names."""
    log = []

    class RawModule:
        def __init__(self, *, code, options, name_expressions):
            assert "-fmad=false" in options and "--use_fast_math" not in options
            assert set(name_expressions) <= set(signatures), \
                set(name_expressions) - set(signatures)
            self.code = code

        def compile(self):
            pass

        def get_function(self, name):
            assert name in signatures, name
            return FakeKernel(name, signatures[name], log)

    cp = types.ModuleType("cupy")
    cp.__version__ = "stand-in"
    cp.ndarray = FakeArray
    cp.zeros = lambda n, dtype=float: np.zeros(n, dtype).view(FakeArray)
    cp.empty = lambda shape, dtype=float: _poisoned(shape, dtype).view(FakeArray)
    cp.ascontiguousarray = lambda a, dtype=None: np.ascontiguousarray(
        a, dtype=dtype).view(FakeArray)
    cp.array = _to_fake
    cp.asarray = lambda a: np.asarray(a).view(FakeArray)
    cp.take = lambda a, idx, axis: np.take(np.asarray(a), np.asarray(idx),
                                           axis=axis).view(FakeArray)
    cp.shares_memory = lambda a, b: np.shares_memory(a, b)
    cp.isnan = lambda a: np.isnan(np.asarray(a)).view(FakeArray)
    cp.where = lambda c, a, b: np.asarray(np.where(c, a, b)).view(FakeArray)
    cp.RawModule = RawModule
    cp.cuda = types.SimpleNamespace(Device=_Device,
                                    runtime=types.SimpleNamespace(getDevice=lambda: 0))
    monkeypatch.setitem(bnfast.cuda._state, "cupy", (cp, None))
    monkeypatch.setattr(_backend, "_modules", {})
    monkeypatch.setattr(_backend, "_backends", {})
    FakeKernel.degenerate = False
    yield log


def F(a):
    return None if a is None else _to_fake(a)


SHAPES = [((5, 3), 1), ((16, 3, 300), 1), ((16, 3, 300), -1), ((20000, 3), 1),
          ((3, 2, 5000), 1), ((2, 3, 5, 7), 2), ((0, 3, 4), 1)]


@pytest.mark.parametrize("shape,axis", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_operation_launches_valid_kernels(fake_cupy, shape, axis, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    empty = x.size == 0
    if not empty:
        m, v = bnfast.moments(F(x), axis=axis)
        assert isinstance(m, FakeArray) and m.dtype == np.float64 and m.shape == (C,)
        for rdt in (np.float32, np.float64):
            rm, rv = F(np.zeros(C, rdt)), F(np.ones(C, rdt))
            y, mean, inv = bnfast.batch_norm_train(F(x), F(w), F(b), axis=axis,
                                                   running_mean=rm, running_var=rv,
                                                   relu=True)
            assert isinstance(y, FakeArray) and y.dtype == dtype and y.shape == x.shape
        # strided running statistics (element stride 2) and in-place output
        buf = F(np.zeros(2 * C))
        xin = F(x)
        bnfast.batch_norm_train(xin, axis=axis, running_mean=buf[::2], running_var=buf[1::2],
                                out=xin)
        bnfast.batch_norm(F(x), F(np.zeros(C)), F(np.ones(C)), training=True, momentum=None,
                          num_batches_tracked=np.array(3), axis=axis)
    y = bnfast.batch_norm_infer(F(x), F(np.zeros(C)), F(np.ones(C)), F(w), F(b), axis=axis)
    assert isinstance(y, FakeArray) and y.shape == x.shape
    for training in (True, False):
        dx, dw, db = bnfast.batch_norm_backward(F(x), F(x), F(np.zeros(C)), F(np.ones(C)),
                                                F(w), bias=F(b), relu=True,
                                                training=training, axis=axis)
        assert dx.shape == x.shape and dw.dtype == dtype and db.shape == (C,)
    names = {n.split("<")[0] for n in fake_cupy}
    if not empty:
        assert {"bn_stats_merge", "bn_stats_fixup", "bn_coeffs", "bn_update_running",
                "bn_bwd_merge"} <= names
        kind = "row" if (x.size // x.shape[0] // C if axis % x.ndim == 1 else 1) >= 256 \
            else None
        if kind == "row" and axis == 1:
            assert {"bn_stats_row", "bn_normalize_row", "bn_bwd_reduce_row",
                    "bn_bwd_dx_row"} <= names
        if axis == -1:
            assert {"bn_stats_col", "bn_normalize_col", "bn_bwd_reduce_col",
                    "bn_bwd_dx_col"} <= names


def test_errors_have_the_cpu_messages_through_the_gpu_path(fake_cupy):
    for case, (fn, args, kw) in ERRORS.items():
        if case == "eps 0 constant":          # needs the kernels' statistics
            continue
        want = _message(fn, *args, **kw)
        dev = (lambda a: F(a) if isinstance(a, np.ndarray) else a)
        got = _message(fn, *(dev(a) for a in args), **{k: dev(v) for k, v in kw.items()})
        assert got == want, case


def test_mixing_is_refused_naming_the_argument(fake_cupy):
    x = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match=r"^weight must be a cupy.ndarray on device 0 like x, "
                                        r"got numpy.ndarray \(a NumPy array"):
        bnfast.batch_norm_train(F(x), np.ones(3))
    with pytest.raises(TypeError, match=r"^out must be a cupy.ndarray, got numpy.ndarray"):
        bnfast.batch_norm_train(F(x), out=x)
    with pytest.raises(TypeError, match=r"^running_var must be a cupy.ndarray \(it is updated"):
        bnfast.batch_norm_train(F(x), running_mean=F(np.zeros(3)), running_var=np.ones(3))
    with pytest.raises(TypeError, match=r"^dy must be a cupy.ndarray"):
        bnfast.batch_norm_backward(x, F(x), F(np.zeros(3)), F(np.ones(3)))
    with pytest.raises(TypeError, match=r"^mean must be a cupy.ndarray .*got list"):
        bnfast.batch_norm_infer(F(x), [0.0, 0.0, 0.0], F(np.ones(3)))
    with pytest.raises(TypeError, match="two-step backward"):
        _api._backward_two_step(F(x), F(x), F(np.zeros(3)), F(np.ones(3)), None,
                                lambda sd, sx: (sd, sx, 4))


def test_two_devices_are_refused(fake_cupy):
    class OtherDevice(FakeArray):
        @property
        def device(self):
            return _Device(1)

    OtherDevice.__module__ = "cupy"
    x = F(np.ones((4, 3)))
    w = np.ones(3).view(OtherDevice)
    with pytest.raises(ValueError, match=r"^weight is on CUDA device 1 but x is on device 0"):
        bnfast.batch_norm_train(x, w)


def test_degenerate_channels_are_recomputed_as_on_the_cpu(fake_cupy):
    """An infinite weight: the backward's flag comes back set, and the channel is
    recomputed on the host into the device arrays, exactly as the CPU path does."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3, 5))
    dy = rng.standard_normal(x.shape)
    mean, inv = x.mean(axis=(0, 2)), np.ones(3)
    w = np.array([1.0, np.inf, 2.0])
    FakeKernel.degenerate = True
    dx, dw, db = bnfast.batch_norm_backward(F(dy), F(x), F(mean), F(inv), F(w))
    cdx, cdw, cdb = bnfast.batch_norm_backward(dy, x, mean, inv, w)
    np.testing.assert_array_equal(np.asarray(dx)[:, 1], cdx[:, 1])
    assert np.asarray(dw)[1] == cdw[1] or (np.isnan(dw[1]) and np.isnan(cdw[1]))
    assert np.asarray(db)[1] == cdb[1]
    assert any(n.startswith("bn_bwd_dx_") for n in fake_cupy)


VALUE_SHAPES = [((5, 3), 1), ((7, 65), 1), ((3, 9, 1), 1), ((16, 3, 300), 1),
                ((16, 3, 300), -1), ((20000, 3), 1), ((3, 2, 5000), 1), ((2, 3, 5, 7), 2),
                ((8, 16, 20, 20), -1), ((300, 40), 1), ((2, 5, 3, 3, 8), 1)]


@pytest.mark.parametrize("shape,axis", VALUE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_emulated_kernels_give_the_cpu_results(fake_cupy, shape, axis, dtype, relu):
    """The launches' partitions and indices, run by the NumPy emulation of each kernel:
    every operation agrees with the CPU kernels (statistics to float64 rounding; the
    element-wise passes without a reduction bit for bit)."""
    _check_against_cpu(shape, axis, dtype, relu)


def _check_against_cpu(shape, axis, dtype, relu):
    from conftest import assert_close, assert_same_bits

    rng = np.random.default_rng(abs(hash((shape, axis))) % 2 ** 32)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    w, b = rng.uniform(0.5, 2, C) * rng.choice([-1, 1], C), rng.standard_normal(C)
    m0, v0 = rng.standard_normal(C), rng.uniform(0.5, 2, C)

    gm, gv = bnfast.moments(F(x), axis=axis)
    cm, cv = bnfast.moments(x, axis=axis)
    assert_close(np.asarray(gm), cm, rtol=1e-12, scale=np.abs(x).max(), what="mean")
    assert_close(np.asarray(gv), cv, rtol=1e-12, scale=0.0, what="var")

    grm, grv = F(m0.astype(dtype)), F(v0.astype(dtype))
    crm, crv = m0.astype(dtype), v0.astype(dtype)
    gy, gmean, ginv = bnfast.batch_norm_train(F(x), F(w), F(b), axis=axis, relu=relu,
                                              running_mean=grm, running_var=grv,
                                              momentum=0.3)
    cy, cmean, cinv = bnfast.batch_norm_train(x, w, b, axis=axis, relu=relu,
                                              running_mean=crm, running_var=crv,
                                              momentum=0.3)
    assert_close(np.asarray(gy), cy, what="y")
    assert_close(np.asarray(ginv), cinv, rtol=1e-12, scale=0.0, what="invstd")
    assert_close(np.asarray(grm), crm, scale=np.abs(crm) + np.abs(x).max(), what="rm")
    assert_close(np.asarray(grv), crv, scale=0.0, what="rv")

    gyi = bnfast.batch_norm_infer(F(x), F(m0), F(v0), F(w), F(b), axis=axis, relu=relu)
    cyi = bnfast.batch_norm_infer(x, m0, v0, w, b, axis=axis, relu=relu)
    assert_same_bits(np.asarray(gyi), cyi, "infer")

    for training in (True, False):
        mean, inv = (cmean, cinv) if training else (m0, 1 / np.sqrt(v0 + 1e-5))
        gdx, gdw, gdb = bnfast.batch_norm_backward(F(dy), F(x), F(mean), F(inv), F(w),
                                                   bias=F(b), relu=relu, training=training,
                                                   axis=axis)
        cdx, cdw, cdb = bnfast.batch_norm_backward(dy, x, mean, inv, w, bias=b, relu=relu,
                                                   training=training, axis=axis)
        red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        gscale = np.abs(dy.astype(np.float64)).sum(axis=red)
        assert_close(np.asarray(gdb), cdb, scale=gscale, what="dbias")
        assert_close(np.asarray(gdw), cdw, scale=gscale * np.abs(x).max() * np.abs(inv).max()
                     * 4, what="dweight")
        if training:
            assert_close(np.asarray(gdx), cdx, scale=np.abs(cdx).max() + np.abs(dy).max()
                         * np.abs(w * inv).max(), what="dx")
        else:
            assert_same_bits(np.asarray(gdx), cdx, "eval dx")


def test_nn_training_steps_through_the_gpu_path(fake_cupy, monkeypatch):
    """Two SGD steps of Linear -> BatchNorm1d -> ReLU -> Linear after ``model.to("cuda")``,
    with the stand-in also serving bnfast.nn's array module (its NumPy functions return
    stand-in arrays): the batch-norm layer runs through bnfast.cuda's launches and the
    emulated kernels, and losses and every parameter and buffer match the CPU's."""
    from bnfast import nn, optim
    from bnfast.train import Trainer

    cp = bnfast.cuda._state["cupy"][0]
    _extend(cp)            # NumPy's functions returning stand-in arrays, as nn needs
    monkeypatch.setitem(sys.modules, "cupy", cp)

    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 20), dtype=np.float32)
    y = (X[:, :3].sum(axis=1) > 0).astype(np.int64)
    results = []
    for device in ("cpu", "cuda"):
        r = np.random.default_rng(1)
        model = nn.Sequential(nn.Linear(20, 16, rng=r), nn.BatchNorm1d(16), nn.ReLU(),
                              nn.Linear(16, 2, rng=r))
        model.to(device)
        trainer = Trainer(model, nn.CrossEntropyLoss(),
                          optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        xin, yin = (X, y) if device == "cpu" else (cp.asarray(X), cp.asarray(y))
        losses = [float(trainer.train_step(xin, yin)[0]) for _ in range(2)]
        state = model.state_dict()
        if device == "cuda":
            assert all(isinstance(v, FakeArray) for v in state.values())
        results.append((losses, {k: np.array(v) for k, v in state.items()}))
    (lc, sc), (lg, sg) = results
    np.testing.assert_allclose(lg, lc, rtol=1e-6)
    for k in sc:
        np.testing.assert_allclose(sg[k], sc[k], rtol=2e-5, atol=2e-6, err_msg=k)
    assert any(n.startswith("bn_stats_col") for n in fake_cupy)
    assert any(n.startswith("bn_bwd_dx_col") for n in fake_cupy)


# ------------------------------------------------------------------ the CUDA code itself

@pytest.fixture(scope="module")
def host_kernels(signatures, tmp_path_factory):
    """csrc/cuda compiled for the CPU with tests/gpu/cuda_host_emu.h (g++, C++20)."""
    gxx = shutil.which(os.environ.get("CXX", "g++"))
    if gxx is None:
        pytest.skip("needs g++ (C++20) to run the CUDA code on CPU threads")
    tmp = tmp_path_factory.mktemp("host")
    header = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_host_emu.h")
    symbols, wrappers = {}, []
    for k, (name, sig) in enumerate(sorted(signatures.items())):
        symbols[name] = f"emu_kernel_{k}"
        call = ", ".join(f"*({raw} *)a[{i}]" for i, (_, _, raw) in enumerate(sig))
        wrappers.append(f'extern "C" void emu_kernel_{k}(unsigned g, unsigned bx, '
                        f"unsigned by, unsigned bz, void **a) {{ emu_launch(g, bx, by, bz, "
                        f"[&] {{ {name}({call}); }}); }}")
    src = tmp / "kernels_host.cpp"
    src.write_text(f'#include "{header}"\n' + bnfast.cuda.kernel_source() + "\n"
                   + "\n".join(wrappers) + "\n", encoding="utf-8")
    lib = tmp / "kernels_host.so"
    r = subprocess.run([gxx, "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared",
                        "-pthread", "-w", "-o", str(lib), str(src)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "barrier" in r.stderr:
        pytest.skip(f"{gxx} lacks C++20's std::barrier")
    assert r.returncode == 0, r.stderr[-3000:]
    return ctypes.CDLL(str(lib)), symbols


@pytest.fixture
def on_cpu_threads(fake_cupy, host_kernels):
    FakeKernel.host = host_kernels
    yield fake_cupy
    FakeKernel.host = None


HOST_SHAPES = VALUE_SHAPES


@pytest.mark.parametrize("shape,axis", HOST_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_cuda_kernels_on_cpu_threads_give_the_cpu_results(on_cpu_threads, shape, axis,
                                                          dtype, relu):
    """The kernels' CUDA source itself, each block run on 256 CPU threads with barriers
    for __syncthreads: every operation agrees with the CPU kernels."""
    _check_against_cpu(shape, axis, dtype, relu)


def test_cuda_kernels_on_cpu_threads_are_deterministic(on_cpu_threads):
    """Two runs, with the OS scheduling the block's threads differently each time, give
    the same bits: the reductions do not depend on the order the threads run in."""
    rng = np.random.default_rng(5)
    cases = [(rng.standard_normal(shape) * 3 + 1, axis)
             for shape, axis in (((16, 3, 700), 1), ((3000, 5), 1), ((6, 20, 20, 7), -1))]
    results = []
    for _ in range(2):
        res = []
        for x, axis in cases:
            C = x.shape[axis]
            y, m, s = bnfast.batch_norm_train(F(x), axis=axis, relu=True)
            dx, dw, db = bnfast.batch_norm_backward(F(x), F(x), m, s, bias=F(np.zeros(C)),
                                                    relu=True, axis=axis)
            res += [np.array(a) for a in (y, m, s, dx, dw, db)]
        results.append(res)
    for a, b in zip(*results):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("layout", ["first", "last"])
def test_cuda_kernels_on_cpu_threads_numerical_edge_cases(on_cpu_threads, layout):
    """The constant float32 channel at 1e7 normalises to exactly beta; 1e6 + 1e-2 noise
    keeps its variance; 1e30 gives finite statistics; float64 near the largest double
    goes through the fixup kernel to the CPU's mean."""
    def put(x):
        return (x, 1) if layout == "first" else (np.ascontiguousarray(np.moveaxis(x, 1, -1)),
                                                 -1)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, 3, 300)).astype(np.float32)
    x[:, 1] = np.float32(1e7)
    x, axis = put(x)
    y, _, _ = bnfast.batch_norm_train(F(x), F(np.array([2.0, 3.0, 4.0])),
                                      F(np.array([0.5, 0.25, -3.0])), axis=axis)
    assert (np.take(np.array(y), 1, axis=axis) == np.float32(0.25)).all()
    k = rng.choice([-1.0, 0.0, 1.0], size=(64, 3, 300), p=[0.0128, 0.9744, 0.0128])
    k[0], k[1] = 1.0, -1.0
    x, axis = put((np.float32(1e6) + np.float32(0.0625) * k).astype(np.float32))
    _, gv = bnfast.moments(F(x), axis=axis)
    _, cv = bnfast.moments(x, axis=axis)
    assert np.all(np.abs(np.array(gv) - cv) <= 1e-9 * cv)
    x, axis = put((1e30 * rng.standard_normal((50, 3, 300))).astype(np.float32))
    gm, gv = bnfast.moments(F(x), axis=axis)
    assert np.isfinite(np.array(gv)).all()
    np.testing.assert_allclose(np.array(gv), bnfast.moments(x, axis=axis)[1], rtol=1e-12)
    x = np.array([[1.7e308, 1.0], [-1.7e308, 2.0], [1.6e308, 3.0]])
    gm, gv = bnfast.moments(F(x))
    cm, cv = bnfast.moments(x)
    np.testing.assert_allclose(np.array(gm), cm, rtol=1e-15)
    assert np.isinf(np.array(gv)[0]) == np.isinf(cv[0])


# ------------------------------------------------------------------ test_cuda.py on CPU threads

def install_fake_cupy():
    """Make ``import cupy`` give the stand-in, with the CUDA source on CPU threads as its
    kernels, for this process: ``BNFAST_TEST_FAKE_CUPY=1 pytest tests/gpu/test_cuda.py``
    then runs the GPU tests here (a check of the tests themselves and of the kernels'
    code, not of a GPU).  Returns the stand-in module."""
    import tempfile
    from pathlib import Path

    factory = types.SimpleNamespace(mktemp=lambda name: Path(tempfile.mkdtemp(prefix=name)))
    sigs = signatures.__wrapped__(factory)
    FakeKernel.host = host_kernels.__wrapped__(sigs, factory)
    log = []

    class RawModule:
        def __init__(self, *, code, options, name_expressions):
            pass

        def compile(self):
            pass

        def get_function(self, name):
            return FakeKernel(name, sigs[name], log)

    def wrap(f):
        return lambda *a, **k: np.asarray(f(*a, **k)).view(FakeArray)

    class Stream:
        def __init__(self, non_blocking=False):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def synchronize(self):
            pass

    cp = types.ModuleType("cupy")
    cp.__version__ = "stand-in (CUDA source on CPU threads)"
    cp.ndarray = FakeArray
    cp.empty = wrap(_poisoned)
    for fn in ("zeros", "ones", "full", "zeros_like", "empty_like", "ones_like",
               "maximum", "exp", "log", "sqrt", "where", "isnan", "sum", "argmax", "arange",
               "dot", "matmul", "clip", "abs", "tanh", "mean", "max"):
        setattr(cp, fn, wrap(getattr(np, fn)))
    for t in ("float32", "float64", "int64"):
        setattr(cp, t, getattr(np, t))
    cp.ascontiguousarray = lambda a, dtype=None: np.ascontiguousarray(
        a, dtype=dtype).view(FakeArray)
    cp.array = lambda a, dtype=None, order="K", copy=True: np.array(
        a, dtype=dtype, order=order, copy=copy).view(FakeArray)
    cp.asarray = lambda a, dtype=None: np.asarray(a, dtype=dtype).view(FakeArray)
    cp.asnumpy = lambda a: np.array(a)
    cp.take = lambda a, idx, axis=None: np.take(np.asarray(a), np.asarray(idx),
                                                axis=axis).view(FakeArray)
    cp.shares_memory = lambda a, b: np.shares_memory(a, b)
    cp.RawModule = RawModule
    cp.lib = types.SimpleNamespace(stride_tricks=np.lib.stride_tricks)
    cp.cuda = types.SimpleNamespace(
        Device=lambda i=None: _Device(0 if i is None else i), Stream=Stream,
        nvrtc=types.SimpleNamespace(getVersion=lambda: (0, 0)),
        runtime=types.SimpleNamespace(
            getDevice=lambda: 0, getDeviceCount=lambda: 1, driverGetVersion=lambda: 0, runtimeGetVersion=lambda: 0,
            getDeviceProperties=lambda i: {"name": b"CPU threads", "major": 0, "minor": 0}))
    sys.modules["cupy"] = cp
    bnfast.cuda._state["cupy"] = (cp, None)
    return cp


def _bench_and_paper_stand_in(cp):
    """What the GPU benchmark and the paper's runner use beyond the functions above."""
    class Event:
        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

    def copy_async(dst):
        def copy(src, nbytes):
            ctypes.memmove(dst.ptr, src.ptr, nbytes)
        return copy

    class Mem(types.SimpleNamespace):
        pass

    FakeArray.data = property(lambda self: _mem(self))

    def _mem(a):
        m = Mem(ptr=a.__array_interface__["data"][0])
        m.copy_from_device_async = copy_async(m)
        return m

    cp.random = types.SimpleNamespace(default_rng=lambda seed: types.SimpleNamespace(
        standard_normal=lambda shape, dtype=np.float64: np.random.default_rng(seed)
        .standard_normal(shape, dtype=dtype).view(FakeArray)))
    cp.empty_like = lambda a: np.empty_like(np.asarray(a)).view(FakeArray)
    cp.get_default_memory_pool = lambda: types.SimpleNamespace(free_all_blocks=lambda: None)
    cp.cuda.Event = Event
    cp.cuda.get_elapsed_time = lambda a, b: (b.t - a.t) * 1e3
    cp.cuda.get_current_stream = lambda: types.SimpleNamespace(synchronize=lambda: None)


@pytest.fixture
def stand_in_module(fake_cupy, monkeypatch):
    """The stand-in as `cupy` in sys.modules, with what nn, the benchmark and the paper
    runner need (NumPy emulation of the kernels)."""
    saved = FakeArray.data
    monkeypatch.setattr(FakeKernel, "host", None)
    cp = bnfast.cuda._state["cupy"][0]
    _extend(cp)
    _bench_and_paper_stand_in(cp)
    monkeypatch.setitem(sys.modules, "cupy", cp)
    yield cp
    FakeArray.data = saved


def _extend(cp):
    def fallback(name):              # anything else: NumPy's, returning stand-in arrays
        f = getattr(np, name)
        if isinstance(f, type) or not callable(f):
            return f

        def call(*a, **k):
            r = f(*a, **k)
            return r.view(FakeArray) if isinstance(r, np.ndarray) else r
        return call

    cp.__getattr__ = fallback
    cp.array = lambda a, dtype=None, order="K", copy=True: np.array(
        a, dtype=dtype, order=order, copy=copy).view(FakeArray)
    cp.asarray = lambda a, dtype=None: np.asarray(a, dtype=dtype).view(FakeArray)
    cp.asnumpy = lambda a: np.array(a)
    cp.lib = types.SimpleNamespace(stride_tricks=np.lib.stride_tricks)
    cp.cuda = types.SimpleNamespace(
        Device=lambda i=None: _Device(0 if i is None else i),
        nvrtc=types.SimpleNamespace(getVersion=lambda: (0, 0)),
        runtime=types.SimpleNamespace(
            getDevice=lambda: 0, getDeviceCount=lambda: 1, driverGetVersion=lambda: 0, runtimeGetVersion=lambda: 0,
            getDeviceProperties=lambda i: {"name": b"stand-in", "major": 0, "minor": 0}))


def test_bench_device_cuda_runs_on_the_stand_in(stand_in_module, tmp_path, monkeypatch):
    """``bnfast bench --device cuda`` end to end on small shapes: the table, the JSON."""
    import json

    from bnfast.__main__ import main
    from bnfast.cuda import _bench

    monkeypatch.setattr(_bench, "QUICK_SHAPES", [(64, 8), (4, 8, 5, 5)])
    monkeypatch.setattr(_bench, "_torch", lambda: None)
    assert main(["bench", "--device", "cuda", "--quick", "--out", str(tmp_path),
                 "--repeat", "2"]) == 0
    blob = json.loads((tmp_path / "bench_cuda.json").read_text())
    assert len(blob["rows"]) == 3 * 3           # (64, 8) cf; (4, 8, 5, 5) cf and cl
    assert all(r["bnfast_s"] > 0 and r["copy_s"] > 0 for r in blob["rows"])


def test_paper_mnist_device_cuda_runs_on_the_stand_in(stand_in_module, fake_cupy, tmp_path,
                                                      capsys):
    """``bnfast paper mnist --device cuda`` on home-made MNIST files: both networks train
    through the GPU path (batch norm on the stand-in's kernels) and write their results."""
    import struct
    from unittest import mock

    from bnfast import datasets
    from bnfast.paper.cli import main

    def idx(dims, values):
        head = struct.pack(">BBBB", 0, 0, 0x08, len(dims))
        return head + struct.pack(f">{len(dims)}I", *dims) + bytes(values)

    files = {"train_images": idx((40, 28, 28), [i % 256 for i in range(40 * 784)]),
             "train_labels": idx((40,), [i % 10 for i in range(40)]),
             "test_images": idx((10, 28, 28), [i % 251 for i in range(10 * 784)]),
             "test_labels": idx((10,), list(range(10)))}
    for role, blob in files.items():
        (tmp_path / datasets.MNIST_FILES[role]).write_bytes(blob)
    with mock.patch.dict(datasets.MNIST_SHA256, clear=True):
        status = main(["mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"),
                       "--steps", "3", "--batch-size", "8", "--pop-batches", "2",
                       "--no-progress", "--no-plot", "--device", "cuda"])
    assert status == 0, capsys.readouterr().err
    out = json.loads((tmp_path / "out" / "mnist_fig1.json").read_text())
    assert out["config"]["device"] == "cuda"
    assert {"nobn", "bn"} <= set(out["curves"])
    assert any(n.startswith("bn_normalize_col") for n in fake_cupy)   # BN ran on the "GPU"
