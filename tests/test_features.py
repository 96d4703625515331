"""lmcflow.features: hooks, the streamed Parquet features file, probes; metrics.llfc_table on it."""

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from lmcflow.features import (alpha_network, capture, column, iter_feature_batches,
                              probe_indices, read_metadata, write_features)
from lmcflow.interpolation import lerp_state
from lmcflow.metrics import llfc_batch, llfc_table
from lmcflow.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 28, 28)
ALPHAS = (0.25, 0.5, 0.75)
BATCH = 16


def quiet(_msg):
    pass


def build(arch, seed):
    torch.manual_seed(seed)
    if arch == "mlp":
        return build_model("mlp", SHAPE, 10, width=32, depth=2)
    return build_model("vgg", SHAPE, 10, width=0.125, batch_norm=True)


def networks_for(arch):
    """A, B and the interpolated networks (BN statistics interpolated: no reset needed here)."""
    a, b = build(arch, 0), build(arch, 1)
    if arch == "vgg":  # non-default BN statistics so eval-mode BN is not the identity
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for net in (a, b):
                for m in net.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    nets = {"A": a, "B": b}
    for alpha in ALPHAS:
        net = build(arch, 9)
        net.load_state_dict(lerp_state(a.state_dict(), b.state_dict(), alpha))
        nets[alpha_network(alpha)] = net
    return nets


def direct_features(net, layers, x, samples, normalize, batch_size):
    """Hooked outputs computed independently of lmcflow.features: layer -> (N, D) float32."""
    net.eval()
    modules = dict(net.named_modules())
    out = {layer: [] for layer in layers}
    handles = [modules[layer].register_forward_hook(
        lambda _m, _i, o, layer=layer: out[layer].append(o.detach().reshape(len(o), -1)))
        for layer in layers]
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            net(normalize(x[torch.as_tensor(samples[start:start + batch_size])]))
    for h in handles:
        h.remove()
    return {layer: torch.cat(v).numpy() for layer, v in out.items()}


@pytest.fixture(scope="module", params=["mlp", "vgg"])
def written(request, tiny_data, tmp_path_factory, one_thread):
    arch = request.param
    nets = networks_for(arch)
    layers = nets["A"].feature_layers()
    samples = probe_indices(len(tiny_data.test_y), 50, seed=3)
    path = tmp_path_factory.mktemp(arch) / "features.parquet"
    write_features(path, nets, layers, tiny_data.test_x, samples, tiny_data.normalize, BATCH,
                   metadata={"pair": "pair0"}, log=quiet)
    direct = {name: direct_features(net, layers, tiny_data.test_x, samples, tiny_data.normalize,
                                    BATCH) for name, net in nets.items()}
    return {"arch": arch, "path": path, "nets": nets, "layers": layers, "samples": samples,
            "direct": direct}


# ---------------------------------------------------------------------------- the features file


def test_features_roundtrip_equals_hooked_outputs(written):
    path, layers, direct = written["path"], written["layers"], written["direct"]
    columns = ["sample", *(column(n, l) for n in written["nets"] for l in layers)]
    batches = list(iter_feature_batches(path, columns))
    for name in written["nets"]:
        for layer in layers:
            got = np.concatenate([b[column(name, layer)] for b in batches])
            want = direct[name][layer]
            assert got.dtype == np.float32 and got.shape == want.shape, (name, layer)
            assert want.shape[1] > 1
            np.testing.assert_array_equal(got, want, err_msg=f"{name}/{layer}")
    # the networks really are different functions, so a mixed-up column would be caught
    assert not np.array_equal(direct["A"][layers[-1]], direct["B"][layers[-1]])


def test_features_file_layout(written):
    path, samples = written["path"], written["samples"]
    n = len(samples)
    assert pq.ParquetFile(path).num_row_groups == math.ceil(n / BATCH) == 4
    sizes = [len(b["sample"]) for b in iter_feature_batches(path, ["sample"])]
    assert sizes == [16, 16, 16, 2]
    got = np.concatenate([b["sample"] for b in iter_feature_batches(path, ["sample"])])
    np.testing.assert_array_equal(got, samples)
    assert got.dtype == np.int64
    meta = read_metadata(path)
    assert meta["networks"] == ["A", "B", "alpha=0.25", "alpha=0.5", "alpha=0.75"]
    assert meta["layers"] == written["layers"]
    assert meta["pair"] == "pair0"
    names = pq.read_schema(path).names
    assert names == ["sample", *(column(net, l) for net in meta["networks"] for l in meta["layers"])]


class ExplodesOnSecondBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(28 * 28, 32)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom on batch 2")
        return self.fc1(self.flatten(x))


def test_write_features_is_atomic(tiny_data, tmp_path):
    target = tmp_path / "out" / "features.parquet"
    nets = {"A": build("mlp", 0), "B": ExplodesOnSecondBatch()}
    samples = np.arange(40)
    with pytest.raises(RuntimeError, match="boom on batch 2"):
        write_features(target, nets, ["fc1"], tiny_data.test_x, samples, tiny_data.normalize,
                       BATCH, log=quiet)
    assert nets["B"].calls == 2  # it failed mid-way, after a row group had been written
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temp file left behind


def test_failed_rewrite_keeps_the_previous_file(tiny_data, tmp_path):
    target = tmp_path / "features.parquet"
    samples = np.arange(40)
    write_features(target, {"A": build("mlp", 0)}, ["fc1"], tiny_data.test_x, samples,
                   tiny_data.normalize, BATCH, log=quiet)
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        write_features(target, {"A": ExplodesOnSecondBatch()}, ["fc1"], tiny_data.test_x,
                       samples, tiny_data.normalize, BATCH, log=quiet)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["features.parquet"]


# ------------------------------------------------------------------------------------- capture


def test_capture_records_flattened_outputs_and_removes_hooks(tiny_data):
    net = build("vgg", 0).eval()
    layers = ["features.conv1", "features.relu2", "out"]
    x = tiny_data.normalize(tiny_data.test_x[:5])
    with torch.no_grad(), capture(net, layers) as store:
        logits = net(x)
        assert any(m._forward_hooks for m in net.modules())
    assert set(store) == set(layers)
    assert torch.equal(store["out"], logits)
    conv1 = net.features.conv1(x)
    assert torch.equal(store["features.conv1"], conv1.flatten(1))
    assert store["features.conv1"].shape == (5, conv1[0].numel())
    assert all(not m._forward_hooks for m in net.modules())


def test_capture_removes_hooks_after_an_error():
    net = build("mlp", 0)
    with pytest.raises(ZeroDivisionError):
        with capture(net, ["fc1", "relu2"]):
            1 / 0
    assert all(not m._forward_hooks for m in net.modules())


def test_capture_unknown_layer_raises_key_error_naming_it():
    net = build("mlp", 0)
    with pytest.raises(KeyError, match="fc9"):
        with capture(net, ["fc1", "fc9"]):
            pass
    assert all(not m._forward_hooks for m in net.modules())


# -------------------------------------------------------------------------------- probe_indices


def test_probe_indices():
    p = probe_indices(1000, 100, seed=4)
    assert p.shape == (100,) and np.issubdtype(p.dtype, np.integer)
    assert np.all(np.diff(p) > 0)  # sorted and unique
    assert p.min() >= 0 and p.max() < 1000
    np.testing.assert_array_equal(p, probe_indices(1000, 100, seed=4))
    assert not np.array_equal(p, probe_indices(1000, 100, seed=5))
    assert len(set(p) ^ set(probe_indices(1000, 100, seed=5))) > 0
    np.testing.assert_array_equal(probe_indices(30, 30, seed=0), np.arange(30))
    np.testing.assert_array_equal(probe_indices(30, 500, seed=0), np.arange(30))


# ------------------------------------------------------------------------------ metrics.llfc_table


def test_llfc_table_matches_llfc_batch_on_the_full_features(written):
    path, layers, direct, samples = (written[k] for k in ("path", "layers", "direct", "samples"))
    table = llfc_table(path)
    assert list(table.columns) == ["alpha", "layer", "layer_index", "sample",
                                   "one_minus_cos_alpha", "one_minus_cos_ab", "coef_c"]
    assert len(table) == len(samples) * len(layers) * len(ALPHAS)
    table = table.sort_values(["layer_index", "alpha", "sample"]).reset_index(drop=True)
    i = 0
    for li, layer in enumerate(layers):
        f_a, f_b = (torch.from_numpy(direct[n][layer]) for n in ("A", "B"))
        for alpha in ALPHAS:
            part = table.iloc[i:i + len(samples)]
            i += len(samples)
            assert (part.layer == layer).all() and (part.layer_index == li).all()
            assert (part.alpha == alpha).all()
            np.testing.assert_array_equal(part["sample"].to_numpy(), samples)
            f_alpha = torch.from_numpy(direct[alpha_network(alpha)][layer])
            want = llfc_batch(f_a, f_b, f_alpha, alpha)
            for key, values in want.items():
                np.testing.assert_allclose(part[key].to_numpy(), values.numpy(), rtol=1e-10,
                                           atol=1e-13, err_msg=f"{layer} {alpha} {key}")


def test_llfc_table_alpha_subset(written):
    table = llfc_table(written["path"], alphas=[0.5])
    assert set(table.alpha) == {0.5}
    assert len(table) == len(written["samples"]) * len(written["layers"])


@pytest.mark.parametrize("written", ["mlp"], indirect=True)
def test_llfc_first_linear_layer_is_exactly_linear(written):
    """The MLP's first layer is Linear, so its output is linear in the weights."""
    assert written["arch"] == "mlp"
    table = llfc_table(written["path"])
    fc1 = table[table.layer == "fc1"]
    assert len(fc1) == len(written["samples"]) * len(ALPHAS)
    assert np.abs(fc1.one_minus_cos_alpha).max() < 1e-9
    np.testing.assert_allclose(fc1.coef_c, 1.0, atol=1e-5)
    # A and B are different networks, so the baseline is far from 0 ...
    assert fc1.one_minus_cos_ab.min() > 1e-3
    # ... and deeper layers, past a ReLU, are not exactly linear
    fc2 = table[(table.layer == "fc2") & (table.alpha == 0.5)]
    assert fc2.one_minus_cos_alpha.max() > 1e-6


# ------------------------------------------------------- LLFC of the whole probe, a subset stored


def test_llfc_covers_every_probe_sample_while_the_file_keeps_only_the_stored_subset(tmp_path):
    """A probe of 1 000 samples, 50 of them stored: llfc rows for all 1 000 (computed as the
    features stream by), a features file the size of a 50-sample probe's, and the stored
    samples' rows equal to what the file gives back."""
    from lmcflow.data import load_dataset
    from lmcflow.features import stored_subset
    from lmcflow.metrics import LlfcRows

    data = load_dataset("mnist5k")  # 1 000 test images
    nets = networks_for("mlp")
    layers = nets["A"].feature_layers()
    samples = probe_indices(len(data.test_y), 1000, seed=3)
    stored = stored_subset(samples, 50, seed=3)
    rows = LlfcRows(layers, ALPHAS)
    write_features(tmp_path / "big.parquet", nets, layers, data.test_x, samples, data.normalize,
                   100, log=quiet, on_batch=rows, store=stored)
    table = rows.table()
    assert len(samples) == 1000 and len(table) == 1000 * len(layers) * len(ALPHAS)
    assert set(table["sample"]) == set(samples.tolist())
    assert len(stored) == 50 and set(stored) <= set(samples)

    for name, probe in (("small.parquet", stored), ("full.parquet", samples)):
        write_features(tmp_path / name, nets, layers, data.test_x, probe, data.normalize, 100,
                       log=quiet)
    big, small, full = ((tmp_path / f).stat().st_size
                        for f in ("big.parquet", "small.parquet", "full.parquet"))
    # the subset's size (plus a few kB per row group), not the probe's
    assert small <= big < 1.3 * small and big < 0.1 * full, (big, small, full)
    read_back = llfc_table(tmp_path / "big.parquet")
    assert sorted(set(read_back["sample"])) == sorted(stored.tolist())
    same = table[table["sample"].isin(stored)].reset_index(drop=True)
    pd.testing.assert_frame_equal(read_back, same)


def test_a_probe_that_stores_nothing_writes_an_empty_features_file(tiny_data, tmp_path):
    from lmcflow.metrics import LlfcRows

    nets = networks_for("mlp")
    layers = nets["A"].feature_layers()
    rows = LlfcRows(layers, ALPHAS)
    write_features(tmp_path / "f.parquet", nets, layers, tiny_data.test_x, np.arange(40),
                   tiny_data.normalize, BATCH, log=quiet, on_batch=rows, store=np.array([], int))
    assert list(iter_feature_batches(tmp_path / "f.parquet", ["sample"])) == []
    assert read_metadata(tmp_path / "f.parquet")["layers"] == layers
    assert len(rows.table()) == 40 * len(layers) * len(ALPHAS)
