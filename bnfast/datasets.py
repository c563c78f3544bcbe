"""Data sets for the paper's experiments: MNIST in its standard IDX format.

:func:`load_mnist` finds the four MNIST files (gzip-compressed ``*.gz`` or raw IDX), checks
the SHA-256 digest of each *uncompressed* file and parses it.  A corrupt, truncated or
wrong file raises :class:`DatasetError` naming the file; a partial data set is never
returned.  Where the files are looked for, in order:

1. the `data_dir` argument, if given (only there);
2. else the ``BNFAST_DATA_DIR`` environment variable, if set (that folder or its
   ``mnist/`` subfolder; only there);
3. else ``../shared/data/mnist`` beside a source checkout (relative to the package's
   parent folder, or to the current folder), when it exists;
4. else the cache folder (``BNFAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/bnfast``, else
   ``~/.cache/bnfast``), subfolder ``mnist/``.

When a folder of 1, 2 or 4 lacks a file and ``download=True``, the file is downloaded
(``.gz``) from the first of :data:`MNIST_MIRRORS` that serves it, checked, and moved into
place atomically.

>>> from bnfast.datasets import load_mnist
>>> mnist = load_mnist()                                  # doctest: +SKIP
>>> mnist.train_images.shape, mnist.train_labels.shape    # doctest: +SKIP
((60000, 28, 28), (60000,))
"""
import contextlib
import gzip
import hashlib
import os
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["DatasetError", "MNIST", "MNIST_FILES", "MNIST_SHA256", "MNIST_MIRRORS",
           "load_mnist", "read_idx", "parse_idx", "find_mnist_dir", "download_mnist",
           "default_cache_dir", "as_float"]


class DatasetError(ValueError):
    """A data file is missing, corrupt, truncated or not what it should be."""


#: Role -> base name of the uncompressed IDX file.
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: SHA-256 of the *uncompressed* IDX files (identical wherever MNIST comes from; the
#: digests of the .gz files depend on the compressor and are not checked).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

#: Public mirrors serving ``<name>.gz``, tried in order.
MNIST_MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]

# IDX element types: type code -> (numpy dtype, big-endian)
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

_GZIP_MAGIC = b"\x1f\x8b"


class MNIST(NamedTuple):
    """The MNIST arrays: uint8 images ``(N, 28, 28)`` and uint8 labels ``(N,)``.

    A named tuple, as returned by :func:`load_mnist`; `source` is the folder the files
    were read from.

    Parameters
    ----------
    train_images, train_labels, test_images, test_labels : ndarray
    source : str

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.datasets import MNIST
    >>> data = MNIST(np.zeros((2, 28, 28), np.uint8), np.array([3, 5], np.uint8),
    ...              np.zeros((1, 28, 28), np.uint8), np.array([7], np.uint8), "memory")
    >>> data.train_images.shape, data.test_labels.tolist(), data.source
    ((2, 28, 28), [7], 'memory')
    >>> train_images, train_labels, *_ = data
    >>> train_labels
    array([3, 5], dtype=uint8)
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


# ---------------------------------------------------------------------------- IDX

def parse_idx(data, name="<bytes>"):
    """Parse the bytes of an uncompressed IDX file into an array.

    Parameters
    ----------
    data : bytes
    name : str
        Used in error messages.

    Returns
    -------
    ndarray
        Shape from the header; uint8 data is returned as uint8, multi-byte types in
        native byte order.

    Raises
    ------
    DatasetError
        Bad magic number, unknown type, or a payload shorter or longer than the header's
        dimensions say (a truncated file).

    Examples
    --------
    >>> import struct
    >>> raw = struct.pack(">I", 0x801) + struct.pack(">I", 3) + bytes([7, 1, 4])
    >>> parse_idx(raw).tolist()
    [7, 1, 4]
    """
    if len(data) < 4:
        raise DatasetError(f"{name}: {len(data)} bytes is too short for an IDX header "
                           f"(truncated file)")
    zero, typecode, ndim = data[0] << 8 | data[1], data[2], data[3]
    if zero != 0 or typecode not in _IDX_TYPES or ndim == 0:
        raise DatasetError(f"{name}: not an IDX file (magic bytes {data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{name}: header needs {header} bytes, file has {len(data)} "
                           f"(truncated file)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[typecode])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated file" if len(data) < expected else "trailing bytes"
        raise DatasetError(f"{name}: header says dims {dims} ({expected} bytes in all), "
                           f"file has {len(data)} bytes ({what})")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _read_bytes(path):
    """Contents of `path`, gunzipped if it is a gzip file; DatasetError if that fails."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc})") from exc
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:  # truncated or corrupt gzip stream
        raise DatasetError(f"{path}: corrupt or truncated gzip file ({exc}); delete it "
                           f"and obtain it again") from exc


def _check_digest(data, expected, path):
    got = hashlib.sha256(data).hexdigest()
    if got != expected.lower():
        raise DatasetError(
            f"{path}: SHA-256 of the uncompressed content is {got}, expected {expected} "
            f"(corrupt, truncated or a different file); delete it and obtain it again")


def read_idx(path, sha256=None):
    """Read one IDX file (gzip-compressed or raw), optionally checking its digest.

    Parameters
    ----------
    path : str or os.PathLike
    sha256 : str, optional
        Expected SHA-256 (hex) of the uncompressed content.

    Returns
    -------
    ndarray

    Raises
    ------
    DatasetError
        Unreadable, corrupt or truncated file, or a digest mismatch.

    Examples
    --------
    >>> import gzip, hashlib, struct, tempfile
    >>> from pathlib import Path
    >>> raw = struct.pack(">II", 0x801, 3) + bytes([7, 1, 4])   # 3 uint8 labels
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = Path(tmp.name) / "labels-idx1-ubyte.gz"
    >>> _ = path.write_bytes(gzip.compress(raw))
    >>> read_idx(path, sha256=hashlib.sha256(raw).hexdigest())
    array([7, 1, 4], dtype=uint8)
    >>> read_idx(path, sha256="0" * 64)
    Traceback (most recent call last):
        ...
    bnfast.datasets.DatasetError: ...labels-idx1-ubyte.gz: SHA-256 of the uncompressed content ...
    >>> tmp.cleanup()
    """
    data = _read_bytes(path)
    if sha256 is not None:
        _check_digest(data, sha256, path)
    return parse_idx(data, str(path))


# ---------------------------------------------------------------------------- locations

def default_cache_dir():
    """``BNFAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/bnfast``, else ``~/.cache/bnfast``.

    Returns
    -------
    pathlib.Path
        The folder (``~`` expanded); it is not created.

    Examples
    --------
    >>> import os
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"BNFAST_CACHE_DIR": "/data/cache"}):
    ...     default_cache_dir().as_posix()
    '/data/cache'
    >>> with mock.patch.dict(os.environ, {"XDG_CACHE_HOME": "/var/cache"}):
    ...     _ = os.environ.pop("BNFAST_CACHE_DIR", None)
    ...     default_cache_dir().as_posix()
    '/var/cache/bnfast'
    """
    env = os.environ.get("BNFAST_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "bnfast"


def _checkout_dirs():
    """``../shared/data/mnist`` beside a source checkout, for the package and for cwd."""
    here = Path(__file__).resolve().parent.parent          # the checkout (or site-packages)
    out = []
    for root in (here, Path.cwd()):
        d = (root / ".." / "shared" / "data" / "mnist").resolve()
        if d not in out:
            out.append(d)
    return out


def _file_in(d, base):
    """The path of `base` (``.gz`` preferred) in folder `d`, or None."""
    for name in (base + ".gz", base):
        p = Path(d) / name
        if p.is_file():
            return p
    return None


def _has_all(d, names):
    return all(_file_in(d, b) is not None for b in names)


def find_mnist_dir(data_dir=None):
    """Return ``(folder, may_download)``: where :func:`load_mnist` will look.

    See the module docstring for the order.  ``may_download`` is False for the checkout's
    shared folder (read-only data, never written to).

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        When given, the answer is this folder (``~`` expanded), whether or not it holds
        the files.

    Returns
    -------
    folder : pathlib.Path
        The folder to read the four files from (it may not exist yet).
    may_download : bool
        Whether missing files may be downloaded into `folder`.

    Examples
    --------
    >>> import os
    >>> from unittest import mock
    >>> folder, may_download = find_mnist_dir("data/mnist")
    >>> folder.as_posix(), may_download
    ('data/mnist', True)
    >>> with mock.patch.dict(os.environ, {"BNFAST_DATA_DIR": "/srv/data"}):
    ...     folder, may_download = find_mnist_dir()
    >>> folder.as_posix(), may_download       # no MNIST files there yet
    ('/srv/data', True)
    """
    names = MNIST_FILES.values()
    if data_dir is not None:
        return Path(data_dir).expanduser(), True
    env = os.environ.get("BNFAST_DATA_DIR")
    if env:
        d = Path(env).expanduser()
        if not _has_all(d, names) and _has_all(d / "mnist", names):
            d = d / "mnist"
        return d, True
    for d in _checkout_dirs():
        if _has_all(d, names):
            return d, False
    return default_cache_dir() / "mnist", True


# ---------------------------------------------------------------------------- download

def _urlopen(url, timeout):
    """The opener used for downloads (a module attribute so tests can replace it)."""
    req = urllib.request.Request(url, headers={"User-Agent": "bnfast"})
    return urllib.request.urlopen(req, timeout=timeout)


def download_mnist(dest, *, names=None, mirrors=None, checksums=None, timeout=60,
                   progress=True):
    """Download MNIST ``.gz`` files into `dest`, verifying each before moving it in place.

    Each file is fetched from the first mirror that serves it with the right content (a
    mirror whose file fails the check is skipped), written to a temporary file in `dest`
    and renamed, so an interrupted download never leaves a partial file under the real
    name.

    Parameters
    ----------
    dest : str or os.PathLike
        Folder, created if needed.
    names : iterable of str, optional
        Base names (default: all four of :data:`MNIST_FILES`).
    mirrors : list of str, optional
        URL prefixes (default :data:`MNIST_MIRRORS`).
    checksums : dict, optional
        Base name -> SHA-256 of the uncompressed content (default :data:`MNIST_SHA256`).
    timeout : float, default 60
    progress : bool, default True
        Print one line per file.

    Raises
    ------
    DatasetError
        If no mirror serves a good copy of a file; the message lists what each said.

    Examples
    --------
    A home-made file served by a local ``file:`` mirror, after a mirror that lacks it:

    >>> import gzip, struct, tempfile
    >>> from pathlib import Path
    >>> src, dest = tempfile.TemporaryDirectory(), tempfile.TemporaryDirectory()
    >>> raw = struct.pack(">II", 0x801, 3) + bytes([7, 1, 4])
    >>> _ = (Path(src.name) / "tiny-idx1-ubyte.gz").write_bytes(gzip.compress(raw))
    >>> mirrors = [(Path(src.name) / "missing").as_uri(), Path(src.name).as_uri()]
    >>> download_mnist(dest.name, names=["tiny-idx1-ubyte"], mirrors=mirrors,
    ...                checksums={}, progress=False)
    >>> [p.name for p in Path(dest.name).iterdir()]
    ['tiny-idx1-ubyte.gz']
    >>> download_mnist(dest.name, names=["other-idx1-ubyte"], mirrors=mirrors[:1],
    ...                progress=False)
    Traceback (most recent call last):
        ...
    bnfast.datasets.DatasetError: could not download other-idx1-ubyte.gz from any mirror: ...
    >>> src.cleanup(); dest.cleanup()
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    mirrors = list(MNIST_MIRRORS if mirrors is None else mirrors)
    checksums = MNIST_SHA256 if checksums is None else checksums
    names = list(MNIST_FILES.values() if names is None else names)
    for base in names:
        errors = []
        for prefix in mirrors:
            url = prefix.rstrip("/") + "/" + base + ".gz"
            if progress:
                print(f"bnfast: downloading {url}", flush=True)
            try:
                with _urlopen(url, timeout) as resp:
                    blob = resp.read()
                data = _read_bytes_from_blob(blob, url)
                if base in checksums:
                    _check_digest(data, checksums[base], url)
                parse_idx(data, url)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                errors.append(f"{url}: {exc}")
                continue
            fd, tmp = tempfile.mkstemp(prefix=base + ".", suffix=".part", dir=dest)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                os.replace(tmp, dest / (base + ".gz"))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            break
        else:
            raise DatasetError(f"could not download {base}.gz from any mirror:\n  "
                               + "\n  ".join(errors))


def _read_bytes_from_blob(blob, name):
    if blob[:2] != _GZIP_MAGIC:
        return blob
    try:
        return gzip.decompress(blob)
    except (EOFError, OSError, zlib.error) as exc:
        raise DatasetError(f"{name}: corrupt or truncated gzip data ({exc})") from exc


# ---------------------------------------------------------------------------- loading

def load_mnist(data_dir=None, *, download=True, checksums=None, mirrors=None):
    """Load MNIST: 60,000 training and 10,000 test images (uint8, 28x28) and labels.

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        Folder holding the four IDX files (``.gz`` or raw).  Default: see the module
        docstring (``BNFAST_DATA_DIR``, the checkout's ``../shared/data/mnist``, the cache).
    download : bool, default True
        Download missing files into the folder (never into the checkout's shared folder).
    checksums : dict, optional
        Base name -> SHA-256 of the uncompressed file; default :data:`MNIST_SHA256`.
        Files without an entry are not checked (for tests with home-made files).
    mirrors : list of str, optional
        Download URL prefixes; default :data:`MNIST_MIRRORS`.

    Returns
    -------
    MNIST
        Named tuple ``(train_images, train_labels, test_images, test_labels, source)``;
        `source` is the folder the files were read from.

    Raises
    ------
    DatasetError
        A file is missing (and could not be downloaded), unreadable, corrupt, truncated,
        fails its digest, or the images and labels disagree in number or shape.

    Examples
    --------
    A tiny home-made data set (two training and one test image of 4x4 pixels), read
    without checksums or downloads:

    >>> import struct, tempfile
    >>> from pathlib import Path
    >>> from bnfast.datasets import MNIST_FILES
    >>> def idx(dims, values):
    ...     head = struct.pack(">BBBB", 0, 0, 0x08, len(dims))
    ...     return head + struct.pack(f">{len(dims)}I", *dims) + bytes(values)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = Path(tmp.name)
    >>> files = {"train_images": idx((2, 4, 4), range(32)), "train_labels": idx((2,), [3, 5]),
    ...          "test_images": idx((1, 4, 4), range(16)), "test_labels": idx((1,), [7])}
    >>> for role, data in files.items():
    ...     _ = (folder / MNIST_FILES[role]).write_bytes(data)
    >>> mnist = load_mnist(folder, download=False, checksums={})
    >>> mnist.train_images.shape, mnist.train_labels.tolist(), mnist.test_labels.tolist()
    ((2, 4, 4), [3, 5], [7])
    >>> (folder / MNIST_FILES["test_labels"]).unlink()
    >>> load_mnist(folder, download=False, checksums={})
    Traceback (most recent call last):
        ...
    bnfast.datasets.DatasetError: MNIST files t10k-labels-idx1-ubyte (.gz or raw) not found in ...
    >>> tmp.cleanup()
    """
    checksums = MNIST_SHA256 if checksums is None else checksums
    folder, may_download = find_mnist_dir(data_dir)
    missing = [b for b in MNIST_FILES.values() if _file_in(folder, b) is None]
    if missing:
        if not (download and may_download):
            raise DatasetError(
                f"MNIST files {', '.join(missing)} (.gz or raw) not found in {folder}; "
                f"pass data_dir=, set BNFAST_DATA_DIR, or allow download=True")
        download_mnist(folder, names=missing, mirrors=mirrors, checksums=checksums)
    arrays = {}
    for role, base in MNIST_FILES.items():
        arrays[role] = read_idx(_file_in(folder, base), checksums.get(base))
    for split in ("train", "test"):
        im, lab = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if im.ndim != 3 or lab.ndim != 1 or len(im) != len(lab):
            raise DatasetError(
                f"MNIST {split} set in {folder}: images {im.shape} and labels {lab.shape} "
                f"do not match")
        if im.dtype != np.uint8 or lab.dtype != np.uint8:
            raise DatasetError(f"MNIST {split} set in {folder}: expected uint8 data")
        if lab.size and lab.max() > 9:
            raise DatasetError(f"MNIST {split} labels in {folder}: label {lab.max()} > 9")
    return MNIST(**arrays, source=str(folder))


def as_float(images, *, flatten=False, dtype=np.float32):
    """uint8 images -> floats in [0, 1] (``x / 255``), optionally flattened to ``(N, -1)``.

    Parameters
    ----------
    images : array_like
        Pixel values in 0..255, batch axis first (e.g. ``MNIST.train_images``).
    flatten : bool, default False
        Reshape to ``(N, pixels)`` for fully connected networks.
    dtype : float32 or float64, default float32

    Returns
    -------
    ndarray
        A new array of `dtype`, shape that of `images` or ``(N, -1)``.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.datasets import as_float
    >>> images = np.array([[[0, 51], [102, 255]]], np.uint8)     # one 2x2 image
    >>> as_float(images).round(3)
    array([[[0. , 0.2],
            [0.4, 1. ]]], dtype=float32)
    >>> as_float(images, flatten=True, dtype=np.float64).shape
    (1, 4)
    """
    x = np.asarray(images)
    out = x.astype(dtype)
    out *= np.dtype(dtype).type(1.0 / 255.0)
    return out.reshape(len(out), -1) if flatten else out

