"""Pure-NumPy float64 twins of bnfast's functions: slow, obviously correct, for testing.

Each function has the signature and semantics of the bnfast function of the same name but
computes everything in float64 with plain NumPy expressions, straight from the paper's
formulas, and returns float64 arrays.  Running statistics passed in are updated in place,
as bnfast does.
"""
import math
import numbers

import numpy as np

__all__ = ["moments", "batch_norm_train", "batch_norm_infer", "batch_norm_backward",
           "batch_norm"]


def _check_x(x, axis):
    """`x` as an array and its channel axis, with bnfast's checks of both."""
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(
            f"x must have at least 2 dimensions (batch, channels, ...), got shape {x.shape}")
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an integer, got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of bounds for an array of dimension {x.ndim}")
    return x, int(axis) % x.ndim


def _to_last(x, axis):
    """Return x as float64 with the channel axis last, flattened to (m, C), and the axis.

    m (values per channel) is the product of the other axes, so zero channels or an
    empty batch give a (m, 0) or (0, C) matrix.
    """
    x, axis = _check_x(x, axis)
    m = math.prod(s for i, s in enumerate(x.shape) if i != axis)
    xl = np.moveaxis(x.astype(np.float64), axis, -1)
    return xl.reshape(m, x.shape[axis]), axis


def _from_last(y2, shape, axis):
    moved = tuple(s for i, s in enumerate(shape) if i != axis) + (shape[axis],)
    return np.moveaxis(y2.reshape(moved), -1, axis)


def _vec(v, C, default):
    return np.full(C, float(default)) if v is None else np.asarray(v, dtype=np.float64)


def moments(x, *, axis=1):
    """Per-channel mean and biased variance in float64 (two-pass).

    Parameters
    ----------
    x, axis
        As for :func:`bnfast.moments`.

    Returns
    -------
    mean, var : ndarray of shape (C,), float64
        The mean and the biased (divide by n) variance of every channel.

    Raises
    ------
    ValueError
        If `x` has fewer than 2 dimensions or `axis` is out of range, or a channel has no
        values (an empty batch with C > 0; zero channels give empty results), as bnfast.
    TypeError
        If `axis` is not an integer.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import reference
    >>> mean, var = reference.moments(np.array([[1.0, 10.0], [3.0, 30.0]]))
    >>> mean.tolist(), var.tolist()
    ([2.0, 20.0], [1.0, 100.0])
    """
    x2, _ = _to_last(x, axis)
    m, C = x2.shape
    if m == 0 and C > 0:
        raise ValueError(f"moments of an empty batch are undefined (x has shape "
                         f"{np.shape(x)})")
    if C == 0:
        return np.zeros(0), np.zeros(0)
    mean = x2.mean(axis=0)
    var = ((x2 - mean) ** 2).mean(axis=0)
    return mean, var


def batch_norm_train(x, weight=None, bias=None, *, eps=1e-5, axis=1, running_mean=None,
                     running_var=None, momentum=0.1, out=None, relu=False):
    """Twin of :func:`bnfast.batch_norm_train` (returns float64; `out` is ignored).

    Parameters
    ----------
    x, weight, bias, eps, axis, running_mean, running_var, momentum, out, relu
        As for :func:`bnfast.batch_norm_train`; the running statistics are updated in
        place, `out` is ignored.

    Returns
    -------
    y : ndarray, float64
        The normalised batch, shaped like `x`.
    mean, invstd : ndarray of shape (C,), float64
        The batch mean and ``1 / sqrt(var + eps)`` of every channel (biased variance).

    Raises
    ------
    ValueError
        If `x` has fewer than 2 dimensions or `axis` is out of range, or a channel has
        fewer than 2 values (as bnfast; zero channels give empty results).
    TypeError
        If `axis` is not an integer.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import reference
    >>> y, mean, invstd = reference.batch_norm_train(np.array([[1.0], [3.0]]), eps=0.0)
    >>> y.tolist(), mean.tolist(), invstd.tolist()
    ([[-1.0], [1.0]], [2.0], [1.0])
    """
    x = np.asarray(x)
    x2, ax = _to_last(x, axis)
    n, C = x2.shape
    if n <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input shape {x.shape}")
    mean = x2.mean(axis=0)
    var = ((x2 - mean) ** 2).mean(axis=0)
    invstd = 1.0 / np.sqrt(var + eps)
    y2 = (x2 - mean) * invstd * _vec(weight, C, 1.0) + _vec(bias, C, 0.0)
    if relu:
        y2 = np.maximum(y2, 0.0)
    if running_mean is not None:
        unbiased = var * n / (n - 1)
        running_mean[...] = (1 - momentum) * running_mean + momentum * mean
        running_var[...] = (1 - momentum) * running_var + momentum * unbiased
    return _from_last(y2, x.shape, ax), mean, invstd


def batch_norm_infer(x, mean, var, weight=None, bias=None, *, eps=1e-5, axis=1, out=None,
                     relu=False):
    """Twin of :func:`bnfast.batch_norm_infer` (returns float64).

    Parameters
    ----------
    x, mean, var, weight, bias, eps, axis, out, relu
        As for :func:`bnfast.batch_norm_infer`; `out` is ignored.

    Returns
    -------
    y : ndarray, float64
        The normalised batch, shaped like `x`.

    Raises
    ------
    ValueError
        If `x` has fewer than 2 dimensions or `axis` is out of range.
    TypeError
        If `axis` is not an integer.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import reference
    >>> x = np.array([[0.0, 2.0], [4.0, 6.0]])
    >>> reference.batch_norm_infer(x, [2.0, 4.0], [4.0, 4.0], eps=0.0).tolist()
    [[-1.0, -1.0], [1.0, 1.0]]
    """
    x = np.asarray(x)
    x2, ax = _to_last(x, axis)
    C = x2.shape[1]
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    y2 = (x2 - mean) / np.sqrt(var + eps) * _vec(weight, C, 1.0) + _vec(bias, C, 0.0)
    if relu:
        y2 = np.maximum(y2, 0.0)
    return _from_last(y2, x.shape, ax)


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, bias=None, relu=False,
                        training=True, axis=1, out=None):
    """Twin of :func:`bnfast.batch_norm_backward` (returns float64).

    Parameters
    ----------
    dy, x, mean, invstd, weight, bias, relu, training, axis, out
        As for :func:`bnfast.batch_norm_backward`; `out` is ignored.

    Returns
    -------
    dx : ndarray, float64
        The gradient with respect to `x`, shaped like `x`.
    dweight, dbias : ndarray of shape (C,), float64
        The gradients with respect to `weight` and `bias`: ``sum(dy * xhat)`` and
        ``sum(dy)`` per channel (with `dy` masked by the ReLU when ``relu=True``).

    Raises
    ------
    ValueError
        If `x` has fewer than 2 dimensions or `axis` is out of range.
    TypeError
        If `axis` is not an integer.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import reference
    >>> x = np.array([[1.0], [3.0]])
    >>> _, mean, invstd = reference.batch_norm_train(x, eps=0.0)
    >>> dx, dw, db = reference.batch_norm_backward(np.ones((2, 1)), x, mean, invstd)
    >>> dx.tolist(), dw.tolist(), db.tolist()
    ([[0.0], [0.0]], [0.0], [2.0])
    """
    x = np.asarray(x)
    x2, ax = _to_last(x, axis)
    g2, _ = _to_last(dy, axis)
    C = x2.shape[1]
    m = x2.shape[0]
    mean = np.asarray(mean, dtype=np.float64)
    invstd = np.asarray(invstd, dtype=np.float64)
    w = _vec(weight, C, 1.0)
    xhat = (x2 - mean) * invstd
    if relu:
        g2 = np.where(xhat * w + _vec(bias, C, 0.0) > 0, g2, 0.0)
    dbias = g2.sum(axis=0)
    dweight = (g2 * xhat).sum(axis=0)
    if training:
        dx2 = w * invstd / m * (m * g2 - dbias - xhat * dweight) if m else g2 * 0.0
    else:
        dx2 = w * invstd * g2
    return _from_last(dx2, x.shape, ax), dweight, dbias


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, *, axis=1, out=None, relu=False):
    """Twin of :func:`bnfast.batch_norm` (returns float64).

    Parameters
    ----------
    x, running_mean, running_var, weight, bias, training, momentum, eps, axis, out, relu
        As for :func:`bnfast.batch_norm`; `out` is ignored.

    Returns
    -------
    y : ndarray, float64
        The normalised batch, shaped like `x`.

    Raises
    ------
    ValueError
        If `x` has fewer than 2 dimensions or `axis` is out of range, or (training, or
        without running statistics) a channel has fewer than 2 values.
    TypeError
        If `axis` is not an integer.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import reference
    >>> reference.batch_norm(np.array([[1.0], [3.0]]), training=True, eps=0.0).tolist()
    [[-1.0], [1.0]]
    """
    if training or (running_mean is None and running_var is None):
        return batch_norm_train(x, weight, bias, eps=eps, axis=axis,
                                running_mean=running_mean if training else None,
                                running_var=running_var if training else None,
                                momentum=momentum, relu=relu)[0]
    return batch_norm_infer(x, running_mean, running_var, weight, bias, eps=eps, axis=axis,
                            relu=relu)
