"""Optimizers (SGD with momentum / Nesterov / weight decay, Adam, AdamW) and learning-rate
schedules (step, multi-step, exponential, cosine), with PyTorch's update rules.

An optimizer holds ``param_groups``, a list of dicts each with ``"params"`` (a list of
:class:`bnfast.nn.Parameter`) and that group's hyperparameters, exactly as in
``torch.optim``; schedules change ``group["lr"]``.  Parameters whose ``grad`` is None are
skipped.  Updates are in place on ``Parameter.data``, in the parameters' dtype, with the
array module of the parameters (NumPy, or CuPy for a model on a GPU): the state
(momentum buffers, Adam's averages) lives on the parameters' device.

>>> import numpy as np
>>> from bnfast import nn, optim
>>> p = nn.Parameter(np.array([1.0, 2.0]))
>>> opt = optim.SGD([p], lr=0.1, momentum=0.9)
>>> p.grad = np.array([1.0, 1.0])
>>> opt.step()
>>> p.data.tolist()
[0.9, 1.9]
"""
import math
import numbers

from . import _xp

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "LRScheduler", "StepLR", "MultiStepLR",
           "ExponentialLR", "CosineAnnealingLR"]


def _nonneg(v, name):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v >= 0:
        raise ValueError(f"{name} must be a real number >= 0, got {v!r}")
    return float(v)


class Optimizer:
    """Base class: parameter groups, per-parameter state, ``zero_grad``.

    Parameters
    ----------
    params : iterable of Parameter, or iterable of dict
        The parameters, or groups ``{"params": [...], "lr": ..., ...}`` whose missing
        hyperparameters come from `defaults`.
    defaults : dict
        The optimizer's hyperparameters.

    Raises
    ------
    ValueError
        If `params` is empty, a parameter appears in more than one group, or a group's
        learning rate (or, in subclasses, another hyperparameter) is out of range.
    TypeError
        If an item of a group is not a `Parameter` (an object with ``data`` and ``grad``).
    KeyError
        If a group dict has no ``"params"`` entry.

    Examples
    --------
    A subclass sets its defaults and implements :meth:`step`; here sign descent:

    >>> import numpy as np
    >>> from bnfast import nn, optim
    >>> class SignSGD(optim.Optimizer):
    ...     def __init__(self, params, lr=0.01):
    ...         super().__init__(params, dict(lr=lr))
    ...     def step(self):
    ...         for g in self.param_groups:
    ...             for p in g["params"]:
    ...                 if p.grad is not None:
    ...                     p.data -= g["lr"] * np.sign(p.grad)
    >>> w, b = nn.Parameter(np.array([1.0, 2.0])), nn.Parameter(np.array([0.0]))
    >>> opt = SignSGD([{"params": [w]}, {"params": [b], "lr": 0.5}], lr=0.25)
    >>> [g["lr"] for g in opt.param_groups]
    [0.25, 0.5]
    >>> w.grad, b.grad = np.array([3.0, -0.1]), np.array([-2.0])
    >>> opt.step()
    >>> w.data.tolist(), b.data.tolist()
    ([0.75, 2.25], [0.5])
    >>> opt.zero_grad()
    >>> w.grad is None
    True
    """

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        self.state = {}
        seen = set()
        for g in groups:
            g = dict(g)
            ps = list(g["params"])
            for p in ps:
                if not (hasattr(p, "data") and hasattr(p, "grad")):
                    raise TypeError(f"optimizer expects Parameter objects, got {type(p).__name__}")
                if id(p) in seen:
                    raise ValueError("a parameter appears in more than one group")
                seen.add(id(p))
            g["params"] = ps
            for k, v in self.defaults.items():
                g.setdefault(k, v)
            g.setdefault("initial_lr", g["lr"])
            self._check_group(g)
            self.param_groups.append(g)

    def _check_group(self, g):
        _nonneg(g["lr"], "lr")

    def zero_grad(self):
        """Set every parameter's gradient to None."""
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    def step(self):
        """Apply one update from the current gradients."""
        raise NotImplementedError

    def state_dict(self):
        """The per-parameter state and the groups' hyperparameters (parameters by index)."""
        index = {}
        for g in self.param_groups:
            for p in g["params"]:
                index[id(p)] = len(index)
        by_id = {}
        for g in self.param_groups:
            for p in g["params"]:
                if id(p) in self.state:
                    by_id[index[id(p)]] = _copy_state(self.state[id(p)])
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"state": by_id, "param_groups": groups}

    def load_state_dict(self, sd):
        """Restore what :meth:`state_dict` returned (same parameter order)."""
        flat = [p for g in self.param_groups for p in g["params"]]
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError("load_state_dict: different number of parameter groups")
        for g, saved in zip(self.param_groups, sd["param_groups"]):
            g.update(saved)
        self.state = {}
        for i, st in sd["state"].items():
            self.state[id(flat[int(i)])] = _copy_state(st)


def _copy_state(st):
    """A copy of one parameter's state: arrays (NumPy or CuPy) copied, the rest shared."""
    return {k: (v.copy() if _xp.is_array(v) else v) for k, v in st.items()}


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, Nesterov momentum and weight decay.

    PyTorch's rule: with ``g = grad + weight_decay * p``,
    ``buf = momentum * buf + (1 - dampening) * g`` (``buf = g`` on the first step),
    ``d = g + momentum * buf`` if `nesterov` else ``buf`` (``g`` without momentum), and
    ``p -= lr * d``.

    Parameters
    ----------
    params : iterable of Parameter or of dict
        The parameters to update, or parameter groups ``{"params": [...], "lr": ..., ...}``
        whose missing hyperparameters are the ones given here (see :class:`Optimizer`).
    lr : float
        The learning rate, >= 0 (default 1e-3, as PyTorch's).
    momentum : float, default 0
        Momentum factor, >= 0; 0 is plain SGD (no momentum buffer).
    dampening : float, default 0
        Dampening of the momentum: the gradient enters the buffer scaled by
        ``1 - dampening`` (not on the first step), >= 0.
    weight_decay : float, default 0
        L2 penalty coefficient.
    nesterov : bool, default False
        Needs ``momentum > 0`` and ``dampening == 0``.
    maximize : bool, default False
        Maximise the objective: step along the gradient instead of against it.

    Raises
    ------
    ValueError
        If `lr`, `momentum`, `dampening` or `weight_decay` is negative (or not a real
        number), or `nesterov` is set without momentum or with dampening; and as for
        :class:`Optimizer`.
    TypeError
        As for :class:`Optimizer`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn, optim
    >>> p = nn.Parameter(np.array([1.0, -2.0]))
    >>> opt = optim.SGD([p], lr=0.1, momentum=0.5)
    >>> for _ in range(2):                   # minimise sum(p**2): grad = 2 p
    ...     p.grad = 2 * p.data
    ...     opt.step()
    >>> p.data.round(4)
    array([ 0.54, -1.08])
    >>> opt.state_dict()["state"][0]["momentum_buffer"].round(4)
    array([ 2.6, -5.2])
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=bool(nesterov),
                                      maximize=bool(maximize)))

    def _check_group(self, g):
        super()._check_group(g)
        _nonneg(g["momentum"], "momentum")
        _nonneg(g["dampening"], "dampening")
        _nonneg(g["weight_decay"], "weight_decay")
        if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def step(self):
        state = self.state
        for g in self.param_groups:
            lr, mom, damp = g["lr"], g["momentum"], g["dampening"]
            wd, nesterov, maximize = g["weight_decay"], g["nesterov"], g["maximize"]
            for p in g["params"]:
                grad = p.grad
                if grad is None:
                    continue
                data = p.data
                if maximize:
                    grad = -grad
                if wd:
                    grad = grad + wd * data
                if mom:
                    st = state.get(id(p))
                    if st is None:
                        buf = _xp.array_module(data).array(grad, dtype=data.dtype, copy=True)
                        state[id(p)] = {"momentum_buffer": buf}
                    else:
                        buf = st["momentum_buffer"]
                        buf *= mom
                        if damp:
                            buf += (1 - damp) * grad
                        else:
                            buf += grad
                    d = grad + mom * buf if nesterov else buf
                else:
                    d = grad
                data -= lr * d


class Adam(Optimizer):
    """Adam (Kingma & Ba) with PyTorch's bias correction and L2 weight decay.

    Parameters
    ----------
    params : iterable of Parameter or of dict
        The parameters to update, or parameter groups ``{"params": [...], "lr": ..., ...}``
        whose missing hyperparameters are the ones given here (see :class:`Optimizer`).
    lr : float, default 1e-3
        The learning rate, >= 0.
    betas : (float, float), default (0.9, 0.999)
        Decay rates, each in [0, 1), of the running averages of the gradient and of its
        square.
    eps : float, default 1e-8
        Added to the bias-corrected ``sqrt`` of the squared-gradient average in the
        denominator, >= 0.
    weight_decay : float, default 0
        Added to the gradient (``grad + weight_decay * p``), as in ``torch.optim.Adam``.
    amsgrad : bool, default False
        Use the AMSGrad variant: the denominator uses the largest squared-gradient average
        seen so far.
    maximize : bool, default False
        Maximise the objective: step along the gradient instead of against it.

    Raises
    ------
    ValueError
        If a beta is outside [0, 1), or `lr`, `eps` or `weight_decay` is negative (or not
        a real number); and as for :class:`Optimizer`.
    TypeError
        As for :class:`Optimizer`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn, optim
    >>> p = nn.Parameter(np.array([1.0, -2.0]))
    >>> opt = optim.Adam([p], lr=0.1)
    >>> for _ in range(3):                   # minimise sum(p**2): grad = 2 p
    ...     p.grad = 2 * p.data
    ...     opt.step()
    >>> p.data.round(4)                      # each step moves about lr per coordinate
    array([ 0.7016, -1.7006])
    >>> opt.state[id(p)]["step"]
    3
    """

    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, maximize=False):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, amsgrad=bool(amsgrad),
                                      maximize=bool(maximize)))

    def _check_group(self, g):
        super()._check_group(g)
        b1, b2 = g["betas"]
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {g['betas']!r}")
        _nonneg(g["eps"], "eps")
        _nonneg(g["weight_decay"], "weight_decay")

    def step(self):
        for g in self.param_groups:
            lr, (b1, b2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
            for p in g["params"]:
                grad = p.grad
                if grad is None:
                    continue
                data = p.data
                if g["maximize"]:
                    grad = -grad
                if wd:
                    if self._decoupled:
                        data *= 1 - lr * wd
                    else:
                        grad = grad + wd * data
                xp = _xp.array_module(data)
                st = self.state.get(id(p))
                if st is None:
                    st = self.state[id(p)] = {"step": 0,
                                              "exp_avg": xp.zeros_like(data),
                                              "exp_avg_sq": xp.zeros_like(data)}
                    if g["amsgrad"]:
                        st["max_exp_avg_sq"] = xp.zeros_like(data)
                st["step"] += 1
                t = st["step"]
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m *= b1
                m += (1 - b1) * grad
                v *= b2
                v += (1 - b2) * (grad * grad)
                if g["amsgrad"]:
                    xp.maximum(st["max_exp_avg_sq"], v, out=st["max_exp_avg_sq"])
                    v = st["max_exp_avg_sq"]
                bc1 = 1 - b1 ** t
                bc2 = 1 - b2 ** t
                denom = xp.sqrt(v) / math.sqrt(bc2)
                denom += eps
                data -= (lr / bc1) * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): ``p *= 1 - lr * weight_decay``
    before the Adam step.  Default ``weight_decay=0.01`` as in PyTorch.

    Parameters
    ----------
    params : iterable of Parameter or of dict
        The parameters to update, or parameter groups ``{"params": [...], "lr": ..., ...}``
        whose missing hyperparameters are the ones given here (see :class:`Optimizer`).
    lr : float, default 1e-3
        The learning rate, >= 0.
    betas : (float, float), default (0.9, 0.999)
        Decay rates, each in [0, 1), of the running averages of the gradient and of its
        square.
    eps : float, default 1e-8
        Added to the bias-corrected ``sqrt`` of the squared-gradient average in the
        denominator, >= 0.
    weight_decay : float, default 0.01
        Decoupled decay: the parameter is scaled by ``1 - lr * weight_decay`` at each step,
        independently of the gradient (not added to it as in :class:`Adam`).
    amsgrad : bool, default False
        Use the AMSGrad variant: the denominator uses the largest squared-gradient average
        seen so far.
    maximize : bool, default False
        Maximise the objective: step along the gradient instead of against it.

    Raises
    ------
    ValueError, TypeError
        As for :class:`Adam`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn, optim
    >>> p = nn.Parameter(np.array([1.0, -2.0]))
    >>> opt = optim.AdamW([p], lr=0.1, weight_decay=0.5)
    >>> p.grad = np.zeros(2)                 # no gradient signal: only the decay acts
    >>> opt.step()
    >>> p.data.round(4)
    array([ 0.95, -1.9 ])
    """

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize)


# ---------------------------------------------------------------------------- schedules

class LRScheduler:
    """Base class of learning-rate schedules.

    Call :meth:`step` once per epoch (after the optimizer's steps); the rate of every group
    becomes ``get_lr()`` for the new epoch count ``last_epoch``.  Closed forms are used, so
    the rate for epoch t does not depend on how it was reached.

    Parameters
    ----------
    optimizer : Optimizer
        Its groups' ``"initial_lr"`` are the base rates; their ``"lr"`` is set to the rate
        for epoch 0 on construction.

    Raises
    ------
    TypeError
        If `optimizer` is not a :class:`Optimizer`.

    Examples
    --------
    A subclass implements :meth:`lr_at`; here a linear warm-up over three epochs:

    >>> import numpy as np
    >>> from bnfast import nn, optim
    >>> class WarmUp(optim.LRScheduler):
    ...     def lr_at(self, base_lr, epoch):
    ...         return base_lr * min(1.0, (epoch + 1) / 3)
    >>> opt = optim.SGD([nn.Parameter(np.zeros(2))], lr=0.3)
    >>> sched = WarmUp(opt)
    >>> lrs = []
    >>> for epoch in range(4):
    ...     lrs.append(round(sched.get_last_lr()[0], 6))
    ...     # ... the epoch's optimizer steps ...
    ...     sched.step()
    >>> lrs
    [0.1, 0.2, 0.3, 0.3]
    >>> sched.state_dict()
    {'last_epoch': 4, 'base_lrs': [0.3]}
    """

    def __init__(self, optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"expected a bnfast.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = 0
        self._apply()

    def lr_at(self, base_lr, epoch):
        """The learning rate for `epoch` of a group whose initial rate is `base_lr`."""
        raise NotImplementedError

    def get_last_lr(self):
        """The current learning rate of each group."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def _apply(self):
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = self.lr_at(base, self.last_epoch)

    def step(self):
        """Advance one epoch and set the new learning rates."""
        self.last_epoch += 1
        self._apply()

    def state_dict(self):
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, sd):
        self.last_epoch = int(sd["last_epoch"])
        self.base_lrs = list(sd["base_lrs"])
        self._apply()


class StepLR(LRScheduler):
    """``lr = base_lr * gamma ** (epoch // step_size)``.

    Parameters
    ----------
    optimizer : Optimizer
        The optimizer whose learning rates are scheduled (see :class:`LRScheduler`).
    step_size : int
        Epochs between decays.
    gamma : float, default 0.1
        Multiplicative factor of each decay.

    Raises
    ------
    ValueError
        If `step_size` is not a positive integer.
    TypeError
        If `optimizer` is not a :class:`Optimizer`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn, optim
    >>> opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=1.0)
    >>> sched = optim.StepLR(opt, step_size=2, gamma=0.5)
    >>> lrs = []
    >>> for epoch in range(5):
    ...     lrs.append(sched.get_last_lr()[0])
    ...     sched.step()
    >>> lrs
    [1.0, 1.0, 0.5, 0.5, 0.25]
    """

    def __init__(self, optimizer, step_size, gamma=0.1):
        if isinstance(step_size, bool) or not isinstance(step_size, numbers.Integral) \
                or step_size < 1:
            raise ValueError(f"step_size must be a positive integer, got {step_size!r}")
        self.step_size = int(step_size)
        self.gamma = float(gamma)
        super().__init__(optimizer)

    def lr_at(self, base_lr, epoch):
        return base_lr * self.gamma ** (epoch // self.step_size)


class MultiStepLR(LRScheduler):
    """``lr = base_lr * gamma ** (number of milestones <= epoch)``.

    Parameters
    ----------
    optimizer : Optimizer
        The optimizer whose learning rates are scheduled (see :class:`LRScheduler`).
    milestones : iterable of int
        Epochs at which the rate is multiplied by `gamma` (any order).
    gamma : float, default 0.1
        Multiplicative factor of each decay.

    Raises
    ------
    TypeError
        If `optimizer` is not a :class:`Optimizer`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn, optim
    >>> opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=1.0)
    >>> sched = optim.MultiStepLR(opt, milestones=[1, 3], gamma=0.1)
    >>> lrs = []
    >>> for epoch in range(5):
    ...     lrs.append(round(sched.get_last_lr()[0], 6))
    ...     sched.step()
    >>> lrs
    [1.0, 0.1, 0.1, 0.01, 0.01]
    """

    def __init__(self, optimizer, milestones, gamma=0.1):
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        super().__init__(optimizer)

    def lr_at(self, base_lr, epoch):
        return base_lr * self.gamma ** sum(1 for m in self.milestones if m <= epoch)


class ExponentialLR(LRScheduler):
    """``lr = base_lr * gamma ** epoch``.

    Parameters
    ----------
    optimizer : Optimizer
        The optimizer whose learning rates are scheduled (see :class:`LRScheduler`).
    gamma : float
        Multiplicative factor per epoch.

    Raises
    ------
    TypeError
        If `optimizer` is not a :class:`Optimizer`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn, optim
    >>> opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=1.0)
    >>> sched = optim.ExponentialLR(opt, gamma=0.5)
    >>> lrs = []
    >>> for epoch in range(4):
    ...     lrs.append(sched.get_last_lr()[0])
    ...     sched.step()
    >>> lrs
    [1.0, 0.5, 0.25, 0.125]
    """

    def __init__(self, optimizer, gamma):
        self.gamma = float(gamma)
        super().__init__(optimizer)

    def lr_at(self, base_lr, epoch):
        return base_lr * self.gamma ** epoch


class CosineAnnealingLR(LRScheduler):
    """``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2``.

    Parameters
    ----------
    optimizer : Optimizer
        The optimizer whose learning rates are scheduled (see :class:`LRScheduler`).
    T_max : int
        Half-period in epochs.
    eta_min : float, default 0
        The rate at epoch `T_max`.

    Raises
    ------
    ValueError
        If `T_max` is not a positive integer.
    TypeError
        If `optimizer` is not a :class:`Optimizer`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn, optim
    >>> opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=1.0)
    >>> sched = optim.CosineAnnealingLR(opt, T_max=4)
    >>> lrs = []
    >>> for epoch in range(5):
    ...     lrs.append(round(sched.get_last_lr()[0], 4))
    ...     sched.step()
    >>> lrs
    [1.0, 0.8536, 0.5, 0.1464, 0.0]
    """

    def __init__(self, optimizer, T_max, eta_min=0.0):
        if isinstance(T_max, bool) or not isinstance(T_max, numbers.Integral) or T_max < 1:
            raise ValueError(f"T_max must be a positive integer, got {T_max!r}")
        self.T_max = int(T_max)
        self.eta_min = float(eta_min)
        super().__init__(optimizer)

    def lr_at(self, base_lr, epoch):
        return self.eta_min + (base_lr - self.eta_min) * (
            1 + math.cos(math.pi * epoch / self.T_max)) / 2
