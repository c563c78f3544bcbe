"""Loss functions: softmax cross-entropy and mean squared error.

A loss is called as ``loss = loss_fn(output, target)`` (a Python float) and
``loss_fn.backward()`` then returns dL/d(output), the gradient to feed to the network's
``backward``.  The output may be a NumPy or a CuPy array; a NumPy target given with a CuPy
output is copied to the output's device.
"""
import numpy as np

from .. import _xp
from .module import Module, _float_input

__all__ = ["CrossEntropyLoss", "MSELoss"]


def _target_like(target, x):
    """`target` as an array on the device of `x` (no copy when it is there already)."""
    t = _xp.asarray(target)
    return _xp.to_device(t, _xp.device_of(x)) if _xp.is_cupy(x) else _xp.asnumpy(t)


def _reduction(r):
    if r not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {r!r}")
    return r


class CrossEntropyLoss(Module):
    """Softmax cross-entropy on logits, computed stably (log-sum-exp with the row maximum
    subtracted).

    Parameters
    ----------
    reduction : {'mean', 'sum'}, default 'mean'
        Average or sum over the batch.
    label_smoothing : float in [0, 1), default 0
        PyTorch's label smoothing for class-index targets.

    Notes
    -----
    ``forward(logits, target)``: `logits` has shape (N, C); `target` is either integer class
    indices of shape (N,) or class probabilities of shape (N, C).

    Raises
    ------
    ValueError
        If `reduction` is not 'mean' or 'sum', or `label_smoothing` is not in [0, 1); from
        ``forward``, if the logits are not 2-d, the target's shape does not match, or a
        class index is out of range.
    TypeError
        From ``forward``, if the logits are not a float32 or float64 array, or the target
        is neither integer nor floating point.
    RuntimeError
        From ``backward``, if called before ``forward``.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> loss_fn = nn.CrossEntropyLoss()
    >>> round(loss_fn(np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([0, 1])), 4)
    0.1269
    >>> loss_fn.backward().round(4).tolist()
    [[-0.0596, 0.0596], [0.0596, -0.0596]]
    """

    def __init__(self, reduction="mean", label_smoothing=0.0):
        super().__init__()
        self.reduction = _reduction(reduction)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits, target):
        x = _float_input(logits, "CrossEntropyLoss")
        if x.ndim != 2:
            raise ValueError(f"CrossEntropyLoss expects logits of shape (N, C), got {x.shape}")
        N, C = x.shape
        xp = _xp.array_module(x)
        t = _target_like(target, x)
        if t.dtype.kind in "iu":
            if t.shape != (N,):
                raise ValueError(
                    f"CrossEntropyLoss: class-index targets must have shape ({N},), got "
                    f"{t.shape}")
            if N and (t.min() < 0 or t.max() >= C):
                raise ValueError(
                    f"CrossEntropyLoss: targets must be class indices in [0, {C}), got "
                    f"values in [{t.min()}, {t.max()}]")
            probs = None
        elif t.dtype.kind == "f":
            if t.shape != (N, C):
                raise ValueError(
                    f"CrossEntropyLoss: probability targets must have shape ({N}, {C}), got "
                    f"{t.shape}")
            probs = t.astype(x.dtype, copy=False)
        else:
            raise TypeError(
                f"CrossEntropyLoss: target must be integer class indices or float "
                f"probabilities, got dtype {t.dtype}")
        z = x - x.max(axis=1, keepdims=True)
        e = xp.exp(z)
        s = e.sum(axis=1, keepdims=True)
        logs = xp.log(s[:, 0])                             # log-sum-exp of z per row
        ls = self.label_smoothing
        if probs is None:
            # -log softmax(z)[t] = logs - z[t]; smoothing mixes in the mean over classes
            rows = xp.arange(N)
            per = logs - (1 - ls) * z[rows, t] if ls else logs - z[rows, t]
            if ls:
                per -= (ls / C) * z.sum(axis=1)
        else:
            if ls:
                probs = probs * (1 - ls) + ls / C
            per = logs * probs.sum(axis=1) - (probs * z).sum(axis=1)
        loss = per.sum(dtype=np.float64)
        if self.reduction == "mean":
            loss = loss / N if N else float("nan")
        e /= s                                             # softmax
        self._cache = (e, t if probs is None else probs, probs is None, N)
        return float(loss)

    def __call__(self, logits, target):
        return self.forward(logits, target)

    def backward(self, grad=1.0):
        """Return dL/d(logits) for the last call (scaled by `grad`)."""
        if self._cache is None:
            raise RuntimeError("CrossEntropyLoss.backward called before forward")
        p, t, indices, N = self._cache
        if indices:
            g = p.copy()
            ls = self.label_smoothing
            g[_xp.array_module(p).arange(N), t] -= (1 - ls)
            if ls:
                g -= ls / p.shape[1]
        else:
            # d/dz of -sum(t * logp) = softmax * sum(t) - t
            g = p * t.sum(axis=1, keepdims=True) - t
        scale = grad / N if self.reduction == "mean" and N else grad
        g *= g.dtype.type(scale)
        return g


class MSELoss(Module):
    """Mean squared error ``mean((output - target) ** 2)`` (or the sum).

    Parameters
    ----------
    reduction : {'mean', 'sum'}, default 'mean'
        Average or sum over all elements.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> loss_fn = nn.MSELoss()
    >>> loss_fn(np.array([1.0, 2.0]), np.array([0.0, 0.0]))
    2.5
    >>> loss_fn.backward().tolist()
    [1.0, 2.0]
    """

    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = _reduction(reduction)

    def forward(self, output, target):
        y = _float_input(output, "MSELoss")
        t = _target_like(target, y)
        if t.shape != y.shape:
            raise ValueError(f"MSELoss: target shape {t.shape} != output shape {y.shape}")
        d = y - t.astype(y.dtype, copy=False)
        self._cache = d
        flat = d.ravel()
        loss = _xp.array_module(d).dot(flat, flat).astype(np.float64) if d.size else 0.0
        loss = float(loss)
        if self.reduction == "mean":
            loss = loss / d.size if d.size else float("nan")
        return loss

    def __call__(self, output, target):
        return self.forward(output, target)

    def backward(self, grad=1.0):
        """Return dL/d(output) for the last call (scaled by `grad`)."""
        if self._cache is None:
            raise RuntimeError("MSELoss.backward called before forward")
        d = self._cache
        scale = 2.0 * grad / (d.size if self.reduction == "mean" and d.size else 1)
        return d * d.dtype.type(scale)
