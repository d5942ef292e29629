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
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import secrets
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_csv", "save_figure", "fsync_directory", "sha256_file"]

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
