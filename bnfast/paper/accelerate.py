"""Experiment 2: accelerating batch-norm networks (Section 4.2 and Figure 3 of the paper),
on a small convolutional network on MNIST.

The paper trains Inception on ImageNet and shows that batch norm alone (BN-Baseline)
reaches the baseline's best accuracy in fewer steps, and that with the changes of Section
4.2.1 (learning rate x5 or x30, no dropout, L2 weight decay /5, learning-rate decay 6x
faster) it does so 14x faster; batch norm also makes a sigmoid network trainable.  Here the
same recipe is applied to::

    conv 3x3, 1->8, pad 1  [BN]  act  max-pool 2      28x28 -> 14x14
    conv 3x3, 8->16, pad 1 [BN]  act  max-pool 2      14x14 -> 7x7
    flatten (784) -> linear 64 [BN] act [dropout 0.4] -> linear 10

(act = ReLU, or sigmoid for the -Sigmoid variants; no bias before BN; PyTorch's default
initialisation; channels-last memory order), trained with SGD, momentum 0.9, mini-batches
of 64 drawn from the 60,000 training images, for the same number of steps for every
variant.  Variants:

==================  ====  =======  ==========  ============  ==========
variant             BN    lr       dropout     weight decay  lr half-life
==================  ====  =======  ==========  ============  ==========
Baseline            no    0.02     0.4         5e-4          steps/2
BN-Baseline         yes   0.02     0.4         5e-4          steps/2
BN-x5               yes   0.1      none        1e-4          steps/12
BN-x30              yes   0.6      none        1e-4          steps/12
BN-x5-Sigmoid       yes   0.1      none        1e-4          steps/12
Baseline-Sigmoid    no    0.02     0.4         5e-4          steps/2
==================  ====  =======  ==========  ============  ==========

The learning rate decays exponentially every step, ``lr0 * 0.5 ** (step / half_life)``;
weight decay applies to the convolution and linear weights only.  Test accuracy (10,000
images; batch norm with its running averages) is recorded every `eval_every` steps; the
table gives, per variant, the first evaluated step at which it reaches the Baseline's
maximum test accuracy, and its own maximum.  At the end the batch-norm networks are also
evaluated with population statistics (Algorithm 2).
"""
import time
from pathlib import Path

import numpy as np

from .. import nn, optim
from . import common

__all__ = ["VARIANTS", "PAPER_FIG3", "build_convnet", "run", "summarize", "format_table",
           "plot", "save", "main_run"]

#: name -> (batch norm, activation, lr multiplier, dropout, weight-decay divisor,
#:          decay speed-up)
VARIANTS = {
    "Baseline": dict(bn=False, act="relu", lr_mult=1, dropout=True, wd_div=1, decay_mult=1),
    "BN-Baseline": dict(bn=True, act="relu", lr_mult=1, dropout=True, wd_div=1, decay_mult=1),
    "BN-x5": dict(bn=True, act="relu", lr_mult=5, dropout=False, wd_div=5, decay_mult=6),
    "BN-x30": dict(bn=True, act="relu", lr_mult=30, dropout=False, wd_div=5, decay_mult=6),
    "BN-x5-Sigmoid": dict(bn=True, act="sigmoid", lr_mult=5, dropout=False, wd_div=5,
                          decay_mult=6),
    "Baseline-Sigmoid": dict(bn=False, act="sigmoid", lr_mult=1, dropout=True, wd_div=1,
                             decay_mult=1),
}

#: Figure 3 of the paper (Inception on ImageNet): steps to reach the baseline's 72.2%
#: top-1 accuracy, and the maximum accuracy (None: not reached / not given).
PAPER_FIG3 = {
    "Baseline": ("31.0M", 0.722),
    "BN-Baseline": ("13.3M", 0.727),
    "BN-x5": ("2.1M", 0.730),
    "BN-x30": ("2.7M", 0.748),
    "BN-x5-Sigmoid": (None, 0.698),
    "Baseline-Sigmoid": (None, None),      # "remained at the accuracy equivalent to chance"
}

DEFAULTS = dict(steps=6000, eval_every=100, batch_size=64, lr=0.02, momentum=0.9,
                weight_decay=5e-4, dropout=0.4, half_life_frac=1 / 2, seed=0,
                channels=(8, 16), hidden=64, pop_batches=50)
QUICK = dict(steps=1200, eval_every=100, eval_size=2000)


def build_convnet(bn, act="relu", *, dropout=0.0, channels=(8, 16), hidden=64, seed=0):
    """The small MNIST convolutional network (channels-last input ``(N, 28, 28, 1)``).

    Parameters
    ----------
    bn : bool
        Batch norm after every convolution and the hidden linear layer (which then have
        no bias); with ReLU the batch norm and the ReLU are fused.
    act : {'relu', 'sigmoid'}, default 'relu'
        The activation.
    dropout : float, default 0.0
        Dropout rate after the hidden linear layer (0: none).
    channels : (int, int), default (8, 16)
        Output channels of the two convolutions.
    hidden : int, default 64
        Width of the hidden linear layer.
    seed : int, default 0
        Seed of the initial weights and of the dropout masks.

    Returns
    -------
    bnfast.nn.Sequential
        The network, in training mode, channels-last: convolution, [batch norm,] activation
        and max pooling twice, then ``Flatten``, the hidden ``Linear``, [batch norm,] the
        activation, [``Dropout``,] and a ``Linear`` to 10 outputs; a ReLU is fused into the
        batch norm before it.

    Raises
    ------
    ValueError
        `act` is neither ``'relu'`` nor ``'sigmoid'``.

    Examples
    --------
    >>> import numpy as np
    >>> model = build_convnet(True, channels=(2, 4), hidden=8)
    >>> [type(m).__name__ for m in model]              # doctest: +NORMALIZE_WHITESPACE
    ['Conv2d', 'BatchNorm2d', 'MaxPool2d', 'Conv2d', 'BatchNorm2d', 'MaxPool2d', 'Flatten',
     'Linear', 'BatchNorm1d', 'Linear']
    >>> x = np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)
    >>> model.forward(x).shape
    (3, 10)
    >>> build_convnet(False, "tanh")
    Traceback (most recent call last):
        ...
    ValueError: act must be 'relu' or 'sigmoid', got 'tanh'
    """
    rng = np.random.default_rng(seed)
    c1, c2 = channels
    layers = []

    def activation(C, two_d):
        if bn:
            fuse = act == "relu"
            layers.append(nn.BatchNorm2d(C, channels_last=True, relu=fuse) if two_d
                          else nn.BatchNorm1d(C, relu=fuse))
            if fuse:
                return
        layers.append(nn.ReLU() if act == "relu" else nn.Sigmoid())

    if act not in ("relu", "sigmoid"):
        raise ValueError(f"act must be 'relu' or 'sigmoid', got {act!r}")
    cin = 1
    for c in (c1, c2):
        layers.append(nn.Conv2d(cin, c, 3, padding=1, bias=not bn, channels_last=True,
                                rng=rng))
        activation(c, True)
        layers.append(nn.MaxPool2d(2, channels_last=True))
        cin = c
    layers.append(nn.Flatten())
    layers.append(nn.Linear(7 * 7 * c2, hidden, bias=not bn, rng=rng))
    activation(hidden, False)
    if dropout:
        layers.append(nn.Dropout(dropout, rng=rng))
    layers.append(nn.Linear(hidden, 10, rng=rng))
    model = nn.Sequential(*layers)
    model[0].needs_input_grad = False
    return model


def _param_groups(model, weight_decay):
    decay, rest = [], []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            decay.append(m.weight)
            if m.bias is not None:
                rest.append(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine:
            rest += [m.weight, m.bias]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return groups


def _train_variant(name, spec, data, cfg, eval_X, eval_y, pop_index, progress,
                   saved=None, checkpoint=None):
    """Train one variant.  `saved`: its state from a checkpoint (continue from there);
    `checkpoint(state)`: called with the state at every evaluation point.  On Ctrl-C the
    KeyboardInterrupt carries ``partial`` (the result so far) for :func:`run`."""
    steps, every = cfg["steps"], cfg["eval_every"]
    lr0 = cfg["lr"] * spec["lr_mult"]
    wd = cfg["weight_decay"] / spec["wd_div"]
    half_life = steps * cfg["half_life_frac"] / spec["decay_mult"]
    X, y = data.X_train, data.y_train
    t_train, t_eval = common.Timer(), common.Timer()
    if saved is None:
        model = build_convnet(spec["bn"], spec["act"],
                              dropout=cfg["dropout"] if spec["dropout"] else 0.0,
                              channels=cfg["channels"], hidden=cfg["hidden"], seed=cfg["seed"])
        opt = optim.SGD(_param_groups(model, wd), lr=lr0, momentum=cfg["momentum"])
        batches = common.Batches(len(data.X_train), cfg["batch_size"], cfg["seed"])
        cur = {"step": [], "acc": [], "train_loss": [], "lr": []}
        start, loss_sum, loss_n = 0, 0.0, 0
    else:
        model, batches, cur = saved["model"], saved["batches"], saved["cur"]
        opt = optim.SGD(_param_groups(model, wd), lr=lr0, momentum=cfg["momentum"])
        opt.load_state_dict(saved["opt"])       # its state is keyed by the parameters' ids
        start, loss_sum, loss_n = saved["step"], saved["loss_sum"], saved["loss_n"]
        t_train.seconds, t_eval.seconds = saved["train_s"], saved["eval_s"]
    loss_fn = nn.CrossEntropyLoss()
    diverged = None

    def evaluate(step):
        with t_eval:
            acc, _ = common.evaluate(model, eval_X, eval_y, batch_size=250)
        cur["step"].append(step)
        cur["acc"].append(acc)
        cur["train_loss"].append(loss_sum / loss_n if loss_n else None)
        cur["lr"].append(opt.param_groups[0]["lr"])
        return acc

    def result(last_step):
        return {"curve": cur, "lr0": lr0, "weight_decay": wd, "half_life": half_life,
                "dropout": cfg["dropout"] if spec["dropout"] else 0.0,
                "diverged_at": diverged, "train_s": t_train.seconds, "eval_s": t_eval.seconds,
                "ms_per_step": 1e3 * t_train.seconds / max(1, last_step)}

    def save_state(step):
        if checkpoint is not None:
            checkpoint({"model": model, "opt": opt.state_dict(), "batches": batches, "cur": cur,
                        "step": step, "loss_sum": loss_sum, "loss_n": loss_n,
                        "train_s": t_train.seconds, "eval_s": t_eval.seconds})

    if saved is None:
        evaluate(0)
        save_state(0)
    step = start
    try:
        with common.progress_bar(steps, f"{name:>16s}", progress) as bar:
            bar.update(start)
            for step in range(start + 1, steps + 1):
                lr = lr0 * 0.5 ** ((step - 1) / half_life)
                for g in opt.param_groups:
                    g["lr"] = lr
                idx = batches.next()
                with t_train:
                    loss = common.train_step(model, loss_fn, opt, X[idx], y[idx])
                if not np.isfinite(loss):
                    diverged = step
                    evaluate(step)
                    break
                loss_sum += loss
                loss_n += 1
                if step % every == 0 or step == steps:
                    acc = evaluate(step)
                    loss_sum, loss_n = 0.0, 0
                    save_state(step)
                    bar.set_postfix(test_acc=f"{acc:.4f}", refresh=False)
                bar.update(1)
    except KeyboardInterrupt as exc:
        last = cur["step"][-1] if cur["step"] else 0
        n = len(cur["step"])
        for v in cur.values():          # drop a half-recorded evaluation
            del v[n:]
        exc.partial = result(last)
        raise
    res = result(step if diverged else steps)
    if spec["bn"] and diverged is None:
        with t_eval:
            pop = common.population_copy(model, X, pop_index)
            res["final_acc_population"], _ = common.evaluate(pop, eval_X, eval_y,
                                                             batch_size=250)
        res["eval_s"] = t_eval.seconds
    return res


def run(data, *, steps=6000, eval_every=100, batch_size=64, lr=0.02, momentum=0.9,
        weight_decay=5e-4, dropout=0.4, half_life_frac=1 / 2, seed=0, channels=(8, 16),
        hidden=64, pop_batches=50, eval_size=None, variants=None, progress=True,
        threads=1, checkpoint=None, resume=False):
    """Train the variants and return their curves and summary.

    Parameters
    ----------
    data : common.MnistArrays
        Flat or image-shaped float32 inputs; reshaped to ``(N, 28, 28, 1)``.
    steps : int
        Training steps of every variant.
    eval_every : int
        Steps between evaluations of the test accuracy.
    batch_size : int
        Mini-batch size of every variant.
    lr, momentum, weight_decay, dropout : float
        The Baseline's SGD learning rate and momentum, L2 weight decay (of the convolution
        and linear weights) and dropout rate; the other variants multiply `lr`, divide
        `weight_decay` and drop the dropout as :data:`VARIANTS` says (the momentum is the
        same for all).
    half_life_frac : float
        Baseline learning-rate half-life as a fraction of `steps`.
    seed : int
        Seed of the initial weights, the dropout masks, the batch order and the
        population-statistics batches (the same for every variant).
    channels : (int, int)
        Output channels of the two convolutions (see :func:`build_convnet`).
    hidden : int
        Width of the hidden linear layer.
    pop_batches : int
        Training mini-batches for the final population statistics.
    eval_size : int, optional
        Evaluate on the first `eval_size` test images only.
    variants : list of str, optional
        Subset of :data:`VARIANTS` (``"Baseline"`` is always included: it sets the target).
    progress : bool
        Show a progress bar per variant.
    threads : int or None, default 1
        Threads for bnfast's kernels and the BLAS (see :func:`common.limit_threads`);
        None leaves the process's settings.
    checkpoint : str or os.PathLike, optional
        Write the training state there at every evaluation point (see
        :func:`common.save_checkpoint`); removed when the run completes.
    resume : bool, default False
        Continue from `checkpoint` when it exists (the curves are those of an
        uninterrupted run).

    Returns
    -------
    dict
        ``config``, ``variants`` (per variant: ``curve`` and timings), ``summary``.

    Raises
    ------
    ValueError
        A name in `variants` is not in :data:`VARIANTS`.
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
    >>> results = run(data, steps=4, eval_every=2, batch_size=8, channels=(2, 2), hidden=4,
    ...               pop_batches=2, variants=["BN-x5"], progress=False)
    >>> list(results["variants"]), results["variants"]["BN-x5"]["curve"]["step"]
    (['Baseline', 'BN-x5'], [0, 2, 4])
    >>> sorted(results["summary"])
    ['baseline_max', 'baseline_steps', 'rows']
    >>> run(data, variants=["BN-x100"])
    Traceback (most recent call last):
        ...
    ValueError: unknown variants ['BN-x100']; choose from [...]
    """
    names = list(VARIANTS) if variants is None else list(variants)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if "Baseline" not in names:
        names.insert(0, "Baseline")
    names = [n for n in VARIANTS if n in names]
    imgs = common.MnistArrays(data.X_train.reshape(-1, 28, 28, 1), data.y_train,
                              data.X_test.reshape(-1, 28, 28, 1), data.y_test, data.source)
    eval_X, eval_y = imgs.X_test, imgs.y_test
    if eval_size is not None:
        eval_X, eval_y = eval_X[:eval_size], eval_y[:eval_size]
    cfg = dict(steps=steps, eval_every=eval_every, batch_size=batch_size, lr=lr,
               momentum=momentum, weight_decay=weight_decay, dropout=dropout,
               half_life_frac=half_life_frac, seed=seed, channels=list(channels),
               hidden=hidden, pop_batches=pop_batches, eval_size=len(eval_X),
               threads=threads, variants=names)
    prng = np.random.default_rng([seed, 1])
    perm = prng.permutation(len(imgs.X_train))
    pop_index = [perm[i * batch_size:(i + 1) * batch_size]     # whole batches only
                 for i in range(min(pop_batches, max(1, len(perm) // batch_size)))]
    ck_cfg = {k: v for k, v in cfg.items() if k != "threads"}
    saved = (common.load_checkpoint(checkpoint, ck_cfg) if resume and checkpoint is not None
             else None) or {"done": {}, "current": None}
    out = dict(saved["done"])
    t0 = time.perf_counter() - saved.get("elapsed", 0.0)

    def save_current(name):
        if checkpoint is None:
            return None

        def write(state):
            common.save_checkpoint(checkpoint, ck_cfg, {
                "done": out, "current": dict(state, name=name),
                "elapsed": time.perf_counter() - t0})
        return write

    with common.limit_threads(threads):
        for name in names:
            if name in out:
                continue
            cur = saved["current"] if (saved["current"] or {}).get("name") == name else None
            try:
                out[name] = _train_variant(name, VARIANTS[name], imgs, cfg, eval_X, eval_y,
                                           pop_index, progress, saved=cur,
                                           checkpoint=save_current(name))
            except KeyboardInterrupt as exc:
                part = dict(out)
                if getattr(exc, "partial", None) and exc.partial["curve"]["step"]:
                    part[name] = exc.partial
                raise common.Interrupted(
                    checkpoint=checkpoint if checkpoint is not None and
                    Path(checkpoint).exists() else None,
                    results=_results(cfg, part, names, t0, None) if part else None) from None
        machine = common.machine_info()
    results = _results(cfg, out, names, t0, machine)
    if checkpoint is not None and Path(checkpoint).exists():
        Path(checkpoint).unlink()
    return results


def _results(cfg, out, names, t0, machine):
    results = {"experiment": "accelerate", "config": cfg, "variants": out,
               "specs": {n: VARIANTS[n] for n in names},
               "timing": {"total_s": time.perf_counter() - t0},
               "paper": {n: {"steps_to_baseline": PAPER_FIG3[n][0], "max_acc": PAPER_FIG3[n][1]}
                         for n in names},
               "machine": machine}
    results["summary"] = summarize(results)
    return results


def summarize(results):
    """Per variant: steps to reach the Baseline's maximum test accuracy, speed-up, maximum.

    Parameters
    ----------
    results : dict
        With ``variants`` as in the result of :func:`run` (a ``"Baseline"`` entry is
        required).

    Returns
    -------
    dict
        ``baseline_max`` (the target accuracy), ``baseline_steps`` (where the Baseline
        first reached it) and ``rows``, one dict per variant.

    Examples
    --------
    >>> results = {"variants": {
    ...     "Baseline": {"curve": {"step": [0, 100, 200], "acc": [0.1, 0.90, 0.95]},
    ...                  "ms_per_step": 2.0},
    ...     "BN-x5": {"curve": {"step": [0, 100, 200], "acc": [0.1, 0.96, 0.97]},
    ...               "ms_per_step": 2.5, "final_acc_population": 0.97}}}
    >>> summ = summarize(results)
    >>> summ["baseline_max"], summ["baseline_steps"]
    (0.95, 200)
    >>> [(r["variant"], r["steps_to_baseline_max"], r["speedup"]) for r in summ["rows"]]
    [('Baseline', 200, 1.0), ('BN-x5', 100, 2.0)]
    """
    var = results["variants"]
    base = var["Baseline"]["curve"]
    target = max(base["acc"])
    base_steps = base["step"][int(np.argmax(base["acc"]))]
    rows = []
    for name, r in var.items():
        cur = r["curve"]
        acc = np.asarray(cur["acc"])
        hit = np.nonzero(acc >= target)[0]
        s = cur["step"][hit[0]] if hit.size else None
        rows.append({"variant": name, "steps_to_baseline_max": s,
                     "speedup": (base_steps / s) if s else None,
                     "max_acc": float(acc.max()), "step_of_max": cur["step"][int(acc.argmax())],
                     "final_acc": float(acc[-1]),
                     "final_acc_population": r.get("final_acc_population"),
                     "diverged_at": r.get("diverged_at"), "ms_per_step": r["ms_per_step"]})
    return {"baseline_max": target, "baseline_steps": base_steps, "rows": rows}


def format_table(results):
    """Markdown table of the summary beside the paper's Figure 3.

    Parameters
    ----------
    results : dict
        With ``summary`` (see :func:`summarize`).

    Returns
    -------
    str
        A line naming the target accuracy, then the table.

    Examples
    --------
    >>> results = {"variants": {
    ...     "Baseline": {"curve": {"step": [0, 100, 200], "acc": [0.1, 0.90, 0.95]},
    ...                  "ms_per_step": 2.0},
    ...     "BN-x5": {"curve": {"step": [0, 100, 200], "acc": [0.1, 0.96, 0.97]},
    ...               "ms_per_step": 2.5, "final_acc_population": 0.97}}}
    >>> results["summary"] = summarize(results)
    >>> print(format_table(results))                 # doctest: +NORMALIZE_WHITESPACE
    Target: the Baseline's maximum test accuracy, 0.9500 (first reached at step 200).
    <BLANKLINE>
    | variant | paper: steps to 72.2% | paper: max acc. | ours: steps to Baseline max | ours: speed-up | ours: max acc. (step) | ours: final, running avg. / population | ms/step |
    | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
    | Baseline | 31.0M | 72.2% | 200 | 1.0x | 0.9500 (200) | 0.9500 | 2.0 |
    | BN-x5 | 2.1M | 73.0% | 100 | 2.0x | 0.9700 (200) | 0.9700 / 0.9700 | 2.5 |
    """
    summ = results["summary"]
    lines = [f"Target: the Baseline's maximum test accuracy, {summ['baseline_max']:.4f} "
             f"(first reached at step {summ['baseline_steps']}).", "",
             "| variant | paper: steps to 72.2% | paper: max acc. | ours: steps to Baseline "
             "max | ours: speed-up | ours: max acc. (step) | ours: final, running avg. / "
             "population | ms/step |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in summ["rows"]:
        n = r["variant"]
        ps, pa = PAPER_FIG3.get(n, (None, None))
        ps = ps or ("chance" if n == "Baseline-Sigmoid" else "-")
        pa = f"{pa:.1%}" if pa is not None else ("chance" if n == "Baseline-Sigmoid" else "-")
        s = r["steps_to_baseline_max"]
        steps = "not reached" if s is None else str(s)
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        if r["diverged_at"]:
            steps += f" (diverged at {r['diverged_at']})"
        pop = r["final_acc_population"]
        fin = f"{r['final_acc']:.4f}" + (f" / {pop:.4f}" if pop is not None else "")
        lines.append(f"| {n} | {ps} | {pa} | {steps} | {sp} | {r['max_acc']:.4f} "
                     f"({r['step_of_max']}) | {fin} | {r['ms_per_step']:.1f} |")
    return "\n".join(lines)


def timing_line(results):
    t = results["timing"]
    train = sum(v["train_s"] for v in results["variants"].values())
    ev = sum(v["eval_s"] for v in results["variants"].values())
    return (f"Run time {t['total_s']:.0f} s for {len(results['variants'])} variants x "
            f"{results['config']['steps']} steps ({train:.0f} s training, {ev:.0f} s "
            f"evaluation on {results['config']['eval_size']} test images every "
            f"{results['config']['eval_every']} steps).")


def plot(results, path):
    """(a) test accuracy against steps for every variant; (b) steps to the Baseline's
    maximum.

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
    >>> results = run(data, steps=4, eval_every=2, batch_size=8, channels=(2, 2), hidden=4,
    ...               pop_batches=2, variants=["BN-x5"], progress=False)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = plot(results, os.path.join(tmp.name, "fig3.png"))
    >>> os.path.getsize(path) > 0
    True
    >>> tmp.cleanup()
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = results["summary"]
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    styles = {"Baseline": ("k", "-"), "BN-Baseline": ("tab:blue", "-"),
              "BN-x5": ("tab:red", "-"), "BN-x30": ("tab:green", "-"),
              "BN-x5-Sigmoid": ("tab:purple", "--"), "Baseline-Sigmoid": ("tab:gray", "--")}
    lo = min(0.95, summ["baseline_max"] - 0.02)
    for name, r in results["variants"].items():
        c, ls = styles.get(name, (None, "-"))
        top = max(r["curve"]["acc"])
        label = name if top >= lo else f"{name} (max {top:.3f}, off scale)"
        ax[0].plot(r["curve"]["step"], r["curve"]["acc"], ls, color=c, label=label, lw=1.3)
    ax[0].axhline(summ["baseline_max"], color="k", lw=0.8, ls=":")
    ax[0].set_ylim(lo, 1.0)
    ax[0].set_xlabel("training steps")
    ax[0].set_ylabel("test accuracy")
    ax[0].set_title("(a) test accuracy (dotted: Baseline's maximum)")
    ax[0].legend(loc="lower right", fontsize=8)
    ax[0].grid(alpha=0.3)
    rows = summ["rows"]
    names = [r["variant"] for r in rows]
    vals = [r["steps_to_baseline_max"] or 0 for r in rows]
    colors = [styles.get(n, ("C0",))[0] for n in names]
    bars = ax[1].barh(names, vals, color=colors)
    for b, r in zip(bars, rows):
        s = r["steps_to_baseline_max"]
        txt = "not reached" if s is None else f"{s}  (max {r['max_acc']:.4f})"
        ax[1].text(b.get_width(), b.get_y() + b.get_height() / 2, " " + txt, va="center",
                   fontsize=8)
    ax[1].invert_yaxis()
    ax[1].set_xlim(0, results["config"]["steps"] * 1.45)
    ax[1].set_xlabel("steps to reach the Baseline's maximum")
    ax[1].set_title("(b) steps to the Baseline's maximum accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save(results, out_dir, *, make_plot=True, stem="accelerate"):
    """Write ``<stem>.json``, ``<stem>.csv``, ``<stem>_table.md`` and ``<stem>.png``.

    Parameters
    ----------
    results : dict
        As returned by :func:`run`.
    out_dir : str or os.PathLike
        The folder (created if missing).
    make_plot : bool, default True
        Also write the figure (needs matplotlib; see :func:`plot`).
    stem : str, default "accelerate"
        Base name of the files.

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
    >>> results = run(data, steps=4, eval_every=2, batch_size=8, channels=(2, 2), hidden=4,
    ...               pop_batches=2, variants=["BN-x5"], progress=False)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> [p.name for p in save(results, tmp.name, make_plot=False, stem="demo")]
    ['demo.json', 'demo.csv', 'demo_table.md']
    >>> tmp.cleanup()
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [common.write_json(out / f"{stem}.json", results)]
    rows = []
    for name, r in results["variants"].items():
        c = r["curve"]
        for i, s in enumerate(c["step"]):
            rows.append({"variant": name, "step": s, "test_acc": c["acc"][i],
                         "train_loss": c["train_loss"][i], "lr": c["lr"][i]})
    paths.append(common.write_csv(out / f"{stem}.csv", rows,
                                  ["variant", "step", "test_acc", "train_loss", "lr"]))
    md = out / f"{stem}_table.md"
    md.write_text(format_table(results) + "\n\n" + timing_line(results) + "\n")
    paths.append(md)
    if make_plot:
        paths.append(plot(results, out / f"{stem}.png"))
    return paths


def main_run(args):
    """Run from parsed command-line arguments (see :mod:`bnfast.paper.cli`).

    Loads MNIST, runs :func:`run` with :data:`DEFAULTS` (fewer steps and a test subset
    with ``--quick``) overridden by the arguments given, writes the files of :func:`save`
    into ``args.out`` and prints the table.

    Parameters
    ----------
    args : argparse.Namespace
        The ``accelerate`` command's arguments, from
        :func:`bnfast.paper.cli.build_parser`.

    Returns
    -------
    dict
        The results of :func:`run`, with ``timing["wall_s"]`` and ``data_source`` added.

    Raises
    ------
    bnfast.datasets.DatasetError
        MNIST could not be loaded (see :func:`common.load_mnist_arrays`).
    ValueError
        An unknown name in ``--variants`` (see :func:`run`).

    Examples
    --------
    Two steps of the Baseline on home-made 28x28 IDX files (checksums switched off for
    them), the printed table discarded:

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
    ...     ["accelerate", "--data-dir", str(folder), "--out", str(folder / "out"),
    ...      "--steps", "2", "--eval-every", "1", "--variants", "Baseline", "--no-progress",
    ...      "--no-plot"])
    >>> with mock.patch.dict(datasets.MNIST_SHA256, clear=True), \\
    ...         contextlib.redirect_stdout(io.StringIO()):
    ...     results = main_run(args)
    >>> results["variants"]["Baseline"]["curve"]["step"]
    [0, 1, 2]
    >>> sorted(p.name for p in (folder / "out").iterdir())
    ['accelerate.csv', 'accelerate.json', 'accelerate_table.md']
    >>> tmp.cleanup()
    """
    t0 = time.perf_counter()
    kw = dict(DEFAULTS)
    stem = "accelerate"
    if args.quick:
        kw.update(QUICK)
        stem = "accelerate_quick"
    if args.steps is not None:
        kw["steps"] = args.steps
    if args.eval_every is not None:
        kw["eval_every"] = args.eval_every
    if args.lr is not None:
        kw["lr"] = args.lr
    variants = args.variants
    if isinstance(variants, str):
        variants = [v.strip() for v in variants.split(",") if v.strip()]
    data = common.load_mnist_arrays(args.data_dir)
    out = Path(args.out)
    ckpt = out / f"{stem}.checkpoint.pkl"
    if getattr(args, "resume", False) and not ckpt.exists():
        print(f"no checkpoint {ckpt}: starting from the beginning", flush=True)
    try:
        results = run(data, seed=args.seed, variants=variants, progress=not args.no_progress,
                      threads=args.threads or None, checkpoint=ckpt,
                      resume=getattr(args, "resume", False),
                      **{k: v for k, v in kw.items() if k != "seed"})
    except common.Interrupted as exc:
        if exc.results is not None:
            exc.results["interrupted"] = True
            exc.results["data_source"] = data.source
            exc.paths = save(exc.results, out, make_plot=False, stem=stem)
        raise
    results["timing"]["wall_s"] = time.perf_counter() - t0
    results["data_source"] = data.source
    paths = save(results, args.out, make_plot=not args.no_plot, stem=stem)
    print()
    print(format_table(results))
    print()
    print(timing_line(results) + f" Wall time {results['timing']['wall_s']:.0f} s.")
    print("Wrote " + ", ".join(str(p) for p in paths))
    return results
