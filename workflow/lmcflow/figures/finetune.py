"""Fine-tuning figures: cross-task linearity (fig16), task arithmetic (fig17), model
averaging (fig18).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .layout import (
    MIN_FONT, PANEL, _Facet, _category_axis, _facets, _finish, _grouped_bars, _layer_order,
    _layout, _levels, _log_scale, _mean_sd, _ordered, _panels, _power_of_ten, _profile,
    _reference_line, _relabel,
)


START_LABELS = {"pretrained": "from θ_0", "random": "from random init (control)"}
START_STYLES = {"pretrained": {"linestyle": "-"}, "random": {"linestyle": "--"}}
ROLE_LABELS = {"a": "task of A", "b": "task of B", "pretraining": "pretraining task",
               "other": "other tasks"}


def _per_panel_scale(ax: plt.Axes, values: Iterable[float], label: str) -> None:
    """A symlog or log y axis where ``values`` span more than two decades (see `_log_scale`),
    said in the label; otherwise linear from 0."""
    scale = _log_scale(values)
    if scale is None:
        ax.set_ylabel(label)
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
        return
    ax.set_yscale(**scale)
    ax.set_ylabel(f"{label}\n" + ("(log scale)" if scale["value"] == "log" else
                                  f"(symlog: linear below {_power_of_ten(scale['linthresh'])})"))
    if scale["value"] == "symlog" and label.startswith(("1 − cos", "E[1 − cos")):
        ax.set_ylim(bottom=0.0)  # 1 − cos ≥ 0: rounding (−1e−16) is no reason to show negatives


def _layer_lines(ax: plt.Axes, rows: pd.DataFrame, value: str, series: str, palette: dict,
                 layers: Sequence[str], styles: dict | None = None, label: str = "") -> None:
    """``value`` per layer, one line per ``series`` level (mean over rows; band ±1 sd)."""
    summary = _mean_sd(rows, [series, "layer"], value)
    _profile(ax, summary, "layer", series, list(palette), palette, x_order=layers,
             styles=styles)
    _category_axis(ax, list(layers), PANEL[0] - 0.9, "layer")
    _per_panel_scale(ax, summary["mean"], label or value)


def fig_ctl(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 16: cross-task linearity per layer. Per experiment one panel per (α, β): the mean
    over probe samples (and pairs) of 1 − cos⟨f(αθ_A + βθ_B), αf(θ_A) + βf(θ_B)⟩ for the
    cross-task pairs fine-tuned from θ_0 (solid) and from its random initialisation (dashed),
    beside the baseline 1 − cos⟨f(θ_A), f(θ_B)⟩ (grey, same line styles); band ±1 sd.

    ``table`` columns: experiment, method, pair, start, alpha, beta, layer, layer_index, sample,
    one_minus_cos, coef_c, one_minus_cos_ab."""
    df = table.dropna(subset=["one_minus_cos"])
    if df.empty:
        raise ValueError("fig_ctl: no rows with a value in 'one_minus_cos'")
    df = df.assign(coefs=[f"α = {a:g}, β = {b:g}" for a, b in zip(df["alpha"], df["beta"])])
    order = list(dict.fromkeys(df.sort_values(["alpha", "beta"])["coefs"]))
    pages = _layout(_facets(df, "coefs", order,
                            lambda exp, key: f"{exp} · CTL at {key}"))
    starts = _ordered(df["start"], STARTS_ORDER)
    colours = dict(zip(starts, sns.color_palette("colorblind", 3)))
    for ax, facet in _panels(pages):
        rows = facet.rows
        layers = _layer_order(rows)
        long = pd.concat([rows.assign(series=f"{START_LABELS.get(s, s)}: CTL", value=rows["one_minus_cos"])
                          [rows["start"] == s] for s in starts]
                         + [rows.assign(series=f"{START_LABELS.get(s, s)}: 1 − cos(f_A, f_B)",
                                        value=rows["one_minus_cos_ab"])[rows["start"] == s]
                            for s in starts])
        palette, styles = {}, {}
        for s in starts:
            palette[f"{START_LABELS.get(s, s)}: CTL"] = colours[s]
            styles[f"{START_LABELS.get(s, s)}: CTL"] = START_STYLES.get(s, {})
        for s in starts:
            palette[f"{START_LABELS.get(s, s)}: 1 − cos(f_A, f_B)"] = (0.55, 0.55, 0.55)
            styles[f"{START_LABELS.get(s, s)}: 1 − cos(f_A, f_B)"] = {
                **START_STYLES.get(s, {}), "marker": "s", "markersize": 3}
        _layer_lines(ax, long, "value", "series", palette, layers, styles,
                     "E[1 − cos]  (CTL: f(αθ_A+βθ_B) vs αf_A+βf_B)")
    _finish(pages, out_pdf)


STARTS_ORDER = ("pretrained", "random")


def _pick_lambdas(values: Iterable[float], most: int = 3) -> list[float]:
    """Up to ``most`` nonzero λ of the grid, spread over it (the largest always)."""
    nz = sorted(v for v in set(values) if v != 0)
    if len(nz) <= most:
        return nz
    return sorted({nz[round((len(nz) - 1) * q)] for q in np.linspace(0, 1, most + 1)[1:]})


def fig_task_arithmetic(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 17: task arithmetic, per experiment three rows of two panels (addition
    θ_0 + λ(τ_A + τ_B) left, negation θ_0 − λτ_A right): test error (%) against λ on the task
    of A, of B, the pretraining task and the other tasks (mean over pairs and tasks); 1 − cos
    per layer between the arithmetic model's features and the feature arithmetic
    f_0 + λ[(f_A − f_0) + (f_B − f_0)] (resp. f_0 − λ(f_A − f_0)); and the scale c. Solid: from
    θ_0; dashed: the from-random-init control (θ_0 is then the initialisation).

    ``table``: rows of ``kind`` evaluation (operation, lambda, task, role, split, loss, error)
    and features (operation, lambda, layer, layer_index, one_minus_cos, coef_c, their sd)."""
    ev = table[table["kind"] == "evaluation"].dropna(subset=["error"])
    ft = table[table["kind"] == "features"].dropna(subset=["one_minus_cos"])
    if ev.empty or ft.empty:
        raise ValueError("fig_task_arithmetic: needs evaluation and features rows")
    panels = [("error", "addition"), ("error", "negation"), ("one_minus_cos", "addition"),
              ("one_minus_cos", "negation"), ("coef_c", "addition"), ("coef_c", "negation")]
    what = {"error": "test error", "one_minus_cos": "1 − cos to feature arithmetic",
            "coef_c": "scale c"}
    facets = []
    for exp in _ordered(table["experiment"]):
        for quantity, op in panels:
            src = ev if quantity == "error" else ft
            rows = src[(src["experiment"] == exp) & (src["operation"] == op)]
            if not rows.empty:
                facets.append(_Facet(exp, (quantity, op), f"{exp} · {op} · {what[quantity]}",
                                     rows))
    pages = _layout(facets)
    starts = _ordered(table["start"], STARTS_ORDER)
    roles = _levels(ev["role"], ROLE_LABELS)
    role_colours = dict(zip(roles, sns.color_palette("colorblind", len(roles))))
    lambdas = _pick_lambdas(ft["lambda"])
    lam_colours = dict(zip([f"λ = {v:g}" for v in lambdas],
                           sns.color_palette("viridis_r", len(lambdas) + 1)[1:]))
    for ax, facet in _panels(pages):
        quantity, op = facet.key
        rows = facet.rows
        if quantity == "error":
            rows = rows.assign(series=[f"{ROLE_LABELS.get(r, r)}, {START_LABELS.get(s, s)}"
                                       for r, s in zip(rows["role"], rows["start"])],
                               value=100 * rows["error"])
            palette = {f"{r}, {START_LABELS.get(s, s)}": role_colours[r] for r in roles for s in starts}
            styles = {f"{r}, {START_LABELS.get(s, s)}": START_STYLES.get(s, {})
                      for r in roles for s in starts}
            summary = _mean_sd(rows, ["series", "lambda"], "value")
            _profile(ax, summary, "lambda", "series", list(palette), palette, styles=styles)
            ax.set_xlabel("λ" + (" (θ_0 + λ(τ_A + τ_B))" if op == "addition" else " (θ_0 − λτ_A)"))
            ax.set_ylabel("test error (%)")
            ax.set_ylim(0, 100)
            continue
        rows = rows[rows["lambda"].isin(lambdas)]
        rows = rows.assign(series=[f"λ = {v:g}, {START_LABELS.get(s, s)}"
                                   for v, s in zip(rows["lambda"], rows["start"])])
        palette = {f"{lam}, {START_LABELS.get(s, s)}": c for lam, c in lam_colours.items()
                   for s in starts}
        styles = {f"{lam}, {START_LABELS.get(s, s)}": START_STYLES.get(s, {})
                  for lam in lam_colours for s in starts}
        _layer_lines(ax, rows, quantity, "series", palette, _layer_order(rows), styles,
                     what[quantity])
        if quantity == "coef_c":
            _reference_line(ax, 1.0)
    _finish(pages, out_pdf)


AVERAGE_LABELS = {"average": "weight average of the K models", "ensemble": "ensemble of their logits",
                  "members": "the K models on their own (mean)"}


def fig_averaging(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 18: model averaging against logit ensembling. Per experiment, per start (from θ_0,
    from random init) a panel of test error (%) per group of K fine-tuned models (``tasks``: one
    fine-tuning of every task; ``same_task:<t>``: every fine-tuning of task t), on the group's
    own tasks (mean over them): the weight average, the logit ensemble and the members' mean;
    then 1 − cos between the averaged model's features and the members' mean features per layer,
    and its scale c (one line per group; solid from θ_0, dashed from random init)."""
    ev = table[table["kind"] == "evaluation"].dropna(subset=["error"])
    ft = table[table["kind"] == "features"].dropna(subset=["one_minus_cos"])
    if ev.empty or ft.empty:
        raise ValueError("fig_averaging: needs evaluation and features rows")
    own = ev[[t in ts.split("+") for t, ts in zip(ev["task"], ev["tasks"])]]
    own = own.assign(label=[f"{g} (K = {k})" for g, k in zip(own["group"], own["k"])])
    facets = []
    for exp in _ordered(table["experiment"]):
        for start in _ordered(table["start"], STARTS_ORDER):
            rows = own[(own["experiment"] == exp) & (own["start"] == start)]
            if not rows.empty:
                facets.append(_Facet(exp, ("error", start),
                                     f"{exp} · {START_LABELS.get(start, start)}", rows))
        for quantity in ("one_minus_cos", "coef_c"):
            rows = ft[ft["experiment"] == exp]
            facets.append(_Facet(exp, (quantity, None), f"{exp} · averaged vs mean features",
                                 rows))
    pages = _layout(facets)
    models = _ordered(ev["model"], tuple(AVERAGE_LABELS))
    model_palette = dict(zip([AVERAGE_LABELS.get(m, m) for m in models],
                             sns.color_palette("Set2", len(models))))
    groups = _ordered(ft["group"])
    group_colours = dict(zip(groups, sns.color_palette("colorblind", len(groups))))
    for ax, facet in _panels(pages):
        quantity, start = facet.key
        rows = facet.rows
        if quantity == "error":
            rows = rows.assign(model_label=_relabel(rows["model"], AVERAGE_LABELS),
                               value=100 * rows["error"])
            summary = _mean_sd(rows, ["label", "model_label"], "value")
            labels = list(dict.fromkeys(rows.sort_values(["k", "group"])["label"]))
            _grouped_bars(ax, summary, "label", "model_label", labels, list(model_palette),
                          model_palette, "{:.1f}")
            plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=MIN_FONT)
            ax.set_ylabel("test error (%) on the group's tasks")
            continue
        series = [f"{g}, {START_LABELS.get(s, s)}" for g, s in zip(rows["group"], rows["start"])]
        rows = rows.assign(series=series)
        starts = _ordered(rows["start"], STARTS_ORDER)
        palette = {f"{g}, {START_LABELS.get(s, s)}": group_colours[g] for g in groups for s in starts}
        styles = {f"{g}, {START_LABELS.get(s, s)}": START_STYLES.get(s, {}) for g in groups
                  for s in starts}
        label = ("1 − cos(f(θ̄), mean_k f(θ_k))" if quantity == "one_minus_cos"
                 else "scale c (c·f(θ̄) ≈ mean_k f(θ_k))")
        _layer_lines(ax, rows, quantity, "series", palette, _layer_order(rows), styles, label)
        if quantity == "coef_c":
            _reference_line(ax, 1.0)
    _finish(pages, out_pdf, order=list(model_palette))
