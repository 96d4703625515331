"""REPAIR: the rescaled statistics against a direct formula, and what it buys on a real pair."""

import copy

import pytest
import torch

from lmcflow.interpolation import endpoint_statistics, lerp_state, lmc_curve, load_interpolated
from lmcflow.alignment import apply_permutation, permutation_spec, weight_matching
from lmcflow.models import build_model
from lmcflow.repair import remove_repair, repair, repair_points, unit_statistics
from conftest import sgd_train
from lmcflow.training import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data(mnist2k):
    return mnist2k


def net(arch="mlp", seed=0, **kw):
    torch.manual_seed(seed)
    kw = kw or {"width": 32, "depth": 2}
    return build_model(arch, (1, 28, 28), 10, **kw).eval()


def test_repaired_units_have_the_interpolated_statistics(data):
    a, b = net(seed=0), net(seed=1)
    stats_a, stats_b = (unit_statistics(m, data.train_x, data.normalize, 500) for m in (a, b))
    model = net(seed=2)
    model.load_state_dict(lerp_state(a.state_dict(), b.state_dict(), 0.3))
    plain = unit_statistics(model, data.train_x, data.normalize, 500)
    repair(model, stats_a, stats_b, 0.3, data.train_x, data.normalize, 500)
    repaired = unit_statistics(model, data.train_x, data.normalize, 500)
    points = repair_points(model)
    assert points == ["relu1", "relu2"]
    for i, name in enumerate(points):
        mean = 0.3 * stats_a[name][0] + 0.7 * stats_b[name][0]
        std = 0.3 * stats_a[name][1] + 0.7 * stats_b[name][1]
        assert not torch.allclose(plain[name][1], std, rtol=0.05)  # variance collapse to repair
        # the first point sees no other rescaling: its statistics are the targets exactly; a
        # deeper one up to the batch-vs-fixed statistics of the points before it
        tol = 1e-4 if i == 0 else 0.05
        torch.testing.assert_close(repaired[name][0], mean, rtol=tol, atol=tol * float(std.mean()))
        torch.testing.assert_close(repaired[name][1], std, rtol=tol, atol=tol * float(std.mean()))
    # the rescaling is an affine map of each unit's pre-activation, by direct formula
    x = data.normalize(data.train_x[:7])
    with torch.no_grad():
        pre = model.fc1(model.flatten(x))
        mu, sd = plain["relu1"][0].float(), (plain["relu1"][1].square() + 1e-5).sqrt().float()
        mean = (0.3 * stats_a["relu1"][0] + 0.7 * stats_b["relu1"][0]).float()
        std = (0.3 * stats_a["relu1"][1] + 0.7 * stats_b["relu1"][1]).float()
        want = torch.relu((pre - mu) / sd * std + mean)
        got = {}
        h = model.relu1.register_forward_hook(lambda m, i, o: got.__setitem__("y", o))
        model(x)
        h.remove()
    torch.testing.assert_close(got["y"], want, rtol=1e-4, atol=1e-5)
    remove_repair(model)
    assert not model.relu1._forward_pre_hooks


def test_repair_of_an_endpoint_is_close_to_the_endpoint(data):
    a, b = net(seed=0), net(seed=1)
    stats = endpoint_statistics(a, a.state_dict(), b.state_dict(), data, 500)
    model = load_interpolated(net(seed=2), a.state_dict(), b.state_dict(), 1.0, data, "repair", 500,
                              stats=stats)
    x = data.normalize(data.test_x[:64])
    with torch.no_grad():
        torch.testing.assert_close(model(x), a(x), rtol=0.05, atol=0.05 * float(a(x).abs().mean()))


@pytest.mark.parametrize("arch, kw", [("mlp", {"width": 64, "depth": 3}),
                                      ("vgg", {"width": 0.125, "batch_norm": True})])
def test_repair_lowers_the_midpoint_error_of_an_aligned_pair(data, arch, kw):
    """A naive pair aligned by weight matching (an MLP without normalisation, a VGG with
    BatchNorm): REPAIR undoes the variance collapse at α = ½ and the midpoint error drops below
    the plain interpolation's."""
    a, b = sgd_train(net(arch, 0, **kw), data, seed=10), sgd_train(net(arch, 1, **kw), data, seed=11)
    spec = permutation_spec(a)
    perm, _ = weight_matching(spec, a.state_dict(), b.state_dict())
    state_b = apply_permutation(spec, perm, b.state_dict())
    errors = {}
    for bn in ("interpolate", "repair"):
        curve = lmc_curve(copy.deepcopy(a), a.state_dict(), state_b, data, [0.0, 0.5, 1.0], bn=bn,
                          batch_size=500, log=lambda _: None)
        errors[bn] = curve[(curve.alpha == 0.5) & (curve.split == "test")]["error"].item()
    endpoint = evaluate(a, data.test_x, data.test_y, data.normalize)[1]
    assert errors["repair"] < errors["interpolate"], errors
    assert errors["interpolate"] > endpoint + 0.01, (errors, endpoint)  # a barrier to repair


@pytest.mark.parametrize("arch, kw", [("mlp", {"width": 32, "depth": 2}),
                                      ("resnet20", {"width": 0.25, "norm": "bn"})])
def test_repaired_logits_have_the_interpolated_statistics_of_the_endpoints_logits(data, arch, kw):
    """lmc.repair_logits: the logits are one more repaired unit per class. Over the data the
    statistics are measured on (one batch here, so batch and fixed statistics agree), θ_α's
    logits then have α·μ_A + (1−α)·μ_B and α·σ_A + (1−α)·σ_B per class; without the option
    they keep their own (collapsed) statistics. The hook sits on the logits module, so a feature
    hook on it (LLFC, stitching) reads the repaired logits."""
    from lmcflow.features import capture
    from lmcflow.models import logits_module
    from lmcflow.repair import LOGITS

    x = data.train_x[:500]
    n = len(x)
    a, b = net(arch, 0, **kw), net(arch, 1, **kw)
    stats_a, stats_b = (unit_statistics(m, x, data.normalize, n, logits=True) for m in (a, b))
    assert LOGITS in stats_a and LOGITS not in unit_statistics(a, x, data.normalize, n)
    alpha = 0.3
    mean = alpha * stats_a[LOGITS][0] + (1 - alpha) * stats_b[LOGITS][0]
    std = alpha * stats_a[LOGITS][1] + (1 - alpha) * stats_b[LOGITS][1]
    observed = {}
    for logits in (False, True):
        model = net(arch, 2, **kw)
        model.load_state_dict(lerp_state(a.state_dict(), b.state_dict(), alpha))
        repair(model, stats_a, stats_b, alpha, x, data.normalize, n, logits=logits)
        with torch.no_grad(), capture(model, [logits_module(model)]) as store:
            out = model(data.normalize(x)).double()
        torch.testing.assert_close(store[logits_module(model)].double(), out)  # hooks see them
        observed[logits] = out.mean(0), out.std(0)
    eps = 1e-5  # the rescaling divides by sqrt(var + eps)
    torch.testing.assert_close(observed[True][0], mean, rtol=1e-5, atol=1e-5 * float(std.mean()))
    torch.testing.assert_close(observed[True][1], std, rtol=eps / float(std.min()) ** 2 + 1e-5,
                               atol=1e-6)
    assert not torch.allclose(observed[False][1], std, rtol=0.05)
    assert not torch.allclose(observed[False][0], mean, rtol=0.05, atol=0.05 * float(std.mean()))
    with pytest.raises(KeyError, match="logits"):  # endpoint statistics without the logits
        repair(model, *(unit_statistics(m, x, data.normalize, n) for m in (a, b)), alpha, x,
               data.normalize, n, logits=True)

