"""Files, written whole or not at all, and their hashes (the floor of the library).

One writer and one hasher for every file the library produces or checks:
factor files, safetensors checkpoints, PEFT adapters, study logs and spectra,
cached data sets, trained models.

- :func:`atomic_write`: a context manager yielding a binary file object that
  writes to a temporary file beside the target; on a clean exit the file is
  flushed, fsynced and renamed over the target (``os.replace``, atomic on
  POSIX and Windows), and the directory entry is fsynced where the platform
  allows. On an exception the temporary file is removed and the target is
  left as it was. A reader, or a crash at any moment, sees the old file or the
  new one, never a part.
- :func:`atomic_write_text`, :func:`atomic_write_csv` and :func:`save_figure`:
  the same for a string (UTF-8), records as CSV and a matplotlib figure.
- :func:`sha256_file`: the SHA-256 hex digest of a file (a path, or a binary
  file object such as a member of a zip archive), read in chunks.
- :func:`open_regular` and :func:`read_json`: reading what the library did not
  write. A FIFO, a device or a directory is refused before it can block a
  read; JSON is parsed strictly (:func:`parse_json`: no NaN or Infinity, no
  key twice, no nesting or number that Python cannot parse), one clear error
  naming the file.
- :func:`check_output_dir` and :func:`replace_directory`: a directory written
  whole or not at all, that never replaces an input. The check refuses an
  empty name, an input or a folder holding one, the working directory, the
  home directory and ``/``, and lets ``overwrite`` replace only a directory
  holding the entries it names. The replacement swaps the new directory in
  with one ``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere (or on a file
  system without it) the old directory is first renamed to a recoverable
  backup, which the next check for that name restores if a crash left nothing
  in its place.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import glob
import hashlib
import io
import json
import os
import secrets
import shutil
import stat
import sys
from pathlib import Path

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "atomic_write_csv",
    "save_figure",
    "fsync_directory",
    "sha256_file",
    "open_regular",
    "parse_json",
    "read_json",
    "check_output_dir",
    "replace_directory",
    "recover_directory",
]

_CHUNK = 1 << 20


def fsync_directory(directory):
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # Windows, or a file system that refuses it
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, *, mode=0o644):
    """Write ``path`` whole or not at all: ``with atomic_write(p) as f: f.write(...)``.

    Parameters
    ----------
    path : str or os.PathLike
        The target. Its directory must exist. An existing file is replaced
        only when the block exits without an exception.
    mode : int, default 0o644
        Permission bits of the new file (before the umask).

    Yields
    ------
    file
        A binary file object open for writing.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path, text, *, encoding="utf-8"):
    """Write the string ``text`` to ``path`` whole or not at all (:func:`atomic_write`); return ``path``."""
    with atomic_write(path) as f:
        f.write(text.encode(encoding))
    return path


def atomic_write_csv(path, rows, fieldnames, **dictwriter_kwargs):
    """Write ``rows`` (dicts) as CSV with a header (:class:`csv.DictWriter`) through :func:`atomic_write`."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(fieldnames), **dictwriter_kwargs)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, text.getvalue())


def save_figure(fig, path, **savefig_kwargs):
    """Save a matplotlib figure to ``path`` with :func:`atomic_write` (format from the suffix); return ``path``."""
    with atomic_write(path) as f:
        fig.savefig(f, format=Path(path).suffix[1:].lower() or None, **savefig_kwargs)
    return path


def sha256_file(path):
    """The SHA-256 hex digest (lower case) of a file, read in 1 MiB chunks.

    ``path`` is a path, or a binary file object read from where it stands to its end.
    """
    h = hashlib.sha256()
    with contextlib.nullcontext(path) if hasattr(path, "read") else open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- reading what others wrote
def open_regular(path, *, buffering=-1):
    """Open ``path`` for binary reading if it is a regular file (symbolic links followed), else raise OSError.

    The file is opened without blocking (``O_NONBLOCK``) and checked with
    ``fstat`` before anything is read, so a FIFO named like a data file fails
    at once instead of waiting for a writer; the check is on the descriptor
    actually read, not on a name that may change in between.
    """
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise OSError(errno.EINVAL, f"not a regular file ({kind})", os.fspath(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def parse_json(raw, error, *, constants=False):
    """Parse ``raw`` (bytes) as strict JSON; on any problem raise ``error(message)``.

    Strict: UTF-8, no key twice in an object, no ``NaN``/``Infinity``
    (unless ``constants``: then they are read as floats, for files written by
    Python's :mod:`json`, whose fields the caller checks one by one); input
    nested too deeply for the parser or holding an integer too long for
    Python's int conversion is refused like any other. ``message`` starts
    with a verb ("is not valid JSON (...)"), so that ``error`` can put the
    file's name before it.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    def no_duplicates(pairs):
        obj = {}
        for key, value in pairs:
            if key in obj:
                raise error(f"has the key {key!r} twice")
            obj[key] = value
        return obj

    def no_constants(name):
        if constants:
            return float(name)
        raise error(f"contains {name}, which is not JSON")

    try:
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except json.JSONDecodeError as exc:
        raise error(f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:
        raise error("is nested too deeply") from None
    except ValueError as exc:
        if "digits" not in str(exc):  # an error raised by ``error`` itself, from a hook
            raise
        raise error("holds an integer too long to read (over 4300 digits)") from None


def read_json(path, *, max_bytes=100_000_000, constants=False):
    """The strict JSON (:func:`parse_json`) of the regular file ``path``; ValueError naming the file otherwise.

    OSError (missing, unreadable, not a regular file) propagates, naming the file.
    """
    with open_regular(path) as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ValueError(f"{os.fspath(path)} is larger than {max_bytes} bytes")

    def error(message):
        return ValueError(f"{os.fspath(path)} {message}")

    return parse_json(raw, error, constants=constants)


# ---------------------------------------------------------------------------- directories written whole
_BACKUP = ".{}.replaced-"  # the old directory while the fallback replacement runs (restored after a crash)


def _within(child, parent):
    """Whether ``child`` is ``parent`` or lies below it (both absolute, normalised)."""
    return os.path.commonpath([child, parent]) == parent


def _protected(inputs):
    """``[(path, what)]``: the paths a directory to write may neither be nor hold."""
    found = []
    for given in inputs:
        text = os.fspath(given)
        found += [(p, f"the input {text}") for p in {os.path.abspath(text), os.path.realpath(text)}]
    for path, what in ((os.getcwd(), "the working directory"), (str(Path.home()), "your home directory")):
        found += [(p, what) for p in {os.path.abspath(path), os.path.realpath(path)}]
    return found


def recover_directory(path):
    """Put back the directory a replacement moved aside when a crash left nothing at ``path``."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        return False
    head, name = os.path.split(path)
    backups = sorted(glob.glob(os.path.join(glob.escape(head), glob.escape(_BACKUP.format(name)) + "*")))
    if not backups:
        return False
    os.rename(max(backups, key=os.path.getmtime), path)
    return True


def check_output_dir(out, *, inputs=(), overwrite=False, replaceable=None):
    """Where a directory may be written, or an error saying why not (nothing is written but a recovery).

    Parameters
    ----------
    out : str or path-like
        The directory to write.
    inputs : iterable of str or path-like
        Files and folders that ``out`` must neither be nor hold (the data it
        is made from). The working directory, the home directory (and so
        ``/``) are always protected the same way.
    overwrite : bool, default=False
        Whether a non-empty ``out`` may be replaced.
    replaceable : set of str, optional
        The entries a directory may hold to be replaced with ``overwrite``;
        a directory holding anything else is never replaced. None: any.

    Returns
    -------
    path : str
        ``out``, absolute, symbolic links resolved.

    Raises
    ------
    ValueError
        ``out`` is empty, or is (or holds) a protected path.
    FileExistsError
        ``out`` is a file, or a non-empty directory that may not be replaced.
    """
    text = os.fspath(out)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"out must name a directory, got {text!r}")
    real = os.path.realpath(text)
    hits = [(path != target, what) for target in {os.path.abspath(text), real} for path, what in _protected(inputs)
            if _within(path, target)]  # fmt: skip
    if hits:
        above, what = min(hits)  # what ``out`` is, before what it holds
        raise ValueError(
            f"out={text!r} {'holds' if above else 'is'} {what}; write the output to a new folder of its own"
        )
    recover_directory(real)
    if os.path.lexists(real) and not os.path.isdir(real):
        raise FileExistsError(f"{real} exists and is not a directory")
    entries = sorted(os.listdir(real)) if os.path.isdir(real) else []
    if entries and not overwrite:
        raise FileExistsError(f"{real} is not empty; pass overwrite=True (--overwrite) to replace it")
    foreign = [e for e in entries if replaceable is not None and e not in replaceable]
    if foreign:
        raise FileExistsError(
            f"{real} holds {foreign[0]!r}, so it is not a directory this writes (only "
            f"{', '.join(sorted(replaceable))}); it is never replaced, even with overwrite: choose another folder"
        )
    return real


def _exchange(a, b):
    """Swap the paths ``a`` and ``b`` in one system call (Linux ``renameat2(RENAME_EXCHANGE)``)."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "renameat2 is Linux only")
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError) as exc:  # a C library without it (glibc < 2.28, musl)
        raise OSError(errno.ENOSYS, "no renameat2 in the C library") from exc
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), a, None, b)


def replace_directory(new, path):
    """Move the directory ``new`` to ``path``, replacing a directory there atomically; the old one is deleted.

    With an existing ``path``: one ``renameat2(RENAME_EXCHANGE)`` where the
    platform and file system have it, so ``path`` always holds the old
    directory or the new one. Elsewhere the old directory is renamed to
    ``.<name>.replaced-<token>`` beside it, then ``new`` to ``path``: a crash
    in between leaves the backup, which :func:`check_output_dir` (and
    :func:`recover_directory`) put back.
    """
    new, path = os.path.abspath(os.fspath(new)), os.path.abspath(os.fspath(path))
    if not os.path.lexists(path):
        os.rename(new, path)
        fsync_directory(os.path.dirname(path))
        return path
    try:
        _exchange(new, path)
        fsync_directory(os.path.dirname(path))
        shutil.rmtree(new, ignore_errors=True)  # the old directory, now under the temporary name
        return path
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
    head, name = os.path.split(path)
    backup = os.path.join(head, _BACKUP.format(name) + secrets.token_hex(6))
    os.rename(path, backup)
    os.rename(new, path)
    doomed = os.path.join(head, f".{name}.old-{secrets.token_hex(6)}")
    os.rename(backup, doomed)  # no longer a backup: a crash while deleting it restores nothing
    fsync_directory(head)
    shutil.rmtree(doomed, ignore_errors=True)
    return path
