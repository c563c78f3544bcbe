"""The kernels' plan (csrc/plan.c, bnfast.explain) and the forced-strategy switch.

* Which layout and walk each shape takes, per variant, asserted through the plan (the
  shapes of test_determinism.py and test_reference_grid.py included).
* Every forced layout and walk, in every variant this CPU supports, against the float64
  twin, bit-identical across thread counts and variants; a forced WALK gives the same bits
  as the plan's own choice (walks change the speed, never the order of additions).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import bnfast
from bnfast._plan import force_strategy, forced_strategy
from bnfast import reference as ref
from conftest import (ISAS, assert_close, assert_same_bits, make_params, make_x, package_env,
                      reduce_axes, rng_for)


@pytest.fixture
def force():
    """force(**kw): force walks for the rest of the test; always restored."""
    before = forced_strategy()

    def setter(**kw):
        force_strategy(**kw)
    yield setter
    force_strategy(**before)


# The paths asserted below are those of a 16 MiB streaming threshold (conftest.py).
pytestmark = pytest.mark.usefixtures("threshold_16mib")


def _plan(shape, op, axis=1, isa=None, dtype=np.float32, threads=2):
    with bnfast.num_threads(threads):
        return bnfast.explain(np.empty(shape, dtype), op=op, axis=axis, isa=isa)


def _walks(shape, op, axis=1, isa=None):
    p = _plan(shape, op, axis, isa)
    return (p["layout"], p.get("reduce", {}).get("walk"), p.get("elementwise", {}).get("walk"))


# ---------------------------------------------------------------- what the plan chooses

# (shape, axis): layout, then per op (reduce walk, element-wise walk).  The walks are chosen
# alike in every variant (csrc/plan.c); the rows layout has one walk per pass ("rows").
PATHS = [
    # channels-first, S = 784 >= 64: rows
    (((32, 64, 28, 28), 1), "rows", {"train": ("rows", "rows"), "backward": ("rows", "rows")}),
    # channels-last, Cp = 64: register strips, 64-element periods for normalize
    (((32, 28, 28, 64), -1), "columns",
     {"train": ("register", "period64"), "backward": ("register", "spans")}),
    # 2-D, Cp = 512: tiles of 256; x is cache-resident (8 MiB < 16 MiB), x and dy are not
    (((4096, 512), 1), "columns",
     {"train": ("register", "spans"), "backward": ("memory", "spans")}),
    # S = 9, Cp = 216
    (((2048, 24, 3, 3), 1), "columns",
     {"train": ("register", "spans"), "backward": ("register", "spans")}),
    # Cp = 43: one tile of 43 columns (5 vectors + 3 scalar columns)
    (((8192, 43), 1), "columns",
     {"train": ("register", "spans"), "backward": ("register", "spans")}),
    # Cp = 1, a single column (narrower than a vector: blocks); period 64
    (((200000, 1), 1), "columns",
     {"train": ("register", "period64"), "backward": ("blocks", "spans")}),
    # Cp = 16 (S = 16): one 16-column register strip
    (((512, 1, 4, 4), 1), "columns",
     {"train": ("register", "period64"), "backward": ("register", "spans")}),
    # larger than the streaming threshold, channels-last: not cache-resident, so the
    # backward sums walk row by row (one stream) instead of register strips down the rows
    # (the statistics too, on AVX-512 only: see OTHER_VARIANTS)
    (((64, 56, 56, 256), -1), "columns",
     {"train": ("memory", "spans"), "backward": ("memory", "spans")}),
    # S = 65 / 72: rows
    (((97, 33, 65), 1), "rows", {"train": ("rows", "rows")}),
    (((2, 3, 8, 9), 1), "rows", {"moments": ("rows", None)}),
    # S = 49, 256 rows: columns of the (256, 3136) matrix; the float32 normalisation walks
    # rows (Cp >= BN_EW_ROW_MIN_COLS_F32, every variant), float64's column tiles, and
    # with more than 256 rows its periods
    (((256, 64, 7, 7), 1), "columns", {"infer": (None, "rows*")}),
    (((257, 64, 7, 7), 1), "columns", {"infer": (None, "rows*")}),
    # few rows (S >= 2 N): rows, although S < 64 -- batch-1 (1, 512, 7, 7), (16, 64, 7, 7)
    (((1, 512, 7, 7), 1), "rows", {"train": ("rows", "rows"), "backward": ("rows", "rows")}),
    (((16, 64, 7, 7), 1), "rows", {"moments": ("rows", None)}),
    (((25, 64, 7, 7), 1), "columns", {"moments": ("register", None)}),
    # one element per channel (N = S = 1): the inference's direct walk, every variant;
    # the training forward has no such walk (one value per channel is rejected), and two
    # elements per channel take the other walks again
    (((1, 2048), 1), "columns", {"infer": (None, "direct"), "backward": ("register", "spans")}),
    (((1, 1, 1, 40000), -1), "columns", {"infer": (None, "direct")}),
    (((2, 2048), 1), "columns", {"infer": (None, "tiles")}),
    (((1, 1024, 2), 1), "rows", {"infer": (None, "rows")}),
    # S = 49, Cp = 25,088: a period's expanded parameters (600 KB normalize, 1.2 MB dx)
    # reach BN_EW_ROW_MIN_PARAM_BYTES, so the element-wise passes walk (n, c) rows (the
    # float32 normalisation in every variant, Cp >= 1024)
    (((32, 512, 7, 7), 1), "columns",
     {"train": ("register", "rows*"), "infer": (None, "rows*"),
      "backward": ("register", "rows")}),
    # S = 25, Cp = 6400: below 512 KiB of parameters (normalize 150 KB, dx 300 KB), so dx
    # walks its periods; the float32 normalisation rows (Cp >= 1024)
    (((32, 256, 5, 5), 1), "columns",
     {"infer": (None, "rows*"), "backward": ("register", "spans")}),
    # S = 12, Cp = 768 < 1024: the float32 normalisation keeps its periods
    (((256, 64, 3, 4), 1), "columns", {"infer": (None, "spans")}),
    # S = 4 < 8 rows are narrower than a vector: no rows walk; Cp = 32768 >= 2048:
    # normalize walks column tiles down all rows, dx its periods
    (((64, 8192, 2, 2), 1), "columns", {"infer": (None, "tiles")}),
    (((32, 8192), 1), "columns",
     {"train": ("register", "tiles"), "infer": (None, "tiles"),
      "backward": ("register", "spans")}),
    (((20, 2047), 1), "columns", {"train": ("register", "spans")}),
    (((3, 8, 6), 1), "rows", {"infer": (None, "rows")}),
]


@pytest.mark.parametrize("case,layout,table", PATHS,
                         ids=[f"{'x'.join(map(str, c[0][0]))}-ax{c[0][1]}" for c in PATHS])
def test_each_shape_takes_its_path(case, layout, table):
    shape, axis = case
    for isa in ("avx512", "avx2", "baseline"):
        for op, (red, ew) in table.items():
            red = OTHER_VARIANTS.get((case, op, isa), red)
            # "rows*": the float32 normalisation's rows walk, in every variant
            ew_isa = "rows" if ew == "rows*" else \
                "spans" if isa == "baseline" and ew in ("rows", "tiles") and \
                layout == "columns" else ew   # rows and tiles walks: AVX2 and AVX-512 only
            got = _walks(shape, op, axis, isa)
            assert got == (layout, red, ew_isa), f"{shape} axis={axis} {op} on {isa}: {got}"
            if ew == "rows*":   # float64 data keeps the rule of the periods' parameters
                f64 = _plan(shape, op, axis, isa, dtype=np.float64)["elementwise"]["walk"]
                assert f64 != "rows" or (isa != "baseline" and shape == (32, 512, 7, 7)), \
                    (shape, op, isa, f64)


# Where the variants differ: wide statistics from DRAM take the memory walk on AVX-512
# only, and the columns layout's rows and tiles element-wise walks are AVX2 and AVX-512
# only (the baseline keeps its periods) (csrc/plan.c).
OTHER_VARIANTS = {
    (((64, 56, 56, 256), -1), "train", "avx2"): "register",
    (((64, 56, 56, 256), -1), "train", "baseline"): "register",
}


def test_plan_fields_and_thresholds():
    # threads: one below BN_PAR_MIN (32768) elements
    assert _plan((4, 8, 32, 32), "train", threads=1)["threads"] == 1
    assert _plan((4, 8, 32, 32), "train", threads=2)["threads"] == 2   # 32768 elements
    assert _plan((4, 8, 32, 31), "train", threads=2)["threads"] == 1
    # the rows/columns switch at S = 64, and at S = 2 N below that
    assert _plan((400, 8, 8, 8), "moments")["layout"] == "rows"
    assert _plan((400, 8, 9, 7), "moments")["layout"] == "columns"
    assert _plan((31, 8, 9, 7), "moments")["layout"] == "rows"
    assert _plan((32, 8, 9, 7), "moments")["layout"] == "columns"
    # streaming: working set >= the threshold T (16 MiB here) for the backward's dx,
    # an input >= T for the normalisation, in every variant (the baseline's SSE2 has
    # streaming stores too); rows of 16-byte multiples
    big = (64, 64, 32, 32)                                             # 16 MiB float32
    assert _plan(big, "infer", isa="avx2")["elementwise"]["stream"]
    for isa in ("baseline", "avx2", "avx512"):
        s = {(n, op): _plan((n, 64, 32, 32), op, isa=isa)["elementwise"]["stream"]
             for n in (21, 22, 63, 64) for op in ("infer", "train", "backward")}
        assert s[64, "infer"] and s[64, "train"]                 # 16 MiB
        assert not s[63, "infer"] and not s[63, "train"]         # 15.75 MiB
        assert s[22, "backward"] and not s[22, "infer"]          # 5.5 MiB: 16.5 MiB (dx)
        assert not s[21, "backward"]                             # 5.25 MiB: 15.75 MiB
    assert _plan(big, "infer", isa="baseline")["elementwise"]["stream"]
    assert not _plan((64, 64, 33, 33), "infer", isa="avx2")["elementwise"]["stream"]
    assert not _plan((4, 8, 32, 32), "infer", isa="avx2")["elementwise"]["stream"]
    p = _plan((4096, 512), "moments", isa="avx512")
    assert p["reduce"]["tile"] == 256 and p["reduce"]["tiles"] == 2
    assert p["reduce"]["rows_per_block"] == 128 and p["reduce"]["strip_columns"] == 64
    # Register strips: 16 columns for the baseline's statistics from the cache (SSE2 has 16
    # registers), 64 otherwise (plan.c); the bits do not depend on it (test_determinism)
    for op in ("moments", "train"):
        assert _plan((1568, 512), op, isa="baseline")["reduce"]["strip_columns"] == 16
        assert _plan((50176, 256), op, isa="baseline")["reduce"]["strip_columns"] == 64
        for isa in ("avx2", "avx512"):
            assert _plan((1568, 512), op, isa=isa)["reduce"]["strip_columns"] == 64
    assert _plan((1568, 512), "backward", isa="baseline")["reduce"]["strip_columns"] == 64
    # ... and only where the tile is wider than one 16-column strip (else the same walk)
    assert _plan((1568, 24), "train", isa="baseline")["reduce"]["strip_columns"] == 16
    assert _plan((1568, 23), "train", isa="baseline")["reduce"]["strip_columns"] == 64
    p = bnfast.explain(np.empty((80, 3, 5, 5)), op="infer", relu=True)
    assert p["dtype"] == "float64" and p["relu"] is True and p["forced"] == {}
    assert p["strategy"] == "columns:spans"
    assert "reduce" not in p and p["elementwise"]["pass"] == "normalize"
    assert p["elementwise"]["period"] == 75 and p["N"] == 80 and p["S"] == 25   # Cp >= 64
    # Cp = 27 < 64: the smallest multiple of Cp of at least 64 that is a multiple of 8
    assert _plan((80, 3, 3, 3), "infer")["elementwise"]["period"] == 216
    assert "elementwise" not in _plan((8, 3), "moments")
    assert _plan((8, 3), "backward")["reduce"]["pass"] == "backward_sums"


def test_plan_of_empty_shapes():
    # every op on zero channels, an empty batch or empty spatial axes (the kernels return
    # at once; the plan must still be made, without looping on a zero-width period)
    for shape in [(4, 0, 3), (0, 5, 3), (4, 5, 0), (0, 0), (4, 0), (3, 2, 0, 7)]:
        for op in ("moments", "train", "infer", "backward"):
            p = _plan(shape, op)
            assert p["threads"] == 1
            if "elementwise" in p:
                assert p["elementwise"]["items"] == 0


def test_explain_follows_the_memory_layout():
    # a channels-last array passed with axis=1 (a transposed view) is planned as the
    # kernels see it: (N*H*W, C, 1), as the call itself would run
    x = np.empty((8, 5, 5, 16), np.float32).transpose(0, 3, 1, 2)
    p = bnfast.explain(x, op="train", axis=1)
    assert (p["N"], p["C"], p["S"]) == (200, 16, 1) and p["layout"] == "columns"


def test_explain_errors():
    with pytest.raises(ValueError, match="op must be one of"):
        bnfast.explain(np.zeros((2, 3)), op="forward")
    with pytest.raises(ValueError, match="isa must be"):
        bnfast.explain(np.zeros((2, 3)), isa="sse9")
    with pytest.raises(TypeError, match="float32 or float64"):
        bnfast.explain(np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        bnfast.explain(np.zeros(3))
    with pytest.raises(TypeError, match="relu must be a bool"):
        bnfast.explain(np.zeros((2, 3)), relu="yes")


def test_force_switch(force):
    shape = (32, 28, 28, 64)
    force(statistics="memory", backward_sums="blocks", elementwise="spans")
    assert _walks(shape, "train", -1, "avx512") == ("columns", "memory", "spans")
    assert _walks(shape, "backward", -1, "avx512") == ("columns", "blocks", "spans")
    assert bnfast.explain(np.empty(shape), axis=-1)["forced"] == {
        "statistics": "memory", "backward_sums": "blocks", "elementwise": "spans"}
    force(statistics="register", elementwise="spans")
    assert _walks(shape, "train", -1, "baseline") == ("columns", "register", "spans")
    force(statistics="register", elementwise="period64")
    # period64 applies only to normalize with a period of 64
    assert _walks((100, 100), "train", 1, "baseline") == ("columns", "register", "spans")
    assert _walks(shape, "backward", -1, "baseline")[2] == "spans"
    force(elementwise="rows")
    assert _walks(shape, "backward", -1, "avx2") == ("columns", "register", "rows")
    p = _plan(shape, "infer", -1)["elementwise"]
    assert "period" not in p and p["rows_per_item"] == 16384
    force(elementwise="tiles")
    assert _walks(shape, "backward", -1, "avx2") == ("columns", "register", "tiles")
    p = _plan(shape, "infer", -1)["elementwise"]
    assert p["period"] == 64 and p["tiles_per_item"] == 1 and p["items"] == 1
    force(elementwise="direct")
    # only the inference of one element per channel (in double) has the direct walk
    assert _walks((1, 2048), "infer", 1) == ("columns", None, "direct")
    assert _walks(shape, "train", -1, "avx2") == ("columns", "register", "period64")
    assert _walks((2, 2048), "infer", 1, "avx2") == ("columns", None, "tiles")
    p = _plan((1, 2048), "infer")["elementwise"]
    assert "period" not in p and p["channels_per_item"] == 16384 and p["items"] == 1
    assert _plan((1, 1, 40000), "infer", -1)["elementwise"]["items"] == 3
    force(elementwise="spans")
    assert _walks((1, 2048), "infer", 1) == ("columns", None, "spans")
    force(elementwise="direct", arithmetic="float32")
    assert _walks((1, 2048), "infer", 1)[2] != "direct"
    force(layout="columns")
    assert _walks((8, 4, 16, 16), "train", 1)[0] == "columns"
    force(layout="rows")
    assert _walks((800, 4), "backward", 1) == ("rows", "rows", "rows")
    force()
    assert forced_strategy() == dict.fromkeys(
        ("layout", "statistics", "backward_sums", "elementwise", "arithmetic", "fusion"))
    force(arithmetic="float64")
    assert _plan(shape, "infer", -1)["elementwise"]["arithmetic"] == "float64"
    assert forced_strategy()["arithmetic"] == "float64"
    force()
    assert _plan(shape, "infer", -1)["elementwise"]["arithmetic"] == "float32"
    for bad in (dict(layout="diagonal"), dict(statistics="blocks"),
                dict(backward_sums="period64"), dict(elementwise="memory"),
                dict(statistics="direct"),
                dict(arithmetic="float16"), dict(fusion="rows")):
        with pytest.raises((ValueError, RuntimeError)):
            force(**bad)


def test_force_from_environment():
    code = ("import bnfast, numpy as np; from bnfast import _plan; "
            "print(sorted(_plan.forced_strategy().items(), key=str)); "
            "print(bnfast.explain(np.empty((64, 64), np.float32), op='backward')"
            "['reduce']['walk'])")
    env = package_env(
        BNFAST_FORCE_STRATEGY="layout=columns, backward_sums=blocks, arithmetic=float64")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, cwd=os.path.dirname(__file__))
    assert out.returncode == 0, out.stderr
    assert "('backward_sums', 'blocks')" in out.stdout and "('layout', 'columns')" in out.stdout
    assert "('arithmetic', 'float64')" in out.stdout
    assert out.stdout.strip().endswith("blocks")
    env = package_env(BNFAST_FORCE_STRATEGY="statistics=sideways")
    out = subprocess.run([sys.executable, "-c", "import bnfast"], env=env,
                         capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert out.returncode != 0 and "BNFAST_FORCE_STRATEGY" in out.stderr


# ---------------------------------------------------------------- forced strategies run

# Above BN_PAR_MIN (so 2 threads really split the work), with vector tails and scalar
# columns; each reaches the forced walks: Cp = 43, 64 (period 64), 100 (channels-last),
# 300 (two tiles, the second narrow), 1296 (rows data forced into columns), S = 130 rows,
# S = 49 columns (forced rows walk: rows that end in an overlapping vector), Cp = 2050
# (tiles walk: 8 tiles and one of 2 columns).
SHAPES = [((1024, 43), 1), ((1200, 64), 1), ((16, 12, 12, 100), -1), ((200, 300), 1),
          ((37, 16, 9, 9), 1), ((50, 7, 130), 1), ((48, 16, 7, 7), 1), ((20, 2050), 1)]

FORCINGS = [
    {},
    {"layout": "rows"},
    {"layout": "columns"},
    {"statistics": "register"},
    {"statistics": "memory"},
    {"backward_sums": "register"},
    {"backward_sums": "memory"},
    {"backward_sums": "blocks"},
    {"elementwise": "spans"},
    {"elementwise": "period64"},
    {"elementwise": "rows"},
    {"layout": "columns", "elementwise": "rows"},
    {"elementwise": "tiles"},
    {"layout": "columns", "elementwise": "tiles"},
    {"layout": "columns", "statistics": "register", "backward_sums": "register",
     "elementwise": "period64"},
    {"layout": "columns", "statistics": "memory", "backward_sums": "blocks"},
    {"fusion": "channels"},
    {"layout": "rows", "fusion": "channels"},
]


def _fid(f):
    return ",".join(f"{k}={v}" for k, v in f.items()) or "plan"


def _inputs(shape, axis, dtype):
    rng = rng_for("plan", shape, axis, np.dtype(dtype).name)
    x = make_x(rng, shape, dtype, axis=axis)
    C = shape[axis]
    w, b = make_params(rng, C)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy, w, b


def _run(x, dy, w, b, axis):
    out = {}
    out["mean"], out["var"] = bnfast.moments(x, axis=axis)
    for relu in (False, True):
        t = "relu" if relu else "plain"
        out[f"y-{t}"], out[f"m-{t}"], out[f"inv-{t}"] = bnfast.batch_norm_train(
            x, w, b, axis=axis, relu=relu)
        out[f"yi-{t}"] = bnfast.batch_norm_infer(x, out["mean"], out["var"], w, b, axis=axis,
                                                 relu=relu)
        for training in (True, False):
            k = f"{t}-{'train' if training else 'eval'}"
            out[f"dx-{k}"], out[f"dw-{k}"], out[f"db-{k}"] = bnfast.batch_norm_backward(
                dy, x, out["mean"], out[f"inv-{t}"], w, bias=b, relu=relu,
                training=training, axis=axis)
    return out


def _check_twin(r, x, dy, w, b, axis, dtype):
    rmean, rvar = ref.moments(x, axis=axis)
    xmax = np.abs(x.astype(np.float64)).max(axis=reduce_axes(x.ndim, axis))
    assert_close(r["mean"], rmean, dtype=np.float64, scale=xmax, what="mean")
    assert_close(r["var"], rvar, dtype=np.float64, scale=0.0, what="var")
    loose = 1e-5 if dtype == np.float32 else 1e-9
    for relu in (False, True):
        t = "relu" if relu else "plain"
        ry, _, rinv = ref.batch_norm_train(x, w, b, axis=axis, relu=relu)
        assert_close(r[f"y-{t}"], ry, what=f"train y {t}")
        assert_close(r[f"inv-{t}"], rinv, dtype=np.float64, scale=0.0, what="invstd")
        ryi = ref.batch_norm_infer(x, r["mean"], r["var"], w, b, axis=axis, relu=relu)
        assert_close(r[f"yi-{t}"], ryi, what=f"infer y {t}")
        for training in (True, False):
            k = f"{t}-{'train' if training else 'eval'}"
            rdx, rdw, rdb = ref.batch_norm_backward(dy, x, r["mean"], r[f"inv-{t}"], w,
                                                    bias=b, relu=relu, training=training,
                                                    axis=axis)
            gscale = np.abs(dy.astype(np.float64)).max() * np.abs(w).max() * rinv.max()
            assert_close(r[f"dx-{k}"], rdx, scale=gscale, rtol=loose, what=f"dx {k}")
            n = x.size // x.shape[axis]
            assert_close(r[f"db-{k}"], rdb, scale=np.abs(dy).max() * n, rtol=loose,
                         what=f"dbias {k}")
            assert_close(r[f"dw-{k}"], rdw, scale=np.abs(dy).max() * n * 4, rtol=loose,
                         what=f"dweight {k}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", SHAPES,
                         ids=[f"{'x'.join(map(str, s))}-ax{a}" for s, a in SHAPES])
@pytest.mark.parametrize("forcing", FORCINGS, ids=_fid)
def test_forced_strategy(forcing, shape, axis, dtype, force):
    x, dy, w, b = _inputs(shape, axis, dtype)
    # the plan's own choice with the same layout: a forced walk must give its bits
    force(**({"layout": forcing["layout"]} if "layout" in forcing else {}))
    with bnfast.use_isa(ISAS[0]), bnfast.num_threads(1):
        unforced = _run(x, dy, w, b, axis)
    force(**forcing)
    first = None
    for isa in ISAS:
        with bnfast.use_isa(isa):
            for key, value in forcing.items():   # the forcing is in effect where it applies
                plan = bnfast.explain(x, op="train", axis=axis)
                if key == "layout":
                    assert plan["layout"] == value
                elif key == "statistics" and plan["layout"] == "columns":
                    assert plan["reduce"]["walk"] == value
                elif key == "fusion":
                    assert plan["fusion"] == (value if plan["layout"] == "rows" else "none")
            for t in (1, 2):
                with bnfast.num_threads(t):
                    r = _run(x, dy, w, b, axis)
                if first is None:
                    first = r
                    _check_twin(r, x, dy, w, b, axis, dtype)
                for k in r:
                    assert_same_bits(r[k], first[k], f"{_fid(forcing)} {isa} t{t}: {k}")
    for k in first:
        assert_same_bits(first[k], unforced[k], f"{_fid(forcing)} vs the plan's walk: {k}")


@pytest.mark.parametrize("isa", ISAS)
def test_rows_walk_in_place(isa, force):
    # the rows walk's overlapping last vector is computed before the row's other vectors
    # are stored, so writing over the input (out=x) gives the same bits
    rng = rng_for("plan-inplace", isa)
    x = rng.standard_normal((32, 512, 7, 7)).astype(np.float32)
    x[3, 5, 6, 6] = np.nan
    C = x.shape[1]
    w, b = make_params(rng, C)
    mean, var = rng.standard_normal(C), rng.random(C) + 0.5
    with bnfast.use_isa(isa):
        for relu in (False, True):
            force(elementwise="rows")
            assert _walks(x.shape, "infer") == ("columns", None, "rows")
            want = bnfast.batch_norm_infer(x, mean, var, w, b, relu=relu)
            y = x.copy()
            bnfast.batch_norm_infer(y, mean, var, w, b, relu=relu, out=y)
            assert_same_bits(y, want, f"in place relu={relu}")
            force(elementwise="spans")
            assert_same_bits(bnfast.batch_norm_infer(x, mean, var, w, b, relu=relu), want,
                             f"spans relu={relu}")
            force()


# ---------------------------------------------------------------- the fused training forward

def test_fusion_rule():
    # the rows layout's training forward and backward beyond the streaming threshold (16 MiB
    # here), with rows of at least 32 KiB, at most 4 MiB of a channel's input (x; dy and x)
    # per thread, and a row group (N * S / 65536 of them, up to 16) per thread
    def fusion(shape, op="train", dtype=np.float32, threads=2, isa=None):
        return _plan(shape, op, dtype=dtype, threads=threads, isa=isa)["fusion"]
    for isa in ("avx512", "avx2", "baseline"):
        for op in ("train", "backward"):
            assert fusion((32, 64, 96, 96), op, isa=isa) == "channels"   # 36 KiB rows
    assert fusion((128, 64, 112, 112)) == "channels"               # 3.1 MiB a thread
    assert fusion((128, 64, 112, 112), "backward") == "none"       # 6.1 MiB a thread
    assert fusion((32, 32, 256, 256)) == "channels"                # 4 MiB a thread
    assert fusion((33, 32, 256, 256)) == "none"                    # 4.1 MiB a thread
    assert fusion((16, 32, 256, 256), "backward") == "channels"    # 4 MiB a thread
    assert fusion((32, 32, 256, 256), threads=1) == "none"         # 8 MiB for one thread
    assert fusion((128, 64, 56, 56)) == "none"                     # 12 KiB rows
    assert fusion((128, 64, 56, 56), "backward") == "none"
    assert fusion((2, 64, 128, 128)) == "none"                     # 8 MiB: cache-resident
    assert fusion((8, 64, 128, 128), "backward") == "channels"     # two row groups
    assert fusion((4, 64, 128, 128), "backward") == "none"         # one row group
    assert fusion((1, 256, 128, 128)) == "none"                    # one row group
    assert fusion((1, 256, 128, 128), threads=1) == "channels"
    assert fusion((16, 64, 96, 96), dtype=np.float64) == "channels"   # 72 KiB rows
    assert fusion((128, 64, 96, 96), dtype=np.float64) == "none"     # 4.5 MiB a thread
    assert "fusion" not in _plan((32, 64, 96, 96), "infer")
    assert "fusion" not in _plan((32, 64, 96, 96), "moments")
    p = _plan((32, 64, 96, 96), "train", isa="avx2")
    assert p["strategy"] == "rows:fused" and p["elementwise"]["stream"]
    assert _plan((32, 64, 96, 96), "train", isa="baseline")["elementwise"]["stream"]


def _fused_cases(finite=False):
    """float32 and float64 batches for the fused paths: segments of BN_SEG (2048) and a
    partial one, several row groups, rows shorter than a segment or than a vector, a
    constant channel, data far from zero, values whose squares overflow float32, and
    (unless finite) a NaN and an inf."""
    rng = rng_for("fused", finite)
    cases = []
    for shape in [(40, 6, 4100), (3, 8, 300), (2, 5, 2049), (33, 4, 2048), (2, 9, 7)]:
        for dtype in (np.float32, np.float64):
            x = rng.standard_normal(shape)
            x[:, 1] += 1e6                               # far from zero
            x[:, 2] = 3.25                               # constant
            if not finite:
                x[0, 3, 5], x[-1, 3, -1] = np.nan, np.inf    # NaN and inf
            if shape[1] > 4:
                x[:, 4] *= 1e30 if dtype == np.float32 else 1e300   # huge
            cases.append(x.astype(dtype))
    return cases


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_fused_training_forward_gives_the_two_pass_bits(relu, force):
    # forced on, in every variant, on 1-3 threads, out of place and in place: the bits of
    # the two passes (forced off), outputs, mean, invstd and the running statistics alike
    for x in _fused_cases():
        C = x.shape[1]
        w, b = make_params(rng_for("fused-p", x.shape, x.dtype.name), C)
        w, b = w.astype(x.dtype), b.astype(x.dtype)

        def run(isa, threads, in_place):
            rm, rv = np.zeros(C, x.dtype), np.ones(C, x.dtype)
            xx = x.copy()
            with bnfast.use_isa(isa), bnfast.num_threads(threads), np.errstate(all="ignore"):
                r = bnfast.batch_norm_train(xx, w, b, relu=relu, running_mean=rm,
                                            running_var=rv, out=xx if in_place else None)
            return r + (rm, rv)

        force(fusion="none")
        assert _plan(x.shape, "train", dtype=x.dtype)["fusion"] == "none"
        want = run(ISAS[0], 1, False)
        force(fusion="channels")
        assert _plan(x.shape, "train", dtype=x.dtype)["fusion"] == "channels"
        for isa in ISAS:
            for threads in (1, 2, 3):
                for in_place in (False, True):
                    got = run(isa, threads, in_place)
                    for name, g, e in zip(("y", "mean", "invstd", "running_mean",
                                           "running_var"), got, want):
                        assert_same_bits(g, e, f"{x.shape} {x.dtype} {isa} t{threads} "
                                               f"in_place={in_place}: {name}")


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_fused_backward_gives_the_two_pass_bits(relu, force):
    # forced on, in every variant, on 1-3 threads, training and eval mode: the bits of the
    # two passes (forced off) for dx, dweight and dbias; dx written over dy or x declines
    # (the two passes run); a degenerate channel (here a NaN in dy) makes the fast path
    # give the call to the general path, which must still find dy and x intact
    for x in _fused_cases(finite=True):
        C = x.shape[1]
        rng = rng_for("fused-bwd", x.shape, x.dtype.name)
        w, b = make_params(rng, C)
        w, b = w.astype(x.dtype), b.astype(x.dtype)
        dy = rng.standard_normal(x.shape).astype(x.dtype)
        _, mean, invstd = bnfast.batch_norm_train(x, w, b)
        assert np.isfinite(mean).all() and np.isfinite(invstd).all()
        for bad_dy in (False, True):
            d = dy.copy()
            if bad_dy:
                d[0, 0, 0] = np.nan

            def run(isa, threads, training, out):
                dd, xx = d.copy(), x.copy()
                dest = {"new": None, "dy": dd, "x": xx}[out]
                with bnfast.use_isa(isa), bnfast.num_threads(threads), \
                        np.errstate(all="ignore"):
                    return bnfast.batch_norm_backward(dd, xx, mean, invstd, w, bias=b,
                                                      relu=relu, training=training, out=dest)

            for training in (True, False):
                force(fusion="none")
                assert _plan(x.shape, "backward", dtype=x.dtype)["fusion"] == "none"
                want = run(ISAS[0], 1, training, "new")
                force(fusion="channels")
                assert _plan(x.shape, "backward", dtype=x.dtype)["fusion"] == "channels"
                for isa in ISAS:
                    for threads in (1, 2, 3):
                        for out in ("new", "dy", "x"):
                            got = run(isa, threads, training, out)
                            for name, g, e in zip(("dx", "dweight", "dbias"), got, want):
                                assert_same_bits(g, e, f"{x.shape} {x.dtype} {isa} t{threads} "
                                                       f"training={training} out={out} "
                                                       f"nan_dy={bad_dy}: {name}")
