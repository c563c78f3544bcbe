"""The module protocol: `Parameter`, `Module`, `Sequential`, `Identity`.

A module is a small object with a ``forward(x)`` that caches what its ``backward(grad)``
needs; ``backward`` returns the gradient with respect to the input and *accumulates* the
gradients of the module's parameters into ``Parameter.grad``.  There is no autograd graph
and no global training flag: every module has its own ``training`` attribute.

Structure is found by looking at a module's public attributes (names not starting with
``_``), in the order they were assigned:

- a `Parameter` is a trained parameter;
- a `Module` is a child module;
- names listed in ``_buffer_names`` are persistent buffers (e.g. running statistics):
  arrays saved in the state dict but not trained.

Names and order follow PyTorch (each module's parameters, then its buffers, then its
children, depth first), so ``state_dict()`` keys match those of the equivalent PyTorch model.
"""
import collections
import copy
import errno
import math
import numbers
import operator
import os
import struct
import zipfile
import zlib

import numpy as np

from .. import _xp

__all__ = ["Parameter", "Module", "Sequential", "ModuleList", "Identity", "StateDictError",
           "save", "load"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _check_dtype(dtype):
    """Return `dtype` as a NumPy float32/float64 dtype, or raise TypeError."""
    dt = np.dtype(dtype)
    if dt not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _as_rng(rng):
    """A `numpy.random.Generator` from None, an int seed or a Generator."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, numbers.Integral):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator, got {rng!r}")


def _float_input(x, who):
    """Check that `x` is a float32/float64 ndarray (NumPy or CuPy); return it (no copy)."""
    x = _xp.asarray(x)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{who} expects a float32 or float64 array, got dtype {x.dtype}")
    return x


def _input_like(x, dtype, who, like=None):
    """Check that `x` is an ndarray of exactly `dtype` (the module's parameter dtype) and,
    when a parameter array `like` is given, on its device.

    The error suggests only conversions that work: the input to the parameters' dtype,
    and, for a float input of the other supported precision, the model to the input's.
    A NumPy input for a model on a GPU (or the other way round) is a TypeError, an input
    on another GPU a ValueError.
    """
    x = _xp.asarray(x)
    if x.dtype != dtype:
        hint = f"convert the input (x.astype(np.{dtype}))"
        if x.dtype in _FLOAT_DTYPES:
            hint += f" or the model (model.to(np.{x.dtype}))"
        raise TypeError(f"{who} has {dtype} parameters but got a {x.dtype} input; {hint}")
    if like is not None and (_xp.is_cupy(x) or _xp.is_cupy(like)):
        have, got = _xp.device_of(like), _xp.device_of(x)
        if have != got:
            err = ValueError if _xp.is_cupy(x) and _xp.is_cupy(like) else TypeError
            raise err(f"{who} has its parameters on {have} but got an input on {got}; "
                      f"move the input (bnfast.train moves every batch to the model's "
                      f"device) or the model (model.to({got!r}))")
    return x


class StateDictError(ValueError):
    """A state dict, or a state-dict file, does not fit the model.

    Raised by :meth:`Module.load_state_dict` for missing or unexpected keys (with
    ``strict=True``) and for values of the wrong shape, and by :func:`~bnfast.nn.load`
    (and ``Module.load``) for a file that is not an ``.npz`` archive, is corrupt or
    truncated, has other keys, or an array whose shape or dtype does not match its
    parameter.  The message names the problem (and the file); the model is left unchanged.

    A subclass of `ValueError`.  Where PyTorch raises ``RuntimeError("Error(s) in loading
    state_dict for ...")``, bnfast raises this, with the same message.
    """

    __module__ = "bnfast.nn"          # where it is documented and exported


class _IncompatibleKeys(collections.namedtuple("IncompatibleKeys",
                                               ["missing_keys", "unexpected_keys"])):
    """What :meth:`Module.load_state_dict` returns (PyTorch's named tuple)."""

    __slots__ = ()

    def __repr__(self):
        if not self.missing_keys and not self.unexpected_keys:
            return "<All keys matched successfully>"
        return super().__repr__()

    __str__ = __repr__


def _check_child_name(name, module):
    """Validate ``owner.add_module(name, module)`` (PyTorch's rules, plus bnfast's: a name
    starting with ``_`` would be a private attribute, not a child)."""
    if module is not None and not isinstance(module, Module):
        raise TypeError(f"add_module: {type(module).__name__} is not a Module subclass")
    if not isinstance(name, str):
        raise TypeError(f"add_module: module name should be a string, got "
                        f"{type(name).__name__}")
    if name == "":
        raise KeyError('module name can\'t be empty string ""')
    if "." in name:
        raise KeyError(f'module name can\'t contain ".", got: {name}')
    if name.startswith("_"):
        raise KeyError(f"module name can't start with '_' (a private attribute, not a "
                       f"child), got: {name}")


class Parameter:
    """A trained array and its gradient.

    Parameters
    ----------
    data : ndarray
        The value (a NumPy array, or a CuPy array on a GPU); used and updated in place.
    requires_grad : bool, default True
        When False, backward passes do not accumulate a gradient for it (the optimizer then
        skips it), e.g. to fine-tune only part of a network.

    Attributes
    ----------
    data : ndarray
    grad : ndarray or None
        The accumulated gradient, same shape and dtype as `data`; None after
        ``zero_grad()`` until the next backward pass.
    requires_grad : bool

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> p = nn.Parameter(np.zeros(3, np.float32))
    >>> p
    Parameter(shape=(3,), dtype=float32)
    >>> p.accumulate(np.ones(3, np.float32))
    >>> p.accumulate(np.ones(3, np.float32))     # gradients add up until zeroed
    >>> p.grad
    array([2., 2., 2.], dtype=float32)
    >>> frozen = nn.Parameter(np.zeros(3), requires_grad=False)
    >>> frozen.accumulate(np.ones(3))
    >>> frozen.grad is None
    True
    """

    __slots__ = ("data", "grad", "requires_grad")

    def __init__(self, data, requires_grad=True):
        self.data = _xp.asarray(data)
        self.grad = None
        self.requires_grad = bool(requires_grad)

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    def accumulate(self, g):
        """Add `g` to ``grad`` (taking ownership of `g` when ``grad`` is None)."""
        if self.requires_grad:
            if self.grad is None:
                self.grad = g
            else:
                self.grad += g

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


def _array_of(v):
    """The array of a state-dict member: a `Parameter`'s data, or a buffer itself."""
    return v.data if isinstance(v, Parameter) else v


def _is_dtype_like(v):
    """Whether `v` names a dtype (``np.float32``, ``"float64"``, ...) rather than a device."""
    if isinstance(v, str) and v.split(":", 1)[0] in ("cpu", "cuda"):
        return False
    try:
        np.dtype(v)
    except TypeError:
        return False
    return True


class Module:
    """Base class of every layer and network.

    Subclasses call ``super().__init__()`` first, assign parameters, buffers (via
    :meth:`register_buffer`) and child modules as attributes, and implement
    :meth:`forward` and :meth:`backward`.  What ``forward`` keeps for ``backward`` goes in
    the one attribute ``self._cache`` (None until the first forward), which :meth:`copy`
    and pickling leave out.

    The same code runs on NumPy arrays and on CuPy (GPU) arrays: a layer computes with the
    array module of its input (``xp = bnfast._xp.array_module(x)``, then ``xp.zeros``, ...),
    and :meth:`to` moves a model between ``"cpu"`` and ``"cuda"``.

    Attributes
    ----------
    training : bool
        True in training mode (the default), False in eval mode.  Set it for a whole tree
        with :meth:`train` / :meth:`eval`.

    Examples
    --------
    A layer that scales its input by a trained per-feature factor:

    >>> import numpy as np
    >>> from bnfast import nn
    >>> class Scale(nn.Module):
    ...     def __init__(self, n):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(np.full(n, 2.0))
    ...         self.register_buffer("calls", np.zeros((), np.int64))
    ...     def forward(self, x):
    ...         self.calls += 1
    ...         self._cache = x                 # what backward needs
    ...         return x * self.weight.data
    ...     def backward(self, grad):
    ...         self.weight.accumulate((grad * self._cache).sum(axis=0))
    ...         return grad * self.weight.data
    >>> m = Scale(2)
    >>> m(np.array([[1.0, 3.0]]))
    array([[2., 6.]])
    >>> m.backward(np.ones((1, 2)))
    array([[2., 2.]])
    >>> m.weight.grad
    array([1., 3.])
    >>> sorted(m.state_dict())
    ['calls', 'weight']
    >>> m.eval().training
    False
    """

    def __init__(self):
        self.training = True
        self._buffer_names = []
        self._cache = None          # what the last forward kept for backward

    # -------------------------------------------------------------- computation
    def forward(self, x):
        """Compute the output for input `x`, caching what :meth:`backward` needs."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def backward(self, grad):
        """Given dL/d(output) of the last forward call, return dL/d(input).

        Gradients of the parameters are accumulated into their ``grad``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement backward")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # -------------------------------------------------------------- structure
    def register_buffer(self, name, value):
        """Add a persistent buffer (an ndarray saved in the state dict, not trained).

        The array itself is stored, not a copy: the module may update it in place (as
        batch norm does its running statistics).  It may be a NumPy or a CuPy array.
        """
        if not _xp.is_array(value):
            raise TypeError(f"buffer {name!r} must be a numpy.ndarray (or a CuPy array)")
        if name not in self._buffer_names:
            self._buffer_names.append(name)
        setattr(self, name, value)

    def add_module(self, name, module):
        """Add (or replace) the child module `name`, as PyTorch's ``add_module``.

        The same as assigning ``self.<name> = module``, for names that are not Python
        identifiers (``"conv-1"``) or are chosen at run time.  A new name goes after the
        existing children (in :meth:`named_children`, the state-dict keys and the
        parameter order); an existing child keeps its place.

        Parameters
        ----------
        name : str
            Not empty, without ``"."`` (the separator of qualified names) and not starting
            with ``"_"`` (bnfast's private attributes are not children).
        module : Module or None
            None records no child (``getattr(self, name)`` is then None), as PyTorch
            leaves a None module out of its children.

        Raises
        ------
        TypeError
            If `module` is not a `Module` or None, or `name` is not a str.
        KeyError
            If `name` is empty, contains ``"."``, starts with ``"_"``, or is an attribute
            of this module other than a child (or None), e.g. ``"weight"`` or
            ``"forward"``.

        Examples
        --------
        >>> from bnfast import nn
        >>> block = nn.Module()
        >>> block.add_module("conv-1", nn.Conv2d(1, 2, 3, rng=0))
        >>> block.add_module("bn-1", nn.BatchNorm2d(2))
        >>> list(block.state_dict())[:3]
        ['conv-1.weight', 'conv-1.bias', 'bn-1.weight']
        >>> block.add_module("training", nn.ReLU())
        Traceback (most recent call last):
            ...
        KeyError: "attribute 'training' already exists"
        """
        _check_child_name(name, module)
        if hasattr(self, name) and not isinstance(getattr(self, name), (Module, type(None))):
            raise KeyError(f"attribute '{name}' already exists")
        setattr(self, name, module)

    def named_children(self):
        """Yield ``(name, module)`` for the direct children, in assignment order."""
        for k, v in vars(self).items():
            if isinstance(v, Module) and not k.startswith("_"):
                yield k, v

    def children(self):
        return [m for _, m in self.named_children()]

    def named_modules(self, prefix=""):
        """Yield ``(qualified_name, module)`` for this module and all descendants."""
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(prefix + name if not prefix else f"{prefix}.{name}")

    def modules(self):
        return [m for _, m in self.named_modules()]

    def apply(self, fn):
        """Call ``fn(m)`` on every descendant and then on this module; return self.

        The order is PyTorch's: each child's subtree (children before their parent), in
        child order, then this module.  Typical uses are re-initialising a model (only
        layers with parameters have ``reset_parameters``; containers have none) and
        custom initialisation.

        Parameters
        ----------
        fn : callable
            Called with each module; its return value is ignored.

        Returns
        -------
        self : Module
            This module, so calls can be chained.

        Raises
        ------
        TypeError
            If `fn` is not callable.

        Examples
        --------
        >>> import numpy as np
        >>> from bnfast import nn
        >>> net = nn.Sequential(nn.Linear(4, 3, rng=0), nn.BatchNorm1d(3), nn.ReLU())
        >>> names = []
        >>> _ = net.apply(lambda m: names.append(type(m).__name__))
        >>> names
        ['Linear', 'BatchNorm1d', 'ReLU', 'Sequential']
        >>> rng = np.random.default_rng(1)
        >>> _ = net.apply(lambda m: m.reset_parameters(rng=rng)
        ...               if hasattr(m, "reset_parameters") else None)
        >>> def zero_biases(m):
        ...     if isinstance(m, nn.Linear) and m.bias is not None:
        ...         m.bias.data[...] = 0
        >>> net.apply(zero_biases)[0].bias.data
        array([0., 0., 0.], dtype=float32)
        """
        if not callable(fn):
            raise TypeError(f"apply: fn must be callable, got {type(fn).__name__}")
        for _, child in self.named_children():
            child.apply(fn)
        fn(self)
        return self

    def _own_parameters(self):
        for k, v in vars(self).items():
            if isinstance(v, Parameter) and not k.startswith("_"):
                yield k, v

    def _own_buffers(self):
        for k in self._buffer_names:
            yield k, getattr(self, k)

    def _own_state(self):
        """This module's own parameters, then its buffers: its part of the state dict."""
        yield from self._own_parameters()
        yield from self._own_buffers()

    def _named_members(self, members, prefix=""):
        """Yield ``(qualified_name, value)`` for every ``(name, value)`` of ``members(m)``,
        for each module m of :meth:`named_modules` in turn.

        The one walk behind the qualified names of parameters, buffers and state-dict
        keys: ``prefix`` + the module's name + ``"."`` + the member's name (PyTorch's).
        """
        for name, m in self.named_modules():
            dot = prefix + name + "." if name else prefix
            for k, v in members(m):
                yield dot + k, v

    def named_parameters(self):
        """Return ``[(qualified_name, Parameter)]`` in PyTorch's order."""
        return list(self._named_members(operator.methodcaller("_own_parameters")))

    def parameters(self):
        """Return the list of trained `Parameter` objects."""
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        """Return ``[(qualified_name, ndarray)]`` of the persistent buffers."""
        return list(self._named_members(operator.methodcaller("_own_buffers")))

    def buffers(self):
        return [b for _, b in self.named_buffers()]

    # -------------------------------------------------------------- modes
    def train(self, mode=True):
        """Set training mode on this module and every descendant; return self."""
        for m in self.modules():
            m.training = bool(mode)
        return self

    def eval(self):
        """Set eval mode (``train(False)``); return self."""
        return self.train(False)

    def freeze_bn_stats(self, frozen=True):
        """Make every batch-norm layer normalise with its running statistics.

        Unlike :meth:`eval`, this leaves ``training`` alone, so dropout and the parameter
        gradients behave as in training while the batch-norm statistics stay fixed (the
        usual set-up for fine-tuning with small batches).  Returns self.
        """
        for m in self.modules():
            m._freeze_stats(bool(frozen))
        return self

    def _freeze_stats(self, frozen):
        """What :meth:`freeze_bn_stats` does to this module: nothing here; layers that
        normalise with running statistics override it."""

    def unfreeze_bn_stats(self):
        """Undo :meth:`freeze_bn_stats`; return self."""
        return self.freeze_bn_stats(False)

    def zero_grad(self):
        """Reset every parameter's gradient to None."""
        for p in self.parameters():
            p.grad = None

    # -------------------------------------------------------------- state
    def state_dict(self, *, destination=None, prefix="", keep_vars=False):
        """Return a dict ``{name: ndarray copy}`` of parameters and buffers.

        The order and names are PyTorch's: for each module depth first, its parameters,
        then its buffers (e.g. ``0.weight``, ``1.running_mean``, ``1.num_batches_tracked``).

        Parameters
        ----------
        destination : dict, optional
            A mapping to add the entries to (and return); default a new dict.
        prefix : str, default ""
            Put in front of every key as it is (PyTorch's rule: pass ``"model."`` for
            keys ``"model.0.weight"``, ...), e.g. to save a sub-model under its name in
            a larger model's state dict.
        keep_vars : bool, default False
            Give the `Parameter` objects and the buffer arrays themselves instead of
            copies of their values (as PyTorch's ``keep_vars=True`` gives the
            parameters); writing into those arrays changes the model.

        Returns
        -------
        state_dict : dict
            `destination` if given.

        Raises
        ------
        TypeError
            If `prefix` is not a str.

        Examples
        --------
        >>> from bnfast import nn
        >>> net = nn.Sequential(nn.Linear(3, 2, rng=0), nn.BatchNorm1d(2))
        >>> list(net.state_dict())
        ['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var',
         '1.num_batches_tracked']
        >>> list(net[1].state_dict(prefix="1."))[:2]
        ['1.weight', '1.bias']
        >>> net.state_dict(keep_vars=True)["0.weight"] is net[0].weight
        True
        """
        if not isinstance(prefix, str):
            raise TypeError(f"state_dict: prefix must be a str, got {type(prefix).__name__}")
        out = {} if destination is None else destination
        for k, v in self._named_members(operator.methodcaller("_own_state"), prefix):
            out[k] = v if keep_vars else _array_of(v).copy()
        return out

    def _state_targets(self):
        """``{name: ndarray}``: the model's own parameter and buffer arrays (no copies),
        in state-dict order."""
        return {k: _array_of(v)
                for k, v in self._named_members(operator.methodcaller("_own_state"))}

    def load_state_dict(self, state_dict, strict=True):
        """Copy values from `state_dict` into the parameters and buffers, in place.

        Every value is checked before any is written: when this raises, the model is
        unchanged.

        Parameters
        ----------
        state_dict : mapping of str to array_like
            As returned by :meth:`state_dict`, loaded from ``.npz``, or a PyTorch model's
            ``state_dict()`` (tensors are converted with ``.detach().cpu().numpy()``).
            Values are cast to each array's dtype (``same_kind`` casting; an integer
            counter accepts integers).
        strict : bool, default True
            Require the keys to match exactly; with False, load the keys both have and
            return the others.

        Returns
        -------
        IncompatibleKeys
            A named tuple ``(missing_keys, unexpected_keys)``, as PyTorch's: lists of the
            keys of this model absent from `state_dict`, and of the keys of `state_dict`
            that this model does not have (both empty when `strict`).  It unpacks as a
            pair.

        Raises
        ------
        StateDictError
            (a `ValueError`) With `strict`, if keys are missing or unexpected, and, either
            way, if a value has the wrong shape.  The message is PyTorch's
            ``Error(s) in loading state_dict for <class>:`` followed by one line each for
            the missing keys, the unexpected keys and every shape mismatch.
        TypeError
            If a value cannot be cast safely (e.g. a float into ``num_batches_tracked``).

        Examples
        --------
        >>> import numpy as np
        >>> from bnfast import nn
        >>> net = nn.Sequential(nn.Linear(3, 2, rng=0), nn.BatchNorm1d(2))
        >>> other = nn.Sequential(nn.Linear(3, 2, rng=1), nn.BatchNorm1d(2))
        >>> other.load_state_dict(net.state_dict())
        <All keys matched successfully>
        >>> sd = net.state_dict()
        >>> del sd["1.running_var"]
        >>> sd["2.weight"] = np.zeros(2)
        >>> other.load_state_dict(sd)
        Traceback (most recent call last):
            ...
        bnfast.nn.StateDictError: Error(s) in loading state_dict for Sequential:
            Missing key(s) in state_dict: "1.running_var".
            Unexpected key(s) in state_dict: "2.weight".
        >>> other.load_state_dict(sd, strict=False)
        _IncompatibleKeys(missing_keys=['1.running_var'], unexpected_keys=['2.weight'])
        """
        targets = self._state_targets()
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict.keys() if k not in targets]
        errors = []
        if strict and missing:
            errors.append("Missing key(s) in state_dict: {}. ".format(
                ", ".join(f'"{k}"' for k in missing)))
        if strict and unexpected:
            errors.append("Unexpected key(s) in state_dict: {}. ".format(
                ", ".join(f'"{k}"' for k in unexpected)))
        # validate everything before writing anything
        values, cast_errors = {}, []
        for k, dst in targets.items():
            if k not in state_dict:
                continue
            v = state_dict[k]
            if isinstance(v, Parameter):                        # from keep_vars=True
                v = v.data
            elif hasattr(v, "detach") and hasattr(v, "numpy"):  # a torch.Tensor
                v = v.detach().cpu().numpy()
            v = _xp.asarray(v)
            if v.shape != dst.shape:
                errors.append(
                    f"size mismatch for {k}: copying a param with shape {v.shape} from "
                    f"checkpoint, the shape in current model is {dst.shape}.")
            elif not np.can_cast(v.dtype, dst.dtype, casting="same_kind"):
                cast_errors.append(
                    f"load_state_dict: cannot cast {k!r} from {v.dtype} to {dst.dtype}")
            values[k] = v
        if errors:
            raise StateDictError("Error(s) in loading state_dict for {}:\n\t{}".format(
                type(self).__name__, "\n\t".join(errors)))
        if cast_errors:
            raise TypeError("; ".join(cast_errors))
        for k, v in values.items():
            dst = targets[k]
            _xp.array_module(dst).copyto(dst, _xp.to_device(v, _xp.device_of(dst)),
                                         casting="same_kind")
        return _IncompatibleKeys(missing, unexpected)

    def save(self, path):
        """Save the state dict to an ``.npz`` file (see :func:`bnfast.nn.save`).

        Parameters
        ----------
        path : str or os.PathLike
            ``.npz`` is appended unless the name ends with it.
        """
        save(self, path)

    def load(self, path, strict=True):
        """Load the state dict from an ``.npz`` file (see :func:`bnfast.nn.load`, which
        raises :class:`bnfast.nn.StateDictError` for a file that does not fit).

        Parameters
        ----------
        path : str or os.PathLike
            As given to :meth:`save`.
        strict : bool, default True
            Require the file's keys to be exactly the model's.

        Returns
        -------
        self : Module
            This module, updated in place.
        """
        return load(self, path, strict=strict)

    def to(self, device=None, dtype=None):
        """Move the parameters, gradients and buffers to `device` and/or convert the
        floating-point ones to `dtype`; return self.

        As PyTorch's ``Module.to``: ``to("cuda")``, ``to("cpu")``, ``to(np.float64)``
        (a dtype in the first place is taken as `dtype`), ``to("cuda", np.float32)``.
        Arrays already on `device` stay as they are (``to("cpu")`` of a NumPy model
        changes nothing); a dtype conversion makes every parameter and floating-point
        buffer a new array (arrays the model was built from are not changed) and drops
        the gradients.  The `Parameter` objects stay the same, so an optimizer built
        before keeps them; create optimizers after converting all the same, as their
        state (momentum, Adam's averages) stays where and what it was.

        Parameters
        ----------
        device : str, optional
            ``"cpu"`` (NumPy arrays), ``"cuda"`` (CuPy arrays on CuPy's current GPU) or
            ``"cuda:N"``; None keeps each array where it is.
        dtype : float32 or float64, optional
            The dtype of the parameters and floating-point buffers (integer buffers such
            as ``num_batches_tracked`` keep theirs); None keeps it.

        Returns
        -------
        self : Module
            This module, moved and converted in place.

        Raises
        ------
        TypeError
            If `dtype` is not float32 or float64 (the only dtypes the layers compute in),
            or `device` is neither a device name nor a dtype.
        ValueError
            If `device` is a str that names no device (see :func:`bnfast._xp.parse_device`).
        ImportError
            For a ``"cuda"`` device without CuPy (``pip install "bnfast[gpu]"``).
        RuntimeError
            For a ``"cuda"`` device when CuPy sees no GPU (or not GPU N).

        Examples
        --------
        >>> import numpy as np
        >>> from bnfast import nn
        >>> net = nn.Sequential(nn.Linear(3, 2, rng=0), nn.BatchNorm1d(2))
        >>> w = net[0].weight.data
        >>> net.to("cpu") is net, net[0].weight.data is w      # already there
        (True, True)
        >>> net.to(np.float64)[1].running_mean.dtype
        dtype('float64')
        >>> net.to("cpu", dtype=np.float32)[0].weight.dtype
        dtype('float32')
        """
        if dtype is None and device is not None and _is_dtype_like(device):
            device, dtype = None, device
        dt = None if dtype is None else _check_dtype(dtype)
        if device is not None:
            _xp.check_device(device)        # an unknown or absent device: before any change
        for m in self.modules():
            for _, p in m._own_parameters():
                if dt is not None:
                    p.data = p.data.astype(dt)
                    p.grad = None
                if device is not None:
                    p.data = _xp.to_device(p.data, device)
                    if p.grad is not None:
                        p.grad = _xp.to_device(p.grad, device)
            for k, b in m._own_buffers():
                new = b.astype(dt) if dt is not None and b.dtype.kind == "f" else b
                if device is not None:
                    new = _xp.to_device(new, device)
                if new is not b:
                    setattr(m, k, new)
            if dt is not None and hasattr(m, "dtype"):
                m.dtype = dt
        return self

    def cpu(self):
        """Move the parameters, gradients and buffers to the CPU (NumPy); return self.

        ``to("cpu")``, as PyTorch's ``.cpu()``; see :meth:`to`.

        Returns
        -------
        self : Module
            This module, moved in place.
        """
        return self.to("cpu")

    def cuda(self, device=None):
        """Move the parameters, gradients and buffers to a GPU (CuPy); return self.

        ``to("cuda")`` or ``to(f"cuda:{device}")``, as PyTorch's ``.cuda()``; see
        :meth:`to`.

        Parameters
        ----------
        device : int, optional
            The GPU's number; default CuPy's current GPU.

        Returns
        -------
        self : Module
            This module, moved in place.

        Raises
        ------
        ImportError
            Without CuPy.
        RuntimeError
            When CuPy sees no GPU (or not GPU number `device`).
        """
        return self.to("cuda" if device is None else f"cuda:{int(device)}")

    def float(self):
        """Convert the floating-point parameters and buffers to float32; return self.

        ``to(np.float32)``, as PyTorch's ``.float()``; see :meth:`to`.

        Returns
        -------
        self : Module
            This module, converted in place.

        Examples
        --------
        >>> import numpy as np
        >>> from bnfast import nn
        >>> net = nn.Sequential(nn.Linear(3, 2, dtype=np.float64, rng=0), nn.BatchNorm1d(2))
        >>> net.float()[0].weight.dtype, net[1].num_batches_tracked.dtype
        (dtype('float32'), dtype('int64'))
        """
        return self.to(np.float32)

    def double(self):
        """Convert the floating-point parameters and buffers to float64; return self.

        ``to(np.float64)``, as PyTorch's ``.double()``; see :meth:`to`.

        Returns
        -------
        self : Module
            This module, converted in place.

        Examples
        --------
        >>> import numpy as np
        >>> from bnfast import nn
        >>> net = nn.Sequential(nn.Linear(3, 2, rng=0), nn.BatchNorm1d(2)).double()
        >>> net[1].running_mean.dtype, net(np.ones((4, 3))).dtype
        (dtype('float64'), dtype('float64'))
        """
        return self.to(np.float64)

    def __getstate__(self):
        # what the last forward kept for backward is not copied (nor pickled)
        state = dict(self.__dict__)
        if state.get("_cache") is not None:
            state["_cache"] = None
        return state

    def copy(self):
        """Return a deep copy of this module (parameters, buffers, modes), without the
        arrays cached by the last forward pass."""
        return copy.deepcopy(self)

    # -------------------------------------------------------------- printing
    def extra_repr(self):
        return ""

    def __repr__(self):
        kids = list(self.named_children())
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not kids:
            return head + ")"
        lines = [head]
        for name, m in kids:
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return "\n".join(lines) + "\n)"


# ---------------------------------------------------------------------------- files
# nn.save and nn.load, the file form of Module.state_dict and Module.load_state_dict

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
    keeps its dtype, so :func:`load` restores the model bit for bit.  Arrays on a GPU are
    copied to the host first; the file is the same whatever the model's device.

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
    np.savez(_npz_path(path), **{k: _xp.asnumpy(v) for k, v in state.items()})


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
        The model to load into; its parameters and buffers are overwritten in place, on
        whatever device they are.
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


class Identity(Module):
    """Return the input unchanged (and the gradient unchanged in ``backward``).

    Used as a placeholder, e.g. where :func:`~bnfast.nn.fold_batchnorm` removes a
    batch-norm layer.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> x = np.arange(3.0)
    >>> nn.Identity()(x) is x
    True
    >>> nn.Identity().backward(x) is x
    True
    """

    def forward(self, x):
        return x

    def backward(self, grad):
        return grad


class _ListContainer(Module):
    """Children kept in a list, each with a name (`Sequential`, `ModuleList`).

    The children are not attributes, but ``getattr(c, name)`` and ``setattr(c, name, m)``
    reach them by name, as in PyTorch (so code that walks ``named_children()`` and
    replaces a child with ``setattr`` works on every module).
    """

    def __init__(self):
        super().__init__()
        self._names = []
        self._layers = []

    def named_children(self):
        yield from zip(self._names, self._layers)

    def __len__(self):
        return len(self._layers)

    def __iter__(self):
        return iter(self._layers)

    def __getattr__(self, name):       # only called when ordinary lookup fails
        names = self.__dict__.get("_names")
        if names is not None and name in names:
            return self._layers[names.index(name)]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        names = self.__dict__.get("_names")
        if names is not None and name in names:
            self._set(names.index(name), value)
        else:
            super().__setattr__(name, value)

    def _module(self, m):
        if not isinstance(m, Module):
            raise TypeError(f"{type(self).__name__}: {m!r} is not a Module")
        return m

    def _set(self, i, m):
        """Replace the child at position `i` (keeping its name)."""
        self._layers[i] = self._module(m)
        self._changed()

    def _changed(self):
        """Called after the children changed."""


class Sequential(_ListContainer):
    """A chain of modules; children are named ``"0"``, ``"1"``, ... as in PyTorch.

    Parameters
    ----------
    *layers : Module, or one dict of str to Module
        The modules, applied in order; or, as PyTorch's ``Sequential(OrderedDict(...))``,
        one dict whose keys name them (the names then appear in the state-dict keys).
        :meth:`add_module` appends a module under a name.

    Notes
    -----
    A `Flatten` layer without an explicit ``channels_last`` takes the layout of the
    layers before it in the chain (see :class:`~bnfast.nn.Flatten`), so that a
    channels-last network flattens in PyTorch's ``(C, H, W)`` order and loads the same
    state dict as its channels-first twin.

    Indexing with an int gives a layer; a slice gives a new `Sequential` of the same
    layer objects under their names, as in PyTorch.

    Raises
    ------
    TypeError
        If a layer (given here, assigned by index or appended) is not a `Module`.
    KeyError
        If a name in the dict is not a valid module name (see :meth:`add_module`).
    ValueError
        If one `Flatten` instance would follow channels-last layers here and
        channels-first layers in another `Sequential`.
    RuntimeError
        From ``backward``, if a layer other than the first returns no input gradient
        (``needs_input_grad=False`` set on an inner layer).

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> net = nn.Sequential(nn.Linear(4, 3, rng=0), nn.BatchNorm1d(3), nn.ReLU())
    >>> [name for name, _ in net.named_parameters()]
    ['0.weight', '0.bias', '1.weight', '1.bias']
    >>> net(np.ones((2, 4), np.float32)).shape
    (2, 3)
    >>> named = nn.Sequential({"fc": nn.Linear(4, 3, rng=0), "bn": nn.BatchNorm1d(3)})
    >>> list(named.state_dict())[:3], named.bn is named[1]
    (['fc.weight', 'fc.bias', 'bn.weight'], True)
    """

    def __init__(self, *layers):
        super().__init__()
        named = len(layers) == 1 and isinstance(layers[0], dict)
        items = list(layers[0].items()) if named else [(str(i), m)
                                                       for i, m in enumerate(layers)]
        for name, m in items:
            if not isinstance(m, Module):
                raise TypeError(f"Sequential: layer {name} is not a Module: {m!r}")
            if named:
                _check_child_name(name, m)
        self._names = [name for name, _ in items]
        self._layers = [m for _, m in items]
        _layout_after(self, None)

    def _changed(self):
        _layout_after(self, None)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Sequential(dict(zip(self._names[i], self._layers[i])))
        return self._layers[i]

    def __setitem__(self, i, m):
        self._set(i, m)

    def append(self, m):
        """Add a module at the end, named by its position; return self."""
        self.add_module(str(len(self)), m)
        return self

    def add_module(self, name, module):
        """Append `module` under `name`, or replace the layer named `name` in place.

        As PyTorch's ``Sequential.add_module``: the name is used in the state-dict keys
        and as an attribute (``net.<name>``); ``net[i]`` still indexes by position.

        Parameters
        ----------
        name : str
            As for :meth:`Module.add_module`.
        module : Module
            The layer to append, or to put in place of the layer named `name`.

        Raises
        ------
        TypeError
            If `module` is not a `Module`, or `name` is not a str.
        KeyError
            If `name` is not a valid module name, or an attribute of the `Sequential`.

        Examples
        --------
        >>> from bnfast import nn
        >>> net = nn.Sequential(nn.Linear(4, 3, rng=0))
        >>> net.add_module("bn", nn.BatchNorm1d(3))
        >>> [name for name, _ in net.named_children()], net.bn is net[1]
        (['0', 'bn'], True)
        """
        _check_child_name(name, module)
        if name in self._names:
            self._set(self._names.index(name), module)
            return
        if hasattr(self, name):
            raise KeyError(f"attribute '{name}' already exists")
        self._layers.append(self._module(module))
        self._names.append(name)
        self._changed()

    def forward(self, x):
        for m in self._layers:
            x = m.forward(x)
        return x

    def backward(self, grad):
        layers = self._layers
        for i in range(len(layers) - 1, -1, -1):
            grad = layers[i].backward(grad)
            if grad is None and i:
                raise RuntimeError(
                    f"Sequential: layer {i} ({type(layers[i]).__name__}) returned no input "
                    f"gradient; needs_input_grad=False is only meaningful on the first layer")
        return grad


class ModuleList(_ListContainer):
    """A list of modules whose parameters belong to the module holding it, as PyTorch's.

    The children are named ``"0"``, ``"1"``, ... by position (renumbered after an
    insertion or deletion), so state-dict keys match PyTorch's ``ModuleList``.  A
    `ModuleList` is a container, not a layer: it has no ``forward`` / ``backward``; the
    module holding it calls its layers (and their ``backward`` in reverse order).

    Parameters
    ----------
    modules : iterable of Module, optional
        The initial modules, named ``"0"``, ``"1"``, ... in order; default none.

    Raises
    ------
    TypeError
        If an item (given here, assigned, appended or inserted) is not a `Module`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> class MLP(nn.Module):
    ...     def __init__(self, sizes):
    ...         super().__init__()
    ...         self.layers = nn.ModuleList(nn.Linear(a, b, rng=0)
    ...                                     for a, b in zip(sizes, sizes[1:]))
    ...     def forward(self, x):
    ...         for layer in self.layers:
    ...             x = layer(x)
    ...         return x
    ...     def backward(self, grad):
    ...         for layer in reversed(self.layers):
    ...             grad = layer.backward(grad)
    ...         return grad
    >>> net = MLP([4, 8, 2])
    >>> [name for name, _ in net.named_parameters()]
    ['layers.0.weight', 'layers.0.bias', 'layers.1.weight', 'layers.1.bias']
    >>> net(np.ones((3, 4), np.float32)).shape
    (3, 2)
    >>> net.layers.append(nn.ReLU())
    ModuleList(
      (0): Linear(in_features=4, out_features=8, bias=True)
      (1): Linear(in_features=8, out_features=2, bias=True)
      (2): ReLU()
    )
    """

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def _renumber(self):
        self._names = [str(i) for i in range(len(self._layers))]

    def __reversed__(self):
        return reversed(self._layers)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ModuleList(self._layers[i])
        return self._layers[i]

    def __setitem__(self, i, m):
        self._set(i, m)

    def __delitem__(self, i):
        del self._layers[i]
        self._renumber()

    def __iadd__(self, modules):
        return self.extend(modules)

    def __add__(self, other):
        return ModuleList([*self._layers, *other])

    def append(self, module):
        """Add `module` at the end; return self."""
        self._layers.append(self._module(module))
        self._renumber()
        return self

    def extend(self, modules):
        """Add the modules of an iterable at the end; return self."""
        new = [self._module(m) for m in modules]
        self._layers.extend(new)
        self._renumber()
        return self

    def insert(self, index, module):
        """Insert `module` before position `index` (as ``list.insert``)."""
        self._layers.insert(index, self._module(module))
        self._renumber()

    def add_module(self, name, module):
        """Replace the module at position `name` (a str), or append it if `name` is
        ``str(len(self))``; other names raise `KeyError`.

        Parameters
        ----------
        name : str
            The position to replace, ``"0"`` to ``str(len(self) - 1)``, or
            ``str(len(self))`` to append.
        module : Module
            The module to store there.

        Raises
        ------
        TypeError
            If `module` is not a `Module`, or `name` is not a str.
        KeyError
            If `name` is not a position of the list or the next one.

        Examples
        --------
        >>> from bnfast import nn
        >>> layers = nn.ModuleList([nn.ReLU()])
        >>> layers.add_module("1", nn.Tanh())
        >>> len(layers)
        2
        """
        _check_child_name(name, module)
        if name in self._names:
            self._set(self._names.index(name), module)
        elif name == str(len(self)):
            self.append(module)
        else:
            raise KeyError(f"ModuleList children are named by position '0' to "
                           f"'{len(self)}', got: {name}")


def _layout_after(module, layout):
    """The layout of `module`'s output -- True channels-last, False channels-first, None
    unknown or flat -- given its input's, telling the `Flatten` layers met along
    `Sequential` chains the layout of their input."""
    if isinstance(module, Sequential):
        for m in module._layers:
            layout = _layout_after(m, layout)
        return layout
    if hasattr(module, "_resolve_layout"):              # a Flatten
        return module._resolve_layout(layout)
    for m in module.modules():      # a layer or a block: its last layout-aware part decides
        if hasattr(m, "_resolve_layout"):
            layout = None
        elif isinstance(getattr(m, "channels_last", None), bool):
            layout = m.channels_last
    return layout
