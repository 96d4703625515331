"""Model stitching: a network stitched into itself is itself; a spawned pair stitches well and an
independent (naive) pair does not."""

import copy

import pytest
import torch

from lmcflow.models import build_model
from lmcflow.stitching import NONE, stitch_points, stitching
from conftest import sgd_train
from lmcflow.training import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data(mnist2k):
    return mnist2k


def net(arch, seed, **kw):
    torch.manual_seed(seed)
    return build_model(arch, (1, 28, 28), 10, **kw).eval()


@pytest.mark.parametrize("arch, kw", [("mlp", {"width": 32, "depth": 2}), ("lenet", {}),
                                      ("resnet20", {"width": 0.25, "norm": "bn"})])
def test_a_network_stitched_into_itself_is_itself(data, arch, kw):
    a = net(arch, 0, **kw)
    table = stitching(a, copy.deepcopy(a), data.test_x, data.test_y, data.normalize, 200,
                      log=lambda _: None)
    loss, error = evaluate(a, data.test_x, data.test_y, data.normalize, 200)
    assert set(table["layer"]) == {NONE, *stitch_points(a)} and len(table) == 2 * len(set(table.layer))
    assert (table["loss"] == loss).all() and (table["error"] == error).all()


def test_stitch_points_skip_activations_and_the_logits():
    assert stitch_points(net("mlp", 0, width=8, depth=2)) == ["fc1", "fc2"]
    assert stitch_points(net("lenet", 0)) == ["conv1", "conv2", "fc1", "fc2"]
    assert stitch_points(net("resnet20", 0, width=0.25))[:2] == ["stem", "layer1.0"]
    # llfc.first_feature: conv1, the official LLFC code's first stitch point of a ResNet
    assert stitch_points(net("resnet20", 0, width=0.25), "conv1")[:2] == ["stem.conv", "layer1.0"]
    assert stitch_points(net("mlp", 0, width=8, depth=2), "conv1") == ["fc1", "fc2"]


def test_a_network_stitched_into_itself_at_its_stem_conv_is_itself(data):
    """first_feature conv1: stitching the stem conv's output (before BatchNorm) of a network into
    itself changes nothing, and the conv1 rows replace the stem rows."""
    a = net("resnet20", 0, width=0.25, norm="bn")
    table = stitching(a, copy.deepcopy(a), data.test_x, data.test_y, data.normalize, 500,
                      log=lambda _: None, first_feature="conv1")
    loss, error = evaluate(a, data.test_x, data.test_y, data.normalize, 500)
    assert "stem.conv" in set(table.layer) and "stem" not in set(table.layer)
    assert (table["loss"] == loss).all() and (table["error"] == error).all()


def test_a_spawned_pair_stitches_with_a_small_error_increase_and_a_naive_pair_does_not(data):
    parent = sgd_train(net("mlp", 0, width=64, depth=2), data, epochs=1, seed=1)
    children = [sgd_train(copy.deepcopy(parent), data, epochs=2, seed=s) for s in (2, 3)]
    independent = [sgd_train(net("mlp", s, width=64, depth=2), data, epochs=3, seed=s) for s in (4, 5)]
    increase = {}
    for name, (a, b) in (("spawning", children), ("naive", independent)):
        t = stitching(a, b, data.test_x, data.test_y, data.normalize, 500, log=lambda _: None)
        own = t[t.layer == NONE].set_index("into")["error"]
        stitched = t[t.layer != NONE]
        increase[name] = (stitched["error"] - stitched["into"].map(own)).max()
    assert increase["spawning"] < 0.03, increase
    assert increase["naive"] > 0.3, increase
