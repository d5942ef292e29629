"""The stopping loop shared by the iterative fits (``blocklowrank._descent.descend``).

Claim: on a stack, every problem gets the trace, pass count and stop reason of
the plain one-problem loop written out below (accept a step unless it raises
the objective by more than 1e-12; stop on "increase", on a relative
improvement <= tol per pass, on an objective <= 1e-12, or after max_iter
passes). The problems are scripted: step ``t`` of problem ``i`` proposes the
objective ``script[i][t]``, so every branch of the rule is reached.
"""

import numpy as np
import pytest

from blocklowrank._descent import Trace, descend

STEP_TOL = 1e-12


def _script(rng, n_steps):
    """Objectives: mostly decreasing, sometimes flat, sometimes up, sometimes exactly 0."""
    v = [1.0]
    for _ in range(n_steps):
        u = rng.random()
        if u < 0.1:
            v.append(v[-1] * 1.5)  # an increase
        elif u < 0.2:
            v.append(v[-1] * (1 - 1e-9))  # stalls: below any tol used here
        elif u < 0.25:
            v.append(0.0)
        else:
            v.append(v[-1] * rng.uniform(0.5, 0.99))
    return v


def _alone(script, n_steps_per_pass, max_iter, tol):
    """One problem, the rule written out plainly: (trace, passes, stop)."""
    trace, passes, stop, t = [script[0]], 1, "max_iter", 1
    for _ in range(max_iter - 1):
        if trace[-1] <= STEP_TOL:
            return trace, passes, "tol"
        before, increased = trace[-1], False
        for _ in range(n_steps_per_pass):
            e = script[t]
            t += 1
            if e > trace[-1] + STEP_TOL:
                increased = True
                break
            trace.append(e)
        if increased:
            return trace, passes, "increase"
        passes += 1
        if before - trace[-1] <= tol * before:
            return trace, passes, "tol"
    return trace, passes, stop


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("n_steps_per_pass", [1, 2, 3])
def test_descend_is_the_one_problem_rule_on_every_problem(seed, n_steps_per_pass):
    rng = np.random.default_rng(seed)
    N, max_iter, tol = 9, int(rng.integers(1, 12)), float(rng.choice([0.0, 1e-3, 0.2]))
    scripts = [_script(rng, n_steps_per_pass * max_iter) for _ in range(N)]
    pos = np.ones(N, dtype=int)  # next scripted step of each problem
    state = [[s[0]] for s in scripts]  # committed objectives, to check commit() is honest

    def step(ids):
        proposal = np.array([scripts[i][pos[i]] for i in ids])
        pos[ids] += 1

        def commit(accepted):
            for i, e in zip(ids[accepted], proposal[accepted]):
                state[i].append(e)

        return proposal, commit

    trace = Trace(N, 1 + n_steps_per_pass * max_iter)
    trace.record(np.arange(N), np.array([s[0] for s in scripts]))
    descend(trace, [step] * n_steps_per_pass, max_iter=max_iter, tol=tol)
    for i in range(N):
        want, passes, stop = _alone(scripts[i], n_steps_per_pass, max_iter, tol)
        got = trace.errors[i][: trace.length[i]]
        np.testing.assert_array_equal(got, want)
        assert np.all(np.isnan(trace.errors[i][trace.length[i] :]))
        assert (trace.n_iter[i], trace.stop[i]) == (passes, stop), i
        assert state[i] == want  # exactly the accepted proposals were committed


def test_trace_round_trips_through_arrays():
    t = Trace(3, 4)
    t.record(np.arange(3), np.array([1.0, 2.0, 3.0]))
    t.record(np.array([1]), np.array([1.5]))
    u = Trace.from_arrays(*t.arrays())
    np.testing.assert_array_equal(u.length, [1, 2, 1])
    np.testing.assert_array_equal(u.last(np.arange(3)), [1.0, 1.5, 3.0])
