"""The array module of a computation: NumPy for NumPy arrays, CuPy for CuPy (GPU) arrays.

`bnfast.nn`, `bnfast.optim` and `bnfast.train` have one body for both kinds of array, as
Chainer does: wherever they create or compute arrays they take ``xp = array_module(...)``
of their inputs (or parameters) and call ``xp.zeros``, ``xp.maximum``, ... instead of
``np.zeros``, ``np.maximum``.  CuPy arrays are recognised by the module their type is
defined in, so NumPy-only code never imports CuPy; CuPy is imported the first time a CuPy
array is met or a ``"cuda"`` device is asked for.

Devices are named as in PyTorch: ``"cpu"`` (NumPy arrays), ``"cuda"`` (CuPy's current
device) and ``"cuda:N"`` (GPU number N).

>>> import numpy as np
>>> from bnfast import _xp
>>> _xp.array_module(np.zeros(3)) is np
True
>>> _xp.device_of(np.zeros(3))
'cpu'
>>> a = np.ones(2)
>>> _xp.to_device(a, "cpu") is a              # already there: the array itself
True
"""
import re

import numpy as np

__all__ = ["array_module", "is_cupy", "is_array", "asarray", "asnumpy", "device_of",
           "parse_device", "check_device", "to_device", "as_strided"]

_DEVICE_RE = re.compile(r"(cpu|cuda)(?::(\d+))?\Z")

_GPU_HINT = ('pip install "bnfast[gpu]" (CuPy for CUDA 13), or cupy-cuda12x for CUDA 12 '
             'drivers')


def is_cupy(a):
    """Whether `a` is a CuPy array (or another object of a type defined by CuPy).

    Decided from the type's module, without importing CuPy.

    Parameters
    ----------
    a : object
        Any object.

    Returns
    -------
    bool
        True when ``type(a)`` is defined in the ``cupy`` package.
    """
    return type(a).__module__.split(".", 1)[0] == "cupy"


def is_array(a):
    """Whether `a` is a NumPy or a CuPy ndarray.

    Parameters
    ----------
    a : object
        Any object.

    Returns
    -------
    bool
        True for a `numpy.ndarray` (or subclass) or a CuPy array.
    """
    return isinstance(a, np.ndarray) or is_cupy(a)


def _cupy():
    """Import and return CuPy, or raise ImportError saying how to install it."""
    try:
        import cupy
    except ImportError as exc:
        raise ImportError(f"the GPU (device 'cuda') needs CuPy, which is not installed "
                          f"({exc}); {_GPU_HINT}") from exc
    return cupy


def array_module(*arrays):
    """The array module for `arrays`: `cupy` if any of them is a CuPy array, else `numpy`.

    Parameters
    ----------
    *arrays : object
        Arrays (or anything else: None, scalars and lists count as NumPy).

    Returns
    -------
    module
        `numpy`, or `cupy` (imported now) when an argument is a CuPy array.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast._xp import array_module
    >>> array_module(np.ones(2), None, 3.0) is np
    True
    >>> array_module() is np
    True
    """
    for a in arrays:
        if is_cupy(a):
            return _cupy()
    return np


def asarray(a):
    """`a` itself when it is a NumPy or CuPy ndarray, else ``numpy.asarray(a)``.

    Parameters
    ----------
    a : array_like
        An array, or anything NumPy converts to one (lists, scalars).

    Returns
    -------
    ndarray
        A NumPy or CuPy array; never a copy of an array.
    """
    return a if is_array(a) else np.asarray(a)


def asnumpy(a):
    """`a` as a NumPy array: a CuPy array is copied to the host, anything else goes
    through ``numpy.asarray`` (no copy of a NumPy array).

    Parameters
    ----------
    a : array_like
        A NumPy or CuPy array, or anything NumPy converts.

    Returns
    -------
    numpy.ndarray
        The values on the host.
    """
    return a.get() if is_cupy(a) else np.asarray(a)


def device_of(a):
    """The device `a` lives on: ``"cpu"`` for NumPy arrays, ``"cuda:N"`` for CuPy's.

    Parameters
    ----------
    a : ndarray
        A NumPy or CuPy array.

    Returns
    -------
    str
        ``"cpu"`` or ``"cuda:N"`` with N the GPU's number.
    """
    return f"cuda:{a.device.id}" if is_cupy(a) else "cpu"


def parse_device(device):
    """Check a device name; return ``(kind, index)``.

    Parameters
    ----------
    device : str
        ``"cpu"``, ``"cuda"`` (CuPy's current GPU) or ``"cuda:N"``.

    Returns
    -------
    kind : {'cpu', 'cuda'}
        The kind of device.
    index : int or None
        N of ``"cuda:N"``; None for ``"cpu"`` and ``"cuda"``.

    Raises
    ------
    ValueError
        If `device` is not one of those names (``"cpu:0"`` is not one either).
    TypeError
        If `device` is not a str.

    Examples
    --------
    >>> from bnfast._xp import parse_device
    >>> parse_device("cpu"), parse_device("cuda"), parse_device("cuda:1")
    (('cpu', None), ('cuda', None), ('cuda', 1))
    >>> parse_device("gpu")
    Traceback (most recent call last):
        ...
    ValueError: unknown device 'gpu': expected 'cpu', 'cuda' or 'cuda:N'
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a str ('cpu', 'cuda' or 'cuda:N'), got "
                        f"{type(device).__name__}")
    m = _DEVICE_RE.match(device.strip())
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return m.group(1), None if m.group(2) is None else int(m.group(2))


def _gpu(cp, index):
    """The `cupy.cuda.Device` for `index` (None: the current one), checked to exist."""
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:                       # no driver, no device, broken runtime
        raise RuntimeError(f"no CUDA device is available to CuPy ({exc})") from exc
    if count < 1:
        raise RuntimeError("no CUDA device is available to CuPy")
    if index is not None and index >= count:
        raise RuntimeError(f"device 'cuda:{index}' does not exist: CuPy sees {count} GPU"
                           f"{'s' if count > 1 else ''} (cuda:0 to cuda:{count - 1})")
    return cp.cuda.Device(index) if index is not None else cp.cuda.Device()


def check_device(device):
    """Check that `device` names a device that is there, before anything is moved.

    Parameters
    ----------
    device : str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises
    ------
    ValueError
        If `device` is not a device name (see :func:`parse_device`).
    ImportError
        For a CUDA device when CuPy is not installed.
    RuntimeError
        For a CUDA device when CuPy sees no GPU, or not GPU number N.
    """
    kind, index = parse_device(device)
    if kind == "cuda":
        _gpu(_cupy(), index)


def to_device(a, device):
    """`a` on `device`: itself when it is already there, else a copy there.

    Parameters
    ----------
    a : array_like
        A NumPy or CuPy array (or anything NumPy converts).
    device : str
        ``"cpu"``, ``"cuda"`` (CuPy's current GPU) or ``"cuda:N"``.

    Returns
    -------
    ndarray
        A NumPy array for ``"cpu"``, a CuPy array on that GPU for ``"cuda..."``; the same
        dtype and values.

    Raises
    ------
    ValueError
        If `device` is not a device name (see :func:`parse_device`).
    ImportError
        For a CUDA device when CuPy is not installed (the message says how to install it).
    RuntimeError
        For a CUDA device when CuPy sees no GPU, or not GPU number N.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast._xp import to_device
    >>> to_device([1.0, 2.0], "cpu")
    array([1., 2.])
    """
    kind, index = parse_device(device)
    if kind == "cpu":
        return asnumpy(a)
    cp = _cupy()
    gpu = _gpu(cp, index)
    if is_cupy(a) and a.device.id == gpu.id:
        return a
    with gpu:
        return cp.asarray(a)


def as_strided(a, shape, strides):
    """A read-only strided view of `a` (NumPy or CuPy); strides in bytes.

    Parameters
    ----------
    a : ndarray
        The array to view.
    shape, strides : tuple of int
        Of the view (strides in bytes, as NumPy's).

    Returns
    -------
    ndarray
        The view (not writeable for NumPy arrays; CuPy has no such flag).
    """
    if is_cupy(a):
        return _cupy().lib.stride_tricks.as_strided(a, shape=shape, strides=strides)
    return np.lib.stride_tricks.as_strided(a, shape=shape, strides=strides, writeable=False)
