"""The numbers the README states for a fine-tuning run (workflow/configs/finetune_mnist5k.yaml):

    python benchmarks/finetune_summary.py results/finetune_mnist5k/tables

Per method, mean ± sd over pairs: test-error and test-loss barriers, the LLFC ratio
(1 − cos_α)/(1 − cos_AB) at α = ½ over the hidden layers, CTL 1 − cos at α = β = ½ over the
hidden layers; θ_0's test accuracy on every task (λ = 0 of task arithmetic); task addition's
test accuracy on the pair's two tasks at the best λ (the one with the highest mean accuracy on
both) and negation's on the negated and the pretraining task at λ = 1; model averaging against
the logit ensemble.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))

from lmcflow.metrics import barriers  # noqa: E402

HIDDEN = lambda s: ~s.isin({"fc1", "out", "features.conv1", "conv1", "stem", "fc"})  # noqa: E731


def ms(values: pd.Series, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(values.mean())} ± {fmt.format(values.std())}" if len(values) > 1 \
        else fmt.format(values.mean())


def main(tables: Path) -> None:
    lmc = pd.read_parquet(tables / "lmc.parquet")
    lmc = lmc[(lmc.split == "test") & lmc.configured]
    bar = barriers(lmc.drop(columns=["bn", "configured"])).set_index(["experiment", "method", "pair"])
    llfc = pd.read_parquet(tables / "llfc.parquet")
    llfc = llfc[(llfc.alpha == 0.5) & HIDDEN(llfc.layer)]
    m = llfc.groupby(["experiment", "method", "pair", "layer"])[["one_minus_cos_alpha", "one_minus_cos_ab"]].mean()
    ratio = (m.one_minus_cos_alpha / m.one_minus_cos_ab).groupby(["experiment", "method", "pair"]).mean()
    rows = bar.join(ratio.rename("llfc_ratio"))
    ctl_path = tables / "ctl.parquet"
    if ctl_path.exists():
        ctl = pd.read_parquet(ctl_path)
        ctl = ctl[(ctl.alpha == 0.5) & (ctl.beta == 0.5) & HIDDEN(ctl.layer)]
        rows = rows.join(ctl.groupby(["experiment", "method", "pair"])["one_minus_cos"].mean()
                         .rename("ctl"))
    print("| method | pairs | test-error barrier (pp) | test-loss barrier | LLFC ratio, α = ½ | CTL 1 − cos, α = β = ½ |")
    print("|---|---|---|---|---|---|")
    for (exp, method), g in rows.groupby(["experiment", "method"]):
        print(f"| {method} | {len(g)} | {ms(100 * g.error_barrier, '{:.1f}')} | "
              f"{ms(g.loss_barrier, '{:.2f}')} | {ms(g.llfc_ratio)} | "
              f"{ms(g['ctl']) if 'ctl' in g and g['ctl'].notna().any() else '—'} |")
    ta_path = tables / "task_arithmetic.parquet"
    if not ta_path.exists():
        return
    ta = pd.read_parquet(ta_path)
    ev = ta[ta.kind == "evaluation"].assign(acc=lambda d: 100 * (1 - d.error))
    theta0 = ev[(ev.start == "pretrained") & (ev["lambda"] == 0)].groupby("task")["acc"].mean()
    print("\nθ_0 (pretrained) test accuracy before fine-tuning: "
          + ", ".join(f"{t} {a:.1f} %" for t, a in theta0.items()))
    print("\n| start | task addition: best λ | accuracy on task A | on task B | θ_0 on A, B | "
          "negation λ = 1: negated task | pretraining task |")
    print("|---|---|---|---|---|---|---|")
    for start, g in ev.groupby("start"):
        add = g[(g.operation == "addition") & g.role.isin(["a", "b"])]
        per = add.pivot_table(index=["pair", "lambda"], columns="role", values="acc")
        best = per.assign(mean=per.mean(axis=1)).groupby("pair")["mean"].idxmax()
        at = per.loc[best.tolist()]
        zero = per.xs(0.0, level="lambda")
        neg = g[(g.operation == "negation") & (g["lambda"] == g["lambda"].max())]
        print(f"| {start} | {ms(pd.Series([l for _, l in best]), '{:.2f}')} | {ms(at['a'], '{:.1f}')} | "
              f"{ms(at['b'], '{:.1f}')} | {zero['a'].mean():.1f}, {zero['b'].mean():.1f} | "
              f"{ms(neg[neg.role == 'a'].acc, '{:.1f}')} | "
              f"{ms(neg[neg.role == 'pretraining'].acc, '{:.1f}')} |")
    ft = ta[(ta.kind == "features") & HIDDEN(ta.layer)]
    print("\nfeature arithmetic, 1 − cos over hidden layers (mean over pairs and λ > 0):")
    print(ft[ft["lambda"] > 0].groupby(["start", "operation"])["one_minus_cos"].mean().round(4).to_string())
    avg_path = tables / "averaging.parquet"
    if avg_path.exists():
        avg = pd.read_parquet(avg_path)
        ev = avg[avg.kind == "evaluation"]
        own = ev[[t in ts.split("+") for t, ts in zip(ev.task, ev.tasks)]]
        print("\nmodel averaging, test accuracy (%) on each group's own tasks:")
        print((100 * (1 - own.groupby(["start", "group", "k", "model"])["error"].mean()))
              .unstack("model").round(1).to_string())
        f = avg[(avg.kind == "features") & HIDDEN(avg.layer)]
        print("\n1 − cos(f(average), mean f), hidden layers:")
        print(f.groupby(["start", "group"])["one_minus_cos"].mean().round(4).to_string())


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/finetune_mnist5k/tables"))
