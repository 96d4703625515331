"""Tests of lmcflow.alignment: permutation specs, their invariance, weight and activation matching.

Every model family is covered with both norms. Norm layers get random affine parameters and
running statistics that differ from their initial values (BN stats from train-mode passes, the
counter set to a non-zero value) so that permuting buffers is really exercised.
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from lmcflow.data import Data, load_dataset, sample_order
from lmcflow.alignment import (
    PermutationSpec, activation_matching, apply_permutation, identity_permutation,
    feature_modules, invert_permutation, matching_objective, permutation_spec, random_permutation,
    weight_matching,
)
from lmcflow.models import build_model

CASES = [
    ("mlp", {"width": 32, "depth": 1}, (1, 28, 28)),
    ("mlp", {"width": 32, "depth": 3}, (1, 28, 28)),
    ("vgg", {"depth": 11, "batch_norm": True, "width": 0.125}, (1, 28, 28)),
    ("vgg", {"depth": 11, "batch_norm": False, "width": 0.125}, (1, 28, 28)),
    ("vgg", {"depth": 11, "batch_norm": True, "width": 0.125}, (3, 32, 32)),
    ("vgg", {"depth": 11, "batch_norm": False, "width": 0.125}, (3, 32, 32)),
    # 64x64 -> last map 2x2: the classifier's input axis mixes channels and positions
    ("vgg", {"depth": 11, "batch_norm": True, "width": 0.125}, (3, 64, 64)),
    ("vgg", {"depth": 11, "batch_norm": False, "width": 0.125}, (3, 64, 64)),
    ("resnet20", {"width": 0.25, "norm": "bn"}, (3, 32, 32)),
    ("resnet20", {"width": 0.25, "norm": "ln"}, (3, 32, 32)),
    ("resnet20", {"width": 0.5, "norm": "bn"}, (3, 32, 32)),
    ("resnet20", {"width": 0.5, "norm": "ln"}, (3, 32, 32)),
    ("resnet20", {"width": 0.25, "norm": "bn"}, (1, 28, 28)),
    ("resnet20", {"width": 0.25, "norm": "gn", "shortcut_kernel": 3}, (3, 32, 32)),
    ("lenet", {}, (1, 28, 28)),
    ("lenet", {"width": 0.5}, (3, 32, 32)),
    ("vgg", {"depth": 11, "batch_norm": True, "width": 0.125, "classifier": [24, 16],
             "dropout": 0.5}, (3, 32, 32)),
    ("resnet18", {"width": 0.125, "norm": "none"}, (3, 32, 32)),
    ("resnet18", {"width": 0.125, "norm": "bn"}, (3, 32, 32)),
]
IDS = [f"{a}-" + "-".join(f"{k}{v}" for k, v in kw.items()) + f"-{s[1]}" for a, kw, s in CASES]
NUM_CLASSES = 7


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: intra-op threads only add overhead (and spin under CPU contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(arch, kwargs, in_shape, seed=0):
    """A model with He-initialised weights, random biases and norm affines, calibrated BN
    running stats and a BN counter != 0 (so every tensor carries signal to the logits)."""
    torch.manual_seed(seed)
    model = build_model(arch, in_shape, NUM_CLASSES, **kwargs)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm))]
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    bns = [m for m in norms if isinstance(m, nn.BatchNorm2d)]
    if bns:
        for m in bns:
            m.momentum = None  # cumulative average: running stats = mean over the passes
        model.train()
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(16, *in_shape, generator=gen))
        for m in bns:
            m.momentum = 0.1
            m.num_batches_tracked.fill_(7)
    return model.eval()


def nontrivial_permutation(spec, seed):
    """Random permutation, redrawn per group until it is not the identity."""
    gen = torch.Generator().manual_seed(seed)
    perm = random_permutation(spec, gen)
    for g, p in perm.items():
        while torch.equal(p, torch.arange(len(p))):
            p = torch.randperm(len(p), generator=gen)
        perm[g] = p
    return perm


def permuted_copy(model, spec, perm):
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(spec, perm, model.state_dict()))
    return other.eval()


@torch.no_grad()
def outputs(model, in_shape, seed=0):
    x = torch.randn(8, *in_shape, generator=torch.Generator().manual_seed(seed))
    return model.eval()(x)


def assert_same_function(out_a, out_b):
    scale = float(out_a.abs().max())
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


# --- 1. invariance -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch,kwargs,in_shape", CASES, ids=IDS)
def test_permutation_preserves_function_and_every_entry_is_needed(arch, kwargs, in_shape):
    model = make_model(arch, kwargs, in_shape)
    spec = permutation_spec(model)
    perm = nontrivial_permutation(spec, seed=1)
    state = model.state_dict()
    permuted = apply_permutation(spec, perm, state)
    assert list(permuted) == list(state)
    for key, t in state.items():
        assert permuted[key].shape == t.shape and permuted[key].dtype == t.dtype
        if any(g is not None for g in spec.axes[key]):
            assert not torch.equal(permuted[key], t), f"{key} left unchanged"
        else:
            assert torch.equal(permuted[key], t), f"{key} has no group but changed"
    out_a = outputs(model, in_shape)
    assert_same_function(out_a, outputs(permuted_copy(model, spec, perm), in_shape))
    x = torch.randn(2, *in_shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out_x = model(x)

    # Undo: the inverse brings back the exact state.
    back = apply_permutation(spec, invert_permutation(perm), permuted)
    assert all(torch.equal(back[k], state[k]) for k in state)

    # Every (key, axis) entry matters: leaving any single one out changes the function.
    for group, entries in spec.groups.items():
        for key, axis in entries:
            axes = dict(spec.axes)
            axes[key] = tuple(None if i == axis else g for i, g in enumerate(axes[key]))
            partial = dataclasses.replace(spec, axes=axes)
            with torch.no_grad():
                out = functional_call(model, apply_permutation(partial, perm, state), (x,))
            diff = (out - out_x).abs().max()
            assert diff > 1e-3 * float(out_x.abs().max()), (
                f"skipping {key} axis {axis} ({group}) does not change the outputs")


# --- 2. coverage -------------------------------------------------------------------------------


def expected_groups(arch, model):
    if arch == "mlp":
        return {f"P_fc{i}": getattr(model, f"fc{i}").out_features
                for i in range(1, model.depth + 1)}
    if arch == "lenet":
        return {"P_conv1": model.conv1.out_channels, "P_conv2": model.conv2.out_channels,
                "P_fc1": model.fc1.out_features, "P_fc2": model.fc2.out_features}
    if arch == "vgg":
        groups = {f"P_conv{i}": getattr(model.features, f"conv{i}").out_channels
                  for i in range(1, model.n_conv + 1)}
        return groups | {f"P_classifier.fc{i}": getattr(model.classifier, f"fc{i}").out_features
                         for i in range(1, model.n_hidden + 1)}
    stages, blocks = ((1, 2, 3), 3) if arch == "resnet20" else ((1, 2, 3, 4), 2)
    groups = {f"P_res{l}": getattr(model, f"layer{l}")[0].conv2.out_channels for l in stages}
    for l in stages:
        for j in range(blocks):
            groups[f"P_layer{l}.{j}.inner"] = getattr(model, f"layer{l}")[j].conv1.out_channels
    return groups


@pytest.mark.parametrize("arch,kwargs,in_shape", CASES, ids=IDS)
def test_spec_covers_state_dict(arch, kwargs, in_shape):
    model = make_model(arch, kwargs, in_shape)
    spec = permutation_spec(model)
    state = model.state_dict()
    assert set(spec.axes) == set(state)
    spec.check_state(state)
    assert spec.sizes == expected_groups(arch, model)
    for key, axes in spec.axes.items():
        view = spec.reshape.get(key, tuple(state[key].shape))
        assert len(axes) == len(view), key
        for axis, group in enumerate(axes):
            if group is not None:
                assert view[axis] == spec.sizes[group], (key, axis)
                assert (key, axis) in spec.groups[group]
    assert sum(len(v) for v in spec.groups.values()) == sum(
        g is not None for axes in spec.axes.values() for g in axes)
    # Buffers are permuted but not costed; the BN counter is a scalar with no axis.
    for key in state:
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert key not in spec.cost_keys
        if key.endswith("num_batches_tracked"):
            assert spec.axes[key] == ()
    assert any(k.endswith(".weight") for k in spec.cost_keys)
    # Feature modules exist and their outputs carry the group's units on dim 1.
    modules = dict(model.named_modules())
    assert set(spec.features) == set(spec.groups)
    seen = {}
    hooks = [modules[m].register_forward_hook(lambda mod, i, o, m=m: seen.__setitem__(m, o.shape))
             for ms in spec.features.values() for m in ms]
    outputs(model, in_shape)
    for h in hooks:
        h.remove()
    for group, ms in spec.features.items():
        for m in ms:
            assert seen[m][1] == spec.sizes[group], (group, m)
    # The classifier of a VGG reading a map larger than 1x1 is viewed per channel.
    if arch == "vgg":
        h = max(1, in_shape[1] // 32)  # 28 and 32 reach 1x1, 64 stops at 2x2
        first = "classifier.fc1" if model.n_hidden else "out"
        n_out = spec.shapes[f"{first}.weight"][0]
        assert spec.reshape[f"{first}.weight"] == (n_out, spec.sizes[f"P_conv{model.n_conv}"], h * h)
        assert spec.axes[f"{first}.weight"][1:] == (f"P_conv{model.n_conv}", None)


def test_mlp_spec_matches_the_documented_example():
    model = build_model("mlp", (1, 28, 28), 10, width=16, depth=2)
    spec = permutation_spec(model)
    assert spec.axes == {
        "fc1.weight": ("P_fc1", None), "fc1.bias": ("P_fc1",),
        "fc2.weight": ("P_fc2", "P_fc1"), "fc2.bias": ("P_fc2",),
        "out.weight": (None, "P_fc2"), "out.bias": (None,),
    }
    assert spec.sizes == {"P_fc1": 16, "P_fc2": 16}
    assert spec.features == {"P_fc1": ("relu1",), "P_fc2": ("relu2",)}


def test_resnet20_spec_streams_and_shortcuts():
    spec = permutation_spec(build_model("resnet20", (3, 32, 32), 10, width=0.25, norm="ln"))
    ax = spec.axes
    assert ax["stem.conv.weight"] == ("P_res1", None, None, None)
    assert ax["stem.norm.weight"] == ("P_res1",)
    assert ax["layer1.0.conv1.weight"] == ("P_layer1.0.inner", "P_res1", None, None)
    assert ax["layer1.0.conv2.weight"] == ("P_res1", "P_layer1.0.inner", None, None)
    assert ax["layer2.0.conv1.weight"] == ("P_layer2.0.inner", "P_res1", None, None)
    assert ax["layer2.0.shortcut.conv.weight"] == ("P_res2", "P_res1", None, None)
    assert ax["layer2.0.shortcut.norm.bias"] == ("P_res2",)
    assert ax["layer3.2.norm2.weight"] == ("P_res3",)
    assert ax["fc.weight"] == (None, "P_res3")
    assert spec.features["P_res1"] == ("stem", "layer1.0", "layer1.1", "layer1.2")
    assert spec.features["P_layer2.1.inner"] == ("layer2.1.relu1",)
    assert not any(k.startswith("layer1.0.shortcut") for k in ax)


def test_spec_and_apply_reject_inconsistent_input():
    with pytest.raises(ValueError, match="group P has size"):
        PermutationSpec({"a": ("P", None), "b": ("P",)}, {"a": (3, 2), "b": (4,)})
    with pytest.raises(ValueError, match="axis entries"):
        PermutationSpec({"a": ("P",)}, {"a": (3, 2)})
    with pytest.raises(ValueError, match="view"):
        PermutationSpec({"a": ("P", None)}, {"a": (3, 2)}, reshape={"a": (3, 3)})
    model = build_model("mlp", (1, 4, 4), 3, width=5, depth=2)
    spec = permutation_spec(model)
    state = model.state_dict()
    with pytest.raises(ValueError, match="not in the spec"):
        apply_permutation(spec, {"P_nope": torch.arange(5)}, state)
    with pytest.raises(ValueError, match="shape"):
        apply_permutation(spec, {"P_fc1": torch.arange(4)}, state)
    with pytest.raises(KeyError, match="not in the permutation spec"):
        apply_permutation(spec, {}, {**state, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing"):
        spec.check_state({k: v for k, v in state.items() if k != "out.bias"})
    with pytest.raises(TypeError, match="no permutation spec"):
        permutation_spec(nn.Linear(2, 2))
    ident = apply_permutation(spec, identity_permutation(spec), state)
    assert all(torch.equal(ident[k], state[k]) for k in state)
    # Groups left out of a permutation are the identity.
    perm = nontrivial_permutation(spec, 0)
    only1 = apply_permutation(spec, {"P_fc1": perm["P_fc1"]}, state)
    assert torch.equal(only1["fc2.weight"], state["fc2.weight"][:, perm["P_fc1"]])
    assert torch.equal(only1["fc1.weight"], state["fc1.weight"][perm["P_fc1"]])


def test_vgg_classifier_view_permutes_channel_blocks():
    """The flattened input index is c*H*W + hw: channel c moves as a block of H*W columns."""
    model = build_model("vgg", (3, 64, 64), 5, width=0.125, batch_norm=False)
    spec = permutation_spec(model)
    c = spec.sizes["P_conv8"]
    perm = {"P_conv8": torch.randperm(c, generator=torch.Generator().manual_seed(0))}
    w = model.state_dict()["out.weight"]  # (5, C*4)
    new = apply_permutation(spec, perm, model.state_dict())["out.weight"]
    expected = w.view(5, c, 4)[:, perm["P_conv8"], :].reshape(5, c * 4)
    assert torch.equal(new, expected)


# --- 3. weight matching recovers a planted permutation -------------------------------------------


@pytest.mark.parametrize("arch,kwargs,in_shape", CASES, ids=IDS)
def test_weight_matching_recovers_planted_permutation(arch, kwargs, in_shape):
    model = make_model(arch, kwargs, in_shape)
    spec = permutation_spec(model)
    state_a = model.state_dict()
    pi = nontrivial_permutation(spec, seed=2)
    state_b = apply_permutation(spec, pi, state_a)
    logs = []
    perm, info = weight_matching(spec, state_a, state_b, seed=3, log=logs.append)
    assert set(perm) == set(spec.sizes)
    for g, p in perm.items():
        assert p.dtype == torch.long
        assert torch.equal(p, torch.argsort(pi[g])), g
    aligned = apply_permutation(spec, perm, state_b)
    for key in state_a:
        assert torch.equal(aligned[key], state_a[key]), key
    assert 2 <= info["sweeps"] <= 4  # one that finds it (maybe one fix-up), one that confirms it
    best = matching_objective(spec, state_a, state_a)
    assert info["objective"] == pytest.approx(best, rel=1e-12)
    assert info["history"][0] < info["objective"]
    assert len(logs) == info["sweeps"] + 1


# --- 4. activation matching recovers a planted permutation ---------------------------------------


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist5k")


def random_images(shape, n=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    c = shape[0]
    return Data("random", x, y, x[:8], y[:8], (0.5,) * c, (0.25,) * c, NUM_CLASSES)


@pytest.mark.parametrize("cost", ["correlation", "inner_product"])
@pytest.mark.parametrize("arch,kwargs,in_shape", CASES, ids=IDS)
def test_activation_matching_recovers_planted_permutation(arch, kwargs, in_shape, cost, mnist):
    assert_planted_permutation_recovered(arch, kwargs, in_shape, cost, mnist, residual="pooled")


RESIDUAL_CASES = [c for c in CASES if c[0] in ("resnet20", "resnet18") and c[1]["width"] in (0.25, 0.125)
                  and c[1]["norm"] in ("bn", "none") and c[2][0] == 3]


@pytest.mark.parametrize("arch,kwargs,in_shape", RESIDUAL_CASES,
                         ids=[IDS[CASES.index(c)] for c in RESIDUAL_CASES])
def test_activation_matching_of_the_last_block_per_stage_recovers_planted_permutation(
        arch, kwargs, in_shape, mnist):
    """matching.residual: last: each residual stream matched on its stage's last block output
    only (as the REPAIR code) still recovers a planted permutation of every group."""
    assert_planted_permutation_recovered(arch, kwargs, in_shape, "correlation", mnist,
                                         residual="last")


def assert_planted_permutation_recovered(arch, kwargs, in_shape, cost, mnist, residual):
    data = mnist if in_shape == (1, 28, 28) else random_images(in_shape)
    model_a = make_model(arch, kwargs, in_shape)
    spec = permutation_spec(model_a)
    pi = nontrivial_permutation(spec, seed=4)
    model_b = permuted_copy(model_a, spec, pi)
    model_b.train()  # activation matching must use eval mode and restore the mode afterwards
    perm, info = activation_matching(model_a, model_b, None if cost == "correlation" else spec,
                                     data, num_batches=2, batch_size=48, cost=cost,
                                     residual=residual)
    assert model_b.training and not model_a.training
    assert info["sweeps"] == 0 and info["samples"] == 96 and info["residual"] == residual
    # Units are identifiable from their features unless they never fire (all zero) or have a
    # twin (another unit with correlation 1 for cost="correlation", or the same features for
    # "inner_product"); on identifiable units the planted permutation must come back exactly.
    x = data.normalize(data.train_x[sample_order(len(data.train_x), 0)[:96]])  # the images used
    modules = feature_modules(spec, residual)
    feats_a = group_features(model_a, modules, x)
    feats_b = group_features(permuted_copy(model_b, spec, perm), modules, x)
    ok_total = units = 0
    for g, p in perm.items():
        fa = feats_a[g].double()
        live = fa.abs().amax(0) > 0
        ok = live & ~twins(fa, cost)
        want = torch.argsort(pi[g])
        assert torch.equal(p[ok], want[ok]), g
        assert not live[pi[g][p[~live]]].any(), g  # dead units of B go to dead units of A
        if cost == "inner_product":  # twins are identical: all features match
            torch.testing.assert_close(feats_b[g], feats_a[g], rtol=1e-4, atol=1e-5)
        else:  # live units correlate perfectly, dead ones count 0
            torch.testing.assert_close(feats_b[g][:, ok], feats_a[g][:, ok], rtol=1e-4, atol=1e-5)
            assert info["per_group"][g] == pytest.approx(float(live.double().mean()), abs=1e-5)
        ok_total += int(ok.sum())
        units += len(p)
    assert ok_total >= 0.8 * units  # the checks above are not vacuous


def twins(feats, cost):
    """(n,) bool: live units that another unit matches as well as itself under ``cost``."""
    n = feats.shape[1]
    if cost == "correlation":
        z = feats - feats.mean(0)
        z = z / z.norm(dim=0).clamp_min(1e-300)
        same = z.T @ z > 1 - 1e-6
    else:
        same = torch.cdist(feats.T, feats.T) <= 1e-5 * feats.norm(dim=0).clamp_min(1e-300)[:, None]
    return (same & ~torch.eye(n, dtype=torch.bool)).any(1) & (feats.abs().amax(0) > 0)


def group_features(model, features, x):
    """group -> (observations, n) features of every module of the group (``features``: group ->
    modules), stacked."""
    modules = dict(model.named_modules())
    out = {g: [] for g in features}
    hooks = [modules[m].register_forward_hook(
        lambda mod, i, o, g=g: out[g].append(o.detach().movedim(1, -1).reshape(-1, o.shape[1])))
        for g, ms in features.items() for m in ms]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return {g: torch.cat(v) for g, v in out.items()}


def test_activation_matching_pools_stream_features():
    """P_res1 statistics pool the stem and the three layer1 block outputs as observations."""
    model = make_model("resnet20", {"width": 0.25, "norm": "ln"}, (3, 8, 8))
    spec = permutation_spec(model)
    data = random_images((3, 8, 8), n=10)
    _, info = activation_matching(model, copy.deepcopy(model), spec, data, num_batches=1,
                                  batch_size=10, cost="inner_product")
    feats = []
    hooks = [dict(model.named_modules())[m].register_forward_hook(
        lambda mod, i, o: feats.append(o.detach().double())) for m in spec.features["P_res1"]]
    with torch.no_grad():
        model(data.normalize(data.train_x))
    for h in hooks:
        h.remove()
    obs = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in feats])
    assert obs.shape == (4 * 10 * 8 * 8, spec.sizes["P_res1"])
    assert info["per_group"]["P_res1"] == pytest.approx(float((obs * obs).sum(1).sum() /
                                                              spec.sizes["P_res1"]), rel=1e-9)
    with pytest.raises(ValueError, match="cost"):
        activation_matching(model, model, spec, data, 1, 10, cost="cosine")


def test_activation_matching_of_the_last_block_reads_only_each_streams_last_block():
    """matching.residual: last: a residual stream's statistics are those of its stage's last
    block output alone (the REPAIR code's choice); groups with one feature module are unchanged."""
    model = make_model("resnet20", {"width": 0.25, "norm": "ln"}, (3, 8, 8))
    spec = permutation_spec(model)
    last = feature_modules(spec, "last")
    assert {g: last[g] for g in ("P_res1", "P_res2", "P_res3")} == {
        "P_res1": ("layer1.2",), "P_res2": ("layer2.2",), "P_res3": ("layer3.2",)}
    assert spec.features["P_res1"] == ("stem", "layer1.0", "layer1.1", "layer1.2")
    assert all(last[g] == spec.features[g] for g in spec.features if not g.startswith("P_res"))
    assert feature_modules(spec, "pooled") == dict(spec.features)
    data = random_images((3, 8, 8), n=10)
    _, info = activation_matching(model, copy.deepcopy(model), spec, data, num_batches=1,
                                  batch_size=10, cost="inner_product", residual="last")
    for group, module in (("P_res1", "layer1.2"), ("P_res3", "layer3.2")):
        feats = []
        hook = dict(model.named_modules())[module].register_forward_hook(
            lambda mod, i, o: feats.append(o.detach().double()))
        with torch.no_grad():
            model(data.normalize(data.train_x))
        hook.remove()
        obs = feats[0].permute(0, 2, 3, 1).reshape(-1, feats[0].shape[1])
        assert info["per_group"][group] == pytest.approx(
            float((obs * obs).sum() / spec.sizes[group]), rel=1e-9), group
    with pytest.raises(ValueError, match="residual"):
        activation_matching(model, model, spec, data, 1, 10, residual="first")


# --- 5. independent networks ---------------------------------------------------------------------


@pytest.mark.parametrize("arch,kwargs,in_shape", [
    ("mlp", {"width": 64, "depth": 3}, (1, 28, 28)),
    ("vgg", {"depth": 11, "batch_norm": True, "width": 0.125}, (3, 32, 32)),
    ("resnet20", {"width": 0.5, "norm": "ln"}, (3, 32, 32)),
], ids=["mlp", "vgg-bn", "resnet20-ln"])
def test_weight_matching_independent_networks(arch, kwargs, in_shape):
    state_a = make_model(arch, kwargs, in_shape, seed=0).state_dict()
    state_b = make_model(arch, kwargs, in_shape, seed=1).state_dict()
    spec = permutation_spec(build_model(arch, in_shape, NUM_CLASSES, **kwargs))
    perm, info = weight_matching(spec, state_a, state_b, seed=0)
    start = matching_objective(spec, state_a, state_b)
    hist = info["history"]
    assert hist[0] == pytest.approx(start, rel=1e-9)
    assert info["objective"] > start + 0.1 * abs(start) + 1e-3
    assert all(b >= a for a, b in zip(hist, hist[1:])), hist
    assert hist[-1] == hist[-2]  # stopped after a sweep without improvement
    assert info["sweeps"] >= 2 and len(hist) == info["sweeps"] + 1
    assert info["objective"] == pytest.approx(matching_objective(spec, state_a, state_b, perm),
                                              rel=1e-9)
    for g, p in perm.items():
        assert torch.equal(torch.sort(p).values, torch.arange(spec.sizes[g]))
    # Aligning B keeps its function.
    model_b = make_model(arch, kwargs, in_shape, seed=1)
    assert_same_function(outputs(model_b, in_shape),
                         outputs(permuted_copy(model_b, spec, perm), in_shape))
    # Deterministic for a seed.
    perm2, info2 = weight_matching(spec, state_a, state_b, seed=0)
    assert info2["history"] == hist
    assert all(torch.equal(perm[g], perm2[g]) for g in perm)


def test_weight_matching_max_sweeps_and_order_seed():
    state_a = make_model("mlp", {"width": 48, "depth": 3}, (1, 28, 28), seed=0).state_dict()
    state_b = make_model("mlp", {"width": 48, "depth": 3}, (1, 28, 28), seed=1).state_dict()
    spec = permutation_spec(build_model("mlp", (1, 28, 28), NUM_CLASSES, width=48, depth=3))
    _, info = weight_matching(spec, state_a, state_b, max_sweeps=1)
    assert info["sweeps"] == 1 and len(info["history"]) == 2
    results = {round(weight_matching(spec, state_a, state_b, seed=s)[1]["objective"], 6)
               for s in range(4)}
    assert all(np.isfinite(list(results)))


# --- 6. weight matching at scale: float32 costs, exact objective, incremental costs --------------


def test_weight_matching_at_4x_width_recovers_planted_and_never_decreases():
    """ResNet-20-LN x4 (float32 costs by default): a planted permutation comes back exactly,
    and on an independent pair the float64 objective after every sweep, recomputed from the
    permutation a run capped at that sweep returns, never decreases and equals the history."""
    kwargs, in_shape = {"width": 4, "norm": "ln"}, (3, 32, 32)
    model = make_model("resnet20", kwargs, in_shape)
    spec = permutation_spec(model)
    state_a = model.state_dict()
    pi = nontrivial_permutation(spec, seed=2)
    perm, info = weight_matching(spec, apply_permutation(spec, pi, state_a), state_a, seed=1)
    assert info["dtype"] == "float32"
    assert all(torch.equal(perm[g], pi[g]) for g in pi)  # B = A, so perm maps A onto pi(A)
    assert info["objective"] == pytest.approx(matching_objective(spec, state_a, state_a), rel=1e-12)

    state_b = make_model("resnet20", kwargs, in_shape, seed=1).state_dict()
    _, info = weight_matching(spec, state_a, state_b, seed=0)
    hist = info["history"]
    assert info["sweeps"] >= 3 and hist[-1] > hist[0]
    objectives = [matching_objective(spec, state_a, state_b)]
    for sweeps in range(1, info["sweeps"] + 1):
        perm_k, info_k = weight_matching(spec, state_a, state_b, max_sweeps=sweeps, seed=0)
        assert info_k["history"] == hist[:sweeps + 1]
        objectives.append(matching_objective(spec, state_a, state_b, perm_k))
    assert all(b >= a for a, b in zip(objectives, objectives[1:])), objectives
    np.testing.assert_allclose(hist, objectives, rtol=1e-9)


@pytest.mark.parametrize("arch,kwargs,in_shape", [
    ("mlp", {"width": 64, "depth": 3}, (1, 28, 28)),
    ("vgg", {"depth": 11, "batch_norm": True, "width": 0.125}, (3, 64, 64)),
    ("resnet20", {"width": 1, "norm": "ln"}, (3, 32, 32)),
], ids=["mlp", "vgg-bn-64", "resnet20-ln"])
def test_weight_matching_float32_costs_reach_the_float64_result(arch, kwargs, in_shape):
    state_a = make_model(arch, kwargs, in_shape, seed=0).state_dict()
    state_b = make_model(arch, kwargs, in_shape, seed=1).state_dict()
    spec = permutation_spec(build_model(arch, in_shape, NUM_CLASSES, **kwargs))
    _, info64 = weight_matching(spec, state_a, state_b, seed=0, dtype=torch.float64)
    _, info32 = weight_matching(spec, state_a, state_b, seed=0)
    assert (info64["dtype"], info32["dtype"]) == ("float64", "float32")
    assert info32["objective"] == pytest.approx(info64["objective"], rel=1e-6)
    # float64 weights: stored in float64 (exact gains), matmuls in float32.
    wide_a = {k: v.double() for k, v in state_a.items()}
    wide_b = {k: v.double() for k, v in state_b.items()}
    perm, info = weight_matching(spec, wide_a, wide_b, seed=0)
    assert info["objective"] == pytest.approx(matching_objective(spec, wide_a, wide_b, perm),
                                              rel=1e-12)
    assert all(b >= a for a, b in zip(info["history"], info["history"][1:]))


def toy_spec():
    """A tensor with three permuted axes (one of them on a view) and one with a group on two
    axes, which weight matching refuses."""
    axes = {"w1": ("P", None), "t": ("P", "Q", None, "R"), "w2": ("Q", None), "w3": (None, "R"),
            "b": ("P",), "s": ("Q",)}
    shapes = {"w1": (6, 5), "t": (6, 4, 6), "w2": (4, 7), "w3": (2, 3), "b": (6,), "s": (4,)}
    return PermutationSpec(axes, shapes, reshape={"t": (6, 4, 2, 3)})


def test_weight_matching_tensor_with_three_permuted_axes():
    spec = toy_spec()
    gen = torch.Generator().manual_seed(0)
    state_a = {k: torch.randn(s, generator=gen) for k, s in spec.shapes.items()}
    pi = nontrivial_permutation(spec, seed=1)
    state_b = apply_permutation(spec, pi, state_a)
    perm, info = weight_matching(spec, state_a, state_b, seed=2)
    assert all(torch.equal(perm[g], torch.argsort(pi[g])) for g in pi)
    assert info["objective"] == pytest.approx(matching_objective(spec, state_a, state_a), rel=1e-12)
    state_b = {k: torch.randn(s, generator=gen) for k, s in spec.shapes.items()}
    perm, info = weight_matching(spec, state_a, state_b, seed=2)
    assert info["objective"] == pytest.approx(matching_objective(spec, state_a, state_b, perm),
                                              rel=1e-12)
    twice = PermutationSpec({"sq": ("P", "P"), "b": ("P",)}, {"sq": (3, 3), "b": (3,)})
    with pytest.raises(ValueError, match="two of its axes"):
        weight_matching(twice, {"sq": torch.eye(3), "b": torch.ones(3)},
                        {"sq": torch.eye(3), "b": torch.ones(3)})


def test_cost_matrices_follow_moved_units_row_by_row():
    """White box: after units move (a few at a time, so the costs are updated through the
    moved rows, or many, so they are recomputed), each group's B matrix is B with the other
    groups' permutations and its cost equals a fresh float64 matmul."""
    from lmcflow.alignment import weight as m

    model = make_model("resnet20", {"width": 0.5, "norm": "bn"}, (3, 32, 32))
    spec = permutation_spec(model)
    state_a = model.state_dict()
    state_b = make_model("resnet20", {"width": 0.5, "norm": "bn"}, (3, 32, 32), seed=1).state_dict()
    views = [{k: spec.view(k, s[k]).double() for k in spec.cost_keys} for s in (state_a, state_b)]
    groups = m._build_groups(spec, *views, torch.float64, "cpu")
    perm = {g: torch.arange(n) for g, n in spec.sizes.items()}
    inverse = dict(perm)
    for grp in groups.values():
        m._cost(grp, perm, inverse, torch.float64)
    gen = torch.Generator().manual_seed(0)
    names = sorted(groups)
    for step in range(40):
        h = names[int(torch.randint(len(names), (1,), generator=gen))]
        k = 2 if step % 4 else spec.sizes[h]  # mostly two units swap places, sometimes all move
        pos = torch.randperm(spec.sizes[h], generator=gen)[:k]
        new = perm[h].clone()
        new[pos] = perm[h][pos[torch.roll(torch.arange(k), 1)]]
        moved = torch.nonzero(new != perm[h]).view(-1)
        source = inverse[h][new[moved]]
        perm[h], inverse[h] = new, torch.argsort(new)
        for g, grp in groups.items():
            for i, blk in enumerate(grp.blocks):
                if h in dict(blk.others):
                    m._rewrite(grp, i, h, moved, source)
        g = names[int(torch.randint(len(names), (1,), generator=gen))]
        grp = groups[g]
        cost = m._cost(grp, perm, inverse, torch.float64)
        torch.testing.assert_close(cost, grp.a.T @ grp.b, rtol=1e-12, atol=1e-12)
    for g, grp in groups.items():
        own = {g: torch.arange(spec.sizes[g])}  # a group's own axis stays in B's unit order
        expected = apply_permutation(spec, {**perm, **own}, state_b)
        for blk in grp.blocks:
            want = spec.view(blk.key, expected[blk.key]).permute(blk.order).double()
            assert torch.equal(grp.b[blk.rows].view(blk.shape), want), (g, blk.key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_matching_on_cuda_agrees_with_cpu():
    arch, kwargs, in_shape = "resnet20", {"width": 0.5, "norm": "bn"}, (3, 32, 32)
    model_a = make_model(arch, kwargs, in_shape, seed=0)
    model_b = make_model(arch, kwargs, in_shape, seed=1)
    spec = permutation_spec(model_a)
    cpu_a, cpu_b = model_a.state_dict(), model_b.state_dict()
    perm, info = weight_matching(spec, cpu_a, cpu_b)
    gpu_a = {k: v.cuda() for k, v in cpu_a.items()}
    gpu_b = {k: v.cuda() for k, v in cpu_b.items()}
    perm_gpu, info_gpu = weight_matching(spec, gpu_a, gpu_b)
    assert info_gpu["device"].startswith("cuda") and info_gpu["dtype"] == "float32"
    assert all(p.device.type == "cpu" for p in perm_gpu.values())
    assert info_gpu["objective"] == pytest.approx(info["objective"], rel=1e-9)
    assert all(torch.equal(perm[g], perm_gpu[g]) for g in perm)
    perm_moved, info_moved = weight_matching(spec, cpu_a, cpu_b, device="cuda")
    assert info_moved["device"].startswith("cuda") and info_moved["history"] == info_gpu["history"]
    assert all(torch.equal(perm_moved[g], perm_gpu[g]) for g in perm)
    assert apply_permutation(spec, perm_gpu, gpu_b)["fc.weight"].is_cuda
    data = random_images(in_shape)
    act, _ = activation_matching(model_a, model_b, spec, data, 2, 48)
    act_gpu, _ = activation_matching(model_a, model_b, spec, data, 2, 48, device="cuda")
    agree = sum(int((act[g] == act_gpu[g]).sum()) for g in act) / sum(spec.sizes.values())
    assert agree > 0.95  # float32 features differ slightly between devices


def test_activation_matching_draws_its_images_from_every_class():
    """Stored datasets may be sorted by class (mnist5k is): the images compared are a seeded
    shuffled subset, so even one small batch holds every class."""
    n, classes = 1000, 10
    labels = torch.arange(n) * classes // n  # sorted by class, 100 per class
    x = (labels * 25).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 8, 8).contiguous()
    data = Data("sorted", x, labels, x[:8], labels[:8], (0.0,), (1.0,), classes)
    model = make_model("mlp", {"width": 16, "depth": 1}, (1, 8, 8))
    other, seen = copy.deepcopy(model), []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    activation_matching(model, other, None, data, num_batches=1, batch_size=60)
    drawn = torch.round(torch.cat(seen)[:, 0, 0, 0] * 255 / 25).long()
    assert len(drawn) == 60 and set(drawn.tolist()) == set(range(classes))
