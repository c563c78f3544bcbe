"""bnfast/_npy_abi.h (NumPy's C ABI declared without NumPy's headers, so that the build
needs no NumPy) against NumPy's own Python-level answers, on arrays of every kind of
dtype, byte order, layout and flag, and on the installed NumPy's version."""
import numpy as np
import pytest

from bnfast import _core


def _arrays():
    base = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    yield "f8", base
    yield "f4", base.astype(np.float32)
    yield "f8 big-endian", base.astype(">f8")
    yield "f4 big-endian", base.astype(">f4")
    yield "f8 transposed", base.transpose(2, 0, 1)
    yield "f8 strided", base[:, ::2, ::-1]
    ro = base.copy()
    ro.flags.writeable = False
    yield "f8 read-only", ro
    raw = np.zeros(8 * 24 + 1, np.uint8)
    yield "f8 unaligned", raw[1:].view(np.float64).reshape(2, 3, 4)
    yield "0-d", np.array(3.5)
    yield "empty", np.zeros((0, 5), np.float32)
    for dt in ("f2", "c16", "i1", "u8", "?", "U7", "S3", "O", "M8[ns]", "m8[s]",
               [("a", "f4"), ("b", "i8", (3,))], "V5"):
        yield repr(dt), np.zeros((3, 2), dtype=dt)
    yield "large item", np.zeros(2, dtype=[("a", "f8", (64, 64))])   # itemsize 32768


@pytest.mark.parametrize("name,a", list(_arrays()), ids=[n for n, _ in _arrays()])
def test_fields_match_numpy(name, a):
    view, empty = _core._npy_view(a)
    assert view == (a.__array_interface__["data"][0], a.ndim, a.shape, a.strides, a.dtype.num,
                    a.dtype.itemsize, a.nbytes, a.flags.c_contiguous, a.flags.aligned,
                    a.flags.writeable, a.dtype.isnative or a.dtype.byteorder == "|")
    assert type(empty) is np.ndarray
    assert empty.shape == a.shape and empty.dtype.num == a.dtype.num
    assert empty.flags.c_contiguous and empty.flags.writeable and empty.flags.owndata


def test_type_numbers_are_numpys():
    # _npy_abi.h's BNPY_FLOAT / BNPY_DOUBLE are NPY_FLOAT / NPY_DOUBLE
    assert _core._npy_view(np.zeros(1, np.float32))[0][4] == np.dtype(np.float32).num == 11
    assert _core._npy_view(np.zeros(1, np.float64))[0][4] == np.dtype(np.float64).num == 12


def test_exact_ndarray_type_required():
    with pytest.raises(TypeError):
        _core._npy_view([1.0, 2.0])
    sub = np.zeros(3).view(np.ma.MaskedArray)    # a subclass passes the C-level type test
    assert _core._npy_view(sub)[0][2] == (3,)
