"""Reading and writing safetensors checkpoints with NumPy alone (no torch).

(Over 600 lines: reading, every hostile-file check and writing of one format in
one place, so the checks and the writer cannot drift apart.)

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes
of UTF-8 JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``
plus an optional ``"__metadata__"`` map of strings), then the raw
little-endian, row-major byte buffer. A sharded checkpoint adds an index file
(``model.safetensors.index.json``) whose ``weight_map`` maps each tensor name
to its shard file.

:class:`Checkpoint` reads lazily: opening parses the headers only, and
:meth:`Checkpoint.get` returns one tensor at a time: a memory-mapped view when
the stored type is the one asked for, else (BF16 always) decoded from the file
chunk by chunk into a new array, leaving no page of the file resident.
Every check of the reference implementation (``safetensors`` on PyPI) is made,
and a few it skips (see Notes); any problem raises :class:`CheckpointError`
naming the file and the tensor. Pickle-based checkpoints (``.bin``, ``.pt``,
``.pth``, ``.ckpt``) are refused, never unpickled.

:func:`save_file` writes what the reference writer writes, byte for byte
(tensors sorted by element type, widest first, then by name; header padded
with spaces to a multiple of 8 bytes so the buffer starts 8-byte aligned),
through a temporary file renamed into place.

Notes
-----
Stricter than the reference reader, as the format's README asks: the header
must start with ``{`` (the reference accepts leading whitespace), a key may
not appear twice in the header (the reference keeps the last), and a BOOL
byte must be 0 or 1. Shard paths in an index must be relative and must not
contain ``..``; they are checked as written, so the symbolic links of a
Hugging Face cache snapshot (which point to ``../../blobs``) still work.

Examples
--------
>>> import tempfile, pathlib
>>> import numpy as np
>>> tmp = tempfile.TemporaryDirectory()
>>> folder = pathlib.Path(tmp.name)
>>> path = save_file(folder / "model.safetensors",
...                  {"layer.weight": np.eye(2, dtype=np.float32), "layer.bias": np.zeros(2)},
...                  metadata={"format": "pt"}, dtypes={"layer.weight": "BF16"})
>>> with open_checkpoint(folder) as ckpt:
...     print(ckpt.names(), ckpt.info("layer.weight").dtype, ckpt.metadata)
...     print(ckpt.get("layer.weight"))
['layer.bias', 'layer.weight'] BF16 {'format': 'pt'}
[[1. 0.]
 [0. 1.]]
>>> tmp.cleanup()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import NamedTuple

import numpy as np

from .._io import atomic_write, open_regular, parse_json
from ._dtypes import DTYPES, bf16_to_float32, code_of, float_to_bf16

__all__ = [
    "CheckpointError",
    "TensorInfo",
    "Checkpoint",
    "open_checkpoint",
    "save_file",
    "load_file",
    "safetensors_size",
    "MAX_HEADER_BYTES",
]

#: Largest header (and index file) read, as in the reference implementation.
MAX_HEADER_BYTES = 100_000_000

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_INDEX_SUFFIX = ".safetensors.index.json"
_FIELDS = ("dtype", "shape", "data_offsets")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and, if any, the tensor."""


class TensorInfo(NamedTuple):
    """Where and what one tensor is, read from the header alone.

    Attributes
    ----------
    name : str
    dtype : str
        The safetensors code, e.g. ``"BF16"``.
    shape : tuple of int
    file : pathlib.Path
        The file holding the data (a shard, for a sharded checkpoint).
    offsets : (int, int)
        Byte range ``[begin, end)`` of the data in ``file``: absolute file
        positions, i.e. the header's ``data_offsets`` plus ``8 + N``.
    """

    name: str
    dtype: str
    shape: tuple
    file: Path
    offsets: tuple


def _error(path, message, tensor=None):
    """A CheckpointError whose message starts with the file and, if given, the tensor."""
    where = str(path) if tensor is None else f"{path}, tensor {tensor!r}"
    return CheckpointError(f"{where}: {message}")


def _pickle_refusal(path):
    return _error(
        path,
        "pickle-based checkpoints (.bin, .pt, .pth, .ckpt) are never opened here, because "
        "unpickling can run arbitrary code; convert it to safetensors first (e.g. "
        "safetensors.torch.save_file on its state dict, or save_pretrained(..., "
        "safe_serialization=True)) and open the .safetensors file",
    )


def _looks_pickled(first_bytes):
    """True for the start of a torch zip archive or of a raw pickle stream."""
    return first_bytes.startswith(b"PK\x03\x04") or (
        first_bytes[:1] == b"\x80" and first_bytes[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    )


def _load_json(raw, path, what):
    """Parse strict JSON (UTF-8, no duplicate keys, no NaN/Infinity, no overlong integer) or raise CheckpointError."""
    return parse_json(raw, lambda message: _error(path, f"the {what} {message}"))


def _is_count(value):
    """A JSON non-negative integer (bool is not one)."""
    return type(value) is int and value >= 0


def _check_string_map(value, path, what):
    """Return ``value`` if it is a str -> str dict, else raise CheckpointError."""
    if not isinstance(value, dict):
        raise _error(path, f"{what} must be a JSON object, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise _error(path, f"{what}[{key!r}] must be a string, got {type(item).__name__}")
    return value


def _check_entry(path, name, entry, buffer_size):
    """Validate one tensor entry of a header; return (dtype, shape, begin, end)."""
    if not isinstance(entry, dict):
        raise _error(path, f"its header entry must be an object, got {type(entry).__name__}", name)
    missing = [key for key in _FIELDS if key not in entry]
    if missing:
        raise _error(path, f"its header entry lacks {', '.join(missing)}", name)
    dtype, shape, offsets = (entry[key] for key in _FIELDS)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _error(path, f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})", name)
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise _error(path, f"shape must be a list of non-negative integers, got {shape!r}", name)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise _error(path, f"data_offsets must be two non-negative integers, got {offsets!r}", name)
    begin, end = offsets
    if not begin <= end <= buffer_size:
        raise _error(path, f"data_offsets {offsets} fall outside the {buffer_size}-byte data buffer", name)
    n_bits = math.prod(shape) * DTYPES[dtype].bits  # Python ints: no overflow
    if n_bits % 8 or n_bits // 8 != end - begin:
        raise _error(
            path,
            f"shape {shape} of {dtype} needs {n_bits / 8:g} bytes but data_offsets {offsets} hold {end - begin}",
            name,
        )
    return dtype, tuple(shape), begin, end


class _Header(NamedTuple):
    path: Path
    tensors: dict  # name -> TensorInfo, in data order
    metadata: dict | None
    identity: tuple  # _identity of the file when the header was read
    digest: str  # SHA-256 of the header's bytes (length prefix included)


def _identity(stat):
    """What tells a file apart from a replaced or rewritten one."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _read_header(path):
    """Read and validate the header of one safetensors file (never its data)."""
    path = Path(path)
    try:
        with open_regular(path) as f:  # a FIFO or a device is refused here, before any read blocks
            stat = os.fstat(f.fileno())
            size, first = stat.st_size, f.read(8)
            if size < 8:
                raise _error(path, f"the file has {size} bytes, too few for a safetensors header")
            n = int.from_bytes(first, "little")
            if n > min(MAX_HEADER_BYTES, size - 8):
                if _looks_pickled(first):
                    raise _pickle_refusal(path)
                limit = "the file" if n <= MAX_HEADER_BYTES else f"the {MAX_HEADER_BYTES}-byte limit"
                raise _error(path, f"header length {n} runs past {limit} ({size} bytes in all)")
            raw = f.read(n)
    except OSError as exc:
        raise _error(path, f"cannot be read ({exc.strerror or exc})") from exc
    if not raw.startswith(b"{"):
        raise _error(path, "the header does not start with '{', as the format requires")
    header = _load_json(raw, path, "header")
    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        _check_string_map(metadata, path, "__metadata__")
    data_start, buffer_size = 8 + n, size - 8 - n
    entries = []
    for name, entry in header.items():
        dtype, shape, begin, end = _check_entry(path, name, entry, buffer_size)
        entries.append((begin, end, name, dtype, shape))
    entries.sort()
    cursor, previous = 0, None
    for begin, end, name, _, _ in entries:
        if begin != cursor:
            problem = (
                f"overlaps tensor {previous!r}" if begin < cursor else f"leaves {begin - cursor} bytes unused before it"
            )
            raise _error(path, f"its data_offsets [{begin}, {end}] {problem}", name)
        cursor, previous = end, name
    if cursor != buffer_size:
        raise _error(path, f"the tensors cover {cursor} of the {buffer_size} bytes after the header")
    tensors = {
        name: TensorInfo(name, dtype, shape, path, (data_start + begin, data_start + end))
        for begin, end, name, dtype, shape in entries
    }
    return _Header(path, tensors, metadata, _identity(stat), hashlib.sha256(first + raw).hexdigest())


def _check_shard_path(index_path, shard):
    """Refuse a shard path that is absolute or climbs out of the index's folder."""
    if not isinstance(shard, str) or not shard:
        raise _error(index_path, f"weight_map values must be file names, got {shard!r}")
    posix, windows = PurePosixPath(shard), PureWindowsPath(shard)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
        raise _error(index_path, f"shard path {shard!r} leaves the checkpoint's folder; refusing it")
    return index_path.parent / shard


def _read_index(index_path):
    """Read a sharded checkpoint's index and the headers of its shards."""
    index_path = Path(index_path)
    try:
        with open_regular(index_path) as f:
            raw = f.read(MAX_HEADER_BYTES + 1)
        if len(raw) > MAX_HEADER_BYTES:
            raise _error(index_path, f"the index is larger than {MAX_HEADER_BYTES} bytes")
    except OSError as exc:
        raise _error(index_path, f"cannot be read ({exc.strerror or exc})") from exc
    index = _load_json(raw, index_path, "index")
    if not isinstance(index, dict) or "weight_map" not in index:
        raise _error(index_path, "the index has no weight_map (is it a sharded safetensors index?)")
    weight_map = _check_string_map(index["weight_map"], index_path, "weight_map")
    headers = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = _check_shard_path(index_path, shard)
        if not shard_path.is_file():
            raise _error(index_path, f"shard {shard!r} named in the weight_map does not exist")
        headers[shard] = _read_header(shard_path)
    for name, shard in weight_map.items():
        if name not in headers[shard].tensors:
            raise _error(index_path, f"the weight_map puts it in {shard!r}, which does not hold it", name)
    for shard, header in headers.items():
        for name in header.tensors:
            if weight_map.get(name) != shard:
                where = f"is also in {weight_map[name]!r}" if name in weight_map else "is missing from the index"
                raise _error(index_path, f"stored in shard {shard!r} but {where}", name)
    return list(headers.values())


def _resolve(path):
    """Return (path, is_index) for a file, an index or a folder; refuse pickles."""
    path = Path(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise _pickle_refusal(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not path.is_dir():
        return path, path.name.endswith(".json")
    standard = [p for p in (path / "model.safetensors", path / ("model" + _INDEX_SUFFIX)) if p.is_file()]
    candidates = standard or sorted(path.glob("*" + _INDEX_SUFFIX)) or sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0], candidates[0].name.endswith(".json")
    if candidates:
        names = ", ".join(p.name for p in candidates)
        raise _error(path, f"the folder holds several candidate checkpoints ({names}); pass one of them")
    if any(p.suffix.lower() in _PICKLE_SUFFIXES for p in path.iterdir()):
        raise _pickle_refusal(path)
    raise _error(path, "the folder holds no .safetensors file")


class Checkpoint:
    """A safetensors checkpoint opened read-only and lazily.

    Opening reads the headers only; :meth:`get` memory-maps a file on first
    use and returns one tensor at a time.

    Parameters
    ----------
    path : str or path-like
        A ``.safetensors`` file, a sharded checkpoint's index
        (``*.safetensors.index.json``), or a folder holding
        ``model.safetensors`` or ``model.safetensors.index.json`` (else exactly
        one index, else exactly one ``.safetensors`` file).

    Attributes
    ----------
    path : pathlib.Path
        The file or index opened.
    files : tuple of pathlib.Path
        The files holding data (the shards, for a sharded checkpoint).
    metadata : dict of str to str
        The ``__metadata__`` of the (first) file; empty if it has none.

    Raises
    ------
    CheckpointError
        For anything wrong with the files, naming the file and the tensor.
    FileNotFoundError
        If ``path`` does not exist.

    See Also
    --------
    save_file, load_file, blocklowrank.checkpoints.pair_layers

    Notes
    -----
    It reads like ``safetensors.safe_open``: :meth:`keys`, :meth:`get_tensor`,
    ``name in ckpt``, ``len(ckpt)``, iteration over the names, and ``with
    open_checkpoint(path) as ckpt:`` (closes it). :meth:`keys` (and its alias
    :meth:`names`) lists tensors in storage order: shard by shard (file names
    sorted), by data offset within a file. Arrays returned by :meth:`get` are
    read-only views of the file when no conversion is needed (they stay valid
    after :meth:`close`), and new arrays otherwise.
    """

    def __init__(self, path):
        self.path, is_index = _resolve(path)
        headers = _read_index(self.path) if is_index else [_read_header(self.path)]
        self._infos = {name: info for header in headers for name, info in header.tensors.items()}
        self._identities = {header.path: header.identity for header in headers}
        self._digests = {header.path: header.digest for header in headers}
        self.files = tuple(self._identities)
        self.metadata = dict(headers[0].metadata or {}) if headers else {}
        self._maps = {}
        self._closed = False

    def keys(self):
        """Tensor names in storage order (as ``safetensors.safe_open(...).keys()``)."""
        return list(self._infos)

    def names(self):
        """Tensor names in storage order: the same as :meth:`keys`, kept as an alias."""
        return self.keys()

    def get_tensor(self, name):
        """One tensor as a NumPy array (as ``safe_open(..., framework="np").get_tensor``): :meth:`get`."""
        return self.get(name)

    def info(self, name):
        """Return the :class:`TensorInfo` of ``name`` (from the header; no data is read)."""
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    def __contains__(self, name):
        return name in self._infos

    def __iter__(self):
        return iter(self._infos)

    def __len__(self):
        return len(self._infos)

    def __repr__(self):
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors)"

    @contextlib.contextmanager
    def _open(self, file):
        """``file`` opened unbuffered for reading, checked to be the file whose header was read."""
        if self._closed:
            raise ValueError(f"the checkpoint {self.path} is closed")
        try:
            with open_regular(file, buffering=0) as f:
                if _identity(os.fstat(f.fileno())) != self._identities[file]:
                    raise _error(file, "the file was changed or replaced since it was opened")
                yield f
        except OSError as exc:
            raise _error(file, f"cannot be read ({exc.strerror or exc})") from exc

    def _buffer(self, file):
        """The read-only memory map of ``file``, opened on first use."""
        if file not in self._maps:
            with self._open(file) as f:
                self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[file]

    def fingerprint(self):
        """What tells the checkpoint's files apart from replaced or rewritten ones, as when it was opened.

        Returns
        -------
        list of dict
            Per data file (each shard): ``path``, ``size``, ``mtime_ns``,
            ``device``, ``inode`` and ``header_sha256`` (the SHA-256 of its
            length prefix and header, which list every tensor's name, dtype,
            shape and place).
        """
        return [
            {
                "path": str(path),
                "size": ident[2],
                "mtime_ns": ident[3],
                "device": ident[0],
                "inode": ident[1],
                "header_sha256": self._digests[path],
            }
            for path, ident in self._identities.items()
        ]

    def _chunks(self, name, *, chunk_bytes=1 << 24, hasher=None):
        """Yield ``(start, chunk)``: tensor ``name`` as stored (BF16 as uint16), chunk by chunk.

        The data is read with ``readinto`` into one reused buffer of
        ``chunk_bytes`` (so a chunk is valid until the next one is read):
        no page of the file joins the resident set (the touched pages of a
        memory map stay resident while it is open), and no full-size
        temporary is made. ``start`` is the flat index of the chunk's first
        element; ``hasher`` (a :mod:`hashlib` object), if given, is fed every
        byte read.
        """
        info = self.info(name)
        spec = DTYPES[info.dtype]
        if spec.numpy is None:
            raise _error(info.file, f"dtype {info.dtype} has no NumPy equivalent to read it into", name)
        size = math.prod(info.shape)
        step = max(1, chunk_bytes // spec.numpy.itemsize)
        buffer = np.empty(min(step, size), dtype=spec.numpy)
        with self._open(info.file) as f:
            f.seek(info.offsets[0])
            for start in range(0, size, step):
                chunk = buffer[: min(step, size - start)]
                view, got = memoryview(chunk).cast("B"), 0
                while got < view.nbytes:
                    n = f.readinto(view[got:])
                    if not n:
                        raise _error(info.file, "the file ends inside the tensor's data", name)
                    got += n
                if hasher is not None:
                    hasher.update(view)
                yield start, chunk

    def _read_into(self, name, out, *, subtract=False, chunk_bytes=1 << 24, hasher=None):
        """Decode tensor ``name`` into ``out`` (or subtract it from ``out``), chunk by chunk (:meth:`_chunks`).

        Reading a layer costs ``out`` and one chunk.
        """
        info = self.info(name)
        if out.shape != info.shape or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"out must be a writable C-contiguous array of shape {info.shape}")
        flat = out.reshape(-1)
        for start, chunk in self._chunks(name, chunk_bytes=chunk_bytes, hasher=hasher):
            if info.dtype == "BF16":
                chunk = bf16_to_float32(chunk)
            target = flat[start : start + chunk.size]
            if subtract:
                np.subtract(target, chunk, out=target)
            else:
                target[...] = chunk
        return out

    def get(self, name, *, dtype=None):
        """Return one tensor as a NumPy array, memory-mapped where possible.

        Parameters
        ----------
        name : str
            The tensor's name.
        dtype : data-type, optional
            Convert to this dtype. Without it: BF16 is decoded exactly to
            float32, F16 stays float16, every other type keeps its own.

        Returns
        -------
        array : ndarray
            A read-only view of the file when no conversion is needed; else a
            new array, decoded from the file chunk by chunk (a BF16 layer costs
            its float32 result and a 16 MiB buffer, never a second full copy).
        """
        info = self.info(name)
        spec = DTYPES[info.dtype]
        if spec.numpy is None:
            raise _error(info.file, f"dtype {info.dtype} has no NumPy equivalent to read it into", name)
        if dtype is not None:
            target = np.dtype(dtype)
        else:
            target = np.dtype(np.float32) if info.dtype == "BF16" else spec.numpy
        if info.dtype == "BF16" or (target != spec.numpy and info.dtype != "BOOL"):  # decoded chunk by chunk
            return self._read_into(name, np.empty(info.shape, dtype=target))
        array = np.frombuffer(
            self._buffer(info.file), dtype=spec.numpy, count=math.prod(info.shape), offset=info.offsets[0]
        ).reshape(info.shape)
        if info.dtype == "BOOL" and array.view(np.uint8).max(initial=0) > 1:
            raise _error(info.file, "a BOOL byte is neither 0 nor 1", name)
        return array if dtype is None else array.astype(dtype, copy=False)

    def close(self):
        """Release the memory maps (those still used by live arrays go when the arrays do)."""
        for buffer in self._maps.values():
            with contextlib.suppress(BufferError):
                buffer.close()
        self._maps.clear()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def open_checkpoint(path):
    """Open a safetensors checkpoint (file, sharded index or folder): see :class:`Checkpoint`."""
    return Checkpoint(path)


def load_file(path):
    """Read every tensor of a checkpoint into memory.

    Returns
    -------
    tensors : dict of str to ndarray
        Writable arrays, in storage order, no longer tied to the file.
    """
    with Checkpoint(path) as ckpt:
        return {name: np.array(ckpt.get(name)) for name in ckpt}


def _stored_code(name, array, dtypes):
    """The safetensors code ``array`` is written as: its own, or the one forced by ``dtypes``."""
    forced = dtypes if dtypes is None or isinstance(dtypes, str) else dtypes.get(name)
    if forced is None:
        code = code_of(array.dtype)
        if code is None:
            raise TypeError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store")
        return code
    if forced not in DTYPES or DTYPES[forced].numpy is None:
        writable = ", ".join(code for code, spec in DTYPES.items() if spec.numpy is not None)
        raise ValueError(f"cannot write dtype {forced!r} for tensor {name!r}; use one of {writable}")
    if forced == "BF16" and array.dtype.kind != "f":
        raise TypeError(f"BF16 needs a floating array, but tensor {name!r} has dtype {array.dtype}")
    if forced != "BF16" and not np.can_cast(array.dtype, DTYPES[forced].numpy, "same_kind"):
        raise TypeError(f"tensor {name!r} of dtype {array.dtype} cannot be stored as {forced}; cast it first")
    return forced


def _encoded(array, code):
    """The bytes of ``array`` stored as ``code``: a C-contiguous little-endian array."""
    if code == "BF16":
        return float_to_bf16(array)
    return np.ascontiguousarray(array, dtype=DTYPES[code].numpy)


def _header_bytes(plan, metadata):
    """The padded header of ``plan`` (``(name, code, shape)`` in storage order) and the buffer's size."""
    header = {} if metadata is None else {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name, code, shape in plan:
        size = math.prod(shape) * DTYPES[code].bits // 8
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    try:
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"a tensor name or metadata string is not valid Unicode: {exc}") from None
    return raw + b" " * (-len(raw) % 8), offset


def safetensors_size(specs, *, metadata=None):
    """The size in bytes of the file :func:`save_file` would write, from names, codes and shapes alone.

    Parameters
    ----------
    specs : mapping of str to (str, tuple of int)
        Tensor name -> (safetensors code such as ``"BF16"``, shape).
    metadata : mapping of str to str, optional

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "a.safetensors")
    >>> tensors = {"w": np.zeros((3, 5), np.float32), "b": np.zeros(5)}
    >>> safetensors_size({"w": ("BF16", (3, 5)), "b": ("F64", (5,))}) == os.path.getsize(
    ...     save_file(path, tensors, dtypes={"w": "BF16"}))
    True
    """
    plan = sorted(((n, c, tuple(s)) for n, (c, s) in specs.items()), key=lambda t: (-DTYPES[t[1]].rank, t[0]))
    raw, buffer = _header_bytes(plan, metadata)
    return 8 + len(raw) + buffer


def save_file(path, tensors, *, metadata=None, dtypes=None):
    """Write tensors to a safetensors file, atomically.

    Parameters
    ----------
    path : str or path-like
        The file to write (replaced if it exists).
    tensors : mapping of str to array_like
        The tensors by name.
    metadata : mapping of str to str, optional
        Stored as ``__metadata__``; every value must be a string, as the
        format requires (``{"format": "pt"}`` is what torch writers put).
    dtypes : str or mapping of str to str, optional
        Store as this safetensors code instead of the array's own type: one
        code for every tensor, or a code per tensor name. ``"BF16"`` encodes
        floats with round-to-nearest-even; other conversions must keep the
        kind (float to float, int to int).

    Returns
    -------
    path : pathlib.Path

    Raises
    ------
    TypeError
        For a non-string name or metadata value, or a dtype the format cannot hold.
    ValueError
        For the reserved name ``__metadata__`` or an unknown dtype code.
    """
    path = Path(path)
    for what, value in (("tensors", tensors), ("metadata", metadata), ("dtypes", dtypes)):
        if not (value is None or isinstance(value, Mapping) or (what == "dtypes" and isinstance(value, str))):
            raise TypeError(f"{what} must be a mapping by name, got {type(value).__name__}")
    if metadata is not None:
        bad = {key: value for key, value in metadata.items() if not (isinstance(key, str) and isinstance(value, str))}
        if bad:
            raise TypeError(f"metadata keys and values must be strings (the format's rule), got {bad!r}")
        metadata = dict(sorted(metadata.items()))
    if dtypes is not None and not isinstance(dtypes, str):
        unknown = sorted(set(dtypes) - set(tensors), key=str)
        if unknown:
            raise ValueError(f"dtypes names tensors that are not being saved: {unknown}")
    plan = []
    for name, array in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved by the format and cannot name a tensor")
        array = np.asarray(array)
        plan.append((name, _stored_code(name, array, dtypes), array))
    plan.sort(key=lambda item: (-DTYPES[item[1]].rank, item[0]))  # as the reference writer
    raw, _ = _header_bytes([(name, code, array.shape) for name, code, array in plan], metadata)
    with atomic_write(path) as f:  # the header, then one tensor at a time, encoded only when written
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, code, array in plan:
            f.write(_encoded(array, code).data)
    return path
