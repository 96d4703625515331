"""lmcflow.layerwise: layer groups, single-layer / cumulative barriers, robustness, subspace, toy."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmcflow.data import load_dataset
from lmcflow.interpolation import lerp_state
from lmcflow.layerwise import (ALL, cumulative_barriers, layer_groups, layer_robustness, linear_toy,
                               mix_state, perturbation_directions, random_direction,
                               single_layer_barriers, subspace_perturbations)
from lmcflow.models import build_model
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


def test_perturbation_directions_geometry(pair):
    state_a, state_b, ckpts = pair
    keys = list(state_a)
    flat = lambda s: torch.cat([s[k].reshape(-1).double() for k in keys])  # noqa: E731
    diffs = torch.stack([flat(c) - flat(state_a) for c in ckpts], dim=1)  # (P, m)
    dirs = perturbation_directions(state_a, state_b, ckpts, keys, draws=3, seed=0)
    assert [len(dirs[k]) for k in ("interpolation", "subspace", "orthogonal")] == [1, 3, 3]
    for u in (v for vs in dirs.values() for v in vs):
        assert torch.linalg.vector_norm(u).item() == pytest.approx(1.0, abs=1e-12)
    interp = flat(state_b) - flat(state_a)
    assert torch.allclose(dirs["interpolation"][0], interp / interp.norm())
    for u in dirs["subspace"]:
        coef = torch.linalg.lstsq(diffs, u.unsqueeze(1)).solution
        assert torch.linalg.vector_norm(diffs @ coef - u.unsqueeze(1)).item() < 1e-8
    for u in dirs["orthogonal"]:
        assert (diffs.T @ u).abs().max().item() < 1e-8
    # a checkpoint equal to A (zero difference) or a repeated one adds no dimension
    dup = perturbation_directions(state_a, state_b, [*ckpts, ckpts[0], state_a], keys, draws=2, seed=0)
    for u in dup["orthogonal"]:
        assert (diffs.T @ u).abs().max().item() < 1e-8


def test_subspace_perturbations(pair, data):
    state_a, state_b, ckpts = pair
    norms = (0.0, 1.0, 4.0)
    df = subspace_perturbations(mlp(5), state_a, ckpts, state_b, data, norms=norms, draws=2,
                                seed=3, per_layer=True, **QUIET)
    assert list(df.columns) == ["layer", "layer_index", "direction", "draw", "norm", "split",
                                "loss", "error"]
    assert list(df["layer"].unique()) == [ALL, "fc1", "fc2", "out"]
    assert len(df) == 4 * (1 + 2 + 2) * len(norms) * 2
    for split in ("train", "test"):
        la, _ = evaluate_state(state_a, data, split)
        assert np.allclose(df[(df.norm == 0) & (df.split == split)]["loss"], la, rtol=0, atol=1e-12)
    # a row equals evaluating θ_A + ε·u by hand (whole network, interpolation direction)
    keys = list(state_a)
    flat_a = torch.cat([state_a[k].reshape(-1).double() for k in keys])
    flat_b = torch.cat([state_b[k].reshape(-1).double() for k in keys])
    u = (flat_b - flat_a) / (flat_b - flat_a).norm()
    theta, start, moved = flat_a + 4.0 * u, 0, {}
    for k in keys:
        n = state_a[k].numel()
        moved[k] = theta[start:start + n].reshape(state_a[k].shape).float()
        start += n
    row = df[(df.layer == ALL) & (df.direction == "interpolation") & (df.norm == 4.0)
             & (df.split == "test")]
    assert row["loss"].item() == pytest.approx(evaluate_state(moved, data, "test")[0], abs=1e-9)
    # perturbing grows the loss on average
    big = df[(df.norm == 4.0) & (df.split == "train")]["loss"]
    assert (big > evaluate_state(state_a, data, "train")[0]).mean() > 0.5


# ------------------------------------------------------------------------------------ linear toy


@pytest.mark.parametrize("minima", [((2.0, 0.5), (0.5, 2.0)), ((1.0, 1.0), (-1.0, -1.0)),
                                    (([2.0, 1.0], [0.5, 3.0]), ([0.5, -1.0], [2.0, -3.0]))])
def test_linear_toy(minima):
    target = 1.0 if np.ndim(minima[0][0]) == 0 else [1.0, 3.0]
    df = linear_toy(*minima, target=target)
    assert list(df.columns) == ["path", "into", "alpha", "loss", "barrier"]
    assert set(zip(df.path, df.into)) == {("full", "both"), ("layer1", "a"), ("layer1", "b"),
                                          ("layer2", "a"), ("layer2", "b")}
    for (path, into), g in df.groupby(["path", "into"]):
        assert len(g) == 21 and np.allclose(g["alpha"], np.linspace(0, 1, 21))
        if path == "full":
            assert g["loss"].iloc[0] == pytest.approx(0, abs=1e-12)  # both ends are minima
            assert g["loss"].iloc[-1] == pytest.approx(0, abs=1e-12)
            assert g["barrier"].iloc[0] > 0.1
        else:
            assert (np.diff(g["loss"].to_numpy(), 2) >= -1e-12).all()  # convex
            assert g["barrier"].iloc[0] == pytest.approx(0, abs=1e-12)


def test_perturbation_directions_degenerate(pair):
    """Missing directions are left out: no interpolation if A = B there, no complement if the
    checkpoints span the whole (small) layer."""
    state_a, _, _ = pair
    g = torch.Generator().manual_seed(0)
    ckpts = [{**state_a, "out.bias": state_a["out.bias"] + torch.randn(10, generator=g)} for _ in range(12)]
    dirs = perturbation_directions(state_a, state_a, ckpts, ["out.bias"], draws=2, seed=0)
    assert dirs["interpolation"] == [] and dirs["orthogonal"] == [] and len(dirs["subspace"]) == 2
    dirs = perturbation_directions(state_a, state_a, [state_a], ["out.bias"], draws=2, seed=0)
    assert dirs["subspace"] == [] and len(dirs["orthogonal"]) == 2
