"""bnfast.optim: optimizer steps and learning-rate schedules (against torch.optim when
PyTorch is installed)."""
import math

import numpy as np
import pytest

from bnfast import nn, optim


def make_params(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return [nn.Parameter(rng.standard_normal(s).astype(dtype))
            for s in ((4, 3), (3,), (2, 2, 2))]


def grads_for(step, params, seed=1):
    rng = np.random.default_rng([seed, step])
    return [rng.standard_normal(p.data.shape).astype(p.data.dtype) for p in params]


def run_ours(cls, kw, dtype, steps=5, sched=None):
    params = make_params(dtype)
    opt = cls(params, **kw)
    s = sched(opt) if sched else None
    for t in range(steps):
        opt.zero_grad()
        for p, g in zip(params, grads_for(t, params)):
            p.grad = g
        opt.step()
        if s:
            s.step()
    return params


SGD_CASES = [dict(lr=0.1), dict(lr=0.1, momentum=0.9),
             dict(lr=0.05, momentum=0.9, nesterov=True),
             dict(lr=0.1, momentum=0.8, dampening=0.3), dict(lr=0.1, weight_decay=0.01),
             dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05),
             dict(lr=0.1, momentum=0.5, maximize=True)]
ADAM_CASES = [dict(lr=0.01), dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6),
              dict(lr=0.01, weight_decay=0.1), dict(lr=0.01, amsgrad=True),
              dict(lr=0.01, maximize=True)]


def test_sgd_momentum_by_hand():
    p = nn.Parameter(np.array([1.0]))
    opt = optim.SGD([p], lr=0.1, momentum=0.9)
    for g, expected in ((1.0, 0.9), (1.0, 0.9 - 0.1 * 1.9), (0.0, 0.71 - 0.1 * 1.71)):
        p.grad = np.array([g])
        opt.step()
        assert math.isclose(p.data[0], expected, rel_tol=1e-12)


def test_sgd_skips_none_and_keeps_dtype():
    a, b = nn.Parameter(np.ones(3, np.float32)), nn.Parameter(np.ones(2, np.float32))
    opt = optim.SGD([a, b], lr=0.5, momentum=0.9, weight_decay=0.1)
    a.grad = np.ones(3, np.float32)
    opt.step()
    assert a.data.dtype == np.float32 and np.allclose(a.data, 1 - 0.5 * 1.1)
    assert np.array_equal(b.data, np.ones(2))
    opt.zero_grad()
    assert a.grad is None


def test_param_groups_and_errors():
    p1, p2 = make_params()[:2]
    opt = optim.SGD([{"params": [p1]}, {"params": [p2], "lr": 0.01}], lr=0.1, momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert opt.param_groups[1]["momentum"] == 0.9
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD([p1], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="lr"):
        optim.SGD([p1], lr=-1)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam([p1], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="more than one group"):
        optim.SGD([{"params": [p1]}, {"params": [p1]}], lr=0.1)
    with pytest.raises(TypeError, match="Parameter"):
        optim.SGD([np.zeros(3)], lr=0.1)


def test_optimizer_state_dict_round_trip():
    params = make_params()
    opt = optim.Adam(params, lr=0.01)
    for t in range(3):
        for p, g in zip(params, grads_for(t, params)):
            p.grad = g
        opt.step()
    sd = opt.state_dict()
    clone = [nn.Parameter(p.data.copy()) for p in params]
    opt2 = optim.Adam(clone, lr=0.5)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.01
    for t in range(3, 5):
        for p, q, g in zip(params, clone, grads_for(t, params)):
            p.grad, q.grad = g, g.copy()
        opt.step()
        opt2.step()
    for p, q in zip(params, clone):
        assert np.array_equal(p.data, q.data)


@pytest.mark.parametrize("cls,steps,expected", [
    (lambda o: optim.StepLR(o, 2, 0.5), 5, [1, 1, 0.5, 0.5, 0.25, 0.25]),
    (lambda o: optim.MultiStepLR(o, [1, 3], 0.1), 4, [1, 0.1, 0.1, 0.01, 0.01]),
    (lambda o: optim.ExponentialLR(o, 0.9), 3, [1, 0.9, 0.81, 0.729]),
    (lambda o: optim.CosineAnnealingLR(o, 4, 0.1), 4,
     [1, 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, 0.55,
      0.1 + 0.9 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.1]),
])
def test_schedules_closed_form(cls, steps, expected):
    opt = optim.SGD(make_params()[:1], lr=1.0)
    s = cls(opt)
    got = [s.get_last_lr()[0]]
    for _ in range(steps):
        s.step()
        got.append(opt.param_groups[0]["lr"])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    sd = s.state_dict()
    s2 = cls(optim.SGD(make_params()[:1], lr=1.0))
    s2.load_state_dict(sd)
    assert s2.get_last_lr() == s.get_last_lr()


def test_schedule_errors():
    opt = optim.SGD(make_params()[:1], lr=1.0)
    with pytest.raises(ValueError):
        optim.StepLR(opt, 0)
    with pytest.raises(ValueError):
        optim.CosineAnnealingLR(opt, 0)
    with pytest.raises(TypeError):
        optim.StepLR(object(), 1)


# ---------------------------------------------------------------------------- vs torch.optim

def _torch_run(torch_cls, kw, dtype, steps=5, sched=None):
    torch = pytest.importorskip("torch")
    tdt = {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    ref = make_params(dtype)
    params = [torch.tensor(p.data, dtype=tdt, requires_grad=True) for p in ref]
    opt = torch_cls(params, **kw)
    s = sched(opt) if sched else None
    for t in range(steps):
        opt.zero_grad()
        for p, g in zip(params, grads_for(t, ref)):
            p.grad = torch.tensor(g)
        opt.step()
        if s:
            s.step()
    return [p.detach().numpy() for p in params]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", SGD_CASES)
def test_sgd_matches_torch(dtype, kw):
    torch = pytest.importorskip("torch")
    ours = run_ours(optim.SGD, kw, dtype)
    theirs = _torch_run(torch.optim.SGD, kw, dtype)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.data, b, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", ADAM_CASES)
@pytest.mark.parametrize("which", ["Adam", "AdamW"])
def test_adam_matches_torch(dtype, kw, which):
    torch = pytest.importorskip("torch")
    ours = run_ours(getattr(optim, which), kw, dtype)
    theirs = _torch_run(getattr(torch.optim, which), dict(kw, foreach=False), dtype)
    rtol = 1e-5 if dtype == np.float32 else 1e-11
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.data, b, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("name,kw", [("StepLR", dict(step_size=2, gamma=0.5)),
                                     ("MultiStepLR", dict(milestones=[2, 5], gamma=0.3)),
                                     ("ExponentialLR", dict(gamma=0.8)),
                                     ("CosineAnnealingLR", dict(T_max=4, eta_min=0.01))])
def test_schedules_match_torch(name, kw):
    torch = pytest.importorskip("torch")
    p = torch.zeros(1, requires_grad=True)
    topt = torch.optim.SGD([p], lr=0.5)
    ts = getattr(torch.optim.lr_scheduler, name)(topt, **kw)
    opt = optim.SGD(make_params()[:1], lr=0.5)
    s = getattr(optim, name)(opt, **kw)
    for epoch in range(8):       # cosine: past T_max too
        assert math.isclose(s.get_last_lr()[0], ts.get_last_lr()[0],
                            rel_tol=1e-9, abs_tol=1e-12), epoch
        topt.step()
        ts.step()
        s.step()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_with_schedule_matches_torch(dtype):
    torch = pytest.importorskip("torch")
    kw = dict(lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-2)
    ours = run_ours(optim.SGD, kw, dtype, steps=6, sched=lambda o: optim.StepLR(o, 2, 0.5))
    theirs = _torch_run(torch.optim.SGD, kw, dtype, steps=6,
                        sched=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5))
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.data, b, rtol=rtol, atol=rtol)
