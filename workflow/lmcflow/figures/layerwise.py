"""Layer-wise LMC figures: single-layer (fig7) and cumulative (fig8) barriers, robustness
(fig9), the training subspace (fig10) and the linear toy (fig11).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .layout import (
    ALL_LAYERS, ALPHA_LABEL, INTO_LABELS, MIN_FONT, ORDER_AXIS, ORDER_LABELS, PAGE_WIDTH,
    PANEL, SUBSPACE_LABELS, TOY_LABELS, _Facet, _category_axis, _facets, _finish, _layer_order,
    _layers_of, _layout, _levels, _mean_sd, _methods, _ordered, _palette, _panels, _profile,
    _reference_line, _relabel, _save, _shared_y, _test_rows,
)


def _barrier_heatmap(ax: plt.Axes, sub: pd.DataFrame, limit: float,
                     panel: tuple[float, float]):
    """Layer (rows, full model on top) × epoch heatmap of the mean test-loss barrier.

    Colours run from −limit to +limit (centred at 0) so that panels can be compared. Cells
    are labelled with their value only where the panel leaves room for 8-pt text. Returns
    the mesh (for the colour bar).
    """
    layers = sub[(sub["layer"] != ALL_LAYERS) & sub["into"].isin(["a", "b"])]
    grid = (layers.pivot_table(index="layer", columns="epoch", values="loss_barrier",
                               aggfunc="mean").reindex(_layer_order(layers)))
    full = sub[sub["layer"] == ALL_LAYERS].groupby("epoch")["loss_barrier"].mean()
    if not full.empty:
        grid = pd.concat([full.rename(ALL_LAYERS).to_frame().T, grid]).sort_index(axis=1)
    values = grid.to_numpy(dtype=float)
    rows, cols = values.shape
    # matplotlib directly: sns.heatmap redraws the whole figure on every call (slow grids)
    mesh = ax.pcolormesh(np.arange(cols + 1) - 0.5, np.arange(rows + 1) - 0.5,
                         np.ma.masked_invalid(values), cmap="RdBu_r", vmin=-limit, vmax=limit,
                         edgecolors="white", linewidth=0.5)
    # the room a cell gets: the panel less the layer names, colour bar share and margins
    names = max(len(str(s)) for s in grid.index)
    cell_w = (panel[0] - 0.8 - 0.06 * names) / cols
    cell_h = (panel[1] - 1.2) / rows
    if cell_w >= 0.36 and cell_h >= 0.16:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):  # |v| < 0.005 is written 0.00, not -0.00
                ax.text(j, i, f"{0.0 if abs(v) < 0.005 else v:.2f}", ha="center", va="center",
                        fontsize=MIN_FONT, color="white" if abs(v) > 0.6 * limit else "black")
    ax.grid(False)
    _category_axis(ax, [f"{e:g}" for e in grid.columns], panel[0] - 1.4,
                   "round" if _federated(sub) else "checkpoint epoch")
    _category_axis(ax, list(grid.index), panel[1] - 1.2, "layer", axis="y")
    plt.setp(ax.get_xticklabels(), rotation=0, ha="center")
    if not full.empty:
        ax.axhline(0.5, color="k", linewidth=2)  # between the full model and the layers
    return mesh


def _barrier_profile(ax: plt.Axes, sub: pd.DataFrame, palette: dict) -> None:
    """Barrier per layer (one line per into A/B, mean ± sd over pairs), a dashed line at
    the full-model barrier and a thin one at 0."""
    layers = sub[sub["layer"] != ALL_LAYERS]
    layers = layers.assign(into=_relabel(layers["into"], INTO_LABELS))
    summary = _mean_sd(layers, ["layer", "layer_index", "into"], "loss_barrier")
    order = _layer_order(summary)
    _profile(ax, summary, "layer", "into", list(palette), palette, x_order=order)
    _category_axis(ax, order, PANEL[0] - 0.9, "layer")
    _reference_line(ax, sub.loc[sub["layer"] == ALL_LAYERS, "loss_barrier"].mean(), "full model")
    _reference_line(ax, 0.0)
    ax.set_title(f"{ax.get_title()} ({_time_label(sub['method'].iloc[0], sub['epoch'].iloc[0])})")


def fig_layer_barriers(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 7: single-layer barriers (Adilova et al.): only one layer interpolated.

    ``table`` columns: experiment, method, pair, epoch, layer, layer_index, into, split,
    loss, error, loss_barrier, error_barrier; rows with layer "(all)" hold the full-model
    barrier. Test split, loss barrier; one panel per experiment × method (two to a row). With
    several epochs: heatmap layer × epoch (mean over into A/B and pairs, full model as top
    row, diverging colours centred at 0, one scale for every panel, a colour bar per
    experiment); with one epoch: the barrier per layer, one line per into A/B, a dashed line at
    the full-model barrier (y shared within the experiment).
    """
    df = _test_rows(table, "loss_barrier", "fig_layer_barriers")
    palette = _palette(_levels(df.loc[df["layer"] != ALL_LAYERS, "into"], INTO_LABELS), "Set2")
    cells = df[df["into"].isin(["a", "b"]) | (df["layer"] == ALL_LAYERS)]
    limit = cells.groupby(["experiment", "method", "layer", "epoch"])["loss_barrier"].mean()
    limit = max(float(limit.abs().max()), 1e-12)
    panel = (PANEL[0], 3.4)
    pages = _layout(_facets(df, "method"), panel=panel)
    heatmaps: dict[object, tuple[list, object]] = {}  # subfigure -> (its heatmap axes, a mesh)
    profiles = []
    for ax, facet in _panels(pages):
        if facet.rows["epoch"].nunique() > 1:
            mesh = _barrier_heatmap(ax, facet.rows, limit, panel)
            heatmaps.setdefault(ax.figure, ([], mesh))[0].append(ax)
        else:
            _barrier_profile(ax, facet.rows, palette)
            profiles.append((ax, facet))
    for sub, (axes, mesh) in heatmaps.items():
        sub.colorbar(mesh, ax=axes, shrink=0.8, aspect=30,
                     label="test loss barrier\n(mean over into A/B and pairs)")
    _shared_y(profiles, "test loss barrier")
    _finish(pages, out_pdf, order=[*palette, "full model"])


def _federated(rows: pd.DataFrame) -> bool:
    """Rows of federated pairs only: their ``epoch`` column holds rounds."""
    return bool(rows["method"].astype(str).str.startswith("federated_").all())


def _time_label(method: str, epoch: float) -> str:
    """"epoch e", or "round r" for a federated pair (its ``epoch`` column is the round)."""
    return f"{'round' if str(method).startswith('federated_') else 'epoch'} {epoch:g}"


def _epoch_palette(labels: Sequence[tuple[float, str]]) -> dict:
    """(epoch, label) along training from light to dark (viridis), the final one darkest."""
    labels = sorted(set(labels))
    colours = sns.color_palette("viridis_r", len(labels)) if len(labels) > 1 else [(0, 0, 0)]
    return {label: c for (_, label), c in zip(labels, colours)}


def fig_cumulative(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 8: cumulative barriers — layers averaged one by one, shallow-first, deep-first
    or in seeded random orders.

    ``table`` columns: experiment, method, pair, order (shallow, deep, random1, …), step,
    layer (the one added at that step), into, split, loss, error, loss_barrier, error_barrier
    (and maybe epoch). Test split; one panel per experiment × method × order kind, three to a
    row (shallow-first and deep-first name their added layers on the x axis; the random
    orders share a panel, x = number of layers averaged). Loss barrier vs step, mean ± sd over
    into A/B, pairs (and random orders); with several epochs one line per epoch (light to
    dark, the final one darkest), else one line per into A/B. y shared within an experiment.
    """
    df = _test_rows(table, "loss_barrier", "fig_cumulative")
    df = df.assign(kind=[o if o in ORDER_LABELS else "random" for o in df["order"]])
    epochs = sorted(df["epoch"].unique()) if "epoch" in df.columns else []
    if len(epochs) > 1:
        df = df.assign(hue=[_time_label(m, e) for m, e in zip(df["method"], df["epoch"])])
        hues = _epoch_palette(list(zip(df["epoch"], df["hue"])))
    else:
        hues = _palette(_levels(df["into"], INTO_LABELS), "Set1")
        df = df.assign(hue=_relabel(df["into"], INTO_LABELS))
    kinds = _ordered(df["kind"], ("shallow", "deep", "random"))
    df = df.assign(panel=[f"{m} · {k}" for m, k in zip(df["method"], df["kind"])])
    # random orders add different layers at a step: only the step is a common x
    df.loc[df["kind"] == "random", "layer"] = ""
    summary = _mean_sd(df, ["experiment", "method", "kind", "panel", "step", "layer", "hue"],
                       "loss_barrier")
    keys = {f"{m} · {k}": (m, k) for m in _methods(df["method"]) for k in kinds}
    labels = {**ORDER_LABELS, "random": "random orders"}
    panel = (PAGE_WIDTH / 3, 2.4)
    pages = _layout(_facets(summary, "panel", list(keys), lambda exp, key: (
        f"{exp} · {keys[key][0]}\n{labels[keys[key][1]]}")), ncols=3, panel=panel)
    for ax, facet in _panels(pages):
        kind = keys[facet.key][1]
        added = facet.rows.drop_duplicates("step").sort_values("step")
        _profile(ax, facet.rows, "step", "hue", list(hues), hues, x_order=list(added["step"]))
        _reference_line(ax, 0.0)
        if kind == "random":
            _category_axis(ax, [str(s) for s in added["step"]], panel[0] - 0.7,
                           "layers averaged")
        else:
            _category_axis(ax, [str(s) for s in added["layer"]], panel[0] - 0.7,
                           f"layer added, {ORDER_AXIS.get(kind, kind)}")
    _shared_y(_panels(pages), "test loss barrier")
    _finish(pages, out_pdf, order=list(hues))


def fig_robustness(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 9: per-layer robustness — one layer of A moved along the interpolation
    direction (towards B) vs along random directions of the same norm.

    ``table`` columns: experiment, method, pair, layer, layer_index, direction, draw, step,
    split, loss, error, norm (and maybe epoch). Test split; one panel per experiment × method
    (two to a row); x = perturbed layer; dashed line at the step-0 loss (model A, final
    epoch). With one epoch: one line per direction × step ≠ 0 (test loss, mean ± sd over
    draws and pairs). With several epochs: the largest step only, one colour per epoch (light
    to dark), solid for the interpolation direction and dotted for random ones. y shared
    within an experiment, log when the means span more than a decade.
    """
    df = _test_rows(table, "loss", "fig_robustness")
    epochs = sorted(df["epoch"].unique()) if "epoch" in df.columns else []
    last = df[df["epoch"] == epochs[-1]] if epochs else df
    at_a = np.isclose(last["step"], 0.0)
    base = last[at_a].groupby(["experiment", "method"])["loss"].mean()
    moved = df[~np.isclose(df["step"], 0.0)]
    if moved.empty:
        raise ValueError("fig_robustness: no rows with step != 0")
    directions = _ordered(moved["direction"], ("interpolation", "random"))
    if len(epochs) > 1:
        moved = moved[np.isclose(moved["step"], moved["step"].max())]
        times = [_time_label(m, e) for m, e in zip(moved["method"], moved["epoch"])]
        colours = _epoch_palette(list(zip(moved["epoch"], times)))
        hue_order = [f"{d}, {e}" for e in colours for d in directions]
        palette = {f"{d}, {e}": c for e, c in colours.items() for d in directions}
        styles = {f"random, {e}": {"linestyle": ":"} for e in colours}
        moved = moved.assign(perturbation=[f"{d}, {t}" for d, t in zip(moved["direction"], times)])
    else:
        hue_order = [f"{d}, step {s:g}" for d in directions for s in sorted(moved["step"].unique())]
        palette, styles = _palette(hue_order, "Paired"), None
        moved = moved.assign(perturbation=[f"{d}, step {s:g}"
                                           for d, s in zip(moved["direction"], moved["step"])])
    summary = _mean_sd(moved, ["experiment", "method", "layer", "layer_index", "perturbation"],
                       "loss")
    layers = _layers_of(summary)
    pages = _layout(_facets(summary, "method"))
    for ax, facet in _panels(pages):
        _profile(ax, facet.rows, "layer", "perturbation", hue_order, palette,
                 x_order=layers[facet.experiment], nonneg=True, styles=styles)
        _reference_line(ax, base.get((facet.experiment, facet.key), np.nan), "model A (step 0)")
        _category_axis(ax, layers[facet.experiment], PANEL[0] - 0.9, "perturbed layer")
    # losses are positive; a log axis keeps the small changes visible beside a large one
    _shared_y(_panels(pages), "test loss (mean ± sd)", "mean", decades=1.0)
    step = f", step {moved['step'].max():g} (the whole way to B's layer)" if len(epochs) > 1 else ""
    _finish(pages, out_pdf, order=[*hue_order, "model A (step 0)"],
            title=f"direction{step}; dotted: random" if len(epochs) > 1 else None)


def fig_subspace(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 10: perturbations of a whole endpoint along the interpolation line (away from
    the other endpoint), a random direction in the training subspace, or orthogonal to it,
    as a function of their size.

    ``table`` columns: experiment, method, pair, layer, direction, endpoint ("a" or "b": the
    net perturbed), draw, norm, norm_fraction (ε / ‖θ_A − θ_B‖), split, loss, error; only
    layer "(all)" rows are plotted. Test loss vs norm_fraction (``norm`` in a table without
    it), one line per direction (mean ± sd over endpoints, draws and pairs), one panel per
    experiment × method (two to a row); y shared within an experiment, log when the means
    span more than a decade.
    """
    df = _test_rows(table[table["layer"] == ALL_LAYERS], "loss", "fig_subspace")
    x, xlabel = (("norm_fraction", "perturbation size ε / ‖θ_A − θ_B‖")
                 if "norm_fraction" in df.columns else ("norm", "perturbation norm ε"))
    directions = _levels(df["direction"], SUBSPACE_LABELS)
    df = df.assign(direction=_relabel(df["direction"], SUBSPACE_LABELS))
    summary = _mean_sd(df, ["experiment", "method", "direction", x], "loss")
    palette = _palette(directions, "Dark2")
    pages = _layout(_facets(summary, "method"))
    for ax, facet in _panels(pages):
        _profile(ax, facet.rows, x, "direction", directions, palette, nonneg=True)
        ax.set_xlabel(xlabel)
    _shared_y(_panels(pages), "test loss (mean ± sd)", "mean", decades=1.0)
    _finish(pages, out_pdf, order=directions, title="direction of the perturbation")


TOY_INTO = {"a": "layer averaged into A\n(the other layer kept from A)",
            "b": "layer averaged into B\n(the other layer kept from B)"}


def fig_linear_toy(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 11: deep linear toy w2·w1·x — loss along α when both layers or only one is
    interpolated.

    ``table`` columns (`toy.linear_toy`): path ("full", "layer1", "layer2"), into
    ("both" for the full path, "a" or "b": whose other layer is kept), alpha, loss, barrier
    (loss at α = ½ minus the mean of the full endpoints' losses; computed if missing). Two
    panels, into A and into B, each with the full path (dashed, the same in both) and the two
    single-layer paths; the legend below each panel gives every path's barrier. y is symlog
    (shared) since the barriers range from ~0.2 to 16 and the endpoints' losses are 0.
    """
    df = table.dropna(subset=["alpha", "loss"])
    if df.empty:
        raise ValueError("fig_linear_toy: no loss values")
    if "into" not in df.columns:  # an older table: single-layer paths kept the rest of A
        df = df.assign(into=np.where(df["path"] == "full", "both", "a"))
    if "barrier" not in df.columns:
        ends = df[(df["path"] == "full") & df["alpha"].isin([0.0, 1.0])]["loss"].mean()
        half = df[np.isclose(df["alpha"], 0.5)].groupby(["path", "into"])["loss"].mean()
        df = df.assign(barrier=[half.get((p, i), np.nan) - ends
                                for p, i in zip(df["path"], df["into"])])
    intos = [i for i in TOY_INTO if (df["into"] == i).any()] or ["both"]
    full = df[df["path"] == "full"]
    palette = _palette([p for p in TOY_LABELS if p != "full"], "Set1")
    fig, axes = plt.subplots(1, len(intos), figsize=(PAGE_WIDTH, 4.4), layout="constrained",
                             squeeze=False)
    panels = []
    for ax, into in zip(axes[0], intos):
        sub = pd.concat([full, df[df["into"] == into]]) if into != "both" else full
        for path in _ordered(sub["path"], tuple(TOY_LABELS)):
            curve = sub[sub["path"] == path].groupby("alpha")[["loss", "barrier"]].mean()
            ax.plot(curve.index, curve["loss"], marker="o", markersize=3,
                    color="k" if path == "full" else palette.get(path),
                    linestyle="--" if path == "full" else "-",
                    label=f"{TOY_LABELS.get(path, path)}: barrier {curve['barrier'].mean():.2f}")
        ax.axvline(0.5, color="0.5", linestyle=":", linewidth=1)  # where the barrier is read
        ax.set(xlabel=ALPHA_LABEL, xlim=(0, 1),
               title=f"deep linear toy w2·w1·x\n{TOY_INTO.get(into, 'both layers')}")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False,
                  title="interpolated weights")
        panels.append((ax, _Facet("toy", into, ax.get_title(), sub)))
    _shared_y(panels, "loss", "loss")
    _save(fig, out_pdf)
