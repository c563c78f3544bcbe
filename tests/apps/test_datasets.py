"""The MNIST loader: IDX parsing, digests, corrupt/truncated files, search order, download
(with a replaced opener or file:// mirrors: no network), and the real files when present."""
import gzip
import hashlib
import io
import os
import struct
import urllib.error
import zlib
from pathlib import Path

import numpy as np
import pytest

from bnfast import datasets
from bnfast.datasets import DatasetError, MNIST_FILES, load_mnist, parse_idx, read_idx


def idx_bytes(arr):
    """The IDX encoding of a uint8 array."""
    arr = np.asarray(arr, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def tiny_mnist(n_train=12, n_test=5, seed=0):
    """Small arrays with MNIST's roles and shapes."""
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_tiny(folder, arrays, gz=True):
    """Write the four files; return {base name: sha256 of the uncompressed bytes}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for role, base in MNIST_FILES.items():
        raw = idx_bytes(arrays[role])
        sums[base] = hashlib.sha256(raw).hexdigest()
        if gz:
            (folder / (base + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / base).write_bytes(raw)
    return sums


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No environment variables, no checkout data, a private cache folder."""
    monkeypatch.delenv("BNFAST_DATA_DIR", raising=False)
    monkeypatch.setenv("BNFAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "_checkout_dirs", lambda: [])
    return tmp_path


# ------------------------------------------------------------------ IDX

def test_parse_idx_roundtrip():
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(idx_bytes(a)), a)
    labels = np.array([7, 1, 4], dtype=np.uint8)
    np.testing.assert_array_equal(parse_idx(idx_bytes(labels)), labels)


def test_parse_idx_big_endian_int32():
    vals = np.array([1, -2, 300000], dtype=">i4")
    raw = struct.pack(">HBB", 0, 0x0C, 1) + struct.pack(">I", 3) + vals.tobytes()
    out = parse_idx(raw)
    assert out.dtype == np.dtype("int32") and out.dtype.isnative
    assert out.tolist() == [1, -2, 300000]


@pytest.mark.parametrize("keep", [0, 3, 6, -5], ids=["empty", "magic", "dims", "payload"])
def test_parse_idx_truncated(keep):
    raw = idx_bytes(np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(DatasetError, match="truncated"):
        parse_idx(raw[:keep])


def test_parse_idx_trailing_and_bad_magic():
    raw = idx_bytes(np.zeros((3,), dtype=np.uint8))
    with pytest.raises(DatasetError, match="trailing"):
        parse_idx(raw + b"\0")
    with pytest.raises(DatasetError, match="not an IDX"):
        parse_idx(b"\x12\x34" + raw[2:])


# ------------------------------------------------------------------ loading tiny files

@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_load_tiny(tmp_path, gz):
    arrays = tiny_mnist()
    sums = write_tiny(tmp_path, arrays, gz=gz)
    m = load_mnist(tmp_path, checksums=sums, download=False)
    for role in MNIST_FILES:
        np.testing.assert_array_equal(getattr(m, role), arrays[role])
        assert getattr(m, role).dtype == np.uint8
    assert m.source == str(tmp_path)


def test_official_digests_reject_other_files(tmp_path):
    write_tiny(tmp_path, tiny_mnist())
    with pytest.raises(DatasetError, match="SHA-256"):
        load_mnist(tmp_path, download=False)


def test_corrupt_byte_rejected(tmp_path):
    arrays = tiny_mnist()
    sums = write_tiny(tmp_path, arrays, gz=False)
    p = tmp_path / MNIST_FILES["train_images"]
    raw = bytearray(p.read_bytes())
    raw[100] ^= 0xFF                             # same size, one byte changed
    p.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=r"SHA-256.*train-images|train-images.*SHA-256"):
        load_mnist(tmp_path, checksums=sums, download=False)


def test_truncated_gzip_rejected(tmp_path):
    sums = write_tiny(tmp_path, tiny_mnist())
    p = tmp_path / (MNIST_FILES["test_images"] + ".gz")
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(DatasetError, match="t10k-images.*(truncated|corrupt)"):
        load_mnist(tmp_path, checksums=sums, download=False)


def test_truncated_raw_rejected_even_without_digest(tmp_path):
    write_tiny(tmp_path, tiny_mnist(), gz=False)
    p = tmp_path / MNIST_FILES["train_labels"]
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(DatasetError, match="truncated"):
        load_mnist(tmp_path, checksums={}, download=False)


def test_mismatched_counts_rejected(tmp_path):
    arrays = tiny_mnist()
    arrays["test_labels"] = arrays["test_labels"][:-1]
    sums = write_tiny(tmp_path, arrays)
    with pytest.raises(DatasetError, match="do not match"):
        load_mnist(tmp_path, checksums=sums, download=False)


def test_missing_file_without_download(tmp_path):
    sums = write_tiny(tmp_path, tiny_mnist())
    (tmp_path / (MNIST_FILES["train_labels"] + ".gz")).unlink()
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.*not found"):
        load_mnist(tmp_path, checksums=sums, download=False)


def test_read_idx_digest(tmp_path):
    raw = idx_bytes(np.arange(5, dtype=np.uint8))
    (tmp_path / "x.gz").write_bytes(gzip.compress(raw))
    assert read_idx(tmp_path / "x.gz", hashlib.sha256(raw).hexdigest()).tolist() == [0, 1, 2,
                                                                                        3, 4]
    with pytest.raises(DatasetError, match="SHA-256"):
        read_idx(tmp_path / "x.gz", "0" * 64)


# ------------------------------------------------------------------ search order

def test_env_var_and_subfolder(isolated, monkeypatch):
    arrays = tiny_mnist(seed=3)
    sums = write_tiny(isolated / "data" / "mnist", arrays)
    monkeypatch.setenv("BNFAST_DATA_DIR", str(isolated / "data"))
    m = load_mnist(checksums=sums, download=False)
    np.testing.assert_array_equal(m.test_labels, arrays["test_labels"])
    assert Path(m.source) == isolated / "data" / "mnist"


def test_checkout_folder_is_used_and_never_written(isolated, monkeypatch):
    shared = isolated / "shared"
    arrays = tiny_mnist(seed=4)
    sums = write_tiny(shared, arrays)
    monkeypatch.setattr(datasets, "_checkout_dirs", lambda: [shared])
    assert load_mnist(checksums=sums).source == str(shared)
    (shared / (MNIST_FILES["test_labels"] + ".gz")).unlink()
    # incomplete: falls through to the cache, where nothing can be downloaded
    monkeypatch.setattr(datasets, "_urlopen", _fail_opener)
    with pytest.raises(DatasetError, match="could not download"):
        load_mnist(checksums=sums, mirrors=["https://mirror.invalid/"])
    assert not (shared / (MNIST_FILES["test_labels"] + ".gz")).exists()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BNFAST_CACHE_DIR", str(tmp_path / "c"))
    assert datasets.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BNFAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert datasets.default_cache_dir() == tmp_path / "x" / "bnfast"


# ------------------------------------------------------------------ download (no network)

class _Resp(io.BytesIO):
    pass


def _fail_opener(url, timeout):
    raise urllib.error.URLError("no network in tests")


def _serving(files):
    """An opener serving {url: bytes}; other URLs fail like an unreachable host."""
    seen = []

    def opener(url, timeout):
        seen.append(url)
        if url not in files:
            raise urllib.error.URLError(f"unreachable: {url}")
        return _Resp(files[url])

    opener.seen = seen
    return opener


def test_download_into_cache_with_fallback_mirror(isolated, monkeypatch):
    arrays = tiny_mnist(seed=5)
    served = isolated / "served"
    sums = write_tiny(served, arrays)
    good = "https://good.example/mnist/"
    files = {good + p.name: p.read_bytes() for p in served.iterdir()}
    opener = _serving(files)
    monkeypatch.setattr(datasets, "_urlopen", opener)
    monkeypatch.setattr(datasets, "MNIST_MIRRORS", ["https://down.example/", good])
    m = load_mnist(checksums=sums)
    cache = isolated / "cache" / "mnist"
    assert Path(m.source) == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(b + ".gz"
                                                             for b in MNIST_FILES.values())
    np.testing.assert_array_equal(m.train_images, arrays["train_images"])
    assert any(u.startswith("https://down.example/") for u in opener.seen)
    # second call: from the cache, no download
    opener.seen.clear()
    load_mnist(checksums=sums)
    assert opener.seen == []


def test_download_skips_corrupt_mirror_and_fails_cleanly(isolated, monkeypatch):
    arrays = tiny_mnist(seed=6)
    served = isolated / "served"
    sums = write_tiny(served, arrays)
    bad, good = "https://bad.example/", "https://good.example/"
    files = {}
    for p in served.iterdir():
        blob = p.read_bytes()
        files[good + p.name] = blob
        files[bad + p.name] = blob[:len(blob) // 2]          # truncated download
    monkeypatch.setattr(datasets, "_urlopen", _serving(files))
    dest = isolated / "dl"
    datasets.download_mnist(dest, mirrors=[bad, good], checksums=sums, progress=False)
    assert load_mnist(dest, checksums=sums, download=False).test_images.shape == (5, 28, 28)
    # only bad mirrors: a clear error, nothing left under the real name or as a .part
    dest2 = isolated / "dl2"
    with pytest.raises(DatasetError, match="could not download"):
        datasets.download_mnist(dest2, mirrors=[bad], checksums=sums, progress=False)
    assert list(dest2.iterdir()) == []


def test_download_with_the_real_opener_from_file_urls(tmp_path):
    """The real urllib opener, pointed at file:// mirrors (no network)."""
    arrays = tiny_mnist(seed=7)
    served = tmp_path / "served"
    sums = write_tiny(served, arrays)
    dest = tmp_path / "data"
    dest.mkdir()                                  # a named folder must exist (issue 15)
    m = load_mnist(dest, checksums=sums,
                   mirrors=[(tmp_path / "nothing").as_uri() + "/", served.as_uri() + "/"])
    np.testing.assert_array_equal(m.train_labels, arrays["train_labels"])
    assert not any(p.suffix == ".part" for p in dest.iterdir())


# ------------------------------------------------------------------ named folders, messages

def test_named_folder_that_does_not_exist_is_an_error_and_not_created(isolated, monkeypatch):
    typo = isolated / "some" / "typo"
    monkeypatch.setattr(datasets, "_urlopen", _fail_opener)
    with pytest.raises(DatasetError, match=r"(?s)typo \(from data_dir / --data-dir\) does not "
                                           r"exist"):
        load_mnist(typo)
    assert not typo.exists() and not typo.parent.exists()
    monkeypatch.setenv("BNFAST_DATA_DIR", str(typo))
    with pytest.raises(DatasetError, match=r"typo \(from BNFAST_DATA_DIR\) does not exist"):
        load_mnist()
    assert not typo.exists()
    (isolated / "file").write_text("x")
    with pytest.raises(DatasetError, match="is not a folder"):
        load_mnist(isolated / "file")


def test_missing_data_message_lists_every_place_and_the_remedies(isolated, monkeypatch):
    shared = isolated / "shared" / "data" / "mnist"
    monkeypatch.setattr(datasets, "_checkout_dirs", lambda: [shared])
    monkeypatch.setattr(datasets, "_urlopen", _fail_opener)
    monkeypatch.setattr(datasets, "MNIST_MIRRORS", ["https://a.invalid/", "https://b.invalid/"])
    with pytest.raises(DatasetError) as err:
        load_mnist()
    msg = str(err.value)
    lines = msg.splitlines()
    assert len(lines) <= 6, msg
    assert f"{shared} (beside the source checkout, does not exist)" in msg
    assert str(isolated / "cache" / "mnist") + " (the cache folder" in msg
    assert "could not download" in msg and "no network in tests" in msg
    assert "--data-dir" in lines[-1] and "BNFAST_DATA_DIR" in lines[-1]
    # only the cache folder was created
    assert (isolated / "cache" / "mnist").is_dir() and not shared.exists()


def test_download_prints_one_line_per_file(isolated, monkeypatch, capsys):
    monkeypatch.setattr(datasets, "_urlopen", _fail_opener)
    with pytest.raises(DatasetError):
        datasets.download_mnist(isolated / "dl", names=["x-idx1-ubyte"],
                                mirrors=["https://a.invalid/", "https://b.invalid/"])
    assert capsys.readouterr().out.count("downloading") == 1


# ------------------------------------------------------------------ the real files

def real_mnist_dirs():
    """Folders holding the real MNIST files: BNFAST_DATA_DIR (or its mnist/) first, then
    the checkout's ../shared/data/mnist."""
    cands = []
    env = os.environ.get("BNFAST_DATA_DIR")
    if env:
        cands += [Path(env).expanduser(), Path(env).expanduser() / "mnist"]
    cands += datasets._checkout_dirs()
    return [d for d in cands
            if all((d / (b + ".gz")).is_file() or (d / b).is_file() for b in MNIST_FILES.values())]


REAL = real_mnist_dirs()
needs_real = pytest.mark.skipif(not REAL, reason="real MNIST files not present (set "
                                                 "BNFAST_DATA_DIR)")


def test_real_mnist_dirs_honour_the_environment(monkeypatch, tmp_path):
    write_tiny(tmp_path / "mnist", tiny_mnist())
    monkeypatch.setenv("BNFAST_DATA_DIR", str(tmp_path))
    assert real_mnist_dirs()[0] == tmp_path / "mnist"


@needs_real
def test_real_mnist():
    m = load_mnist(REAL[0], download=False)
    assert m.train_images.shape == (60000, 28, 28) and m.test_images.shape == (10000, 28, 28)
    assert np.bincount(m.train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918,
                                                    6265, 5851, 5949]
    assert np.bincount(m.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                                   974, 1009]
    x = datasets.as_float(m.test_images[:10], flatten=True)
    assert x.shape == (10, 784) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1


# ------------------------------------------------------------------ hostile files (issue 12)

def _header(dims, typecode=0x08):
    return struct.pack(">HBB", 0, typecode, len(dims)) + struct.pack(f">{len(dims)}I", *dims)


def _gzip_stream(head, n_zeros, chunk=1 << 22):
    """gzip data of `head` followed by `n_zeros` zero bytes, compressed piece by piece."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)            # 31: gzip container
    parts = [z.compress(head)]
    block = bytes(chunk)
    left = n_zeros
    while left:
        k = min(chunk, left)
        parts.append(z.compress(block[:k]))
        left -= k
    parts.append(z.flush())
    return b"".join(parts)


def test_as_float_rejects_non_float_dtypes_and_float_images():
    u8 = np.array([[0, 255]], np.uint8)
    for bad in (np.int32, np.uint8, np.float16, "int64", bool):
        with pytest.raises(TypeError, match="dtype must be float32 or float64"):
            datasets.as_float(u8, dtype=bad)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        datasets.as_float(u8, dtype="not a dtype")
    with pytest.raises(TypeError, match="integer pixel values"):
        datasets.as_float(u8 / 255.0)                      # already scaled: refused
    with pytest.raises(ValueError, match="0..255"):
        datasets.as_float(np.array([[0, 256]], np.int16))
    assert datasets.as_float(np.array([[0, 255]], np.int64)).tolist() == [[0.0, 1.0]]
    assert datasets.as_float(np.zeros((0, 28, 28), np.uint8), flatten=True).shape == (0, 784)
    x = np.array([[3, 4]], np.uint8)
    x.flags.writeable = False                               # the input is never written
    assert datasets.as_float(x, dtype=np.float64).dtype == np.float64


def test_idx_dims_whose_product_overflows_int64():
    # 65536**4 * 3 = 3 * 2**64: zero in int64 arithmetic, so a header-only file "fits"
    raw = _header((65536, 65536, 65536, 65536, 3))
    with pytest.raises(DatasetError, match=r"<bytes>: header says dims .*truncated"):
        parse_idx(raw)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_huge_dims_reported_with_true_size(tmp_path, gz):
    raw = _header((2**32 - 1, 2**32 - 1, 2)) + bytes(10)
    total = 16 + (2**32 - 1) ** 2 * 2
    with pytest.raises(DatasetError, match=rf"\({total} bytes in all\).*truncated file"):
        parse_idx(raw)
    p = tmp_path / ("big.gz" if gz else "big")
    p.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DatasetError, match=rf"{p.name}: .*\({total} bytes in all\).*truncated"):
        read_idx(p)


@pytest.mark.parametrize("ndim", [33, 65, 255])
def test_idx_too_many_dimensions(tmp_path, ndim):
    raw = _header((1,) * ndim) + b"\0"
    with pytest.raises(DatasetError, match=f"{ndim} dimensions"):
        parse_idx(raw)
    (tmp_path / "x").write_bytes(raw)
    with pytest.raises(DatasetError, match=f"x: the IDX header declares {ndim} dimensions"):
        read_idx(tmp_path / "x")


def test_read_idx_bad_sha256_argument(tmp_path):
    (tmp_path / "x").write_bytes(idx_bytes(np.arange(3)))
    with pytest.raises(TypeError, match="sha256 must be a hex string"):
        read_idx(tmp_path / "x", sha256=123)
    with pytest.raises(ValueError, match="sha256 must be a hex string"):
        read_idx(tmp_path / "x", sha256="abc")
    with pytest.raises(TypeError, match=r"checksums\['t10k-labels-idx1-ubyte'\]"):
        load_mnist(tmp_path, checksums={"t10k-labels-idx1-ubyte": b"00"}, download=False)


def test_gzip_bomb_is_not_inflated_whole(tmp_path):
    """A small .gz declaring 10 bytes but inflating to 200 MB: rejected after reading
    about the declared size, with little memory, digest or not."""
    import tracemalloc
    bomb = _gzip_stream(_header((10,)), 200 << 20)
    assert len(bomb) < 1 << 20
    p = tmp_path / "bomb-idx1-ubyte.gz"
    p.write_bytes(bomb)
    for digest in (None, "0" * 64):
        tracemalloc.start()
        try:
            with pytest.raises(DatasetError, match="bomb-idx1-ubyte.gz: .*trailing bytes"):
                read_idx(p, digest)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20, peak


def test_gzip_declaring_more_than_it_holds(tmp_path):
    p = tmp_path / "short.gz"
    p.write_bytes(gzip.compress(_header((60000, 28, 28)) + bytes(1000)))
    with pytest.raises(DatasetError, match=r"short.gz: .*file has 1016 bytes \(truncated"):
        read_idx(p)


def test_downloaded_bomb_is_rejected(isolated, monkeypatch):
    url = "https://bomb.example/"
    files = {url + "t10k-labels-idx1-ubyte.gz": _gzip_stream(_header((10,)), 50 << 20)}
    monkeypatch.setattr(datasets, "_urlopen", _serving(files))
    with pytest.raises(DatasetError, match="(?s)could not download.*trailing bytes"):
        datasets.download_mnist(isolated / "dl", names=["t10k-labels-idx1-ubyte"],
                                mirrors=[url], checksums={}, progress=False)
    assert list((isolated / "dl").iterdir()) == []


def test_directory_and_missing_file_are_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="cannot be read"):
        read_idx(tmp_path)
    with pytest.raises(DatasetError, match="nothing: cannot be read"):
        read_idx(tmp_path / "nothing")
