"""Smoke tests of the benchmark harness (timings themselves are never asserted)."""
import json

import numpy as np
import pytest

import bnfast
from bnfast import _bench, _core


def test_multithreaded_copy_copies_every_byte():
    x = np.random.default_rng(0).standard_normal(3 * (1 << 18) + 5).astype(np.float32)
    y = np.zeros_like(x)
    _core.copy(x, y, 2)
    assert np.array_equal(x, y)
    with pytest.raises(ValueError, match="size"):
        _core.copy(x, y[:-1], 1)


@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_streaming_copy_copies_every_byte(offset):
    """The copy floor streams (non-temporal stores) above the threshold, like the kernels."""
    from bnfast import _config

    x = np.random.default_rng(1).standard_normal(3 * (1 << 18) + 7).astype(np.float32)
    base = np.zeros(x.size + offset, np.float32)
    y = base[offset:]
    with _config._stream_min_bytes(0):
        _core.copy(x, y, 2)
    assert np.array_equal(x, y)
    assert not base[:offset].any()


@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_run_case_reports_every_op(layout):
    rows = _bench.run_case((4, 3, 5, 5), layout, np.float32, 1, repeat=1,
                           include_torch=False)
    assert [r["op"] for r in rows] == list(_bench.OPS)
    for r in rows:
        assert r["layout"] == layout and r["threads"] == 1
        for k in ("bnfast_ms", "bnfast_fresh_ms", "numpy_ms", "copy_ms"):
            assert r[k] > 0
    assert "train_relu" in _bench.format_table(rows)


def test_numpy_baselines_agree_with_reference():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3, 4))
    dy = rng.standard_normal((6, 3, 4))
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    y, mean, invstd = _bench.numpy_train(x, w, b, 1)
    ry, rmean, rinv = bnfast.reference.batch_norm_train(x, w, b)
    assert np.allclose(y, ry)
    dx, dw, db = _bench.numpy_backward(dy, x, mean, invstd, w, 1)
    rdx, rdw, rdb = bnfast.reference.batch_norm_backward(dy, x, rmean, rinv, w)
    assert np.allclose(dx, rdx) and np.allclose(dw, rdw) and np.allclose(db, rdb)
    var = 1 / rinv ** 2 - 1e-5
    assert np.allclose(_bench.numpy_infer(x, rmean, var, w, b, 1),
                       bnfast.reference.batch_norm_infer(x, rmean, var, w, b))


def test_bench_cli_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(_bench, "QUICK_F32", [(8, 4, 6, 6)])
    monkeypatch.setattr(_bench, "_torch", lambda: None)
    from bnfast.__main__ import main

    assert main(["bench", "--quick", "--out", str(tmp_path), "--repeat", "1"]) == 0
    data = json.loads((tmp_path / "bench_quick.json").read_text())
    assert {r["layout"] for r in data["results"]} == {"cf", "cl"}
    assert data["config"]["version"] == bnfast.__version__
