"""Linear assignment (lmcflow.alignment.assignment): every solver reaches the optimum that brute
force finds, maximising and minimising, and returns a permutation."""

import itertools

import numpy as np
import pytest

from lmcflow.alignment import assignment

SOLVERS = ["scipy", pytest.param("lap", marks=pytest.mark.skipif(
    assignment._lap is None, reason="the optional package lap is not installed"))]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("maximize", [True, False])
def test_every_solver_reaches_the_brute_force_optimum(solver, maximize):
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 6):
        for _ in range(5):
            cost = rng.standard_normal((n, n))
            cols = assignment.solve(cost, maximize=maximize, solver=solver)
            assert sorted(cols.tolist()) == list(range(n))
            best = (max if maximize else min)(cost[np.arange(n), list(p)].sum()
                                             for p in itertools.permutations(range(n)))
            assert cost[np.arange(n), cols].sum() == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_planted_permutation_is_found_on_a_large_matrix(solver):
    rng = np.random.default_rng(1)
    perm = rng.permutation(300)
    cost = rng.random((300, 300)) * 0.1
    cost[np.arange(300), perm] += 1.0
    assert (assignment.solve(cost, solver=solver) == perm).all()


def test_bad_costs_are_refused():
    with pytest.raises(ValueError, match="square"):
        assignment.solve(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        assignment.solve(np.array([[0.0, np.nan], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="solver"):
        assignment.solve(np.eye(2), solver="hungarian")
