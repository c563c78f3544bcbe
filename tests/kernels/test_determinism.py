"""Bit-identical results for any thread count, across kernel variants, and under concurrent
calls from several Python threads."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import bnfast
from conftest import ISAS, assert_same_bits, rng_for


# The paths asserted below are those of a 16 MiB streaming threshold (conftest.py).
pytestmark = pytest.mark.usefixtures("threshold_16mib")

# All well above BN_PAR_MIN (32768 elements), so the kernels really run multithreaded, and on
# both sides of the S=64 layout switch.  PATHS: the layout and, on AVX-512, the walks of the
# statistics and the backward sums each case takes (asserted through the plan below).
CASES = {
    "nchw-f32": ((32, 64, 28, 28), np.float32, 1, "first"),
    "nhwc-f32": ((32, 64, 28, 28), np.float32, -1, "last"),
    "2d-f32": ((4096, 512), np.float32, 1, "first"),
    "c1-nchw-f32": ((16, 1, 128, 128), np.float32, 1, "first"),
    "c1-2d-f64": ((200000, 1), np.float64, 1, "first"),
    "s9-f64": ((2048, 24, 3, 3), np.float64, 1, "first"),
    "s65-f64": ((97, 33, 65), np.float64, 1, "first"),
    "groups-chunks-f32": ((128, 24, 32, 33), np.float32, 1, "first"),
    "c43-2d-f32": ((8192, 43), np.float32, 1, "first"),
    "c100-nhwc-f64": ((64, 100, 9, 9), np.float64, -1, "last"),
}
PATHS = {
    "nchw-f32": ("rows", "rows", "rows"),                 # S = 784
    "nhwc-f32": ("columns", "register", "register"),      # Cp = 64
    "2d-f32": ("columns", "register", "memory"),          # Cp = 512: x and dy not resident
    "c1-nchw-f32": ("rows", "rows", "rows"),              # C = 1, S = 16384
    "c1-2d-f64": ("columns", "register", "blocks"),       # Cp = 1
    "s9-f64": ("columns", "register", "register"),        # Cp = 216, cache-resident
    "s65-f64": ("rows", "rows", "rows"),                  # odd sizes, tail of 1
    "groups-chunks-f32": ("rows", "rows", "rows"),        # 2 row groups, channel chunks
    "c43-2d-f32": ("columns", "register", "register"),    # 5 vectors + 3 scalar columns
    "c100-nhwc-f64": ("columns", "register", "register"),  # a 64-column strip, then 36
}


@pytest.mark.parametrize("name", list(CASES))
def test_case_takes_its_path(name):
    shape, dtype, axis, layout = CASES[name]
    if layout == "last":
        shape = shape[:1] + shape[2:] + shape[1:2]
    x = np.empty(shape, dtype)
    with bnfast.num_threads(2):
        train = bnfast.explain(x, op="train", axis=axis, isa="avx512")
        back = bnfast.explain(x, op="backward", axis=axis, isa="avx512")
    assert train["threads"] == 2, "the case must run multithreaded"
    assert (train["layout"], train["reduce"]["walk"], back["reduce"]["walk"]) == PATHS[name]
    if train["layout"] == "rows" and name.startswith("groups"):
        assert train["reduce"]["row_groups"] == 2 and train["reduce"]["items"] > 2


_cache = {}


def _inputs(name):
    if name not in _cache:
        shape, dtype, axis, layout = CASES[name]
        rng = rng_for("determinism", name)
        x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        if layout == "last":
            x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
            dy = np.ascontiguousarray(np.moveaxis(dy, 1, -1))
        C = x.shape[axis]
        w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
        _cache[name] = (x, dy, w, b, axis)
    return _cache[name]


def _run_all(name):
    """Every public function on the case's inputs; a dict of result arrays."""
    x, dy, w, b, axis = _inputs(name)
    C = x.shape[axis]
    out = {}
    out["moments.mean"], out["moments.var"] = bnfast.moments(x, axis=axis)
    rm, rv = np.zeros(C, x.dtype), np.ones(C, x.dtype)
    y, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis, running_mean=rm,
                                              running_var=rv)
    out.update({"train.y": y, "train.mean": mean, "train.invstd": invstd,
                "train.running_mean": rm, "train.running_var": rv})
    out["train_relu.y"] = bnfast.batch_norm_train(x, w, b, axis=axis, relu=True)[0]
    var = 1.0 / invstd ** 2
    out["infer.y"] = bnfast.batch_norm_infer(x, mean, var, w, b, axis=axis)
    out["infer_relu.y"] = bnfast.batch_norm_infer(x, mean, var, w, b, axis=axis, relu=True)
    for training in (True, False):
        for relu in (False, True):
            key = f"backward[{'train' if training else 'eval'}{'-relu' if relu else ''}]"
            dx, dw, db = bnfast.batch_norm_backward(dy, x, mean, invstd, w, bias=b, relu=relu,
                                                    training=training, axis=axis)
            out.update({key + ".dx": dx, key + ".dweight": dw, key + ".dbias": db})
    out["batch_norm.y"] = bnfast.batch_norm(x, rm.copy(), rv.copy(), w, b, training=True,
                                            axis=axis)
    return out


def _compare(r0, r1, what):
    assert r0.keys() == r1.keys()
    for k in r0:
        assert_same_bits(r0[k], r1[k], f"{what}: {k}")


@pytest.mark.parametrize("name", list(CASES))
def test_thread_count_does_not_change_results(name, isa):
    with bnfast.num_threads(1):
        base = _run_all(name)
    for n in (2, 3, 4):
        with bnfast.num_threads(n):
            _compare(base, _run_all(name), f"{isa}, {n} threads vs 1")


@pytest.mark.parametrize("name", list(CASES))
def test_streaming_and_large_data_paths_do_not_change_results(name, isa):
    """Threshold 0: every pass streams where the output allows and the reductions take the
    paths for data larger than the cache (row-by-row walks instead of register strips)."""
    from bnfast import _config

    with bnfast.num_threads(2):
        base = _run_all(name)
        with _config._stream_min_bytes(0):
            _compare(base, _run_all(name), f"{isa}, streaming vs not")


@pytest.mark.parametrize("name", list(CASES))
def test_all_variants_are_bit_identical(name):
    if len(ISAS) < 2:
        pytest.skip("only one kernel variant on this CPU")
    results = {}
    for isa in ISAS:
        with bnfast.use_isa(isa), bnfast.num_threads(2):
            results[isa] = _run_all(name)
    for isa in ISAS[1:]:
        _compare(results[ISAS[0]], results[isa], f"{isa} vs {ISAS[0]}")


def test_variants_bit_identical_on_small_odd_shapes():
    """Vector tails and the column/row strategies on small, single-threaded shapes."""
    if len(ISAS) < 2:
        pytest.skip("only one kernel variant on this CPU")
    rng = rng_for("variants-small")
    for shape in [(3, 7), (2, 17, 9), (5, 3, 65), (2, 1, 129), (3, 9, 7, 3), (2, 65),
                  (9, 43), (5, 100), (33, 64), (2, 90, 200)]:
        for dtype in (np.float32, np.float64):
            x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            C = shape[1]
            w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
            res = {}
            for isa in ISAS:
                with bnfast.use_isa(isa):
                    y, m, inv = bnfast.batch_norm_train(x, w, b, relu=True)
                    res[isa] = [*bnfast.moments(x), y, m, inv,
                                *bnfast.batch_norm_backward(dy, x, m, inv, w, bias=b, relu=True),
                                *bnfast.batch_norm_backward(dy, x, m, inv, w)]
            for isa in ISAS[1:]:
                for i, (a, c) in enumerate(zip(res[ISAS[0]], res[isa])):
                    assert_same_bits(a, c, f"{shape} {np.dtype(dtype).name} {isa} result {i}")


def test_variants_bit_identical_on_short_rows_and_merge_tails():
    """The rows layout's backward sums and statistics on rows of 49 (six vectors and a
    one-element tail: the lane sums of two accumulators at once, bn_acc_hsum2), the
    element-wise tails stored with their NaNs made canonical (store_tail), and the columns
    layout's final backward merge of whole 8-channel blocks and a partial one (C = 2051);
    with NaN, infinity and signed zeros among the values, on 1 and 2 threads."""
    if len(ISAS) < 2:
        pytest.skip("only one kernel variant on this CPU")
    rng = rng_for("variants-short-rows")
    for shape in [(8, 40, 7, 7), (3, 11, 49), (2, 2051), (4, 2051)]:
        layout = bnfast.explain(np.empty(shape, np.float32), op="backward")["layout"]
        assert layout == ("rows" if len(shape) > 2 else "columns"), shape
        for dtype in (np.float32, np.float64):
            x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            flat_x, flat_dy = x.reshape(shape[0], shape[1], -1), dy.reshape(shape[0], shape[1], -1)
            flat_x[0, 1, -1] = np.nan          # a row's scalar tail (S = 49) / one column
            flat_dy[1, 2, -1] = -np.nan
            flat_dy[0, 3, 0] = np.inf
            flat_dy[1, 4, -1] = -0.0
            C = shape[1]
            w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
            res = {}
            for isa in ISAS:
                for threads in (1, 2):
                    with bnfast.use_isa(isa), bnfast.num_threads(threads):
                        y, m, inv = bnfast.batch_norm_train(x, w, b, relu=True)
                        v = 1.0 / inv.astype(np.float64) ** 2
                        v[~(v >= 0)] = 1.0             # channel 1's NaN statistics
                        res[isa, threads] = [
                            *bnfast.moments(x), y, m, inv,
                            bnfast.batch_norm_infer(x, m, v, w, b),
                            *bnfast.batch_norm_backward(dy, x, m, inv, w, bias=b, relu=True),
                            *bnfast.batch_norm_backward(dy, x, m, inv, w)]
            first = res[ISAS[0], 1]
            for key, r in res.items():
                for i, (a, c) in enumerate(zip(first, r)):
                    assert_same_bits(a, c, f"{shape} {np.dtype(dtype).name} {key} result {i}")
            dbias = first[-1]
            assert np.isnan(dbias[2]) and np.isinf(dbias[3])   # the special values got there


# ------------------------------------------------------------------ concurrency

def _task(args):
    x, dy, w, b, rm, rv = args
    y, mean, invstd = bnfast.batch_norm_train(x, w, b, running_mean=rm, running_var=rv)
    dx, dw, db = bnfast.batch_norm_backward(dy, x, mean, invstd, w)
    m, v = bnfast.moments(x)
    return [y, mean, invstd, rm, rv, dx, dw, db, m, v]


def _tasks():
    rng = rng_for("concurrency")
    shapes = [(16, 32, 20, 20), (64, 128), (8, 16, 70), (4096, 24), (3, 5, 7, 9)]
    tasks = []
    for i in range(16):
        shape = shapes[i % len(shapes)]
        dtype = np.float32 if i % 2 else np.float64
        x = (rng.standard_normal(shape) + i).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        C = shape[1]
        tasks.append((x, dy, rng.uniform(0.5, 2, C), rng.standard_normal(C),
                      np.zeros(C, dtype), np.ones(C, dtype)))
    return tasks


@pytest.mark.parametrize("threads", [1, 2])
def test_concurrent_python_threads_match_serial(threads, isa):
    with bnfast.num_threads(threads):
        tasks = _tasks()
        serial = [_task(tuple(a.copy() for a in t)) for t in tasks]
        for _ in range(2):
            fresh = [tuple(a.copy() for a in t) for t in tasks]
            with ThreadPoolExecutor(max_workers=4) as pool:
                parallel = list(pool.map(_task, fresh))
            for i, (s, p) in enumerate(zip(serial, parallel)):
                for j, (a, c) in enumerate(zip(s, p)):
                    assert_same_bits(a, c, f"task {i} result {j}")
