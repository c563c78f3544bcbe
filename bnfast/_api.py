"""The functional batch-norm API on NumPy arrays (CPU kernels) and CuPy arrays (GPU).

Every function validates and normalises its arguments here, in Python, then calls one
compiled kernel (``bnfast._core``) that releases the GIL.  Conventions follow PyTorch:
``eps=1e-5``, ``momentum=0.1`` weighting the new batch, the running variance updated with the
unbiased batch variance, and the channel axis 1 by default.
"""
import math
import numbers

import numpy as np

from . import _core, _plan
from ._threads import get_num_threads
from ._xp import is_cupy as _is_cupy   # from the type's module, without importing CuPy

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


# ------------------------------------------------------------------ argument checking
#
# Every rule and every error message lives here.  The Cython fast paths (bnfast._core)
# only take cases these rules accept and that need no conversion (tests/api/test_fastpath.py).

def _short(v):
    r = repr(v)
    return r if len(r) <= 60 else r[:40] + "..." + r[-10:]


# ------------------------------------------------------------------ two kinds of array
#
# The checks below serve NumPy and CuPy arrays.  `be` (the backend) is None for NumPy
# input, which the CPU kernels compute, and for a CuPy `x` it is bnfast.cuda's backend for
# x's device: it supplies the array operations that differ (type and device of each
# argument, allocation, overlap) and the GPU operations.  Rules and messages stay here.

def _backend(x):
    """None for NumPy input; for a CuPy array, the GPU backend of its device."""
    if not _is_cupy(x):
        return None
    from .cuda._backend import backend_for
    return backend_for(x)


def _refuse_cupy(v, name):
    """NumPy path: a CuPy argument is a TypeError naming it (not a failed conversion)."""
    if _is_cupy(v):
        raise TypeError(
            f"{name} is a CuPy array (on the GPU) but x is a NumPy array: pass all arrays "
            f"on one device (cupy.asarray(x) to compute on the GPU, {name}.get() for the CPU)")


def _not_masked(a, name):
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a masked array; bnfast does not apply masks (they would be silently "
            f"ignored): pass {name}.filled(value), or select the valid entries, first")


def _asarray(v, name):
    """np.asarray(v) with masked arrays refused and conversion errors naming `name`."""
    if isinstance(v, np.ndarray):
        _not_masked(v, name)
        return v if type(v) is np.ndarray else v.view(np.ndarray)
    _refuse_cupy(v, name)
    try:
        return np.asarray(v)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"{name} could not be converted to an array: {exc}") from None


def _as_data(x, name, be=None):
    x = _asarray(x, name) if be is None else be.asarray(x, name)
    dt = x.dtype
    if dt.kind != "f" or dt.itemsize not in (4, 8):
        raise TypeError(f"{name} must have dtype float32 or float64, got {dt}")
    if be is None and (not dt.isnative or not x.flags.aligned):
        x = x.astype(dt.newbyteorder("="))      # a native, aligned copy
    return x


def _flag(v, name):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, numbers.Integral) and v in (0, 1):
        return bool(v)
    raise TypeError(f"{name} must be a bool, got {_short(v)}")


def _norm_axis(axis, ndim):
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an integer, got {_short(axis)}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis {_short(axis)} is out of bounds for an array of dimension {ndim}")
    return axis % ndim


def _layout(x, axis, be=None):
    """Return (N, C, S, perm, xk): the kernel view of x.

    xk is C-contiguous and its memory is (N, C, S): N elements of the axes stored outside
    the channel axis, S of those stored inside it.  ``perm`` is None when x is C-contiguous;
    otherwise xk is ``x.transpose(perm)`` (an array that is dense in another axis order,
    such as channels-last or Fortran order, needs no copy), or a contiguous copy of x.
    """
    if x.ndim < 2:
        raise ValueError(
            f"x must have at least 2 dimensions (batch, channels, ...), got shape {x.shape}")
    ax = _norm_axis(axis, x.ndim)
    shape = x.shape
    C = shape[ax]
    if not x.flags.c_contiguous:
        # Axis order by decreasing stride: if x is dense in that order, use it as is.
        perm = tuple(sorted(range(x.ndim), key=lambda i: -x.strides[i]))
        xt = x.transpose(perm)
        if xt.flags.c_contiguous:
            p = perm.index(ax)
            return math.prod(xt.shape[:p]), C, math.prod(xt.shape[p + 1:]), perm, xt
        x = np.ascontiguousarray(x) if be is None else be.ascontiguous(x)
    return math.prod(shape[:ax]), C, math.prod(shape[ax + 1:]), None, x


def _coerce(a, perm, be=None):
    """Bring another array of x's shape into x's kernel layout."""
    a = a if perm is None else a.transpose(perm)
    return np.ascontiguousarray(a) if be is None else be.ascontiguous(a)


def _inverse(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _overlap(a, b):
    """Whether arrays a and b share memory (exactly where that is cheap to decide)."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=100_000))
    except np.exceptions.TooHardError:
        return True


def _is_array(a, be):
    return isinstance(a, np.ndarray) if be is None else be.is_array(a)


def _not_array(a, name, what, be):
    """The TypeError for a `name` that must be an array of x's kind (`what`: why)."""
    if be is None:
        _refuse_cupy(a, name)
    kind = "numpy.ndarray" if be is None else be.array_type
    got = type(a).__name__ if be is None else be.describe(a)
    return TypeError(f"{name} must be a {kind}{what}, got {got}")


def _writable_array(a, name, what, be):
    """Check that an array the caller passes for bnfast to write (out=, running
    statistics) is an array of the backend's kind: not masked (NumPy), on x's device
    (CuPy)."""
    if not _is_array(a, be):
        raise _not_array(a, name, what, be)
    if be is None:
        _not_masked(a, name)
    else:
        be.same_device(a, name)


def _output(out, x, perm, inputs, name="out", be=None):
    """Return (result, kernel_buffer, copy_back) for an output shaped like x."""
    shape = x.shape
    empty = np.empty if be is None else be.empty
    if out is None:
        if perm is None:
            buf = empty(shape, dtype=x.dtype)
            return buf, buf, False
        buf = empty(tuple(shape[i] for i in perm), dtype=x.dtype)
        return buf.transpose(_inverse(perm)), buf, False
    _writable_array(out, name, "", be)
    if out.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {out.dtype} but the result has dtype {x.dtype}")
    if out.shape != shape:
        raise ValueError(f"{name} has shape {out.shape} but the result has shape {shape}")
    if not (out.flags.writeable if be is None else be.writeable(out)):
        raise ValueError(f"{name} is read-only")
    view = out if perm is None else out.transpose(perm)
    if view.flags.c_contiguous and (view.flags.aligned if be is None else be.aligned(view)):
        safe = True
        for a in inputs:
            # Writing in place over an input is fine only if it is exactly the same memory.
            if be is None:
                if np.may_share_memory(view, a) and not (
                        a.shape == view.shape
                        and a.__array_interface__["data"][0]
                        == view.__array_interface__["data"][0]):
                    safe = False
            elif be.may_share(view, a) and not (a.shape == view.shape
                                                and be.same_start(a, view)):
                safe = False
        if safe:
            return out, view, False
    return out, empty(view.shape, dtype=x.dtype), True


def _copy_back(out, buf, perm):
    out[...] = buf if perm is None else buf.transpose(_inverse(perm))


def _chan(v, C, name, required=False, be=None):
    if v is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    a = _asarray(v, name) if be is None else be.asarray(v, name)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if a.shape != (C,):
        raise ValueError(
            f"{name} must have shape ({C},) to match the {C} channels of x, got {a.shape}")
    if be is not None:
        return be.ascontiguous(a, np.float64)
    return np.require(a, np.float64, ["C_CONTIGUOUS", "ALIGNED"])


def _detach(buf, *vecs, be=None):
    """The per-channel vectors, copied where they share memory with the output buffer
    (the kernel reads them while it writes the output)."""
    share = np.may_share_memory if be is None else be.may_share
    return tuple(v.copy() if v is not None and share(v, buf) else v for v in vecs)


def _running(rm, rv, C, x, out, be=None):
    """Validate the running statistics; return (rm_kernel, rv_kernel, write_back).

    The kernel arrays are `rm`/`rv` themselves when they are native, aligned and strided
    in whole elements, else native contiguous copies, and `write_back()` stores the
    updated values into the caller's arrays.
    """
    if rm is None and rv is None:
        return None, None, None
    if rm is None or rv is None:
        raise ValueError("running_mean and running_var must both be given or both be None")
    overlap = _overlap if be is None else be.overlap
    for a, name in ((rm, "running_mean"), (rv, "running_var")):
        _writable_array(a, name, " (it is updated in place)", be)
        if a.dtype.type not in (np.float32, np.float64):
            raise TypeError(
                f"{name} must have dtype float32 or float64 (either byte order), "
                f"got {a.dtype}")
        if a.shape != (C,):
            raise ValueError(
                f"{name} must have shape ({C},) to match the {C} channels of x, "
                f"got {a.shape}")
        if not (a.flags.writeable if be is None else be.writeable(a)):
            raise ValueError(f"{name} is read-only; it must be writeable to be updated")
        if overlap(a, x):
            raise ValueError(f"{name} must not share memory with x")
        if out is not None and _is_array(out, be) and overlap(a, out):
            raise ValueError(f"{name} must not share memory with out")
    if rm.dtype.type is not rv.dtype.type:
        raise TypeError(
            f"running_mean ({rm.dtype}) and running_var ({rv.dtype}) must have the same dtype")
    if overlap(rm, rv):
        raise ValueError("running_mean and running_var must not share memory")

    def direct(a):
        if be is not None:
            return be.direct_running(a)
        return (a.dtype.isnative and a.flags.aligned and a.strides[0] % a.itemsize == 0
                and type(a) is np.ndarray)

    if direct(rm) and direct(rv):
        return rm, rv, None
    native = rm.dtype.newbyteorder("=")
    if be is None:
        km = np.array(rm, dtype=native, order="C")
        kv = np.array(rv, dtype=native, order="C")
    else:
        km, kv = be.copy(rm, native), be.copy(rv, native)

    def write_back():
        rm[...] = km
        rv[...] = kv
    return km, kv, write_back


def _real(v, name, lo, hi, lo_open=False):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_short(v)}")
    low = f"> {lo}" if lo_open else f">= {lo}"
    span = f"in [{lo}, {hi}]" if hi != math.inf else f"{low} and finite"
    try:
        f = float(v)
    except OverflowError:
        raise ValueError(f"{name} must be {span}, got {_short(v)}") from None
    if not math.isfinite(f) or not (lo < f <= hi if lo_open else lo <= f <= hi):
        raise ValueError(f"{name} must be {span}, got {_short(v)}")
    return f


def _training_count(N, S, shape):
    if N * S <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input shape {shape}")


def _degenerate_index(invstd, weight, dweight, dbias):
    """The channels whose weight, invstd, dweight or dbias is not finite (NumPy vectors)."""
    inv = np.asarray(invstd, np.float64)
    ok = (np.isfinite(inv) & np.isfinite(np.asarray(dweight, np.float64))
          & np.isfinite(np.asarray(dbias, np.float64)))
    if weight is not None:
        ok &= np.isfinite(np.asarray(weight, np.float64))
    return np.flatnonzero(~ok)


def _degenerate_channels(x, dy, ax, invstd, weight, dweight, dbias, be=None):
    """(idx, x_sub, dy_sub): the channels whose weight, invstd, dweight or dbias is not
    finite, and (NumPy) copies of their data, taken before dx may overwrite x or dy."""
    if be is None:
        idx = _degenerate_index(invstd, weight, dweight, dbias)
        return idx, np.take(x, idx, axis=ax), np.take(dy, idx, axis=ax)
    idx = _degenerate_index(*(None if v is None else be.to_host(v)
                              for v in (invstd, weight, dweight, dbias)))
    return idx, be.take_host(x, idx, ax), be.take_host(dy, idx, ax)


def _backward_degenerate(saved, mean, invstd, weight, bias, relu, training, ax, dx,
                         dweight, dbias, be=None):
    """Recompute the channels that _degenerate_channels found (`saved`).

    A channel is degenerate with an infinite weight or invstd, or with float64 data whose
    deviations or products overflow (values near 1e308).  The kernels' per-element form
    ``kd*g + kx*(x - mean) + k0`` then gives inf - inf = NaN, and their sums overflow
    where the result is representable.  These channels are recomputed with the float64
    twin's formula ``a / m * (m*g - sum(g) - xhat * sum(g*xhat))`` in NumPy's long double
    (80-bit extended on x86-64 Linux, whose range keeps the intermediates from
    overflowing; where long double is double, the twin's float64 results), and written
    into `dx`, `dweight` and `dbias` in place, rounded once, with canonical NaNs.  On the
    GPU (`be`) the same host computation, its results copied into the device arrays.
    """
    idx, x_sub, dy_sub = saved
    if not idx.size:
        return
    put = (lambda a: a) if be is None else be.from_host
    if be is not None:
        mean, invstd, weight, bias = (None if v is None else be.to_host(v)
                                      for v in (mean, invstd, weight, bias))
    L = np.longdouble
    shape = [1] * x_sub.ndim
    shape[ax] = idx.size

    def vec(v, default):
        C = dx.shape[ax]
        a = np.full(C, default) if v is None else np.asarray(v, np.float64)
        return a[idx].astype(L).reshape(shape)

    xs = x_sub.astype(L)
    g = dy_sub.astype(L)
    red = tuple(i for i in range(xs.ndim) if i != ax)
    m = xs.size // idx.size
    with np.errstate(all="ignore"):
        wv, iv = vec(weight, 1.0), vec(invstd, 0.0)
        xhat = (xs - vec(mean, 0.0)) * iv
        if relu:
            g = np.where(xhat * wv + vec(bias, 0.0) > 0, g, L(0))
        db = g.sum(axis=red, keepdims=True)
        dw = (g * xhat).sum(axis=red, keepdims=True)
        if training:
            rdx = wv * iv / m * (m * g - db - xhat * dw)
        else:
            rdx = wv * iv * g
    canon = lambda a: np.where(np.isnan(a), np.nan, a)  # noqa: E731
    where = (slice(None),) * ax + (put(idx),)
    with np.errstate(over="ignore"):
        dx[where] = put(canon(rdx.astype(np.float64)).astype(dx.dtype))
        dweight[put(idx)] = put(canon(dw.reshape(-1).astype(np.float64)))
        dbias[put(idx)] = put(canon(db.reshape(-1).astype(np.float64)))


def _check_zero_variance(xk, N, C, S, eps, be=None):
    """With eps == 0 a constant channel would normalise to 0/0 = NaN: refuse it first."""
    if eps != 0.0:
        return
    if be is None:
        _, var = _core.moments(xk, N, C, S, get_num_threads())
    else:
        var = be.to_host(be.moments(xk, N, C, S)[1])
    zero = np.flatnonzero(var == 0.0)
    if zero.size:
        raise ValueError(
            f"eps=0 with a constant channel: channel {int(zero[0])} (and {zero.size - 1} "
            f"more) has zero variance, so its output would be 0/0 = NaN; use eps > 0")


# ------------------------------------------------------------------ public functions

def moments(x, *, axis=1):
    """Per-channel mean and biased variance of a batch.

    Statistics are accumulated in float64 for either input dtype, with a two-pass algorithm
    per cache-resident block and Chan et al.'s pairwise update between blocks, in an order
    fixed by the shape (so the result does not depend on the thread count).

    Parameters
    ----------
    x : array_like of float32 or float64, ndim >= 2
        The batch.
    axis : int, default 1
        The channel axis: 1 for channels-first (N, C, ...), -1 for channels-last
        (N, ..., C).  Statistics are taken over every other axis.

    Returns
    -------
    mean, var : ndarray of shape (C,), float64
        The mean and the biased (divide by n) variance of every channel.  They are float64
        for either input dtype: that is the precision they are computed in, and the
        variance of float32 data can exceed float32's range (values of magnitude 1e30 have
        a variance of order 1e60).

    Raises
    ------
    TypeError
        If `x` is not float32 or float64 (or cannot be converted to an array), is a masked
        array, or `axis` is not an integer.
    ValueError
        If `x` has fewer than 2 dimensions, `axis` is out of range, or a channel has no
        values.

    Notes
    -----
    Finite float64 values near the largest double (say 1.7e308 and -1.7e308 in one
    channel) overflow the blocked sums; such channels are recomputed in scaled
    coordinates, so the mean is always finite and the variance is inf only when its true
    value exceeds the double range.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> mean, var = bnfast.moments(x)
    >>> mean.tolist(), var.tolist()
    ([2.0, 20.0], [1.0, 100.0])
    """
    r = _core.fast_moments(x, axis, get_num_threads)
    if r is not None:
        return r
    be = _backend(x)
    x = _as_data(x, "x", be)
    N, C, S, perm, xk = _layout(x, axis, be)
    if N * S == 0 and C > 0:
        raise ValueError(f"moments of an empty batch are undefined (x has shape {x.shape})")
    if be is not None:
        return be.moments(xk, N, C, S)
    return _core.moments(xk, N, C, S, get_num_threads())


def batch_norm_train(x, weight=None, bias=None, *, eps=1e-5, axis=1, running_mean=None,
                     running_var=None, momentum=0.1, out=None, relu=False):
    """Training-mode batch normalization: normalise with the batch's own statistics.

    Computes ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per channel, with the
    batch mean and biased batch variance (Algorithm 1 of Ioffe & Szegedy), and in the same
    call optionally updates running statistics in place::

        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var  = (1 - momentum) * running_var  + momentum * var * n / (n - 1)

    where n is the number of values per channel (PyTorch's convention).

    Parameters
    ----------
    x : array_like of float32 or float64, ndim >= 2
        The batch.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale (gamma) and shift (beta); default 1 and 0.
    eps : float, default 1e-5
        Added to the variance for stability; must be >= 0 and finite.  With 0, a
        constant channel raises ValueError instead of giving NaN.
    axis : int, default 1
        The channel axis (1 channels-first, -1 channels-last).
    running_mean, running_var : ndarray of shape (C,), float32 or float64, optional
        Running statistics, updated in place.  Give both or neither.
    momentum : float, default 0.1
        Weight of the new batch in the running statistics, in [0, 1].
    out : ndarray, optional
        Where to write y: same shape and dtype as `x`.  May be `x` itself.
    relu : bool, default False
        Apply ReLU to the output in the same pass (fused BN -> ReLU).

    Returns
    -------
    y : ndarray
        The normalised batch (`out` if given).  float32 data is normalised in float32
        arithmetic from the float64 statistics: per channel within
        ``2 * FLT_EPSILON * (|weight * invstd| * max|x - mean| + |bias|)`` of the exact
        value (the user guide's *Semantics*, "float32 outputs"); float64 data, and
        channels of fewer than 8 elements, in float64.
    mean, invstd : ndarray of shape (C,), float64
        The batch mean and ``1 / sqrt(var + eps)``, as needed by
        :func:`batch_norm_backward`.  They are float64 for either input dtype so that the
        backward pass uses exactly the values the forward pass used.

    Raises
    ------
    TypeError
        Unsupported dtype of `x`, `weight`, `bias`, `out` or the running statistics; a
        non-array `out` or running statistic; a masked array anywhere; a non-integer
        `axis`; a non-real `eps`/`momentum`; a `relu` that is not a bool.
    ValueError
        Shape or channel-count mismatches; ndim < 2; `axis` out of range; `eps` negative,
        NaN or infinite; `momentum` outside [0, 1]; read-only `out` or running
        statistics; running statistics that share memory with each other, with `x` or
        with `out`; only one value per channel; ``eps=0`` with a constant channel (its
        output would be 0/0; checked before anything is written).

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> rm, rv = np.zeros(2), np.ones(2)
    >>> y, mean, invstd = bnfast.batch_norm_train(x, eps=0.0, running_mean=rm,
    ...                                           running_var=rv)
    >>> y.tolist()
    [[-1.0, -1.0], [1.0, 1.0]]
    >>> rm.tolist()
    [0.2, 0.4]
    """
    r = _core.fast_train(x, weight, bias, eps, axis, running_mean, running_var, momentum,
                         out, relu, get_num_threads)
    if r is not None:
        return r
    nt = get_num_threads()
    be = _backend(x)
    x = _as_data(x, "x", be)
    N, C, S, perm, xk = _layout(x, axis, be)
    eps = _real(eps, "eps", 0.0, math.inf)
    momentum = _real(momentum, "momentum", 0.0, 1.0)
    relu = _flag(relu, "relu")
    w = _chan(weight, C, "weight", be=be)
    b = _chan(bias, C, "bias", be=be)
    rm, rv, write_back = _running(running_mean, running_var, C, x, out, be)
    _training_count(N, S, x.shape)
    y, yk, copy_back = _output(out, x, perm, (xk,), be=be)
    w, b = _detach(yk, w, b, be=be)
    _check_zero_variance(xk, N, C, S, eps, be)
    if be is None:
        mean, invstd = _core.train_forward(xk, yk, N, C, S, w, b, eps, relu, rm, rv,
                                           momentum, nt)
    else:
        mean, invstd = be.train_forward(xk, yk, N, C, S, w, b, eps, relu, rm, rv, momentum)
    if copy_back:
        _copy_back(y, yk, perm)
    if write_back is not None:
        write_back()
    return y, mean, invstd


def batch_norm_infer(x, mean, var, weight=None, bias=None, *, eps=1e-5, axis=1, out=None,
                     relu=False):
    """Inference-mode batch normalization with given statistics.

    Applies the per-channel affine map of Algorithm 2,
    ``y = (x - mean) * (weight / sqrt(var + eps)) + bias``, evaluated in float64 and
    rounded once (so a channel far from zero keeps its precision).

    Parameters
    ----------
    x : array_like of float32 or float64, ndim >= 2
        The batch (may be empty).
    mean, var : array_like of shape (C,)
        The statistics to normalise with (usually the running or population statistics).
        `var` must be >= 0.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale and shift; default 1 and 0.
    eps : float, default 1e-5
        Added to `var` before the square root (PyTorch's default); must be >= 0 and finite.
    axis : int, default 1
        The channel axis: 1 for channels-first ``(N, C, ...)``, -1 for channels-last
        ``(N, ..., C)``.
    out : ndarray, optional
        Where to write y; may be `x` itself.
    relu : bool, default False
        Apply ReLU to the output in the same pass.

    Returns
    -------
    y : ndarray
        The normalised batch (float32 data in float32 arithmetic, with the bound given
        under :func:`batch_norm_train`).

    Raises
    ------
    TypeError
        As for :func:`batch_norm_train` (for `x`, `mean`, `var`, `weight`, `bias`, `out`,
        `axis`, `eps`, `relu`).
    ValueError
        As for :func:`batch_norm_train`; also a `var` that is negative or NaN in some
        channel, or zero with ``eps=0``.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.array([[0.0, 2.0], [4.0, 6.0]])
    >>> bnfast.batch_norm_infer(x, mean=[2.0, 4.0], var=[4.0, 4.0], eps=0.0).tolist()
    [[-1.0, -1.0], [1.0, 1.0]]
    """
    r = _core.fast_infer(x, mean, var, weight, bias, eps, axis, out, relu, get_num_threads)
    if r is not None:
        return r
    nt = get_num_threads()
    be = _backend(x)
    x = _as_data(x, "x", be)
    N, C, S, perm, xk = _layout(x, axis, be)
    eps = _real(eps, "eps", 0.0, math.inf)
    relu = _flag(relu, "relu")
    m = _chan(mean, C, "mean", required=True, be=be)
    v = _chan(var, C, "var", required=True, be=be)
    vh = v if be is None else be.to_host(v)      # the checks read the values
    bad = np.flatnonzero(~(vh >= 0))
    if bad.size:
        raise ValueError(
            f"var must be >= 0 (and not NaN) in every channel; channel {int(bad[0])} "
            f"has var {vh[bad[0]]!r}")
    zero = np.flatnonzero(vh + eps == 0)
    if zero.size:
        raise ValueError(
            f"var + eps must be > 0 in every channel; channel {int(zero[0])} has var 0 "
            f"and eps is 0, so its output would be 0/0 = NaN")
    w = _chan(weight, C, "weight", be=be)
    b = _chan(bias, C, "bias", be=be)
    y, yk, copy_back = _output(out, x, perm, (xk,), be=be)
    m, v, w, b = _detach(yk, m, v, w, b, be=be)
    if be is None:
        _core.infer_forward(xk, yk, N, C, S, m, v, w, b, eps, relu, nt)
    else:
        be.infer_forward(xk, yk, N, C, S, m, v, w, b, eps, relu)
    if copy_back:
        _copy_back(y, yk, perm)
    return y


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, bias=None, relu=False,
                        training=True, axis=1, out=None):
    """Gradients of batch normalization: dx, dweight and dbias.

    With ``xhat = (x - mean) * invstd`` and m values per channel, in training mode (the
    statistics depend on x)::

        dbias   = sum(dy)
        dweight = sum(dy * xhat)
        dx      = weight * invstd / m * (m * dy - dbias - xhat * dweight)

    and in eval mode (``training=False``: mean and invstd are constants, e.g. from running
    statistics) ``dx = weight * invstd * dy``.  With ``relu=True``, `dy` is the gradient
    of ``relu(bn(x))`` and is masked where the forward output was not positive; the
    forward output is recomputed from `x`, `mean`, `invstd`, `weight` and `bias`.

    Parameters
    ----------
    dy : array_like, same shape and dtype as `x`
        Gradient of the loss with respect to the output.
    x : array_like of float32 or float64
        The forward input.
    mean, invstd : array_like of shape (C,)
        As returned by :func:`batch_norm_train` (or running mean and
        ``1/sqrt(running_var + eps)`` in eval mode).
    weight : array_like of shape (C,), optional
        The forward weight; default 1.
    bias : array_like of shape (C,), optional
        The forward bias; required with ``relu=True`` (the mask is where the forward
        output was positive), unused otherwise.
    relu : bool, default False
        The forward pass had a fused ReLU.
    training : bool, default True
        Whether the forward used batch statistics.
    axis : int, default 1
        The channel axis of `x` and `dy`: 1 for channels-first ``(N, C, ...)``, -1 for
        channels-last ``(N, ..., C)``; the sums are taken over every other axis.
    out : ndarray, optional
        Where to write dx; may be `dy` or `x` itself.

    Returns
    -------
    dx : ndarray, shape and dtype of `x`
        The gradient with respect to `x` (`out` if given).  From float64 sums and
        coefficients; for float32 data without the ReLU the element-wise pass runs in
        float32 arithmetic, per channel within ``2 * FLT_EPSILON * (|kd| * max|dy| +
        |kx| * max|x - mean| + |k0|)`` of the exact value, the three terms of
        ``dx = kd * dy + kx * (x - mean) + k0``, plus a second-order term (the user
        guide's *Semantics*, "float32 outputs"); with the ReLU, for float64 data and
        for channels of fewer than 8 elements, in float64.
    dweight, dbias : ndarray of shape (C,), dtype of `x`
        The gradients with respect to `weight` and `bias`: ``sum(dy * xhat)`` and
        ``sum(dy)`` per channel, accumulated in float64 and returned in the dtype of `x`.
        They are returned also when `weight` or `bias` was not given.

    Raises
    ------
    TypeError
        Unsupported or mismatched dtypes of `dy` and `x`, unsupported dtypes of the
        per-channel vectors or `out`, masked arrays, a non-integer `axis`, or `relu` /
        `training` that are not bools.
    ValueError
        Shape mismatches, ndim < 2, `axis` out of range, read-only `out`, or
        ``relu=True`` without `bias` (the ReLU's gradient mask depends on the forward's
        bias; pass zeros if it had none).

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.array([[1.0], [3.0]])
    >>> y, mean, invstd = bnfast.batch_norm_train(x, eps=0.0)
    >>> dx, dw, db = bnfast.batch_norm_backward(np.array([[1.0], [1.0]]), x, mean, invstd)
    >>> dx.tolist(), dw.tolist(), db.tolist()
    ([[0.0], [0.0]], [0.0], [2.0])
    """
    r = _core.fast_backward(dy, x, mean, invstd, weight, bias, relu, training, axis, out,
                            get_num_threads)
    if r is not None:
        return r
    nt = get_num_threads()
    training = _flag(training, "training")
    be = _backend(x)
    (x, dy, ax, N, C, S, perm, xk, dyk, m, inv, w, b, relu) = _backward_inputs(
        dy, x, mean, invstd, weight, bias, relu, axis, be)
    dx, dxk, copy_back = _output(out, x, perm, (xk, dyk), be=be)
    m, inv, w, b = _detach(dxk, m, inv, w, b, be=be)
    kernels = _core if be is None else be
    dweight, dbias, kx, k0, degenerate = kernels.backward_reduce(dyk, xk, N, C, S, m, inv, w,
                                                                 b, relu, training, nt)
    # channels to recompute, with their data saved before dx may overwrite x or dy
    saved = (_degenerate_channels(x, dy, ax, inv, w, dweight, dbias, be) if degenerate
             else None)
    kernels.backward_dx(dyk, xk, dxk, N, C, S, m, inv, w, b, kx, k0, relu, training, nt)
    if copy_back:
        _copy_back(dx, dxk, perm)
    if saved is not None:
        _backward_degenerate(saved, m, inv, w, b, relu, training, ax, dx, dweight, dbias, be)
    if be is not None:          # the GPU's float64 -> float32 cast has other NaN bits
        return dx, be.cast(dweight, x.dtype), be.cast(dbias, x.dtype)
    return dx, dweight.astype(x.dtype, copy=False), dbias.astype(x.dtype, copy=False)


# ------------------------------------------------------------------ backward in two steps
#
# For synchronized batch norm (bnfast.distributed): the training backward's per-channel
# sums, and its element-wise pass with coefficients from sums taken over several processes.
# Same checks as batch_norm_backward; with the sums of one process the two steps give
# exactly batch_norm_backward's dx.

def _backward_inputs(dy, x, mean, invstd, weight, bias, relu, axis, be=None):
    """The checks and conversions of every backward entry point: (x, dy, ax, N, C, S,
    perm, xk, dyk, mean, invstd, weight, bias, relu) in the kernels' form."""
    relu = _flag(relu, "relu")
    if relu and bias is None:
        raise ValueError(
            "bias is required when relu=True: the ReLU's gradient mask is where the forward "
            "output, (x - mean) * invstd * weight + bias, was positive, so it depends on "
            "the forward's bias (pass bias=np.zeros(C) if the forward had none)")
    x = _as_data(x, "x", be)
    dy = _as_data(dy, "dy", be)
    if dy.dtype != x.dtype:
        raise TypeError(f"dy has dtype {dy.dtype} but x has dtype {x.dtype}")
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape} but x has shape {x.shape}")
    N, C, S, perm, xk = _layout(x, axis, be)
    ax = _norm_axis(axis, x.ndim)           # valid: _layout checked it
    dyk = _coerce(dy, perm, be)
    m = _chan(mean, C, "mean", required=True, be=be)
    inv = _chan(invstd, C, "invstd", required=True, be=be)
    return (x, dy, ax, N, C, S, perm, xk, dyk, m, inv, _chan(weight, C, "weight", be=be),
            _chan(bias, C, "bias", be=be), relu)


def _backward_two_step(dy, x, mean, invstd, weight, combine, *, bias=None, relu=False,
                       axis=1, out=None):
    """The training backward with its per-channel sums combined by the caller.

    Validates as :func:`batch_norm_backward`, computes this call's float64 sums
    ``sd = sum(g)`` and ``sx = sum(g * (x - mean))`` (g = dy, masked where the fused
    ReLU's forward output was not positive), calls ``combine(sd, sx)`` for the sums and
    value count to use, ``(sd_all, sx_all, count)`` (for synchronized batch norm: over
    every process), takes dx's coefficients from them as the kernels do
    (``_core.backward_coefficients``) and computes dx in one pass.  Returns
    ``(dx, sd, sx)``.  With ``combine = lambda sd, sx: (sd, sx, m)`` dx is exactly
    :func:`batch_norm_backward`'s.
    """
    if _is_cupy(x):
        raise TypeError("the two-step backward (synchronized batch norm, bnfast.distributed) "
                        "takes NumPy arrays only; x is a CuPy array")
    (x, dy, ax, N, C, S, perm, xk, dyk, m, inv, w, b, relu) = _backward_inputs(
        dy, x, mean, invstd, weight, bias, relu, axis)
    nt = get_num_threads()
    dx, dxk, copy_back = _output(out, x, perm, (xk, dyk))
    m, inv, w, b = _detach(dxk, m, inv, w, b)
    sd, sx = _core.backward_sums(dyk, xk, N, C, S, m, inv, w, b, relu, nt)
    sd_all, sx_all, count = combine(sd, sx)
    _, kx, k0, _ = _core.backward_coefficients(np.ascontiguousarray(sd_all, np.float64),
                                               np.ascontiguousarray(sx_all, np.float64),
                                               inv, w, float(count), True)
    _core.backward_dx(dyk, xk, dxk, N, C, S, m, inv, w, b, kx, k0, relu, True, nt)
    if copy_back:
        _copy_back(dx, dxk, perm)
    return dx, sd, sx


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, *, axis=1, out=None, relu=False,
               num_batches_tracked=None):
    """Batch normalization with the semantics of ``torch.nn.functional.batch_norm``.

    When `training` is true, or when no running statistics are given, the batch's own
    statistics are used (and the running statistics, if given, are updated in place when
    training).  Otherwise the running statistics are used.

    ``momentum=None`` gives the cumulative moving average of the batch-norm layers
    (``momentum=None`` in :class:`bnfast.nn.BatchNorm2d` and PyTorch's layers), which
    ``torch.nn.functional.batch_norm`` does not have: the running statistics are updated
    with the factor ``1 / num_batches_tracked``, the count of batches including this one,
    which the caller keeps and passes (the layers keep it in their ``num_batches_tracked``
    buffer and add 1 before each training batch).  After n batches the running mean is the
    mean of the n batch means.

    Parameters
    ----------
    x : array_like of float32 or float64, ndim >= 2
        The batch, with its channels on `axis`.
    running_mean, running_var : ndarray of shape (C,), optional
        Running statistics, float32 or float64 arrays (give both or neither).  In training
        mode they are updated in place (the variance with the unbiased batch variance,
        ``n / (n - 1)`` times the biased one); in eval mode they are what `x` is
        normalised with.  Without them the batch's own statistics are used in either mode.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale (gamma) and shift (beta); default 1 and 0.
    training : bool, default False
        Normalise with the batch's statistics (and update the running statistics) rather
        than with the running statistics.
    momentum : float or None, default 0.1
        Weight in [0, 1] of this batch in the running statistics; None for the
        cumulative average (with `num_batches_tracked`).
    eps : float, default 1e-5
        Added to the variance before the square root (PyTorch's default); must be >= 0 and
        finite.
    axis : int, default 1
        The channel axis: 1 for channels-first ``(N, C, ...)``, -1 for channels-last
        ``(N, ..., C)``.
    out : ndarray, optional
        Where to write the result: same shape and dtype as `x`; may be `x` itself.
    relu : bool, default False
        Fused ReLU on the output.
    num_batches_tracked : int, optional
        Required with ``momentum=None``, and only then (checked in eval mode too, as
        `momentum` is): the number of training batches so far, this one included
        (>= 1); the update factor is ``1 / num_batches_tracked``.  A layer's 0-d
        ``num_batches_tracked`` array is accepted.

    Returns
    -------
    y : ndarray
        The normalised batch, same shape and dtype as `x` (`out` if given); float32 data
        in float32 arithmetic, with the bound given under :func:`batch_norm_train`.

    Raises
    ------
    TypeError
        See :func:`batch_norm_train` and :func:`batch_norm_infer`; also a `training`
        that is not a bool, or a `num_batches_tracked` that is not an int.
    ValueError
        See :func:`batch_norm_train` and :func:`batch_norm_infer`; also
        ``momentum=None`` without `num_batches_tracked`, `num_batches_tracked` with a
        numeric `momentum`, or a `num_batches_tracked` below 1.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.array([[1.0], [3.0]])
    >>> rm, rv = np.zeros(1), np.ones(1)
    >>> bnfast.batch_norm(x, rm, rv, training=True, eps=0.0).tolist()
    [[-1.0], [1.0]]
    >>> bnfast.batch_norm(x, rm, rv, eps=0.0).tolist()   # eval: running statistics
    [[0.762...], [2.669...]]

    The cumulative average: the caller counts the batches.

    >>> rm, rv = np.zeros(1), np.ones(1)
    >>> for n, batch in enumerate([x, x + 4, x + 8], start=1):
    ...     _ = bnfast.batch_norm(batch, rm, rv, training=True, momentum=None,
    ...                           num_batches_tracked=n)
    >>> rm.tolist(), rv.tolist()                  # means 2, 6, 10; unbiased variance 2
    ([6.0], [2.0])
    """
    training = _flag(training, "training")
    if momentum is None:                    # the cumulative average: 1 / (batch count)
        n = num_batches_tracked
        if ((isinstance(n, np.ndarray) or _is_cupy(n)) and n.ndim == 0
                and n.dtype.kind in "iu"):
            n = n.item()                    # a layer's 0-d counter (NumPy or CuPy)
        if n is None:
            raise ValueError(
                "momentum=None (the cumulative average) needs num_batches_tracked=, the "
                "number of training batches including this one (or use a bnfast.nn "
                "batch-norm layer, which counts them)")
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral):
            raise TypeError(f"num_batches_tracked must be an int, got {_short(n)}")
        if n < 1:
            raise ValueError(f"num_batches_tracked must be >= 1 (the batches so far, this "
                             f"one included), got {n}")
        momentum = 1.0 / int(n)
    else:
        _real(momentum, "momentum", 0.0, 1.0)
        if num_batches_tracked is not None:
            raise ValueError("num_batches_tracked is only used with momentum=None (the "
                             "cumulative average); pass one or the other")
    if training or (running_mean is None and running_var is None):
        y, _, _ = batch_norm_train(
            x, weight, bias, eps=eps, axis=axis,
            running_mean=running_mean if training else None,
            running_var=running_var if training else None,
            momentum=momentum, out=out, relu=relu)
        return y
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var must both be given or both be None")
    return batch_norm_infer(x, running_mean, running_var, weight, bias, eps=eps, axis=axis,
                            out=out, relu=relu)


_EXPLAIN_OPS = ("train", "infer", "backward", "moments")


def explain(x, op="train", *, axis=1, relu=False, isa=None):
    """Show the kernels' plan for an operation on `x`: which traversal each pass uses.

    The compiled kernels decide once per call, from the shape seen as (N, C, S), the
    dtype, the kernel variant, the streaming threshold and the thread count, how each pass
    walks the data (one C function, ``bn_plan_make`` in ``csrc/plan.c``).  This returns that
    decision without running anything.  The layout and the partitions fix the order of
    every addition (hence the bits); the walks only change the speed.

    Parameters
    ----------
    x : array_like of float32 or float64, ndim >= 2
        The data (only its shape, dtype and memory order are used).
    op : {'train', 'infer', 'backward', 'moments'}, default 'train'
        The operation: :func:`batch_norm_train`, :func:`batch_norm_infer`,
        :func:`batch_norm_backward` or :func:`moments`.
    axis : int, default 1
        The channel axis, as for those functions.
    relu : bool, default False
        Whether the ReLU is fused (it changes only the backward's arithmetic: float32 data's
        dx runs in float32 without it, in float64 with it).
    isa : {None, 'baseline', 'avx2', 'avx512'}, default None
        The kernel variant to plan for: None for the one in use; any other name shows the
        plan that variant would follow, even on a CPU that lacks it.

    Returns
    -------
    dict
        ``op``, ``variant`` (the kernel variant planned for), ``dtype``, ``N``, ``C``, ``S``
        (the kernel view: S elements per channel and row, contiguous), ``threads`` (those
        the passes use: 1 below 32768 elements), ``layout`` ('rows' of S elements, or
        'columns' of the (N, C*S) matrix), ``relu``, ``forced`` (walks forced for testing),
        and one dict per pass: ``reduce`` (statistics or backward sums: ``walk`` and the
        partition: row groups and channels per item, or tiles, rows per block and groups)
        and ``elementwise`` (normalize or dx: ``walk``, items, the period of the columns
        layout -- none for the inference's 'direct' walk, taken with one element per
        channel, whose coefficients it computes in the same loop --, ``stream``:
        non-temporal stores if the output is 16-byte aligned, and
        ``arithmetic``: 'float32' for float32 data whose channels have at least 8
        elements, else 'float64');
        for ``op='train'`` and ``'backward'``, ``fusion``: 'channels' where both passes
        run channel by channel (the rows layout beyond the streaming threshold, with rows
        of at least 32 KiB, at most 4 MiB of a channel's input per thread and a row group
        per thread: each thread normalises its rows of a channel, or writes their dx, from
        its cache while it reads its rows of the next channel; the same bits either way),
        else 'none';
        ``strategy`` sums it up in one line ('rows', or 'columns:' and the walks;
        ':fused' added where fusion is 'channels').

    Raises
    ------
    TypeError
        If `x` is not float32 or float64, or `axis` is not an integer.
    ValueError
        If `op` or `isa` is unknown, `x` has fewer than 2 dimensions or `axis` is out of
        range.

    See Also
    --------
    bnfast.show_config : the variant and thread count in use.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.zeros((32, 64, 56, 56), np.float32)
    >>> with bnfast.num_threads(2):
    ...     plan = bnfast.explain(x, op="train")
    >>> plan["layout"], plan["reduce"]["pass"], plan["elementwise"]["pass"], plan["threads"]
    ('rows', 'statistics', 'normalize', 2)
    >>> p = bnfast.explain(np.zeros((4096, 64), np.float32), op="backward", isa="avx512")
    >>> p["layout"], p["reduce"]["walk"], p["elementwise"]["walk"], p["strategy"]
    ('columns', 'register', 'spans', 'columns:register+spans')
    """
    if op not in _EXPLAIN_OPS:
        raise ValueError(f"op must be one of {', '.join(map(repr, _EXPLAIN_OPS))}, "
                         f"got {_short(op)}")
    relu = _flag(relu, "relu")
    if isa is not None and isa not in _core.ISA_NAMES:
        raise ValueError(f"isa must be None or one of {', '.join(_core.ISA_NAMES)}, "
                         f"got {_short(isa)}")
    x = _as_data(x, "x")
    N, C, S, perm, xk = _layout(x, axis)
    plan = _plan.plan(op, N, C, S, x.dtype.itemsize, get_num_threads(),
                      None if isa is None else _core.ISA_NAMES.index(isa), relu=relu)
    plan["dtype"] = x.dtype.name
    plan["relu"] = relu
    walks = [plan[k]["walk"] for k in ("reduce", "elementwise") if k in plan]
    plan["strategy"] = ("rows" if plan["layout"] == "rows"
                        else "columns:" + "+".join(walks))
    if plan.get("fusion") == "channels":
        plan["strategy"] += ":fused"
    plan["forced"] = {k: v for k, v in _plan.forced_strategy().items() if v is not None}
    return plan
