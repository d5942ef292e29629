"""Files in and out of the command line: matrices read and written, output paths checked before any work."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ._options import CLIError

#: What ``approximate --out`` writes, by suffix: the factors (.npz) or the dense reconstruction.
MATRIX_OUTPUTS = (".npz", ".npy", ".csv", ".txt", ".png")


def load_matrix(path, key=None):
    """Read a matrix from .npy, .npz, .csv/.txt or an image file (as grayscale)."""
    import numpy as np

    from .._extras import require

    path = Path(path)
    if not path.is_file():
        raise CLIError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if key is not None and suffix != ".npz":
        print(f"blocklowrank: warning: --key is for .npz files only; ignored for {path.name}", file=sys.stderr)
    if suffix in (".npy", ".npz"):
        X = _load_numpy(path, key)
    elif suffix in (".csv", ".txt", ".tsv"):
        delim = "\t" if suffix == ".tsv" else ("," if suffix == ".csv" else None)
        try:
            X = np.loadtxt(path, delimiter=delim, ndmin=2)
        except ValueError as exc:
            raise CLIError(f"could not read {path} as numbers: {exc}") from None
    elif suffix in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"):
        mpimg = require("matplotlib.image")
        try:
            img = mpimg.imread(path)
        except Exception as exc:  # Pillow/matplotlib errors vary
            raise CLIError(f"could not read image {path}: {exc}") from None
        img = np.asarray(img, dtype=np.float64)
        if img.ndim == 3:
            rgb = img[..., :3]
            img = rgb @ np.array([0.299, 0.587, 0.114]) if rgb.shape[-1] == 3 else rgb[..., 0]
        X = img
    else:
        raise CLIError(f"unsupported file type {suffix!r}: use .npy, .npz, .csv, .txt or an image")
    X = np.asarray(X)
    if X.ndim != 2:
        raise CLIError(f"{path} holds an array of shape {X.shape}; a 2-D matrix is needed")
    return X


def _load_numpy(path, key):
    """An array from .npy (memory-mapped first: a forged header cannot allocate) or .npz."""
    import zipfile

    import numpy as np

    try:
        if path.suffix.lower() == ".npy":
            return np.array(np.load(path, mmap_mode="r", allow_pickle=False))
        with np.load(path, allow_pickle=False) as z:
            names = list(z.keys())
            if not names:
                raise CLIError(f"{path} holds no arrays")
            name = key or names[0]
            if name not in z:
                raise CLIError(f"{path} has no array {name!r}; it has {names}")
            info = z.zip.getinfo(name + ".npy")
            if info.file_size > 4 * path.stat().st_size + 2**26:  # far beyond what the archive can hold
                raise CLIError(f"{path}: array {name!r} claims {info.file_size} bytes; the file is damaged or forged")
            return z[name]
    except CLIError:
        raise
    except (ValueError, OSError, EOFError, MemoryError, KeyError, zipfile.BadZipFile) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CLIError(f"{path.name} is not a readable {path.suffix} file ({first[:120]})") from None


def check_output(path, *, overwrite=False, suffixes=None, folder=False):
    """Refuse an output path before any work: wrong type, a missing or read-only folder, or one that exists.

    Returns the path. ``folder=True``: ``path`` is a directory to create or
    fill (an existing non-empty one needs ``overwrite``).
    """
    path = Path(path)
    if not str(path).strip():
        raise CLIError("--out is empty")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise CLIError(f"--out {path}: unsupported output type {path.suffix!r}; use {', '.join(suffixes)}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"--out {path}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"--out {path}: the folder {parent} is not writable")
    if folder:
        if path.exists() and not path.is_dir():
            raise CLIError(f"--out {path} exists and is not a folder")
    elif path.is_dir():
        raise CLIError(f"--out {path} is a folder; give a file name")
    elif path.exists() and not overwrite:
        raise CLIError(f"--out {path} exists; pass --overwrite to replace it")
    return path


def save_matrix(path, X):
    """Write ``X`` to a .npy, .npz (``reconstruction``), .csv/.txt or .png (grayscale) file, atomically."""
    import numpy as np

    from .._extras import require
    from .._io import atomic_write

    path = Path(path)
    writers = {
        ".npy": lambda f: np.save(f, X),
        ".npz": lambda f: np.savez_compressed(f, reconstruction=X),
        ".csv": lambda f: np.savetxt(f, X, delimiter=","),
        ".txt": lambda f: np.savetxt(f, X, delimiter=" "),
        ".png": lambda f: require("matplotlib.image").imsave(f, X, cmap="gray", format="png"),
    }
    write = writers.get(path.suffix.lower())
    if write is None:
        raise CLIError(f"unsupported output type {path.suffix.lower()!r}: use .npy, .npz, .csv, .txt or .png")
    with atomic_write(path) as f:
        write(f)
    return path
