"""The command line (issue 15): `bnfast`, `bnfast bench`, `bnfast paper mnist|accelerate`.

Bad values are argparse errors (usage line, one-line message, exit status 2); --version and
config --json; usage lines and help texts; missing data (exit 1, no traceback); Ctrl-C (exit
130, partial results written) and --resume (the same curves as an uninterrupted run); the
speed table without PyTorch; fit's BLAS thread limit.
"""
import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import bnfast
from bnfast import _bench, datasets
from bnfast.__main__ import main
from bnfast.paper import common

from conftest import package_env


def run_main(argv, capsys):
    """``(status, stdout, stderr)`` of ``bnfast argv`` run in this process."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def write_tiny_mnist(folder, n_train=240, n_test=60, seed=0):
    """Learnable 28x28 IDX files (the class brightens a block of rows)."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def images(labels):
        x = rng.integers(0, 60, (len(labels), 28, 28))
        for i, c in enumerate(labels):
            x[i, 2 * c:2 * c + 4] += 180
        return x.astype(np.uint8)

    ytr = rng.integers(0, 10, n_train).astype(np.uint8)
    yte = rng.integers(0, 10, n_test).astype(np.uint8)
    arrays = {"train_images": images(ytr), "train_labels": ytr,
              "test_images": images(yte), "test_labels": yte}
    for role, base in datasets.MNIST_FILES.items():
        a = arrays[role]
        raw = struct.pack(">HBB", 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
        (folder / (base + ".gz")).write_bytes(gzip.compress(raw + a.tobytes()))
    return folder


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A folder of home-made MNIST files, checksums switched off."""
    monkeypatch.setattr(datasets, "MNIST_SHA256", {})
    return write_tiny_mnist(tmp_path / "mnist")


# ------------------------------------------------------------------ bad values

BAD = [
    (["paper", "mnist", "--steps", "0"], "--steps", "must be >= 1"),
    (["paper", "mnist", "--steps", "ten"], "--steps", "expected a positive integer"),
    (["paper", "mnist", "--eval-every", "0"], "--eval-every", "must be >= 1"),
    (["paper", "mnist", "--batch-size", "1"], "--batch-size", "must be >= 2"),
    (["paper", "mnist", "--optimizer", "rmsprop"], "--optimizer", "invalid choice"),
    (["paper", "mnist", "--lr", "0"], "--lr", "must be in (0"),
    (["paper", "mnist", "--lr", "nan"], "--lr", "must be finite"),
    (["paper", "mnist", "--momentum", "1"], "--momentum", "must be in [0, 1)"),
    (["paper", "mnist", "--init-std", "-1"], "--init-std", "must be in (0"),
    (["paper", "mnist", "--eps", "0"], "--eps", "must be in (0"),
    (["paper", "mnist", "--unit", "100"], "--unit", "must be in 0..99"),
    (["paper", "mnist", "--unit", "-1"], "--unit", "must be >= 0"),
    (["paper", "mnist", "--pop-batches", "0"], "--pop-batches", "must be >= 1"),
    (["paper", "mnist", "--seed", "-1"], "--seed", "must be >= 0"),
    (["paper", "mnist", "--threads", "-3"], "--threads", "must be >= 0"),
    (["paper", "mnist", "--threads", "100000"], "--threads", "must be at most"),
    (["paper", "mnist", "--data-dir", "/some/typo"], "--data-dir", "'/some/typo' does not exist"),
    (["paper", "accelerate", "--variants", "Foo"], "--variants", "unknown variant Foo"),
    (["paper", "accelerate", "--variants", ","], "--variants", "expected names"),
    (["paper", "accelerate", "--steps", "-5"], "--steps", "must be >= 1"),
    (["paper", "accelerate", "--eval-every", "0"], "--eval-every", "must be >= 1"),
    (["paper", "accelerate", "--lr", "-0.1"], "--lr", "must be in (0"),
    (["paper", "accelerate", "--threads", "-3"], "--threads", "must be >= 0"),
    (["bench", "--repeat", "0"], "--repeat", "must be >= 1"),
    (["bench", "--threads", "0"], "--threads", "must be >= 1"),
    (["quick", "--threads", "-1"], "--threads", "must be >= 0"),
    (["--repeat", "0"], "--repeat", "must be >= 1"),
    (["frobnicate"], "", "invalid choice"),
]


@pytest.mark.parametrize("argv, option, message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_values_are_usage_errors(argv, option, message, capsys, tmp_path):
    status, out, err = run_main(argv, capsys)
    assert status == 2
    lines = err.strip().splitlines()
    cmd = "bnfast" + ("" if argv[0] not in ("paper", "bench", "quick") else
                      " " + " ".join(argv[:2] if argv[0] == "paper" else argv[:1]))
    assert lines[0].startswith(f"usage: {cmd} ")
    assert lines[-1].startswith(f"{cmd}: error: ")
    assert option in lines[-1] and message in lines[-1], lines[-1]
    assert "Traceback" not in err and out == ""


def test_out_that_is_a_file_is_a_usage_error(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    status, _, err = run_main(["paper", "mnist", "--out", str(f)], capsys)
    assert status == 2 and "exists and is not a folder" in err


def test_a_real_process_exits_2_with_one_message(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bnfast", "paper", "mnist", "--steps", "0"],
                         capture_output=True, text=True, env=package_env(), cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("usage: bnfast paper mnist")
    assert out.stderr.strip().splitlines()[-1] == \
        "bnfast paper mnist: error: argument --steps: must be >= 1, got 0"


# ------------------------------------------------------------------ version, config, help

def test_version(capsys):
    status, out, _ = run_main(["--version"], capsys)
    assert status == 0 and out.strip() == f"bnfast {bnfast.__version__}"


def test_config_json(capsys):
    status, out, _ = run_main(["config", "--json"], capsys)
    assert status == 0
    cfg = json.loads(out)
    want = json.loads(json.dumps(bnfast.get_config(), default=str))
    assert cfg == want and cfg["version"] == bnfast.__version__


@pytest.mark.parametrize("argv", [[], ["config"], ["quick"], ["bench"], ["paper"],
                                  ["paper", "mnist"], ["paper", "accelerate"]],
                         ids=lambda a: " ".join(a) or "bnfast")
def test_help_is_plain_names_the_command_and_shows_defaults(argv, capsys):
    status, out, _ = run_main(argv + ["--help"], capsys)
    assert status == 0
    cmd = " ".join(["bnfast"] + argv)
    assert out.startswith(f"usage: {cmd} ")
    assert "``" not in out and "docs/paper.md" not in out and "python -m bnfast.paper" not in out
    assert ":func:" not in out and ":mod:" not in out
    # every option that takes a value shows its default
    import re

    blocks, key, body = {}, None, out.split("\noptions:\n", 1)[1].split("\n\n")[0]
    for ln in body.splitlines():
        m = re.match(r"  (?:-\w, )?(--[\w-]+)( [^ ]+)?(?:  |$)", ln)
        if m:
            key = m.group(1)
            blocks[key] = [bool(m.group(2)), ln]
        else:
            blocks[key][1] += " " + ln.strip()
    assert blocks
    for opt, (takes_value, text) in blocks.items():
        if takes_value:
            assert "default:" in " ".join(text.split()), opt
    text = " ".join(out.split())
    if argv == ["paper", "mnist"]:
        for piece in ("(default: 50000)", "(default: 500)", "(default: 60)",
                      "(default: sgd)", "(default: paper-results)", "(default: 1)",
                      "(default: BNFAST_DATA_DIR"):
            assert piece in text, piece
    if argv == ["paper", "accelerate"]:
        for piece in ("(default: 6000; 1200 with --quick)", "(default: 100)",
                      "(default: 0.02)", "default: all)"):
            assert piece in text, piece


# ------------------------------------------------------------------ missing data

def test_missing_data_exits_1_with_the_places_and_no_traceback(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("BNFAST_DATA_DIR", raising=False)
    monkeypatch.setenv("BNFAST_CACHE_DIR", str(tmp_path / "cache"))
    shared = tmp_path / "shared" / "data" / "mnist"
    monkeypatch.setattr(datasets, "_checkout_dirs", lambda: [shared])

    def offline(url, timeout):
        import urllib.error
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets, "_urlopen", offline)
    status, out, err = run_main(["paper", "mnist", "--steps", "2", "--out",
                                 str(tmp_path / "out"), "--no-progress"], capsys)
    assert status == 1
    assert "Traceback" not in err + out
    assert out.count("downloading") <= 1
    lines = err.strip().splitlines()
    assert lines[0].startswith("bnfast paper mnist: error: MNIST files ")
    assert len(lines) <= 6, err
    assert str(shared) in err and str(tmp_path / "cache" / "mnist") in err
    assert "--data-dir" in err and "BNFAST_DATA_DIR" in err
    assert not (tmp_path / "out").exists() and not shared.exists()


def test_env_data_dir_that_does_not_exist(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("BNFAST_DATA_DIR", str(tmp_path / "typo"))
    status, _, err = run_main(["paper", "accelerate", "--steps", "2", "--out",
                               str(tmp_path / "out")], capsys)
    assert status == 1 and "Traceback" not in err
    assert f"{tmp_path / 'typo'} (from BNFAST_DATA_DIR) does not exist" in err
    assert not (tmp_path / "typo").exists()


# ------------------------------------------------------------------ Ctrl-C and --resume

class _InterruptAt:
    """Replaces common.train_step: raises KeyboardInterrupt on call number `at`."""

    def __init__(self, at):
        self.at, self.calls = at, 0
        self.real = common.train_step

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.real(*args)


MNIST_ARGS = ["paper", "mnist", "--steps", "30", "--eval-every", "10", "--batch-size", "20",
              "--pop-batches", "3", "--no-progress", "--no-plot"]
ACC_ARGS = ["paper", "accelerate", "--steps", "12", "--eval-every", "4",
            "--variants", "BN-x5", "--no-progress", "--no-plot"]


def _curves(path, experiment):
    res = json.loads(Path(path).read_text())
    if experiment == "mnist":
        return res["curves"]
    return {k: v["curve"] for k, v in res["variants"].items()}


@pytest.mark.parametrize("experiment, args, stem, at", [
    ("mnist", MNIST_ARGS, "mnist_fig1", 45),          # in the BN network, after step 15
    ("accelerate", ACC_ARGS, "accelerate", 19),       # in BN-x5, after step 7
])
def test_ctrl_c_writes_partial_results_and_resume_gives_the_same_curves(
        experiment, args, stem, at, tiny, tmp_path, capsys, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_main(args + ["--data-dir", str(tiny), "--out", str(full)], capsys)[0] == 0
    assert not (full / f"{stem}.checkpoint.pkl").exists()       # removed when complete
    want = _curves(full / f"{stem}.json", experiment)

    hook = _InterruptAt(at)
    monkeypatch.setattr(common, "train_step", hook)
    status, out, err = run_main(args + ["--data-dir", str(tiny), "--out", str(part)], capsys)
    assert status == 130 and "Traceback" not in err
    assert "interrupted" in err and "--resume" in err and str(part / f"{stem}.json") in err
    ckpt = part / f"{stem}.checkpoint.pkl"
    assert ckpt.exists() and str(ckpt) in err
    partial = json.loads((part / f"{stem}.json").read_text())
    assert partial["interrupted"] is True
    got = _curves(part / f"{stem}.json", experiment)
    first, second = list(want)
    assert got[first] == want[first]                 # the first network had finished
    n = len(got[second]["step"])
    assert 1 < n < len(want[second]["step"])         # the second one up to its last evaluation
    assert {k: v[:n] for k, v in want[second].items()} == got[second]

    monkeypatch.setattr(common, "train_step", hook.real)
    status, out, err = run_main(args + ["--data-dir", str(tiny), "--out", str(part),
                                        "--resume"], capsys)
    assert status == 0, err
    assert _curves(part / f"{stem}.json", experiment) == want
    assert not ckpt.exists()


def test_resume_with_other_options_is_refused(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(common, "train_step", _InterruptAt(15))
    assert run_main(MNIST_ARGS + ["--data-dir", str(tiny), "--out", str(out)], capsys)[0] == 130
    status, _, err = run_main(MNIST_ARGS[:3] + ["31"] + MNIST_ARGS[4:]
                              + ["--data-dir", str(tiny), "--out", str(out), "--resume"],
                              capsys)
    assert status == 1 and "Traceback" not in err
    assert "other options (steps: 30 there, 31 now)" in err


def test_resume_without_a_checkpoint_starts_over(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    status, stdout, _ = run_main(ACC_ARGS + ["--data-dir", str(tiny), "--out", str(out),
                                             "--resume"], capsys)
    assert status == 0 and (out / "accelerate.json").exists()
    assert "no checkpoint" in stdout and "starting from the beginning" in stdout


def _real_mnist_dir():
    env = os.environ.get("BNFAST_DATA_DIR")
    cands = ([Path(env), Path(env) / "mnist"] if env else []) + datasets._checkout_dirs()
    for d in cands:
        if all((d / (b + ".gz")).is_file() or (d / b).is_file()
               for b in datasets.MNIST_FILES.values()):
            return d
    return None


@pytest.mark.skipif(_real_mnist_dir() is None, reason="real MNIST files not present")
def test_sigint_to_a_real_process(tmp_path):
    """SIGINT after the first checkpoint: status 130, partial JSON, a message naming it."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnfast", "paper", "mnist", "--steps", "100000",
         "--eval-every", "50", "--pop-batches", "5", "--no-progress", "--no-plot",
         "--data-dir", str(_real_mnist_dir()), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=package_env(),
        cwd=tmp_path)
    ckpt = out / "mnist_fig1.checkpoint.pkl"
    deadline = time.monotonic() + 120
    seen = None
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists():
            seen = ckpt.stat().st_mtime_ns
            time.sleep(0.3)
            if ckpt.exists() and ckpt.stat().st_mtime_ns != seen:
                break                           # a second checkpoint: past evaluation 0
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr and "--resume" in stderr
    res = json.loads((out / "mnist_fig1.json").read_text())
    assert res["interrupted"] is True and res["curves"]["nobn"]["step"][:2] == [0, 50]


# ------------------------------------------------------------------ percentile table

def test_percentile_rows_are_labelled_by_the_steps_the_run_has(tiny, tmp_path, capsys):
    status, out, _ = run_main(MNIST_ARGS + ["--data-dir", str(tiny), "--out",
                                            str(tmp_path)], capsys)
    assert status == 0
    table = [ln for ln in out.splitlines() if ln.startswith("| without BN |")]
    assert table[0].startswith("| without BN | start (step 0) | 0.76 / 0.79 / 0.82 |")
    # 30 steps evaluated every 10: no evaluation near a tenth (step 3) but the start
    assert len(table) == 2 and "| step 30 (the paper's end is step 50000) |  |" in table[1]
    assert "tenth" not in out.split("Figure 1b")[1].split("Run time")[0].replace(
        "the paper's tenth", "")


def test_short_run_tenth_row_names_its_step():
    from bnfast.paper import mnist_fig1

    steps = list(range(0, 1001, 100))
    cur = {"step": steps, "p15": [0.0] * 11, "p50": [0.5] * 11, "p85": [1.0] * 11}
    table = mnist_fig1.format_percentiles({"config": {"steps": 1000}, "curves": {"bn": cur}})
    rows = table.splitlines()[2:]
    assert [r.split(" | ")[1] for r in rows] == [
        "start (step 0)", "step 100 (the paper's tenth is step 5000)",
        "step 1000 (the paper's end is step 50000)"]
    assert rows[0].split(" | ")[2] == "-1.05 / -0.15 / 1.26"      # the start is the start
    assert rows[1].split(" | ")[2] == "" and rows[2].split(" | ")[2] == ""


def test_percentile_table_of_the_full_run_compares_with_the_paper():
    from bnfast.paper import mnist_fig1

    steps = list(range(0, 50001, 500))
    cur = {"step": steps, "p15": [0.0] * len(steps), "p50": [0.5] * len(steps),
           "p85": [1.0] * len(steps)}
    table = mnist_fig1.format_percentiles({"config": {"steps": 50000}, "curves": {"nobn": cur}})
    assert "| without BN | tenth (step 5000) | -0.85 / 0.99 / 2.07 |" in table
    assert "| without BN | end (step 50000) | -1.86 / -0.01 / 1.69 |" in table


def test_one_step_run_has_no_tenth_row():
    from bnfast.paper import mnist_fig1

    cur = {"step": [0, 1], "p15": [0.0, 0.1], "p50": [0.5, 0.6], "p85": [1.0, 1.1]}
    table = mnist_fig1.format_percentiles({"config": {"steps": 1}, "curves": {"bn": cur}})
    rows = table.splitlines()[2:]
    assert len(rows) == 2 and "step 1 (the paper's end" in rows[1]


# ------------------------------------------------------------------ speed table, bench

def _small_run_case(real):
    def run_case(shape, layout, dtype, threads, **kw):
        return real((4, 3, 5, 5), layout, dtype, threads, **dict(kw, repeat=1))
    return run_case


def test_quick_without_torch_says_not_installed(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)          # import torch -> ImportError
    monkeypatch.setattr(_bench, "run_case", _small_run_case(_bench.run_case))
    status, out, _ = run_main(["--repeat", "1"], capsys)
    assert status == 0
    assert "PyTorch: not installed" in out and "nan" not in out.lower().split()
    assert " nan" not in out and "vs torch" not in out


def test_quick_no_torch_flag(capsys, monkeypatch):
    monkeypatch.setattr(_bench, "run_case", _small_run_case(_bench.run_case))
    status, out, _ = run_main(["quick", "--repeat", "1", "--no-torch"], capsys)
    assert status == 0 and "PyTorch: skipped (--no-torch)" in out and " nan" not in out


def test_bench_ctrl_c_writes_the_rows_so_far(capsys, monkeypatch, tmp_path):
    real = _small_run_case(_bench.run_case)
    calls = []

    def run_case(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(_bench, "run_case", run_case)
    monkeypatch.setattr(_bench, "_torch", lambda: None)
    status, out, err = run_main(["bench", "--quick", "--out", str(tmp_path)], capsys)
    assert status == 130 and "interrupted" in err
    data = json.loads((tmp_path / "bench_quick.json").read_text())
    assert data["interrupted"] is True and len(data["results"]) == len(_bench.OPS)
    assert str(tmp_path / "bench_quick.json") in out


# ------------------------------------------------------------------ fit's BLAS threads

def test_fit_limits_the_blas_to_one_thread_and_restores_it():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from bnfast import nn, optim
    from bnfast.train import fit

    def blas():
        return [i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"]

    before = blas()
    if not before:
        pytest.skip("threadpoolctl sees no BLAS")
    seen = {}
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 5), dtype=np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    for kw, key in (({}, "default"), ({"blas_threads": None}, "none"),
                    ({"blas_threads": 2}, "two")):
        net = nn.Sequential(nn.Linear(5, 4, rng=rng), nn.BatchNorm1d(4), nn.ReLU(),
                            nn.Linear(4, 2, rng=rng))
        fit(net, nn.CrossEntropyLoss(), optim.SGD(net.parameters(), lr=0.1), (X, y),
            epochs=1, batch_size=20, progress=False,
            callback=lambda e, r, key=key: seen.__setitem__(key, blas()), **kw)
        assert blas() == before
    assert seen["default"] == [1] * len(before)
    assert seen["none"] == before
    assert seen["two"] == [2] * len(before)
    with pytest.raises(ValueError, match="blas_threads"):
        fit(net, nn.CrossEntropyLoss(), optim.SGD(net.parameters(), lr=0.1), (X, y),
            blas_threads=0, progress=False)
