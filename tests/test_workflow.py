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

from lmcflow.config import load_yaml

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
        "vit": {  # the transformer path: traced spec, token features, layer groups per block
            "model": {"arch": "vit", "dim": 32, "depth": 2, "heads": 4},
            "train": {"epochs": 3},
            "spawn_epoch": 1,
            "methods": METHODS,
            "lmc": {"policies": ["interpolate"]},
            "llfc": {"probe_size": 64, "batch_size": 32},
            "layerwise": {"eval_samples": 200, "draws": 1, "random_orders": 0, "steps": [0, 1],
                          "norms": [0, 1], "splits": ["test"]},
        },
        "widths": {  # a sweep: experiments widths_width8 and widths_width16 (fig13, fig14)
            "sweep": {"model.width": [8, 16]},
            "model": {"arch": "mlp", "depth": 2},  # a hidden Linear layer for Dist_com
            "train": {"epochs": 1},
            "methods": ["naive", "weight_matching"],
            "lmc": {"points": 3, "policies": ["reset"]},
            "llfc": {"probe_size": 16},
            "layerwise": {"enabled": False},
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
    for rule in ("train", "train_parent", "train_child", "make_pair", "analyse_pair", "lmc_table",
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
    for fig in range(1, 15):
        assert (tmp_path / f"results/figures/fig{fig}.pdf").stat().st_size > 1000
    for exp in ("mlp", "cnn"):
        for method in METHODS:
            pair = tmp_path / f"results/{exp}/pairs/{method}/pair0"
            assert {"model_a.pt", "model_b.pt", "pair.json"} <= {p.name for p in pair.iterdir()}
            assert (pair / "permutation.json").exists() == method.endswith("_matching")
    assert_permuted_endpoint(tmp_path / "results/cnn", "weight_matching")
    assert (tmp_path / "results/logs/mlp/runs/seed0.log").read_text().count("epoch ") == 6

    again = snakemake(tmp_path, "-n", "--cores", "2")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    assert_reordered_config_plans_nothing(tmp_path)
    assert_sweep_change_reruns_one_point(tmp_path)
    assert_report(tmp_path)
    assert_sweep_columns(tmp_path / "results/tables")

    lmc = pd.read_parquet(tmp_path / "results/tables/lmc.parquet")
    assert list(lmc.columns[:3]) == ["experiment", "method", "pair"]
    assert {"alpha", "split", "loss", "error", "bn"} <= set(lmc.columns)
    assert set(lmc.loc[lmc.experiment == "cnn", "bn"]) == {"reset", "interpolate", "repair"}
    assert set(lmc.loc[lmc.experiment == "mlp", "bn"]) == {"none", "repair"}
    assert set(lmc.loc[lmc.configured, "bn"]) == {"reset", "none"}
    llfc = pd.read_parquet(tmp_path / "results/tables/llfc.parquet")
    assert {"alpha", "layer", "layer_index", "sample", "one_minus_cos_alpha", "one_minus_cos_ab",
            "coef_c"} <= set(llfc.columns)
    assert_mlp_claims(lmc[lmc.experiment == "mlp"], llfc[llfc.experiment == "mlp"])
    assert_vit_claims(lmc[lmc.experiment == "vit"], llfc[llfc.experiment == "vit"],
                      pd.read_parquet(tmp_path / "results/tables/layer_barriers.parquet"))
    assert_partial_rerun(tmp_path)
    tables = {t: pd.read_parquet(tmp_path / f"results/tables/{t}.parquet").query("experiment == 'mlp'")
              for t in ("commutativity", "stitching", "layer_barriers", "cumulative_barriers",
                        "layer_robustness")}
    assert_mechanism_claims(tables.pop("commutativity"))
    assert_stitching_claims(tables.pop("stitching"))
    assert_repair_claims(lmc[lmc.experiment == "mlp"])
    assert_layerwise_claims(tables)


def reversed_mappings(value):
    """`value` with the keys of every mapping in reverse order (values unchanged)."""
    if isinstance(value, dict):
        return {k: reversed_mappings(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reversed_mappings(v) for v in value]
    return value


def assert_reordered_config_plans_nothing(workdir: Path) -> None:
    """The same config with every mapping's keys in another order re-runs nothing (params are
    compared by their text, so they must not carry the file's key order)."""
    path = workdir / "config.yaml"
    original = path.read_text()
    path.write_text(yaml.safe_dump(reversed_mappings(yaml.safe_load(original)), sort_keys=False))
    assert path.read_text() != original
    plan = snakemake(workdir, "-n", "--cores", "2")
    assert plan.returncode == 0 and "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout
    path.write_text(original)


def assert_sweep_change_reruns_one_point(workdir: Path) -> None:
    """Changing one swept value plans that point's jobs and the cross-experiment ones only."""
    path = workdir / "config.yaml"
    original = path.read_text()
    config = yaml.safe_load(original)
    config["experiments"]["widths"]["sweep"]["model.width"] = [8, 12]
    write_config(workdir, config)
    plan = snakemake(workdir, "-n", "--cores", "2")
    assert plan.returncode == 0, plan.stderr
    jobs = planned_jobs(plan.stdout)
    assert {rule for rule, _ in jobs} >= {"train", "make_pair", "align_pair", "analyse_pair"}
    for rule, wildcards in jobs:
        assert rule in CROSS_EXPERIMENT_RULES or "experiment=widths_width12" in wildcards, (
            rule, wildcards)
    path.write_text(original)


def assert_sweep_columns(tables: Path) -> None:
    """Every table names each row's family and swept values (empty where not swept); the
    per-pair summary has one row per pair."""
    for path in sorted(tables.glob("*.parquet")):
        if path.stem == "linear_toy":  # no experiments
            continue
        table = pd.read_parquet(path)
        assert list(table.columns[:5]) == ["experiment", "method", "pair", "family",
                                           "sweep.model.width"], path.stem
        swept = table[table.family == "widths"]
        layerwise = path.stem in ("layer_barriers", "cumulative_barriers", "layer_robustness",
                                  "subspace")  # the sweep has them off
        assert set(swept.experiment) == (set() if layerwise else {"widths_width8",
                                                                  "widths_width16"}), path.stem
        assert (swept["sweep.model.width"] == swept.experiment.str.extract(r"(\d+)$")[0]
                .astype(int)).all(), path.stem
        assert table.loc[table.family != "widths", "sweep.model.width"].isna().all(), path.stem
        assert (table.loc[table.family != "widths", "family"]
                == table.loc[table.family != "widths", "experiment"]).all(), path.stem
    summary = pd.read_parquet(tables / "pair_summary.parquet")
    pairs = pd.read_parquet(tables / "alignment.parquet")[["experiment", "method", "pair"]]
    assert len(summary) == len(pairs.drop_duplicates()) == 3 * 4 + 2 * 2
    assert summary[["loss_barrier", "error_barrier", "llfc_ratio", "dist_com"]].notna().all().all()


def assert_report(workdir: Path) -> None:
    """The report holds every figure as PDF and PNG with its caption, and every table as an HTML
    preview a browser shows (no Parquet embedded as text)."""
    import zipfile

    out = snakemake(workdir, "--report", "report.zip")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "could not detect mimetype" not in out.stderr, out.stderr
    with zipfile.ZipFile(workdir / "report.zip") as z:
        names = z.namelist()
        text = "".join(z.read(n).decode("utf-8", "replace") for n in names
                       if n.endswith((".html", ".js", ".json")))
    files = {Path(n).name for n in names}
    for fig in range(1, 15):
        assert {f"fig{fig}.pdf", f"fig{fig}.png"} <= files, fig
    tables = ["lmc", "alignment", "llfc", "weak_additivity", "commutativity", "stitching",
              "layer_barriers", "cumulative_barriers", "layer_robustness", "subspace", "linear_toy",
              "pair_summary"]
    for table in tables:
        assert f"{table}.html" in files, table
    assert not any(n.endswith(".parquet") for n in names)
    for caption in ("LLFC: per layer", "Deep linear toy", "Preview of the long-format table"):
        assert caption in text, caption
    preview = next(n for n in names if n.endswith("llfc.html"))
    with zipfile.ZipFile(workdir / "report.zip") as z:
        page = z.read(preview).decode()
    assert "Mean per group" in page and "one_minus_cos_alpha" in page


CROSS_EXPERIMENT_RULES = {"table", "lmc_table", "pair_summary", "figure", "all"}


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
    assert {rule for rule, _ in jobs} >= {"train", "train_parent", "train_child", "make_pair",
                                          "align_pair", "analyse_pair", "layerwise"}
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
    log = (killed / "results/logs/m/runs/seed0.log").read_text()
    earlier, _, later = log.partition("a new attempt (the lines above are from an earlier one)")
    assert "epoch 1/40" in earlier and "resuming at epoch" in later, log  # both attempts kept
    assert snakemake(clean, "--cores", "1", target, timeout=600).returncode == 0
    a, b = (torch.load(d / target, weights_only=True)["model"] for d in (killed, clean))
    assert all(torch.equal(a[k], b[k]) for k in a)


def assert_permuted_endpoint(root: Path, method: str) -> None:
    """model_b.pt of a permutation method is π(B): B's final weights permuted by permutation.json."""
    import json

    import torch

    from lmcflow import jobs
    from lmcflow.alignment import apply_permutation, permutation_spec

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

    test = barriers(lmc[(lmc.split == "test") & lmc.configured].drop(columns="configured"))
    test = test.set_index("method")
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


def assert_vit_claims(lmc: pd.DataFrame, llfc: pd.DataFrame, layer_barriers: pd.DataFrame) -> None:
    """The ViT: aligned pairs have a lower loss barrier than the naive one; LLFC per block;
    layer-wise barriers per block."""
    from lmcflow.barriers import barriers

    loss = barriers(lmc[(lmc.split == "test") & lmc.configured].drop(columns="configured")
                    ).set_index("method")["loss_barrier"]
    for aligned in ("weight_matching", "activation_matching"):
        assert loss[aligned] < loss["naive"], loss
    assert set(llfc.layer) == {"blocks.0", "blocks.1", "head"}
    groups = set(layer_barriers.loc[layer_barriers.experiment == "vit", "layer"])
    assert {"blocks.0", "blocks.1", "(all)"} <= groups and "blocks.0.attn.q" not in groups


def assert_stitching_claims(st: pd.DataFrame) -> None:
    """A spawned pair's features are interchangeable (stitching costs little), a naive pair's
    are not; aligning the naive pair makes them so again."""
    own = st[st.layer == "(none)"].set_index(["method", "into"])["error"]
    stitched = st[st.layer != "(none)"]
    increase = (stitched["error"] - [own[(m, i)] for m, i in zip(stitched.method, stitched.into)])
    worst = increase.groupby(stitched["method"]).max()
    assert worst["spawning"] < 0.05, worst
    assert worst["naive"] > 0.3, worst
    for aligned in ("weight_matching", "activation_matching"):
        assert worst[aligned] < worst["naive"] / 2, worst


def assert_repair_claims(lmc: pd.DataFrame) -> None:
    """REPAIR lowers the naive MLP pair's midpoint loss (variance collapse undone)."""
    mid = lmc[(lmc.alpha == 0.5) & (lmc.split == "test") & (lmc.method == "naive")]
    loss = mid.groupby("bn")["loss"].mean()
    assert loss["repair"] < loss["none"], loss


def assert_layerwise_claims(t: dict) -> None:
    """Naive MLP pair: large full barrier, small single-layer ones; cumulative ends at the full
    barrier; moving a layer to B hurts more than a random move of the same length."""
    naive = {k: v[(v.method == "naive") & (v.split == "test")] for k, v in t.items()}
    single = naive["layer_barriers"]
    last = single.epoch.max()
    assert all(set(v.epoch) == {0, 3, 6} for v in naive.values())  # along training, every table
    naive = {k: v[v.epoch == last] for k, v in naive.items()}
    final = single[single.epoch == last]
    full = final.loc[final.layer == "(all)", "loss_barrier"].item()
    assert full > 0.3
    assert (final.loc[final.layer != "(all)", "loss_barrier"] < full / 4).all(), final
    cumulative = naive["cumulative_barriers"]
    assert set(cumulative.order) == {"shallow", "deep", "random1", "random2"}
    for (_order, _into), rows in cumulative.groupby(["order", "into"]):
        assert rows.sort_values("step")["loss_barrier"].iloc[-1] == full
    moved = naive["layer_robustness"].query("step == 1 and layer != 'out'")
    loss = moved.groupby(["layer", "direction"])["loss"].mean().unstack()
    assert (loss["random"] < loss["interpolation"]).all(), loss


PAPER_CONFIGS = sorted(p.name for p in (REPO / "workflow/configs").glob("*.yaml")
                       if "runs" not in p.read_text())  # not the own-checkpoint example


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_configs_dry_run_on_their_own(tmp_path, config):
    """A paper-scale config replaces the default one (its experiments only) and plans every figure."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    out = snakemake(tmp_path, "-n", "--cores", "8", "--configfile", str(REPO / "workflow/configs" / config))
    assert out.returncode == 0, out.stderr[-3000:]
    paper = load_yaml(REPO / "workflow/configs" / config)  # sweeps expanded: one name per point
    planned = {w.split("experiment=")[1].split(",")[0] for _, w in planned_jobs(out.stdout)
               if "experiment=" in w}
    assert planned == set(paper["experiments"])
    root = paper["results"]
    layerwise = any((e.get("layerwise") or {}).get("enabled", True)
                    for e in paper["experiments"].values())
    assert root != "results" and f"{root}/figures/fig1.pdf" in out.stdout
    assert (f"{root}/figures/fig11.pdf" in out.stdout) == layerwise
    assert "results/figures/" not in out.stdout  # nothing of the default config's root


def _smoke_config(config_file: Path, data_dir: Path) -> dict:
    """A paper config shrunk to one batch of one epoch on the fixture data: same experiments,
    models (the smallest width of a sweep), methods, analyses and the papers' options
    (lmc.bn and policies, llfc.first_feature, matching.residual)."""
    experiments = load_yaml(config_file)["experiments"]  # sweeps expanded
    widths = [e["model"].get("width", 1) for e in experiments.values()]
    small = {}
    for name, e in experiments.items():
        if e["model"].get("width", 1) != min(widths):
            continue
        e["data"] = {"name": e["data"]["name"], "data_dir": str(data_dir), "download": False}
        e["train"].update(epochs=1, batch_size=128, milestones=[1], checkpoint_epochs=[0])
        e.update(spawn_epoch=0, threads=1, device="cpu",
                 matching={**e.get("matching", {}), "batches": 1, "batch_size": 32})
        e["llfc"] = {**e.get("llfc", {}), "probe_size": 8, "batch_size": 8}  # first_feature kept
        if "federated" in e:  # one round of two clients (8 images of a class in the fixture)
            e["federated"].update(clients=2, local_epochs=1, keep_rounds=[0], min_shard=1)
        if "finetune" in e:  # two fine-tunings of each task, one epoch, one pair per method
            e["finetune"].update(runs=2, lambdas=[0.0, 1.0])
            e["finetune"]["train"] = {**e["finetune"].get("train", {}), "epochs": 1,
                                      "batch_size": 128}
            e["pairs"] = 1
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
    # the embedded-data configs (federated_mnist5k, finetune_mnist5k) have end-to-end tests of
    # their own (test_federated, test_finetune): here the configs that need other data
    for config in (c for c in PAPER_CONFIGS if not c.endswith("_mnist5k.yaml")):
        experiments |= _smoke_config(REPO / "workflow/configs" / config, data_dir)["experiments"]
    write_config(tmp_path, {"experiments": experiments})
    out = snakemake(tmp_path, "--cores", "2", timeout=2400)
    assert out.returncode == 0, out.stderr[-4000:]
    for fig in range(1, 13):
        assert (tmp_path / f"results/figures/fig{fig}.pdf").exists()
    lmc = pd.read_parquet(tmp_path / "results/tables/lmc.parquet")
    assert set(lmc.experiment) == set(experiments)


TINY_MLP = {"model": {"arch": "mlp", "width": 16, "depth": 1}, "train": {"epochs": 1},
            "methods": ["naive"], "layerwise": {"enabled": False}, "llfc": {"probe_size": 16}}


def test_a_missing_dataset_stops_the_job_with_its_message_in_the_job_log(tmp_path):
    exp = {**TINY_MLP, "data": {"name": "mnist", "data_dir": "nowhere", "download": False}}
    write_config(tmp_path, {"experiments": {"m": exp}})
    out = snakemake(tmp_path, "--cores", "1", "results/m/runs/seed0/final.pt")
    assert out.returncode != 0
    log = (tmp_path / "results/logs/m/runs/seed0.log").read_text()
    for words in ("job failed: DatasetNotFoundError", "nowhere/MNIST/raw", "set download: true",
                  "Traceback"):
        assert words in log, log
    assert "set download: true" in out.stderr  # the default profile shows the failed log


@pytest.mark.slow
def test_a_corrupt_checkpoint_names_the_command_that_rebuilds_it(tmp_path):
    """The hint in the log is a command that works: it rebuilds the file, and the usual command
    then finishes the run (deleting the file alone would plan nothing)."""
    write_config(tmp_path, {"experiments": {"m": TINY_MLP}})
    target = "results/m/pairs/naive/pair0/lmc.parquet"
    assert snakemake(tmp_path, "--cores", "2", target, timeout=600).returncode == 0
    corrupt = tmp_path / "results/m/pairs/naive/pair0/model_a.pt"
    corrupt.write_bytes(b"truncated")
    out = snakemake(tmp_path, "--cores", "2", target, timeout=600)
    assert out.returncode != 0
    log = (tmp_path / "results/logs/m/pairs/naive/pair0/analyse_pair.log").read_text()
    hint = "snakemake --cores 1 --force results/m/pairs/naive/pair0/model_a.pt"
    assert "is not a readable checkpoint" in log and hint in log, log
    fix = snakemake(tmp_path, *hint.split()[1:], timeout=600)
    assert fix.returncode == 0, fix.stderr[-2000:]
    assert snakemake(tmp_path, "--cores", "2", target, timeout=600).returncode == 0
    assert len(pd.read_parquet(tmp_path / target)) == 2 * 2 * 11  # splits x (plain, REPAIR) x alphas


def test_two_configs_in_one_directory_write_to_their_own_roots(tmp_path):
    """The default config and a paper config plan disjoint files: each under its own root."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    outputs = {}
    for name, extra in (("default", []), ("paper", ["--configfile", str(REPO / "workflow/configs/permutation_mnist.yaml")])):
        plan = snakemake(tmp_path, "-n", "--cores", "2", "--printshellcmds", *extra)
        assert plan.returncode == 0, plan.stderr[-2000:]
        outputs[name] = {line.split(":", 1)[1].strip() for line in plan.stdout.splitlines()
                         if line.strip().startswith(("output:", "log:"))}
    files = {k: {f.strip() for line in v for f in line.split(",")} for k, v in outputs.items()}
    assert files["default"] and files["paper"] and not files["default"] & files["paper"]
    assert all(f.startswith("results/permutation_mnist/") for f in files["paper"])
    assert "results/tables/llfc.parquet" in files["default"]
    assert "results/permutation_mnist/figures/fig3.pdf" in files["paper"]


def test_lint_is_clean():
    out = subprocess.run([SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(REPO),
                          "--lint"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.slow
def test_own_checkpoints_as_the_readme_says(tmp_path):
    """The README's "your own checkpoints" command, in a directory holding what it asks for: two
    torchvision ResNet-18 state dicts at checkpoints/a.pt and b.pt and CIFAR-10 under data/
    (here a small file in CIFAR's own format)."""
    import torch
    import torchvision

    from test_data import _write_cifar_fixture

    _write_cifar_fixture(tmp_path / "data", per_batch=16, n_test=32)
    (tmp_path / "checkpoints").mkdir()
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        state = torchvision.models.resnet18(num_classes=10).state_dict()
        torch.save({"state_dict": state, "epoch": 7} if name == "b" else state,
                   tmp_path / "checkpoints" / f"{name}.pt")
    out = snakemake(tmp_path, "--cores", "2", "--configfile",
                    str(REPO / "workflow/configs/compare_checkpoints.yaml"), timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    root = tmp_path / "results/compare"
    for fig in (1, 2, 3, 4, 5, 6, 12):
        assert (root / f"figures/fig{fig}.pdf").stat().st_size > 1000, fig
    lmc = pd.read_parquet(root / "tables/lmc.parquet")
    assert set(lmc.method) == {"naive", "weight_matching", "activation_matching"}
    llfc = pd.read_parquet(root / "tables/llfc.parquet")
    assert llfc.layer.nunique() == 21  # the convs and the fc of torchvision's ResNet-18
    assert "keeps the outputs" in (root / "logs/mine/pairs/weight_matching/pair0/align_pair.log").read_text()


USER_MODEL = """
from torch import nn


def small_net(in_shape, num_classes, hidden=32):
    c, h, w = in_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
"""


@pytest.mark.slow
def test_a_python_model_and_own_checkpoints_run_every_analysis(tmp_path):
    """A model from the user's own module (python:<module>:<callable>, found in model.path)
    with two checkpoints the user brings: every analysis and figure, layer-wise included."""
    import torch

    (tmp_path / "mymodels").mkdir()
    (tmp_path / "mymodels" / "nets.py").write_text(USER_MODEL)
    import importlib.util

    spec = importlib.util.spec_from_file_location("nets", tmp_path / "mymodels" / "nets.py")
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        torch.save(nets.small_net((1, 28, 28), 10, hidden=24).state_dict(), tmp_path / f"{name}.pt")
    write_config(tmp_path, {"experiments": {"own": {
        "runs": {"a": "a.pt", "b": "b.pt"},
        "model": {"arch": "python:nets:small_net", "path": "mymodels", "kwargs": {"hidden": 24}},
        "methods": ["naive", "weight_matching", "activation_matching"],
        "llfc": {"probe_size": 32}, "layerwise": {"eval_samples": 64, "draws": 1}}}})
    out = snakemake(tmp_path, "--cores", "2", timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    for fig in range(1, 13):
        assert (tmp_path / f"results/figures/fig{fig}.pdf").exists(), fig
    barriers = pd.read_parquet(tmp_path / "results/tables/layer_barriers.parquet")
    assert set(barriers.epoch) == {-1}  # a file of unknown epoch, no weights along training
    assert set(barriers.layer) >= {"1", "3", "5", "(all)"}  # the Sequential's Linear layers
