"""One row per pair: the numbers a run is summarised by (torch-free: pandas and numpy only).

`pair_summary` reads the cross-experiment tables and gives, per pair, the test loss and error
barriers of the configured normalisation curve, the LLFC ratio and Dist_com over the hidden
layers: what the README's "What the default run shows" reports, what fig13 (a metric against a
swept setting) and fig14 (barrier against LLFC ratio) plot, and what
benchmarks/variability.py prints. The tables' sweep columns are added here too
(`add_sweep_columns`), so every table names the sweep and the swept values of its rows.

Hidden layers (`hidden`): every layer of a table but its first and its last by
``layer_index`` — in the llfc table the first feature layer (the first Linear/Conv, or a
ResNet's stem: for a Linear/Conv 1 − cos_α is 0 exactly, it is linear in the weights) and the
logits; in the commutativity table (Linear/Conv layers only) the first Linear/Conv and the
output layer. Any model, no layer names.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .barriers import barriers

ID = ["experiment", "method", "pair"]
FAMILY = "family"  # the experiment as written in the config: a sweep's name, else its own
SWEPT = "sweep."  # prefix of the columns of swept settings: sweep.model.width, sweep.seed
METRICS = ["loss_barrier", "error_barrier", "llfc_ratio", "dist_com"]


def sweep_columns(table: pd.DataFrame) -> list[str]:
    """The columns of swept settings (``sweep.<key>``), in table order."""
    return [c for c in table.columns if c.startswith(SWEPT)]


def add_sweep_columns(table: pd.DataFrame, points: dict) -> pd.DataFrame:
    """``table`` with ``family`` and one ``sweep.<key>`` column per key swept by any experiment
    inserted after its id columns (empty where an experiment does not sweep that key).

    ``points``: experiment -> {"family": name, "swept": {key: value}} (what config validation
    gives every experiment: `lmcflow.config.expand_sweeps`); an experiment missing from it is
    its own family.
    """
    out = table.copy()
    keys = sorted({k for p in points.values() for k in p.get("swept", {})})
    at = max(out.columns.get_loc(c) for c in ID if c in out.columns) + 1 if ID[0] in out else 0
    family = {e: p.get("family", e) for e, p in points.items()}
    columns = {FAMILY: [family.get(e, e) for e in out["experiment"]]}
    for key in keys:
        swept = {e: p["swept"][key] for e, p in points.items() if key in p.get("swept", {})}
        columns[SWEPT + key] = pd.Series([swept.get(e) for e in out["experiment"]],
                                         index=out.index)
    for i, (name, values) in enumerate(columns.items()):
        if name in out.columns:
            raise ValueError(f"the table already has a column {name!r}")
        out.insert(at + i, name, values)
    return out


def hidden(table: pd.DataFrame) -> pd.Series:
    """True for the rows of hidden layers: ``layer_index`` strictly between the experiment's
    first and last layer in this table (see the module docstring)."""
    index = table["layer_index"]
    by = index.groupby(table["experiment"])
    return (index > by.transform("min")) & (index < by.transform("max"))


def llfc_ratio(llfc: pd.DataFrame, alpha: float = 0.5) -> pd.Series:
    """Per pair, the mean over hidden layers of E[1 − cos_α] / E[1 − cos_AB] at ``alpha``
    (each E a mean over the probe samples; NaN cosines, of zero features, left out)."""
    rows = llfc[np.isclose(llfc["alpha"], alpha) & hidden(llfc)]
    means = rows.groupby([*ID, "layer"])[["one_minus_cos_alpha", "one_minus_cos_ab"]].mean()
    ratio = means["one_minus_cos_alpha"] / means["one_minus_cos_ab"]
    return ratio.groupby(level=ID).mean().rename("llfc_ratio")


def pair_summary(lmc: pd.DataFrame, llfc: pd.DataFrame,
                 commutativity: pd.DataFrame) -> pd.DataFrame:
    """One row per pair of the lmc table: its id columns (experiment, method, pair, family and
    the sweep columns), ``loss_barrier`` and ``error_barrier`` (test split, the curve of the
    configured normalisation policy, column ``configured``; error as a fraction),
    ``llfc_ratio`` (`llfc_ratio`, α = ½; NaN without α = ½ or hidden layers) and ``dist_com``
    (mean Dist_com over the hidden Linear/Conv layers)."""
    test = lmc[lmc["split"] == "test"]
    if "configured" in test.columns:
        test = test[test["configured"].astype(bool)]
    if test.empty:
        raise ValueError("pair_summary: no test-split rows of the configured curve")
    ids = [*ID, FAMILY, *sweep_columns(test)] if FAMILY in test else ID
    carried = test.drop_duplicates(ID)[ids].set_index(ID)
    bar = barriers(test[[*ID, "alpha", "loss", "error"]]).set_index(ID)
    com = commutativity[hidden(commutativity)].groupby(ID)["dist_com"].mean()
    out = carried.join(bar).join(llfc_ratio(llfc)).join(com).reset_index()
    if FAMILY not in out:
        out.insert(len(ID), FAMILY, out["experiment"])
    return out[[c for c in out.columns if c not in METRICS] + METRICS]
