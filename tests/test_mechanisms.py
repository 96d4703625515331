"""Weak additivity and commutativity against direct formulas on tiny networks."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from lmcflow.data import load_dataset
from lmcflow.features import probe_indices
from lmcflow.mechanisms import commutativity, derangement, weak_additivity
from lmcflow.metrics import DistAccumulator, dist
from lmcflow.models import build_model


def _direct_dist(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return ((x - y) ** 2).sum() / (np.linalg.norm(x) * np.linalg.norm(y))


def test_dist_and_accumulator_match_the_formula():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    np.testing.assert_allclose(dist(x, y).numpy(), [_direct_dist(a, b) for a, b in zip(x, y)])
    acc = DistAccumulator()
    for part in (slice(0, 2), slice(2, 6)):
        acc.add(x[part], y[part])
    np.testing.assert_allclose(acc.value, _direct_dist(x.flatten(), y.flatten()))
    assert torch.isnan(dist(torch.zeros(1, 3), torch.ones(1, 3)))[0]


def _pair(arch="mlp", **args):
    torch.manual_seed(0)
    a = build_model(arch, (1, 8, 8), 3, **args).eval()
    torch.manual_seed(1)
    b = build_model(arch, (1, 8, 8), 3, **args).eval()
    x = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    return a, b, x, np.arange(10), lambda u: u.float() / 255 - 0.5


def test_commutativity_matches_a_direct_computation_on_an_mlp():
    a, b, x, samples, norm = _pair(width=7, depth=2)
    table = commutativity(a, b, x, samples, norm, batch_size=4).set_index("layer")
    h_a = torch.relu(a.fc1(norm(x).flatten(1)))  # input of fc2 in A and in B
    h_b = torch.relu(b.fc1(norm(x).flatten(1)))
    w_a, w_b = a.fc2.weight, b.fc2.weight
    lhs, rhs = h_a @ w_a.T + h_b @ w_b.T, h_b @ w_a.T + h_a @ w_b.T
    np.testing.assert_allclose(table.loc["fc2", "dist_com"], _direct_dist(lhs.detach(), rhs.detach()),
                               rtol=1e-5)
    np.testing.assert_allclose(table.loc["fc2", "dist_h"], _direct_dist(h_a.detach(), h_b.detach()),
                               rtol=1e-5)
    np.testing.assert_allclose(table.loc["fc2", "dist_w"], _direct_dist(w_a.detach(), w_b.detach()),
                               rtol=1e-6)
    assert table.loc["fc1", "dist_com"] == 0  # same input in both networks: H_A = H_B


def test_commutativity_is_zero_for_identical_networks_with_convs():
    a, _, x, samples, norm = _pair("vgg", depth=11, batch_norm=True, width=0.0625)
    table = commutativity(a, a, x, samples, norm, batch_size=5)
    assert (table["dist_com"] == 0).all() and (table["dist_w"] == 0).all()
    assert list(table["layer"][:2]) == ["features.conv1", "features.conv2"]


def test_weak_additivity_direct_and_baseline():
    a, b, x, samples, norm = _pair(width=7, depth=1)
    table = weak_additivity(a, b, x, samples, norm, alphas=[0.25], batch_size=5)
    assert len(table) == 10 and set(table["layer"]) == {"relu1"}
    pre_a, pre_b = a.fc1(norm(x).flatten(1)).detach(), b.fc1(norm(x).flatten(1)).detach()
    mix = lambda u, v: 0.25 * u + 0.75 * v  # noqa: E731
    want = [_direct_dist(torch.relu(mix(pa, pb)), mix(torch.relu(pa), torch.relu(pb)))
            for pa, pb in zip(pre_a, pre_b)]
    np.testing.assert_allclose(table["dist_sigma"], want, rtol=1e-6)
    # the baseline pairs sample i of A with sample σ(i) of B, σ a derangement of the probe set
    i, sigma = 6, derangement(len(samples), 0)
    other = pre_b[sigma[i]]
    np.testing.assert_allclose(table["dist_sigma_shuffled"][i],
                               _direct_dist(torch.relu(mix(pre_a[i], other)),
                                            mix(torch.relu(pre_a[i]), torch.relu(other))), rtol=1e-6)


def test_relu_is_additive_where_pre_activations_share_signs():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU())
    with torch.no_grad():
        net[1].weight.fill_(1.0), net[1].bias.fill_(1.0)
    x = torch.randint(0, 256, (4, 1, 2, 2), dtype=torch.uint8)
    table = weak_additivity(net, net, x, np.arange(4), lambda u: u.float(), [0.5], batch_size=4)
    assert np.allclose(table["dist_sigma"], 0) and np.allclose(table["dist_sigma_shuffled"], 0)


def test_derangement_moves_every_element_and_is_seeded():
    for n in (2, 3, 10, 501):
        sigma = derangement(n, seed=n)
        assert sorted(sigma) == list(range(n)) and (sigma != np.arange(n)).all()
        assert (derangement(n, seed=n) == sigma).all()
    assert (derangement(100, 0) != derangement(100, 1)).any()
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, 0)


def test_weak_additivity_baseline_partners_are_other_samples_of_mostly_other_classes():
    """mnist5k's test split is stored sorted by class: partners within a batch would mostly
    share the label. With a derangement of the whole probe set few do, whatever the batch."""
    data = load_dataset("mnist5k")
    samples = probe_indices(len(data.test_y), 500, seed=0)
    labels = data.test_y.numpy()
    partners = samples[derangement(len(samples), 0)]
    assert (partners != samples).all()
    assert (labels[partners] == labels[samples]).mean() < 0.2


def test_weak_additivity_does_not_depend_on_the_batch_size():
    a, b, x, samples, norm = _pair(width=7, depth=2)
    whole = weak_additivity(a, b, x, samples, norm, alphas=[0.5], batch_size=len(samples))
    for batch_size in (1, 3):
        part = weak_additivity(a, b, x, samples, norm, alphas=[0.5], batch_size=batch_size)
        part = part.sort_values(["layer", "sample"]).reset_index(drop=True)
        ref = whole.sort_values(["layer", "sample"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(part, ref, rtol=1e-6)
    assert whole["dist_sigma_shuffled"].notna().all() and (whole["dist_sigma_shuffled"] > 0).all()


def test_weak_additivity_measures_the_gelu_of_a_vit():
    """A ViT has GELUs, no ReLU: each block's GELU gets rows, computed with GELU itself."""
    a, b, x, samples, norm = _pair("vit", patch=4, dim=8, depth=2, heads=2)
    table = weak_additivity(a, b, x, samples, norm, alphas=[0.5], batch_size=4)
    assert set(table["layer"]) == {"blocks.0.gelu", "blocks.1.gelu"}
    assert set(table["activation"]) == {"GELU"} and len(table) == 2 * len(samples)
    from lmcflow.features import capture
    with capture(a, ["blocks.0.gelu"], inputs=True) as h_a:
        a(norm(x))
    with capture(b, ["blocks.0.gelu"], inputs=True) as h_b:
        b(norm(x))
    pa, pb = h_a["blocks.0.gelu"].flatten(1), h_b["blocks.0.gelu"].flatten(1)
    gelu = torch.nn.functional.gelu
    want = [_direct_dist(gelu((u + v) / 2), (gelu(u) + gelu(v)) / 2) for u, v in zip(pa, pb)]
    got = table[table["layer"] == "blocks.0.gelu"].sort_values("sample")["dist_sigma"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert (table["dist_sigma"] > 0).all()


def test_weak_additivity_with_in_place_relus_and_without_activations():
    """An in-place ReLU (torchvision style) is applied out of place: the mixed and the
    endpoint pre-activations stay intact. A net with no activation gives an empty table."""
    torch.manual_seed(0)
    inplace = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 2))
    plain = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    plain.load_state_dict(inplace.state_dict())
    torch.manual_seed(1)
    other = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(6, 1, 2, 2)
    ident = lambda u: u  # noqa: E731
    got = weak_additivity(inplace, other, x, np.arange(6), ident, [0.3], batch_size=3)
    want = weak_additivity(plain, other, x, np.arange(6), ident, [0.3], batch_size=3)
    pd.testing.assert_frame_equal(got, want)
    assert (got["dist_sigma"] > 0).any()
    linear = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    empty = weak_additivity(linear, linear, x, np.arange(6), ident, [0.5], batch_size=3)
    assert empty.empty and "dist_sigma" in empty and "activation" in empty


def test_weak_additivity_applies_the_activation_without_its_hooks():
    """Under the `repair` policy an activation carries a pre-hook that rescales its input;
    Dist_σ is about σ itself, so the hook runs in A's forward passes only (one per batch), not
    on the mixed pre-activations."""
    a, b, x, samples, norm = _pair(width=7, depth=1)
    calls = []
    handle = a.relu1.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
    try:
        weak_additivity(a, b, x, samples, norm, alphas=[0.5], batch_size=5)
    finally:
        handle.remove()
    assert calls.count(5) == 2  # (finding the modules called once runs a batch of one first)
