"""Merging many models (fig19): the error and the K-way LLFC of the merged model against K.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .layout import (
    BN_LABELS, _Facet, _finish, _layout, _mean_sd, _method_palette, _ordered, _panels,
    _profile, _relabel,
)


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
