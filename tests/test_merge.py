"""Merging many models (lmcflow.alignment.merge): K = 2 is pair alignment, planted permutations
are recovered, a self-merge changes nothing; the config refuses k < 2."""

import pytest
import torch

from lmcflow.alignment import (apply_permutation, identity_permutation, permutation_spec,
                               random_permutation, weight_matching)
from lmcflow.alignment.merge import average_states, merge_many
from lmcflow.data import Data, MNIST_MEAN, MNIST_STD
from lmcflow.models import build_model, feature_layers


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _mlp(seed, width=32):
    torch.manual_seed(seed)
    return build_model("mlp", (1, 8, 8), 10, width=width, depth=2)


def _data(n=64, seed=0) -> Data:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return Data("toy", x, y, x, y, MNIST_MEAN, MNIST_STD, 10)


def _equal(p, q):
    return p.keys() == q.keys() and all(torch.equal(p[g], q[g]) for g in p)


@pytest.mark.parametrize("init", ["anchor", "identity"])
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_two_runs_is_pair_alignment(scale, init):
    """B's scale changes nothing in the pair matching of B to A; a merge that let run i's own
    weights into its target (the average of the *others*) would be pulled to the identity."""
    a, b = _mlp(0), _mlp(1)
    spec = permutation_spec(a)
    sa, sb = a.state_dict(), {k: scale * v for k, v in b.state_dict().items()}
    aligned, perms, info = merge_many(spec, [sa, sb], "weight", {"max_sweeps": 100, "seed": 0},
                                      init=init)
    pair, _ = weight_matching(spec, sa, sb, max_sweeps=100, seed=0)
    assert _equal(perms[0], identity_permutation(spec))
    assert _equal(perms[1], pair)
    assert not _equal(pair, identity_permutation(spec))  # the test means something
    assert all(torch.equal(aligned[0][k], sa[k]) for k in sa)
    expected = apply_permutation(spec, pair, sb)
    assert all(torch.equal(aligned[1][k], expected[k]) for k in sb)
    assert info["converged"] and info["changed"][-1] == 0
    assert info["passes"] == (1 if init == "anchor" else 2)


@pytest.mark.parametrize("k", [3, 4])
def test_planted_permutations_are_recovered(k):
    """K permuted copies of one network: the merged average computes what the original does."""
    model = _mlp(0)
    spec = permutation_spec(model)
    state = model.state_dict()
    g = torch.Generator().manual_seed(3)
    planted = [random_permutation(spec, g) for _ in range(k - 1)]
    states = [state] + [apply_permutation(spec, p, state) for p in planted]
    aligned, perms, info = merge_many(spec, states, "weight", {"max_sweeps": 100, "seed": 0},
                                      seed=1)
    assert info["converged"]
    for s in aligned:
        assert all(torch.allclose(s[key], state[key]) for key in state)
    merged = _mlp(5)
    merged.load_state_dict(average_states(aligned))
    x = torch.randn(16, 1, 8, 8)
    assert torch.allclose(merged(x), model(x), atol=1e-5)
    # the unaligned average is another function (the test would notice a merge that did nothing)
    merged.load_state_dict(average_states(states))
    assert not torch.allclose(merged(x), model(x), atol=1e-2)


@pytest.mark.parametrize("matcher", ["weight", "activation", "commutativity"])
def test_self_merge_changes_nothing(matcher):
    model = _mlp(0)
    spec = permutation_spec(model)
    state = model.state_dict()
    data = _data()
    options = {"max_sweeps": 100, "seed": 0, "batches": 1, "batch_size": 64,
               "cost": "correlation", "residual": "pooled", "commutativity_start": "weight",
               "commutativity_cycles": 8}

    def prepare(s):
        m = _mlp(9)
        m.load_state_dict(s)
        return m.eval()

    aligned, perms, info = merge_many(spec, [state] * 3, matcher, options, prepare=prepare,
                                      data=lambda: data)
    assert info["passes"] == 1 and info["changed"] == [0, 0]
    for p, s in zip(perms, aligned):
        assert _equal(p, identity_permutation(spec))
        assert all(torch.equal(s[key], state[key]) for key in state)


def test_activation_merge_recovers_planted():
    model = _mlp(0)
    spec = permutation_spec(model)
    state = model.state_dict()
    g = torch.Generator().manual_seed(4)
    planted = [random_permutation(spec, g) for _ in range(2)]
    states = [state] + [apply_permutation(spec, p, state) for p in planted]
    data = _data(256)

    def prepare(s):
        m = _mlp(9)
        m.load_state_dict(s)
        return m.eval()

    options = {"max_sweeps": 100, "seed": 0, "batches": 1, "batch_size": 256,
               "cost": "correlation", "residual": "pooled"}
    aligned, _, info = merge_many(spec, states, "activation", options, prepare=prepare,
                                  data=lambda: data)
    assert info["converged"]
    for s in aligned:
        assert all(torch.allclose(s[key], state[key]) for key in state)


def test_one_run_is_refused():
    model = _mlp(0)
    with pytest.raises(ValueError, match="at least 2"):
        merge_many(permutation_spec(model), [model.state_dict()])


# ------------------------------------------------------------- evaluation, config, figure


def _build():
    return _mlp(9)


@pytest.mark.parametrize("bn", ["interpolate", "repair"])
def test_merged_planted_copies_evaluate_as_the_original(bn):
    """Three permuted copies: after weight MergeMany the average's error is the original's and
    the K-way LLFC is exact (1 − cos = 0, c = 1); unaligned it is not."""
    from lmcflow.merging import evaluate_merge, merge_runs

    model = _mlp(0)
    spec = permutation_spec(model)
    state = model.state_dict()
    g = torch.Generator().manual_seed(5)
    states = [state] + [apply_permutation(spec, random_permutation(spec, g), state)
                        for _ in range(2)]
    data = _data(128)
    layers = feature_layers(model)
    samples = torch.arange(32).numpy()
    aligned, info = merge_runs(spec, _build, states, "weight", {"max_sweeps": 100, "seed": 0},
                               data)
    table = evaluate_merge(_build, aligned, data, samples, layers, bn, batch_size=16)
    ev = table[table["kind"] == "evaluation"].set_index(["split", "model"])
    for split in ("train", "test"):
        assert ev.loc[(split, "average"), "error"] == pytest.approx(ev.loc[(split, "members"), "error"])
        assert ev.loc[(split, "average"), "loss"] == pytest.approx(ev.loc[(split, "members"), "loss"],
                                                                    rel=1e-4)
    ft = table[table["kind"] == "features"]
    assert len(ft) == len(layers)
    assert ft["one_minus_cos"].abs().max() < 1e-6
    # REPAIR rescales with its own estimate of the statistics (and an epsilon): c within 1e-3
    assert ft["coef_c"].to_numpy() == pytest.approx(1.0, abs=1e-5 if bn != "repair" else 1e-3)
    unaligned, _ = merge_runs(spec, _build, states, "none", {}, data)
    ft = evaluate_merge(_build, unaligned, data, samples, layers, bn, batch_size=16)
    assert ft.loc[ft["kind"] == "features", "one_minus_cos"].max() > 1e-3


def _config(merge):
    return {"experiments": {"m": {"model": {"arch": "mlp", "width": 16, "depth": 1},
                                  "merge": merge}}}


def test_schema_refuses_k_below_two_and_is_off_by_default():
    from lmcflow.config import ConfigError, merge_runs, validate

    with pytest.raises(ConfigError, match="merge"):
        validate(_config({"k": [1, 3]}))
    e = validate({"experiments": {"m": {"model": {"arch": "mlp", "width": 16, "depth": 1}}}}
                 )["experiments"]["m"]
    assert e["merge"]["k"] == [] and merge_runs(e) == []
    e = validate(_config({"k": [2, 4]}))["experiments"]["m"]
    assert e["merge"]["methods"] == ["none", "weight", "activation"]
    assert merge_runs(e) == ["seed0", "seed1", "seed2", "seed3"]


def test_fig19_draws_and_fits_a_page(tmp_path):
    import pandas as pd

    from lmcflow.figures import FIGURES, PAGE_HEIGHT, PAGE_WIDTH

    rows = []
    for method in ("none", "weight", "activation"):
        for k in (2, 3, 4, 5):
            for bn in ("reset", "repair"):
                for model in ("average", "members", "ensemble"):
                    rows.append({"experiment": "mlp", "method": method, "k": k, "bn": bn,
                                 "kind": "evaluation", "split": "test", "model": model,
                                 "loss": 0.1, "error": 0.02 * k})
                for i in range(3):
                    rows.append({"experiment": "mlp", "method": method, "k": k, "bn": bn,
                                 "kind": "features", "layer": f"fc{i}", "layer_index": i,
                                 "one_minus_cos": 0.01 * k})
    out = tmp_path / "fig19.pdf"
    FIGURES["fig19"](pd.DataFrame(rows), out)
    assert out.exists() and out.with_suffix(".png").exists()
    import matplotlib.pyplot as plt

    from lmcflow.figures import PNG_DPI

    png = plt.imread(out.with_suffix(".png"))
    assert png.shape[1] <= PAGE_WIDTH * PNG_DPI + 1 and png.shape[0] <= PAGE_HEIGHT * PNG_DPI + 1


def test_kway_llfc_is_against_the_mean_of_the_runs_features():
    """Three different runs (no BatchNorm, policy interpolate): the features rows equal 1 − cos
    between f(average) and the mean of the three runs' features, computed here directly."""
    from lmcflow.finetune import compare
    from lmcflow.merging import evaluate_merge

    states = [_mlp(s).state_dict() for s in range(3)]
    model = _mlp(0)
    layers = feature_layers(model)
    data = _data(64)
    samples = torch.arange(24).numpy()
    table = evaluate_merge(_build, states, data, samples, layers, "interpolate", batch_size=24)
    ft = table[table["kind"] == "features"].set_index("layer")
    from lmcflow.features import capture

    x = data.normalize(data.test_x[:24])
    feats = []
    for s in [average_states(states), *states]:
        m = _build()
        m.load_state_dict(s)
        with capture(m.eval(), layers) as store:
            m(x)
        feats.append(dict(store))
    for layer in layers:
        mean = torch.stack([f[layer].double() for f in feats[1:]]).mean(0)
        want = compare(feats[0][layer], mean)["one_minus_cos"].mean()
        assert ft.loc[layer, "one_minus_cos"] == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_kway_repair_targets_the_mean_of_the_runs_statistics():
    """REPAIR of a K-way average: every unit's mean and std become the mean over the K runs of
    theirs (not one run's)."""
    from lmcflow.merging import _policy_networks
    from lmcflow.repair import unit_statistics

    states = [_mlp(s).state_dict() for s in range(3)]
    data = _data(256)
    average, members = _policy_networks(_build, states, data, "repair", 256, "cpu", False)
    stats = [unit_statistics(m, data.train_x, data.normalize, 256) for m in members]
    got = unit_statistics(average, data.train_x, data.normalize, 256)
    for key in got:
        for j in (0, 1):
            target = torch.stack([s[key][j] for s in stats]).mean(0)
            assert torch.allclose(got[key][j], target, rtol=1e-3, atol=1e-4), key


def test_weight_merge_of_different_runs_never_lowers_its_objective_and_ends():
    states = [_mlp(s, width=64).state_dict() for s in range(5)]
    spec = permutation_spec(_mlp(0, width=64))
    _, _, info = merge_many(spec, states, "weight", {"max_sweeps": 100, "seed": 0},
                            max_passes=30)
    passes = info["objective"][1:]  # after the initial alignment to run 0
    assert info["converged"], info
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(passes, passes[1:])), passes
