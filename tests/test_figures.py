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
