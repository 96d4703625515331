"""Model averaging against logit ensembling, for every averaging group of one start (the
fine-tunings from θ_0, or from its random initialisation): the uniform weight average of K
fine-tuned models and the ensemble of their logits on every task's test split, and per layer
1 − cos between the averaged model's features and the mean of the K models' features."""

import _path  # noqa: F401  (puts the lmcflow package on sys.path)
import pandas as pd

from lmcflow import jobs
from lmcflow.features import probe_indices
from lmcflow.finetune import model_averaging, run_task
from lmcflow.io import save_parquet
from lmcflow.models import feature_layers
from lmcflow.tasks import apply_task, task_data
from lmcflow.training import check_fits, load_run

setting = snakemake.params.setting
log, device = jobs.start(snakemake, setting["device"])
base_data = jobs.load_dataset(**setting["data"]).to(device)
task_sets = {t: apply_task(base_data, t) for t in setting["tasks"]}
spec = jobs.model_spec(base_data, setting["model"])
build = lambda: jobs.build(spec, device)  # noqa: E731
layers = feature_layers(build())
states = {}
for run, path in zip(setting["runs"], snakemake.input.runs):
    states[run] = load_run(path, device)["model"]
    check_fits(states[run], build(), path, f"{spec['arch']}, the configured model")
frames = []
for group, runs in setting["groups"].items():
    tasks = list(dict.fromkeys(run_task(r) for r in runs))
    data = task_data(base_data, tasks)
    samples = probe_indices(len(data.test_y), setting["llfc"]["probe_size"], seed=setting["seed"])
    table = model_averaging(build, [states[r] for r in runs], task_sets, data, samples, layers,
                            setting["lmc"]["bn"], setting["llfc"]["batch_size"],
                            setting["lmc"]["batch_size"], device)
    table.insert(0, "group", group)
    table.insert(1, "tasks", "+".join(tasks))
    table.insert(2, "k", len(runs))
    frames.append(table)
    ev = table[table["kind"] == "evaluation"]
    log(f"{group} (K = {len(runs)}), test error (%):\n"
        + (100 * ev.pivot(index="task", columns="model", values="error")).round(2).to_string())
table = pd.concat(frames, ignore_index=True)
table.insert(0, "experiment", snakemake.wildcards.experiment)
table.insert(1, "start", snakemake.wildcards.start)
save_parquet(table, snakemake.output[0])
