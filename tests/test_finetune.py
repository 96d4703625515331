"""Fine-tuning: tasks, task vectors, task arithmetic, CTL and model averaging; the start-up checks
of the files a user brings; an end-to-end run on a pretrained and fine-tuned files the test
writes."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from lmcflow import finetune
from lmcflow.config import ConfigError, validate
from lmcflow.data import Data, MNIST_MEAN, MNIST_STD
from lmcflow.tasks import TASKS, apply_task, task_data

from test_workflow import snakemake, write_config


def _data(n_train=64, n_test=40, seed=0) -> Data:
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)  # noqa: E731
    y = lambda n: torch.randint(0, 10, (n,), generator=g)  # noqa: E731
    return Data("toy", x(n_train), y(n_train), x(n_test), y(n_test), MNIST_MEAN, MNIST_STD, 10)


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def _linear(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


MLP_LAYERS, LINEAR_LAYERS = ["1", "2", "3"], ["1"]


def _states(make, n=3):
    """θ_0 and two 'fine-tuned' models θ_0 + a perturbation (float32)."""
    base = make(0).state_dict()
    g = torch.Generator().manual_seed(1)
    tuned = [{k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
             for _ in range(n - 1)]
    return base, *tuned


# ----------------------------------------------------------------------------------- tasks


def test_tasks_keep_labels_and_transform_both_splits():
    d = _data()
    for name in TASKS:
        t = apply_task(d, name)
        assert torch.equal(t.train_y, d.train_y) and torch.equal(t.test_y, d.test_y)
        assert t.test_x.shape == d.test_x.shape and t.test_x.dtype == torch.uint8
        assert torch.equal(t.test_x, d.test_x) == (name == "original"), name
    assert torch.equal(apply_task(d, "inverted").test_x, 255 - d.test_x)
    both = task_data(d, ["rotated", "inverted"])
    assert len(both.test_y) == 2 * len(d.test_y) and len(both.train_y) == 2 * len(d.train_y)
    assert torch.equal(both.test_x[len(d.test_y):], 255 - d.test_x)
    with pytest.raises(ValueError, match="did you mean rotated"):
        apply_task(d, "rotatd")


# ------------------------------------------------------------------------ task vectors


def test_theta0_plus_task_vector_is_the_fine_tuned_model_exactly():
    """θ_0 + τ_i (τ_i = θ_i − θ_0) reproduces θ_i bit for bit: the arithmetic is in float64."""
    base, tuned, other = _states(_mlp)
    back = finetune.combine(base, [(1.0, tuned)])
    assert all(torch.equal(back[k], tuned[k]) for k in tuned)
    # θ_0 + τ_A + τ_B − τ_B is θ_A too; in float32 it would not be (the test tells them apart)
    back = finetune.combine(base, [(1.0, tuned), (1.0, other), (-1.0, other)])
    assert all(torch.equal(back[k], tuned[k]) for k in tuned)
    f32 = {k: base[k] + (tuned[k] - base[k]) + (other[k] - base[k]) - (other[k] - base[k])
           for k in base}
    assert not all(torch.equal(f32[k], tuned[k]) for k in tuned)


def test_lambda_zero_gives_theta0s_numbers():
    """At λ = 0 both operations are θ_0 itself: its loss and error on every task, and features
    equal to the feature arithmetic (1 − cos 0, c 1)."""
    from lmcflow.training import evaluate

    d = _data()
    base, a, b = _states(_mlp)
    tasks = {t: apply_task(d, t) for t in ("original", "rotated")}
    table = finetune.task_arithmetic(lambda: _mlp(5), base, a, b, [0.0, 0.5], tasks, {}, d,
                                     np.arange(len(d.test_y)), MLP_LAYERS, batch_size=16,
                                     log=lambda *_: None)
    ev = table[(table["kind"] == "evaluation") & (table["lambda"] == 0.0)]
    assert len(ev) == 4
    theta0 = _mlp(5)
    theta0.load_state_dict(base)
    for task, t in tasks.items():
        loss, error = evaluate(theta0.eval(), t.test_x, t.test_y, t.normalize)
        rows = ev[ev["task"] == task]
        assert np.allclose(rows["loss"], loss, rtol=0, atol=0) and (rows["error"] == error).all()
    ft = table[(table["kind"] == "features") & (table["lambda"] == 0.0)]
    assert (ft["one_minus_cos"].abs() < 1e-12).all() and np.allclose(ft["coef_c"], 1.0)
    moved = table[(table["kind"] == "features") & (table["lambda"] == 0.5)]
    assert (moved["one_minus_cos"] > 1e-6).any()  # the test sees a change where there is one


def test_on_a_linear_model_feature_arithmetic_is_weight_arithmetic():
    d = _data()
    base, a, b = _states(_linear)
    table = finetune.task_arithmetic(lambda: _linear(5), base, a, b, [0.3, 1.0, 2.0],
                                     {"original": d}, {}, d, np.arange(len(d.test_y)),
                                     LINEAR_LAYERS, batch_size=16, log=lambda *_: None)
    ft = table[table["kind"] == "features"]
    assert len(ft) == 6
    assert (ft["one_minus_cos"].abs() < 1e-10).all() and np.allclose(ft["coef_c"], 1.0, atol=1e-6)
    # and the CTL relation for any α, β (α + β ≠ 1 included)
    ctl = finetune.ctl_table(lambda: _linear(5), a, b, [(0.5, 0.5), (1.0, 1.0), (0.3, 2.0)], d,
                             np.arange(len(d.test_y)), LINEAR_LAYERS, batch_size=16)
    assert (ctl["one_minus_cos"].abs() < 1e-10).all() and np.allclose(ctl["coef_c"], 1.0, atol=1e-6)


def test_on_a_linear_model_the_average_is_the_ensemble():
    d = _data()
    states = _states(_linear, 4)[1:]
    table = finetune.model_averaging(lambda: _linear(5), states, {"original": d}, d,
                                     np.arange(len(d.test_y)), LINEAR_LAYERS, batch_size=16)
    ev = table[table["kind"] == "evaluation"].set_index("model")
    assert ev.loc["average", "loss"] == pytest.approx(ev.loc["ensemble", "loss"], rel=1e-6)
    assert ev.loc["average", "error"] == ev.loc["ensemble", "error"]
    ft = table[table["kind"] == "features"]
    assert (ft["one_minus_cos"].abs() < 1e-10).all() and np.allclose(ft["coef_c"], 1.0, atol=1e-6)
    # a nonlinear net is where they part (the test is not vacuous)
    mlp = finetune.model_averaging(lambda: _mlp(5), _states(_mlp, 4)[1:], {"original": d}, d,
                                   np.arange(len(d.test_y)), MLP_LAYERS, batch_size=16)
    assert (mlp.loc[mlp["kind"] == "features", "one_minus_cos"] > 1e-6).any()


def test_a_self_pair_gives_zero_everywhere():
    """A = B = θ_0: CTL (α + β = 1), task arithmetic at every λ and the average of K copies are
    all θ_0, and every measure is 0 (average = ensemble = members)."""
    d = _data()
    base = _mlp(0).state_dict()
    samples = np.arange(len(d.test_y))
    ctl = finetune.ctl_table(lambda: _mlp(5), base, base, [(0.5, 0.5), (0.25, 0.75)], d, samples,
                             MLP_LAYERS, batch_size=16)
    assert (ctl[["one_minus_cos", "one_minus_cos_ab"]].abs() < 1e-12).all().all()
    ta = finetune.task_arithmetic(lambda: _mlp(5), base, base, base, [0.0, 0.5, 1.0], {"o": d}, {},
                                  d, samples, MLP_LAYERS, batch_size=16, log=lambda *_: None)
    ft, ev = ta[ta["kind"] == "features"], ta[ta["kind"] == "evaluation"]
    assert (ft["one_minus_cos"].abs() < 1e-12).all()
    assert ev["loss"].nunique() == 1 and ev["error"].nunique() == 1
    avg = finetune.model_averaging(lambda: _mlp(5), [base, base, base], {"o": d}, d, samples,
                                   MLP_LAYERS, batch_size=16)
    assert (avg.loc[avg["kind"] == "features", "one_minus_cos"].abs() < 1e-12).all()
    ev = avg[avg["kind"] == "evaluation"]
    assert ev["loss"].max() - ev["loss"].min() < 1e-12 and ev["error"].nunique() == 1


# -------------------------------------------------------------------------------- pairs


def _exp(**finetune_cfg):
    cfg = {"experiments": {"ft": {"model": {"arch": "mlp", "width": 8, "depth": 1},
                                  "methods": ["finetune_same_task", "finetune_cross_task"],
                                  "pairs": 3, "finetune": {"runs": 2, **finetune_cfg}}}}
    return cfg


def test_pairs_enumerate_tasks_then_seeds():
    cfg = _exp(tasks={"rotated": None, "inverted": {}, "flipped": {"runs": 4}})
    e = validate(cfg)["experiments"]["ft"]
    assert [finetune.pair_runs(e, "finetune_cross_task", p) for p in (0, 3)] == [
        ("finetune/pretrained/flipped/run0", "finetune/pretrained/inverted/run0"),
        ("finetune/pretrained/flipped/run1", "finetune/pretrained/inverted/run1")]
    assert finetune.pair_runs(e, "finetune_same_task_random", 2) == (
        "finetune/random/rotated/run0", "finetune/random/rotated/run1")
    assert finetune.pair_tasks(e, "finetune_cross_task", 2) == ["inverted", "rotated"]
    assert finetune.most_pairs(e, "finetune_same_task") == 3  # rotated, inverted: one pair each
    assert finetune.averaging_groups(e, "pretrained")["tasks"] == [
        f"finetune/pretrained/{t}/run0" for t in ("flipped", "inverted", "rotated")]


@pytest.mark.parametrize("change, words", [
    (lambda e: e["finetune"].update(tasks={"rotatd": {}, "inverted": {}}),
     ["experiments.ft.finetune.tasks.rotatd", "did you mean rotated"]),
    (lambda e: e["pretrain"].update(task="invert"), ["experiments.ft.pretrain.task", "inverted"]),
    (lambda e: e["finetune"]["tasks"].update(rotated={"checkpoints": ["r.pt"]}),
     ["experiments.ft.finetune.tasks.rotated.checkpoints", "set experiments.ft.pretrain.checkpoint"]),
    (lambda e: e.update(pairs=4), ["experiments.ft.pairs", "raise finetune.runs"]),
    (lambda e: e["finetune"]["tasks"].update(rotated={"train": {"lr": -1}}),
     ["experiments.ft.finetune.tasks.rotated.train.lr"]),
    (lambda e: (e["finetune"].update(tasks={"rotated": {}}), e.update(pairs=1)),
     ["finetune_cross_task", "at least two"]),
])
def test_bad_finetune_settings_name_the_key(change, words):
    cfg = _exp(tasks={"rotated": {}, "inverted": {}})
    cfg["experiments"]["ft"]["pretrain"] = {}
    change(cfg["experiments"]["ft"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


# ------------------------------------------------------------------ files a user brings

MODEL = {"arch": "mlp", "width": 16, "depth": 1}


def _user_files(workdir, pretrained_model=MODEL, k=2):
    """A pretrained state dict and, per task, k fine-tuned ones (θ_0 plus small noise)."""
    from lmcflow.models import build_model

    torch.manual_seed(0)
    net = build_model(pretrained_model["arch"], (1, 28, 28), 10,
                      **{k_: v for k_, v in pretrained_model.items() if k_ != "arch"})
    theta0 = net.state_dict()
    torch.save(theta0, workdir / "theta0.pt")
    files = {}
    for i, task in enumerate(("rotated", "inverted")):
        files[task] = []
        for r in range(k):
            g = torch.Generator().manual_seed(10 * i + r)
            tuned = {n: v + 0.05 * torch.randn(v.shape, generator=g) for n, v in theta0.items()}
            torch.save({"model_state_dict": tuned}, workdir / f"{task}{r}.pt")
            files[task].append(f"{task}{r}.pt")
    return files


def _user_config(files, **extra):
    e = {"model": MODEL, "methods": ["finetune_cross_task", "finetune_same_task"], "pairs": 2,
         "pretrain": {"checkpoint": "theta0.pt"},
         "finetune": {"tasks": {t: {"checkpoints": f} for t, f in files.items()},
                      "lambdas": [0.0, 1.0], "ctl": [[0.5, 0.5]]},
         "lmc": {"points": 3, "policies": ["interpolate"]},
         "llfc": {"probe_size": 40, "stored_samples": 8, "batch_size": 20},
         "layerwise": {"enabled": False}, **extra}
    return {"experiments": {"mine": e}}


def test_a_pretrained_file_of_another_architecture_is_refused_before_any_job(tmp_path):
    files = _user_files(tmp_path, pretrained_model={"arch": "mlp", "width": 32, "depth": 1})
    for task in files:  # the fine-tuned files do fit; the pretrained one is wider
        for name in files[task]:
            from lmcflow.models import build_model

            torch.save(build_model("mlp", (1, 28, 28), 10, width=16, depth=1).state_dict(),
                       tmp_path / name)
    write_config(tmp_path, _user_config(files))
    out = snakemake(tmp_path, "-n", "--cores", "1")
    message = out.stdout + out.stderr
    assert out.returncode != 0
    for words in ("experiments.mine.pretrain.checkpoint", "theta0.pt", "does not fit mlp",
                  "set experiments.mine.model"):
        assert words in message, (words, message[-2000:])


def test_fine_tuned_files_without_their_pretrained_one_are_refused(tmp_path):
    files = _user_files(tmp_path)
    cfg = _user_config(files)
    del cfg["experiments"]["mine"]["pretrain"]
    write_config(tmp_path, cfg)
    out = snakemake(tmp_path, "-n", "--cores", "1")
    message = out.stdout + out.stderr
    assert out.returncode != 0
    assert "set experiments.mine.pretrain.checkpoint" in message, message[-2000:]
    assert "experiments.mine.finetune.tasks.inverted.checkpoints" in message
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_user_pretrained_and_fine_tuned_files_end_to_end(tmp_path):
    """θ_0 and two fine-tunings of each of two tasks as files (state dicts, one under
    model_state_dict): every pair, the CTL, task-arithmetic and averaging tables and figures;
    θ_0 + τ reproduces each file, so task arithmetic at λ = 1 of one task is that file."""
    files = _user_files(tmp_path)
    write_config(tmp_path, _user_config(files))
    targets = [f"results/figures/fig{n}.pdf" for n in (1, 3, 16, 17, 18)]
    out = snakemake(tmp_path, "--cores", "2", *targets, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for t in targets:
        assert (tmp_path / t).is_file() and (tmp_path / t).with_suffix(".png").is_file()
    ta = pd.read_parquet(tmp_path / "results/tables/task_arithmetic.parquet")
    assert set(ta["start"]) == {"pretrained"} and set(ta["operation"]) == {"addition", "negation"}
    assert set(ta.loc[ta["kind"] == "evaluation", "task"]) == {"original", "rotated", "inverted"}
    avg = pd.read_parquet(tmp_path / "results/tables/averaging.parquet")
    assert set(avg["group"]) == {"tasks", "same_task:rotated", "same_task:inverted"}
    lmc = pd.read_parquet(tmp_path / "results/tables/lmc.parquet")
    assert set(lmc["method"]) == {"finetune_cross_task", "finetune_same_task"}
    # the pair's endpoint A is the user's file, bit for bit
    a = torch.load(tmp_path / "results/mine/pairs/finetune_same_task/pair0/model_a.pt")
    mine = torch.load(tmp_path / "inverted0.pt")["model_state_dict"]
    assert all(torch.equal(a[k], mine[k]) for k in mine)
