"""The Snakemake workflow itself: dry runs, config errors, and a real run of a tiny config.

The slow test trains real networks on the embedded MNIST 5k subset and checks the papers'
claims on the tables it writes: spawned MLP pairs are linearly mode connected and satisfy LLFC,
independently trained (naive) pairs are not and do not.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")

METHODS = ["spawning", "naive", "weight_matching", "activation_matching"]
TINY = {
    "experiments": {
        "mlp": {  # the paper's MLP, a few epochs
            "model": {"arch": "mlp", "width": 512, "depth": 3},
            "train": {"epochs": 6, "batch_size": 64, "lr": 0.05, "checkpoint_epochs": [0, 3]},
            "spawn_epoch": 2,
            "methods": METHODS,
            "llfc": {"probe_size": 200},
            "layerwise": {"eval_samples": 500, "draws": 2},
        },
        "cnn": {  # conv + BatchNorm path, spawned at initialisation (spawn_epoch 0)
            "model": {"arch": "vgg", "depth": 11, "batch_norm": True, "width": 0.0625},
            "train": {"epochs": 1},
            "spawn_epoch": 0,
            "methods": METHODS,
            "llfc": {"probe_size": 32, "batch_size": 16},
            "layerwise": {"eval_samples": 64, "draws": 1, "steps": [0, 1], "norms": [0, 1],
                          "splits": ["test"]},
        },
    }
}


def snakemake(workdir: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def test_dry_run_of_all_on_the_default_config(tmp_path):
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    out = snakemake(tmp_path, "-n", "--cores", "8")
    assert out.returncode == 0, out.stderr
    for rule in ("train", "train_parent", "train_child", "make_pair", "lmc", "features", "llfc",
                 "table", "figure"):
        assert f"rule {rule}:" in out.stdout, rule
    assert "results/figures/fig3.pdf" in out.stdout
    assert not (tmp_path / "results").exists()


def test_a_bad_config_stops_before_any_job(tmp_path):
    write_config(tmp_path, {"experiments": {"mlp": {"model": {"arch": "mlp", "widht": 64}}}})
    out = snakemake(tmp_path, "--cores", "1")
    assert out.returncode != 0
    assert "config key experiments.mlp.model" in out.stderr and "widht" in out.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_tiny_config_end_to_end(tmp_path):
    write_config(tmp_path, TINY)
    out = snakemake(tmp_path, "--cores", "2", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for fig in range(1, 12):
        assert (tmp_path / f"results/figures/fig{fig}.pdf").stat().st_size > 1000
    for exp in ("mlp", "cnn"):
        for method in METHODS:
            pair = tmp_path / f"results/{exp}/pairs/{method}/pair0"
            assert {"model_a.pt", "model_b.pt", "pair.json"} <= {p.name for p in pair.iterdir()}
            assert (pair / "permutation.json").exists() == method.endswith("_matching")
    assert_permuted_endpoint(tmp_path / "results/cnn", "weight_matching")
    assert (tmp_path / "logs/mlp/runs/seed0.log").read_text().count("epoch ") == 6

    again = snakemake(tmp_path, "-n", "--cores", "2")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    report = snakemake(tmp_path, "--report", "report.html")
    assert report.returncode == 0, report.stderr[-2000:]
    html = (tmp_path / "report.html").read_text()
    assert "fig3.pdf" in html and "LLFC holds where" in html and "llfc.parquet" in html

    lmc = pd.read_parquet(tmp_path / "results/tables/lmc.parquet")
    assert list(lmc.columns[:3]) == ["experiment", "method", "pair"]
    assert {"alpha", "split", "loss", "error", "bn"} <= set(lmc.columns)
    assert set(lmc.loc[lmc.experiment == "cnn", "bn"]) == {"reset", "interpolate"}
    assert set(lmc.loc[lmc.experiment == "mlp", "bn"]) == {"none"}
    llfc = pd.read_parquet(tmp_path / "results/tables/llfc.parquet")
    assert {"alpha", "layer", "layer_index", "sample", "one_minus_cos_alpha", "one_minus_cos_ab",
            "coef_c"} <= set(llfc.columns)
    assert_mlp_claims(lmc[lmc.experiment == "mlp"], llfc[llfc.experiment == "mlp"])
    assert_partial_rerun(tmp_path)
    tables = {t: pd.read_parquet(tmp_path / f"results/tables/{t}.parquet").query("experiment == 'mlp'")
              for t in ("commutativity", "layer_barriers", "cumulative_barriers", "layer_robustness")}
    assert_mechanism_claims(tables.pop("commutativity"))
    assert_layerwise_claims(tables)


CROSS_EXPERIMENT_RULES = {"table", "alignment_table", "figure", "all"}


def planned_jobs(dry_run_stdout: str) -> list[tuple[str, str]]:
    """(rule, wildcards line) of every job a `snakemake -n` run plans."""
    jobs, rule = [], None
    for line in dry_run_stdout.splitlines():
        if line.startswith("rule ") and line.endswith(":"):
            if rule is not None:
                jobs.append((rule, ""))
            rule = line[5:-1]
        elif rule is not None and line.strip().startswith("wildcards:"):
            jobs.append((rule, line.strip()))
            rule = None
    return jobs + ([(rule, "")] if rule is not None else [])


def assert_partial_rerun(workdir: Path) -> None:
    """Changing one experiment's model width re-runs that experiment and the cross-experiment
    tables and figures only; the other experiment's runs are not touched."""
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["experiments"]["cnn"]["model"]["width"] = 0.125
    write_config(workdir, config)
    plan = snakemake(workdir, "-n", "--cores", "2")
    assert plan.returncode == 0, plan.stderr
    jobs = planned_jobs(plan.stdout)
    assert {rule for rule, _ in jobs} >= {"train", "train_parent", "train_child", "align_pair", "lmc"}
    for rule, wildcards in jobs:
        assert rule in CROSS_EXPERIMENT_RULES or "experiment=cnn" in wildcards, (rule, wildcards)
    mlp_runs = sorted((workdir / "results/mlp/runs").rglob("*.pt"))
    before = {p: p.stat().st_mtime_ns for p in mlp_runs}
    run = snakemake(workdir, "--cores", "2", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in mlp_runs} == before
    assert "Nothing to be done" in snakemake(workdir, "-n", "--cores", "2").stdout


@pytest.mark.slow
def test_a_killed_training_job_resumes_from_its_checkpoint(tmp_path):
    """Kill snakemake mid-training; the re-run resumes from the newest checkpoint and ends with
    the weights of an uninterrupted run."""
    import signal
    import time

    import torch

    config = {"experiments": {"m": {"model": {"arch": "mlp", "width": 64, "depth": 2},
                                    "train": {"epochs": 40}}}}
    target = "results/m/runs/seed0/final.pt"
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for workdir in (killed, clean):
        workdir.mkdir()
        write_config(workdir, config)
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(killed),
           "--cores", "1", target]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    checkpoints = killed / "results/m/runs/seed0/checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("epoch_000[3-9].pt")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (killed / target).exists(), "killed too late: training had finished"
    assert snakemake(killed, "--unlock").returncode == 0  # the killed run left its lock behind
    rerun = snakemake(killed, "--cores", "1", target, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming at epoch" in (killed / "logs/m/runs/seed0.log").read_text()
    assert snakemake(clean, "--cores", "1", target, timeout=600).returncode == 0
    a, b = (torch.load(d / target, weights_only=True)["model"] for d in (killed, clean))
    assert all(torch.equal(a[k], b[k]) for k in a)


def assert_permuted_endpoint(root: Path, method: str) -> None:
    """model_b.pt of a permutation method is π(B): B's final weights permuted by permutation.json."""
    import json

    import torch

    from lmcflow import jobs
    from lmcflow.matching import apply_permutation, permutation_spec

    pair = root / f"pairs/{method}/pair0"
    info = json.loads((pair / "pair.json").read_text())
    run_b = torch.load(root.parent.parent / info["runs"]["b"], weights_only=True)
    perm = {g: torch.tensor(p) for g, p in json.loads((pair / "permutation.json").read_text()).items()}
    want = apply_permutation(permutation_spec(jobs.build(info["spec"])), perm, run_b["model"])
    got = torch.load(pair / "model_b.pt", weights_only=True)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(p != sorted(p) for p in json.loads((pair / "permutation.json").read_text()).values())


def assert_mlp_claims(lmc: pd.DataFrame, llfc: pd.DataFrame) -> None:
    """LMC and LLFC for spawning, neither for naive (the foundation issue's criteria)."""
    from lmcflow.metrics import barriers

    test = barriers(lmc[lmc.split == "test"]).set_index("method")
    error = test["error_barrier"]
    assert error["spawning"] < 0.02, error
    assert error["naive"] >= 0.01 and error["naive"] > 3 * error["spawning"], error
    assert test.loc["naive", "loss_barrier"] > 0.3, test
    for aligned in ("weight_matching", "activation_matching"):  # alignment halves the barrier
        assert error[aligned] <= error["naive"] / 2, error

    # fc1 is linear in the weights, so 1 − cos_α = 0 there for every pair: not a hidden-layer test
    hidden = llfc[(llfc.alpha == 0.5) & llfc.layer.str.startswith(("fc", "relu")) & (llfc.layer != "fc1")]
    means = hidden.groupby(["method", "layer"])[["one_minus_cos_alpha", "one_minus_cos_ab"]].mean()
    ratio = (means.one_minus_cos_alpha / means.one_minus_cos_ab).unstack("method")
    for method in ("spawning", "weight_matching", "activation_matching"):
        assert (ratio[method] <= 0.2).all(), ratio
        assert (ratio["naive"] > 1.5 * ratio[method]).all(), ratio


def assert_mechanism_claims(com: pd.DataFrame) -> None:
    """Aligned pairs commute better than the naive pair: Dist_com below it in every hidden layer."""
    hidden = com[com.layer != "fc1"].pivot_table(index="layer", columns="method", values="dist_com")
    for method in ("spawning", "weight_matching", "activation_matching"):
        assert (hidden[method] < hidden["naive"]).all(), hidden


def assert_layerwise_claims(t: dict) -> None:
    """Naive MLP pair: large full barrier, small single-layer ones; cumulative ends at the full
    barrier; moving a layer to B hurts more than a random move of the same length."""
    naive = {k: v[(v.method == "naive") & (v.split == "test")] for k, v in t.items()}
    single = naive["layer_barriers"]
    final = single[single.epoch == single.epoch.max()]
    full = final.loc[final.layer == "(all)", "loss_barrier"].item()
    assert full > 0.3
    assert (final.loc[final.layer != "(all)", "loss_barrier"] < full / 4).all(), final
    assert set(single.epoch) == {0, 3, 6}
    cumulative = naive["cumulative_barriers"]
    for (_order, _into), rows in cumulative.groupby(["order", "into"]):
        assert rows.sort_values("step")["loss_barrier"].iloc[-1] == full
    moved = naive["layer_robustness"].query("step == 1 and layer != 'out'")
    loss = moved.groupby(["layer", "direction"])["loss"].mean().unstack()
    assert (loss["random"] < loss["interpolation"]).all(), loss


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "workflow/configs").glob("*.yaml")))
def test_paper_configs_dry_run_on_their_own(tmp_path, config):
    """A paper-scale config replaces the default one (its experiments only) and plans every figure."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    out = snakemake(tmp_path, "-n", "--cores", "8", "--configfile", str(REPO / "workflow/configs" / config))
    assert out.returncode == 0, out.stderr[-3000:]
    names = yaml.safe_load((REPO / "workflow/configs" / config).read_text())["experiments"]
    planned = {w.split("experiment=")[1].split(",")[0] for _, w in planned_jobs(out.stdout)
               if "experiment=" in w}
    assert planned == set(names)
    assert "results/figures/fig11.pdf" in out.stdout


def _smoke_config(config_file: Path, data_dir: Path) -> dict:
    """A paper config shrunk to one batch of one epoch on the fixture data: same experiments,
    models (the smallest width of a sweep), methods and analyses."""
    experiments = yaml.safe_load(config_file.read_text())["experiments"]
    widths = [e["model"].get("width", 1) for e in experiments.values()]
    small = {}
    for name, e in experiments.items():
        if e["model"].get("width", 1) != min(widths):
            continue
        e["data"] = {"name": e["data"]["name"], "data_dir": str(data_dir), "download": False}
        e["train"].update(epochs=1, batch_size=128, milestones=[1], checkpoint_epochs=[0])
        e.update(spawn_epoch=0, threads=1, device="cpu", matching={"batches": 1, "batch_size": 32})
        e["llfc"] = {"probe_size": 8, "batch_size": 8}
        e["lmc"] = {**e.get("lmc", {}), "points": 3, "batch_size": 64}
        # interpolated BN statistics: no reset pass per variant, and the batched (vmap) path
        e["layerwise"] = {"eval_samples": 8, "draws": 1, "steps": [1], "norms": [1],
                          "splits": ["test"], "bn": "interpolate"}
        small[name] = e
    return {"experiments": small}


@pytest.mark.slow
def test_paper_configs_smoke_run_on_fixture_data(tmp_path):
    """Every paper-scale config, shrunk to one batch of one epoch, runs to every figure on tiny
    files in the datasets' own formats (CIFAR-10 pickles, MNIST IDX): all model families,
    methods and analyses at paper settings otherwise."""
    from test_data import _write_cifar_fixture, _write_mnist_fixture

    data_dir = tmp_path / "data"
    _write_cifar_fixture(data_dir, per_batch=16, n_test=32)  # 80 train images: one batch of 128
    _write_mnist_fixture(data_dir / "MNIST" / "raw", seed=0, n_train=80, n_test=32)
    experiments = {}
    for config in sorted((REPO / "workflow/configs").glob("*.yaml")):
        experiments |= _smoke_config(config, data_dir)["experiments"]
    write_config(tmp_path, {"experiments": experiments})
    out = snakemake(tmp_path, "--cores", "2", timeout=1500)
    assert out.returncode == 0, out.stderr[-4000:]
    for fig in range(1, 12):
        assert (tmp_path / f"results/figures/fig{fig}.pdf").exists()
    lmc = pd.read_parquet(tmp_path / "results/tables/lmc.parquet")
    assert set(lmc.experiment) == set(experiments)
