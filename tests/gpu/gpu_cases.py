"""Cases shared by the GPU tests: every documented error, as a NumPy call whose message
the same call on GPU arrays must repeat."""
import numpy as np

import bnfast


def _message(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)
    return None


def _error_cases():
    x = np.ones((4, 3), np.float32)
    xc = np.arange(12.0, dtype=np.float32).reshape(4, 3)
    const = np.ones((4, 3))
    v3 = np.ones(3)
    B = bnfast
    return {
        "x int": (B.batch_norm_train, (np.ones((4, 3), np.int32),), {}),
        "x ndim 1": (B.batch_norm_train, (np.ones(3, np.float32),), {}),
        "axis float": (B.moments, (x,), {"axis": 1.0}),
        "axis out of range": (B.moments, (x,), {"axis": 2}),
        "empty moments": (B.moments, (np.ones((0, 3)),), {}),
        "eps negative": (B.batch_norm_train, (x,), {"eps": -1.0}),
        "eps nan": (B.batch_norm_train, (x,), {"eps": float("nan")}),
        "momentum 2": (B.batch_norm_train, (x,), {"momentum": 2.0}),
        "relu str": (B.batch_norm_train, (x,), {"relu": "yes"}),
        "weight shape": (B.batch_norm_train, (x, np.ones(4)), {}),
        "weight complex": (B.batch_norm_train, (x, np.ones(3, complex)), {}),
        "one running stat": (B.batch_norm_train, (x,), {"running_mean": np.zeros(3)}),
        "running int": (B.batch_norm_train, (x,), {"running_mean": np.zeros(3, int),
                                                    "running_var": np.ones(3, int)}),
        "running shape": (B.batch_norm_train, (x,), {"running_mean": np.zeros(4),
                                                      "running_var": np.ones(4)}),
        "running dtypes": (B.batch_norm_train, (x,), {"running_mean": np.zeros(3),
                                                       "running_var": np.ones(3, np.float32)}),
        "one value per channel": (B.batch_norm_train, (np.ones((1, 3), np.float32),), {}),
        "eps 0 constant": (B.batch_norm_train, (const,), {"eps": 0.0}),
        "out dtype": (B.batch_norm_train, (x,), {"out": np.empty((4, 3))}),
        "out shape": (B.batch_norm_train, (x,), {"out": np.empty((3, 4), np.float32)}),
        "var negative": (B.batch_norm_infer, (xc, v3, -v3), {}),
        "var zero eps 0": (B.batch_norm_infer, (xc, v3, 0 * v3), {"eps": 0.0}),
        "mean missing": (B.batch_norm_infer, (xc, None, v3), {}),
        "relu without bias": (B.batch_norm_backward, (xc, xc, v3, v3), {"relu": True}),
        "dy shape": (B.batch_norm_backward, (np.ones((3, 3), np.float32), xc, v3, v3), {}),
        "dy dtype": (B.batch_norm_backward, (np.ones((4, 3)), xc, v3, v3), {}),
        "training str": (B.batch_norm_backward, (xc, xc, v3, v3), {"training": "no"}),
        "momentum None without count": (B.batch_norm, (x, np.zeros(3), np.ones(3)),
                                        {"training": True, "momentum": None}),
        "count below 1": (B.batch_norm, (x, np.zeros(3), np.ones(3)),
                          {"training": True, "momentum": None, "num_batches_tracked": 0}),
    }


ERRORS = _error_cases()
