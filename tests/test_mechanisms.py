"""Weak additivity and commutativity against direct formulas on tiny networks."""

import numpy as np
import torch
from torch import nn

from lmcflow.mechanisms import commutativity, weak_additivity
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
    # the baseline pairs sample i of A with sample i-1 of B within each batch of 5
    i = 6
    other = pre_b[5 + (i - 5 - 1) % 5]
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
