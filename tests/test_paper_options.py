"""The options that let a paper config run as its paper did (lmc.repair_logits, llfc.first_feature,
matching.residual): each reaches the job that uses it, and a self-pair stays a perfect self-pair
under every one of them. Also: the paper configs use their papers' policies.

The job-level tests run the workflow's own scripts (analyse_pair, make_pair) on pairs written to
disk, as tests/test_bn_policy.py does.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lmcflow.config import load_yaml
from lmcflow.io import save_torch
from lmcflow.alignment import activation_matching, permutation_spec
from lmcflow.metrics import barriers
from lmcflow.models import build_model
from scriptrun import run_script

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
DATA = {"name": "mnist5k", "data_dir": "data", "download": False}
RESNET = {"arch": "resnet20", "args": {"width": 0.25, "norm": "bn"}, "in_shape": [1, 28, 28],
          "num_classes": 10}
MLP = {"arch": "mlp", "args": {"width": 32, "depth": 2}, "in_shape": [1, 28, 28], "num_classes": 10}
WILDCARDS = {"experiment": "e", "method": "naive", "pair": "pair0"}


def state(spec: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build_model(spec["arch"], tuple(spec["in_shape"]), spec["num_classes"], **spec["args"])
    with torch.no_grad():  # BN statistics that are not the data's, as after training
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
    return model.state_dict()


def analyses(tmp_path, spec, state_a, state_b, lmc: dict, llfc: dict, tag: str) -> dict:
    """The analyse_pair job's tables for the pair (state_a, state_b) of model `spec`."""
    pair = {"a": tmp_path / f"a_{tag}.pt", "b": tmp_path / f"b_{tag}.pt", "info": tmp_path / "pair.json"}
    save_torch(state_a, pair["a"])
    save_torch(state_b, pair["b"])
    pair["info"].write_text(json.dumps({"spec": spec}))
    names = ("lmc", "features", "llfc", "weak_additivity", "commutativity", "stitching")
    out = {name: tmp_path / f"{name}_{tag}.parquet" for name in names}
    setting = {"data": DATA, "device": "cpu", "seed": 0,
               "llfc": {"alphas": [0.5], "probe_size": 32, "batch_size": 16, **llfc},
               "lmc": {"points": 3, "batch_size": 1000, **lmc}}
    run_script("analyse_pair", input=pair, output=out, params={"setting": setting},
               wildcards=WILDCARDS)
    return {name: pd.read_parquet(path) for name, path in out.items() if name != "features"}


def assert_perfect_llfc(llfc: pd.DataFrame, first: str) -> None:
    llfc = llfc.sort_values("layer_index", kind="stable")
    assert llfc.layer.iloc[0] == first and set(llfc.layer) >= {"layer3.2", "fc"}
    for col in ("one_minus_cos_alpha", "one_minus_cos_ab"):
        assert llfc[col].notna().mean() > 0.9 and llfc[col].abs().max() < 1e-9, col
    assert (llfc.coef_c - 1).abs().max() < 1e-9


def test_a_self_pair_is_perfect_with_the_conv1_feature(tmp_path):
    """The analyse_pair job with llfc.first_feature conv1 on A = B (a ResNet-20 with
    BatchNorm): LLFC is perfect in every layer from stem.conv on, every stitched network (the
    stem conv among the stitch points) is A, and the LMC barriers are 0."""
    s = state(RESNET, 0)
    t = analyses(tmp_path, RESNET, s, s, {"bn": "interpolate", "policies": []},
                 {"first_feature": "conv1"}, "self")
    assert barriers(t["lmc"])[["loss_barrier", "error_barrier"]].abs().max().max() == 0
    assert_perfect_llfc(t["llfc"], "stem.conv")
    stitched = t["stitching"]
    assert "stem.conv" in set(stitched.layer) and "stem" not in set(stitched.layer)
    assert stitched["error"].nunique() == 1 and stitched["loss"].nunique() == 1
    assert t["weak_additivity"]["dist_sigma"].abs().max() < 1e-12


def test_a_self_pair_is_perfect_under_repaired_logits(tiny_data, tmp_path):
    """A = B (a ResNet-20 with BatchNorm) under REPAIR with the logits repaired (lmc.bn repair,
    lmc.repair_logits), features from the stem conv on: A, B and every θ_α are the same
    network, so the LMC curve is flat and LLFC perfect in every layer, the logits included."""
    from lmcflow.features import alpha_network, write_features
    from lmcflow.interpolation import lmc_curve, pair_networks
    from lmcflow.metrics import llfc_table
    from lmcflow.models import feature_layers

    s = state(RESNET, 0)
    build = lambda: build_model("resnet20", (1, 28, 28), 10, **RESNET["args"])  # noqa: E731
    curve = lmc_curve(build(), s, s, tiny_data, [0.0, 0.5, 1.0], bn="repair", batch_size=128,
                      log=lambda _: None, repair_logits=True)
    assert barriers(curve)[["loss_barrier", "error_barrier"]].abs().max().max() == 0
    nets = pair_networks(build, s, s, [1.0, 0.0, 0.5], tiny_data, "repair", 128,
                         repair_logits=True)
    networks = {"A": nets[1.0], "B": nets[0.0], alpha_network(0.5): nets[0.5]}
    path = tmp_path / "features.parquet"
    write_features(path, networks, feature_layers(nets[1.0], "conv1"), tiny_data.test_x,
                   np.arange(32), tiny_data.normalize, 16, log=lambda _: None)
    assert_perfect_llfc(llfc_table(path), "stem.conv")


def test_repair_logits_reaches_the_lmc_curve_and_the_features(tmp_path):
    """lmc.repair_logits changes the REPAIR curve at α = ½ and the logits' LLFC rows, and
    nothing that comes before the logits."""
    sa, sb = state(MLP, 0), state(MLP, 1)
    runs = {on: analyses(tmp_path, MLP, sa, sb, {"bn": "repair", "repair_logits": on,
                                                 "policies": ["interpolate"]}, {}, f"logits{on}")
            for on in (False, True)}
    lmc = {on: t["lmc"].set_index(["bn", "alpha", "split"]).sort_index() for on, t in runs.items()}
    pd.testing.assert_frame_equal(lmc[False].loc["none"], lmc[True].loc["none"])
    mid = {on: lmc[on].loc[("repair", 0.5, "test"), "loss"] for on in lmc}
    assert mid[False] != mid[True], mid
    llfc = {on: t["llfc"].set_index(["layer", "sample"]).sort_index() for on, t in runs.items()}
    hidden = [layer for layer in llfc[False].index.unique("layer") if layer != "out"]
    pd.testing.assert_frame_equal(llfc[False].loc[hidden], llfc[True].loc[hidden])
    assert not llfc[False].loc["out"].equals(llfc[True].loc["out"])


def test_matching_residual_reaches_the_alignment_job(tmp_path):
    """make_pair with activation matching writes the permutation of matching.residual: the
    same as activation_matching(residual=...) on the same images, and pooled and last differ."""
    from lmcflow.data import load_dataset

    spec_model = {"arch": "resnet20", "width": 0.25, "norm": "ln"}
    files = {k: tmp_path / f"{k}.pt" for k in ("a", "b")}
    models = {}
    for seed, key in enumerate(("a", "b")):
        torch.manual_seed(seed)
        models[key] = build_model("resnet20", (1, 28, 28), 10, width=0.25, norm="ln").eval()
        torch.save(models[key].state_dict(), files[key])
    matching = {"max_sweeps": 100, "seed": 0, "batches": 2, "batch_size": 64, "cost": "correlation"}
    data = load_dataset("mnist5k")
    written = {}
    for residual in ("pooled", "last"):
        out = {"a": tmp_path / f"pa_{residual}.pt", "b": tmp_path / f"pb_{residual}.pt",
               "info": tmp_path / f"info_{residual}.json",
               "permutation": tmp_path / f"perm_{residual}.json"}
        setting = {"data": DATA, "device": "cpu", "model": spec_model,
                   "runs": {k: str(v) for k, v in files.items()},
                   "matching": {**matching, "residual": residual}}
        run_script("make_pair", input=files, output=out, params={"setting": setting},
                   wildcards={**WILDCARDS, "method": "activation_matching"})
        written[residual] = json.loads(out["permutation"].read_text())
        want, _ = activation_matching(models["a"], models["b"], permutation_spec(models["a"]), data,
                                      2, 64, residual=residual)
        assert written[residual] == {g: p.tolist() for g, p in want.items()}, residual
    streams = [g for g in written["pooled"] if g.startswith("P_res")]
    assert any(written["pooled"][g] != written["last"][g] for g in streams)
    inner = [g for g in written["pooled"] if not g.startswith("P_res")]
    assert all(written["pooled"][g] == written["last"][g] for g in inner)


# which normalisation policy each paper evaluated with (README: "Paper configs")
PAPER_POLICIES = {
    # LLFC code: interpolated BN statistics, never reset; layer-wise code: interpolated too
    "spawning_cifar10.yaml": {"lmc.bn": "interpolate", "layerwise.bn": "interpolate",
                              "ours": {"reset", "repair"}},
    # Git Re-Basin / LLFC: plain interpolation (no BatchNorm in these models)
    "permutation_mnist.yaml": {"lmc.bn": "interpolate", "ours": {"repair"}},
    "permutation_cifar10_resnet20_ln.yaml": {"lmc.bn": "interpolate", "ours": {"repair"}},
    # layer-wise code: interpolated statistics (the no-norm ResNet-18 has none)
    "layerwise_cifar10_resnet18.yaml": {"lmc.bn": "interpolate", "layerwise.bn": "interpolate",
                                        "ours": {"repair"}},
}


@pytest.mark.parametrize("config", sorted(PAPER_POLICIES))
def test_paper_configs_use_their_papers_policies(config):
    """Each paper config evaluates every analysis with its paper's normalisation policy, ours
    as extra LMC curves; the LLFC ResNet-20 reads conv1 first and the REPAIR-style ResNet-20-LN
    matches each stream on its stage's last block, as the official code."""
    cfg = load_yaml(REPO / "workflow/configs" / config)
    want = PAPER_POLICIES[config]
    for name, e in cfg["experiments"].items():
        assert e["lmc"]["bn"] == want["lmc.bn"], name
        assert set(e["lmc"]["policies"]) == want["ours"], name
        if "layerwise.bn" in want and e["layerwise"]["enabled"]:
            assert e["layerwise"]["bn"] == want["layerwise.bn"], name
        assert e["lmc"]["repair_logits"] is False, name  # REPAIR as its CIFAR notebooks
        if config == "spawning_cifar10.yaml" and e["model"]["arch"] == "resnet20":
            assert e["llfc"]["first_feature"] == "conv1", name
        if config == "permutation_cifar10_resnet20_ln.yaml":
            assert e["matching"]["residual"] == "last", name
