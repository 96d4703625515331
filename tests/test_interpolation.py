"""lmcflow.interpolation: lerp of state dicts, BatchNorm reset, LMC curves."""

import numpy as np
import pytest
import torch
from torch import nn

from lmcflow.interpolation import (batchnorm_modules, lerp_state, lmc_curve, load_interpolated,
                                   reset_bn)
from lmcflow.data import load_dataset
from lmcflow.metrics import barrier
from lmcflow.models import build_model
from lmcflow.training import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 28, 28)


def mlp(seed):
    torch.manual_seed(seed)
    return build_model("mlp", SHAPE, 10, width=32, depth=2).eval()


def vgg(seed):
    torch.manual_seed(seed)
    return build_model("vgg", SHAPE, 10, width=0.125, batch_norm=True).eval()


def resnet(seed):
    torch.manual_seed(seed)
    return build_model("resnet20", SHAPE, 10, width=0.25, norm="bn").eval()


def scramble_bn(model, seed):
    """Give BN layers non-default running stats and counters (distinct per model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in batchnorm_modules(model):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(seed + 3)
    return model


# ----------------------------------------------------------------------------------- lerp_state


@pytest.fixture
def two_states():
    a, b = scramble_bn(vgg(0), 1).state_dict(), scramble_bn(vgg(1), 2).state_dict()
    assert any(not v.is_floating_point() for v in a.values())  # has num_batches_tracked
    return a, b


def test_lerp_endpoints_are_exact(two_states):
    a, b = two_states
    at1, at0 = lerp_state(a, b, 1.0), lerp_state(a, b, 0.0)
    assert at1.keys() == at0.keys() == a.keys()
    for k in a:
        assert torch.equal(at1[k], a[k]), k
        if a[k].is_floating_point():
            assert torch.equal(at0[k], b[k]), k
            assert at0[k].dtype == a[k].dtype


def test_lerp_midpoint_is_the_mean(two_states):
    a, b = two_states
    mid = lerp_state(a, b, 0.5)
    quarter = lerp_state(a, b, 0.25)
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(mid[k], (a[k] + b[k]) / 2, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(quarter[k], 0.25 * a[k] + 0.75 * b[k], rtol=1e-6, atol=1e-7)


def test_lerp_keeps_integer_buffers_of_a(two_states):
    a, b = two_states
    int_keys = [k for k in a if not a[k].is_floating_point()]
    assert int_keys and all(k.endswith("num_batches_tracked") for k in int_keys)
    for alpha in (0.0, 0.3, 1.0):
        out = lerp_state(a, b, alpha)
        for k in int_keys:
            assert out[k].dtype == a[k].dtype
            assert torch.equal(out[k], a[k]) and not torch.equal(out[k], b[k])
            assert out[k].data_ptr() != a[k].data_ptr()  # a copy, not A's tensor


def test_lerp_rejects_mismatched_keys(two_states):
    a, b = two_states
    b = dict(b)
    b["extra.weight"] = b.pop("out.weight")
    with pytest.raises(ValueError, match="extra.weight"):
        lerp_state(a, b, 0.5)


@pytest.mark.parametrize("build", [mlp, vgg, resnet])
def test_self_interpolation_computes_the_same_function(tiny_data, build):
    a = scramble_bn(build(0), 1)
    net = build(7)
    net.load_state_dict(lerp_state(a.state_dict(), a.state_dict(), 0.3))
    net.eval()
    x = tiny_data.normalize(tiny_data.test_x[:32])
    with torch.no_grad():
        assert torch.equal(net(x), a(x))


# -------------------------------------------------------------------------------------- reset_bn


@pytest.mark.parametrize("build, first_bn", [(vgg, "features.bn1"), (resnet, "stem.norm")])
def test_reset_bn_recomputes_statistics_of_the_data(tiny_data, build, first_bn):
    model = scramble_bn(build(0), 5)
    bns = batchnorm_modules(model)
    for i, m in enumerate(bns):
        m.momentum = 0.05 + 0.01 * i
    bn = dict(model.named_modules())[first_bn]
    assert bn is bns[0]
    inputs = []
    handle = bn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach().clone()))
    model.train()
    x = tiny_data.train_x  # 256 images: 4 equal batches of 64
    reset_bn(model, x, tiny_data.normalize, batch_size=64)
    handle.remove()

    assert len(inputs) == 4
    # the first BN's input does not depend on any BN, so it is the data's activation
    per_batch_mean = torch.stack([i.double().mean(dim=(0, 2, 3)) for i in inputs])
    per_batch_var = torch.stack([i.double().var(dim=(0, 2, 3), unbiased=True) for i in inputs])
    everything = torch.cat(inputs).double()
    torch.testing.assert_close(bn.running_mean.double(), everything.mean(dim=(0, 2, 3)),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_mean.double(), per_batch_mean.mean(0), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), per_batch_var.mean(0), rtol=1e-5,
                               atol=1e-6)
    for m in bns:
        assert m.num_batches_tracked.item() == 4
    assert [m.momentum for m in bns] == [0.05 + 0.01 * i for i in range(len(bns))]
    assert not any(m.training for m in model.modules())


def test_reset_bn_statistics_do_not_depend_on_the_stored_order():
    """mnist5k is stored sorted by class; read in that order, batches hold one or two classes
    and the BN variances are within-class ones. The reset reads a seeded shuffled order, so
    storing the same images in another order changes the statistics only by the sampling noise
    of which images share a batch (first BN: its mean exactly, up to float rounding)."""
    data = load_dataset("mnist5k")
    assert (np.diff(data.train_y.numpy()) >= 0).all()  # the premise: sorted by class
    restored = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(5))

    def stats(x, batch_size):
        model = vgg(0)
        reset_bn(model, x, data.normalize, batch_size=batch_size)
        return [(m.running_mean.double(), m.running_var.double()) for m in batchnorm_modules(model)]

    (m1, v1), (m2, v2) = stats(data.train_x, 200)[0], stats(data.train_x[restored], 200)[0]
    torch.testing.assert_close(m1, m2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v1, v2, rtol=1e-3, atol=1e-6)
    for (m1, v1), (m2, v2) in zip(stats(data.train_x, 1000), stats(data.train_x[restored], 1000)):
        torch.testing.assert_close(m1, m2, rtol=2e-2, atol=2e-2 * float(m1.abs().max()))
        torch.testing.assert_close(v1, v2, rtol=2e-2, atol=0)


def test_reset_bn_is_independent_of_previous_statistics(tiny_data):
    a, b = scramble_bn(vgg(0), 1), vgg(0)
    for model in (a, b):
        reset_bn(model, tiny_data.train_x, tiny_data.normalize, batch_size=64)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_reset_bn_without_batchnorm_changes_nothing(tiny_data):
    model = mlp(0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reset_bn(model, tiny_data.train_x, tiny_data.normalize, batch_size=64)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training  # untouched, not even put in eval mode


# ------------------------------------------------------------------------------------ lmc_curve

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def quiet(_msg):
    pass


def eval_splits(model, data, batch_size):
    return {split: evaluate(model, *data.split(split), data.normalize, batch_size)
            for split in ("train", "test")}


@pytest.mark.parametrize("bn", ["reset", "interpolate"])
def test_lmc_curve_rows_and_endpoints_mlp(tiny_data, bn):
    a, b = mlp(0), mlp(1)
    sa, sb = a.state_dict(), b.state_dict()
    curve = lmc_curve(mlp(9), sa, sb, tiny_data, ALPHAS, bn=bn, batch_size=100, log=quiet)
    assert list(curve.columns) == ["alpha", "split", "loss", "error"]
    assert len(curve) == 2 * len(ALPHAS)
    assert set(zip(curve.alpha, curve.split)) == {(al, s) for al in ALPHAS for s in ("train", "test")}
    for alpha, model in ((1.0, a), (0.0, b)):
        want = eval_splits(model, tiny_data, 100)
        for split in ("train", "test"):
            row = curve[(curve.alpha == alpha) & (curve.split == split)].iloc[0]
            assert (row.loss, row.error) == want[split], (alpha, split)
    # the endpoints differ and the midpoint is neither of them: the curve really interpolates
    test = curve[curve.split == "test"].set_index("alpha").loss
    assert test[0.0] != test[1.0] and test[0.5] not in (test[0.0], test[1.0])
    # the two endpoint states are not modified
    assert all(torch.equal(sa[k], v) for k, v in a.state_dict().items())


def test_lmc_curve_vgg_endpoints_with_interpolated_and_reset_bn(tiny_data):
    a, b = scramble_bn(vgg(0), 1), scramble_bn(vgg(1), 2)
    sa = {k: v.clone() for k, v in a.state_dict().items()}
    sb = {k: v.clone() for k, v in b.state_dict().items()}
    interp = lmc_curve(vgg(9), sa, sb, tiny_data, [0.0, 1.0], bn="interpolate", batch_size=128,
                       log=quiet)
    reset = lmc_curve(vgg(9), sa, sb, tiny_data, [0.0, 1.0], bn="reset", batch_size=128,
                      log=quiet)
    want_interp = eval_splits(a, tiny_data, 128)
    reset_bn(a, tiny_data.train_x, tiny_data.normalize, batch_size=128)
    want_reset = eval_splits(a, tiny_data, 128)
    assert want_interp != want_reset  # the reset matters for this model
    for curve, want in ((interp, want_interp), (reset, want_reset)):
        for split in ("train", "test"):
            row = curve[(curve.alpha == 1.0) & (curve.split == split)].iloc[0]
            assert (row.loss, row.error) == want[split]


@pytest.mark.parametrize("build, bn", [(mlp, "reset"), (vgg, "reset"), (vgg, "interpolate")])
def test_lmc_self_pair_is_flat(tiny_data, build, bn):
    s = scramble_bn(build(0), 1).state_dict()
    curve = lmc_curve(build(9), s, s, tiny_data, ALPHAS, bn=bn, batch_size=128, log=quiet)
    for split in ("train", "test"):
        part = curve[curve.split == split].sort_values("alpha")
        assert np.ptp(part.loss.to_numpy()) == 0.0
        assert abs(barrier(part.alpha, part.loss)) < 1e-12
        assert abs(barrier(part.alpha, part.error)) < 1e-12


def test_load_interpolated_rejects_unknown_bn_mode(tiny_data):
    s = mlp(0).state_dict()
    with pytest.raises(ValueError, match="bn must be"):
        load_interpolated(mlp(1), s, s, 0.5, tiny_data, bn="recompute")
