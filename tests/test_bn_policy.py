"""One BatchNorm policy for every network an analysis compares (A, B and θ_α alike).

These tests run the workflow's own scripts (features, llfc, mechanisms, lmc) on pairs written
to disk, so they check what a job computes, not only the package functions it calls.
"""

import json

import pandas as pd
import pytest
import torch

from lmcflow.interpolation import batchnorm_modules, reset_bn
from lmcflow.io import save_torch
from lmcflow.metrics import barriers
from lmcflow.models import build_model
from lmcflow.training import evaluate
from scriptrun import run_script

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = {"arch": "vgg", "args": {"depth": 11, "batch_norm": True, "width": 0.125},
        "in_shape": [1, 28, 28], "num_classes": 10}
DATA = {"name": "mnist5k", "data_dir": "data", "download": False}
WILDCARDS = {"experiment": "vgg", "method": "naive", "pair": "pair0"}
LLFC = {"alphas": [0.25, 0.5, 0.75], "probe_size": 48, "batch_size": 16}


def vgg_state(seed: int, stats_seed: int) -> dict:
    """A VGG-11-BN whose running statistics are not those of the data (as after training with
    momentum): a reset changes them."""
    torch.manual_seed(seed)
    model = build_model(SPEC["arch"], tuple(SPEC["in_shape"]), SPEC["num_classes"], **SPEC["args"])
    g = torch.Generator().manual_seed(stats_seed)
    with torch.no_grad():
        for m in batchnorm_modules(model):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.state_dict()


def write_pair(root, state_a, state_b) -> dict:
    files = {"a": root / "model_a.pt", "b": root / "model_b.pt", "info": root / "pair.json"}
    save_torch(state_a, files["a"])
    save_torch(state_b, files["b"])
    files["info"].write_text(json.dumps({"spec": SPEC}))
    return files


def analysis_setting(bn: str, points: int = 3) -> dict:
    return {"data": DATA, "device": "cpu", "seed": 0, "llfc": LLFC,
            "lmc": {"points": points, "bn": bn, "batch_size": 1000}}


def analyses_of(tmp_path, pair: dict, bn: str, points: int = 3) -> dict[str, pd.DataFrame]:
    """The analyse_pair job's tables: lmc, llfc, weak_additivity, commutativity, stitching."""
    names = ("lmc", "features", "llfc", "weak_additivity", "commutativity", "stitching")
    out = {name: tmp_path / f"{name}_{bn}.parquet" for name in names}
    run_script("analyse_pair", input=pair, output=out,
               params={"setting": analysis_setting(bn, points)}, wildcards=WILDCARDS)
    return {name: pd.read_parquet(path) for name, path in out.items() if name != "features"}


def assert_perfect_llfc(table: pd.DataFrame) -> None:
    assert len(table) and set(table["layer"]) >= {"features.conv1", "features.relu8", "out"}
    finite = table.dropna(subset=["one_minus_cos_alpha"])  # a ReLU can output all zeros
    assert len(finite) > 0.9 * len(table)
    for col in ("one_minus_cos_alpha", "one_minus_cos_ab"):
        worst = finite.loc[finite[col].abs().idxmax()]
        assert abs(worst[col]) < 1e-9, (col, worst.to_dict())
    worst = finite.loc[(finite["coef_c"] - 1).abs().idxmax()]
    assert abs(worst["coef_c"] - 1) < 1e-9, worst.to_dict()


@pytest.mark.parametrize("bn", ["reset", "interpolate", "repair"])
def test_batchnorm_self_pair_has_perfect_llfc_in_every_bn_mode(tmp_path, bn):
    state = vgg_state(0, 1)
    pair = write_pair(tmp_path, state, state)
    t = analyses_of(tmp_path, pair, bn)
    assert_perfect_llfc(t["llfc"])
    weak, com, stitched = t["weak_additivity"], t["commutativity"], t["stitching"]
    assert weak["dist_sigma"].abs().max() < 1e-12
    assert com[["dist_com", "dist_w", "dist_h"]].abs().max().max() < 1e-12
    assert stitched["error"].nunique() == 1 and stitched["loss"].nunique() == 1  # all are A


def test_with_reset_a_pair_differing_only_in_bn_statistics_is_a_self_pair(tmp_path):
    """The reset replaces the statistics of A and B as well as those of θ_α, so two networks
    with the same weights compare as identical, in the features and in the mechanisms."""
    pair = write_pair(tmp_path, vgg_state(0, 1), vgg_state(0, 2))
    t = analyses_of(tmp_path, pair, "reset")
    assert_perfect_llfc(t["llfc"])
    assert t["weak_additivity"]["dist_sigma"].abs().max() < 1e-12
    assert t["commutativity"]["dist_h"].abs().max() < 1e-12
    # without the reset they are different networks
    com = analyses_of(tmp_path, pair, "interpolate")["commutativity"]
    assert com["dist_h"].iloc[1:].min() > 1e-4


@pytest.mark.parametrize("self_pair", [True, False])
def test_lmc_endpoint_rows_are_the_endpoints_under_the_policy(tmp_path, self_pair):
    state_a = vgg_state(0, 1)
    state_b = state_a if self_pair else vgg_state(1, 2)
    pair = write_pair(tmp_path, state_a, state_b)
    lmc = analyses_of(tmp_path, pair, "reset", points=5)["lmc"]
    assert set(lmc["bn"]) == {"reset", "interpolate", "repair"}
    assert set(lmc.loc[lmc.configured, "bn"]) == {"reset"}
    from lmcflow.data import load_dataset

    data = load_dataset("mnist5k")
    for bn in ("reset", "interpolate"):
        model = build_model(SPEC["arch"], tuple(SPEC["in_shape"]), 10, **SPEC["args"])
        model.load_state_dict(state_a)
        if bn == "reset":
            reset_bn(model, data.train_x, data.normalize, batch_size=1000)
        for split in ("train", "test"):
            want = evaluate(model, *data.split(split), data.normalize, 1000)
            row = lmc[(lmc.bn == bn) & (lmc.split == split) & (lmc.alpha == 1.0)].iloc[0]
            assert (row.loss, row.error) == want, (bn, split)
    if self_pair:
        bar = barriers(lmc)
        assert bar[["loss_barrier", "error_barrier"]].abs().max().max() < 1e-12
