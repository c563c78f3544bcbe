"""Experiment 1: Figure 1 of Ioffe & Szegedy (2015), Section 4.1.

A 784-100-100-100-10 network with sigmoid hidden units, trained on MNIST with mini-batches
of 60 for 50,000 steps, with and without batch norm on every hidden layer (no bias before
batch norm).  Recorded every `eval_every` steps: test accuracy, and the 15th, 50th and
85th percentiles of the input to one fixed sigmoid of the last hidden layer over the test
set.

What the paper does not state, and what is used here (the documentation's
'Reproducing the paper' page says why):
optimizer SGD with momentum 0.9, learning rate 0.01, no weight decay, no schedule;
weights ``N(0, 0.1^2)`` in every layer and zero biases; batch-norm eps 1e-5 and running-
average momentum 0.1; unit 0 of the last hidden layer for the percentiles.

Under ``mpiexec -n P`` the run is data-parallel (:mod:`bnfast.distributed`): every global
mini-batch of `batch_size` is split across the P ranks, batch norm is synchronized (its
statistics are those of the global batch), gradients are summed over the ranks, and the
test set is split for evaluation; only rank 0 prints and writes files.  The curves are those
of one process with the same global batch, up to float32 rounding of the gradient sums.

The batch-norm network is evaluated two ways: with population statistics (Algorithm 2:
E[mu_B] and m/(m-1) E[var_B] over `pop_batches` fixed training mini-batches of 60) and
with the running averages kept during training.  The percentiles of the batch-norm network
are those of the population-statistics network.
"""
import copy
import time
from pathlib import Path

import numpy as np

from .. import distributed, nn, optim
from ..train import iterate_minibatches
from . import common

__all__ = ["PAPER_FIG1", "PAPER_FIG1_PERCENTILES", "DEFAULTS", "build_mlp", "probe_index",
           "run", "table_rows", "format_table", "plot", "save", "main_run"]

#: Figure 1(a), test accuracy read off the paper's figure: step -> (without BN, with BN).
PAPER_FIG1 = {5000: (0.784, 0.956), 10000: (0.926, 0.965), 20000: (0.962, 0.974),
              30000: (0.967, 0.978), 40000: (0.972, 0.980), 50000: (0.972, 0.981)}

#: Figure 1(b, c): (15th, 50th, 85th) percentiles read off the paper's figure,
#: at the start, at a tenth of training and at the end.
PAPER_FIG1_PERCENTILES = {
    "nobn": {"start": (0.76, 0.79, 0.82), "tenth": (-0.85, 0.99, 2.07),
             "end": (-1.86, -0.01, 1.69)},
    "bn": {"start": (-1.05, -0.15, 1.26), "end": (-1.95, 0.02, 1.98)},
}

TABLE_STEPS = (5000, 10000, 20000, 30000, 40000, 50000)

DEFAULTS = dict(steps=50000, eval_every=500, batch_size=60, optimizer="sgd", lr=0.01,
                momentum=0.9, init_std=0.1, eps=1e-5, bn_momentum=0.1, seed=0, unit=0,
                pop_batches=100, hidden=(100, 100, 100))

NETS = (("nobn", "without BN"), ("bn", "with BN"))


def build_mlp(bn, *, hidden=(100, 100, 100), init_std=0.1, eps=1e-5, bn_momentum=0.1,
              seed=0):
    """The paper's MNIST network: 784-100-100-100-10, sigmoid hidden units.

    Weights are drawn from ``N(0, init_std^2)`` (the same draws with and without batch
    norm for a given seed), biases are zero; with `bn` every hidden Linear has no bias and
    is followed by ``BatchNorm1d`` before its sigmoid.

    Parameters
    ----------
    bn : bool
        Batch norm on every hidden layer.
    hidden : sequence of int, default (100, 100, 100)
        Widths of the hidden layers.
    init_std : float, default 0.1
        Standard deviation of the initial weights.
    eps, bn_momentum : float, default 1e-5, 0.1
        Of the ``BatchNorm1d`` layers.
    seed : int, default 0
        Seed of the initial weights.

    Returns
    -------
    bnfast.nn.Sequential
        ``Linear, [BatchNorm1d,] Sigmoid`` per hidden layer, then ``Linear`` to 10 outputs.

    Examples
    --------
    >>> model = build_mlp(True, hidden=(16, 8))
    >>> [type(m).__name__ for m in model]              # doctest: +NORMALIZE_WHITESPACE
    ['Linear', 'BatchNorm1d', 'Sigmoid', 'Linear', 'BatchNorm1d', 'Sigmoid', 'Linear']
    >>> model[0].bias is None, model[-1].weight.shape
    (True, (10, 8))
    >>> import numpy as np
    >>> plain = build_mlp(False, hidden=(16, 8))       # same seed: the same weights
    >>> bool(np.array_equal(plain[0].weight.data, model[0].weight.data))
    True
    """
    rng = np.random.default_rng(seed)
    sizes = [784] + list(hidden) + [10]
    layers = []
    for k, (d, h) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = k == len(sizes) - 2
        lin = nn.Linear(d, h, bias=last or not bn)
        lin.weight.data[...] = rng.normal(0.0, init_std, size=(h, d))
        if lin.bias is not None:
            lin.bias.data[...] = 0
        layers.append(lin)
        if not last:
            if bn:
                layers.append(nn.BatchNorm1d(h, eps=eps, momentum=bn_momentum))
            layers.append(nn.Sigmoid())
    model = nn.Sequential(*layers)
    model[0].needs_input_grad = False
    return model


def probe_index(model):
    """Index of the layer whose output is the input of the last hidden sigmoid.

    Parameters
    ----------
    model : bnfast.nn.Sequential
        A network as built by :func:`build_mlp`.

    Returns
    -------
    int
        The index of the layer just before the last ``Sigmoid``.

    Raises
    ------
    ValueError
        The model has no ``Sigmoid`` layer.

    Examples
    --------
    >>> probe_index(build_mlp(False, hidden=(8, 8)))   # Linear, Sigmoid, Linear, Sigmoid, ...
    2
    >>> probe_index(build_mlp(True, hidden=(8, 8)))    # ..., Linear, BatchNorm1d, Sigmoid, ...
    4
    >>> from bnfast import nn
    >>> probe_index(nn.Sequential(nn.Linear(2, 2)))
    Traceback (most recent call last):
        ...
    ValueError: the model has no Sigmoid layer
    """
    idx = [i for i, m in enumerate(model) if isinstance(m, nn.Sigmoid)]
    if not idx:
        raise ValueError("the model has no Sigmoid layer")
    return idx[-1] - 1


def _make_optimizer(name, params, lr, momentum):
    if name == "sgd":
        return optim.SGD(params, lr=lr, momentum=momentum)
    if name == "nesterov":
        return optim.SGD(params, lr=lr, momentum=momentum, nesterov=True)
    if name == "adam":
        return optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r} (sgd, nesterov, adam)")


def _eval_points(steps, every):
    pts = list(range(0, steps + 1, every))
    if pts[-1] != steps:
        pts.append(steps)
    return pts


def run(data, *, steps=50000, eval_every=500, batch_size=60, optimizer="sgd", lr=0.01,
        momentum=0.9, init_std=0.1, eps=1e-5, bn_momentum=0.1, seed=0, unit=0,
        pop_batches=100, hidden=(100, 100, 100), nets=("nobn", "bn"), progress=True,
        eval_size=None, threads=1, comm=None, checkpoint=None, resume=False, device="cpu"):
    """Train the two networks and record their curves.

    Parameters
    ----------
    data : common.MnistArrays
        Flat float32 inputs.
    steps, eval_every, batch_size : int
        Training steps per network (>= 1), steps between evaluations (>= 1; step 0 and the
        last step are always evaluated), and the mini-batch size (the global one with
        `comm`).
    optimizer : {'sgd', 'nesterov', 'adam'}
        SGD with momentum, SGD with Nesterov momentum, or Adam (which ignores `momentum`).
    lr, momentum, init_std, eps, bn_momentum : float
        Learning rate and momentum of the optimizer; standard deviation of the initial
        weights; `eps` and momentum of the ``BatchNorm1d`` layers (see :func:`build_mlp`).
    seed : int
        Initial weights and batch order (the same for both networks).
    unit : int
        The unit of the last hidden layer whose input is recorded.
    pop_batches : int
        Number of fixed training mini-batches for the population statistics.
    hidden : sequence of int, default (100, 100, 100)
        Widths of the hidden layers (see :func:`build_mlp`).
    nets : tuple of {'nobn', 'bn'}
        The networks to train: without and with batch norm.
    progress : bool
        Show a progress bar per network (on rank 0 only with `comm`).
    eval_size : int, optional
        Evaluate on the first `eval_size` test examples only (for quick runs).
    threads : int or None, default 1
        Threads for bnfast's kernels and the BLAS (see :func:`common.limit_threads`);
        None leaves the process's settings.
    comm : mpi4py.MPI.Comm, optional
        Train data-parallel over the ranks of `comm` (a collective call: every rank runs
        it with the same arguments): each global batch of `batch_size` is split across the
        ranks, batch norm is synchronized, the test set is split for evaluation, and every
        rank returns the same curves.  None: one process.
    checkpoint : str or os.PathLike, optional
        Write the training state there at every evaluation point (one process only; see
        :func:`common.save_checkpoint`); removed when the run completes.
    resume : bool, default False
        Continue from `checkpoint` when it exists; the curves are those of an
        uninterrupted run.
    device : {'cpu', 'cuda'}, default 'cpu'
        Train on NumPy arrays, or on CuPy arrays on the GPU (``model.to("cuda")``; each
        mini-batch is copied to the GPU; evaluation runs on a CPU copy of the model).
        Not with `comm`.

    Returns
    -------
    dict
        ``config``, ``curves`` (per net: ``step``, ``acc``, and for BN ``acc_running``;
        ``train_loss`` and percentiles ``p15``, ``p50``, ``p85``) and ``timing``.

    Raises
    ------
    ValueError
        `steps` or `eval_every` is below 1, `optimizer` is unknown, or `device` is
        ``'cuda'`` with `comm`.
    FloatingPointError
        The training loss became infinite or NaN (the learning rate is too high).
    common.CheckpointError
        With `resume`: the checkpoint is unreadable or from a run with other options.
    common.Interrupted
        On Ctrl-C; its ``results`` hold the curves up to the last evaluation point.

    Examples
    --------
    Four steps on random data (the real experiment uses :func:`common.load_mnist_arrays`):

    >>> import numpy as np
    >>> from bnfast.paper import common
    >>> rng = np.random.default_rng(0)
    >>> data = common.MnistArrays(rng.random((32, 784), dtype=np.float32), np.arange(32) % 10,
    ...                           rng.random((8, 784), dtype=np.float32), np.arange(8) % 10)
    >>> results = run(data, steps=4, eval_every=2, batch_size=8, hidden=(8, 8),
    ...               pop_batches=2, progress=False)
    >>> results["curves"]["bn"]["step"], sorted(results["curves"]["bn"])
    ([0, 2, 4], ['acc', 'acc_running', 'p15', 'p50', 'p85', 'step', 'train_loss'])
    >>> len(results["curves"]["nobn"]["p50"]), results["config"]["eval_size"]
    (3, 8)
    >>> run(data, steps=0)
    Traceback (most recent call last):
        ...
    ValueError: steps and eval_every must be >= 1
    """
    if steps < 1 or eval_every < 1:
        raise ValueError("steps and eval_every must be >= 1")
    X, y = data.X_train, data.y_train
    Xt, yt = data.X_test, data.y_test
    if eval_size is not None:
        Xt, yt = Xt[:eval_size], yt[:eval_size]
    prng = np.random.default_rng([seed, 1])
    perm = prng.permutation(len(X))
    pop_index = [perm[i * batch_size:(i + 1) * batch_size] for i in range(pop_batches)]
    points = set(_eval_points(steps, eval_every))
    config = dict(steps=steps, eval_every=eval_every, batch_size=batch_size,
                  optimizer=optimizer, lr=lr, momentum=momentum, init_std=init_std, eps=eps,
                  bn_momentum=bn_momentum, seed=seed, unit=unit, pop_batches=pop_batches,
                  hidden=list(hidden), eval_size=len(Xt), train_size=len(X),
                  ranks=1 if comm is None else comm.Get_size())
    if device != "cpu":
        if comm is not None:
            raise ValueError("device='cuda' with MPI ranks is not supported")
        config["device"] = device
    if comm is not None:
        checkpoint = None               # the models are wrapped for MPI: not saved
    ck_config = dict(config, nets=list(nets))
    saved = common.load_checkpoint(checkpoint, ck_config) if resume and checkpoint else None
    write = None
    if checkpoint is not None:
        def write(state):
            common.save_checkpoint(checkpoint, ck_config, state)
    machine = None
    try:
        with common.limit_threads(threads):
            curves, timing = _train_all(data, X, y, Xt, yt, nets, config, pop_index, points,
                                        progress, comm, checkpoint=write, saved=saved,
                                        device=device)
            machine = common.machine_info()
    except KeyboardInterrupt as exc:
        curves, timing = getattr(exc, "partial", ({}, {}))
        has = checkpoint is not None and Path(checkpoint).exists()
        raise common.Interrupted(
            checkpoint=checkpoint if has else None,
            results=_results(config, threads, curves, timing, machine) if curves else None) \
            from None
    if checkpoint is not None and Path(checkpoint).exists():
        Path(checkpoint).unlink()
    return _results(config, threads, curves, timing, machine)


def _results(config, threads, curves, timing, machine):
    config = dict(config, threads=threads)
    timing = dict(timing)
    timing["total_s"] = sum(t["train_s"] + t["eval_s"] for k, t in timing.items()
                            if isinstance(t, dict))
    return {"experiment": "mnist_fig1", "config": config, "curves": curves,
            "timing": timing, "paper": {str(k): v for k, v in PAPER_FIG1.items()},
            "paper_percentiles": PAPER_FIG1_PERCENTILES, "machine": machine}


class _Ranks:
    """This rank's part of the work in a data-parallel run (everything, in one process)."""

    def __init__(self, comm):
        self.comm = comm
        self.rank = 0 if comm is None else comm.Get_rank()
        self.size = 1 if comm is None else comm.Get_size()

    def part(self, idx):
        """This rank's part of the index array `idx` (its slice of a global batch)."""
        if self.comm is None:
            return idx
        return next(iterate_minibatches(idx, None, len(idx), shard=(self.rank, self.size)))

    def evaluate(self, model, Xt, yt, probe):
        """common.evaluate over the whole test set, each rank doing its part of it."""
        if self.comm is None:
            return common.evaluate(model, Xt, yt, probe=probe)
        acc, pre = common.evaluate(model, Xt, yt, probe=probe)
        every = self.comm.allgather((round(acc * len(yt)), len(yt), pre))
        acc = sum(e[0] for e in every) / sum(e[1] for e in every)
        return acc, None if pre is None else np.concatenate([e[2] for e in every])

    def mean_loss(self, loss_sum, loss_n):
        """The mean training loss since the last evaluation, over every rank's rows."""
        if self.comm is not None:
            every = self.comm.allgather((loss_sum, loss_n))
            loss_sum, loss_n = sum(e[0] for e in every), sum(e[1] for e in every)
        return loss_sum / loss_n if loss_n else None


def _on_cpu(model):
    """A NumPy copy of a model trained on the GPU (evaluation code is NumPy)."""
    return copy.deepcopy(model).to("cpu")


def _train_all(data, X, y, Xt, yt, nets, config, pop_index, points, progress, comm,
               checkpoint=None, saved=None, device="cpu"):
    c = config
    steps, batch_size, seed = c["steps"], c["batch_size"], c["seed"]
    saved = saved or {"curves": {}, "timing": {}, "current": None}
    curves, timing = dict(saved["curves"]), dict(saved["timing"])
    ranks = _Ranks(comm)
    progress = progress and ranks.rank == 0
    if comm is not None:
        test_part = ranks.part(np.arange(len(Xt)))
        Xt, yt = Xt[test_part], yt[test_part]
        pop_index = [ranks.part(i) for i in pop_index]
    for key in nets:
        if key in curves:               # finished before the checkpoint
            continue
        bn = key == "bn"
        label = dict(NETS)[key]
        resume = saved["current"] if (saved["current"] or {}).get("key") == key else None
        t_train, t_eval = common.Timer(), common.Timer()
        if resume is None:
            model = build_mlp(bn, hidden=c["hidden"], init_std=c["init_std"], eps=c["eps"],
                              bn_momentum=c["bn_momentum"], seed=seed)
            if device != "cpu":         # the same initial parameters, on the GPU
                model.to(device)
            batches = common.Batches(len(X), batch_size, seed)
            rec = common.PercentileRecorder()
            cur = {"step": [], "acc": [], "train_loss": []}
            if bn:
                cur["acc_running"] = []
            start, loss_sum, loss_n = 0, 0.0, 0
        else:
            model, opt, batches = resume["model"], None, resume["batches"]
            rec, cur = resume["rec"], resume["cur"]
            start, loss_sum, loss_n = resume["step"], resume["loss_sum"], resume["loss_n"]
            t_train.seconds, t_eval.seconds = resume["train_s"], resume["eval_s"]
        probe = (probe_index(model), c["unit"])
        trained = model
        if comm is not None:
            model = distributed.convert_sync_batchnorm(model, comm)
            trained = distributed.DistributedDataParallel(model, comm)
        opt = _make_optimizer(c["optimizer"], model.parameters(), c["lr"], c["momentum"])
        if resume is not None:          # its state is keyed by the parameters' ids
            opt.load_state_dict(resume["opt"])
        loss_fn = nn.CrossEntropyLoss()

        def evaluate(step):
            with t_eval:
                ev = model if device == "cpu" else _on_cpu(model)
                if bn:
                    acc_run, _ = ranks.evaluate(ev, Xt, yt, None)
                    pop = common.population_copy(ev, X, pop_index)
                    acc, pre = ranks.evaluate(pop, Xt, yt, probe)
                    cur["acc_running"].append(acc_run)
                else:
                    acc, pre = ranks.evaluate(ev, Xt, yt, probe)
                rec.record(step, pre)
                cur["step"].append(step)
                cur["acc"].append(acc)
                cur["train_loss"].append(ranks.mean_loss(loss_sum, loss_n))
            return acc

        def save_state(step):
            if checkpoint is not None:
                checkpoint({"curves": curves, "timing": timing, "current": {
                    "key": key, "model": model, "opt": opt.state_dict(), "batches": batches,
                    "rec": rec,
                    "cur": cur, "step": step, "loss_sum": loss_sum, "loss_n": loss_n,
                    "train_s": t_train.seconds, "eval_s": t_eval.seconds}})

        try:
            if resume is None:
                evaluate(0)
                save_state(0)
            with common.progress_bar(steps, f"MNIST MLP {label}", progress) as bar:
                bar.update(start)
                for step in range(start + 1, steps + 1):
                    idx = ranks.part(batches.next())
                    with t_train:
                        xb, yb = X[idx], y[idx]
                        if device != "cpu":     # the batch to the GPU
                            from .. import _xp
                            xb, yb = _xp.to_device(xb, device), _xp.to_device(yb, device)
                        loss = common.train_step(trained, loss_fn, opt, xb, yb)
                    if not np.isfinite(loss):
                        raise FloatingPointError(f"{label}: loss became {loss} at step "
                                                 f"{step}; lower the learning rate")
                    if comm is None:
                        loss_sum += loss
                        loss_n += 1
                    else:           # weighted by this rank's rows, combined at evaluation
                        loss_sum += loss * len(idx)
                        loss_n += len(idx)
                    if step in points:
                        acc = evaluate(step)
                        loss_sum, loss_n = 0.0, 0
                        save_state(step)
                        bar.set_postfix(test_acc=f"{acc:.4f}", refresh=False)
                    bar.update(1)
        except KeyboardInterrupt as exc:
            n = min(len(cur["step"]), len(rec))     # drop a half-recorded evaluation
            for v in cur.values():
                del v[n:]
            del rec.steps[n:], rec.values[n:]
            if n:
                curves[key] = dict(cur, **rec.as_dict())
                timing[key] = {"train_s": t_train.seconds, "eval_s": t_eval.seconds,
                               "ms_per_step": 1e3 * t_train.seconds / max(1, cur["step"][-1])}
            exc.partial = (curves, timing)
            raise
        cur.update(rec.as_dict())
        curves[key] = cur
        timing[key] = {"train_s": t_train.seconds, "eval_s": t_eval.seconds,
                       "ms_per_step": 1e3 * t_train.seconds / steps}
    return curves, timing


def _at(curve, step, key="acc"):
    """Value of `key` at `step`, or None if that step was not evaluated."""
    try:
        i = curve["step"].index(step)
    except ValueError:
        return None
    return curve[key][i]


def table_rows(results):
    """Rows ``{step, paper_nobn, nobn, paper_bn, bn, bn_running}`` at the paper's steps.

    Parameters
    ----------
    results : dict
        As returned by :func:`run` (``config`` and ``curves`` are used).

    Returns
    -------
    list of dict
        One row per step of :data:`PAPER_FIG1` up to the run's steps; None where a
        network was not run or the step was not evaluated.

    Examples
    --------
    >>> results = {"config": {"steps": 10000, "unit": 0},
    ...            "curves": {"nobn": {"step": [0, 5000, 10000], "acc": [0.1, 0.8, 0.9]},
    ...                       "bn": {"step": [0, 5000, 10000], "acc": [0.1, 0.95, 0.96],
    ...                              "acc_running": [0.1, 0.94, 0.96]}}}
    >>> for row in table_rows(results):
    ...     print(row)
    {'step': 5000, 'paper_nobn': 0.784, 'nobn': 0.8, 'paper_bn': 0.956, 'bn': 0.95, 'bn_running': 0.94}
    {'step': 10000, 'paper_nobn': 0.926, 'nobn': 0.9, 'paper_bn': 0.965, 'bn': 0.96, 'bn_running': 0.96}
    """
    rows = []
    c = results["curves"]
    for s in TABLE_STEPS:
        if s > results["config"]["steps"]:
            break
        pn, pb = PAPER_FIG1[s]
        rows.append({"step": s, "paper_nobn": pn,
                     "nobn": _at(c["nobn"], s) if "nobn" in c else None,
                     "paper_bn": pb,
                     "bn": _at(c["bn"], s) if "bn" in c else None,
                     "bn_running": _at(c["bn"], s, "acc_running") if "bn" in c else None})
    return rows


def format_table(results):
    """Markdown table of test accuracy at 5K..50K steps beside the paper's figures.

    Parameters
    ----------
    results : dict
        As returned by :func:`run`.

    Returns
    -------
    str
        The rows of :func:`table_rows`; a run shorter than 5,000 steps gets one row with
        its final accuracies.

    Examples
    --------
    >>> results = {"config": {"steps": 10000, "unit": 0},
    ...            "curves": {"nobn": {"step": [0, 5000, 10000], "acc": [0.1, 0.8, 0.9]},
    ...                       "bn": {"step": [0, 5000, 10000], "acc": [0.1, 0.95, 0.96],
    ...                              "acc_running": [0.1, 0.94, 0.96]}}}
    >>> print(format_table(results))                 # doctest: +NORMALIZE_WHITESPACE
    | steps | paper, without BN | ours, without BN | paper, with BN | ours, with BN (population) | ours, with BN (running avg.) |
    | ---: | ---: | ---: | ---: | ---: | ---: |
    | 5K | 0.784 | 0.800 | 0.956 | 0.950 | 0.940 |
    | 10K | 0.926 | 0.900 | 0.965 | 0.960 | 0.960 |
    """
    def f(v):
        return "" if v is None else f"{v:.3f}"

    lines = ["| steps | paper, without BN | ours, without BN | paper, with BN "
             "| ours, with BN (population) | ours, with BN (running avg.) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in table_rows(results):
        lines.append(f"| {r['step'] // 1000}K | {f(r['paper_nobn'])} | {f(r['nobn'])} "
                     f"| {f(r['paper_bn'])} | {f(r['bn'])} | {f(r['bn_running'])} |")
    if len(lines) == 2:
        steps = results["config"]["steps"]
        c = results["curves"]
        lines.append(f"| {steps} | | {f(c['nobn']['acc'][-1]) if 'nobn' in c else ''} | "
                     f"| {f(c['bn']['acc'][-1]) if 'bn' in c else ''} "
                     f"| {f(c['bn']['acc_running'][-1]) if 'bn' in c else ''} |")
    return "\n".join(lines)


def format_percentiles(results):
    """Markdown table of the recorded percentiles at the start, a tenth, and the end.

    The rows are labelled by the steps the run evaluated; the paper's values stand beside
    a row only when the run is the full one (its "tenth" is step 5,000 of 50,000, its "end"
    step 50,000), and a "tenth" row is shown only when an evaluation point lies strictly
    between the start and the end.

    Examples
    --------
    >>> cur = {"step": [0, 100, 200], "p15": [0.1, 0.2, 0.3], "p50": [0.5, 0.6, 0.7],
    ...        "p85": [0.9, 1.0, 1.1]}
    >>> print(format_percentiles({"config": {"steps": 200}, "curves": {"nobn": cur}}))
    | network | when | paper (15th / 50th / 85th) | ours (15th / 50th / 85th) |
    | --- | --- | --- | --- |
    | without BN | start (step 0) | 0.76 / 0.79 / 0.82 | 0.10 / 0.50 / 0.90 |
    | without BN | step 200 (the paper's end is step 50000) |  | 0.30 / 0.70 / 1.10 |
    """
    lines = ["| network | when | paper (15th / 50th / 85th) | ours (15th / 50th / 85th) |",
             "| --- | --- | --- | --- |"]
    steps = results["config"]["steps"]
    full = steps == DEFAULTS["steps"]
    for key, label in NETS:
        cur = results["curves"].get(key)
        if cur is None or not cur["step"]:
            continue
        paper = PAPER_FIG1_PERCENTILES[key]
        have = np.asarray(cur["step"])
        last = int(have[-1])
        rows = [("start", 0)]
        i10 = int(np.argmin(np.abs(have - last // 10)))
        if 0 < have[i10] < last:
            rows.append(("tenth", int(have[i10])))
        if last > 0:
            rows.append(("end", last))
        for when, target in rows:
            i = int(np.argmin(np.abs(have - target)))
            s = int(have[i])
            ours = " / ".join(f"{cur[k][i]:.2f}" for k in ("p15", "p50", "p85"))
            p = paper.get(when)
            paper_step = {"start": 0, "tenth": DEFAULTS["steps"] // 10,
                          "end": DEFAULTS["steps"]}[when]
            if p and (full or s == paper_step):
                ps = " / ".join(f"{v:.2f}" for v in p)
                what = f"{when} (step {s})"
            else:
                ps = ""
                what = f"step {s} (the paper's {when} is step {paper_step})"
            lines.append(f"| {label} | {what} | {ps} | {ours} |")
    return "\n".join(lines)


def plot(results, path):
    """The three panels of Figure 1: (a) test accuracy, (b) without BN, (c) with BN.

    Uses matplotlib's non-interactive Agg backend.

    Parameters
    ----------
    results : dict
        As returned by :func:`run`.
    path : str or os.PathLike
        The image file to write (its format from the suffix, e.g. ``.png``).

    Returns
    -------
    str or os.PathLike
        `path`.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from bnfast.paper import common
    >>> rng = np.random.default_rng(0)
    >>> data = common.MnistArrays(rng.random((32, 784), dtype=np.float32), np.arange(32) % 10,
    ...                           rng.random((8, 784), dtype=np.float32), np.arange(8) % 10)
    >>> results = run(data, steps=4, eval_every=2, batch_size=8, hidden=(8, 8),
    ...               pop_batches=2, progress=False)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = plot(results, os.path.join(tmp.name, "fig1.png"))
    >>> os.path.getsize(path) > 0
    True
    >>> tmp.cleanup()
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = results["curves"]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = {"nobn": "tab:blue", "bn": "tab:red"}
    for key, label in NETS:
        if key not in c:
            continue
        ax[0].plot(c[key]["step"], c[key]["acc"], color=colors[key], label=label)
    steps = results["config"]["steps"]
    ps = [s for s in PAPER_FIG1 if s <= steps]
    if ps:
        ax[0].plot(ps, [PAPER_FIG1[s][0] for s in ps], "o", mfc="none", color=colors["nobn"],
                   label="paper, without BN")
        ax[0].plot(ps, [PAPER_FIG1[s][1] for s in ps], "s", mfc="none", color=colors["bn"],
                   label="paper, with BN")
    ax[0].set_ylim(0.7, 1.0)
    ax[0].set_xlabel("training steps")
    ax[0].set_ylabel("test accuracy")
    ax[0].set_title("(a)")
    ax[0].legend(loc="lower right", fontsize=8)
    ax[0].grid(alpha=0.3)
    for k, (key, label) in enumerate(NETS, start=1):
        a = ax[k]
        if key in c:
            cur = c[key]
            for p, style in (("p15", ":"), ("p50", "-"), ("p85", "--")):
                a.plot(cur["step"], cur[p], style, color="k", lw=1.2, label=p[1:] + "th")
        a.set_title(f"({'bc'[k - 1]}) {label}")
        a.set_xlabel("training steps")
        a.set_ylim(-3, 3)
        a.grid(alpha=0.3)
        a.legend(loc="upper right", fontsize=8)
    ax[1].set_ylabel(f"input to sigmoid (unit {results['config']['unit']}, last hidden layer)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save(results, out_dir, *, make_plot=True):
    """Write ``mnist_fig1.json``, ``mnist_fig1.csv``, ``mnist_fig1_table.md`` and
    ``mnist_fig1.png`` into `out_dir`; return the paths.

    Parameters
    ----------
    results : dict
        As returned by :func:`run`.
    out_dir : str or os.PathLike
        The folder (created if missing).
    make_plot : bool, default True
        Also write the figure (needs matplotlib; see :func:`plot`).

    Returns
    -------
    list of pathlib.Path
        The files written.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from bnfast.paper import common
    >>> rng = np.random.default_rng(0)
    >>> data = common.MnistArrays(rng.random((32, 784), dtype=np.float32), np.arange(32) % 10,
    ...                           rng.random((8, 784), dtype=np.float32), np.arange(8) % 10)
    >>> results = run(data, steps=4, eval_every=2, batch_size=8, hidden=(8, 8),
    ...               pop_batches=2, progress=False)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> [p.name for p in save(results, tmp.name, make_plot=False)]
    ['mnist_fig1.json', 'mnist_fig1.csv', 'mnist_fig1_table.md']
    >>> tmp.cleanup()
    """
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [common.write_json(out / "mnist_fig1.json", results)]
    rows = []
    for key, cur in results["curves"].items():
        for i, s in enumerate(cur["step"]):
            rows.append({"net": key, "step": s, "test_acc": cur["acc"][i],
                         "test_acc_running": (cur["acc_running"][i]
                                              if "acc_running" in cur else None),
                         "train_loss": cur["train_loss"][i], "p15": cur["p15"][i],
                         "p50": cur["p50"][i], "p85": cur["p85"][i]})
    paths.append(common.write_csv(out / "mnist_fig1.csv", rows,
                                  ["net", "step", "test_acc", "test_acc_running",
                                   "train_loss", "p15", "p50", "p85"]))
    md = out / "mnist_fig1_table.md"
    md.write_text(format_table(results) + "\n\n" + format_percentiles(results) + "\n\n"
                  + timing_line(results) + "\n")
    paths.append(md)
    if make_plot:
        paths.append(plot(results, out / "mnist_fig1.png"))
    return paths


def timing_line(results):
    t = results["timing"]
    parts = []
    for key, label in NETS:
        if key in t:
            parts.append(f"{label}: {t[key]['train_s']:.1f} s training "
                         f"({t[key]['ms_per_step']:.3f} ms/step) + {t[key]['eval_s']:.1f} s "
                         f"evaluation")
    ranks = results["config"].get("ranks", 1)
    on = f" on each of {ranks} MPI ranks" if ranks > 1 else ""
    return (f"Run time {t['total_s']:.1f} s{on} for {results['config']['steps']} steps per "
            f"network ({'; '.join(parts)}).")


def main_run(args):
    """Run from parsed command-line arguments (see :mod:`bnfast.paper.cli`).

    Loads MNIST, runs :func:`run`, writes the files of :func:`save` into ``args.out`` and
    prints the tables.  Started by an MPI launcher with several processes
    (``mpiexec -n 2 bnfast paper mnist``), it trains data-parallel over them
    (see :func:`run`'s `comm`), and only rank 0 prints and writes.

    Parameters
    ----------
    args : argparse.Namespace
        The ``mnist`` command's arguments, from :func:`bnfast.paper.cli.build_parser`.

    Returns
    -------
    dict
        The results of :func:`run`, with ``timing["wall_s"]`` and ``data_source`` added.

    Raises
    ------
    bnfast.datasets.DatasetError
        MNIST could not be loaded (see :func:`common.load_mnist_arrays`).
    ValueError, FloatingPointError
        From :func:`run`.

    Examples
    --------
    Two steps on home-made 28x28 IDX files (checksums switched off for them), the
    printed tables discarded:

    >>> import contextlib, io, struct, tempfile
    >>> from pathlib import Path
    >>> from unittest import mock
    >>> import numpy as np
    >>> from bnfast import datasets
    >>> from bnfast.paper import cli
    >>> def idx(dims, values):
    ...     head = struct.pack(">BBBB", 0, 0, 0x08, len(dims))
    ...     return head + struct.pack(f">{len(dims)}I", *dims) + bytes(values)
    >>> rng = np.random.default_rng(0)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = Path(tmp.name)
    >>> files = {"train_images": idx((20, 28, 28), rng.integers(0, 256, 20 * 784).tolist()),
    ...          "train_labels": idx((20,), [i % 10 for i in range(20)]),
    ...          "test_images": idx((10, 28, 28), rng.integers(0, 256, 10 * 784).tolist()),
    ...          "test_labels": idx((10,), list(range(10)))}
    >>> for role, blob in files.items():
    ...     _ = (folder / datasets.MNIST_FILES[role]).write_bytes(blob)
    >>> args = cli.build_parser().parse_args(
    ...     ["mnist", "--data-dir", str(folder), "--out", str(folder / "out"), "--steps", "2",
    ...      "--eval-every", "1", "--batch-size", "4", "--pop-batches", "2", "--no-progress",
    ...      "--no-plot"])
    >>> with mock.patch.dict(datasets.MNIST_SHA256, clear=True), \\
    ...         contextlib.redirect_stdout(io.StringIO()):
    ...     results = main_run(args)
    >>> results["curves"]["bn"]["step"], sorted(p.name for p in (folder / "out").iterdir())
    ([0, 1, 2], ['mnist_fig1.csv', 'mnist_fig1.json', 'mnist_fig1_table.md'])
    >>> tmp.cleanup()
    """
    t0 = time.perf_counter()
    comm = distributed.get_comm() if distributed.launched_size() > 1 else None
    if comm is None:
        data = common.load_mnist_arrays(args.data_dir)
    else:
        distributed.abort_on_exception(comm)
        if comm.Get_rank() == 0:                # rank 0 first: it may download the files
            data = common.load_mnist_arrays(args.data_dir)
        comm.Barrier()
        if comm.Get_rank() != 0:
            data = common.load_mnist_arrays(args.data_dir)
    from pathlib import Path

    ckpt = Path(args.out) / "mnist_fig1.checkpoint.pkl"
    if getattr(args, "resume", False) and not ckpt.exists() and \
            (comm is None or comm.Get_rank() == 0):
        print(f"no checkpoint {ckpt}: starting from the beginning", flush=True)
    try:
        results = run(data, steps=args.steps, eval_every=args.eval_every,
                      batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                      momentum=args.momentum, init_std=args.init_std, eps=args.eps,
                      seed=args.seed, unit=args.unit, pop_batches=args.pop_batches,
                      progress=not args.no_progress, threads=args.threads or None, comm=comm,
                      checkpoint=ckpt, resume=getattr(args, "resume", False),
                      device=getattr(args, "device", "cpu"))
    except common.Interrupted as exc:
        if exc.results is not None and (comm is None or comm.Get_rank() == 0):
            exc.results["interrupted"] = True
            exc.results["data_source"] = data.source
            exc.paths = save(exc.results, args.out, make_plot=False)
        raise
    results["timing"]["wall_s"] = time.perf_counter() - t0
    results["data_source"] = data.source
    if comm is not None and comm.Get_rank() != 0:
        return results                          # rank 0 prints and writes the files
    paths = save(results, args.out, make_plot=not args.no_plot)
    print()
    print("Test accuracy (Figure 1a); paper's values read off its figure:")
    print(format_table(results))
    print()
    print("Input to the last hidden layer's sigmoid (Figure 1b, c):")
    print(format_percentiles(results))
    print()
    print(timing_line(results) + f" Wall time {results['timing']['wall_s']:.1f} s.")
    print("Wrote " + ", ".join(str(p) for p in paths))
    return results
