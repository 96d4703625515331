"""Benchmark linear assignment solvers on the sizes weight and activation matching solve.

    python benchmarks/assignment.py                       # sizes 64 ... 4096
    python benchmarks/assignment.py --sizes 512 8192 --reps 1

Per size n and kind of cost matrix, the median wall time (over ``--reps`` interleaved runs, one
thread) of every solver available here, and whether each reaches the same optimum as scipy
(the objective, to 1e-9 relative; the assignment itself may differ where optima tie):

- ``scipy``: ``scipy.optimize.linear_sum_assignment`` (shortest augmenting path, LAPJV-like),
  the project's solver;
- ``lap``: ``lap.lapjv`` (Jonker-Volgenant, package ``lap`` from the package index) when
  installed;
- ``torch-auction`` is not offered: no GPU solver is installed with the project's pins, and a
  CPU auction is slower than both above on dense matrices.

Kinds of cost: ``planted`` (``A^T B`` of a weight matrix A and a permuted noisy copy B: one
clearly best assignment, what matching a permuted copy meets), ``independent`` (``A^T B`` of two
independent Gaussian matrices: what the first sweep of matching two independently trained
networks meets), ``uniform`` (uniform entries, the hard case). The floor is the time to read the matrix once (``cost.sum()``), the work any solver does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402


def cost_matrix(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.random((n, n))
    a = rng.standard_normal((max(n // 2, 8), n))
    b = rng.standard_normal(a.shape)
    if kind == "planted":
        b = a[:, rng.permutation(n)] + 0.5 * b
    return a.T @ b


def solvers() -> dict:
    out = {"scipy": lambda c: linear_sum_assignment(c, maximize=True)[1]}
    try:
        import lap

        out["lap"] = lambda c: lap.lapjv(-c, extend_cost=False)[1]
    except ImportError:
        pass
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512, 1024, 2048, 4096])
    p.add_argument("--kinds", nargs="+", default=["planted", "independent", "uniform"])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    found = solvers()
    print(f"solvers: {', '.join(found)}; one thread; median of {args.reps} interleaved runs")
    header = f"{'kind':9} {'n':>6} {'floor ms':>9} " + " ".join(f"{s + ' ms':>11}" for s in found) \
        + "  " + " ".join(f"{s + '/scipy':>10}" for s in found if s != "scipy") + "  same optimum"
    print(header)
    for kind in args.kinds:
        for n in args.sizes:
            c = cost_matrix(kind, n, seed=n)
            rows = np.arange(n)
            times = {s: [] for s in found}
            floor = []
            values = {}
            for _ in range(args.reps):
                tic = time.perf_counter()
                c.sum()
                floor.append(time.perf_counter() - tic)
                for name, solve in found.items():
                    tic = time.perf_counter()
                    cols = solve(c)
                    times[name].append(time.perf_counter() - tic)
                    values[name] = float(c[rows, cols].sum())
            med = {s: statistics.median(t) * 1e3 for s, t in times.items()}
            same = all(abs(v - values["scipy"]) <= 1e-9 * abs(values["scipy"]) for v in values.values())
            print(f"{kind:9} {n:>6} {statistics.median(floor) * 1e3:>9.3f} "
                  + " ".join(f"{med[s]:>11.2f}" for s in found) + "  "
                  + " ".join(f"{med[s] / med['scipy']:>10.2f}" for s in found if s != "scipy")
                  + f"  {'yes' if same else 'NO'}", flush=True)


if __name__ == "__main__":
    main()
