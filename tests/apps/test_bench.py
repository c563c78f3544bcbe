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
        # the ReLU's cost: paired per round with the same variant's call without it
        assert (r.get("relu_cost", 0) > 0) == (r["op"] == "train_relu")
    assert "train_relu" in _bench.format_table(rows)


def test_timeit_many_hands_back_each_round():
    calls = []
    per_round = []
    got = _bench.timeit_many([lambda: calls.append(0), lambda: calls.append(1)], repeat=4,
                             min_time=0.0, samples=per_round)
    assert len(got) == 2 and len(per_round) == 2
    assert all(len(v) == 4 and min(v) > 0 for v in per_round)
    for (med, mn), v in zip(got, per_round):
        assert med == float(np.median(v)) and mn == min(v)


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


# ------------------------------------------------------------------ variants (--isa)

def _tiny_quick(monkeypatch):
    monkeypatch.setattr(_bench, "QUICK_F32", [(8, 4, 6, 6)])
    monkeypatch.setattr(_bench, "_torch", lambda: None)


def test_timeit_many_runs_prepare_before_every_sample():
    calls = []
    times = _bench.timeit_many([lambda: calls.append("a"), lambda: calls.append("b")],
                               repeat=3, min_time=0.0,
                               prepare=[lambda: calls.append("pa"), None])
    assert len(times) == 2
    # warm-up (prepare, 2 calls) then per round: prepare, sample of a, sample of b
    assert calls[:3] == ["pa", "a", "a"]
    rounds = calls[5:]
    assert rounds == ["pa", "a", "b"] * 3
    with pytest.raises(ValueError, match="one entry per function"):
        _bench.timeit_many([lambda: None], prepare=[None, None])


def test_run_case_times_each_variant_and_restores_the_selection():
    before = bnfast.get_isa()
    isas = bnfast.available_isas()
    rows = _bench.run_case((4, 3, 5, 5), "cl", np.float32, 1, repeat=1, isas=isas,
                           include_torch=False, include_numpy=False, include_fresh=False,
                           shape_class="x", min_time=0.0)
    assert bnfast.get_isa() == before
    assert [(r["op"], r["isa"]) for r in rows] == [(op, i) for op in _bench.OPS
                                                   for i in isas]
    for r in rows:
        assert r["class"] == "x" and r["bnfast_ms"] > 0 and r["copy_ms"] > 0
        assert r["torch_ms"] != r["torch_ms"] and r["onednn_ms"] != r["onednn_ms"]
        # the plan of the variant that ran
        assert r["strategy"] and r["plan"]["variant"] == r["isa"]
        assert r["plan"]["threads_asked"] == 1 and r["plan"]["relu"] == (r["op"] == "train_relu")


def test_run_case_without_training_values_times_inference_only():
    rows = _bench.run_case((1, 6), "cf", np.float32, 1, repeat=1, include_torch=False,
                           min_time=0.0)
    assert [r["op"] for r in rows] == ["infer"]


def test_resolve_isas(monkeypatch):
    avail = bnfast.available_isas()
    assert _bench.resolve_isas("all") == (avail, [n for n in _bench._config.ISA_NAMES
                                                  if n not in avail])
    assert _bench.resolve_isas(None) == _bench.resolve_isas("all")       # full run: all
    assert _bench.resolve_isas(None, quick=True) == ([bnfast.get_isa()], [])
    assert _bench.resolve_isas("baseline") == (["baseline"], [])
    monkeypatch.setattr(_bench._config, "available_isas", lambda: ["baseline"])
    assert _bench.resolve_isas("all") == (["baseline"], ["avx2", "avx512"])
    with pytest.raises(ValueError, match="not supported.*available: baseline"):
        _bench.resolve_isas("avx512")


def test_bench_cli_isa_all_writes_one_table_per_variant(tmp_path, monkeypatch, capsys):
    _tiny_quick(monkeypatch)
    from bnfast.__main__ import main

    before = bnfast.get_isa()
    assert main(["bench", "--quick", "--isa", "all", "--out", str(tmp_path),
                 "--repeat", "1"]) == 0
    assert bnfast.get_isa() == before
    out = capsys.readouterr().out
    isas = bnfast.available_isas()
    for isa in isas:
        assert f"variant {isa}:" in out
        assert (tmp_path / f"bench_quick_{isa}.md").exists()
    data = json.loads((tmp_path / "bench_quick.json").read_text())
    assert data["isas"] == isas and set(data["summary"]) == set(isas)
    assert sorted({r["isa"] for r in data["results"]}) == sorted(isas)
    assert len(data["results"]) == 2 * len(_bench.OPS) * len(isas)   # cf and cl


def test_bench_cli_one_named_variant(tmp_path, monkeypatch):
    _tiny_quick(monkeypatch)
    from bnfast.__main__ import main

    assert main(["bench", "--quick", "--isa", "baseline", "--out", str(tmp_path),
                 "--repeat", "1"]) == 0
    data = json.loads((tmp_path / "bench_quick.json").read_text())
    assert {r["isa"] for r in data["results"]} == {"baseline"}


def test_bench_cli_unknown_variant_is_a_usage_error(capsys):
    from bnfast.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--isa", "sse9"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--isa" in err and "'sse9'" in err
    for name in ("baseline", "avx2", "avx512", "all"):
        assert name in err.splitlines()[-1]


def test_bench_cli_unsupported_variant_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setattr(_bench._config, "available_isas", lambda: ["baseline"])
    from bnfast.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--quick", "--isa", "avx512"])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("bnfast bench: error: argument --isa:")
    assert "avx512" in last and "available: baseline" in last


def test_bench_json_schema(tmp_path, monkeypatch):
    _tiny_quick(monkeypatch)
    from bnfast.__main__ import main

    assert main(["bench", "--quick", "--out", str(tmp_path), "--repeat", "1"]) == 0
    text = (tmp_path / "bench_quick.json").read_text()
    assert "NaN" not in text                      # missing figures are null (valid JSON)
    data = json.loads(text)
    for key in ("date", "config", "machine", "torch", "torch_threads", "seconds", "summary",
                "results", "isas", "threads", "onednn"):
        assert key in data, key
    assert data["torch"] is None and data["threads"] == [bnfast.get_num_threads()]
    assert data["anchors"]["torch"] is None and data["anchors"]["torch_cpu_capability"] is None
    summary_md = (tmp_path / "bench_quick_summary.md").read_text()
    assert summary_md.startswith("anchors: PyTorch not installed\n")
    assert set(data["machine"]) >= {"model", "flags", "cpus"}
    row_keys = {"class", "op", "shape", "layout", "dtype", "threads", "bytes", "isa",
                "bnfast_ms", "bnfast_min_ms", "torch_ms", "torch_min_ms", "onednn_ms",
                "onednn_min_ms", "copy_ms", "copy_min_ms", "copy_numpy_ms",
                "copy_threads_ms", "numpy_ms", "bnfast_fresh_ms", "strategy", "plan"}
    for r in data["results"]:
        assert set(r) >= row_keys
        assert r["torch_ms"] is None and r["bnfast_ms"] > 0
        assert r["bnfast_min_ms"] <= r["bnfast_ms"]
    s = data["summary"][bnfast.get_isa()]
    assert {"per_op", "geomean_train_backward", "slower_than_torch", "worst",
            "targets"} <= set(s)
    rows = _bench.load_rows(str(tmp_path / "bench_quick.json"))
    assert rows[0]["torch_ms"] != rows[0]["torch_ms"]          # null read back as nan


# ------------------------------------------------------------------ summary (synthetic)

def _row(op, shape, bn, torch, copy=1.0, layout="cf", dtype="float32", cls="classic",
         isa="avx512", onednn=float("nan")):
    return {"class": cls, "op": op, "shape": list(shape), "layout": layout, "dtype": dtype,
            "threads": 2, "isa": isa, "bnfast_ms": bn, "torch_ms": torch,
            "onednn_ms": onednn, "copy_ms": copy, "strategy": ""}


def _targets(s):
    return {t["target"]: t for t in s["targets"] + s["item2"]}


def test_summary_of_synthetic_rows():
    rows = [_row("train", (8, 4), 1.0, 4.0, onednn=2.0),
            _row("backward", (8, 4), 1.0, 1.0),
            _row("infer", (8, 4), 2.0, 1.0),                  # 0.5x: the worst
            _row("train_relu", (8, 4), 1.2, 3.0),             # ReLU costs 20 % more
            _row("train", (8, 4), 1.0, 0.1, dtype="float64")]  # float64: not in targets
    s = _bench.summarize_variant(rows)
    assert s["geomean_train_backward"] == pytest.approx(2.0)    # sqrt(4 * 1)
    assert s["geomean_train_backward_of_minima"] != s["geomean_train_backward_of_minima"]
    rows_min = [dict(r, torch_min_ms=r["torch_ms"] / 2, bnfast_min_ms=r["bnfast_ms"])
                for r in rows]
    s_min = _bench.summarize_variant(rows_min)
    assert s_min["geomean_train_backward_of_minima"] == pytest.approx(1.0)   # sqrt(2 * .5)
    assert s_min["slower_than_torch_by_minima"] == 2           # backward, infer
    assert s["cases_float32"] == 4
    assert [x["case"] for x in s["slower_than_torch"]] == ["infer 8x4 cf float32"]
    assert s["worst"] == {"case": "infer 8x4 cf float32", "speedup": 0.5}
    assert s["float64_slower_than_torch"] == 1 and s["float64_cases"] == 1
    t = _targets(s)
    never = t["never slower than PyTorch (speed-up >= 1.0)"]
    assert never["met"] is False and never["figure"] == 0.5
    assert "1 of 4 cases slower" in never["detail"]
    gm = t["geometric mean of train and backward speed-ups >= 2x"]
    assert gm["met"] is True and gm["figure"] == pytest.approx(2.0)
    dnn = t["training forward at least as fast as oneDNN"]
    assert dnn["met"] is True and dnn["figure"] == 2.0
    relu = t["fused ReLU costs at most 10% more than training forward"]
    assert relu["met"] is False and relu["figure"] == pytest.approx(1.2)
    assert s["per_op"]["train"]["cases"] == 2 and s["per_op"]["infer"]["min"] == 0.5
    # no case larger than the cache, no batch-1 case: no such targets
    assert not any(k.startswith("> LLC") for k in t)


def test_summary_targets_for_tensors_larger_than_the_cache():
    big = (32, 64, 96, 96)
    rows = [_row("infer", big, 1.04, 9, copy=1.0, cls="> LLC"),            # met (1.05)
            _row("train", big, 1.30, 9, copy=1.0, cls="> LLC"),            # not met (1.25)
            _row("backward", big, 1.69, 9, copy=1.0, cls="> LLC"),         # met (1.7)
            _row("train", big, 1.59, 9, copy=1.0, cls="> LLC", layout="cl"),     # met (1.6)
            _row("backward", big, 2.7, 9, copy=1.0, cls="> LLC", layout="cl"),   # not (2.6)
            _row("train", big, 9.0, 9, copy=1.0, cls="classic")]           # other class
    t = _targets(_bench.summarize_variant(rows))
    got = {k: (v["met"], round(v["figure"], 2)) for k, v in t.items() if k.startswith("> LLC")}
    assert got == {
        "> LLC channels-first inference <= 1.05x copy": (True, 1.04),
        "> LLC channels-first training forward <= 1.25x copy": (False, 1.3),
        "> LLC channels-first backward <= 1.7x copy": (True, 1.69),
        "> LLC channels-last training forward <= 1.6x copy": (True, 1.59),
        "> LLC channels-last backward <= 2.6x copy": (False, 2.7)}


def test_summary_onednn_batch1_and_regression():
    rows = [_row("train", (4, 8, 3, 3), 2.0, 5.0, onednn=1.0),       # 0.5x oneDNN
            _row("train", (4, 8, 5, 5), 1.0, 5.0, onednn=3.0),
            _row("infer", (1, 512, 7, 7), 0.010, 1.0, copy=0.004, cls="batch-1"),
            _row("infer", (1, 2048), 0.004, 1.0, copy=0.001, cls="batch-1")]
    ref = [dict(r, bnfast_ms=r["bnfast_ms"] / 2) for r in rows[:2]]  # we got 2x slower
    s = _bench.summarize_variant(rows, ref)
    t = _targets(s)
    dnn = t["training forward at least as fast as oneDNN"]
    assert dnn["met"] is False and dnn["figure"] == 0.5 and "1 of 2" in dnn["detail"]
    assert s["vs_onednn"] == {"train": {"cases": 2, "slower": 1, "min": 0.5,
                                        "geomean": pytest.approx(1.5 ** 0.5)}}
    b1 = t["batch-1 inference within max(1.5x copy, 5 us)"]
    # 10 us against max(6 us, 5 us) -> 1.67 (not met); 4 us against 5 us -> 0.8
    assert b1["met"] is False and b1["figure"] == pytest.approx(0.010 / 0.006)
    reg = [v for k, v in t.items() if k.startswith("no regression")][0]
    assert reg["met"] is False and reg["figure"] == pytest.approx(2.0)
    r = _bench.regression(rows, ref)
    assert r["cases"] == 2 and r["speedup_geomean"] == pytest.approx(2.0)
    ref2 = [dict(x, torch_ms=x["torch_ms"] / 2) for x in ref]    # PyTorch was slower too
    assert _bench.regression(rows, ref2)["speedup_geomean"] == pytest.approx(1.0)
    assert _bench.regression(rows, [])is None


def test_compare_variants_counts_cases_where_avx2_is_not_faster():
    rows = [_row("train", (8, 4), 1.0, 1, isa="avx2"), _row("train", (8, 4), 2.0, 1,
                                                            isa="baseline"),
            _row("infer", (8, 4), 1.5, 1, isa="avx2"), _row("infer", (8, 4), 1.0, 1,
                                                            isa="baseline")]
    c = _bench.compare_variants(rows)
    assert c["cases"] == 2 and c["not_faster"] == 1 and c["met"] is False
    assert c["worst"] == pytest.approx(1 / 1.5) and c["worst_case"] == "infer 8x4 cf float32"
    assert _bench.compare_variants(rows[:1]) is None


def test_reports_markdown_and_plots(tmp_path):
    rows = []
    for isa in ("baseline", "avx512"):
        rows += [_row("train", (4, 8, 3, 3), 2.0, 5.0, onednn=1.0, isa=isa),
                 _row("train", (4, 8, 3, 3), 2.0, 1.0, layout="cl", isa=isa, cls="tiny S"),
                 _row("infer", (32, 64, 96, 96), 1.0, 5.0, cls="> LLC", isa=isa),
                 _row("backward", (256, 1024), 1.0, 1.5, dtype="float64", isa=isa)]
    pytest.importorskip("matplotlib")
    _bench.write_reports(rows, str(tmp_path), "b", log=lambda *a: None)
    for isa in ("baseline", "avx512"):
        md = (tmp_path / f"b_{isa}.md").read_text()
        assert f"**{isa}: training forward** (2 cases; times in ms)" in md
        assert "| case | bnfast | PyTorch | speed-up | oneDNN | x copy |" in md
        assert "| *classic* | | | | | |" in md          # one row names each class
        assert "| 4x8x3x3 cf | 2.00 | 5.00 | 2.50x | 1.00 | 2.00x |" in md
        assert "| 4x8x3x3 cl | 2.00 | 1.00 | **0.50x** | - | 2.00x |" in md
        assert "| 256x1024 cf f64 | 1.00 | 1.50 | 1.50x | 1.00x |" in md
        assert md.index("*tiny S*") < md.index("*classic*")   # in the order of CLASSES
        assert (tmp_path / f"b_{isa}.png").stat().st_size > 10000
    summary = (tmp_path / "b_summary.md").read_text()
    assert "| | baseline | avx512 |" in summary and "**not met**" in summary
    assert "| train vs oneDNN: geomean (min), slower | 0.50x (0.50x), 1 of 1 |" in summary
    text = _bench.format_variant_table([r for r in rows if r["isa"] == "avx512"])
    assert "oneDNN" in text and "4x8x3x3" in text


def test_onednn_copy_is_exact_and_in_onednn_format():
    torch = pytest.importorskip("torch")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch without mkldnn (oneDNN)")
    x = torch.randn(2, 17, 5, 4).contiguous(memory_format=torch.channels_last)
    b = _bench._onednn_blocked(torch, 17)(x)
    assert b.is_mkldnn and torch.equal(b.to_dense(), x)
    assert _bench._onednn_works(torch) == (True, "")


def test_plan_short():
    assert _bench.plan_short("") == "" and _bench.plan_short("rows") == "rows"
    assert _bench.plan_short("columns:register+period64") == "cols reg+p64"
    assert _bench.plan_short("columns:memory+spans", {"threads": 1, "threads_asked": 2}) \
        == "cols mem+spans 1t"
    assert _bench.plan_short("rows", {"threads": 2, "threads_asked": 2}) == "rows"


def test_plan_string():
    assert _bench.plan_string(None) == "" and _bench.plan_string({}) == ""
    assert _bench.plan_string({"strategy": "rows/rows", "x": 1}) == "rows/rows"
    assert _bench.plan_string({"passes": [{"strategy": "a"}, "b"]}) == "a+b"
    assert _bench._jsonable({"k": (np.int64(3), np.float32(0.5), None, object)})["k"][:3] \
        == [3, 0.5, None]


def test_each_variant_is_in_force_while_its_samples_run(monkeypatch):
    """The variant of a row is the one selected while its calls ran, not just a label."""
    isas = bnfast.available_isas()
    seen = {}
    real = _bench._api.batch_norm_infer

    def spy(*a, **kw):
        seen.setdefault(kw.get("out") is not None, set()).add(bnfast.get_isa())
        return real(*a, **kw)

    monkeypatch.setattr(_bench._api, "batch_norm_infer", spy)
    calls = []
    real_timeit = _bench.timeit_many

    def timeit_many(fns, **kw):
        out = real_timeit(fns, **kw)
        calls.append(kw.get("prepare"))
        return out

    monkeypatch.setattr(_bench, "timeit_many", timeit_many)
    _bench.run_case((4, 3, 5, 5), "cf", np.float32, 1, ops=("infer",), repeat=2, isas=isas,
                    include_torch=False, include_numpy=False, include_fresh=False,
                    min_time=0.0)
    assert seen[True] == set(isas)            # every variant ran its own samples
    assert len(calls[-1]) == len(isas) + 1     # one selector per variant, and the copy


def test_training_forward_with_and_without_relu_share_one_set_of_samples(monkeypatch):
    sets = []
    real = _bench.timeit_many

    def timeit_many(fns, **kw):
        sets.append(len(fns))
        return real(fns, **kw)

    monkeypatch.setattr(_bench, "timeit_many", timeit_many)
    rows = _bench.run_case((4, 3, 5, 5), "cf", np.float32, 1, repeat=1, isas=["baseline"],
                           include_torch=False, include_numpy=False, include_fresh=False,
                           min_time=0.0)
    # the copy floor, then {train, train_relu, copy}, {infer, copy}, {backward, copy}
    assert sets == [2, 3, 2, 2]
    by = {r["op"]: r for r in rows}
    assert by["train"]["copy_ms"] == by["train_relu"]["copy_ms"]


def test_anchors_describe_what_pytorch_and_onednn_run(monkeypatch):
    """The JSON and the summary say which code the anchors dispatch to: ATen's CPU
    capability (lowered by ATEN_CPU_CAPABILITY) and oneDNN's instruction-set limit."""
    class _Cpu:
        @staticmethod
        def get_cpu_capability():
            return "DEFAULT"

    class _Torch:
        __version__ = "9.9.9"

        class backends:
            cpu = _Cpu

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    info = _bench.anchors_info(_Torch)
    assert info == {"torch": "9.9.9", "torch_cpu_capability": "DEFAULT",
                    "onednn_max_cpu_isa": "SSE41"}
    assert _bench.anchors_line(info) == ("anchors: PyTorch 9.9.9 (ATen CPU capability "
                                         "DEFAULT); oneDNN instruction-set limit: SSE41")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)

    class _Old:                      # a PyTorch without the capability query
        __version__ = "1.0"
        backends = None

    info = _bench.anchors_info(_Old)
    assert info["torch_cpu_capability"] is None and info["onednn_max_cpu_isa"] is None
    assert _bench.anchors_line(info).endswith("(ATen CPU capability unknown); oneDNN "
                                              "instruction-set limit: none")


def test_full_run_reports_the_plans_of_variants_this_cpu_lacks(tmp_path, monkeypatch):
    """The full run on a CPU without some variants (here: as if only the baseline ran)
    reports, for each case and op, the plan each missing variant would take, beside the
    plan of the variant that ran, and where they differ (issue 10: "show the plan that
    AVX-512 would take")."""
    monkeypatch.setattr(_bench, "FULL_CASES",
                        [("classic", (8, 4, 6, 6), ("train", "infer"), "float32"),
                         ("2-D", (4096, 4096), ("train",), "float32")])
    monkeypatch.setattr(_bench, "_fits", lambda shape, dt: True)
    monkeypatch.setattr(_bench, "_torch", lambda: None)
    monkeypatch.setattr(_bench._config, "available_isas", lambda: ["baseline"])
    monkeypatch.setattr(_bench, "run_case", lambda shape, layout, dtype, threads, **kw: [
        {"class": kw["shape_class"], "op": op, "shape": list(shape), "layout": layout,
         "dtype": np.dtype(dtype).name, "threads": threads, "isa": "baseline",
         "bnfast_ms": 1.0, "copy_ms": 1.0,
         **dict(zip(("plan", "strategy"), _bench._plan(
             np.empty((shape[0],) + tuple(shape[2:]) + (shape[1],) if layout == "cl"
                      else shape, np.float32), op, -1 if layout == "cl" else 1, False,
             isa="baseline")))}
        for op in kw["ops"]])
    lines = []
    _bench.run(out_dir=str(tmp_path), isas=["baseline"], log=lines.append)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["not_run"] == ["avx2", "avx512"]
    plans = data["plans_not_run"]
    assert len(plans) == 2 * (2 * 2 + 1)             # 2 variants x (2 layouts x 2 ops + 1)
    for p in plans:
        shape = tuple(p["shape"])
        x = np.empty((shape[0],) + shape[2:] + (shape[1],) if p["layout"] == "cl" else shape,
                     np.float32)
        want = bnfast.explain(x, op=p["op"], axis=-1 if p["layout"] == "cl" else 1,
                              isa=p["isa"])
        assert p["strategy"] == want["strategy"] and p["plan"]["variant"] == p["isa"]
    for isa in ("avx2", "avx512"):
        md = (tmp_path / f"bench_plans_{isa}.md").read_text()
        assert f"| case | {isa} plan | baseline plan | differs in |" in md
        assert "8x4x6x6 cf" in md and "8x4x6x6 cl" in md and "4096x4096 cf" in md
        assert any(line.lstrip().startswith(f"variant {isa}: not supported by this CPU, not timed")
                   for line in lines)
    # AVX-512 walks the statistics of this large matrix from memory, the others in
    # register strips: the one difference here, named in the table
    md = (tmp_path / "bench_plans_avx512.md").read_text()
    assert "1 of 5 plans differ from baseline's." in md
    row = next(line for line in md.splitlines() if line.startswith("| 4096x4096 cf"))
    assert "reduce.walk" in row and "cols mem+" in row


def test_plan_diff_names_the_fields_that_differ():
    a = {"variant": "avx2", "layout": "rows", "reduce": {"walk": "rows", "items": 3}}
    b = {"variant": "avx512", "layout": "rows", "reduce": {"walk": "memory", "items": 3}}
    assert _bench._plan_diff(a, b) == ["reduce.walk"]
    assert _bench._plan_diff(a, a) == []
    assert _bench._plan_diff(a, {**a, "fusion": "none"}) == ["fusion"]
