"""Paper figures, one function per figure over a tidy (long) DataFrame.

Every function writes ``out_pdf`` and a PNG beside it (same stem, for quick viewing),
creates parent directories, never mutates its input, and closes its figure. The
seaborn style is set once at import so all figures look alike. ``FIGURES`` maps the
figure id used by the workflow to its function.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are built on cluster nodes / CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .metrics import barriers  # noqa: E402

__all__ = ["fig_lmc", "fig_llfc", "FIGURES"]

sns.set_theme(context="paper", style="whitegrid", font_scale=1.3)

ALPHA_LABEL = "α (0 = model B, 1 = model A)"
LOG_FLOOR = 1e-6  # 1 - cos can be exactly 0 or slightly negative by rounding


def _save(fig: plt.Figure, out_pdf: str | Path) -> None:
    """Write the PDF and a PNG with the same stem, then free the figure."""
    out_pdf = Path(out_pdf)
    out_pdf.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_pdf, bbox_inches="tight")
    fig.savefig(out_pdf.with_suffix(".png"), dpi=120, bbox_inches="tight")
    plt.close(fig)


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
    methods = sorted(df["method"].unique())
    palette = dict(zip(methods, sns.color_palette("colorblind", len(methods))))
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
    pos = means[means > 0]
    log = len(pos) > 0 and pos.max() / max(pos.min(), LOG_FLOOR) > 1e2
    if log:
        long["value"] = long["value"].clip(lower=LOG_FLOOR)

    experiments = sorted(long["experiment"].unique())
    methods = sorted(long["method"].unique())
    n_layers = long.groupby("experiment")["layer"].nunique().max()
    fig, axes = plt.subplots(len(experiments), len(methods), squeeze=False, sharex=False,
                             figsize=(max(4.5, 0.55 * n_layers + 1.5) * len(methods),
                                      3.8 * len(experiments)))
    palette = sns.color_palette("colorblind", len(hue_order))
    for row, exp in zip(axes, experiments):
        for ax, meth in zip(row, methods):
            sub = long[(long["experiment"] == exp) & (long["method"] == meth)]
            ax.set_title(f"{exp} · {meth}")
            if sub.empty:
                ax.set_axis_off()
                continue
            order = (sub[["layer", "layer_index"]].drop_duplicates()
                     .sort_values("layer_index")["layer"].tolist())
            sns.barplot(data=sub, x="layer", y="value", hue="quantity", order=order,
                        hue_order=hue_order, palette=palette, errorbar="sd",
                        capsize=0.1, err_kws={"linewidth": 0.8}, ax=ax)
            if log:
                ax.set_yscale("log", nonpositive="clip")
            ax.set(xlabel="layer", ylabel="E[1 − cos]")
            ax.tick_params(axis="x", labelrotation=45)
            for lab in ax.get_xticklabels():
                lab.set_ha("right")
            ax.get_legend().remove()
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in palette]
    fig.legend(handles, hue_order, loc="upper center", ncol=len(hue_order),
               bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _save(fig, out_pdf)


FIGURES: dict[str, Callable[[pd.DataFrame, str | Path], None]] = {
    "fig1": fig_lmc,
    "fig3": fig_llfc,
}
