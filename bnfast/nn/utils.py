"""Whole-model batch-norm tools: population statistics and folding.

``save``, ``load`` and ``StateDictError`` are defined next to ``Module.state_dict`` in
:mod:`bnfast.nn.module` and are importable from here too.  This module depends on the
layers; none of them depends on it.
"""
import contextlib

import numpy as np

from .. import _xp
from .batchnorm import BatchNorm1d, BatchNorm2d, _BatchNorm
from .layers import Conv2d, Linear, ReLU
from .module import Identity, Parameter, Sequential, StateDictError, load, save

__all__ = ["compute_population_stats", "fold_batchnorm", "save", "load", "batchnorm_layers",
           "StateDictError"]


def batchnorm_layers(model):
    """Return ``[(qualified_name, layer)]`` for every batch-norm layer in `model`.

    Parameters
    ----------
    model : Module
        Searched depth first, including `model` itself.

    Returns
    -------
    list of (str, BatchNorm1d or BatchNorm2d)
        The qualified names (as in :meth:`Module.named_modules`) and the layers, in
        module order.

    Examples
    --------
    >>> from bnfast import nn
    >>> net = nn.Sequential(nn.Linear(4, 3, rng=0), nn.BatchNorm1d(3), nn.ReLU(),
    ...                     nn.Residual(nn.Sequential(nn.Linear(3, 3, rng=0),
    ...                                               nn.BatchNorm1d(3))))
    >>> [name for name, _ in nn.batchnorm_layers(net)]
    ['1', '3.body.1']
    >>> nn.batchnorm_layers(nn.BatchNorm2d(8))
    [('', BatchNorm2d(8, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True))]
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def _batch_input(b):
    """The network input of a batch: the batch itself, or the first item of a tuple."""
    if isinstance(b, (tuple, list)):
        return b[0]
    return b


# ---------------------------------------------------------------------------- population stats

def compute_population_stats(model, batches):
    """Set every batch-norm layer's running statistics to population statistics.

    Algorithm 2 of Ioffe & Szegedy (steps 8-11): the network is run over the given training
    mini-batches with every batch-norm layer normalising by the batch's own statistics (as
    in training, so each layer sees the inputs the trained network produced), and for each
    layer::

        running_mean = E_B[mean_B]
        running_var  = E_B[m / (m - 1) * var_B]

    where m is the number of values per channel in a batch (batch size times spatial
    positions) and var_B the biased batch variance; with equal-sized batches the second
    line is the paper's ``m/(m-1) E_B[var_B]``.  Statistics are accumulated in float64.
    Other modules (e.g. dropout) run in eval mode; running statistics are not otherwise
    updated, ``num_batches_tracked`` is left alone, and every module's ``training`` and
    ``frozen`` flags are restored afterwards.

    Parameters
    ----------
    model : Module
        The trained network; the running statistics of its batch-norm layers are overwritten
        in place.
    batches : iterable
        Training mini-batches: arrays, or tuples whose first item is the input (so a
        data loader yielding ``(x, y)`` works).

    Returns
    -------
    model : Module
        The same model, updated in place.

    Raises
    ------
    ValueError
        If `model` has no batch-norm layer with running statistics, a layer has
        ``track_running_stats=False``, `batches` is empty, or a batch has one value per
        channel.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> net = nn.Sequential(nn.Linear(5, 3, rng=0), nn.BatchNorm1d(3), nn.Sigmoid())
    >>> data = np.random.default_rng(0).standard_normal((100, 5)).astype(np.float32)
    >>> _ = nn.compute_population_stats(net, np.split(data, 10))
    >>> h = net[0](data)
    >>> bool(np.allclose(net[1].running_mean, h.mean(axis=0), atol=1e-5))
    True
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError("compute_population_stats: the model has no batch-norm layer")
    untracked = [n for n, m in layers if not m.track_running_stats]
    if untracked:
        raise ValueError(
            f"compute_population_stats: layers {untracked} have track_running_stats=False "
            f"and no running statistics to set")
    modes = [(m, m.training) for m in model.modules()]
    frozen = [(bn, bn.frozen) for _, bn in layers]
    try:
        model.eval()
        with contextlib.ExitStack() as collecting:    # sets the statistics on a clean exit
            for _, bn in layers:
                collecting.enter_context(bn.collect_population_stats())
            n = 0
            for b in batches:
                model.forward(_batch_input(b))
                n += 1
            if n == 0:
                raise ValueError("compute_population_stats: no batches were given")
    finally:
        for m, training in modes:
            m.training = training
        for bn, f in frozen:
            bn.frozen = f
    return model


# ---------------------------------------------------------------------------- folding

def _fold_pair(lin, bn):
    """A new Linear/Conv2d equal to ``bn(lin(x))`` with bn's running statistics."""
    if not bn.track_running_stats:
        raise ValueError("fold_batchnorm: a batch-norm layer without running statistics "
                         "cannot be folded")
    C = bn.num_features
    out = lin.out_features if isinstance(lin, Linear) else lin.out_channels
    if out != C:
        raise ValueError(f"fold_batchnorm: {type(lin).__name__} has {out} outputs but the "
                         f"following batch norm has {C} channels")
    if isinstance(lin, Linear) and not isinstance(bn, BatchNorm1d):
        raise ValueError(f"fold_batchnorm: cannot fold {type(bn).__name__} into a Linear "
                         f"layer")
    if isinstance(lin, Conv2d) and not isinstance(bn, BatchNorm2d):
        raise ValueError(f"fold_batchnorm: cannot fold {type(bn).__name__} into a Conv2d "
                         f"layer")
    if isinstance(lin, Conv2d) and lin.channels_last != bn.channels_last:
        raise ValueError("fold_batchnorm: Conv2d and BatchNorm2d disagree on channels_last")
    f64 = np.float64
    xp = _xp.array_module(lin.weight.data)
    gamma = bn.weight.data.astype(f64) if bn.affine else xp.ones(C)
    beta = bn.bias.data.astype(f64) if bn.affine else xp.zeros(C)
    scale = gamma / xp.sqrt(bn.running_var.astype(f64) + bn.eps)
    b0 = lin.bias.data.astype(f64) if lin.bias is not None else xp.zeros(C)
    new = lin.copy()
    if new.bias is None:
        new.bias = Parameter(xp.zeros(C, dtype=lin.weight.data.dtype))
    w = lin.weight.data.astype(f64)
    w = w * scale.reshape((C,) + (1,) * (w.ndim - 1))
    new.weight.data = w.astype(lin.weight.data.dtype)
    new.bias.data = ((b0 - bn.running_mean.astype(f64)) * scale + beta).astype(
        lin.weight.data.dtype)
    new.weight.grad = new.bias.grad = None
    return new, (ReLU() if bn.relu else Identity())


def _fold_inplace(module):
    count = 0
    if isinstance(module, Sequential):
        layers = list(module)
        i = 0
        while i < len(layers) - 1:
            a, b = layers[i], layers[i + 1]
            if isinstance(a, (Linear, Conv2d)) and isinstance(b, _BatchNorm):
                layers[i], layers[i + 1] = _fold_pair(a, b)
                count += 1
                i += 2
            else:
                i += 1
        for i, m in enumerate(layers):
            module[i] = m
    for lin_name, bn_name in getattr(module, "_fold_pairs", ()):
        a, b = getattr(module, lin_name), getattr(module, bn_name)
        if isinstance(a, (Linear, Conv2d)) and isinstance(b, _BatchNorm):
            new_a, new_b = _fold_pair(a, b)
            setattr(module, lin_name, new_a)
            setattr(module, bn_name, new_b)
            count += 1
    for _, child in module.named_children():
        count += _fold_inplace(child)
    return count


def fold_batchnorm(model, sample=None, *, rtol=None, atol=None):
    """Return an inference copy of `model` with batch norm folded into the layers before it.

    Every `Linear` or `Conv2d` directly followed by a batch-norm layer (adjacent in a
    `Sequential`, or a pair declared by a block such as `BasicBlock`) becomes one layer
    computing ``bn(layer(x))`` with the running statistics (Algorithm 2: at inference batch
    norm is a per-channel affine map)::

        scale  = gamma / sqrt(running_var + eps)
        weight = weight * scale         (per output channel)
        bias   = (bias - running_mean) * scale + beta

    and the batch-norm layer is replaced by `Identity` (or `ReLU` if it had ``relu=True``).
    The arithmetic is done in float64 and rounded once.  The copy is in eval mode; `model`
    itself is not changed.

    Parameters
    ----------
    model : Module
        The network to fold (with running statistics); it is copied, not changed.
    sample : array_like, optional
        An input batch on which to check that the folded copy's output equals the eval-mode
        output of `model`.
    rtol, atol : float, optional
        Tolerances of that check; default ``1e-4``/``1e-5`` for float32 outputs and
        ``1e-10``/``1e-12`` for float64, ``atol`` relative to the largest output magnitude.

    Returns
    -------
    folded : Module
        A new model in eval mode with the batch-norm layers folded into the layers before
        them.

    Raises
    ------
    ValueError
        If a batch-norm layer to fold has no running statistics or mismatched channels.
    AssertionError
        If the check on `sample` fails.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> net = nn.Sequential(nn.Linear(4, 3, rng=0), nn.BatchNorm1d(3), nn.Tanh())
    >>> x = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    >>> _ = net(x)                   # one training step's worth of running statistics
    >>> folded = nn.fold_batchnorm(net, sample=x)
    >>> folded
    Sequential(
      (0): Linear(in_features=4, out_features=3, bias=True)
      (1): Identity()
      (2): Tanh()
    )
    """
    folded = model.copy()
    folded.eval().unfreeze_bn_stats()
    _fold_inplace(folded)
    folded.eval()
    if sample is not None:
        was = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            expected = _xp.asnumpy(model.forward(sample))
        finally:
            for m, t in was:
                m.training = t
        got = _xp.asnumpy(folded.forward(sample))
        f32 = expected.dtype == np.float32
        rtol = (1e-4 if f32 else 1e-10) if rtol is None else rtol
        atol = (1e-5 if f32 else 1e-12) if atol is None else atol
        mag = float(np.max(np.abs(expected), initial=0.0))
        err = np.abs(got.astype(np.float64) - expected)
        bound = rtol * np.abs(expected) + atol * max(mag, 1.0)
        if got.shape != expected.shape or (err > bound).any():
            raise AssertionError(
                f"fold_batchnorm: the folded model differs from the original on the sample "
                f"(max abs difference {np.max(err, initial=0.0):.3e})")
    return folded
