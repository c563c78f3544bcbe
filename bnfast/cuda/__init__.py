"""The optional CuPy GPU backend: bnfast's functions on CuPy arrays.

``bnfast.batch_norm``, ``batch_norm_train``, ``batch_norm_infer``, ``batch_norm_backward`` and
``moments`` accept CuPy arrays and return CuPy arrays on the same device, computed on CuPy's
current stream by the CUDA kernels in ``csrc/cuda`` (shipped in the wheel as package data
under ``bnfast/cuda/kernels``, compiled at run time with NVRTC through ``cupy.RawModule``
and cached by CuPy).  Nothing here imports CuPy until a CuPy array arrives or one of the
functions below is called, so importing bnfast never needs CuPy or a GPU.

Install with ``pip install "bnfast[gpu]"`` (CuPy for CUDA 13, ``cupy-cuda13x``); see the GPU
page of the user guide for older drivers (``cupy-cuda12x``).
"""
import importlib.resources
import os
import re

__all__ = ["available", "why_unavailable", "info", "config_line", "kernel_source"]

KERNEL_FILES = ("bnfast.cu",)          # compiled; the headers they include are inlined
# NVRTC options, all explicit: no fast math, no FMA contraction (the element-wise formulas
# then give the CPU kernels' bits), IEEE division and square root, no flush to zero.
NVRTC_OPTIONS = ("-std=c++17", "-fmad=false", "-ftz=false", "-prec-div=true",
                 "-prec-sqrt=true")

_state = {}


def _import_cupy():
    """(cupy module or None, reason it is unusable or None), computed once."""
    if "cupy" not in _state:
        reason = None
        cp = None
        try:
            import cupy as cp
        except ImportError as exc:
            reason = (f"CuPy is not installed ({exc}); pip install \"bnfast[gpu]\" "
                      "installs cupy-cuda13x")
        except Exception as exc:  # a broken CUDA installation raises other errors
            reason = f"CuPy could not be imported: {type(exc).__name__}: {exc}"
        if cp is not None:
            try:
                n = cp.cuda.runtime.getDeviceCount()
                if n < 1:
                    reason = "CuPy found no CUDA device"
            except Exception as exc:
                reason = f"no usable CUDA device: {type(exc).__name__}: {exc}"
        _state["cupy"] = (cp, reason)
    return _state["cupy"]


def available():
    """Whether the GPU backend can run: CuPy imports and sees at least one CUDA device.

    Returns
    -------
    bool
        True when CuPy arrays can be passed to bnfast's functions.

    Examples
    --------
    >>> import bnfast.cuda
    >>> isinstance(bnfast.cuda.available(), bool)
    True
    """
    return _import_cupy()[1] is None


def why_unavailable():
    """Why the GPU backend cannot run, or None when it can.

    Returns
    -------
    str or None
        A one-line reason (CuPy not installed, no CUDA device, ...), None if available.
    """
    return _import_cupy()[1]


def info():
    """The GPU backend's configuration, for :func:`bnfast.show_config`.

    Returns
    -------
    dict
        ``available`` (bool) and ``reason`` (str or None); when available also ``cupy``
        (version), ``device`` (name and compute capability of the current device),
        ``driver`` and ``runtime`` (CUDA versions as "major.minor") and ``nvrtc``.
    """
    cp, reason = _import_cupy()
    out = {"available": reason is None, "reason": reason,
           "cupy": getattr(cp, "__version__", None) if cp is not None else None}
    if reason is not None:
        return out

    def ver(v):
        return f"{v // 1000}.{v % 1000 // 10}"

    try:
        rt = cp.cuda.runtime
        dev = cp.cuda.Device()
        props = rt.getDeviceProperties(dev.id)
        name = props["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        out["device"] = (f"{dev.id}: {name} (compute capability "
                         f"{props['major']}.{props['minor']}, {rt.getDeviceCount()} device(s))")
        out["driver"] = ver(rt.driverGetVersion())
        out["runtime"] = ver(rt.runtimeGetVersion())
        try:
            major, minor = cp.cuda.nvrtc.getVersion()
            out["nvrtc"] = f"{major}.{minor}"
        except Exception as exc:  # NVRTC missing: the kernels cannot be compiled
            out["nvrtc"] = f"unavailable ({type(exc).__name__}: {exc})"
    except Exception as exc:
        out["available"] = False
        out["reason"] = f"querying the CUDA device failed: {type(exc).__name__}: {exc}"
    return out


def _read(name):
    """The text of kernel source `name`: package data, else the checkout's csrc/cuda."""
    try:
        res = importlib.resources.files(__name__).joinpath("kernels", name)
        if res.is_file():
            return res.read_text(encoding="utf-8")
    except (OSError, ModuleNotFoundError):
        pass
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "csrc", "cuda", name)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    raise FileNotFoundError(
        f"bnfast's CUDA kernel source {name} is neither package data (bnfast/cuda/kernels) "
        f"nor in a source checkout ({path}); reinstall bnfast")


def kernel_source():
    """The CUDA source compiled at run time: bnfast.cu with its local headers inlined.

    Returns
    -------
    str
        Self-contained CUDA C++ (NVRTC needs no include path for it).
    """
    def inline(text, seen):
        def repl(m):
            header = m.group(1)
            if header in seen:
                return ""
            seen.add(header)
            return inline(_read(header), seen)
        return re.sub(r'^#include "([^"]+)"\s*$', repl, text, flags=re.M)

    return "".join(inline(_read(name), set()) for name in KERNEL_FILES)


def config_line():
    """The GPU line of :func:`bnfast.show_config`.

    Returns
    -------
    str
        CuPy's version, the device, the driver, runtime and NVRTC versions, or why the
        GPU backend is unavailable.
    """
    d = info()
    if not d["available"]:
        return f"  GPU (CuPy)     : unavailable: {d['reason']}"
    return (f"  GPU (CuPy)     : CuPy {d['cupy']}, device {d['device']}, driver "
            f"{d['driver']}, runtime {d['runtime']}, NVRTC {d['nvrtc']}")
