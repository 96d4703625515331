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
    from lmcflow.figures.layout import _one_bn_mode

    df = pd.DataFrame({"experiment": ["mlp", "vgg", "vgg"], "bn": ["none", "reset", "interpolate"],
                       "loss": [1.0, 2.0, 3.0]})
    kept = _one_bn_mode(df)
    assert sorted(zip(kept["experiment"], kept["bn"])) == [("mlp", "none"), ("vgg", "reset")]


# --------------------------------------------------------------------------- figures 2, 4–11

from itertools import product  # noqa: E402

from lmcflow import figures  # noqa: E402
from lmcflow.barriers import alignment_table  # noqa: E402
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
    assert list(FIGURES) == [f"fig{i}" for i in range(1, 20)]
    assert all(callable(f) for f in FIGURES.values())


def test_method_and_layer_order():
    assert figures.layout._methods(["zzz", "weight_matching", "naive", "activation_matching", np.nan]) == [
        "naive", "weight_matching", "activation_matching", "zzz"]
    df = pd.DataFrame({"layer": ["fc2", "fc10", "fc1", "fc2"], "layer_index": [1, 2, 0, 1]})
    assert figures.layout._layer_order(df) == ["fc1", "fc2", "fc10"]


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
    df.loc[1, "dist_sigma"] = 0.0  # an exact zero among the samples
    _run(figures.fig_weak_additivity, df.drop(columns="noise"), tmp_path, "fig5")


def test_fig_commutativity(tmp_path):
    rng = np.random.default_rng(4)
    df = _table(rng)
    df["dist_com"] = 10.0 ** (-3 + df["noise"])
    df["dist_w"] = 1.0 + df["noise"]
    df["dist_h"] = 0.5 + df["noise"]
    df.loc[0, "dist_com"] = np.nan
    _run(figures.fig_commutativity, df.drop(columns="noise"), tmp_path, "fig6")


def _layer_barriers(epochs, methods=ALL_METHODS, layers=LAYERS):
    rng = np.random.default_rng(5)
    df = _table(rng, layers=layers, methods=methods, epoch=epochs, into=("a", "b"),
                split=("train", "test"))
    full = _table(rng, layers={e: ["(all)"] for e in layers}, methods=methods, epoch=epochs,
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


def test_fig_linear_toy_older_table(tmp_path):
    """A toy table without ``into`` and ``barrier`` columns (older runs) still draws."""
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


# --------------------------------------------------------------------------- pages, zeros, series

import re  # noqa: E402

import matplotlib  # noqa: E402

# a small net beside a deep one whose 30 layers have long names (a ResNet's layer groups)
DEEP = {"mlp_mnist": ["fc1", "fc2", "fc3", "out"],
        "resnet_cifar10": [f"layer{i // 8 + 1}.{i // 4 % 2}.conv{i % 4 + 1}" for i in range(30)]}
PAGE_LIMIT = (8.5, 11.0)  # inches


def _synthetic_tables(layers=DEEP):
    """One table per figure id: every experiment of ``layers``, all methods, two pairs."""
    rng = np.random.default_rng(10)
    first = {e: ls[0] for e, ls in layers.items()}
    exps = {e: None for e in layers}

    lmc = _table(rng, layers=exps, alpha=ALPHAS, split=("train", "test"),
                 bn=("none", "reset", "interpolate"))
    small = list(layers)[0]  # the first experiment has no BatchNorm
    lmc = lmc[(lmc["experiment"] == small) == (lmc["bn"] == "none")].reset_index(drop=True)
    bump = 0.3 * 4 * lmc["alpha"] * (1 - lmc["alpha"]) * (lmc["method"] == "naive")
    lmc = lmc.assign(loss=0.3 + 2 * bump + 0.01 * lmc["noise"], error=0.05 + bump)

    llfc = _table(rng, layers=layers, alpha=(0.25, 0.5, 0.75), sample=range(3))
    at_first = llfc["layer"] == llfc["experiment"].map(first)
    llfc = llfc.assign(one_minus_cos_alpha=np.where(at_first, 0.0,
                                                    10.0 ** (-4 + 2 * llfc["noise"])),
                       one_minus_cos_ab=0.3 + 0.3 * llfc["noise"],
                       coef_c=0.9 + 0.3 * llfc["noise"])

    weak = _table(rng, layers=layers, alpha=(0.25, 0.5, 0.75), sample=range(3))
    weak = weak.assign(dist_sigma=10.0 ** (-3 + 2 * weak["noise"]),
                       dist_sigma_shuffled=0.2 + 0.1 * weak["noise"])

    com = _table(rng, layers=layers)
    at_first = com["layer"] == com["experiment"].map(first)
    com = com.assign(dist_com=np.where(at_first, 0.0, 10.0 ** (-3 + com["noise"])),
                     dist_w=1.0 + com["noise"], dist_h=np.where(at_first, 0.0, 0.5 + com["noise"]))

    steps = pd.DataFrame([dict(experiment=e, order=o, step=i + 1, layer=layer)
                          for e, ls in layers.items()
                          for o, seq in (("shallow", ls), ("deep", ls[::-1]),
                                         ("random1", ls[1::2] + ls[::2]), ("random2", ls[::-1]))
                          for i, layer in enumerate(seq)])
    cum = _table(rng, layers=exps, into=("a", "b"), split=("test",), epoch=(0, 5, 10)
                 ).merge(steps, on="experiment")
    cum = cum.assign(loss_barrier=0.05 * cum["step"] * cum["noise"], error_barrier=0.01, loss=0.5,
                     error=0.1)

    rob = pd.concat([_table(rng, layers=layers, direction=("interpolation",), draw=(0,),
                            step=(0.0, 0.5, 1.0), epoch=(0, 10)),
                     _table(rng, layers=layers, direction=("random",), draw=range(2),
                            step=(0.0, 0.5, 1.0), epoch=(0, 10))], ignore_index=True)
    rob = rob.assign(split="test", error=0.1, norm=rob["step"],
                     loss=0.3 + rob["step"] * np.where(rob["direction"] == "random", 0.1, 3.0))

    sub = _table(rng, layers={e: ["(all)"] for e in layers},
                 direction=("interpolation", "subspace", "orthogonal"), endpoint=("a", "b"),
                 draw=range(2), norm_fraction=(0.0, 0.1, 0.5, 1.0), split=("test",))
    growth = sub["direction"].map({"interpolation": 0.5, "subspace": 5.0, "orthogonal": 0.1})
    sub = sub.assign(norm=sub["norm_fraction"] * 30.0, error=0.1,
                     loss=0.3 + growth * sub["norm_fraction"] ** 2 * (1 + sub["noise"]))

    from lmcflow.toy import linear_toy

    stitched = _table(rng, layers={e: ["(none)", *ls[:-1]] for e, ls in layers.items()},
                      into=("a", "b"), split=("test",))
    stitched = stitched.assign(error=np.where(stitched["layer"] == "(none)", 0.05,
                                              0.05 + 0.5 * stitched["noise"]), loss=0.3)

    tables = {"fig1": lmc, "fig2": lmc, "fig3": llfc, "fig4": llfc, "fig5": weak, "fig6": com,
              "fig7": _layer_barriers((1, 5, 10), layers=layers), "fig8": cum, "fig9": rob,
              "fig10": sub, "fig12": stitched}
    tables = {k: t.drop(columns="noise", errors="ignore") for k, t in tables.items()}
    return {**tables, "fig11": linear_toy(), "fig13": _pair_summary(), "fig14": _pair_summary()}


def _capture(monkeypatch):
    """Record the figures each figure function saves (they are closed, not destroyed)."""
    saved = []
    original = figures.layout._save

    def save(figs, out_pdf):
        saved.extend([figs] if isinstance(figs, matplotlib.figure.Figure) else figs)
        original(figs, out_pdf)

    for module in (figures.layout, figures.layerwise, figures.pairs, figures.across,
                   figures.finetune, figures.merge):
        if hasattr(module, "_save"):
            monkeypatch.setattr(module, "_save", save)
    return saved


def _pdf_pages(path):
    """(width, height) in inches of every page of a matplotlib PDF (from its MediaBoxes)."""
    boxes = re.findall(rb"/MediaBox\s*\[\s*([-\d.\s]+)\]", path.read_bytes())
    return [tuple(float(v) / 72.0 for v in box.split()[2:4]) for box in boxes]


def _check_pages(name, out, figs):
    pages = _pdf_pages(out)
    assert len(pages) == len(figs) >= 1, name
    for width, height in pages:
        assert width <= PAGE_LIMIT[0] and height <= PAGE_LIMIT[1], (name, width, height)
    for fig in figs:
        for ax in fig.findobj(matplotlib.axes.Axes):
            if ax.get_visible() and ax.axison:  # every panel shows data, none is a "no data" box
                assert ax.lines or ax.patches or ax.collections, (name, ax.get_title())
        for text in fig.findobj(matplotlib.text.Text):  # readable at the final page size
            if text.get_visible() and text.get_text().strip():
                assert text.get_fontsize() >= 8.0, (name, text.get_text(), text.get_fontsize())


def test_every_figure_fits_a_page(tmp_path, monkeypatch):
    """Several experiments (one with 30 layers), all methods, two pairs: every page of every
    figure is at most 8.5 × 11 in, no panel is empty and no text is below 8 pt."""
    figs = _capture(monkeypatch)
    for name, table in _synthetic_tables().items():
        figs.clear()
        out = _run(FIGURES[name], table, tmp_path, name)
        _check_pages(name, out, figs)


def test_one_deep_experiment_fits_a_page(tmp_path, monkeypatch):
    """One experiment only, the one with 30 layers: the layer-wise figures still fit."""
    figs = _capture(monkeypatch)
    tables = _synthetic_tables({"resnet_cifar10": DEEP["resnet_cifar10"]})
    for name in ("fig1", "fig3", "fig7", "fig8"):
        figs.clear()
        out = _run(FIGURES[name], tables[name], tmp_path, name)
        _check_pages(name, out, figs)


def test_many_experiments_get_one_page_each(tmp_path, monkeypatch):
    """Experiments that do not fit one page go on a page each; the PNG stacks the pages."""
    from PIL import Image

    figs = _capture(monkeypatch)
    layers = {f"exp{i}": ["fc1", "fc2", "out"] for i in range(3)}
    out = _run(figures.fig_llfc, _synthetic_tables(layers)["fig3"], tmp_path, "fig3")
    assert len(_pdf_pages(out)) == 3
    _check_pages("fig3", out, figs)
    with Image.open(out.with_suffix(".png")) as png:
        height = png.size[1]
    assert height > 2.5 * figs[0].get_figheight() * figures.PNG_DPI  # all three pages


def test_exact_zeros_are_drawn_at_zero(tmp_path, monkeypatch):
    """1 − cos_α is exactly 0 at the first layer: a symlog axis shows it at 0 (no log floor)."""
    figs = _capture(monkeypatch)
    table = _synthetic_tables({"mlp_mnist": DEEP["mlp_mnist"]})["fig3"]
    _run(figures.fig_llfc, table, tmp_path, "fig3")
    for ax in figs[0].findobj(matplotlib.axes.Axes):
        if ax.lines:
            assert ax.get_yscale() == "symlog"
            lowest = min(np.nanmin(line.get_ydata()) for line in ax.lines)
            assert lowest == 0.0 and ax.get_ylim()[0] <= 0.0


def test_fig_alignment_labels_zero_bars(lmc_bn, tmp_path, monkeypatch):
    """A zero barrier is a bar labelled "0.0", not a gap."""
    figs = _capture(monkeypatch)
    flat = lmc_bn.assign(loss=0.3, error=0.05)  # no barrier anywhere
    _run(figures.fig_alignment, flat, tmp_path, "fig2")
    labels = [t.get_text() for t in figs[0].findobj(matplotlib.text.Annotation)]
    assert labels and set(labels) <= {"0.0", "0.00", "-0.0", "-0.00"}


def test_fig_linear_toy_into_a_and_b_are_separate_series(tmp_path, monkeypatch):
    """Layer 1 into A (barrier 16) and into B (barrier 0.2) are two curves, not one band."""
    from lmcflow.toy import linear_toy

    figs = _capture(monkeypatch)
    _run(figures.fig_linear_toy, linear_toy(), tmp_path, "fig11")
    series = {}
    for ax in figs[0].findobj(matplotlib.axes.Axes):
        into = "a" if "into A" in ax.get_title() else "b" if "into B" in ax.get_title() else None
        for line in ax.get_lines():
            if into and not line.get_label().startswith("_"):
                series[(into, line.get_label().split(":")[0])] = (line.get_ydata(),
                                                                  line.get_label())
    layer1, layer2 = figures.layout.TOY_LABELS["layer1"], figures.layout.TOY_LABELS["layer2"]
    assert {k for k, _ in series} == {"a", "b"} and len(series) == 6  # full + 2 layers, each
    assert not np.allclose(series[("a", layer1)][0], series[("b", layer1)][0])
    assert not np.allclose(series[("a", layer2)][0], series[("b", layer2)][0])
    assert series[("a", layer1)][1].endswith("16.00") and series[("a", layer2)][1].endswith("0.20")
    assert series[("b", layer1)][1].endswith("0.20") and series[("b", layer2)][1].endswith("16.00")
    assert series[("a", figures.layout.TOY_LABELS["full"])][1].endswith("3.16")


def test_fig_federated_fits_a_page_and_reads_rounds(tmp_path):
    """fig15: one row of two panels per experiment (error and loss per round), global model and
    clients per aggregation; pages within 7.8 in wide."""
    rng = np.random.default_rng(0)
    rows = [{"experiment": exp, "aggregation": agg, "pair": "pair0", "seed": 0,
             "shards": "dirichlet β=0.1", "round": r, "epoch": r, "model": m, "client": k,
             "split": "test", "loss": float(rng.uniform(0.2, 2)), "error": float(rng.uniform(0, 1))}
            for exp in ("fed_iid", "fed_dirichlet") for agg in ("full", "layers", "aligned")
            for r in range(5) for k, m in [(-1, "global"), *((k, f"client{k}") for k in range(4))]]
    out = _run(figures.fig_federated, pd.DataFrame(rows), tmp_path, "fig15")
    pages = _pdf_pages(out)
    assert len(pages) == 1
    assert all(w <= 7.8 + 1e-6 and h <= 11.0 for w, h in pages), pages


# --------------------------------------------------------------------------- figures 13, 14


def _pair_summary(rng=None):
    """A per-pair summary (summary.pair_summary) of two families sweeping width (× seed) and
    one plain experiment: the barrier and the LLFC ratio fall with width for aligned pairs."""
    rng = rng or np.random.default_rng(3)
    rows = []
    points = [("mlp_sweep", {"sweep.model.width": w, "sweep.seed": s}, f"mlp_sweep_width{w}_seed{s}")
              for w in (8, 32, 128, 512) for s in (0, 1)]
    points += [("resnet", {"sweep.model.norm": n, "sweep.seed": 5}, f"resnet_norm{n}_seed5")
               for n in ("bn", "ln")]  # one seed: no block of its own
    points += [("vgg", {}, "vgg")]
    for family, swept, exp in points:
        width = swept.get("sweep.model.width", 64)
        for method, base in (("naive", 1.0), ("spawning", 0.0), ("weight_matching", 0.4)):
            for pair in ("pair0", "pair1"):
                shrink = base * 8 / width ** 0.5 * (1 + 0.2 * rng.random())
                rows.append(dict(experiment=exp, method=method, pair=pair, family=family, **swept,
                                 loss_barrier=shrink, error_barrier=0.1 * shrink,
                                 llfc_ratio=0.02 + 0.1 * shrink, dist_com=10 ** (-3 + 3 * shrink)))
    return pd.DataFrame(rows)


def test_fig_sweep_a_block_per_family_and_swept_key(tmp_path, monkeypatch):
    """One block of four panels per family and swept key with two values or more (mlp_sweep:
    width and seed; resnet: norm, as categories, not its one seed); none for the plain vgg; log x for widths
    8…512, one line per method; fits a page."""
    figs = _capture(monkeypatch)
    out = _run(figures.fig_sweep, _pair_summary(), tmp_path, "fig13")
    _check_pages("fig13", out, figs)
    axes = [ax for fig in figs for ax in fig.findobj(matplotlib.axes.Axes) if ax.lines]
    titles = [ax.get_title() for ax in axes]
    assert len(axes) == 3 * 4 and not any("vgg" in t for t in titles)
    width = [ax for ax in axes if ax.get_xlabel().startswith("model.width")]
    assert len(width) == 4 and all(ax.get_xscale() == "log" for ax in width)
    loss = next(ax for ax in width if ax.get_title() == "mlp_sweep: test loss barrier")
    naive = next(line for line in loss.get_lines() if line.get_label() == "naive")
    assert list(naive.get_xdata()) == [8, 32, 128, 512]
    table = _pair_summary()
    want = table[table.method == "naive"].groupby("sweep.model.width")["loss_barrier"].mean()
    np.testing.assert_allclose(naive.get_ydata(), want.to_numpy())  # mean over pairs and seeds
    norm = [ax for ax in axes if ax.get_xlabel() == "model.norm"]
    assert [t.get_text() for t in norm[0].get_xticklabels()] == ["bn", "ln"]


def test_fig_sweep_needs_a_swept_setting(tmp_path):
    table = _pair_summary()
    with pytest.raises(ValueError, match="no family sweeps"):
        figures.fig_sweep(table[table.family == "vgg"], tmp_path / "x.pdf")


def test_fig_lmc_llfc_one_point_per_pair(tmp_path, monkeypatch):
    """Every pair is one point at (test loss barrier, LLFC ratio), coloured by method, marked
    by family; pairs without a ratio are left out."""
    figs = _capture(monkeypatch)
    table = _pair_summary()
    table.loc[0, "llfc_ratio"] = np.nan
    out = _run(figures.fig_lmc_llfc, table, tmp_path, "fig14")
    _check_pages("fig14", out, figs)
    (ax,) = [ax for ax in figs[0].findobj(matplotlib.axes.Axes) if ax.collections]
    points = np.concatenate([c.get_offsets() for c in ax.collections if len(c.get_offsets())])
    kept = table.dropna(subset=["llfc_ratio"])
    assert len(points) == len(kept)
    assert sorted(map(tuple, points)) == sorted(zip(kept.loss_barrier, kept.llfc_ratio))
    legend = [t.get_text() for t in figs[0].legends[0].get_texts()]
    assert legend == ["naive", "spawning", "weight_matching", "mlp_sweep", "resnet", "vgg"]
    assert "Spearman" in ax.get_title()


def _finetune_tables(layers):
    """Synthetic ctl, task_arithmetic and averaging tables: every experiment of ``layers``,
    cross-task pairs from θ_0 and from random init, two pairs each."""
    rng = np.random.default_rng(3)
    starts = {"finetune_cross_task": "pretrained", "finetune_cross_task_random": "random"}
    ids = [dict(experiment=e, method=m, pair=f"pair{p}", task_a="inverted", task_b="rotated",
                start=s) for e in layers for m, s in starts.items() for p in range(2)]
    ctl = pd.DataFrame([{**i, "alpha": a, "beta": b, "layer": l, "layer_index": k, "sample": n,
                         "one_minus_cos": 0.0 if k == 0 else 10.0 ** rng.uniform(-4, -1),
                         "coef_c": rng.uniform(0.8, 1.2), "one_minus_cos_ab": rng.uniform(0.2, 0.9)}
                        for i in ids for a, b in ((0.5, 0.5), (1.0, 1.0))
                        for k, l in enumerate(layers[i["experiment"]]) for n in range(4)])
    lambdas = np.linspace(0, 1, 11)
    ev = [{**i, "kind": "evaluation", "operation": op, "lambda": lam, "task": t, "role": r,
           "split": "test", "loss": rng.uniform(0.1, 3), "error": rng.uniform(0, 1)}
          for i in ids for op in ("addition", "negation") for lam in lambdas
          for t, r in (("inverted", "a"), ("rotated", "b"), ("original", "pretraining"),
                       ("flipped", "other"))]
    ft = [{**i, "kind": "features", "operation": op, "lambda": lam, "layer": l, "layer_index": k,
           "one_minus_cos": 0.0 if lam == 0 else rng.uniform(0, 0.5), "one_minus_cos_sd": 0.05,
           "coef_c": rng.uniform(0.5, 2), "coef_c_sd": 0.1, "samples": 4}
          for i in ids for op in ("addition", "negation") for lam in lambdas
          for k, l in enumerate(layers[i["experiment"]])]
    groups = {"tasks": ("flipped+inverted+rotated", 3), "same_task:rotated": ("rotated", 4),
              "same_task:inverted": ("inverted", 4), "same_task:flipped": ("flipped", 4)}
    avg = [{"experiment": e, "start": s, "group": g, "tasks": ts, "k": k, "kind": "evaluation",
            "model": m, "task": t, "split": "test", "loss": rng.uniform(0.1, 2),
            "error": rng.uniform(0, 1)}
           for e in layers for s in ("pretrained", "random") for g, (ts, k) in groups.items()
           for m in ("average", "ensemble", "members")
           for t in ("original", "rotated", "inverted", "flipped")]
    avg += [{"experiment": e, "start": s, "group": g, "tasks": ts, "k": k, "kind": "features",
             "layer": l, "layer_index": j, "one_minus_cos": 10.0 ** rng.uniform(-5, -1),
             "coef_c": rng.uniform(0.9, 2)}
            for e in layers for s in ("pretrained", "random") for g, (ts, k) in groups.items()
            for j, l in enumerate(layers[e])]
    return {"fig16": ctl, "fig17": pd.DataFrame(ev + ft), "fig18": pd.DataFrame(avg)}


def test_finetune_figures_fit_a_page(tmp_path, monkeypatch):
    """fig16-fig18 for a shallow and a 30-layer experiment: every page within 7.8 × 11 in, no
    empty panel, no text below 8 pt."""
    figs = _capture(monkeypatch)
    layers = {"mlp_ft": ["fc1", "relu1", "fc2", "relu2", "out"],
              "deep_ft": DEEP["resnet_cifar10"]}
    for name, table in _finetune_tables(layers).items():
        figs.clear()
        out = _run(FIGURES[name], table, tmp_path, name)
        _check_pages(name, out, figs)
        assert all(w <= 7.8 + 1e-6 for w, _ in _pdf_pages(out)), name
