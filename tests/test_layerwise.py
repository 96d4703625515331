"""lmcflow.layerwise: layer groups, single-layer / cumulative barriers, robustness, subspace, toy."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lmcflow.data import load_dataset
from lmcflow.interpolation import lerp_state
from lmcflow.layerwise import (ALL, cumulative_barriers, layer_groups, layer_orders,
                               layer_robustness,
                               mix_state, perturbation_directions, random_direction,
                               single_layer_barriers, subspace_perturbations,
                               training_subspace)
from lmcflow.models import build_model
from lmcflow.toy import linear_toy
from lmcflow.training import derive_seed, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 28, 28)
QUIET = dict(log=lambda msg: None)


def mlp(seed):
    torch.manual_seed(seed)
    return build_model("mlp", SHAPE, 10, width=32, depth=2)


def copy_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def data():
    """512 train / 256 test images of mnist5k (fixed random subsets, all classes)."""
    full = load_dataset("mnist5k")
    g = torch.Generator().manual_seed(1)
    tr = torch.randperm(len(full.train_y), generator=g)[:512].sort().values
    te = torch.randperm(len(full.test_y), generator=g)[:256].sort().values
    return dataclasses.replace(full, train_x=full.train_x[tr].clone(), train_y=full.train_y[tr].clone(),
                               test_x=full.test_x[te].clone(), test_y=full.test_y[te].clone())


def train(seed, data, steps=300, save_every=60):
    """A tiny MLP trained with SGD from init `seed`; returns (state, checkpoint copies)."""
    model = mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed + 100)
    x, y = data.normalize(data.train_x), data.train_y
    checkpoints = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % save_every == 0 and step < steps:
            checkpoints.append(copy_state(model))  # real copies, not views of the live weights
    return copy_state(model), checkpoints


@pytest.fixture(scope="module")
def pair(data):
    """Two MLPs from different inits (naive pair: a real barrier) and A's training checkpoints."""
    state_a, ckpts = train(0, data)
    state_b, _ = train(1, data)
    return state_a, state_b, ckpts


def evaluate_state(state, data, split):
    model = mlp(0)
    model.load_state_dict(state)
    return evaluate(model, *data.split(split), data.normalize)


# ------------------------------------------------------------------------------------- groups


def assert_partition(model, groups):
    keys = [k for _, ks in groups for k in ks]
    assert keys == list(model.state_dict())  # every key exactly once, in state_dict order
    assert len({name for name, _ in groups}) == len(groups)
    modules = dict(model.named_modules())
    assert all(name in modules for name, _ in groups)


def test_layer_groups_mlp():
    model = mlp(0)
    groups = layer_groups(model)
    assert_partition(model, groups)
    assert groups == [("fc1", ["fc1.weight", "fc1.bias"]), ("fc2", ["fc2.weight", "fc2.bias"]),
                      ("out", ["out.weight", "out.bias"])]


def test_layer_groups_vgg_bn():
    model = build_model("vgg", SHAPE, 10, width=0.125, batch_norm=True)
    groups = layer_groups(model)
    assert_partition(model, groups)
    names = [n for n, _ in groups]
    assert names[:4] == ["features.conv1", "features.bn1", "features.conv2", "features.bn2"]
    assert names[-1] == "out" and len(names) == 2 * model.n_conv + 1
    bn1 = dict(groups)["features.bn1"]
    assert bn1 == [f"features.bn1.{s}" for s in
                   ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def test_layer_groups_resnet20_shortcut_order():
    model = build_model("resnet20", SHAPE, 10, width=0.25, norm="bn")
    groups = layer_groups(model)
    assert_partition(model, groups)
    names = [n for n, _ in groups]
    assert names[:3] == ["stem.conv", "stem.norm", "layer1.0.conv1"]
    assert names[-1] == "fc" and len(names) == 2 + 9 * 4 + 2 * 2 + 1
    i = names.index("layer2.0.shortcut.conv")
    assert names[i - 2:i + 3] == ["layer2.0.conv2", "layer2.0.norm2", "layer2.0.shortcut.conv",
                                  "layer2.0.shortcut.norm", "layer2.1.conv1"]


# ---------------------------------------------------------------------------------- mix_state


def test_mix_state():
    model = build_model("vgg", SHAPE, 10, width=0.125, batch_norm=True)
    torch.manual_seed(0)
    a = copy_state(build_model("vgg", SHAPE, 10, width=0.125, batch_norm=True))
    b = copy_state(model)
    b = {k: v + 1 if k.endswith("num_batches_tracked") else v for k, v in b.items()}
    full, mid = mix_state(a, b, a.keys(), 0.5), lerp_state(a, b, 0.5)
    assert all(torch.equal(full[k], mid[k]) for k in a)
    none = mix_state(a, b, [], 0.5)
    assert all(torch.equal(none[k], a[k]) for k in a)
    keys = [k for n, ks in layer_groups(model) if n == "features.bn1" for k in ks]
    part = mix_state(a, b, keys, 0.25)
    for k in a:
        if k in keys and a[k].is_floating_point():
            torch.testing.assert_close(part[k], 0.25 * a[k] + 0.75 * b[k])
        else:
            assert torch.equal(part[k], a[k]), k  # incl. num_batches_tracked of the mixed group
    assert torch.equal(mix_state(a, b, keys, 1.0)["features.bn1.weight"], a["features.bn1.weight"])


# ------------------------------------------------------------------------ single-layer barriers


def test_naive_pair_has_a_full_barrier(pair, data):
    state_a, state_b, _ = pair
    (la, ea), (lb, eb) = (evaluate_state(s, data, "train") for s in (state_a, state_b))
    assert max(ea, eb) < 0.05 and max(evaluate_state(s, data, "test")[1] for s in (state_a, state_b)) < 0.3
    lm, em = evaluate_state(lerp_state(state_a, state_b, 0.5), data, "train")
    assert lm - (la + lb) / 2 > 0.1 and em - (ea + eb) / 2 > 0.05


def test_single_layer_barriers(pair, data):
    state_a, state_b, _ = pair
    df = single_layer_barriers(mlp(5), state_a, state_b, data, **QUIET)
    assert list(df.columns) == ["layer", "layer_index", "into", "split", "loss", "error",
                                "loss_barrier", "error_barrier"]
    assert len(df) == 3 * 2 * 2 + 2
    assert set(df["into"]) == {"a", "b", "both"}
    for split in ("train", "test"):
        (la, ea), (lb, eb) = (evaluate_state(s, data, split) for s in (state_a, state_b))
        lm, em = evaluate_state(lerp_state(state_a, state_b, 0.5), data, split)
        row = df[(df.layer == ALL) & (df.split == split)].iloc[0]
        assert row.layer_index == -1 and row.into == "both"
        assert row.loss_barrier == pytest.approx(lm - (la + lb) / 2, abs=1e-12)
        assert row.error_barrier == pytest.approx(em - (ea + eb) / 2, abs=1e-12)
        # one hand-built variant: fc2 averaged into B
        keys = ["fc2.weight", "fc2.bias"]
        lv, _ = evaluate_state(mix_state(state_b, state_a, keys, 0.5), data, split)
        row = df[(df.layer == "fc2") & (df.into == "b") & (df.split == split)].iloc[0]
        assert row.loss_barrier == pytest.approx(lv - (la + lb) / 2, abs=1e-6)


def test_self_pair_has_zero_barriers(pair, data):
    state_a = pair[0]
    df = single_layer_barriers(mlp(5), state_a, state_a, data, **QUIET)
    # variants are evaluated batched (vmap), the endpoints one by one: float32 rounding apart
    assert (df["loss_barrier"].abs() < 1e-6).all() and (df["error_barrier"] == 0).all()


def test_self_pair_zero_with_bn_reset(data):
    small = dataclasses.replace(data, train_x=data.train_x[:64], train_y=data.train_y[:64],
                                test_x=data.test_x[:32], test_y=data.test_y[:32])
    model = build_model("vgg", SHAPE, 10, width=0.125, batch_norm=True)
    state = copy_state(model)
    df = single_layer_barriers(model, state, state, small, splits=("test",), bn="reset", **QUIET)
    assert len(df) == (2 * model.n_conv + 1) * 2 + 1
    assert (df["loss_barrier"] == 0).all()


# --------------------------------------------------------------------------- cumulative barriers


def test_cumulative_barriers(pair, data):
    state_a, state_b, _ = pair
    cum = cumulative_barriers(mlp(5), state_a, state_b, data, **QUIET)
    single = single_layer_barriers(mlp(5), state_a, state_b, data, **QUIET)
    assert list(cum.columns) == ["order", "step", "layer", "into", "split", "loss", "error",
                                 "loss_barrier", "error_barrier"]
    assert len(cum) == 2 * 3 * 2 * 2
    for split in ("train", "test"):
        full = single[(single.layer == ALL) & (single.split == split)].iloc[0]
        for order in ("shallow", "deep"):
            last = cum[(cum.order == order) & (cum.step == 3) & (cum.split == split)]
            assert len(last) == 2
            assert np.allclose(last["loss_barrier"], full.loss_barrier, rtol=0, atol=1e-9)
            assert np.allclose(last["error_barrier"], full.error_barrier, rtol=0, atol=1e-9)
        for order, layer in (("shallow", "fc1"), ("deep", "out")):
            first = cum[(cum.order == order) & (cum.step == 1) & (cum.into == "a")
                        & (cum.split == split)].iloc[0]
            ref = single[(single.layer == layer) & (single.into == "a") & (single.split == split)].iloc[0]
            assert first.layer == layer
            assert first.loss_barrier == pytest.approx(ref.loss_barrier, abs=1e-12)
    assert list(cum[(cum.order == "deep") & (cum.into == "a") & (cum.split == "test")]["layer"]) == \
        ["out", "fc2", "fc1"]


def test_cumulative_barriers_in_seeded_random_orders(pair, data):
    state_a, state_b, _ = pair
    cum = cumulative_barriers(mlp(5), state_a, state_b, data, random_orders=3, seed=4, **QUIET)
    assert list(pd.unique(cum["order"])) == ["shallow", "deep", "random1", "random2", "random3"]
    groups = [name for name, _ in layer_groups(mlp(5))]
    test = cum[(cum.split == "test") & (cum.into == "a")]
    for k in (1, 2, 3):
        added = list(test[test.order == f"random{k}"].sort_values("step")["layer"])
        assert sorted(added) == sorted(groups)  # every group once, in a random order
        assert test[test.order == f"random{k}"]["loss_barrier"].iloc[-1] == \
            test[test.order == "shallow"]["loss_barrier"].iloc[-1]  # the full barrier at the end
    again = cumulative_barriers(mlp(5), state_a, state_b, data, random_orders=3, seed=4, **QUIET)
    pd.testing.assert_frame_equal(cum, again)  # seeded
    orders = layer_orders(groups, random_orders=20, seed=4)
    assert len({tuple(v) for v in orders.values()}) > 3  # the draws differ


# ----------------------------------------------------------------------------- layer robustness


def test_layer_robustness(pair, data):
    state_a, state_b, _ = pair
    draws, steps = 3, (0.0, 0.5, 1.0)
    df = layer_robustness(mlp(5), state_a, state_b, data, draws=draws, seed=7, steps=steps, **QUIET)
    assert list(df.columns) == ["layer", "layer_index", "direction", "draw", "step", "split",
                                "loss", "error", "norm"]
    assert len(df) == 3 * (1 + draws) * len(steps) * 2
    for split in ("train", "test"):
        la, _ = evaluate_state(state_a, data, split)
        at0 = df[(df.step == 0) & (df.split == split)]
        assert set(at0["direction"]) == {"interpolation", "random"}
        assert np.allclose(at0["loss"], la, rtol=0, atol=1e-12)
        swapped = {**state_a, "fc2.weight": state_b["fc2.weight"], "fc2.bias": state_b["fc2.bias"]}
        row = df[(df.layer == "fc2") & (df.direction == "interpolation") & (df.step == 1)
                 & (df.split == split)]
        assert row["loss"].item() == pytest.approx(evaluate_state(swapped, data, split)[0], rel=1e-6)
    # the norm column is ‖θ_B^l − θ_A^l‖; the random move at step 1 has exactly that length
    keys = ["fc1.weight", "fc1.bias"]
    d = torch.sqrt(sum((state_b[k] - state_a[k]).double().square().sum() for k in keys)).item()
    assert df[df.layer == "fc1"]["norm"].unique() == pytest.approx([d], rel=1e-12)
    r = random_direction(state_a, keys, d, derive_seed(7, 0, 1))
    moved = {k: state_a[k] + 1.0 * r[k] for k in keys}
    diff = torch.sqrt(sum((moved[k] - state_a[k]).double().square().sum() for k in keys)).item()
    assert diff == pytest.approx(d, rel=1e-5)
    row = df[(df.layer == "fc1") & (df.direction == "random") & (df.draw == 1) & (df.step == 1)
             & (df.split == "test")]
    expected = evaluate_state({**state_a, **moved}, data, "test")[0]
    assert row["loss"].item() == pytest.approx(expected, rel=1e-6)  # batched vs one by one
    # distinct draws give distinct directions; same seed is reproducible
    r0 = random_direction(state_a, keys, d, derive_seed(7, 0, 0))
    assert not torch.equal(r0["fc1.weight"], r["fc1.weight"])
    again = random_direction(state_a, keys, d, derive_seed(7, 0, 1))
    assert torch.equal(again["fc1.weight"], r["fc1.weight"])


# ------------------------------------------------------------------------ subspace perturbations


def flat(state, keys):
    return torch.cat([state[k].reshape(-1).double() for k in keys])


@pytest.fixture(scope="module")
def two_runs(data):
    """A naive pair with the checkpoints of both networks along training."""
    state_a, ckpts_a = train(0, data)
    state_b, ckpts_b = train(1, data)
    return state_a, state_b, ckpts_a + ckpts_b


def test_training_subspace_contains_the_interpolation_direction(two_runs):
    state_a, state_b, along = two_runs
    keys = list(state_a)
    basis = training_subspace([*along, state_a, state_b], keys)
    assert basis.shape == (flat(state_a, keys).numel(), len(along) + 2)
    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64))
    d = flat(state_b, keys) - flat(state_a, keys)
    residual = d - basis @ (basis.T @ d)
    assert residual.norm() < 1e-10 * d.norm()
    for c in along:  # every kept checkpoint of either network lies in it
        v = flat(c, keys)
        assert (v - basis @ (basis.T @ v)).norm() < 1e-10 * v.norm()
    # repeated or dependent vectors (a spawned pair's shared checkpoints) add no dimension
    again = training_subspace([*along, along[0], state_a, state_a, state_b], keys)
    assert again.shape == basis.shape


def test_perturbation_directions_geometry(two_runs):
    state_a, state_b, along = two_runs
    keys = list(state_a)
    basis = training_subspace([*along, state_a, state_b], keys)
    for state, other in ((state_a, state_b), (state_b, state_a)):
        dirs = perturbation_directions(state, other, basis, keys, draws=3, seed=0)
        assert [len(dirs[k]) for k in ("interpolation", "subspace", "orthogonal")] == [1, 3, 3]
        for u in (v for vs in dirs.values() for v in vs):
            assert torch.linalg.vector_norm(u).item() == pytest.approx(1.0, abs=1e-12)
        away = flat(state, keys) - flat(other, keys)  # away from the other network
        torch.testing.assert_close(dirs["interpolation"][0], away / away.norm())
        for u in dirs["subspace"]:
            assert (u - basis @ (basis.T @ u)).norm() < 1e-10
        for u in dirs["orthogonal"]:
            assert (basis.T @ u).abs().max() < 1e-12
            # orthogonal to every vector spanning the subspace, the endpoints included
            for c in [*along, state_a, state_b]:
                assert abs(float(flat(c, keys) @ u)) < 1e-9 * flat(c, keys).norm()


def test_subspace_perturbations(two_runs, data):
    state_a, state_b, along = two_runs
    norms = (0.0, 1.0, 4.0)
    df = subspace_perturbations(mlp(5), state_a, state_b, along, data, norms=norms, draws=2,
                                seed=3, per_layer=True, **QUIET)
    assert list(df.columns) == ["layer", "layer_index", "endpoint", "direction", "draw", "norm",
                                "split", "loss", "error"]
    assert list(df["layer"].unique()) == [ALL, "fc1", "fc2", "out"]
    assert len(df) == 4 * 2 * (1 + 2 + 2) * len(norms) * 2
    for endpoint, state in (("a", state_a), ("b", state_b)):
        for split in ("train", "test"):
            want, _ = evaluate_state(state, data, split)
            got = df[(df.norm == 0) & (df.split == split) & (df.endpoint == endpoint)]["loss"]
            assert np.allclose(got, want, rtol=0, atol=1e-12)
    # a row equals evaluating θ_B + ε·(θ_B − θ_A)/‖θ_B − θ_A‖ by hand: B moves away from A
    keys = list(state_a)
    u = flat(state_b, keys) - flat(state_a, keys)
    theta, start, moved = flat(state_b, keys) + 4.0 * u / u.norm(), 0, {}
    for k in keys:
        n = state_a[k].numel()
        moved[k] = theta[start:start + n].reshape(state_a[k].shape).float()
        start += n
    row = df[(df.layer == ALL) & (df.endpoint == "b") & (df.direction == "interpolation")
             & (df.norm == 4.0) & (df.split == "test")]
    assert row["loss"].item() == pytest.approx(evaluate_state(moved, data, "test")[0], rel=1e-5)
    # perturbing grows the loss on average
    big = df[(df.norm == 4.0) & (df.split == "train")]
    assert (big["loss"] > big["endpoint"].map({"a": evaluate_state(state_a, data, "train")[0],
                                               "b": evaluate_state(state_b, data, "train")[0]})
            ).mean() > 0.5


# ------------------------------------------------------------------------------------ linear toy


@pytest.mark.parametrize("minima", [((2.0, 0.5), (0.5, 2.0)), ((1.0, 1.0), (-1.0, -1.0)),
                                    (([2.0, 1.0], [0.5, 3.0]), ([0.5, -1.0], [2.0, -3.0]))])
def test_linear_toy_paths_and_layerwise_barrier(minima):
    target = 1.0 if np.ndim(minima[0][0]) == 0 else [1.0, 3.0]
    df = linear_toy(*minima, target=target)
    assert list(df.columns) == ["path", "into", "alpha", "loss", "barrier"]
    assert set(zip(df.path, df.into)) == {("full", "both"), ("layer1", "a"), ("layer1", "b"),
                                          ("layer2", "a"), ("layer2", "b")}
    for (path, into), g in df.groupby(["path", "into"]):
        assert len(g) == 21 and np.allclose(g["alpha"], np.linspace(0, 1, 21))
        # the layer-wise barrier: loss at α = ½ against the mean of the full endpoints (both 0)
        assert g["barrier"].iloc[0] == pytest.approx(g.loc[np.isclose(g.alpha, 0.5), "loss"].item())
        if path == "full":
            assert g["loss"].iloc[0] == pytest.approx(0, abs=1e-12)  # both ends are minima
            assert g["loss"].iloc[-1] == pytest.approx(0, abs=1e-12)
        else:
            assert (np.diff(g["loss"].to_numpy(), 2) >= -1e-12).all()  # convex in α


def test_linear_toy_shows_the_blog_statement():
    """Full path: a barrier; only the second layer averaged (into A): a much lower one; only
    the first layer: a high one. Into B the layers swap roles (w1 <-> w2 symmetry)."""
    bar = linear_toy().groupby(["path", "into"])["barrier"].first()
    full = bar[("full", "both")]
    assert full > 1.0
    assert bar[("layer2", "a")] < full / 10 and bar[("layer1", "a")] > 2 * full
    assert bar[("layer1", "b")] == pytest.approx(bar[("layer2", "a")])
    assert bar[("layer2", "b")] == pytest.approx(bar[("layer1", "a")])


def test_perturbation_directions_degenerate(two_runs):
    """Missing directions are left out: no interpolation if A = B there, no complement if the
    subspace is the whole (small) layer, no subspace directions in an empty subspace."""
    state_a = two_runs[0]
    g = torch.Generator().manual_seed(0)
    ckpts = [{**state_a, "out.bias": torch.randn(10, generator=g)} for _ in range(12)]
    basis = training_subspace(ckpts, ["out.bias"])
    assert basis.shape == (10, 10)
    dirs = perturbation_directions(state_a, state_a, basis, ["out.bias"], draws=2, seed=0)
    assert dirs["interpolation"] == [] and dirs["orthogonal"] == [] and len(dirs["subspace"]) == 2
    empty = torch.zeros(10, 0, dtype=torch.float64)
    dirs = perturbation_directions(state_a, state_a, empty, ["out.bias"], draws=2, seed=0)
    assert dirs["subspace"] == [] and len(dirs["orthogonal"]) == 2


def test_layer_groups_merge_whole_modules():
    """The ViT averages whole blocks; a config can merge any modules' subtrees the same way."""
    vit = build_model("vit", (1, 28, 28), 10, dim=16, depth=2, heads=2)
    groups = dict(layer_groups(vit))
    assert "blocks.0" in groups and "blocks.0.attn.q" not in groups
    assert all(k.startswith("blocks.0.") for k in groups["blocks.0"])
    assert set(groups["(root)"]) == {"cls_token", "pos_embed"}
    keys = [k for _, ks in layer_groups(vit) for k in ks]
    assert sorted(keys) == sorted(vit.state_dict())  # still a partition of the state
    merged = build_model("mlp", SHAPE, 10, width=8, depth=3, layer_groups=["fc2"])
    assert [n for n, _ in layer_groups(merged)] == ["fc1", "fc2", "fc3", "out"]
    with pytest.raises(ValueError, match="not modules"):
        build_model("mlp", SHAPE, 10, layer_groups=["fc9"])
