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
import io
import math
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
        The training and test images (uint8, ``(N, 28, 28)``; 60,000 and 10,000 in MNIST)
        and their labels (uint8 digits 0-9, ``(N,)``).
    source : str
        Where the arrays came from: the folder the files were read from.

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

# At most this many dimensions (NumPy 1.x's limit; NumPy 2 allows 64).
_IDX_MAX_NDIM = 32
# Size of the pieces a file is read and decompressed in.
_CHUNK = 1 << 20


def _parse_header(head, name):
    """Parse the IDX magic (4 bytes of `head`); return ``(dtype, ndim)``."""
    if len(head) < 4:
        raise DatasetError(f"{name}: {len(head)} bytes is too short for an IDX header "
                           f"(truncated file)")
    zero, typecode, ndim = head[0] << 8 | head[1], head[2], head[3]
    if zero != 0 or typecode not in _IDX_TYPES or ndim == 0:
        raise DatasetError(f"{name}: not an IDX file (magic bytes {bytes(head[:4]).hex()})")
    if ndim > _IDX_MAX_NDIM:
        raise DatasetError(f"{name}: the IDX header declares {ndim} dimensions; at most "
                           f"{_IDX_MAX_NDIM} are supported (corrupt or not an IDX file)")
    return np.dtype(_IDX_TYPES[typecode]), ndim


def _parse_dims(raw, ndim, dtype, name):
    """``(dims, header_bytes, total_bytes)`` from the dimension words (Python ints: no
    overflow, however large the dimensions)."""
    dims = struct.unpack(f">{ndim}I", raw)
    header = 4 + 4 * ndim
    total = header + math.prod(dims) * dtype.itemsize
    return dims, header, total


def _size_error(name, dims, total, got, at_least=False):
    what = "truncated file" if got < total else "trailing bytes"
    has = f"at least {got}" if at_least else f"{got}"
    return DatasetError(f"{name}: header says dims {dims} ({total} bytes in all), file has "
                        f"{has} bytes ({what})")


def _check_sha256(sha256, what="sha256"):
    """`sha256` as lower-case hex, or TypeError/ValueError naming `what`."""
    if not isinstance(sha256, str):
        raise TypeError(f"{what} must be a hex string of 64 characters (a SHA-256 digest), "
                        f"got {type(sha256).__name__} {sha256!r}")
    h = sha256.strip().lower()
    if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
        raise ValueError(f"{what} must be a hex string of 64 characters (a SHA-256 digest), "
                         f"got {sha256!r}")
    return h


def parse_idx(data, name="<bytes>"):
    """Parse the bytes of an uncompressed IDX file into an array.

    Parameters
    ----------
    data : bytes-like
        The whole content of an uncompressed IDX file (bytes, bytearray or memoryview).
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
        Bad magic number, unknown type, more than 32 dimensions, or a payload shorter or
        longer than the header's dimensions say (a truncated file, trailing bytes).
    TypeError
        If `data` is not bytes-like.

    Examples
    --------
    >>> import struct
    >>> raw = struct.pack(">I", 0x801) + struct.pack(">I", 3) + bytes([7, 1, 4])
    >>> parse_idx(raw).tolist()
    [7, 1, 4]
    >>> parse_idx(raw + b"\\0")
    Traceback (most recent call last):
        ...
    bnfast.datasets.DatasetError: <bytes>: header says dims (3,) ... (trailing bytes)
    """
    try:
        data = memoryview(data).cast("B")
    except TypeError:
        raise TypeError(f"parse_idx: data must be bytes-like, got {type(data).__name__}") \
            from None
    dtype, ndim = _parse_header(data[:4], name)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{name}: header needs {header} bytes, file has {len(data)} "
                           f"(truncated file)")
    dims, header, total = _parse_dims(data[4:header], ndim, dtype, name)
    if len(data) != total:
        raise _size_error(name, dims, total, len(data))
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _read_exactly(f, n, name, hasher):
    """Read `n` bytes from `f` into a new bytearray, hashing them; fewer at end of file."""
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(min(_CHUNK, n - len(buf)))
        if not chunk:
            break
        hasher.update(chunk)
        buf += chunk
    return buf


def _read_idx_stream(f, name, sha256, size=None):
    """Parse an IDX file from the binary stream `f`, reading no more than its header
    declares (plus one byte to detect trailing data) and hashing what it reads.

    `size` is the stream's length when known (a plain file): then a wrong size is
    reported before any payload is read.
    """
    hasher = hashlib.sha256()
    head = _read_exactly(f, 4, name, hasher)
    dtype, ndim = _parse_header(head, name)
    raw_dims = _read_exactly(f, 4 * ndim, name, hasher)
    if len(raw_dims) < 4 * ndim:
        raise DatasetError(f"{name}: header needs {4 + 4 * ndim} bytes, file has "
                           f"{4 + len(raw_dims)} (truncated file)")
    dims, header, total = _parse_dims(raw_dims, ndim, dtype, name)
    if size is not None and size != total:
        raise _size_error(name, dims, total, size)
    payload = _read_exactly(f, total - header, name, hasher)
    if len(payload) < total - header:
        raise _size_error(name, dims, total, header + len(payload))
    extra = f.read(1)                 # also makes gzip check its CRC and length
    if extra:
        raise _size_error(name, dims, total, total + 1, at_least=True)
    if sha256 is not None:
        got = hasher.hexdigest()
        if got != sha256:
            raise DatasetError(
                f"{name}: SHA-256 of the uncompressed content is {got}, expected {sha256} "
                f"(corrupt, truncated or a different file); delete it and obtain it again")
    arr = np.frombuffer(payload, dtype=dtype).reshape(dims)
    if dtype.itemsize == 1:
        return arr                    # owns its (writeable) bytearray; no copy needed
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _read_idx_fileobj(f, name, sha256, size=None):
    """Like `_read_idx_stream`, decompressing on the fly when `f` holds gzip data."""
    magic = f.read(2)
    f.seek(0)
    if magic != _GZIP_MAGIC:
        return _read_idx_stream(f, name, sha256, size)
    try:
        with gzip.GzipFile(fileobj=f, mode="rb") as g:
            return _read_idx_stream(g, name, sha256)
    except (EOFError, OSError, zlib.error) as exc:  # truncated or corrupt gzip stream
        raise DatasetError(f"{name}: corrupt or truncated gzip data ({exc}); delete it and "
                           f"obtain it again") from exc


def read_idx(path, sha256=None):
    """Read one IDX file (gzip-compressed or raw), optionally checking its digest.

    The file is read (and decompressed) in pieces, never more than its header declares
    plus one byte, and hashed as it is read: a corrupt file or a "gzip bomb" is rejected
    without being inflated whole.

    Parameters
    ----------
    path : str or os.PathLike
        The file, gzip-compressed (recognised by its content, not its name) or raw.
    sha256 : str, optional
        Expected SHA-256 (64 hex digits) of the uncompressed content.

    Returns
    -------
    ndarray
        The array, as :func:`parse_idx` gives it: shape from the header, uint8 data as
        uint8.

    Raises
    ------
    DatasetError
        Unreadable, corrupt or truncated file, trailing data, a header that is not IDX
        (or declares more than 32 dimensions), or a digest mismatch; the message names
        the file.
    TypeError, ValueError
        If `sha256` is not a string of 64 hex digits.

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
    if sha256 is not None:
        sha256 = _check_sha256(sha256)
    try:
        path = Path(path)
    except TypeError:
        raise TypeError(f"read_idx: path must be a str or os.PathLike, got "
                        f"{type(path).__name__}") from None
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return _read_idx_fileobj(f, str(path), sha256, size)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc})") from exc


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

#: Largest download accepted (the MNIST .gz files are under 10 MiB).
_MAX_DOWNLOAD = 1 << 28


def _check_checksums(checksums):
    """`checksums` as {base name: lower-case hex}, or TypeError/ValueError."""
    try:
        items = list(checksums.items())
    except AttributeError:
        raise TypeError(f"checksums must be a dict of base name -> SHA-256 hex string, got "
                        f"{type(checksums).__name__}") from None
    return {k: _check_sha256(v, f"checksums[{k!r}]") for k, v in items}


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
        Seconds to wait for each connection or read before trying the next mirror.
    progress : bool, default True
        Print one line per file.

    Raises
    ------
    DatasetError
        If no mirror serves a good copy of a file; the message lists what each said.
    TypeError, ValueError
        If `checksums` is not a dict of 64-digit hex strings.

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
    mirrors = list(MNIST_MIRRORS if mirrors is None else mirrors)
    checksums = _check_checksums(MNIST_SHA256 if checksums is None else checksums)
    names = list(MNIST_FILES.values() if names is None else names)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for base in names:
        errors = []
        if progress:
            print(f"bnfast: downloading {base}.gz into {dest}", flush=True)
        for prefix in mirrors:
            url = prefix.rstrip("/") + "/" + base + ".gz"
            try:
                with _urlopen(url, timeout) as resp:
                    blob = resp.read(_MAX_DOWNLOAD + 1)
                if len(blob) > _MAX_DOWNLOAD:
                    raise DatasetError(f"{url}: larger than {_MAX_DOWNLOAD >> 20} MiB, "
                                       f"not an MNIST file")
                _read_idx_fileobj(io.BytesIO(blob), url, checksums.get(base))
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
    TypeError, ValueError
        If `checksums` is not a dict of 64-digit hex strings.

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
    bnfast.datasets.DatasetError: MNIST files t10k-labels-idx1-ubyte (.gz or raw) not found. ...
    >>> tmp.cleanup()
    """
    checksums = _check_checksums(MNIST_SHA256 if checksums is None else checksums)
    folder, may_download = find_mnist_dir(data_dir)
    named = _named_dir(data_dir)
    if named is not None and not named[0].is_dir():
        what = "does not exist" if not named[0].exists() else "is not a folder"
        raise DatasetError(f"MNIST folder {named[0]} (from {named[1]}) {what}; name the "
                           f"folder that holds the four MNIST files")
    missing = [b for b in MNIST_FILES.values() if _file_in(folder, b) is None]
    if missing:
        if not (download and may_download):
            raise DatasetError(_not_found(data_dir, folder, missing, None))
        try:
            download_mnist(folder, names=missing, mirrors=mirrors, checksums=checksums)
        except DatasetError as exc:
            raise DatasetError(_not_found(data_dir, folder, missing, exc)) from None
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


def _named_dir(data_dir):
    """``(folder, how it was named)`` for a folder the user named, else None."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), "data_dir / --data-dir"
    env = os.environ.get("BNFAST_DATA_DIR")
    if env:
        return Path(env).expanduser(), "BNFAST_DATA_DIR"
    return None


def _searched(data_dir):
    """``[(folder, how it was chosen), ...]``: every place :func:`find_mnist_dir` looks."""
    if data_dir is not None:
        return [(Path(data_dir).expanduser(), "data_dir / --data-dir")]
    env = os.environ.get("BNFAST_DATA_DIR")
    if env:
        d = Path(env).expanduser()
        return [(d, "BNFAST_DATA_DIR"), (d / "mnist", "BNFAST_DATA_DIR's mnist/")]
    return ([(d, "beside the source checkout") for d in _checkout_dirs()]
            + [(default_cache_dir() / "mnist", "the cache folder")])


def _not_found(data_dir, folder, missing, download_error):
    """The message for missing MNIST files: every place looked in, why the download
    failed, and how to point at a copy."""
    lines = [f"MNIST files {', '.join(missing)} (.gz or raw) not found. Looked in:"]
    for d, how in _searched(data_dir):
        state = "" if d.is_dir() else ", does not exist"
        lines.append(f"  {d} ({how}{state})")
    if download_error is not None:
        reasons = [r.strip() for r in str(download_error).splitlines()[1:] if r.strip()]
        first = reasons[0] if reasons else str(download_error)
        if len(first) > 160:
            first = first[:157] + "..."
        more = f" (and {len(reasons) - 1} other mirrors)" if len(reasons) > 1 else ""
        lines.append(f"  could not download into {folder}: {first}{more}")
    lines.append("Point at a folder holding the four files with --data-dir DIR (data_dir=) "
                 "or the BNFAST_DATA_DIR environment variable.")
    return "\n".join(lines)


def as_float(images, *, flatten=False, dtype=np.float32):
    """uint8 images -> floats in [0, 1] (``x / 255``), optionally flattened to ``(N, -1)``.

    Parameters
    ----------
    images : array_like of integers
        Pixel values in 0..255 (any integer dtype), batch axis first (e.g.
        ``MNIST.train_images``).  Not modified.
    flatten : bool, default False
        Reshape to ``(N, pixels)`` for fully connected networks.
    dtype : float32 or float64, default float32
        The dtype of the result.

    Returns
    -------
    ndarray
        A new array of `dtype`, shape that of `images` or ``(N, -1)``.

    Raises
    ------
    TypeError
        If `dtype` is not float32 or float64, or `images` does not hold integers (floats
        are refused: they may already be scaled, and scaling twice would go unnoticed).
    ValueError
        If a pixel value is outside 0..255, or `flatten` is asked of a 0-d array.

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
    >>> as_float(images, dtype=np.int32)
    Traceback (most recent call last):
        ...
    TypeError: as_float: dtype must be float32 or float64, got int32
    """
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"as_float: dtype must be float32 or float64, got {dtype!r}") \
            from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"as_float: dtype must be float32 or float64, got {dt}")
    x = np.asarray(images)
    if x.dtype.kind not in "ui":
        raise TypeError(f"as_float: images must hold integer pixel values 0..255 (e.g. "
                        f"uint8), got dtype {x.dtype}")
    if x.dtype != np.uint8 and x.size and (x.min() < 0 or x.max() > 255):
        raise ValueError(f"as_float: pixel values must be in 0..255, got values in "
                         f"{x.min()}..{x.max()}")
    if flatten and x.ndim == 0:
        raise ValueError("as_float: flatten=True needs a batch axis, got a 0-d array")
    out = x.astype(dt)                 # always a new array
    out *= dt.type(1.0 / 255.0)
    return out.reshape(len(out), math.prod(out.shape[1:])) if flatten else out
