"""Checks that cannot pass by accident, and one warning per model (issue 17, items 6 and 7).

check_equivalence: NaN or infinite outputs fail it; a wrong axis that the model's own weights
hide (a zero-initialised head, a zero bias, BatchNorm at its initial statistics) is found on a
perturbed copy of the weights; a model whose outputs cannot show any permutation says that it
could not check. trace_spec: one SpecWarning per model, a summary (groups, the permuted share
of the parameters, what stayed unpermuted grouped by reason), and none for structure such as
the q/k/v selector of a packed qkv.
"""

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from lmcflow.alignment import (EquivalenceError, SpecWarning, check_equivalence, permuted_share,
                               trace_spec)

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet_trace(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpecWarning)
        return trace_spec(model, x)


def without(spec, key, axis):
    """``spec`` with view axis ``axis`` of ``key`` left unpermuted."""
    axes = dict(spec.axes)
    axes[key] = tuple(None if i == axis else g for i, g in enumerate(axes[key]))
    return dataclasses.replace(spec, axes=axes, features={}, feature_dims={})


def inputs(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- NaN and infinite outputs ------------------------------------------------------------------


class Masked(nn.Module):
    """A unit the model masks out holds a NaN gain: harmless as long as the mask moves with it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 4), nn.Linear(4, 3)
        self.gain = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, float("nan")]))
        self.register_buffer("keep", torch.tensor([True, True, True, False]))

    def forward(self, x):
        h = torch.relu(self.fc1(x)) * self.gain
        return self.fc2(torch.where(self.keep, h, torch.zeros_like(h)))


def test_nan_after_permuting_fails_the_check():
    model, x = Masked(), inputs(4, 6)
    spec = quiet_trace(model, x)
    assert spec.axes["keep"] == spec.axes["gain"] == ("P_fc1",)
    assert check_equivalence(model, spec, x)["max_rel_error"] < 1e-6
    with pytest.raises(EquivalenceError, match="NaN or infinite") as e:
        check_equivalence(model, without(spec, "keep", 0), x)  # the NaN moves into a kept unit
    assert e.value.key == "keep" and e.value.error == float("inf")


def test_nan_outputs_of_the_model_fail_the_check():
    model, x = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)), inputs(4, 6)
    spec = quiet_trace(model, x)
    with torch.no_grad():
        model[0].bias[1] = float("nan")
    with pytest.raises(EquivalenceError, match=r"cannot check .*NaN"):
        check_equivalence(model, spec, x)
    with torch.no_grad():
        model[0].bias[1] = float("inf")
    with pytest.raises(EquivalenceError, match=r"cannot check .*infinite"):
        check_equivalence(model, spec, x)


# --- weights that hide a wrong axis ------------------------------------------------------------


def zero_head_mlp():
    """fc1 -> relu -> fc2 -> relu -> out with ``out.weight`` zero (as many model libraries
    initialise a classification head): every output is ``out.bias``."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(6, 8))
    model.add_module("relu1", nn.ReLU())
    model.add_module("fc2", nn.Linear(8, 8))
    model.add_module("relu2", nn.ReLU())
    model.add_module("out", nn.Linear(8, 3))
    nn.init.zeros_(model.out.weight)
    return model.eval()


def test_a_zero_initialised_head_cannot_hide_a_wrong_axis():
    model, x = zero_head_mlp(), inputs(4, 6)
    spec = quiet_trace(model, x)
    info = check_equivalence(model, spec, x)
    assert info["perturbed"] and info["max_rel_error"] < 1e-5
    with pytest.raises(EquivalenceError, match=r"on a perturbed copy.*fc2\.bias") as e:
        check_equivalence(model, without(spec, "fc2.bias", 0), x)
    assert e.value.key == "fc2.bias"
    assert torch.count_nonzero(model.out.weight) == 0  # the model itself is untouched


def test_without_perturbing_it_says_that_it_could_not_check():
    model, x = zero_head_mlp(), inputs(4, 6)
    spec = quiet_trace(model, x)
    with pytest.raises(EquivalenceError, match="cannot check .*same for every sample"):
        check_equivalence(model, spec, x, perturb=False)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_batchnorm_at_its_initial_statistics_cannot_hide_a_wrong_axis():
    """Running mean 0 and variance 1 are the same in every order: a spec that forgets them
    passes on the model as built, not on the perturbed copy."""
    torch.manual_seed(0)
    model, x = ConvBN().eval(), inputs(2, 3, 8, 8)
    spec = quiet_trace(model, x)
    for key in ("bn.running_mean", "bn.running_var"):
        with pytest.raises(EquivalenceError) as e:
            check_equivalence(model, without(spec, key, 0), x)
        assert e.value.key == key


class Deaf(nn.Module):
    """Outputs that do not depend on the input, whatever the weights."""

    def __init__(self):
        super().__init__()
        self.fc1, self.out = nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc1(x)) * 0)


def test_outputs_that_no_permutation_can_change_are_reported():
    model, x = Deaf(), inputs(4, 6)
    spec = quiet_trace(model, x)
    with pytest.raises(EquivalenceError, match="cannot check the spec of Deaf: its outputs are "
                                               "the same for every sample"):
        check_equivalence(model, without(spec, "fc1.bias", 0), x)
    bias_free = nn.Sequential(nn.Linear(6, 4, bias=False), nn.ReLU(), nn.Linear(4, 3, bias=False))
    spec = quiet_trace(bias_free, x)
    with pytest.raises(EquivalenceError, match="outputs are all zero"):
        check_equivalence(bias_free, spec, torch.zeros(1, 6), perturb=False)


# --- one summary warning per model -------------------------------------------------------------


class Block(nn.Module):
    """A pre-norm transformer block with a packed qkv, split timm-style: reshape to
    (B, T, 3, heads, d), move the q/k/v selector first, unbind it."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class PackedViT(nn.Module):
    def __init__(self, depth=12, dim=8, cumsum=False):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.Sequential(*(Block(dim) for _ in range(depth)))
        self.head = nn.Linear(dim, 3)
        self.cumsum = cumsum

    def forward(self, x):  # (B, T, 4)
        h = self.blocks(self.embed(x))
        if self.cumsum:  # an op the tracer does not know, in front of the head
            h = torch.cumsum(h, dim=-1)
        return self.head(h.mean(1))


def test_the_q_k_v_selector_of_a_packed_qkv_gives_no_warning():
    """Old tracer: one warning per block ("unbound by unbind"), twelve for twelve blocks."""
    torch.manual_seed(0)
    model, x = PackedViT(), inputs(2, 5, 4)
    spec = quiet_trace(model, x)
    assert spec.reshape["blocks.0.qkv.weight"] == (3, 2, 4, 8)
    assert spec.axes["blocks.0.qkv.weight"][0] is None  # the selector: structure, not units
    check_equivalence(model, spec, x)


def test_one_summary_warning_per_model_grouped_by_reason():
    torch.manual_seed(0)
    model, x = CumsumMLP(), inputs(2, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = trace_spec(model, x)
    messages = [str(w.message) for w in caught if issubclass(w.category, SpecWarning)]
    assert len(messages) == 1
    # fc1 (56) and fc2.weight (64) lie on P_fc1; fc2.bias (8) and fc3 (27) on no group
    assert permuted_share(spec, model) == (120, 155)
    assert messages[0] == (
        "CumsumMLP: 1 permutation group, 77.4% of the parameters (120 of 155) on a permuted "
        "axis; left unpermuted: unsupported cumsum at 2 places (e.g. 'cumsum' in 'block1'): "
        "3 tensor axes (fc2.weight[0], fc2.bias[0], fc3.weight[1])")


class Cumsum(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=-1)


class CumsumMLP(nn.Module):
    """fc1 -> relu -> fc2 -> cumsum (twice, in two submodules) -> fc3."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.block1, self.block2 = Cumsum(), Cumsum()

    def forward(self, x):
        return self.fc3(self.block2(self.block1(self.fc2(torch.relu(self.fc1(x))))))


def test_a_twelve_block_model_with_an_unknown_op_gives_one_warning():
    torch.manual_seed(0)
    model, x = PackedViT(cumsum=True), inputs(2, 5, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace_spec(model, x)
    messages = [str(w.message) for w in caught if issubclass(w.category, SpecWarning)]
    assert len(messages) == 1, messages
    assert messages[0].startswith("PackedViT: ")
    assert "unsupported cumsum at 'cumsum': " in messages[0]


class WithAux(nn.Module):
    """An auxiliary head that only training would use: never read by the eval forward pass."""

    def __init__(self):
        super().__init__()
        self.fc, self.out, self.aux = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)))


def test_parameters_the_forward_pass_never_reads_are_named():
    model = WithAux()
    with pytest.warns(SpecWarning, match=r"72\.7% of the parameters \(80 of 110\).*not read by "
                                         r"the traced forward pass: 2 tensors \(aux\.weight, "
                                         r"aux\.bias\)"):
        trace_spec(model, inputs(2, 6))


NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, in_shape, num_classes):
        super().__init__()
        self.fc1 = nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], 8)
        self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, num_classes)

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(x.flatten(1))))
        return self.fc3(torch.cumsum(h, dim=-1))
'''


def test_the_alignment_job_logs_the_summary_and_the_permuted_share(tmp_path):
    from lmcflow import jobs
    from lmcflow.pairs import METHODS

    (tmp_path / "zoo_cumsum_net.py").write_text(NET)
    spec = {"arch": "python:zoo_cumsum_net:Net", "args": {"path": str(tmp_path)},
            "in_shape": [1, 4, 4], "num_classes": 3}
    run = {"spec": spec, "model": jobs.build(spec, seed=0).state_dict()}
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpecWarning)  # it goes to the log, not to stderr
        METHODS["weight_matching"].align(run, run, {"matching": {"max_sweeps": 5, "seed": 0}},
                                         log=lines.append)
    assert lines[0].startswith("warning: Net: 1 permutation group, 85.1% of the parameters")
    assert "unsupported cumsum at 'cumsum': 3 tensor axes" in lines[0]
    assert lines[1].startswith("permutation spec: 1 groups, 85.1% of the parameters on a "
                               "permuted axis; a random permutation through it keeps the outputs")


@pytest.mark.parametrize("arch, kwargs, in_shape, groups", [
    ("timm:resnet10t", {}, (3, 32, 32), 10),
    ("timm:vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, (3, 32, 32), 7),
])
def test_timm_models_trace_quietly_into_specs_that_keep_the_function(arch, kwargs, in_shape, groups):
    """timm's ViT splits a packed qkv with unbind (one warning per block before the summary);
    its ResNet zero-initialises the last BatchNorm of every block (its weight hid wrong axes)."""
    pytest.importorskip("timm")
    from lmcflow.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, in_shape, 10, kwargs=kwargs).eval()
    spec = quiet_trace(model, torch.zeros(1, *in_shape))
    assert len(spec.sizes) == groups
    permuted, total = permuted_share(spec, model)
    assert total - permuted == 10  # all but the head's bias, whose only axis is the classes
    assert check_equivalence(model, spec, inputs(2, *in_shape))["max_rel_error"] < 1e-4

