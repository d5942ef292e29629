"""The parameter rules (``blocklowrank._params``): one table, used by the estimators and the functions.

Also the bound on scikit-learn's version: the rules are built on scikit-learn's
private ``sklearn.utils._param_validation``, so ``pyproject.toml`` bounds the
version and these tests check that the installed one is inside the bound and
that the private names behave as the rules rely on.
"""

import functools
import importlib
import inspect
import pkgutil
import re
from importlib.metadata import version
from numbers import Integral
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import blocklowrank
from blocklowrank import BlockLayout, approximate, count_params
from blocklowrank._params import Float, Int, InvalidParameterError, check, validate_params
from blocklowrank.structures import structures

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- the version bound
def _sklearn_requirement():
    (spelled,) = re.findall(r'^\s*"(scikit-learn[^"]*)"', (ROOT / "pyproject.toml").read_text(), re.M)
    return Requirement(spelled)


def test_sklearn_version_is_bounded_and_installed_inside():
    """An upper bound (the private module may change at any minor release), and the
    installed scikit-learn inside it."""
    spec = _sklearn_requirement().specifier
    assert any(s.operator == "<" for s in spec), f"scikit-learn needs an upper bound, got {spec}"
    installed = Version(version("scikit-learn"))
    assert spec.contains(installed), f"scikit-learn {installed} is outside {spec}"


def test_private_names_behave_as_relied_on():
    """What _params takes from sklearn.utils._param_validation, checked on the installed version."""
    from sklearn.utils import _param_validation as pv

    for name in ("Interval", "StrOptions", "make_constraint", "InvalidParameterError"):
        assert hasattr(pv, name), name
    assert issubclass(pv.InvalidParameterError, ValueError) and issubclass(pv.InvalidParameterError, TypeError)
    # scikit-learn's integer interval takes True (a bool is an Integral): Int exists to refuse it
    assert pv.Interval(Integral, 1, None, closed="left").is_satisfied_by(True)
    assert str(Int(1)) == "an int in the range [1, inf)"
    for spelled, good, bad in [
        ("array-like", [1, 2], 3),
        ("boolean", np.True_, 1),
        ("random_state", np.random.RandomState(0), "0"),
        (None, None, 0),
        (callable, len, 3),
    ]:
        c = pv.make_constraint(spelled)
        assert c.is_satisfied_by(good) and not c.is_satisfied_by(bad), spelled
        assert str(c) and c.hidden is False
    assert pv.StrOptions({"a"}).is_satisfied_by("a") and not pv.StrOptions({"a"}).is_satisfied_by("b")


# ---------------------------------------------------------------------------- the rules
@pytest.mark.parametrize("bad", [True, False, np.True_, 2.0, np.float64(2.0), "2", None, 0, -1, 2**63 + 0.5])
def test_int_refuses_bools_floats_and_out_of_range(bad):
    assert not Int(1).is_satisfied_by(bad)


@pytest.mark.parametrize("good", [1, 7, np.int64(3), np.uint8(2), 2**70])
def test_int_accepts_integers_and_normalises_them(good):
    out = check(good, "rank", [Int(1)])
    assert type(out) is int and out == int(good)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, True, "0.5", -0.1])
def test_float_refuses_nan_inf_bools_strings(bad):
    assert not Float(0, None, closed="left").is_satisfied_by(bad)


def test_random_state_is_a_seed_or_a_random_state():
    for good in (0, 2**32 - 1, np.random.RandomState(0)):
        check(good, "random_state")
    for bad in (True, -1, 2**32, 1.0, np.random.default_rng(0)):
        with pytest.raises(InvalidParameterError, match="random_state"):
            check(bad, "random_state")


def test_unbounded_float_sides_must_be_open():
    with pytest.raises(ValueError, match="open"):
        Float(0, None, closed="both")


def test_pair_names_the_entry():
    with pytest.raises(InvalidParameterError, match=r"shape\[1\] = 2\.5"):
        check((3, 2.5), "shape")
    assert check(np.array([3, 4]), "shape") == (3, 4)


def test_errors_are_both_type_and_value_errors_and_name_the_function():
    with pytest.raises(TypeError, match=r"The 'rank' parameter of approximate must be"):
        approximate(np.ones((4, 4)), rank=True)
    with pytest.raises(ValueError, match=r"The 'rank' parameter of approximate must be"):
        approximate(np.ones((4, 4)), method="block", n_blocks=2, rank=0)


def test_decorator_checks_kwargs_and_normalises():
    seen = {}

    @validate_params("rank", tol="tol")
    def f(rank, **kw):
        seen.update(rank=rank, **kw)

    f(np.int64(2), tol=1)
    assert type(seen["rank"]) is int and type(seen["tol"]) is float
    with pytest.raises(InvalidParameterError, match="'tol' parameter of .*f must be"):
        f(1, tol=-1.0)


def test_none_is_valid_exactly_where_the_default_is_none():
    rules = count_params._parameter_constraints  # rank=None, shape=None, n_blocks=1
    assert any(c.is_satisfied_by(None) for c in rules["rank"])
    assert not any(c.is_satisfied_by(None) for c in rules["n_blocks"])


def _estimators():
    return [s.estimator for s in structures()]


@pytest.mark.parametrize("Est", _estimators(), ids=lambda e: e.__name__)
def test_every_estimator_parameter_has_its_rule(Est):
    """As scikit-learn's check_param_validation: one rule per parameter, the defaults valid,
    and a value of no valid type refused with an error naming the parameter and the class."""
    est = Est()
    params = est.get_params(deep=False)
    assert set(Est._parameter_constraints) == set(params)
    est._validate_params()  # the defaults satisfy their rules
    X = np.random.default_rng(0).standard_normal((8, 6))
    bad = type("BadType", (), {})()
    for name in params:
        with pytest.raises(InvalidParameterError, match=rf"The '{name}' parameter of {Est.__name__} must be"):
            Est(**{name: bad}).fit(X)


@pytest.mark.parametrize("Est", _estimators(), ids=lambda e: e.__name__)
def test_estimator_rank_refuses_bool_and_float(Est):
    X = np.random.default_rng(0).standard_normal((8, 6))
    for rank in (True, 2.0):
        with pytest.raises(InvalidParameterError, match="'rank'"):
            Est(rank=rank).fit(X)


@functools.cache
def _decorated():
    """Every function and method of the package checked by validate_params."""
    found = {}
    for info in pkgutil.walk_packages(blocklowrank.__path__, "blocklowrank."):
        if info.name.endswith("__main__"):
            continue
        try:
            mod = importlib.import_module(info.name)
        except ImportError:  # an optional extra that is not installed
            continue
        objs = list(vars(mod).values())
        objs += [m for cls in objs if inspect.isclass(cls) for m in vars(cls).values()]
        for obj in objs:
            fn = getattr(obj, "__func__", obj)
            if callable(fn) and hasattr(fn, "__wrapped__") and hasattr(fn, "_parameter_constraints"):
                found[f"{fn.__module__}.{fn.__qualname__}"] = fn
    return found


def test_the_public_functions_are_checked():
    names = set(_decorated())
    for want in (
        "blocklowrank.structures.approximate",
        "blocklowrank._engine._fit.fit_layout",
        "blocklowrank.structures._hybrid.fit_hybrid",
        "blocklowrank.structures._shared_basis.fit_shared_basis",
        "blocklowrank._svd.batched_svd",
        "blocklowrank._allocation.allocate_ranks",
        "blocklowrank.budget.count_params",
        "blocklowrank.budget.match_budget",
        "blocklowrank.compare.compare_at_budget",
        "blocklowrank.layout.BlockLayout.from_blocks",
        "blocklowrank.convert.to_gralora",
        "blocklowrank.permutations.cluster_permutation",
        "blocklowrank.adapters._training.train",
    ):
        assert want in names, want


@pytest.mark.parametrize("name", sorted(_decorated()))
def test_decorated_defaults_satisfy_their_rules(name):
    fn = _decorated()[name]
    sig = inspect.signature(fn.__wrapped__)
    for p, rule in fn._parameter_constraints.items():
        default = sig.parameters[p].default if p in sig.parameters else inspect.Parameter.empty
        if default is not inspect.Parameter.empty:
            check(default, p, rule)


def test_layout_raw_constructor_checks_the_shape():
    with pytest.raises(InvalidParameterError, match=r"'shape' parameter of BlockLayout .* shape\[0\]"):
        BlockLayout((8.7, 8), (4, 4), (4, 4), np.ones((2, 2), bool), np.ones((2, 2), int))


def test_a_new_estimator_declares_rules_for_parameters_the_table_does_not_know():
    from blocklowrank.estimators import StructuredEstimator

    with pytest.raises(TypeError, match=r"no rule for parameter\(s\) \['warmth'\].*_param_rules"):

        class Warm(StructuredEstimator):
            def __init__(self, *, rank=1, warmth=0.5):
                self.rank, self.warmth = rank, warmth

    class Warmer(StructuredEstimator):
        _param_rules = {"warmth": [Float(0, 1)]}

        def __init__(self, *, rank=1, warmth=0.5):
            self.rank, self.warmth = rank, warmth

    Warmer()._validate_params()
    with pytest.raises(InvalidParameterError, match="'warmth' parameter of Warmer"):
        Warmer(warmth=2.0)._validate_params()
    with pytest.raises(InvalidParameterError, match="'rank' parameter of Warmer"):
        Warmer(rank=True)._validate_params()
