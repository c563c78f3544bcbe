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
import copy
import numbers

import numpy as np

__all__ = ["Parameter", "Module", "Sequential", "Identity"]

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
    """Check that `x` is a float32/float64 ndarray; return it (no copy)."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{who} expects a float32 or float64 array, got dtype {x.dtype}")
    return x


def _input_like(x, dtype, who):
    """Check that `x` is an ndarray of exactly `dtype` (the module's parameter dtype).

    The error suggests only conversions that work: the input to the parameters' dtype,
    and, for a float input of the other supported precision, the model to the input's.
    """
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype != dtype:
        hint = f"convert the input (x.astype(np.{dtype}))"
        if x.dtype in _FLOAT_DTYPES:
            hint += f" or the model (model.to(np.{x.dtype}))"
        raise TypeError(f"{who} has {dtype} parameters but got a {x.dtype} input; {hint}")
    return x


class Parameter:
    """A trained array and its gradient.

    Parameters
    ----------
    data : ndarray
        The value; used and updated in place.
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
        self.data = np.asarray(data)
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


class Module:
    """Base class of every layer and network.

    Subclasses call ``super().__init__()`` first, assign parameters, buffers (via
    :meth:`register_buffer`) and child modules as attributes, and implement
    :meth:`forward` and :meth:`backward`.

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
    ...         self._x = x
    ...         return x * self.weight.data
    ...     def backward(self, grad):
    ...         self.weight.accumulate((grad * self._x).sum(axis=0))
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
        batch norm does its running statistics).
        """
        if not isinstance(value, np.ndarray):
            raise TypeError(f"buffer {name!r} must be a numpy.ndarray")
        if name not in self._buffer_names:
            self._buffer_names.append(name)
        setattr(self, name, value)

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

    def _own_parameters(self):
        for k, v in vars(self).items():
            if isinstance(v, Parameter) and not k.startswith("_"):
                yield k, v

    def _own_buffers(self):
        for k in self._buffer_names:
            yield k, getattr(self, k)

    def named_parameters(self):
        """Return ``[(qualified_name, Parameter)]`` in PyTorch's order."""
        out = []
        for prefix, m in self.named_modules():
            dot = prefix + "." if prefix else ""
            out.extend((dot + k, p) for k, p in m._own_parameters())
        return out

    def parameters(self):
        """Return the list of trained `Parameter` objects."""
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        """Return ``[(qualified_name, ndarray)]`` of the persistent buffers."""
        out = []
        for prefix, m in self.named_modules():
            dot = prefix + "." if prefix else ""
            out.extend((dot + k, b) for k, b in m._own_buffers())
        return out

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
            if hasattr(m, "frozen") and hasattr(m, "running_mean"):
                m.frozen = bool(frozen)
        return self

    def unfreeze_bn_stats(self):
        """Undo :meth:`freeze_bn_stats`; return self."""
        return self.freeze_bn_stats(False)

    def zero_grad(self):
        """Reset every parameter's gradient to None."""
        for p in self.parameters():
            p.grad = None

    # -------------------------------------------------------------- state
    def state_dict(self):
        """Return a dict ``{name: ndarray copy}`` of parameters and buffers.

        The order and names are PyTorch's: for each module depth first, its parameters,
        then its buffers (e.g. ``0.weight``, ``1.running_mean``, ``1.num_batches_tracked``).
        """
        out = {}
        for prefix, m in self.named_modules():
            dot = prefix + "." if prefix else ""
            for k, p in m._own_parameters():
                out[dot + k] = p.data.copy()
            for k, b in m._own_buffers():
                out[dot + k] = b.copy()
        return out

    def _state_targets(self):
        """``{name: ndarray}``: the model's own parameter and buffer arrays (no copies),
        in state-dict order."""
        targets = {}
        for prefix, m in self.named_modules():
            dot = prefix + "." if prefix else ""
            for k, p in m._own_parameters():
                targets[dot + k] = p.data
            for k, b in m._own_buffers():
                targets[dot + k] = b
        return targets

    def load_state_dict(self, state_dict, strict=True):
        """Copy values from `state_dict` into the parameters and buffers, in place.

        Parameters
        ----------
        state_dict : mapping of str to array_like
            As returned by :meth:`state_dict`, loaded from ``.npz``, or a PyTorch model's
            ``state_dict()`` (tensors are converted with ``.detach().cpu().numpy()``).
            Values are cast to each array's dtype (``same_kind`` casting; an integer
            counter accepts integers).
        strict : bool, default True
            Require the keys to match exactly.

        Returns
        -------
        missing, unexpected : list of str
            Keys of this model absent from `state_dict`, and keys of `state_dict` that this
            model does not have (both empty when `strict`).

        Raises
        ------
        KeyError
            With `strict`, if keys are missing or unexpected.
        ValueError
            If a value has the wrong shape.
        TypeError
            If a value cannot be cast safely (e.g. a float into ``num_batches_tracked``).
        """
        targets = self._state_targets()
        keys = list(state_dict.keys())
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in keys if k not in targets]
        if strict and (missing or unexpected):
            raise KeyError(
                f"load_state_dict for {type(self).__name__}: missing keys {missing}, "
                f"unexpected keys {unexpected}")
        # validate everything before writing anything
        values = {}
        for k, dst in targets.items():
            if k not in state_dict:
                continue
            v = state_dict[k]
            if hasattr(v, "detach") and hasattr(v, "numpy"):  # a torch.Tensor
                v = v.detach().cpu().numpy()
            v = np.asarray(v)
            if v.shape != dst.shape:
                raise ValueError(
                    f"load_state_dict: {k!r} has shape {v.shape} but the model expects "
                    f"{dst.shape}")
            if not np.can_cast(v.dtype, dst.dtype, casting="same_kind"):
                raise TypeError(
                    f"load_state_dict: cannot cast {k!r} from {v.dtype} to {dst.dtype}")
            values[k] = v
        for k, v in values.items():
            np.copyto(targets[k], v, casting="same_kind")
        return missing, unexpected

    def to(self, dtype):
        """Convert the floating-point parameters and buffers to `dtype`; return self.

        Create optimizers after converting (their state is kept per parameter).  Every
        parameter and floating-point buffer becomes a new array (arrays the model was
        built from are not changed).

        Raises
        ------
        TypeError
            If `dtype` is not float32 or float64 (the only dtypes the layers compute in).
        """
        dt = _check_dtype(dtype)
        for m in self.modules():
            for _, p in m._own_parameters():
                p.data = p.data.astype(dt)
                p.grad = None
            for k, b in m._own_buffers():
                if b.dtype.kind == "f":
                    setattr(m, k, b.astype(dt))
            if hasattr(m, "dtype"):
                m.dtype = dt
        return self

    # attributes holding what the last forward cached for backward: not copied
    _CACHE_ATTRS = ("_x", "_y", "_cache", "_mask", "_shape", "_diff")

    def __getstate__(self):
        state = dict(self.__dict__)
        for k in self._CACHE_ATTRS:
            if k in state:
                state[k] = None
        return state

    def copy(self):
        """Return a deep copy of this module (parameters, buffers, modes), without the
        arrays cached by the last forward pass."""
        return copy.deepcopy(self)

    def save(self, path):
        """Save the state dict to an ``.npz`` file (see :func:`bnfast.nn.save`)."""
        from .utils import save
        save(self, path)

    def load(self, path, strict=True):
        """Load the state dict from an ``.npz`` file (see :func:`bnfast.nn.load`, which
        raises :class:`bnfast.nn.StateDictError` for a file that does not fit)."""
        from .utils import load
        return load(self, path, strict=strict)

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


class Sequential(Module):
    """A chain of modules; children are named ``"0"``, ``"1"``, ... as in PyTorch.

    Parameters
    ----------
    *layers : Module
        The modules, applied in order.

    Notes
    -----
    A `Flatten` layer without an explicit ``channels_last`` takes the layout of the
    layers before it in the chain (see :class:`~bnfast.nn.Flatten`), so that a
    channels-last network flattens in PyTorch's ``(C, H, W)`` order and loads the same
    state dict as its channels-first twin.

    Raises
    ------
    TypeError
        If a layer (given here, assigned by index or appended) is not a `Module`.
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
    """

    def __init__(self, *layers):
        super().__init__()
        for i, m in enumerate(layers):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential: layer {i} is not a Module: {m!r}")
        self._layers = list(layers)
        _layout_after(self, None)

    def named_children(self):
        for i, m in enumerate(self._layers):
            yield str(i), m

    def __len__(self):
        return len(self._layers)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Sequential(*self._layers[i])
        return self._layers[i]

    def __setitem__(self, i, m):
        if not isinstance(m, Module):
            raise TypeError(f"Sequential: {m!r} is not a Module")
        self._layers[i] = m
        _layout_after(self, None)

    def __iter__(self):
        return iter(self._layers)

    def append(self, m):
        """Add a module at the end; return self."""
        if not isinstance(m, Module):
            raise TypeError(f"Sequential: {m!r} is not a Module")
        self._layers.append(m)
        _layout_after(self, None)
        return self

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
