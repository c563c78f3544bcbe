"""Adversarial inputs for bnfast's public functions, in the manner of bottleneck's tests/util.py.

The generator makes arrays that are legal NumPy objects but awkward for a C extension:
every dtype (big-endian, float16, integers, bool, complex, object, long double), 0-d to 5-d,
empty axes, Fortran order, negative, zero (``np.broadcast_to``) and odd byte strides (views
into a ``uint8`` buffer with ``itemsize + 1`` strides, fields of structured arrays),
misaligned buffers, read-only arrays, memory maps, ndarray subclasses and masked arrays, and
data with NaN, inf, values near the largest float32/float64, denormals and constant channels;
plus awkward Python scalars for ``eps``, ``momentum``, ``axis`` and the flags.

Each array comes as an :class:`Adv`: the array itself, the plain values it holds (what the
float64 reference should see), the buffer that owns its memory (to check that nothing
outside the view is written), and tags that the tests use to decide what the right outcome
is for the argument position it is put in.

``count_inputs()`` returns the number of distinct inputs generated (``python
tests/api/adversarial.py`` prints it, by family).
"""
import atexit
import itertools
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

__all__ = ["Adv", "MyArray", "layouts", "dtype_variants", "data_shapes", "special_data",
           "vector_variants", "bad_scalars", "count_inputs"]


class MyArray(np.ndarray):
    """A trivial ndarray subclass (it must behave exactly like its base class)."""


@dataclass
class Adv:
    """One adversarial array.

    label   -- a short unique description
    array   -- the object passed to bnfast
    values  -- an ndarray of the values bnfast should see (for the reference), or None when
               the object has no meaningful numeric values (object, complex, masked, ...)
    owner   -- the ndarray whose memory `array` views, or None when `array` owns its memory
    tags    -- set of strings describing what is special (see `TAGS`)
    """
    label: str
    array: object
    values: object
    owner: object = None
    tags: frozenset = field(default_factory=frozenset)


# tags:
#   dtype: "f32" "f64" (any byte order) "bigendian" "f16" "longdouble" "int" "bool"
#          "complex" "object"
#   layout: "c" "fortran" "negative" "step" "zero-stride" "odd-stride" "field"
#           "misaligned" "readonly" "memmap" "memmap-readonly" "subclass" "masked"
#           "list" (a Python list)
#   values: "nan" "inf" "huge" "denormal" "constant"

_TMPDIR = None
_COUNTER = itertools.count()


def _tmpdir():
    """A temporary folder for the memory-mapped files, removed at exit."""
    global _TMPDIR
    if _TMPDIR is None:
        _TMPDIR = tempfile.mkdtemp(prefix="bnfast-adversarial-")
        atexit.register(shutil.rmtree, _TMPDIR, ignore_errors=True)
    return _TMPDIR


def _dtype_tags(dt):
    dt = np.dtype(dt)
    if dt.kind == "f":
        if dt.itemsize == 4:
            t = {"f32"}
        elif dt.itemsize == 8:
            t = {"f64"}
        elif dt.itemsize == 2:
            t = {"f16"}
        else:
            t = {"longdouble"}
        if not dt.isnative:
            t.add("bigendian")
        return t
    return {{"i": "int", "u": "int", "b": "bool", "c": "complex", "O": "object"}[dt.kind]}


def _strided_view(a, stride_pad, misalign=0):
    """A view of a's values with every element `stride_pad` bytes further apart than
    contiguous (row-major), starting `misalign` bytes into a uint8 buffer."""
    it = a.dtype.itemsize
    shape = a.shape
    strides = []
    step = it + stride_pad
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    strides = tuple(reversed(strides))
    nbytes = misalign + (step if a.size else 0) + it
    buf = np.zeros(nbytes, np.uint8)
    v = np.ndarray(shape, a.dtype, buffer=buf, offset=misalign, strides=strides)
    v[...] = a
    return v, buf


def layouts(a, tag=""):
    """Every memory presentation of the values of `a` (any dtype, any shape).

    Yields Adv objects whose values equal `a`'s (or, for the broadcast view, whose values
    are given in `values`).
    """
    a = np.array(a, copy=True, order="C")
    dt, sh = a.dtype, a.shape
    base_tags = _dtype_tags(dt)
    pre = f"{tag}{dt.str}{list(sh)}"

    def mk(name, arr, owner=None, extra=(), values=None):
        return Adv(f"{pre}:{name}", arr, a if values is None else values, owner,
                   frozenset(base_tags | {name} | set(extra)))

    yield mk("c", a.copy())
    if a.ndim >= 2:
        yield mk("fortran", np.array(a, order="F", copy=True))
    if a.ndim >= 1 and a.size:
        # negative strides on every axis: a reversed view of a reversed copy
        rev = tuple(slice(None, None, -1) for _ in sh)
        owner = np.ascontiguousarray(a[rev])
        yield mk("negative", owner[rev], owner)
        # every second element of a larger buffer along the last axis
        big = np.zeros(sh[:-1] + (2 * sh[-1],), dt)
        big[..., ::2] = a
        yield mk("step", big[..., ::2], big)
        # zero stride on the first axis: np.broadcast_to of the first slice (read-only)
        first = np.ascontiguousarray(a[:1])
        bc = np.broadcast_to(first, sh)
        yield mk("zero-stride", bc, first, values=np.array(bc))
    if dt.kind != "O":
        # element stride itemsize + 1 in a uint8 buffer (odd byte strides, misaligned)
        v, buf = _strided_view(a, 1)
        yield mk("odd-stride", v, buf, extra=("misaligned",))
        # contiguous but misaligned by one byte
        v, buf = _strided_view(a, 0, misalign=1)
        yield mk("misaligned", v, buf)
        # a field of a structured array: a 1-byte field before it, stride itemsize + 1
        st = np.zeros(sh, dtype=[("pad", "u1"), ("v", dt)])
        st["v"] = a
        yield mk("field", st["v"], st, extra=("odd-stride", "misaligned"))
        # read-only
        ro = a.copy()
        ro.flags.writeable = False
        yield mk("readonly", ro)
        # memory maps, writeable and read-only
        if a.size:
            path = os.path.join(_tmpdir(), f"mm{next(_COUNTER)}.dat")
            mm = np.memmap(path, dtype=dt, mode="w+", shape=sh)
            mm[...] = a
            mm.flush()
            yield mk("memmap", mm)
            mr = np.memmap(path, dtype=dt, mode="r", shape=sh)
            yield mk("memmap-readonly", mr, extra=("readonly",))
    # a trivial ndarray subclass
    yield mk("subclass", a.copy().view(MyArray))
    # a masked array with one masked element (must be rejected, never silently unmasked)
    if a.size and dt.kind != "O":
        mask = np.zeros(sh, bool)
        mask.flat[0] = True
        yield Adv(f"{pre}:masked", np.ma.masked_array(a.copy(), mask=mask), None, None,
                  frozenset(base_tags | {"masked"}))


# every dtype (any byte order), for a float64 source array of moderate values
DTYPES = ["<f4", "<f8", ">f4", ">f8", "<f2", ">f2", np.longdouble, "i1", "<i4", ">i8", "u1",
          "<u8", "?", "<c8", ">c16", object]


def dtype_variants(a64, tag=""):
    """`a64` (float64 values) converted to every dtype, C-contiguous."""
    for dt in DTYPES:
        dt = np.dtype(dt)
        if dt.kind in "iu":
            v = np.round(a64 * 3)
            if dt.kind == "u":
                v = np.abs(v)
            arr = v.astype(dt)
        elif dt.kind == "b":
            arr = a64 > 0
        else:
            arr = a64.astype(dt)
        values = arr.astype(np.float64) if dt.kind in "fiub" else None
        yield Adv(f"{tag}{dt.str}{list(a64.shape)}:c", arr, values, None,
                  frozenset(_dtype_tags(dt) | {"c"}))


# shapes of the data argument: 0-d to 5-d, empty axes, a single value per channel
DATA_SHAPES = [(), (5,), (0,), (4, 3), (1, 3), (2, 3, 1), (0, 3), (3, 0), (2, 3, 0), (0, 3, 4),
               (2, 0, 4), (1, 3, 1, 1), (2, 3, 2, 2), (2, 3, 1, 2, 3), (1, 2, 1, 1, 1),
               (2, 4, 3, 1, 2)]


def data_shapes(dtype, rng):
    """Data arrays of every shape in DATA_SHAPES (C order and Fortran order)."""
    for sh in DATA_SHAPES:
        a = (rng.standard_normal(sh) * 2 + 0.5).astype(dtype)
        yield Adv(f"{np.dtype(dtype).str}{list(sh)}:c", a, a.astype(np.float64), None,
                  frozenset(_dtype_tags(dtype) | {"c", "shape"}))
        if a.ndim >= 2 and a.size:
            f = np.array(a, order="F", copy=True)
            yield Adv(f"{np.dtype(dtype).str}{list(sh)}:fortran", f, a.astype(np.float64),
                      None, frozenset(_dtype_tags(dtype) | {"fortran", "shape"}))


def special_data(shape, dtype, rng):
    """Data of `shape` (channel axis 1, at least 3 channels) with special values.

    Channel 0 carries the special values; the other channels are ordinary, so a special
    value must not leak into them.
    """
    dt = np.dtype(dtype)
    big = 1e38 if dt.itemsize == 4 else 1e308
    tiny = 1e-40 if dt.itemsize == 4 else 5e-324
    base = rng.standard_normal(shape) * 2 + 0.5
    out = []

    def put(name, fill, tags):
        a = base.copy()
        ch = np.ascontiguousarray(a[:, 0])
        fill(ch)
        a[:, 0] = ch
        arr = a.astype(dt)
        out.append(Adv(f"{dt.str}{list(shape)}:{name}", arr, arr.astype(np.float64), None,
                       frozenset(_dtype_tags(dt) | {"c"} | set(tags))))

    def flat(f):
        return lambda ch: f(ch.reshape(-1))

    put("nan", flat(lambda c: c.__setitem__(1, np.nan)), {"nan"})
    put("nan-all", lambda c: c.fill(np.nan), {"nan"})
    put("-nan", flat(lambda c: c.__setitem__(0, -np.nan)), {"nan"})
    put("inf", flat(lambda c: c.__setitem__(0, np.inf)), {"inf"})
    put("+-inf", flat(lambda c: (c.__setitem__(0, np.inf), c.__setitem__(1, -np.inf))),
        {"inf"})
    put("huge", flat(lambda c: c.__setitem__(slice(None), big * np.resize([1, -1, 0.5], c.size))),
        {"huge"})
    put("huge-positive", lambda c: c.fill(big), {"huge", "constant"})
    put("huge-mixed", flat(lambda c: c.__setitem__(0, big)), {"huge"})
    put("huge-opposite", flat(lambda c: (c.__setitem__(0, big), c.__setitem__(1, -big))),
        {"huge"})
    put("denormal", flat(lambda c: c.__setitem__(slice(None), tiny * np.arange(c.size))),
        {"denormal"})
    put("denormal-constant", lambda c: c.fill(tiny), {"denormal", "constant"})
    put("constant", lambda c: c.fill(7.25), {"constant"})
    put("constant-1e7", lambda c: c.fill(1e7), {"constant"})
    put("zero", lambda c: c.fill(0.0), {"constant"})
    put("-zero", lambda c: c.fill(-0.0), {"constant"})
    return out


def vector_variants(C, rng, positive=False, tag=""):
    """Per-channel vectors of length C in every dtype and layout, plus wrong shapes and
    non-array objects."""
    v = rng.uniform(0.5, 2.0, C) * (1 if positive else rng.choice([-1.0, 1.0], C))
    res = []
    for adv in dtype_variants(v, tag):
        res.append(adv)
    for dt in ("<f4", "<f8", ">f8"):
        res.extend(layouts(v.astype(dt), tag))
    # special values (a NaN, an inf, a negative, a zero in channel 0)
    for name, val in [("nan", np.nan), ("inf", np.inf), ("negative", -1.5), ("zero", 0.0)]:
        if not C:
            break
        w = v.copy()
        w[0] = val
        res.append(Adv(f"{tag}<f8[{C}]:{name}", w, w.copy(), None,
                       frozenset({"f64", "c", name})))
    # wrong shapes and kinds
    for name, arr in [("C+1", np.ones(C + 1)), ("C-1", np.ones(max(C - 1, 0))),
                      ("Cx1", np.ones((C, 1))), ("1xC", np.ones((1, C))),
                      ("0-d", np.float64(1.0)), ("0-d-array", np.array(1.0)),
                      ("empty", np.ones(0)), ("2C-reshaped", np.ones((2, C)))]:
        res.append(Adv(f"{tag}shape:{name}", arr, None, None, frozenset({"f64", "badshape"})))
    res.append(Adv(f"{tag}list", v.tolist(), v.copy(), None, frozenset({"f64", "list"})))
    res.append(Adv(f"{tag}str", np.array(["a"] * C), None, None, frozenset({"str"})))
    res.append(Adv(f"{tag}none-objects", np.array([None] * C), None, None,
                   frozenset({"object"})))
    return res


# awkward Python scalars for eps, momentum, axis and the relu/training flags
BAD_SCALARS = [
    ("10**400", 10 ** 400), ("-10**400", -10 ** 400), ("2**31", 2 ** 31), ("2**63", 2 ** 63),
    ("-2**63-1", -2 ** 63 - 1), ("-1", -1), ("0", 0), ("1", 1), ("-0.0", -0.0), ("0.5", 0.5),
    ("1e300", 1e300), ("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf),
    ("True", True), ("False", False), ("np.True_", np.True_), ("np.int64(1)", np.int64(1)),
    ("np.uint64(2**64-1)", np.uint64(2 ** 64 - 1)), ("np.float32(nan)", np.float32("nan")),
    ("np.float64(1e-3)", np.float64(1e-3)), ("Fraction(1,3)", Fraction(1, 3)),
    ("1+0j", 1 + 0j), ("'1'", "1"), ("'yes'", "yes"), ("''", ""), ("None", None),
    ("[1]", [1]), ("array([1])", np.array([1])), ("array([1,0])", np.array([1, 0])),
    ("array(1.0)", np.array(1.0)), ("object()", object()),
]


def bad_scalars():
    return list(BAD_SCALARS)


def count_inputs(C=3):
    """Number of distinct adversarial inputs the generator produces, by family."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, C, 4))
    fam = {
        "data dtypes": len(list(dtype_variants(x))),
        "data layouts (float32, float64, big-endian float64)": sum(
            len(list(layouts(x.astype(dt)))) for dt in ("<f4", "<f8", ">f8")),
        "data shapes (0-d to 5-d, empty; float32 and float64)": sum(
            len(list(data_shapes(dt, rng))) for dt in (np.float32, np.float64)),
        "data special values (float32 and float64)": sum(
            len(special_data((2, C, 4), dt, rng)) for dt in (np.float32, np.float64)),
        "per-channel vectors": len(vector_variants(C, rng)),
        "scalars": len(BAD_SCALARS),
    }
    return sum(fam.values()), fam


if __name__ == "__main__":
    total, fam = count_inputs()
    for k, v in fam.items():
        print(f"{v:5d}  {k}")
    print(f"{total:5d}  distinct adversarial inputs")
