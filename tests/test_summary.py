"""The per-pair summary (lmcflow.summary): sweep columns of the tables, hidden layers, the LLFC
ratio, barriers and Dist_com per pair, checked against direct computations on tiny tables."""

import numpy as np
import pandas as pd
import pytest

from lmcflow.summary import add_sweep_columns, hidden, llfc_ratio, pair_summary

POINTS = {"s_width8": {"family": "s", "swept": {"model.width": 8, "seed": 0}},
          "s_width64": {"family": "s", "swept": {"model.width": 64, "seed": 0}},
          "mlp": {"family": "mlp", "swept": {}}}


def test_sweep_columns_follow_the_id_columns():
    table = pd.DataFrame({"experiment": ["mlp", "s_width8", "s_width64"], "method": "naive",
                          "pair": "pair0", "alpha": 0.5, "loss": [1.0, 2.0, 3.0]})
    out = add_sweep_columns(table, POINTS)
    assert list(out.columns) == ["experiment", "method", "pair", "family", "sweep.model.width",
                                 "sweep.seed", "alpha", "loss"]
    assert list(out["family"]) == ["mlp", "s", "s"]
    assert out["sweep.model.width"].tolist()[1:] == [8, 64] and pd.isna(out["sweep.model.width"][0])
    assert list(table.columns) == ["experiment", "method", "pair", "alpha", "loss"]  # untouched
    # an experiment the points do not name is its own family; no sweep, no sweep columns
    plain = add_sweep_columns(table, {})
    assert list(plain["family"]) == list(table["experiment"]) and "sweep.seed" not in plain


def test_sweep_columns_survive_parquet(tmp_path):
    points = {"a": {"family": "f", "swept": {"model.norm": "ln", "train.augment": True}},
              "b": {"family": "g", "swept": {}}}
    table = add_sweep_columns(pd.DataFrame({"experiment": ["a", "b"], "method": "naive",
                                            "pair": "pair0"}), points)
    table.to_parquet(tmp_path / "t.parquet")
    back = pd.read_parquet(tmp_path / "t.parquet")
    assert back.loc[0, "sweep.model.norm"] == "ln" and back.loc[0, "sweep.train.augment"] == True  # noqa: E712
    assert pd.isna(back.loc[1, "sweep.model.norm"])


def _llfc():
    """Two experiments: e has layers 0..3 (hidden: 1 and 2), f layers 0..2 (hidden: 1)."""
    rows = []
    rng = np.random.default_rng(0)
    for exp, n in (("e", 4), ("f", 3)):
        for pair in ("pair0", "pair1"):
            for i in range(n):
                for alpha in (0.25, 0.5, 0.75):
                    for sample in range(3):
                        rows.append(dict(experiment=exp, method="naive", pair=pair, alpha=alpha,
                                         layer=f"l{i}", layer_index=i, sample=sample,
                                         one_minus_cos_alpha=rng.uniform(0, 0.1),
                                         one_minus_cos_ab=rng.uniform(0.2, 0.5), coef_c=1.0))
    df = pd.DataFrame(rows)
    df.loc[df.index[(df.layer == "l1") & (df.alpha == 0.5)][0], "one_minus_cos_alpha"] = np.nan
    return df


def test_hidden_layers_are_all_but_the_first_and_the_last_of_each_experiment():
    llfc = _llfc()
    kept = llfc[hidden(llfc)].groupby("experiment")["layer"].unique()
    assert sorted(kept["e"]) == ["l1", "l2"] and list(kept["f"]) == ["l1"]


def test_llfc_ratio_is_the_mean_over_hidden_layers_of_the_ratio_of_means():
    llfc = _llfc()
    ratio = llfc_ratio(llfc)
    for (exp, pair), layers in ((("e", "pair1"), ["l1", "l2"]), (("f", "pair0"), ["l1"])):
        want = []
        for layer in layers:
            rows = llfc[(llfc.experiment == exp) & (llfc.pair == pair) & (llfc.layer == layer)
                        & (llfc.alpha == 0.5)]
            a = np.nanmean(rows.one_minus_cos_alpha.to_numpy())  # the NaN sample left out
            b = rows.one_minus_cos_ab.to_numpy().mean()
            want.append(a / b)
        assert ratio[(exp, "naive", pair)] == pytest.approx(np.mean(want), rel=1e-12)


def test_pair_summary_per_pair():
    """Hand example: test loss 1, 3, 2 at α = 0, ½, 1 on the configured curve → barrier 1.5;
    the other curve and the train split are ignored; Dist_com of the middle layer only."""
    llfc = _llfc()
    curve = pd.DataFrame({"alpha": [0.0, 0.5, 1.0], "loss": [1.0, 3.0, 2.0],
                          "error": [0.1, 0.3, 0.1]})
    lmc = pd.concat([curve.assign(experiment=e, method="naive", pair=p, split=s, bn=b,
                                  configured=b == "none",
                                  loss=curve.loss * (1 if (s, b) == ("test", "none") else 9))
                     for e in ("e", "f") for p in ("pair0", "pair1")
                     for s in ("train", "test") for b in ("none", "repair")], ignore_index=True)
    lmc = add_sweep_columns(lmc, {"e": {"family": "fam", "swept": {"seed": 3}}})
    com = pd.DataFrame([dict(experiment=e, method="naive", pair=p, layer=f"c{i}", layer_index=i,
                             dist_com=10.0 ** i, dist_w=1.0, dist_h=1.0)
                        for e in ("e", "f") for p in ("pair0", "pair1") for i in range(3)])
    out = pair_summary(lmc, llfc, com)
    assert list(out.columns) == ["experiment", "method", "pair", "family", "sweep.seed",
                                 "loss_barrier", "error_barrier", "llfc_ratio", "dist_com"]
    assert len(out) == 4
    assert np.allclose(out.loss_barrier, 1.5) and np.allclose(out.error_barrier, 0.2)
    assert np.allclose(out.dist_com, 10.0)  # layer c1: not the first Linear/Conv, not the logits
    ratio = llfc_ratio(llfc)
    assert np.allclose(out.llfc_ratio, [ratio[(e, "naive", p)] for e, p in zip(out.experiment, out.pair)])
    assert out.set_index("experiment")["family"].to_dict() == {"e": "fam", "f": "f"}
