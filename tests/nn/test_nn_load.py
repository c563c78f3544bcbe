"""nn.save / nn.load with files that do not fit the model: every problem is one documented
error, StateDictError (a ValueError), naming the file and the problem, found before more
is read than the model needs, and the model is left unchanged (issue 12, item 13)."""
import io
import os
import tracemalloc
import zipfile

import numpy as np
import pytest
from numpy.lib import format as npy

from bnfast import nn
from bnfast.nn import StateDictError

F32 = np.float32


def make(seed=0):
    return nn.Sequential(nn.Linear(3, 2, rng=seed), nn.BatchNorm1d(2), nn.ReLU(),
                         nn.Linear(2, 4, rng=seed + 1))


def snapshot(m):
    return {k: v.copy() for k, v in m.state_dict().items()}


def unchanged(m, before):
    after = m.state_dict()
    return list(after) == list(before) and all(
        after[k].tobytes() == before[k].tobytes() for k in before)


def npy_bytes(arr=None, *, header=None, payload=b""):
    """A .npy member: `arr` written by NumPy, or a hand-made `header` dict and payload."""
    buf = io.BytesIO()
    if arr is not None:
        npy.write_array(buf, np.asarray(arr), allow_pickle=False)
    else:
        npy.write_array_header_1_0(buf, header)
        buf.write(payload)
    return buf.getvalue()


def write_zip(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def good_members(m):
    return {k + ".npy": npy_bytes(v) for k, v in m.state_dict().items()}


def expect_error(model, path, *patterns):
    before = snapshot(model)
    with pytest.raises(StateDictError) as err:
        nn.load(model, path)
    msg = str(err.value)
    assert os.fspath(path) in msg, msg
    for p in patterns:
        assert p in msg, msg
    assert "allow_pickle" not in msg and "pickle=" not in msg, msg
    assert isinstance(err.value, ValueError)
    assert unchanged(model, before)
    return msg


# ---------------------------------------------------------------------------- names

def test_save_without_extension_then_load_same_name(tmp_path):
    src, dst = make(0), make(5)
    nn.save(src, tmp_path / "name")
    assert sorted(os.listdir(tmp_path)) == ["name.npz"]
    nn.load(dst, tmp_path / "name")                  # finds name.npz, as save wrote it
    assert unchanged(dst, src.state_dict())
    dst2 = make(6).load(str(tmp_path / "name"))      # method form, str path
    assert unchanged(dst2, src.state_dict())
    with pytest.raises(FileNotFoundError, match="other.npz"):
        nn.load(dst, tmp_path / "other")
    with pytest.raises(TypeError, match="path"):
        nn.load(dst, 3.5)


# ---------------------------------------------------------------------------- not an archive

def test_empty_file(tmp_path):
    (tmp_path / "e.npz").write_bytes(b"")
    expect_error(make(), tmp_path / "e.npz", "empty file")


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_never_suggest_pickle(tmp_path, seed):
    p = tmp_path / "r.npz"
    p.write_bytes(np.random.default_rng(seed).bytes(2000))
    expect_error(make(), p, "not a readable .npz archive")


def test_npy_file(tmp_path):
    p = tmp_path / "w.npy"
    np.save(p, np.zeros((2, 3), F32))
    expect_error(make(), p, "single-array .npy file")


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.9, 0.999])
def test_truncated_archive(tmp_path, frac):
    src = make()
    nn.save(src, tmp_path / "m.npz")
    raw = (tmp_path / "m.npz").read_bytes()
    p = tmp_path / "t.npz"
    p.write_bytes(raw[:int(len(raw) * frac)])
    expect_error(make(7), p)


def test_corrupted_data_byte(tmp_path):
    src = make()
    nn.save(src, tmp_path / "m.npz")
    raw = bytearray((tmp_path / "m.npz").read_bytes())
    with zipfile.ZipFile(tmp_path / "m.npz") as zf:
        info = zf.getinfo("3.weight.npy")
    # the member's data start after its local header (30 bytes + name + extra)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.file_size - 1] ^= 0xFF           # last byte of its float data
    p = tmp_path / "c.npz"
    p.write_bytes(bytes(raw))
    expect_error(make(7), p, "'3.weight'", "corrupt")


# ---------------------------------------------------------------------------- contents

def test_keys_checked_before_any_data(tmp_path):
    m = make()
    members = good_members(m)
    del members["0.bias.npy"]
    members["extra.npy"] = npy_bytes(np.zeros(1))
    msg = expect_error(m, write_zip(tmp_path / "k.npz", members),
                       "missing keys ['0.bias']", "unexpected keys ['extra']")
    assert "Sequential" in msg
    # strict=False: the keys both have are loaded, the rest ignored
    m2 = make(9)
    nn.load(m2, tmp_path / "k.npz", strict=False)
    assert np.array_equal(m2[0].weight.data, m[0].weight.data)


def test_shape_and_dtype_checked_from_the_header(tmp_path):
    m = make()
    members = good_members(m)
    members["3.weight.npy"] = npy_bytes(np.zeros((2, 4), F32))
    expect_error(m, write_zip(tmp_path / "s.npz", members), "'3.weight'",
                 "shape (2, 4) does not match the model's (4, 2)")
    members = good_members(m)
    members["1.num_batches_tracked.npy"] = npy_bytes(np.array(1.5))
    expect_error(m, write_zip(tmp_path / "d.npz", members), "'1.num_batches_tracked'",
                 "cannot be cast")


def test_object_dtype_refused_without_mentioning_pickle(tmp_path):
    m = make()
    members = good_members(m)
    members["0.bias.npy"] = npy_bytes(header={"descr": "|O", "fortran_order": False,
                                              "shape": (2,)}, payload=b"\x80" * 16)
    expect_error(m, write_zip(tmp_path / "o.npz", members), "'0.bias'", "object")


def test_huge_declared_shape_is_not_allocated(tmp_path):
    m = make()
    members = good_members(m)
    members["0.bias.npy"] = npy_bytes(header={"descr": "<f4", "fortran_order": False,
                                              "shape": (10**11,)}, payload=b"\0" * 8)
    tracemalloc.start()
    try:
        expect_error(m, write_zip(tmp_path / "h.npz", members), "'0.bias'",
                     "shape (100000000000,) does not match")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def _bomb_zip(path, name, header, n_zeros, others=None):
    """A deflated member: a .npy `header` followed by `n_zeros` zero bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for k, v in (others or {}).items():
            zf.writestr(k, v)
        with zf.open(name, "w", force_zip64=True) as f:
            f.write(npy_bytes(header=header))
            block = bytes(1 << 22)
            for _ in range(n_zeros >> 22):
                f.write(block)
    return path


@pytest.mark.parametrize("where", ["expected key", "unexpected key"])
def test_small_file_inflating_to_hundreds_of_mb_is_not_read(tmp_path, where):
    m = make()
    header = {"descr": "<f4", "fortran_order": False, "shape": (2,)}
    members = good_members(m)
    if where == "expected key":
        del members["0.bias.npy"]
        name, patterns = "0.bias.npy", ("'0.bias'", "more data")
    else:
        name, patterns = "junk.npy", ("unexpected keys ['junk']",)
    p = _bomb_zip(tmp_path / "b.npz", name, header, 400 << 20, members)
    assert p.stat().st_size < 4 << 20                 # 400 MB inflated
    tracemalloc.start()
    try:
        expect_error(m, p, *patterns)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


def test_member_that_is_not_npy_and_truncated_member(tmp_path):
    m = make()
    members = good_members(m)
    members["README.txt"] = b"hello"
    expect_error(m, write_zip(tmp_path / "x.npz", members), "'README.txt'")
    members = good_members(m)
    members["0.weight.npy"] = members["0.weight.npy"][:-4]
    expect_error(m, write_zip(tmp_path / "y.npz", members), "'0.weight'", "truncated")
    members["0.weight.npy"] = b"\x93NUMPY garbage"
    expect_error(m, write_zip(tmp_path / "z.npz", members), "'0.weight'", "not a valid .npy")


def test_model_unchanged_when_a_late_member_is_bad(tmp_path):
    m, src = make(0), make(3)
    members = good_members(src)
    members["3.bias.npy"] = npy_bytes(np.zeros(5, F32))       # last key, wrong shape
    expect_error(m, write_zip(tmp_path / "late.npz", members), "'3.bias'")


def test_other_layouts_and_dtypes_load_exactly(tmp_path):
    """Fortran order, big-endian and float64 arrays (as other writers may produce) load
    with the model's dtype and the right values; compressed archives too."""
    src = make(0)
    sd = src.state_dict()
    members = good_members(src)
    members["0.weight.npy"] = npy_bytes(np.asfortranarray(sd["0.weight"]))
    members["3.weight.npy"] = npy_bytes(sd["3.weight"].astype(">f4"))
    members["1.running_var.npy"] = npy_bytes(sd["1.running_var"].astype(np.float64))
    p = write_zip(tmp_path / "f.npz", members, zipfile.ZIP_DEFLATED)
    dst = nn.load(make(4), p)
    assert unchanged(dst, sd)
    assert dst[0].weight.data.dtype == F32 and dst[0].weight.data.flags.c_contiguous


def test_damaged_files_fail_cleanly_or_load_exactly(tmp_path):
    """Random byte changes and truncations of a saved file: StateDictError with the model
    unchanged, or (a change in a field nothing depends on) the saved values exactly."""
    src = make(0)
    nn.save(src, tmp_path / "m.npz")
    raw = (tmp_path / "m.npz").read_bytes()
    saved, fresh = src.state_dict(), make(5).state_dict()
    rng = np.random.default_rng(0)
    p = tmp_path / "f.npz"
    for _ in range(400):
        b = bytearray(raw)
        for j in rng.integers(0, len(b), rng.integers(1, 6)):
            b[j] = rng.integers(256)
        if rng.random() < 0.3:
            b = b[:rng.integers(len(b))]
        p.write_bytes(bytes(b))
        m = make(5)
        try:
            nn.load(m, p)
        except StateDictError:
            assert unchanged(m, fresh)
        else:
            assert unchanged(m, saved)
