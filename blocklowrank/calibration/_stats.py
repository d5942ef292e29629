"""A model's calibration statistics, their file, and the refusal of statistics that do not fit.

The file format is documented in :mod:`blocklowrank.calibration`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import scipy.linalg

from .._metric import GramFactor, max_asymmetry
from .._params import StrOptions, validate_params
from ..checkpoints import Checkpoint, CheckpointError, save_file
from ..checkpoints._safetensors import _load_json
from ._accumulator import GramAccumulator

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CalibrationError",
    "CalibrationStats",
    "save_statistics",
    "load_statistics",
    "check_statistics",
]

#: ``__metadata__["format"]`` of a statistics file.
FORMAT = "blocklowrank.calibration"
#: ``__metadata__["format_version"]`` this code writes and reads.
FORMAT_VERSION = "1"
_STORED = {"float64": "F64", "float32": "F32"}
_PRECISION = {"F64": np.float64, "F32": np.float32}
_STRINGS = ("model", "model_dtype", "loss")


class CalibrationError(ValueError):
    """Calibration statistics that cannot be used; the message names the file and the entry."""


def _where(source):
    return "calibration statistics (in memory)" if source is None else str(source)


def _rounding(precision):
    """Relative tolerance of the symmetry and PSD checks for entries stored in ``precision``.

    ``1e-8`` covers the float64 accumulation (the error of a sum of ``N``
    outer products is at most ``N · 2⁻⁵³ · trace`` in norm: 1e-8 allows 45
    million tokens even at that worst case); ``4 ε`` adds float32 storage
    (each entry rounded by a relative ``2⁻²⁴``: ``‖E‖ ≤ 2⁻²⁴ ‖G‖_F ≤ 2⁻²⁴ trace``).
    """
    return 1e-8 + 4 * float(np.finfo(precision).eps)


class _Entries(Mapping):
    """The ``G.*`` or ``H.*`` tensors of an open statistics file, read (as float64) when asked for."""

    def __init__(self, checkpoint, prefix, keys):
        self._ckpt, self._prefix, self._keys = checkpoint, prefix, list(keys)

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        name = self._prefix + key  # read chunk by chunk into a fresh array: no file page stays mapped
        return self._ckpt._read_into(name, np.empty(self._ckpt.info(name).shape, np.float64))

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def shape(self, key):
        return self._ckpt.info(self._prefix + key).shape

    def precision(self, key):
        return _PRECISION[self._ckpt.info(self._prefix + key).dtype]


def _shape(entries, key):
    return entries.shape(key) if isinstance(entries, _Entries) else np.shape(entries[key])


def _precision(entries, key):
    if isinstance(entries, _Entries):
        return entries.precision(key)
    dtype = np.asarray(entries[key]).dtype
    return dtype if dtype in (np.float32, np.float64) else np.float64


class CalibrationStats:
    """The calibration statistics of one model: ``G`` per input site, ``H`` per layer where collected.

    Parameters
    ----------
    input_grams : mapping of str to array_like
        Per input site, ``G = Σ x xᵀ / count`` (n_in × n_in) over the inputs
        the site's layers read.
    input_counts : mapping of str to int
        Per input site, the number of samples (tokens) behind ``G``, >= 1.
    layer_sites : mapping of str to str
        Layer (module path) -> its input site. Layers that read the same input
        (q/k/v, gate/up) share one site.
    output_grams : mapping of str to array_like, optional
        Per layer, ``H = Σ g gᵀ / count`` (n_out × n_out) of the loss
        gradient ``g`` at the layer's output.
    output_counts : mapping of str to int, optional
        Per layer with ``H``, its number of samples, >= 1.
    model, model_dtype, loss : str, optional
        The model (id or path), the dtype it ran in, the loss ``H`` is
        the gradient of ("" when no ``H`` was collected).
    info : dict, optional
        Anything else, JSON-serialisable (creation tool and version, token
        counts, the selection of layers).
    source : str or path-like, optional
        Where the statistics come from (the file), for messages.

    Raises
    ------
    CalibrationError
        If the parts do not fit together (an entry without a count or a
        count without an entry, a count that is not an integer >= 1, an
        ``H`` whose count is not its site's ``G`` count, a layer
        mapped to a missing site, a site no layer reads, ``H`` of an unknown
        layer, an entry that is not a non-empty square matrix), naming the entry.

    See Also
    --------
    save_statistics, load_statistics, check_statistics, GramAccumulator

    Notes
    -----
    Statistics read by :func:`load_statistics` stay in the file: each matrix
    is read when asked for. Call :func:`check_statistics` before use: it
    checks the numbers (finite, symmetric, positive semi-definite) and that
    they fit the model's layers.
    """

    def __init__(
        self,
        input_grams,
        input_counts,
        layer_sites,
        output_grams=None,
        output_counts=None,
        *,
        model="",
        model_dtype="",
        loss="",
        info=None,
        source=None,
    ):
        self.source = source
        self._psd_checked = set()  # entries check_statistics found PSD at the file's tolerance
        self._inputs = input_grams if isinstance(input_grams, _Entries) else dict(input_grams)
        self._outputs = output_grams if isinstance(output_grams, _Entries) else dict(output_grams or {})
        self.input_counts = dict(input_counts)
        self.output_counts = dict(output_counts or {})
        self.layer_sites = dict(layer_sites)
        self.model, self.model_dtype, self.loss = model, model_dtype, loss
        self.info = {} if info is None else info
        self._checkpoint = None
        self._check_structure()

    @classmethod
    def from_accumulators(cls, inputs, layer_sites, outputs=None, **metadata):
        """Statistics from :class:`GramAccumulator` objects: ``inputs`` per site, ``outputs`` per layer."""
        grams, counts = {}, {}
        for kind, accumulators in (("inputs", inputs), ("outputs", outputs or {})):
            for key, acc in accumulators.items():
                if not isinstance(acc, GramAccumulator):
                    raise TypeError(f"{kind}[{key!r}] must be a GramAccumulator, got {type(acc).__name__}")
                if not acc.count:
                    raise CalibrationError(f"{_where(None)}: {kind}[{key!r}]: zero samples were accumulated")
                grams.setdefault(kind, {})[key], counts.setdefault(kind, {})[key] = acc.gram, acc.count
        return cls(
            grams.get("inputs", {}),
            counts.get("inputs", {}),
            layer_sites,
            grams.get("outputs"),
            counts.get("outputs"),
            **metadata,
        )

    def _error(self, entry, problem):
        return CalibrationError(f"{_where(self.source)}: {entry}: {problem}")

    def _check_counts(self, counts, entries, prefix, what):
        listing = f"__metadata__[{what!r}]"
        for key in entries:
            if key not in counts:
                raise self._error(f"entry {prefix + key!r}", f"not listed in {listing}")
        for key, count in counts.items():
            if not isinstance(key, str) or key not in entries:
                raise self._error(f"{listing}[{key!r}]", f"points at no entry {prefix}{key}")
            if type(count) is not int or count < 0:
                raise self._error(f"{listing}[{key!r}]", f"a count must be an integer >= 1, got {count!r}")
            if count == 0:
                raise self._error(f"entry {prefix + key!r}", "zero samples (count 0): the statistics are undefined")
            shape = _shape(entries, key)
            if len(shape) != 2 or shape[0] != shape[1] or not shape[0]:
                raise self._error(f"entry {prefix + key!r}", f"must be a non-empty square matrix, got shape {shape}")

    def _check_structure(self):
        """Every entry listed with a count >= 1, every layer mapped to an entry, every site read by a layer."""
        self._check_counts(self.input_counts, self._inputs, "G.", "input_counts")
        self._check_counts(self.output_counts, self._outputs, "H.", "output_counts")
        for layer, site in self.layer_sites.items():
            if not (isinstance(layer, str) and isinstance(site, str)) or site not in self._inputs:
                raise self._error(f"__metadata__['layer_sites'][{layer!r}]", f"points at no entry G.{site}")
        unread = sorted(set(self._inputs) - set(self.layer_sites.values()))
        if unread:
            raise self._error(f"entry {'G.' + unread[0]!r}", "no layer reads this input site (layer_sites)")
        for layer in self._outputs:
            if layer not in self.layer_sites:
                raise self._error(f"entry {'H.' + layer!r}", "its layer is not in layer_sites")
            count, site = self.output_counts[layer], self.layer_sites[layer]
            if count != self.input_counts[site]:  # H is over the tokens G is over
                raise self._error(
                    f"__metadata__['output_counts'][{layer!r}]",
                    f"{count} samples, but G.{site}, over the same tokens, has {self.input_counts[site]}",
                )
        for name in _STRINGS:
            if not isinstance(getattr(self, name), str):
                raise self._error(f"__metadata__[{name!r}]", f"must be a string, got {getattr(self, name)!r}")
        try:
            json.dumps(self.info, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise self._error("__metadata__['info']", f"must be JSON-serialisable ({exc})") from None
        if not isinstance(self.info, dict):
            raise self._error("__metadata__['info']", f"must be a JSON object, got {type(self.info).__name__}")

    @property
    def layers(self):
        """The layers (module paths) covered, in order."""
        return list(self.layer_sites)

    @property
    def sites(self):
        """The input sites, in order."""
        return list(self._inputs)

    def site_of(self, layer):
        """The input site ``layer`` reads."""
        try:
            return self.layer_sites[layer]
        except KeyError:
            raise KeyError(f"{_where(self.source)} has no statistics for layer {layer!r}") from None

    def site_gram(self, site):
        """``G`` of an input site (float64)."""
        return np.asarray(self._inputs[site], dtype=np.float64)

    def input_gram(self, layer):
        """``G`` of the input site ``layer`` reads (float64, n_in × n_in)."""
        return self.site_gram(self.site_of(layer))

    def input_count(self, layer):
        """The number of samples behind ``input_gram(layer)``."""
        return self.input_counts[self.site_of(layer)]

    def output_gram(self, layer):
        """``H`` of ``layer`` (float64, n_out × n_out), or None where it was not collected."""
        self.site_of(layer)
        return np.asarray(self._outputs[layer], dtype=np.float64) if layer in self._outputs else None

    def input_factor(self, layer, damping=None):
        """The :class:`~blocklowrank.GramFactor` of the site ``layer`` reads, for a fit in its metric.

        ``damping``: ``gram_damping`` (default :data:`~blocklowrank.GRAM_DAMPING`).
        The factor allows the rounding of the file's precision (the tolerance
        of :func:`check_statistics`). Build one per input site and pass it to
        every layer reading that site (the factorisation is paid once).
        """
        site = self.site_of(layer)
        return self._factor(self._inputs, site, "G.", damping)

    def output_factor(self, layer, damping=None):
        """The :class:`~blocklowrank.GramFactor` of ``layer``'s ``H`` (as :meth:`input_factor`), or None."""
        self.site_of(layer)
        return self._factor(self._outputs, layer, "H.", damping) if layer in self._outputs else None

    def _factor(self, entries, key, prefix, damping):
        name = f"{_where(self.source)}: entry {prefix + key!r}"
        tol = _rounding(_precision(entries, key))
        checked = prefix + key in self._psd_checked  # by check_statistics, at this tolerance
        fresh = isinstance(entries, _Entries)  # read from the file into a new array: the factor may take it over
        G = np.asarray(entries[key], dtype=np.float64)
        return GramFactor(G, damping=damping, name=name, psd_tol=tol, psd_checked=checked, copy=not fresh)

    @property
    def output_layers(self):
        """The layers with an ``H``."""
        return list(self._outputs)

    def close(self):
        """Close the file the statistics are read from (if any)."""
        if self._checkpoint is not None:
            self._checkpoint.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return (
            f"CalibrationStats({len(self.layer_sites)} layers, {len(self._inputs)} input sites, "
            f"H for {len(self._outputs)} layers, model={self.model!r})"
        )


@validate_params(dtype=[StrOptions(set(_STORED))], overwrite=["boolean"])
def save_statistics(path, stats, *, dtype="float64", overwrite=False):
    """Write calibration statistics to one safetensors file, atomically.

    Parameters
    ----------
    path : str or path-like
    stats : CalibrationStats
    dtype : {"float64", "float32"}, default="float64"
        Precision of the stored matrices. float32 halves the file; every
        check still holds (with a tolerance for its rounding), but a ``G``
        whose eigenvalues span more than about 7 decades loses its smallest
        directions.
    overwrite : bool, default=False
        Replace an existing file; without it an existing ``path`` is refused.

    Returns
    -------
    path : pathlib.Path

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    CalibrationError
        If a matrix holds NaN or infinite values (nothing is written).
    """
    if not isinstance(stats, CalibrationStats):
        raise TypeError(f"stats must be CalibrationStats, got {type(stats).__name__}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    tensors = {f"G.{site}": stats.site_gram(site) for site in stats.sites}
    tensors.update({f"H.{layer}": stats.output_gram(layer) for layer in stats.output_layers})
    for name, array in tensors.items():
        if not np.isfinite(array).all():
            raise stats._error(f"entry {name!r}", "holds NaN or infinite values; nothing was written")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layer_sites": json.dumps(stats.layer_sites),
        "input_counts": json.dumps(stats.input_counts),
        "output_counts": json.dumps(stats.output_counts),
        "info": json.dumps(stats.info, allow_nan=False),
        **{name: getattr(stats, name) for name in _STRINGS},
    }
    return save_file(path, tensors, metadata=metadata, dtypes=_STORED[dtype])


def _metadata_json(path, metadata, key, default):
    if key not in metadata:
        if default is None:
            raise CalibrationError(f"{path}: __metadata__[{key!r}]: missing")
        return default
    try:
        value = _load_json(metadata[key].encode("utf-8"), path, f"metadata {key!r}")
    except CheckpointError as exc:
        raise CalibrationError(str(exc)) from None
    if not isinstance(value, dict):
        raise CalibrationError(f"{path}: __metadata__[{key!r}]: must be a JSON object, got {type(value).__name__}")
    return value


def load_statistics(path):
    """Open a statistics file written by :func:`save_statistics` (matrices are read when used).

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    stats : CalibrationStats
        Backed by the open file: close it with ``stats.close()`` or use it in
        a ``with`` block. Check it against the model with :func:`check_statistics`.

    Raises
    ------
    CalibrationError
        For a file that is not a readable statistics file of this format
        (truncated, forged or inconsistent metadata, entries not listed,
        matrices of another type), naming the file and the entry.
    FileNotFoundError
        If ``path`` does not exist.
    """
    path = Path(path)
    if path.is_dir():
        raise CalibrationError(f"{path}: is a folder; pass the statistics file itself")
    try:
        ckpt = Checkpoint(path)
    except CheckpointError as exc:
        raise CalibrationError(str(exc)) from None
    try:
        return _from_checkpoint(path, ckpt)
    except BaseException:
        ckpt.close()
        raise


def _from_checkpoint(path, ckpt):
    metadata = ckpt.metadata
    if metadata.get("format") != FORMAT:
        raise CalibrationError(
            f"{path}: __metadata__['format']: {metadata.get('format')!r} is not {FORMAT!r}; "
            "not a calibration statistics file"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CalibrationError(
            f"{path}: __metadata__['format_version']: {metadata.get('format_version')!r} is not "
            f"{FORMAT_VERSION!r}, the version this blocklowrank reads"
        )
    entries = {"G.": [], "H.": []}
    for name in ckpt.names():
        prefix = name[:2]
        if prefix not in entries or len(name) == 2:
            raise CalibrationError(f"{path}: entry {name!r}: neither G.<site> nor H.<layer>; not of this format")
        if ckpt.info(name).dtype not in _PRECISION:
            raise CalibrationError(f"{path}: entry {name!r}: stored as {ckpt.info(name).dtype}, not F64 or F32")
        entries[prefix].append(name[2:])
    input_counts = _metadata_json(path, metadata, "input_counts", None)
    output_counts = _metadata_json(path, metadata, "output_counts", {})
    for keys, counts in ((entries["G."], input_counts), (entries["H."], output_counts)):
        order = {key: i for i, key in enumerate(counts)}
        keys.sort(key=lambda key: order.get(key, len(order)))  # the model's order, as listed
    stats = CalibrationStats(
        _Entries(ckpt, "G.", entries["G."]),
        input_counts,
        _metadata_json(path, metadata, "layer_sites", None),
        _Entries(ckpt, "H.", entries["H."]),
        output_counts,
        info=_metadata_json(path, metadata, "info", {}),
        source=path,
        **{name: metadata.get(name, "") for name in _STRINGS},
    )
    stats._checkpoint = ckpt
    return stats


def _check_numbers(stats, entries, key, prefix, factor=True):
    """Refuse a matrix that is not finite, not symmetric or not PSD beyond rounding."""
    entry = f"entry {prefix + key!r}"
    M = np.asarray(entries[key], dtype=np.float64)
    if not np.isfinite(M).all():
        raise stats._error(entry, "holds NaN or infinite values")
    rtol = _rounding(_precision(entries, key))
    diag = np.diagonal(M)
    scale = float(np.abs(diag).max())
    asymmetry = max_asymmetry(M)  # by tiles: no n x n temporary beside M
    if asymmetry > rtol * scale or (scale == 0 and asymmetry > 0):
        raise stats._error(entry, f"not symmetric (|M - Mᵀ| up to {asymmetry:.3g}, largest diagonal {scale:.3g})")
    trace = float(diag.sum())
    if diag.min() < 0 or (trace == 0 and np.any(M)):
        raise stats._error(entry, "not positive semi-definite (a negative diagonal, or off-diagonals on a zero one)")
    if trace == 0:
        raise stats._error(entry, "all zero: no calibration signal, a fit in its metric would be undefined")
    if not factor:
        return
    shifted = M.copy()  # Cholesky succeeds iff λ_min(M) > -rtol·trace (to rounding)
    shifted[np.diag_indices_from(shifted)] += rtol * trace
    try:
        scipy.linalg.cholesky(shifted, lower=True, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        smallest = float(scipy.linalg.eigvalsh(M, subset_by_index=[0, 0], check_finite=False)[0])
        raise stats._error(
            entry, f"not positive semi-definite: eigenvalue {smallest:.3g} below -{rtol:.1e} x trace ({trace:.3g})"
        ) from None
    stats._psd_checked.add(prefix + key)  # its factor need not check it again


def _shape_pair(layer, shape):
    try:
        out, inn = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise TypeError(f"layers[{layer!r}] must be a shape (out, in), got {shape!r}") from None
    return out, inn


@validate_params(require_output=["boolean"], factor=["boolean"])
def check_statistics(stats, layers, *, require_output=False, factor=True):
    """Refuse statistics that do not fit the model's layers, before anything is written.

    Parameters
    ----------
    stats : CalibrationStats
    layers : mapping of str to (int, int)
        Module path -> shape ``(out, in)`` of the layer's map ``y = W x``
        (GPT-2's ``Conv1D`` stores ``W`` as (in, out): pass (out, in)).
    require_output : bool, default=False
        Also require ``H`` for every layer.
    factor : bool, default=True
        Check positive semi-definiteness here (one Cholesky factorisation of
        every matrix). False leaves that one check to the
        :class:`~blocklowrank.GramFactor` a fit in the metric builds of each
        matrix (:meth:`CalibrationStats.input_factor`), which refuses an
        indefinite one at the same tolerance in one line naming the file and
        the entry: for a caller that writes nothing before its fits end (an
        extraction), it saves a factorisation per input site.

    Returns
    -------
    stats : CalibrationStats
        The same object, checked.

    Raises
    ------
    CalibrationError
        One line naming the file and the entry: a layer without an input site
        (or without ``H`` when required), a ``G`` of the wrong size for the
        layer's inputs or an ``H`` for its outputs, a matrix with NaN/inf, all
        zero (no signal to weight a fit by), not symmetric, or with an eigenvalue below ``-rtol · trace`` (``rtol`` =
        1e-8, plus 4.8e-7 for float32 files: rounding, never data).
    """
    if not isinstance(stats, CalibrationStats):
        raise TypeError(f"stats must be CalibrationStats, got {type(stats).__name__}")
    if not isinstance(layers, Mapping):
        raise TypeError(f"layers must map module paths to (out, in) shapes, got {type(layers).__name__}")
    checked = set()
    for layer, shape in layers.items():
        out, inn = _shape_pair(layer, shape)
        if layer not in stats.layer_sites:
            some = ", ".join(list(stats.layer_sites)[:3])
            raise stats._error(
                f"layer {layer!r}", f"no input statistics (layer_sites covers {len(stats.layer_sites)}: {some}, ...)"
            )
        site = stats.layer_sites[layer]
        todo = [(stats._inputs, site, "G.", inn, "reads")]
        if layer in stats._outputs:
            todo.append((stats._outputs, layer, "H.", out, "writes"))
        elif require_output:
            raise stats._error(f"layer {layer!r}", "no output statistics H (collect them with output_grams)")
        for entries, key, prefix, size, verb in todo:
            got = tuple(_shape(entries, key))
            if got != (size, size):
                raise stats._error(
                    f"entry {prefix + key!r}",
                    f"shape {got}, but layer {layer!r} {verb} {size} features ({size}x{size})",
                )
            if (prefix, key) not in checked:
                _check_numbers(stats, entries, key, prefix, factor)
                checked.add((prefix, key))
    return stats
