"""Barriers of LMC curves (numpy and pandas only: table and figure jobs import no torch).

Convention: θ_α = α·θ_A + (1−α)·θ_B, so α = 1 is model A and α = 0 is model B.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def linear_baseline(alphas, values_at_1, values_at_0):
    """Straight line between the endpoints: ``alpha*v(1) + (1-alpha)*v(0)`` (broadcasts)."""
    a = np.asarray(alphas, dtype=np.float64)
    return a * values_at_1 + (1.0 - a) * values_at_0


def barrier(alphas: Sequence[float], values: Sequence[float]) -> float:
    """Barrier = max over the grid of ``v(alpha) - linear_baseline(alpha)``.

    The grid may be in any order but must contain 0 and 1 (the endpoints define the
    baseline); otherwise ValueError. Since the endpoints are on the grid the result is
    >= 0 up to rounding: 0 means linearly mode-connected on this grid.
    """
    a = np.asarray(alphas, dtype=np.float64).ravel()
    v = np.asarray(values, dtype=np.float64).ravel()
    if a.shape != v.shape:
        raise ValueError(f"alphas and values differ in length: {a.size} vs {v.size}")
    i1, i0 = np.flatnonzero(np.isclose(a, 1.0)), np.flatnonzero(np.isclose(a, 0.0))
    if i1.size == 0 or i0.size == 0:
        raise ValueError("barrier needs alpha = 0 and alpha = 1 on the grid")
    return float(np.max(v - linear_baseline(a, v[i1[0]], v[i0[0]])))


def barriers(lmc: pd.DataFrame) -> pd.DataFrame:
    """Loss and error barriers per curve of a long LMC table.

    ``lmc`` has columns experiment, method, pair, alpha, split, loss, error and maybe other
    id columns (e.g. ``bn``). A curve is every combination of the columns other than
    alpha/loss/error; returns one row per curve with those id columns plus
    ``loss_barrier`` and ``error_barrier`` (same units as loss/error).
    """
    keys = [c for c in lmc.columns if c not in ("alpha", "loss", "error")]
    rows = []
    for key, g in lmc.groupby(keys, sort=True, dropna=False):
        rows.append({**dict(zip(keys, key)),
                     "loss_barrier": barrier(g["alpha"], g["loss"]),
                     "error_barrier": barrier(g["alpha"], g["error"])})
    return pd.DataFrame(rows, columns=[*keys, "loss_barrier", "error_barrier"])


def alignment_table(lmc: pd.DataFrame) -> pd.DataFrame:
    """Loss and error barriers per curve of the LMC table (results/tables/alignment.parquet).

    Columns: experiment, method, pair, bn, split, (other id columns), loss_barrier,
    error_barrier — one row per (experiment, method, pair, bn, split), both splits, values
    from `metrics.barriers`. A table without a ``bn`` column gets ``bn = "none"``.
    """
    df = lmc if "bn" in lmc.columns else lmc.assign(bn="none")
    bar = barriers(df)
    ids = ["experiment", "method", "pair", "bn", "split"]
    return bar[[c for c in ids if c in bar.columns] + [c for c in bar.columns if c not in ids]]
