"""Concatenations along a permuted dimension (issue 17, item 2): spec segments, the tracer's
cat/chunk/split/slicing rules, and the matching methods on a user's network with a residual
addition, a channel concatenation of two branches and a depthwise convolution.

A segment is a stretch of one axis that carries one group's units (``spec.segments``); the
permutation of such an axis is block-diagonal. Every model here is also checked end to end: a
random permutation through its traced spec keeps its outputs (``check_equivalence``).
"""

import copy
import dataclasses
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from conftest import sgd_train
from test_matching import assert_same_function, nontrivial_permutation

from lmcflow.alignment import (EquivalenceError, PermutationSpec, SpecWarning, activation_matching,
                               apply_permutation, check_equivalence, invert_permutation,
                               matching_objective, trace_spec, weight_matching)
from lmcflow.alignment.trace import summary
from lmcflow.interpolation import lmc_curve
from lmcflow.metrics import barrier

pytestmark = pytest.mark.usefixtures("one_thread")


def randomized(model, in_shape, seed=0):
    """Every tensor carries signal: random biases and norm affines, BatchNorm statistics from
    train-mode passes (at initialisation some torchvision models' outputs do not depend on
    their inputs, and a check on them would pass by accident)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen) + (name.endswith("weight")))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, *in_shape, generator=gen))
    return model.eval()


def assert_keeps_function(model, spec, x, seed=0):
    """A random permutation through the spec (every group moved) keeps the outputs, and the
    equivalence check agrees."""
    state = model.state_dict()
    perm = nontrivial_permutation(spec, seed)
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(spec, perm, state))
    with torch.no_grad():
        assert_same_function(model(x), other.eval()(x))
    assert check_equivalence(model, spec, x, seed=seed + 1)["groups"] == len(spec.sizes)


def assert_planted_recovered(spec, state_a, seed=2):
    pi = nontrivial_permutation(spec, seed)
    state_b = apply_permutation(spec, pi, state_a)
    perm, info = weight_matching(spec, state_a, state_b, seed=seed + 1)
    for g, p in perm.items():
        assert torch.equal(p, torch.argsort(pi[g])), g
    aligned = apply_permutation(spec, perm, state_b)
    assert all(torch.equal(aligned[k], state_a[k]) for k in state_a)
    assert info["objective"] == pytest.approx(matching_objective(spec, state_a, state_a),
                                              rel=1e-12)


# --- 1. the spec ---------------------------------------------------------------------------


def segmented_spec():
    """w (5, 7): rows P; columns Q (3), a fixed column, R (3). b (7, 6): rows the same
    stretches. v (2, 3, 8) viewed (6, 2, 4): its axis 2 is Q (3) and a fixed unit. c (5, 6):
    rows P."""
    return PermutationSpec(
        axes={"w": ("P", None), "b": (None, None), "v": (None, None, None), "c": ("P", None)},
        shapes={"w": (5, 7), "b": (7, 6), "v": (2, 3, 8), "c": (5, 6)},
        reshape={"v": (6, 2, 4)},
        segments={"w": {1: (("Q", 3), (None, 1), ("R", 3))},
                  "b": {0: (("Q", 3), (None, 1), ("R", 3))},
                  "v": {2: (("Q", 3), (None, 1))}})


def test_apply_permutation_with_segments_is_block_diagonal():
    spec = segmented_spec()
    assert spec.sizes == {"P": 5, "Q": 3, "R": 3}
    assert spec.groups == {"P": [("w", 0), ("c", 0)], "Q": [("w", 1), ("b", 0), ("v", 2)],
                           "R": [("w", 1), ("b", 0)]}
    assert spec.cost_keys == ("w", "b", "v", "c")
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) for k, s in spec.shapes.items()}
    perm = {"P": torch.tensor([4, 0, 3, 1, 2]), "Q": torch.tensor([2, 0, 1]),
            "R": torch.tensor([1, 2, 0])}
    out = apply_permutation(spec, perm, state)
    cols = torch.cat([perm["Q"], torch.tensor([3]), 4 + perm["R"]])  # block-diagonal
    torch.testing.assert_close(out["w"], state["w"][perm["P"]][:, cols], rtol=0, atol=0)
    torch.testing.assert_close(out["b"], state["b"][cols], rtol=0, atol=0)
    view = state["v"].reshape(6, 2, 4)[:, :, torch.cat([perm["Q"], torch.tensor([3])])]
    torch.testing.assert_close(out["v"], view.reshape(2, 3, 8), rtol=0, atol=0)
    # a group left out of the permutation stays; the inverse undoes it
    only_r = apply_permutation(spec, {"R": perm["R"]}, state)
    torch.testing.assert_close(only_r["w"], state["w"][:, torch.cat(
        [torch.arange(4), 4 + perm["R"]])], rtol=0, atol=0)
    back = apply_permutation(spec, invert_permutation(perm), out)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_spec_without_segments_is_unchanged_and_bad_segments_are_refused():
    plain = PermutationSpec({"w": ("P", None)}, {"w": (2, 3)})
    assert plain == PermutationSpec({"w": ("P", None)}, {"w": (2, 3)}, segments={})
    assert plain.segments == {} and plain.entries("w") == ("P", None)
    bad = [({"w": {1: (("Q", 2),)}}, "do not cover"),  # lengths do not sum to 3
           ({"w": {0: (("Q", 1), ("R", 1))}}, "not an unpermuted view axis"),  # axis has P
           ({"w": {1: ((None, 3),)}}, "without a group")]
    for segments, message in bad:
        with pytest.raises(ValueError, match=message):
            PermutationSpec({"w": ("P", None)}, {"w": (2, 3)}, segments=segments)
    with pytest.raises(ValueError, match="group Q has size"):
        PermutationSpec({"w": ("Q", None)}, {"w": (2, 3)}, segments={"w": {1: (("Q", 3),)}})


def test_weight_matching_counts_a_concatenated_axis_through_each_stretch():
    """The objective over a segmented spec equals the one over the same tensors cut into their
    stretches, and a planted permutation is recovered."""
    spec = segmented_spec()
    gen = torch.Generator().manual_seed(1)
    state_a = {k: torch.randn(s, generator=gen) for k, s in spec.shapes.items()}
    assert_planted_recovered(spec, state_a)


# --- 2. a user's network ---------------------------------------------------------------------


class UserNet(nn.Module):
    """A small CNN a user might write: a stem, a residual block, two branches concatenated
    along the channels (1x1 and 3x3), a depthwise conv over the concatenation, a 1x1 mix,
    global pooling and a linear head. Input (1, 28, 28), 10 classes."""

    def __init__(self, width=16):
        super().__init__()
        w = width
        self.stem, self.bn0, self.relu0 = nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), \
            nn.ReLU()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), \
            nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), \
            nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.a, self.bn_a, self.relu_a = nn.Conv2d(w, w, 1), nn.BatchNorm2d(w), nn.ReLU()
        self.b, self.bn_b, self.relu_b = nn.Conv2d(w, 2 * w, 3, padding=1), \
            nn.BatchNorm2d(2 * w), nn.ReLU()
        self.dw = nn.Conv2d(3 * w, 3 * w, 3, padding=1, groups=3 * w)
        self.bn_dw, self.relu_dw = nn.BatchNorm2d(3 * w), nn.ReLU()
        self.mix, self.bn_mix, self.relu_mix = nn.Conv2d(3 * w, 2 * w, 1), \
            nn.BatchNorm2d(2 * w), nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, 10)

    def forward(self, x):
        s = self.relu0(self.bn0(self.stem(x)))
        s = self.relu2(s + self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(s))))))
        s = self.pool(s)
        y = torch.cat([self.relu_a(self.bn_a(self.a(s))), self.relu_b(self.bn_b(self.b(s)))],
                      dim=1)
        y = self.relu_dw(self.bn_dw(self.dw(y)))
        y = self.relu_mix(self.bn_mix(self.mix(y)))
        return self.fc(torch.flatten(self.gap(y), 1))


def entries(spec, key):
    """Per view axis of ``key``: group, None or segments (read so that it works on specs from
    before segments too, to show what they left out)."""
    segments = getattr(spec, "segments", {}).get(key, {})
    return tuple(segments.get(d, g) for d, g in enumerate(spec.axes[key]))


def unpermuted_hidden_axes(model, spec):
    """Axes of size > 1 that carry hidden units but no group (kernel taps and the logits are
    not hidden units); a segmented axis counts if any stretch is fixed."""
    out = []
    for key, t in model.state_dict().items():
        view = spec.reshape.get(key, spec.shapes[key])
        for axis, (n, entry) in enumerate(zip(view, entries(spec, key))):
            if n == 1 or (t.ndim == 4 and axis >= 2) or (key.startswith("fc.") and axis == 0):
                continue
            if entry is None or isinstance(entry, tuple) and any(g is None for g, _ in entry):
                out.append(f"{key}[{axis}]")
    return out


def user_net(seed=0, width=8):
    torch.manual_seed(seed)
    return randomized(UserNet(width), (1, 28, 28), seed)


def test_user_net_has_every_hidden_unit_permuted_and_keeps_its_function():
    """Every hidden unit on a permuted axis; a random permutation through the spec keeps the
    outputs (and the equivalence check agrees); weight matching recovers a planted one."""
    model = user_net()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SpecWarning)
        spec = trace_spec(model, x)
    assert unpermuted_hidden_axes(model, spec) == []
    assert caught == []
    assert spec.sizes == {"P_stem": 8, "P_conv1": 8, "P_a": 8, "P_b": 16, "P_mix": 16}
    stretches = (("P_a", 8), ("P_b", 16))
    # the depthwise conv and its BN carry the concatenation through; mix reads it
    assert spec.segments == {"dw.weight": {0: stretches}, "dw.bias": {0: stretches},
                             **{f"bn_dw.{s}": {0: stretches} for s in
                                ("weight", "bias", "running_mean", "running_var")},
                             "mix.weight": {1: stretches}}
    assert spec.axes["conv2.weight"][0] == spec.axes["stem.weight"][0] == "P_stem"  # residual
    assert spec.features["P_a"] == ("relu_a",) and spec.features["P_b"] == ("relu_b",)
    assert_keeps_function(model, spec, x)
    assert check_equivalence(model, spec, x)["max_rel_error"] < 1e-5
    assert_planted_recovered(spec, model.state_dict())


@pytest.mark.parametrize("key,axis,stretches,group", [
    ("bn_dw.running_mean", 0, None, "P_a"),  # a BN statistic misses the concatenation
    ("mix.weight", 1, (("P_a", 8), (None, 16)), "P_b"),  # a consumer misses one branch
    ("dw.bias", 0, ((None, 8), ("P_b", 16)), "P_a"),  # a bias disagrees with its weight
])
def test_equivalence_check_names_a_tensor_whose_segments_are_wrong(key, axis, stretches, group):
    model = user_net()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecWarning)  # (the spec is tested above)
        spec = trace_spec(model, x)
    segments = {k: dict(v) for k, v in spec.segments.items()}
    if stretches is None:
        del segments[key][axis]
    else:
        segments[key][axis] = stretches
    broken = dataclasses.replace(spec, segments=segments, features={}, feature_dims={})
    with pytest.raises(EquivalenceError, match=key.replace(".", r"\.")) as e:
        check_equivalence(model, broken, x)
    assert e.value.key == key and e.value.group == group


def test_activation_matching_recovers_a_planted_permutation_of_the_user_net(tiny_data):
    """Every group has a feature module before the concatenation (the branch's ReLU); the
    concatenated outputs themselves are not read (their units are no single group)."""
    model = user_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecWarning)  # (the spec is tested above)
        spec = trace_spec(model, torch.zeros(1, 1, 28, 28))
    pi = nontrivial_permutation(spec, 5)
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(spec, pi, model.state_dict()))
    perm, info = activation_matching(model, other, spec, tiny_data, num_batches=2,
                                     batch_size=64)
    assert info["unmatched"] == []
    assert sorted(perm) == ["P_a", "P_b", "P_conv1", "P_mix", "P_stem"]
    for g, p in perm.items():
        assert torch.equal(p, torch.argsort(pi[g])), g


def test_weight_matching_lowers_the_barrier_of_the_user_net(tiny_data):
    """Two copies trained from different seeds on 256 mnist5k images: weight matching through
    the traced spec removes most of the loss barrier at alpha = 0.5 (train split, BN reset).
    Measured: naive 3.4, matched 0.75 with segments; with the concatenation left unpermuted
    (the old tracer) matching only reached 3.15."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(sgd_train(UserNet(16), tiny_data, epochs=30, seed=seed, lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecWarning)  # (the spec is tested above)
        spec = trace_spec(models[0], torch.zeros(1, 1, 28, 28))
    state_a, state_b = models[0].state_dict(), models[1].state_dict()
    perm, _ = weight_matching(spec, state_a, state_b, seed=0)
    matched = apply_permutation(spec, perm, state_b)
    loss_barrier = {}
    for name, b in (("naive", state_b), ("matched", matched)):
        curve = lmc_curve(UserNet(16), state_a, b, tiny_data, [0.0, 0.5, 1.0], bn="reset",
                          log=lambda *_: None)
        train = curve[curve.split == "train"]
        loss_barrier[name] = barrier(train.alpha, train.loss)
    assert loss_barrier["naive"] > 1.0  # the pair is far from linearly connected
    assert loss_barrier["matched"] < 0.5 * loss_barrier["naive"], loss_barrier


# --- 3. the tracer's rules ---------------------------------------------------------------------


class SplitBack(nn.Module):
    """cat of two branches, a BN over the concatenation, split back (uneven: 6 and 10) and
    each part read by its own conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 10, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c, self.d = nn.Conv2d(6, 5, 1), nn.Conv2d(10, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        s = F.relu(self.stem(x))
        y = F.relu(self.bn(torch.cat([self.a(s), self.b(s)], 1)))
        ya, yb = torch.split(y, [6, 10], dim=1)
        return self.fc((self.c(ya) + self.d(yb)).mean((2, 3)))


class Parts(nn.Module):
    """One conv's output cut unevenly into three parts (tensor.split with a list of sizes);
    narrow takes parts 1-2 whole, a slice of part 0 does not line up with the parts."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.p0, self.p12 = nn.Conv2d(3, 4, 1), nn.Conv2d(9, 4, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        parts = y.split([3, 4, 5], dim=1)
        z = self.p0(parts[0]) + self.p12(y.narrow(1, 3, 9))
        return self.fc(torch.cat([z, y[:, :2]], 1).mean((2, 3)))


class Gated(nn.Module):
    """A gate: one half of a conv's output multiplied by the sigmoid of the other half (the
    halves share one permutation); chunk of a cat returns its parts."""

    def __init__(self):
        super().__init__()
        self.conv, self.other = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.out = nn.Conv2d(10, 5, 1)
        self.fc = nn.Linear(5 + 4, 3)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        g = torch.cat([a * torch.sigmoid(b), torch.relu(self.other(x))], 1)  # 6 + 4
        u, v = g.chunk(2, dim=1)  # 5 and 5: cuts the first part
        y = torch.relu(self.out(torch.cat([u, v], 1)))
        return self.fc(torch.cat([y, torch.tanh(self.other(x))], 1).mean((2, 3)))


class Shuffle(nn.Module):
    """ShuffleNet-v2 units: chunk, a branch, cat, channel shuffle (view, transpose, view)."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        h = c // 2
        self.b1 = nn.Sequential(nn.Conv2d(h, h, 1), nn.ReLU(), nn.Conv2d(h, h, 1))
        self.b2 = nn.Sequential(nn.Conv2d(h, h, 1), nn.ReLU(), nn.Conv2d(h, h, 1))
        self.fc = nn.Linear(c, 3)

    @staticmethod
    def shuffle(x):
        b, c, h, w = x.shape
        return x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for branch in (self.b1, self.b2):
            x1, x2 = x.chunk(2, dim=1)
            x = self.shuffle(torch.cat([x1, branch(x2)], 1))
        return self.fc(x.mean((2, 3)))


class PackedHeads(nn.Module):
    """A packed q/k/v projection chunked into q, k, v, each split into heads."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.embed, self.qkv, self.proj = nn.Linear(5, dim), nn.Linear(dim, 3 * dim), \
            nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):  # (B, T, 5)
        h = self.embed(x)
        qkv = self.qkv(h).chunk(3, dim=-1)
        q, k, v = (qkv[i].unflatten(-1, (self.heads, -1)).transpose(1, 2) for i in range(3))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.head((h + self.proj(o)).mean(1))


class FlatCat(nn.Module):
    """Two conv maps flattened and concatenated into one Linear: (C1*H*W + C2*H*W) is the
    concatenation of the channels times the positions."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.fc1, self.fc2 = nn.Linear(10 * 16, 7), nn.Linear(7, 3)

    def forward(self, x):  # (B, 3, 4, 4)
        y = torch.cat([torch.relu(self.a(x)).flatten(1), torch.relu(self.b(x)).flatten(1)], 1)
        return self.fc2(torch.relu(self.fc1(y)))


class Repeated(nn.Module):
    """One branch concatenated twice around another: a group on two stretches of one axis."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.mix = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 3, padding=1), \
            nn.Conv2d(13, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        a, b = torch.relu(self.a(x)), torch.relu(self.b(x))
        return self.fc(torch.relu(self.mix(torch.cat([a, b, a], 1))).mean((2, 3)))


RULES = {  # name -> (model, input shape, groups; before segments: 2, 0, 0, 2, 3, 1, 0)
    "split_back": (SplitBack, (3, 8, 8), 4),
    "parts": (Parts, (3, 8, 8), 3),
    "gated": (Gated, (3, 6, 6), 3),
    "shuffle": (Shuffle, (3, 6, 6), 3),
    "packed_heads": (PackedHeads, (4, 5), 3),
    "flat_cat": (FlatCat, (3, 4, 4), 3),
    "repeated": (Repeated, (3, 6, 6), 3),
}


def rule_model(name):
    make, in_shape, _ = RULES[name]
    torch.manual_seed(0)
    model = randomized(make(), in_shape)
    x = torch.randn(3, *in_shape, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SpecWarning)
        spec = trace_spec(model, x)
    return model, x, spec, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", list(RULES))
def test_rules_keep_the_function_and_recover_a_planted_permutation(name):
    model, x, spec, _ = rule_model(name)
    assert len(spec.sizes) == RULES[name][2]
    assert_keeps_function(model, spec, x)
    assert_planted_recovered(spec, model.state_dict())


def test_split_back_returns_each_branch_its_units():
    _, _, spec, caught = rule_model("split_back")
    assert caught == []
    stretches = (("P_a", 6), ("P_b", 10))
    assert spec.segments == {f"bn.{s}": {0: stretches}
                             for s in ("weight", "bias", "running_mean", "running_var")}
    assert spec.axes["c.weight"][1] == "P_a" and spec.axes["d.weight"][1] == "P_b"


def test_uneven_split_narrow_and_a_slice_across_parts():
    """The conv's output becomes three parts, each its own group, except part 0, which a
    slice that does not line up with the parts fixes (with a warning naming it)."""
    _, _, spec, caught = rule_model("parts")
    assert spec.segments["conv.weight"] == {0: ((None, 3), ("P_conv.part1", 4),
                                                ("P_conv.part2", 5))}
    assert spec.axes["p0.weight"][1] is None
    assert spec.segments["p12.weight"] == {1: (("P_conv.part1", 4), ("P_conv.part2", 5))}
    assert len(caught) == 1 and "indexed by getitem" in caught[0] and "conv.weight[0]" in caught[0]


def test_gate_halves_share_one_permutation_and_chunk_cuts_parts():
    """The gate ties the two halves of conv's output; chunk(2) of (6 gated + 4) units cuts
    the gated units into 5 + 1 (a single unit has nothing to permute)."""
    _, _, spec, caught = rule_model("gated")
    assert caught == []
    gate = spec.segments["conv.weight"][0][0][0]
    assert spec.segments["conv.weight"] == {0: ((gate, 5), (None, 1), (gate, 5), (None, 1))}
    assert spec.segments["out.weight"] == {1: ((gate, 5), (None, 1), ("P_other", 4))}


def test_channel_shuffle_keeps_the_function_and_says_what_it_fixes():
    _, _, spec, caught = rule_model("shuffle")
    assert len(caught) == 1 and "channel shuffle" in caught[0]
    assert spec.axes["b1.0.weight"][0] is not None  # the branches' inner units stay


def test_packed_heads_share_the_projection_view():
    """q, k and v parts split into heads: one permutation of heads and one within a head
    for the three, the chunk index fixed: the spec chunk gave before concatenations were
    segments (a regression check; it passes on the old tracer too)."""
    _, _, spec, caught = rule_model("packed_heads")
    assert caught == []
    assert spec.reshape["qkv.weight"] == (3, 2, 4, 8)
    none, heads, within, stream = spec.axes["qkv.weight"]
    assert none is None and spec.sizes[heads] == 2 and spec.sizes[within] == 4
    assert spec.axes["proj.weight"] == (stream, heads, within)


def test_flattened_maps_concatenated_into_a_linear():
    _, _, spec, caught = rule_model("flat_cat")
    assert caught == []
    assert spec.reshape["fc1.weight"] == (7, 10, 16)
    assert spec.segments["fc1.weight"] == {1: (("P_a", 4), ("P_b", 6))}
    assert spec.axes["fc1.weight"] == ("P_fc1", None, None)


# --- 4. torchvision's concatenating classifiers -------------------------------------------------

TORCHVISION = {  # name -> (input size, keyword arguments)
    "squeezenet1_1": (64, {}),
    "densenet121": (64, {}),
    "inception_v3": (75, {"aux_logits": False, "init_weights": True}),
    "shufflenet_v2_x0_5": (64, {}),
}


def permuted_share(model, spec):
    """Share of the parameters in tensors with at least one permuted axis, and the tensors
    without one."""
    params = dict(model.named_parameters())
    fixed = [k for k in params if all(e is None for e in entries(spec, k))]
    return 1 - sum(params[k].numel() for k in fixed) / sum(p.numel() for p in params.values()), \
        fixed


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_concatenating_models(name):
    """Traced, equivalent, and (all but ShuffleNet) every parameter tensor but the logits'
    bias on a permuted axis. Share of the parameters on a permuted axis before segments:
    SqueezeNet 98.9 %, DenseNet-121 88.9 %, Inception-v3 81.7 %, ShuffleNet 95.7 %; after:
    99.999 % (the logits' bias) but ShuffleNet 95.7 %: its channel shuffle interleaves the
    two parts of every unit's concatenation, so the stream between units stays fixed (with a
    warning saying so)."""
    size, kwargs = TORCHVISION[name]
    torch.manual_seed(0)
    model = randomized(getattr(torchvision.models, name)(num_classes=10, **kwargs),
                       (3, size, size))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SpecWarning)
        spec = trace_spec(model, x)
    assert check_equivalence(model, spec, x)["max_rel_error"] < 1e-4
    share, fixed = permuted_share(model, spec)
    permuted, total = summary.permuted_share(spec, model)  # what the log and the zoo report
    assert permuted / total == pytest.approx(share, abs=1e-12)
    if name == "shufflenet_v2_x0_5":
        assert share > 0.95
        assert [str(w.message) for w in caught if "channel shuffle" not in str(w.message)] == []
    else:
        assert fixed == [list(dict(model.named_parameters()))[-1]] and not caught  # logits' bias
        assert share > 0.9999 and spec.segments
