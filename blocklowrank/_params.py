"""Every parameter rule of the library, declared once (the floor, beside ``_validation``).

A *rule* is a list of constraints in scikit-learn's vocabulary
(``sklearn.utils._param_validation``): a value is valid when it satisfies one
of them. :data:`PARAMS` maps a parameter name to its rule, and everything that
checks a parameter reads it from there:

- the estimators: :func:`estimator_constraints` builds ``_parameter_constraints``
  from ``__init__``'s signature (every parameter must have a rule);
- public functions: the :func:`validate_params` decorator checks the named
  arguments when the function is called, as scikit-learn's ``validate_params``
  serves ``randomized_svd``;
- a value that is not an argument (an entry of a pair, a dataclass field, a
  value reaching a shared helper): :func:`check`.

``None`` is valid exactly where the parameter's default is ``None`` (an
optional argument); the table holds the rule for the values that mean
something. Integers are never booleans or floats (``rank=True`` and
``rank=2.0`` are refused: scikit-learn's ``Interval(Integral, ...)`` accepts
``True``, :class:`Int` does not), and floats are finite and never booleans.
Errors are scikit-learn's :class:`InvalidParameterError` (a ``ValueError`` and
a ``TypeError``) and name the parameter and the function. Rules that depend on
the data (a rank above a block's side, a budget below the cheapest
configuration) are checked where the data is.

Why scikit-learn's (private) constraint classes rather than our own: the
estimators' ``_parameter_constraints`` is scikit-learn's protocol, so it is
written in scikit-learn's vocabulary (:class:`Int` and :class:`Float` are its
``Interval``; ``StrOptions``, ``"boolean"``, ``"array-like"``), and users get
the exception and the messages they know from scikit-learn. scikit-learn has
no constraint on the entries of a container, so :class:`Pair`, :class:`Seq`
and :class:`Keys` are ours (duck-typed like its constraints), and so are the
loop that applies a rule (:func:`check`, used by the estimators'
``_validate_params`` too) and the decorator: it never skips validation under
scikit-learn's ``skip_parameter_validation``, checks arguments that arrive
through ``**kwargs`` and hands the function normalised values. The names used
(``Interval``, ``StrOptions``, ``make_constraint``, ``InvalidParameterError``)
are private, so ``pyproject.toml`` bounds scikit-learn below the next minor
release not checked, and ``tests/test_params.py`` checks the installed version
is inside the bound and that the names behave as relied on here.
"""

from __future__ import annotations

import functools
import inspect
import re
from numbers import Integral, Real

import numpy as np
from sklearn.utils._param_validation import Interval, InvalidParameterError, StrOptions, make_constraint

__all__ = [
    "Int",
    "Float",
    "Pair",
    "Seq",
    "Keys",
    "StrOptions",
    "PARAMS",
    "SVD_OPTIONS",
    "SVD_SOLVERS",
    "PATTERNS",
    "FIRST_STEPS",
    "INITS",
    "check",
    "check_params",
    "estimator_constraints",
    "validate_params",
    "InvalidParameterError",
]


def _not_bool(val):
    return not isinstance(val, (bool, np.bool_))


class Int(Interval):
    """Integers in ``[low, high]`` (a bound None: unbounded); booleans refused."""

    def __init__(self, low=None, high=None):
        closed = {(True, True): "both", (True, False): "left", (False, True): "right", (False, False): "neither"}
        super().__init__(Integral, low, high, closed=closed[(low is not None, high is not None)])

    def is_satisfied_by(self, val):  # Interval's, without its NaN test (bounds here are inclusive)
        if isinstance(val, (bool, np.bool_)) or not isinstance(val, Integral):
            return False
        return (self.left is None or val >= self.left) and (self.right is None or val <= self.right)

    def normalise(self, val):
        return int(val)


class Float(Interval):
    """Real numbers in an interval (ints accepted, made floats); booleans, NaN and infinities refused."""

    def __init__(self, low=None, high=None, *, closed="both"):
        if (low is None and closed in ("left", "both")) or (high is None and closed in ("right", "both")):
            raise ValueError("an unbounded side must be open (infinities are not numbers here)")
        super().__init__(Real, low, high, closed=closed)

    def is_satisfied_by(self, val):
        return _not_bool(val) and super().is_satisfied_by(val)

    def normalise(self, val):
        return float(val)


def _sequence(val):
    return isinstance(val, (list, tuple, range, np.ndarray)) and np.ndim(val) == 1


class _Compound:
    """A constraint on the entries of a container (duck-typed like scikit-learn's)."""

    hidden = False

    def __init__(self, item):
        self.item = item

    def _entries_ok(self, val):
        return all(self.item.is_satisfied_by(v) for v in val)

    def explain(self, name, val):
        """Which entry breaks the rule (a suffix of the error message), or ''."""
        if not self._shape_ok(val):
            return ""
        for t, v in enumerate(val):
            if not self.item.is_satisfied_by(v):
                return f": {name}[{t}] = {v!r} is not {self.item}"
        return ""


class Pair(_Compound):
    """Two values, each satisfying ``item`` (a shape ``(m, n)``, a ``(rows, cols)`` grid)."""

    def _shape_ok(self, val):
        return _sequence(val) and len(val) == 2

    def is_satisfied_by(self, val):
        return self._shape_ok(val) and self._entries_ok(val)

    def normalise(self, val):
        return tuple(_normalise(self.item, v) for v in val)

    def __str__(self):
        return f"a pair whose entries are each {self.item}"


class Seq(_Compound):
    """A non-empty list, tuple, range or 1-D array whose entries each satisfy ``item``."""

    def _shape_ok(self, val):
        return _sequence(val) and len(val) > 0

    def is_satisfied_by(self, val):
        return self._shape_ok(val) and self._entries_ok(val)

    def normalise(self, val):
        return [_normalise(self.item, v) for v in val]

    def __str__(self):
        return f"a non-empty sequence whose entries are each {self.item}"


class Keys:
    """A dict whose keys are among ``names`` and whose values follow those names' rules."""

    hidden = False

    def __init__(self, *names):
        self.names = names

    def is_satisfied_by(self, val):
        return (
            isinstance(val, dict)
            and set(val) <= set(self.names)
            and all(_satisfied(_table_constraints(k), v) is not None for k, v in val.items())
        )

    def normalise(self, val):
        return {k: check(v, k) for k, v in val.items()}

    def __str__(self):
        return f"a dict with keys among {self.names}, each value valid for its key"


SVD_SOLVERS = ("auto", "full", "randomized")
#: Active-block patterns of a layout built from block counts.
PATTERNS = ("full", "diagonal")
#: Which part of the hybrid is fitted first; how the shared bases start.
FIRST_STEPS = ("global", "blocks")
INITS = ("svd", "random")
_PERM = ["array-like", StrOptions({"strided", "cluster"})]

#: The rule of every parameter, by name (variants of a name get their own key;
#: ``validate_params(rank="shared_rank")`` picks one).
PARAMS = {
    # the rank rule: one of rank, budget and max_error (the per-block array is checked against the layout)
    "rank": [Int(1), "array-like"],
    "budget": [Int(1)],
    "max_error": [Float(0, 1, closed="neither")],
    "cap_rank": ["boolean"],
    "shared_rank": [Int(1)],  # one rank shared by every block (BLAST)
    "layout_rank": [Int(0, 2**62), "array-like"],  # a layout's ranks: 0 builds a layout without ranks
    "global_rank": [Int(0)],
    # grids
    "shape": [Pair(Int(1))],
    "n_blocks": [Int(1), Pair(Int(1))],
    "grid_sizes": [Int(1), Seq(Int(1))],  # square grid sizes K to try (budget tools)
    "ranks": [Int(1), Seq(Int(1))],  # uniform ranks to try (budget tools)
    "pattern": [StrOptions(set(PATTERNS))],
    "row_perm": _PERM,
    "col_perm": _PERM,
    # SVD
    "svd_solver": [StrOptions(set(SVD_SOLVERS))],
    "n_oversamples": [Int(0)],
    "iterated_power": [Int(0), StrOptions({"auto"})],
    "random_state": [Int(0, 2**32 - 1), np.random.RandomState],  # scikit-learn's "random_state", bools refused
    "n_jobs": [Int(None, -1), Int(1)],
    "k": [Int(1)],
    "full_spectrum": ["boolean"],
    # iterative fits
    "max_iter": [Int(1)],
    "tol": [Float(0, None, closed="left")],
    "first_step": [StrOptions(set(FIRST_STEPS))],
    "init": [StrOptions(set(INITS))],
    # budget tools
    "min_budget": [Int(1)],
    "max_budget": [Int(1)],
    "exact": ["boolean"],
    "include_optimal": ["boolean"],
    "fit_options": [Keys("max_iter", "tol")],
    # allocation
    "costs": [Seq(Int(1))],
    "max_ranks": [Seq(Int(0))],
    # conversions
    "rtol": [Float(0, None, closed="left")],
    "scaling": [Float(None, 0, closed="neither"), Float(0, None, closed="neither")],
    # orderings
    "length": [Int(1)],
    "n_parts": [Int(1)],
    "n_groups": [Int(1)],
    "height": [Int(1)],
    "width": [Int(1)],
    "tile": [Int(1), Pair(Int(1))],
    "n_components": [Int(1)],
    "axis": [Int(0, 1)],
    # fits in a data metric (blocklowrank._metric)
    "gram_damping": [Float(0, None, closed="left")],
    "sketch": [StrOptions({"formed", "operator"})],
}

#: The options of every truncated SVD (scikit-learn's ``randomized_svd`` knobs, and threads).
SVD_OPTIONS = ("svd_solver", "n_oversamples", "iterated_power", "random_state", "n_jobs")


# ---------------------------------------------------------------------------- checking
def _normalise(constraint, val):
    norm = getattr(constraint, "normalise", None)
    return val if norm is None else norm(val)


def _constraints(rule):
    return [c if hasattr(c, "is_satisfied_by") else make_constraint(c) for c in rule]


def _rule(key):
    try:
        return PARAMS[key]
    except KeyError:
        raise KeyError(f"no rule named {key!r} in blocklowrank._params.PARAMS") from None


def _satisfied(rule, val):
    """The constraint of ``rule`` that ``val`` satisfies, or None."""
    for c in rule:
        if c.is_satisfied_by(val):
            return c
    return None


def _fail(name, val, rule, caller):
    shown = [c for c in rule if not c.hidden]
    desc = str(shown[0]) if len(shown) == 1 else ", ".join(map(str, shown[:-1])) + f" or {shown[-1]}"
    detail = next((d for c in shown if (d := getattr(c, "explain", lambda *_: "")(name, val))), "")
    where = f"The {name!r} parameter of {caller}" if caller else f"The {name!r} parameter"
    return InvalidParameterError(f"{where} must be {desc}. Got {val!r} instead{detail}.")


def check(value, name, rule=None, *, caller=None):
    """``value`` checked against its rule (``PARAMS[name]`` by default), normalised.

    Integers come back as ``int``, floats as ``float``, pairs as tuples;
    anything else unchanged. Raises :class:`InvalidParameterError` naming
    ``name`` (and ``caller``).
    """
    return _check(value, name, _table_constraints(name) if rule is None else _constraints(rule), caller)


@functools.cache
def _table_constraints(name):
    return _constraints(_rule(name))


def _check(value, name, constraints, caller):
    """:func:`check` with the rule's constraints built."""
    for c in constraints:
        if c.is_satisfied_by(value):
            return _normalise(c, value)
    raise _fail(name, value, constraints, caller)


def check_params(rules, params, caller):
    """Check ``{name: value}`` against ``{name: rule}`` (names without a rule pass); normalised values."""
    return {k: v if k not in rules else check(v, k, rules[k], caller=caller) for k, v in params.items()}


def _rules_for(signature, names, aliases):
    """``{parameter: constraints}`` for ``names`` (table keys) and ``aliases`` (parameter -> table
    key, or -> an explicit rule), with None added where the default is None."""
    rules = {n: _rule(n) for n in names}
    rules.update({p: _rule(r) if isinstance(r, str) else list(r) for p, r in aliases.items()})
    for p, rule in rules.items():
        param = signature.parameters.get(p)
        if param is not None and param.default is None:
            rules[p] = rule + [None]
    return {p: _constraints(rule) for p, rule in rules.items()}


def estimator_constraints(cls, **aliases):
    """``_parameter_constraints`` of an estimator: every ``__init__`` parameter's rule from the table
    (``aliases``: parameter -> table key or explicit rule, where the name's usual rule is not meant,
    or for a parameter the table does not know)."""
    sig = inspect.signature(cls.__init__)
    names = [p for p in sig.parameters if p != "self" and p not in aliases]
    unknown = [p for p in names if p not in PARAMS]
    if unknown:
        raise TypeError(
            f"{cls.__name__}: no rule for parameter(s) {unknown} in blocklowrank._params.PARAMS; "
            f"declare them in {cls.__name__}._param_rules = {{name: [constraints]}}"
        )
    return _rules_for(sig, names, aliases)


_CALLER = re.compile(r"parameter of [\w.]+ must be")


def validate_params(*names, **aliases):
    """Decorator: check the arguments ``names`` (table keys) and ``aliases`` of every call.

    Only the arguments given are checked (the defaults are valid by
    construction; ``tests/test_params.py`` checks that they are), and they
    reach the function normalised (see :func:`check`). Arguments that arrive
    through ``**kwargs`` are checked too. An :class:`InvalidParameterError`
    raised by a decorated function called inside names the outer function,
    as in scikit-learn.
    """

    def decorate(func):
        sig = inspect.signature(func)
        rules = _rules_for(sig, names, aliases)
        # where each checked argument arrives: by position (its index) or by keyword
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        index = {p.name: t for t, p in enumerate(sig.parameters.values()) if p.kind in kinds}
        checks = [(p, index.get(p), rule) for p, rule in rules.items()]
        caller = func.__qualname__

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            args = list(args)
            for p, t, rule in checks:
                if p in kwargs:  # by keyword, or through **kwargs
                    kwargs[p] = _check(kwargs[p], p, rule, caller)
                elif t is not None and t < len(args):
                    args[t] = _check(args[t], p, rule, caller)
            try:
                return func(*args, **kwargs)
            except InvalidParameterError as exc:
                msg = _CALLER.sub(f"parameter of {caller} must be", str(exc), count=1)
                if msg == str(exc):
                    raise
                raise InvalidParameterError(msg) from exc

        wrapper._parameter_constraints = rules
        return wrapper

    return decorate
