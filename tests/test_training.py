"""lmcflow.training: exact resume, spawning, checkpoint files, lr schedule, augmentation, seeds."""

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmcflow.config import TrainSetting
from lmcflow.io import load_torch
from lmcflow.models import build_model
from lmcflow.training import (augment, derive_seed, evaluate, lr_at, run_training,
                              train_epoch, make_optimizer)

pytestmark = pytest.mark.usefixtures("one_thread")

# cosine: the lr depends on (epoch, epochs), so resuming at the wrong epoch or scheduling by
# stop_epoch shows up; momentum + weight decay + augmentation exercise every piece of state.
SETTING = TrainSetting(epochs=3, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                       schedule="cosine", augment=True)
META = {"run": "seed0", "train": {"epochs": 3}, "milestones": [1, 2]}


def mlp(init_seed: int):
    torch.manual_seed(init_seed)
    return build_model("mlp", (1, 28, 28), 10, width=32, depth=2)


def assert_ckpt_equal(got: dict, want: dict):
    """Model state and optimizer state (momentum buffers, hyper-parameters) equal bit for bit."""
    assert got["epoch"] == want["epoch"]
    assert got["model"].keys() == want["model"].keys()
    for k in want["model"]:
        assert torch.equal(got["model"][k], want["model"][k]), k
    og, ow = got["optimizer"], want["optimizer"]
    assert og["param_groups"] == ow["param_groups"]
    assert og["state"].keys() == ow["state"].keys()
    assert len(ow["state"]) == len(want["model"])  # every parameter has a momentum buffer
    for i in ow["state"]:
        assert og["state"][i].keys() == ow["state"][i].keys()
        for k in ow["state"][i]:
            assert torch.equal(og["state"][i][k], ow["state"][i][k]), (i, k)


def weights_differ(a: dict, b: dict) -> bool:
    return any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def epochs_in(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in ckpt_dir.glob("epoch_*.pt"))


class Log(list):
    def __call__(self, msg):
        self.append(msg)

    def has(self, text):
        return any(text in m for m in self)


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory, one_thread):
    """The reference: 3 epochs in one call."""
    out = run_training(mlp(0), tiny_data, SETTING, noise_seed=7,
                       ckpt_dir=tmp_path_factory.mktemp("A"), meta=META, log=Log())
    return copy.deepcopy(out)


# ------------------------------------------------------------------------------------- resume


def test_resume_after_kill_is_bit_exact(tiny_data, tmp_path, uninterrupted):
    log = Log()
    first = run_training(mlp(0), tiny_data, SETTING, noise_seed=7, ckpt_dir=tmp_path,
                         meta=META, stop_epoch=1, log=log)
    assert first["epoch"] == 1 and weights_differ(first, uninterrupted)
    assert not log.has("resuming")
    log2 = Log()
    final = run_training(mlp(0), tiny_data, SETTING, noise_seed=7, ckpt_dir=tmp_path,
                         meta=META, stop_epoch=3, log=log2)
    assert log2.has("resuming at epoch 1")
    assert sum(m.startswith("epoch ") for m in log2) == 2  # only epochs 2 and 3 were trained
    assert_ckpt_equal(final, uninterrupted)


def test_resume_of_a_finished_run_trains_nothing(tiny_data, tmp_path, uninterrupted):
    run_training(mlp(0), tiny_data, SETTING, noise_seed=7, ckpt_dir=tmp_path, meta=META, log=Log())
    log = Log()
    again = run_training(mlp(5), tiny_data, SETTING, noise_seed=7, ckpt_dir=tmp_path, meta=META,
                         log=log)
    assert log.has("resuming at epoch 3") and not any(m.startswith("epoch ") for m in log)
    assert_ckpt_equal(again, uninterrupted)


def test_checkpoint_of_another_setting_is_ignored(tiny_data, tmp_path, uninterrupted):
    other = {**META, "run": "something else"}
    # a different init and noise seed, so resuming from it could not give the reference result
    run_training(mlp(5), tiny_data, SETTING, noise_seed=99, ckpt_dir=tmp_path, meta=other,
                 stop_epoch=1, log=Log())
    assert epochs_in(tmp_path) == [1]
    log = Log()
    final = run_training(mlp(0), tiny_data, SETTING, noise_seed=7, ckpt_dir=tmp_path, meta=META,
                         stop_epoch=3, log=log)
    assert log.has("made with another setting")
    assert not log.has("resuming")
    assert sum(m.startswith("epoch ") for m in log) == 3  # restarted from epoch 0
    assert_ckpt_equal(final, uninterrupted)


def test_truncated_checkpoint_is_skipped_for_an_older_one(tiny_data, tmp_path, uninterrupted):
    s = replace(SETTING, checkpoint_epochs=(1,))  # keeps epoch 1 besides the newest
    run_training(mlp(0), tiny_data, s, noise_seed=7, ckpt_dir=tmp_path, meta=META, stop_epoch=2,
                 log=Log())
    assert epochs_in(tmp_path) == [1, 2]
    newest = tmp_path / "epoch_0002.pt"
    newest.write_bytes(newest.read_bytes()[:200])  # a job killed while writing (no atomic rename)
    log = Log()
    final = run_training(mlp(0), tiny_data, s, noise_seed=7, ckpt_dir=tmp_path, meta=META,
                         stop_epoch=3, log=log)
    assert log.has("skipping unreadable checkpoint") and log.has("epoch_0002.pt")
    assert log.has("resuming at epoch 1")
    assert_ckpt_equal(final, uninterrupted)
    assert epochs_in(tmp_path) == [1, 3]


def test_garbage_checkpoint_without_older_one_restarts(tiny_data, tmp_path, uninterrupted):
    (tmp_path / "epoch_0002.pt").write_bytes(b"\x00not a checkpoint" * 10)
    log = Log()
    final = run_training(mlp(0), tiny_data, SETTING, noise_seed=7, ckpt_dir=tmp_path, meta=META,
                         log=log)
    assert log.has("skipping unreadable checkpoint") and not log.has("resuming")
    assert_ckpt_equal(final, uninterrupted)


# ------------------------------------------------------------------------------------ spawning

SPAWN = TrainSetting(epochs=4, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                     schedule="cosine", checkpoint_epochs=(2,))
K = 2  # spawn epoch


@pytest.fixture(scope="module")
def spawn_runs(tiny_data, tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("spawn")
    parent = run_training(mlp(0), tiny_data, SPAWN, noise_seed=0, ckpt_dir=root / "parent",
                          meta={"run": "parent"}, stop_epoch=K, log=Log())
    full = run_training(mlp(0), tiny_data, SPAWN, noise_seed=0, ckpt_dir=root / "seed0",
                        meta={"run": "seed0"}, log=Log())
    return {"root": root, "parent": copy.deepcopy(parent), "full": copy.deepcopy(full),
            "parent_file": root / "parent" / f"epoch_{K:04d}.pt"}


def train_child(data, runs, noise_seed, name, stop_epoch=None, start=None):
    # a different init seed: a child that ignored its start would not match anything
    start = load_torch(runs["parent_file"]) if start is None else start
    return run_training(mlp(123), data, SPAWN, noise_seed=noise_seed,
                        ckpt_dir=runs["root"] / name, meta={"run": name}, start=start,
                        stop_epoch=stop_epoch, log=Log())


def test_parent_is_the_first_k_epochs_of_the_same_seed_run(spawn_runs):
    kept = load_torch(spawn_runs["root"] / "seed0" / f"epoch_{K:04d}.pt")
    assert_ckpt_equal(spawn_runs["parent"], kept)
    assert spawn_runs["parent"]["epoch"] == K
    assert_ckpt_equal(load_torch(spawn_runs["parent_file"]), spawn_runs["parent"])


def test_children_start_exactly_at_the_parent(tiny_data, spawn_runs):
    for i, seed in enumerate((101, 102)):
        log = Log()
        start = load_torch(spawn_runs["parent_file"])
        at_fork = run_training(mlp(123), tiny_data, SPAWN, noise_seed=seed,
                               ckpt_dir=spawn_runs["root"] / f"fork{i}", meta={"run": f"c{i}"},
                               start=start, stop_epoch=K, log=log)
        assert log.has("resuming at epoch 2 (from the parent)")
        assert_ckpt_equal(at_fork, spawn_runs["parent"])


def test_children_diverge_and_same_noise_reproduces(tiny_data, spawn_runs):
    c0 = train_child(tiny_data, spawn_runs, 101, "child0")
    c1 = train_child(tiny_data, spawn_runs, 102, "child1")
    c0_again = train_child(tiny_data, spawn_runs, 101, "child0_again")
    assert c0["epoch"] == c1["epoch"] == SPAWN.epochs
    assert weights_differ(c0, c1)
    assert weights_differ(c0, spawn_runs["parent"])
    assert_ckpt_equal(c0_again, c0)


def test_child_with_the_parents_noise_continues_the_parent_run(tiny_data, spawn_runs):
    """Parent (noise 0, epochs 0..K-1) + child (noise 0, epochs K..) = the uninterrupted run."""
    child = train_child(tiny_data, spawn_runs, 0, "child_noise0")
    assert_ckpt_equal(child, spawn_runs["full"])


def test_child_resumes_its_own_checkpoint_before_the_parent(tiny_data, spawn_runs):
    ref = train_child(tiny_data, spawn_runs, 103, "child3")
    train_child(tiny_data, spawn_runs, 103, "child3_killed", stop_epoch=3)
    log = Log()
    final = run_training(mlp(123), tiny_data, SPAWN, noise_seed=103,
                         ckpt_dir=spawn_runs["root"] / "child3_killed",
                         meta={"run": "child3_killed"}, start=load_torch(spawn_runs["parent_file"]),
                         log=log)
    assert log.has("resuming at epoch 3") and not log.has("from the parent")
    assert_ckpt_equal(final, ref)


def test_training_a_child_does_not_mutate_the_in_memory_parent(tiny_data, spawn_runs):
    parent = copy.deepcopy(spawn_runs["parent"])
    train_child(tiny_data, spawn_runs, 101, "alias_child0", start=parent)
    assert_ckpt_equal(parent, spawn_runs["parent"])
    # consequence: a second child from the same dict does not reproduce the first
    again = train_child(tiny_data, spawn_runs, 101, "alias_child0_again", start=parent)
    assert_ckpt_equal(again, train_child(tiny_data, spawn_runs, 101, "alias_ref"))


# --------------------------------------------------------------------------------- checkpoints


def test_checkpoints_keep_newest_and_listed_and_load_weights_only(tiny_data, tmp_path):
    s = replace(SETTING, epochs=5, checkpoint_epochs=(1, 3), schedule="multistep",
                milestones=(2, 4), augment=False)
    meta = {"run": "x", "train": {"epochs": 5, "checkpoint_epochs": [1, 3]}}
    run_training(mlp(0), tiny_data, s, noise_seed=1, ckpt_dir=tmp_path, meta=meta, stop_epoch=2,
                 log=Log())
    assert epochs_in(tmp_path) == [1, 2]
    final = run_training(mlp(0), tiny_data, s, noise_seed=1, ckpt_dir=tmp_path, meta=meta,
                         log=Log())
    assert epochs_in(tmp_path) == [1, 3, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch_0001.pt", "epoch_0003.pt", "epoch_0005.pt"]  # no temp files left over
    for epoch in (1, 3, 5):
        ckpt = torch.load(tmp_path / f"epoch_{epoch:04d}.pt", weights_only=True)
        assert set(ckpt) == {"model", "optimizer", "epoch", "meta"}
        assert ckpt["epoch"] == epoch and ckpt["meta"] == meta
        assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr_at(s, epoch - 1))
    assert_ckpt_equal(torch.load(tmp_path / "epoch_0005.pt", weights_only=True), final)


def test_train_epoch_uses_the_scheduled_lr(tiny_data):
    s = replace(SETTING, schedule="multistep", milestones=(1,), gamma=0.5, augment=False)
    model = mlp(0)
    opt = make_optimizer(model, s)
    for epoch, want in ((0, 0.05), (1, 0.025), (2, 0.025)):
        train_epoch(model, opt, tiny_data, s, epoch, noise_seed=0, device=torch.device("cpu"))
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12)


# --------------------------------------------------------------------------------- lr schedule


def test_lr_constant():
    s = TrainSetting(epochs=10, lr=0.3, schedule="constant")
    assert [lr_at(s, e) for e in range(10)] == [0.3] * 10


def test_lr_multistep():
    s = TrainSetting(epochs=6, lr=0.1, schedule="multistep", milestones=(2, 4), gamma=0.1)
    got = [lr_at(s, e) for e in range(6)]
    want = [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert got == pytest.approx(want, rel=1e-12)


def test_lr_cosine():
    s = TrainSetting(epochs=10, lr=0.2, schedule="cosine")
    got = [lr_at(s, e) for e in range(10)]
    assert got[0] == pytest.approx(0.2, rel=1e-15)
    assert all(a > b for a, b in zip(got, got[1:]))
    assert got[-1] > 0
    assert lr_at(s, 5) == pytest.approx(0.1, rel=1e-12)
    assert got[3] == pytest.approx(0.1 * (1 + math.cos(math.pi * 0.3)), rel=1e-12)


def test_lr_unknown_schedule():
    with pytest.raises(ValueError, match="linear"):
        lr_at(TrainSetting(schedule="linear"), 0)


# ------------------------------------------------------------------------------- augmentation


def images(n=16, c=1, h=12, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, c, h, w), generator=g, dtype=torch.int64).to(torch.uint8)


def test_augment_shape_dtype_and_determinism():
    x = images(c=3)
    out = augment(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(out, augment(x, torch.Generator().manual_seed(4)))
    assert not torch.equal(out, x)


def test_augment_without_padding_only_flips():
    x = images(n=64)
    out = augment(x, torch.Generator().manual_seed(0), pad=0)
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    assert all(s or f for s, f in zip(same, flipped))
    assert any(same) and any(flipped)


def test_augment_is_a_crop_of_the_padded_image_or_its_flip():
    pad = 4
    x = images(n=16, c=2)
    out = augment(x, torch.Generator().manual_seed(1), pad=pad)
    h, w = x.shape[-2:]
    found = []
    for o, i in zip(out, x):
        padded = F.pad(i, (pad, pad, pad, pad))
        matches = [(dy, dx, flip)
                   for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for flip in (False, True)
                   if torch.equal(o, (lambda c: c.flip(-1) if flip else c)(
                       padded[:, dy:dy + h, dx:dx + w]))]
        assert matches, "an output image is neither a crop nor a flipped crop of its input"
        found.append(matches[0])
    # channels are cropped together (checked above: the whole (C, H, W) image matched), and
    # the offsets and flips actually vary
    assert len({(dy, dx) for dy, dx, _ in found}) > 1
    assert {flip for *_, flip in found} == {False, True}


# -------------------------------------------------------------------------------------- seeds


def test_derive_seed_is_deterministic_and_distinct():
    assert derive_seed(3, 4) == derive_seed(3, 4)
    seeds = {derive_seed(s, e) for s in range(10) for e in range(20)}
    assert len(seeds) == 200
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert derive_seed(5, 2) != derive_seed(5, 2, 1)  # data order vs. global RNG of an epoch
    assert all(0 <= derive_seed(s, k) < 2 ** 32 for s in range(5) for k in range(5))


def test_derive_seed_distinguishes_trailing_zero_keys():
    assert derive_seed(1) != derive_seed(1, 0)


# --------------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("arch", ["mlp", "vgg"])
def test_evaluate_matches_direct_cross_entropy(tiny_data, arch):
    torch.manual_seed(0)
    if arch == "mlp":
        model = build_model("mlp", (1, 28, 28), 10, width=32, depth=2)
    else:
        model = build_model("vgg", (1, 28, 28), 10, width=0.125, batch_norm=True)
        with torch.no_grad():  # non-trivial running stats, so train-mode BN would differ
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    model.train()
    x, y = tiny_data.test_x, tiny_data.test_y
    loss, err = evaluate(model, x, y, tiny_data.normalize, batch_size=50)
    assert not model.training
    with torch.no_grad():
        logits = model(tiny_data.normalize(x)).double()
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert err == (logits.argmax(1) != y).double().mean().item()
    assert 0 < err < 1


@pytest.mark.parametrize("arch, kwargs, epochs, lr", [
    ("lenet", {}, 3, 0.05),
    ("resnet18", {"width": 0.125, "norm": "none"}, 2, 0.01),  # no normalisation: a small lr
])
def test_the_papers_models_train_on_mnist5k(tmp_path, arch, kwargs, epochs, lr):
    """LeNet-5 (LLFC) and the no-norm CIFAR ResNet-18 (layer-wise LMC) learn the embedded
    MNIST subset: far above chance after a few epochs of SGD on 2000 images."""
    import dataclasses

    from lmcflow.data import load_dataset

    full = load_dataset("mnist5k")
    pick = torch.randperm(len(full.train_y), generator=torch.Generator().manual_seed(0))[:2000]
    data = dataclasses.replace(full, train_x=full.train_x[pick], train_y=full.train_y[pick])
    torch.manual_seed(0)
    model = build_model(arch, data.shape, 10, **kwargs)
    setting = TrainSetting(epochs=epochs, batch_size=32, lr=lr, momentum=0.9)
    final = run_training(model, data, setting, noise_seed=1, ckpt_dir=tmp_path, meta={},
                         log=lambda _: None)
    assert final["epoch"] == epochs
    _, error = evaluate(model, data.test_x, data.test_y, data.normalize)
    assert error < 0.5, error  # chance is 0.9


# ------------------------------------------------------------------------ the loop on devices


def _plain_epoch(model, opt, data, s, epoch, noise_seed, device=None):
    """The obvious loop (host indexing, a host sync per step): what train_epoch must compute."""
    gen = torch.Generator().manual_seed(derive_seed(noise_seed, epoch))
    torch.manual_seed(derive_seed(noise_seed, epoch, 1))
    for group in opt.param_groups:
        group["lr"] = lr_at(s, epoch)
    model.train()
    order = torch.randperm(len(data.train_y), generator=gen)
    total = 0.0
    for start in range(0, len(order), s.batch_size):
        idx = order[start:start + s.batch_size]
        x = augment(data.train_x[idx], gen) if s.augment else data.train_x[idx]
        loss = F.cross_entropy(model(data.normalize(x)), data.train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(order)


def test_train_epoch_is_the_plain_loop_bit_for_bit_on_the_cpu(tiny_data):
    """The device-resident loop (indexing where the data lies, sums on the device) changes no
    weight and no logged loss on the CPU."""
    s = replace(SETTING, epochs=1)
    runs = []
    for epoch_fn in (train_epoch, _plain_epoch):
        torch.manual_seed(0)
        model = build_model("lenet", (1, 28, 28), 10, width=0.5)
        opt = make_optimizer(model, s)
        out = epoch_fn(model, opt, tiny_data, s, 0, 5, torch.device("cpu"))
        runs.append((model.state_dict(), out[0] if isinstance(out, tuple) else out))
    (got, loss_got), (want, loss_want) = runs
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert loss_got == loss_want


def test_data_moves_once_and_is_itself_on_its_device(tiny_data):
    assert tiny_data.to("cpu") is tiny_data
    assert tiny_data.to(torch.device("cpu")) is tiny_data
    moved = tiny_data.to("meta")
    assert moved.train_x.device.type == "meta" and moved.test_y.device.type == "meta"
    assert tiny_data.train_x.device.type == "cpu"  # the original is left where it was


def test_bf16_and_channels_last_train_a_conv_net(tiny_data, tmp_path):
    s = replace(SETTING, epochs=1, precision="bf16", channels_last=True)
    torch.manual_seed(0)
    model = build_model("lenet", (1, 28, 28), 10)
    out = run_training(model, tiny_data, s, noise_seed=1, ckpt_dir=tmp_path, meta={}, log=Log())
    assert all(v.dtype != torch.bfloat16 for v in out["model"].values())  # weights stay float32
    loss, err = evaluate(model, tiny_data.test_x, tiny_data.test_y, tiny_data.normalize)
    assert math.isfinite(loss) and err < 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_follows_the_cpu_run():
    """The same seeds on a GPU: the same data order and augmentation, so the weights after one
    epoch agree with the CPU's up to float rounding."""
    from lmcflow.data import load_dataset

    data = load_dataset("mnist5k")
    s = replace(SETTING, epochs=1)
    outs = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = build_model("lenet", (1, 28, 28), 10)
        opt = make_optimizer(model.to(device), s)
        train_epoch(model, opt, data.to(device), s, 0, 3, torch.device(device))
        outs.append({k: v.cpu() for k, v in model.state_dict().items()})
    for k in outs[0]:
        assert torch.allclose(outs[0][k].float(), outs[1][k].float(), atol=2e-3, rtol=1e-2), k
