"""One container for every fitted structure: :class:`StructuredFactors`.

(Over 600 lines: the container, the rules every conversion depends on and
its file format, in one place so that no rule is stated twice.)

Every fit of the library returns its factors in this one object, whatever the
structure: the :class:`~blocklowrank.layout.BlockLayout` (cuts, active blocks,
ranks, permutations), the per-block factors ``B_ij (m_i x r_ij)`` and
``A_ij (r_ij x n_j)`` stacked per group of equal-shaped blocks, an optional
global term ``(B_g, A_g)`` (hybrid) and optional shared bases ``(U, V, S)``
(BLAST, where block ``(i, j)`` is ``U_i diag(s_ij) V_j^T``).

The rules that every conversion depends on live here, once:

- **Coordinates.** All factors are in the layout's own (permuted) coordinates;
  :meth:`StructuredFactors.to_dense` puts rows and columns back in the original
  order, so a permuted fit densifies, saves and loads exactly.
- **dtype.** float32 stays float32, float16 becomes float32, and integers or
  booleans become float64 (an integer factor of 0.5 cannot exist, and an
  integer dense matrix would silently round).
- **Shapes.** Every array is checked against the layout when the container is
  built, so a wrong factor is an error, never a broadcast.

Files (:meth:`StructuredFactors.save`, :func:`load_factors`) are ``.npz`` (no
pickle), written atomically, and every array is checked against the stored
layout before use; every problem raises :class:`FactorsFileError`.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._io import atomic_write
from ._version import __version__
from .layout import BlockLayout

__all__ = ["StructuredFactors", "load_factors", "FactorsFileError", "FORMAT_NAME", "FORMAT_VERSION"]

#: Value of the ``format`` field of factors files.
FORMAT_NAME = "blocklowrank-factors"
#: Version of the file layout; bumped on any incompatible change of the keys.
FORMAT_VERSION = 1
KINDS = ("blocks", "hybrid", "shared_basis")

#: Output elements per ``np.matmul`` call in :func:`_assemble` (about 2 MB of float64).
_ASSEMBLE_ROWS = 1 << 18


class FactorsFileError(ValueError):
    """A factors file that cannot be read: damaged, forged, or of another version."""


@dataclass(frozen=True, eq=False)
class _Group:
    """The active blocks of one shape, stacked: ``B (..., g, m_i, k)``, ``A (..., g, k, n_j)``."""

    shape: tuple
    rows: np.ndarray
    cols: np.ndarray
    B: np.ndarray
    A: np.ndarray


def _float_dtype(arrays):
    dt = np.result_type(*arrays) if arrays else np.dtype(np.float64)
    if dt == np.float16:
        return np.dtype(np.float32)
    return dt if dt in (np.float32, np.float64) else np.dtype(np.float64)


def _as_array(a, what):
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{what} must be a real numeric array, got dtype {arr.dtype}")
    return arr


class StructuredFactors(Mapping):
    """Factors of a structured low-rank matrix (or of a stack of them).

    A read-only mapping from every active block ``(i, j)`` to its factors
    ``(B_ij, A_ij)``, plus the layout, the global term and the shared bases.

    Parameters
    ----------
    layout : BlockLayout
        Cuts, active blocks, per-block ranks (for a stack: the largest rank
        of each block over the stack) and permutations.
    factors : dict, optional
        ``{(i, j): (B_ij, A_ij)}`` for every active block, shapes
        ``(..., m_i, r_ij)`` and ``(..., r_ij, n_j)`` with ``r_ij`` the
        layout's rank. Not with ``shared``.
    global_factors : (array, array), optional
        ``(B_g, A_g)`` of shapes ``(..., m, r_g)`` and ``(..., r_g, n)``.
    shared : (list, list, array), optional
        ``(U, V, S)``: ``U_i (..., m_i, r)``, ``V_j (..., n_j, r)`` and
        ``S (..., K_rows, K_cols, r)``; block ``(i, j)`` is ``U_i diag(s_ij) V_j^T``.
        The layout must be a full grid of rank ``r``.
    structure : str, optional
        Name of the structure that produced the factors (registry name).
    ranks : array of int, optional
        Per-matrix ranks ``(..., K_rows, K_cols)`` of a stack whose matrices
        have different ranks (factors are zero-padded to the layout's).
    meta : dict, optional
        Free JSON-serialisable information (saved with the factors).

    Attributes
    ----------
    n_params : int or ndarray of int
        Exact parameter count (per matrix): independent block factors
        ``sum r_ij (m_i + n_j)``, plus ``r_g (m + n)`` for the global term; for
        shared bases ``r (m + n) + r K_rows K_cols`` instead of the blocks.

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank import BlockLayout
    >>> lay = BlockLayout.block((4, 4), 2, rank=1)
    >>> f = StructuredFactors(lay, {(i, j): (np.ones((2, 1)), np.ones((1, 2)))
    ...                             for i in range(2) for j in range(2)})
    >>> f.n_params, float(f.to_dense().sum())
    (16, 16.0)
    """

    def __init__(
        self,
        layout,
        factors=None,
        *,
        global_factors=None,
        shared=None,
        structure=None,
        ranks=None,
        meta=None,
        _groups=None,
    ):
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        self.layout = layout
        self.meta = dict(meta or {})
        arrays = []
        if shared is not None:
            if factors is not None or _groups is not None:
                raise ValueError("give either shared bases or per-block factors, not both")
            U, V, S = (
                [_as_array(u, f"U[{i}]") for i, u in enumerate(shared[0])],
                [_as_array(v, f"V[{j}]") for j, v in enumerate(shared[1])],
                _as_array(shared[2], "S"),
            )
            arrays += U + V + [S]
        elif _groups is None:
            if factors is None:
                raise ValueError("give the per-block factors (or shared bases)")
            factors = {k: (_as_array(B, f"B{k}"), _as_array(A, f"A{k}")) for k, (B, A) in dict(factors).items()}
            arrays += [a for pair in factors.values() for a in pair]
        else:
            arrays += [a for g in _groups for a in (g.B, g.A)]
        if global_factors is not None:
            global_factors = tuple(_as_array(a, n) for a, n in zip(global_factors, ("B_g", "A_g")))
            if len(global_factors) != 2:
                raise ValueError("global_factors must be a pair (B_g, A_g)")
            arrays += list(global_factors)
        self.dtype = _float_dtype(arrays)
        cast = lambda a: np.ascontiguousarray(a, dtype=self.dtype)  # noqa: E731
        batch = None
        if shared is not None:
            batch = self._check_shared(U, V, S)
            self.shared = ([cast(u) for u in U], [cast(v) for v in V], cast(S))
            _groups = self._groups_from_shared()
        else:
            self.shared = None
            if _groups is None:
                batch = self._check_blocks(factors)
                _groups = self._groups_from_dict({k: (cast(B), cast(A)) for k, (B, A) in factors.items()})
            else:
                _groups = [_Group(g.shape, g.rows, g.cols, cast(g.B), cast(g.A)) for g in _groups]
        if batch is None:
            batch = _groups[0].B.shape[:-3] if _groups else ()
        self.batch_shape = tuple(batch)
        self._groups = _groups
        self.global_factors = None
        if global_factors is not None:
            self._check_global(global_factors)
            self.global_factors = tuple(cast(a) for a in global_factors)
        if ranks is None:
            ranks = np.broadcast_to(layout.ranks, self.batch_shape + layout.n_blocks)
        ranks = np.asarray(ranks, dtype=np.int64)
        if ranks.shape != self.batch_shape + layout.n_blocks or np.any(ranks > layout.ranks):
            raise ValueError(
                f"ranks must have shape {self.batch_shape + layout.n_blocks} and stay within the layout's ranks"
            )
        self.ranks = ranks
        self.structure = structure

    # ------------------------------------------------------------------ checks
    def _check_blocks(self, factors):
        lay = self.layout
        want = {(int(i), int(j)) for i, j in zip(*np.nonzero(lay.active))}
        extra = sorted(set(factors) - want)
        if extra:
            raise ValueError(f"factors given for block {extra[0]}, which is not active in the layout")
        missing = sorted(want - set(factors))
        if missing:
            raise ValueError(f"factors are missing active block {missing[0]}")
        batch = None
        for key in sorted(want):
            B, A = factors[key]
            (mi, nj), r = lay.block_shape(*key), int(lay.ranks[key])
            bt = B.shape[:-2]
            if B.shape[-2:] != (mi, r) or A.shape != bt + (r, nj) or (batch is not None and bt != batch):
                raise ValueError(
                    f"block {key}: expected B of shape (..., {mi}, {r}) and A of shape (..., {r}, {nj}) "
                    f"with one stack shape, got {B.shape} and {A.shape}"
                )
            batch = bt
        return batch

    def _check_shared(self, U, V, S):
        lay = self.layout
        kr, kc = lay.n_blocks
        r = lay.uniform_rank
        if not lay.active.all() or r is None:
            raise ValueError("shared bases need a full grid with one rank on every block")
        if len(U) != kr or len(V) != kc:
            raise ValueError(f"shared bases need {kr} U and {kc} V matrices, got {len(U)} and {len(V)}")
        batch = S.shape[:-3]
        if S.shape != batch + (kr, kc, r):
            raise ValueError(f"S must have shape (..., {kr}, {kc}, {r}), got {S.shape}")
        for name, mats, sizes in (("U", U, lay.row_sizes), ("V", V, lay.col_sizes)):
            for t, (M, h) in enumerate(zip(mats, sizes)):
                if M.shape != batch + (h, r):
                    raise ValueError(f"{name}[{t}] must have shape {batch + (h, r)}, got {M.shape}")
        return batch

    def _check_global(self, gf):
        m, n = self.layout.shape
        B, A = gf
        bt = self.batch_shape
        if B.ndim < 2 or B.shape[:-1] != bt + (m,) or A.shape != bt + (B.shape[-1], n):
            raise ValueError(
                f"global factors must have shapes (..., {m}, r_g) and (..., r_g, {n}) with the "
                f"factors' stack shape {bt}, got {B.shape} and {A.shape}"
            )
        if B.shape[-1] > min(m, n):
            raise ValueError(f"global rank {B.shape[-1]} exceeds min(m, n) = {min(m, n)}")

    # ------------------------------------------------------------------ groups
    def _groups_from_dict(self, factors):
        out = []
        for shp, (ii, jj) in self.layout.groups().items():
            k = int(self.layout.ranks[ii, jj].max())
            Bs, As = [], []
            for i, j in zip(ii.tolist(), jj.tolist()):  # once, at construction
                B, A = factors[(i, j)]
                pad = k - B.shape[-1]
                Bs.append(np.concatenate([B, np.zeros(B.shape[:-1] + (pad,), B.dtype)], axis=-1) if pad else B)
                As.append(np.concatenate([A, np.zeros(A.shape[:-2] + (pad, shp[1]), A.dtype)], axis=-2) if pad else A)
            out.append(_Group(shp, ii, jj, np.stack(Bs, axis=-3), np.stack(As, axis=-3)))
        return out

    def _groups_from_shared(self):
        U, V, S = self.shared
        out = []
        for shp, (ii, jj) in self.layout.groups().items():
            Ug = np.stack([U[i] for i in ii.tolist()], axis=-3)  # (..., g, m_i, r)
            Vt = np.stack([np.swapaxes(V[j], -1, -2) for j in jj.tolist()], axis=-3)
            out.append(_Group(shp, ii, jj, Ug * S[..., ii, jj, None, :], Vt))
        return out

    # ------------------------------------------------------------------ mapping of blocks
    def _locate(self, key):
        i, j = key
        for g in self._groups:
            hit = np.nonzero((g.rows == i) & (g.cols == j))[0]
            if hit.size:
                return g, int(hit[0])
        raise KeyError(f"block {key} is not active in this layout")

    def __getitem__(self, key):
        """``(B_ij, A_ij)`` of block ``key`` (copies; a stack pads to its largest rank)."""
        g, t = self._locate(tuple(int(v) for v in key))
        r = int(self.ranks[(...,) + tuple(key)].max()) if self.ranks.size else 0
        return g.B[..., t, :, :r].copy(), g.A[..., t, :r, :].copy()

    def __iter__(self):
        for g in self._groups:
            yield from zip(g.rows.tolist(), g.cols.tolist())

    def __len__(self):
        return self.layout.n_active

    @property
    def factors(self):
        """``{(i, j): (B_ij, A_ij)}`` for every active block (a plain dict)."""
        return dict(self.items())

    # ------------------------------------------------------------------ properties
    @property
    def shape(self):
        return self.layout.shape

    @property
    def global_rank(self):
        return 0 if self.global_factors is None else int(self.global_factors[0].shape[-1])

    @property
    def kind(self):
        """ "shared_basis", "hybrid" or "blocks" (the file layout of the factors)."""
        if self.shared is not None:
            return "shared_basis"
        return "hybrid" if self.global_rank else "blocks"

    @property
    def n_params(self):
        lay = self.layout
        m, n = lay.shape
        if self.shared is not None:
            r = self.shared[2].shape[-1]
            return int(r * (m + n) + r * lay.n_blocks[0] * lay.n_blocks[1])
        count = (self.ranks * lay.block_costs).sum(axis=(-2, -1)) + self.global_rank * (m + n)
        return int(count) if not self.batch_shape else count

    def to_dense(self, dtype=None):
        """The dense matrix (or stack), in the original row and column order."""
        out = _assemble(self.layout, self._groups, self.batch_shape, self.dtype)
        if self.global_rank:
            Bg, Ag = self.global_factors
            out += Bg @ Ag
        if self.layout.permuted:
            out = self.layout.unpermute(out)
        if dtype is not None and np.dtype(dtype).kind != "f":
            raise TypeError(f"dtype must be a floating type, got {np.dtype(dtype)}")
        return out if dtype is None else out.astype(dtype, copy=False)

    def transpose(self):
        """The factors of the transposed matrix (or stack): block ``(j, i)`` holds ``(A_ij^T, B_ij^T)``.

        The layout is transposed with them (:meth:`BlockLayout.transpose`), so
        ``f.transpose().to_dense()`` equals ``f.to_dense()`` transposed (the
        last two axes), with the same parameter count.
        """
        sw = lambda a: np.swapaxes(a, -1, -2)  # noqa: E731
        gf = None if self.global_factors is None else (sw(self.global_factors[1]), sw(self.global_factors[0]))
        kw = dict(global_factors=gf, structure=self.structure, ranks=sw(self.ranks), meta=self.meta)
        if self.shared is not None:
            U, V, S = self.shared
            return StructuredFactors(self.layout.transpose(), shared=(V, U, np.swapaxes(S, -3, -2)), **kw)
        blocks = {}
        for g in self._groups:
            for t, (i, j) in enumerate(zip(g.rows.tolist(), g.cols.tolist())):
                r = int(self.layout.ranks[i, j])
                blocks[(j, i)] = (sw(g.A[..., t, :r, :]), sw(g.B[..., t, :, :r]))
        return StructuredFactors(self.layout.transpose(), blocks, **kw)

    # ------------------------------------------------------------------ codes (one matrix)
    def decoders(self):
        """Per block-row decoders ``D_i``, shape ``(..., K_rows, n_codes, n)``, in the layout's coordinates.

        A row of block-row ``i`` with codes ``z`` is ``z @ D_i``. Rows
        ``0..r_g-1`` are ``A_g``; then, for each active block ``(i, j)`` in
        column order, the rows of ``A_ij`` at block-column ``j``'s columns
        (zero rows pad block-rows with fewer codes). With shared bases,
        ``D_i = [diag(s_i1) V_1^T, ..., diag(s_iK) V_K^T]`` (``r`` codes).
        """
        lay = self.layout
        kr, _ = lay.n_blocks
        bt, n = self.batch_shape, lay.shape[1]
        if self.shared is not None:
            _, V, S = self.shared
            D = np.zeros(bt + (kr, S.shape[-1], n), dtype=self.dtype)
            for j, Vj in enumerate(V):
                D[..., lay.block_slice(0, j)[1]] = S[..., :, j, :, None] * np.swapaxes(Vj, -1, -2)[..., None, :, :]
            return D
        r_g = self.global_rank
        D = np.zeros(bt + (kr, max(r_g + int(lay.ranks.sum(axis=1).max()), 1), n), dtype=self.dtype)
        if r_g:
            D[..., :r_g, :] = self.global_factors[1][..., None, :, :]
        for (i, j), off, _ in self._offsets():
            A = self[(i, j)][1]
            D[..., i, off : off + A.shape[-2], lay.block_slice(i, j)[1]] = A
        return D

    def codes(self):
        """Codes of the fitted rows ``(..., m, n_codes)``: ``B_g`` and the ``B_ij`` (or ``U_i``)."""
        lay = self.layout
        if self.shared is not None:
            return np.concatenate(self.shared[0], axis=-2)
        r_g = self.global_rank
        Z = np.zeros(self.batch_shape + (lay.shape[0], self.decoders().shape[-2]), dtype=self.dtype)
        if r_g:
            Z[..., :r_g] = self.global_factors[0]
        for (i, j), off, _ in self._offsets():
            B = self[(i, j)][0]
            Z[..., lay.block_slice(i, j)[0], off : off + B.shape[-1]] = B
        return Z

    def with_codes(self, Z):
        """The same structure with left factors read from codes ``Z`` (the inverse of :meth:`codes`).

        Not for shared bases, whose codes are the bases ``U_i`` themselves.
        """
        lay = self.layout
        r_g = self.global_rank
        blocks = {
            (i, j): (Z[..., lay.block_slice(i, j)[0], off : off + r], self[(i, j)][1])
            for (i, j), off, r in self._offsets()
        }
        gf = None if self.global_factors is None else (Z[..., :r_g], self.global_factors[1])
        return StructuredFactors(lay, blocks, global_factors=gf, structure=self.structure, meta=self.meta)

    def _offsets(self):
        """``((i, j), code offset, rank)`` of every active block (the layout's ranks)."""
        lay = self.layout
        for i, j in self:
            yield (i, j), self.global_rank + int(lay.ranks[i, :j].sum()), int(lay.ranks[i, j])

    def __repr__(self):
        g = f", global_rank={self.global_rank}" if self.global_rank else ""
        name = self.structure or self.kind
        b = f", stack {self.batch_shape}" if self.batch_shape else ""
        n = self.n_params if not self.batch_shape else f"max {int(np.max(self.n_params))}"
        return f"StructuredFactors({name}: {self.layout.describe(params=False)}{g}, n_params={n}{b})"

    # ------------------------------------------------------------------ files
    def save(self, path):
        """Save to an ``.npz`` file (no pickle), atomically; ``.npz`` is appended when missing.

        Keys: ``format``, ``format_version``, ``library_version``, ``kind``,
        ``structure``, ``layout`` (JSON of :meth:`BlockLayout.to_dict`),
        ``meta`` (JSON) and the arrays ``B_i_j``/``A_i_j`` per active block,
        ``global_B``/``global_A``, or ``U_i``, ``V_j``, ``S``. Returns the path.
        """
        if self.batch_shape:
            raise ValueError("save the factors of one matrix, not of a stack")
        path = _npz_path(path)
        arrays = {
            "format": np.array(FORMAT_NAME),
            "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
            "library_version": np.array(__version__),
            "kind": np.array(self.kind),
            "structure": np.array(self.structure or ""),
            "layout": np.array(json.dumps(self.layout.to_dict())),
            "meta": np.array(json.dumps(self.meta, default=float)),
        }
        if self.shared is not None:
            U, V, S = self.shared
            arrays.update({f"U_{i}": u for i, u in enumerate(U)})
            arrays.update({f"V_{j}": v for j, v in enumerate(V)})
            arrays["S"] = S
        else:
            for (i, j), (B, A) in self.items():
                arrays[f"B_{i}_{j}"], arrays[f"A_{i}_{j}"] = B, A
            if self.global_rank:
                arrays["global_B"], arrays["global_A"] = self.global_factors
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as fh:
            np.savez(fh, **arrays)
        return path


def _npz_path(path):
    path = Path(os.fspath(path))
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def load_factors(path):
    """Load factors saved by :meth:`StructuredFactors.save` (``.npz`` appended when missing).

    Every array is checked against the stored layout (shape, dtype, finite
    values) before use.

    Raises
    ------
    FactorsFileError
        (a ValueError) naming the file and the problem: not a factors file,
        damaged, forged, another format or major library version.
    """
    p = _npz_path(path)
    if not p.exists() and Path(os.fspath(path)).exists():
        p = Path(os.fspath(path))
    if not p.is_file():
        raise FactorsFileError(f"{p}: no such factors file")
    if not zipfile.is_zipfile(p):
        raise FactorsFileError(f"{p} is not a blocklowrank factors file (not an .npz archive)")
    try:
        with np.load(p, allow_pickle=False) as z:
            return _read(z, p)
    except FactorsFileError:
        raise
    except (
        zipfile.BadZipFile,
        EOFError,
        OSError,
        KeyError,
        json.JSONDecodeError,
        ValueError,
        TypeError,
        IndexError,
        zipfile.LargeZipFile,
    ) as exc:
        raise FactorsFileError(f"{p}: damaged blocklowrank factors file ({type(exc).__name__}: {exc})") from None


def _scalar(z, key, kind, p):
    arr = z[key]
    if arr.shape != () or arr.dtype.kind != kind:
        raise FactorsFileError(f"{p}: field {key!r} has the wrong type ({arr.dtype}, shape {arr.shape})")
    return arr[()]


def _expected_shapes(kind, lay, z):
    """``{key: shape}`` of every array a file of this kind and layout must hold."""
    kr, kc = lay.n_blocks
    m, n = lay.shape
    if kind == "shared_basis":
        r = lay.uniform_rank or 0
        return {
            **{f"U_{i}": (h, r) for i, h in enumerate(lay.row_sizes)},
            **{f"V_{j}": (w, r) for j, w in enumerate(lay.col_sizes)},
            "S": (kr, kc, r),
        }
    out = {}
    for i, j in zip(*np.nonzero(lay.active)):
        (h, w), r = lay.block_shape(i, j), int(lay.ranks[i, j])
        out[f"B_{i}_{j}"], out[f"A_{i}_{j}"] = (h, r), (r, w)
    if kind == "hybrid":
        r_g = z["global_A"].shape[0] if "global_A" in z.files and z["global_A"].ndim == 2 else -1
        out["global_B"], out["global_A"] = (m, r_g), (r_g, n)
    return out


def _read(z, p):
    keys = set(z.files)
    if "format" not in keys or str(_scalar(z, "format", "U", p)) != FORMAT_NAME:
        raise FactorsFileError(
            f"{p} is not a blocklowrank factors file (no format field '{FORMAT_NAME}'); "
            "write one with StructuredFactors.save or blocklowrank.convert.save_factors"
        )
    missing = {"format_version", "library_version", "kind", "layout", "meta"} - keys
    if missing:
        raise FactorsFileError(f"{p} is a damaged blocklowrank factors file: missing {sorted(missing)}")
    fv = int(_scalar(z, "format_version", "i", p))
    wrote = str(_scalar(z, "library_version", "U", p))
    if fv != FORMAT_VERSION:
        raise FactorsFileError(
            f"{p} uses factors format version {fv} (written by blocklowrank {wrote}); "
            f"this blocklowrank {__version__} reads format version {FORMAT_VERSION} only"
        )
    if not wrote.split(".")[0].isdigit():
        raise FactorsFileError(f"{p}: library_version {wrote!r} is not a version number")
    if wrote.split(".")[0] != __version__.split(".")[0]:
        raise FactorsFileError(
            f"{p} was written by blocklowrank {wrote}, whose major version differs from "
            f"this blocklowrank {__version__}; load it with a {wrote.split('.')[0]}.x release"
        )
    kind = str(_scalar(z, "kind", "U", p))
    if kind not in KINDS:
        raise FactorsFileError(f"{p}: unknown kind of structure {kind!r}")
    lay = BlockLayout.from_dict(json.loads(str(_scalar(z, "layout", "U", p))))
    meta = json.loads(str(_scalar(z, "meta", "U", p)))
    if not isinstance(meta, dict):
        raise FactorsFileError(f"{p}: field 'meta' is not a JSON object")
    meta["library_version"] = wrote
    structure = str(_scalar(z, "structure", "U", p)) if "structure" in keys else ""
    shapes = _expected_shapes(kind, lay, z)
    extra = keys - set(shapes) - {"format", "format_version", "library_version", "kind", "layout", "meta", "structure"}
    if extra:
        raise FactorsFileError(f"{p}: unexpected array(s) {sorted(extra)} for its {kind} layout")

    def arr(key):
        if key not in keys:
            raise FactorsFileError(f"{p}: missing array {key!r} that the layout needs")
        a = z[key]
        if a.dtype not in (np.float32, np.float64) or not np.all(np.isfinite(a)):
            raise FactorsFileError(f"{p}: array {key!r} must hold finite float32/float64 values, got {a.dtype}")
        if a.shape != shapes[key]:
            raise FactorsFileError(f"{p}: array {key!r} has shape {a.shape}, the layout needs {shapes[key]}")
        return a

    kr, kc = lay.n_blocks
    kw = dict(structure=structure or None, meta=meta)
    try:
        if kind == "shared_basis":
            shared = ([arr(f"U_{i}") for i in range(kr)], [arr(f"V_{j}") for j in range(kc)], arr("S"))
            return StructuredFactors(lay, shared=shared, **kw)
        factors = {(int(i), int(j)): (arr(f"B_{i}_{j}"), arr(f"A_{i}_{j}")) for i, j in zip(*np.nonzero(lay.active))}
        gf = None
        if kind == "hybrid":
            A_g = arr("global_A")
            gf = (arr("global_B"), A_g)
        return StructuredFactors(lay, factors, global_factors=gf, **kw)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, FactorsFileError):
            raise
        raise FactorsFileError(f"{p}: arrays disagree with the stored layout: {exc}") from None


def _assemble(layout, groups, batch, dtype):
    """Dense ``X_hat`` from stacked block factors, written region by region into one array.

    A region whose blocks are all active gets ``B_ij A_ij`` straight from
    ``np.matmul(B, A, out=view)``, where ``view`` is the region of the output
    seen as a (k_r, k_c, m_i, n_j) stack: one call per region, no temporary
    stack of blocks, no scatter, no zero fill. Regions larger than
    ``_ASSEMBLE_ROWS`` output elements are cut into row bands so that each
    call's output stays in cache. Other regions (e.g. the diagonal pattern)
    are zeroed and get their active blocks assigned.
    """
    m, n = layout.shape
    out = np.empty(batch + (m, n), dtype=dtype)
    by_shape = {g.shape: g for g in groups}
    nbatch = int(np.prod(batch)) if batch else 1
    for r0, r1, c0, c1, bi0, bj0, kr, kc, shp in layout.regions():
        h, w = shp
        view = out[..., r0:r1, c0:c1].reshape(batch + (kr, h, kc, w)).swapaxes(-3, -2)
        g = by_shape.get(shp)
        nblk = kr * kc
        sel = np.zeros(0, dtype=int)
        if g is not None:
            inreg = (g.rows >= bi0) & (g.rows < bi0 + kr) & (g.cols >= bj0) & (g.cols < bj0 + kc)
            sel = np.nonzero(inreg)[0]
        if sel.size == nblk:  # every block active; groups are region-major, row-major inside
            whole = sel.size == g.rows.size
            B = g.B if whole else g.B[..., sel, :, :]
            A = g.A if whole else g.A[..., sel, :, :]
            B = B.reshape(batch + (kr, kc, h, B.shape[-1]))
            A = A.reshape(batch + (kr, kc, A.shape[-2], w))
            step = (
                h
                if nbatch * nblk * h * w <= _ASSEMBLE_ROWS
                else max(1, (_ASSEMBLE_ROWS * h) // (nbatch * nblk * h * w))
            )
            for i in range(0, h, step):
                np.matmul(B[..., i : i + step, :], A, out=view[..., i : i + step, :])
            continue
        out[..., r0:r1, c0:c1] = 0
        if sel.size:
            view[..., g.rows[sel] - bi0, g.cols[sel] - bj0, :, :] = np.matmul(g.B[..., sel, :, :], g.A[..., sel, :, :])
    return out
