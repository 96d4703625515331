"""Shared by every figure: page and panel sizes, method order and colours, labels, and the
helpers that lay panels out on pages and save a PDF with a PNG beside it.
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

from ..io import atomic_path  # noqa: E402


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
