"""Hypothesis strategies for property tests of structured low rank.

:func:`matrices` (finite real matrices or stacks), :func:`layouts` (valid
:class:`~blocklowrank.BlockLayout` objects, drawn as
:func:`~blocklowrank.testing.generators.random_layout` draws them) and
:func:`planted_matrices` (``(X, info)`` pairs of
:func:`~blocklowrank.testing.generators.planted_matrix`). This is the one module
of blocklowrank that imports hypothesis (the ``test`` extra).

Examples
--------
A property test: on a planted K x K block-low-rank matrix,
:class:`~blocklowrank.BlockLowRank` at the planted ranks recovers it to noise level.

>>> import numpy as np
>>> from hypothesis import given, settings
>>> from blocklowrank import BlockLowRank
>>> from blocklowrank.testing.strategies import planted_matrices
>>> @settings(max_examples=15, deadline=None, derandomize=True, database=None)
... @given(planted_matrices(structures=("block", "shared_basis"), noise=0.05))
... def test_recovers_planted_blocks(planted):
...     X, info = planted
...     est = BlockLowRank(n_blocks=info.layout.n_blocks, rank=info.layout.ranks,
...                        svd_solver="full").fit(X)
...     scale = np.linalg.norm(info.clean)
...     # never farther from X than the planted matrix is (Eckart-Young per block)
...     assert np.linalg.norm(X - est.reconstruct()) <= info.noise * scale * (1 + 1e-6)
...     # hence within twice the noise of the clean matrix
...     assert np.linalg.norm(est.reconstruct() - info.clean) <= 2.001 * info.noise * scale
>>> test_recovers_planted_blocks()
"""

from __future__ import annotations

import numbers

import numpy as np

from .._extras import require
from .generators import (
    _check_dtype,
    _check_side_bounds,
    _draw_layout,
    _LayoutOptions,
    _planter,
    planted_matrix,
    planted_structures,
)

st = require("hypothesis.strategies")
hnp = require("hypothesis.extra.numpy")

__all__ = ["matrices", "layouts", "planted_matrices"]


def _shapes(shape, min_side, max_side):
    if shape is None:
        _check_side_bounds(min_side, max_side)
        side = st.integers(min_side, max_side)
        return st.tuples(side, side)
    if isinstance(shape, tuple):
        return st.just(tuple(int(s) for s in shape))
    return shape  # a strategy


def _element_strategy(dtype, max_abs):
    """Zero, or a value with magnitude in [max_abs * 1e-3, max_abs] of either sign."""
    width = 32 if dtype == np.float32 else 64
    lo, hi = (float(np.dtype(dtype).type(v)) for v in (max_abs * 1e-3, max_abs))
    mag = st.floats(lo, hi, width=width, allow_subnormal=False)
    return st.one_of(st.just(0.0), mag, mag.map(lambda v: -v))


def matrices(
    shape=None, *, min_side=1, max_side=12, dtype=np.float64, elements="floats", max_abs=100.0, batch_shape=()
):
    """Hypothesis strategy for finite real matrices (or stacks of them).

    Parameters
    ----------
    shape : (int, int) or strategy, optional
        Matrix shape; drawn with sides in ``[min_side, max_side]`` if None.
    min_side, max_side : int, default=1, 12
    dtype : {np.float64, np.float32}, default=np.float64
    elements : {"floats", "gaussian"} or strategy, default="floats"
        ``"floats"``: entry by entry, each zero or of magnitude in
        ``[max_abs / 1000, max_abs]`` (so shrinking finds zero rows, repeated
        entries and tied singular values, without under/overflow);
        ``"gaussian"``: a drawn seed fills the matrix with standard normal
        entries times ``max_abs`` (distinct singular values almost surely;
        use it when a property needs a unique truncated SVD); or any
        hypothesis strategy of floats.
    max_abs : float, default=100.0
    batch_shape : tuple or strategy, default=()
        Leading stack dimensions, e.g. ``(3,)`` for a stack of 3 matrices.

    Returns
    -------
    strategy of ndarray of shape batch_shape + (m, n)

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, derandomize=True, database=None)
    ... @given(matrices(max_side=5, dtype=np.float32))
    ... def check(X):
    ...     assert X.dtype == np.float32 and X.ndim == 2 and np.isfinite(X).all()
    >>> check()
    """
    dt = _check_dtype(dtype)
    shapes = _shapes(shape, min_side, max_side)
    batches = st.just(tuple(batch_shape)) if isinstance(batch_shape, tuple) else batch_shape
    if isinstance(elements, str) and elements not in ("floats", "gaussian"):
        raise ValueError(f"elements must be 'floats', 'gaussian' or a strategy, got {elements!r}")

    @st.composite
    def _matrices(draw):
        full = tuple(draw(batches)) + tuple(draw(shapes))
        if isinstance(elements, str) and elements == "gaussian":
            seed = draw(st.integers(0, 2**32 - 1))
            return (np.random.default_rng(seed).standard_normal(full) * max_abs).astype(dt)
        el = _element_strategy(dt, float(max_abs)) if isinstance(elements, str) else elements
        return draw(hnp.arrays(dt, full, elements=el))

    return _matrices()


def layouts(shape=None, *, min_side=1, max_side=12, **options):
    """Hypothesis strategy for valid :class:`~blocklowrank.BlockLayout` objects.

    Parameters
    ----------
    shape : (int, int) or strategy, optional
        Matrix shape (or a strategy of ``(m, n)`` pairs); drawn with sides in
        ``[min_side, max_side]`` if None.
    min_side, max_side : int, default=1, 12
    **options
        ``patterns``, ``max_blocks``, ``cuts``, ``with_ranks``, ``min_rank``,
        ``max_rank``, ``square_grid``, ``uniform_rank``: as in
        :func:`~blocklowrank.testing.generators.random_layout`.

    Returns
    -------
    strategy of BlockLayout

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=10, derandomize=True, database=None)
    ... @given(layouts(shape=(9, 6), patterns=("diagonal",), cuts="random"))
    ... def check(lay):
    ...     assert lay.pattern in ("diagonal", "full")  # a 1 x 1 grid is both
    ...     assert lay.n_active == lay.n_blocks[0] and sum(lay.row_sizes) == 9
    ...     assert (lay.ranks[lay.active] >= 1).all()
    >>> check()
    """
    shapes, options = _shapes(shape, min_side, max_side), _LayoutOptions(**options)

    @st.composite
    def _layouts(draw):
        return _draw_layout(lambda lo, hi: draw(st.integers(lo, hi)), tuple(draw(shapes)), options)

    return _layouts()


def planted_matrices(
    shape=None, *, structures=None, max_blocks=3, max_rank=3, noise=0.0, min_side=2, max_side=16, dtype=np.float64
):
    """Hypothesis strategy for ``(X, info)`` pairs from :func:`~blocklowrank.testing.generators.planted_matrix`.

    Structure, grid, per-block ranks (one rank for structures that need it,
    such as ``"shared_basis"``) and the seed are drawn; the numbers come from
    ``planted_matrix``.

    Parameters
    ----------
    shape : (int, int) or strategy, optional
        Drawn with sides in ``[min_side, max_side]`` if None.
    structures : tuple of str, optional
        Registered structures to plant; default every one that can be
        (:func:`~blocklowrank.testing.generators.planted_structures`).
    max_blocks : int, default=3
        Largest number of block-rows / block-columns.
    max_rank : int, default=3
        Largest planted rank of a block (also capped by the block's sides).
    noise : float or strategy of floats, default=0.0
        Relative noise level.
    min_side, max_side : int, default=2, 16
    dtype : {np.float64, np.float32}, default=np.float64

    Returns
    -------
    strategy of (ndarray, PlantedInfo)
    """
    _check_dtype(dtype)
    structures = planted_structures() if structures is None else tuple(structures)
    if not structures or any(s not in planted_structures() for s in structures):
        raise ValueError(f"structures must be a non-empty subset of {planted_structures()}, got {structures!r}")
    planters = [_planter(s) for s in structures]
    shapes = _shapes(shape, min_side, max_side)
    noises = noise if not isinstance(noise, numbers.Real) else st.just(float(noise))

    @st.composite
    def _planted(draw):
        (m, n), (s, planter) = draw(shapes), draw(st.sampled_from(planters))
        if s.fixed_blocks:
            lay = s.layout((m, n), s.fixed_blocks)
        else:
            kr, kc = draw(st.integers(1, min(m, max_blocks))), draw(st.integers(1, min(n, max_blocks)))
            try:
                lay = s.layout((m, n), (kr, kc))
            except ValueError:  # a structure with square grids only (diagonal blocks)
                lay = s.layout((m, n), min(kr, kc))
        cap = np.minimum(lay.max_ranks, max_rank)
        if planter.uniform_rank:
            ranks = draw(st.integers(1, int(cap[lay.active].min())))
        else:
            ranks = np.zeros(lay.n_blocks, dtype=np.int64)
            for i, j in zip(*np.nonzero(lay.active)):
                ranks[i, j] = draw(st.integers(1, int(cap[i, j])))
        seed = draw(st.integers(0, 2**32 - 1))
        return planted_matrix(
            layout=lay.with_ranks(ranks), structure=s.name, noise=draw(noises), random_state=seed, dtype=dtype
        )

    return _planted()
