"""Linear, convolution, pooling, activation, reshaping and dropout layers.

Layouts are PyTorch's: `Linear` weight ``(out_features, in_features)``, `Conv2d` weight
``(out_channels, in_channels, kh, kw)``, images ``(N, C, H, W)`` (or ``(N, H, W, C)`` with
``channels_last=True``).  Initialisation is PyTorch's default, ``U(-1/sqrt(fan_in),
1/sqrt(fan_in))`` for weights and biases, drawn with NumPy on the CPU (the same values on
every device).  Every layer computes with the array module of its input (NumPy, or CuPy
for GPU arrays) and keeps what its backward needs in ``_cache``.
"""
import math
import numbers

import numpy as np

from .. import _xp
from .module import Module, Parameter, _as_rng, _check_dtype, _float_input, _input_like

__all__ = ["Linear", "Conv2d", "MaxPool2d", "AvgPool2d", "Flatten", "ReLU", "Sigmoid",
           "Tanh", "Dropout"]


def _pos_int(v, name):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _pair(v, name, minimum=1):
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = (v, v)
    try:
        a, b = v
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    for t in (a, b):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return int(a), int(b)


def _fill_uniform(rng, param, bound):
    """Overwrite ``param.data`` with ``U(-bound, bound)`` values (drawn in float64 by NumPy,
    then copied to the parameter's device)."""
    values = rng.uniform(-bound, bound, size=param.data.shape)
    param.data[...] = _xp.to_device(values, _xp.device_of(param.data))


# ---------------------------------------------------------------------------- Linear

class Linear(Module):
    """Affine map ``y = x @ weight.T + bias`` over the last axis.

    Parameters
    ----------
    in_features, out_features : int
        The size of the input's last axis and of the output's (positive).
    bias : bool, default True
        Learn an additive bias of shape ``(out_features,)``.
    dtype : float32 or float64, default float32
        Dtype of the parameters; inputs must have the same dtype.
    rng : None, int or numpy.random.Generator
        Source of the initial weights.

    Attributes
    ----------
    weight : Parameter, shape (out_features, in_features)
    bias : Parameter of shape (out_features,), or None
    needs_input_grad : bool
        True by default; set it to False on a network's first layer to skip computing the
        gradient of the input (``backward`` then returns None), as PyTorch does for an
        input that does not require a gradient.

    Raises
    ------
    ValueError
        If `in_features` or `out_features` is not a positive integer; from ``forward``, if
        the last axis of the input is not `in_features` long.
    TypeError
        If `dtype` is not float32 or float64, or `rng` is not None, an int or a
        Generator; from ``forward``, if the input's dtype is not the parameters' dtype.
    RuntimeError
        From ``backward``, if called before ``forward``.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> lin = nn.Linear(3, 2, rng=0)
    >>> lin
    Linear(in_features=3, out_features=2, bias=True)
    >>> x = np.ones((4, 3), np.float32)
    >>> y = lin(x)
    >>> y.shape, y.dtype
    ((4, 2), dtype('float32'))
    >>> bool(np.allclose(y, x @ lin.weight.data.T + lin.bias.data))
    True
    >>> lin.backward(np.ones_like(y)).shape
    (4, 3)
    >>> lin.weight.grad.shape, lin.bias.grad.tolist()
    ((2, 3), [4.0, 4.0])
    """

    def __init__(self, in_features, out_features, bias=True, *, dtype=np.float32, rng=None):
        super().__init__()
        self.in_features = _pos_int(in_features, "in_features")
        self.out_features = _pos_int(out_features, "out_features")
        self.dtype = _check_dtype(dtype)
        rng = _as_rng(rng)
        self.weight = Parameter(np.empty((self.out_features, self.in_features), self.dtype))
        self.bias = Parameter(np.empty(self.out_features, self.dtype)) if bias else None
        self.reset_parameters(rng)
        self.needs_input_grad = True

    def reset_parameters(self, rng=None):
        """Draw new weights and bias, in place, as the constructor does.

        PyTorch's initialisation: ``U(-1/sqrt(in_features), 1/sqrt(in_features))`` for
        both (what its ``kaiming_uniform_(a=sqrt(5))`` amounts to).  The arrays are
        overwritten, so an optimizer built before keeps updating them; gradients are
        left alone.

        Parameters
        ----------
        rng : None, int or numpy.random.Generator
            Source of the values (None: fresh entropy, as for the constructor).

        Raises
        ------
        TypeError
            If `rng` is not None, an int or a Generator.

        Examples
        --------
        >>> from bnfast import nn
        >>> a, b = nn.Linear(3, 2, rng=0), nn.Linear(3, 2, rng=1)
        >>> b.reset_parameters(rng=0)
        >>> bool((a.weight.data == b.weight.data).all() and (a.bias.data == b.bias.data).all())
        True
        """
        rng = _as_rng(rng)
        bound = 1.0 / math.sqrt(self.in_features)
        _fill_uniform(rng, self.weight, bound)
        if self.bias is not None:
            _fill_uniform(rng, self.bias, bound)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")

    def forward(self, x):
        x = _input_like(x, self.weight.data.dtype, "Linear", self.weight.data)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear expects input of shape (..., {self.in_features}), got {x.shape}")
        x2 = x.reshape(-1, self.in_features) if x.ndim != 2 else x
        y = x2 @ self.weight.data.T
        if self.bias is not None:
            y += self.bias.data
        self._cache = x
        return y.reshape(x.shape[:-1] + (self.out_features,)) if x.ndim != 2 else y

    def backward(self, grad):
        x = self._cache
        if x is None:
            raise RuntimeError("Linear.backward called before forward")
        g2 = grad.reshape(-1, self.out_features) if grad.ndim != 2 else grad
        x2 = x.reshape(-1, self.in_features) if x.ndim != 2 else x
        w = self.weight
        if w.requires_grad:
            w.accumulate(g2.T @ x2)
        b = self.bias
        if b is not None and b.requires_grad:
            b.accumulate(g2.sum(axis=0))
        if not self.needs_input_grad:
            return None
        dx = g2 @ w.data
        return dx.reshape(x.shape) if x.ndim != 2 else dx


# ---------------------------------------------------------------------------- Conv2d

class Conv2d(Module):
    """2-d convolution (cross-correlation, as in PyTorch) by im2col and one BLAS matmul.

    Parameters
    ----------
    in_channels, out_channels : int
        The number of input and output channels (positive).
    kernel_size : int or (int, int)
        Height and width of the kernel (one int for both).
    stride : int or (int, int), default 1
        Step of the kernel along the height and width.
    padding : int or (int, int), default 0
        Zero padding on both sides of each spatial axis.
    bias : bool, default True
        Learn a per-output-channel bias.
    channels_last : bool, default False
        Take and return ``(N, H, W, C)`` arrays instead of ``(N, C, H, W)``.  The weight
        layout is ``(out, in, kh, kw)`` either way.
    dtype : float32 or float64, default float32
        Dtype of the parameters; inputs must have the same dtype.
    rng : None, int or numpy.random.Generator
        Source of the initial weights (see :meth:`reset_parameters`): None for fresh
        entropy, an int seed, or a Generator.

    Attributes
    ----------
    weight : Parameter, shape (out_channels, in_channels, kh, kw)
    bias : Parameter of shape (out_channels,), or None
    needs_input_grad : bool
        As for :class:`Linear`.

    Notes
    -----
    The computation runs in channels-last memory order (one contiguous patch matrix of
    shape ``(N*OH*OW, kh*kw*C)`` times the weight); a channels-first output is returned
    as a transposed view of it, which bnfast's batch-norm kernels read without a copy.

    Raises
    ------
    ValueError
        If a channel count, `kernel_size` or `stride` is not a positive integer (or pair),
        or `padding` is negative; from ``forward``, if the input is not 4-d, has the wrong
        number of channels, or is (padded) smaller than the kernel.
    TypeError
        If `dtype` is not float32 or float64, or `rng` is not None, an int or a
        Generator; from ``forward``, if the input's dtype is not the parameters' dtype.
    RuntimeError
        From ``backward``, if called before ``forward``.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> conv = nn.Conv2d(3, 8, 3, padding=1, rng=0)
    >>> conv
    Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 5, 5), dtype=np.float32)
    >>> y = conv(x)
    >>> y.shape
    (2, 8, 5, 5)
    >>> conv.backward(np.ones_like(y)).shape, conv.weight.grad.shape
    ((2, 3, 5, 5), (8, 3, 3, 3))
    >>> nn.Conv2d(3, 8, 3, stride=2, channels_last=True, rng=0)(
    ...     x.transpose(0, 2, 3, 1)).shape
    (2, 2, 2, 8)
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 bias=True, *, channels_last=False, dtype=np.float32, rng=None):
        super().__init__()
        self.in_channels = _pos_int(in_channels, "in_channels")
        self.out_channels = _pos_int(out_channels, "out_channels")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding", minimum=0)
        self.channels_last = bool(channels_last)
        self.dtype = _check_dtype(dtype)
        rng = _as_rng(rng)
        kh, kw = self.kernel_size
        self.weight = Parameter(np.empty((self.out_channels, self.in_channels, kh, kw),
                                         self.dtype))
        self.bias = Parameter(np.empty(self.out_channels, self.dtype)) if bias else None
        self.reset_parameters(rng)
        self.needs_input_grad = True

    def reset_parameters(self, rng=None):
        """Draw new weights and bias, in place, as the constructor does.

        PyTorch's initialisation: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for both, with
        ``fan_in = in_channels * kh * kw``.  The arrays are overwritten, so an optimizer
        built before keeps updating them; gradients are left alone.

        Parameters
        ----------
        rng : None, int or numpy.random.Generator
            Source of the values (None: fresh entropy, as for the constructor).

        Raises
        ------
        TypeError
            If `rng` is not None, an int or a Generator.

        Examples
        --------
        >>> from bnfast import nn
        >>> conv = nn.Conv2d(2, 4, 3, rng=0)
        >>> w = conv.weight.data
        >>> conv.reset_parameters(rng=1)
        >>> conv.weight.data is w, float(abs(w).max()) <= 1 / 18 ** 0.5
        (True, True)
        """
        rng = _as_rng(rng)
        kh, kw = self.kernel_size
        bound = 1.0 / math.sqrt(self.in_channels * kh * kw)
        _fill_uniform(rng, self.weight, bound)
        if self.bias is not None:
            _fill_uniform(rng, self.bias, bound)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.bias is None:
            s += ", bias=False"
        if self.channels_last:
            s += ", channels_last=True"
        return s

    def _out_size(self, H, W):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1

    def forward(self, x):
        x = _input_like(x, self.weight.data.dtype, "Conv2d", self.weight.data)
        if x.ndim != 4:
            layout = "(N, H, W, C)" if self.channels_last else "(N, C, H, W)"
            raise ValueError(f"Conv2d expects a 4-d input {layout}, got shape {x.shape}")
        xl = x if self.channels_last else x.transpose(0, 2, 3, 1)   # (N, H, W, C) view
        N, H, W, C = xl.shape
        if C != self.in_channels:
            raise ValueError(
                f"Conv2d expects {self.in_channels} input channels, got {C} "
                f"(input shape {x.shape}, channels_last={self.channels_last})")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if H + 2 * ph < kh or W + 2 * pw < kw:
            raise ValueError(
                f"Conv2d: padded input {H + 2 * ph}x{W + 2 * pw} is smaller than the "
                f"kernel {kh}x{kw}")
        OH, OW = self._out_size(H, W)
        xp = _xp.array_module(x)
        if ph or pw:
            padded = xp.zeros((N, H + 2 * ph, W + 2 * pw, C), dtype=x.dtype)
            padded[:, ph:ph + H, pw:pw + W, :] = xl
        else:
            padded = xl
        sN, sH, sW, sC = padded.strides
        win = _xp.as_strided(padded, shape=(N, OH, OW, kh, kw, C),
                             strides=(sN, sH * sh, sW * sw, sH, sW, sC))
        cols = win.reshape(N * OH * OW, kh * kw * C)          # the im2col copy
        wmat = self.weight.data.transpose(0, 2, 3, 1).reshape(self.out_channels, -1)
        y = cols @ wmat.T                                      # (N*OH*OW, O)
        if self.bias is not None:
            y += self.bias.data
        self._cache = (cols, wmat, (N, H, W, C), (OH, OW))
        y = y.reshape(N, OH, OW, self.out_channels)
        return y if self.channels_last else y.transpose(0, 3, 1, 2)

    def backward(self, grad):
        if self._cache is None:
            raise RuntimeError("Conv2d.backward called before forward")
        cols, wmat, (N, H, W, C), (OH, OW) = self._cache
        O = self.out_channels
        xp = _xp.array_module(cols)
        gl = grad if self.channels_last else grad.transpose(0, 2, 3, 1)
        g2 = gl.reshape(N * OH * OW, O)
        w = self.weight
        if w.requires_grad:
            dw = (g2.T @ cols).reshape(O, *self.kernel_size, C).transpose(0, 3, 1, 2)
            w.accumulate(xp.ascontiguousarray(dw))
        b = self.bias
        if b is not None and b.requires_grad:
            b.accumulate(g2.sum(axis=0))
        if not self.needs_input_grad:
            return None
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if kh == kw == sh == sw == 1 and not ph and not pw:
            dxl = (g2 @ wmat).reshape(N, H, W, C)
        else:
            # one (N*OH*OW, C) block of the column gradient per kernel offset, contiguous
            w3 = self.weight.data.transpose(2, 3, 0, 1).reshape(kh * kw, O, C)
            dcols = xp.matmul(g2, w3).reshape(kh, kw, N, OH, OW, C)
            dxp = xp.zeros((N, H + 2 * ph, W + 2 * pw, C), dtype=dcols.dtype)
            for i in range(kh):
                for j in range(kw):
                    dxp[:, i:i + sh * (OH - 1) + 1:sh, j:j + sw * (OW - 1) + 1:sw, :] += \
                        dcols[i, j]
            dxl = dxp[:, ph:ph + H, pw:pw + W, :]
        return dxl if self.channels_last else dxl.transpose(0, 3, 1, 2)


# ---------------------------------------------------------------------------- pooling

def _alloc_like(like, shape, dtype, fill=None):
    """An array of `shape` whose memory order follows the strides of `like`.

    Pooling keeps its input's layout (e.g. a channels-first view of channels-last memory,
    as `Conv2d` returns), so that its strided window views and outputs stay aligned.
    """
    xp = _xp.array_module(like)
    perm = sorted(range(like.ndim), key=lambda a: -abs(like.strides[a]))
    mem = tuple(shape[a] for a in perm)
    buf = xp.empty(mem, dtype=dtype) if fill is None else xp.full(mem, fill, dtype=dtype)
    return buf.transpose(tuple(int(a) for a in np.argsort(perm)))


class _Pool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, *, channels_last=False):
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _pair(stride, "stride")
        self.padding = _pair(padding, "padding", minimum=0)
        kh, kw = self.kernel_size
        if 2 * self.padding[0] > kh or 2 * self.padding[1] > kw:
            raise ValueError(
                f"padding should be at most half of the kernel size, got "
                f"padding={self.padding}, kernel_size={self.kernel_size}")
        self.channels_last = bool(channels_last)

    def extra_repr(self):
        s = f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        return s + (", channels_last=True" if self.channels_last else "")

    def _prepare(self, x, fill):
        """Validate; return the (padded) input as an (N, C, H, W) view, and geometry."""
        name = type(self).__name__
        x = _float_input(x, name)
        if x.ndim != 4:
            layout = "(N, H, W, C)" if self.channels_last else "(N, C, H, W)"
            raise ValueError(f"{name} expects a 4-d input {layout}, got shape {x.shape}")
        xs = x.transpose(0, 3, 1, 2) if self.channels_last else x    # (N, C, H, W) view
        N, C, H, W = xs.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if H + 2 * ph < kh or W + 2 * pw < kw:
            raise ValueError(
                f"{name}: padded input {H + 2 * ph}x{W + 2 * pw} is smaller than the "
                f"kernel {kh}x{kw}")
        OH, OW = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
        if ph or pw:
            padded = _alloc_like(xs, (N, C, H + 2 * ph, W + 2 * pw), x.dtype, fill)
            padded[:, :, ph:ph + H, pw:pw + W] = xs
        else:
            padded = xs
        return padded, (N, C, H, W), (OH, OW)

    def _windows(self, a, OH, OW):
        """The kh*kw strided views of `a`, one per kernel offset, each (N, C, OH, OW)."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        return [a[:, :, i:i + sh * (OH - 1) + 1:sh, j:j + sw * (OW - 1) + 1:sw]
                for i in range(kh) for j in range(kw)]

    def _grad_input_buffer(self, like, shape, dtype):
        """Zeroed (padded) gradient buffer laid out like the forward input."""
        ph, pw = self.padding
        N, C, H, W = shape
        return _alloc_like(like, (N, C, H + 2 * ph, W + 2 * pw), dtype, 0)

    def _finish(self, y):
        return y.transpose(0, 2, 3, 1) if self.channels_last else y

    def _grad_in(self, grad):
        return grad.transpose(0, 3, 1, 2) if self.channels_last else grad

    def _crop(self, dxp, shape):
        _, _, H, W = shape
        ph, pw = self.padding
        return self._finish(dxp[:, :, ph:ph + H, pw:pw + W])


class MaxPool2d(_Pool2d):
    """Max pooling over ``kernel_size`` windows.

    Parameters
    ----------
    kernel_size : int or (int, int)
        Height and width of the pooling window (one int for both).
    stride : int or (int, int), optional
        Default `kernel_size`.
    padding : int or (int, int), default 0
        Implicit ``-inf`` padding; at most half the kernel size.
    channels_last : bool, default False
        Take and return ``(N, H, W, C)`` arrays instead of ``(N, C, H, W)``.

    Notes
    -----
    The gradient goes to the first maximum of each window in row-major order, as in
    PyTorch.  The output keeps the memory layout of the input.

    Raises
    ------
    ValueError
        If `kernel_size` or `stride` is not a positive integer (or pair), `padding` is
        negative or more than half the kernel size; from ``forward``, if the input is not
        4-d or is (padded) smaller than the kernel.
    TypeError
        From ``forward``, if the input is not a float32 or float64 array.
    RuntimeError
        From ``backward``, if called before ``forward``.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> pool = nn.MaxPool2d(2)
    >>> x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    >>> pool(x)
    array([[[[ 5.,  7.],
             [13., 15.]]]], dtype=float32)
    >>> pool.backward(np.ones((1, 1, 2, 2), np.float32))[0, 0]
    array([[0., 0., 0., 0.],
           [0., 1., 0., 1.],
           [0., 0., 0., 0.],
           [0., 1., 0., 1.]], dtype=float32)
    """

    def forward(self, x):
        padded, shape, (OH, OW) = self._prepare(x, -np.inf)
        xp = _xp.array_module(padded)
        wins = self._windows(padded, OH, OW)
        y = wins[0].copy(order="K")
        idx = xp.zeros_like(y, dtype=np.uint8 if len(wins) < 256 else np.int32)
        for k in range(1, len(wins)):
            v = wins[k]
            better = v > y
            xp.maximum(y, v, out=y)
            # offsets are visited in increasing order, so the winner so far is the maximum
            xp.maximum(idx, better * idx.dtype.type(k), out=idx)
        self._cache = (idx, shape, (OH, OW), padded)
        return self._finish(y)

    def backward(self, grad):
        if self._cache is None:
            raise RuntimeError("MaxPool2d.backward called before forward")
        idx, shape, (OH, OW), padded = self._cache
        xp = _xp.array_module(padded)
        g = self._grad_in(grad)
        dxp = self._grad_input_buffer(padded, shape, padded.dtype)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        overlap = sh < kh or sw < kw
        for k, dst in enumerate(self._windows(dxp, OH, OW)):
            if overlap:
                dst += g * (idx == k)
            else:
                xp.multiply(g, idx == k, out=dst)
        return self._crop(dxp, shape)


class AvgPool2d(_Pool2d):
    """Average pooling over ``kernel_size`` windows.

    Parameters
    ----------
    kernel_size : int or (int, int)
        Height and width of the pooling window (one int for both).
    stride : int or (int, int), optional
        Default `kernel_size`.
    padding : int or (int, int), default 0
        Implicit zero padding.
    count_include_pad : bool, default True
        Divide by the full window size (PyTorch's default) rather than by the number of
        unpadded elements.
    channels_last : bool, default False
        Take and return ``(N, H, W, C)`` arrays instead of ``(N, C, H, W)``.

    Raises
    ------
    ValueError
        If `kernel_size` or `stride` is not a positive integer (or pair), `padding` is
        negative or more than half the kernel size; from ``forward``, if the input is not
        4-d or is (padded) smaller than the kernel.
    TypeError
        From ``forward``, if the input is not a float32 or float64 array.
    RuntimeError
        From ``backward``, if called before ``forward``.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> pool = nn.AvgPool2d(2)
    >>> x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    >>> pool(x)
    array([[[[ 2.5,  4.5],
             [10.5, 12.5]]]], dtype=float32)
    >>> pool.backward(np.ones((1, 1, 2, 2), np.float32))[0, 0, 0]
    array([0.25, 0.25, 0.25, 0.25], dtype=float32)
    >>> nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)(x).shape
    (1, 1, 4, 4)
    """

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad=True, *,
                 channels_last=False):
        super().__init__(kernel_size, stride, padding, channels_last=channels_last)
        self.count_include_pad = bool(count_include_pad)

    def extra_repr(self):
        s = super().extra_repr()
        return s + ("" if self.count_include_pad else ", count_include_pad=False")

    def _divisor(self, like, shape, OH, OW, dtype):
        kh, kw = self.kernel_size
        ph, pw = self.padding
        if self.count_include_pad or not (ph or pw):
            return dtype.type(kh * kw)
        _, _, H, W = shape
        ones = _xp.array_module(like).zeros((1, 1, H + 2 * ph, W + 2 * pw), dtype=dtype)
        ones[:, :, ph:ph + H, pw:pw + W] = 1
        return sum(self._windows(ones, OH, OW))

    def forward(self, x):
        padded, shape, (OH, OW) = self._prepare(x, 0)
        wins = self._windows(padded, OH, OW)
        y = wins[0].copy(order="K")
        for v in wins[1:]:
            y += v
        div = self._divisor(padded, shape, OH, OW, padded.dtype)
        y /= div
        self._cache = (div, shape, (OH, OW), padded)
        return self._finish(y)

    def backward(self, grad):
        if self._cache is None:
            raise RuntimeError("AvgPool2d.backward called before forward")
        div, shape, (OH, OW), padded = self._cache
        g = self._grad_in(grad) / div
        dxp = self._grad_input_buffer(padded, shape, padded.dtype)
        for dst in self._windows(dxp, OH, OW):
            dst += g
        return self._crop(dxp, shape)


# ---------------------------------------------------------------------------- reshaping

class Flatten(Module):
    """Flatten axes ``start_dim..end_dim`` into one (PyTorch's default: all but the batch),
    in PyTorch's order also for channels-last input.

    Parameters
    ----------
    start_dim : int, default 1
        The first axis to flatten (negative counts from the end).
    end_dim : int, default -1
        The last axis to flatten, included (negative counts from the end).
    channels_last : bool or None, default None
        The layout of the input.  True: it is channels-last, ``(N, H, W, C)`` (or
        ``(N, ..., C)``), and is flattened in PyTorch's channels-first order ``(C, H, W)``:
        the axes are numbered as in the ``(N, C, H, W)`` tensor PyTorch would see, and the
        output is what ``torch.nn.Flatten`` gives for it.  False: the input is flattened
        in its own axis order (for a channels-last input that is the ``(H, W, C)`` order
        of Keras / TensorFlow).  None: in a `Sequential`, the layout of the layers before
        it (the last one with a ``channels_last`` setting: `Conv2d`, `BatchNorm2d`, the
        pooling layers, `BasicBlock`), decided when the `Sequential` is built; on its own,
        as False.

    Raises
    ------
    ValueError
        From ``forward``, if the axes do not fit the input's number of dimensions.
    TypeError
        From ``forward``, if the input is not a float32 or float64 array.
    RuntimeError
        From ``backward``, if called before ``forward``.

    Notes
    -----
    Why PyTorch's order: a `Linear` layer after `Flatten` has one weight column per
    flattened position, so its weights are only meaningful for one order.  With every
    layout flattening in ``(C, H, W)`` order, a channels-last model and its channels-first
    twin have the same parameters, and a state dict of either (or of the PyTorch model)
    loads into the other and gives the same outputs.  Flattening in ``(H, W, C)`` order
    instead would make the same state dict give different, wrong outputs with no error.
    The price is one transposing copy of the (small) flattened activations, forward and
    backward; pass ``channels_last=False`` to skip it when the weights are your own (or
    come from a Keras-style ``(H, W, C)`` model).

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> x = np.zeros((2, 3, 4, 5), np.float32)
    >>> flat = nn.Flatten()
    >>> flat(x).shape
    (2, 60)
    >>> flat.backward(np.ones((2, 60), np.float32)).shape
    (2, 3, 4, 5)
    >>> nn.Flatten(start_dim=2)(x).shape
    (2, 3, 20)

    Channels-last input is flattened in PyTorch's ``(C, H, W)`` order, so the values
    come out as for the channels-first array:

    >>> nchw = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)
    >>> nhwc = nchw.transpose(0, 2, 3, 1)
    >>> bool(np.array_equal(nn.Flatten(channels_last=True)(nhwc), nn.Flatten()(nchw)))
    True
    >>> net = nn.Sequential(nn.MaxPool2d(1, channels_last=True), nn.Flatten())
    >>> net[1]                                  # layout taken from the layer before
    Flatten(start_dim=1, end_dim=-1, channels_last=True)
    """

    def __init__(self, start_dim=1, end_dim=-1, *, channels_last=None):
        super().__init__()
        self.start_dim = int(start_dim)
        self.end_dim = int(end_dim)
        self.channels_last = None if channels_last is None else bool(channels_last)
        self._inferred = None          # set by the Sequential holding it

    def _input_channels_last(self):
        if self.channels_last is not None:
            return self.channels_last
        return bool(self._inferred)

    def _resolve_layout(self, layout):
        """Take the layout (True/False, None when unknown) of the input from the layers
        before; return the layout of the output (None: flat, no channel axis)."""
        if layout is not None and self.channels_last is None:
            if self._inferred is not None and self._inferred != layout:
                raise ValueError(
                    "this Flatten layer follows channels-last layers in one Sequential and "
                    "channels-first layers in another; use one Flatten per model, or pass "
                    "channels_last= explicitly")
            self._inferred = bool(layout)
        return None

    def extra_repr(self):
        s = f"start_dim={self.start_dim}, end_dim={self.end_dim}"
        if self._input_channels_last():
            s += ", channels_last=True"
        elif self.channels_last is not None:
            s += ", channels_last=False"
        return s

    def forward(self, x):
        x = _float_input(x, "Flatten")
        nd = x.ndim
        moved = self._input_channels_last() and nd >= 3
        xs = _xp.array_module(x).moveaxis(x, -1, 1) if moved else x   # PyTorch's (N, C, ...)
        s, e = self.start_dim, self.end_dim
        s, e = (s + nd if s < 0 else s), (e + nd if e < 0 else e)
        if not (0 <= s < nd and 0 <= e < nd and s <= e):
            raise ValueError(
                f"Flatten(start_dim={self.start_dim}, end_dim={self.end_dim}) does not fit "
                f"an input of shape {x.shape}")
        self._cache = (xs.shape, moved)
        return xs.reshape(xs.shape[:s] + (math.prod(xs.shape[s:e + 1]),) + xs.shape[e + 1:])

    def backward(self, grad):
        if self._cache is None:
            raise RuntimeError("Flatten.backward called before forward")
        shape, moved = self._cache
        g = grad.reshape(shape)
        return _xp.array_module(g).moveaxis(g, 1, -1) if moved else g


# ---------------------------------------------------------------------------- activations

class ReLU(Module):
    """``max(x, 0)``; the gradient at 0 is 0 (as in PyTorch).

    Raises
    ------
    TypeError
        From ``forward``, if the input is not a float32 or float64 array.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> relu = nn.ReLU()
    >>> relu(np.array([-1.0, 0.0, 2.0]))
    array([0., 0., 2.])
    >>> relu.backward(np.ones(3))
    array([0., 0., 1.])
    """

    def forward(self, x):
        x = _float_input(x, "ReLU")
        y = _xp.array_module(x).maximum(x, 0)
        self._cache = y
        return y

    def backward(self, grad):
        return grad * (self._cache > 0)


class Sigmoid(Module):
    """Logistic function ``1 / (1 + exp(-x))``.

    Computed as ``0.5 * tanh(x / 2) + 0.5``: no overflow for any input, and faster than
    ``scipy.special.expit``.  Outputs below about 3e-8 in float32 (1e-16 in float64) come
    out as 0 rather than keeping their relative precision.

    Raises
    ------
    TypeError
        From ``forward``, if the input is not a float32 or float64 array.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> sig = nn.Sigmoid()
    >>> sig(np.array([-2.0, 0.0, 2.0])).round(4)
    array([0.1192, 0.5   , 0.8808])
    >>> sig.backward(np.ones(3)).round(4)             # y * (1 - y)
    array([0.105, 0.25 , 0.105])
    """

    def forward(self, x):
        x = _float_input(x, "Sigmoid")
        xp = _xp.array_module(x)
        y = xp.multiply(x, 0.5, dtype=x.dtype)
        xp.tanh(y, out=y)
        y *= 0.5
        y += 0.5
        self._cache = y
        return y

    def backward(self, grad):
        y = self._cache
        t = 1 - y
        t *= y
        t *= grad
        return t


class Tanh(Module):
    """Hyperbolic tangent.

    Raises
    ------
    TypeError
        From ``forward``, if the input is not a float32 or float64 array.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> tanh = nn.Tanh()
    >>> tanh(np.array([-1.0, 0.0, 1.0])).round(4)
    array([-0.7616,  0.    ,  0.7616])
    >>> tanh.backward(np.ones(3)).round(4)            # 1 - y**2
    array([0.42, 1.  , 0.42])
    """

    def forward(self, x):
        x = _float_input(x, "Tanh")
        y = _xp.array_module(x).tanh(x)
        self._cache = y
        return y

    def backward(self, grad):
        y = self._cache
        t = y * y
        _xp.array_module(t).subtract(1, t, out=t)
        t *= grad
        return t


class Dropout(Module):
    """Inverted dropout: in training, zero each value with probability `p` and scale the
    rest by ``1 / (1 - p)``; identity in eval mode.

    Parameters
    ----------
    p : float, default 0.5
        Probability in [0, 1] of zeroing each value in training mode (1 zeroes everything, 0
        is the identity).
    rng : None, int or numpy.random.Generator
        Source of the masks.

    Raises
    ------
    ValueError
        If `p` is not a real number in [0, 1].
    TypeError
        If `rng` is not None, an int or a Generator; from ``forward``, if the input is not
        a float32 or float64 array.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> drop = nn.Dropout(0.5, rng=0)
    >>> y = drop(np.ones((2, 4), np.float32))
    >>> sorted(set(y.ravel().tolist()))               # zeroed, or scaled by 1 / (1 - p)
    [0.0, 2.0]
    >>> bool(np.array_equal(drop.backward(np.ones((2, 4), np.float32)), y))
    True
    >>> drop.eval()(np.ones((2, 4), np.float32))      # identity in eval mode
    array([[1., 1., 1., 1.],
           [1., 1., 1., 1.]], dtype=float32)
    """

    def __init__(self, p=0.5, *, rng=None):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p <= 1:
            raise ValueError(f"dropout probability must be in [0, 1], got {p!r}")
        self.p = float(p)
        self._rng = _as_rng(rng)

    def extra_repr(self):
        return f"p={self.p}"

    def forward(self, x):
        x = _float_input(x, "Dropout")
        if not self.training or self.p == 0:
            self._cache = None
            return x
        if self.p == 1:
            mask = np.zeros(x.shape, dtype=x.dtype)
        else:
            keep = self._rng.random(x.shape, dtype=x.dtype) >= self.p
            mask = keep * x.dtype.type(1.0 / (1.0 - self.p))
        # drawn by NumPy on the CPU: the same masks on every device
        self._cache = mask = _xp.to_device(mask, _xp.device_of(x))
        return x * mask

    def backward(self, grad):
        return grad if self._cache is None else grad * self._cache
