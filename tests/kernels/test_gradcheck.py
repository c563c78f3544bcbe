"""Central-difference gradient checks of batch_norm_backward in float64."""
import numpy as np
import pytest

import bnfast
from conftest import make_params, make_x, rng_for

H = 1e-6
EPS = 1e-5
SHAPES = [(5, 3), (3, 2, 4), (2, 3, 66), (2, 2, 3, 3)]
shapes = pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))


def numgrad(f, a):
    """Central differences of the scalar function f with respect to every entry of a."""
    g = np.empty(a.shape)
    flat, gf = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + H
        fp = f()
        flat[i] = old - H
        fm = f()
        flat[i] = old
        gf[i] = (fp - fm) / (2 * H)
    return g


def check(analytic, numeric, what):
    scale = max(1.0, np.abs(numeric).max())
    err = np.abs(analytic - numeric).max()
    assert err <= 1e-6 * scale, f"{what}: max |analytic - numeric| = {err:.3e}"


def _data(shape, tag, relu_margin=None, axis=1):
    for seed in range(200):
        rng = rng_for("gradcheck", shape, tag, seed)
        x = make_x(rng, shape, np.float64, axis=axis)
        w, b = make_params(rng, shape[axis])
        R = rng.standard_normal(shape)
        if relu_margin is None:
            return x, w, b, R
        y, _, _ = bnfast.batch_norm_train(x, w, b, eps=EPS, axis=axis)
        if np.abs(y).min() > relu_margin:
            return x, w, b, R
    raise RuntimeError("no data away from the ReLU kink")  # pragma: no cover


@shapes
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("axis", [1, -1])
def test_training_mode(shape, relu, axis, isa):
    x, w, b, R = _data(shape, f"train{relu}{axis}", relu_margin=1e-2 if relu else None,
                       axis=axis)

    def loss():
        y, _, _ = bnfast.batch_norm_train(x, w, b, eps=EPS, relu=relu, axis=axis)
        return float(np.sum(y * R))

    _, mean, invstd = bnfast.batch_norm_train(x, w, b, eps=EPS, relu=relu, axis=axis)
    dx, dw, db = bnfast.batch_norm_backward(R, x, mean, invstd, w, bias=b, relu=relu,
                                            axis=axis)
    check(dx, numgrad(loss, x), "dx")
    check(dw, numgrad(loss, w), "dweight")
    check(db, numgrad(loss, b), "dbias")
    if relu:  # the mask must actually be doing something in this test
        assert (bnfast.batch_norm_train(x, w, b, eps=EPS, axis=axis)[0] < 0).any()


@shapes
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_eval_mode(shape, relu, isa):
    """training=False: mean and invstd are constants (running statistics)."""
    rng = rng_for("gradcheck-eval", shape, relu)
    C = shape[1]
    for _ in range(200):
        x = make_x(rng, shape, np.float64)
        w, b = make_params(rng, C)
        mean = rng.standard_normal(C)
        var = rng.uniform(0.5, 2.0, C)
        if not relu or np.abs(bnfast.batch_norm_infer(x, mean, var, w, b, eps=EPS)).min() > 1e-2:
            break
    R = rng.standard_normal(shape)
    invstd = 1.0 / np.sqrt(var + EPS)

    def loss():
        return float(np.sum(bnfast.batch_norm_infer(x, mean, var, w, b, eps=EPS, relu=relu) * R))

    dx, dw, db = bnfast.batch_norm_backward(R, x, mean, invstd, w, bias=b, relu=relu,
                                            training=False)
    check(dx, numgrad(loss, x), "dx")
    check(dw, numgrad(loss, w), "dweight")
    check(db, numgrad(loss, b), "dbias")


def test_training_and_eval_gradients_differ():
    """Sanity: the eval-mode gradient is not the training-mode one (the check can fail)."""
    x, w, b, R = _data((4, 3, 5), "differ")
    _, mean, invstd = bnfast.batch_norm_train(x, w, b)
    dx_t, _, _ = bnfast.batch_norm_backward(R, x, mean, invstd, w)
    dx_e, _, _ = bnfast.batch_norm_backward(R, x, mean, invstd, w, training=False)
    assert np.abs(dx_t - dx_e).max() > 1e-3
