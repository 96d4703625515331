"""Figures of one pair's analyses: LMC (fig1), alignment (fig2), LLFC (fig3, fig4), weak
additivity (fig5), commutativity (fig6) and stitching (fig12).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..barriers import alignment_table, barriers
from .layout import (
    ALPHA_LABEL, BN_LABELS, COMMUTATIVITY, DIST_LABEL, DIST_SIGMA_LABEL, PAGE_WIDTH, PANEL,
    SHUFFLED, _category_axis, _facets, _finish, _grouped_bars, _layers_of, _layout,
    _legend_columns, _levels, _mean_sd, _method_palette, _methods, _one_bn_mode, _palette,
    _panels, _profile, _reference_line, _relabel, _rotate_x, _save, _shared_y, _test_rows,
)


# --------------------------------------------------------------------------- figures


def fig_lmc(lmc: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 1: test error (%) and test loss along the linear path θ_α, per experiment.

    ``lmc`` columns: experiment, method, pair, alpha, split, loss, error (error as a
    fraction; maybe ``bn`` and ``configured``: the curves of the experiment's configured
    normalisation policy are drawn solid, see `_one_bn_mode`, and REPAIR's, where it is not
    the configured one, dashed beside them). One row per experiment: an error panel and a loss
    panel, one line per method (mean over pairs, ±1 sd band when there are several pairs);
    each panel has its own y range (the experiments are different models). Each row's legend,
    below it, gives each method's barrier (mean over pairs) as "error in pp / loss".
    """
    test = lmc[lmc["split"] == "test"]
    df = _one_bn_mode(test).copy()
    if df.empty:
        raise ValueError("fig_lmc: no rows with split == 'test'")
    repair = test[(test["bn"] == "repair") & ~test.index.isin(df.index)] if "bn" in test else test[:0]
    bar = barriers(df.drop(columns=[c for c in ("configured",) if c in df]))
    bar = bar.groupby(["experiment", "method"])[["loss_barrier", "error_barrier"]].mean()
    methods = _methods(df["method"])
    palette = _method_palette(methods)
    quantities = {"error": ("test error (%)", 100.0), "loss": ("test loss", 1.0)}
    REPAIRED = " (REPAIR)"
    long = pd.concat([part.assign(quantity=q, value=part[c] * scale, line=part["method"] + tag)
                      for part, tag in ((df, ""), (repair, REPAIRED))
                      for c, (q, scale) in quantities.items()])
    summary = _mean_sd(long, ["experiment", "quantity", "line", "alpha"], "value")
    lines = [m + tag for tag in ("", REPAIRED) for m in methods]
    colours = {m + tag: palette[m] for m in methods for tag in ("", REPAIRED)}
    styles = {m + REPAIRED: {"linestyle": "--", "alpha": 0.8} for m in methods}
    bn = df.groupby("experiment")["bn"].first() if "bn" in df.columns else pd.Series()

    def title(exp: str, quantity: str) -> str:
        mode = bn.get(exp, "none")
        return f"{exp} · {quantity}" + ("" if mode == "none" else f"\n{BN_LABELS.get(mode, mode)}")

    names = [q for q, _ in quantities.values()]
    pages = _layout(_facets(summary, "quantity", names, title), extra=0.8)
    first: dict[str, plt.Axes] = {}
    for ax, facet in _panels(pages):
        _profile(ax, facet.rows, "alpha", "line", lines, colours, styles=styles)
        ax.set(xlabel=ALPHA_LABEL, xlim=(0, 1))
        first.setdefault(facet.experiment, ax)
        _shared_y([(ax, facet)], facet.key, by="title")  # its own range: one panel per model
    for exp, ax in first.items():  # a legend per experiment: the barriers differ
        present = [m for m in methods if (exp, m) in bar.index]
        labels = [f"{m} ({bar.loc[(exp, m), 'error_barrier'] * 100:.1f} pp"
                  f" / {bar.loc[(exp, m), 'loss_barrier']:.2f})" for m in present]
        handles = [plt.Line2D([], [], color=palette[m], marker="o", markersize=3.5)
                   for m in present]
        if (repair["experiment"] == exp).any():
            labels.append("dashed: the same with REPAIR")
            handles.append(plt.Line2D([], [], color="0.4", linestyle="--"))
        ax.figure.legend(handles, labels, loc="outside lower center", frameon=False,
                         ncol=_legend_columns(labels, PAGE_WIDTH),
                         title="method (barrier: test error / test loss)")
    _save([page.fig for page in pages], out_pdf)


def fig_alignment(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 2: test barriers per alignment method, with and without BatchNorm reset.

    ``table`` is either the barrier table of `alignment_table` (has ``loss_barrier``) or the
    raw LMC table (barriers are computed). One row per experiment: a test-error barrier (pp)
    panel and a test-loss barrier panel; bars per method, hue = BN mode ("none" for models
    without BatchNorm), mean over pairs with sd error bars, each bar labelled with its value
    (so a zero barrier reads "0.0" instead of looking like a missing bar).
    """
    bar = table if "loss_barrier" in table.columns else alignment_table(table)
    bar = bar if "bn" in bar.columns else bar.assign(bn="none")
    bar = _test_rows(bar, "loss_barrier", "fig_alignment")
    quantities = {"test error barrier (pp)": ("error_barrier", 100.0, "{:.1f}"),
                  "test loss barrier": ("loss_barrier", 1.0, "{:.2f}")}
    long = pd.concat([bar.assign(quantity=q, value=bar[c] * scale)
                      for q, (c, scale, _) in quantities.items()], ignore_index=True)
    long["BatchNorm"] = _relabel(long["bn"], BN_LABELS)
    modes = _levels(long["bn"], BN_LABELS)
    palette = _palette(modes, "Set2")
    methods = _methods(long["method"])
    summary = _mean_sd(long, ["experiment", "quantity", "method", "BatchNorm"], "value")
    pages = _layout(_facets(summary, "quantity", list(quantities)))
    for ax, facet in _panels(pages):
        present = [m for m in methods if (facet.rows["method"] == m).any()]
        _grouped_bars(ax, facet.rows, "method", "BatchNorm", present, modes, palette,
                      quantities[facet.key][2])
        _reference_line(ax, 0.0)
        ax.set(xlabel="method", ylabel=facet.key)
        _rotate_x(ax)
    _finish(pages, out_pdf, order=modes)


def fig_llfc(llfc: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 3: LLFC — E[1 − cos] per layer between f(θ_α) and αf(θ_A) + (1−α)f(θ_B).

    ``llfc`` columns: experiment, method, pair, alpha, layer, layer_index, sample,
    one_minus_cos_alpha, one_minus_cos_ab, coef_c. One panel per experiment × method (two
    to a row); x = layer, one line per α plus the baseline 1 − cos_AB (dashed); mean over
    samples and pairs, ±1 sd band. The panels of an experiment share y, symlog when the means
    span more than two decades (exact zeros, e.g. at the first Linear layer, stay at 0).
    """
    long = _llfc_long(llfc)
    if long.empty:
        raise ValueError("fig_llfc: no 1 − cos values")
    alphas = sorted(llfc["alpha"].dropna().unique())
    baseline = "1 − cos_AB (baseline)"
    hue_order = [baseline] + [f"1 − cos_α, α={a:g}" for a in alphas]
    summary = _mean_sd(long, ["experiment", "method", "layer", "layer_index", "quantity"],
                       "value")
    # α levels apart by hue (blue, green, purple: no two oranges) and by marker; baseline grey
    colours = sns.color_palette("colorblind", 5)
    palette = {baseline: "0.4", **{level: colours[(0, 2, 4)[i % 3]]
                                   for i, level in enumerate(hue_order[1:])}}
    markers = ["v", "o", "^", "s", "D"]
    styles = {baseline: {"linestyle": "--"},
              **{level: {"marker": markers[i % 5], "markersize": 4}
                 for i, level in enumerate(hue_order[1:])}}
    layers = _layers_of(summary)
    pages = _layout(_facets(summary, "method"))
    for ax, facet in _panels(pages):
        _profile(ax, facet.rows, "layer", "quantity", hue_order, palette,
                 x_order=layers[facet.experiment], nonneg=True, styles=styles)
        _category_axis(ax, layers[facet.experiment], PANEL[0] - 0.9, "layer")
    _shared_y(_panels(pages), "E[1 − cos] (mean ± sd)", "mean")
    _finish(pages, out_pdf, order=hue_order)


def _llfc_long(llfc: pd.DataFrame) -> pd.DataFrame:
    """Tidy table with one value per (…, layer, sample, quantity).

    ``1 - cos_AB`` does not depend on α, so it is taken once per sample (not once per α,
    which would shrink its sd); ``1 - cos_α`` gets one series per α. NaNs (zero feature
    vectors) are dropped so means and sds ignore them.
    """
    ids = ["experiment", "method", "pair", "layer", "layer_index", "sample"]
    base = llfc.drop_duplicates(ids)[ids + ["one_minus_cos_ab"]]
    base = base.rename(columns={"one_minus_cos_ab": "value"})
    base["quantity"] = "1 − cos_AB (baseline)"
    inter = llfc[ids + ["alpha", "one_minus_cos_alpha"]]
    inter = inter.rename(columns={"one_minus_cos_alpha": "value"})
    inter["quantity"] = [f"1 − cos_α, α={a:g}" for a in inter["alpha"]]
    out = pd.concat([base, inter.drop(columns="alpha")], ignore_index=True)
    return out.dropna(subset=["value"])


def fig_coef(llfc: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 4: the LLFC scale c (c·f(θ_α) ≈ αf(θ_A) + (1−α)f(θ_B)) per layer and α.

    ``llfc`` is the LLFC table (see `fig_llfc`). One panel per experiment × method (two to a
    row, y shared within an experiment); x = layer, one line per α = mean c over samples and
    pairs, ±1 sd band; dashed line at c = 1 (what LLFC predicts).
    """
    df = llfc.dropna(subset=["coef_c"])
    if df.empty:
        raise ValueError("fig_coef: no coef_c values")
    alphas = [f"α = {a:g}" for a in sorted(df["alpha"].unique())]
    df = df.assign(α=[f"α = {a:g}" for a in df["alpha"]])
    summary = _mean_sd(df, ["experiment", "method", "layer", "layer_index", "α"], "coef_c")
    palette = _palette(alphas, "viridis")
    layers = _layers_of(summary)
    pages = _layout(_facets(summary, "method"))
    for ax, facet in _panels(pages):
        _profile(ax, facet.rows, "layer", "α", alphas, palette, x_order=layers[facet.experiment])
        _reference_line(ax, 1.0, "LLFC: c = 1")
        _category_axis(ax, layers[facet.experiment], PANEL[0] - 0.9, "layer")
    # c is a ratio: one method far from 1 would flatten the others on a linear axis
    _shared_y(_panels(pages), "coefficient c (mean ± sd)", "mean", decades=1.0)
    _finish(pages, out_pdf, order=[*alphas, "LLFC: c = 1"])


def fig_weak_additivity(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 5: weak additivity of ReLU, Dist_σ per activation layer (ReLU; GELU in a ViT), at
    α = 0.5.

    ``table`` columns: experiment, method, pair, alpha, layer, layer_index, activation, sample,
    dist_sigma, dist_sigma_shuffled. Per experiment only the α closest to 0.5 is kept. One
    full-width panel per experiment: x = activation layer, one line per method (mean Dist_σ ± sd
    over samples and pairs) and, dashed, the baseline ``dist_sigma_shuffled`` (mean over all
    methods' rows); symlog y when the means span more than two decades. The definition of
    Dist_σ is the legend title (too long for a y label).
    """
    df = table.dropna(subset=["alpha"])
    gap = (df["alpha"] - 0.5).abs()
    df = df[np.isclose(gap, gap.groupby(df["experiment"]).transform("min"))]
    long = pd.concat([df.assign(series=df["method"], value=df["dist_sigma"]),
                      df.assign(series=SHUFFLED, value=df["dist_sigma_shuffled"])],
                     ignore_index=True).dropna(subset=["value"])
    if long.empty:
        raise ValueError("fig_weak_additivity: no Dist_σ values")
    series = [*_methods(df["method"]), SHUFFLED]
    palette = {**_method_palette(series[:-1]), SHUFFLED: (0.45, 0.45, 0.45)}
    summary = _mean_sd(long, ["experiment", "alpha", "layer", "layer_index", "series"], "value")
    alpha = summary.groupby("experiment")["alpha"].first()
    layers = _layers_of(summary)
    kinds = (df.groupby("experiment")["activation"].agg(lambda a: "/".join(sorted(set(a))))
             if "activation" in df else pd.Series("ReLU", index=alpha.index))
    panel = (PAGE_WIDTH, 3.2)
    pages = _layout(_facets(summary, title=lambda exp, _: f"{exp} · α = {alpha[exp]:g}"),
                    ncols=1, panel=panel)
    for ax, facet in _panels(pages):
        _profile(ax, facet.rows, "layer", "series", series, palette,
                 x_order=layers[facet.experiment], nonneg=True,
                 styles={SHUFFLED: {"linestyle": "--"}})
        _category_axis(ax, layers[facet.experiment], panel[0] - 0.9, f"{kinds[facet.experiment]} layer")
    _shared_y(_panels(pages), "Dist_σ (mean ± sd)", "mean")
    _finish(pages, out_pdf, order=series, title=DIST_SIGMA_LABEL)


def fig_commutativity(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 6: commutativity Dist_com per layer beside the baselines Dist_W and Dist_H.

    ``table`` columns: experiment, method, pair, layer, layer_index, dist_com, dist_w,
    dist_h (one row per layer and pair). One panel per experiment × method (two to a row);
    x = layer, one line per quantity (mean ± sd over pairs). y is shared within an
    experiment and symlog when the means span more than two decades, so the exact zeros (Dist_com
    and Dist_H at the first layer, whose input is the same for both nets) show as 0.
    """
    present = [q for q in COMMUTATIVITY if q in table.columns]
    ids = ["experiment", "method", "pair", "layer", "layer_index"]
    long = table.melt(id_vars=[c for c in ids if c in table.columns], value_vars=present,
                      var_name="quantity", value_name="value").dropna(subset=["value"])
    if long.empty:
        raise ValueError("fig_commutativity: no distances")
    long["quantity"] = long["quantity"].map(COMMUTATIVITY)
    series = [COMMUTATIVITY[q] for q in present]
    palette = _palette(series, "Dark2")
    summary = _mean_sd(long, ["experiment", "method", "layer", "layer_index", "quantity"],
                       "value")
    layers = _layers_of(summary)
    pages = _layout(_facets(summary, "method"))
    for ax, facet in _panels(pages):
        _profile(ax, facet.rows, "layer", "quantity", series, palette,
                 x_order=layers[facet.experiment], nonneg=True,
                 styles={s: {"linestyle": "--"} for s in series[1:]})
        _category_axis(ax, layers[facet.experiment], PANEL[0] - 0.9, "layer")
    _shared_y(_panels(pages), "distance (mean ± sd)", "mean")
    _finish(pages, out_pdf, order=series, title=DIST_LABEL)


STITCH_LABELS = {"b": "A's feature into B", "a": "B's feature into A"}


def fig_stitching(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 12: model stitching (LLFC appendix) — one network's feature at a layer fed into
    the rest of the other.

    ``table`` columns: experiment, method, pair, layer, layer_index, into (a or b: the network
    that runs the rest), split, loss, error; rows with layer "(none)" are A and B on their
    own. One panel per experiment × method (two to a row); x = stitched layer, test error
    (%) of A's feature into B and of B's into A (mean ± sd over pairs); dashed lines at A's
    and B's own errors. y shared within an experiment.
    """
    df = _test_rows(table, "error", "fig_stitching").assign(value=lambda d: d["error"] * 100)
    own = df[df["layer"] == "(none)"].groupby(["experiment", "method", "into"])["value"].mean()
    stitched = df[df["layer"] != "(none)"]
    if stitched.empty:
        raise ValueError("fig_stitching: no stitched rows")
    series = _levels(stitched["into"], STITCH_LABELS)
    stitched = stitched.assign(into=_relabel(stitched["into"], STITCH_LABELS))
    summary = _mean_sd(stitched, ["experiment", "method", "layer", "layer_index", "into"], "value")
    palette = _palette(series, "Set1")
    layers = _layers_of(summary)
    pages = _layout(_facets(summary, "method"))
    for ax, facet in _panels(pages):
        _profile(ax, facet.rows, "layer", "into", series, palette,
                 x_order=layers[facet.experiment], nonneg=True)
        for net, style in (("a", "--"), ("b", ":")):
            y = own.get((facet.experiment, facet.key, net), np.nan)
            if pd.notna(y):
                ax.axhline(y, color="k", linestyle=style, linewidth=1.1, zorder=1,
                           label=f"model {net.upper()} on its own")
        _category_axis(ax, layers[facet.experiment], PANEL[0] - 0.9, "stitched layer")
    _shared_y(_panels(pages), "test error (%)")
    _finish(pages, out_pdf, order=[*series, "model A on its own", "model B on its own"])
