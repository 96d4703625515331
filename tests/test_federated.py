"""Federated averaging: one client is plain training, averaging identical clients is the
identity, the layer subset leaves the other layers alone, shards partition the split and follow
β, aligned averaging undoes permutations, and a killed run resumes to the same weights."""

import copy
import dataclasses
from dataclasses import replace

import pandas as pd
import pytest
import torch

from lmcflow.config import ConfigError, TrainSetting, validate
from lmcflow.startup import check as check_config
from lmcflow.federated import (aggregate, averaged_keys, client_noise_seed, final_files,
                               kept_path, label_entropy, make_shards, run_federated,
                               weighted_average)
from lmcflow.alignment import apply_permutation, permutation_spec, random_permutation
from lmcflow.models import build_model
from lmcflow.training import lr_at, lr_at_step, make_optimizer, train_epoch

# momentum, weight decay, augmentation and a cosine schedule: every piece of optimizer state
SETTING = TrainSetting(epochs=2, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                       schedule="cosine", augment=True)


def mlp(seed=0, width=32):
    torch.manual_seed(seed)
    return build_model("mlp", (1, 28, 28), 10, width=width, depth=2)


def fed(**kw):
    return {"clients": 3, "shards": "iid", "beta": 0.5, "min_shard": 1, "local_epochs": 1,
            "layers": ["fc1"], "keep_rounds": [0, 1], "bn": "average", **kw}


def equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def test_one_client_is_plain_training_bit_for_bit(tiny_data, tmp_path):
    """K = 1, E = 1: every round is one epoch of plain training (the shard is the whole split in
    its order; its average is itself), optimizer state carried across rounds."""
    out = run_federated(mlp(), tiny_data, SETTING, fed(clients=1), "full", seed=3,
                        ckpt_dir=tmp_path, meta={}, log=lambda m: None)
    model = mlp()
    opt = make_optimizer(model, SETTING)
    for epoch in range(SETTING.epochs):
        train_epoch(model, opt, tiny_data, SETTING, epoch, client_noise_seed(3, 0), "cpu")
        kept = torch.load(kept_path(tmp_path, epoch + 1), weights_only=True)
        assert equal_states(kept["clients"][0], model.state_dict())
        assert equal_states(kept["global"], model.state_dict())
    assert equal_states(out["clients"][0], model.state_dict())


def test_full_averaging_of_identical_clients_changes_nothing(tiny_data):
    state = mlp().state_dict()
    sizes = [100, 37, 3, 1]  # unequal weights: the float64 sum is exact, the division too
    avg = weighted_average([state] * 4, sizes, list(state))
    assert equal_states(avg, state)
    clients = [mlp() for _ in sizes]
    opts = [make_optimizer(c, SETTING) for c in clients]
    glob = aggregate(clients, opts, [c.state_dict() for c in clients], sizes, state, "full",
                     averaged_keys(clients[0], "full"))
    assert equal_states(glob, state)
    assert all(equal_states(c.state_dict(), state) for c in clients)


def test_layers_aggregation_leaves_the_other_layers_of_every_client_untouched():
    clients = [mlp(seed) for seed in range(3)]
    local = [copy.deepcopy(c.state_dict()) for c in clients]
    opts = [make_optimizer(c, SETTING) for c in clients]
    sizes = [5, 3, 2]
    keys = averaged_keys(clients[0], "layers", ["fc1", "out"])
    assert keys == ["fc1.weight", "fc1.bias", "out.weight", "out.bias"]
    glob = aggregate(clients, opts, local, sizes, local[0], "layers", keys)
    full = weighted_average(local, sizes, list(local[0]))
    assert equal_states(glob, full)  # the global model averages every tensor
    for client, own in zip(clients, local):
        now = client.state_dict()
        for key in now:
            want = full[key] if key in keys else own[key]
            assert torch.equal(now[key], want), key
        assert not torch.equal(now["fc2.weight"], full["fc2.weight"])


def test_bn_local_keeps_running_statistics_and_num_batches_tracked_is_never_averaged():
    torch.manual_seed(0)
    model = build_model("vgg", (1, 28, 28), 10, depth=11, width=0.0625)
    keys = averaged_keys(model, "full", bn="local")
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in keys)
    assert any(k.endswith("running_mean") for k in averaged_keys(model, "full"))
    assert not any(k.endswith("num_batches_tracked") for k in averaged_keys(model, "full"))


def test_aligned_averaging_undoes_permutations_of_the_global_model():
    """Clients that are permuted copies of the global model: aligned averaging gives the global
    model back exactly (each client is matched onto it first); plain averaging does not."""
    base = mlp(width=16)
    spec = permutation_spec(base)
    glob = base.state_dict()
    gen = torch.Generator().manual_seed(1)
    local = [apply_permutation(spec, random_permutation(spec, gen), glob) for _ in range(3)]
    keys = averaged_keys(base, "aligned")
    for aggregation, exact in (("aligned", True), ("full", False)):
        clients = [mlp(width=16) for _ in local]
        for c, st in zip(clients, local):
            c.load_state_dict(st)
        opts = [make_optimizer(c, SETTING) for c in clients]
        for c, o in zip(clients, opts):  # momentum = the client's own (permuted) weights
            for p in c.parameters():
                o.state[p]["momentum_buffer"] = p.detach().clone()
        new = aggregate(clients, opts, local, [4, 4, 4], glob, aggregation, keys, spec,
                        log=lambda m: None)
        assert equal_states(new, glob) == exact, aggregation
        if exact:  # the momentum was permuted with its weights: now the global model's
            for c, o in zip(clients, opts):
                for name, p in c.named_parameters():
                    assert torch.equal(o.state[p]["momentum_buffer"], glob[name]), name


def test_shards_partition_the_training_split_and_follow_beta(tiny_data):
    y = tiny_data.train_y
    for kind, beta in (("iid", 0.5), ("dirichlet", 0.1), ("dirichlet", 10.0)):
        shards = make_shards(y, 4, kind, beta, seed=0, min_size=1)
        everything = torch.cat(shards)
        assert len(everything) == len(y) and torch.equal(everything.sort().values, torch.arange(len(y)))
        assert all(torch.equal(s, s.sort().values) for s in shards)
    sizes = [len(s) for s in make_shards(y, 4, "iid")]
    assert max(sizes) - min(sizes) <= 1
    assert torch.equal(make_shards(y, 1, "iid")[0], torch.arange(len(y)))
    entropy = {beta: sum(label_entropy(y, s, 10) for s in make_shards(y, 4, "dirichlet", beta, 0))
               for beta in (0.05, 0.5, 50.0)}
    assert entropy[0.05] < entropy[0.5] < entropy[50.0]
    again = make_shards(y, 4, "dirichlet", 0.5, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(again, make_shards(y, 4, "dirichlet", 0.5, 0)))
    with pytest.raises(ValueError, match="clients"):
        make_shards(y, 1000, "dirichlet", 0.5)


@pytest.mark.parametrize("aggregation", ["layers", "aligned"])
def test_a_killed_run_resumes_to_the_same_final_weights(tiny_data, tmp_path, aggregation):
    s = replace(SETTING, epochs=4)
    setting = fed(local_epochs=2 if aggregation == "aligned" else 1, keep_rounds=[0, 1])
    kw = dict(seed=0, meta={"run": aggregation}, log=lambda m: None)
    whole = run_federated(mlp(), tiny_data, s, setting, aggregation, ckpt_dir=tmp_path / "a", **kw)
    first = run_federated(mlp(), tiny_data, s, setting, aggregation, ckpt_dir=tmp_path / "b",
                          stop_round=1, **kw)
    assert first["round"] == 1
    messages = []
    kw["log"] = messages.append
    resumed = run_federated(mlp(5), tiny_data, s, setting, aggregation, ckpt_dir=tmp_path / "b", **kw)
    assert any("resuming at round 1" in m for m in messages)
    assert pd.DataFrame(resumed["rows"]).equals(pd.DataFrame(whole["rows"]))  # NaN = NaN
    for got, want in zip(resumed["clients"], whole["clients"]):
        assert equal_states(got, want)
    for got, want in zip(resumed["optimizers"], whole["optimizers"]):
        for i in want["state"]:
            assert torch.equal(got["state"][i]["momentum_buffer"], want["state"][i]["momentum_buffer"])
    spec = {"arch": "mlp"}
    files = {d: final_files(r, tmp_path / d, {}, spec, setting["keep_rounds"])
             for d, r in (("a", whole), ("b", resumed))}
    assert set(files["a"]) == {"client0", "client1", "client2", "global"}
    for name, f in files["a"].items():
        assert equal_states(files["b"][name]["model"], f["model"])
        assert sorted(f["history"]) == [0, 1] and f["epoch"] == whole["round"]
    # clients differ before the aggregation and start from the same initialisation
    assert not equal_states(files["a"]["client0"]["model"], files["a"]["client1"]["model"])
    assert equal_states(files["a"]["client0"]["history"][0], files["a"]["client1"]["history"][0])


def test_warmup_is_linear_per_step_then_the_schedule(tiny_data):
    s = replace(SETTING, warmup_steps=6, schedule="constant")  # 4 batches an epoch on 256 samples
    assert [lr_at_step(s, 0, t) for t in range(3)] == pytest.approx([s.lr / 6, 2 * s.lr / 6, s.lr / 2])
    assert lr_at_step(s, 1, 5) == s.lr == lr_at_step(s, 1, 7) == lr_at(s, 1)
    seen = []
    model = mlp()
    opt = make_optimizer(model, s)
    step = opt.step
    opt.step = lambda: (seen.append(opt.param_groups[0]["lr"]), step())
    for epoch in range(2):
        train_epoch(model, opt, tiny_data, s, epoch, 0, "cpu")
    assert seen == [lr_at_step(s, t // 4, t) for t in range(8)]


TINY = {"model": {"arch": "mlp", "width": 16, "depth": 2}, "train": {"epochs": 4},
        "methods": ["federated_full", "federated_layers"],
        "federated": {"clients": 4, "local_epochs": 2, "layers": ["fc1"]}}


@pytest.mark.parametrize("patch, key, words", [
    ({"federated": {"local_epochs": 3}}, "federated.local_epochs", ["divide", "train.epochs"]),
    ({"federated": {"layers": ["fc7"]}}, "federated.layers", ["'fc7'", "fc1"]),
    ({"federated": {"layers": []}}, "federated.layers", ["federated_layers"]),
    ({"federated": {"clients": 401, "shards": "dirichlet"}}, "federated.clients", ["400"]),
    ({"federated": {"keep_rounds": [3]}}, "federated.keep_rounds", ["2 rounds"]),
])
def test_bad_federated_settings_are_refused_at_start_up(patch, key, words):
    exp = copy.deepcopy(TINY)
    for section, values in patch.items():
        exp[section] = {**exp[section], **values}
    with pytest.raises(ConfigError) as err:
        check_config({"experiments": {"f": exp}})  # what the workflow runs at start-up
    assert f"config key experiments.f.{key}" in str(err.value)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_a_good_federated_config_validates():
    validate({"experiments": {"f": copy.deepcopy(TINY)}})
    iid = copy.deepcopy(TINY)
    iid["federated"]["clients"] = 1000  # only non-IID shards need every class on every client
    validate({"experiments": {"f": iid}})


@pytest.mark.slow
def test_a_tiny_federated_config_runs_to_its_figures(tmp_path):
    """The workflow end to end: federated runs (IID full and layers, aligned), client pairs
    through LMC and the layer-wise analyses along rounds, the federated table and fig15."""
    from test_workflow import snakemake, write_config

    exp = {"model": {"arch": "mlp", "width": 32, "depth": 2}, "train": {"epochs": 3},
           "methods": ["federated_full", "federated_layers", "federated_global_layers",
                       "federated_aligned"],
           "federated": {"clients": 3, "shards": "dirichlet", "beta": 0.3, "layers": ["fc1"],
                         "keep_rounds": [0, 1]},
           "lmc": {"points": 5, "policies": ["interpolate"]}, "llfc": {"probe_size": 32},
           "layerwise": {"eval_samples": 200, "draws": 1, "random_orders": 0, "steps": [0, 1],
                         "norms": [0, 1], "splits": ["test"]}}
    write_config(tmp_path, {"experiments": {"fed": exp}})
    figures = [f"results/figures/fig{n}.pdf" for n in (1, 7, 8, 15)]
    out = snakemake(tmp_path, "--cores", "2", *figures, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for fig in figures:
        assert (tmp_path / fig).stat().st_size > 1000
    table = pd.read_parquet(tmp_path / "results/tables/federated.parquet")
    assert {"experiment", "aggregation", "pair", "seed", "round", "model", "client", "loss",
            "error", "shard_size", "label_entropy"} <= set(table.columns)
    assert set(table.aggregation) == {"full", "layers", "aligned"}
    assert sorted(table["round"].unique()) == [0, 1, 2, 3]
    assert len(table) == 3 * 4 * 4  # aggregations x rounds x (global + 3 clients)
    last = table[(table["round"] == 3) & (table["model"] == "global")]
    assert (last["error"] < 0.5).all(), last
    run = tmp_path / "results/fed/federated/layers/seed0"
    assert {f"client{k}.pt" for k in range(3)} | {"global.pt"} <= {p.name for p in run.iterdir()}
    barriers = pd.read_parquet(tmp_path / "results/tables/layer_barriers.parquet")
    assert sorted(barriers["epoch"].unique()) == [0, 1, 3]  # kept rounds and the last
    at_init = barriers[barriers["epoch"] == 0]
    assert (at_init["loss_barrier"].abs() < 1e-6).all()  # round 0: the clients are one network
    again = snakemake(tmp_path, "-n", "--cores", "2", *figures)
    assert "Nothing to be done" in again.stdout + again.stderr
