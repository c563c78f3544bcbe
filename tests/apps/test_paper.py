"""The paper reproductions (bnfast.paper): the percentile recorder, the probe, the networks,
the summary logic, and few-hundred-step smoke runs of both experiments (on synthetic data,
and on the real MNIST files when present: batch norm must be ahead at the same step)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnfast import datasets, nn
from bnfast.paper import accelerate, cli, common, mnist_fig1

from conftest import package_env


def _real_mnist_dir():
    """BNFAST_DATA_DIR (or its mnist/) when it holds the files, else the checkout's."""
    env = os.environ.get("BNFAST_DATA_DIR")
    cands = ([Path(env).expanduser(), Path(env).expanduser() / "mnist"] if env else [])
    for d in cands + datasets._checkout_dirs():
        if all((d / (b + ".gz")).is_file() or (d / b).is_file()
               for b in datasets.MNIST_FILES.values()):
            return d
    return None


REAL = _real_mnist_dir()
needs_real = pytest.mark.skipif(REAL is None, reason="real MNIST files not present (set "
                                                    "BNFAST_DATA_DIR)")

try:
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:  # pragma: no cover
    HAVE_MPL = False


def synthetic(n_train=600, n_test=200, seed=0):
    """Learnable MNIST-shaped data: the class sets the mean of a block of pixels."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 10, n)
        x = rng.random((n, 784), dtype=np.float32) * 0.3
        for c in range(10):
            x[y == c, c * 78:(c + 1) * 78] += 0.7
        return x, y.astype(np.int64)

    Xtr, ytr = make(n_train)
    Xte, yte = make(n_test)
    return common.MnistArrays(Xtr, ytr, Xte, yte, "synthetic")


# ------------------------------------------------------------------ percentile recorder

def test_percentile_recorder_matches_numpy():
    rng = np.random.default_rng(0)
    rec = common.PercentileRecorder()
    vals = [rng.standard_normal(1000) * s + m for s, m in ((1, 0), (2, 1), (0.5, -3))]
    for step, v in zip((0, 500, 1000), vals):
        rec.record(step, v.reshape(10, 100))
    d = rec.as_dict()
    assert list(d) == ["step", "p15", "p50", "p85"]
    assert d["step"] == [0, 500, 1000] and len(rec) == 3
    for j, v in enumerate(vals):
        np.testing.assert_allclose([d["p15"][j], d["p50"][j], d["p85"][j]],
                                   np.percentile(v, [15, 50, 85]))


def test_percentile_recorder_errors():
    rec = common.PercentileRecorder((10, 90))
    with pytest.raises(ValueError, match="no values"):
        rec.record(0, [])
    with pytest.raises(ValueError, match="finite"):
        rec.record(0, [1.0, np.nan])
    with pytest.raises(ValueError, match="percentiles"):
        common.PercentileRecorder((50, 101))
    rec.record(3, [0.0, 10.0])
    assert rec.as_dict() == {"step": [3], "p10": [1.0], "p90": [9.0]}


@pytest.mark.parametrize("bn", [False, True])
def test_probe_is_the_input_of_the_last_sigmoid(bn):
    model = mnist_fig1.build_mlp(bn, seed=1)
    x = np.random.default_rng(2).random((50, 784), dtype=np.float32)
    model.train()
    for _ in range(3):                         # give BN some running statistics
        model.forward(x)
    i = mnist_fig1.probe_index(model)
    assert isinstance(model[i + 1], nn.Sigmoid)
    assert isinstance(model[i], nn.BatchNorm1d if bn else nn.Linear)
    assert not any(isinstance(m, nn.Sigmoid) for m in list(model)[i + 2:])
    acc, pre = common.evaluate(model, x, np.zeros(50, dtype=np.int64), probe=(i, 7),
                               batch_size=16)
    model.eval()
    h = x
    for layer in list(model)[:i + 1]:
        h = layer.forward(h)
    np.testing.assert_allclose(pre, h[:, 7], rtol=1e-6)
    assert model.training is False
    model.train()
    assert 0.0 <= acc <= 1.0


def test_build_mlp_layout():
    plain, bn = mnist_fig1.build_mlp(False, seed=3), mnist_fig1.build_mlp(True, seed=3)
    lin_p = [m for m in plain if isinstance(m, nn.Linear)]
    lin_b = [m for m in bn if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin_p] == [(784, 100), (100, 100),
                                                                (100, 100), (100, 10)]
    assert all(m.bias is not None for m in lin_p)
    assert [m.bias is None for m in lin_b] == [True, True, True, False]     # no bias before BN
    assert sum(isinstance(m, nn.BatchNorm1d) for m in bn) == 3
    assert sum(isinstance(m, nn.Sigmoid) for m in bn) == 3
    for a, b in zip(lin_p, lin_b):                       # same initial weights
        np.testing.assert_array_equal(a.weight.data, b.weight.data)
    w = lin_p[0].weight.data
    assert abs(w.std() - 0.1) < 0.005 and abs(w.mean()) < 0.005


# ------------------------------------------------------------------ experiment 1 smoke

def test_fig1_smoke_synthetic(tmp_path):
    data = synthetic()
    res = mnist_fig1.run(data, steps=120, eval_every=40, pop_batches=5, progress=False)
    for key in ("nobn", "bn"):
        cur = res["curves"][key]
        assert cur["step"] == [0, 40, 80, 120]
        assert len(cur["acc"]) == len(cur["p15"]) == len(cur["p85"]) == 4
        assert all(a <= b <= c for a, b, c in zip(cur["p15"], cur["p50"], cur["p85"]))
    assert len(res["curves"]["bn"]["acc_running"]) == 4
    assert res["timing"]["bn"]["ms_per_step"] > 0
    paths = mnist_fig1.save(res, tmp_path, make_plot=HAVE_MPL)
    names = {p.name for p in paths}
    assert {"mnist_fig1.json", "mnist_fig1.csv", "mnist_fig1_table.md"} <= names
    if HAVE_MPL:
        assert (tmp_path / "mnist_fig1.png").stat().st_size > 10000
    back = json.loads((tmp_path / "mnist_fig1.json").read_text())
    assert back["config"]["steps"] == 120 and back["curves"]["bn"]["step"][-1] == 120
    lines = (tmp_path / "mnist_fig1.csv").read_text().splitlines()
    assert lines[0].startswith("net,step,test_acc") and len(lines) == 1 + 8


def test_fig1_table_at_paper_steps():
    curves = {k: {"step": [0, 5000, 10000], "acc": [0.1, 0.9, 0.95],
                  "acc_running": [0.1, 0.89, 0.94]} for k in ("nobn", "bn")}
    res = {"config": {"steps": 10000}, "curves": curves}
    rows = mnist_fig1.table_rows(res)
    assert [r["step"] for r in rows] == [5000, 10000]
    assert rows[0]["paper_nobn"] == 0.784 and rows[1]["paper_bn"] == 0.965
    assert rows[1]["bn_running"] == 0.94
    assert "| 10K | 0.926 | 0.950 | 0.965 | 0.950 | 0.940 |" in mnist_fig1.format_table(res)


@needs_real
def test_fig1_real_data_bn_ahead(tmp_path):
    """A 300-step run through the command line: BN's test accuracy beats no-BN's."""
    assert cli.main(["mnist", "--steps", "300", "--eval-every", "100", "--pop-batches", "20",
                     "--data-dir", str(REAL), "--out", str(tmp_path), "--no-progress"]
                    + ([] if HAVE_MPL else ["--no-plot"])) == 0
    res = json.loads((tmp_path / "mnist_fig1.json").read_text())
    nobn, bn = res["curves"]["nobn"], res["curves"]["bn"]
    assert nobn["step"] == bn["step"] == [0, 100, 200, 300]
    assert bn["acc"][-1] > nobn["acc"][-1] + 0.1
    assert bn["acc_running"][-1] > nobn["acc"][-1] + 0.1
    assert bn["acc"][-1] > 0.8
    # BN keeps the sigmoid's input centred; percentiles are recorded at every evaluation
    assert abs(bn["p50"][-1]) < 1.0 and bn["p15"][-1] < 0 < bn["p85"][-1]


# ------------------------------------------------------------------ experiment 2

def test_convnet_variants_build_and_train_synthetic(tmp_path):
    data = synthetic(n_train=256, n_test=64)
    res = accelerate.run(data, steps=8, eval_every=4, batch_size=16, pop_batches=2,
                         progress=False)
    assert list(res["variants"]) == list(accelerate.VARIANTS)
    for name, r in res["variants"].items():
        assert r["curve"]["step"] == [0, 4, 8]
        assert r["ms_per_step"] > 0
        spec = accelerate.VARIANTS[name]
        assert r["lr0"] == pytest.approx(0.02 * spec["lr_mult"])
        assert ("final_acc_population" in r) == spec["bn"]
    table = accelerate.format_table(res)
    for name in accelerate.VARIANTS:
        assert f"| {name} |" in table
    paths = accelerate.save(res, tmp_path, make_plot=HAVE_MPL, stem="acc")
    assert {"acc.json", "acc.csv", "acc_table.md"} <= {p.name for p in paths}


def test_build_convnet_layers():
    bn = accelerate.build_convnet(True, "relu", dropout=0.0)
    assert sum(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) for m in bn) == 3
    assert all(m.relu for m in bn if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)))
    assert all(m.bias is None for m in bn if isinstance(m, nn.Conv2d))
    assert not any(isinstance(m, nn.Dropout) for m in bn)
    sig = accelerate.build_convnet(False, "sigmoid", dropout=0.4)
    assert sum(isinstance(m, nn.Sigmoid) for m in sig) == 3
    assert sum(isinstance(m, nn.Dropout) for m in sig) == 1
    out = sig.forward(np.zeros((2, 28, 28, 1), dtype=np.float32))
    assert out.shape == (2, 10)
    with pytest.raises(ValueError, match="act"):
        accelerate.build_convnet(True, "tanh")


def test_summary_steps_to_baseline_max():
    def var(steps, acc):
        return {"curve": {"step": steps, "acc": acc}, "ms_per_step": 1.0}

    res = {"variants": {
        "Baseline": var([0, 100, 200, 300, 400], [0.1, 0.90, 0.95, 0.97, 0.96]),
        "BN-x5": var([0, 100, 200, 300, 400], [0.1, 0.97, 0.98, 0.98, 0.98]),
        "Baseline-Sigmoid": var([0, 100, 200, 300, 400], [0.1, 0.11, 0.11, 0.1, 0.11]),
    }}
    s = accelerate.summarize(res)
    assert s["baseline_max"] == 0.97 and s["baseline_steps"] == 300
    rows = {r["variant"]: r for r in s["rows"]}
    assert rows["Baseline"]["steps_to_baseline_max"] == 300
    assert rows["BN-x5"]["steps_to_baseline_max"] == 100
    assert rows["BN-x5"]["speedup"] == pytest.approx(3.0)
    assert rows["BN-x5"]["max_acc"] == 0.98
    assert rows["Baseline-Sigmoid"]["steps_to_baseline_max"] is None


@needs_real
def test_accelerate_real_data_smoke(tmp_path):
    """A 200-step --quick run of all six variants through the command line."""
    assert cli.main(["accelerate", "--quick", "--steps", "200", "--eval-every", "100",
                     "--data-dir", str(REAL), "--out", str(tmp_path), "--no-progress"]
                    + ([] if HAVE_MPL else ["--no-plot"])) == 0
    res = json.loads((tmp_path / "accelerate_quick.json").read_text())
    v = res["variants"]
    assert list(v) == list(accelerate.VARIANTS)
    acc = {n: r["curve"]["acc"][-1] for n, r in v.items()}
    assert v["Baseline"]["curve"]["step"] == [0, 100, 200]
    assert acc["BN-Baseline"] > acc["Baseline"]
    assert acc["BN-x5"] > acc["Baseline"]
    assert acc["BN-x5-Sigmoid"] > acc["Baseline-Sigmoid"] + 0.3
    assert (tmp_path / "accelerate_quick_table.md").exists()


# ------------------------------------------------------------------ entry point

def test_module_entry_point_help(tmp_path):
    # run outside the checkout: there `python -m` would import the uncompiled source folder
    out = subprocess.run([sys.executable, "-m", "bnfast.paper", "mnist", "--help"],
                         capture_output=True, text=True, env=package_env(), timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--steps" in out.stdout and "--init-std" in out.stdout


def test_cli_rejects_unknown_variant(tmp_path):
    data = synthetic(n_train=64, n_test=16)
    with pytest.raises(ValueError, match="unknown variants"):
        accelerate.run(data, steps=1, variants=["BN-x7"], progress=False)


def test_real_mnist_dir_honours_the_environment(monkeypatch, tmp_path):
    for b in datasets.MNIST_FILES.values():
        (tmp_path / "mnist").mkdir(exist_ok=True)
        (tmp_path / "mnist" / (b + ".gz")).write_bytes(b"")
    monkeypatch.setenv("BNFAST_DATA_DIR", str(tmp_path))
    assert _real_mnist_dir() == tmp_path / "mnist"
