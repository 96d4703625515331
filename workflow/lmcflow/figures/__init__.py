"""Paper figures, one function per figure over a tidy (long) DataFrame.

Every function takes ``(table, out_pdf)``, writes ``out_pdf`` and a PNG beside it (same stem,
for quick viewing), creates parent directories, never mutates its input, and closes its
figures. NaN values are dropped before aggregating; a figure with nothing left to plot raises
ValueError. The seaborn style is set once at import so all figures look alike. ``FIGURES``
maps the figure id used by the workflow to its function (DESIGN §4).

Modules: ``layout`` (page sizes, labels, colours, panel and page helpers, saving), then one
module per family of figures: ``pairs`` (fig1–6, fig12), ``layerwise`` (fig7–11), ``across``
(fig13–15), ``finetune`` (fig16–18), ``merge`` (fig19).

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

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from .across import fig_federated, fig_lmc_llfc, fig_sweep
from .finetune import fig_averaging, fig_ctl, fig_task_arithmetic
from .layerwise import (fig_cumulative, fig_layer_barriers, fig_linear_toy, fig_robustness,
                        fig_subspace)
from .layout import PAGE_HEIGHT, PAGE_WIDTH, PNG_DPI
from .merge import fig_merge
from .pairs import (fig_alignment, fig_coef, fig_commutativity, fig_llfc, fig_lmc,
                    fig_stitching, fig_weak_additivity)

__all__ = [
    "FIGURES", "PAGE_WIDTH", "PAGE_HEIGHT", "PNG_DPI", "fig_lmc", "fig_alignment", "fig_llfc",
    "fig_coef", "fig_weak_additivity", "fig_commutativity", "fig_layer_barriers",
    "fig_cumulative", "fig_robustness", "fig_subspace", "fig_linear_toy", "fig_stitching",
    "fig_sweep", "fig_lmc_llfc", "fig_federated", "fig_ctl", "fig_task_arithmetic",
    "fig_averaging", "fig_merge",
]

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
    "fig16": fig_ctl,
    "fig17": fig_task_arithmetic,
    "fig18": fig_averaging,
    "fig19": fig_merge,
}
