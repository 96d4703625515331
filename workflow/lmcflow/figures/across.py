"""Figures across runs and settings: federated rounds (fig15), sweeps (fig13), LMC against
LLFC over all pairs (fig14).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..summary import FAMILY, sweep_columns
from .layout import (
    PAGE_WIDTH, PANEL, _Facet, _facets, _finish, _layout, _mean_sd, _method_palette, _methods,
    _ordered, _panels, _profile, _reference_line, _shared_y, _test_rows,
)


AGGREGATION_ORDER = ("full", "layers", "aligned")
AGGREGATION_LABELS = {"full": "full averaging", "layers": "layer subset (personalised)",
                      "aligned": "aligned (weight matching), then full"}


def fig_federated(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 15: federated averaging — test error (%) and test loss per round of the global
    model (solid, markers) and of the clients before each aggregation (dashed: mean over the
    clients, band: their range), one colour per aggregation, per experiment a row of two panels.

    ``table`` columns: experiment, aggregation, pair, seed, shards, round, model (``global`` or
    ``client{k}``), client (−1 for the global model), split, loss, error. Pairs (seeds) are
    averaged first; round 0 is the common initialisation.
    """
    df = _test_rows(table, "loss", "fig_federated")
    quantities = {"error": ("test error (%)", 100.0), "loss": ("test loss", 1.0)}
    aggregations = _ordered(df["aggregation"], AGGREGATION_ORDER)
    palette = dict(zip(aggregations, sns.color_palette("colorblind", len(aggregations))))
    df = df.assign(who=np.where(df["client"] < 0, "global", "clients"))
    per_model = df.groupby(["experiment", "aggregation", "who", "client", "round"],
                           as_index=False)[["loss", "error"]].mean()  # mean over seeds
    long = pd.concat([per_model.assign(quantity=q, value=per_model[c] * scale)
                      for c, (q, scale) in quantities.items()])
    summary = (long.groupby(["experiment", "quantity", "aggregation", "who", "round"])["value"]
               .agg(mean="mean", low="min", high="max").reset_index())
    info = df.groupby("experiment").agg(shards=("shards", "first"),
                                        clients=("client", "max"))

    def title(exp: str, quantity: str) -> str:
        return f"{exp} · {quantity}\n{info.loc[exp, 'clients'] + 1} clients, {info.loc[exp, 'shards']} shards"

    pages = _layout(_facets(summary, "quantity", [q for q, _ in quantities.values()], title))
    for ax, facet in _panels(pages):
        rows = facet.rows
        for agg in aggregations:
            label = AGGREGATION_LABELS.get(agg, agg)
            mine = rows[rows["aggregation"] == agg]
            g = mine[mine["who"] == "global"].sort_values("round")
            c = mine[mine["who"] == "clients"].sort_values("round")
            ax.plot(g["round"], g["mean"], color=palette[agg], marker="o", markersize=3.5,
                    linewidth=1.5, label=f"{label}: global model")
            ax.plot(c["round"], c["mean"], color=palette[agg], linestyle="--", linewidth=1.2,
                    label=f"{label}: clients (mean; band: range)")
            ax.fill_between(c["round"], c["low"], c["high"], color=palette[agg], alpha=0.12,
                            linewidth=0)
        ax.set_xlabel("round (0: the initialisation)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
    _shared_y(_panels(pages), "", by="title")
    for ax, facet in _panels(pages):
        ax.set_ylabel(facet.key)
    _finish(pages, out_pdf)


# the per-pair metrics of `summary.pair_summary`: (title, y label, scale)
PAIR_METRICS = {
    "loss_barrier": ("test loss barrier", "test loss barrier", 1.0),
    "error_barrier": ("test error barrier", "test error barrier (pp)", 100.0),
    "llfc_ratio": ("LLFC ratio at α = ½", "E[1 − cos_α] / E[1 − cos_AB]", 1.0),
    "dist_com": ("commutativity", "Dist_com", 1.0),
}
HIDDEN_NOTE = "hidden layers: all but the first and the logits"


def _swept_values(values: pd.Series) -> tuple[pd.Series, list | None]:
    """Positions of swept values on the x axis: the numbers themselves, or (strings, booleans)
    0..n−1 with the names (sorted) returned beside them."""
    present = values.dropna()
    numeric = pd.to_numeric(present, errors="coerce")
    if numeric.notna().all() and not any(isinstance(v, bool) for v in present):
        return pd.to_numeric(values, errors="coerce"), None
    names = sorted({str(v).lower() if isinstance(v, bool) else str(v) for v in present})
    text = values.map(lambda v: v if pd.isna(v) else (str(v).lower() if isinstance(v, bool)
                                                       else str(v)))
    return text.map({n: i for i, n in enumerate(names)}).astype(float), names


def _swept_axis(ax: plt.Axes, xs: Sequence[float], names: list | None, label: str) -> None:
    """The swept setting on x: named categories, or its values as ticks — on a log axis where
    they are positive and span a decade or more."""
    xs = sorted(set(xs))
    if names is not None:
        ax.set_xticks(range(len(names)), names)
        ax.set_xlim(-0.5, len(names) - 0.5)
    else:
        if xs[0] > 0 and xs[-1] / xs[0] >= 10:
            ax.set_xscale("log")
            label += " (log scale)"
        if len(xs) <= 12:
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel(label)


def fig_sweep(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 13: metrics against a swept setting (Git Re-Basin's barrier-vs-width figure).

    ``table`` is the per-pair summary (`summary.pair_summary`): experiment, method, pair,
    family, the swept settings ``sweep.<key>``, loss_barrier, error_barrier (test split,
    configured curve), llfc_ratio (α = ½, mean over hidden layers), dist_com. For every family
    and swept key with two values or more, a block of four panels (test loss barrier, test
    error barrier in pp, LLFC ratio, Dist_com): x = the swept value (log where the values span
    a decade or more; strings as categories), one line per method, mean ± sd over the pairs and
    the family's other swept keys (e.g. seeds). Each panel has its own y range (symlog where
    the means span more than two decades).
    """
    facets = []
    for family in _ordered(table[FAMILY] if FAMILY in table else []):
        rows = table[table[FAMILY] == family]
        for column in sweep_columns(rows):
            swept = rows.dropna(subset=[column])
            if swept[column].nunique() < 2:
                continue
            x, names = _swept_values(swept[column])
            long = pd.concat([swept.assign(metric=m, value=swept[m] * PAIR_METRICS[m][2], x=x)
                              for m in PAIR_METRICS if m in swept.columns])
            summary = _mean_sd(long, ["metric", "x", "method"], "value")
            block = f"{family} · {column}"
            facets += [_Facet(block, (m, column, names), f"{family}: {PAIR_METRICS[m][0]}",
                              summary[summary["metric"] == m])
                       for m in PAIR_METRICS if (summary["metric"] == m).any()]
    if not facets:
        raise ValueError("fig_sweep: no family sweeps a setting over two values or more")
    methods = _methods(table["method"])
    palette = _method_palette(methods)
    pages = _layout(facets, panel=(PANEL[0], 2.5))  # two blocks of 2 × 2 panels to a page
    for ax, facet in _panels(pages):
        metric, column, names = facet.key
        _profile(ax, facet.rows, "x", "method", methods, palette, nonneg=metric != "llfc_ratio")
        if metric.endswith("barrier"):
            _reference_line(ax, 0.0)
        _swept_axis(ax, facet.rows["x"], names, column.removeprefix("sweep."))
        _shared_y([(ax, facet)], PAIR_METRICS[metric][1], "mean", by="title")
    _finish(pages, out_pdf, order=methods,
            title=f"method (mean ± sd over pairs; {HIDDEN_NOTE})")


FAMILY_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]


def fig_lmc_llfc(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 14: LMC and LLFC together — every pair of the run as a point, test loss barrier
    (x) against the LLFC ratio (y): the LLFC paper's claim that they co-occur.

    ``table`` is the per-pair summary (`summary.pair_summary`; see `fig_sweep`). Colour =
    method, marker = family (the experiment as written in the config: a sweep's points share
    it). y is log when the ratios span a decade or more. The title gives Spearman's rank
    correlation over the pairs.
    """
    df = table.dropna(subset=["loss_barrier", "llfc_ratio"])
    if df.empty:
        raise ValueError("fig_lmc_llfc: no pair with both a test loss barrier and an LLFC ratio")
    df = df if FAMILY in df else df.assign(**{FAMILY: df["experiment"]})
    methods, families = _methods(df["method"]), _ordered(df[FAMILY])
    palette = _method_palette(methods)
    markers = {f: FAMILY_MARKERS[i % len(FAMILY_MARKERS)] for i, f in enumerate(families)}
    rho = df["loss_barrier"].corr(df["llfc_ratio"], method="spearman") if len(df) > 2 else np.nan
    title = f"all {len(df)} pairs" + ("" if np.isnan(rho) else f" (Spearman ρ = {rho:.2f})")
    pages = _layout([_Facet("pairs", None, title, df)], ncols=1, panel=(PAGE_WIDTH, 4.6))
    ax = _panels(pages)[0][0]
    for (method, family), rows in df.groupby(["method", FAMILY], sort=False):
        ax.scatter(rows["loss_barrier"], rows["llfc_ratio"], color=palette[method],
                   marker=markers[family], s=28, alpha=0.85, edgecolors="white", linewidths=0.4)
    ax.axvline(0.0, color="0.3", linewidth=0.8, zorder=1)
    ax.set_xlabel("test loss barrier (configured normalisation curve)")
    _shared_y(_panels(pages), f"LLFC ratio E[1 − cos_α] / E[1 − cos_AB] at α = ½\n({HIDDEN_NOTE})",
              "llfc_ratio", decades=1.0, by="title")
    for m in methods:
        ax.scatter([], [], color=palette[m], marker="o", s=28, label=m)
    for f in families:
        ax.scatter([], [], color="0.45", marker=markers[f], s=28, label=f)
    _finish(pages, out_pdf, order=[*methods, *families], title="colour: method · marker: family")
