"""Figures are written (PDF + PNG), non-empty, and leave their input untouched."""
import numpy as np
import pandas as pd
import pytest

from lmcflow.figures import FIGURES, fig_llfc, fig_lmc

ALPHAS = np.linspace(0, 1, 11)
LAYERS = {"mlp_mnist": ["fc1", "fc2", "fc3"], "resnet20_cifar10": ["conv1", "block1", "block2", "block3", "fc"]}
METHODS = ["spawning", "permutation"]


@pytest.fixture
def lmc():
    rng = np.random.default_rng(0)
    rows = []
    for exp in LAYERS:
        for m, h in zip(METHODS, (0.05, 0.3)):
            for pair in range(2):
                for split in ("train", "test"):
                    for bn in ("reset", "none"):
                        for a in ALPHAS:
                            bump = h * 4 * a * (1 - a)
                            rows.append(dict(experiment=exp, method=m, pair=pair, alpha=a,
                                             split=split, bn=bn,
                                             loss=0.3 + 2 * bump + 0.01 * rng.random(),
                                             error=0.05 + bump + 0.005 * rng.random()))
    return pd.DataFrame(rows)


@pytest.fixture
def llfc():
    rng = np.random.default_rng(1)
    rows = []
    for exp, layers in LAYERS.items():
        for m in METHODS:
            for pair in range(2):
                for li, layer in enumerate(layers):
                    for a in (0.25, 0.5, 0.75):
                        for s in range(8):
                            rows.append(dict(experiment=exp, method=m, pair=pair, alpha=a,
                                             layer=layer, layer_index=li, sample=s,
                                             one_minus_cos_alpha=10.0 ** rng.uniform(-5, -2),
                                             one_minus_cos_ab=rng.uniform(0.2, 0.6),
                                             coef_c=rng.uniform(0.9, 1.2)))
    df = pd.DataFrame(rows)
    df.loc[0, "one_minus_cos_alpha"] = np.nan  # zero feature vector
    df.loc[1, "one_minus_cos_alpha"] = -1e-16  # rounding below zero
    return df


def _check(out_pdf):
    png = out_pdf.with_suffix(".png")
    assert out_pdf.is_file() and out_pdf.stat().st_size > 1000
    assert png.is_file() and png.stat().st_size > 1000
    assert out_pdf.read_bytes()[:4] == b"%PDF"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_registry():
    assert FIGURES["fig1"] is fig_lmc and FIGURES["fig3"] is fig_llfc


def test_fig_lmc(lmc, tmp_path):
    before = lmc.copy()
    out = tmp_path / "sub" / "dir" / "fig1.pdf"
    fig_lmc(lmc, out)
    _check(out)
    pd.testing.assert_frame_equal(lmc, before)


def test_fig_lmc_single_pair_no_bn(lmc, tmp_path):
    df = lmc[(lmc["pair"] == 0) & (lmc["bn"] == "reset")].drop(columns="bn")
    fig_lmc(df, tmp_path / "fig1.pdf")
    _check(tmp_path / "fig1.pdf")


def test_fig_lmc_needs_test_split(lmc, tmp_path):
    with pytest.raises(ValueError):
        fig_lmc(lmc[lmc["split"] == "train"], tmp_path / "x.pdf")


def test_fig_llfc(llfc, tmp_path):
    before = llfc.copy()
    out = tmp_path / "figs" / "fig3.pdf"
    fig_llfc(llfc, out)
    _check(out)
    pd.testing.assert_frame_equal(llfc, before)


def test_fig_llfc_linear_scale(llfc, tmp_path):
    df = llfc.assign(one_minus_cos_alpha=0.1, one_minus_cos_ab=0.3)
    fig_llfc(df, tmp_path / "fig3.pdf")
    _check(tmp_path / "fig3.pdf")


def test_no_open_figures_left(lmc, llfc, tmp_path):
    import matplotlib.pyplot as plt
    plt.close("all")
    fig_lmc(lmc, tmp_path / "a.pdf")
    fig_llfc(llfc, tmp_path / "b.pdf")
    assert plt.get_fignums() == []


def test_bn_mode_is_chosen_per_experiment():
    """An experiment without BatchNorm ("none") keeps its rows beside one with two modes."""
    from lmcflow.figures import _one_bn_mode

    df = pd.DataFrame({"experiment": ["mlp", "vgg", "vgg"], "bn": ["none", "reset", "interpolate"],
                       "loss": [1.0, 2.0, 3.0]})
    kept = _one_bn_mode(df)
    assert sorted(zip(kept["experiment"], kept["bn"])) == [("mlp", "none"), ("vgg", "reset")]


# --------------------------------------------------------------------------- figures 2, 4–11

from itertools import product  # noqa: E402

from lmcflow import figures  # noqa: E402
from lmcflow.figures import alignment_table  # noqa: E402
from lmcflow.metrics import barriers  # noqa: E402

ALL_METHODS = ["naive", "spawning", "weight_matching", "activation_matching"]
FEW_METHODS = ["spawning", "weight_matching", "activation_matching"]  # fewer panels: faster


def _table(rng, layers=LAYERS, methods=ALL_METHODS, pairs=2, **levels):
    """Every (experiment, method, pair, layer, *levels) combination, in long form.

    ``layers=None`` leaves out the layer columns; experiments keep their own layer sets.
    """
    rows = []
    for exp, exp_layers in layers.items():
        for m, pair in product(methods, range(pairs)):
            for li, layer in enumerate(exp_layers or [None]):
                for combo in product(*levels.values()):
                    row = dict(experiment=exp, method=m, pair=pair)
                    if exp_layers:
                        row.update(layer=layer, layer_index=li)
                    rows.append({**row, **dict(zip(levels, combo))})
    df = pd.DataFrame(rows)
    df["noise"] = rng.random(len(df))
    return df


def _run(fig, table, tmp_path, name):
    """Draw ``fig`` from ``table``: PDF + PNG written, input untouched, no figure left open."""
    import matplotlib.pyplot as plt

    before = table.copy()
    out = tmp_path / "figs" / f"{name}.pdf"
    fig(table, out)
    _check(out)
    pd.testing.assert_frame_equal(table, before)
    assert plt.get_fignums() == []
    return out


def test_registry_has_all_figures():
    assert list(FIGURES) == [f"fig{i}" for i in range(1, 12)]
    assert all(callable(f) for f in FIGURES.values())


def test_method_and_layer_order():
    assert figures._methods(["zzz", "weight_matching", "naive", "activation_matching", np.nan]) == [
        "naive", "weight_matching", "activation_matching", "zzz"]
    df = pd.DataFrame({"layer": ["fc2", "fc10", "fc1", "fc2"], "layer_index": [1, 2, 0, 1]})
    assert figures._layer_order(df) == ["fc1", "fc2", "fc10"]


def test_alignment_table_matches_barriers():
    """Hand example: loss 1, 3, 2 at α = 0, .5, 1 → barrier 3 − 1.5 = 1.5; error → 0.1."""
    lmc = pd.DataFrame({"experiment": "e", "method": "naive", "pair": 0, "bn": "none",
                        "split": "test", "alpha": [0.0, 0.5, 1.0], "loss": [1.0, 3.0, 2.0],
                        "error": [0.1, 0.2, 0.1]})
    both = pd.concat([lmc, lmc.assign(split="train", loss=[1.0, 1.0, 1.0])], ignore_index=True)
    tab = alignment_table(both)
    assert list(tab.columns) == ["experiment", "method", "pair", "bn", "split", "loss_barrier",
                                 "error_barrier"]
    ref = barriers(both)
    merged = tab.merge(ref, on=["experiment", "method", "pair", "bn", "split"])
    np.testing.assert_allclose(merged["loss_barrier_x"], merged["loss_barrier_y"])
    np.testing.assert_allclose(merged["error_barrier_x"], merged["error_barrier_y"])
    test = tab.set_index("split")
    assert test.loc["test", "loss_barrier"] == pytest.approx(1.5)
    assert test.loc["test", "error_barrier"] == pytest.approx(0.1)
    assert test.loc["train", "loss_barrier"] == pytest.approx(0.0)
    assert (alignment_table(both.drop(columns="bn"))["bn"] == "none").all()


@pytest.fixture
def lmc_bn():
    """LMC curves: MLP without BN ("none"), VGG with BN reset and interpolated."""
    rng = np.random.default_rng(2)
    df = _table(rng, layers={"mlp_mnist": None, "vgg_cifar10": None}, alpha=ALPHAS,
                split=("train", "test"), bn=("none", "reset", "interpolate"))
    df = df[(df["experiment"] == "mlp_mnist") == (df["bn"] == "none")].reset_index(drop=True)
    h = df["method"].map(dict(zip(ALL_METHODS, (0.4, 0.1, 0.05, 0.03)))) * (
        1 + (df["bn"] == "interpolate"))
    bump = h * 4 * df["alpha"] * (1 - df["alpha"])
    return df.assign(loss=0.3 + 2 * bump + 0.01 * df["noise"],
                     error=0.05 + bump + 0.005 * df["noise"]).drop(columns="noise")


def test_fig_alignment_raw_and_barrier_table(lmc_bn, tmp_path):
    _run(figures.fig_alignment, lmc_bn, tmp_path, "fig2")
    vgg = alignment_table(lmc_bn[lmc_bn["experiment"] == "vgg_cifar10"])  # smaller: faster
    _run(figures.fig_alignment, vgg, tmp_path, "fig2_from_table")


def test_fig_coef(llfc, tmp_path):
    df = llfc.copy()
    df.loc[2, "coef_c"] = np.nan
    _run(figures.fig_coef, df, tmp_path, "fig4")


def test_fig_weak_additivity(tmp_path):
    rng = np.random.default_rng(3)
    relu = {"mlp_mnist": ["relu1", "relu2"], "vgg_cifar10": ["relu1", "relu2", "relu3", "relu4"]}
    df = _table(rng, layers=relu, alpha=(0.25, 0.5, 0.75), sample=range(4))
    df["dist_sigma"] = 10.0 ** (-4 + 2 * df["noise"])
    df["dist_sigma_shuffled"] = 0.5 + 0.1 * df["noise"]
    df.loc[0, "dist_sigma"] = np.nan
    df.loc[1, "dist_sigma"] = 0.0  # clipped at the log floor
    _run(figures.fig_weak_additivity, df.drop(columns="noise"), tmp_path, "fig5")


def test_fig_commutativity(tmp_path):
    rng = np.random.default_rng(4)
    df = _table(rng)
    df["dist_com"] = 10.0 ** (-3 + df["noise"])
    df["dist_w"] = 1.0 + df["noise"]
    df["dist_h"] = 0.5 + df["noise"]
    df.loc[0, "dist_com"] = np.nan
    _run(figures.fig_commutativity, df.drop(columns="noise"), tmp_path, "fig6")


def _layer_barriers(epochs, methods=ALL_METHODS):
    rng = np.random.default_rng(5)
    df = _table(rng, methods=methods, epoch=epochs, into=("a", "b"), split=("train", "test"))
    full = _table(rng, layers={e: ["(all)"] for e in LAYERS}, methods=methods, epoch=epochs,
                  into=("both",), split=("train", "test")).assign(layer_index=-1)
    df = pd.concat([df, full], ignore_index=True)
    df["loss_barrier"] = (df["noise"] - 0.2) * (1 + 2 * (df["layer"] == "(all)"))
    df["error_barrier"] = df["loss_barrier"] / 10
    df["loss"], df["error"] = 0.5 + df["noise"], 0.1 * df["noise"]
    return df.drop(columns="noise")


def test_fig_layer_barriers_heatmap_and_bars(tmp_path):
    several = _layer_barriers((1, 5, 10, 20), methods=["weight_matching", "activation_matching"])
    single = _layer_barriers((20,), methods=["naive", "weight_matching"])
    # one method with a single epoch (bars) beside methods with several (heatmaps)
    mixed = pd.concat([several, single[single["method"] == "naive"]], ignore_index=True)
    mixed.loc[3, "loss_barrier"] = np.nan
    _run(figures.fig_layer_barriers, mixed, tmp_path, "fig7")
    _run(figures.fig_layer_barriers, single, tmp_path, "fig7_single_epoch")


def test_fig_cumulative(tmp_path):
    rng = np.random.default_rng(6)
    rows = []
    for exp, layers in LAYERS.items():
        for order, seq in (("shallow", layers), ("deep", layers[::-1])):
            for step, layer in enumerate(seq):
                rows.append(dict(experiment=exp, order=order, step=step, layer=layer))
    steps = pd.DataFrame(rows)
    base = _table(rng, layers={e: None for e in LAYERS}, methods=FEW_METHODS, into=("a", "b"),
                  split=("train", "test"))
    df = base.merge(steps, on="experiment")
    df["loss_barrier"] = df["step"] * 0.1 + 0.05 * rng.random(len(df))
    df["error_barrier"] = df["loss_barrier"] / 10
    df["loss"], df["error"] = 0.5 + df["loss_barrier"], 0.1
    _run(figures.fig_cumulative, df.drop(columns="noise"), tmp_path, "fig8")


def test_fig_robustness(tmp_path):
    rng = np.random.default_rng(7)
    interp = _table(rng, methods=FEW_METHODS, direction=("interpolation",), draw=(0,),
                    step=(0.0, 0.5, 1.0))
    rand = _table(rng, methods=FEW_METHODS, direction=("random",), draw=range(3),
                  step=(0.0, 0.5, 1.0))
    df = pd.concat([interp, rand], ignore_index=True).assign(split="test")
    df["loss"] = 0.3 + df["step"] * np.where(df["direction"] == "random", 0.1, 3.0) * df["noise"]
    df["error"], df["norm"] = 0.1, df["step"] * 2.0
    _run(figures.fig_robustness, df.drop(columns="noise"), tmp_path, "fig9")


def test_fig_subspace(tmp_path):
    rng = np.random.default_rng(8)
    df = _table(rng, layers={e: ["(all)", "fc1"] for e in LAYERS}, methods=FEW_METHODS,
                direction=("interpolation", "subspace", "orthogonal"), draw=range(3),
                norm=(0.0, 1.0, 2.0, 4.0), split=("test",))
    growth = df["direction"].map({"interpolation": 0.1, "subspace": 0.5, "orthogonal": 2.0})
    df["loss"] = 0.3 + growth * df["norm"] ** 2 * (0.8 + 0.4 * df["noise"])
    df["error"] = 0.1
    _run(figures.fig_subspace, df.drop(columns=["noise", "layer_index"]), tmp_path, "fig10")


def test_fig_linear_toy(tmp_path):
    a = np.linspace(0, 1, 11)
    df = pd.concat([pd.DataFrame({"path": p, "alpha": a, "loss": f(a)}) for p, f in (
        ("full", lambda a: (a * (1 - a)) ** 2 + 0.1), ("layer1", lambda a: 0.1 + 0 * a),
        ("layer2", lambda a: 0.1 + 0.05 * a * (1 - a)))], ignore_index=True)
    _run(figures.fig_linear_toy, df, tmp_path, "fig11")


def test_all_figures_raise_on_empty_test_split(tmp_path):
    empty = pd.DataFrame({"experiment": [], "method": [], "pair": [], "split": [],
                          "loss_barrier": []})
    for fig in (figures.fig_layer_barriers, figures.fig_cumulative):
        with pytest.raises(ValueError):
            fig(empty, tmp_path / "x.pdf")
