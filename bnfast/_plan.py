"""The kernels' plan as Python sees it (``bnfast.explain``), and the forced-strategy switch.

The plan itself is made in C (csrc/plan.c, ``bn_plan_make``); ``bnfast._core`` hands over its
fields, and this module names them.  Forcing a layout or walk (``force_strategy``, or
``BNFAST_FORCE_STRATEGY`` read at import) makes every later plan take it: tests use it to
run every strategy under every variant.
"""
import os

from . import _core

ISA_NAMES, OP_NAMES = _core.ISA_NAMES, _core.OP_NAMES
WALK_NAMES, LAYOUT_NAMES = _core.WALK_NAMES, _core.LAYOUT_NAMES
FORCE_KEYS = ("layout", "statistics", "backward_sums", "elementwise", "arithmetic", "fusion")
ARITH_NAMES = ("float64", "float32")   # BN_ARITH_F64, BN_ARITH_F32
# the two passes of the training forward and of the backward: one after the other
# ("none"), or channel by channel ("channels": bn_plan.fused, the rows layout beyond the
# streaming threshold)
FUSION_NAMES = ("none", "channels")
FORCE_ENV = "BNFAST_FORCE_STRATEGY"


def plan(op, N, C, S, itemsize, nthreads, isa=None, relu=False):
    """The kernels' plan for op ('moments', 'train', 'infer', 'backward') on (N, C, S)
    elements of itemsize bytes with variant isa (an index; None: the one in use), with or
    without the fused ReLU, a dict (see bnfast.explain).  Any variant can be planned, even
    one this CPU lacks."""
    if op not in OP_NAMES:
        raise ValueError(f"unknown op {op!r}")
    p = _core.plan_fields(OP_NAMES.index(op), N, C, S, itemsize,
                          _core.get_isa() if isa is None else isa, nthreads)
    rows = LAYOUT_NAMES[p["layout"]] == "rows"
    d = {"op": op, "variant": ISA_NAMES[p["isa"]], "N": p["N"], "C": p["C"], "S": p["S"],
         "itemsize": p["itemsize"], "threads": p["nthreads"],
         "layout": LAYOUT_NAMES[p["layout"]]}
    if op != "infer":
        walk = WALK_NAMES[p["reduce_walk"]]
        red = {"pass": "statistics" if op in ("moments", "train") else "backward_sums",
               "walk": "rows" if rows else walk}
        if rows:
            red.update(row_groups=p["row_groups"], rows_per_group=p["rows_per_group"],
                       channels_per_item=p["row_chunk"], items=p["row_items"])
        else:
            col = p["col"]
            red.update(tile=col["tile"], tiles=col["ntiles"], rows_per_block=col["rb"],
                       groups=col["ngroups"], blocks_per_group=col["bpg"],
                       items=p["col_items"], resident=bool(p["resident"]))
            if walk == "register":
                red["strip_columns"] = p["strip_cols"]
        d["reduce"] = red
    if op != "moments":
        ew_walk = WALK_NAMES[p["ew_walk"]]
        ew_rows = rows or ew_walk == "rows"         # the columns' rows walk too
        direct = not rows and ew_walk == "direct"   # one element per channel: no periods
        ew = {"pass": "normalize" if op in ("train", "infer") else "dx",
              "walk": "rows" if rows else ew_walk,
              ("rows_per_item" if ew_rows else "tiles_per_item" if ew_walk == "tiles"
               else "channels_per_item" if direct else "periods_per_item"):
                  p["ew_per_item"],
              "items": p["ew_items"], "stream": bool(p["stream"]),
              # float32 data's element-wise pass in float32 (the backward with the
              # ReLU stays in float64; docs/user_guide/semantics.md)
              "arithmetic": ("float32" if p["ew_f32_relu" if relu else "ew_f32"]
                             else "float64")}
        if not (ew_rows or direct):
            ew["period"] = p["period"]
        d["elementwise"] = ew
    if op in ("train", "backward"):
        d["fusion"] = FUSION_NAMES[p["fused"]]
    return d


def forced_strategy():
    """The forced layout and walks (see force_strategy) as a dict; None = not forced."""
    idx = _core.plan_forced() + (_core.plan_forced_arith(), _core.plan_forced_fused())
    names = {"layout": LAYOUT_NAMES, "arithmetic": ARITH_NAMES, "fusion": FUSION_NAMES}
    return {key: None if v < 0 else names.get(key, WALK_NAMES)[v]
            for key, v in zip(FORCE_KEYS, idx)}


def force_strategy(layout=None, statistics=None, backward_sums=None, elementwise=None,
                   arithmetic=None, fusion=None):
    """Tests: force the layout ('rows', 'columns') and the walks of the statistics
    ('register', 'memory'), the backward sums ('register', 'memory', 'blocks') and the
    element-wise passes ('rows', 'tiles', 'spans', 'period64', and 'direct' where the
    inference has one element per channel) for every later call, the
    element-wise arithmetic of float32 data ('float64', or 'float32' where the plan
    has it: the normalisation), and the fusion of the training forward's and the
    backward's two passes ('none', or 'channels' wherever the rows layout runs it); None
    keeps the plan's choice.  A walk or the fusion
    never changes the bits, the layout and the arithmetic do.  Returns the previous
    setting as a dict (pass it back as keywords)."""
    old = forced_strategy()
    if arithmetic is not None and arithmetic not in ARITH_NAMES:
        raise ValueError(f"force_strategy: unknown arithmetic {arithmetic!r} "
                         f"(one of {', '.join(ARITH_NAMES)})")
    if fusion is not None and fusion not in FUSION_NAMES:
        raise ValueError(f"force_strategy: unknown fusion {fusion!r} "
                         f"(one of {', '.join(FUSION_NAMES)})")
    asked = dict(zip(FORCE_KEYS[:4], (layout, statistics, backward_sums, elementwise)))
    idx = []
    for key, v in asked.items():
        names = LAYOUT_NAMES if key == "layout" else WALK_NAMES
        if v is not None and v not in names:
            what = "layout" if key == "layout" else f"{key} walk"
            raise ValueError(f"force_strategy: unknown {what} {v!r}")
        idx.append(-1 if v is None else names.index(v))
    try:
        _core.plan_force(*idx)
    except ValueError:
        given = ", ".join(f"{k}={v!r}" for k, v in asked.items() if v is not None)
        raise ValueError(f"force_strategy: {given}: a walk that this pass does not have "
                         "(statistics: register, memory; backward_sums: register, memory, "
                         "blocks; elementwise: rows, tiles, spans, period64, direct)") from None
    _core.plan_force_arith(-1 if arithmetic is None else ARITH_NAMES.index(arithmetic))
    _core.plan_force_fused(-1 if fusion is None else FUSION_NAMES.index(fusion))
    return old


def force_from_environment():
    """Apply BNFAST_FORCE_STRATEGY=layout=columns,statistics=register,...,arithmetic=float64,
    fusion=channels (tests, CI)."""
    raw = os.environ.get(FORCE_ENV, "").strip()
    if not raw:
        return
    kw = {}
    for item in raw.split(","):
        key, sep, val = item.strip().partition("=")
        if not sep or key.strip() not in FORCE_KEYS:
            raise RuntimeError(f"{FORCE_ENV}={raw!r}: expected comma-separated "
                               f"KEY=NAME with KEY one of {', '.join(FORCE_KEYS)}")
        kw[key.strip()] = val.strip()
    try:
        force_strategy(**kw)
    except ValueError as exc:
        raise RuntimeError(f"{FORCE_ENV}={raw!r}: {exc}") from None
