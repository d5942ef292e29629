"""The registry of structures: each one declared once, everything else iterates over it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Structure", "register", "unregister", "registered", "get_structure", "structure_names", "structures"]


@dataclass(frozen=True, eq=False)
class Structure:
    """One structure of the library: how it is laid out, counted, matched to a budget and fitted.

    Attributes
    ----------
    name : str
        The one spelling used everywhere (``approximate(method=...)``,
        ``count_params``, ``match_budget``, the CLI, records, files).
    label : str
        Its name in the literature (``"LoRA"``, ``"MELoRA"``, ...).
    summary : str
        One line: the form of the approximation.
    layout : callable
        ``layout(shape, n_blocks=1) -> BlockLayout`` without ranks: the grid
        and its active blocks.
    count : callable
        ``count(shape, *, n_blocks=1, rank, **extra) -> int``: the exact
        parameter count of a configuration (raises for an invalid one).
    budget_rule : BudgetRule
        The budget -> configuration rule (see :class:`BudgetRule`).
    fit : callable
        ``fit(X, *, n_blocks, rank, ..., **options) -> Approximation``.
    estimator : type
        Its scikit-learn estimator (a :class:`~blocklowrank.estimators.StructuredEstimator`).
    spectral : bool
        True for pure layout structures (independent truncated SVDs per
        block): the error of any rank choice follows from the blocks'
        singular values, and budget-optimal per-block ranks exist.
    paper : bool
        One of the paper's three structures (the default selection of the
        budget tools).
    extra : tuple of str
        Configuration keys beyond ``n_blocks`` and ``rank`` (e.g.
        ``("global_rank",)``); they become record columns.
    fixed_blocks : int or None
        The one grid size a structure has (1 for global LoRA), else None.
    min_default_blocks : int
        Smallest grid size tried by default by the budget tools.
    peft : str or None
        The PEFT adapter type it converts to exactly ("LORA", "GRALORA"), if any.
    metric : bool
        Whether its ``fit`` takes ``input_gram``, ``output_gram`` and
        ``gram_damping`` (fits in a data metric; :func:`layout_structure` gives
        them to every layout structure). :func:`~blocklowrank.approximate`
        refuses a Gram for a structure without.
    options : tuple of str
        Options of its ``fit`` the budget tools pass on (``max_iter``, ``tol``, ...).
    """

    name: str
    label: str
    summary: str
    layout: Callable
    count: Callable
    budget_rule: object
    fit: Callable
    estimator: type
    spectral: bool = False
    paper: bool = False
    extra: tuple = ()
    fixed_blocks: object = None
    min_default_blocks: int = 2
    peft: object = None
    options: tuple = field(default=())
    metric: bool = False

    def __repr__(self):
        return f"Structure({self.name!r}, {self.label})"


_REGISTRY: dict = {}


def register(structure, *, replace=False):
    """Add a structure to the registry (``replace=True`` to redefine a name)."""
    if not isinstance(structure, Structure):
        raise TypeError(f"expected a Structure, got {type(structure).__name__}")
    if structure.name in _REGISTRY and not replace:
        raise ValueError(f"a structure named {structure.name!r} is already registered")
    _REGISTRY[structure.name] = structure
    return structure


def unregister(name):
    """Remove a structure from the registry."""
    get_structure(name)
    del _REGISTRY[name]


@contextlib.contextmanager
def registered(structure):
    """Register ``structure`` for the duration of a ``with`` block (tests, experiments)."""
    register(structure)
    try:
        yield structure
    finally:
        _REGISTRY.pop(structure.name, None)


def get_structure(name):
    """The registered structure called ``name`` (a clear error listing the names otherwise)."""
    if isinstance(name, Structure):
        return name
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"unknown method {name!r}: not a registered structure; the registered structures are {structure_names()}"
        )
    return _REGISTRY[name]


def structure_names(*, paper=None, spectral=None):
    """Registered names, in registration order (optionally only paper/spectral ones)."""
    return tuple(s.name for s in structures(paper=paper, spectral=spectral))


def structures(*, paper=None, spectral=None):
    """Registered structures, in registration order (optionally filtered)."""
    return tuple(
        s
        for s in _REGISTRY.values()
        if (paper is None or s.paper == paper) and (spectral is None or s.spectral == spectral)
    )
