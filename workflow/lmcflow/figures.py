"""Paper figures, one function per figure over a tidy (long) DataFrame.

Every function takes ``(table, out_pdf)``, writes ``out_pdf`` and a PNG beside it (same stem,
for quick viewing), creates parent directories, never mutates its input, and closes its
figure. NaN values are dropped before aggregating; a figure with nothing left to plot raises
ValueError. The seaborn style is set once at import so all figures look alike. ``FIGURES``
maps the figure id used by the workflow to its function (DESIGN §4).

Convention: θ_α = α·θ_A + (1−α)·θ_B, so α = 1 is model A. Methods are shown in the order
naive, spawning, weight_matching, activation_matching (others after, sorted), each with the
same colour in every figure; layers in the order of ``layer_index``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are built on cluster nodes / CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .io import atomic_path  # noqa: E402
from .metrics import barriers  # noqa: E402

__all__ = ["fig_lmc", "fig_alignment", "fig_llfc", "fig_coef", "fig_weak_additivity",
           "fig_commutativity", "fig_layer_barriers", "fig_cumulative", "fig_robustness",
           "fig_subspace", "fig_linear_toy", "alignment_table", "FIGURES"]

sns.set_theme(context="paper", style="whitegrid", font_scale=1.3)

ALPHA_LABEL = "α (0 = model B, 1 = model A)"
LOG_FLOOR = 1e-6  # 1 - cos and distances can be exactly 0 or slightly negative by rounding
METHOD_ORDER = ("naive", "spawning", "weight_matching", "activation_matching")
ALL_LAYERS = "(all)"  # layer name of the full-model rows in the layer-wise tables
BN_LABELS = {"none": "no BatchNorm", "reset": "BN statistics reset",
             "interpolate": "BN statistics interpolated"}
INTO_LABELS = {"a": "layer interpolated into A", "b": "layer interpolated into B",
               "both": "all layers interpolated"}
ORDER_LABELS = {"shallow": "shallow-first", "deep": "deep-first"}
TOY_LABELS = {"full": "full (w1 and w2)", "layer1": "layer 1 only (w1)",
              "layer2": "layer 2 only (w2)"}
DIST_LABEL = "dist(x, y) = ‖x − y‖² / (‖x‖‖y‖)"
DIST_SIGMA_LABEL = "Dist_σ = ‖σ(αH̃_A+(1−α)H̃_B) − (ασ(H̃_A)+(1−α)σ(H̃_B))‖² / (‖·‖‖·‖)"
SHUFFLED = "shuffled samples (baseline)"
COMMUTATIVITY = {"dist_com": "Dist_com (commutativity)", "dist_w": "Dist_W = dist(W_A, W_B)",
                 "dist_h": "Dist_H = dist(H_A, H_B)"}


# --------------------------------------------------------------------------- helpers


def _save(fig: plt.Figure, out_pdf: str | Path) -> None:
    """Write the PDF and a PNG with the same stem (each atomically), then free the figure."""
    out_pdf = Path(out_pdf)
    for path, options in ((out_pdf, {"format": "pdf"}),
                          (out_pdf.with_suffix(".png"), {"format": "png", "dpi": 120})):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, bbox_inches="tight", **options)
    plt.close(fig)


def _ordered(values: Iterable, first: Sequence = ()) -> list:
    """Distinct non-NaN ``values``: those in ``first`` in that order, then the rest sorted."""
    present = list(pd.unique(pd.Series(list(values), dtype=object).dropna()))
    return [v for v in first if v in present] + sorted((v for v in present if v not in first),
                                                       key=str)


def _relabel(values: Iterable, labels: dict) -> list:
    """Display names of ``values`` (those missing from ``labels`` are kept as they are)."""
    return [labels.get(v, v) for v in values]


def _levels(values: Iterable, labels: dict) -> list:
    """Display names of the distinct ``values``, known ones in the order of ``labels``."""
    return _relabel(_ordered(values, tuple(labels)), labels)


def _methods(values: Iterable) -> list[str]:
    """Methods present, in the paper's order (naive, spawning, weight/activation matching)."""
    return _ordered(values, METHOD_ORDER)


def _method_palette(methods: Sequence[str]) -> dict[str, tuple]:
    """One colour per method, the same in every figure (by position in METHOD_ORDER)."""
    colors = sns.color_palette("colorblind", 10)
    others = [m for m in methods if m not in METHOD_ORDER]
    return {m: colors[(METHOD_ORDER.index(m) if m in METHOD_ORDER
                       else len(METHOD_ORDER) + others.index(m)) % len(colors)] for m in methods}


def _palette(levels: Sequence, name: str = "colorblind") -> dict:
    return dict(zip(levels, sns.color_palette(name, len(levels))))


def _layer_order(df: pd.DataFrame) -> list[str]:
    """Layer names of ``df`` by ``layer_index`` (first appearance where there is none)."""
    cols = ["layer", "layer_index"] if "layer_index" in df.columns else ["layer"]
    first = df[cols].dropna(subset=["layer"]).drop_duplicates("layer")
    if "layer_index" in first.columns:
        first = first.sort_values("layer_index", kind="stable")
    return first["layer"].tolist()


def _panel_width(df: pd.DataFrame, n_hue: int, minimum: float = 4.5) -> float:
    """Panel width (inches) for grouped bars: room for every layer's ``n_hue`` bars."""
    n_layers = df.groupby("experiment")["layer"].nunique().max()
    return max(minimum, n_layers * (0.3 + 0.15 * max(n_hue, 1)) + 1.5)


def _rotate_x(ax: plt.Axes, rotation: float = 45) -> None:
    """Rotate x tick labels (layer or method names) so long names do not overlap."""
    plt.setp(ax.get_xticklabels(), rotation=rotation, ha="right", rotation_mode="anchor")


def _spans_decades(values: Iterable[float], decades: float = 2.0) -> bool:
    """Whether the positive ``values`` span more than ``decades`` orders of magnitude."""
    v = pd.Series(list(values), dtype=float)
    pos = v[v > 0]
    return len(pos) > 0 and pos.max() / max(pos.min(), LOG_FLOOR) > 10.0 ** decades


def _log_y(df: pd.DataFrame, y: str, force: bool = False) -> tuple[pd.DataFrame, bool]:
    """(copy of ``df`` with ``y`` clipped at LOG_FLOOR, True) if a log y axis is wanted.

    Log is used when forced or when the values span more than two decades.
    """
    if not (force or _spans_decades(df[y])):
        return df, False
    return df.assign(**{y: df[y].clip(lower=LOG_FLOOR)}), True


def _test_rows(table: pd.DataFrame, value: str, name: str) -> pd.DataFrame:
    """Rows of the test split (if the table has a split column) with ``value`` not NaN."""
    df = table[table["split"] == "test"] if "split" in table.columns else table
    df = df.dropna(subset=[value])
    if df.empty:
        raise ValueError(f"{name}: no test-split rows with a value in {value!r}")
    return df


def _panels(df: pd.DataFrame, cols: str | None = None, col_order: Sequence | None = None, *,
            width: float = 4.5, height: float = 3.6, sharey: bool = False):
    """Grid with one row of panels per experiment and one column per value of ``cols``.

    Returns ``(fig, panels)`` with ``panels`` a list of ``(ax, experiment, key, rows)`` for
    the non-empty panels (``key`` is None without ``cols``); empty panels say "no data".
    Titles are "experiment · key". Methods in ``cols`` are put in the paper's order. With
    ``sharey`` the panels of a row share their y axis (only the first one keeps its label).
    """
    experiments = _ordered(df["experiment"])
    if cols is None:
        keys = [None]
    else:
        keys = list(col_order) if col_order is not None else (
            _methods(df[cols]) if cols == "method" else _ordered(df[cols]))
    fig, axes = plt.subplots(len(experiments), len(keys), squeeze=False,
                             sharey="row" if sharey else False,
                             figsize=(width * len(keys), height * len(experiments)))
    panels = []
    for row, exp in zip(axes, experiments):
        for ax, key in zip(row, keys):
            sub = df[df["experiment"] == exp]
            if cols is not None:
                sub = sub[sub[cols] == key]
            ax.set_title(exp if key is None else f"{exp} · {key}")
            if sub.empty:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            panels.append((ax, exp, key, sub))
    return fig, panels


def _outer_ylabels(fig: plt.Figure) -> None:
    """Keep the y label only on the first panel of each row (for rows sharing y)."""
    for ax in fig.axes:
        if not ax.get_subplotspec().is_first_col():
            ax.set_ylabel("")


def _bars(ax: plt.Axes, data: pd.DataFrame, x: str, y: str, hue: str, order: Sequence,
          hue_order: Sequence, palette: dict, log: bool = False) -> None:
    """Grouped bars: mean of ``y`` per (x, hue), error bars = sd over the rest.

    Only the hue levels present in ``data`` take a slot, so the bars stay centred; colours
    come from ``palette`` (a dict), hence agree across panels.
    """
    present = set(data[hue])
    sns.barplot(data=data, x=x, y=y, hue=hue, order=order,
                hue_order=[h for h in hue_order if h in present], palette=palette,
                errorbar="sd", capsize=0.1, err_kws={"linewidth": 0.8}, ax=ax)
    if log:
        ax.set_yscale("log", nonpositive="clip")


def _layer_bars(ax: plt.Axes, data: pd.DataFrame, y: str, hue: str, hue_order: Sequence,
                palette: dict, ylabel: str, xlabel: str = "layer", log: bool = False) -> None:
    """Bars per layer (x, by layer_index, names rotated) and hue level."""
    _bars(ax, data, "layer", y, hue, _layer_order(data), hue_order, palette, log)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    _rotate_x(ax)


def _reference_line(ax: plt.Axes, y: float, label: str | None = None) -> None:
    """Dashed black line at ``y`` named ``label`` in the legend; a thin solid one without."""
    if pd.notna(y):
        ax.axhline(y, color="k", linestyle="--" if label else "-",
                   linewidth=1.2 if label else 0.8, label=label)


def _finish(fig: plt.Figure, out_pdf: str | Path, order: Sequence[str] = (),
            title: str | None = None, ncol: int = 6, skip: Sequence[str] = ()) -> None:
    """One legend above the panels (entries of all axes, deduplicated), layout, save.

    Entries named in ``order`` come first, in that order; those in ``skip`` (e.g. seaborn's
    subtitle entries) are left out.
    """
    entries: dict[str, object] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if not label.startswith("_") and label not in skip:
                entries.setdefault(label, handle)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    labels = [lab for lab in order if lab in entries] + [lab for lab in entries if lab not in order]
    fig.tight_layout()
    if labels:
        fig.legend([entries[lab] for lab in labels], labels, loc="lower center", title=title,
                   bbox_to_anchor=(0.5, 1.0), ncol=min(ncol, len(labels)), frameon=False)
    _save(fig, out_pdf)


def _one_bn_mode(df: pd.DataFrame) -> pd.DataFrame:
    """Keep a single BatchNorm mode per experiment if the table holds several.

    Per experiment: use ``"reset"`` (BN statistics re-estimated after interpolation, the
    meaningful curve) when present, else its only (or first) value, e.g. ``"none"`` for
    models without BatchNorm.
    """
    if "bn" not in df.columns:
        return df
    parts = []
    for _, g in df.groupby("experiment", sort=False):
        values = list(g["bn"].unique())
        parts.append(g[g["bn"] == ("reset" if "reset" in values else values[0])])
    return pd.concat(parts)


# --------------------------------------------------------------------------- figures


def fig_lmc(lmc: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 1: test error (%) and test loss along the linear path θ_α, per experiment.

    ``lmc`` columns: experiment, method, pair, alpha, split, loss, error (error as a
    fraction; maybe ``bn``). One row of panels per experiment, one line per method
    (mean over pairs, ±1 sd band when there are several pairs). The legend gives each
    method's barrier (mean over pairs) as "error in pp / loss".
    """
    df = _one_bn_mode(lmc)
    df = df[df["split"] == "test"].copy()
    if df.empty:
        raise ValueError("fig_lmc: no rows with split == 'test'")
    df["error_pct"] = df["error"] * 100.0
    bar = barriers(df.drop(columns=["error_pct"]))
    bar = bar.groupby(["experiment", "method"])[["loss_barrier", "error_barrier"]].mean()

    experiments = sorted(df["experiment"].unique())
    methods = _methods(df["method"])
    palette = _method_palette(methods)
    fig, axes = plt.subplots(len(experiments), 2, figsize=(11, 3.6 * len(experiments)),
                             squeeze=False)
    for row, exp in zip(axes, experiments):
        sub = df[df["experiment"] == exp]
        for ax, y, ylabel in ((row[0], "error_pct", "test error (%)"),
                              (row[1], "loss", "test loss")):
            sns.lineplot(data=sub, x="alpha", y=y, hue="method", hue_order=methods,
                         palette=palette, errorbar="sd", marker="o", markersize=4, ax=ax)
            ax.set(xlabel=ALPHA_LABEL, ylabel=ylabel, title=exp, xlim=(0, 1))
            ax.get_legend().remove()
        handles = [plt.Line2D([], [], color=palette[m], marker="o") for m in methods
                   if (exp, m) in bar.index]
        labels = [f"{m} (barrier {bar.loc[(exp, m), 'error_barrier'] * 100:.1f} pp"
                  f" / {bar.loc[(exp, m), 'loss_barrier']:.2f})"
                  for m in methods if (exp, m) in bar.index]
        row[1].legend(handles, labels, title="method", loc="upper left",
                      bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    _save(fig, out_pdf)


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


def fig_alignment(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 2: test barriers per alignment method, with and without BatchNorm reset.

    ``table`` is either the barrier table of `alignment_table` (has ``loss_barrier``) or the
    raw LMC table (barriers are computed). One row of panels per experiment: test-error
    barrier (pp) and test-loss barrier; bars per method, hue = BN mode ("none" for models
    without BatchNorm), mean over pairs with sd error bars.
    """
    bar = table if "loss_barrier" in table.columns else alignment_table(table)
    bar = bar if "bn" in bar.columns else bar.assign(bn="none")
    bar = _test_rows(bar, "loss_barrier", "fig_alignment")
    quantities = ["test error barrier (pp)", "test loss barrier"]
    long = pd.concat([bar.assign(quantity=quantities[0], value=bar["error_barrier"] * 100.0),
                      bar.assign(quantity=quantities[1], value=bar["loss_barrier"])],
                     ignore_index=True).dropna(subset=["value"])
    long["BatchNorm"] = _relabel(long["bn"], BN_LABELS)
    modes = _levels(long["bn"], BN_LABELS)
    palette = _palette(modes, "Set2")
    methods = _methods(long["method"])
    fig, panels = _panels(long, "quantity", quantities,
                          width=max(4.5, 0.5 + 0.45 * len(methods) * len(modes) + 1.5))
    for ax, _, quantity, sub in panels:
        _bars(ax, sub, "method", "value", "BatchNorm", methods, modes, palette)
        _reference_line(ax, 0.0)
        ax.set(xlabel="method", ylabel=quantity)
        _rotate_x(ax, 30)
    _finish(fig, out_pdf, order=modes)


def fig_llfc(llfc: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 3: LLFC — E[1 − cos] per layer between f(θ_α) and αf(θ_A) + (1−α)f(θ_B).

    ``llfc`` columns: experiment, method, pair, alpha, layer, layer_index, sample,
    one_minus_cos_alpha, one_minus_cos_ab, coef_c. Panels: rows = experiments, columns
    = methods (x axes not shared: experiments have different layers). Bars: mean over
    samples and pairs, error bars = sd. The y axis is log (values clipped at 1e-6) when
    the positive means span more than two orders of magnitude, else linear.
    """
    long = _llfc_long(llfc)
    alphas = sorted(llfc["alpha"].dropna().unique())
    hue_order = ["1 − cos_AB (baseline)"] + [f"1 − cos_α, α={a:g}" for a in alphas]
    means = long.groupby(["experiment", "method", "layer", "quantity"])["value"].mean()
    log = _spans_decades(means)
    if log:
        long["value"] = long["value"].clip(lower=LOG_FLOOR)
    palette = _palette(hue_order)
    fig, panels = _panels(long, "method", width=_panel_width(long, len(hue_order)), height=3.8)
    for ax, _, _, sub in panels:
        _layer_bars(ax, sub, "value", "quantity", hue_order, palette, "E[1 − cos]", log=log)
    _finish(fig, out_pdf, order=hue_order, ncol=len(hue_order))


def _llfc_long(llfc: pd.DataFrame) -> pd.DataFrame:
    """Tidy table with one value per (…, layer, sample, quantity) for the grouped bars.

    ``1 - cos_AB`` does not depend on α, so it is taken once per sample (not once per α,
    which would shrink its sd); ``1 - cos_α`` gets one bar per α. NaNs (zero feature
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

    ``llfc`` is the LLFC table (see `fig_llfc`). Panels: experiment × method; x = layer,
    points = mean c over samples and pairs per α, error bars = sd; dashed line at c = 1.
    Points rather than bars, since c is close to 1 and bars from 0 would hide differences.
    """
    df = llfc.dropna(subset=["coef_c"])
    if df.empty:
        raise ValueError("fig_coef: no coef_c values")
    alphas = [f"α = {a:g}" for a in sorted(df["alpha"].unique())]
    df = df.assign(α=[f"α = {a:g}" for a in df["alpha"]])
    palette = _palette(alphas, "viridis")
    fig, panels = _panels(df, "method", width=_panel_width(df, 2))
    for ax, _, _, sub in panels:
        sns.pointplot(data=sub, x="layer", y="coef_c", hue="α", order=_layer_order(sub),
                      hue_order=alphas, palette=palette, errorbar="sd", dodge=0.4,
                      linestyle="none", markersize=5, capsize=0.1, err_kws={"linewidth": 1},
                      ax=ax)
        _reference_line(ax, 1.0, "LLFC: c = 1")
        ax.set(xlabel="layer", ylabel="coefficient c (mean ± sd)")
        _rotate_x(ax)
    _finish(fig, out_pdf, order=[*alphas, "LLFC: c = 1"], ncol=len(alphas) + 1)


def fig_weak_additivity(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 5: weak additivity of ReLU, Dist_σ per ReLU layer, at α = 0.5.

    ``table`` columns: experiment, method, pair, alpha, layer, layer_index, sample,
    dist_sigma, dist_sigma_shuffled. Per experiment only the α closest to 0.5 is kept. One
    panel per experiment: bars = mean Dist_σ per method (sd error bars) and, as baseline,
    the mean of ``dist_sigma_shuffled`` over all methods' rows; log y (clipped at 1e-6).
    The definition of Dist_σ is the legend title (too long for a y label).
    """
    df = table.dropna(subset=["alpha"])
    gap = (df["alpha"] - 0.5).abs()
    df = df[np.isclose(gap, gap.groupby(df["experiment"]).transform("min"))]
    long = pd.concat([df.assign(series=df["method"], value=df["dist_sigma"]),
                      df.assign(series=SHUFFLED, value=df["dist_sigma_shuffled"])],
                     ignore_index=True).dropna(subset=["value"])
    if long.empty:
        raise ValueError("fig_weak_additivity: no Dist_σ values")
    long, _ = _log_y(long, "value", force=True)
    series = [*_methods(df["method"]), SHUFFLED]
    palette = {**_method_palette(series[:-1]), SHUFFLED: (0.6, 0.6, 0.6)}
    fig, panels = _panels(long, width=_panel_width(long, len(series), 7.5), height=4.0)
    for ax, exp, _, sub in panels:
        _layer_bars(ax, sub, "value", "series", series, palette, "Dist_σ (mean ± sd)",
                    xlabel="ReLU layer", log=True)
        ax.set_title(f"{exp} · α = {sub['alpha'].iloc[0]:g}")
    _finish(fig, out_pdf, order=series, title=DIST_SIGMA_LABEL, ncol=3)


def fig_commutativity(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 6: commutativity Dist_com per layer beside the baselines Dist_W and Dist_H.

    ``table`` columns: experiment, method, pair, layer, layer_index, dist_com, dist_w,
    dist_h (one row per layer and pair). One row of panels per experiment, one column per
    quantity; x = layer, bars per method (mean over pairs, sd error bars); log y, shared
    within a row so Dist_com can be compared with its baselines.
    """
    present = [q for q in COMMUTATIVITY if q in table.columns]
    ids = ["experiment", "method", "pair", "layer", "layer_index"]
    long = table.melt(id_vars=[c for c in ids if c in table.columns], value_vars=present,
                      var_name="quantity", value_name="value").dropna(subset=["value"])
    if long.empty:
        raise ValueError("fig_commutativity: no distances")
    long["quantity"] = long["quantity"].map(COMMUTATIVITY)
    long, _ = _log_y(long, "value", force=True)
    methods = _methods(long["method"])
    palette = _method_palette(methods)
    fig, panels = _panels(long, "quantity", [COMMUTATIVITY[q] for q in present],
                          width=_panel_width(long, len(methods)), sharey=True)
    for ax, _, _, sub in panels:
        _layer_bars(ax, sub, "value", "method", methods, palette, DIST_LABEL, log=True)
    _outer_ylabels(fig)
    _finish(fig, out_pdf, order=methods)


def _barrier_heatmap(ax: plt.Axes, sub: pd.DataFrame, limit: float) -> None:
    """Layer (rows, full model on top) × epoch heatmap of the mean test-loss barrier.

    Colours run from −limit to +limit (centred at 0) so that panels can be compared.
    """
    layers = sub[(sub["layer"] != ALL_LAYERS) & sub["into"].isin(["a", "b"])]
    grid = (layers.pivot_table(index="layer", columns="epoch", values="loss_barrier",
                               aggfunc="mean").reindex(_layer_order(layers)))
    full = sub[sub["layer"] == ALL_LAYERS].groupby("epoch")["loss_barrier"].mean()
    if not full.empty:
        grid = pd.concat([full.rename(ALL_LAYERS).to_frame().T, grid]).sort_index(axis=1)
    # matplotlib directly: sns.heatmap redraws the whole figure on every call (slow grids)
    values = grid.to_numpy(dtype=float)
    mesh = ax.pcolormesh(np.ma.masked_invalid(values), cmap="RdBu_r", vmin=-limit, vmax=limit,
                         edgecolors="white", linewidth=0.5)
    if values.size <= 100:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j + 0.5, i + 0.5, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(v) > 0.6 * limit else "black")
    ax.figure.colorbar(mesh, ax=ax, label="test loss barrier\n(mean over into A/B, pairs)")
    ax.set_xticks(np.arange(values.shape[1]) + 0.5, [f"{e:g}" for e in grid.columns])
    ax.set_yticks(np.arange(values.shape[0]) + 0.5, grid.index)
    ax.set_xlim(0, values.shape[1])
    ax.set_ylim(values.shape[0], 0)  # first row (the full model) on top
    ax.grid(False)
    if not full.empty:
        ax.axhline(1.0, color="k", linewidth=2)
    ax.set(xlabel="checkpoint epoch", ylabel="layer")
    ax.tick_params(axis="y", labelrotation=0)


def _barrier_bars(ax: plt.Axes, sub: pd.DataFrame, palette: dict) -> None:
    """Bars per layer (hue = into A/B) with a dashed line at the full-model barrier."""
    layers = sub[sub["layer"] != ALL_LAYERS]
    layers = layers.assign(into=_relabel(layers["into"], INTO_LABELS))
    if not layers.empty:
        _layer_bars(ax, layers, "loss_barrier", "into", list(palette), palette,
                    "test loss barrier")
    _reference_line(ax, sub.loc[sub["layer"] == ALL_LAYERS, "loss_barrier"].mean(), "full model")
    _reference_line(ax, 0.0)
    ax.set_title(f"{ax.get_title()} (epoch {sub['epoch'].iloc[0]:g})")


def fig_layer_barriers(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 7: single-layer barriers (Adilova et al.): only one layer interpolated.

    ``table`` columns: experiment, method, pair, epoch, layer, layer_index, into, split,
    loss, error, loss_barrier, error_barrier; rows with layer "(all)" hold the full-model
    barrier. Test split, loss barrier; one panel per experiment × method. With several
    epochs: heatmap layer × epoch (mean over into A/B and pairs, full model as top row,
    diverging colours centred at 0, same scale in every panel); with one epoch: bars per layer,
    hue = into, dashed line at the full-model barrier.
    """
    df = _test_rows(table, "loss_barrier", "fig_layer_barriers")
    n_layers = df.groupby("experiment")["layer"].nunique().max()
    n_epochs = df.groupby(["experiment", "method"])["epoch"].nunique().max()
    palette = _palette(_levels(df.loc[df["layer"] != ALL_LAYERS, "into"], INTO_LABELS), "Set2")
    fig, panels = _panels(df, "method", width=max(_panel_width(df, 2), 0.6 * n_epochs + 3.5),
                          height=max(3.8, 0.35 * n_layers + 2.0))
    cells = df[df["into"].isin(["a", "b"]) | (df["layer"] == ALL_LAYERS)]
    limit = cells.groupby(["experiment", "method", "layer", "epoch"])["loss_barrier"].mean()
    limit = max(float(limit.abs().max()), 1e-12)
    for ax, _, _, sub in panels:
        if sub["epoch"].nunique() > 1:
            _barrier_heatmap(ax, sub, limit)
        else:
            _barrier_bars(ax, sub, palette)
    _finish(fig, out_pdf, order=[*palette, "full model"])


def fig_cumulative(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 8: cumulative barriers — layers interpolated one by one, shallow- or deep-first.

    ``table`` columns: experiment, method, pair, order, step, layer (the one added at that
    step), into, split, loss, error, loss_barrier, error_barrier. Test split; loss barrier
    vs step (mean ± sd over pairs), one line per order (colour) × into (line style); the x
    tick labels name the layer added at each step ("shallow-first / deep-first").
    """
    df = _test_rows(table, "loss_barrier", "fig_cumulative")
    orders = _ordered(df["order"], tuple(ORDER_LABELS))
    order_labels, intos = _levels(df["order"], ORDER_LABELS), _levels(df["into"], INTO_LABELS)
    df = df.assign(**{"layer order": _relabel(df["order"], ORDER_LABELS),
                      "into": _relabel(df["into"], INTO_LABELS)})
    palette = _palette(order_labels, "Set1")
    fig, panels = _panels(df, "method", width=max(5.0, 0.55 * df["step"].nunique() + 2.5),
                          height=4.2)
    for ax, _, _, sub in panels:
        sns.lineplot(data=sub, x="step", y="loss_barrier", hue="layer order", style="into",
                     hue_order=order_labels, style_order=intos,
                     palette=palette, markers=True, errorbar="sd", ax=ax)
        added = sub.drop_duplicates(["order", "step"]).set_index(["order", "step"])["layer"]
        steps = sorted(sub["step"].unique())
        ax.set_xticks(steps, [" / ".join(str(added[(o, s)]) for o in orders
                                         if (o, s) in added.index) for s in steps])
        _rotate_x(ax)
        _reference_line(ax, 0.0)
        ax.set(xlabel="layer added at this step\n(" + " / ".join(order_labels) + ")",
               ylabel="test loss barrier")
    _finish(fig, out_pdf, skip=("layer order", "into"))


def fig_robustness(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 9: per-layer robustness — one layer of A moved along the interpolation
    direction (towards B) vs along random directions of the same norm.

    ``table`` columns: experiment, method, pair, layer, layer_index, direction, draw, step,
    split, loss, error, norm. Test split; panel per experiment × method; x = layer, bars =
    test loss after steps ≠ 0 (hue = direction × step; mean ± sd over draws and pairs);
    dashed line at the step-0 loss (model A). Log y if the losses span > 2 decades.
    """
    df = _test_rows(table, "loss", "fig_robustness")
    at_a = np.isclose(df["step"], 0.0)
    base = df[at_a].groupby(["experiment", "method"])["loss"].mean()
    moved = df[~at_a]
    if moved.empty:
        raise ValueError("fig_robustness: no rows with step != 0")
    directions = _ordered(moved["direction"], ("interpolation", "random"))
    hue_order = [f"{d}, step {s:g}" for d in directions for s in sorted(moved["step"].unique())]
    moved = moved.assign(perturbation=[f"{d}, step {s:g}"
                                       for d, s in zip(moved["direction"], moved["step"])])
    moved, log = _log_y(moved, "loss")
    palette = _palette(hue_order, "Paired")
    fig, panels = _panels(moved, "method", width=_panel_width(moved, len(hue_order)))
    for ax, exp, meth, sub in panels:
        _layer_bars(ax, sub, "loss", "perturbation", hue_order, palette, "test loss",
                    xlabel="perturbed layer", log=log)
        if (exp, meth) in base.index:
            _reference_line(ax, base[(exp, meth)], "model A (step 0)")
    _finish(fig, out_pdf, order=[*hue_order, "model A (step 0)"])


def fig_subspace(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 10: perturbations of the whole model along the interpolation direction, a
    random direction in the subspace, or orthogonal to it, as a function of their norm.

    ``table`` columns: experiment, method, pair, layer, direction, draw, norm, split, loss,
    error; only layer "(all)" rows are plotted. Test loss vs norm, one line per direction
    (mean ± sd over draws and pairs), panel per experiment × method. Log y if the losses
    span > 2 decades.
    """
    df = _test_rows(table[table["layer"] == ALL_LAYERS], "loss", "fig_subspace")
    directions = _ordered(df["direction"], ("interpolation", "subspace", "orthogonal"))
    palette = _palette(directions, "Dark2")
    df, log = _log_y(df, "loss")
    fig, panels = _panels(df, "method", width=5.0)
    for ax, _, _, sub in panels:
        sns.lineplot(data=sub, x="norm", y="loss", hue="direction", hue_order=directions,
                     palette=palette, errorbar="sd", marker="o", ax=ax)
        if log:
            ax.set_yscale("log", nonpositive="clip")
        ax.set(xlabel="perturbation norm ‖δ‖", ylabel="test loss")
    _finish(fig, out_pdf, order=directions, title="direction")


def fig_linear_toy(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 11: deep linear toy w2·w1·x — loss along α when both layers or only one is
    interpolated. ``table`` columns: path ("full", "layer1", "layer2"), alpha, loss."""
    df = table.dropna(subset=["alpha", "loss"])
    if df.empty:
        raise ValueError("fig_linear_toy: no loss values")
    paths = _levels(df["path"], TOY_LABELS)
    df = df.assign(path=_relabel(df["path"], TOY_LABELS))
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    sns.lineplot(data=df, x="alpha", y="loss", hue="path", hue_order=paths,
                 palette=_palette(paths, "Set1"), errorbar="sd", marker="o", ax=ax)
    ax.set(xlabel=ALPHA_LABEL, ylabel="loss", title="deep linear toy: w2·w1·x", xlim=(0, 1))
    _finish(fig, out_pdf, order=paths, title="interpolated weights", ncol=2)


FIGURES: dict[str, Callable[[pd.DataFrame, str | Path], None]] = {
    "fig1": fig_lmc,
    "fig2": fig_alignment,
    "fig3": fig_llfc,
    "fig4": fig_coef,
    "fig5": fig_weak_additivity,
    "fig6": fig_commutativity,
    "fig7": fig_layer_barriers,
    "fig8": fig_cumulative,
    "fig9": fig_robustness,
    "fig10": fig_subspace,
    "fig11": fig_linear_toy,
}
