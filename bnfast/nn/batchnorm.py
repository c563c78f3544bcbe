"""Batch-normalization layers running on bnfast's kernels.

Constructor signature and semantics are PyTorch's (``num_features, eps=1e-5, momentum=0.1,
affine=True, track_running_stats=True``), with three keyword-only additions:
``channels_last`` (BatchNorm2d, BatchNorm3d), ``relu`` (fuse a following ReLU into the kernels) and
``dtype``.  Modes:

- ``training`` and not ``frozen``: normalise with the batch's statistics and update the
  running statistics in place (PyTorch's momentum; ``momentum=None`` gives the cumulative
  average ``1 / num_batches_tracked``);
- eval mode, or ``frozen`` (see :meth:`Module.freeze_bn_stats`): normalise with the running
  statistics, which then are constants for the backward pass;
- ``track_running_stats=False``: always the batch's statistics.

While :meth:`~BatchNorm1d.collect_population_stats` is open (as
:func:`~bnfast.nn.compute_population_stats` opens it), a forward pass normalises with the
batch's statistics and adds them to population sums instead of updating the running
statistics.
"""
import contextlib
import numbers

import numpy as np

from .. import _api, _xp
from .module import Module, Parameter, _check_dtype, _input_like

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNorm(Module):
    _ndims = ()          # accepted input ranks
    _layout = ""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, relu=False, dtype=np.float32):
        super().__init__()
        if (isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral)
                or num_features < 1):
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
            raise ValueError(f"eps must be a real number >= 0, got {eps!r}")
        if momentum is not None and (isinstance(momentum, bool)
                                     or not isinstance(momentum, numbers.Real)
                                     or not 0 <= momentum <= 1):
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.relu = bool(relu)
        self.frozen = False
        self.dtype = dt = _check_dtype(dtype)
        C = self.num_features
        if self.affine:
            self.weight = Parameter(np.ones(C, dtype=dt))
            self.bias = Parameter(np.zeros(C, dtype=dt))
        else:
            self.weight = None
            self.bias = None
        if self.track_running_stats:
            self.register_buffer("running_mean", np.zeros(C, dtype=dt))
            self.register_buffer("running_var", np.ones(C, dtype=dt))
            self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))
        else:
            self.running_mean = None
            self.running_var = None
            self.num_batches_tracked = None
        self._population = None     # [sum of means, sum of unbiased vars, count] when collecting

    @property
    def axis(self):
        """The channel axis passed to the kernels (1, or -1 when channels-last)."""
        return 1

    def extra_repr(self):
        s = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
             f"affine={self.affine}, track_running_stats={self.track_running_stats}")
        if self.relu:
            s += ", relu=True"
        if getattr(self, "channels_last", False):
            s += ", channels_last=True"
        return s

    def reset_running_stats(self):
        """Running mean 0, running variance 1, counter 0."""
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def reset_parameters(self, rng=None):
        """Re-initialise as PyTorch's ``reset_parameters``: weight 1, bias 0 and
        :meth:`reset_running_stats`, in place (optimizers keep working).

        `rng` is accepted, and unused, so that one call re-initialises every layer::

            model.apply(lambda m: m.reset_parameters(rng=rng)
                        if hasattr(m, "reset_parameters") else None)
        """
        if self.affine:
            self.weight.data[...] = 1
            self.bias.data[...] = 0
        self.reset_running_stats()

    def _any_array(self):
        """A parameter or buffer array (for the device), or None when there is none."""
        return self.weight.data if self.affine else self.running_mean

    def uses_batch_stats(self):
        """Whether the next forward normalises with the batch's own statistics."""
        return (self.training and not self.frozen) or not self.track_running_stats

    def _freeze_stats(self, frozen):
        self.frozen = frozen

    @contextlib.contextmanager
    def collect_population_stats(self):
        """A context in which forward passes collect population statistics.

        While it is open, each forward pass normalises with the batch's own statistics
        (whatever the mode) and adds the batch's mean and unbiased variance (``m / (m - 1)``
        times the biased one, m values per channel) to float64 sums; the running
        statistics and ``num_batches_tracked`` are not touched.  On a normal exit the
        running statistics become the averages of the batches' means and unbiased
        variances (Algorithm 2 of Ioffe & Szegedy); when the block raises they are left as
        they were.  Either way the sums and the forward cache are dropped.

        :func:`~bnfast.nn.compute_population_stats` opens it on every batch-norm layer of
        a model; use it directly to collect the statistics of one layer, or of batches fed
        in your own loop.

        Yields
        ------
        self : BatchNorm1d, BatchNorm2d or BatchNorm3d
            This layer.

        Raises
        ------
        ValueError
            If the layer has no running statistics (``track_running_stats=False``); from
            a forward pass inside the block, if a batch has one value per channel.

        Examples
        --------
        >>> import numpy as np
        >>> from bnfast import nn
        >>> bn = nn.BatchNorm1d(2).eval()
        >>> batches = np.arange(24, dtype=np.float32).reshape(3, 4, 2)
        >>> with bn.collect_population_stats():
        ...     for xb in batches:
        ...         _ = bn(xb)
        >>> bn.running_mean, bn.running_var        # mean of means, mean of unbiased variances
        (array([11., 12.], dtype=float32), array([6.6666665, 6.6666665], dtype=float32))
        >>> int(bn.num_batches_tracked), bn.training
        (0, False)
        """
        if not self.track_running_stats:
            raise ValueError(f"{type(self).__name__} has track_running_stats=False: no "
                             f"running statistics to set")
        xp = _xp.array_module(self.running_mean)
        C = self.num_features
        self._population = [xp.zeros(C), xp.zeros(C), 0]
        try:
            yield self
            s_mean, s_var, k = self._population
            self.running_mean[...] = s_mean / k
            self.running_var[...] = s_var / k
        finally:
            self._population = None
            self._cache = None

    def _check(self, x):
        x = _input_like(x, self.dtype, type(self).__name__, self._any_array())
        if x.ndim not in self._ndims:
            raise ValueError(
                f"{type(self).__name__} expects input of shape {self._layout}, got "
                f"{x.ndim}-d input of shape {x.shape}")
        C = x.shape[self.axis]
        if C != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got {C} channels "
                f"(input shape {x.shape}, channel axis {self.axis})")
        return x

    def forward(self, x):
        x = self._check(x)
        w = self.weight.data if self.affine else None
        b = self.bias.data if self.affine else None
        axis = self.axis
        if self._population is not None:
            self._accumulate_population(x)
        if self.uses_batch_stats() or self._population is not None:
            rm = rv = None
            factor = 0.0
            if self.training and self.track_running_stats and self._population is None:
                self.num_batches_tracked += 1
                rm, rv = self.running_mean, self.running_var
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
            y, mean, invstd = self._batch_forward(x, w, b, rm, rv, factor)
            self._cache = (x, mean, invstd, True)
            return y
        rm, rv = self.running_mean, self.running_var
        y = _api.batch_norm_infer(x, rm, rv, w, b, eps=self.eps, axis=axis, relu=self.relu)
        invstd = 1.0 / _xp.array_module(rv).sqrt(rv.astype(np.float64) + self.eps)
        self._cache = (x, rm.astype(np.float64), invstd, False)
        return y

    def backward(self, grad):
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        x, mean, invstd, training = self._cache
        grad = _input_like(grad, self.dtype, f"{type(self).__name__}.backward")
        if grad.shape != x.shape:
            raise ValueError(
                f"{type(self).__name__}.backward: gradient shape {grad.shape} does not match "
                f"the forward input's {x.shape}")
        affine = self.affine
        w = self.weight.data if affine else None
        b = None
        if self.relu:   # the fused-ReLU backward needs the forward's bias for its mask
            b = (self.bias.data if affine
                 else _xp.array_module(x).zeros(self.num_features, self.dtype))
        if training:
            dx, dw, db = self._batch_backward(grad, x, mean, invstd, w, b)
        else:
            dx, dw, db = _api.batch_norm_backward(grad, x, mean, invstd, w, bias=b,
                                                  relu=self.relu, training=False,
                                                  axis=self.axis)
        if affine:
            self.weight.accumulate(dw)
            self.bias.accumulate(db)
        return dx

    # The two steps that use the batch's own statistics; bnfast.distributed's synchronized
    # layers override them to take the statistics over every process's batch.
    def _batch_forward(self, x, w, b, rm, rv, factor):
        """``(y, mean, invstd)`` of `x` normalised with its own statistics."""
        return _api.batch_norm_train(x, w, b, eps=self.eps, axis=self.axis, running_mean=rm,
                                     running_var=rv, momentum=factor, relu=self.relu)

    def _batch_backward(self, grad, x, mean, invstd, w, b):
        """``(dx, dweight, dbias)`` through :meth:`_batch_forward`."""
        return _api.batch_norm_backward(grad, x, mean, invstd, w, bias=b, relu=self.relu,
                                        training=True, axis=self.axis)

    def _accumulate_population(self, x):
        """Add this batch's mean and unbiased variance to the population sums."""
        m = x.size // self.num_features
        if m < 2:
            raise ValueError(
                f"{type(self).__name__}: a batch with {m} value per channel has no unbiased "
                f"variance (input shape {x.shape})")
        mean, var = _api.moments(x.astype(np.float64, copy=False), axis=self.axis)
        acc = self._population
        acc[0] += mean
        acc[1] += var * (m / (m - 1))
        acc[2] += 1


class BatchNorm1d(_BatchNorm):
    """Batch normalization over ``(N, C)`` or ``(N, C, L)`` input.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float, default 1e-5
        Added to the variance before the square root (PyTorch's default).
    momentum : float or None, default 0.1
        Weight of the new batch in the running statistics; None for a cumulative average.
    affine : bool, default True
        Learn a per-channel weight (gamma) and bias (beta).
    track_running_stats : bool, default True
        Keep running statistics (buffers ``running_mean``, ``running_var``,
        ``num_batches_tracked``); without them the batch's statistics are always used.
    relu : bool, default False
        Apply ReLU to the output in the same kernel pass (and mask the gradient).
    dtype : float32 or float64, default float32
        Dtype of the parameters and running statistics; inputs must have the same dtype.

    Attributes
    ----------
    weight, bias : Parameter of shape (C,), or None
    running_mean, running_var : ndarray of shape (C,), or None
    num_batches_tracked : 0-d int64 ndarray, or None
    frozen : bool
        Normalise with the running statistics even in training mode.

    Raises
    ------
    ValueError
        If `num_features` is not a positive integer, `eps` is not a real number >= 0, or
        `momentum` is not None or in [0, 1]; from ``forward``, if the input has the wrong
        number of dimensions or of channels; from ``backward``, if the gradient's shape is
        not the forward input's.
    TypeError
        If `dtype` is not float32 or float64; from ``forward`` and ``backward``, if the
        array's dtype is not the layer's `dtype`.
    RuntimeError
        From ``backward``, if called before ``forward``.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> bn = nn.BatchNorm1d(3)
    >>> y = bn(np.arange(12, dtype=np.float32).reshape(4, 3))
    >>> y[:, 0].round(3)
    array([-1.342, -0.447,  0.447,  1.342], dtype=float32)
    >>> bn.running_mean, int(bn.num_batches_tracked)
    (array([0.45, 0.55, 0.65], dtype=float32), 1)
    """

    _ndims = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class _ChannelsLastOption(_BatchNorm):
    """A batch-norm layer for ``(N, C, *spatial)`` input or, with ``channels_last=True``,
    ``(N, *spatial, C)``."""

    _layouts = ("", "")          # (channels-first, channels-last) shape, for messages

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, channels_last=False, relu=False,
                 dtype=np.float32):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         relu=relu, dtype=dtype)
        self.channels_last = bool(channels_last)

    @property
    def axis(self):
        return -1 if self.channels_last else 1

    @property
    def _layout(self):
        return self._layouts[self.channels_last]


class BatchNorm2d(_ChannelsLastOption):
    """Batch normalization over ``(N, C, H, W)`` input (one channel = one feature map).

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, relu, dtype
        As for :class:`BatchNorm1d`.
    channels_last : bool, default False
        Take ``(N, H, W, C)`` input instead.

    Notes
    -----
    Statistics are over the batch and all spatial positions (m = N*H*W values per
    channel), as in Section 3.2 of the paper.

    Raises
    ------
    ValueError
        If `num_features` is not a positive integer, `eps` is not a real number >= 0, or
        `momentum` is not None or in [0, 1]; from ``forward``, if the input has the wrong
        number of dimensions or of channels; from ``backward``, if the gradient's shape is
        not the forward input's.
    TypeError
        If `dtype` is not float32 or float64; from ``forward`` and ``backward``, if the
        array's dtype is not the layer's `dtype`.
    RuntimeError
        From ``backward``, if called before ``forward``.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> bn = nn.BatchNorm2d(2)
    >>> x = np.arange(16, dtype=np.float32).reshape(2, 2, 2, 2)     # (N, C, H, W)
    >>> y = bn(x)
    >>> y.mean(axis=(0, 2, 3)).round(4) + 0.0, y.std(axis=(0, 2, 3)).round(3)
    (array([0., 0.], dtype=float32), array([1., 1.], dtype=float32))
    >>> bn.running_mean
    array([0.55, 0.95], dtype=float32)
    >>> bn.backward(np.ones_like(y)).shape, bn.bias.grad
    ((2, 2, 2, 2), array([8., 8.], dtype=float32))
    >>> nhwc = nn.BatchNorm2d(2, channels_last=True)
    >>> bool(np.allclose(nhwc(x.transpose(0, 2, 3, 1)), y.transpose(0, 2, 3, 1)))
    True
    """

    _ndims = (4,)
    _layouts = ("(N, C, H, W)", "(N, H, W, C)")


class BatchNorm3d(_ChannelsLastOption):
    """Batch normalization over ``(N, C, D, H, W)`` input (volumes, or video frames).

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, relu, dtype
        As for :class:`BatchNorm1d`.
    channels_last : bool, default False
        Take ``(N, D, H, W, C)`` input instead (PyTorch's ``channels_last_3d`` memory
        format, as an array of that shape).

    Notes
    -----
    Statistics are over the batch and all positions (m = N*D*H*W values per channel).
    Parameters, buffers and state-dict keys are those of ``torch.nn.BatchNorm3d``.

    Raises
    ------
    ValueError
        If `num_features` is not a positive integer, `eps` is not a real number >= 0, or
        `momentum` is not None or in [0, 1]; from ``forward``, if the input is not 5-d or
        has the wrong number of channels; from ``backward``, if the gradient's shape is
        not the forward input's.
    TypeError
        If `dtype` is not float32 or float64; from ``forward`` and ``backward``, if the
        array's dtype is not the layer's `dtype`.
    RuntimeError
        From ``backward``, if called before ``forward``.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> bn = nn.BatchNorm3d(2)
    >>> x = np.arange(32, dtype=np.float32).reshape(2, 2, 2, 2, 2)   # (N, C, D, H, W)
    >>> y = bn(x)
    >>> y.mean(axis=(0, 2, 3, 4)).round(4) + 0.0, y.std(axis=(0, 2, 3, 4)).round(3)
    (array([0., 0.], dtype=float32), array([1., 1.], dtype=float32))
    >>> bn.running_mean
    array([1.15, 1.95], dtype=float32)
    >>> bn.backward(np.ones_like(y)).shape
    (2, 2, 2, 2, 2)
    >>> ndhwc = nn.BatchNorm3d(2, channels_last=True)
    >>> bool(np.allclose(ndhwc(np.moveaxis(x, 1, -1)), np.moveaxis(y, 1, -1)))
    True
    """

    _ndims = (5,)
    _layouts = ("(N, C, D, H, W)", "(N, D, H, W, C)")
