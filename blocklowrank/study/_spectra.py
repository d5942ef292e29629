"""Spectra of the study's layers: effective rank, per-partition singular values, their files and curves."""

from __future__ import annotations

import numpy as np

from .._engine import BlockSpectra, block_spectra
from .._io import atomic_write
from ..structures import get_structure

#: LoRA-equivalent ranks of the error-vs-budget curves (those below a layer's dense size).
CURVE_RANKS = (1, 2, 4, 8, 16, 32, 64)


def effective_rank(singular_values):
    """Entropy effective rank (Roy & Vetterli): ``exp(H(p))`` with ``p = sigma / sum(sigma)``.

    Examples
    --------
    >>> effective_rank([3.0, 3.0, 3.0, 0.0]), effective_rank([0.0, 0.0])
    (3.0, 0.0)
    """
    s = np.abs(np.asarray(singular_values, dtype=np.float64))
    total = s.sum()
    if not total > 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def _partitions(names, shape, ks):
    """``(structure, K)`` of every layout structure among ``names`` valid for ``shape``."""
    out = []
    for name in names:
        s = get_structure(name)
        if s.spectral:
            out += [(name, K) for K in ([s.fixed_blocks] if s.fixed_blocks else ks) if K <= min(shape)]
    return out


def _spectra_arrays(delta, names, ks, metric=None):
    """Singular values and block energies of every layout partition, as npz-ready arrays; in a data metric
    (``metric``: the Grams, as :func:`~blocklowrank.block_spectra` takes them) also the energy no rank
    captures (``F``) and whether the spectra give the fits' errors exactly (``X``)."""
    arrays = {}
    for name, K in _partitions(names, delta.shape, ks):
        sp = block_spectra(delta, get_structure(name).layout(delta.shape, K), **(metric or {}))
        arrays[f"{name}|{K}|E"] = sp.block_energy
        arrays.update({f"{name}|{K}|{i}|{j}": v for (i, j), v in sp.values.items()})
        if metric:
            arrays[f"{name}|{K}|F"], arrays[f"{name}|{K}|X"] = np.asarray(sp.fixed_loss), np.asarray(sp.exact)
    return arrays


def _load_spectra(arrays, name, K, shape):
    """The :class:`BlockSpectra` of partition ``(name, K)`` from arrays or an npz file (None if absent)."""
    prefix = f"{name}|{K}|"
    if not isinstance(arrays, dict):
        with np.load(arrays) as z:
            arrays = {key: z[key] for key in z.files if key.startswith(prefix)}
    if prefix + "E" not in arrays:
        return None
    lay = get_structure(name).layout(tuple(shape), K)
    values = {
        tuple(int(t) for t in key[len(prefix) :].split("|")): np.asarray(arrays[key])
        for key in arrays
        if key.startswith(prefix) and key[len(prefix) :] not in ("E", "F", "X")
    }
    if prefix + "F" in arrays:  # in a data metric
        fixed, exact = float(arrays[prefix + "F"]), bool(arrays[prefix + "X"])
        return BlockSpectra(lay, values, np.asarray(arrays[prefix + "E"]), None, fixed, exact)
    return BlockSpectra(lay, values, np.asarray(arrays[prefix + "E"]))


def _curve(arrays, names, ks, shape):
    """Error of each layout structure (best grid size, optimal ranks) at the curve's budget ranks."""
    m, n = shape
    curve = {}
    for name, K in _partitions(names, shape, ks):
        sp = _load_spectra(arrays, name, K, shape)
        for r in CURVE_RANKS:
            if r * (m + n) < m * n and r * (m + n) >= int(sp.layout.block_costs[sp.layout.active].min()):
                err = float(sp.error(sp.allocate(r * (m + n))[0]))
                prev = curve.setdefault(name, {}).get(r)
                curve[name][r] = err if prev is None else min(prev, err)
    return {name: sorted(pts.items()) for name, pts in curve.items()}


def _save_npz(path, arrays):
    """Write ``arrays`` to ``path`` atomically (a reader sees the whole file or none)."""
    with atomic_write(path) as f:
        np.savez(f, **arrays)
