"""The CuPy side of bnfast's validation layer and the launches of the CUDA kernels.

``bnfast._api`` owns every check and message; for a CuPy `x` it asks :func:`backend_for`
for the object below, whose methods are the array operations the checks need (type and
device of each argument, allocation on x's device, overlap) and the operations themselves
(statistics, training forward with the running statistics, inference, backward).  Kernels
run on CuPy's current stream, on x's device.

Every reduction is two kernels (per-block partials, then a per-channel merge in a fixed
order; see csrc/cuda/bnfast.cu), with a partition that depends on the shape only, so the
results are bit-identical from run to run and on every device.
"""
import contextlib
import threading

import numpy as np

from . import NVRTC_OPTIONS, _import_cupy, kernel_source
from .._core import F32_MIN_PER_CHANNEL

THREADS = 256           # BN_THREADS
ROW_MIN_S = 256         # S >= this: row layout (channel runs of S elements); else columns
STATS_ELEMS = 8192      # elements per block of a reduction (about)
CHUNK = 4096            # BN_CHUNK: row layout, elements of a row per element-wise block
EW_ROWS = 16            # column layout, rows per thread of an element-wise block

_TEMPLATES = ("bn_stats_row", "bn_stats_col", "bn_stats_merge", "bn_stats_fixup",
              "bn_update_running", "bn_normalize_row", "bn_normalize_col",
              "bn_bwd_reduce_row", "bn_bwd_reduce_col", "bn_bwd_dx_row", "bn_bwd_dx_col")
_CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_NULL = np.uint64(0)    # a null pointer argument
_CURRENT = contextlib.nullcontext()     # the device is already the current one
_lock = threading.Lock()
_modules = {}           # device id -> cupy.RawModule
_backends = {}          # device id -> _CuPyBackend


def _f64(xk, N, S):
    """The element-wise kernels' f64 flag: float32 data in double arithmetic where the CPU's
    plan keeps it there (channels of fewer than F32_MIN_PER_CHANNEL elements), so that
    inference and eval-mode dx give the CPU's bits."""
    return np.int32(xk.dtype == np.float32 and N * S < F32_MIN_PER_CHANNEL)


def _cupy():
    cp, reason = _import_cupy()
    if cp is None:
        raise RuntimeError(f"bnfast's GPU backend is unavailable: {reason}")
    return cp


def is_cupy(a):
    """Whether `a` is a CuPy array (without importing CuPy)."""
    return type(a).__module__.split(".")[0] == "cupy" and hasattr(a, "device")


def backend_for(x):
    """The backend for CuPy array `x`'s device (one per device, created on first use)."""
    cp = _cupy()
    dev = x.device.id
    be = _backends.get(dev)
    if be is None:
        with _lock:
            be = _backends.setdefault(dev, _CuPyBackend(cp, dev))
    return be


def _module(cp, dev):
    """The compiled kernels of device `dev` (NVRTC through cupy.RawModule, cached by CuPy
    on disk and here per device; one module holds the float and double kernels)."""
    mod = _modules.get(dev)
    if mod is None:
        names = [f"{t}<{c}>" for t in _TEMPLATES for c in ("float", "double")]
        with _lock, cp.cuda.Device(dev):
            mod = _modules.get(dev)
            if mod is None:
                mod = cp.RawModule(code=kernel_source(), options=NVRTC_OPTIONS,
                                   name_expressions=names)
                mod.compile()
                _modules[dev] = mod
    return mod


def _pow2_at_least(n, lo, hi):
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def _col_tile(Cp):
    """Column layout block shape (TX, TY): TX adjacent columns (up to 32) x TY rows."""
    tx = _pow2_at_least(Cp, 1, 32)
    return tx, THREADS // tx


class _CuPyBackend:
    """Array operations for the shared checks, and the GPU operations, on one device."""

    array_type = "cupy.ndarray"

    def __init__(self, cp, dev):
        self.cp, self.dev = cp, dev
        self._kernels = {}

    @property
    def device(self):
        """A context that makes x's device current: nothing to do where it already is
        (the common case), else a new ``cupy.cuda.Device`` context (one per use: a Device
        object's context keeps the previous device per object, not per thread)."""
        if self.cp.cuda.runtime.getDevice() == self.dev:
            return _CURRENT
        return self.cp.cuda.Device(self.dev)

    # ------------------------------------------------------------ checks' operations

    def where(self):
        return f"a cupy.ndarray on device {self.dev}"

    def is_array(self, a):
        return isinstance(a, self.cp.ndarray)

    def describe(self, a):
        """The type of `a` for messages, saying which kind of array it is."""
        t = type(a)
        if t.__module__.split(".")[0] == "numpy":
            return f"numpy.{t.__name__} (a NumPy array, but x is {self.where()})"
        if is_cupy(a):
            return f"cupy.{t.__name__}"
        return t.__name__

    def asarray(self, v, name):
        """`v` if it is a CuPy array on this device, else a TypeError/ValueError naming it."""
        if not isinstance(v, self.cp.ndarray):
            raise TypeError(
                f"{name} must be {self.where()} like x, got {self.describe(v)}; move it "
                f"with cupy.asarray({name}) (or x to the host with x.get())")
        self.same_device(v, name)
        return v

    def same_device(self, a, name):
        if a.device.id != self.dev:
            raise ValueError(
                f"{name} is on CUDA device {a.device.id} but x is on device {self.dev}: "
                f"move it with cupy.asarray({name}) inside cupy.cuda.Device({self.dev})")

    def writeable(self, a):
        return True                        # CuPy arrays have no read-only flag

    def aligned(self, a):
        return a.data.ptr % a.itemsize == 0 if a.size else True

    def empty(self, shape, dtype):
        with self.device:
            return self.cp.empty(shape, dtype=dtype)

    def ascontiguous(self, a, dtype=None):
        with self.device:
            if dtype is not None and np.dtype(dtype) == np.float64 and a.dtype == np.float32:
                return self._convert("bn_widen_f32", self.cp.ascontiguousarray(a),
                                     np.float64)
            return self.cp.ascontiguousarray(a, dtype=dtype)

    def _convert(self, name, a, dtype):
        """`a` (C-contiguous) converted by kernel `name` (bn_widen_f32, bn_narrow_f32):
        CuPy's own casts are compiled with -ftz=true and flush float32 subnormals, where
        the CPU path keeps them."""
        r = self.cp.empty(a.shape, dtype=dtype)
        self._launch(name, None, -(-a.size // THREADS), (THREADS, 1, 1),
                     (a, r, self._i(a.size)))
        return r

    def copy(self, a, dtype=None):
        with self.device:
            return self.cp.array(a, dtype=dtype, order="C")

    def to_host(self, a):
        return a.get()

    @staticmethod
    def _extent(a):
        """[lo, hi) of the bytes `a` touches (empty for an empty array)."""
        if a.size == 0:
            return 0, 0
        lo = hi = a.data.ptr
        for n, st in zip(a.shape, a.strides):
            if st > 0:
                hi += (n - 1) * st
            else:
                lo += (n - 1) * st
        return lo, hi + a.itemsize

    def may_share(self, a, b):
        (al, ah), (bl, bh) = self._extent(a), self._extent(b)
        return al < bh and bl < ah

    def overlap(self, a, b):
        """Whether a and b share memory: exactly, through CuPy, where it can tell."""
        if not self.may_share(a, b):
            return False
        try:
            return bool(self.cp.shares_memory(a, b))
        except Exception:
            return True

    def same_start(self, a, b):
        return a.data.ptr == b.data.ptr

    # ------------------------------------------------------------ launches

    def _k(self, name, dtype=None):
        key = (name, dtype)
        k = self._kernels.get(key)
        if k is None:
            mod = _module(self.cp, self.dev)
            full = name if dtype is None else f"{name}<{_CTYPE[np.dtype(dtype)]}>"
            k = self._kernels[key] = mod.get_function(full)
        return k

    def _launch(self, name, dtype, grid, block, args):
        if grid <= 0:
            return
        if grid >= 2 ** 31:
            raise ValueError(f"tensor too large for bnfast's CUDA kernels ({grid} blocks)")
        with self.device:
            self._k(name, dtype)((int(grid),), block, args)

    def _zeros(self, n, dtype=np.float64):
        with self.device:
            return self.cp.zeros(n, dtype=dtype)

    def _out(self, n):
        """n float64 values that the next kernel writes in full: no zero fill (one launch
        less per buffer; the tests' stand-ins hand out NaN-filled memory here)."""
        with self.device:
            return self.cp.empty(n, dtype=np.float64)

    @staticmethod
    def _i(v):
        return np.int64(v)

    @staticmethod
    def _opt(a):
        return _NULL if a is None else a

    def _reduce_plan(self, N, C, S):
        """(kind, RB, G, M, grid, block): blocks of about STATS_ELEMS elements; M partials
        per channel.  Depends on the shape only."""
        if S >= ROW_MIN_S:
            RB = max(1, -(-STATS_ELEMS // S))
            G = -(-N // RB)
            return "row", RB, G, G, C * G, (THREADS, 1, 1)
        Cp = C * S
        TX, TY = _col_tile(Cp)
        RB = max(TY, STATS_ELEMS // TX)
        G = -(-N // RB)
        return "col", RB, G, S * G, -(-Cp // TX) * G, (TX, TY, 1)

    def _reduce(self, name, pre, post, nout, dtype, N, C, S, plan):
        """Run stage-1 kernel `name`_row / _col: arguments pre + shape + post + partials;
        returns the `nout` partial arrays (C * M float64 values each)."""
        kind, RB, G, M, grid, block = plan
        i = self._i
        outs = [self._out(max(C * M, 1)) for _ in range(nout)]
        dims = (i(N), i(C if kind == "row" else C * S), i(S), i(RB), i(G))
        self._launch(f"{name}_{kind}", dtype, grid, block,
                     tuple(pre) + dims + tuple(post) + tuple(outs))
        return outs

    def moments(self, xk, N, C, S):
        """Per-channel (mean, biased var), float64 CuPy arrays."""
        mean, var = self._out(C), self._out(C)
        if C == 0:
            return mean, var
        plan = self._reduce_plan(N, C, S)
        pn, pm, pq = self._reduce("bn_stats", (xk,), (), 3, xk.dtype, N, C, S, plan)
        M = plan[3]
        i = self._i
        self._launch("bn_stats_merge", xk.dtype, C, (_pow2_at_least(M, 32, THREADS), 1, 1),
                     (pn, pm, pq, i(M), xk, i(S), mean, var))
        self._launch("bn_stats_fixup", xk.dtype, C, (THREADS, 1, 1),
                     (xk, i(N), i(C), i(S), mean, var))
        return mean, var

    def _coeffs(self, var, w, b, eps, C, invstd):
        scale, shift = self._out(C), self._out(C)
        self._launch("bn_coeffs", None, -(-C // THREADS), (THREADS, 1, 1),
                     (var, self._opt(w), self._opt(b), np.float64(eps), self._i(C),
                      self._opt(invstd), scale, shift))
        return scale, shift

    def _normalize(self, xk, yk, N, C, S, mean, scale, shift, relu):
        i = self._i
        if S >= ROW_MIN_S:
            chunks = -(-S // CHUNK)
            self._launch("bn_normalize_row", xk.dtype, N * C * chunks, (THREADS, 1, 1),
                         (xk, yk, i(C), i(S), i(chunks), mean, scale, shift,
                          np.int32(relu), _f64(xk, N, S)))
        else:
            Cp = C * S
            TX, TY = _col_tile(Cp)
            RB = TY * EW_ROWS
            G = -(-N // RB)
            self._launch("bn_normalize_col", xk.dtype, -(-Cp // TX) * G, (TX, TY, 1),
                         (xk, yk, i(N), i(Cp), i(S), i(RB), i(G), mean, scale, shift,
                          np.int32(relu), _f64(xk, N, S)))

    def _update_running(self, rm, rv, mean, var, C, count, momentum):
        def stride(a):
            return a.strides[0] // a.itemsize if a.ndim and a.shape[0] > 1 else 1
        self._launch("bn_update_running", rm.dtype, -(-C // THREADS), (THREADS, 1, 1),
                     (rm, rv, self._i(stride(rm)), self._i(stride(rv)), mean, var,
                      self._i(C), np.float64(count), np.float64(momentum)))

    def direct_running(self, a):
        """Whether the kernel can update running statistic `a` in place."""
        return a.strides[0] % a.itemsize == 0 and (a.shape[0] <= 1 or a.strides[0] != 0)

    def train_forward(self, xk, yk, N, C, S, w, b, eps, relu, rm, rv, momentum):
        """Statistics, normalisation and the running statistics' update; (mean, invstd)."""
        mean, var = self.moments(xk, N, C, S)
        invstd = self._out(C)
        if C:
            scale, shift = self._coeffs(var, w, b, eps, C, invstd)
            self._normalize(xk, yk, N, C, S, mean, scale, shift, relu)
            if rm is not None:
                self._update_running(rm, rv, mean, var, C, float(N) * float(S), momentum)
        return mean, invstd

    def infer_forward(self, xk, yk, N, C, S, m, v, w, b, eps, relu):
        if C and N * S:
            scale, shift = self._coeffs(v, w, b, eps, C, None)
            self._normalize(xk, yk, N, C, S, m, scale, shift, relu)

    def backward_reduce(self, dyk, xk, N, C, S, m, inv, w, b, relu, training, nt=None):
        """The backward's sums and coefficients, as _core.backward_reduce: (dweight,
        dbias, k_x, k_0, degenerate), float64 CuPy arrays and whether a channel has a
        non-finite weight, invstd or sum (read back: one 4-byte copy, a stream sync)."""
        i = self._i
        sd, sx, dweight = self._out(C), self._out(C), self._out(C)
        kx, k0 = self._out(C), self._out(C)
        if not C:
            return dweight, sd, kx, k0, False
        flag = self._zeros(1, np.int32)
        plan = self._reduce_plan(N, C, S)
        M = plan[3]                        # 0 for an empty batch: the sums are 0
        pd, px = self._reduce("bn_bwd_reduce", (dyk, xk),
                              (m, inv, self._opt(w), self._opt(b), np.int32(relu)), 2,
                              xk.dtype, N, C, S, plan)
        self._launch("bn_bwd_merge", None, C, (_pow2_at_least(M, 32, THREADS), 1, 1),
                     (pd, px, i(M), inv, self._opt(w), np.float64(float(N) * float(S)),
                      np.int32(training), sd, sx, dweight, kx, k0, flag))
        return dweight, sd, kx, k0, bool(int(flag.get()[0]))

    def backward_dx(self, dyk, xk, dxk, N, C, S, m, inv, w, b, kx, k0, relu, training,
                    nt=None):
        """dx from the coefficients of backward_reduce, as _core.backward_dx."""
        if C and N * S:
            self._dx(dyk, xk, dxk, N, C, S, m, inv, w, b, kx, k0, relu, training)

    def cast(self, a, dtype):
        """`a` (float64, C-contiguous) in `dtype` (float32 or float64), rounded once with
        subnormals kept and NaNs as the canonical NaN (NumPy's, the CPU path's: a GPU's
        float64 -> float32 conversion makes its own NaN, 0x7fffffff)."""
        if np.dtype(dtype) == a.dtype:
            return a
        with self.device:
            return self._convert("bn_narrow_f32", a, dtype)

    def take_host(self, a, idx, axis):
        """NumPy copy of the channels `idx` (NumPy ints) of `a` along `axis`."""
        with self.device:
            return self.cp.take(a, self.cp.asarray(idx), axis=axis).get()

    def from_host(self, a):
        """A NumPy array (or index array) on this device."""
        with self.device:
            return self.cp.asarray(a)

    def _dx(self, dyk, xk, dxk, N, C, S, m, inv, w, b, kx, k0, relu, training):
        i = self._i
        params = (m, inv, self._opt(w), self._opt(b), np.int32(relu), kx, k0,
                  np.int32(not training), _f64(xk, N, S))
        if S >= ROW_MIN_S:
            chunks = -(-S // CHUNK)
            self._launch("bn_bwd_dx_row", xk.dtype, N * C * chunks, (THREADS, 1, 1),
                         (dyk, xk, dxk, i(C), i(S), i(chunks)) + params)
        else:
            Cp = C * S
            TX, TY = _col_tile(Cp)
            RB = TY * EW_ROWS
            G = -(-N // RB)
            self._launch("bn_bwd_dx_col", xk.dtype, -(-Cp // TX) * G, (TX, TY, 1),
                         (dyk, xk, dxk, i(N), i(Cp), i(S), i(RB), i(G)) + params)
