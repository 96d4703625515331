"""Linear assignment, the step every matching method repeats: the column for each row of a
square cost matrix that maximises (or minimises) the total.

``lap.lapjv`` (Jonker-Volgenant, the optional package ``lap``: ``pip install lap``) when it is
installed, else ``scipy.optimize.linear_sum_assignment``. Both are exact, so they reach the same
optimum (they may pick different assignments only where optima tie); on the sizes the matchings
solve, lap was 1.3-5x faster on most cost matrices and at most 6.5x slower on a few small ones,
and a whole weight matching of two 2048-wide MLPs spent 9.8 s instead of 18.0 s in assignments
(same objective; `benchmarks/assignment.py`, README). :data:`SOLVER` says which one runs.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

try:
    import lap as _lap
except ImportError:  # the optional package is not installed
    _lap = None

__all__ = ["solve", "SOLVER"]

SOLVER = "lap" if _lap is not None else "scipy"


def solve(cost: np.ndarray, maximize: bool = True, solver: str | None = None) -> np.ndarray:
    """``cols`` with ``cols[i]`` the column assigned to row ``i`` (a permutation), optimal for
    the square ``cost`` (float64). ``solver``: ``"lap"`` or ``"scipy"``, default :data:`SOLVER`."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"a square cost matrix is needed, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("the cost matrix holds NaN or infinite values")
    solver = solver or SOLVER
    if solver == "lap" and _lap is not None and len(cost) > 1:
        cols = _lap.lapjv(np.ascontiguousarray(-cost if maximize else cost), extend_cost=False)[1]
        if (cols >= 0).all():
            return cols.astype(np.int64)
    elif solver not in ("lap", "scipy"):
        raise ValueError(f"solver must be 'lap' or 'scipy', got {solver!r}")
    return linear_sum_assignment(cost, maximize=maximize)[1].astype(np.int64)
