# Config validation (once, at load) and the input/params helpers of every rule.
# Results layout:
#   results/{experiment}/runs/{run}/final.pt           training runs (see lmcflow.pairs)
#   results/{experiment}/pairs/{method}/{pair}/...     endpoints, lmc, features, llfc
#   results/tables/{table}.parquet, results/figures/fig*.pdf
import os
import sys

sys.path.insert(0, os.path.join(workflow.basedir, "workflow"))
# Jobs run scripts in fresh interpreters (locally, on SLURM, in conda envs): they find the
# package through PYTHONPATH, so no install step is needed to run the workflow.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [os.path.join(workflow.basedir, "workflow"), os.environ.get("PYTHONPATH", "")]
).rstrip(os.pathsep)

from lmcflow.config import ConfigError, validate
from lmcflow.pairs import METHODS, PERMUTATION_METHODS, get_method, pair_index, pair_name
from lmcflow.training import derive_seed

try:
    validate(config)
except ConfigError as err:
    raise WorkflowError(f"{err}\nFix it in the config file (see README: configuration).") from None

EXPERIMENTS = config["experiments"]
LAYERWISE = any(e["layerwise"]["enabled"] for e in EXPERIMENTS.values())
FIGURES = [f"results/figures/fig{n}.pdf" for n in range(1, 12 if LAYERWISE else 7)]
ENV = "../../envs/lmcflow.yaml"


wildcard_constraints:
    experiment="|".join(map(re.escape, EXPERIMENTS)),
    method="|".join(METHODS),
    pair=r"pair\d+",
    seed=r"\d+",
    child=r"\d+",


PACKAGE = os.path.join(workflow.basedir, "workflow", "lmcflow")


def code(*modules):
    """The package modules a rule's script imports, as inputs: editing one re-runs the rule
    (Snakemake's code trigger follows only the script file itself). Every script imports jobs,
    which brings config, io, data, models and training."""
    base = ("__init__", "jobs", "config", "io", "data", "models", "training")
    return [os.path.join(PACKAGE, f"{m}.py") for m in (*base, *modules)]


def exp(wildcards):
    return EXPERIMENTS[wildcards.experiment]


def heavy_threads(wildcards):
    return exp(wildcards)["threads"]


def gpus(wildcards):
    """GPUs a heavy job asks the executor for (SLURM: --gpus): one when device is cuda."""
    return 1 if exp(wildcards)["device"] == "cuda" else 0


def all_pairs():
    """(experiment, method, pair) of every pair the config asks for."""
    return [(name, method, pair_name(p))
            for name, e in EXPERIMENTS.items() for method in e["methods"] for p in range(e["pairs"])]


def pair_files(filename, layerwise=False):
    """`filename` in every pair directory (with layerwise=True: of experiments that enable it)."""
    return [f"results/{e}/pairs/{m}/{p}/{filename}" for e, m, p in all_pairs()
            if not layerwise or EXPERIMENTS[e]["layerwise"]["enabled"]]


# ------------------------------------------------------------------ params: one experiment's values


def run_params(kind):
    """Params of a training run of `kind` independent | parent | child: everything the run depends
    on, which is also the identity its checkpoints are resumed by."""

    def params(wildcards):
        e = exp(wildcards)
        seed = int(wildcards.seed)
        run = {"data": e["data"], "model": e["model"], "train": e["train"], "device": e["device"],
               "init_seed": seed, "noise_seed": seed, "stop_epoch": e["train"]["epochs"]}
        if kind == "parent":
            run["stop_epoch"] = e["spawn_epoch"]
        elif kind == "child":
            run["noise_seed"] = derive_seed(seed, int(wildcards.child) + 1)
            run["spawn_epoch"] = e["spawn_epoch"]
        return run

    return params


def pair_params(wildcards):
    """What making a pair depends on beyond its runs: matching settings (and data for AM)."""
    e = exp(wildcards)
    return {"data": e["data"], "device": e["device"], "matching": e["matching"]}


def lmc_params(wildcards):
    e = exp(wildcards)
    return {"data": e["data"], "device": e["device"], "lmc": e["lmc"]}


def probe_params(wildcards):
    """What the probe-set analyses (features, mechanisms) depend on."""
    e = exp(wildcards)
    return {"data": e["data"], "device": e["device"], "bn": e["lmc"]["bn"], "llfc": e["llfc"],
            "seed": e["seed"]}


def layerwise_params(wildcards):
    e = exp(wildcards)
    return {"data": e["data"], "device": e["device"], "layerwise": e["layerwise"], "seed": e["seed"]}


def get_layerwise_input(wildcards):
    """The pair's endpoints, its runs (for the weights kept along training) and π if any."""
    pair = f"results/{wildcards.experiment}/pairs/{wildcards.method}/{wildcards.pair}"
    files = {"a": f"{pair}/model_a.pt", "b": f"{pair}/model_b.pt", "info": f"{pair}/pair.json"}
    runs = get_make_pair_input(wildcards)
    files |= {"run_a": runs["a"], "run_b": runs["b"]}
    if wildcards.method in PERMUTATION_METHODS:
        files["permutation"] = f"{pair}/permutation.json"
    return files


def get_make_pair_input(wildcards):
    e = exp(wildcards)
    run_a, run_b = get_method(wildcards.method).endpoints(e["seed"], pair_index(wildcards.pair))
    root = f"results/{wildcards.experiment}/runs"
    return {"a": f"{root}/{run_a}/final.pt", "b": f"{root}/{run_b}/final.pt"}
