"""Paper figures, one function per figure over a tidy (long) DataFrame.

Every function takes ``(table, out_pdf)``, writes ``out_pdf`` and a PNG beside it (same stem,
for quick viewing), creates parent directories, never mutates its input, and closes its
figures. NaN values are dropped before aggregating; a figure with nothing left to plot raises
ValueError. The seaborn style is set once at import so all figures look alike. ``FIGURES``
maps the figure id used by the workflow to its function (DESIGN §4).

Layout (read on a laptop screen): a figure is a grid of fixed-size panels (facets, e.g.
experiment × method), wrapped a few to a row, each experiment starting a new row, so the page
size follows from the number of facets and never from the data's length (layers, epochs,
steps). Pages are at most PAGE_WIDTH × PAGE_HEIGHT inches; when all experiments do not fit on
one page, each experiment gets its own page of a multi-page PDF, and the PNG shows the pages
stacked. The panels of one experiment share their y axis (they are compared). Values spanning
more than two decades get a symlog axis — linear below a threshold named in the axis label, so
exact zeros show as 0 instead of being clipped. Fonts are at least 8 pt at the final size.

Convention: θ_α = α·θ_A + (1−α)·θ_B, so α = 1 is model A. Methods are shown in the order
naive, spawning, weight_matching, activation_matching, commutativity_matching (others after,
sorted), each with the same colour in every figure; layers in the order of ``layer_index``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # headless: figures are built on cluster nodes / CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402

from .io import atomic_path  # noqa: E402
from .barriers import alignment_table, barriers  # noqa: E402
from .summary import FAMILY, sweep_columns  # noqa: E402

__all__ = ["fig_lmc", "fig_alignment", "fig_llfc", "fig_coef", "fig_weak_additivity",
           "fig_commutativity", "fig_layer_barriers", "fig_cumulative", "fig_robustness",
           "fig_subspace", "fig_linear_toy", "fig_stitching", "fig_sweep", "fig_lmc_llfc",
           "alignment_table", "FIGURES"]

# paper context at scale 1: labels and titles 9.6 pt, ticks and legends 8.8 pt
sns.set_theme(context="paper", style="whitegrid", font_scale=1.0)

PAGE_WIDTH = 7.8  # inches: a laptop screen or a letter page (8.5 in is the hard limit)
PAGE_HEIGHT = 11.0
PANEL = (PAGE_WIDTH / 2, 3.0)  # one panel with its title and tick labels: two to a row
HEADER = 0.9  # inches kept free above the panels for the legend when planning pages
MIN_FONT = 8.0  # smallest font (tick labels of many layers, value labels)
TICK_PITCH = 0.15  # inches per 8-pt tick label so that neighbours do not overlap
PNG_DPI = 120
NUMERICAL_ZERO = 1e-6  # a value this small relative to the largest one in a panel is a zero

ALPHA_LABEL = "α (0 = model B, 1 = model A)"
METHOD_ORDER = ("naive", "spawning", "weight_matching", "activation_matching",
                "commutativity_matching")
ALL_LAYERS = "(all)"  # layer name of the full-model rows in the layer-wise tables
BN_LABELS = {"none": "plain (no BatchNorm)", "reset": "BN statistics reset",
             "repair": "REPAIR (units rescaled)",
             "interpolate": "BN statistics interpolated"}
INTO_LABELS = {"a": "layer interpolated into A", "b": "layer interpolated into B",
               "both": "all layers interpolated"}
ORDER_LABELS = {"shallow": "shallow-first", "deep": "deep-first"}
ORDER_AXIS = {"shallow": "input → output", "deep": "output → input"}
TOY_LABELS = {"full": "full path (w1 and w2)", "layer1": "layer 1 only (w1)",
              "layer2": "layer 2 only (w2)"}
SUBSPACE_LABELS = {"interpolation": "interpolation line (away from the other net)",
                   "subspace": "random, inside the training subspace",
                   "orthogonal": "random, orthogonal to the subspace"}
DIST_LABEL = "dist(x, y) = ‖x − y‖² / (‖x‖‖y‖)"
DIST_SIGMA_LABEL = "Dist_σ = ‖σ(αH̃_A+(1−α)H̃_B) − (ασ(H̃_A)+(1−α)σ(H̃_B))‖² / (‖·‖‖·‖)"
SHUFFLED = "shuffled samples (baseline)"
COMMUTATIVITY = {"dist_com": "Dist_com (commutativity)", "dist_w": "Dist_W = dist(W_A, W_B)",
                 "dist_h": "Dist_H = dist(H_A, H_B)"}


# --------------------------------------------------------------------------- helpers: data


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


def _mean_sd(df: pd.DataFrame, keys: Sequence[str], value: str) -> pd.DataFrame:
    """Tidy summary: ``keys`` columns plus ``mean`` and ``sd`` of ``value`` (sd NaN for one row).

    Figures draw these directly (not via seaborn's estimators), which keeps large tables fast.
    """
    return (df.dropna(subset=[value]).groupby(list(keys), sort=False)[value]
            .agg(mean="mean", sd="std").reset_index())


def _test_rows(table: pd.DataFrame, value: str, name: str) -> pd.DataFrame:
    """Rows of the test split (if the table has a split column) with ``value`` not NaN."""
    df = table[table["split"] == "test"] if "split" in table.columns else table
    df = df.dropna(subset=[value])
    if df.empty:
        raise ValueError(f"{name}: no test-split rows with a value in {value!r}")
    return df


def _one_bn_mode(df: pd.DataFrame) -> pd.DataFrame:
    """Keep a single BatchNorm mode per experiment if the table holds several.

    The rows of the configured policy (column ``configured``, written by the lmc job) where
    the table says; otherwise, per experiment, ``"reset"`` (BN statistics re-estimated after
    interpolation, the meaningful curve) when present, else its only (or first) value, e.g.
    ``"none"`` for models without BatchNorm.
    """
    if "configured" in df.columns:
        return df[df["configured"].astype(bool)]
    if "bn" not in df.columns:
        return df
    parts = []
    for _, g in df.groupby("experiment", sort=False):
        values = list(g["bn"].unique())
        parts.append(g[g["bn"] == ("reset" if "reset" in values else values[0])])
    return pd.concat(parts)


# --------------------------------------------------------------------------- helpers: pages


@dataclass(eq=False)
class _Facet:
    """One panel: its experiment, key (method, quantity, …; None for one per experiment),
    title and rows."""

    experiment: str
    key: object
    title: str
    rows: pd.DataFrame


@dataclass(eq=False)
class _Page:
    """One page: its figure, the ``(axes, facet)`` panels on it and the inches they take
    (without the legend above them, which `_finish` adds)."""

    fig: plt.Figure
    panels: list
    height: float


def _facets(df: pd.DataFrame, col: str | None = None, col_order: Sequence | None = None,
            title: Callable[[str, object], str] | None = None) -> list[_Facet]:
    """The non-empty panels: per experiment (sorted), one per value of ``col``.

    Values come in ``col_order`` if given, methods in the paper's order, others sorted. Titles
    are "experiment · value" unless ``title(experiment, value)`` says otherwise.
    """
    title = title or (lambda exp, key: exp if key is None else f"{exp} · {key}")
    facets = []
    for exp in _ordered(df["experiment"]):
        sub = df[df["experiment"] == exp]
        if col is None:
            facets.append(_Facet(exp, None, title(exp, None), sub))
            continue
        keys = list(col_order) if col_order is not None else (
            _methods(sub[col]) if col == "method" else _ordered(sub[col]))
        facets += [_Facet(exp, key, title(exp, key), sub[sub[col] == key]) for key in keys
                   if (sub[col] == key).any()]
    return facets


def _layout(facets: Sequence[_Facet], ncols: int = 2, panel: tuple[float, float] = PANEL,
            extra: float = 0.0) -> list[_Page]:
    """Pages of fixed-size panels, ``ncols`` to a row, each experiment a block of whole rows.

    A block is a subfigure (so it can hold its own legend or colour bar); ``extra`` inches are
    added below each block for those. All blocks go on one page if they fit in PAGE_HEIGHT
    (less HEADER for the legend), else every experiment gets its own page(s) — a block taller
    than a page is split. The page is as wide as its longest row, so never wider than
    ``ncols`` panels.
    """
    blocks = []
    for exp in dict.fromkeys(f.experiment for f in facets):
        mine = [f for f in facets if f.experiment == exp]
        blocks.append([mine[i:i + ncols] for i in range(0, len(mine), ncols)])
    room = PAGE_HEIGHT - HEADER
    if sum(len(b) * panel[1] + extra for b in blocks) <= room:
        plans = [blocks]
    else:
        per_page = max(1, int((room - extra) // panel[1]))
        plans = [[b[i:i + per_page]] for b in blocks for i in range(0, len(b), per_page)]
    pages = []
    for plan in plans:
        cols = min(ncols, max(len(row) for block in plan for row in block))
        heights = [len(block) * panel[1] + extra for block in plan]
        fig = plt.figure(figsize=(cols * panel[0], sum(heights)), layout="constrained")
        subs = fig.subfigures(len(plan), 1, height_ratios=heights, squeeze=False)[:, 0]
        panels = []
        for sub, block in zip(subs, plan):
            grid = sub.add_gridspec(len(block), cols)
            for i, row in enumerate(block):
                for j, facet in enumerate(row):
                    ax = sub.add_subplot(grid[i, j])
                    ax.set_title(facet.title)
                    panels.append((ax, facet))
        pages.append(_Page(fig, panels, sum(heights)))
    return pages


def _panels(pages: Sequence[_Page]) -> list[tuple[plt.Axes, _Facet]]:
    """All ``(axes, facet)`` panels of all pages."""
    return [p for page in pages for p in page.panels]


def _ordinal(k: int) -> str:
    return f"{k}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(k if k < 20 else k % 10, 'th')}"


def _category_axis(ax: plt.Axes, names: Sequence[str], length: float, label: str,
                   axis: str = "x") -> None:
    """Names (layers, steps) at positions 0..n−1 along ``axis``, fitted to ``length`` inches.

    Many names keep the panel size: x labels are turned 90° and set in MIN_FONT, and when
    even so they would overlap only every k-th is written (said in the axis label; the others
    keep a minor tick).
    """
    n = len(names)
    k = max(1, math.ceil(n / max(2, int(length / TICK_PITCH))))
    many = n > 6 or max((len(str(s)) for s in names), default=0) > 12
    ticks = np.arange(0, n, k)
    font = {"fontsize": MIN_FONT} if many else {}
    if axis == "x":
        ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90 if many else 45,
                      ha="center" if many else "right",
                      rotation_mode="default" if many else "anchor", **font)
        ax.set_xticks(np.arange(n), minor=True)
        ax.set_xlim(-0.5, n - 0.5)
    else:  # heatmap rows: the first name on top
        ax.set_yticks(ticks, [names[i] for i in ticks], **font)
        ax.set_yticks(np.arange(n), minor=True)
        ax.set_ylim(n - 0.5, -0.5)
    if k > 1:  # on a line of its own: beside the label it would outgrow a narrow panel
        label = f"{label}\n(every {_ordinal(k)} named)"
    (ax.set_xlabel if axis == "x" else ax.set_ylabel)(label)


def _power_of_ten(x: float) -> str:
    return f"$10^{{{int(round(np.log10(x)))}}}$"


def _log_scale(values: Iterable[float], decades: float = 2.0) -> dict | None:
    """y-scale settings for values spanning more than ``decades`` orders of magnitude, else
    None (a linear axis suits them).

    All values positive: a log axis. Some zero (or negative): symlog, linear below the
    power of ten at or below the smallest other positive value, so that value lies on the
    log part and the zeros show at 0 instead of being clipped. Values below NUMERICAL_ZERO ×
    the largest are rounding noise (1 − cos of identical features is ~1e-14, not 0) and
    count as zeros.
    """
    v = pd.Series(list(values), dtype=float)
    v = v[np.isfinite(v)]
    pos = v[v > 0]
    pos = pos[pos > pos.max() * NUMERICAL_ZERO] if len(pos) else pos
    if pos.empty or pos.max() / pos.min() <= 10.0 ** decades:
        return None
    if len(pos) == len(v):
        return {"value": "log"}
    return {"value": "symlog", "linthresh": 10.0 ** np.floor(np.log10(pos.min())),
            "linscale": 0.6}


def _shared_y(panels: Sequence[tuple[plt.Axes, _Facet]], ylabel: str,
              value: str | None = None, decades: float = 2.0, by: str = "experiment") -> None:
    """Per experiment (or other facet attribute ``by``), one y range and scale for all its
    panels, so they can be compared — across pages too.

    With ``value`` (a column of the facets' rows, e.g. the plotted means): if the group's values
    span more than ``decades`` decades the axis is log, or symlog where there are zeros (see
    `_log_scale`; its threshold is stated in the label). The y label is written on the first
    panel of a row only.
    """
    groups: dict[object, list[tuple[plt.Axes, _Facet]]] = {}
    for ax, facet in panels:
        groups.setdefault(getattr(facet, by), []).append((ax, facet))
    for members in groups.values():
        axes = [ax for ax, _ in members]
        scale = None if value is None else _log_scale(
            pd.concat([f.rows[value] for _, f in members]), decades)
        label = ylabel
        if scale is not None:
            for ax in axes:
                ax.set_yscale(**scale)
                ax.relim()
                ax.autoscale_view()
            label = f"{ylabel}\n" + ("(log scale)" if scale["value"] == "log" else
                                     f"(symlog: linear below {_power_of_ten(scale['linthresh'])})")
        lo = min(ax.get_ylim()[0] for ax in axes)
        hi = max(ax.get_ylim()[1] for ax in axes)
        for ax in axes:
            ax.set_ylim(lo, hi)
            ax.set_ylabel(label if ax.get_subplotspec().is_first_col() or by != "experiment"
                          else "")
            if scale is not None and scale["value"] == "log" and hi / lo < 1e3:
                # a short log axis would have one or two labelled ticks: label 1, 2, 5 × 10^k
                ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
                    lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _profile(ax: plt.Axes, summary: pd.DataFrame, x: str, hue: str, hue_order: Sequence,
             palette: dict, x_order: Sequence | None = None, nonneg: bool = False,
             styles: dict | None = None) -> None:
    """One line per ``hue`` level: ``mean`` against ``x`` with markers, ±1 sd as a band.

    ``x_order`` puts categorical x values (layers, steps) at positions 0..n−1; without it x is
    numeric. Lines rather than grouped bars, so that dozens of layers still fit a panel.
    ``nonneg`` stops the band at 0 for quantities that cannot be negative.
    """
    where = None if x_order is None else {v: i for i, v in enumerate(x_order)}
    for level in hue_order:
        s = summary[summary[hue] == level]
        if s.empty:
            continue
        xs = s[x].map(where) if where is not None else s[x]
        s = s.assign(_x=xs.astype(float)).sort_values("_x")
        xs, mean, sd = (s[c].to_numpy(dtype=float) for c in ("_x", "mean", "sd"))
        style = {"marker": "o", "markersize": 3.5, "linewidth": 1.3} | (styles or {}).get(level, {})
        ax.plot(xs, mean, color=palette[level], label=level, **style)
        if np.isfinite(sd).any():
            low = np.maximum(mean - sd, 0.0) if nonneg else mean - sd
            ax.fill_between(xs, low, mean + sd, color=palette[level], alpha=0.15, linewidth=0)


def _grouped_bars(ax: plt.Axes, summary: pd.DataFrame, x: str, hue: str, x_order: Sequence,
                  hue_order: Sequence, palette: dict, fmt: str) -> None:
    """Bars of ``mean`` per x and hue level (sd error bars), each labelled with its value.

    The labels make a zero bar read "0.0" rather than look missing. Only hue levels present
    take a slot, so the bars stay centred.
    """
    present = [h for h in hue_order if (summary[hue] == h).any()]
    width = 0.8 / max(len(present), 1)
    lowest = 0.0
    for i, level in enumerate(present):
        s = summary[summary[hue] == level].set_index(x).reindex(x_order)
        ok = s["mean"].notna().to_numpy()
        pos = (np.arange(len(x_order)) + (i - (len(present) - 1) / 2) * width)[ok]
        mean, sd = s["mean"].to_numpy(dtype=float)[ok], s["sd"].to_numpy(dtype=float)[ok]
        has_sd = np.isfinite(sd).any()
        ax.bar(pos, mean, width, color=palette[level], label=level,
               yerr=np.nan_to_num(sd) if has_sd else None, capsize=2 if has_sd else 0,
               error_kw={"linewidth": 0.8})
        for p, m, e in zip(pos, mean, np.nan_to_num(sd)):
            up = m >= 0
            lowest = min(lowest, m - e)
            ax.annotate(fmt.format(m), (p, m + (e if up else -e)), xytext=(0, 2 if up else -2),
                        textcoords="offset points", ha="center", va="bottom" if up else "top",
                        rotation=90, fontsize=MIN_FONT)
    ax.set_xticks(np.arange(len(x_order)), x_order)
    ax.set_xlim(-0.5, len(x_order) - 0.5)
    ax.margins(y=0.3)  # room for the value labels
    if lowest >= 0:  # nothing below 0: the bars stand on the bottom edge
        ax.set_ylim(bottom=0.0)


def _reference_line(ax: plt.Axes, y: float, label: str | None = None) -> None:
    """Dashed black line at ``y`` named ``label`` in the legend; a thin solid one without."""
    if pd.notna(y):
        ax.axhline(y, color="k", linestyle="--" if label else "-",
                   linewidth=1.2 if label else 0.8, label=label, zorder=1)


def _legend_columns(labels: Sequence[str], width: float) -> int:
    """Legend columns that fit ``width`` inches (8.8-pt text is about 0.065 in a character)."""
    entry = 0.55 + 0.065 * max(len(lab) for lab in labels)
    return max(1, min(len(labels), int(width // entry)))


def _finish(pages: Sequence[_Page], out_pdf: str | Path, order: Sequence[str] = (),
            title: str | None = None, skip: Sequence[str] = ()) -> None:
    """Per page one legend above the panels (entries of its axes, deduplicated), then save.

    Entries named in ``order`` come first, in that order; those in ``skip`` are left out. The
    page grows by the legend's height (it stays within PAGE_HEIGHT).
    """
    for page in pages:
        entries: dict[str, object] = {}
        for ax, _ in page.panels:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                if not label.startswith("_") and label not in skip:
                    entries.setdefault(label, handle)
            if ax.get_legend() is not None:
                ax.get_legend().remove()
        labels = ([lab for lab in order if lab in entries]
                  + [lab for lab in entries if lab not in order])
        header = 0.0
        if labels:
            width = page.fig.get_figwidth()
            ncol = _legend_columns(labels, width)
            page.fig.legend([entries[lab] for lab in labels], labels, loc="outside upper center",
                            ncol=ncol, title=title, frameon=False)
            header = 0.15 + 0.19 * math.ceil(len(labels) / ncol) + (0.22 if title else 0.0)
        page.fig.set_size_inches(page.fig.get_figwidth(),
                                 min(PAGE_HEIGHT, page.height + header))
    _save([page.fig for page in pages], out_pdf)


def _save(figs: plt.Figure | Sequence[plt.Figure], out_pdf: str | Path) -> None:
    """Write the pages to one PDF and, stacked top to bottom, to a PNG with the same stem
    (each file atomically); then free the figures.

    Pages are saved at their own size (no tight bounding box), so the page size is the
    figure size that the layout chose.
    """
    figs = [figs] if isinstance(figs, plt.Figure) else list(figs)
    out_pdf = Path(out_pdf)
    try:
        with atomic_path(out_pdf) as tmp:
            with PdfPages(tmp, metadata={"CreationDate": None}) as pdf:
                for fig in figs:
                    pdf.savefig(fig)
        images = []
        for fig in figs:
            # the layout computed for the PDF holds at any dpi; not redoing it saves a third
            fig.set_layout_engine("none")
            buffer = BytesIO()
            fig.savefig(buffer, format="png", dpi=PNG_DPI)
            buffer.seek(0)
            images.append(plt.imread(buffer, format="png"))
        width = max(im.shape[1] for im in images)
        gap = np.ones((12, width, 4), dtype=np.float32)
        gap[5:7, :, :3] = 0.6  # a grey rule between pages
        stacked = []
        for im in images:
            stacked += [np.pad(im, ((0, 0), (0, width - im.shape[1]), (0, 0)),
                               constant_values=1.0), gap]
        with atomic_path(out_pdf.with_suffix(".png")) as tmp:
            plt.imsave(tmp, np.concatenate(stacked[:-1]), format="png")
    finally:
        for fig in figs:
            plt.close(fig)


def _rotate_x(ax: plt.Axes, rotation: float = 30) -> None:
    """Turn x tick labels (method names) so that long names do not overlap."""
    plt.setp(ax.get_xticklabels(), rotation=rotation, ha="right", rotation_mode="anchor")


def _layers_of(summary: pd.DataFrame) -> dict[str, list[str]]:
    """Layer order per experiment, so that every panel of an experiment has the same x axis."""
    return {exp: _layer_order(g) for exp, g in summary.groupby("experiment", sort=False)}


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
    "fig12": fig_stitching,
    "fig13": fig_sweep,
    "fig14": fig_lmc_llfc,
    "fig15": fig_federated,
}


# --------------------------------------------------------------------- fine-tuning (fig16-18)

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


FIGURES.update({"fig16": fig_ctl, "fig17": fig_task_arithmetic, "fig18": fig_averaging})


# --------------------------------------------------------------------- merging many (fig19)

MERGE_METHODS = {"none": "naive", "weight": "weight_matching", "activation": "activation_matching",
                 "commutativity": "commutativity_matching"}  # colours of the pair methods
MERGE_LABELS = {"none": "unaligned average", "weight": "weight matching (MergeMany)",
                "activation": "activation matching (MergeMany)",
                "commutativity": "commutativity matching (MergeMany)"}
MEMBERS_LABEL = "the K runs' own (mean)"


def fig_merge(table: pd.DataFrame, out_pdf: str | Path) -> None:
    """Figure 19: merging many models. Per experiment and normalisation policy, the test error
    (%) of the average of K runs against K, one line per merge method (mean ± sd where a K
    has several merges), the runs' own mean error dashed; and the K-way LLFC, 1 − cos between
    f(average) and the runs' mean features, averaged over layers, against K."""
    ev = table[(table["kind"] == "evaluation") & (table["split"] == "test")]
    ft = table[table["kind"] == "features"]
    if ev.empty or ft.empty:
        raise ValueError("fig_merge: needs evaluation and features rows")
    facets = []
    for exp in _ordered(table["experiment"]):
        for bn in _ordered(table.loc[table["experiment"] == exp, "bn"], tuple(BN_LABELS)):
            title = f"{exp} · {BN_LABELS.get(bn, bn)}"
            mine = lambda df: df[(df["experiment"] == exp) & (df["bn"] == bn)]  # noqa: E731
            facets.append(_Facet(exp, "error", title, mine(ev)))
            facets.append(_Facet(exp, "llfc", title, mine(ft)))
    pages = _layout(facets)
    methods = _ordered(table["method"], tuple(MERGE_METHODS))
    colours = _method_palette([MERGE_METHODS.get(m, m) for m in methods])
    palette = {MERGE_LABELS.get(m, m): colours[MERGE_METHODS.get(m, m)] for m in methods}
    for ax, facet in _panels(pages):
        rows = facet.rows.assign(label=_relabel(facet.rows["method"], MERGE_LABELS))
        if facet.key == "error":
            avg = rows[rows["model"] == "average"].assign(value=lambda d: 100 * d["error"])
            _profile(ax, _mean_sd(avg, ["label", "k"], "value"), "k", "label", list(palette),
                     palette)
            own = rows[rows["model"] == "members"].assign(value=lambda d: 100 * d["error"])
            own = own.groupby("k")["value"].mean()
            ax.plot(own.index, own.to_numpy(), color="k", linestyle="--", linewidth=1.2,
                    label=MEMBERS_LABEL)
            ax.set_ylabel("test error (%) of the average")
        else:
            per_merge = rows.groupby(["label", "k"], as_index=False)["one_minus_cos"].mean()
            _profile(ax, _mean_sd(per_merge, ["label", "k"], "one_minus_cos"), "k", "label",
                     list(palette), palette, nonneg=True)
            ax.set_ylabel("1 − cos(f(θ̄), mean_i f(θ_i)),\nmean over layers")
        ks = sorted(rows["k"].unique())
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K (runs merged)")
    _finish(pages, out_pdf, order=[*palette, MEMBERS_LABEL])


FIGURES["fig19"] = fig_merge
