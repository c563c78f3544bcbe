"""Whole-model batch-norm tools: population statistics, folding, and ``.npz`` files."""
import errno
import math
import os
import struct
import zipfile
import zlib

import numpy as np

from .batchnorm import BatchNorm1d, BatchNorm2d, _BatchNorm
from .layers import Conv2d, Linear, ReLU
from .module import Identity, Parameter, Sequential, StateDictError

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
    modes = [(m, m.training, getattr(m, "frozen", None)) for m in model.modules()]
    try:
        model.eval()
        for _, bn in layers:
            bn._population = [np.zeros(bn.num_features), np.zeros(bn.num_features), 0]
        n = 0
        for b in batches:
            model.forward(_batch_input(b))
            n += 1
        if n == 0:
            raise ValueError("compute_population_stats: no batches were given")
        for _, bn in layers:
            s_mean, s_var, k = bn._population
            bn.running_mean[...] = s_mean / k
            bn.running_var[...] = s_var / k
    finally:
        for _, bn in layers:
            bn._population = None
            bn._cache = None
        for m, training, frozen in modes:
            m.training = training
            if frozen is not None:
                m.frozen = frozen
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
    gamma = bn.weight.data.astype(f64) if bn.affine else np.ones(C)
    beta = bn.bias.data.astype(f64) if bn.affine else np.zeros(C)
    scale = gamma / np.sqrt(bn.running_var.astype(f64) + bn.eps)
    b0 = lin.bias.data.astype(f64) if lin.bias is not None else np.zeros(C)
    new = lin.copy()
    if new.bias is None:
        new.bias = Parameter(np.zeros(C, dtype=lin.weight.data.dtype))
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
    folded.eval()
    for m in folded.modules():
        if isinstance(m, _BatchNorm):
            m.frozen = False
    _fold_inplace(folded)
    folded.eval()
    if sample is not None:
        was = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            expected = np.asarray(model.forward(sample))
        finally:
            for m, t in was:
                m.training = t
        got = np.asarray(folded.forward(sample))
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


# ---------------------------------------------------------------------------- files

def _npz_path(path):
    """The file :func:`save` writes for `path` (NumPy appends ``.npz`` unless present)."""
    try:
        p = os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}") \
            from None
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    return p if p.endswith(".npz") else p + ".npz"


def save(model, path):
    """Save `model`'s state dict to an uncompressed ``.npz`` file (no pickle).

    Keys are the state-dict names (``"0.weight"``, ``"1.running_mean"``, ...); every array
    keeps its dtype, so :func:`load` restores the model bit for bit.

    Parameters
    ----------
    model : Module
        The model whose state dict (parameters and buffers) is written.
    path : str or os.PathLike
        ``.npz`` is appended unless the name ends with it (as NumPy does); :func:`load`
        finds the file under the same name.

    Raises
    ------
    OSError
        If the file cannot be written.
    TypeError
        If `path` is not a str or os.PathLike.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from bnfast import nn
    >>> net = nn.Sequential(nn.Linear(3, 2, rng=0), nn.BatchNorm1d(2))
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "net.npz")
    >>> nn.save(net, path)
    >>> with np.load(path) as f:
    ...     sorted(f.files)
    ['0.bias', '0.weight', '1.bias', '1.num_batches_tracked', '1.running_mean',
     '1.running_var', '1.weight']
    >>> tmp.cleanup()
    """
    state = model.state_dict()
    np.savez(_npz_path(path), **state)


def _shortlist(keys, n=8):
    keys = list(keys)
    return repr(keys) if len(keys) <= n else repr(keys[:n])[:-1] + f", ... ({len(keys)} in all)]"


def _read_member(zf, info, key, target, where):
    """Read one ``.npy`` member, checking its header against `target` before any data."""
    from numpy.lib import format as npy

    def bad(problem):
        return StateDictError(f"{where}: {key!r}: {problem}")

    with zf.open(info) as fp:
        try:
            version = npy.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = npy.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, fortran, dtype = npy.read_array_header_2_0(fp)
            else:
                raise bad(f"not a valid .npy array (format version {version} is not "
                          f"supported)")
        except StateDictError:
            raise
        except (ValueError, TypeError, SyntaxError, EOFError) as exc:
            raise bad(f"not a valid .npy array ({exc})") from None
        if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None:
            raise bad(f"dtype {dtype} is not a numeric dtype (object arrays and pickles are "
                      f"never loaded)")
        if tuple(shape) != target.shape:
            raise bad(f"shape {tuple(shape)} does not match the model's {target.shape}")
        if not np.can_cast(dtype, target.dtype, casting="same_kind"):
            raise bad(f"dtype {dtype} cannot be cast to the model's {target.dtype}")
        nbytes = math.prod(shape) * dtype.itemsize
        data = fp.read(nbytes)                  # at most what the parameter needs
        if len(data) < nbytes:
            raise bad(f"truncated: {len(data)} of {nbytes} data bytes")
        if fp.read(1):
            raise bad(f"more data than the shape {tuple(shape)} and dtype {dtype} need")
    arr = np.frombuffer(data, dtype=dtype)
    return arr.reshape(shape, order="F" if fortran else "C")


def load(model, path, strict=True):
    """Load an ``.npz`` file written by :func:`save` into `model` (in place, no pickle).

    The archive is checked against the model before anything is read: member names
    against the model's state-dict keys, then each array's ``.npy`` header (shape and
    dtype, against the parameter or buffer it is for) before its data, and no more data
    is read than the parameter needs.  The model is changed only when the whole file
    fits.

    Parameters
    ----------
    model : Module
        The model to load into; its parameters and buffers are overwritten in place.
    path : str or os.PathLike
        As given to :func:`save`: when it does not end with ``.npz`` and does not exist,
        ``path + ".npz"`` (the name :func:`save` wrote) is read.
    strict : bool, default True
        Require the file's keys to be exactly the model's; otherwise load the keys both
        have and ignore the rest (see :meth:`Module.load_state_dict`).

    Returns
    -------
    model : Module
        The same model, updated in place.

    Raises
    ------
    StateDictError
        (a `ValueError`) The file is not an ``.npz`` archive (e.g. empty, random bytes, a
        single-array ``.npy`` file), is corrupt or truncated, its keys differ from the
        model's (with `strict`), or an array has the wrong shape, a dtype that cannot be
        cast to the parameter's (object arrays are refused), or more or fewer data bytes
        than its header says.  The message names the file and the problem; the model is
        left unchanged.
    OSError
        If the file does not exist or cannot be opened (``FileNotFoundError`` names
        both names tried).
    TypeError
        If `path` is not a str or os.PathLike.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from bnfast import nn
    >>> net = nn.Sequential(nn.Linear(3, 2, rng=0), nn.BatchNorm1d(2))
    >>> _ = net(np.ones((4, 3), np.float32))          # update the running statistics
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "net")
    >>> nn.save(net, path)                            # writes net.npz
    >>> copy = nn.load(nn.Sequential(nn.Linear(3, 2, rng=1), nn.BatchNorm1d(2)), path)
    >>> all(np.array_equal(a, b) for a, b in zip(copy.state_dict().values(),
    ...                                          net.state_dict().values()))
    True
    >>> nn.load(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), path)
    Traceback (most recent call last):
        ...
    bnfast.nn.StateDictError: ...net.npz: '0.weight': shape (2, 3) does not match ...
    >>> tmp.cleanup()
    """
    try:
        given = os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}") \
            from None
    if isinstance(given, bytes):
        given = os.fsdecode(given)
    where = given
    if not os.path.exists(given) and not given.endswith(".npz"):
        where = given + ".npz"
        if not os.path.exists(where):
            raise FileNotFoundError(errno.ENOENT, f"no such file: {given!r} (nor "
                                    f"{where!r}, the name nn.save writes)", given)
    targets = model._state_targets()
    with open(where, "rb") as f:
        head = f.read(6)
        f.seek(0)
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError,
                NotImplementedError, struct.error) as exc:
            if head == b"\x93NUMPY":
                why = "a single-array .npy file, not an .npz archive of a state dict"
            elif not head:
                why = "an empty file, not an .npz archive"
            else:
                why = (f"not a readable .npz archive (corrupt, truncated or not a zip "
                       f"file: {exc})")
            raise StateDictError(f"{where}: {why}; write it with nn.save") from None
        with zf:
            infos, seen = {}, set()
            for info in zf.infolist():
                name = info.filename
                if name in seen:
                    raise StateDictError(f"{where}: the archive holds {name!r} twice")
                seen.add(name)
                if not name.endswith(".npy"):
                    raise StateDictError(f"{where}: member {name!r} is not a .npy array; "
                                         f"not a state-dict file written by nn.save")
                infos[name[:-4]] = info
            missing = [k for k in targets if k not in infos]
            unexpected = [k for k in infos if k not in targets]
            if strict and (missing or unexpected):
                raise StateDictError(
                    f"{where}: the file's keys do not match the model "
                    f"({type(model).__name__}): missing keys {_shortlist(missing)}, "
                    f"unexpected keys {_shortlist(unexpected)}")
            values = {}
            for key, target in targets.items():
                if key in infos:
                    try:
                        values[key] = _read_member(zf, infos[key], key, target, where)
                    except StateDictError:
                        raise
                    except (zipfile.BadZipFile, EOFError, OSError, zlib.error,
                            NotImplementedError, RuntimeError, struct.error) as exc:
                        raise StateDictError(f"{where}: {key!r}: corrupt or truncated "
                                             f"archive ({exc})") from None
    try:
        model.load_state_dict(values, strict=False)
    except (KeyError, ValueError, TypeError) as exc:    # not expected after the checks
        raise StateDictError(f"{where}: {exc}") from exc
    return model
