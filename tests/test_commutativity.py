"""Commutativity matching (lmcflow.alignment.commutativity, issue 20): a planted permutation is
recovered from the identity, the objective never increases, a self-pair stays at zero, and
the objective computed from the streamed moments equals the residual computed directly from
the captured inputs of A and π(B).
"""

import copy

import pytest
import torch
from torch import nn

from lmcflow.alignment import MATCHERS, apply_permutation, permutation_spec
from lmcflow.alignment.commutativity import commutativity_matching
from lmcflow.config import validate
from lmcflow.data import sample_order
from lmcflow.features import capture
from lmcflow.mechanisms import _apply, modules_of
from lmcflow.pairs import METHODS, PERMUTATION_METHODS

import test_matching as tm


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def model(arch, kwargs, seed=0, classes=tm.NUM_CLASSES):
    """tests/test_matching.make_model with ``classes`` outputs (He weights, random biases and
    norm affines, calibrated BN statistics)."""
    before, tm.NUM_CLASSES = tm.NUM_CLASSES, classes
    try:
        return tm.make_model(arch, kwargs, (1, 28, 28), seed=seed)
    finally:
        tm.NUM_CLASSES = before


RESNET = ("resnet20", {"width": 0.25, "norm": "bn"})
# 8 units, 10 classes: from the identity the descent finds the planted permutation of this MLP;
# 16- or 32-wide ones stop in a local minimum (module docstring of alignment.commutativity).
MLP = ("mlp", {"width": 8, "depth": 3})


def planted(arch, kwargs, classes, seed=4):
    a = model(arch, kwargs, classes=classes)
    spec = permutation_spec(a)
    pi = tm.nontrivial_permutation(spec, seed=seed)
    return a, tm.permuted_copy(a, spec, pi), spec, pi


@pytest.mark.parametrize("arch,kwargs,classes", [(*RESNET, tm.NUM_CLASSES), (*MLP, 10)],
                         ids=["resnet20", "mlp"])
def test_planted_permutation_recovered_from_the_identity(arch, kwargs, classes, tiny_data):
    a, b, spec, pi = planted(arch, kwargs, classes)
    b.train()  # read in eval mode, mode restored
    perm, info = commutativity_matching(a, b, spec, tiny_data, num_batches=2, batch_size=64)
    assert b.training and not a.training
    assert info["history"][0] > 0 and info["objective"] == 0.0
    assert info["unmatched"] == [] and info["skipped"] == []
    for g, p in perm.items():
        assert torch.equal(p, torch.argsort(pi[g])), g
    aligned = apply_permutation(spec, perm, b.state_dict())
    for key, value in a.state_dict().items():
        assert torch.equal(aligned[key], value), key


@pytest.mark.parametrize("arch,kwargs", [("mlp", {"width": 16, "depth": 2}), RESNET],
                         ids=["mlp", "resnet20"])
def test_objective_never_increases_and_is_the_residual_of_the_result(arch, kwargs, tiny_data):
    """Two different networks, started from a random permutation: J never increases, falls,
    and the final J is J evaluated afresh at the returned permutation."""
    a, b = model(arch, kwargs, seed=0), model(arch, kwargs, seed=1)
    spec = permutation_spec(a)
    start = tm.nontrivial_permutation(spec, seed=7)
    perm, info = commutativity_matching(a, b, spec, tiny_data, num_batches=2, batch_size=64,
                                        start=start, seed=3)
    history = info["history"]
    assert len(history) == info["sweeps"] + 1 and info["sweeps"] >= 2
    assert all(later <= earlier for earlier, later in zip(history, history[1:]))
    assert history[-1] < 0.9 * history[0]
    again, check = commutativity_matching(a, b, spec, tiny_data, num_batches=2, batch_size=64,
                                          start=perm, max_sweeps=0, seed=3)
    assert check["sweeps"] == 0 and all(torch.equal(again[g], perm[g]) for g in perm)
    assert check["objective"] == pytest.approx(info["objective"], rel=1e-9)


@pytest.mark.parametrize("arch,kwargs", [MLP, RESNET], ids=["mlp", "resnet20"])
def test_self_pair_stays_at_zero(arch, kwargs, tiny_data):
    a = model(arch, kwargs)
    spec = permutation_spec(a)
    perm, info = commutativity_matching(a, copy.deepcopy(a), spec, tiny_data, num_batches=2,
                                        batch_size=64)
    assert info["history"] == [0.0, 0.0] and info["sweeps"] == 1
    assert all(torch.equal(p, torch.arange(len(p))) for p in perm.values())


def direct_residual(a, b_aligned, x):
    """Σ over Linear/Conv2d layers of ‖(W_A − W_B)(H_A − H_B)‖² from the captured inputs of
    both networks, the conv as a conv (mechanisms._apply), in float64."""
    layers = modules_of(a, (nn.Linear, nn.Conv2d))
    mods_a, mods_b = dict(a.named_modules()), dict(b_aligned.named_modules())
    with torch.no_grad(), capture(a.eval(), layers, inputs=True) as h_a:
        a(x)
    with torch.no_grad(), capture(b_aligned.eval(), layers, inputs=True) as h_b:
        b_aligned(x)
    total = 0.0
    for n in layers:
        w = mods_a[n].weight.detach().double() - mods_b[n].weight.detach().double()
        total += float(_apply(mods_a[n], h_a[n].double() - h_b[n].double(), w).pow(2).sum())
    return total


@pytest.mark.parametrize("arch,kwargs", [("mlp", {"width": 16, "depth": 2}), RESNET,
                                         ("vgg", {"depth": 11, "batch_norm": True, "width": 0.125})],
                         ids=["mlp", "resnet20", "vgg"])
def test_objective_equals_the_direct_formula(arch, kwargs, tiny_data):
    """J at a random π from the moments (convs unfolded, streamed over two batches) equals
    Σ‖(W_A − P W_B Qᵀ)(H_A − Q H_B)‖² computed from the full inputs of A and π(B)."""
    a, b = model(arch, kwargs, seed=0), model(arch, kwargs, seed=1)
    spec = permutation_spec(a)
    pi = tm.nontrivial_permutation(spec, seed=9)
    _, info = commutativity_matching(a, b, spec, tiny_data, num_batches=2, batch_size=40,
                                     start=pi, max_sweeps=0, seed=5)
    x = tiny_data.normalize(tiny_data.train_x[sample_order(len(tiny_data.train_x), 5)[:80]])
    want = direct_residual(a, tm.permuted_copy(b, spec, pi), x)
    assert want > 0  # π(B) runs its own float32 forward pass: its inputs equal B's permuted
    assert info["objective"] == pytest.approx(want, rel=1e-6)  # up to float32 rounding


def test_registry_starts_from_weight_matching_and_lowers_its_residual(tiny_data):
    a, b = model("mlp", {"width": 32, "depth": 2}, seed=0), model("mlp", {"width": 32, "depth": 2}, seed=1)
    spec = permutation_spec(a)
    options = validate({"experiments": {"e": {"data": {"name": "mnist5k"}, "model": {"arch": "mlp"},
                                              "methods": ["commutativity_matching"],
                                              "matching": {"batches": 2, "batch_size": 64}}}}
                       )["experiments"]["e"]["matching"]
    assert options["commutativity_start"] == "weight"
    first, _ = MATCHERS["weight"].match(spec, a, b, options, lambda: tiny_data, "cpu", None)
    _, at_weight = commutativity_matching(a, b, spec, tiny_data, 2, 64, start=first,
                                          max_sweeps=0)
    perm, info = MATCHERS["commutativity"].match(spec, a, b, options, lambda: tiny_data, "cpu",
                                                 None)
    assert info["start"] == "weight"
    assert info["start_objective"] == pytest.approx(at_weight["objective"], rel=1e-12)
    assert info["objective"] < info["start_objective"]
    assert "commutativity_matching" in PERMUTATION_METHODS
    assert METHODS["commutativity_matching"].endpoints(0, 1) == METHODS["weight_matching"].endpoints(0, 1)


@pytest.mark.parametrize("arch,kwargs", [("mlp", {"width": 16, "depth": 2}), RESNET],
                         ids=["mlp", "resnet20"])
def test_linear_model_of_a_step_is_exact_on_rows_and_bounds_on_inputs(arch, kwargs, tiny_data):
    """Per layer and group, against J_ℓ at random relative permutations R of the group: where
    the group permutes the layer's output rows, J_ℓ(R) − J_ℓ(I) = ⟨G, R − I⟩ exactly; where
    it permutes the layer's input, ⟨G, R − I⟩ bounds it from below (J is the square of a
    residual affine in R there) and ⟨G + prox, R − I⟩ from above (the majoriser)."""
    from lmcflow.alignment import commutativity as c

    a, b = model(arch, kwargs, seed=0), model(arch, kwargs, seed=1)
    spec = permutation_spec(a)
    x = tiny_data.train_x[:32]
    layers = c._moments(a, b, spec, c._objective_layers(a, spec, None)[0], x,
                        tiny_data.normalize, 32, "cpu", None)
    perm = tm.nontrivial_permutation(spec, seed=7)
    gen = torch.Generator().manual_seed(0)
    rows = inputs = 0
    for layer in layers:
        j0 = c._layer_objective(layer, perm)
        tol = 1e-9 * (j0 + layer.norm_a * float(layer.saa.trace()))  # rounding of the terms
        for g in sorted(layer.groups):
            grad, prox = c._gradient(layer, perm, g)
            n = len(perm[g])
            on_rows = g in layer.axes[:layer.split]
            model_ = grad if on_rows else grad + prox
            for _ in range(10):
                r = torch.randperm(n, generator=gen)
                j = c._layer_objective(layer, dict(perm, **{g: perm[g][r]}))
                change = float(model_[torch.arange(n), r].sum() - model_.trace())
                if on_rows:
                    assert j - j0 == pytest.approx(change, rel=1e-9, abs=tol), (layer.module, g)
                else:  # J = ‖E(R)‖² with E affine in R: the linearisation is a lower bound
                    linear = float(grad[torch.arange(n), r].sum() - grad.trace())
                    assert linear - tol <= j - j0 <= change + tol, (layer.module, g)
            rows, inputs = rows + on_rows, inputs + (not on_rows)
    assert rows and inputs
