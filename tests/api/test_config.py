"""Configuration, kernel-variant selection, thread control and the docstring examples."""
import doctest
import importlib
import io
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import bnfast
from conftest import ISAS, assert_same_bits, package_env, rng_for


def _neutral_dir():
    # not the source tree, so that `import bnfast` finds the same package as this process
    return tempfile.gettempdir()


def _python(code, timeout=120, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=package_env(**env), timeout=timeout, cwd=_neutral_dir())


# ------------------------------------------------------------------ show_config / get_config

def test_show_config_contents():
    buf = io.StringIO()
    bnfast.show_config(file=buf)
    text = buf.getvalue()
    assert text.startswith(f"bnfast {bnfast.__version__}")
    assert f"{bnfast.get_isa()} (in use)" in text
    for name in ISAS:
        assert name in text
    for name in ISAS:
        if name != bnfast.get_isa():
            assert f"{name} (available)" in text
    assert "OpenMP" in text
    assert f"threads        : {bnfast.get_num_threads()}" in text
    assert "compiler" in text and bnfast.get_config()["compiler"] in text


def test_show_config_prints_to_stdout(capsys):
    bnfast.show_config()
    out = capsys.readouterr().out
    assert out.startswith(f"bnfast {bnfast.__version__}")
    assert "kernel variant" in out


def test_show_config_follows_use_isa_and_threads():
    with bnfast.use_isa("baseline"), bnfast.num_threads(3):
        buf = io.StringIO()
        bnfast.show_config(file=buf)
    text = buf.getvalue()
    assert "baseline (in use)" in text
    assert "threads        : 3" in text


def test_get_config_keys_and_values():
    cfg = bnfast.get_config()
    expected = {"version", "isa", "isa_selected_by", "isas_available", "isas_compiled", "openmp",
                "openmp_runtime", "num_threads", "compiler", "python", "numpy", "machine"}
    assert expected <= set(cfg)
    assert cfg["version"] == bnfast.__version__
    assert cfg["isa"] == bnfast.get_isa()
    assert cfg["isas_available"] == bnfast.available_isas()
    assert set(cfg["isas_available"]) <= set(cfg["isas_compiled"])
    assert cfg["num_threads"] == bnfast.get_num_threads()
    assert cfg["numpy"] == np.__version__
    assert cfg["python"] == sys.version.split()[0]
    assert isinstance(cfg["compiler"], str) and cfg["compiler"]


def test_available_isas():
    isas = bnfast.available_isas()
    assert isas[0] == "baseline"
    assert set(isas) <= {"baseline", "avx2", "avx512"}
    order = ["baseline", "avx2", "avx512"]
    assert isas == [n for n in order if n in isas]  # best last
    assert bnfast.get_isa() in isas


# ------------------------------------------------------------------ variant selection

@pytest.mark.parametrize("name", ISAS)
def test_use_isa_and_restore(name):
    before = bnfast.get_isa()
    with bnfast.use_isa(name):
        assert bnfast.get_isa() == name
        assert bnfast.get_config()["isa"] == name
    assert bnfast.get_isa() == before


def test_use_isa_restores_after_exception():
    before = bnfast.get_isa()
    with pytest.raises(KeyError):
        with bnfast.use_isa("baseline"):
            raise KeyError
    assert bnfast.get_isa() == before


def test_set_isa_auto_and_errors():
    bnfast.set_isa("baseline")
    assert bnfast.get_isa() == "baseline"
    bnfast.set_isa("auto")
    assert bnfast.get_isa() == ISAS[-1]
    bnfast.set_isa(" AVX2 " if "avx2" in ISAS else "baseline")
    with pytest.raises(ValueError, match=r"unknown instruction set 'sse9'"):
        bnfast.set_isa("sse9")
    with pytest.raises(TypeError, match=r"must be a string"):
        bnfast.set_isa(2)
    with pytest.raises(ValueError, match=r"unknown instruction set"):
        with bnfast.use_isa("neon"):
            pass  # pragma: no cover


def test_unsupported_isa_is_a_runtime_error():
    missing = [n for n in ("avx2", "avx512") if n not in ISAS]
    if not missing:
        pytest.skip("this CPU supports every variant")
    with pytest.raises(RuntimeError, match=rf"instruction set '{missing[0]}' was requested"):
        bnfast.set_isa(missing[0])


def test_env_forces_baseline():
    r = _python("import bnfast, numpy as np; print(bnfast.get_isa());"
                "print(bnfast.get_config()['isa_selected_by']);"
                "x = np.arange(12.0).reshape(4, 3); print(bnfast.moments(x)[0].tolist())",
                BNFAST_ISA="baseline")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "baseline"
    assert lines[1] == "BNFAST_ISA=baseline"
    assert lines[2] == "[4.5, 5.5, 6.5]"  # and it computes


@pytest.mark.parametrize("name", ISAS)
def test_env_forces_each_available_variant(name):
    r = _python("import bnfast; print(bnfast.get_isa())", BNFAST_ISA=name.upper())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == name


def test_env_auto_and_empty_mean_default():
    for val in ("auto", ""):
        r = _python("import bnfast; print(bnfast.get_isa())", BNFAST_ISA=val)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == ISAS[-1]


def test_env_unknown_variant_fails_clearly():
    r = _python("import bnfast", BNFAST_ISA="bogus512")
    assert r.returncode != 0
    assert "BNFAST_ISA=bogus512" in r.stderr
    assert "unknown instruction set 'bogus512'" in r.stderr
    assert "baseline" in r.stderr  # lists the valid names


def test_env_unsupported_variant_fails_clearly():
    missing = [n for n in ("avx2", "avx512") if n not in ISAS]
    if not missing:
        pytest.skip("this CPU supports every variant")
    r = _python("import bnfast", BNFAST_ISA=missing[0])
    assert r.returncode != 0
    assert f"BNFAST_ISA={missing[0]}" in r.stderr


def test_cli_config():
    """`python -m bnfast config` (the README's and CI's command) prints the configuration."""
    r = subprocess.run([sys.executable, "-m", "bnfast", "config"], capture_output=True,
                       text=True, env=package_env(), timeout=120, cwd=_neutral_dir())
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"bnfast {bnfast.__version__}")


# ------------------------------------------------------------------ threads

def test_set_and_get_num_threads():
    default = bnfast.get_num_threads()
    assert isinstance(default, int) and default >= 1
    bnfast.set_num_threads(3)
    assert bnfast.get_num_threads() == 3
    bnfast.set_num_threads(1)
    assert bnfast.get_num_threads() == 1
    bnfast.set_num_threads(None)
    assert bnfast.get_num_threads() == default
    bnfast.set_num_threads(np.int64(2))
    assert bnfast.get_num_threads() == 2 and type(bnfast.get_num_threads()) is int


def test_num_threads_context_manager_nests_and_restores():
    default = bnfast.get_num_threads()
    with bnfast.num_threads(2) as n:
        assert n == 2 and bnfast.get_num_threads() == 2
        with bnfast.num_threads(5):
            assert bnfast.get_num_threads() == 5
        assert bnfast.get_num_threads() == 2
    assert bnfast.get_num_threads() == default
    with pytest.raises(RuntimeError):
        with bnfast.num_threads(3):
            raise RuntimeError
    assert bnfast.get_num_threads() == default


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                     (True, TypeError), (False, TypeError), ("2", TypeError),
                                     (2.0, TypeError)])
def test_thread_count_validation(bad, exc):
    before = bnfast.get_num_threads()
    match = r">= 1" if exc is ValueError else r"positive integer"
    with pytest.raises(exc, match=match):
        bnfast.set_num_threads(bad)
    with pytest.raises(exc, match=match):
        with bnfast.num_threads(bad):
            pass  # pragma: no cover
    assert bnfast.get_num_threads() == before


def test_omp_num_threads_env():
    r = _python("import bnfast; print(bnfast.get_num_threads()); "
                "print(bnfast.get_config()['omp_num_threads_env'])", OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "1"]
    r = _python("import bnfast; print(bnfast.get_num_threads())", OMP_NUM_THREADS="3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("3" if bnfast.get_config()["openmp"] else "1")


def test_threadpoolctl_limits():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if bnfast.get_config()["openmp"] is None:
        pytest.skip("serial build (no OpenMP)")
    infos = threadpoolctl.threadpool_info()
    assert any(i.get("user_api") == "openmp" for i in infos), infos
    bnfast.set_num_threads(None)
    before = bnfast.get_num_threads()
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert bnfast.get_num_threads() == 1
        # an explicit bnfast setting still wins
        with bnfast.num_threads(2):
            assert bnfast.get_num_threads() == 2
        assert bnfast.get_num_threads() == 1
    assert bnfast.get_num_threads() == before


def test_threadpoolctl_sees_openmp_in_fresh_process():
    pytest.importorskip("threadpoolctl")
    if bnfast.get_config()["openmp"] is None:
        pytest.skip("serial build (no OpenMP)")
    r = _python("import bnfast, threadpoolctl;"
                "print(sorted({i['user_api'] for i in threadpoolctl.threadpool_info()}))")
    assert r.returncode == 0, r.stderr
    assert "openmp" in r.stdout


# ------------------------------------------------------------------ doctests

@pytest.mark.parametrize("module", ["bnfast", "bnfast._api", "bnfast._threads",
                                    "bnfast._config"])
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    before = (bnfast.get_isa(), bnfast.get_num_threads())
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False, report=True)
    assert result.attempted > 0, f"{module} has no examples"
    assert result.failed == 0, f"{result.failed} docstring example(s) in {module} failed"
    assert (bnfast.get_isa(), bnfast.get_num_threads()) == before


def _env_without_omp_wait():
    import os

    env = dict(os.environ)
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(k, None)
    return env


def _pkg_parent():
    import os

    return os.path.dirname(os.path.dirname(os.path.abspath(bnfast.__file__)))


def _run_without_omp_wait(code, tmp_path, **extra_env):
    """stdout of `python -c code` in a fresh process, without OMP_WAIT_POLICY and
    GOMP_SPINCOUNT unless given in `extra_env`, importing this bnfast."""
    import subprocess
    import sys

    env = _env_without_omp_wait()
    env["PYTHONPATH"] = _pkg_parent()
    env.update(extra_env)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, check=True).stdout


def test_short_openmp_spin_is_the_default_and_user_settings_win(tmp_path):
    code = ("import os, bnfast; print(os.environ.get('GOMP_SPINCOUNT'), "
            "bnfast.get_config()['omp_wait'])")
    out = _run_without_omp_wait(code, tmp_path)
    assert out.startswith("10000 GOMP_SPINCOUNT=10000 (bnfast's default)"), out
    out = _run_without_omp_wait(code, tmp_path, OMP_WAIT_POLICY="active")
    assert out.startswith("None OMP_WAIT_POLICY=active"), out


def test_openmp_spin_is_not_claimed_when_libgomp_was_loaded_first(tmp_path):
    # libgomp reads GOMP_SPINCOUNT when it loads: after another library loaded it (PyTorch
    # does), bnfast's value would not apply, and show_config must not say it does
    import ctypes.util

    lib = ctypes.util.find_library("gomp")
    if lib is None:
        pytest.skip("no libgomp on this system")
    code = (f"import ctypes, os; ctypes.CDLL({lib!r}); import bnfast; "
            "print(os.environ.get('GOMP_SPINCOUNT'), '|', bnfast.get_config()['omp_wait'])")
    out = _run_without_omp_wait(code, tmp_path)
    assert out.startswith("None | runtime default (libgomp was loaded before bnfast"), out


# ------------------------------------------------------------------ streaming stores

def _sysfs_llc():
    """cpu0's level-3 cache from Linux's sysfs, in bytes (None where absent)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            raw = f.read().strip()
    except OSError:
        return None
    scale = {"K": 1 << 10, "M": 1 << 20}.get(raw[-1:], 1)
    digits = raw.rstrip("KM")
    return int(digits) * scale if digits.isdigit() and int(digits) > 0 else None


def test_stream_threshold_default_is_the_last_level_cache():
    from bnfast import _config

    cfg = bnfast.get_config()
    llc = cfg["llc_bytes"]
    assert cfg["stream_min_bytes"] == _config.STREAM_MIN_BYTES_DEFAULT
    # the default: the last-level cache where it is known, else 16 MiB
    assert _config.STREAM_MIN_BYTES_DEFAULT == (llc if llc else 16 << 20)
    sysfs = _sysfs_llc()
    if sysfs is not None:                   # Linux: cpu0's L3 slice, as lscpu shows it
        assert llc == sysfs
    buf = io.StringIO()
    bnfast.show_config(file=buf)
    text = buf.getvalue()
    size = _config._fmt_bytes(cfg["stream_min_bytes"])
    assert (f"streaming      : backward passes moving >= {size}, normalisations of inputs "
            f">= that (default: ") in text
    if llc:
        assert f"the last-level cache, {size}; BNFAST_STREAM_MIN_BYTES unset" in text
    # the plan follows the threshold: a normalisation of an input smaller than the LLC does
    # not stream
    x = np.zeros((4, 32, 16, 32, 32), np.float32)      # 8 MiB: inference moves 16 MiB
    stream = bnfast.explain(x, op="infer", axis=1)["elementwise"]["stream"]
    assert stream == (bnfast.get_isa() != "baseline"
                      and (8 << 20) >= cfg["stream_min_bytes"])


def test_stream_threshold_env_override_and_config():
    r = _python("import bnfast; c = bnfast.get_config(); "
                "print(c['stream_min_bytes'], c['stream_min_source'])",
                BNFAST_STREAM_MIN_BYTES="4096")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "4096 BNFAST_STREAM_MIN_BYTES=4096"
    # the plan reads it: streaming (not on the baseline) and the reduction's residency
    code = ("import bnfast, numpy as np; x = np.zeros((4, 32, 16, 32, 32), np.float32); "
            "bnfast.set_isa('avx2' if 'avx2' in bnfast.available_isas() else 'baseline'); "
            "print(bnfast.get_isa(), bnfast.explain(x, op='infer', axis=1)['elementwise']"
            "['stream'], bnfast.explain(x, op='moments', axis=-1)['reduce']['resident'])")
    for env, stream, resident in (("4096", True, False), (str(1 << 40), False, True)):
        r = _python(code, BNFAST_STREAM_MIN_BYTES=env)
        assert r.returncode == 0, r.stderr
        isa, got_stream, got_resident = r.stdout.split()
        assert got_stream == str(stream and isa != "baseline")
        assert got_resident == str(resident)


@pytest.mark.parametrize("bad", ["-1", "1.5", "lots", "1_000", str(2 ** 64)])
def test_stream_threshold_env_errors_are_clear(bad):
    r = _python("import bnfast", BNFAST_STREAM_MIN_BYTES=bad)
    assert r.returncode != 0
    assert f"BNFAST_STREAM_MIN_BYTES={bad!r}" in r.stderr
    assert "non-negative whole number of bytes" in r.stderr


def _stream_case_results(x, dy, axis, out_offset):
    """Outputs written into `out` buffers that start `out_offset` elements into a larger
    array (so the stores meet every alignment), for training, inference and backward."""
    C = x.shape[axis]
    rng = rng_for("stream-params", x.shape, axis)
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)

    def out():
        base = np.empty(x.size + out_offset, x.dtype)
        return base[out_offset:].reshape(x.shape)

    res = []
    for relu in (False, True):
        y = out()
        _, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis, out=y, relu=relu)
        res += [y, mean, invstd]
        yi = out()
        bnfast.batch_norm_infer(x, mean, 1.0 / invstd ** 2, w, b, axis=axis, out=yi, relu=relu)
        res.append(yi)
        for training in (True, False):
            dx = out()
            res += list(bnfast.batch_norm_backward(dy, x, mean, invstd, w, bias=b, axis=axis,
                                                   relu=relu, training=training, out=dx))
    return res


@pytest.mark.parametrize("shape,axis", [((8, 5, 97), 1), ((6, 64, 70), 1), ((8, 5, 96), 1),
                                        ((6, 9, 100), 1), ((700, 64), 1), ((300, 43), 1),
                                        ((301, 3, 7), 1), ((9, 7, 7, 24), -1),
                                        # periods of 65, 147, 66 elements (not whole vectors)
                                        ((300, 65), 1), ((50, 3, 7, 7), 1), ((40, 66), 1),
                                        ((30, 5, 5, 65), -1), ((20, 300), 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streaming_stores_give_identical_bits(shape, axis, dtype, isa):
    """Non-temporal stores (threshold 0) and ordinary stores give the same bits, for outputs
    at every 16-byte alignment offset (streaming needs an aligned output and rows of whole
    16-byte pieces, and falls back otherwise), row and column strategies, vector tails,
    with and without ReLU."""
    from bnfast import _config

    rng = rng_for("stream", shape, axis, np.dtype(dtype).name)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    for off in range(16 // np.dtype(dtype).itemsize):
        with _config._stream_min_bytes(1 << 62):
            plain = _stream_case_results(x, dy, axis, off)
        with _config._stream_min_bytes(0):
            streamed = _stream_case_results(x, dy, axis, off)
        for i, (a, c) in enumerate(zip(plain, streamed)):
            assert_same_bits(a, c, f"{isa} offset {off} result {i}")


@pytest.mark.parametrize("dist", [0, 16, 32, 128, 256, 272, 4080])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streaming_output_near_its_input_gives_identical_bits(dist, dtype, isa):
    """An output 1-256 bytes after an input modulo 4 KiB is written with ordinary stores
    even above the streaming threshold (streaming stores there made the following loads
    wait: plan.c, bn_stream_alias); either way the bits are those of ordinary stores."""
    from bnfast import _config

    shape, C = (4, 8, 64), 8
    n = int(np.prod(shape))
    item = np.dtype(dtype).itemsize
    buf = np.empty(3 * n + 4096, dtype)
    start = (-buf.ctypes.data % 4096) // item          # x at a 4 KiB boundary
    x = buf[start:start + n].reshape(shape)
    o = start + n + (4096 - (n * item) % 4096) // item + dist // item   # out - x = dist mod 4 KiB
    rng = rng_for("stream-alias", dist, np.dtype(dtype).name)
    x[...] = rng.standard_normal(shape)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    mean, var = bnfast.moments(x, axis=1)
    res = {}
    for thr in (1 << 62, 0):
        with _config._stream_min_bytes(thr):
            y = buf[o:o + n].reshape(shape)
            assert (y.ctypes.data - x.ctypes.data) % 4096 == dist
            bnfast.batch_norm_infer(x, mean, var, w, b, axis=1, out=y)
            got = [y.copy()]
            _, m, invstd = bnfast.batch_norm_train(x, w, b, axis=1)
            bnfast.batch_norm_backward(dy, x, m, invstd, w, axis=1, out=y)
            got.append(y.copy())
            res[thr] = got
    for a, c in zip(res[1 << 62], res[0]):
        assert_same_bits(a, c, f"{isa} distance {dist}")
