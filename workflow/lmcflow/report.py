"""HTML previews of the result tables: what `snakemake --report` shows for each Parquet file.

A browser cannot show Parquet, and a whole table can hold millions of rows (one per probe
sample, layer and α), so each table gets a small page beside it: what a row is, the columns,
the mean of every measured column per group (experiment, method, …), and the first rows.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from .io import atomic_path
from .summary import SWEPT

# one sentence per table: what one row is (the README's "Tables" section has every column)
ROWS = {
    "lmc": "one row per pair, BatchNorm mode, α and split: loss and error of θ_α",
    "alignment": "one row per pair, BatchNorm mode and split: loss and error barriers",
    "llfc": "one row per pair, α, layer and probe sample: 1 − cos_α, 1 − cos_AB and the scale c",
    "weak_additivity": "one row per pair, α, activation layer (ReLU, GELU…) and probe sample: Dist_σ and its baseline",
    "commutativity": "one row per pair and Linear/Conv layer: Dist_com, Dist_W and Dist_H",
    "layer_barriers": "one row per pair, epoch, layer group, side and split: single-layer barriers",
    "cumulative_barriers": "one row per pair, order, step, side and split: cumulative barriers",
    "layer_robustness": "one row per pair, layer, direction, draw, step and split: loss after a move",
    "subspace": "one row per pair, endpoint, direction, draw, norm and split: loss after a move",
    "linear_toy": "one row per path and α of the deep linear toy",
    "pair_summary": "one row per pair: test loss and error barriers, LLFC ratio and Dist_com over the hidden layers",
}
MEASURE_EXCLUDE = {"alpha", "sample", "layer_index", "step", "draw", "epoch", "norm",
                   "norm_fraction"}  # numeric columns that identify a row rather than measure
FIRST_ROWS = 50


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean of every measured (float) column per group of the identifying text columns."""
    keys = [c for c in ("experiment", "method", "bn", "split", "layer", "direction", "path", "into",
                        "order", "endpoint") if c in table.columns]
    values = [c for c in table.columns
              if pd.api.types.is_float_dtype(table[c]) and c not in MEASURE_EXCLUDE
              and not c.startswith(SWEPT)]  # a swept setting (e.g. a width) is not a measure
    if not values:
        return table.head(0)
    if not keys:
        return table[values].mean().to_frame("mean").T
    return table.groupby(keys, sort=False)[values].mean().reset_index()


def write_preview(table: pd.DataFrame, name: str, path: str | Path) -> None:
    """Write the HTML preview of `table` (named `name`, e.g. "llfc") to `path`."""
    parts = [f"<h2>{html.escape(name)}.parquet</h2>",
             f"<p>{html.escape(ROWS.get(name, 'one row per measurement'))}; "
             f"{len(table):,} rows × {table.shape[1]} columns. Columns are documented in the "
             "README (section Tables); read the file with <code>pandas.read_parquet</code>.</p>",
             "<h3>Mean per group</h3>", summary(table).to_html(index=False, float_format="{:.4g}".format),
             f"<h3>First {min(FIRST_ROWS, len(table))} rows</h3>",
             table.head(FIRST_ROWS).to_html(index=False, float_format="{:.6g}".format)]
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(name)}</title></head><body>" + "\n".join(parts) + "</body></html>\n")
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
