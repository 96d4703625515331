# Config validation (once, at load), the SLURM check (at start-up) and the input/params helpers of
# every rule.
# Results layout, under the config's own root (`results:`, default results/):
#   {root}/{experiment}/runs/{run}/final.pt           training runs (see lmcflow.pairs)
#   {root}/{experiment}/pairs/{method}/{pair}/...     endpoints, lmc, features, llfc
#   {root}/tables/{table}.parquet, {root}/figures/fig*.pdf, {root}/logs/, {root}/benchmarks/
import hashlib
import os
import shutil
import sys
from pathlib import Path

# The package is imported here from its folder (no install step needed); jobs run scripts in
# fresh interpreters, which find it through scripts/_path.py.
sys.path.insert(0, os.path.join(workflow.basedir, "workflow"))

from lmcflow.config import (ConfigError, canonical, describe_params_change,
                            federated_aggregations, finetune_methods, merge_runs,
                            python_model_files)
from lmcflow import finetune_plan as finetune
from lmcflow.pairs import (FINETUNE_METHODS, METHODS, PERMUTATION_METHODS, get_method, pair_index,
                           pair_name, pair_runs)
from lmcflow.seeds import derive_seed
from lmcflow.startup import check as check_config

# `snakemake -n` says why a job would run; for changed params Snakemake prints every changed
# param whole (a job's settings are one mapping of ~900 characters). Name the changed keys.
try:
    from snakemake.persistence import ParamsChange

    ParamsChange.__str__ = lambda change: (
        describe_params_change(change.only_old, change.only_new) if change else "No params change")
except ImportError:  # another Snakemake: its own wording
    pass

try:
    check_config(config)
except ConfigError as err:
    raise WorkflowError(f"{err}\n(README: Configuration)") from None

# The slurm executor (--profile slurm) runs sbatch to submit and squeue for job status (the
# profile's status command) on this machine. Where they are missing, it fails only at its first
# submission, after its 40 s wait, with "No such file or directory: 'sacct'"; say so before any
# job starts. Snakemake names the executor to the workflow only after reading the Snakefile, hence
# onstart: called after planning (a second or so), before the first submission, and in a real run
# only: a dry run needs no SLURM, and jobs (on the nodes) run with --no-hooks.
SLURM_COMMANDS = ("sbatch", "squeue")


def missing_slurm_commands():
    """The SLURM commands this run needs but PATH lacks (none unless the executor is slurm)."""
    plugin = workflow.executor_plugin
    if plugin is None or plugin.name != "slurm":
        return []
    return [command for command in SLURM_COMMANDS if shutil.which(command) is None]


def check_slurm_commands():
    """Stop a SLURM run at start-up where sbatch or squeue is missing, saying what to do."""
    missing = missing_slurm_commands()
    if missing:
        raise WorkflowError(
            "The slurm executor (--profile slurm) submits every job with sbatch and follows it "
            f"with squeue, but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            "not on PATH here. Run the workflow locally instead, without --profile slurm "
            "(snakemake --cores N ...), or on a machine where SLURM is installed, or load it "
            "first (e.g. `module load slurm`). No job was submitted.")


onstart:
    check_slurm_commands()


ROOT = config["results"].rstrip("/")
EXPERIMENTS = config["experiments"]
LAYERWISE = any(e["layerwise"]["enabled"] for e in EXPERIMENTS.values())


def results(path):
    """`path` (with wildcards) under this config's output root."""
    return f"{ROOT}/{path}"


FEDERATED = any(federated_aggregations(e) for e in EXPERIMENTS.values())
# family and swept values of every experiment (config.expand_sweeps): the tables' columns
SWEEP_POINTS = canonical({name: {"family": e.get("family", name), "swept": e.get("swept", {})}
                          for name, e in EXPERIMENTS.items()})


def _swept_somewhere():
    """Whether some family's experiments differ in a swept value (fig13 has a line to draw)."""
    values = {}
    for point in SWEEP_POINTS.values():
        for key, value in point["swept"].items():
            values.setdefault((point["family"], key), set()).add(repr(value))
    return any(len(v) > 1 for v in values.values())


FINETUNE = any(finetune_methods(e) for e in EXPERIMENTS.values())
CROSS_TASK = any(m.startswith("finetune_cross_task") for e in EXPERIMENTS.values()
                 for m in e["methods"])
MERGE_EXPERIMENTS = [name for name, e in EXPERIMENTS.items() if e["merge"]["k"]]
FIGURES = [results(f"figures/fig{n}.pdf")
           for n in (*range(1, 7), *(range(7, 12) if LAYERWISE else ()), 12,
                     *((13,) if _swept_somewhere() else ()), 14, *((15,) if FEDERATED else ()),
                     *((16, 17) if CROSS_TASK else ()), *((18,) if FINETUNE else ()),
                     *((19,) if MERGE_EXPERIMENTS else ()))]
ENV = "../../envs/lmcflow.yaml"


# experiment: the schema's name pattern, not an alternation of every name (matching a path
# against 100 alternatives per rule made planning a large sweep slow)
wildcard_constraints:
    experiment=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    method="|".join(METHODS),
    pair=r"pair\d+",
    seed=r"\d+",
    child=r"\d+",


PACKAGE = os.path.join(workflow.basedir, "workflow", "lmcflow")


# what every torch job imports through lmcflow.jobs
TORCH_JOB = ("jobs", "logs", "config", "io", "data", "models", "resnet18", "vit", "training",
             "seeds", "tasks")


_DIGESTS = {}


def _file_digest(path):
    if path not in _DIGESTS:
        with open(path, "rb") as fh:
            _DIGESTS[path] = hashlib.file_digest(fh, "sha256").hexdigest()[:16]
    return _DIGESTS[path]


def _digest(module):
    """A module's digest; a subpackage's (``alignment``) covers every file in it."""
    path = os.path.join(PACKAGE, module)
    if not os.path.isdir(path):
        return _file_digest(f"{path}.py")
    files = sorted(str(f.relative_to(path)) for f in Path(path).rglob("*.py"))
    return hashlib.sha256(" ".join(f"{f}:{_file_digest(os.path.join(path, f))}"
                                   for f in files).encode()).hexdigest()[:16]


def code(*modules):
    """Digests of the package modules a rule's script imports, as a param of the rule, so
    a changed module re-runs the rules that import it (Snakemake's code trigger follows only
    the script file itself), an unchanged one (touched, checked out again) re-runs nothing.
    Torch jobs name TORCH_JOB too; table and figure jobs import only their few torch-free
    modules. (A param, not a list of input files: planning a large sweep checks every input of
    every job, and this is one small mapping per rule.)"""
    return {"code": {m: _digest(m) for m in sorted(("__init__", *modules))}}


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
    return [results(f"{e}/pairs/{m}/{p}/{filename}") for e, m, p in all_pairs()
            if not layerwise or EXPERIMENTS[e]["layerwise"]["enabled"]]


def model_files(e):
    """Digests of a python: model's source files (file -> digest; {} for other models). A param
    (content, not timestamp) of the jobs that build the model, as the package's own modules
    are: editing the model re-runs what builds on it and nothing else."""
    if not e["model"]["arch"].startswith("python:"):
        return {}
    return {f: _file_digest(f) for f in python_model_files(e["model"])}


def endpoint_files(e):
    """Digests of the endpoint files of runs:, by content: a checkpoint moved into place keeps
    its old mtime, which Snakemake's timestamp check would take for up to date."""
    return {e["runs"][k]: _file_digest(e["runs"][k]) for k in ("a", "b")} if "runs" in e else {}


# ------------------------------------------------------------------ params: one experiment's values
# Every params value goes through canonical() (keys sorted at every level): Snakemake compares
# params by their repr, so the same config with its keys in another order plans nothing.


def run_params(kind):
    """Params of a training run of `kind` independent | parent | child: everything the run depends
    on, which is also the identity its checkpoints are resumed by."""

    def params(wildcards):
        e = exp(wildcards)
        seed = int(wildcards.seed)
        run = {"data": e["data"], "model": e["model"], "train": e["train"], "device": e["device"],
               "init_seed": seed, "noise_seed": seed, "stop_epoch": e["train"]["epochs"]}
        if model_files(e):  # part of the run's identity: an edited model does not resume old checkpoints
            run["model_code"] = model_files(e)
        if kind == "parent":
            run["stop_epoch"] = e["spawn_epoch"]
        elif kind == "child":
            run["noise_seed"] = derive_seed(seed, int(wildcards.child) + 1)
            run["spawn_epoch"] = e["spawn_epoch"]
        return canonical(run)

    return params


def federated_params(wildcards):
    """Params of a federated run: everything it depends on, also the identity its round
    checkpoints are resumed by."""
    e = exp(wildcards)
    run = {"data": e["data"], "model": e["model"], "train": e["train"], "device": e["device"],
           "federated": e["federated"], "aggregation": wildcards.aggregation,
           "seed": int(wildcards.seed)}
    if wildcards.aggregation == "aligned":
        run["matching"] = {k: e["matching"][k] for k in ("max_sweeps", "seed", "first_solve")}
    if model_files(e):
        run["model_code"] = model_files(e)
    return canonical(run)


def federated_files(filename):
    """`filename` of every federated run the config's methods need (pair p: seed S + 2p)."""
    return [results(f"{name}/federated/{agg}/seed{e['seed'] + 2 * p}/{filename}")
            for name, e in EXPERIMENTS.items() for agg in federated_aggregations(e)
            for p in range(e["pairs"])]


def pair_data(wildcards):
    """The data a pair is made and analysed on: the experiment's, or for a fine-tuning pair its
    tasks' splits (one task, or two concatenated; lmcflow.tasks)."""
    e = exp(wildcards)
    if wildcards.method in FINETUNE_METHODS:
        return {**e["data"],
                "tasks": finetune.pair_tasks(e, wildcards.method, pair_index(wildcards.pair))}
    return e["data"]


def finetune_user_files(e, runs):
    """Digests of the files a user brings among `runs` (run name -> file)."""
    files = [finetune.user_file(e, run) for run in runs]
    return {f: _file_digest(f) for f in files if f}


def pair_params(wildcards):
    """What making a pair depends on beyond its runs: matching settings and data (for AM), and
    the model for endpoints a user brings (the workflow's own runs carry theirs)."""
    e = exp(wildcards)
    own = {"model": e["model"], "model_code": model_files(e), "runs": e["runs"],
           "files": endpoint_files(e)} if "runs" in e else {}
    if wildcards.method in FINETUNE_METHODS:
        files = finetune_user_files(e, pair_runs(METHODS[wildcards.method], e,
                                                 pair_index(wildcards.pair)))
        if files:  # fine-tuned files the user brings: built as the configured model
            own = {"model": e["model"], "model_code": model_files(e), "user_files": files}
    return canonical({"data": pair_data(wildcards), "device": e["device"],
                      "matching": e["matching"], **own})


def analysis_params(wildcards):
    """What a pair's LMC, LLFC and mechanisms depend on beyond the pair."""
    e = exp(wildcards)
    return canonical({"data": pair_data(wildcards), "device": e["device"], "lmc": e["lmc"],
                      "llfc": e["llfc"], "seed": e["seed"]})


def layerwise_params(wildcards):
    e = exp(wildcards)
    return canonical({"data": pair_data(wildcards), "device": e["device"],
                      "layerwise": e["layerwise"], "seed": e["seed"]})


def get_layerwise_input(wildcards):
    """The pair's endpoints, its runs (for the weights kept along training) and π if any."""
    pair = results(f"{wildcards.experiment}/pairs/{wildcards.method}/{wildcards.pair}")
    files = {"a": f"{pair}/model_a.pt", "b": f"{pair}/model_b.pt", "info": f"{pair}/pair.json"}
    runs = get_make_pair_input(wildcards)
    files |= {"run_a": runs["a"], "run_b": runs["b"]}
    if wildcards.method in PERMUTATION_METHODS:
        files["permutation"] = f"{pair}/permutation.json"
    return files


def get_make_pair_input(wildcards):
    """The two runs of a pair: trained by the workflow, or the files the config names (runs:)."""
    e = exp(wildcards)
    if "runs" in e:
        return {"a": e["runs"]["a"], "b": e["runs"]["b"]}
    method = get_method(wildcards.method)
    runs = pair_runs(method, e, pair_index(wildcards.pair))
    root = results(wildcards.experiment)
    return {k: finetune.user_file(e, run) or f"{root}/{method.path(run)}"
            for k, run in zip(("a", "b"), runs)}


# ------------------------------------------------------------------ fine-tuning (finetune.smk)


def pretrain_params(wildcards):
    """θ_0: a training run of the experiment's train setting on pretrain.task, seed S."""
    e = exp(wildcards)
    run = {"data": {**e["data"], "tasks": [e["pretrain"]["task"]]}, "model": e["model"],
           "train": e["train"], "device": e["device"], "init_seed": e["seed"],
           "noise_seed": e["seed"], "stop_epoch": e["train"]["epochs"]}
    if model_files(e):
        run["model_code"] = model_files(e)
    return canonical(run)


def pretrained_file(e, experiment):
    """θ_0's file: the user's pretrain.checkpoint, or the pretraining run."""
    return finetune.user_file(e, finetune.PRETRAIN_RUN) or \
        results(f"{experiment}/runs/{finetune.PRETRAIN_RUN}/final.pt")


def get_finetune_input(wildcards):
    e = exp(wildcards)
    return {"pretrained": pretrained_file(e, wildcards.experiment)} \
        if wildcards.start == "pretrained" else {}


def finetune_params(wildcards):
    """A fine-tuning run: the task's data and train setting, from θ_0 or θ_0's initialisation
    (init seed S), SGD noise derive_seed(S, 5, r)."""
    e, task = exp(wildcards), wildcards.task
    run = {"data": {**e["data"], "tasks": [task]}, "model": e["model"],
           "train": finetune.task_train(e, task), "device": e["device"], "init_seed": e["seed"],
           "noise_seed": finetune.noise_seed(e["seed"], int(wildcards.run)),
           "stop_epoch": finetune.task_train(e, task)["epochs"], "start": wildcards.start}
    if model_files(e):
        run["model_code"] = model_files(e)
    if wildcards.start == "pretrained":
        run["pretrained_files"] = finetune_user_files(e, [finetune.PRETRAIN_RUN])
    return canonical(run)


def finetune_common(e):
    """What the CTL, task-arithmetic and averaging analyses depend on beyond their runs."""
    tasks = list(dict.fromkeys([e["pretrain"]["task"], *finetune.task_names(e)]))
    return {"data": e["data"], "tasks": tasks, "model": e["model"], "device": e["device"],
            "seed": e["seed"], "pretrain_task": e["pretrain"]["task"],
            "finetune": {k: e["finetune"][k] for k in ("lambdas", "ctl")},
            "lmc": {k: e["lmc"][k] for k in ("bn", "batch_size")},
            "llfc": {k: e["llfc"][k] for k in ("probe_size", "batch_size")},
            "model_code": model_files(e)}


def get_finetune_pair_input(wildcards):
    """The pair's endpoints and θ_0 (the pretrained file; the control rebuilds its start)."""
    e = exp(wildcards)
    pair = results(f"{wildcards.experiment}/pairs/{wildcards.method}/{wildcards.pair}")
    files = {"a": f"{pair}/model_a.pt", "b": f"{pair}/model_b.pt", "info": f"{pair}/pair.json"}
    if finetune.parse_method(wildcards.method)[1] == "pretrained":
        files["base"] = pretrained_file(e, wildcards.experiment)
    return files


def finetune_pair_params(wildcards):
    e = exp(wildcards)
    kind, start = finetune.parse_method(wildcards.method)
    tasks = finetune.pair_tasks(e, wildcards.method, pair_index(wildcards.pair))
    files = finetune_user_files(e, [finetune.PRETRAIN_RUN]) if start == "pretrained" else {}
    return canonical({**finetune_common(e), "start": start, "pair_tasks": tasks,
                      "pretrained_files": files})


def get_averaging_input(wildcards):
    """Every fine-tuned run of the start's averaging groups (in the order of the params' runs)."""
    e = exp(wildcards)
    root = results(wildcards.experiment)
    return {"runs": [finetune.user_file(e, run) or f"{root}/runs/{run}/final.pt"
                     for run in averaging_runs(e, wildcards.start)]}


def averaging_runs(e, start):
    return list(dict.fromkeys(r for g in finetune.averaging_groups(e, start).values() for r in g))


def averaging_params(wildcards):
    e = exp(wildcards)
    runs = averaging_runs(e, wildcards.start)
    return canonical({**finetune_common(e), "start": wildcards.start, "runs": runs,
                      "groups": finetune.averaging_groups(e, wildcards.start),
                      "user_files": finetune_user_files(e, runs)})


def finetune_tables(table):
    """The per-pair (ctl, task_arithmetic) or per-experiment (averaging) files of a table."""
    if table == "averaging":
        return [results(f"{name}/finetune/averaging_{start}.parquet")
                for name, e in EXPERIMENTS.items() for start in finetune.averaging_starts(e)]
    return [results(f"{name}/pairs/{method}/{pair}/{table}.parquet") for name, method, pair in all_pairs()
            if method.startswith("finetune_cross_task")]


def get_merge_many_input(wildcards):
    """The independent runs seed{S}..seed{S + max(merge.k) - 1}, in that order."""
    return [results(f"{wildcards.experiment}/runs/{run}/final.pt")
            for run in merge_runs(exp(wildcards))]


def merge_many_params(wildcards):
    e = exp(wildcards)
    return canonical({"data": e["data"], "model": e["model"], "device": e["device"],
                      "seed": e["seed"], "merge": e["merge"], "matching": e["matching"],
                      "runs": merge_runs(e), "model_code": model_files(e),
                      "lmc": {k: e["lmc"][k] for k in ("policies", "batch_size", "repair_logits")},
                      "llfc": {k: e["llfc"][k] for k in ("probe_size", "batch_size",
                                                         "first_feature")}})
