"""bnfast.reference on empty inputs -- zero channels, an empty batch, empty spatial axes --
behaves as bnfast does: the same empty results, or the same error (issue 12, item 15)."""
import warnings

import numpy as np
import pytest

import bnfast
from bnfast import reference

SHAPES = [(4, 0), (0, 3), (0, 0), (1, 3), (2, 0, 3), (0, 3, 2), (2, 3, 0), (4, 0, 5, 5),
          (3, 2, 0, 0), (1, 2, 1, 1), (0, 2, 3, 3)]


def _calls(shape, axis):
    """(name, bnfast callable, reference callable) for every public function."""
    C = shape[axis]
    x = np.zeros(shape)
    dy = np.ones(shape)
    stats = (np.zeros(C), np.ones(C))
    w, b = np.full(C, 2.0), np.full(C, 0.5)

    def running():
        return dict(running_mean=np.zeros(C), running_var=np.ones(C))

    return [
        ("moments", lambda f: f.moments(x, axis=axis)),
        ("train", lambda f: f.batch_norm_train(x, w, b, axis=axis)),
        ("train+running", lambda f: f.batch_norm_train(x, w, b, axis=axis, **running())),
        ("train relu", lambda f: f.batch_norm_train(x, axis=axis, relu=True)),
        ("infer", lambda f: f.batch_norm_infer(x, *stats, w, b, axis=axis)),
        ("backward", lambda f: f.batch_norm_backward(dy, x, *stats, w, axis=axis)),
        ("backward relu", lambda f: f.batch_norm_backward(dy, x, *stats, w, bias=b, relu=True,
                                                          axis=axis)),
        ("backward eval", lambda f: f.batch_norm_backward(dy, x, *stats, axis=axis,
                                                          training=False)),
        ("batch_norm eval", lambda f: f.batch_norm(x, *stats, w, b, axis=axis)),
        ("batch_norm train", lambda f: f.batch_norm(x, *stats, training=True, axis=axis)),
        ("batch_norm no stats", lambda f: f.batch_norm(x, axis=axis)),
    ]


def _run(call, module):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # no "mean of empty slice" either
            out = call(module)
    except Exception as exc:                         # noqa: BLE001 -- compared below
        return exc
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_mirrors_bnfast_on_empty_shapes(shape, axis):
    for name, call in _calls(shape, axis):
        got, want = _run(call, reference), _run(call, bnfast)
        where = f"{name}, shape {shape}, axis {axis}"
        if isinstance(want, Exception):
            assert type(got) is type(want), f"{where}: reference gave {got!r}, bnfast {want!r}"
            assert str(got) == str(want), where
            continue
        assert not isinstance(got, Exception), f"{where}: reference raised {got!r}"
        assert len(got) == len(want), where
        for g, w in zip(got, want):
            assert g.shape == w.shape, where
            assert g.dtype == np.float64, where
            np.testing.assert_allclose(g, w, err_msg=where)


def test_reference_checks_ndim_and_axis_like_bnfast():
    for bad, kw in [(np.zeros(3), {}), (np.zeros((2, 3)), {"axis": 2}),
                    (np.zeros((2, 3)), {"axis": 1.0})]:
        with pytest.raises(Exception) as want:
            bnfast.moments(bad, **kw)
        with pytest.raises(type(want.value)):
            reference.moments(bad, **kw)
